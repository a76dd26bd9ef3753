//! The caller-buffer (`_into`) forms of the training launchers (`kernels::train`): each
//! writes into tensors over the caller's own `wgpu::Buffer`s (filled with garbage first) what
//! its allocating form returns, bit for bit, and refuses an unfit output — wrong shape, wrong
//! dtype, another context, a buffer shared with an input or another output, a missing
//! `COPY_DST` where the kernel zero-fills — with a typed error naming that output, through
//! the one shared check (`kernels::check_output`).

use crate::common;

use qfuse::gpu::{DType, GpuContext, GpuTensor};
use qfuse::kernels::train as k;
use qfuse::ops::{Conv2dParams, PadMode};
use qfuse::wgpu::BufferUsages;
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
    fn up(&mut self, ctx: &GpuContext, shape: &[usize], lo: f32, hi: f32) -> GpuTensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| lo + (hi - lo) * self.next()).collect();
        GpuTensor::from_slice_f32(ctx, &v, shape).unwrap()
    }
}

/// A tensor over a buffer the test (the "engine") created with `usage`, filled with a
/// non-zero pattern so that an element the kernel failed to write shows.
fn caller_with(ctx: &GpuContext, shape: &[usize], dtype: DType, usage: BufferUsages) -> GpuTensor {
    let n: usize = shape.iter().product::<usize>().max(1);
    let buffer = ctx.device().create_buffer(&qfuse::wgpu::BufferDescriptor {
        label: Some("caller's output"),
        size: (n * 4) as u64,
        usage,
        mapped_at_creation: true,
    });
    {
        let pattern: Vec<u8> = (0..n).flat_map(|_| 0x7f7f_7f7fu32.to_le_bytes()).collect();
        let mut view = buffer.slice(..).get_mapped_range_mut().unwrap();
        view.copy_from_slice(&pattern);
    }
    buffer.unmap();
    GpuTensor::from_buffer(ctx, buffer, shape, dtype).unwrap()
}

fn caller(ctx: &GpuContext, shape: &[usize]) -> GpuTensor {
    caller_with(
        ctx,
        shape,
        DType::F32,
        BufferUsages::STORAGE | BufferUsages::COPY_SRC | BufferUsages::COPY_DST,
    )
}

fn like(ctx: &GpuContext, t: &GpuTensor) -> GpuTensor {
    caller(ctx, t.shape())
}

/// Both tensors hold the same bits.
fn same_bits(ctx: &GpuContext, what: &str, got: &GpuTensor, want: &GpuTensor) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let bits = |t: &GpuTensor| -> Vec<u32> {
        t.download_f32(ctx)
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    assert_eq!(bits(got), bits(want), "{what}: bits differ");
}

/// `e` is of the expected kind and its text names `what`.
fn refused(e: Error, kind: fn(&Error) -> bool, what: &str) {
    let text = e.to_string();
    assert!(kind(&e), "unexpected error kind: {text}");
    assert!(text.contains(what), "`{text}` does not name `{what}`");
}

fn shape_err(e: &Error) -> bool {
    matches!(e, Error::ShapeMismatch { .. })
}
fn invalid(e: &Error) -> bool {
    matches!(e, Error::InvalidArgument(_))
}
fn context_err(e: &Error) -> bool {
    matches!(e, Error::ContextMismatch { .. })
}

fn grad_kernels(ctx: &GpuContext) -> Vec<k::GradKernel> {
    let mut v = vec![k::GradKernel::Auto, k::GradKernel::Portable];
    if ctx.has_subgroups() {
        v.push(k::GradKernel::Subgroup);
    }
    v
}

