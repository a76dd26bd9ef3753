//! The caller-buffer (`_into`) forms of the fused conv + BatchNorm launchers and of the free
//! int8 conv / linear functions: each writes into tensors wrapping the caller's own
//! `wgpu::Buffer`s exactly what its allocating form returns (bit for bit), and refuses an
//! output of the wrong shape or of another context with an error naming that output, before
//! anything is launched.

use crate::common;

use ndarray::{Array1, Array2, Array4, ArrayD, IxDyn};
use qfuse::gpu::{DType, GpuContext, GpuTensor};
use qfuse::kernels::batch_norm::GpuBatchNormStats;
use qfuse::kernels::conv_bn::{
    self as cb, GpuConv2d, GpuConvBnEval, GpuQatForward, GpuQatGrads, GpuQatWeight,
};
use qfuse::kernels::int8::{self as k8, GpuInt8Tensor};
use qfuse::kernels::{GpuBatchNorm, GpuQParams};
use qfuse::ops::{Activation, BatchNorm, Conv2d, Conv2dParams, QatConfig};
use qfuse::quant::{ObserverSpec, QDtype, QScheme, QuantRange, Requant, RequantMode};
use qfuse::Error;

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
    }
    fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| lo + (hi - lo) * self.next()).collect()
    }
    fn up(&mut self, ctx: &GpuContext, shape: &[usize], lo: f32, hi: f32) -> GpuTensor {
        let n = shape.iter().product();
        GpuTensor::from_slice_f32(ctx, &self.vec(n, lo, hi), shape).unwrap()
    }
}

/// A tensor over a `wgpu::Buffer` the test (the "engine") created and owns.
fn caller_tensor(ctx: &GpuContext, shape: &[usize], dtype: DType) -> GpuTensor {
    let n: usize = shape.iter().product();
    let buffer = ctx.device().create_buffer(&qfuse::wgpu::BufferDescriptor {
        label: Some("caller's output"),
        size: (n.max(1) * 4) as u64,
        usage: qfuse::wgpu::BufferUsages::STORAGE
            | qfuse::wgpu::BufferUsages::COPY_SRC
            | qfuse::wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    GpuTensor::from_buffer(ctx, buffer, shape, dtype).unwrap()
}

fn like(ctx: &GpuContext, t: &GpuTensor) -> GpuTensor {
    caller_tensor(ctx, t.shape(), t.dtype())
}

/// Both tensors hold the same bits.
fn same_bits(ctx: &GpuContext, what: &str, got: &GpuTensor, want: &GpuTensor) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let (g, w) = (
        got.download_u32_bits(ctx).unwrap(),
        want.download_u32_bits(ctx).unwrap(),
    );
    assert_eq!(g, w, "{what}: bits differ");
}

trait Bits {
    fn download_u32_bits(&self, ctx: &GpuContext) -> qfuse::Result<Vec<u32>>;
}

impl Bits for GpuTensor {
    fn download_u32_bits(&self, ctx: &GpuContext) -> qfuse::Result<Vec<u32>> {
        Ok(match self.dtype() {
            DType::F32 => self
                .download_f32(ctx)?
                .iter()
                .map(|v| v.to_bits())
                .collect(),
            _ => self.download_u32(ctx)?.iter().copied().collect(),
        })
    }
}

/// The error's text names `what`.
fn names(e: Error, what: &str) {
    let text = e.to_string();
    assert!(text.contains(what), "`{text}` does not name `{what}`");
}

fn bn_host(rng: &mut Rng, c: usize) -> BatchNorm {
    BatchNorm {
        weight: Some(Array1::from(rng.vec(c, 0.5, 1.5))),
        bias: Some(Array1::from(rng.vec(c, -0.5, 0.5))),
        running_mean: Array1::from(rng.vec(c, -0.3, 0.3)),
        running_var: Array1::from(rng.vec(c, 0.5, 1.5)),
        eps: 1e-5,
        momentum: 0.1,
    }
}

struct Layer {
    x: GpuTensor,
    w: GpuTensor,
    b: GpuTensor,
    bn: GpuBatchNorm,
    params: Conv2dParams,
}

impl Layer {
    fn new(ctx: &GpuContext, rng: &mut Rng) -> Self {
        Layer {
            x: rng.up(ctx, &[2, 3, 6, 6], -1.0, 1.0),
            w: rng.up(ctx, &[4, 3, 3, 3], -0.5, 0.5),
            b: rng.up(ctx, &[4], -0.3, 0.3),
            bn: GpuBatchNorm::upload(ctx, &bn_host(rng, 4)).unwrap(),
            params: Conv2dParams {
                padding: [1, 1],
                ..Default::default()
            },
        }
    }
    fn conv(&self, bias: bool) -> GpuConv2d<'_> {
        Conv2d {
            weight: &self.w,
            bias: bias.then_some(&self.b),
            params: self.params,
        }
    }
}

