//! Integer (deployed int8) GPU kernels against the CPU reference, bit for bit: the WGSL
//! requantization arithmetic on edge values, quantize / dequantize, conv2d (groups, depthwise,
//! stride, padding, dilation, batch, both requantization modes, extreme zero points,
//! accumulators that wrap) and linear on both dot-product paths, max pooling, the quantized
//! add, a device-resident chain, and the reference's errors.
//!
//! Run on a machine without a GPU with `WGPU_BACKEND=vulkan QFUSE_REQUIRE_GPU=1` (lavapipe).

use crate::common;

use ndarray::{Array1, Array2, Array4, ArrayD, IxDyn};
use qfuse::gpu::{GpuContext, GpuTensor, Int8Dot};
use qfuse::kernels::int8::{self as k8, GpuInt8Tensor};
use qfuse::kernels::GpuQParams;
use qfuse::ops::Conv2dParams;
use qfuse::quant::requant::{rounding_divide_by_pot, saturating_rounding_doubling_high_mul};
use qfuse::quant::{
    AddRequant, FixedPointMultiplier, QDtype, QParams, QuantRange, Requant, RequantMode,
};
use qfuse::reference::int8 as ref8;
use qfuse::{CpuBackend, GpuBackend, HostOps};

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
    fn i32(&mut self) -> i32 {
        (self.next_u64() >> 32) as i32
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    fn range(&mut self, lo: i32, hi: i32) -> i32 {
        lo + self.below((hi - lo + 1) as usize) as i32
    }
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn code(&mut self) -> i8 {
        self.range(-128, 127) as i8
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len())]
    }
}

fn dots(ctx: &GpuContext) -> Vec<Int8Dot> {
    let mut v = vec![Int8Dot::Portable];
    if ctx.packed_int8_dot_available() {
        v.push(Int8Dot::Packed);
    }
    v
}

fn assert_codes_eq<D: ndarray::Dimension>(
    what: &str,
    got: &ndarray::Array<i8, D>,
    want: &ndarray::Array<i8, D>,
) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let bad: Vec<(usize, i8, i8)> = got
        .iter()
        .zip(want.iter())
        .enumerate()
        .filter(|(_, (g, w))| g != w)
        .map(|(i, (g, w))| (i, *g, *w))
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: {} of {} codes differ; first (index, got, want): {:?}",
        bad.len(),
        got.len(),
        &bad[..bad.len().min(8)]
    );
}

// ---------------------------------------------------------------------------------------------
// The WGSL requantization arithmetic.

const EDGE_X: &[i32] = &[
    i32::MIN,
    i32::MIN + 1,
    i32::MIN + 2,
    -(1 << 30) - 1,
    -(1 << 30),
    -(1 << 30) + 1,
    -65537,
    -65536,
    -65535,
    -3,
    -2,
    -1,
    0,
    1,
    2,
    3,
    5,
    7,
    65535,
    65536,
    65537,
    (1 << 30) - 1,
    1 << 30,
    (1 << 30) + 1,
    i32::MAX - 2,
    i32::MAX - 1,
    i32::MAX,
];

fn wgsl_fixed_point_matches_rust_on_edge_values() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(1);
    let mut mults: Vec<i32> = vec![
        0,
        1,
        2,
        3,
        1 << 30,
        (1 << 30) + 1,
        (1 << 30) - 1,
        1_518_500_250,
        i32::MAX,
        i32::MAX - 1,
        -1,
        i32::MIN,
        i32::MIN + 1,
        -(1 << 30),
    ];
    for _ in 0..6 {
        mults.push(rng.range(1 << 30, i32::MAX));
    }
    let mut xs: Vec<i32> = EDGE_X.to_vec();
    for e in 1..31 {
        // Ties of the power-of-two divide, and their neighbours.
        let half = 1i32 << (e - 1);
        for k in [1, 3, -1, -3] {
            let t = half.wrapping_mul(k);
            xs.extend([t, t.wrapping_add(1), t.wrapping_sub(1)]);
        }
    }
    for _ in 0..40 {
        xs.push(rng.i32());
        xs.push(rng.i32() >> rng.below(31));
    }
    let mut items = Vec::new();
    for &x in &xs {
        for &m in &mults {
            items.push([x, m, rng.range(-31, 30), rng.range(0, 31)]);
        }
        // Every shift and exponent at least once per x.
        for s in -31..=30 {
            items.push([x, rng.pick(&mults[4..]), s, s.rem_euclid(32)]);
        }
    }
    for _ in 0..50_000 {
        items.push([rng.i32(), rng.i32(), rng.range(-31, 30), rng.range(0, 31)]);
    }
    let got = k8::requant_probe(&ctx, &items).unwrap();
    assert_eq!(got.len(), items.len());
    let mut bad = Vec::new();
    for (item, g) in items.iter().zip(&got) {
        let [x, m, shift, e] = *item;
        let want = [
            saturating_rounding_doubling_high_mul(x, m),
            rounding_divide_by_pot(x, e),
            FixedPointMultiplier {
                multiplier: m,
                shift,
            }
            .apply(x),
            x.saturating_add(m),
        ];
        if *g != want {
            bad.push((*item, *g, want));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} differ; first (x, m, shift, exp) -> got / want: {:?}",
        bad.len(),
        items.len(),
        &bad[..bad.len().min(5)]
    );
}

