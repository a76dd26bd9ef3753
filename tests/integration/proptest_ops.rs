//! Property tests (proptest): shapes and settings drawn for every op family, the GPU checked
//! against the CPU reference — bit-exact where the op is (folds, fake quantization, observers,
//! activations, max pooling, quantize/dequantize), within a tolerance otherwise (convs,
//! BatchNorm, linear, log_softmax, the fused conv+bn forwards) — and every invalid draw
//! (zero strides, mismatched channels, kernels larger than the input, bad scales and zero
//! points, axes out of range, ranges without 0) refused by both with the same message.
//!
//! Draws are deterministic (a fixed ChaCha seed) and few (`Config::cases`), shapes small, so
//! that the whole file runs in seconds on lavapipe.

use ndarray::{Array1, Array2, Array4, ArrayD, IxDyn};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use qfuse::backend::{Backend, CpuBackend, Device, GpuBackend, HostOps, Int8Ops};
use qfuse::ops::{Activation, BatchNorm, Conv2d, Conv2dParams, ConvTranspose2dParams, QatConfig};
use qfuse::quant::{ObserverSpec, QDtype, QParams, QScheme, QuantRange, Requant, RequantMode};

/// Cases per property: few, small shapes (lavapipe is slow).
const CASES: u32 = 32;

fn runner() -> TestRunner {
    TestRunner::new_with_rng(
        Config {
            cases: CASES,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    )
}

fn gpu() -> GpuBackend {
    GpuBackend::new(crate::common::gpu().expect("the harness runs this with an adapter"))
}

/// Deterministic values in [-1, 1) from a drawn seed (cheaper to draw than every element).
fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect()
}

fn arr4(shape: [usize; 4], seed: u32) -> Array4<f32> {
    Array4::from_shape_vec(shape, values(shape.iter().product(), seed)).unwrap()
}

fn arrd(shape: &[usize], seed: u32) -> ArrayD<f32> {
    ArrayD::from_shape_vec(IxDyn(shape), values(shape.iter().product(), seed)).unwrap()
}

fn bn(c: usize, seed: u32, eps: f32) -> BatchNorm {
    let v = values(4 * c, seed);
    BatchNorm {
        weight: Some(Array1::from(v[..c].to_vec())),
        bias: Some(Array1::from(v[c..2 * c].to_vec())),
        running_mean: Array1::from(v[2 * c..3 * c].to_vec()),
        running_var: Array1::from(v[3 * c..].iter().map(|x| 0.1 + x.abs()).collect::<Vec<_>>()),
        eps,
        momentum: 0.1,
    }
}

/// Both backends agree: both accept and `check` the pair, or both refuse with one message.
fn agree<T>(
    what: &str,
    cpu: qfuse::Result<T>,
    gpu: qfuse::Result<T>,
    check: impl FnOnce(&T, &T) -> Result<(), String>,
) -> Result<(), TestCaseError> {
    match (cpu, gpu) {
        (Ok(c), Ok(g)) => check(&c, &g).map_err(|e| TestCaseError::fail(format!("{what}: {e}"))),
        (Err(c), Err(g)) if c.to_string() == g.to_string() => Ok(()),
        (c, g) => Err(TestCaseError::fail(format!(
            "{what}: cpu {:?} vs gpu {:?}",
            c.err().map(|e| e.to_string()),
            g.err().map(|e| e.to_string())
        ))),
    }
}

fn exact<'a, I: IntoIterator<Item = &'a f32>>(a: I, b: I) -> Result<(), String> {
    for (i, (x, y)) in a.into_iter().zip(b).enumerate() {
        if x.to_bits() != y.to_bits() && !(x.is_nan() && y.is_nan()) {
            return Err(format!("element {i}: {x} vs {y}"));
        }
    }
    Ok(())
}

fn close<'a, I: IntoIterator<Item = &'a f32>>(a: I, b: I, tol: f32) -> Result<(), String> {
    for (i, (x, y)) in a.into_iter().zip(b).enumerate() {
        let both_nan = x.is_nan() && y.is_nan();
        if !(both_nan || x == y || (x - y).abs() <= tol * (1.0 + y.abs())) {
            return Err(format!("element {i}: {x} vs {y} (tolerance {tol})"));
        }
    }
    Ok(())
}

