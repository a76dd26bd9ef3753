//! GPU kernels against the CPU reference: fake quant (bit-exact), observers (bit-exact scale
//! and zero point), the correctly rounded division behind them, activations (bit-exact),
//! BatchNorm folding (1e-5), dispatch tiling past 65,535 workgroups, and errors.
//!
//! Run on a machine without a GPU with `WGPU_BACKEND=vulkan QFUSE_REQUIRE_GPU=1` (lavapipe).

use crate::common;

use ndarray::{Array1, Array2, ArrayD, IxDyn};
use qfuse::gpu::{DType, GpuContext, GpuTensor};
use qfuse::kernels::{self, GpuQParams};
use qfuse::ops::{Activation, BatchNorm};
use qfuse::quant::{ObserverSpec, QDtype, QParams, QScheme, QuantRange};
use qfuse::reference;
use qfuse::{CpuBackend, Error, GpuBackend, HostOps};

/// SplitMix64: a small deterministic generator (no extra dependency).
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32 {
        (self.next_u32() >> 8) as f32 / (1u32 << 24) as f32
    }
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }
    fn below(&mut self, n: u32) -> u32 {
        (self.next_u64() % u64::from(n)) as u32
    }
}

fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

fn assert_bits_eq(what: &str, got: &ArrayD<f32>, want: &ArrayD<f32>) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let mut bad = 0;
    let mut first = None;
    for (i, (&g, &w)) in got.iter().zip(want.iter()).enumerate() {
        if !same(g, w) {
            bad += 1;
            first.get_or_insert((i, g, w));
        }
    }
    if let Some((i, g, w)) = first {
        panic!(
            "{what}: {bad} of {} elements differ; first at {i}: got {g:e} ({:#010x}), want \
             {w:e} ({:#010x})",
            got.len(),
            g.to_bits(),
            w.to_bits()
        );
    }
}

fn assert_close(what: &str, got: &ArrayD<f32>, want: &ArrayD<f32>, tol: f32) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    for (i, (&g, &w)) in got.iter().zip(want.iter()).enumerate() {
        let ok = same(g, w) || (g - w).abs() <= tol + tol * w.abs();
        assert!(ok, "{what}[{i}]: got {g:e}, want {w:e}");
    }
}

fn backend(ctx: &std::sync::Arc<GpuContext>) -> GpuBackend {
    GpuBackend::new(std::sync::Arc::clone(ctx))
}

/// Random values for fake quant over `range` with `scale`/`zp`: uniform values spanning a
/// little beyond the representable range, exact ties `(k + 0.5) * scale` (which `x * inv`
/// may or may not hit exactly), zeros of both signs, ±inf, NaN, and huge values.
fn fq_input(rng: &mut Rng, n: usize, scale: f32, zp: i32, range: QuantRange) -> Vec<f32> {
    let lo = (range.quant_min - zp) as f32 * scale;
    let hi = (range.quant_max - zp) as f32 * scale;
    let span = hi - lo;
    (0..n)
        .map(|i| match i % 16 {
            0..=7 => rng.uniform(lo - 0.1 * span, hi + 0.1 * span),
            8..=11 => {
                let k = rng.below((range.quant_max - range.quant_min + 4) as u32) as i32
                    + range.quant_min
                    - zp
                    - 2;
                (k as f32 + 0.5) * scale
            }
            12 => [0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY][rng.below(4) as usize],
            13 => f32::NAN,
            14 => [3e38, -3e38, 1e-40, -1e-40, f32::MIN_POSITIVE][rng.below(5) as usize],
            _ => rng.uniform(-2.0, 2.0) * scale,
        })
        .collect()
}

fn ranges() -> Vec<QuantRange> {
    vec![
        QuantRange::INT8,
        QuantRange::UINT8,
        QuantRange::INT4,
        QuantRange::UINT4,
        QuantRange::new(-127, 127).unwrap(),
        QuantRange::new(0, 127).unwrap(),
        QuantRange::new(-32768, 32767).unwrap(),
    ]
}