fn wgsl_float_requant_matches_rust() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(2);
    let mut accs: Vec<i32> = EDGE_X.to_vec();
    // Around 2^24..2^31: halfway points of the f32 grid (ties to even) and neighbours.
    for e in 24..31 {
        let ulp = 1i32 << (e - 23);
        for k in [0, 1, 2, 3, 0x7fffff] {
            let base = (1i32 << e) + k * ulp;
            for d in [-1, 0, 1] {
                let v = base + ulp / 2 + d;
                accs.extend([v, -v]);
            }
        }
    }
    for _ in 0..500 {
        accs.push(rng.i32());
        accs.push(rng.i32() >> rng.below(31));
    }
    let scales: Vec<f32> = vec![
        0.0,
        1.0,
        0.5,
        0.25,
        1.5,
        1e-3,
        3.7e-5,
        2.0f32.powi(-31),
        1e-12,
        1e-45,
        1e30,
        f32::MAX,
        (1.0f64 / 3.0) as f32,
    ];
    let mut items = Vec::new();
    for &a in &accs {
        for &s in &scales {
            items.push((a, s, rng.range(-128, 127)));
        }
        let s = (rng.unit() * 0.01) as f32;
        items.push((a, s, rng.pick(&[-128, 127, 0])));
    }
    let got = k8::float_requant_probe(&ctx, &items).unwrap();
    let mut bad = Vec::new();
    for (&(a, s, zp), &(bits, code)) in items.iter().zip(&got) {
        let rq = Requant {
            mode: RequantMode::Float,
            scales: vec![s],
            multipliers: vec![FixedPointMultiplier::default()],
            out_zero_point: zp,
            clamp_min: -128,
            clamp_max: 127,
        };
        let want = ((a as f32).to_bits(), rq.apply(0, a));
        if (bits, code) != want {
            bad.push(((a, s, zp), (bits, code), want));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} differ; first: {:?}",
        bad.len(),
        items.len(),
        &bad[..bad.len().min(5)]
    );
}

// ---------------------------------------------------------------------------------------------
// Quantize / dequantize.

fn cpu() -> CpuBackend {
    CpuBackend
}

fn quantize_and_dequantize_match_the_reference() {
    let Some(ctx) = common::gpu() else { return };
    let gpu = GpuBackend::new(ctx.clone());
    let mut rng = Rng(3);
    let shapes: &[&[usize]] = &[
        &[],
        &[1],
        &[7],
        &[3, 5],
        &[2, 9, 3],
        &[2, 5, 4, 3],
        &[1, 4, 2, 2],
        &[3, 13, 1, 7],
        &[2, 3, 2, 2, 3],
    ];
    let ranges = [(-128, 127), (-127, 127), (-8, 7), (0, 15), (-128, -100)];
    for (case, &shape) in shapes.iter().enumerate() {
        for &(lo, hi) in &ranges {
            let range = QuantRange::new(lo, hi).unwrap();
            let n: usize = shape.iter().product();
            let specials = [
                0.0,
                -0.0,
                f32::INFINITY,
                f32::NEG_INFINITY,
                1e38,
                -1e38,
                1e-40,
                f32::MAX,
            ];
            let mut axes: Vec<Option<usize>> = vec![None];
            axes.extend((0..shape.len()).map(Some));
            for axis in axes {
                let channels = axis.map_or(1, |a| shape[a]);
                let scale: Vec<f32> = (0..channels)
                    .map(|_| (10f64.powf(rng.unit() * 4.0 - 3.5)) as f32)
                    .collect();
                let zp: Vec<i32> = (0..channels).map(|_| rng.range(lo, hi)).collect();
                let qp = QParams {
                    scale: scale.clone(),
                    zero_point: zp,
                    axis,
                };
                let data: Vec<f32> = (0..n)
                    .map(|i| match rng.below(10) {
                        0 => specials[rng.below(specials.len())],
                        // Exact ties of x / scale (for per-tensor qparams).
                        1 => (rng.range(-200, 200) as f32 + 0.5) * scale[0],
                        _ => (rng.unit() * 2.0 - 1.0) as f32 * 3.0 * (1 + i % 3) as f32,
                    })
                    .collect();
                let x = ArrayD::from_shape_vec(IxDyn(shape), data).unwrap();
                let want = cpu().quantize(&x, &qp, range).unwrap();
                let got = gpu.quantize(&x, &qp, range).unwrap();
                assert_codes_eq(
                    &format!("quantize case {case} {shape:?} range [{lo}, {hi}] axis {axis:?}"),
                    &got,
                    &want,
                );
                let dq_want = cpu().dequantize(&want, &qp).unwrap();
                let dq_got = gpu.dequantize(&want, &qp).unwrap();
                assert_eq!(dq_got.shape(), dq_want.shape());
                for (g, w) in dq_got.iter().zip(dq_want.iter()) {
                    assert_eq!(g.to_bits(), w.to_bits(), "dequantize {shape:?} {axis:?}");
                }
            }
        }
    }
}

