//! The benchmark suite's JSON path on a tiny configuration (keys and sane values; no timing
//! assertions), and the bit-exactness of the vec4 fake-quant kernels the benchmarks led to
//! (every layout: per tensor with and without a tail, per channel through the rows kernel,
//! including a z-tiled row grid, and the scalar fallback).
//!
//! Run on a machine without a GPU with `WGPU_BACKEND=vulkan QFUSE_REQUIRE_GPU=1` (lavapipe).

use crate::common;

use ndarray::{ArrayD, IxDyn};
use qfuse::bench::{run_suite, BenchConfig, Progress};
use qfuse::gpu::{DType, GpuTensor};
use qfuse::kernels::fake_quant::{
    fake_quant_backward_into, fake_quant_into_with, fake_quant_with_mask_into, FakeQuantKernel,
};
use qfuse::kernels::GpuQParams;
use qfuse::quant::{QParams, QuantRange};
use qfuse::reference::fake_quant::{fake_quantize_backward, fake_quantize_with_mask};

fn finite_positive(v: &serde_json::Value, what: &str) -> f64 {
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"));
    assert!(
        x.is_finite() && x > 0.0,
        "{what} = {x} is not positive and finite"
    );
    x
}

fn quick_suite_json_on_a_tiny_configuration() {
    if common::gpu().is_none() {
        return;
    }
    // A context of its own: the suite counts the transfers of its Mnist rows, which other
    // tests running in parallel on the shared context would add to.
    let ctx = std::sync::Arc::new(
        qfuse::gpu::GpuContext::new().expect("a second context on the test adapter"),
    );
    let cfg = BenchConfig::tiny();
    let mut steps: Vec<Progress> = Vec::new();
    let report = run_suite(&ctx, &cfg, &mut |p| steps.push(p.clone())).unwrap();

    // Progress: every planned step reported, in order, ending at the total.
    let total = cfg.steps(&ctx);
    assert_eq!(steps.len(), total);
    assert!(steps.iter().all(|p| p.total == total));
    assert_eq!(steps.last().map(|p| p.done), Some(total));

    // The JSON the CLI writes, through a file.
    let path = std::env::temp_dir().join(format!("qfuse-bench-smoke-{}.json", std::process::id()));
    report.write_json(&path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let obj = json.as_object().expect("a JSON object");
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "adapter",
            "copy_gbps",
            "fma_gflops",
            "fused_speedup_eval",
            "fused_speedup_qat",
            "kernels"
        ]
    );
    assert!(!obj["adapter"].as_str().unwrap().is_empty());
    finite_positive(&obj["copy_gbps"], "copy_gbps");
    finite_positive(&obj["fma_gflops"], "fma_gflops");
    finite_positive(&obj["fused_speedup_eval"], "fused_speedup_eval");
    finite_positive(&obj["fused_speedup_qat"], "fused_speedup_qat");

    let kernels = obj["kernels"].as_array().unwrap();
    // Roofline (2), elementwise (7), fold (1), 2 per BatchNorm training shape, 8 f32 per conv
    // shape, per conv shape the tuned int8 conv and one per dot path, one int8 linear per dot
    // path, 2 per
    // Mnist batch, 3 float Mnist (forward on the GPU and the CPU reference, QAT step).
    let dots = if ctx.packed_int8_dot_available() {
        2
    } else {
        1
    };
    assert_eq!(
        kernels.len(),
        2 + 7
            + 1
            + 2 * cfg.bn_train_shapes.len()
            + (8 + 1 + dots) * cfg.conv_shapes.len()
            + dots
            + 2 * cfg.mnist_batches.len()
            + 3
    );
    for k in kernels {
        let name = k["name"].as_str().expect("name").to_string();
        let rate = match (k.get("gbps"), k.get("gflops"), k.get("gops")) {
            (Some(g), None, None) => g,
            (None, Some(f), None) => f,
            (None, None, Some(o)) => {
                assert!(name.starts_with("int8_"), "{name}: gops on a float kernel");
                o
            }
            _ => panic!("{name}: exactly one of gbps, gflops and gops expected: {k}"),
        };
        finite_positive(rate, &format!("{name} rate"));
        finite_positive(&k["roofline_ratio"], &format!("{name} roofline_ratio"));
        finite_positive(&k["time_ms"], &format!("{name} time_ms"));
        if let Some(g) = k.get("gpu_ms") {
            assert!(g.as_f64().is_some_and(|g| g.is_finite() && g >= 0.0));
        }
    }
    for name in [
        "roofline/copy_vec4",
        "roofline/fma_chains",
        "fake_quant/per_tensor",
        "fake_quant/per_channel",
        "observer/per_tensor",
        "observer/per_channel",
        "fold_conv_bn",
        "conv2d",
        "conv_bn_relu_eval/fused",
        "conv_bn_relu_eval/unfused",
        "conv_bn_relu_qat_forward/fused",
        "conv_bn_relu_qat_forward/unfused",
        "conv_bn_relu_qat_backward/fused",
        "conv_bn_relu_qat_backward/unfused",
        "bn_train/forward",
        "bn_train/backward",
        "int8_conv2d/tuned",
        "int8_conv2d/portable",
        "int8_linear/portable",
        "int8_forward/mnist/device",
        "int8_forward/mnist/backend",
        "mnist_forward/gpu",
        "mnist_forward/cpu_reference",
        "mnist_train_step/gpu",
    ] {
        assert!(
            kernels.iter().any(|k| k["name"] == name),
            "no `{name}` entry"
        );
    }
    // Every f32 conv row names the forward variant Auto chose and its cold start.
    for k in kernels.iter().filter(|k| {
        let n = k["name"].as_str().unwrap_or("");
        n == "conv2d"
            || n.starts_with("conv_bn_relu_eval/")
            || n.starts_with("conv_bn_relu_qat_forward/")
    }) {
        let algorithm = k["algorithm"].as_str().expect("algorithm");
        assert!(
            qfuse::kernels::conv2d::ConvVariant::parse(algorithm).is_some(),
            "{algorithm}"
        );
        finite_positive(&k["cold_start_s"], "cold_start_s");
    }
    // The tuned int8 conv rows name the variant the tuner chose and their cold start.
    for k in kernels.iter().filter(|k| k["name"] == "int8_conv2d/tuned") {
        let algorithm = k["algorithm"].as_str().expect("algorithm");
        assert!(
            qfuse::kernels::int8::Int8ConvVariant::parse(algorithm).is_some(),
            "{algorithm}"
        );
        finite_positive(&k["cold_start_s"], "cold_start_s");
    }
    // Fused rows carry their speedup over the unfused chain.
    for k in kernels.iter().filter(|k| {
        k["name"] == "conv_bn_relu_eval/fused"
            || k["name"] == "conv_bn_relu_qat_forward/fused"
            || k["name"] == "conv_bn_relu_qat_backward/fused"
            || k["name"] == "int8_forward/mnist/device"
    }) {
        finite_positive(&k["speedup"], "speedup");
    }
    if dots == 2 {
        assert!(kernels.iter().any(|k| k["name"] == "int8_conv2d/packed"));
    }
    for k in kernels.iter().filter(|k| {
        k["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("int8_conv2d/"))
    }) {
        finite_positive(&k["ops"], "int8 ops");
    }
    // The device-resident float forward: one upload and one download; the QAT step uploads
    // its batch and labels and downloads the loss; both carry their kernels' GPU time when
    // the device has timestamps.
    let row = |name: &str| kernels.iter().find(|k| k["name"] == name).unwrap();
    assert_eq!(row("mnist_forward/gpu")["transfers"], 2);
    assert_eq!(row("mnist_train_step/gpu")["transfers"], 3);
    finite_positive(&row("mnist_forward/gpu")["speedup"], "speedup");
    for name in ["mnist_forward/gpu", "mnist_train_step/gpu"] {
        match row(name).get("kernel_ms") {
            // A figure, not a timing assertion (the wall time is a median of other runs).
            Some(k) => {
                finite_positive(k, "kernel_ms");
            }
            None => assert!(!ctx.has_timestamps(), "{name}: no kernel_ms"),
        }
    }
    let table = report.table();
    assert!(table.contains("fake_quant/per_tensor"));
    assert!(table.contains("GOP/s"));
}