fn fake_quant_per_tensor_bit_exact() {
    let Some(ctx) = common::gpu() else { return };
    let gpu = backend(&ctx);
    let mut rng = Rng(1);
    for (t, range) in ranges().into_iter().enumerate() {
        for scale in [
            0.1f32,
            0.3,
            1.0,
            0.0123,
            7.5,
            1.1920929e-7,
            rng.uniform(1e-3, 1.0),
        ] {
            let zp =
                range.quant_min + rng.below((range.quant_max - range.quant_min + 1) as u32) as i32;
            let n = 4099;
            let x = ArrayD::from_shape_vec(IxDyn(&[n]), fq_input(&mut rng, n, scale, zp, range))
                .unwrap();
            let dy = ArrayD::from_shape_fn(IxDyn(&[n]), |_| rng.uniform(-3.0, 3.0));
            let qp = QParams::per_tensor(scale, zp);
            let what = format!("range {t} scale {scale} zp {zp}");
            let want = reference::fake_quant::fake_quantize(&x, &qp, range).unwrap();
            let got = gpu.fake_quant(&x, &qp, range).unwrap();
            assert_bits_eq(&format!("y, {what}"), &got, &want);
            let want = reference::fake_quant::fake_quantize_backward(&x, &dy, &qp, range).unwrap();
            let got = gpu.fake_quant_backward(&x, &dy, &qp, range).unwrap();
            assert_bits_eq(&format!("dx, {what}"), &got, &want);
            // The mask variant on device tensors.
            let (wy, wm) = reference::fake_quant::fake_quantize_with_mask(&x, &qp, range).unwrap();
            let gx = GpuTensor::upload_f32(&ctx, &x).unwrap();
            let gqp = GpuQParams::upload(&ctx, &qp).unwrap();
            let (gy, gm) =
                kernels::fake_quant::fake_quant_with_mask(&ctx, &gx, &gqp, range).unwrap();
            assert_bits_eq(
                &format!("y (mask), {what}"),
                &gy.download_f32(&ctx).unwrap(),
                &wy,
            );
            assert_bits_eq(
                &format!("mask, {what}"),
                &gm.download_f32(&ctx).unwrap(),
                &wm,
            );
        }
    }
}

fn fake_quant_known_values() {
    let Some(ctx) = common::gpu() else { return };
    let gpu = backend(&ctx);
    // Ties to even, the reciprocal rule (s = 0.3, x = -74.25 gives -248), bounds.
    let x = ArrayD::from_shape_vec(
        IxDyn(&[8]),
        vec![0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5],
    )
    .unwrap();
    let y = gpu
        .fake_quant(&x, &QParams::per_tensor(1.0, 0), QuantRange::INT8)
        .unwrap();
    assert_eq!(
        y.as_slice().unwrap(),
        &[0.0, 2.0, 2.0, 4.0, 0.0, -2.0, -2.0, -4.0]
    );
    let y = gpu
        .fake_quant(&x, &QParams::per_tensor(1.0, 3), QuantRange::UINT8)
        .unwrap();
    assert_eq!(
        y.as_slice().unwrap(),
        &[0.0, 2.0, 2.0, 4.0, 0.0, -2.0, -2.0, -3.0]
    );
    let x = ArrayD::from_shape_vec(IxDyn(&[1]), vec![-74.25f32]).unwrap();
    let r = QuantRange::new(-1000, 1000).unwrap();
    let y = gpu.fake_quant(&x, &QParams::per_tensor(0.3, 0), r).unwrap();
    assert_eq!(y[0], -248.0 * 0.3f32);
    let x = ArrayD::from_shape_vec(
        IxDyn(&[4]),
        vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0],
    )
    .unwrap();
    let qp = QParams::per_tensor(0.1, 10);
    let y = gpu.fake_quant(&x, &qp, QuantRange::UINT8).unwrap();
    assert!(y[0].is_nan());
    assert_eq!(y[1], 245.0 * 0.1f32);
    assert_eq!(y[2], -10.0 * 0.1f32);
    assert_eq!(y[3].to_bits(), 0.0f32.to_bits());
    let dy = ArrayD::from_elem(IxDyn(&[4]), -1.0f32);
    let dx = gpu
        .fake_quant_backward(&x, &dy, &qp, QuantRange::UINT8)
        .unwrap();
    assert_eq!(
        dx.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        [0.0f32, 0.0, 0.0, -1.0].map(f32::to_bits)
    );
}

fn fake_quant_per_channel_bit_exact() {
    let Some(ctx) = common::gpu() else { return };
    let gpu = backend(&ctx);
    let mut rng = Rng(2);
    // The last four reach the per-channel rows kernels (rows of a multiple of 4 values):
    // rows of 2 vec4s; rows ending part-way through an invocation's run; rows of more than
    // one workgroup of 64; rows of whole workgroups of 256 (axis 0 of [2, 16384]).
    for shape in [
        vec![5usize, 3, 7, 2],
        vec![4, 33],
        vec![3, 1, 130],
        vec![64],
        vec![4, 8],
        vec![3, 2, 4, 1100],
        vec![2, 2, 16400],
        vec![2, 16384],
    ] {
        for axis in 0..shape.len() {
            for range in [QuantRange::INT8, QuantRange::UINT8, QuantRange::INT4] {
                let c = shape[axis];
                let scale: Vec<f32> = (0..c).map(|_| rng.uniform(0.005, 0.5)).collect();
                let zp: Vec<i32> = (0..c)
                    .map(|_| {
                        range.quant_min
                            + rng.below((range.quant_max - range.quant_min + 1) as u32) as i32
                    })
                    .collect();
                let n: usize = shape.iter().product();
                let inner: usize = shape[axis + 1..].iter().product();
                // Inputs matched to each element's channel (ties included).
                let data: Vec<f32> = (0..n)
                    .map(|i| {
                        let ch = (i / inner) % c;
                        fq_input(&mut rng, 1 + (i % 16), scale[ch], zp[ch], range)[i % 16]
                    })
                    .collect();
                let x = ArrayD::from_shape_vec(IxDyn(&shape), data).unwrap();
                let dy = ArrayD::from_shape_fn(IxDyn(&shape), |_| rng.uniform(-1.0, 1.0));
                let qp = QParams::per_channel(scale, zp, axis).unwrap();
                let what = format!("shape {shape:?} axis {axis} range {range:?}");
                let want = reference::fake_quant::fake_quantize(&x, &qp, range).unwrap();
                assert_bits_eq(
                    &format!("y, {what}"),
                    &gpu.fake_quant(&x, &qp, range).unwrap(),
                    &want,
                );
                let want =
                    reference::fake_quant::fake_quantize_backward(&x, &dy, &qp, range).unwrap();
                let got = gpu.fake_quant_backward(&x, &dy, &qp, range).unwrap();
                assert_bits_eq(&format!("dx, {what}"), &got, &want);
            }
        }
    }
}

