//! Criterion benches of the GPU kernels: fake quantization (per tensor and per channel),
//! observer reductions, and BatchNorm folding — with the fused-vs-unfused conv+bn+relu
//! comparisons in `fused`. Time is submit-to-completion (`iter_custom`: encode, submit,
//! wait for the device), throughput is the minimal logical traffic in bytes.
//!
//! Without an adapter the GPU groups print one line and are skipped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ndarray::{ArrayD, IxDyn};
use qfuse::gpu::{GpuContext, GpuTensor};
use qfuse::kernels::{self, GpuQParams};
use qfuse::quant::{ObserverSpec, QDtype, QParams, QScheme, QuantRange};

fn context() -> Option<Arc<GpuContext>> {
    match GpuContext::new() {
        Ok(c) => Some(Arc::new(c)),
        Err(e) => {
            eprintln!("skipping GPU benches: no adapter ({e})");
            None
        }
    }
}

/// Deterministic pseudo-random data in [-4, 4).
fn data(shape: &[usize]) -> ArrayD<f32> {
    let mut s: u32 = 0x9E37_79B9;
    ArrayD::from_shape_simple_fn(IxDyn(shape), || {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        (s >> 8) as f32 / (1u32 << 24) as f32 * 8.0 - 4.0
    })
}

/// Runs `launch` `iters` times, waiting for the device after each, and returns the total.
fn timed(ctx: &GpuContext, iters: u64, mut launch: impl FnMut()) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        launch();
        ctx.wait().expect("device wait");
    }
    start.elapsed()
}

fn fake_quant(c: &mut Criterion) {
    let Some(ctx) = context() else { return };
    let mut g = c.benchmark_group("fake_quant");
    g.sample_size(10);
    // 16M elements: NCHW 16x64x128x128; per channel along axis 1.
    let shape = [16usize, 64, 128, 128];
    let n: usize = shape.iter().product();
    let x = GpuTensor::upload_f32(&ctx, &data(&shape)).unwrap();
    g.throughput(Throughput::Bytes(2 * 4 * n as u64));
    let per_tensor = GpuQParams::upload(&ctx, &QParams::per_tensor(0.03, 3)).unwrap();
    g.bench_function(BenchmarkId::new("per_tensor_int8", n), |b| {
        b.iter_custom(|iters| {
            timed(&ctx, iters, || {
                kernels::fake_quant::fake_quant(&ctx, &x, &per_tensor, QuantRange::INT8).unwrap();
            })
        })
    });
    let per_channel = GpuQParams::upload(
        &ctx,
        &QParams::per_channel(
            (0..64).map(|i| 0.01 + i as f32 * 1e-3).collect(),
            (0..64).map(|i| i % 7 - 3).collect(),
            1,
        )
        .unwrap(),
    )
    .unwrap();
    g.bench_function(BenchmarkId::new("per_channel_int8_axis1", n), |b| {
        b.iter_custom(|iters| {
            timed(&ctx, iters, || {
                kernels::fake_quant::fake_quant(&ctx, &x, &per_channel, QuantRange::INT8).unwrap();
            })
        })
    });
    g.finish();
}

fn observers(c: &mut Criterion) {
    let Some(ctx) = context() else { return };
    let mut g = c.benchmark_group("observer");
    g.sample_size(10);
    let shape = [16usize, 64, 128, 128];
    let n: usize = shape.iter().product();
    let x = GpuTensor::upload_f32(&ctx, &data(&shape)).unwrap();
    g.throughput(Throughput::Bytes(4 * n as u64));
    for (name, scheme, axis) in [
        ("per_tensor_affine", QScheme::PerTensorAffine, 0),
        (
            "per_channel_symmetric_axis1",
            QScheme::PerChannelSymmetric,
            1,
        ),
    ] {
        let spec = ObserverSpec::new(QDtype::QInt8, scheme, QuantRange::INT8, axis).unwrap();
        g.bench_function(BenchmarkId::new(name, n), |b| {
            b.iter_custom(|iters| {
                timed(&ctx, iters, || {
                    kernels::observer::observe(&ctx, &x, &spec).unwrap();
                })
            })
        });
    }
    g.finish();
}

fn fold(c: &mut Criterion) {
    let Some(ctx) = context() else { return };
    let mut g = c.benchmark_group("fold_conv_bn");
    g.sample_size(20);
    // ResNet-18's largest 3x3 weight: 512x512x3x3.
    let shape = [512usize, 512, 3, 3];
    let n: usize = shape.iter().product();
    let w = GpuTensor::upload_f32(&ctx, &data(&shape)).unwrap();
    let bn = qfuse::ops::BatchNorm {
        weight: Some(ndarray::Array1::from_elem(512, 1.1)),
        bias: Some(ndarray::Array1::from_elem(512, 0.1)),
        running_mean: ndarray::Array1::from_elem(512, 0.2),
        running_var: ndarray::Array1::from_elem(512, 0.9),
        eps: 1e-5,
        momentum: 0.1,
    };
    let gbn = kernels::fold::GpuBatchNorm::upload(&ctx, &bn).unwrap();
    g.throughput(Throughput::Bytes(2 * 4 * n as u64));
    g.bench_function(BenchmarkId::new("conv2d_512x512x3x3", n), |b| {
        b.iter_custom(|iters| {
            timed(&ctx, iters, || {
                kernels::fold::fold_conv_bn(&ctx, &w, None, &gbn, false).unwrap();
            })
        })
    });
    g.finish();
}

criterion_group!(benches, fake_quant, observers, fold);
criterion_main!(benches);