fn same_shape(a: &[usize], b: &[usize]) -> Result<(), String> {
    if a == b {
        Ok(())
    } else {
        Err(format!("shape {a:?} vs {b:?}"))
    }
}

/// A conv draw: input, weight and settings. Most draws are valid (the kernel fits the padded
/// input, output padding below stride or dilation); `fault` picks one invalid setting for
/// about a third of them: stride 0, dilation 0, input channels that do not match the groups,
/// a kernel larger than the padded input, groups 0, an output padding too large for the
/// transposed conv.
#[derive(Debug, Clone)]
struct ConvDraw {
    x: [usize; 4],
    w: [usize; 4],
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    output_padding: [usize; 2],
    groups: usize,
    seed: u32,
}

fn conv_draw() -> impl Strategy<Value = ConvDraw> {
    (
        (1usize..=2, 1usize..=2, 1usize..=3, 1usize..=3),
        (1usize..=6, 1usize..=6, 1usize..=3, 1usize..=3),
        (1usize..=3, 1usize..=3, 0usize..=2, 0usize..=2),
        (1usize..=2, 1usize..=2, 0usize..=2, 0usize..=2),
        (0u8..18, any::<u32>()),
    )
        .prop_map(
            |(
                (n, g, cg, og),
                (h, w, kh, kw),
                (sh, sw, ph, pw),
                (dh, dw, oph, opw),
                (fault, seed),
            )| {
                // Valid unless a fault below: the dilated kernel fits the input.
                let mut d = ConvDraw {
                    x: [
                        n,
                        cg * g,
                        h.max(dh * (kh - 1) + 1),
                        w.max(dw * (kw - 1) + 1),
                    ],
                    w: [og * g, cg, kh, kw],
                    stride: [sh, sw],
                    padding: [ph, pw],
                    dilation: [dh, dw],
                    output_padding: [oph.min(sh.max(dh) - 1), opw.min(sw.max(dw) - 1)],
                    groups: g,
                    seed,
                };
                match fault {
                    0 => d.stride[0] = 0,
                    1 => d.dilation[1] = 0,
                    2 => d.x[1] += 1,
                    3 => {
                        d.x[2] = 1;
                        d.padding[0] = 0;
                        d.w[2] = 3;
                    }
                    4 => d.groups = 0,
                    5 => d.output_padding[1] = sw.max(dw),
                    _ => {}
                }
                d
            },
        )
}

impl ConvDraw {
    fn params(&self) -> Conv2dParams {
        Conv2dParams {
            stride: self.stride,
            padding: self.padding,
            dilation: self.dilation,
            groups: self.groups,
            ..Conv2dParams::default()
        }
    }
}

/// Codes in [-128, 127] from a drawn seed.
fn codes(n: usize, seed: u32) -> Vec<i8> {
    values(n, seed)
        .into_iter()
        .map(|v| (v * 127.5).floor().clamp(-128.0, 127.0) as i8)
        .collect()
}

/// A requantization with one multiplier per output channel (`channels`), in either mode.
fn requant(channels: usize, seed: u32) -> Requant {
    let real: Vec<f64> = values(channels, seed)
        .iter()
        .map(|v| 0.002 + 0.004 * f64::from(v.abs()))
        .collect();
    let mode = if seed & 1 == 0 {
        RequantMode::Float
    } else {
        RequantMode::FixedPoint
    };
    let zp = (seed % 41) as i32 - 20;
    Requant::new(&real, mode, zp, (-128, 127)).unwrap()
}

/// The integer conv on a backend: prepare, upload the codes, run, download.
fn conv2d_int8<B: Backend>(
    b: &B,
    x: &ArrayD<i8>,
    x_zp: i32,
    w: &Array4<i8>,
    bias: &Array1<i32>,
    p: &Conv2dParams,
    rq: &Requant,
) -> qfuse::Result<ArrayD<i8>> {
    let layer = Int8Ops::prepare_conv2d_int8(b, x_zp, w, Some(bias), p, rq)?;
    let q = Device::upload_codes(b, x)?;
    Device::download_codes(b, &Int8Ops::conv2d_int8(b, &layer, &q)?)
}