/// SplitMix64-based values for fake quant over `range` with `scale`/`zp`, with ties, NaN,
/// infinities and out-of-range values mixed in.
fn values(n: usize, seed: u64, scale: f32, zp: i32, range: QuantRange) -> Vec<f32> {
    let mut s = seed;
    let mut next = move || {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let lo = (range.quant_min - zp) as f32 * scale;
    let hi = (range.quant_max - zp) as f32 * scale;
    (0..n)
        .map(|i| {
            let u = (next() >> 40) as f32 / (1u64 << 24) as f32;
            match i % 11 {
                0 => f32::NAN,
                1 => [f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0][(next() % 4) as usize],
                2 | 3 => ((next() % 300) as f32 - 150.0 + 0.5) * scale,
                _ => lo - 0.2 * (hi - lo) + 1.4 * (hi - lo) * u,
            }
        })
        .collect()
}

fn same_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
            "{what}[{i}]: got {g:e} ({:#010x}), want {w:e} ({:#010x})",
            g.to_bits(),
            w.to_bits()
        );
    }
}

fn fake_quant_vec4_kernels_are_bit_exact() {
    let Some(ctx) = common::gpu() else { return };
    let range = QuantRange::INT8;
    // (shape, axis): per tensor with n % 4 = 0, 1, 2, 3 and n < 4; per channel through the
    // rows kernel (inner % 4 == 0; the last one needs more than 65,535 rows, so a z-tiled
    // grid with padding rows) and through the scalar fallback (inner % 4 != 0).
    let cases: Vec<(Vec<usize>, Option<usize>)> = vec![
        (vec![4096], None),
        (vec![4097], None),
        (vec![3, 1002], None),
        (vec![7, 9, 5], None),
        (vec![3], None),
        (vec![2, 16, 8, 8], Some(1)),
        (vec![6, 20], Some(0)),
        (vec![3, 5, 12], Some(1)),
        (vec![5, 3, 7], Some(1)),
        (vec![70_000, 4], Some(0)),
    ];
    for (k, (shape, axis)) in cases.into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let qp = match axis {
            None => QParams::per_tensor(0.037, 5),
            Some(a) => {
                let c = shape[a];
                QParams::per_channel(
                    (0..c).map(|i| 0.01 + (i % 13) as f32 * 0.007).collect(),
                    (0..c).map(|i| (i % 9) as i32 - 4).collect(),
                    a,
                )
                .unwrap()
            }
        };
        let (s0, z0) = (qp.scale[0], qp.zero_point[0]);
        let x = ArrayD::from_shape_vec(IxDyn(&shape), values(n, k as u64, s0, z0, range)).unwrap();
        let dy =
            ArrayD::from_shape_vec(IxDyn(&shape), values(n, 99 + k as u64, 0.5, 0, range)).unwrap();
        let (want_y, want_mask) = fake_quantize_with_mask(&x, &qp, range).unwrap();
        let want_dx = fake_quantize_backward(&x, &dy, &qp, range).unwrap();

        let gx = GpuTensor::upload_f32(&ctx, &x).unwrap();
        let gdy = GpuTensor::upload_f32(&ctx, &dy).unwrap();
        let gqp = GpuQParams::upload(&ctx, &qp).unwrap();
        let out = GpuTensor::zeros(&ctx, &shape, DType::F32).unwrap();
        let mask = GpuTensor::zeros(&ctx, &shape, DType::F32).unwrap();
        let what = format!("shape {shape:?} axis {axis:?}");
        for kernel in [FakeQuantKernel::Vec4, FakeQuantKernel::Scalar] {
            fake_quant_into_with(&ctx, &gx, &gqp, range, &out, kernel).unwrap();
            let got = out.download_f32(&ctx).unwrap();
            same_bits(
                &format!("y ({kernel:?}), {what}"),
                got.as_slice().unwrap(),
                want_y.as_slice().unwrap(),
            );
        }
        fake_quant_with_mask_into(&ctx, &gx, &gqp, range, &out, &mask).unwrap();
        let (got_y, got_mask) = (
            out.download_f32(&ctx).unwrap(),
            mask.download_f32(&ctx).unwrap(),
        );
        same_bits(
            &format!("y (mask), {what}"),
            got_y.as_slice().unwrap(),
            want_y.as_slice().unwrap(),
        );
        same_bits(
            &format!("mask, {what}"),
            got_mask.as_slice().unwrap(),
            want_mask.as_slice().unwrap(),
        );
        fake_quant_backward_into(&ctx, &gx, &gdy, &gqp, range, &out).unwrap();
        same_bits(
            &format!("dx, {what}"),
            out.download_f32(&ctx).unwrap().as_slice().unwrap(),
            want_dx.as_slice().unwrap(),
        );
    }
}