fn quantize_reports_the_first_nan() {
    let Some(ctx) = common::gpu() else { return };
    let gpu = GpuBackend::new(ctx.clone());
    let range = QuantRange::new(-128, 127).unwrap();
    let qp = QParams::per_tensor(0.1, 0);
    let mut data = vec![1.0f32; 1000];
    data[977] = f32::NAN;
    data[613] = -f32::NAN;
    let x = ArrayD::from_shape_vec(IxDyn(&[10, 25, 4]), data).unwrap();
    let want = cpu().quantize(&x, &qp, range).unwrap_err().to_string();
    let got = gpu.quantize(&x, &qp, range).unwrap_err().to_string();
    assert_eq!(got, want);
    assert!(got.contains("NaN") && got.contains("element 613"), "{got}");
    // Device-resident: the codes come back, the status names the NaN.
    let gx = GpuTensor::upload_f32(&ctx, &x).unwrap();
    let gqp = GpuQParams::upload(&ctx, &qp).unwrap();
    let q = k8::quantize(&ctx, &gx, &gqp, range).unwrap();
    assert!(q.check(&ctx).unwrap_err().to_string().contains("NaN"));
    let clean = ArrayD::from_elem(IxDyn(&[3, 3]), 0.25f32);
    let gx = GpuTensor::upload_f32(&ctx, &clean).unwrap();
    k8::quantize(&ctx, &gx, &gqp, range)
        .unwrap()
        .into_checked(&ctx)
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Conv2d and linear.

/// A random requantization for `o` channels.
fn random_requant(rng: &mut Rng, o: usize, mode: RequantMode) -> Requant {
    let per_channel = rng.below(2) == 0;
    let count = if per_channel { o } else { 1 };
    let real: Vec<f64> = (0..count)
        .map(|_| match rng.below(8) {
            // Typical: s_in · s_w / s_out.
            0..=3 => 10f64.powf(-4.0 + 3.0 * rng.unit()),
            // Multipliers > 1 (left shifts, saturating).
            4 => 1.0 + rng.unit() * 300.0,
            // Tiny (large right shifts) and flushed-to-zero ones.
            5 => 10f64.powf(-9.5 + 2.0 * rng.unit()),
            6 => rng.pick(&[0.0, 1e-12, 0.5, 1.0, 2f64.powi(-31), 2f64.powi(29)]),
            _ => 0.5 * rng.unit(),
        })
        .collect();
    let any = rng.range(-128, 127);
    let out_zp = rng.pick(&[-128, 127, 0, -5, 10, any]);
    let bounds = match rng.below(4) {
        0 => (out_zp, 127),                                  // ReLU
        1 => (out_zp, (out_zp + rng.range(0, 60)).min(127)), // ReLU6
        2 => (-127, 127),
        _ => (-128, 127),
    };
    Requant::new(&real, mode, out_zp, bounds).unwrap()
}

struct ConvCase {
    x: [usize; 4],
    o: usize,
    k: [usize; 2],
    params: Conv2dParams,
}

fn conv_case(
    x: [usize; 4],
    o: usize,
    k: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
) -> ConvCase {
    ConvCase {
        x,
        o,
        k,
        params: Conv2dParams {
            stride,
            padding,
            dilation,
            groups,
            ..Default::default()
        },
    }
}

fn conv_cases() -> Vec<ConvCase> {
    vec![
        conv_case([2, 3, 7, 9], 5, [3, 3], [1, 1], [1, 1], [1, 1], 1),
        conv_case([1, 13, 5, 6], 4, [1, 1], [1, 1], [0, 0], [1, 1], 1),
        // Groups whose input channels do not start on a word boundary (CG = 2, 3).
        conv_case([2, 6, 6, 5], 9, [3, 3], [1, 1], [1, 1], [1, 1], 3),
        conv_case([1, 9, 8, 7], 6, [3, 2], [2, 1], [2, 0], [2, 2], 3),
        // Aligned groups.
        conv_case([1, 8, 5, 5], 8, [3, 3], [1, 1], [1, 1], [1, 1], 2),
        // Depthwise, stride 2; depthwise with channel multiplier 2.
        conv_case([2, 7, 9, 9], 7, [3, 3], [2, 2], [1, 1], [1, 1], 7),
        // Depthwise 3x3 at stride 1 (the row-walking conv2d_dw): a partial last word of
        // channels and a partial last block of rows; padding that differs in height and width;
        // one pixel; padding='same'.
        conv_case([2, 7, 9, 10], 7, [3, 3], [1, 1], [1, 1], [1, 1], 7),
        conv_case([1, 8, 6, 5], 8, [3, 3], [1, 1], [0, 2], [1, 1], 8),
        conv_case([1, 4, 1, 1], 4, [3, 3], [1, 1], [1, 1], [1, 1], 4),
        ConvCase {
            x: [1, 5, 7, 6],
            o: 5,
            k: [3, 3],
            params: Conv2dParams::same([1, 1], 5),
        },
        conv_case([1, 5, 6, 7], 10, [3, 3], [1, 1], [1, 1], [1, 1], 5),
        conv_case([1, 12, 7, 6], 12, [5, 5], [1, 1], [2, 2], [1, 1], 12),
        // Dilation, padding larger than the kernel's half, width not a multiple of 4.
        conv_case([3, 5, 9, 11], 7, [3, 3], [1, 2], [3, 2], [2, 3], 1),
        conv_case([1, 2, 4, 5], 3, [5, 5], [1, 1], [3, 3], [1, 1], 1),
        // Many taps and channels (large accumulators).
        conv_case([1, 34, 6, 6], 17, [3, 3], [1, 1], [1, 1], [1, 1], 1),
        conv_case([2, 1, 10, 3], 1, [2, 2], [3, 1], [1, 0], [1, 1], 1),
        // padding='same' with even kernels: one more row and column at the bottom and right.
        ConvCase {
            x: [2, 3, 7, 8],
            o: 5,
            k: [2, 4],
            params: Conv2dParams::same([1, 1], 1),
        },
        ConvCase {
            x: [1, 6, 9, 6],
            o: 6,
            k: [4, 2],
            params: Conv2dParams::same([1, 3], 3),
        },
    ]
}

fn random_conv(
    rng: &mut Rng,
    case: &ConvCase,
    mode: RequantMode,
) -> (Array4<i8>, i32, Array4<i8>, Option<Array1<i32>>, Requant) {
    let [n, c, h, w] = case.x;
    let cg = c / case.params.groups;
    let x = Array4::from_shape_fn((n, c, h, w), |_| rng.code());
    let wt = Array4::from_shape_fn((case.o, cg, case.k[0], case.k[1]), |_| rng.code());
    let any = rng.range(-128, 127);
    let x_zp = rng.pick(&[-128, 127, 0, 3, any, 300, -1000]);
    let bias = match rng.below(4) {
        0 => None,
        // Near the i32 limits: the accumulator wraps, as in the reference.
        1 => Some(Array1::from_shape_fn(case.o, |_| {
            let d = rng.range(0, 100_000);
            rng.pick(&[i32::MAX - d, i32::MIN + d])
        })),
        _ => Some(Array1::from_shape_fn(case.o, |_| {
            rng.range(-50_000, 50_000)
        })),
    };
    let rq = random_requant(rng, case.o, mode);
    (x, x_zp, wt, bias, rq)
}

fn conv2d_int8_matches_the_reference_on_both_dot_paths() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(4);
    for (ci, case) in conv_cases().iter().enumerate() {
        for round in 0..4 {
            let mode = if round % 2 == 0 {
                RequantMode::FixedPoint
            } else {
                RequantMode::Float
            };
            let (x, x_zp, w, bias, rq) = random_conv(&mut rng, case, mode);
            let want = ref8::conv2d_int8(&x, x_zp, &w, bias.as_ref(), &case.params, &rq).unwrap();
            let gx = GpuInt8Tensor::upload(&ctx, &x.clone().into_dyn()).unwrap();
            for dot in dots(&ctx) {
                let got = k8::conv2d_int8_with(
                    &ctx,
                    &gx,
                    x_zp,
                    &w,
                    bias.as_ref(),
                    &case.params,
                    &rq,
                    dot,
                )
                .unwrap()
                .download(&ctx)
                .unwrap();
                assert_codes_eq(
                    &format!(
                        "conv case {ci} round {round} {dot:?} {mode:?} x_zp {x_zp} {:?}",
                        case.params
                    ),
                    &got,
                    &want.clone().into_dyn(),
                );
            }
        }
    }
}

