//! Observers and BatchNorm folding on the GPU against the CPU reference, on the paths the
//! vectorized kernels take: vec4 and scalar runs, per-tensor tails (sizes not multiples of
//! 4), several partial workgroups per channel, empty tensors, NaN / inf, axis 0 / 1 / last,
//! one channel; folds bit-exact on the weight.
//!
//! Run on a machine without a GPU with `WGPU_BACKEND=vulkan QFUSE_REQUIRE_GPU=1` (lavapipe).

use crate::common;

use ndarray::{Array1, Array2, ArrayD, IxDyn};
use qfuse::gpu::GpuTensor;
use qfuse::kernels;
use qfuse::ops::BatchNorm;
use qfuse::quant::{ObserverSpec, QDtype, QScheme, QuantRange};
use qfuse::reference;
use qfuse::{CpuBackend, GpuBackend, HostOps};

/// SplitMix64: a small deterministic generator.
struct Rng(u64);

impl Rng {
    fn next_u32(&mut self) -> u32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 32) as u32
    }
    /// Uniform in [lo, hi), never exactly 0 for the ranges used here (no signed-zero ties).
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next_u32() >> 8) as f32 / (1u32 << 24) as f32)
    }
}

fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

fn spec(qscheme: QScheme, axis: usize) -> ObserverSpec {
    ObserverSpec::new(QDtype::QInt8, qscheme, QuantRange::INT8, axis as isize).unwrap()
}

/// GPU min/max and qparams of `x` (per tensor, and per channel along every axis) equal the
/// CPU reference's, bit for bit (NaN as NaN).
fn check_all(ctx: &qfuse::gpu::GpuContext, x: &ArrayD<f32>, what: &str) {
    let gx = GpuTensor::upload_f32(ctx, x).unwrap();
    let mut cases: Vec<Option<usize>> = vec![None];
    cases.extend((0..x.ndim()).map(Some));
    for axis in cases {
        let mm = kernels::observer::min_max(ctx, &gx, axis)
            .unwrap()
            .download_f32(ctx)
            .unwrap();
        let (lo, hi) = match axis {
            None => {
                let (a, b) = reference::observer::min_max(x);
                (vec![a], vec![b])
            }
            Some(axis) => reference::observer::min_max_per_channel(x, axis).unwrap(),
        };
        let c = lo.len();
        assert_eq!(mm.shape(), &[2, c], "{what} axis {axis:?}: shape");
        for ch in 0..c {
            assert!(
                same(mm[[0, ch]], lo[ch]) && same(mm[[1, ch]], hi[ch]),
                "{what} axis {axis:?} channel {ch}: got ({}, {}), want ({}, {})",
                mm[[0, ch]],
                mm[[1, ch]],
                lo[ch],
                hi[ch]
            );
        }
        let spec = match axis {
            None => spec(QScheme::PerTensorAffine, 0),
            Some(axis) => spec(QScheme::PerChannelAffine, axis),
        };
        let want = reference::observer::observe_qparams(x, &spec).unwrap();
        let (scale, inv, zp) = kernels::observer::observe(ctx, &gx, &spec)
            .unwrap()
            .download_raw(ctx)
            .unwrap();
        assert_eq!(
            scale.len(),
            want.scale.len(),
            "{what} axis {axis:?}: channels"
        );
        for ch in 0..scale.len() {
            assert!(
                same(scale[ch], want.scale[ch]),
                "{what} axis {axis:?}: scale[{ch}] = {}, want {}",
                scale[ch],
                want.scale[ch]
            );
            assert!(same(inv[ch], 1.0 / want.scale[ch]), "{what}: inv[{ch}]");
        }
        assert_eq!(zp, want.zero_point, "{what} axis {axis:?}: zero points");
    }
}