/// Max pooling backward into a caller's buffer: both kernels (one invocation per window,
/// which writes only each argmax into a zero-filled dx; one per input element), the ragged
/// edge under no window included.
fn max_pool2d_backward_into_matches_and_refuses() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(1);
    for (shape, kernel, stride) in [([1, 2, 7, 9], 2, 2), ([1, 2, 7, 9], 3, 2)] {
        let x = rng.up(&ctx, &shape, -1.0, 1.0);
        let (oh, ow) = (
            (shape[2] - kernel) / stride + 1,
            (shape[3] - kernel) / stride + 1,
        );
        let dy = rng.up(&ctx, &[1, 2, oh, ow], -1.0, 1.0);
        let want = k::max_pool2d_backward(&ctx, &x, &dy, kernel, stride).unwrap();
        let dx = like(&ctx, &want);
        k::max_pool2d_backward_into(&ctx, &x, &dy, kernel, stride, &dx).unwrap();
        same_bits(
            &ctx,
            &format!("max_pool2d_backward k{kernel} s{stride}"),
            &dx,
            &want,
        );

        let what = "max_pool2d_backward dx";
        let e = k::max_pool2d_backward_into(
            &ctx,
            &x,
            &dy,
            kernel,
            stride,
            &caller(&ctx, &[1, 2, 7, 8]),
        )
        .unwrap_err();
        refused(e, shape_err, what);
        let e = k::max_pool2d_backward_into(&ctx, &x, &dy, kernel, stride, &x).unwrap_err();
        refused(e, invalid, what);
        let u = caller_with(&ctx, &shape, DType::U32, BufferUsages::STORAGE);
        let e = k::max_pool2d_backward_into(&ctx, &x, &dy, kernel, stride, &u).unwrap_err();
        refused(e, invalid, what);
        // Without COPY_DST: refused where the kernel zero-fills dx, accepted where it
        // writes every element.
        let no_dst = caller_with(
            &ctx,
            &shape,
            DType::F32,
            BufferUsages::STORAGE | BufferUsages::COPY_SRC,
        );
        let r = k::max_pool2d_backward_into(&ctx, &x, &dy, kernel, stride, &no_dst);
        if kernel == stride {
            let e = r.unwrap_err();
            assert!(matches!(e, Error::MissingBufferUsage { .. }), "{e}");
        } else {
            r.unwrap();
            same_bits(&ctx, "max_pool2d_backward without COPY_DST", &no_dst, &want);
        }
    }
}

/// Linear backward into caller buffers, with each matmul kernel.
fn linear_backward_into_matches_and_refuses() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(2);
    // Batch 3 = 3 outputs: dx and dweight have one shape, so they could share a buffer.
    let x = rng.up(&ctx, &[3, 7], -1.0, 1.0);
    let w = rng.up(&ctx, &[3, 7], -0.5, 0.5);
    let dy = rng.up(&ctx, &[3, 3], -1.0, 1.0);
    let mirror = |g: &k::GpuLinearGrads| k::GpuLinearGrads {
        dx: like(&ctx, &g.dx),
        dweight: like(&ctx, &g.dweight),
        dbias: like(&ctx, &g.dbias),
    };
    for kernel in grad_kernels(&ctx) {
        let want = k::linear_backward_with(&ctx, &x, &w, &dy, kernel).unwrap();
        let out = mirror(&want);
        k::linear_backward_with_into(&ctx, &x, &w, &dy, kernel, &out).unwrap();
        let what = format!("linear_backward {kernel:?}");
        same_bits(&ctx, &format!("{what} dx"), &out.dx, &want.dx);
        same_bits(
            &ctx,
            &format!("{what} dweight"),
            &out.dweight,
            &want.dweight,
        );
        same_bits(&ctx, &format!("{what} dbias"), &out.dbias, &want.dbias);
    }
    let want = k::linear_backward(&ctx, &x, &w, &dy).unwrap();
    let good = mirror(&want);
    k::linear_backward_into(&ctx, &x, &w, &dy, &good).unwrap();
    same_bits(&ctx, "linear_backward dx", &good.dx, &want.dx);

    let run = |g: &k::GpuLinearGrads| k::linear_backward_into(&ctx, &x, &w, &dy, g).unwrap_err();
    let bad = k::GpuLinearGrads {
        dbias: caller(&ctx, &[4]),
        ..good.clone()
    };
    refused(run(&bad), shape_err, "linear_backward dbias");
    let bad = k::GpuLinearGrads {
        dweight: good.dx.clone(),
        ..good.clone()
    };
    refused(run(&bad), invalid, "linear_backward dweight");
    let bad = k::GpuLinearGrads {
        dx: caller(&ctx, &[3, 6]),
        ..good.clone()
    };
    refused(run(&bad), shape_err, "linear_backward dx");
    let bad = k::GpuLinearGrads {
        dx: x.clone(),
        ..good.clone()
    };
    refused(run(&bad), invalid, "linear_backward dx");
    let other = GpuContext::new().expect("a second context on the test adapter");
    let bad = k::GpuLinearGrads {
        dweight: caller(&other, &[3, 7]),
        ..good.clone()
    };
    refused(run(&bad), context_err, "linear_backward dweight");
}

