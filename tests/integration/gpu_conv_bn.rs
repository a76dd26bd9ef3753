//! GPU kernels for BatchNorm2d, the fused conv+BN+activation eval forward and the ConvBn2d /
//! ConvBnReLU2d QAT step, against the CPU reference: BatchNorm forward / backward (train and
//! eval, with and without affine), fused vs unfused vs CPU eval forward, QAT forward /
//! backward (per-tensor and per-channel symmetric, with and without conv bias, frozen or not;
//! scale factor, fake-quantized weight, mask and qparams bit-exact), the correctly rounded
//! square root behind the scale factor, and errors.
//!
//! Run on a machine without a GPU with `WGPU_BACKEND=vulkan QFUSE_REQUIRE_GPU=1` (lavapipe).

use crate::common;

use std::sync::Arc;

use ndarray::{Array1, Array4, ArrayD, Dimension};
use qfuse::gpu::{GpuContext, GpuTensor};
use qfuse::kernels::batch_norm::{download4, download_rows};
use qfuse::kernels::conv_bn::{self, GpuConv2d};
use qfuse::kernels::GpuBatchNorm;
use qfuse::ops::{Activation, BatchNorm, Conv2d, Conv2dParams, QatConfig, QatForward};
use qfuse::quant::{ObserverSpec, QDtype, QScheme, QuantRange};
use qfuse::{CpuBackend, Error, GpuBackend, HostOps};

/// SplitMix64: a small deterministic generator.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [lo, hi).
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
    }
    fn array4(&mut self, shape: [usize; 4], lo: f32, hi: f32) -> Array4<f32> {
        Array4::from_shape_simple_fn(shape, || self.uniform(lo, hi))
    }
    fn array1(&mut self, n: usize, lo: f32, hi: f32) -> Array1<f32> {
        Array1::from_shape_simple_fn(n, || self.uniform(lo, hi))
    }
}

fn backend(ctx: &Arc<GpuContext>) -> GpuBackend {
    GpuBackend::new(Arc::clone(ctx))
}

/// `|got − want| <= tol·(1 + |want|)` element-wise (NaN only against NaN).
fn assert_close<D: Dimension>(
    what: &str,
    got: &ndarray::Array<f32, D>,
    want: &ndarray::Array<f32, D>,
    tol: f32,
) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let mut worst = 0.0f32;
    for (i, (&g, &w)) in got.iter().zip(want.iter()).enumerate() {
        let ok = (g.is_nan() && w.is_nan()) || (g - w).abs() <= tol * (1.0 + w.abs());
        assert!(ok, "{what}[{i}]: got {g:e}, want {w:e} (tol {tol:e})");
        worst = worst.max((g - w).abs());
    }
    let _ = worst;
}

fn assert_bits_eq<D: Dimension>(
    what: &str,
    got: &ndarray::Array<f32, D>,
    want: &ndarray::Array<f32, D>,
) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    for (i, (&g, &w)) in got.iter().zip(want.iter()).enumerate() {
        assert!(
            g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
            "{what}[{i}]: got {g:e} ({:#010x}), want {w:e} ({:#010x})",
            g.to_bits(),
            w.to_bits()
        );
    }
}

fn random_bn(rng: &mut Rng, c: usize, affine: bool) -> BatchNorm {
    BatchNorm {
        weight: affine.then(|| rng.array1(c, 0.5, 1.5)),
        bias: affine.then(|| rng.array1(c, -0.5, 0.5)),
        running_mean: rng.array1(c, -0.3, 0.3),
        running_var: rng.array1(c, 0.5, 1.5),
        eps: 1e-5,
        momentum: 0.1,
    }
}

fn upload4(ctx: &GpuContext, a: &Array4<f32>) -> GpuTensor {
    GpuTensor::upload_f32(ctx, &a.clone().into_dyn()).unwrap()
}

fn upload1(ctx: &GpuContext, a: &Array1<f32>) -> GpuTensor {
    GpuTensor::upload_f32(ctx, &a.clone().into_dyn()).unwrap()
}

/// `sqrt_rn` in `conv_bn.wgsl` is bit-exact with Rust's (IEEE) `f32::sqrt`: random bit
/// patterns over every exponent (subnormals included), values near 1 + eps, and the specials.
fn sqrt_rn_is_correctly_rounded() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(7);
    let mut v: Vec<f32> = (0..20_000)
        .map(|_| f32::from_bits((rng.next_u64() as u32) & 0x7fff_ffff))
        .filter(|x| x.is_finite())
        .collect();
    v.extend((0..4000).map(|_| rng.uniform(0.0, 4.0) + 1e-5));
    v.extend((0..4000).map(|i| f32::from_bits(0x3f80_0000 + i - 2000)));
    v.extend((0..500).map(f32::from_bits));
    v.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -1.0,
        -1e-40,
        f32::MAX,
        f32::MIN_POSITIVE,
        1e-45,
        2.0,
        4.0,
        0.25,
    ]);
    let n = v.len();
    let a = GpuTensor::from_slice_f32(&ctx, &v, &[n]).unwrap();
    let got = conv_bn::sqrt_rn(&ctx, &a)
        .unwrap()
        .download_f32(&ctx)
        .unwrap();
    let want = ArrayD::from_shape_vec(vec![n], v.iter().map(|x| x.sqrt()).collect()).unwrap();
    assert_bits_eq("sqrt_rn", &got, &want);
}