fn fake_quant_into_refuses_bad_outputs() {
    let Some(ctx) = common::gpu() else { return };
    let x = GpuTensor::from_slice_f32(&ctx, &[0.5; 8], &[8]).unwrap();
    let qp = GpuQParams::upload(&ctx, &QParams::per_tensor(0.1, 0)).unwrap();
    let range = QuantRange::INT8;
    let wrong_shape = GpuTensor::zeros(&ctx, &[4, 2], DType::F32).unwrap();
    let wrong_type = GpuTensor::zeros(&ctx, &[8], DType::U32).unwrap();
    for (out, what) in [
        (&wrong_shape, "shape"),
        (&wrong_type, "dtype"),
        (&x, "aliasing"),
    ] {
        assert!(
            fake_quant_into_with(&ctx, &x, &qp, range, out, FakeQuantKernel::Vec4).is_err(),
            "{what}"
        );
    }
    let out = GpuTensor::zeros(&ctx, &[8], DType::F32).unwrap();
    assert!(fake_quant_with_mask_into(&ctx, &x, &qp, range, &out, &out).is_err());
}

crate::qfuse_tests! {
    quick_suite_json_on_a_tiny_configuration: gpu,
    fake_quant_vec4_kernels_are_bit_exact: gpu,
    fake_quant_into_refuses_bad_outputs: gpu,
}
