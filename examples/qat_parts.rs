//! Times the parts of the fused ConvBnReLU2d QAT step at one conv shape, each alone and
//! waited for, against the plain conv forward, so the passes above the two conv gradients can
//! be judged:
//!
//! ```sh
//! WGPU_BACKEND=vulkan cargo run --release --example qat_parts -- N C SIZE [depthwise] [RUNS]
//! ```
//!
//! A 3×3 conv, stride 1, padding 1, `C` channels in and out (`depthwise`: `C` groups); prints
//! the median milliseconds of the plain conv, the QAT forward and its conv alone (W_q, the
//! 1/s epilogue), the QAT backward, and the
//! backward's BatchNorm backward (ReLU mask and divide by `s` folded in), input gradient and
//! weight gradient alone; the rest of the backward (divide-back reductions, weight STE) is the
//! backward minus those three. Then, where the adapter has timestamp queries, one forward
//! and one backward pass by pass ([`GpuContext::end_kernel_timing_passes`]).

use std::time::Instant;

use ndarray::{Array1, ArrayD, IxDyn};
use qfuse::gpu::{GpuContext, GpuTensor};
use qfuse::kernels::batch_norm::batch_norm2d_backward_act;
use qfuse::kernels::conv2d::{conv2d, ConvEpilogue};
use qfuse::kernels::conv_bn::{conv_bn_qat_backward, conv_bn_qat_forward, GpuConv2d};
use qfuse::kernels::train::{conv2d_input_grad, conv2d_weight_grad};
use qfuse::kernels::GpuBatchNorm;
use qfuse::ops::{Activation, BatchNorm, Conv2dParams, QatConfig};
use qfuse::quant::{ObserverSpec, QDtype, QScheme, QuantRange};

fn pattern(n: usize, scale: f32, offset: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 * 0.618).fract() - 0.5) * scale + offset)
        .collect()
}

fn tensor(ctx: &GpuContext, shape: &[usize], scale: f32) -> qfuse::Result<GpuTensor> {
    let n = shape.iter().product();
    let a = ArrayD::from_shape_vec(IxDyn(shape), pattern(n, scale, 0.0))
        .map_err(|e| qfuse::Error::invalid(format!("shape: {e}")))?;
    GpuTensor::upload_f32(ctx, &a)
}

/// Median milliseconds of `runs` runs of `f` (after one warm-up), each waited for.
fn time(
    ctx: &GpuContext,
    runs: usize,
    mut f: impl FnMut() -> qfuse::Result<()>,
) -> qfuse::Result<f64> {
    f()?;
    ctx.wait()?;
    let mut ms = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        ctx.wait()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms[ms.len() / 2])
}