fn check_batch_norm(
    ctx: &Arc<GpuContext>,
    shape: [usize; 4],
    affine: bool,
    seed: u64,
    offset: f32,
) {
    let gpu = backend(ctx);
    let mut rng = Rng(seed);
    let x = rng.array4(shape, -2.0, 2.0).mapv(|v| v + offset);
    let bn = random_bn(&mut rng, shape[1], affine);
    let dy = rng.array4(shape, -1.0, 1.0);
    for training in [true, false] {
        let what = format!("{shape:?} affine {affine} training {training} offset {offset}");
        let want = CpuBackend.batch_norm2d(&x, &bn, training).unwrap();
        let got = gpu.batch_norm2d(&x, &bn, training).unwrap();
        assert_close(&format!("{what}: y"), &got.y, &want.y, 1e-5);
        assert_close(&format!("{what}: mean"), &got.mean, &want.mean, 1e-6);
        assert_close(&format!("{what}: invstd"), &got.invstd, &want.invstd, 1e-5);
        assert_close(
            &format!("{what}: running_mean"),
            &got.running_mean,
            &want.running_mean,
            1e-6,
        );
        assert_close(
            &format!("{what}: running_var"),
            &got.running_var,
            &want.running_var,
            1e-6,
        );
        if !training {
            assert_bits_eq("eval running_mean", &got.running_mean, &bn.running_mean);
            assert_bits_eq("eval running_var", &got.running_var, &bn.running_var);
        }
        let gw = CpuBackend
            .batch_norm2d_backward(&x, &dy, &bn, &want, training)
            .unwrap();
        let gg = gpu
            .batch_norm2d_backward(&x, &dy, &bn, &want, training)
            .unwrap();
        assert_close(&format!("{what}: dx"), &gg.dx, &gw.dx, 1e-5);
        let m = (shape[0] * shape[2] * shape[3]) as f32;
        let tol = 1e-6 * m.sqrt().max(1.0);
        assert_close(&format!("{what}: dweight"), &gg.dweight, &gw.dweight, tol);
        assert_close(&format!("{what}: dbias"), &gg.dbias, &gw.dbias, tol);
    }
}

fn batch_norm2d_matches_reference() {
    let Some(ctx) = common::gpu() else { return };
    for (i, shape) in [[2, 3, 4, 4], [4, 6, 5, 5], [3, 5, 7, 6], [1, 2, 1, 2]]
        .into_iter()
        .enumerate()
    {
        for affine in [true, false] {
            check_batch_norm(&ctx, shape, affine, 10 + i as u64, 0.0);
        }
    }
}

/// Several partial workgroups per channel (M > 2048), and a large mean relative to the
/// spread (where a one-pass sum of squares would lose the variance).
fn batch_norm2d_large_and_offset() {
    let Some(ctx) = common::gpu() else { return };
    check_batch_norm(&ctx, [4, 3, 40, 40], true, 3, 0.0);
    check_batch_norm(&ctx, [2, 2, 48, 48], true, 4, 100.0);
}

/// Every layout the shape picks (`reduction_layout`): one invocation per channel (many
/// channels of 1 or 2 values, channel counts that are and are not multiples of 4), a few and
/// many partial invocations per channel (also with a large mean, and runs that straddle
/// planes), the elementwise pass on a flat grid and on a plane grid, on scalars and on
/// `vec4`s (`H·W` a multiple of 4), forward and backward, training and eval.
fn batch_norm2d_reduction_layouts() {
    let Some(ctx) = common::gpu() else { return };
    let shapes = [
        ([3, 300, 1, 1], 0.0),
        ([2, 257, 1, 2], 0.0),
        ([5, 6, 1, 2], 0.0),
        ([40, 3, 1, 1], 0.0),
        ([1, 1, 3, 10001], 0.0),
        ([4, 5, 8, 8], 0.0),
        ([3, 3, 64, 64], 0.0),
        ([1, 1, 256, 128], 0.0),
        ([1, 1, 256, 128], 100.0),
        ([3, 1, 256, 256], 0.0),
        ([5, 7, 9, 9], 0.0),
        ([2, 300, 2, 2], 0.0),
        // vec4 planes of 90 vec4s: the plane grid's last run of a plane is partial.
        ([2, 3, 18, 20], 0.0),
    ];
    let mut seen = std::collections::BTreeSet::new();
    for (i, (shape, offset)) in shapes.into_iter().enumerate() {
        seen.insert(layout_kind(shape));
        check_batch_norm(&ctx, shape, true, 20 + i as u64, offset);
    }
    assert_eq!(
        seen,
        all_layout_kinds(),
        "a reduction layout is not exercised"
    );
}

/// `(vec4, one invocation per channel, several partials per channel, plane grid)` of the
/// layout `shape` gets.
fn layout_kind(shape: [usize; 4]) -> (bool, bool, bool, bool) {
    let l = qfuse::kernels::batch_norm::reduction_layout(shape);
    (l.vec4, l.per_thread, l.partials > 1, l.plane_grid)
}

/// The layout kinds the BatchNorm tests must cover.
fn all_layout_kinds() -> std::collections::BTreeSet<(bool, bool, bool, bool)> {
    [
        (false, true, false, false),
        (false, false, true, false),
        (false, false, true, true),
        (true, false, false, false),
        (true, false, true, false),
        (true, false, true, true),
    ]
    .into_iter()
    .collect()
}

/// The kernel-level BatchNorm with a fused activation equals BN then the activation, and its
/// backward with the activation's mask folded in equals the two backwards.
fn batch_norm2d_with_activation() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(5);
    // H*W = 25 (scalars) and 16 (vec4s); one thread per channel; a workgroup per channel;
    // channels split over workgroups (vec4s and scalars).
    for shape in [
        [2, 4, 5, 5],
        [2, 4, 4, 4],
        [3, 64, 1, 1],
        [1, 2, 128, 128],
        [1, 1, 256, 128],
        [1, 1, 3, 10001],
    ] {
        check_batch_norm_act(&ctx, &mut rng, shape);
    }
}