fn qat_cfg(act: Activation, qscheme: QScheme) -> QatConfig {
    QatConfig {
        activation: act,
        freeze_bn: false,
        weight_observer: ObserverSpec::new(QDtype::QInt8, qscheme, QuantRange::INT8, 0).unwrap(),
    }
}

fn second_context() -> GpuContext {
    GpuContext::new().expect("a second context on the test adapter")
}

/// `conv_bn_act_eval_into` and `conv_bn_act_eval_unfused_into` write what the allocating
/// forms return, and refuse unfit outputs.
fn conv_bn_eval_into_matches_and_refuses() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(1);
    let l = Layer::new(&ctx, &mut rng);
    for (bias, act) in [(true, Activation::Relu), (false, Activation::None)] {
        let conv = l.conv(bias);
        let want = cb::conv_bn_act_eval(&ctx, &l.x, &conv, &l.bn, act).unwrap();
        let out = GpuConvBnEval {
            y: like(&ctx, &want.y),
            weight: like(&ctx, &want.weight),
            bias: like(&ctx, &want.bias),
        };
        cb::conv_bn_act_eval_into(&ctx, &l.x, &conv, &l.bn, act, &out).unwrap();
        same_bits(&ctx, "eval y", &out.y, &want.y);
        same_bits(&ctx, "eval weight", &out.weight, &want.weight);
        same_bits(&ctx, "eval bias", &out.bias, &want.bias);

        let want = cb::conv_bn_act_eval_unfused(&ctx, &l.x, &conv, &l.bn, act).unwrap();
        let y = like(&ctx, &want);
        cb::conv_bn_act_eval_unfused_into(&ctx, &l.x, &conv, &l.bn, act, &y).unwrap();
        same_bits(&ctx, "unfused eval y", &y, &want);
    }
    let conv = l.conv(true);
    let act = Activation::Relu;
    let good = cb::conv_bn_act_eval(&ctx, &l.x, &conv, &l.bn, act).unwrap();
    // A y of the wrong size.
    let bad = GpuConvBnEval {
        y: caller_tensor(&ctx, &[2, 4, 6, 5], DType::F32),
        ..good.clone()
    };
    let e = cb::conv_bn_act_eval_into(&ctx, &l.x, &conv, &l.bn, act, &bad).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    names(e, "conv_bn_act_eval output y");
    // A folded bias of another context.
    let other = second_context();
    let bad = GpuConvBnEval {
        bias: caller_tensor(&other, &[4], DType::F32),
        ..good.clone()
    };
    let e = cb::conv_bn_act_eval_into(&ctx, &l.x, &conv, &l.bn, act, &bad).unwrap_err();
    assert!(matches!(e, Error::ContextMismatch { .. }), "{e}");
    names(e, "conv_bn_act_eval output bias");
    // An output that is an input.
    let bad = GpuConvBnEval {
        weight: l.w.clone(),
        ..good.clone()
    };
    let e = cb::conv_bn_act_eval_into(&ctx, &l.x, &conv, &l.bn, act, &bad).unwrap_err();
    names(e, "conv_bn_act_eval output weight");
    let e = cb::conv_bn_act_eval_unfused_into(
        &ctx,
        &l.x,
        &conv,
        &l.bn,
        act,
        &caller_tensor(&ctx, &[2, 4, 6], DType::F32),
    )
    .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    names(e, "conv_bn_act_eval_unfused output");
}