/// PyTorch's observer settings that qfuse once refused: a negative channel axis (counted from
/// the end) and the quint8 symmetric zero point of an explicit range (`has_customized_qrange`:
/// the midpoint, 127 for `[0, 255]`; 128 only for the default range). GPU = CPU, both ways.
fn observer_negative_axis_and_customized_range() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(23);
    let x = random(&mut rng, &[3, 4, 5]);
    let gx = GpuTensor::upload_f32(&ctx, &x).unwrap();
    for (neg, pos) in [(-1isize, 2usize), (-2, 1), (-3, 0)] {
        let s = ObserverSpec {
            axis: neg,
            ..spec(QScheme::PerChannelSymmetric, 0)
        };
        let want =
            reference::observer::observe_qparams(&x, &spec(QScheme::PerChannelSymmetric, pos))
                .unwrap();
        assert_eq!(want.axis, Some(pos));
        assert_eq!(reference::observer::observe_qparams(&x, &s).unwrap(), want);
        let got = kernels::observer::observe(&ctx, &gx, &s)
            .unwrap()
            .download(&ctx)
            .unwrap();
        assert_eq!(got, want, "axis {neg}");
    }
    let bad = ObserverSpec {
        axis: -4,
        ..spec(QScheme::PerChannelAffine, 0)
    };
    let e = kernels::observer::observe(&ctx, &gx, &bad).unwrap_err();
    assert_eq!(
        e.to_string(),
        "axis -4 is out of range for a tensor of rank 3"
    );
    for (customized, zp) in [(false, 128), (true, 127)] {
        let s = ObserverSpec::new(
            QDtype::QUInt8,
            QScheme::PerTensorSymmetric,
            QuantRange::UINT8,
            0,
        )
        .unwrap()
        .with_customized_range(customized)
        .unwrap();
        let cpu = reference::observer::observe_qparams(&x, &s).unwrap();
        assert_eq!(cpu.zero_point, vec![zp]);
        let gpu = kernels::observer::observe(&ctx, &gx, &s)
            .unwrap()
            .download(&ctx)
            .unwrap();
        assert_eq!(gpu, cpu);
    }
}

fn random(rng: &mut Rng, shape: &[usize]) -> ArrayD<f32> {
    ArrayD::from_shape_fn(IxDyn(shape), |_| rng.uniform(-3.0, 5.0))
}

/// Layouts of the reduction: vec4 runs (inner % 4 == 0), scalar runs (odd inner, inner = 1),
/// per-tensor tails of 1-3 elements, one channel, several partial workgroups per channel with
/// streams crossing runs, few elements per channel (one thread per channel).
fn observer_layouts_match_reference() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(21);
    let shapes: [&[usize]; 12] = [
        &[1001],
        &[4099],
        &[300_002],
        &[300_003],
        &[1, 999],
        &[5, 1, 77],
        &[3, 8, 40],
        &[9, 3, 1000],
        &[40, 2, 4000],
        &[70_001, 3],
        &[13, 7, 11, 5],
        &[2, 257],
    ];
    for shape in shapes {
        let x = random(&mut rng, shape);
        check_all(&ctx, &x, &format!("{shape:?}"));
    }
}

/// NaN anywhere (inside a vec4, in a per-tensor tail, in one channel only) gives NaN; +-inf
/// are ordinary extremes; the extremes found wherever they are (first and last elements).
fn observer_nan_inf_and_extremes() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(22);
    for (shape, index) in [
        (vec![300_003usize], vec![300_002usize]),
        (vec![300_003], vec![5]),
        (vec![300_000], vec![123_457]),
        (vec![40, 2, 4000], vec![39, 1, 3999]),
        (vec![70_001, 3], vec![70_000, 2]),
        (vec![9, 3, 1001], vec![4, 2, 500]),
    ] {
        let mut x = random(&mut rng, &shape);
        let at = IxDyn(&index);
        x[at.clone()] = f32::NAN;
        check_all(&ctx, &x, &format!("{shape:?} NaN at {index:?}"));
        x[at.clone()] = f32::INFINITY;
        x[IxDyn(&vec![0; shape.len()])] = f32::NEG_INFINITY;
        check_all(&ctx, &x, &format!("{shape:?} inf at {index:?}"));
        x[at.clone()] = 1e30;
        x[IxDyn(&vec![0; shape.len()])] = -1e30;
        check_all(&ctx, &x, &format!("{shape:?} extremes at the ends"));
    }
}

/// Empty tensors: (+inf, -inf) per channel and qparams (1.0, 0), per tensor and per channel.
fn observer_empty() {
    let Some(ctx) = common::gpu() else { return };
    for shape in [vec![0usize], vec![0, 3], vec![3, 0], vec![2, 0, 5]] {
        let x = ArrayD::<f32>::zeros(IxDyn(&shape));
        check_all(&ctx, &x, &format!("empty {shape:?}"));
    }
}