/// The loss ops, `log_softmax` backward, `add` and `swap01` into caller buffers.
fn loss_and_elementwise_into_match_and_refuse() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(3);
    let z = rng.up(&ctx, &[6, 4], -3.0, 3.0);
    let logp = qfuse::kernels::pool::log_softmax(&ctx, &z).unwrap();
    let labels = k::upload_labels(&ctx, &[0, 3, 1, 2, 2, 0], 4).unwrap();
    let dy = rng.up(&ctx, &[6, 4], -1.0, 1.0);

    let want = k::log_softmax_backward(&ctx, &logp, &dy).unwrap();
    let out = like(&ctx, &want);
    k::log_softmax_backward_into(&ctx, &logp, &dy, &out).unwrap();
    same_bits(&ctx, "log_softmax_backward", &out, &want);
    let e = k::log_softmax_backward_into(&ctx, &logp, &dy, &caller(&ctx, &[4, 6])).unwrap_err();
    refused(e, shape_err, "log_softmax_backward dx");
    let e = k::log_softmax_backward_into(&ctx, &logp, &dy, &dy).unwrap_err();
    refused(e, invalid, "log_softmax_backward dx");

    let want = k::nll_loss(&ctx, &logp, &labels).unwrap();
    let out = like(&ctx, &want);
    k::nll_loss_into(&ctx, &logp, &labels, &out).unwrap();
    same_bits(&ctx, "nll_loss", &out, &want);
    let e = k::nll_loss_into(&ctx, &logp, &labels, &caller(&ctx, &[2])).unwrap_err();
    refused(e, shape_err, "nll_loss output");
    let u = caller_with(&ctx, &[1], DType::U32, BufferUsages::STORAGE);
    let e = k::nll_loss_into(&ctx, &logp, &labels, &u).unwrap_err();
    refused(e, invalid, "nll_loss output");

    let want = k::nll_loss_backward(&ctx, &logp, &labels).unwrap();
    let out = like(&ctx, &want);
    k::nll_loss_backward_into(&ctx, &logp, &labels, &out).unwrap();
    same_bits(&ctx, "nll_loss_backward", &out, &want);
    let e = k::nll_loss_backward_into(&ctx, &logp, &labels, &caller(&ctx, &[6, 3])).unwrap_err();
    refused(e, shape_err, "nll_loss_backward output");

    let want = k::log_softmax_nll_backward(&ctx, &logp, &labels).unwrap();
    let out = like(&ctx, &want);
    k::log_softmax_nll_backward_into(&ctx, &logp, &labels, &out).unwrap();
    same_bits(&ctx, "log_softmax_nll_backward", &out, &want);
    let e = k::log_softmax_nll_backward_into(&ctx, &logp, &labels, &logp).unwrap_err();
    refused(e, invalid, "log_softmax_nll_backward output");

    let want = k::add(&ctx, &z, &dy).unwrap();
    let out = like(&ctx, &want);
    k::add_into(&ctx, &z, &dy, &out).unwrap();
    same_bits(&ctx, "add", &out, &want);
    let e = k::add_into(&ctx, &z, &dy, &caller(&ctx, &[24])).unwrap_err();
    refused(e, shape_err, "add output");
    let e = k::add_into(&ctx, &z, &dy, &z).unwrap_err();
    refused(e, invalid, "add output");

    let a = rng.up(&ctx, &[2, 3, 5], -1.0, 1.0);
    let want = k::swap01(&ctx, &a).unwrap();
    let out = like(&ctx, &want);
    k::swap01_into(&ctx, &a, &out).unwrap();
    same_bits(&ctx, "swap01", &out, &want);
    let e = k::swap01_into(&ctx, &a, &caller(&ctx, &[2, 3, 5])).unwrap_err();
    refused(e, shape_err, "swap01 output");
    let other = GpuContext::new().expect("a second context on the test adapter");
    let e = k::swap01_into(&ctx, &a, &caller(&other, &[3, 2, 5])).unwrap_err();
    refused(e, context_err, "swap01 output");
}