/// A QAT forward struct over caller buffers, shaped as `f` (with `bn_out` the same tensor
/// as `y` where `f` shares them, every other tensor its own).
fn mirror_forward(ctx: &GpuContext, f: &GpuQatForward) -> GpuQatForward {
    let y = like(ctx, &f.y);
    let bn_out = f.bn_out.as_ref().map(|b| {
        if b.buffer() == f.y.buffer() {
            y.clone()
        } else {
            like(ctx, b)
        }
    });
    GpuQatForward {
        y,
        bn_out,
        bn_input: like(ctx, &f.bn_input),
        conv_out: f.conv_out.as_ref().map(|c| like(ctx, c)),
        scale_factor: like(ctx, &f.scale_factor),
        inv_scale_factor: like(ctx, &f.inv_scale_factor),
        weight_scaled: like(ctx, &f.weight_scaled),
        weight_q: like(ctx, &f.weight_q),
        weight_mask: like(ctx, &f.weight_mask),
        weight_qparams: GpuQParams::from_tensor(
            like(ctx, f.weight_qparams.tensor()),
            f.weight_qparams.axis(),
        )
        .unwrap(),
        stats: GpuBatchNormStats {
            stats: like(ctx, &f.stats.stats),
            running: like(ctx, &f.stats.running),
        },
    }
}

fn same_forward(ctx: &GpuContext, what: &str, got: &GpuQatForward, want: &GpuQatForward) {
    let pairs = [
        ("y", &got.y, &want.y),
        ("bn_input", &got.bn_input, &want.bn_input),
        ("scale_factor", &got.scale_factor, &want.scale_factor),
        (
            "inv_scale_factor",
            &got.inv_scale_factor,
            &want.inv_scale_factor,
        ),
        ("weight_scaled", &got.weight_scaled, &want.weight_scaled),
        ("weight_q", &got.weight_q, &want.weight_q),
        ("weight_mask", &got.weight_mask, &want.weight_mask),
        (
            "weight_qparams",
            got.weight_qparams.tensor(),
            want.weight_qparams.tensor(),
        ),
        ("stats", &got.stats.stats, &want.stats.stats),
        ("running", &got.stats.running, &want.stats.running),
    ];
    for (name, g, w) in pairs {
        same_bits(ctx, &format!("{what}: {name}"), g, w);
    }
    for (name, g, w) in [
        ("bn_out", &got.bn_out, &want.bn_out),
        ("conv_out", &got.conv_out, &want.conv_out),
    ] {
        match (g, w) {
            (Some(g), Some(w)) => same_bits(ctx, &format!("{what}: {name}"), g, w),
            (None, None) => {}
            _ => panic!("{what}: {name} presence differs"),
        }
    }
}

fn mirror_grads(ctx: &GpuContext, g: &GpuQatGrads) -> GpuQatGrads {
    GpuQatGrads {
        dx: like(ctx, &g.dx),
        dweight: like(ctx, &g.dweight),
        dbias: g.dbias.as_ref().map(|d| like(ctx, d)),
        dbn_weight: like(ctx, &g.dbn_weight),
        dbn_bias: like(ctx, &g.dbn_bias),
    }
}