/// The integer linear layer on a backend: prepare, upload the codes, run, download.
fn linear_int8<B: Backend>(
    b: &B,
    x: &ArrayD<i8>,
    x_zp: i32,
    w: &Array2<i8>,
    bias: &Array1<i32>,
    rq: &Requant,
) -> qfuse::Result<ArrayD<i8>> {
    let layer = Int8Ops::prepare_linear_int8(b, x_zp, w, Some(bias), rq)?;
    let q = Device::upload_codes(b, x)?;
    Device::download_codes(b, &Int8Ops::linear_int8(b, &layer, &q)?)
}

fn equal<T: PartialEq + std::fmt::Debug>(a: &T, b: &T) -> Result<(), String> {
    if a == b {
        Ok(())
    } else {
        Err(format!("{a:?} vs {b:?}"))
    }
}

fn conv_ops_match() {
    let (cpu, gpu) = (CpuBackend, gpu());
    runner()
        .run(&conv_draw(), |d| {
            let x = arr4(d.x, d.seed);
            let w = arr4(d.w, d.seed ^ 1);
            let b = Array1::from(values(d.w[0], d.seed ^ 2));
            let p = d.params();
            agree(
                "conv2d",
                HostOps::conv2d(&cpu, &x, &w, Some(&b), &p),
                HostOps::conv2d(&gpu, &x, &w, Some(&b), &p),
                |c, g| {
                    same_shape(c.shape(), g.shape())?;
                    close(c, g, 1e-4)
                },
            )?;
            if let Ok(y) = HostOps::conv2d(&cpu, &x, &w, None, &p) {
                let dy = arr4(y.dim().into(), d.seed ^ 3);
                agree(
                    "conv2d_backward",
                    HostOps::conv2d_backward(&cpu, &x, &w, &dy, &p),
                    HostOps::conv2d_backward(&gpu, &x, &w, &dy, &p),
                    |c, g| {
                        close(&c.dx, &g.dx, 1e-4)?;
                        close(&c.dweight, &g.dweight, 1e-4)?;
                        close(&c.dbias, &g.dbias, 1e-4)
                    },
                )?;
            }
            // The integer conv of the same geometry: codes, a zero point, per-channel
            // requantization (bit-exact in both requantization modes).
            let xq =
                ArrayD::from_shape_vec(IxDyn(&d.x), codes(d.x.iter().product(), d.seed)).unwrap();
            let wq = Array4::from_shape_vec(d.w, codes(d.w.iter().product(), d.seed ^ 6)).unwrap();
            let bq = Array1::from_iter((0..d.w[0]).map(|o| (o as i32 - 1) * 37));
            let x_zp = (d.seed % 21) as i32 - 10;
            let rq = requant(d.w[0], d.seed ^ 7);
            agree(
                "conv2d_int8",
                conv2d_int8(&cpu, &xq, x_zp, &wq, &bq, &p, &rq),
                conv2d_int8(&gpu, &xq, x_zp, &wq, &bq, &p, &rq),
                equal,
            )?;
            // The transposed conv of the same draw: weight [Cin, Cout/g, KH, KW].
            let wt = arr4(
                [d.x[1], d.w[0] / d.groups.max(1), d.w[2], d.w[3]],
                d.seed ^ 4,
            );
            let pt = ConvTranspose2dParams {
                stride: d.stride,
                padding: d.padding,
                output_padding: d.output_padding,
                dilation: d.dilation,
                groups: d.groups,
            };
            agree(
                "conv_transpose2d",
                HostOps::conv_transpose2d(&cpu, &x, &wt, None, &pt),
                HostOps::conv_transpose2d(&gpu, &x, &wt, None, &pt),
                |c, g| {
                    same_shape(c.shape(), g.shape())?;
                    close(c, g, 1e-4)
                },
            )?;
            // conv + BatchNorm (+ activation): eval forward and QAT forward.
            let o = d.w[0];
            let conv = Conv2d {
                weight: w.clone(),
                bias: Some(b.clone()),
                params: p,
            };
            let norm = bn(o, d.seed ^ 5, 1e-5);
            agree(
                "conv_bn_act_eval",
                HostOps::conv_bn_act_eval(&cpu, &x, &conv, &norm, Activation::Relu6),
                HostOps::conv_bn_act_eval(&gpu, &x, &conv, &norm, Activation::Relu6),
                |c, g| {
                    close(&c.0, &g.0, 1e-4)?;
                    exact(&c.1.weight, &g.1.weight)
                },
            )?;
            let cfg = QatConfig {
                activation: Activation::Relu,
                freeze_bn: d.seed & 1 == 0,
                weight_observer: ObserverSpec::new(
                    QDtype::QInt8,
                    QScheme::PerChannelSymmetric,
                    QuantRange::INT8,
                    0,
                )
                .unwrap(),
            };
            agree(
                "conv_bn_qat_forward",
                HostOps::conv_bn_qat_forward(&cpu, &x, &conv, &norm, &cfg),
                HostOps::conv_bn_qat_forward(&gpu, &x, &conv, &norm, &cfg),
                |c, g| {
                    same_shape(c.y.shape(), g.y.shape())?;
                    close(&c.weight_qparams.scale, &g.weight_qparams.scale, 1e-6)?;
                    // A weight on a rounding tie may land one step apart (see the reference):
                    // compare with a tolerance of a few steps of the largest scale.
                    let step = c.weight_qparams.scale.iter().fold(0.0f32, |a, &s| a.max(s));
                    close(&c.y, &g.y, 1e-3 + 64.0 * step)
                },
            )?;
            Ok(())
        })
        .unwrap();
}