fn main() -> qfuse::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "arguments: N C SIZE [depthwise] [RUNS]";
    let num = |s: &String| {
        s.parse::<usize>()
            .map_err(|e| qfuse::Error::invalid(format!("{usage}: {e}")))
    };
    if args.len() < 3 {
        return Err(qfuse::Error::invalid(usage));
    }
    let (n, c, size) = (num(&args[0])?, num(&args[1])?, num(&args[2])?);
    let depthwise = args.get(3).is_some_and(|a| a == "depthwise");
    let runs = match args.get(if depthwise { 4 } else { 3 }) {
        Some(r) => num(r)?.max(1),
        None => 5,
    };
    let ctx = GpuContext::new()?;
    let params = Conv2dParams {
        padding: [1, 1],
        groups: if depthwise { c } else { 1 },
        ..Conv2dParams::default()
    };
    let ws = [c, if depthwise { 1 } else { c }, 3, 3];
    let x = tensor(&ctx, &[n, c, size, size], 2.0)?;
    let w = tensor(&ctx, &ws, 2.0 * (3.0 / (ws[1] * 9) as f32).sqrt())?;
    let bn = GpuBatchNorm::upload(
        &ctx,
        &BatchNorm {
            weight: Some(Array1::from(pattern(c, 1.0, 1.0))),
            bias: Some(Array1::from(pattern(c, 0.4, 0.0))),
            running_mean: Array1::from(pattern(c, 0.2, 0.0)),
            running_var: Array1::from(pattern(c, 1.5, 1.25)),
            eps: 1e-5,
            momentum: 0.1,
        },
    )?;
    let layer = GpuConv2d {
        weight: &w,
        bias: None,
        params,
    };
    let cfg = QatConfig {
        activation: Activation::Relu,
        freeze_bn: false,
        weight_observer: ObserverSpec::new(
            QDtype::QInt8,
            QScheme::PerChannelSymmetric,
            QuantRange::INT8,
            0,
        )?,
    };
    let fwd = conv_bn_qat_forward(&ctx, &x, &layer, &bn, 0.1, &cfg)?;
    let dy = tensor(&ctx, fwd.y.shape(), 2.0)?;
    let saved = fwd.saved();
    let out = fwd.y.shape().to_vec();
    let x_shape = [n, c, size, size];

    let conv = time(&ctx, runs, || {
        conv2d(&ctx, &x, &w, &params, &ConvEpilogue::none()).map(drop)
    })?;
    let forward = time(&ctx, runs, || {
        conv_bn_qat_forward(&ctx, &x, &layer, &bn, 0.1, &cfg).map(drop)
    })?;
    let backward = time(&ctx, runs, || {
        conv_bn_qat_backward(&ctx, &x, &dy, &layer, &bn, &cfg, &saved).map(drop)
    })?;
    let bn_back = time(&ctx, runs, || {
        batch_norm2d_backward_act(
            &ctx,
            saved.bn_input,
            &dy,
            &bn,
            saved.stats,
            true,
            cfg.activation,
            Some(saved.act_input),
            Some(saved.scale_factor),
        )
        .map(drop)
    })?;
    let inv_s = tensor(&ctx, &[c], 0.5)?;
    let conv_epilogue = time(&ctx, runs, || {
        let epilogue = ConvEpilogue {
            out_scale: Some(&inv_s),
            bias: None,
            activation: Activation::None,
        };
        conv2d(&ctx, &x, saved.weight_q, &params, &epilogue).map(drop)
    })?;
    let g = tensor(&ctx, &out, 0.01)?;
    let dx = time(&ctx, runs, || {
        conv2d_input_grad(&ctx, &g, saved.weight_q, &params, x_shape).map(drop)
    })?;
    let dw = time(&ctx, runs, || {
        conv2d_weight_grad(&ctx, &x, &g, &params, ws).map(drop)
    })?;
    println!(
        "{} — QAT ConvBnReLU2d {n}x{c}x{size}x{size}{}, median of {runs} (ms; x = over the conv)",
        ctx.name(),
        if depthwise { " depthwise" } else { "" }
    );
    let row = |name: &str, ms: f64| println!("{name:<34} {ms:9.3} ms {:6.2}x", ms / conv);
    row("conv forward", conv);
    row("QAT forward", forward);
    row("  its conv (W_q, 1/s epilogue)", conv_epilogue);
    row("QAT backward", backward);
    row("  BatchNorm backward (+mask, /s)", bn_back);
    row("  input gradient", dx);
    row("  weight gradient", dw);
    row("  rest (divide-back, STE)", backward - bn_back - dx - dw);
    row("forward + backward", forward + backward);
    // Where the step's device time goes, pass by pass (GPU timestamps), where the adapter
    // has them: one QAT forward and one backward.
    if ctx.has_timestamps() {
        for (what, step) in [("forward", true), ("backward", false)] {
            ctx.begin_kernel_timing(256)?;
            if step {
                conv_bn_qat_forward(&ctx, &x, &layer, &bn, 0.1, &cfg)?;
            } else {
                conv_bn_qat_backward(&ctx, &x, &dy, &layer, &bn, &cfg, &saved)?;
            }
            println!("QAT {what}, pass by pass (GPU ms):");
            for p in ctx.end_kernel_timing_passes()? {
                println!("  {:9.3}  {}", p.gpu_ms, p.kernels);
            }
        }
    }
    Ok(())
}