/// The QAT forward (fused, `_with` fixed qparams / fake quant off / finite γ = 0, unfused),
/// the backward and `qat_conv_out` write into caller buffers what their allocating forms
/// return.
fn conv_bn_qat_into_matches() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(2);
    let l = Layer::new(&ctx, &mut rng);
    // A BatchNorm with γ = 0 in one channel, for the finite form of the `_with` calls.
    let mut host_bn = bn_host(&mut rng, 4);
    host_bn.weight.as_mut().unwrap()[2] = 0.0;
    let bn0 = GpuBatchNorm::upload(&ctx, &host_bn).unwrap();
    for (bias, act, qscheme) in [
        (true, Activation::Relu, QScheme::PerChannelSymmetric),
        (false, Activation::None, QScheme::PerTensorSymmetric),
    ] {
        let conv = l.conv(bias);
        let cfg = qat_cfg(act, qscheme);
        let what = format!("bias {bias} {act:?} {qscheme:?}");

        let want = cb::conv_bn_qat_forward(&ctx, &l.x, &conv, &l.bn, 0.1, &cfg).unwrap();
        let out = mirror_forward(&ctx, &want);
        cb::conv_bn_qat_forward_into(&ctx, &l.x, &conv, &l.bn, 0.1, &cfg, &out).unwrap();
        same_forward(&ctx, &format!("{what} fused"), &out, &want);

        let fixed = want.weight_qparams.clone();
        for weight in [
            GpuQatWeight {
                qparams: Some(&fixed),
                fake_quant_enabled: true,
                finite_zero_gamma: true,
            },
            GpuQatWeight {
                qparams: None,
                fake_quant_enabled: false,
                finite_zero_gamma: true,
            },
        ] {
            let want =
                cb::conv_bn_qat_forward_with(&ctx, &l.x, &conv, &bn0, 0.1, &cfg, &weight).unwrap();
            let out = mirror_forward(&ctx, &want);
            cb::conv_bn_qat_forward_with_into(&ctx, &l.x, &conv, &bn0, 0.1, &cfg, &weight, &out)
                .unwrap();
            same_forward(&ctx, &format!("{what} with {weight:?}"), &out, &want);
        }

        let want = cb::conv_bn_qat_forward_unfused(&ctx, &l.x, &conv, &l.bn, 0.1, &cfg).unwrap();
        let out = mirror_forward(&ctx, &want);
        cb::conv_bn_qat_forward_unfused_into(&ctx, &l.x, &conv, &l.bn, 0.1, &cfg, &out).unwrap();
        same_forward(&ctx, &format!("{what} unfused"), &out, &want);

        let fwd = cb::conv_bn_qat_forward(&ctx, &l.x, &conv, &l.bn, 0.1, &cfg).unwrap();
        let dy = rng.up(&ctx, fwd.y.shape(), -1.0, 1.0);
        let saved = fwd.saved();
        let want = cb::conv_bn_qat_backward(&ctx, &l.x, &dy, &conv, &l.bn, &cfg, &saved).unwrap();
        let out = mirror_grads(&ctx, &want);
        cb::conv_bn_qat_backward_into(&ctx, &l.x, &dy, &conv, &l.bn, &cfg, &saved, &out).unwrap();
        same_bits(&ctx, "dx", &out.dx, &want.dx);
        same_bits(&ctx, "dweight", &out.dweight, &want.dweight);
        same_bits(&ctx, "dbn_weight", &out.dbn_weight, &want.dbn_weight);
        same_bits(&ctx, "dbn_bias", &out.dbn_bias, &want.dbn_bias);
        if let (Some(g), Some(w)) = (&out.dbias, &want.dbias) {
            same_bits(&ctx, "dbias", g, w);
        }

        let want = cb::qat_conv_out(&ctx, &fwd, &conv).unwrap();
        let c = like(&ctx, &want);
        cb::qat_conv_out_into(&ctx, &fwd, &conv, &c).unwrap();
        same_bits(&ctx, "qat_conv_out", &c, &want);
        let c = like(&ctx, &want);
        cb::qat_conv_out_of_into(&ctx, &fwd.bn_input, &fwd.scale_factor, &conv, &c).unwrap();
        same_bits(&ctx, "qat_conv_out_of", &c, &want);
    }
    let a = rng.up(&ctx, &[5], 0.0, 4.0);
    let want = cb::sqrt_rn(&ctx, &a).unwrap();
    let out = like(&ctx, &want);
    cb::sqrt_rn_into(&ctx, &a, &out).unwrap();
    same_bits(&ctx, "sqrt_rn", &out, &want);
}