fn pool_linear_softmax_match() {
    let (cpu, gpu) = (CpuBackend, gpu());
    // `fault`: 0 kernel 0, 1 stride 0, 2 kernel larger than the input, 3 a linear weight
    // whose in_features differ, 4 no features; else valid.
    let draw = (
        (1usize..=2, 1usize..=3, 1usize..=6, 1usize..=6),
        (1usize..=3, 1usize..=3),
        (1usize..=5, 1usize..=6, 1usize..=4),
        (0u8..14, any::<u32>()),
    );
    runner()
        .run(
            &draw,
            |((n, c, h, w), (k, s), (rows, cols, out), (fault, seed))| {
                let (h, w) = (h.max(k), w.max(k));
                let (k, s) = match fault {
                    0 => (0, s),
                    1 => (k, 0),
                    2 => (h.max(w) + 1, s),
                    _ => (k, s),
                };
                let x = arr4([n, c, h, w], seed);
                agree(
                    "max_pool2d",
                    HostOps::max_pool2d(&cpu, &x, k, s),
                    HostOps::max_pool2d(&gpu, &x, k, s),
                    |a, b| {
                        same_shape(a.shape(), b.shape())?;
                        exact(a, b)
                    },
                )?;
                let cols = if fault == 4 { 0 } else { cols };
                let wcols = if fault == 3 { cols + 1 } else { cols };
                let xl = Array2::from_shape_vec((rows, cols), values(rows * cols, seed)).unwrap();
                let wl =
                    Array2::from_shape_vec((out, wcols), values(out * wcols, seed ^ 1)).unwrap();
                let bl = Array1::from(values(out, seed ^ 2));
                agree(
                    "linear",
                    HostOps::linear(&cpu, &xl, &wl, Some(&bl)),
                    HostOps::linear(&gpu, &xl, &wl, Some(&bl)),
                    |a, b| close(a, b, 1e-5),
                )?;
                agree(
                    "log_softmax",
                    HostOps::log_softmax(&cpu, &xl),
                    HostOps::log_softmax(&gpu, &xl),
                    |a, b| close(a, b, 1e-5),
                )?;
                // The integer linear layer (bit-exact in both requantization modes).
                let xq =
                    ArrayD::from_shape_vec(IxDyn(&[rows, cols]), codes(rows * cols, seed)).unwrap();
                let wq =
                    Array2::from_shape_vec((out, wcols), codes(out * wcols, seed ^ 3)).unwrap();
                let bq = Array1::from_iter((0..out).map(|o| 50 - 29 * o as i32));
                let x_zp = (seed % 11) as i32 - 5;
                let rq = requant(out, seed ^ 4);
                agree(
                    "linear_int8",
                    linear_int8(&cpu, &xq, x_zp, &wq, &bq, &rq),
                    linear_int8(&gpu, &xq, x_zp, &wq, &bq, &rq),
                    equal,
                )?;
                Ok(())
            },
        )
        .unwrap();
}

