//! Times every conv forward variant ([`ConvVariant::all`]) that applies to one conv shape,
//! the way the tuner's candidates are timed but over all of them, so a new variant or a shape
//! class can be judged before it goes into [`candidates`](qfuse::kernels::conv2d::candidates):
//!
//! ```sh
//! WGPU_BACKEND=vulkan cargo run --release --example conv_variants -- N C H W O [RUNS]
//! ```
//!
//! A 3×3 conv, stride 1, padding 1; prints each variant's median milliseconds and GFLOP/s and
//! marks the tuner's candidates.

use std::time::Instant;

use ndarray::{ArrayD, IxDyn};
use qfuse::gpu::{GpuContext, GpuTensor};
use qfuse::kernels::conv2d::{
    candidates, conv2d_with_algorithm, ConvAlgorithm, ConvEpilogue, ConvVariant,
};
use qfuse::ops::Conv2dParams;

fn pattern(shape: &[usize]) -> ArrayD<f32> {
    let n: usize = shape.iter().product();
    let data = (0..n).map(|i| (i as f32 * 0.618).fract() - 0.5);
    ArrayD::from_shape_vec(IxDyn(shape), data.collect()).expect("shape matches")
}

fn main() -> qfuse::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()
        .map_err(|e| qfuse::Error::invalid(format!("arguments: N C H W O [RUNS]: {e}")))?;
    let (&[n, c, h, w, o], runs) = match args.as_slice() {
        [a, b, cc, d, e] => (&[*a, *b, *cc, *d, *e], 5),
        [a, b, cc, d, e, r] => (&[*a, *b, *cc, *d, *e], (*r).max(1)),
        _ => return Err(qfuse::Error::invalid("arguments: N C H W O [RUNS]")),
    };
    // Sizes from the command line: checked before anything is allocated.
    let too_big = || qfuse::Error::invalid("arguments: the conv's sizes overflow");
    for dims in [[n, c, h, w], [o, c, 3, 3], [n, o, h, w]] {
        dims.iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|e| e.checked_mul(9 * c))
            .ok_or_else(too_big)?;
    }
    let ctx = GpuContext::new()?;
    let params = Conv2dParams {
        padding: [1, 1],
        ..Conv2dParams::default()
    };
    let x = GpuTensor::upload_f32(&ctx, &pattern(&[n, c, h, w]))?;
    let wt = GpuTensor::upload_f32(&ctx, &pattern(&[o, c, 3, 3]))?;
    let ws = [o, c, 3, 3];
    let out = params.output_shape(&[n, c, h, w], &ws)?;
    let out4 = [out[0], out[1], out[2], out[3]];
    let flops = 2.0 * (out.iter().product::<usize>() * c * 9) as f64;
    let cands = candidates(&ctx, &ws, &params, out4);
    println!("{} — conv {n}x{c}x{h}x{w} -> {o}, 3x3, pad 1", ctx.name());
    for v in ConvVariant::all() {
        if !v.applies(&ctx, &ws, &params, out4) {
            continue;
        }
        let run = || -> qfuse::Result<()> {
            conv2d_with_algorithm(
                &ctx,
                &x,
                &wt,
                &params,
                &ConvEpilogue::default(),
                ConvAlgorithm::Variant(v),
            )?;
            ctx.wait()
        };
        run()?; // compile and warm up
        let mut ms: Vec<f64> = (0..runs)
            .map(|_| {
                let t = Instant::now();
                run().map(|()| t.elapsed().as_secs_f64() * 1e3)
            })
            .collect::<qfuse::Result<_>>()?;
        ms.sort_by(f64::total_cmp);
        let med = ms[ms.len() / 2];
        println!(
            "{:<12} {med:9.3} ms {:8.2} GFLOP/s{}",
            v.id(),
            flops / med / 1e6,
            if cands.contains(&v) {
                "  candidate"
            } else {
                ""
            }
        );
    }
    Ok(())
}