fn check_batch_norm_act(ctx: &Arc<GpuContext>, rng: &mut Rng, shape: [usize; 4]) {
    let ctx = ctx.clone();
    let x = rng.array4(shape, -2.0, 2.0);
    let dy = rng.array4(shape, -1.0, 1.0);
    let bn = random_bn(rng, shape[1], true);
    let gbn = GpuBatchNorm::upload(&ctx, &bn).unwrap();
    let gx = upload4(&ctx, &x);
    let gdy = upload4(&ctx, &dy);
    for act in [Activation::Relu, Activation::Relu6] {
        for training in [true, false] {
            let want = CpuBackend.batch_norm2d(&x, &bn, training).unwrap();
            let want_y = CpuBackend
                .activation(&want.y.clone().into_dyn(), act)
                .unwrap();
            let out = qfuse::kernels::batch_norm::batch_norm2d(
                &ctx,
                &gx,
                &gbn,
                bn.momentum,
                training,
                act,
                true,
            )
            .unwrap();
            let y = out.y.download_f32(&ctx).unwrap();
            assert_close("y", &y, &want_y, 1e-5);
            let pre = download4(&ctx, out.pre.as_ref().unwrap()).unwrap();
            assert_close("pre", &pre, &want.y, 1e-5);

            let d_pre = CpuBackend
                .activation_backward(&want.y.clone().into_dyn(), &dy.clone().into_dyn(), act)
                .unwrap()
                .into_dimensionality()
                .unwrap();
            let gw = CpuBackend
                .batch_norm2d_backward(&x, &d_pre, &bn, &want, training)
                .unwrap();
            // The mask from the activation's output is the same as from its input.
            for act_x in [&out.y, out.pre.as_ref().unwrap()] {
                let g = qfuse::kernels::batch_norm::batch_norm2d_backward_act(
                    &ctx,
                    &gx,
                    &gdy,
                    &gbn,
                    &out.stats.stats,
                    training,
                    act,
                    Some(act_x),
                    None,
                )
                .unwrap();
                assert_close("dx", &download4(&ctx, &g.dx).unwrap(), &gw.dx, 1e-5);
                let rows = download_rows(&ctx, &g.dparams).unwrap();
                assert_close("dbias", &rows[0], &gw.dbias, 1e-5);
                assert_close("dweight", &rows[1], &gw.dweight, 1e-5);
            }
        }
    }
}

struct ConvCase {
    name: &'static str,
    x: [usize; 4],
    o: usize,
    k: usize,
    params: Conv2dParams,
    bias: bool,
}

fn conv_cases() -> Vec<ConvCase> {
    let p = |stride: usize, padding: usize, groups: usize| Conv2dParams {
        stride: [stride, stride],
        padding: [padding, padding],
        dilation: [1, 1],
        groups,
        ..Default::default()
    };
    vec![
        ConvCase {
            name: "3x3 pad 1",
            x: [2, 3, 8, 8],
            o: 8,
            k: 3,
            params: p(1, 1, 1),
            bias: true,
        },
        ConvCase {
            name: "3x3 stride 2 no bias",
            x: [1, 4, 9, 9],
            o: 6,
            k: 3,
            params: p(2, 0, 1),
            bias: false,
        },
        ConvCase {
            name: "depthwise",
            x: [2, 8, 6, 6],
            o: 8,
            k: 3,
            params: p(1, 1, 8),
            bias: true,
        },
        ConvCase {
            name: "depthwise stride 2 no bias",
            x: [2, 6, 7, 7],
            o: 6,
            k: 3,
            params: p(2, 1, 6),
            bias: false,
        },
    ]
}

fn make_conv(rng: &mut Rng, c: &ConvCase) -> Conv2d {
    let cin = c.x[1] / c.params.groups;
    Conv2d {
        weight: rng.array4([c.o, cin, c.k, c.k], -0.5, 0.5),
        bias: c.bias.then(|| rng.array1(c.o, -0.3, 0.3)),
        params: c.params,
    }
}

fn conv_bn_act_eval_fused_unfused_cpu() {
    let Some(ctx) = common::gpu() else { return };
    let gpu = backend(&ctx);
    let mut rng = Rng(21);
    for case in conv_cases() {
        let conv = make_conv(&mut rng, &case);
        let bn = random_bn(&mut rng, case.o, case.bias);
        let x = rng.array4(case.x, -1.0, 1.0);
        for act in [Activation::None, Activation::Relu, Activation::Relu6] {
            let what = format!("{} {act:?}", case.name);
            let (want, folded) = CpuBackend.conv_bn_act_eval(&x, &conv, &bn, act).unwrap();
            let (got, gfolded) = gpu.conv_bn_act_eval(&x, &conv, &bn, act).unwrap();
            assert_close(&format!("{what}: y"), &got, &want, 1e-5);
            assert_close(
                &format!("{what}: weight"),
                &gfolded.weight,
                &folded.weight,
                1e-5,
            );
            assert_close(&format!("{what}: bias"), &gfolded.bias, &folded.bias, 1e-5);

            let gbn = GpuBatchNorm::upload(&ctx, &bn).unwrap();
            let gw = upload4(&ctx, &conv.weight);
            let gb = conv.bias.as_ref().map(|b| upload1(&ctx, b));
            let gconv = GpuConv2d {
                weight: &gw,
                bias: gb.as_ref(),
                params: conv.params,
            };
            let unfused =
                conv_bn::conv_bn_act_eval_unfused(&ctx, &upload4(&ctx, &x), &gconv, &gbn, act)
                    .unwrap();
            assert_close(
                &format!("{what}: unfused"),
                &download4(&ctx, &unfused).unwrap(),
                &want,
                1e-5,
            );
            // γ/σ in the conv epilogue instead of a folded weight.
            let scaled =
                conv_bn::conv_bn_act_eval_scaled(&ctx, &upload4(&ctx, &x), &gconv, &gbn, act)
                    .unwrap();
            assert_close(
                &format!("{what}: scaled"),
                &download4(&ctx, &scaled).unwrap(),
                &want,
                1e-5,
            );
        }
    }
}

