//! The ONNX float evaluator and calibration on a backend's own tensors ([`DeviceGraph`]):
//! values stay on the device between backend ops (transfers counted), calibration observes
//! them there, and the result is the host observers' on the CPU and the CPU's on the GPU.

use crate::common;

use std::collections::HashMap;
use std::path::PathBuf;

use ndarray::ArrayD;
use qfuse::backend::{CpuBackend, GpuBackend};
use qfuse::config::ConfigList;
use qfuse::gpu::GpuContext;
use qfuse::io::state_dict::load_state_dict;
use qfuse::onnx::{
    fold_model, quantize_model, quantize_model_with, run, run_observed, ActivationObserver,
    DeviceGraph, Observed, OnnxModel, QuantizeOptions, MOVING_AVERAGE_CONSTANT,
};
use qfuse::quant::QParams;
use qfuse::reference::observer::{MinMaxObserver, MovingAverageMinMaxObserver};

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

/// Host reference observers over the values the evaluator's hook shows (on the CPU the
/// backend's tensors are host arrays): min/max, or the moving average with constant `c`.
enum HostObserver {
    MinMax(MinMaxObserver),
    Moving(MovingAverageMinMaxObserver),
}

fn host_qparams(
    graph: &qfuse::onnx::Graph,
    batches: &[Vec<(String, ArrayD<f32>)>],
    c: Option<f32>,
) -> HashMap<String, QParams> {
    let spec = qfuse::deploy::DeployConfig::default().activation;
    let mut host: HashMap<String, HostObserver> = HashMap::new();
    for b in batches {
        run_observed(&CpuBackend, graph, b, &mut |v, value| {
            let a = match value {
                Observed::Device(t) => t,
                Observed::Host(a) => a,
            };
            let o = host.entry(v.to_string()).or_insert_with(|| match c {
                None => HostObserver::MinMax(MinMaxObserver::new(spec).unwrap()),
                Some(c) => HostObserver::Moving(
                    MovingAverageMinMaxObserver::with_averaging_constant(spec, c).unwrap(),
                ),
            });
            match o {
                HostObserver::MinMax(o) => o.observe(a),
                HostObserver::Moving(o) => o.observe(a),
            }
        })
        .unwrap();
    }
    host.into_iter()
        .map(|(k, o)| {
            let q = match o {
                HostObserver::MinMax(o) => o.qparams(),
                HostObserver::Moving(o) => o.qparams(),
            };
            (k, q)
        })
        .collect()
}

