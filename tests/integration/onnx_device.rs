//! The ONNX float evaluator and calibration on a backend's own tensors ([`DeviceGraph`]):
//! values stay on the device between backend ops (transfers counted), calibration observes
//! them there, and the result is the host observers' on the CPU and the CPU's on the GPU.

use crate::common;

use std::collections::HashMap;
use std::path::PathBuf;

use ndarray::ArrayD;
use qfuse::backend::{CpuBackend, GpuBackend};
use qfuse::gpu::GpuContext;
use qfuse::io::state_dict::load_state_dict;
use qfuse::onnx::{
    fold_model, quantize_model, run, run_observed, DeviceGraph, Observed, OnnxModel,
};
use qfuse::quant::QParams;
use qfuse::reference::observer::MinMaxObserver;

fn load(name: &str) -> OnnxModel {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/onnx/{name}.onnx"));
    OnnxModel::load(&p).unwrap()
}

fn lcg(shape: &[usize], seed: u32) -> ArrayD<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(12_345);
    ArrayD::from_shape_fn(ndarray::IxDyn(shape), |_| {
        s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        (s >> 8) as f32 / (1u32 << 24) as f32
    })
}

/// Calibration batches (three, of the model's static batch): the committed images for the
/// 3×16×16 models, seeded ones for Mnist.
fn batches(name: &str) -> Vec<Vec<(String, ArrayD<f32>)>> {
    if name == "mnist" {
        return (0..3)
            .map(|k| vec![("input".to_string(), lcg(&[2, 1, 28, 28], k))])
            .collect();
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/onnx/calib.safetensors");
    let sd = load_state_dict(p).unwrap();
    let x = sd.f32("input").unwrap();
    let n = load(name).graph.inputs[0].shape[0].unwrap();
    (0..3)
        .map(|b| {
            let s = x
                .slice_axis(ndarray::Axis(0), ndarray::Slice::from(b * n..(b + 1) * n))
                .to_owned();
            vec![("input".to_string(), s)]
        })
        .collect()
}

fn rel_close(a: &ArrayD<f32>, b: &ArrayD<f32>, tol: f32) -> bool {
    let scale = b.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    a.shape() == b.shape() && a.iter().zip(b).all(|(p, q)| (p - q).abs() <= tol * scale)
}

/// On the CPU, the qparams `quantize_model` computes with `observe_running` on the
/// backend's tensors are the ones the reference `MinMaxObserver` computes on the same values
/// seen through the observer hook, bit for bit.
fn device_calibration_on_the_cpu_equals_the_host_observers() {
    for name in ["mnist", "resnet", "mobilenet", "decoder"] {
        let m = load(name);
        let batches = if name == "decoder" {
            let (x, _) = decoder_input();
            vec![vec![("input".to_string(), x)]]
        } else {
            batches(name)
        };
        let q = quantize_model(&CpuBackend, &m, &batches).unwrap();
        let folded = fold_model(&CpuBackend, &m).unwrap();
        let cfg = qfuse::deploy::DeployConfig::default();
        let mut host: HashMap<String, MinMaxObserver> = HashMap::new();
        for b in &batches {
            run_observed(&CpuBackend, &folded.model.graph, b, &mut |v, value| {
                let a = match value {
                    Observed::Device(t) => t,
                    Observed::Host(a) => a,
                };
                host.entry(v.to_string())
                    .or_insert_with(|| MinMaxObserver::new(cfg.activation).unwrap())
                    .observe(a)
            })
            .unwrap();
        }
        let want = |v: &str| -> QParams { host[v].qparams() };
        assert!(!q.ops.is_empty(), "{name}");
        for op in &q.ops {
            assert_eq!(op.input.1, want(&op.input.0), "{name} {}", op.node);
            assert_eq!(op.output.1, want(&op.output.0), "{name} {}", op.node);
        }
    }
}

/// The decoder's input (its committed reference input).
fn decoder_input() -> (ArrayD<f32>, ArrayD<f32>) {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/onnx/decoder.io.safetensors");
    let sd = load_state_dict(p).unwrap();
    (
        sd.f32("input").unwrap().clone(),
        sd.f32("output").unwrap().clone(),
    )
}

/// On the GPU a run keeps every value a backend op computes on the device: the parameters
/// are uploaded once, a run uploads its input and downloads its output, plus one download
/// and one upload around each stretch of host-side ops.
fn device_graph_keeps_values_on_the_gpu() {
    if common::gpu().is_none() {
        return;
    }
    // A context of its own: the shared one counts the transfers of tests running alongside.
    let ctx = std::sync::Arc::new(GpuContext::new().unwrap());
    let gpu = GpuBackend::new(ctx.clone());
    // (model, parameter uploads, a run's uploads and downloads). Mnist runs wholly on the
    // device (4 layers' folded weights and biases). ResNet (6 convs + a Gemm): its padded max
    // pool and GlobalAveragePool run on the host, so a run downloads their inputs and uploads
    // their results (the pool's once, though a conv and the residual add read it), and
    // downloads the output. MobileNet (7 convs, 2 Gemms): GlobalAveragePool on the host.
    for (name, params, up, down) in [
        ("mnist", 8, 0, 1),
        ("resnet", 14, 2, 3),
        ("mobilenet", 18, 1, 2),
    ] {
        let m = load(name);
        let folded = fold_model(&CpuBackend, &m).unwrap();
        let g = &folded.model.graph;
        let before = ctx.transfer_stats();
        let dg = DeviceGraph::prepare(g, gpu.clone()).unwrap();
        let prep = ctx.transfer_stats().since(&before);
        let x = batches(name).remove(0);
        let inputs = dg.upload_inputs(&x).unwrap();
        let before = ctx.transfer_stats();
        let out = dg.run_device(&inputs).unwrap();
        let y = qfuse::backend::Device::download(dg.backend(), &out[0].1).unwrap();
        let t = ctx.transfer_stats().since(&before);
        println!(
            "{name}: prepare {} uploads; a run {} uploads, {} downloads",
            prep.uploads, t.uploads, t.downloads
        );
        let want = run(&CpuBackend, g, &x).unwrap();
        assert!(rel_close(&y, &want[0].1, 1e-4), "{name}");
        assert_eq!((prep.uploads, prep.downloads), (params, 0), "{name}");
        assert_eq!((t.uploads, t.downloads), (up, down), "{name}");
    }
}

/// `quantize_model` on the GPU: one upload per calibration batch and one download per
/// observed value (Mnist runs wholly on the device), the graph input's qparams equal to the
/// CPU's (its values are exact), the others within f32 rounding of the CPU's.
fn gpu_calibration_matches_the_cpu_with_counted_transfers() {
    if common::gpu().is_none() {
        return;
    }
    let ctx = std::sync::Arc::new(GpuContext::new().unwrap());
    let gpu = GpuBackend::new(ctx.clone());
    let m = load("mnist");
    let batches = batches("mnist");
    let before = ctx.transfer_stats();
    let qg = quantize_model(&gpu, &m, &batches).unwrap();
    let t = ctx.transfer_stats().since(&before);
    let qc = quantize_model(&CpuBackend, &m, &batches).unwrap();
    let mut observed: Vec<&str> = Vec::new();
    for op in &qg.ops {
        for v in [&op.input.0, &op.output.0] {
            if !observed.contains(&v.as_str()) {
                observed.push(v);
            }
        }
    }
    println!(
        "mnist calibration on the GPU: {t:?}, {} observed",
        observed.len()
    );
    // Folding conv1 + batchnorm1 on the GPU (fold_model through HostOps): the conv's weight
    // and bias and the BatchNorm's 4 vectors up, the folded weight and bias down. Then the
    // 8 parameters once and one upload per batch; one download per observed value.
    assert_eq!(
        (t.uploads, t.downloads),
        (6 + 8 + batches.len() as u64, 2 + observed.len() as u64),
        "{t:?}"
    );
    assert_eq!(qg.ops.len(), qc.ops.len());
    for (g, c) in qg.ops.iter().zip(&qc.ops) {
        assert_eq!(
            (&g.node, &g.input.0, &g.output.0),
            (&c.node, &c.input.0, &c.output.0)
        );
        assert_eq!(g.weight, c.weight, "weights are quantized on the host");
        for (a, b) in [(&g.input.1, &c.input.1), (&g.output.1, &c.output.1)] {
            let close = (a.scale[0] - b.scale[0]).abs() <= 1e-4 * b.scale[0]
                && (a.zero_point[0] - b.zero_point[0]).abs() <= 1;
            assert!(close, "{}: {a:?} vs {b:?}", g.node);
        }
    }
    assert_eq!(
        qg.ops[0].input.1, qc.ops[0].input.1,
        "the graph input is exact"
    );
}

crate::qfuse_tests! {
    device_calibration_on_the_cpu_equals_the_host_observers,
    device_graph_keeps_values_on_the_gpu: gpu,
    gpu_calibration_matches_the_cpu_with_counted_transfers: gpu,
}
