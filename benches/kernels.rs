//! Criterion benches of the GPU kernels: fake quantization (per tensor and per channel),
//! observer reductions, BatchNorm folding, conv2d at ResNet-18's 3×3 shapes and a MobileNet
//! depthwise layer, and the fused-vs-unfused comparisons, named so they read side by side:
//! `conv_bn_relu_eval/fused/<shape>` vs `conv_bn_relu_eval/unfused/<shape>` and
//! `conv_bn_relu_qat_forward/fused/<shape>` vs `.../unfused/<shape>` (and the backward,
//! `conv_bn_relu_qat_backward/{fused,unfused}/<shape>`); BatchNorm2d training,
//! `bn_train/{forward,backward}/<shape>` (bytes: 8 and 12 per element); the integer conv2d on
//! packed int8 codes per dot-product path, `int8_conv2d/{packed,portable}/<shape>` (weights
//! prepared once, `2·MACs` declared as elements, so "elem/s" reads as OP/s), and the Mnist
//! int8 forward, `int8_forward_mnist/{device,backend}/batch64` (`deploy::GpuIntModel` vs
//! `IntModel::forward(&GpuBackend)`).
//!
//! Time is submit-to-completion (`iter_custom`: encode, submit, wait for the device).
//! Throughput: memory-bound kernels declare their minimal logical traffic in bytes (so
//! criterion's B/s compares with the copy bandwidth of `qfuse bench`); convolutions declare
//! their flops (`2·N·OH·OW·O·(C/g)·KH·KW`) as elements, so criterion's "elem/s" reads as
//! FLOP/s. Fused and unfused declare the same flops, so their rates compare directly.
//!
//! Conv batches are 1 by default to keep `cargo bench` short on a CPU adapter (lavapipe);
//! set `QFUSE_BENCH_BATCH=8` for the batch of `qfuse bench`. Without an adapter the GPU
//! groups print one line and are skipped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use ndarray::{ArrayD, IxDyn};
use qfuse::deploy;
use qfuse::gpu::Int8Dot;
use qfuse::gpu::{DType, GpuContext, GpuTensor};
use qfuse::kernels::conv2d::ConvEpilogue;
use qfuse::kernels::conv_bn::GpuConv2d;
use qfuse::kernels::int8::{GpuConv2dInt8, GpuInt8Tensor};
use qfuse::kernels::{self, GpuBatchNorm, GpuQParams};
use qfuse::model::mnist;
use qfuse::ops::{Activation, Conv2dParams, QatConfig};
use qfuse::quant::{ObserverSpec, QDtype, QParams, QScheme, QuantRange, Requant, RequantMode};
use qfuse::{CpuBackend, GpuBackend};

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
    // A preallocated output, so the benches measure the kernel, not an allocation.
    let y = GpuTensor::zeros(&ctx, &shape, DType::F32).unwrap();
    g.throughput(Throughput::Bytes(2 * 4 * n as u64));
    let per_tensor = GpuQParams::upload(&ctx, &QParams::per_tensor(0.03, 3)).unwrap();
    g.bench_function(BenchmarkId::new("per_tensor_int8", n), |b| {
        b.iter_custom(|iters| {
            timed(&ctx, iters, || {
                kernels::fake_quant::fake_quant_into(&ctx, &x, &per_tensor, QuantRange::INT8, &y)
                    .unwrap();
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
                kernels::fake_quant::fake_quant_into(&ctx, &x, &per_channel, QuantRange::INT8, &y)
                    .unwrap();
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

/// A conv layer of the benches: square input, 3×3 kernel, padding 1, stride 1.
struct Layer {
    name: &'static str,
    channels: usize,
    size: usize,
    groups: usize,
}

/// ResNet-18's 3×3 convs (one per stage) and a MobileNet(V2) depthwise layer.
const LAYERS: &[Layer] = &[
    Layer {
        name: "resnet18_64x56x56",
        channels: 64,
        size: 56,
        groups: 1,
    },
    Layer {
        name: "resnet18_128x28x28",
        channels: 128,
        size: 28,
        groups: 1,
    },
    Layer {
        name: "resnet18_256x14x14",
        channels: 256,
        size: 14,
        groups: 1,
    },
    Layer {
        name: "resnet18_512x7x7",
        channels: 512,
        size: 7,
        groups: 1,
    },
    Layer {
        name: "depthwise_144x56x56",
        channels: 144,
        size: 56,
        groups: 144,
    },
];

fn batch() -> usize {
    std::env::var("QFUSE_BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&b| b > 0)
        .unwrap_or(1)
}

/// The layer's tensors on the GPU: input, weight, BatchNorm, settings, and its flops.
struct LayerData {
    id: String,
    x: GpuTensor,
    w: GpuTensor,
    bn: GpuBatchNorm,
    params: Conv2dParams,
    flops: u64,
}

fn layer_data(ctx: &GpuContext, l: &Layer) -> LayerData {
    let n = batch();
    let (c, s) = (l.channels, l.size);
    let x = GpuTensor::upload_f32(ctx, &data(&[n, c, s, s])).unwrap();
    let w = GpuTensor::upload_f32(ctx, &data(&[c, c / l.groups, 3, 3]).mapv(|v| v * 0.05)).unwrap();
    let bn = qfuse::ops::BatchNorm {
        weight: Some(ndarray::Array1::from_elem(c, 1.1)),
        bias: Some(ndarray::Array1::from_elem(c, 0.1)),
        running_mean: ndarray::Array1::from_elem(c, 0.2),
        running_var: ndarray::Array1::from_elem(c, 0.9),
        eps: 1e-5,
        momentum: 0.1,
    };
    LayerData {
        id: format!("{}_n{n}", l.name),
        x,
        w,
        bn: GpuBatchNorm::upload(ctx, &bn).unwrap(),
        params: Conv2dParams {
            padding: [1, 1],
            groups: l.groups,
            ..Conv2dParams::default()
        },
        // 2·N·OH·OW·O·(C/g)·KH·KW, OH = OW = size.
        flops: 2 * (n * s * s * c * (c / l.groups) * 9) as u64,
    }
}

/// Few samples of equal length (flat sampling), short warm-up and measurement: convs take
/// tens of ms to seconds on lavapipe.
fn conv_group<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    g
}

fn conv2d(c: &mut Criterion) {
    let Some(ctx) = context() else { return };
    let mut g = conv_group(c, "conv2d");
    for l in LAYERS {
        let d = layer_data(&ctx, l);
        g.throughput(Throughput::Elements(d.flops));
        g.bench_function(BenchmarkId::new("forward", &d.id), |b| {
            b.iter_custom(|iters| {
                timed(&ctx, iters, || {
                    kernels::conv2d::conv2d(&ctx, &d.x, &d.w, &d.params, &ConvEpilogue::none())
                        .unwrap();
                })
            })
        });
    }
    g.finish();
}

fn conv_bn_relu_eval(c: &mut Criterion) {
    let Some(ctx) = context() else { return };
    let mut g = conv_group(c, "conv_bn_relu_eval");
    for l in LAYERS {
        let d = layer_data(&ctx, l);
        let conv = GpuConv2d {
            weight: &d.w,
            bias: None,
            params: d.params,
        };
        g.throughput(Throughput::Elements(d.flops));
        g.bench_function(BenchmarkId::new("fused", &d.id), |b| {
            b.iter_custom(|iters| {
                timed(&ctx, iters, || {
                    kernels::conv_bn::conv_bn_act_eval_scaled(
                        &ctx,
                        &d.x,
                        &conv,
                        &d.bn,
                        Activation::Relu,
                    )
                    .unwrap();
                })
            })
        });
        g.bench_function(BenchmarkId::new("unfused", &d.id), |b| {
            b.iter_custom(|iters| {
                timed(&ctx, iters, || {
                    kernels::conv_bn::conv_bn_act_eval_unfused(
                        &ctx,
                        &d.x,
                        &conv,
                        &d.bn,
                        Activation::Relu,
                    )
                    .unwrap();
                })
            })
        });
    }
    g.finish();
}

/// The ConvBnReLU2d QAT configuration of the QAT benches.
fn qat_config() -> QatConfig {
    QatConfig {
        activation: Activation::Relu,
        freeze_bn: false,
        weight_observer: ObserverSpec::new(
            QDtype::QInt8,
            QScheme::PerChannelSymmetric,
            QuantRange::INT8,
            0,
        )
        .unwrap(),
    }
}

fn conv_bn_relu_qat_forward(c: &mut Criterion) {
    let Some(ctx) = context() else { return };
    let mut g = conv_group(c, "conv_bn_relu_qat_forward");
    let cfg = qat_config();
    for l in LAYERS {
        let d = layer_data(&ctx, l);
        let conv = GpuConv2d {
            weight: &d.w,
            bias: None,
            params: d.params,
        };
        g.throughput(Throughput::Elements(d.flops));
        g.bench_function(BenchmarkId::new("fused", &d.id), |b| {
            b.iter_custom(|iters| {
                timed(&ctx, iters, || {
                    kernels::conv_bn::conv_bn_qat_forward(&ctx, &d.x, &conv, &d.bn, 0.1, &cfg)
                        .unwrap();
                })
            })
        });
        g.bench_function(BenchmarkId::new("unfused", &d.id), |b| {
            b.iter_custom(|iters| {
                timed(&ctx, iters, || {
                    kernels::conv_bn::conv_bn_qat_forward_unfused(
                        &ctx, &d.x, &conv, &d.bn, 0.1, &cfg,
                    )
                    .unwrap();
                })
            })
        });
    }
    g.finish();
}

/// The QAT backward, fused (activation mask and divide-back folded into the BatchNorm
/// backward) vs unfused (each its own pass); flops: twice the forward's.
fn conv_bn_relu_qat_backward(c: &mut Criterion) {
    let Some(ctx) = context() else { return };
    let mut g = conv_group(c, "conv_bn_relu_qat_backward");
    let cfg = qat_config();
    for l in LAYERS {
        let d = layer_data(&ctx, l);
        let conv = GpuConv2d {
            weight: &d.w,
            bias: None,
            params: d.params,
        };
        let fwd =
            kernels::conv_bn::conv_bn_qat_forward(&ctx, &d.x, &conv, &d.bn, 0.1, &cfg).unwrap();
        let dy = GpuTensor::upload_f32(&ctx, &data(fwd.y.shape()).mapv(|v| v * 0.25)).unwrap();
        g.throughput(Throughput::Elements(2 * d.flops));
        for (name, unfused) in [("fused", false), ("unfused", true)] {
            g.bench_function(BenchmarkId::new(name, &d.id), |b| {
                b.iter_custom(|iters| {
                    timed(&ctx, iters, || {
                        let run = if unfused {
                            kernels::conv_bn::conv_bn_qat_backward_unfused
                        } else {
                            kernels::conv_bn::conv_bn_qat_backward
                        };
                        run(&ctx, &d.x, &dy, &conv, &d.bn, &cfg, &fwd.saved()).unwrap();
                    })
                })
            });
        }
    }
    g.finish();
}

/// BatchNorm2d training forward and backward at the shapes of `qfuse bench`'s `bn_train/...`,
/// into preallocated outputs; bytes: read x and write y (forward), read x and dy and write dx
/// (backward).
fn bn_train(c: &mut Criterion) {
    let Some(ctx) = context() else { return };
    let mut g = c.benchmark_group("bn_train");
    g.sample_size(10);
    for shape in [[8usize, 64, 56, 56], [8, 2048, 1, 1], [1, 70000, 1, 2]] {
        let [n, ch, h, w] = shape;
        let id = format!("{n}x{ch}x{h}x{w}");
        let elems = (n * ch * h * w) as u64;
        let x = GpuTensor::upload_f32(&ctx, &data(&shape)).unwrap();
        let dy = GpuTensor::upload_f32(&ctx, &data(&shape).mapv(|v| v * 0.25)).unwrap();
        let bn = qfuse::ops::BatchNorm {
            weight: Some(ndarray::Array1::from_elem(ch, 1.1)),
            bias: Some(ndarray::Array1::from_elem(ch, 0.1)),
            running_mean: ndarray::Array1::from_elem(ch, 0.2),
            running_var: ndarray::Array1::from_elem(ch, 0.9),
            eps: 1e-5,
            momentum: 0.1,
        };
        let bn = GpuBatchNorm::upload(&ctx, &bn).unwrap();
        let out =
            kernels::batch_norm::batch_norm2d(&ctx, &x, &bn, 0.1, true, Activation::None, false)
                .unwrap();
        g.throughput(Throughput::Bytes(8 * elems));
        g.bench_function(BenchmarkId::new("forward", &id), |b| {
            b.iter_custom(|iters| {
                timed(&ctx, iters, || {
                    kernels::batch_norm::batch_norm2d_into(
                        &ctx,
                        &x,
                        &bn,
                        0.1,
                        true,
                        Activation::None,
                        &out,
                    )
                    .unwrap();
                })
            })
        });
        let stats = &out.stats.stats;
        let grads =
            kernels::batch_norm::batch_norm2d_backward(&ctx, &x, &dy, &bn, stats, true).unwrap();
        g.throughput(Throughput::Bytes(12 * elems));
        g.bench_function(BenchmarkId::new("backward", &id), |b| {
            b.iter_custom(|iters| {
                timed(&ctx, iters, || {
                    kernels::batch_norm::batch_norm2d_backward_into(
                        &ctx, &x, &dy, &bn, stats, true, &grads,
                    )
                    .unwrap();
                })
            })
        });
    }
    g.finish();
}

fn int8_conv2d(c: &mut Criterion) {
    let Some(ctx) = context() else { return };
    let mut g = conv_group(c, "int8_conv2d");
    let mut dots = vec![Int8Dot::Portable];
    if ctx.packed_int8_dot_available() {
        dots.push(Int8Dot::Packed);
    }
    for l in LAYERS {
        let d = layer_data(&ctx, l);
        let n = batch();
        let (ch, s) = (l.channels, l.size);
        let mut seed: u32 = 0x1234_5678;
        let mut code = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            (seed >> 24) as u8 as i8
        };
        let x = ndarray::Array4::from_shape_simple_fn((n, ch, s, s), &mut code);
        let w =
            ndarray::Array4::from_shape_simple_fn((ch, ch / l.groups, 3, 3), || code().max(-127));
        let rq = Requant::new(&[2e-4], RequantMode::Float, -5, (-5, 127)).unwrap();
        let gx = GpuInt8Tensor::upload(&ctx, &x.into_dyn()).unwrap();
        let layer = GpuConv2dInt8::new(&ctx, 3, &w, None, &d.params, &rq).unwrap();
        g.throughput(Throughput::Elements(d.flops));
        for &dot in &dots {
            let name = match dot {
                Int8Dot::Portable => "portable",
                Int8Dot::Packed => "packed",
            };
            g.bench_function(BenchmarkId::new(name, &d.id), |b| {
                b.iter_custom(|iters| {
                    timed(&ctx, iters, || {
                        layer.forward_with(&ctx, &gx, dot).unwrap();
                    })
                })
            });
        }
    }
    g.finish();
}

fn int8_forward_mnist(c: &mut Criterion) {
    let Some(ctx) = context() else { return };
    let mut g = conv_group(c, "int8_forward_mnist");
    let mut m = mnist::mnist(0).unwrap();
    m.eval();
    let calib = mnist::synthetic_batch(32, 1);
    mnist::set_trained_bn_stats(&mut m, &calib, 3).unwrap();
    let net = mnist::deploy_net(&m).unwrap();
    let model = deploy::convert(
        &net,
        &CpuBackend,
        [&calib.into_dyn()],
        &deploy::DeployConfig::default(),
    )
    .unwrap();
    let x = mnist::synthetic_batch(64, 2).into_dyn();
    let device = deploy::GpuIntModel::new(&model, ctx.clone()).unwrap();
    let backend = GpuBackend::new(ctx.clone());
    g.bench_function(BenchmarkId::new("device", "batch64"), |b| {
        b.iter(|| device.forward(&x).unwrap())
    });
    g.bench_function(BenchmarkId::new("backend", "batch64"), |b| {
        b.iter(|| model.forward(&backend, &x).unwrap())
    });
    g.finish();
}

/// NNI's Mnist float forward at batch 64, eval: `gpu` device-resident
/// (`model::mnist::device_forward` on the GPU backend: parameters uploaded once; one upload of
/// the batch and one download of the log-probabilities per forward, both inside the timing),
/// `cpu_reference` the same chain on the CPU backend, `module_host_ops` `Module::forward`
/// through the host-array layer on the GPU (every op uploads and downloads).
fn mnist_forward(c: &mut Criterion) {
    use qfuse::backend::Device;
    let Some(ctx) = context() else { return };
    let mut g = conv_group(c, "mnist_forward");
    let mut m = mnist::mnist(0).unwrap();
    m.eval();
    mnist::set_trained_bn_stats(&mut m, &mnist::synthetic_batch(32, 1), 3).unwrap();
    let x = mnist::synthetic_batch(64, 2).into_dyn();
    let gpu = GpuBackend::new(ctx.clone());
    let on_gpu = mnist::device_forward(&m, gpu.clone()).unwrap();
    let on_cpu = mnist::device_forward(&m, CpuBackend).unwrap();
    g.bench_function(BenchmarkId::new("gpu", "batch64"), |b| {
        b.iter(|| {
            gpu.download(&on_gpu.forward(&gpu.upload(&x).unwrap()).unwrap())
                .unwrap()
        })
    });
    g.bench_function(BenchmarkId::new("cpu_reference", "batch64"), |b| {
        b.iter(|| on_cpu.forward(&x).unwrap())
    });
    g.bench_function(BenchmarkId::new("module_host_ops", "batch64"), |b| {
        b.iter(|| m.forward(&gpu, &x).unwrap())
    });
    g.finish();
}

criterion_group!(
    benches,
    mnist_forward,
    fake_quant,
    observers,
    fold,
    conv2d,
    conv_bn_relu_eval,
    conv_bn_relu_qat_forward,
    conv_bn_relu_qat_backward,
    bn_train,
    int8_conv2d,
    int8_forward_mnist
);
criterion_main!(benches);