fn qat_cfg(act: Activation, freeze_bn: bool, per_channel: bool) -> QatConfig {
    let qscheme = if per_channel {
        QScheme::PerChannelSymmetric
    } else {
        QScheme::PerTensorSymmetric
    };
    QatConfig {
        activation: act,
        freeze_bn,
        weight_observer: ObserverSpec::new(QDtype::QInt8, qscheme, QuantRange::INT8, 0).unwrap(),
    }
}

/// The GPU QAT forward against the CPU's: what is derived from `s` bit-exact, the rest close.
fn check_qat_forward(what: &str, got: &QatForward, want: &QatForward) {
    assert_bits_eq(
        &format!("{what}: scale_factor"),
        &got.saved.scale_factor,
        &want.saved.scale_factor,
    );
    assert_eq!(got.weight_qparams, want.weight_qparams, "{what}: qparams");
    assert_bits_eq(
        &format!("{what}: weight_q"),
        &got.saved.weight_q,
        &want.saved.weight_q,
    );
    assert_bits_eq(
        &format!("{what}: weight_mask"),
        &got.saved.weight_mask,
        &want.saved.weight_mask,
    );
    let tol = 1e-4;
    assert_close(&format!("{what}: y"), &got.y, &want.y, tol);
    assert_close(
        &format!("{what}: conv_out"),
        &got.saved.conv_out,
        &want.saved.conv_out,
        tol,
    );
    assert_close(
        &format!("{what}: bn_input"),
        &got.saved.bn_input,
        &want.saved.bn_input,
        tol,
    );
    assert_close(
        &format!("{what}: bn_out"),
        &got.saved.bn_out,
        &want.saved.bn_out,
        tol,
    );
    assert_close(
        &format!("{what}: mean"),
        &got.saved.mean,
        &want.saved.mean,
        tol,
    );
    assert_close(
        &format!("{what}: invstd"),
        &got.saved.invstd,
        &want.saved.invstd,
        tol,
    );
    assert_close(
        &format!("{what}: running_mean"),
        &got.running_mean,
        &want.running_mean,
        tol,
    );
    assert_close(
        &format!("{what}: running_var"),
        &got.running_var,
        &want.running_var,
        tol,
    );
}

fn qat_cases() -> Vec<ConvCase> {
    let mut cases = conv_cases();
    cases.truncate(3);
    cases.push(ConvCase {
        name: "1x1 stride 2",
        x: [2, 5, 6, 6],
        o: 7,
        k: 1,
        params: Conv2dParams {
            stride: [2, 2],
            ..Default::default()
        },
        bias: true,
    });
    // 72 weights per output channel: the backward's STE runs one workgroup per channel
    // (`weight_grad`); the cases above have at most 64 (one invocation per channel).
    cases.push(ConvCase {
        name: "3x3 8 in",
        x: [1, 8, 5, 5],
        o: 3,
        k: 3,
        params: Conv2dParams {
            padding: [1, 1],
            ..Default::default()
        },
        bias: false,
    });
    // A depthwise conv the depthwise kernel runs (output width a multiple of 4): the fused
    // forward takes the BatchNorm statistics from its epilogue; 7 rows, so the last row
    // block of each image is partial.
    cases.push(ConvCase {
        name: "depthwise 8 wide",
        x: [2, 6, 7, 8],
        o: 6,
        k: 3,
        params: Conv2dParams {
            padding: [1, 1],
            groups: 6,
            ..Default::default()
        },
        bias: true,
    });
    cases
}