/// The QAT `_into` forms refuse unfit outputs with an error naming them, and leave the
/// caller's tensors unwritten.
fn conv_bn_qat_into_refuses() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(3);
    let l = Layer::new(&ctx, &mut rng);
    let conv = l.conv(true);
    let cfg = qat_cfg(Activation::None, QScheme::PerChannelSymmetric);
    let fwd = cb::conv_bn_qat_forward(&ctx, &l.x, &conv, &l.bn, 0.1, &cfg).unwrap();
    let good = mirror_forward(&ctx, &fwd);
    let run = |out: &GpuQatForward| {
        cb::conv_bn_qat_forward_into(&ctx, &l.x, &conv, &l.bn, 0.1, &cfg, out).unwrap_err()
    };
    let zeros = vec![0u32; good.y.len()];
    // Wrong size: the error names the output, and nothing was written.
    let bad = GpuQatForward {
        weight_q: caller_tensor(&ctx, &[4, 3, 3, 2], DType::F32),
        ..good.clone()
    };
    let e = run(&bad);
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    names(e, "conv_bn_qat_forward output weight_q");
    assert_eq!(
        good.y.download_u32_bits(&ctx).unwrap(),
        zeros,
        "y untouched"
    );
    // Another context.
    let other = second_context();
    let bad = GpuQatForward {
        bn_input: caller_tensor(&other, good.bn_input.shape(), DType::F32),
        ..good.clone()
    };
    let e = run(&bad);
    assert!(matches!(e, Error::ContextMismatch { .. }), "{e}");
    names(e, "conv_bn_qat_forward output bn_input");
    // Qparams of the wrong type, and with the wrong axis.
    let bad = GpuQatForward {
        weight_qparams: GpuQParams::from_tensor(caller_tensor(&ctx, &[3, 4], DType::U32), Some(1))
            .unwrap(),
        ..good.clone()
    };
    names(run(&bad), "conv_bn_qat_forward output weight_qparams");
    // bn_out must be y itself without an activation (and present); conv_out is the unfused
    // chain's.
    for bn_out in [Some(like(&ctx, &good.y)), None] {
        let bad = GpuQatForward {
            bn_out,
            ..good.clone()
        };
        names(run(&bad), "conv_bn_qat_forward output bn_out");
    }
    // The fused forward keeps no bn_out under ReLU / ReLU6 and needs one under Hardswish.
    for (act, bn_out) in [
        (Activation::Relu, Some(like(&ctx, &good.y))),
        (Activation::Relu6, Some(like(&ctx, &good.y))),
        (Activation::Hardswish, None),
    ] {
        let cfg = qat_cfg(act, QScheme::PerChannelSymmetric);
        let bad = GpuQatForward {
            y: like(&ctx, &good.y),
            bn_out,
            ..good.clone()
        };
        let e =
            cb::conv_bn_qat_forward_into(&ctx, &l.x, &conv, &l.bn, 0.1, &cfg, &bad).unwrap_err();
        names(e, "conv_bn_qat_forward output bn_out");
    }
    let bad = GpuQatForward {
        conv_out: Some(like(&ctx, &good.y)),
        ..good.clone()
    };
    names(run(&bad), "conv_bn_qat_forward output conv_out");
    let e = cb::conv_bn_qat_forward_unfused_into(&ctx, &l.x, &conv, &l.bn, 0.1, &cfg, &good)
        .unwrap_err();
    names(e, "conv_bn_qat_forward output conv_out");
    // Two outputs sharing a buffer.
    let bad = GpuQatForward {
        inv_scale_factor: good.scale_factor.clone(),
        ..good.clone()
    };
    names(run(&bad), "conv_bn_qat_forward output inv_scale_factor");

    // A copy destination (W_q = W_s with fake quant off) without COPY_DST: refused before
    // anything is launched.
    let weight = GpuQatWeight {
        qparams: None,
        fake_quant_enabled: false,
        finite_zero_gamma: true,
    };
    let mut bad = good.clone();
    let buffer = ctx.device().create_buffer(&qfuse::wgpu::BufferDescriptor {
        label: Some("storage only"),
        size: (good.weight_q.len() * 4) as u64,
        usage: qfuse::wgpu::BufferUsages::STORAGE | qfuse::wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    bad.weight_q = GpuTensor::from_buffer(&ctx, buffer, good.weight_q.shape(), DType::F32).unwrap();
    let e = cb::conv_bn_qat_forward_with_into(&ctx, &l.x, &conv, &l.bn, 0.1, &cfg, &weight, &bad)
        .unwrap_err();
    assert!(matches!(e, Error::MissingBufferUsage { .. }), "{e}");
    assert_eq!(
        good.y.download_u32_bits(&ctx).unwrap(),
        zeros,
        "y untouched"
    );

    // The backward.
    let dy = rng.up(&ctx, fwd.y.shape(), -1.0, 1.0);
    let saved = fwd.saved();
    let grads = cb::conv_bn_qat_backward(&ctx, &l.x, &dy, &conv, &l.bn, &cfg, &saved).unwrap();
    let good = mirror_grads(&ctx, &grads);
    let run = |conv: &GpuConv2d, out: &GpuQatGrads| {
        cb::conv_bn_qat_backward_into(&ctx, &l.x, &dy, conv, &l.bn, &cfg, &saved, out).unwrap_err()
    };
    let bad = GpuQatGrads {
        dx: caller_tensor(&ctx, &[2, 3, 6, 7], DType::F32),
        ..good.clone()
    };
    let e = run(&conv, &bad);
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    names(e, "conv_bn_qat_backward output dx");
    let bad = GpuQatGrads {
        dbn_weight: caller_tensor(&other, &[4], DType::F32),
        ..good.clone()
    };
    let e = run(&conv, &bad);
    assert!(matches!(e, Error::ContextMismatch { .. }), "{e}");
    names(e, "conv_bn_qat_backward output dbn_weight");
    let bad = GpuQatGrads {
        dbias: None,
        ..good.clone()
    };
    names(run(&conv, &bad), "conv_bn_qat_backward output dbias");
    names(
        run(&l.conv(false), &good),
        "conv_bn_qat_backward output dbias",
    );
    let bad = GpuQatGrads {
        dweight: dy.clone(),
        ..good.clone()
    };
    names(run(&conv, &bad), "conv_bn_qat_backward output dweight");
}

fn codes(rng: &mut Rng, shape: &[usize]) -> ArrayD<i8> {
    let n = shape.iter().product();
    let v = rng.vec(n, -128.0, 127.99);
    ArrayD::from_shape_vec(IxDyn(shape), v.iter().map(|&f| f.floor() as i8).collect()).unwrap()
}

/// A caller-owned int8 output of logical `shape`.
fn caller_codes(ctx: &GpuContext, shape: &[usize]) -> GpuInt8Tensor {
    let n = k8::packed_words(shape);
    GpuInt8Tensor::from_words(caller_tensor(ctx, &[n], DType::U32), shape).unwrap()
}

/// `conv2d_int8_into` and `linear_int8_into` write what `conv2d_int8` and `linear_int8`
/// return, and refuse unfit outputs before packing the weights.
fn int8_into_matches_and_refuses() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(4);
    let x = GpuInt8Tensor::upload(&ctx, &codes(&mut rng, &[2, 5, 6, 6])).unwrap();
    let w = codes(&mut rng, &[6, 5, 3, 3])
        .into_dimensionality::<ndarray::Ix4>()
        .unwrap();
    let w: Array4<i8> = w.mapv(|v| v.max(-127));
    let bias = Array1::from((0..6).map(|i| i * 100 - 250).collect::<Vec<i32>>());
    let params = Conv2dParams {
        stride: [2, 2],
        padding: [1, 1],
        ..Default::default()
    };
    let rq = Requant::new(&[2e-3; 6], RequantMode::Float, 3, (-128, 127)).unwrap();
    let want = k8::conv2d_int8(&ctx, &x, 2, &w, Some(&bias), &params, &rq).unwrap();
    let out = caller_codes(&ctx, want.shape());
    k8::conv2d_int8_into(&ctx, &x, 2, &w, Some(&bias), &params, &rq, &out).unwrap();
    assert_eq!(out.download(&ctx).unwrap(), want.download(&ctx).unwrap());
    let e = k8::conv2d_int8_into(
        &ctx,
        &x,
        2,
        &w,
        Some(&bias),
        &params,
        &rq,
        &caller_codes(&ctx, &[2, 6, 3, 4]),
    )
    .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    names(e, "conv2d int8 output");
    let other = second_context();
    let e = k8::conv2d_int8_into(
        &ctx,
        &x,
        2,
        &w,
        Some(&bias),
        &params,
        &rq,
        &caller_codes(&other, want.shape()),
    )
    .unwrap_err();
    assert!(matches!(e, Error::ContextMismatch { .. }), "{e}");
    names(e, "conv2d int8 output");

    let x = GpuInt8Tensor::upload(&ctx, &codes(&mut rng, &[3, 10])).unwrap();
    let w: Array2<i8> = codes(&mut rng, &[7, 10])
        .into_dimensionality::<ndarray::Ix2>()
        .unwrap()
        .mapv(|v| v.max(-127));
    let rq = Requant::new(&[4e-3; 7], RequantMode::FixedPoint, -1, (-128, 127)).unwrap();
    let want = k8::linear_int8(&ctx, &x, -3, &w, None, &rq).unwrap();
    let out = caller_codes(&ctx, want.shape());
    k8::linear_int8_into(&ctx, &x, -3, &w, None, &rq, &out).unwrap();
    assert_eq!(out.download(&ctx).unwrap(), want.download(&ctx).unwrap());
    let e = k8::linear_int8_into(&ctx, &x, -3, &w, None, &rq, &caller_codes(&ctx, &[3, 8]))
        .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    names(e, "linear int8 output");
    let e = k8::linear_int8_into(
        &ctx,
        &x,
        -3,
        &w,
        None,
        &rq,
        &caller_codes(&other, want.shape()),
    )
    .unwrap_err();
    assert!(matches!(e, Error::ContextMismatch { .. }), "{e}");
    names(e, "linear int8 output");
}