fn random_bn(rng: &mut Rng, c: usize, affine: bool) -> BatchNorm {
    BatchNorm {
        weight: affine.then(|| Array1::from_shape_fn(c, |_| rng.uniform(-2.0, 2.0))),
        bias: affine.then(|| Array1::from_shape_fn(c, |_| rng.uniform(-1.0, 1.0))),
        running_mean: Array1::from_shape_fn(c, |_| rng.uniform(-1.0, 1.0)),
        running_var: Array1::from_shape_fn(
            c,
            |i| if i == 0 { 0.0 } else { rng.uniform(0.01, 4.0) },
        ),
        eps: 1e-5,
        momentum: 0.1,
    }
}

fn close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-5 * w.abs().max(1.0),
            "{what}: [{i}] = {g}, want {w}"
        );
    }
}

fn bits_eq(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(same(g, w), "{what}: [{i}] = {g:e}, want {w:e}");
    }
}

/// Folded weights bit-exact with the CPU (vec4 rows: row lengths multiples of 4 and >= 64,
/// including rows not a multiple of 16; the per-element kernel: odd and short rows, transposed
/// and grouped-transposed weights, lengths not a multiple of 4), bias within 1e-5.
fn folds_bit_exact_weights() {
    let Some(ctx) = common::gpu() else { return };
    let gpu = GpuBackend::new(ctx);
    let cpu = CpuBackend;
    let mut rng = Rng(23);
    let cases: [(&[usize], bool, usize); 10] = [
        (&[64, 16, 3, 3], false, 64),
        (&[8, 5, 4, 4], false, 8),
        (&[3, 17, 3, 3], false, 3),
        (&[5, 3, 3], false, 5),
        (&[6, 1, 2, 3, 3], false, 6),
        (&[4, 2, 0], false, 4),
        (&[16, 8, 3, 3], true, 8),
        (&[8, 4, 8, 8], true, 8),
        (&[8, 2, 8, 8], true, 8),
        (&[6, 1, 3, 3], true, 6),
    ];
    for (shape, transpose, c) in cases {
        for (affine, with_bias) in [(true, true), (false, false)] {
            let bn = random_bn(&mut rng, c, affine);
            let w = ArrayD::from_shape_fn(IxDyn(shape), |_| rng.uniform(-1.0, 1.0));
            let b = with_bias.then(|| Array1::from_shape_fn(c, |_| rng.uniform(-1.0, 1.0)));
            let want = cpu.fold_conv_bn(&w, b.as_ref(), &bn, transpose).unwrap();
            let got = gpu.fold_conv_bn(&w, b.as_ref(), &bn, transpose).unwrap();
            let what = format!("{shape:?} transpose {transpose} affine {affine}");
            assert_eq!(got.weight.shape(), want.weight.shape(), "{what}");
            bits_eq(
                &format!("weight {what}"),
                &got.weight.iter().copied().collect::<Vec<_>>(),
                &want.weight.iter().copied().collect::<Vec<_>>(),
            );
            close(
                &format!("bias {what}"),
                &got.bias.to_vec(),
                &want.bias.to_vec(),
            );
        }
    }
    // (3, 4096): rows of 256 fold_rows4 invocations, whole workgroups of 256.
    for (out, inp, c) in [
        (3usize, 4096usize, 3usize),
        (32, 128, 32),
        (32, 128, 1),
        (10, 7, 10),
        (7, 66, 1),
    ] {
        let bn = random_bn(&mut rng, c, true);
        let w = Array2::from_shape_fn((out, inp), |_| rng.uniform(-1.0, 1.0));
        let b = Array1::from_shape_fn(out, |_| rng.uniform(-1.0, 1.0));
        let want = cpu.fold_linear_bn(&w, Some(&b), &bn).unwrap();
        let got = gpu.fold_linear_bn(&w, Some(&b), &bn).unwrap();
        let what = format!("linear {out}x{inp} bn {c}");
        bits_eq(
            &format!("weight {what}"),
            &got.weight.iter().copied().collect::<Vec<_>>(),
            &want.weight.iter().copied().collect::<Vec<_>>(),
        );
        close(
            &format!("bias {what}"),
            &got.bias.to_vec(),
            &want.bias.to_vec(),
        );
    }
}