/// The division the observer uses: exactly Rust's (IEEE) `a / b` on random and edge pairs.
fn div_rn_is_correctly_rounded() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(3);
    let edges = [
        0.0f32,
        -0.0,
        1.0,
        -1.0,
        3.0,
        255.0,
        127.5,
        f32::EPSILON,
        f32::MIN_POSITIVE,
        f32::MAX,
        -f32::MAX,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        1e-45,
        1.4e-44,
        5.877472e-39,
        1.1754942e-38,
        1.0000001,
        0.99999994,
        16777215.0,
        16777217.0,
        2.0f32.powi(-126),
        2.0f32.powi(127),
        2.0f32.powi(-149),
    ];
    let mut a = Vec::new();
    let mut b = Vec::new();
    for &x in &edges {
        for &y in &edges {
            a.push(x);
            b.push(y);
        }
    }
    let n = 100_000;
    while a.len() < n {
        let (x, y) = match a.len() % 5 {
            // Any bit patterns (NaN, inf, subnormals, every exponent).
            0 => (
                f32::from_bits(rng.next_u32()),
                f32::from_bits(rng.next_u32()),
            ),
            // Ordinary magnitudes, as in scale computations.
            1 => (rng.uniform(-10.0, 10.0), rng.uniform(0.5, 300.0)),
            // Subnormal numerators or results.
            2 => (
                f32::from_bits(rng.next_u32() & 0x807f_ffff),
                rng.uniform(0.25, 4.0),
            ),
            3 => (
                f32::from_bits(rng.next_u32() & 0x80ff_ffff),
                f32::from_bits((rng.next_u32() & 0x00ff_ffff) | 0x7e00_0000),
            ),
            // Quotients near exact halfway cases: integers over small integers.
            _ => (rng.below(1 << 24) as f32, (rng.below(1000) + 1) as f32),
        };
        a.push(x);
        b.push(y);
    }
    let ga = GpuTensor::from_slice_f32(&ctx, &a, &[a.len()]).unwrap();
    let gb = GpuTensor::from_slice_f32(&ctx, &b, &[b.len()]).unwrap();
    let q = kernels::observer::div_rn(&ctx, &ga, &gb)
        .unwrap()
        .download_f32(&ctx)
        .unwrap();
    let mut bad = Vec::new();
    for i in 0..a.len() {
        let want = a[i] / b[i];
        if !same(q[i], want) {
            bad.push((a[i], b[i], q[i], want));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} quotients differ, e.g. {:?}",
        bad.len(),
        a.len(),
        &bad[..bad.len().min(5)]
    );
}

fn specs(axis: usize) -> Vec<ObserverSpec> {
    let mut v = Vec::new();
    for (dtype, range) in [
        (QDtype::QInt8, QuantRange::INT8),
        (QDtype::QUInt8, QuantRange::UINT8),
        (QDtype::QUInt8, QuantRange::new(0, 127).unwrap()),
        (QDtype::QUInt8, QuantRange::UINT4),
        (QDtype::QInt8, QuantRange::new(-127, 127).unwrap()),
        (QDtype::QInt8, QuantRange::INT4),
    ] {
        for qscheme in [
            QScheme::PerTensorAffine,
            QScheme::PerTensorSymmetric,
            QScheme::PerChannelAffine,
            QScheme::PerChannelSymmetric,
        ] {
            v.push(ObserverSpec::new(dtype, qscheme, range, axis as isize).unwrap());
        }
    }
    v
}