/// Every exact-f32 variant of the dense conv (`conv2d_f`: channels, rows, row loop or per-tap
/// loop, subgroup-shared or own weights) against the reference, bit for bit: the shared cases,
/// channel counts that are not multiples of 4 or 16, enough channel words and taps to flush
/// the f32 accumulators several times (one word per flush at 256 taps), and all-(-128) codes
/// (products of 2^14, the bound the flush interval is sized for). Variants that do not apply
/// (groups, input zero points outside [-128, 127], more than 256 taps) are refused.
///
/// One test per weight-sharing mode and channel count, each compiling four of the sixteen
/// pipelines, so a cold shader cache keeps every test well under a minute.
fn check_f32_variants(subgroups: bool, channels: u32) {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(21);
    let mut cases = conv_cases();
    cases.extend([
        conv_case([1, 37, 9, 10], 21, [3, 3], [1, 1], [1, 1], [1, 1], 1),
        conv_case([2, 300, 5, 6], 18, [3, 3], [1, 1], [1, 1], [1, 1], 1),
        conv_case([1, 70, 6, 19], 9, [5, 5], [2, 1], [2, 2], [1, 1], 1),
        conv_case([1, 8, 4, 5], 3, [16, 16], [1, 1], [6, 7], [1, 1], 1),
        conv_case([1, 4, 3, 3], 2, [17, 17], [1, 1], [7, 7], [1, 1], 1),
    ]);
    let variants: Vec<k8::Int8ConvVariant> = k8::Int8ConvVariant::all()
        .into_iter()
        .filter(|v| {
            matches!(v, k8::Int8ConvVariant::Float { subgroups: sg, channels: c, .. }
                if *sg == subgroups && *c == channels)
        })
        .collect();
    assert_eq!(variants.len(), 4);
    let mut ran = 0;
    for (ci, case) in cases.iter().enumerate() {
        for round in 0..3 {
            let mode = if round % 2 == 0 {
                RequantMode::FixedPoint
            } else {
                RequantMode::Float
            };
            let (mut x, mut x_zp, mut w, bias, rq) = random_conv(&mut rng, case, mode);
            if round == 2 {
                x.fill(-128);
                w.fill(-128);
                x_zp = rng.pick(&[-128, 127]);
            } else if rng.below(2) == 0 {
                x_zp = rng.range(-128, 127);
            }
            let want = ref8::conv2d_int8(&x, x_zp, &w, bias.as_ref(), &case.params, &rq).unwrap();
            let gx = GpuInt8Tensor::upload(&ctx, &x.clone().into_dyn()).unwrap();
            let conv =
                k8::GpuConv2dInt8::new(&ctx, x_zp, &w, bias.as_ref(), &case.params, &rq).unwrap();
            for &v in &variants {
                let got = conv.forward_variant(&ctx, &gx, v);
                if !conv.applies(&ctx, v) {
                    assert!(
                        got.is_err(),
                        "case {ci}: {} ran where it does not apply",
                        v.id()
                    );
                    continue;
                }
                ran += 1;
                assert_codes_eq(
                    &format!(
                        "conv case {ci} round {round} {} {mode:?} x_zp {x_zp} {:?}",
                        v.id(),
                        case.params
                    ),
                    &got.unwrap().download(&ctx).unwrap(),
                    &want.clone().into_dyn(),
                );
            }
        }
    }
    if subgroups && !ctx.has_subgroups() {
        assert_eq!(ran, 0, "subgroup variants ran without subgroups");
    } else {
        assert!(ran > 25, "only {ran} f32 variant runs");
    }
}

fn conv2d_int8_f32_c8_subgroup_variants_match_the_reference() {
    check_f32_variants(true, 8);
}

fn conv2d_int8_f32_c16_subgroup_variants_match_the_reference() {
    check_f32_variants(true, 16);
}

fn conv2d_int8_f32_c8_portable_variants_match_the_reference() {
    check_f32_variants(false, 8);
}

fn conv2d_int8_f32_c16_portable_variants_match_the_reference() {
    check_f32_variants(false, 16);
}

/// A 1x1 conv with weight 1 and bias b passes `x − x_zp + b` straight into the
/// requantization: the whole WGSL epilogue against `Requant::apply` on chosen accumulators.
fn conv_epilogue_matches_requant_apply_on_edge_accumulators() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(5);
    let accs: Vec<i32> = EDGE_X
        .iter()
        .copied()
        .chain((0..200).map(|_| rng.i32()))
        .collect();
    let o = accs.len();
    let x = Array4::<i8>::zeros((1, 1, 1, 1));
    let mut w = Array4::<i8>::zeros((o, 1, 1, 1));
    w.fill(1);
    // acc = bias + (0 − 0) · 1 = bias.
    let bias = Array1::from(accs.clone());
    for mode in [RequantMode::FixedPoint, RequantMode::Float] {
        for _ in 0..4 {
            let rq = random_requant(&mut rng, o, mode);
            let want: Vec<i8> = accs
                .iter()
                .enumerate()
                .map(|(c, &a)| rq.apply(c, a) as i8)
                .collect();
            let gx = GpuInt8Tensor::upload(&ctx, &x.clone().into_dyn()).unwrap();
            for dot in dots(&ctx) {
                let got = k8::conv2d_int8_with(
                    &ctx,
                    &gx,
                    0,
                    &w,
                    Some(&bias),
                    &Conv2dParams::default(),
                    &rq,
                    dot,
                )
                .unwrap()
                .download(&ctx)
                .unwrap();
                let got: Vec<i8> = got.iter().copied().collect();
                assert_eq!(got, want, "{mode:?} {dot:?} {rq:?}");
            }
        }
    }
}