/// Timing helper (ignored): `cargo test --release --test integration -- --ignored
/// gpu_observer_fold::timing`.
fn timing() {
    let Some(ctx) = common::gpu() else { return };
    let shape = [16usize, 64, 128, 128];
    let n: usize = shape.iter().product();
    let x = ArrayD::from_shape_fn(IxDyn(&shape), |d| {
        ((d[3] * 7 + d[2] * 3) % 101) as f32 - 50.0
    });
    let gx = GpuTensor::upload_f32(&ctx, &x).unwrap();
    let y = GpuTensor::zeros(&ctx, &shape, qfuse::gpu::DType::F32).unwrap();
    let qp =
        kernels::GpuQParams::upload(&ctx, &qfuse::quant::QParams::per_tensor(0.03, 3)).unwrap();
    let time = |f: &mut dyn FnMut()| {
        ctx.wait().unwrap();
        let t = std::time::Instant::now();
        f();
        ctx.wait().unwrap();
        t.elapsed().as_secs_f64()
    };
    for (name, scheme) in [
        ("per_channel", QScheme::PerChannelSymmetric),
        ("per_tensor", QScheme::PerTensorAffine),
        ("per_channel", QScheme::PerChannelSymmetric),
    ] {
        let spec = ObserverSpec::new(QDtype::QInt8, scheme, QuantRange::INT8, 1).unwrap();
        let (mut best, mut best_fq) = (f64::MAX, f64::MAX);
        for _ in 0..8 {
            best_fq = best_fq.min(time(&mut || {
                kernels::fake_quant::fake_quant_into(&ctx, &gx, &qp, QuantRange::INT8, &y).unwrap()
            }));
            best = best.min(time(&mut || {
                kernels::observer::observe(&ctx, &gx, &spec).unwrap();
            }));
        }
        let (gbs, fq) = (4.0 * n as f64 / best / 1e9, 8.0 * n as f64 / best_fq / 1e9);
        println!(
            "observer {name}: {:.2} ms, {gbs:.2} GB/s, fake quant {fq:.2} GB/s, ratio {:.2}",
            best * 1e3,
            gbs / fq
        );
    }
    let w = ArrayD::from_shape_fn(IxDyn(&[512, 512, 3, 3]), |d| {
        ((d[1] * 7 + d[0]) % 13) as f32 - 6.0
    });
    let gw = GpuTensor::upload_f32(&ctx, &w).unwrap();
    let c = 512;
    let bn = qfuse::ops::BatchNorm {
        weight: Some(ndarray::Array1::from_shape_fn(c, |i| 1.0 + i as f32 * 1e-3)),
        bias: Some(ndarray::Array1::from_shape_fn(c, |i| i as f32 * 1e-3)),
        running_mean: ndarray::Array1::from_shape_fn(c, |i| i as f32 * 2e-3),
        running_var: ndarray::Array1::from_shape_fn(c, |i| 0.5 + i as f32 * 1e-3),
        eps: 1e-5,
        momentum: 0.1,
    };
    let gbn = kernels::GpuBatchNorm::upload(&ctx, &bn).unwrap();
    let (mut best, mut best_fq) = (f64::MAX, f64::MAX);
    for _ in 0..8 {
        best_fq = best_fq.min(time(&mut || {
            kernels::fake_quant::fake_quant_into(&ctx, &gx, &qp, QuantRange::INT8, &y).unwrap()
        }));
        best = best.min(time(&mut || {
            kernels::fold::fold_conv_bn(&ctx, &gw, None, &gbn, false).unwrap();
        }));
    }
    let (gbs, fq) = (
        8.0 * w.len() as f64 / best / 1e9,
        8.0 * n as f64 / best_fq / 1e9,
    );
    println!(
        "fold: {:.2} ms, {gbs:.2} GB/s, fake quant {fq:.2} GB/s, ratio {:.2}",
        best * 1e3,
        gbs / fq
    );
}

crate::qfuse_tests! {
    observer_layouts_match_reference: gpu,
    observer_nan_inf_and_extremes: gpu,
    observer_empty: gpu,
    observer_negative_axis_and_customized_range: gpu,
    folds_bit_exact_weights: gpu,
    timing: gpu + manual,
}