fn folds_and_batch_norm_match() {
    let (cpu, gpu) = (CpuBackend, gpu());
    // `fault`: 0 a BatchNorm with one channel more than the weight, 1..=4 an eps that is 0,
    // negative, NaN or infinite; else valid.
    let draw = (
        prop::collection::vec(1usize..=4, 2..=4),
        (0u8..12, prop::bool::ANY),
        (prop::sample::select(vec![1e-5f32, 1e-3, 0.1]), any::<u32>()),
    );
    runner()
        .run(&draw, |(shape, (fault, training), (eps, seed))| {
            let eps = match fault {
                1 => 0.0,
                2 => -1.0,
                3 => f32::NAN,
                4 => f32::INFINITY,
                _ => eps,
            };
            let o = shape[0] + usize::from(fault == 0);
            let norm = bn(o, seed, eps);
            let weight = arrd(&shape, seed ^ 1);
            let bias = Array1::from(values(shape[0], seed ^ 2));
            if shape.len() >= 3 {
                agree(
                    "fold_conv_bn",
                    HostOps::fold_conv_bn(&cpu, &weight, Some(&bias), &norm, false),
                    HostOps::fold_conv_bn(&gpu, &weight, Some(&bias), &norm, false),
                    |a, b| {
                        exact(&a.weight, &b.weight)?;
                        exact(&a.bias, &b.bias)
                    },
                )?;
                let x = arr4([2, o, shape[1], shape[2]], seed ^ 3);
                agree(
                    "batch_norm2d",
                    HostOps::batch_norm2d(&cpu, &x, &norm, training),
                    HostOps::batch_norm2d(&gpu, &x, &norm, training),
                    |a, b| {
                        close(&a.y, &b.y, 1e-4)?;
                        close(&a.running_var, &b.running_var, 1e-5)
                    },
                )?;
            } else {
                let w2 =
                    Array2::from_shape_vec((shape[0], shape[1]), values(shape[0] * shape[1], seed))
                        .unwrap();
                agree(
                    "fold_linear_bn",
                    HostOps::fold_linear_bn(&cpu, &w2, Some(&bias), &norm),
                    HostOps::fold_linear_bn(&gpu, &w2, Some(&bias), &norm),
                    |a, b| {
                        exact(&a.weight, &b.weight)?;
                        exact(&a.bias, &b.bias)
                    },
                )?;
            }
            Ok(())
        })
        .unwrap();
}

