//! Times the parts of a BatchNorm2d training step at one NCHW shape, each alone and waited
//! for, against an elementwise pass over the same tensor (`activation` with no activation: read
//! x, write y, the same bytes as the normalize), so the reduction's cost can be judged:
//!
//! ```sh
//! WGPU_BACKEND=vulkan cargo run --release --example bn_parts -- N C H W [RUNS]
//! ```
//!
//! Prints the reduction layout and the median milliseconds of: the elementwise pass, the
//! training statistics alone (`batch_stats`), the normalize alone, the fused forward
//! (`batch_norm2d`), the training backward (`batch_norm2d_backward`), and the backward with a
//! ReLU mask, a per-channel divisor, and both (`batch_norm2d_backward_act`, as the QAT
//! backward runs it).

use std::time::Instant;

use ndarray::{Array1, ArrayD, IxDyn};
use qfuse::gpu::{GpuContext, GpuTensor};
use qfuse::kernels::activation::activation_into;
use qfuse::kernels::batch_norm::{
    batch_norm2d, batch_norm2d_backward, batch_norm2d_backward_act, batch_norm2d_backward_into,
    batch_norm2d_into, batch_stats_into, normalize_into, reduction_layout,
};
use qfuse::kernels::GpuBatchNorm;
use qfuse::ops::{Activation, BatchNorm};

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
    let usage = "arguments: N C H W [RUNS]";
    let num = |s: &String| {
        s.parse::<usize>()
            .map_err(|e| qfuse::Error::invalid(format!("{usage}: {e}")))
    };
    if args.len() < 4 {
        return Err(qfuse::Error::invalid(usage));
    }
    let mut dims = [0usize; 4];
    for (d, a) in dims.iter_mut().zip(&args) {
        *d = num(a)?;
    }
    let runs = match args.get(4) {
        Some(r) => num(r)?.max(1),
        None => 9,
    };
    let elements = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&e| e <= 1 << 28)
        .ok_or_else(|| qfuse::Error::invalid("at most 2^28 elements"))?;
    let c = dims[1];
    let ctx = GpuContext::new()?;
    let x = tensor(&ctx, &dims, 4.0)?;
    let dy = tensor(&ctx, &dims, 2.0)?;
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
    let out = batch_norm2d(&ctx, &x, &bn, 0.1, true, Activation::None, false)?;
    let grads = batch_norm2d_backward(&ctx, &x, &dy, &bn, &out.stats.stats, true)?;
    let y = out.y.clone();
    let layout = reduction_layout(dims);
    println!("{dims:?}: {elements} elements, {layout:?}");
    let copy = time(&ctx, runs, || {
        activation_into(&ctx, &x, Activation::None, &y)
    })?;
    let stats = time(&ctx, runs, || {
        batch_stats_into(&ctx, &x, &bn, 0.1, true, &out.stats)
    })?;
    let norm = time(&ctx, runs, || {
        normalize_into(&ctx, &x, &bn, &out.stats.stats, Activation::None, &y, None)
    })?;
    let forward = time(&ctx, runs, || {
        batch_norm2d_into(&ctx, &x, &bn, 0.1, true, Activation::None, &out)
    })?;
    let backward = time(&ctx, runs, || {
        batch_norm2d_backward_into(&ctx, &x, &dy, &bn, &out.stats.stats, true, &grads)
    })?;
    let div = tensor(&ctx, &[c], 0.5)?;
    let backward_relu = time(&ctx, runs, || {
        batch_norm2d_backward_act(
            &ctx,
            &x,
            &dy,
            &bn,
            &out.stats.stats,
            true,
            Activation::Relu,
            Some(&y),
            None,
        )
        .map(drop)
    })?;
    let backward_div = time(&ctx, runs, || {
        batch_norm2d_backward_act(
            &ctx,
            &x,
            &dy,
            &bn,
            &out.stats.stats,
            true,
            Activation::None,
            None,
            Some(&div),
        )
        .map(drop)
    })?;
    let backward_both = time(&ctx, runs, || {
        batch_norm2d_backward_act(
            &ctx,
            &x,
            &dy,
            &bn,
            &out.stats.stats,
            true,
            Activation::Relu,
            Some(&y),
            Some(&div),
        )
        .map(drop)
    })?;
    let mb = elements as f64 * 8.0 / 1e6;
    println!(
        "elementwise {copy:.3} ms ({:.2} GB/s) | stats {stats:.3} | normalize {norm:.3} | \
         forward {forward:.3} ({:.2} of elementwise) | backward {backward:.3} ({:.2} of 1.5x \
         elementwise)",
        mb / copy,
        copy / forward,
        1.5 * copy / backward
    );
    println!(
        "backward with the ReLU mask (act_x read) {backward_relu:.3} | with a divisor \
         {backward_div:.3} | both (the QAT backward's form) {backward_both:.3}"
    );
    Ok(())
}