/// On the CPU, the qparams `quantize_model` computes with `observe_running` on the
/// backend's tensors are the ones the reference observers (`MinMaxObserver`,
/// `MovingAverageMinMaxObserver`) compute on the same values seen through the observer
/// hook, bit for bit.
fn device_calibration_on_the_cpu_equals_the_host_observers() {
    for name in ["mnist", "resnet", "mobilenet", "decoder"] {
        let m = load(name);
        let batches = if name == "decoder" {
            let (x, _) = decoder_input();
            vec![vec![("input".to_string(), x)]]
        } else {
            batches(name)
        };
        let folded = fold_model(&CpuBackend, &m).unwrap();
        for observer in [
            ActivationObserver::MinMax,
            ActivationObserver::MovingAverage(MOVING_AVERAGE_CONSTANT),
            ActivationObserver::MovingAverage(0.5),
        ] {
            let options = QuantizeOptions {
                config: None,
                observer,
                ..QuantizeOptions::default()
            };
            let q = quantize_model_with(&CpuBackend, &m, &batches, &options).unwrap();
            let want = host_qparams(&folded.model.graph, &batches, observer.averaging_constant());
            assert!(!q.ops.is_empty() && q.left_float.is_empty(), "{name}");
            for op in &q.ops {
                for (v, qp) in [op.input.as_ref().unwrap(), op.output.as_ref().unwrap()] {
                    assert_eq!(qp, &want[v], "{name} {observer:?} {}", op.node);
                }
            }
        }
    }
    // The moving average moves the ranges (three batches of different images).
    let m = load("resnet");
    let b = batches("resnet");
    let mm = quantize_model(&CpuBackend, &m, &b).unwrap();
    let options = QuantizeOptions {
        config: None,
        observer: ActivationObserver::MovingAverage(MOVING_AVERAGE_CONSTANT),
        ..QuantizeOptions::default()
    };
    let ma = quantize_model_with(&CpuBackend, &m, &b, &options).unwrap();
    assert!(mm
        .ops
        .iter()
        .zip(&ma.ops)
        .any(|(a, b)| a.output != b.output));
    // An averaging constant outside [0, 1] is refused.
    let options = QuantizeOptions {
        config: None,
        observer: ActivationObserver::MovingAverage(1.5),
        ..QuantizeOptions::default()
    };
    assert!(quantize_model_with(&CpuBackend, &m, &b, &options).is_err());
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
/// (and the constant operands of Add / Mul / Concat) are uploaded once, and a run uploads
/// its input and downloads its output — nothing else crosses, on every test model (padded
/// and average pooling, GlobalAveragePool, broadcasting Mul, Concat and asymmetric conv pads
/// included).
fn device_graph_keeps_values_on_the_gpu() {
    if common::gpu().is_none() {
        return;
    }
    // A context of its own: the shared one counts the transfers of tests running alongside.
    let ctx = std::sync::Arc::new(GpuContext::new().unwrap());
    let gpu = GpuBackend::new(ctx.clone());
    // (model, parameter uploads). Mnist: 4 layers' folded weights and biases; ResNet: 6
    // convs + a Gemm; MobileNet: 7 convs, 2 Gemms; the decoder: 2 convs (the head without a
    // bias), a ConvTranspose, a Gemm and the Mul's constant scale.
    for (name, params) in [
        ("mnist", 8),
        ("resnet", 14),
        ("mobilenet", 18),
        ("decoder", 8),
    ] {
        let m = load(name);
        let folded = fold_model(&CpuBackend, &m).unwrap();
        let g = &folded.model.graph;
        let before = ctx.transfer_stats();
        let dg = DeviceGraph::prepare(g, gpu.clone()).unwrap();
        let prep = ctx.transfer_stats().since(&before);
        let x = if name == "decoder" {
            vec![("input".to_string(), decoder_input().0)]
        } else {
            batches(name).remove(0)
        };
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
        assert_eq!((t.uploads, t.downloads), (0, 1), "{name}");
    }
}

/// Mnist (folded) with `alpha` / `beta` on its Gemms, and the same model with the weights
/// scaled by `alpha` and the biases by `beta` in the initializers instead (`alpha = beta = 1`).
fn scaled_gemms(alpha: f32, beta: f32) -> (qfuse::onnx::Graph, qfuse::onnx::Graph) {
    let m = load("mnist");
    let g = fold_model(&CpuBackend, &m).unwrap().model.graph;
    let (mut attrs, mut scaled) = (g.clone(), g);
    let mut gemms = 0;
    for (a, s) in attrs.nodes.iter_mut().zip(&mut scaled.nodes) {
        if let qfuse::onnx::Op::Gemm {
            alpha: a_,
            beta: b_,
            ..
        } = &mut a.op
        {
            (*a_, *b_) = (alpha, beta);
            gemms += 1;
            for (i, k) in [(1, alpha), (2, beta)] {
                let t = scaled.initializers.get_mut(&s.inputs[i]).unwrap();
                let qfuse::onnx::Tensor::F32(t) = t else {
                    panic!("f32 initializer")
                };
                t.mapv_inplace(|v| v * k);
            }
        }
    }
    assert_eq!(gemms, 2);
    (attrs, scaled)
}

/// A Gemm with `alpha`, `beta` other than 1 (and a constant weight, a 1-D C) runs on the
/// device like any linear layer: the parameter uploads and the run's transfers are the
/// `alpha = beta = 1` model's, and the output is the CPU evaluation's of the same graph and of
/// the graph with the scales moved into its initializers.
fn gemm_alpha_beta_runs_on_the_device() {
    let (attrs, scaled) = scaled_gemms(0.5, -2.0);
    let x = batches("mnist").remove(0);
    let want = run(&CpuBackend, &scaled, &x).unwrap();
    let cpu = run(&CpuBackend, &attrs, &x).unwrap();
    assert!(rel_close(&cpu[0].1, &want[0].1, 1e-5));
    if common::gpu().is_none() {
        return;
    }
    let ctx = std::sync::Arc::new(GpuContext::new().unwrap());
    let gpu = GpuBackend::new(ctx.clone());
    let before = ctx.transfer_stats();
    let dg = DeviceGraph::prepare(&attrs, gpu.clone()).unwrap();
    let prep = ctx.transfer_stats().since(&before);
    let inputs = dg.upload_inputs(&x).unwrap();
    let before = ctx.transfer_stats();
    let out = dg.run_device(&inputs).unwrap();
    let y = qfuse::backend::Device::download(dg.backend(), &out[0].1).unwrap();
    let t = ctx.transfer_stats().since(&before);
    assert_eq!((prep.uploads, prep.downloads), (8, 0));
    assert_eq!((t.uploads, t.downloads), (0, 1));
    assert!(rel_close(&y, &want[0].1, 1e-4));
}

/// Calibration of every test model on the GPU (`quantize_model`) moves only the batches up
/// and the observers' statistics down: the BatchNorms folded on the host (parameters are
/// edge data), the folded parameters uploaded once, one upload per batch and one 8-byte
/// download per observed value — no value of the graph crosses. The qparams stay within f32 rounding of
/// the CPU's (the convs' summation order differs; the input's are exact).
fn gpu_calibration_moves_only_batches_and_statistics() {
    if common::gpu().is_none() {
        return;
    }
    let ctx = std::sync::Arc::new(GpuContext::new().unwrap());
    let gpu = GpuBackend::new(ctx.clone());
    for (name, params) in [
        ("mnist", 8),
        ("resnet", 14),
        ("mobilenet", 18),
        ("decoder", 8),
    ] {
        let m = load(name);
        let batches = if name == "decoder" {
            vec![vec![("input".to_string(), decoder_input().0)]]
        } else {
            batches(name)
        };
        let before = ctx.transfer_stats();
        let qg = quantize_model(&gpu, &m, &batches).unwrap();
        let t = ctx.transfer_stats().since(&before);
        let qc = quantize_model(&CpuBackend, &m, &batches).unwrap();
        let mut observed: Vec<&str> = Vec::new();
        for op in &qg.ops {
            for (v, _) in [op.input.as_ref().unwrap(), op.output.as_ref().unwrap()] {
                if !observed.contains(&v.as_str()) {
                    observed.push(v);
                }
            }
        }
        let identical = qg
            .ops
            .iter()
            .zip(&qc.ops)
            .filter(|(g, c)| g.input == c.input && g.output == c.output)
            .count();
        println!(
            "{name}: calibration {}/{} transfers ({} batches, {} op values); \
             {identical}/{} ops with the CPU's qparams exactly",
            t.uploads,
            t.downloads,
            batches.len(),
            observed.len(),
            qg.ops.len()
        );
        // Up: the parameters and the batches. Down: each observer's `[2, 1]` min / max
        // state once (8 bytes; the observed values are the ops' inputs and outputs, and
        // the outputs of Add, GlobalAveragePool and activation nodes).
        let down = t.downloads;
        assert_eq!(t.uploads, params + batches.len() as u64, "{name}: {t:?}");
        assert_eq!(t.download_bytes, 8 * down, "{name}: {t:?}");
        assert!(down >= observed.len() as u64, "{name}: {t:?}");
        assert_eq!(qg.ops.len(), qc.ops.len(), "{name}");
        for (g, c) in qg.ops.iter().zip(&qc.ops) {
            for (a, b) in [
                (&g.input.as_ref().unwrap().1, &c.input.as_ref().unwrap().1),
                (&g.output.as_ref().unwrap().1, &c.output.as_ref().unwrap().1),
            ] {
                let close = (a.scale[0] - b.scale[0]).abs() <= 1e-4 * b.scale[0]
                    && (a.zero_point[0] - b.zero_point[0]).abs() <= 1;
                assert!(close, "{name} {}: {a:?} vs {b:?}", g.node);
            }
        }
        assert_eq!(
            qg.ops[0].input, qc.ops[0].input,
            "{name}: the graph input is exact"
        );
    }
}

/// The committed QDQ models, and uint8-activation exports, on the GPU: every
/// DequantizeLinear of an int8 weight is folded
/// once at prepare, every QuantizeLinear → DequantizeLinear pair of an activation runs as one
/// op on the device (ONNX's division rounding), so a run moves only its input and output; its
/// output equals the CPU evaluation's within f32 rounding of the convs.
fn qdq_models_run_on_the_device() {
    if common::gpu().is_none() {
        return;
    }
    let ctx = std::sync::Arc::new(GpuContext::new().unwrap());
    let gpu = GpuBackend::new(ctx.clone());
    for (name, uint8) in [
        ("resnet", false),
        ("mobilenet", false),
        ("resnet", true),
        ("mobilenet", true),
    ] {
        let x = batches(name).remove(0);
        // The committed int8 files, and uint8 exports (uint8 QuantizeLinear /
        // DequantizeLinear pairs, also one device op each).
        let m = if uint8 {
            let options = QuantizeOptions {
                activation_codes: qfuse::quant::QDtype::QUInt8,
                ..QuantizeOptions::default()
            };
            quantize_model_with(&CpuBackend, &load(name), &batches(name), &options)
                .unwrap()
                .model
        } else {
            load(&format!("{name}.int8"))
        };
        let name = format!("{name}.{}", if uint8 { "uint8" } else { "int8" });
        let g = &m.graph;
        let dg = DeviceGraph::prepare(g, gpu.clone()).unwrap();
        let inputs = dg.upload_inputs(&x).unwrap();
        let before = ctx.transfer_stats();
        let out = dg.run_device(&inputs).unwrap();
        let y = qfuse::backend::Device::download(dg.backend(), &out[0].1).unwrap();
        let t = ctx.transfer_stats().since(&before);
        assert_eq!((t.uploads, t.downloads), (0, 1), "{name}: {t:?}");
        let want = run(&CpuBackend, g, &x).unwrap();
        // A conv output one rounding apart can land on the other side of a code boundary:
        // then that value differs by one step; the rest is equal.
        let same = y
            .iter()
            .zip(want[0].1.iter())
            .filter(|(a, b)| a == b)
            .count();
        println!("{name}: {same}/{} outputs equal to the CPU's", y.len());
        assert!(rel_close(&y, &want[0].1, 0.05), "{name}");
        assert!(same * 10 >= y.len() * 9, "{name}: {same}/{}", y.len());
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
        for (v, _) in [op.input.as_ref().unwrap(), op.output.as_ref().unwrap()] {
            if !observed.contains(&v.as_str()) {
                observed.push(v);
            }
        }
    }
    println!(
        "mnist calibration on the GPU: {t:?}, {} observed",
        observed.len()
    );
    // conv1 + batchnorm1 folded on the host, then the 8 parameters once and one upload per
    // batch; one download per observed value.
    assert_eq!(
        (t.uploads, t.downloads),
        (8 + batches.len() as u64, observed.len() as u64),
        "{t:?}"
    );
    assert_eq!(qg.ops.len(), qc.ops.len());
    for (g, c) in qg.ops.iter().zip(&qc.ops) {
        assert_eq!(g.node, c.node);
        assert_eq!(g.weight, c.weight, "weights are quantized on the host");
        let (gi, ci) = (g.input.as_ref().unwrap(), c.input.as_ref().unwrap());
        let (go, co) = (g.output.as_ref().unwrap(), c.output.as_ref().unwrap());
        assert_eq!((&gi.0, &go.0), (&ci.0, &co.0));
        for (a, b) in [(&gi.1, &ci.1), (&go.1, &co.1)] {
            let close = (a.scale[0] - b.scale[0]).abs() <= 1e-4 * b.scale[0]
                && (a.zero_point[0] - b.zero_point[0]).abs() <= 1;
            assert!(close, "{}: {a:?} vs {b:?}", g.node);
        }
    }
    assert_eq!(qg.ops[0].input, qc.ops[0].input, "the graph input is exact");
}

fn config(json: &str) -> QuantizeOptions {
    QuantizeOptions {
        config: Some(ConfigList::from_json(json).unwrap()),
        observer: ActivationObserver::MinMax,
        ..QuantizeOptions::default()
    }
}

/// The node of `m` named `name`, and the names of the nodes producing its inputs' values.
fn node<'a>(m: &'a OnnxModel, name: &str) -> &'a qfuse::onnx::Node {
    m.graph
        .nodes
        .iter()
        .find(|n| n.name == name)
        .unwrap_or_else(|| panic!("no node {name}"))
}