/// The conv input and weight gradients into caller buffers, with each kernel choice, on the
/// fast forms (stride 1) and the fallbacks (stride 2; `same` padding with an even kernel).
fn conv_grads_into_match_and_refuse() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(4);
    let stride2 = Conv2dParams {
        padding: [1, 1],
        stride: [2, 2],
        ..Default::default()
    };
    let same = Conv2dParams {
        pad_mode: PadMode::Same,
        ..Default::default()
    };
    let pad1 = Conv2dParams {
        padding: [1, 1],
        ..Default::default()
    };
    for (xs, ws, params) in [
        ([2, 3, 7, 6], [4, 3, 3, 3], pad1),
        ([2, 1, 12, 12], [5, 1, 5, 5], Conv2dParams::default()),
        ([2, 3, 9, 9], [4, 3, 3, 3], stride2),
        ([1, 3, 8, 8], [4, 3, 4, 4], same),
    ] {
        let out = params.output_shape(&xs, &ws).unwrap();
        let x = rng.up(&ctx, &xs, -1.0, 1.0);
        let w = rng.up(&ctx, &ws, -0.5, 0.5);
        let dy = rng.up(&ctx, &out, -1.0, 1.0);
        for kernel in grad_kernels(&ctx) {
            let what = format!("x {xs:?} w {ws:?} {params:?} {kernel:?}");
            let want = k::conv2d_input_grad_with(&ctx, &dy, &w, &params, xs, kernel).unwrap();
            let dx = like(&ctx, &want);
            k::conv2d_input_grad_with_into(&ctx, &dy, &w, &params, xs, kernel, &dx).unwrap();
            same_bits(&ctx, &format!("dx {what}"), &dx, &want);
            let want = k::conv2d_weight_grad_with(&ctx, &x, &dy, &params, ws, kernel).unwrap();
            let dw = like(&ctx, &want);
            k::conv2d_weight_grad_with_into(&ctx, &x, &dy, &params, ws, kernel, &dw).unwrap();
            same_bits(&ctx, &format!("dweight {what}"), &dw, &want);
        }
        let want = k::conv2d_input_grad(&ctx, &dy, &w, &params, xs).unwrap();
        let dx = like(&ctx, &want);
        k::conv2d_input_grad_into(&ctx, &dy, &w, &params, xs, &dx).unwrap();
        same_bits(&ctx, "dx", &dx, &want);
        let want = k::conv2d_weight_grad(&ctx, &x, &dy, &params, ws).unwrap();
        let dw = like(&ctx, &want);
        k::conv2d_weight_grad_into(&ctx, &x, &dy, &params, ws, &dw).unwrap();
        same_bits(&ctx, "dweight", &dw, &want);

        // A dx one row short or of another context, a dweight of the wrong shape or dtype.
        let short = [xs[0], xs[1], xs[2] - 1, xs[3]];
        let e = k::conv2d_input_grad_into(&ctx, &dy, &w, &params, xs, &caller(&ctx, &short))
            .unwrap_err();
        refused(e, shape_err, "conv2d_backward dx");
        let other = GpuContext::new().expect("a second context on the test adapter");
        let e = k::conv2d_input_grad_into(&ctx, &dy, &w, &params, xs, &caller(&other, &xs))
            .unwrap_err();
        refused(e, context_err, "conv2d_backward dx");
        let e = k::conv2d_weight_grad_into(&ctx, &x, &dy, &params, ws, &caller(&ctx, &out))
            .unwrap_err();
        refused(e, shape_err, "conv2d_backward dweight");
        let u = caller_with(&ctx, &ws, DType::U32, BufferUsages::STORAGE);
        let e = k::conv2d_weight_grad_into(&ctx, &x, &dy, &params, ws, &u).unwrap_err();
        refused(e, invalid, "conv2d_backward dweight");
    }
}

/// A caller's buffer too small for the output cannot become a tensor of the output's shape,
/// and a tensor of a smaller shape over it is refused by the shared check.
fn too_small_buffers_are_refused() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(5);
    let a = rng.up(&ctx, &[4, 6], -1.0, 1.0);
    let b = rng.up(&ctx, &[4, 6], -1.0, 1.0);
    let buffer = ctx.device().create_buffer(&qfuse::wgpu::BufferDescriptor {
        label: Some("too small"),
        size: 16 * 4,
        usage: BufferUsages::STORAGE | BufferUsages::COPY_SRC | BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let e = GpuTensor::from_buffer(&ctx, buffer.clone(), &[4, 6], DType::F32).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert!(e.to_string().contains("too small"), "{e}");
    let small = GpuTensor::from_buffer(&ctx, buffer, &[4, 4], DType::F32).unwrap();
    let e = k::add_into(&ctx, &a, &b, &small).unwrap_err();
    refused(e, shape_err, "add output");
    // A buffer without STORAGE cannot be an output at all.
    let buffer = ctx.device().create_buffer(&qfuse::wgpu::BufferDescriptor {
        label: Some("copy only"),
        size: 24 * 4,
        usage: BufferUsages::COPY_SRC | BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let e = GpuTensor::from_buffer(&ctx, buffer, &[4, 6], DType::F32).unwrap_err();
    assert!(matches!(e, Error::MissingBufferUsage { .. }), "{e}");
}

crate::qfuse_tests! {
    max_pool2d_backward_into_matches_and_refuses: gpu,
    linear_backward_into_matches_and_refuses: gpu,
    loss_and_elementwise_into_match_and_refuse: gpu,
    conv_grads_into_match_and_refuse: gpu,
    too_small_buffers_are_refused: gpu,
}
