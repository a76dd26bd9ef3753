//! The float ops of imported graphs on the GPU (`kernels::graph_ops`) against the CPU
//! reference, bit for bit: ONNX pooling (padded, overlapping, dilated, ceil mode, average
//! with and without `count_include_pad`), global average pooling in ndarray's summation
//! order, zero padding, broadcasting add / mul, concat, and QuantizeLinear → DequantizeLinear; the same
//! errors on both backends, and the `_into` forms.

use crate::common;

use ndarray::{ArrayD, IxDyn};
use qfuse::backend::{CpuBackend, Device, FloatOps, GpuBackend, QuantOps};
use qfuse::gpu::{DType, GpuTensor};
use qfuse::kernels::graph_ops;
use qfuse::ops::{BinaryOp, PoolMode, PoolWindow};
use qfuse::quant::{QParams, QuantRange};
use qfuse::reference;

fn lcg(shape: &[usize], seed: u32) -> ArrayD<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(12_345);
    ArrayD::from_shape_fn(IxDyn(shape), |_| {
        s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        // Mixed magnitudes, so a different summation order changes the last bits.
        let u = (s >> 8) as f32 / (1u32 << 24) as f32;
        let m = [1.0f32, 1e-3, 37.0, 0.1][(s & 3) as usize];
        (u - 0.45) * m
    })
}

fn assert_bits_eq(what: &str, got: &ArrayD<f32>, want: &ArrayD<f32>) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let bad = got
        .iter()
        .zip(want)
        .filter(|(g, w)| !(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan())))
        .count();
    assert_eq!(bad, 0, "{what}: {bad} of {} elements differ", got.len());
}

fn gpu() -> Option<GpuBackend> {
    common::gpu().map(GpuBackend::new)
}

fn window(k: [usize; 2], s: [usize; 2], d: [usize; 2], pads: [usize; 4], ceil: bool) -> PoolWindow {
    PoolWindow {
        kernel: k,
        stride: s,
        dilation: d,
        pads,
        ceil_mode: ceil,
    }
}

/// Padded, overlapping, dilated, ceil-mode max and average pooling on odd shapes, with NaN
/// and ±inf in the input: bit-exact with `reference::layers::pool2d`.
fn pool2d_bit_exact() {
    let Some(g) = gpu() else { return };
    let cases = [
        // ResNet's stem: 3x3, stride 2, pad 1 (overlapping, padded).
        (
            [2, 3, 17, 15],
            window([3, 3], [2, 2], [1, 1], [1, 1, 1, 1], false),
        ),
        // Asymmetric pads, rectangular window, ceil mode.
        (
            [1, 2, 9, 11],
            window([2, 3], [2, 1], [1, 1], [0, 1, 1, 2], true),
        ),
        // Dilation with ceil mode (windows past the end padding).
        (
            [1, 5, 13, 7],
            window([3, 2], [3, 2], [2, 3], [1, 1, 2, 0], true),
        ),
        // Unpadded, stride 1 (every window overlaps its neighbours).
        ([3, 1, 6, 6], window([2, 2], [1, 1], [1, 1], [0; 4], false)),
        // A 1x1 input in a 2x2 window with pads.
        (
            [1, 3, 1, 1],
            window([2, 2], [1, 1], [1, 1], [1, 1, 0, 0], false),
        ),
    ];
    for (i, (shape, w)) in cases.iter().enumerate() {
        let mut x = lcg(shape, i as u32);
        if x.len() > 20 {
            x.as_slice_mut().unwrap()[3] = f32::NAN;
            x.as_slice_mut().unwrap()[11] = f32::INFINITY;
            x.as_slice_mut().unwrap()[17] = f32::NEG_INFINITY;
        }
        let x4 = x.clone().into_dimensionality::<ndarray::Ix4>().unwrap();
        let gx = g.upload(&x).unwrap();
        for mode in [
            PoolMode::Max,
            PoolMode::Avg {
                count_include_pad: false,
            },
            PoolMode::Avg {
                count_include_pad: true,
            },
        ] {
            let want = reference::layers::pool2d(&x4, w, mode).unwrap().into_dyn();
            let got = g.download(&g.pool2d(&gx, w, mode).unwrap()).unwrap();
            assert_bits_eq(&format!("case {i} {mode:?}"), &got, &want);
            let cpu = CpuBackend.pool2d(&x, w, mode).unwrap();
            assert_bits_eq(&format!("cpu backend {i} {mode:?}"), &cpu, &want);
        }
    }
    // Inside a recording, and into a caller's tensor.
    let (shape, w) = cases[0];
    let x = lcg(&shape, 9);
    let gx = g.upload(&x).unwrap();
    let ctx = g.context();
    let out = GpuTensor::zeros(ctx, &w.output_shape(&shape).unwrap(), DType::F32).unwrap();
    let mode = PoolMode::Avg {
        count_include_pad: true,
    };
    ctx.record(|| graph_ops::pool2d_into(ctx, &gx, &w, mode, &out))
        .unwrap();
    let want = reference::layers::pool2d(&x.into_dimensionality().unwrap(), &w, mode).unwrap();
    assert_bits_eq(
        "recorded, into",
        &g.download(&out).unwrap(),
        &want.into_dyn(),
    );
    let bad = GpuTensor::zeros(ctx, &[1, 1, 1, 1], DType::F32).unwrap();
    assert!(graph_ops::pool2d_into(ctx, &gx, &w, mode, &bad).is_err());
}