fn quantization_ops_match() {
    let (cpu, gpu) = (CpuBackend, gpu());
    let ranges = vec![(-128, 127), (0, 255), (-8, 7), (0, 15), (-3, 100)];
    // `fault`: 0 scale 0, 1 scale -1, 2 scale NaN, 3 a zero point above the range, 4 a range
    // without 0, 5 an empty range, 6 an inverted range, 7 an axis past the rank; else valid.
    let draw = (
        prop::collection::vec(1usize..=5, 1..=4),
        prop::sample::select(ranges),
        (
            prop::sample::select(vec![0.05f32, 0.25, 1.0, 0.01]),
            any::<u16>(),
        ),
        (0usize..4, any::<u32>(), 0usize..4, 0u8..20),
    );
    runner()
        .run(
            &draw,
            |(shape, (lo, hi), (scale, zp), (axis, seed, which, fault))| {
                let x = arrd(&shape, seed).mapv(|v| v * 4.0);
                let span = (hi - lo + 1) as u16;
                let mut zp = lo + i32::from(zp % span);
                let (lo, hi) = match fault {
                    4 => (10, 20),
                    5 => (5, 5),
                    6 => (7, 3),
                    _ => (lo, hi),
                };
                let scale = match fault {
                    0 => 0.0,
                    1 => -1.0,
                    2 => f32::NAN,
                    _ => scale,
                };
                if fault == 3 {
                    zp = hi + 1;
                }
                let axis = if fault == 7 {
                    shape.len()
                } else {
                    axis % shape.len()
                };
                let range = QuantRange {
                    quant_min: lo,
                    quant_max: hi,
                };
                let per_channel = which % 2 == 1;
                let qp = if per_channel {
                    let c = shape.get(axis).copied().unwrap_or(2);
                    let scales: Vec<f32> = (0..c).map(|i| scale * (1.0 + i as f32 / 4.0)).collect();
                    let zps: Vec<i32> = (0..c)
                        .map(|i| (zp + i as i32 % 3).min(hi.max(zp)))
                        .collect();
                    QParams::per_channel(scales, zps, axis).unwrap()
                } else {
                    QParams::per_tensor(scale, zp)
                };
                agree(
                    "fake_quant",
                    cpu.fake_quant(&x, &qp, range),
                    gpu.fake_quant(&x, &qp, range),
                    |a, b| exact(a, b),
                )?;
                let dy = arrd(&shape, seed ^ 1);
                agree(
                    "fake_quant_backward",
                    cpu.fake_quant_backward(&x, &dy, &qp, range),
                    gpu.fake_quant_backward(&x, &dy, &qp, range),
                    |a, b| exact(a, b),
                )?;
                if (lo, hi) == (-128, 127) {
                    agree(
                        "quantize",
                        HostOps::quantize(&cpu, &x, &qp, range),
                        HostOps::quantize(&gpu, &x, &qp, range),
                        equal,
                    )?;
                    if let Ok(q) = HostOps::quantize(&cpu, &x, &qp, range) {
                        agree(
                            "dequantize",
                            HostOps::dequantize(&cpu, &q, &qp),
                            HostOps::dequantize(&gpu, &q, &qp),
                            |a, b| exact(a, b),
                        )?;
                    }
                }
                // Observers: every scheme, with the range drawn (customized when not a default).
                let scheme = [
                    QScheme::PerTensorAffine,
                    QScheme::PerChannelAffine,
                    QScheme::PerTensorSymmetric,
                    QScheme::PerChannelSymmetric,
                ][which];
                let dtype = if lo < 0 {
                    QDtype::QInt8
                } else {
                    QDtype::QUInt8
                };
                let spec = ObserverSpec {
                    dtype,
                    qscheme: scheme,
                    range,
                    axis: axis as isize,
                    eps: f32::EPSILON,
                    customized_range: range != dtype.default_range(),
                };
                agree(
                    "calc_qparams",
                    cpu.calc_qparams(&x, &spec),
                    gpu.calc_qparams(&x, &spec),
                    |a, b| {
                        exact(&a.scale, &b.scale)?;
                        if a.zero_point == b.zero_point && a.axis == b.axis {
                            Ok(())
                        } else {
                            Err(format!("{a:?} vs {b:?}"))
                        }
                    },
                )?;
                Ok(())
            },
        )
        .unwrap();
}

fn activations_match() {
    let (cpu, gpu) = (CpuBackend, gpu());
    let acts = vec![
        Activation::None,
        Activation::Relu,
        Activation::Relu6,
        Activation::Hardswish,
        Activation::LeakyRelu {
            negative_slope: 0.01,
        },
        Activation::LeakyRelu {
            negative_slope: -3.5,
        },
    ];
    let draw = (
        prop::collection::vec(1usize..=6, 1..=4),
        prop::sample::select(acts),
        any::<u32>(),
    );
    runner()
        .run(&draw, |(shape, act, seed)| {
            let x = arrd(&shape, seed).mapv(|v| v * 8.0);
            let dy = arrd(&shape, seed ^ 1);
            agree(
                "activation",
                cpu.activation(&x, act),
                gpu.activation(&x, act),
                |a, b| exact(a, b),
            )?;
            agree(
                "activation_backward",
                cpu.activation_backward(&x, &dy, act),
                gpu.activation_backward(&x, &dy, act),
                |a, b| exact(a, b),
            )?;
            Ok(())
        })
        .unwrap();
}

crate::qfuse_tests! {
    conv_ops_match: gpu,
    pool_linear_softmax_match: gpu,
    folds_and_batch_norm_match: gpu,
    quantization_ops_match: gpu,
    activations_match: gpu,
}