fn producer_op(m: &OnnxModel, value: &str) -> Option<&'static str> {
    m.graph
        .nodes
        .iter()
        .find(|n| n.outputs[0] == value)
        .map(|n| n.op.op_type())
}

/// `--config`: NNI's selection on ONNX nodes (by module path and PyTorch type, with
/// excludes); a node left out stays float in the QDQ export (its weight the float
/// initializer, its input the float value), its neighbours quantized as selected.
fn config_selects_nodes_and_leaves_the_rest_float() {
    let m = load("mnist");
    let b = batches("mnist");
    // Every Conv2d but conv2, by type; fc2 by module path, weight only.
    let opts = config(
        r#"[{"op_types": ["Conv2d"], "exclude_op_names": ["conv2"]},
            {"op_names": ["fc2"], "target_names": ["weight"]}]"#,
    );
    let q = quantize_model_with(&CpuBackend, &m, &b, &opts).unwrap();
    let names: Vec<&str> = q.ops.iter().map(|o| o.node.as_str()).collect();
    assert_eq!(names, ["/conv1/Conv", "/fc2/Gemm"]);
    assert_eq!(q.left_float, ["/conv2/Conv", "/fc1/Gemm"]);
    let conv1 = &q.ops[0];
    assert!(conv1.input.is_some() && conv1.output.is_some() && conv1.weight.is_some());
    assert!(conv1.bias);
    let fc2 = &q.ops[1];
    assert!(fc2.input.is_none() && fc2.output.is_none() && !fc2.bias);
    let per_tensor = fc2.weight.as_ref().unwrap().scale.len();
    assert_eq!(per_tensor, 1, "NNI's default granularity: per tensor");
    let qm = &q.model;
    // conv2 reads the max pool's float output and its own float weight and bias.
    let conv2 = node(qm, "/conv2/Conv");
    assert_eq!(&conv2.inputs[1..], ["conv2.weight", "conv2.bias"]);
    assert_eq!(producer_op(qm, &conv2.inputs[0]), Some("MaxPool"));
    // fc1 too: its input comes from the Reshape, its weight is float.
    let fc1 = node(qm, "/fc1/Gemm");
    assert_eq!(fc1.inputs[1], "fc1.weight");
    assert_eq!(producer_op(qm, &fc1.inputs[0]), Some("Reshape"));
    // fc2: float input (the ReLU's output), a dequantized weight, its float bias.
    let fc2n = node(qm, "/fc2/Gemm");
    assert_eq!(producer_op(qm, &fc2n.inputs[0]), Some("Clip"));
    assert_eq!(producer_op(qm, &fc2n.inputs[1]), Some("DequantizeLinear"));
    assert_eq!(fc2n.inputs[2], "fc2.bias");
    // Exactly conv1's input and output are quantized: two QuantizeLinear nodes.
    let quantize_nodes = qm
        .graph
        .nodes
        .iter()
        .filter(|n| n.op.op_type() == "QuantizeLinear")
        .count();
    assert_eq!(quantize_nodes, 2);
    // The partly quantized model runs, close to the float one.
    let x = b[0].clone();
    let yq = run(&CpuBackend, &qm.graph, &x).unwrap();
    let yf = run(&CpuBackend, &m.graph, &x).unwrap();
    assert!(rel_close(&yq[0].1, &yf[0].1, 0.05));
    // The ONNX op type selects too, and a weight-only config writes no QuantizeLinear.
    let q = quantize_model_with(
        &CpuBackend,
        &m,
        &b,
        &config(r#"[{"op_types": ["Conv", "Gemm"], "target_names": ["weight"], "granularity": "per_channel", "quant_scheme": "symmetric"}]"#),
    )
    .unwrap();
    assert_eq!(q.ops.len(), 4);
    assert!(q
        .model
        .graph
        .nodes
        .iter()
        .all(|n| n.op.op_type() != "QuantizeLinear"));
}