/// The smaller `_into` forms (correctly rounded division, BatchNorm backward without an
/// activation, conv with a chosen algorithm, prepared int8 layers with a chosen dot-product
/// path) write what their allocating forms return, and refuse a wrong-size output.
fn small_into_forms_match() {
    use qfuse::gpu::Int8Dot;
    use qfuse::kernels::batch_norm as kbn;
    use qfuse::kernels::conv2d::{self as kc, ConvAlgorithm, ConvEpilogue};
    use qfuse::kernels::observer;
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(5);
    let a = rng.up(&ctx, &[7], -3.0, 3.0);
    let b = rng.up(&ctx, &[7], 0.5, 2.0);
    let want = observer::div_rn(&ctx, &a, &b).unwrap();
    let out = like(&ctx, &want);
    observer::div_rn_into(&ctx, &a, &b, &out).unwrap();
    same_bits(&ctx, "div_rn", &out, &want);
    let e =
        observer::div_rn_into(&ctx, &a, &b, &caller_tensor(&ctx, &[6], DType::F32)).unwrap_err();
    names(e, "div_rn output");

    let l = Layer::new(&ctx, &mut rng);
    let y =
        cb::conv_bn_act_eval_unfused(&ctx, &l.x, &l.conv(true), &l.bn, Activation::None).unwrap();
    let fwd = kbn::batch_norm2d(&ctx, &y, &l.bn, 0.1, true, Activation::None, false).unwrap();
    let dy = rng.up(&ctx, y.shape(), -1.0, 1.0);
    let want = kbn::batch_norm2d_backward(&ctx, &y, &dy, &l.bn, &fwd.stats.stats, true).unwrap();
    let out = kbn::GpuBatchNormGrads {
        dx: like(&ctx, &want.dx),
        dparams: like(&ctx, &want.dparams),
    };
    kbn::batch_norm2d_backward_into(&ctx, &y, &dy, &l.bn, &fwd.stats.stats, true, &out).unwrap();
    same_bits(&ctx, "bn backward dx", &out.dx, &want.dx);
    same_bits(&ctx, "bn backward dparams", &out.dparams, &want.dparams);

    for algorithm in [ConvAlgorithm::ImplicitGemm, ConvAlgorithm::Direct] {
        let ep = ConvEpilogue::none();
        let want = kc::conv2d_with_algorithm(&ctx, &l.x, &l.w, &l.params, &ep, algorithm).unwrap();
        let out = like(&ctx, &want);
        kc::conv2d_with_algorithm_into(&ctx, &l.x, &l.w, &l.params, &ep, algorithm, &out).unwrap();
        same_bits(&ctx, &format!("conv2d {algorithm:?}"), &out, &want);
        let e = kc::conv2d_with_algorithm_into(
            &ctx,
            &l.x,
            &l.w,
            &l.params,
            &ep,
            algorithm,
            &caller_tensor(&ctx, &[2, 4, 6], DType::F32),
        )
        .unwrap_err();
        assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    }

    let x = GpuInt8Tensor::upload(&ctx, &codes(&mut rng, &[2, 5, 6, 6])).unwrap();
    let w: Array4<i8> = codes(&mut rng, &[3, 5, 3, 3])
        .into_dimensionality::<ndarray::Ix4>()
        .unwrap()
        .mapv(|v| v.max(-127));
    let rq = Requant::new(&[3e-3; 3], RequantMode::Float, 0, (-128, 127)).unwrap();
    let params = Conv2dParams::default();
    let layer = k8::GpuConv2dInt8::new(&ctx, 1, &w, None, &params, &rq).unwrap();
    let want = layer.forward_with(&ctx, &x, Int8Dot::Portable).unwrap();
    let out = caller_codes(&ctx, want.shape());
    layer
        .forward_with_into(&ctx, &x, Int8Dot::Portable, &out)
        .unwrap();
    assert_eq!(out.download(&ctx).unwrap(), want.download(&ctx).unwrap());
    let e = layer
        .forward_with_into(
            &ctx,
            &x,
            Int8Dot::Portable,
            &caller_codes(&ctx, &[2, 3, 4, 3]),
        )
        .unwrap_err();
    names(e, "conv2d int8 output");

    let x = GpuInt8Tensor::upload(&ctx, &codes(&mut rng, &[2, 9])).unwrap();
    let w: Array2<i8> = codes(&mut rng, &[5, 9])
        .into_dimensionality::<ndarray::Ix2>()
        .unwrap()
        .mapv(|v| v.max(-127));
    let rq = Requant::new(&[5e-3; 5], RequantMode::Float, 0, (-128, 127)).unwrap();
    let layer = k8::GpuLinearInt8::new(&ctx, 1, &w, None, &rq).unwrap();
    let want = layer.forward_with(&ctx, &x, Int8Dot::Portable).unwrap();
    let out = caller_codes(&ctx, want.shape());
    layer
        .forward_with_into(&ctx, &x, Int8Dot::Portable, &out)
        .unwrap();
    assert_eq!(out.download(&ctx).unwrap(), want.download(&ctx).unwrap());
    let e = layer
        .forward_with_into(&ctx, &x, Int8Dot::Portable, &caller_codes(&ctx, &[2, 4]))
        .unwrap_err();
    names(e, "linear int8 output");
}

crate::qfuse_tests! {
    conv_bn_eval_into_matches_and_refuses: gpu,
    conv_bn_qat_into_matches: gpu,
    conv_bn_qat_into_refuses: gpu,
    int8_into_matches_and_refuses: gpu,
    small_into_forms_match: gpu,
}