fn check_observer(ctx: &GpuContext, x: &ArrayD<f32>, spec: &ObserverSpec, what: &str) {
    let want = reference::observer::observe_qparams(x, spec).unwrap();
    let gx = GpuTensor::upload_f32(ctx, x).unwrap();
    let gqp = kernels::observer::observe(ctx, &gx, spec).unwrap();
    let (scale, inv, zp) = gqp.download_raw(ctx).unwrap();
    let what = format!("{what}, {spec:?}");
    assert_eq!(scale.len(), want.scale.len(), "{what}: channels");
    for c in 0..scale.len() {
        assert!(
            same(scale[c], want.scale[c]),
            "{what}: scale[{c}] = {:e}, want {:e}",
            scale[c],
            want.scale[c]
        );
        assert!(same(inv[c], 1.0 / want.scale[c]), "{what}: inv[{c}]");
    }
    assert_eq!(zp, want.zero_point, "{what}: zero points");
    assert_eq!(gqp.axis(), want.axis, "{what}: axis");
}

fn observers_bit_exact() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(4);
    let shapes = [
        vec![1000usize],
        vec![6, 5, 4, 3],
        vec![3, 70_000],
        vec![17, 9],
    ];
    for shape in &shapes {
        for case in 0..6 {
            let x = ArrayD::from_shape_fn(IxDyn(shape), |_| match case {
                0 => rng.uniform(-1.0, 2.0),
                1 => rng.uniform(0.1, 5.0),
                2 => rng.uniform(-7.0, -0.01),
                3 => rng.uniform(-1e-3, 1e-3) * rng.unit().powi(8),
                4 => 0.0,
                _ => f32::from_bits(rng.next_u32() & 0xbfff_ffff), // wide magnitudes, finite
            });
            for axis in 0..shape.len() {
                for spec in specs(axis) {
                    if !spec.qscheme.is_per_channel() && axis > 0 {
                        continue;
                    }
                    check_observer(&ctx, &x, &spec, &format!("shape {shape:?} case {case}"));
                }
            }
        }
    }
}

fn observers_nan_inf_empty() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(5);
    let mut x = ArrayD::from_shape_fn(IxDyn(&[4, 50]), |_| rng.uniform(-1.0, 1.0));
    x[[2, 7]] = f32::NAN;
    x[[1, 3]] = f32::INFINITY;
    x[[3, 9]] = f32::NEG_INFINITY;
    for spec in specs(0) {
        check_observer(&ctx, &x, &spec, "nan/inf");
    }
    for spec in specs(1) {
        check_observer(&ctx, &x, &spec, "nan/inf axis 1");
    }
    let empty = ArrayD::<f32>::zeros(IxDyn(&[0, 3]));
    for spec in specs(1) {
        check_observer(&ctx, &empty, &spec, "empty");
    }
    for spec in specs(0) {
        check_observer(&ctx, &empty, &spec, "empty axis 0");
    }
    // Through the backend too.
    let gpu = backend(&ctx);
    let spec = ObserverSpec::new(
        QDtype::QUInt8,
        QScheme::PerTensorAffine,
        QuantRange::UINT8,
        0,
    )
    .unwrap();
    let v = ArrayD::from_shape_vec(IxDyn(&[3]), vec![1.0f32, f32::NAN, -1.0]).unwrap();
    let qp = gpu.calc_qparams(&v, &spec).unwrap();
    assert!(qp.scale[0].is_nan());
    assert_eq!(qp.zero_point, vec![0]);
}

fn min_max_matches_reference() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(6);
    let x = ArrayD::from_shape_fn(IxDyn(&[7, 300, 5]), |_| rng.uniform(-100.0, 100.0));
    let gx = GpuTensor::upload_f32(&ctx, &x).unwrap();
    let mm = kernels::observer::min_max(&ctx, &gx, None)
        .unwrap()
        .download_f32(&ctx)
        .unwrap();
    let (lo, hi) = reference::observer::min_max(&x);
    assert_eq!((mm[[0, 0]], mm[[1, 0]]), (lo, hi));
    for axis in 0..3 {
        let mm = kernels::observer::min_max(&ctx, &gx, Some(axis))
            .unwrap()
            .download_f32(&ctx)
            .unwrap();
        let (lo, hi) = reference::observer::min_max_per_channel(&x, axis).unwrap();
        assert_eq!(
            mm.index_axis(ndarray::Axis(0), 0)
                .iter()
                .copied()
                .collect::<Vec<f32>>(),
            lo,
            "axis {axis}"
        );
        assert_eq!(
            mm.index_axis(ndarray::Axis(0), 1)
                .iter()
                .copied()
                .collect::<Vec<f32>>(),
            hi,
            "axis {axis}"
        );
    }
}

/// QAT chain on the device: observe, then fake-quantize with the GPU-computed qparams, with
/// no host round trip in between; equals the CPU's observe + fake quant.
fn observe_then_fake_quant_on_device() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(7);
    let x = ArrayD::from_shape_fn(IxDyn(&[8, 3, 5, 5]), |_| rng.uniform(-0.7, 0.9));
    let gx = GpuTensor::upload_f32(&ctx, &x).unwrap();
    for spec in specs(0) {
        let want_qp = reference::observer::observe_qparams(&x, &spec).unwrap();
        let want = reference::fake_quant::fake_quantize(&x, &want_qp, spec.range).unwrap();
        let gqp = kernels::observer::observe(&ctx, &gx, &spec).unwrap();
        let y = kernels::fake_quant::fake_quant(&ctx, &gx, &gqp, spec.range).unwrap();
        assert_bits_eq(&format!("{spec:?}"), &y.download_f32(&ctx).unwrap(), &want);
    }
}