/// Global average pooling sums as ndarray's `mean_axis` does (8 partial sums, then the
/// tail): bit-exact with `reference::layers::global_avg_pool2d` on extents below, at and past
/// multiples of 8, and a sum of negative zeros is +0 as on the CPU.
fn global_avg_pool_bit_exact() {
    let Some(g) = gpu() else { return };
    for (i, shape) in [
        [2, 3, 1, 1],
        [1, 4, 1, 7],
        [2, 2, 2, 4],
        [1, 3, 3, 3],
        [3, 5, 7, 7],
        [1, 2, 56, 56],
        [2, 1, 13, 11],
    ]
    .iter()
    .enumerate()
    {
        let x = lcg(shape, 40 + i as u32);
        let want = reference::layers::global_avg_pool2d(
            &x.clone().into_dimensionality::<ndarray::Ix4>().unwrap(),
        )
        .unwrap()
        .into_dyn();
        let got = g
            .download(&g.global_avg_pool2d(&g.upload(&x).unwrap()).unwrap())
            .unwrap();
        assert_bits_eq(&format!("{shape:?}"), &got, &want);
    }
    let z = ArrayD::from_elem(IxDyn(&[1, 2, 3, 5]), -0.0f32);
    let got = g
        .download(&g.global_avg_pool2d(&g.upload(&z).unwrap()).unwrap())
        .unwrap();
    assert!(got.iter().all(|v| v.to_bits() == 0), "{got:?}");
    // The order matters: a sequential sum differs from ndarray's on this input.
    let x = lcg(&[1, 1, 1, 4096], 7);
    let seq: f32 = x.iter().fold(0.0, |a, &v| a + v) / 4096.0;
    let want = reference::layers::global_avg_pool2d(&x.clone().into_dimensionality().unwrap())
        .unwrap()[[0, 0, 0, 0]];
    let got = g
        .download(&g.global_avg_pool2d(&g.upload(&x).unwrap()).unwrap())
        .unwrap()[[0, 0, 0, 0]];
    assert_eq!(got.to_bits(), want.to_bits());
    assert_ne!(
        seq.to_bits(),
        want.to_bits(),
        "the test input must tell the orders apart"
    );
}

/// Zero padding (asymmetric conv pads): equal to `reference::layers::zero_pad2d`.
fn pad2d_matches_reference() {
    let Some(g) = gpu() else { return };
    for (i, pads) in [[0, 0, 1, 1], [2, 0, 0, 3], [0; 4], [1, 2, 3, 4]]
        .iter()
        .enumerate()
    {
        let x = lcg(&[2, 3, 5, 4], 60 + i as u32);
        let want = reference::layers::zero_pad2d(
            &x.clone().into_dimensionality::<ndarray::Ix4>().unwrap(),
            *pads,
        )
        .unwrap()
        .into_dyn();
        let got = g
            .download(&g.pad2d(&g.upload(&x).unwrap(), *pads).unwrap())
            .unwrap();
        assert_bits_eq(&format!("{pads:?}"), &got, &want);
    }
}

/// Numpy broadcasting for add and mul on both sides, bit-exact.
fn binary_broadcast_bit_exact() {
    let Some(g) = gpu() else { return };
    let pairs: [(&[usize], &[usize]); 6] = [
        (&[2, 3, 4, 5], &[3, 1, 5]),
        (&[1], &[4, 3]),
        (&[2, 1, 3], &[1, 4, 1]),
        (&[5, 7], &[5, 7]),
        (&[2, 8, 1, 1], &[2, 8, 3, 3]),
        (&[1, 1, 1, 1, 1, 2, 1, 3], &[2, 1, 1]),
    ];
    for (i, (a, b)) in pairs.iter().enumerate() {
        let (x, y) = (lcg(a, i as u32), lcg(b, 100 + i as u32));
        let (gx, gy) = (g.upload(&x).unwrap(), g.upload(&y).unwrap());
        for op in [BinaryOp::Add, BinaryOp::Mul] {
            let want = reference::layers::broadcast_binary(&x, &y, op).unwrap();
            let got = g.download(&g.binary(&gx, &gy, op).unwrap()).unwrap();
            assert_bits_eq(&format!("{a:?} {op:?} {b:?}"), &got, &want);
        }
    }
}