fn conv_bn_qat_forward_backward_match_reference() {
    let Some(ctx) = common::gpu() else { return };
    let gpu = backend(&ctx);
    let mut rng = Rng(33);
    for case in qat_cases() {
        for per_channel in [true, false] {
            for freeze_bn in [false, true] {
                for act in [Activation::Relu, Activation::None] {
                    let mut conv = make_conv(&mut rng, &case);
                    for bias in [true, false] {
                        if !bias {
                            conv.bias = None;
                        } else if conv.bias.is_none() {
                            conv.bias = Some(rng.array1(case.o, -0.3, 0.3));
                        }
                        // affine=False BatchNorms (γ = 1) in some combinations
                        let affine = per_channel || !bias;
                        let bn = random_bn(&mut rng, case.o, affine);
                        let x = rng.array4(case.x, -1.0, 1.0);
                        let cfg = qat_cfg(act, freeze_bn, per_channel);
                        let what = format!(
                            "{} per_channel {per_channel} frozen {freeze_bn} {act:?} bias {bias}",
                            case.name
                        );
                        let want = CpuBackend
                            .conv_bn_qat_forward(&x, &conv, &bn, &cfg)
                            .unwrap();
                        let got = gpu.conv_bn_qat_forward(&x, &conv, &bn, &cfg).unwrap();
                        check_qat_forward(&what, &got, &want);

                        let dy = rng.array4(
                            [
                                want.y.shape()[0],
                                want.y.shape()[1],
                                want.y.shape()[2],
                                want.y.shape()[3],
                            ],
                            -1.0,
                            1.0,
                        );
                        let gw = CpuBackend
                            .conv_bn_qat_backward(&x, &dy, &conv, &bn, &cfg, &want)
                            .unwrap();
                        // The GPU backward from the CPU's saved tensors and from its own.
                        for (from, fwd) in [("cpu fwd", &want), ("gpu fwd", &got)] {
                            let gg = gpu
                                .conv_bn_qat_backward(&x, &dy, &conv, &bn, &cfg, fwd)
                                .unwrap();
                            let w = format!("{what} ({from})");
                            let tol = 1e-3;
                            assert_close(&format!("{w}: dx"), &gg.dx, &gw.dx, tol);
                            assert_close(&format!("{w}: dweight"), &gg.dweight, &gw.dweight, tol);
                            assert_close(
                                &format!("{w}: dbn_weight"),
                                &gg.dbn_weight,
                                &gw.dbn_weight,
                                tol,
                            );
                            assert_close(
                                &format!("{w}: dbn_bias"),
                                &gg.dbn_bias,
                                &gw.dbn_bias,
                                tol,
                            );
                            match (&gg.dbias, &gw.dbias) {
                                (Some(a), Some(b)) => {
                                    assert_close(&format!("{w}: dbias"), a, b, tol)
                                }
                                (None, None) => {}
                                _ => panic!("{w}: conv bias grad presence differs"),
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The fused QAT forward and the unfused chain agree (same `s`, `W_q`, mask and qparams bit
/// for bit; the rest to rounding).
fn conv_bn_qat_fused_matches_unfused() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(44);
    for case in qat_cases() {
        for per_channel in [true, false] {
            for freeze_bn in [false, true] {
                let conv = make_conv(&mut rng, &case);
                let bn = random_bn(&mut rng, case.o, true);
                let x = rng.array4(case.x, -1.0, 1.0);
                let cfg = qat_cfg(Activation::Relu, freeze_bn, per_channel);
                let gbn = GpuBatchNorm::upload(&ctx, &bn).unwrap();
                let gx = upload4(&ctx, &x);
                let gw = upload4(&ctx, &conv.weight);
                let gb = conv.bias.as_ref().map(|b| upload1(&ctx, b));
                let gconv = GpuConv2d {
                    weight: &gw,
                    bias: gb.as_ref(),
                    params: conv.params,
                };
                let f = conv_bn::conv_bn_qat_forward(&ctx, &gx, &gconv, &gbn, 0.1, &cfg).unwrap();
                let u = conv_bn::conv_bn_qat_forward_unfused(&ctx, &gx, &gconv, &gbn, 0.1, &cfg)
                    .unwrap();
                let what = format!("{} per_channel {per_channel} frozen {freeze_bn}", case.name);
                let d = |t: &GpuTensor| t.download_f32(&ctx).unwrap();
                for (name, a, b) in [
                    ("s", &f.scale_factor, &u.scale_factor),
                    ("1/s", &f.inv_scale_factor, &u.inv_scale_factor),
                    ("W_s", &f.weight_scaled, &u.weight_scaled),
                    ("W_q", &f.weight_q, &u.weight_q),
                    ("mask", &f.weight_mask, &u.weight_mask),
                ] {
                    assert_bits_eq(&format!("{what}: {name}"), &d(a), &d(b));
                }
                assert_eq!(
                    f.weight_qparams.download(&ctx).unwrap(),
                    u.weight_qparams.download(&ctx).unwrap()
                );
                // The fused forward keeps no BatchNorm output under ReLU / ReLU6 (the mask
                // comes from y); rebuilt, it is the unfused chain's.
                assert_eq!(
                    f.bn_out.is_none(),
                    cfg.activation.grad_from_output(),
                    "{what}: fused bn_out kept"
                );
                assert!(u.bn_out.is_some(), "{what}: unfused bn_out kept");
                let bo_f = conv_bn::qat_bn_out(&ctx, &f, &gbn).unwrap();
                let bo_u = conv_bn::qat_bn_out(&ctx, &u, &gbn).unwrap();
                for (name, a, b) in [
                    ("y", &f.y, &u.y),
                    ("bn_out", &bo_f, &bo_u),
                    ("bn_input", &f.bn_input, &u.bn_input),
                    ("stats", &f.stats.stats, &u.stats.stats),
                    ("running", &f.stats.running, &u.stats.running),
                ] {
                    assert_close(&format!("{what}: {name}"), &d(a), &d(b), 1e-5);
                }
                let co_f = conv_bn::qat_conv_out(&ctx, &f, &gconv).unwrap();
                let co_u = conv_bn::qat_conv_out(&ctx, &u, &gconv).unwrap();
                assert_close(&format!("{what}: conv_out"), &d(&co_f), &d(&co_u), 1e-5);

                // The unfused backward (activation, BatchNorm and divide-back each its own
                // pass) gives the fused backward's gradients.
                let dy = upload4(&ctx, &rng.array4(case_out(&case), -1.0, 1.0));
                let gf =
                    conv_bn::conv_bn_qat_backward(&ctx, &gx, &dy, &gconv, &gbn, &cfg, &f.saved())
                        .unwrap();
                let gu = conv_bn::conv_bn_qat_backward_unfused(
                    &ctx,
                    &gx,
                    &dy,
                    &gconv,
                    &gbn,
                    &cfg,
                    &f.saved(),
                )
                .unwrap();
                for (name, a, b) in [
                    ("dx", &gf.dx, &gu.dx),
                    ("dweight", &gf.dweight, &gu.dweight),
                    ("dbn_weight", &gf.dbn_weight, &gu.dbn_weight),
                    ("dbn_bias", &gf.dbn_bias, &gu.dbn_bias),
                ] {
                    assert_close(&format!("{what}: backward {name}"), &d(a), &d(b), 1e-4);
                }
                assert_eq!(gf.dbias.is_some(), gu.dbias.is_some());
                if let (Some(a), Some(b)) = (&gf.dbias, &gu.dbias) {
                    assert_close(&format!("{what}: backward dbias"), &d(a), &d(b), 1e-4);
                }
            }
        }
    }
}

/// The output shape of a QAT case's conv.
fn case_out(case: &ConvCase) -> [usize; 4] {
    case.params
        .output_shape(
            &case.x,
            &[case.o, case.x[1] / case.params.groups, case.k, case.k],
        )
        .unwrap()
}

/// A per-channel observer along an axis other than 0 takes the generic observer path.
fn conv_bn_qat_per_channel_axis_1() {
    let Some(ctx) = common::gpu() else { return };
    let gpu = backend(&ctx);
    let mut rng = Rng(55);
    let case = &qat_cases()[0];
    let conv = make_conv(&mut rng, case);
    let bn = random_bn(&mut rng, case.o, true);
    let x = rng.array4(case.x, -1.0, 1.0);
    let mut cfg = qat_cfg(Activation::Relu, false, true);
    cfg.weight_observer.axis = 1;
    let want = CpuBackend
        .conv_bn_qat_forward(&x, &conv, &bn, &cfg)
        .unwrap();
    let got = gpu.conv_bn_qat_forward(&x, &conv, &bn, &cfg).unwrap();
    check_qat_forward("axis 1", &got, &want);
}

/// The GPU backend's QAT step on device tensors with γ = ±0 channels (qfuse's finite form):
/// forward and backward each one submission with no host transfer (the γ = 0 rule runs on
/// the device), `s` / `W_q` / mask / qparams bit-exact with the CPU reference's
/// `conv_bn_qat_forward_with`, outputs and gradients (dγ of the γ = 0 channels included)
/// close to its backward.
fn conv_bn_qat_gamma_zero_on_device() {
    use qfuse::backend::{upload_batch_norm, upload_conv2d, Device, FusedOps};
    use qfuse::ops::QatWeightQuant;
    let Some(_) = common::gpu() else { return };
    // A context of its own: its counters see no other test's work.
    let ctx = Arc::new(GpuContext::new().expect("a second context on the test adapter"));
    let gpu = backend(&ctx);
    let mut rng = Rng(71);
    let case = &qat_cases()[0];
    for per_channel in [true, false] {
        let conv = make_conv(&mut rng, case);
        let mut bn = random_bn(&mut rng, case.o, true);
        bn.weight.as_mut().unwrap()[1] = 0.0;
        bn.weight.as_mut().unwrap()[4] = -0.0;
        let x = rng.array4(case.x, -1.0, 1.0);
        let cfg = qat_cfg(Activation::Relu, false, per_channel);
        let want = qfuse::reference::conv_bn::conv_bn_qat_forward_with(
            &x,
            &conv,
            &bn,
            &cfg,
            &QatWeightQuant::default(),
        )
        .unwrap();
        assert_eq!(want.saved.scale_factor[1], 1.0);
        let dy = rng.array4(<[usize; 4]>::try_from(want.y.shape()).unwrap(), -1.0, 1.0);
        let gw = qfuse::reference::conv_bn::conv_bn_qat_backward(&x, &dy, &conv, &bn, &cfg, &want)
            .unwrap();

        let gx = gpu.upload(&x.clone().into_dyn()).unwrap();
        let gdy = gpu.upload(&dy.clone().into_dyn()).unwrap();
        let gconv = upload_conv2d(&gpu, &conv).unwrap();
        let gbn = upload_batch_norm(&gpu, &bn).unwrap();
        let weight = QatWeightQuant {
            qparams: None,
            fake_quant_enabled: true,
        };
        let what = format!("γ = 0 per_channel {per_channel}");
        let (t0, s0) = (ctx.transfer_stats(), ctx.pool_stats().submissions);
        let step = FusedOps::conv_bn_qat_forward(&gpu, &gx, &gconv, &gbn, &cfg, &weight).unwrap();
        let (t1, s1) = (ctx.transfer_stats(), ctx.pool_stats().submissions);
        assert_eq!(t1.since(&t0).transfers(), 0, "{what}: forward transfers");
        assert_eq!(s1 - s0, 1, "{what}: forward submissions");
        let g = FusedOps::conv_bn_qat_backward(&gpu, &gx, &gdy, &gconv, &gbn, &cfg, &step).unwrap();
        assert_eq!(
            ctx.transfer_stats().since(&t1).transfers(),
            0,
            "{what}: backward transfers"
        );
        assert_eq!(
            ctx.pool_stats().submissions - s1,
            1,
            "{what}: backward submissions"
        );

        let got = gpu.qat_forward_to_host(&step, &gconv, &gbn).unwrap();
        check_qat_forward(&what, &got, &want);
        let d1 = |t: &GpuTensor| {
            gpu.download(t)
                .unwrap()
                .into_dimensionality::<ndarray::Ix1>()
                .unwrap()
        };
        let tol = 1e-3;
        let dx = gpu.download(&g.dx).unwrap();
        assert_close(&format!("{what}: dx"), &dx, &gw.dx.clone().into_dyn(), tol);
        let dw = gpu.download(&g.dweight).unwrap();
        assert_close(
            &format!("{what}: dweight"),
            &dw,
            &gw.dweight.clone().into_dyn(),
            tol,
        );
        assert_close(
            &format!("{what}: dbn_weight"),
            &d1(&g.dbn_weight),
            &gw.dbn_weight,
            tol,
        );
        assert_close(
            &format!("{what}: dbn_bias"),
            &d1(&g.dbn_bias),
            &gw.dbn_bias,
            tol,
        );
        assert_close(
            &format!("{what}: dbias"),
            &d1(g.dbias.as_ref().unwrap()),
            gw.dbias.as_ref().unwrap(),
            tol,
        );
    }
}

fn err_text(r: Result<impl std::fmt::Debug, Error>) -> String {
    r.expect_err("expected an error").to_string()
}

fn errors_match_cpu() {
    let Some(ctx) = common::gpu() else { return };
    let gpu = backend(&ctx);
    let mut rng = Rng(66);
    let bn3 = random_bn(&mut rng, 3, true);
    let bn5 = random_bn(&mut rng, 5, true);
    let bn4 = random_bn(&mut rng, 4, true);

    // BatchNorm: channel mismatch, one value per channel in training, bad dy.
    let x = rng.array4([2, 4, 3, 3], -1.0, 1.0);
    let one = rng.array4([1, 3, 1, 1], -1.0, 1.0);
    for training in [true, false] {
        let c = err_text(CpuBackend.batch_norm2d(&x, &bn3, training));
        assert_eq!(err_text(gpu.batch_norm2d(&x, &bn3, training)), c);
        assert!(c.contains("channel"), "{c}");
    }
    let c = err_text(CpuBackend.batch_norm2d(&one, &bn3, true));
    assert!(
        c.contains("Expected more than 1 value per channel when training"),
        "{c}"
    );
    assert_eq!(err_text(gpu.batch_norm2d(&one, &bn3, true)), c);
    assert!(gpu.batch_norm2d(&one, &bn3, false).is_ok());
    let mut bad = bn3.clone();
    bad.running_var = Array1::ones(2);
    let x3 = rng.array4([2, 3, 2, 2], -1.0, 1.0);
    assert_eq!(
        err_text(gpu.batch_norm2d(&x3, &bad, false)),
        err_text(CpuBackend.batch_norm2d(&x3, &bad, false))
    );
    let fwd = CpuBackend.batch_norm2d(&x3, &bn3, true).unwrap();
    let dy_bad = rng.array4([2, 3, 2, 1], -1.0, 1.0);
    assert_eq!(
        err_text(gpu.batch_norm2d_backward(&x3, &dy_bad, &bn3, &fwd, true)),
        err_text(CpuBackend.batch_norm2d_backward(&x3, &dy_bad, &bn3, &fwd, true))
    );
    let mut f2 = fwd.clone();
    f2.invstd = Array1::ones(2);
    assert_eq!(
        err_text(gpu.batch_norm2d_backward(&x3, &x3, &bn3, &f2, true)),
        err_text(CpuBackend.batch_norm2d_backward(&x3, &x3, &bn3, &f2, true))
    );

    // conv + BN: channel mismatch, bias length, input channels, one value in training.
    let conv = Conv2d {
        weight: rng.array4([4, 3, 3, 3], -0.5, 0.5),
        bias: None,
        params: Conv2dParams::default(),
    };
    let xc = rng.array4([2, 3, 6, 6], -1.0, 1.0);
    let cfg = qat_cfg(Activation::Relu, false, true);
    let c = err_text(CpuBackend.conv_bn_act_eval(&xc, &conv, &bn5, Activation::Relu));
    assert!(c.contains("channel"), "{c}");
    assert_eq!(
        err_text(gpu.conv_bn_act_eval(&xc, &conv, &bn5, Activation::Relu)),
        c
    );
    assert_eq!(
        err_text(gpu.conv_bn_qat_forward(&xc, &conv, &bn5, &cfg)),
        err_text(CpuBackend.conv_bn_qat_forward(&xc, &conv, &bn5, &cfg))
    );
    let mut conv_b = conv.clone();
    conv_b.bias = Some(Array1::zeros(3));
    assert_eq!(
        err_text(gpu.conv_bn_qat_forward(&xc, &conv_b, &bn4, &cfg)),
        err_text(CpuBackend.conv_bn_qat_forward(&xc, &conv_b, &bn4, &cfg))
    );
    assert_eq!(
        err_text(gpu.conv_bn_act_eval(&xc, &conv_b, &bn4, Activation::None)),
        err_text(CpuBackend.conv_bn_act_eval(&xc, &conv_b, &bn4, Activation::None))
    );
    let x2 = rng.array4([2, 2, 6, 6], -1.0, 1.0);
    assert_eq!(
        err_text(gpu.conv_bn_qat_forward(&x2, &conv, &bn4, &cfg)),
        err_text(CpuBackend.conv_bn_qat_forward(&x2, &conv, &bn4, &cfg))
    );
    assert_eq!(
        err_text(gpu.conv_bn_act_eval(&x2, &conv, &bn4, Activation::None)),
        err_text(CpuBackend.conv_bn_act_eval(&x2, &conv, &bn4, Activation::None))
    );
    let x1 = rng.array4([1, 3, 3, 3], -1.0, 1.0);
    let c = err_text(CpuBackend.conv_bn_qat_forward(&x1, &conv, &bn4, &cfg));
    assert!(
        c.contains("Expected more than 1 value per channel when training"),
        "{c}"
    );
    assert_eq!(err_text(gpu.conv_bn_qat_forward(&x1, &conv, &bn4, &cfg)), c);
    let frozen = qat_cfg(Activation::Relu, true, true);
    assert!(gpu.conv_bn_qat_forward(&x1, &conv, &bn4, &frozen).is_ok());

    // QAT backward: dy of the wrong shape, saved tensors that do not fit.
    let conv_b = Conv2d {
        bias: Some(rng.array1(4, -0.3, 0.3)),
        ..conv.clone()
    };
    let x5 = rng.array4([2, 3, 5, 5], -1.0, 1.0);
    let fwd = CpuBackend
        .conv_bn_qat_forward(&x5, &conv_b, &bn4, &cfg)
        .unwrap();
    let dy = rng.array4([2, 4, 3, 2], -1.0, 1.0);
    let c = err_text(CpuBackend.conv_bn_qat_backward(&x5, &dy, &conv_b, &bn4, &cfg, &fwd));
    assert_eq!(
        err_text(gpu.conv_bn_qat_backward(&x5, &dy, &conv_b, &bn4, &cfg, &fwd)),
        c
    );
    let dy = rng.array4([2, 4, 3, 3], -1.0, 1.0);
    let mut f2 = fwd.clone();
    f2.saved.weight_mask = Array4::zeros([4, 3, 3, 2]);
    assert_eq!(
        err_text(gpu.conv_bn_qat_backward(&x5, &dy, &conv_b, &bn4, &cfg, &f2)),
        err_text(CpuBackend.conv_bn_qat_backward(&x5, &dy, &conv_b, &bn4, &cfg, &f2))
    );
    let mut f3 = fwd.clone();
    f3.saved.scale_factor = Array1::ones(3);
    assert_eq!(
        err_text(gpu.conv_bn_qat_backward(&x5, &dy, &conv_b, &bn4, &cfg, &f3)),
        err_text(CpuBackend.conv_bn_qat_backward(&x5, &dy, &conv_b, &bn4, &cfg, &f3))
    );
}

/// A named closure timed by [`eval_timing`].
type TimedRun<'a> = (&'static str, Box<dyn Fn() + 'a>);

/// Not a check: times the pieces of the eval forward at ResNet-18 3x3 shapes (batch from
/// `QFUSE_TIMING_BATCH`, default 8), interleaved, and prints every run with the median and
/// minimum (`QFUSE_TIMING_REPS` runs, default 5; `QFUSE_TIMING_CHANNELS` picks one shape by its
/// channel count): the fold alone, the conv with no epilogue, the conv with the prefolded
/// weight and bias + ReLU epilogue, fold then that conv, the fused chain
/// ([`conv_bn::conv_bn_act_eval`]) and the unfused one. Run with
/// `cargo test --release --test integration -- --ignored gpu_conv_bn::eval_timing`.
fn eval_timing() {
    use qfuse::kernels::conv2d::{conv2d, ConvEpilogue};
    use qfuse::kernels::fold::fold_conv_bn;
    let Some(ctx) = common::gpu() else { return };
    let batch: usize = std::env::var("QFUSE_TIMING_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let reps: usize = std::env::var("QFUSE_TIMING_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let only: Option<usize> = std::env::var("QFUSE_TIMING_CHANNELS")
        .ok()
        .and_then(|v| v.parse().ok());
    let mut rng = Rng(41);
    for (c, s, groups) in [
        (64, 56, 1),
        (128, 28, 1),
        (256, 14, 1),
        (512, 7, 1),
        (144, 56, 144),
    ] {
        if only.is_some_and(|o| o != c) {
            continue;
        }
        let x = upload4(&ctx, &rng.array4([batch, c, s, s], -1.0, 1.0));
        let w = upload4(&ctx, &rng.array4([c, c / groups, 3, 3], -0.1, 0.1));
        let bn = GpuBatchNorm::upload(&ctx, &random_bn(&mut rng, c, true)).unwrap();
        let params = Conv2dParams {
            padding: [1, 1],
            groups,
            ..Conv2dParams::default()
        };
        let layer = GpuConv2d {
            weight: &w,
            bias: None,
            params,
        };
        let (wf, bf) = fold_conv_bn(&ctx, &w, None, &bn, false).unwrap();
        let pre = ConvEpilogue {
            out_scale: None,
            bias: Some(&bf),
            activation: Activation::Relu,
        };
        let mut runs: Vec<TimedRun> = vec![
            (
                "fold",
                Box::new(|| drop(fold_conv_bn(&ctx, &w, None, &bn, false).unwrap())),
            ),
            (
                "conv",
                Box::new(|| drop(conv2d(&ctx, &x, &w, &params, &ConvEpilogue::none()).unwrap())),
            ),
            (
                "prefolded",
                Box::new(|| drop(conv2d(&ctx, &x, &wf, &params, &pre).unwrap())),
            ),
            (
                "fold+prefolded",
                Box::new(|| {
                    drop(fold_conv_bn(&ctx, &w, None, &bn, false).unwrap());
                    drop(conv2d(&ctx, &x, &wf, &params, &pre).unwrap());
                }),
            ),
            (
                "fused",
                Box::new(|| {
                    drop(
                        conv_bn::conv_bn_act_eval(&ctx, &x, &layer, &bn, Activation::Relu).unwrap(),
                    )
                }),
            ),
            (
                "unfused",
                Box::new(|| {
                    drop(
                        conv_bn::conv_bn_act_eval_unfused(&ctx, &x, &layer, &bn, Activation::Relu)
                            .unwrap(),
                    )
                }),
            ),
        ];
        let mut times = vec![Vec::new(); runs.len()];
        for rep in 0..=reps {
            for (i, (_, run)) in runs.iter_mut().enumerate() {
                ctx.wait().unwrap();
                let t = std::time::Instant::now();
                run();
                ctx.wait().unwrap();
                if rep > 0 {
                    times[i].push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        let mut line = format!("{batch}x{c}x{s}x{s} g{groups}:");
        for ((name, _), mut t) in runs.iter().zip(times) {
            let all: Vec<String> = t.iter().map(|v| format!("{v:.0}")).collect();
            t.sort_by(f64::total_cmp);
            line += &format!(
                "\n  {name}: median {:.1} min {:.1} [{}]",
                t[t.len() / 2],
                t[0],
                all.join(" ")
            );
        }
        println!("{line} (ms)");
    }
}

crate::qfuse_tests! {
    sqrt_rn_is_correctly_rounded: gpu,
    batch_norm2d_matches_reference: gpu,
    batch_norm2d_large_and_offset: gpu,
    batch_norm2d_reduction_layouts: gpu,
    batch_norm2d_with_activation: gpu,
    conv_bn_act_eval_fused_unfused_cpu: gpu,
    conv_bn_qat_forward_backward_match_reference: gpu,
    conv_bn_qat_fused_matches_unfused: gpu,
    conv_bn_qat_per_channel_axis_1: gpu,
    conv_bn_qat_gamma_zero_on_device: gpu,
    errors_match_cpu: gpu,
    eval_timing: gpu + manual,
}