fn activations_bit_exact() {
    let Some(ctx) = common::gpu() else { return };
    let gpu = backend(&ctx);
    let mut rng = Rng(8);
    let specials = [
        0.0f32,
        -0.0,
        6.0,
        -6.0,
        5.9999995,
        6.0000005,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e-40,
        -1e-40,
    ];
    // 3003 elements: the scalar kernels; 8008: the vec4 kernels, over two workgroups, the
    // second partial.
    for rows in [3, 8] {
        let x = ArrayD::from_shape_fn(IxDyn(&[rows, 1001]), |d| {
            if d[1] < specials.len() {
                specials[d[1]]
            } else {
                rng.uniform(-8.0, 8.0)
            }
        });
        let dy = ArrayD::from_shape_fn(IxDyn(&[rows, 1001]), |_| rng.uniform(-1.0, 1.0));
        for act in [Activation::None, Activation::Relu, Activation::Relu6] {
            let want = reference::activation::activation(&x, act);
            assert_bits_eq(
                &format!("{rows} rows {act:?}"),
                &gpu.activation(&x, act).unwrap(),
                &want,
            );
            let want = reference::activation::activation_backward(&x, &dy, act).unwrap();
            let got = gpu.activation_backward(&x, &dy, act).unwrap();
            assert_bits_eq(&format!("{rows} rows {act:?} backward"), &got, &want);
        }
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

fn folds_match_reference() {
    let Some(ctx) = common::gpu() else { return };
    let gpu = backend(&ctx);
    let cpu = CpuBackend;
    let mut rng = Rng(9);
    // (weight shape, transpose, BN channels)
    let cases: [(&[usize], bool, usize); 8] = [
        (&[8, 3, 3, 3], false, 8),
        (&[4, 2, 5], false, 4),
        (&[6, 1, 2, 3, 3], false, 6),
        (&[16, 1, 3, 3], false, 16),
        (&[3, 5, 2, 2], true, 5),
        (&[4, 3, 1, 2], true, 6),
        (&[6, 1, 3, 3], true, 6),
        (&[2, 4, 3], true, 4),
    ];
    for (shape, transpose, c) in cases {
        for (affine, with_bias) in [(true, true), (false, false), (true, false)] {
            let bn = random_bn(&mut rng, c, affine);
            let w = ArrayD::from_shape_fn(IxDyn(shape), |_| rng.uniform(-1.0, 1.0));
            let b = with_bias.then(|| Array1::from_shape_fn(c, |_| rng.uniform(-1.0, 1.0)));
            let want = cpu.fold_conv_bn(&w, b.as_ref(), &bn, transpose).unwrap();
            let got = gpu.fold_conv_bn(&w, b.as_ref(), &bn, transpose).unwrap();
            let what = format!("{shape:?} transpose {transpose} affine {affine} bias {with_bias}");
            assert_close(&format!("weight {what}"), &got.weight, &want.weight, 1e-5);
            assert_close(
                &format!("bias {what}"),
                &got.bias.into_dyn(),
                &want.bias.into_dyn(),
                1e-5,
            );
        }
    }
    for (out, inp, c) in [(10usize, 7usize, 10usize), (5, 3, 1), (64, 129, 64)] {
        for (affine, with_bias) in [(true, true), (false, false)] {
            let bn = random_bn(&mut rng, c, affine);
            let w = Array2::from_shape_fn((out, inp), |_| rng.uniform(-1.0, 1.0));
            let b = with_bias.then(|| Array1::from_shape_fn(out, |_| rng.uniform(-1.0, 1.0)));
            let want = cpu.fold_linear_bn(&w, b.as_ref(), &bn).unwrap();
            let got = gpu.fold_linear_bn(&w, b.as_ref(), &bn).unwrap();
            assert_close("linear weight", &got.weight, &want.weight, 1e-5);
            assert_close(
                "linear bias",
                &got.bias.into_dyn(),
                &want.bias.into_dyn(),
                1e-5,
            );
        }
    }
}

/// 17,000,000 elements need 66,407 workgroups of 256: more than the 65,535 one dimension
/// allows, so the grid is tiled over x and y. Fake quant and the min/max reduction must still
/// cover every element exactly once.
fn large_tensor_tiles_dispatch() {
    let Some(ctx) = common::gpu() else { return };
    let n = 17_000_000usize;
    let [gx_, gy_, _] = ctx.grid_1d(n, kernels::WORKGROUP_SIZE).unwrap();
    assert!(
        gy_ > 1 && gx_ <= 65_535,
        "expected a 2-D grid, got [{gx_}, {gy_}]"
    );
    let mut rng = Rng(10);
    let mut data: Vec<f32> = (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect();
    // Extremes at the very end, so a grid that misses the tail fails.
    data[n - 1] = 3.5;
    data[n - 2] = -2.25;
    let x = ArrayD::from_shape_vec(IxDyn(&[n]), data).unwrap();
    let qp = QParams::per_tensor(0.02, 3);
    let range = QuantRange::INT8;
    let want = reference::fake_quant::fake_quantize(&x, &qp, range).unwrap();
    let gx = GpuTensor::upload_f32(&ctx, &x).unwrap();
    let gqp = GpuQParams::upload(&ctx, &qp).unwrap();
    let got = kernels::fake_quant::fake_quant(&ctx, &gx, &gqp, range)
        .unwrap()
        .download_f32(&ctx)
        .unwrap();
    assert_bits_eq("17M fake quant", &got, &want);
    let mm = kernels::observer::min_max(&ctx, &gx, None)
        .unwrap()
        .download_f32(&ctx)
        .unwrap();
    assert_eq!((mm[[0, 0]], mm[[1, 0]]), reference::observer::min_max(&x));
    assert_eq!((mm[[0, 0]], mm[[1, 0]]), (-2.25, 3.5));
    let spec = ObserverSpec::new(QDtype::QInt8, QScheme::PerTensorAffine, range, 0).unwrap();
    check_observer(&ctx, &x, &spec, "17M");
}

fn pipelines_are_cached_and_reused() {
    let Some(ctx) = common::gpu() else { return };
    let x = ArrayD::from_shape_vec(IxDyn(&[3]), vec![-1.0f32, 0.5, 7.0]).unwrap();
    let gx = GpuTensor::upload_f32(&ctx, &x).unwrap();
    for _ in 0..3 {
        let y = kernels::activation::activation(&ctx, &gx, Activation::Relu6).unwrap();
        assert_eq!(
            y.download_f32(&ctx).unwrap().as_slice().unwrap(),
            &[0.0, 0.5, 6.0]
        );
    }
    let y = pollster::block_on(
        kernels::activation::activation(&ctx, &gx, Activation::Relu)
            .unwrap()
            .download_f32_async(&ctx),
    )
    .unwrap();
    assert_eq!(y.as_slice().unwrap(), &[0.0, 0.5, 7.0]);
    assert!(ctx.take_uncaptured_error().is_none());
    ctx.check_alive().unwrap();
}

fn errors_match_cpu() {
    let Some(ctx) = common::gpu() else { return };
    let gpu = backend(&ctx);
    let cpu = CpuBackend;
    let x = ArrayD::from_shape_fn(IxDyn(&[2, 3]), |d| d[1] as f32);
    let dy = x.clone();
    let bad: Vec<(QParams, QuantRange)> = vec![
        (QParams::per_tensor(0.0, 0), QuantRange::INT8),
        (QParams::per_tensor(-0.1, 0), QuantRange::INT8),
        (QParams::per_tensor(f32::NAN, 0), QuantRange::INT8),
        (QParams::per_tensor(f32::INFINITY, 0), QuantRange::INT8),
        (QParams::per_tensor(0.1, 300), QuantRange::UINT8),
        (
            QParams::per_tensor(0.1, 0),
            QuantRange {
                quant_min: 5,
                quant_max: 5,
            },
        ),
        (
            QParams::per_channel(vec![0.1; 2], vec![0; 2], 1).unwrap(),
            QuantRange::INT8,
        ),
        (
            QParams::per_channel(vec![0.1; 3], vec![0; 3], 2).unwrap(),
            QuantRange::INT8,
        ),
        (
            QParams::per_channel(vec![0.1, 0.0, 0.1], vec![0; 3], 1).unwrap(),
            QuantRange::INT8,
        ),
    ];
    for (qp, range) in bad {
        let want = cpu.fake_quant(&x, &qp, range).unwrap_err().to_string();
        let got = gpu.fake_quant(&x, &qp, range).unwrap_err().to_string();
        assert_eq!(got, want);
        let want = cpu
            .fake_quant_backward(&x, &dy, &qp, range)
            .unwrap_err()
            .to_string();
        let got = gpu
            .fake_quant_backward(&x, &dy, &qp, range)
            .unwrap_err()
            .to_string();
        assert_eq!(got, want);
        // The device launcher checks the same way.
        let gx = GpuTensor::upload_f32(&ctx, &x).unwrap();
        if let Ok(gqp) = GpuQParams::upload(&ctx, &qp) {
            let got = kernels::fake_quant::fake_quant(&ctx, &gx, &gqp, range)
                .unwrap_err()
                .to_string();
            assert_eq!(got, want);
        }
    }
    // Shape mismatches.
    let dy_bad = ArrayD::<f32>::zeros(IxDyn(&[3, 2]));
    let qp = QParams::per_tensor(0.1, 0);
    assert_eq!(
        gpu.fake_quant_backward(&x, &dy_bad, &qp, QuantRange::INT8)
            .unwrap_err()
            .to_string(),
        cpu.fake_quant_backward(&x, &dy_bad, &qp, QuantRange::INT8)
            .unwrap_err()
            .to_string()
    );
    assert_eq!(
        gpu.activation_backward(&x, &dy_bad, Activation::Relu)
            .unwrap_err()
            .to_string(),
        cpu.activation_backward(&x, &dy_bad, Activation::Relu)
            .unwrap_err()
            .to_string()
    );
    // Observer errors.
    let spec = ObserverSpec::new(
        QDtype::QInt8,
        QScheme::PerChannelAffine,
        QuantRange::INT8,
        5,
    )
    .unwrap();
    assert_eq!(
        gpu.calc_qparams(&x, &spec).unwrap_err().to_string(),
        cpu.calc_qparams(&x, &spec).unwrap_err().to_string()
    );
    let mut spec = spec;
    spec.axis = 0;
    spec.range = QuantRange {
        quant_min: 3,
        quant_max: -3,
    };
    assert_eq!(
        gpu.calc_qparams(&x, &spec).unwrap_err().to_string(),
        cpu.calc_qparams(&x, &spec).unwrap_err().to_string()
    );
    // Fold errors.
    let mut rng = Rng(11);
    let bn5 = random_bn(&mut rng, 5, true);
    let w = ArrayD::<f32>::zeros(IxDyn(&[4, 2, 3, 3]));
    let bn6 = random_bn(&mut rng, 6, true);
    let bn4 = random_bn(&mut rng, 4, true);
    let mut bad_bn = bn4.clone();
    bad_bn.running_var = Array1::ones(3);
    let bias3 = Array1::<f32>::zeros(3);
    type FoldCase<'a> = (
        &'a ArrayD<f32>,
        Option<&'a Array1<f32>>,
        &'a BatchNorm,
        bool,
    );
    let fold_cases: Vec<FoldCase> = vec![
        (&w, None, &bn5, false),
        (&w, None, &bn5, true),
        (&w, None, &bn6, true),
        (&w, Some(&bias3), &bn4, false),
        (&w, None, &bad_bn, false),
    ];
    for (w, b, bn, t) in fold_cases {
        assert_eq!(
            gpu.fold_conv_bn(w, b, bn, t).unwrap_err().to_string(),
            cpu.fold_conv_bn(w, b, bn, t).unwrap_err().to_string()
        );
    }
    let w2 = ArrayD::<f32>::zeros(IxDyn(&[4, 2]));
    assert_eq!(
        gpu.fold_conv_bn(&w2, None, &bad_bn, false)
            .unwrap_err()
            .to_string(),
        cpu.fold_conv_bn(&w2, None, &bad_bn, false)
            .unwrap_err()
            .to_string()
    );
    let wl = Array2::<f32>::zeros((4, 2));
    assert_eq!(
        gpu.fold_linear_bn(&wl, None, &bn5).unwrap_err().to_string(),
        cpu.fold_linear_bn(&wl, None, &bn5).unwrap_err().to_string()
    );
    assert_eq!(
        gpu.fold_linear_bn(&wl, Some(&Array1::zeros(1)), &bn4)
            .unwrap_err()
            .to_string(),
        cpu.fold_linear_bn(&wl, Some(&Array1::zeros(1)), &bn4)
            .unwrap_err()
            .to_string()
    );
}

fn buffer_too_large_is_refused_before_allocating() {
    let Some(ctx) = common::gpu() else { return };
    let limits = ctx.limits().clone();
    let binding = limits.max_storage_buffer_binding_size;
    // One element more than the binding limit allows.
    let n = (binding / 4 + 1) as usize;
    let bytes = n as u64 * 4;
    let e = GpuTensor::zeros(&ctx, &[n], DType::F32).unwrap_err();
    let (name, limit) = if bytes > limits.max_buffer_size {
        ("max_buffer_size", limits.max_buffer_size)
    } else {
        ("max_storage_buffer_binding_size", binding)
    };
    assert!(
        matches!(e, Error::BufferTooLarge { size, limit_name, limit: l }
            if size == bytes && limit_name == name && l == limit),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        format!("buffer of {bytes} bytes exceeds the device limit {name} = {limit} bytes")
    );
    // Over max_buffer_size: named as such.
    let n = (limits.max_buffer_size / 4 + 1) as usize;
    let e = GpuTensor::zeros(&ctx, &[n], DType::F32).unwrap_err();
    assert!(
        matches!(
            e,
            Error::BufferTooLarge {
                limit_name: "max_buffer_size",
                ..
            }
        ),
        "{e:?}"
    );
    // Shapes whose byte size overflows are refused too.
    assert!(GpuTensor::zeros(&ctx, &[usize::MAX, 2], DType::F32).is_err());
    // The context still works.
    let t = GpuTensor::zeros(&ctx, &[4], DType::F32).unwrap();
    assert_eq!(t.download_f32(&ctx).unwrap().as_slice().unwrap(), &[0.0; 4]);
}

fn tensor_round_trips() {
    let Some(ctx) = common::gpu() else { return };
    let x = ArrayD::from_shape_fn(IxDyn(&[2, 3, 4]), |d| (d[0] * 12 + d[1] * 4 + d[2]) as f32);
    let t = GpuTensor::upload_f32(&ctx, &x).unwrap();
    assert_eq!(t.shape(), &[2, 3, 4]);
    assert_eq!(t.len(), 24);
    assert_eq!(t.download_f32(&ctx).unwrap(), x);
    // Non-standard layout uploads row-major.
    let xt = x.clone().reversed_axes();
    let t = GpuTensor::upload_f32(&ctx, &xt).unwrap();
    assert_eq!(t.download_f32(&ctx).unwrap(), xt);
    let xi = ArrayD::from_shape_fn(IxDyn(&[5]), |d| d[0] as i32 - 2);
    let t = GpuTensor::upload_i32(&ctx, &xi).unwrap();
    assert_eq!(t.download_i32(&ctx).unwrap(), xi);
    assert!(t.download_f32(&ctx).is_err());
    let e = GpuTensor::upload_f32(&ctx, &ArrayD::zeros(IxDyn(&[0, 4]))).unwrap();
    assert!(e.is_empty());
    assert_eq!(e.download_f32(&ctx).unwrap().shape(), &[0, 4]);
    // Empty tensors through the kernels.
    let gpu = backend(&ctx);
    let empty = ArrayD::<f32>::zeros(IxDyn(&[0, 3]));
    let qp = QParams::per_channel(vec![0.1; 3], vec![0; 3], 1).unwrap();
    assert_eq!(
        gpu.fake_quant(&empty, &qp, QuantRange::INT8)
            .unwrap()
            .shape(),
        &[0, 3]
    );
    assert_eq!(
        gpu.activation(&empty, Activation::Relu).unwrap().shape(),
        &[0, 3]
    );
}

/// An embedder's own device works through `from_device`; errors outside qfuse's scopes reach
/// the installed handler instead of panicking; a destroyed device turns into `Error::Gpu`.
fn embedder_device_errors_and_loss() {
    let Some(shared) = common::gpu() else { return };
    // A second context on a fresh device from the same adapter kind.
    let ctx = GpuContext::new().unwrap();
    let ctx = GpuContext::from_device_with(
        ctx.device().clone(),
        ctx.queue().clone(),
        qfuse::gpu::EmbedOptions::install(),
    )
    .unwrap();
    assert_eq!(ctx.adapter_info().name, shared.adapter_info().name);
    let x = ArrayD::from_shape_vec(IxDyn(&[2]), vec![-1.0f32, 2.0]).unwrap();
    let gx = GpuTensor::upload_f32(&ctx, &x).unwrap();
    let y = kernels::activation::activation(&ctx, &gx, Activation::Relu).unwrap();
    assert_eq!(
        y.download_f32(&ctx).unwrap().as_slice().unwrap(),
        &[0.0, 2.0]
    );
    // A validation error outside any scope: recorded, no panic.
    let _bad = ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("invalid on purpose"),
        size: 16,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let msg = ctx.take_uncaptured_error();
    assert!(msg.is_some(), "the uncaptured error was not recorded");
    // Inside qfuse's scopes the same mistake is an Error::Gpu.
    let e = ctx
        .scoped("test", || {
            ctx.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some("invalid on purpose"),
                size: 16,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        })
        .unwrap_err();
    assert!(
        matches!(e, Error::Gpu(ref m) if m.starts_with("test: ")),
        "{e}"
    );
    // Device loss.
    ctx.device().destroy();
    let _ = ctx.wait();
    let e = kernels::activation::activation(&ctx, &gx, Activation::Relu).unwrap_err();
    assert!(matches!(e, Error::Gpu(_)), "{e:?}");
    assert!(e.to_string().contains("device lost"), "{e}");
}

crate::qfuse_tests! {
    fake_quant_per_tensor_bit_exact: gpu,
    fake_quant_known_values: gpu,
    fake_quant_per_channel_bit_exact: gpu,
    div_rn_is_correctly_rounded: gpu,
    observers_bit_exact: gpu,
    observers_nan_inf_empty: gpu,
    min_max_matches_reference: gpu,
    observe_then_fake_quant_on_device: gpu,
    activations_bit_exact: gpu,
    folds_match_reference: gpu,
    large_tensor_tiles_dispatch: large_buffers,
    pipelines_are_cached_and_reused: gpu,
    errors_match_cpu: gpu,
    buffer_too_large_is_refused_before_allocating: gpu,
    tensor_round_trips: gpu,
    embedder_device_errors_and_loss: gpu,
}
