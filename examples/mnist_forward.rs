//! NNI's Mnist network, float, forward on the GPU through the kernel launchers with the data
//! on the device: one upload (the batch) and one download (the log-probabilities) per
//! forward. Times it launch by launch (one submission per launch) and as one recording
//! ([`GpuContext::record`]: one submission per forward), and prints the transfers and what
//! the buffer pool allocated after the first forward.
//!
//! ```sh
//! WGPU_BACKEND=vulkan cargo run --release --example mnist_forward -- [BATCH] [ITERATIONS]
//! ```
//!
//! Weights are a fixed pseudo-random pattern (the timing does not depend on them).

use std::time::Instant;

use ndarray::{Array1, ArrayD, IxDyn};
use qfuse::gpu::{GpuContext, GpuTensor};
use qfuse::kernels::{self, conv2d::ConvEpilogue, GpuBatchNorm};
use qfuse::ops::{Activation, BatchNorm, Conv2dParams};

fn pattern(shape: &[usize], scale: f32) -> ArrayD<f32> {
    let n: usize = shape.iter().product();
    let data = (0..n).map(|i| ((i as f32 * 0.618).fract() - 0.5) * scale);
    ArrayD::from_shape_vec(IxDyn(shape), data.collect()).expect("shape matches")
}

struct Mnist {
    conv1: (GpuTensor, GpuTensor),
    bn1: GpuBatchNorm,
    conv2: (GpuTensor, GpuTensor),
    fc1: (GpuTensor, GpuTensor),
    fc2: (GpuTensor, GpuTensor),
}

impl Mnist {
    fn new(ctx: &GpuContext) -> qfuse::Result<Self> {
        let up = |shape: &[usize], scale| GpuTensor::upload_f32(ctx, &pattern(shape, scale));
        let bn = BatchNorm {
            weight: Some(Array1::from_elem(20, 1.1)),
            bias: Some(Array1::from_elem(20, 0.05)),
            running_mean: Array1::from_elem(20, 0.01),
            running_var: Array1::from_elem(20, 0.9),
            eps: 1e-5,
            momentum: 0.1,
        };
        Ok(Self {
            conv1: (up(&[20, 1, 5, 5], 0.4)?, up(&[20], 0.1)?),
            bn1: GpuBatchNorm::upload(ctx, &bn)?,
            conv2: (up(&[50, 20, 5, 5], 0.1)?, up(&[50], 0.1)?),
            fc1: (up(&[500, 800], 0.07)?, up(&[500], 0.1)?),
            fc2: (up(&[10, 500], 0.1)?, up(&[10], 0.1)?),
        })
    }

    /// The module tree's forward, op by op (no fusion): conv1 → batchnorm1 → relu1 →
    /// max_pool1 → conv2 → relu2 → max_pool2 → view(-1, 800) → fc1 → relu3 → fc2 →
    /// log_softmax.
    fn forward(&self, ctx: &GpuContext, x: &GpuTensor) -> qfuse::Result<GpuTensor> {
        use kernels::activation::activation;
        let conv = |x: &GpuTensor, (w, b): &(GpuTensor, GpuTensor)| {
            let epilogue = ConvEpilogue {
                bias: Some(b),
                ..ConvEpilogue::none()
            };
            kernels::conv2d::conv2d(ctx, x, w, &Conv2dParams::default(), &epilogue)
        };
        let relu6 = Activation::Relu6;
        let h = conv(x, &self.conv1)?;
        let h = kernels::batch_norm::batch_norm2d(
            ctx,
            &h,
            &self.bn1,
            0.1,
            false,
            Activation::None,
            false,
        )?
        .y;
        let h = activation(ctx, &h, relu6)?;
        let h = kernels::pool::max_pool2d(ctx, &h, 2, 2)?;
        let h = conv(&h, &self.conv2)?;
        let h = activation(ctx, &h, relu6)?;
        let h = kernels::pool::max_pool2d(ctx, &h, 2, 2)?;
        let n = h.shape()[0];
        let h = h.reshape(&[n, 800])?;
        let h = kernels::linear::linear(ctx, &h, &self.fc1.0, Some(&self.fc1.1))?;
        let h = activation(ctx, &h, relu6)?;
        let h = kernels::linear::linear(ctx, &h, &self.fc2.0, Some(&self.fc2.1))?;
        kernels::pool::log_softmax(ctx, &h)
    }
}

fn main() -> qfuse::Result<()> {
    let mut args = std::env::args().skip(1);
    let batch: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(64);
    let iterations: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20);
    let ctx = GpuContext::new()?;
    println!("adapter: {}", ctx.name());
    let model = Mnist::new(&ctx)?;
    let input = pattern(&[batch, 1, 28, 28], 2.0);
    let step = |recorded: bool| -> qfuse::Result<ArrayD<f32>> {
        let x = GpuTensor::upload_f32(&ctx, &input)?;
        let y = if recorded {
            ctx.record(|| model.forward(&ctx, &x))?
        } else {
            model.forward(&ctx, &x)?
        };
        y.download_f32(&ctx)
    };
    let reference = step(false)?;
    println!("Mnist float forward, batch {batch}, {iterations} iterations each (warm)");
    for recorded in [false, true] {
        for _ in 0..2 {
            step(recorded)?; // compile pipelines, fill the pool
        }
        let pool = ctx.pool_stats();
        let transfers = ctx.transfer_stats();
        let start = Instant::now();
        for _ in 0..iterations {
            let y = step(recorded)?;
            assert_eq!(y, reference, "same results either way");
        }
        let ms = start.elapsed().as_secs_f64() * 1e3 / iterations as f64;
        let t = ctx.transfer_stats().since(&transfers);
        let p = ctx.pool_stats();
        let per = |v: u64| v as f64 / iterations as f64;
        println!(
            "{:<12} {ms:8.2} ms/forward  submissions/forward {:5.1}  uploads/forward {:.0} \
             downloads/forward {:.0}  new buffers {}  reused/forward {:.0}",
            if recorded { "recorded" } else { "per launch" },
            per(p.submissions - pool.submissions),
            per(t.uploads),
            per(t.downloads),
            p.allocations - pool.allocations,
            per(p.reuses - pool.reuses),
        );
    }
    Ok(())
}