fn linear_int8_matches_the_reference_on_both_dot_paths() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(6);
    let shapes = [
        (1, 1, 1),
        (1, 3, 5),
        (2, 4, 4),
        (3, 5, 7),
        (5, 17, 3),
        (9, 64, 33),
        (4, 130, 10),
        (7, 6, 1),
    ];
    for &(n, inp, out) in &shapes {
        for round in 0..4 {
            let mode = if round % 2 == 0 {
                RequantMode::FixedPoint
            } else {
                RequantMode::Float
            };
            let x = Array2::from_shape_fn((n, inp), |_| rng.code());
            let w = Array2::from_shape_fn((out, inp), |_| rng.code());
            let any = rng.range(-128, 127);
            let x_zp = rng.pick(&[-128, 127, 0, any, 1000]);
            let bias = match rng.below(3) {
                0 => None,
                1 => Some(Array1::from_shape_fn(out, |_| {
                    let d = rng.range(0, 1000);
                    rng.pick(&[i32::MAX - d, i32::MIN + d])
                })),
                _ => Some(Array1::from_shape_fn(out, |_| rng.range(-20_000, 20_000))),
            };
            let rq = random_requant(&mut rng, out, mode);
            let want = ref8::linear_int8(&x, x_zp, &w, bias.as_ref(), &rq).unwrap();
            let gx = GpuInt8Tensor::upload(&ctx, &x.clone().into_dyn()).unwrap();
            for dot in dots(&ctx) {
                let got = k8::linear_int8_with(&ctx, &gx, x_zp, &w, bias.as_ref(), &rq, dot)
                    .unwrap()
                    .download(&ctx)
                    .unwrap();
                assert_codes_eq(
                    &format!("linear [{n}, {inp}] -> {out} round {round} {dot:?} x_zp {x_zp}"),
                    &got,
                    &want.clone().into_dyn(),
                );
            }
        }
    }
}

fn backend_int8_ops_match_cpu() {
    let Some(ctx) = common::gpu() else { return };
    let gpu = GpuBackend::new(ctx.clone());
    let mut rng = Rng(7);
    for case in conv_cases().iter().take(6) {
        let (x, x_zp, w, bias, rq) = random_conv(&mut rng, case, RequantMode::FixedPoint);
        let want = cpu()
            .conv2d_int8(&x, x_zp, &w, bias.as_ref(), &case.params, &rq)
            .unwrap();
        let got = gpu
            .conv2d_int8(&x, x_zp, &w, bias.as_ref(), &case.params, &rq)
            .unwrap();
        assert_codes_eq("backend conv2d_int8", &got, &want);
    }
    let x = Array2::from_shape_fn((3, 11), |_| rng.code());
    let w = Array2::from_shape_fn((6, 11), |_| rng.code());
    let rq = random_requant(&mut rng, 6, RequantMode::Float);
    assert_codes_eq(
        "backend linear_int8",
        &gpu.linear_int8(&x, 5, &w, None, &rq).unwrap(),
        &cpu().linear_int8(&x, 5, &w, None, &rq).unwrap(),
    );
}

// ---------------------------------------------------------------------------------------------
// Max pooling and add.

fn max_pool2d_int8_matches_the_reference() {
    let Some(ctx) = common::gpu() else { return };
    let gpu = GpuBackend::new(ctx);
    let mut rng = Rng(8);
    for &(shape, kernel, stride) in &[
        ([1, 1, 2, 2], 2, 2),
        ([2, 5, 7, 9], 2, 2),
        ([1, 3, 8, 8], 3, 1),
        ([3, 9, 5, 6], 3, 2),
        ([1, 4, 4, 4], 4, 4),
        ([2, 6, 9, 7], 2, 3),
    ] {
        let x = Array4::from_shape_fn(shape, |_| rng.code());
        let want = cpu().max_pool2d_int8(&x, kernel, stride).unwrap();
        let got = gpu.max_pool2d_int8(&x, kernel, stride).unwrap();
        assert_codes_eq(
            &format!("max_pool {shape:?} k{kernel} s{stride}"),
            &got,
            &want,
        );
    }
}