/// Bad configs are typed one-line errors, names from the config escaped.
fn bad_configs_are_typed_errors() {
    let m = load("mnist");
    let b = batches("mnist");
    let err = |json: &str| {
        let e = quantize_model_with(&CpuBackend, &m, &b, &config(json)).unwrap_err();
        let s = e.to_string();
        assert!(!s.contains('\n'), "{s}");
        s
    };
    let e = err(r#"[{"op_names": ["conv9\nx"]}]"#);
    assert!(e.contains("`conv9\\nx` names no Conv"), "{e}");
    let e = err(r#"[{"op_names": ["conv1"], "fuse_names": [["conv1", "batchnorm1"]]}]"#);
    assert!(e.contains("fuse_names"), "{e}");
    let e = err(r#"[{"op_types": ["Conv2d"], "quant_dtype": "uint8"}]"#);
    assert!(e.contains("int8 [-128, 127]"), "{e}");
    let e = err(r#"[{"op_types": ["Conv2d"], "quant_dtype": "int4"}]"#);
    assert!(e.contains("QDQ activations"), "{e}");
    let e = err(r#"[{"op_types": ["BatchNorm2d"]}]"#);
    assert!(e.contains("selects none"), "{e}");
    // conv1's output feeds conv2 after a max pool: not the same value, so no conflict; but
    // fc1's output (after its ReLU) is fc2's input: two settings for one value.
    let e = err(r#"[{"op_names": ["fc1"]}, {"op_names": ["fc2"], "quant_scheme": "symmetric"}]"#);
    assert!(e.contains("two different settings"), "{e}");
    // int4 weights are signed codes inside int8: allowed.
    let q = quantize_model_with(
        &CpuBackend,
        &m,
        &b,
        &config(r#"[{"op_types": ["Linear"], "target_names": ["weight"], "quant_dtype": "int4"}]"#),
    )
    .unwrap();
    assert_eq!(q.ops.len(), 2);
    // The integer model's one setting.
    let cfg = |j: &str| ConfigList::from_json(j).unwrap();
    let d = qfuse::onnx::deploy_config_of(&cfg(
        r#"[{"op_types": ["Conv2d", "Linear"], "quant_scheme": "symmetric", "granularity": "per_channel"}]"#,
    ))
    .unwrap();
    assert!(d.weight.qscheme.is_per_channel() && d.activation.qscheme.is_symmetric());
    for bad in [
        r#"[{"op_types": ["Conv2d"]}, {"op_types": ["Linear"], "quant_dtype": "int4"}]"#,
        r#"[{"op_types": ["Conv2d"], "target_names": ["weight", "_output_"]}]"#,
        r#"[{"op_types": ["Conv2d"], "quant_dtype": "uint8"}]"#,
    ] {
        assert!(qfuse::onnx::deploy_config_of(&cfg(bad)).is_err(), "{bad}");
    }
}

/// `qfuse quantize --config FILE --observer moving-average`, and `--int-model` refusing a
/// config that leaves a layer float.
fn binary_quantizes_with_a_config() {
    let d = std::env::temp_dir().join(format!("qfuse-onnx-config-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/onnx");
    let model = dir.join("mnist.onnx");
    let calib = dir.join("mnist.io.safetensors");
    let cfg = d.join("config.json");
    let run = |args: &[&std::path::Path]| {
        let args: Vec<&str> = args.iter().map(|p| p.to_str().unwrap()).collect();
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_qfuse"))
            .args(&args)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).to_string(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let p = std::path::Path::new;
    std::fs::write(
        &cfg,
        r#"[{"op_types": ["Conv2d"], "exclude_op_names": ["conv2"], "quant_scheme": "symmetric"}]"#,
    )
    .unwrap();
    let out = d.join("m.onnx");
    let (ok, stdout, stderr) = run(&[
        p("quantize"),
        &model,
        p("--calib"),
        &calib,
        p("--config"),
        &cfg,
        p("--observer"),
        p("moving-average"),
        p("--backend"),
        p("cpu"),
        p("-o"),
        &out,
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("left float: `/conv2/Conv`"), "{stdout}");
    assert!(stdout.contains("1 ops quantized"), "{stdout}");
    assert!(OnnxModel::load(&out).is_ok());
    // --int-model with a layer left float: refused before anything is written.
    let im = d.join("m.safetensors");
    let out2 = d.join("m2.onnx");
    let (ok, _, stderr) = run(&[
        p("quantize"),
        &model,
        p("--calib"),
        &calib,
        p("--config"),
        &cfg,
        p("--int-model"),
        &im,
        p("--backend"),
        p("cpu"),
        p("-o"),
        &out2,
    ]);
    assert!(!ok);
    assert!(stderr.contains("no mixed precision"), "{stderr}");
    assert!(!im.exists() && !out2.exists());
    // Every layer int8 and symmetric: the integer model is written, calibrated with the
    // moving average.
    let all = d.join("all.json");
    std::fs::write(
        &all,
        r#"[{"op_types": ["Conv2d", "Linear"], "quant_scheme": "symmetric", "granularity": "per_channel"}]"#,
    )
    .unwrap();
    let (ok, stdout, stderr) = run(&[
        p("quantize"),
        &model,
        p("--calib"),
        &calib,
        p("--config"),
        &all,
        p("--observer"),
        p("moving-average"),
        p("--int-model"),
        &im,
        p("--backend"),
        p("cpu"),
        p("-o"),
        &out2,
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    let int = qfuse::deploy::IntModel::load(&im).unwrap();
    assert_eq!(int.values[0].zero_point[0], 0, "symmetric activations");
    // A config that is not JSON, or names an unknown key: one line naming the file.
    std::fs::write(&cfg, r#"[{"op_types": ["Conv2d"], "bits": 8}]"#).unwrap();
    let (ok, _, stderr) = run(&[
        p("quantize"),
        &model,
        p("--calib"),
        &calib,
        p("--config"),
        &cfg,
        p("-o"),
        &out2,
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("config.json") && stderr.contains("unknown key `bits`"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    std::fs::remove_dir_all(&d).unwrap();
}

/// `to_int_model` on the GPU: the graph and the net each placed once, the net checked on its
/// output alone, calibrated with one upload per batch and one download per observed value
/// (ResNet and MobileNet too: their padded max pool and GlobalAveragePool stay on the device);
/// the integer model's input qparams equal the CPU's (exact values), the rest within f32
/// rounding, and its integer forward agrees with the CPU-calibrated model's.
fn gpu_int_model_calibrates_on_the_device() {
    if common::gpu().is_none() {
        return;
    }
    let ctx = std::sync::Arc::new(GpuContext::new().unwrap());
    let gpu = GpuBackend::new(ctx.clone());
    for (name, params) in [("resnet", 14u64), ("mobilenet", 18)] {
        let m = load(name);
        let b = batches(name);
        let g = &fold_model(&CpuBackend, &m).unwrap().model.graph;
        let before = ctx.transfer_stats();
        let ig = qfuse::onnx::to_int_model(&gpu, g, &b).unwrap();
        let t = ctx.transfer_stats().since(&before);
        println!("{name}: {t:?}, {} values", ig.values.len());
        // The graph check run and the net's: parameters once each, the input up, the output
        // down; calibration: the batches up, each observer's 8-byte state down (the padded
        // max pool and GlobalAveragePool run on the device: no value of the net crosses).
        let out_bytes = 4 * run(&CpuBackend, g, &b[0]).unwrap()[0].1.len() as u64;
        assert_eq!(t.uploads, 2 * params + 2 + b.len() as u64, "{name}: {t:?}");
        assert_eq!(
            t.download_bytes,
            2 * out_bytes + 8 * (t.downloads - 2),
            "{name}: {t:?}"
        );
        assert!(t.downloads - 2 >= 6, "{name}: {t:?}");
    }
    let m = load("mnist");
    let b = batches("mnist");
    let folded = fold_model(&CpuBackend, &m).unwrap();
    let g = &folded.model.graph;
    let before = ctx.transfer_stats();
    let ig = qfuse::onnx::to_int_model(&gpu, g, &b).unwrap();
    let t = ctx.transfer_stats().since(&before);
    let ic = qfuse::onnx::to_int_model(&CpuBackend, g, &b).unwrap();
    // Graph check run: 8 parameters, the input up, the output down; the net: 8 parameters,
    // the input up, the output down; calibration: 3 batches up, 5 observers down (the input,
    // conv1, conv2, fc1, fc2).
    assert_eq!(
        (t.uploads, t.downloads),
        (8 + 1 + 8 + 1 + 3, 1 + 1 + 5),
        "{t:?}"
    );
    assert_eq!(ig.values[0], ic.values[0], "the input is exact");
    for (a, c) in ig.values.iter().zip(&ic.values) {
        assert!(
            (a.scale[0] - c.scale[0]).abs() <= 1e-4 * c.scale[0],
            "{a:?} {c:?}"
        );
        assert!(
            (a.zero_point[0] - c.zero_point[0]).abs() <= 1,
            "{a:?} {c:?}"
        );
    }
    let x = lcg(&[2, 1, 28, 28], 99);
    let (yg, yc) = (
        ig.forward(&CpuBackend, &x).unwrap(),
        ic.forward(&CpuBackend, &x).unwrap(),
    );
    let worst = yg
        .iter()
        .zip(&yc)
        .map(|(p, q)| (i32::from(*p) - i32::from(*q)).abs())
        .max()
        .unwrap();
    assert!(worst <= 1, "{worst}");
}

crate::qfuse_tests! {
    device_calibration_on_the_cpu_equals_the_host_observers,
    device_graph_keeps_values_on_the_gpu: gpu,
    gpu_calibration_moves_only_batches_and_statistics: gpu,
    qdq_models_run_on_the_device: gpu,
    gpu_calibration_matches_the_cpu_with_counted_transfers: gpu,
    config_selects_nodes_and_leaves_the_rest_float,
    bad_configs_are_typed_errors,
    binary_quantizes_with_a_config,
    gpu_int_model_calibrates_on_the_device: gpu,
    gemm_alpha_beta_runs_on_the_device,
}