/// Concat along each axis (negative too), parts of different sizes, an empty part.
fn concat_bit_exact() {
    let Some(g) = gpu() else { return };
    let a = lcg(&[2, 3, 4, 5], 1);
    for (axis, other) in [
        (0i64, [1, 3, 4, 5]),
        (1, [2, 7, 4, 5]),
        (-1, [2, 3, 4, 1]),
        (2, [2, 3, 0, 5]),
    ] {
        let b = lcg(&other, 2);
        let c = lcg(&other, 3);
        let want = reference::layers::concat(&[&a, &b, &c], axis).unwrap();
        let parts = [
            g.upload(&a).unwrap(),
            g.upload(&b).unwrap(),
            g.upload(&c).unwrap(),
        ];
        let refs: Vec<&GpuTensor> = parts.iter().collect();
        let got = g.download(&g.concat(&refs, axis).unwrap()).unwrap();
        assert_bits_eq(&format!("axis {axis}"), &got, &want);
    }
}

/// ONNX QuantizeLinear → DequantizeLinear: division by the scale (ties at exact halves),
/// NaN to code 0, ±inf saturating; per tensor and per channel.
fn fake_quant_onnx_bit_exact() {
    let Some(g) = gpu() else { return };
    let mut x = lcg(&[2, 3, 5, 7], 5);
    let specials = [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        0.15,
        -0.25,
        0.35,
        1e9,
    ];
    for (v, s) in x.iter_mut().zip(specials) {
        *v = s;
    }
    for qp in [
        QParams::per_tensor(0.1, 3),
        QParams::per_tensor(0.013, -128),
        QParams::per_channel(vec![0.1, 0.02, 0.5], vec![0, -5, 7], 1).unwrap(),
        QParams::per_channel(vec![0.05; 7], vec![1; 7], 3).unwrap(),
    ] {
        let want = reference::fake_quant::fake_quantize_onnx(&x, &qp, QuantRange::INT8).unwrap();
        let gq = g.upload_qparams(&qp).unwrap();
        let got = g
            .download(
                &g.fake_quant_onnx(&g.upload(&x).unwrap(), &gq, QuantRange::INT8)
                    .unwrap(),
            )
            .unwrap();
        assert_bits_eq(&format!("{qp:?}"), &got, &want);
        // NaN becomes code 0: (0 - zp) * scale.
        let z = qp.zero_point[0];
        assert_eq!(
            want.iter().next().unwrap().to_bits(),
            ((-z) as f32 * qp.scale[0]).to_bits()
        );
    }
}

/// Bad shapes and settings: the same typed error on both backends (the shared checks), under
/// the small-GPU limits too.
fn errors_match_cpu() {
    let Some(g) = gpu() else { return };
    let x = lcg(&[1, 2, 4, 4], 1);
    let gx = g.upload(&x).unwrap();
    let same = |what: &str, c: qfuse::Error, gp: qfuse::Error| {
        assert_eq!(c.to_string(), gp.to_string(), "{what}");
        assert!(!c.to_string().contains('\n'));
    };
    for w in [
        window([2, 2], [1, 1], [1, 1], [2, 0, 0, 0], false),
        window([0, 2], [1, 1], [1, 1], [0; 4], false),
        window([9, 2], [1, 1], [1, 1], [0; 4], false),
        window([2, 2], [0, 1], [1, 1], [0; 4], false),
    ] {
        same(
            "pool",
            CpuBackend.pool2d(&x, &w, PoolMode::Max).unwrap_err(),
            g.pool2d(&gx, &w, PoolMode::Max).unwrap_err(),
        );
    }
    let y = lcg(&[3, 4], 2);
    let gy = g.upload(&y).unwrap();
    same(
        "broadcast",
        CpuBackend.binary(&x, &y, BinaryOp::Add).unwrap_err(),
        g.binary(&gx, &gy, BinaryOp::Add).unwrap_err(),
    );
    same(
        "concat",
        CpuBackend.concat(&[&x, &y], 0).unwrap_err(),
        g.concat(&[&gx, &gy], 0).unwrap_err(),
    );
    same(
        "concat axis",
        CpuBackend.concat(&[&x], 4).unwrap_err(),
        g.concat(&[&gx], 4).unwrap_err(),
    );
    let flat = lcg(&[2, 3], 3);
    same(
        "pad rank",
        CpuBackend.pad2d(&flat, [1; 4]).unwrap_err(),
        g.pad2d(&g.upload(&flat).unwrap(), [1; 4]).unwrap_err(),
    );
    same(
        "global pool rank",
        CpuBackend.global_avg_pool2d(&flat).unwrap_err(),
        g.global_avg_pool2d(&g.upload(&flat).unwrap()).unwrap_err(),
    );
    let qp = QParams::per_channel(vec![0.1; 3], vec![0; 3], 1).unwrap();
    same(
        "qdq channels",
        CpuBackend
            .fake_quant_onnx(&x, &qp, QuantRange::INT8)
            .unwrap_err(),
        g.fake_quant_onnx(&gx, &g.upload_qparams(&qp).unwrap(), QuantRange::INT8)
            .unwrap_err(),
    );
}

crate::qfuse_tests! {
    pool2d_bit_exact: gpu,
    global_avg_pool_bit_exact: gpu,
    pad2d_matches_reference: gpu,
    binary_broadcast_bit_exact: gpu,
    concat_bit_exact: gpu,
    fake_quant_onnx_bit_exact: gpu,
    errors_match_cpu: gpu,
}