fn add_int8_matches_the_reference_on_every_code_pair() {
    let Some(ctx) = common::gpu() else { return };
    let gpu = GpuBackend::new(ctx);
    let mut rng = Rng(9);
    // All 65,536 (a, b) pairs, in a layout with channels not a multiple of 4.
    let a = ArrayD::from_shape_fn(IxDyn(&[4, 7, 2341]), |d| {
        let i = (d[0] * 7 + d[1]) * 2341 + d[2];
        ((i / 256) % 256) as u8 as i8
    });
    let b = ArrayD::from_shape_fn(IxDyn(&[4, 7, 2341]), |d| {
        let i = (d[0] * 7 + d[1]) * 2341 + d[2];
        (i % 256) as u8 as i8
    });
    let cases = [
        ((0.1, 0), (0.1, 0), (0.1, 0), (-128, 127)),
        ((0.02, -128), (0.5, 127), (0.3, 5), (-128, 127)),
        ((0.5, 127), (0.02, -128), (0.01, -128), (-128, 127)),
        ((0.05, 3), (0.07, -9), (0.2, -20), (-20, 127)),
        ((1.0, 0), (1e-3, 0), (100.0, 0), (-128, 127)),
        ((1e-3, 10), (1e-3, -10), (1e-6, 0), (-100, 100)),
        ((0.25, -1), (0.125, 1), (0.375, 0), (0, 127)),
    ];
    // Both arithmetics; the f32 (MLAS) form on int8 and on uint8 storage, whose roundings
    // differ (the GPU's exact fma against Rust's f32::mul_add).
    for (ci, &(sa, sb, so, bounds)) in cases.iter().enumerate() {
        for (mode, codes) in [
            (RequantMode::FixedPoint, QDtype::QInt8),
            (RequantMode::Float, QDtype::QInt8),
            (RequantMode::Float, QDtype::QUInt8),
        ] {
            let add = AddRequant::new(sa, sb, so, bounds, mode, codes).unwrap();
            let want = cpu().add_int8(&a, &b, &add).unwrap();
            let got = gpu.add_int8(&a, &b, &add).unwrap();
            assert_codes_eq(&format!("add case {ci} {mode:?} {codes:?}"), &got, &want);
        }
    }
    // The f32 form's exact fma on the GPU against f32::mul_add: random scales (ratios from
    // 2^-18 to 2^18) and zero points, every code pair.
    for ci in 0..24 {
        let mut scale = || (rng.unit() * 18.0 - 9.0).exp2() as f32 * 0.01;
        let (sa, sb, so) = (scale(), scale(), scale());
        let mut zp = || rng.range(-128, 127);
        let (za, zb, zo) = (zp(), zp(), zp());
        let codes = [QDtype::QInt8, QDtype::QUInt8][ci % 2];
        let add = AddRequant::new(
            (sa, za),
            (sb, zb),
            (so, zo),
            (-128, 127),
            RequantMode::Float,
            codes,
        )
        .unwrap();
        let want = cpu().add_int8(&a, &b, &add).unwrap();
        let got = gpu.add_int8(&a, &b, &add).unwrap();
        assert_codes_eq(&format!("random add {ci}: {add:?}"), &got, &want);
    }
    // Other ranks.
    for shape in [vec![], vec![5], vec![3, 6], vec![2, 5, 3, 3]] {
        let x = ArrayD::from_shape_fn(IxDyn(&shape), |_| rng.code());
        let y = ArrayD::from_shape_fn(IxDyn(&shape), |_| rng.code());
        let add = AddRequant::new(
            (0.03, 7),
            (0.05, -3),
            (0.06, 1),
            (1, 127),
            RequantMode::Float,
            QDtype::QUInt8,
        )
        .unwrap();
        assert_codes_eq(
            &format!("add {shape:?}"),
            &gpu.add_int8(&x, &y, &add).unwrap(),
            &cpu().add_int8(&x, &y, &add).unwrap(),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Device-resident chain and the dot-path setting.

/// quantize → conv (ReLU) → max pool → residual add → linear → dequantize on the device,
/// against the same chain on the CPU reference.
fn device_resident_chain_matches_the_reference() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(10);
    let range = QuantRange::new(-128, 127).unwrap();
    let x = ArrayD::from_shape_fn(IxDyn(&[2, 3, 8, 8]), |_| (rng.unit() * 4.0 - 2.0) as f32);
    let qp_in = QParams::per_tensor(0.02, -3);
    let w = Array4::from_shape_fn((6, 3, 3, 3), |_| rng.range(-127, 127) as i8);
    let bias = Array1::from_shape_fn(6, |_| rng.range(-3000, 3000));
    let params = Conv2dParams {
        padding: [1, 1],
        ..Conv2dParams::default()
    };
    let real: Vec<f64> = (0..6)
        .map(|_| 0.02 * 0.01 * (1.0 + rng.unit()) / 0.05)
        .collect();
    let rq = Requant::new(&real, RequantMode::FixedPoint, -128, (-128, 127)).unwrap();
    let add = AddRequant::new(
        (0.05, -128),
        (0.05, -128),
        (0.08, -10),
        (-128, 127),
        RequantMode::FixedPoint,
        QDtype::QInt8,
    )
    .unwrap();
    let lw = Array2::from_shape_fn((10, 6 * 4 * 4), |_| rng.range(-127, 127) as i8);
    let lrq = Requant::new(&[0.001], RequantMode::Float, 0, (-128, 127)).unwrap();
    let qp_out = QParams::per_tensor(0.1, 0);

    // CPU.
    let q = ref8::quantize(&x, &qp_in, range).unwrap();
    let q4 = q.into_dimensionality::<ndarray::Ix4>().unwrap();
    let c = ref8::conv2d_int8(&q4, -3, &w, Some(&bias), &params, &rq).unwrap();
    let p = ref8::max_pool2d_int8(&c, 2, 2).unwrap();
    let s = ref8::add_int8(&p.clone().into_dyn(), &p.into_dyn(), &add).unwrap();
    let flat = s.into_shape_with_order((2, 96)).unwrap();
    let l = ref8::linear_int8(&flat, -10, &lw, None, &lrq).unwrap();
    let want = ref8::dequantize(&l.into_dyn(), &qp_out).unwrap();

    // GPU, nothing downloaded until the end.
    let gx = GpuTensor::upload_f32(&ctx, &x).unwrap();
    let gq = k8::quantize(&ctx, &gx, &GpuQParams::upload(&ctx, &qp_in).unwrap(), range)
        .unwrap()
        .codes;
    let conv = k8::GpuConv2dInt8::new(&ctx, -3, &w, Some(&bias), &params, &rq).unwrap();
    let gc = conv.forward(&ctx, &gq).unwrap();
    let gp = k8::max_pool2d_int8(&ctx, &gc, 2, 2).unwrap();
    let gs = k8::add_int8(&ctx, &gp, &gp, &add).unwrap();
    // [2, 6, 4, 4] flattened to [2, 96] is not the same packing: go through the host for the
    // flatten, as a real model would with a reshape kernel.
    let flat_codes = gs
        .download(&ctx)
        .unwrap()
        .into_shape_with_order(vec![2, 96])
        .unwrap();
    let gflat = GpuInt8Tensor::upload(&ctx, &flat_codes).unwrap();
    let lin = k8::GpuLinearInt8::new(&ctx, -10, &lw, None, &lrq).unwrap();
    let gl = lin.forward(&ctx, &gflat).unwrap();
    let got = k8::dequantize(&ctx, &gl, &GpuQParams::upload(&ctx, &qp_out).unwrap())
        .unwrap()
        .download_f32(&ctx)
        .unwrap();
    assert_eq!(got, want);
    // A [N, C, 1, 1] result is a [N, C] matrix without repacking.
    assert!(gc.reshape(&[2, 6, 64]).is_ok());
    assert!(gc.reshape(&[2, 384]).is_err());
}

fn int8_dot_setting() {
    let Some(ctx) = common::gpu() else { return };
    // Native wgpu always implements the packed_4x8_integer_dot_product language extension.
    assert!(ctx.packed_int8_dot_available());
    assert_eq!(ctx.int8_dot(), Int8Dot::Packed);
    // Only toggled briefly (other tests share the context; both paths agree anyway).
    ctx.set_int8_dot(Int8Dot::Portable).unwrap();
    assert_eq!(ctx.int8_dot(), Int8Dot::Portable);
    ctx.set_int8_dot(Int8Dot::Packed).unwrap();
    assert_eq!(ctx.int8_dot(), Int8Dot::Packed);
}

// ---------------------------------------------------------------------------------------------
// Errors: the reference's, before anything runs.

fn bad_inputs_give_the_reference_errors() {
    let Some(ctx) = common::gpu() else { return };
    let gpu = GpuBackend::new(ctx.clone());
    let cpu = cpu();
    let rq = |n: usize| Requant::new(&vec![0.01; n], RequantMode::FixedPoint, 0, (-128, 127));
    let x = Array4::<i8>::zeros((1, 4, 5, 5));
    let w = Array4::<i8>::zeros((6, 4, 3, 3));
    let p = Conv2dParams::default();
    let same = |what: &str, g: qfuse::Result<Array4<i8>>, c: qfuse::Result<Array4<i8>>| {
        let (g, c) = (g.unwrap_err(), c.unwrap_err());
        assert_eq!(g.to_string(), c.to_string(), "{what}");
        assert_eq!(
            std::mem::discriminant(&g),
            std::mem::discriminant(&c),
            "{what}"
        );
    };
    // Conv: groups, weight shape, bias, multiplier count, clamp, zero point, shift.
    let bad_groups = Conv2dParams { groups: 3, ..p };
    same(
        "groups",
        gpu.conv2d_int8(&x, 0, &w, None, &bad_groups, &rq(6).unwrap()),
        cpu.conv2d_int8(&x, 0, &w, None, &bad_groups, &rq(6).unwrap()),
    );
    let w_bad = Array4::<i8>::zeros((6, 3, 3, 3));
    same(
        "weight shape",
        gpu.conv2d_int8(&x, 0, &w_bad, None, &p, &rq(6).unwrap()),
        cpu.conv2d_int8(&x, 0, &w_bad, None, &p, &rq(6).unwrap()),
    );
    let b5 = Array1::<i32>::zeros(5);
    same(
        "bias",
        gpu.conv2d_int8(&x, 0, &w, Some(&b5), &p, &rq(6).unwrap()),
        cpu.conv2d_int8(&x, 0, &w, Some(&b5), &p, &rq(6).unwrap()),
    );
    same(
        "multiplier count",
        gpu.conv2d_int8(&x, 0, &w, None, &p, &rq(4).unwrap()),
        cpu.conv2d_int8(&x, 0, &w, None, &p, &rq(4).unwrap()),
    );
    let mut bad = rq(1).unwrap();
    bad.clamp_min = 100;
    bad.clamp_max = 50;
    same(
        "clamp",
        gpu.conv2d_int8(&x, 0, &w, None, &p, &bad),
        cpu.conv2d_int8(&x, 0, &w, None, &p, &bad),
    );
    let mut bad = rq(1).unwrap();
    bad.out_zero_point = 200;
    same(
        "out zero point",
        gpu.conv2d_int8(&x, 0, &w, None, &p, &bad),
        cpu.conv2d_int8(&x, 0, &w, None, &p, &bad),
    );
    let mut bad = rq(1).unwrap();
    bad.multipliers[0].shift = 31;
    same(
        "shift",
        gpu.conv2d_int8(&x, 0, &w, None, &p, &bad),
        cpu.conv2d_int8(&x, 0, &w, None, &p, &bad),
    );
    let big = Array4::<i8>::zeros((6, 4, 9, 9));
    same(
        "kernel larger than the input",
        gpu.conv2d_int8(&x, 0, &big, None, &p, &rq(6).unwrap()),
        cpu.conv2d_int8(&x, 0, &big, None, &p, &rq(6).unwrap()),
    );
    // Linear.
    let lx = Array2::<i8>::zeros((2, 5));
    let lw = Array2::<i8>::zeros((3, 4));
    let g = gpu
        .linear_int8(&lx, 0, &lw, None, &rq(3).unwrap())
        .unwrap_err();
    let c = cpu
        .linear_int8(&lx, 0, &lw, None, &rq(3).unwrap())
        .unwrap_err();
    assert_eq!(g.to_string(), c.to_string());
    let lw = Array2::<i8>::zeros((3, 5));
    let b2 = Array1::<i32>::zeros(2);
    let g = gpu
        .linear_int8(&lx, 0, &lw, Some(&b2), &rq(3).unwrap())
        .unwrap_err();
    let c = cpu
        .linear_int8(&lx, 0, &lw, Some(&b2), &rq(3).unwrap())
        .unwrap_err();
    assert_eq!(g.to_string(), c.to_string());
    // Pooling.
    same(
        "pool kernel 0",
        gpu.max_pool2d_int8(&x, 0, 1),
        cpu.max_pool2d_int8(&x, 0, 1),
    );
    same(
        "pool kernel too large",
        gpu.max_pool2d_int8(&x, 6, 1),
        cpu.max_pool2d_int8(&x, 6, 1),
    );
    // Add.
    let add = AddRequant::new(
        (0.1, 0),
        (0.1, 0),
        (0.1, 0),
        (-128, 127),
        RequantMode::Float,
        QDtype::QInt8,
    )
    .unwrap();
    let a = ArrayD::<i8>::zeros(IxDyn(&[2, 3]));
    let b = ArrayD::<i8>::zeros(IxDyn(&[3, 2]));
    assert_eq!(
        gpu.add_int8(&a, &b, &add).unwrap_err().to_string(),
        cpu.add_int8(&a, &b, &add).unwrap_err().to_string()
    );
    let mut bad_add = add;
    bad_add.a_zero_point = 300;
    assert_eq!(
        gpu.add_int8(&a, &a, &bad_add).unwrap_err().to_string(),
        cpu.add_int8(&a, &a, &bad_add).unwrap_err().to_string()
    );
    let mut bad_add = add;
    bad_add.b_ratio = 1e9;
    let e = gpu.add_int8(&a, &a, &bad_add).unwrap_err().to_string();
    assert!(e.contains("b scale ratio"), "{e}");
    assert_eq!(e, cpu.add_int8(&a, &a, &bad_add).unwrap_err().to_string());
    // Quantize / dequantize.
    let xf = ArrayD::<f32>::zeros(IxDyn(&[2, 3]));
    let u8r = QuantRange::new(0, 255).unwrap();
    assert_eq!(
        gpu.quantize(&xf, &QParams::per_tensor(0.1, 0), u8r)
            .unwrap_err()
            .to_string(),
        cpu.quantize(&xf, &QParams::per_tensor(0.1, 0), u8r)
            .unwrap_err()
            .to_string()
    );
    let r = QuantRange::new(-128, 127).unwrap();
    let qp2 = QParams::per_channel(vec![0.1, 0.2], vec![0, 0], 1).unwrap();
    assert_eq!(
        gpu.quantize(&xf, &qp2, r).unwrap_err().to_string(),
        cpu.quantize(&xf, &qp2, r).unwrap_err().to_string()
    );
    assert_eq!(
        gpu.dequantize(&a, &qp2).unwrap_err().to_string(),
        cpu.dequantize(&a, &qp2).unwrap_err().to_string()
    );
    // Device-resident: wrong ranks and dtypes are typed errors, not panics.
    let g3 = GpuInt8Tensor::upload(&ctx, &ArrayD::<i8>::zeros(IxDyn(&[2, 3, 4]))).unwrap();
    assert!(k8::max_pool2d_int8(&ctx, &g3, 2, 2).is_err());
    assert!(k8::linear_int8(&ctx, &g3, 0, &Array2::zeros((2, 3)), None, &rq(2).unwrap()).is_err());
    let words = GpuTensor::zeros(&ctx, &[5], qfuse::gpu::DType::F32).unwrap();
    assert!(GpuInt8Tensor::from_words(words, &[5]).is_err());
    let words = GpuTensor::zeros(&ctx, &[3], qfuse::gpu::DType::U32).unwrap();
    assert!(GpuInt8Tensor::from_words(words.clone(), &[2, 5]).is_err());
    assert!(GpuInt8Tensor::from_words(words, &[3, 4]).is_ok());
}

/// Rough timings on the current adapter, best of 5 runs per shape and dot path (ignored by
/// default: `cargo test --release --test integration -- --ignored gpu_int8::int8_conv_timing`).
fn int8_conv_timing() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(11);
    // (batch, C, O, size, kernel, padding): a ResNet-18 layer and Mnist's conv2.
    for (n, c, o, s, k, pad) in [(1, 64, 64, 56, 3, 1), (64, 20, 50, 12, 5, 0)] {
        let x = Array4::from_shape_fn((n, c, s, s), |_| rng.code());
        let w = Array4::from_shape_fn((o, c, k, k), |_| rng.code());
        let params = Conv2dParams {
            padding: [pad, pad],
            ..Conv2dParams::default()
        };
        let rq = Requant::new(&[1e-4], RequantMode::FixedPoint, 0, (-128, 127)).unwrap();
        let want = ref8::conv2d_int8(&x, 3, &w, None, &params, &rq).unwrap();
        let gx = GpuInt8Tensor::upload(&ctx, &x.into_dyn()).unwrap();
        let conv = k8::GpuConv2dInt8::new(&ctx, 3, &w, None, &params, &rq).unwrap();
        for dot in dots(&ctx) {
            conv.forward_with(&ctx, &gx, dot).unwrap();
            ctx.wait().unwrap();
            let mut best = f64::INFINITY;
            for _ in 0..5 {
                let t = std::time::Instant::now();
                conv.forward_with(&ctx, &gx, dot).unwrap();
                ctx.wait().unwrap();
                best = best.min(t.elapsed().as_secs_f64());
            }
            let macs = (n * o * (s + 2 * pad + 1 - k).pow(2) * c * k * k) as f64;
            println!(
                "gpu {n}x{c}x{s}x{s} w{o}x{c}x{k}x{k} {dot:?}: {:.2} ms, {:.2} GOP/s",
                best * 1e3,
                2.0 * macs / best * 1e-9
            );
            let y = conv.forward_with(&ctx, &gx, dot).unwrap();
            assert_codes_eq(
                "timing",
                &y.download(&ctx).unwrap(),
                &want.clone().into_dyn(),
            );
        }
    }
}

crate::qfuse_tests! {
    wgsl_fixed_point_matches_rust_on_edge_values: gpu,
    wgsl_float_requant_matches_rust: gpu,
    quantize_and_dequantize_match_the_reference: gpu,
    quantize_reports_the_first_nan: gpu,
    conv2d_int8_matches_the_reference_on_both_dot_paths: gpu,
    conv2d_int8_f32_c8_subgroup_variants_match_the_reference: gpu,
    conv2d_int8_f32_c16_subgroup_variants_match_the_reference: gpu,
    conv2d_int8_f32_c8_portable_variants_match_the_reference: gpu,
    conv2d_int8_f32_c16_portable_variants_match_the_reference: gpu,
    conv_epilogue_matches_requant_apply_on_edge_accumulators: gpu,
    linear_int8_matches_the_reference_on_both_dot_paths: gpu,
    backend_int8_ops_match_cpu: gpu,
    max_pool2d_int8_matches_the_reference: gpu,
    add_int8_matches_the_reference_on_every_code_pair: gpu,
    device_resident_chain_matches_the_reference: gpu,
    int8_dot_setting: packed_int8_dot,
    bad_inputs_give_the_reference_errors: gpu,
    int8_conv_timing: gpu + manual,
}
