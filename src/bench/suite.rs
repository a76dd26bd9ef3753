//! The kernel suite: every kernel of interest timed, rated and compared with the roofline.

use std::path::Path;
use std::sync::Arc;

use ndarray::{Array1, Array2, Array4};
use serde::Serialize;

use super::roofline::{absorb_copy, sweep, Rig, Roofline, RooflineConfig};
use super::timing::{measure, measure_interleaved, Measurement, Reps, Stamps};
use super::Progress;
use crate::deploy::{GpuIntModel, IntLayer, IntModel};
use crate::error::{Error, Result};
use crate::gpu::Int8Dot;
use crate::gpu::{DType, GpuContext, GpuTensor};
use crate::kernels::batch_norm::{
    batch_norm2d, batch_norm2d_backward, batch_norm2d_backward_into, batch_norm2d_into,
    reduction_layout,
};
use crate::kernels::conv2d::{conv2d, tuned_variant, ConvEpilogue, ConvVariant};
use crate::kernels::conv_bn::{
    conv_bn_act_eval_scaled, conv_bn_act_eval_unfused, conv_bn_qat_backward,
    conv_bn_qat_backward_unfused, conv_bn_qat_forward, conv_bn_qat_forward_unfused, GpuConv2d,
};
use crate::kernels::fake_quant::{
    fake_quant, fake_quant_into_with, fake_quant_with_mask_into, FakeQuantKernel,
};
use crate::kernels::fold::fold_conv_bn;
use crate::kernels::int8::{GpuConv2dInt8, GpuInt8Tensor, GpuLinearInt8};
use crate::kernels::observer::observe;
use crate::kernels::{GpuBatchNorm, GpuQParams};
use crate::ops::{Activation, BatchNorm, Conv2dParams, QatConfig};
use crate::quant::{ObserverSpec, QDtype, QParams, QScheme, QuantRange, Requant, RequantMode};

/// A conv layer of the suite: square input, square kernel, stride 1, "same" padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvShape {
    /// Input channels `C`.
    pub in_channels: usize,
    /// Output channels `O`.
    pub out_channels: usize,
    /// Input height and width.
    pub size: usize,
    /// Kernel height and width.
    pub kernel: usize,
    /// Groups (`C` for depthwise).
    pub groups: usize,
}

impl ConvShape {
    /// A ResNet-18 3×3 conv: `channels` in and out at `size`×`size`.
    pub fn resnet(channels: usize, size: usize) -> Self {
        Self {
            in_channels: channels,
            out_channels: channels,
            size,
            kernel: 3,
            groups: 1,
        }
    }

    /// A depthwise 3×3 conv (MobileNet): `channels` groups of one channel.
    pub fn depthwise(channels: usize, size: usize) -> Self {
        Self {
            in_channels: channels,
            out_channels: channels,
            size,
            kernel: 3,
            groups: channels,
        }
    }

    fn params(&self) -> Conv2dParams {
        Conv2dParams {
            padding: [self.kernel / 2; 2],
            groups: self.groups,
            ..Conv2dParams::default()
        }
    }

    fn input(&self, batch: usize) -> [usize; 4] {
        [batch, self.in_channels, self.size, self.size]
    }

    fn weight(&self) -> [usize; 4] {
        [
            self.out_channels,
            self.in_channels / self.groups.max(1),
            self.kernel,
            self.kernel,
        ]
    }

    /// `NxCxHxW wOxC/gxKHxKW[ gG]`.
    fn describe(&self, batch: usize) -> String {
        let [n, c, h, w] = self.input(batch);
        let [o, cg, kh, kw] = self.weight();
        let g = if self.groups > 1 {
            format!(" g{}", self.groups)
        } else {
            String::new()
        };
        format!("{n}x{c}x{h}x{w} w{o}x{cg}x{kh}x{kw}{g}")
    }

    /// Output height and width ("same" padding, stride 1).
    fn out_size(&self) -> usize {
        self.size + 2 * (self.kernel / 2) + 1 - self.kernel
    }

    /// `2·N·OH·OW·O·(C/g)·KH·KW`.
    fn flops(&self, batch: usize) -> f64 {
        let [o, cg, kh, kw] = self.weight();
        let os = self.out_size();
        2.0 * (batch * os * os * o * cg * kh * kw) as f64
    }

    /// Read x and w, write y, once each (4 bytes per element).
    fn min_bytes(&self, batch: usize) -> f64 {
        4.0 * self.elements(batch)
    }

    /// Backward: read x, w and dy, write dx and dw, once each (4 bytes per element).
    fn backward_min_bytes(&self, batch: usize) -> f64 {
        let x: usize = self.input(batch).iter().product();
        let w: usize = self.weight().iter().product();
        4.0 * (self.elements(batch) + (x + w) as f64)
    }

    /// Elements of x, w and y together.
    fn elements(&self, batch: usize) -> f64 {
        let x: usize = self.input(batch).iter().product();
        let w: usize = self.weight().iter().product();
        let os = self.out_size();
        (x + w + batch * self.out_channels * os * os) as f64
    }
}

/// What [`run_suite`] measures and how long it runs.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchConfig {
    /// `full`, `quick` or `tiny` (printed with the report).
    pub mode: String,
    /// The roofline sweep.
    pub roofline: RooflineConfig,
    /// NCHW shape of the fake-quant and observer input (per channel along axis 1).
    pub elementwise_shape: [usize; 4],
    /// Conv weight folded by the BN-folding benchmark.
    pub fold_shape: [usize; 4],
    /// Batch of the conv benchmarks.
    pub conv_batch: usize,
    /// Conv layers: each is timed alone, fused and unfused (eval and QAT).
    pub conv_shapes: Vec<ConvShape>,
    /// Runs per elementwise / reduction / folding kernel.
    pub reps: Reps,
    /// Runs per conv benchmark.
    pub conv_reps: Reps,
    /// Integer linear layer `[rows, in, out]` (`int8_linear/...`).
    pub int8_linear_shape: [usize; 3],
    /// Batches of the Mnist int8 forward, device-resident vs through the `Backend`
    /// interface (`int8_forward/mnist/...`).
    pub mnist_batches: Vec<usize>,
    /// Batch of the Mnist float forward (GPU, device-resident, and the CPU reference) and of
    /// the QAT training step on the shipped digits (`mnist_forward/...`,
    /// `mnist_train_step/gpu`).
    pub mnist_train_batch: usize,
    /// NCHW shapes of the BatchNorm2d training forward and backward (`bn_train/...`).
    pub bn_train_shapes: Vec<[usize; 4]>,
    /// Only the benchmarks whose name contains this, or one of its comma-separated parts
    /// (`None`: all); the roofline always runs.
    /// A filtered run's fused speedups are the geometric means over the pairs that ran (1
    /// when none did).
    pub filter: Option<String>,
}

/// The BatchNorm2d training shapes of the full and quick suites: a ResNet layer, a
/// BatchNorm1d after a linear layer (`[8, 2048, 1, 1]`), and 70,000 channels of 2 values.
fn bn_train_shapes() -> Vec<[usize; 4]> {
    vec![[8, 64, 56, 56], [8, 2048, 1, 1], [1, 70000, 1, 2]]
}

impl BenchConfig {
    /// The full suite: 16M-element fake quant and observers (`16x64x128x128`), BN folding of
    /// a 512x512x3x3 weight, and batch-8 convs at ResNet-18's 3×3 shapes (64×56×56,
    /// 128×28×28, 256×14×14, 512×7×7) and a MobileNet depthwise layer (144×56×56, groups
    /// 144), each also as an int8 conv per dot path; int8 linear 256x2048 -> 2048; the Mnist
    /// int8 forward at batch 64 and 256. About six minutes on lavapipe (2 cores), where the
    /// convs take most of it.
    pub fn full() -> Self {
        Self {
            mode: "full".to_string(),
            roofline: RooflineConfig::full(),
            elementwise_shape: [16, 64, 128, 128],
            fold_shape: [512, 512, 3, 3],
            conv_batch: 8,
            conv_shapes: vec![
                ConvShape::resnet(64, 56),
                ConvShape::resnet(128, 28),
                ConvShape::resnet(256, 14),
                ConvShape::resnet(512, 7),
                ConvShape::depthwise(144, 56),
            ],
            reps: Reps::FULL,
            conv_reps: Reps {
                warmup: 1,
                min_reps: 3,
                max_reps: 7,
                budget_s: 2.0,
            },
            int8_linear_shape: [256, 2048, 2048],
            mnist_batches: vec![64, 256],
            mnist_train_batch: 64,
            bn_train_shapes: bn_train_shapes(),
            filter: None,
        }
    }

    /// `--quick`: a short roofline sweep, 4M-element fake quant and observers, and batch-1
    /// convs at two ResNet-18 shapes (64×56×56, 256×14×14) and the depthwise layer (f32 and
    /// int8), int8 linear 64x1024 -> 1024 and the Mnist int8 forward at batch 64, with few
    /// runs each. Well under a minute on lavapipe (about 20 s).
    pub fn quick() -> Self {
        Self {
            mode: "quick".to_string(),
            roofline: RooflineConfig::quick(),
            elementwise_shape: [4, 64, 128, 128],
            fold_shape: [512, 512, 3, 3],
            conv_batch: 1,
            conv_shapes: vec![
                ConvShape::resnet(64, 56),
                ConvShape::resnet(256, 14),
                ConvShape::depthwise(144, 56),
            ],
            reps: Reps::QUICK,
            conv_reps: Reps {
                warmup: 1,
                min_reps: 3,
                max_reps: 3,
                budget_s: 0.0,
            },
            int8_linear_shape: [64, 1024, 1024],
            mnist_batches: vec![64],
            mnist_train_batch: 64,
            bn_train_shapes: bn_train_shapes(),
            filter: None,
        }
    }

    /// A tiny configuration for tests: small tensors, one run of everything (seconds).
    pub fn tiny() -> Self {
        let once = Reps {
            warmup: 1,
            min_reps: 1,
            max_reps: 1,
            budget_s: 0.0,
        };
        Self {
            mode: "tiny".to_string(),
            roofline: RooflineConfig::tiny(),
            elementwise_shape: [2, 8, 16, 16],
            fold_shape: [16, 16, 3, 3],
            conv_batch: 1,
            conv_shapes: vec![ConvShape::resnet(16, 8), ConvShape::depthwise(8, 8)],
            reps: once,
            conv_reps: once,
            int8_linear_shape: [4, 64, 30],
            mnist_batches: vec![2],
            mnist_train_batch: 2,
            bn_train_shapes: vec![[2, 8, 4, 4], [4, 300, 1, 1], [1, 700, 1, 2]],
            filter: None,
        }
    }

    /// One line saying what this configuration runs.
    pub fn describe(&self) -> String {
        let [a, b, c, d] = self.elementwise_shape;
        let [fo, fi, fh, fw] = self.fold_shape;
        let convs: Vec<String> = self
            .conv_shapes
            .iter()
            .map(|s| s.describe(self.conv_batch))
            .collect();
        let [lr, li, lo] = self.int8_linear_shape;
        let mnist: Vec<String> = self.mnist_batches.iter().map(|b| b.to_string()).collect();
        let bn: Vec<String> = self
            .bn_train_shapes
            .iter()
            .map(|[n, c, h, w]| format!("{n}x{c}x{h}x{w}"))
            .collect();
        let filter = self
            .filter
            .as_ref()
            .map_or(String::new(), |f| format!("; only names containing {f:?}"));
        format!(
            "{} mode: elementwise {a}x{b}x{c}x{d} ({} elements), fold {fo}x{fi}x{fh}x{fw}, \
             BatchNorm2d training {}, conv batch {} (f32 and int8): {}; int8 linear \
             {lr}x{li} -> {lo}; Mnist int8 forward batch {}; {}-{} timed runs per kernel \
             ({}-{} per conv){filter}",
            self.mode,
            a * b * c * d,
            bn.join(", "),
            self.conv_batch,
            convs.join(", "),
            mnist.join(", "),
            self.reps.min_reps,
            self.reps.max_reps,
            self.conv_reps.min_reps,
            self.conv_reps.max_reps,
        )
    }

    /// Steps [`run_suite`] reports progress for on `ctx`.
    pub fn steps(&self, ctx: &GpuContext) -> usize {
        let dots = int8_dots(ctx).len();
        self.roofline.steps(ctx)
            + ELEMENTWISE_ITEMS
            + 1
            + 2 * self.bn_train_shapes.len()
            + (CONV_ITEMS + 1 + dots) * self.conv_shapes.len()
            + dots
            + 2 * self.mnist_batches.len()
            + MNIST_TRAIN_ITEMS
    }
}

/// The dot-product paths the int8 benchmarks run on `ctx` (portable, and packed where
/// available).
fn int8_dots(ctx: &GpuContext) -> Vec<Int8Dot> {
    let mut v = vec![Int8Dot::Portable];
    if ctx.packed_int8_dot_available() {
        v.push(Int8Dot::Packed);
    }
    v
}

fn dot_name(dot: Int8Dot) -> &'static str {
    match dot {
        Int8Dot::Portable => "portable",
        Int8Dot::Packed => "packed",
    }
}

/// The float Mnist benchmarks: forward on the GPU and on the CPU reference, QAT step.
const MNIST_TRAIN_ITEMS: usize = 3;

/// Elementwise and reduction benchmarks (fake quant ×5, observers ×2).
const ELEMENTWISE_ITEMS: usize = 7;
/// Benchmarks per conv shape: conv, eval fused / prefolded / unfused, QAT forward fused /
/// unfused, QAT backward fused / unfused.
const CONV_ITEMS: usize = 8;

/// One benchmarked kernel (or chain of kernels), as a row of the table and an entry of the
/// JSON `kernels` list.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KernelResult {
    /// What ran, e.g. `fake_quant/per_tensor` or `conv_bn_relu_eval/fused`.
    pub name: String,
    /// The shape it ran on.
    pub shape: String,
    /// Achieved GB/s of the minimal logical traffic (memory-bound kernels).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gbps: Option<f64>,
    /// Achieved GFLOP/s (convolutions, the fma roofline).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gflops: Option<f64>,
    /// Achieved integer GOP/s (int8 kernels: 2 ops per multiply-accumulate, `2·MACs/s`),
    /// held to the same fma roofline as GFLOP/s (an fma is 2 flops). Exactly one of `gbps`,
    /// `gflops` and `gops` is present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gops: Option<f64>,
    /// Rate over the attainable roofline rate (see the module doc).
    pub roofline_ratio: f64,
    /// Which roof bounds it: `copy` or `fma`.
    pub roof: &'static str,
    /// Median submit-to-completion time (ms).
    pub time_ms: f64,
    /// Median GPU time from timestamps (ms), when the device has them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_ms: Option<f64>,
    /// The roofline ratio from GPU times (against the GPU-timed roofline).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_roofline_ratio: Option<f64>,
    /// Minimal logical traffic of one run (bytes).
    pub bytes: u64,
    /// Flops of one run (convolutions and the fma roofline).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flops: Option<u64>,
    /// Integer ops of one run (int8 kernels: `2·MACs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ops: Option<u64>,
    /// Memory-bound kernels: GB/s of the roofline's copy kernel timed interleaved with this
    /// one (the same host conditions); `roofline_ratio` is taken against it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy_gbps_interleaved: Option<f64>,
    /// The same from GPU timestamps; `gpu_roofline_ratio` is taken against it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy_gpu_gbps_interleaved: Option<f64>,
    /// Fused rows: the unfused chain's time over this one's; `int8_forward/.../device`: the
    /// `Backend`-interface forward's time over this one's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speedup: Option<f64>,
    /// Timed runs behind each median.
    pub reps: usize,
    /// Host↔device transfers of one run (uploads + downloads; `mnist_*` rows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transfers: Option<u64>,
    /// The sum of the GPU time of the run's kernels, each compute pass timestamped
    /// ([`GpuContext::begin_kernel_timing`]; `mnist_*` rows on devices with timestamps), in
    /// ms: the wall time over it is the host overhead of the chain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_ms: Option<f64>,
    /// Anything else worth knowing (tuned constants, what a variant does).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// f32 conv rows (`conv2d`, `conv_bn_relu_eval/*`, `conv_bn_relu_qat_forward/*`): the
    /// forward variant [`crate::kernels::conv2d::ConvAlgorithm::Auto`] runs at this shape
    /// ([`crate::kernels::conv2d::ConvVariant::id`], e.g. `sg_c16_r4`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<String>,
    /// f32 conv rows: seconds of the row's first run on the bench's context, before its
    /// warm-up: tuning the conv's shape class (unless the context's cache directory had the
    /// decision) and compiling the pipelines not compiled yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cold_start_s: Option<f64>,
}

/// Everything [`run_suite`] measured. Serializes (see [`BenchReport::to_json`]) to exactly
/// the keys `adapter`, `copy_gbps`, `fma_gflops`, `kernels`, `fused_speedup_eval`,
/// `fused_speedup_qat`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchReport {
    /// `adapter name (backend)`.
    pub adapter: String,
    /// The roofline's copy bandwidth (GB/s).
    pub copy_gbps: f64,
    /// The roofline's fma throughput (GFLOP/s).
    pub fma_gflops: f64,
    /// Every benchmark, the two roofline kernels first.
    pub kernels: Vec<KernelResult>,
    /// Geometric mean over the conv shapes of unfused / fused time, conv+bn+relu eval.
    pub fused_speedup_eval: f64,
    /// Geometric mean over the conv shapes of unfused / fused time, ConvBnReLU2d QAT forward.
    pub fused_speedup_qat: f64,
    /// The roofline in full (sweeps included).
    #[serde(skip)]
    pub roofline: Roofline,
    /// What ran ([`BenchConfig::describe`]).
    #[serde(skip)]
    pub config: String,
    /// Whether GPU timestamps were taken.
    #[serde(skip)]
    pub timestamps: bool,
    /// How busy the host was while the suite ran (Linux; `None` elsewhere). On a CPU adapter
    /// other processes share the cores the kernels run on, so a busy host lowers every figure.
    #[serde(skip)]
    pub host_load: Option<HostLoad>,
}

/// How busy the host was during a run (from `/proc`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostLoad {
    /// 1-minute load average at the start and at the end (this process included).
    pub load_average: [f64; 2],
    /// Share of all CPUs' time that *other* processes used during the run (0 to 1).
    pub others_cpu_share: f64,
}

/// `/proc` counters at one moment: load average, total and idle CPU ticks, this process's
/// CPU ticks.
#[derive(Clone, Copy)]
struct ProcSample {
    load: f64,
    total: u64,
    idle: u64,
    own: u64,
}

impl ProcSample {
    fn now() -> Option<Self> {
        let load = std::fs::read_to_string("/proc/loadavg")
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let cpu: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal ...
        let total = cpu.iter().take(8).sum();
        let idle = cpu.get(3)? + cpu.get(4).copied().unwrap_or(0);
        let own_stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the parenthesized command name; utime and stime are fields 14 and 15.
        let after = own_stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = after.split_whitespace().collect();
        let own = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some(Self {
            load,
            total,
            idle,
            own,
        })
    }

    fn load_since(self, start: Self) -> HostLoad {
        let total = self.total.saturating_sub(start.total).max(1) as f64;
        let busy = (self.total - self.idle).saturating_sub(start.total - start.idle) as f64;
        let own = self.own.saturating_sub(start.own) as f64;
        HostLoad {
            load_average: [start.load, self.load],
            others_cpu_share: ((busy - own) / total).clamp(0.0, 1.0),
        }
    }
}

/// What a benchmark does per run.
#[derive(Clone, Copy)]
enum Work {
    /// Memory-bound: minimal logical traffic in bytes.
    Bytes(f64),
    /// Compute: flops and minimal traffic in bytes.
    Flops { flops: f64, bytes: f64 },
    /// Integer compute (`2·MACs`) and minimal traffic in bytes; rated like flops.
    Ops { ops: f64, bytes: f64 },
}

fn rate(amount: f64, ms: f64) -> f64 {
    amount / (ms.max(1e-9) * 1e-3) * 1e-9
}

/// The rate, the ratio to the attainable roof and the roof's name, for `work` done in `ms`
/// against a roofline of `copy_gbps` and `fma_gflops`.
fn rate_and_ratio(
    work: Work,
    ms: f64,
    copy_gbps: f64,
    fma_gflops: f64,
) -> (f64, f64, &'static str) {
    match work {
        Work::Bytes(bytes) => {
            let r = rate(bytes, ms);
            (r, r / copy_gbps.max(1e-12), "copy")
        }
        Work::Flops { flops, bytes } | Work::Ops { ops: flops, bytes } => {
            let r = rate(flops, ms);
            let memory_roof = flops / bytes.max(1.0) * copy_gbps;
            if memory_roof < fma_gflops {
                (r, r / memory_roof.max(1e-12), "copy")
            } else {
                (r, r / fma_gflops.max(1e-12), "fma")
            }
        }
    }
}

/// Deterministic pseudo-random values in `[lo, hi)` (xorshift).
fn data(n: usize, seed: u32, lo: f32, hi: f32) -> Vec<f32> {
    let mut s = seed.max(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            lo + (hi - lo) * ((s >> 8) as f32 / (1u32 << 24) as f32)
        })
        .collect()
}

fn upload(ctx: &GpuContext, shape: &[usize], seed: u32, lo: f32, hi: f32) -> Result<GpuTensor> {
    let n: usize = shape.iter().product();
    GpuTensor::from_slice_f32(ctx, &data(n, seed, lo, hi), shape)
}

fn batch_norm(c: usize, seed: u32) -> BatchNorm {
    BatchNorm {
        weight: Some(data(c, seed, 0.5, 1.5).into()),
        bias: Some(data(c, seed + 1, -0.2, 0.2).into()),
        running_mean: data(c, seed + 2, -0.1, 0.1).into(),
        running_var: data(c, seed + 3, 0.5, 2.0).into(),
        eps: 1e-5,
        momentum: 0.1,
    }
}

/// The suite's state while it runs.
struct Runner<'a> {
    ctx: &'a GpuContext,
    stamps: Option<Stamps>,
    rig: Rig,
    roofline: Roofline,
    results: Vec<KernelResult>,
    done: usize,
    total: usize,
    progress: &'a mut dyn FnMut(&Progress),
    filter: Option<String>,
}

impl Runner<'_> {
    /// Whether the benchmark `name` runs (see [`BenchConfig::filter`]).
    fn wants(&self, name: &str) -> bool {
        self.filter
            .as_ref()
            .is_none_or(|f| f.split(',').any(|part| name.contains(part)))
    }

    /// `true` (and the step counted as done) when `name` is filtered out.
    fn skip(&mut self, name: &str, shape: &str) -> bool {
        if self.wants(name) {
            return false;
        }
        self.tick(format!("{name} {shape} (filtered out)"));
        true
    }

    fn tick(&mut self, label: String) {
        self.done += 1;
        (self.progress)(&Progress {
            done: self.done,
            total: self.total,
            label,
        });
    }

    /// Measures the roofline's best points again (see [`Rig::recheck`]).
    fn recheck(&mut self) -> Result<()> {
        self.rig
            .recheck(self.ctx, self.stamps.as_ref(), &mut self.roofline)
    }

    /// Records a row (the roofline ratios are filled in by [`finalize`]).
    fn record(
        &mut self,
        name: &str,
        shape: &str,
        work: Work,
        m: Measurement,
        note: Option<String>,
    ) {
        let (rate_wall, bytes, flops, ops) = match work {
            Work::Bytes(b) => (rate(b, m.wall_ms), b, None, None),
            Work::Flops { flops, bytes } => {
                (rate(flops, m.wall_ms), bytes, Some(flops as u64), None)
            }
            Work::Ops { ops, bytes } => (rate(ops, m.wall_ms), bytes, None, Some(ops as u64)),
        };
        let (gbps, gflops, gops) = match work {
            Work::Bytes(_) => (Some(rate_wall), None, None),
            Work::Flops { .. } => (None, Some(rate_wall), None),
            Work::Ops { .. } => (None, None, Some(rate_wall)),
        };
        self.results.push(KernelResult {
            name: name.to_string(),
            shape: shape.to_string(),
            gbps,
            gflops,
            gops,
            roofline_ratio: 0.0,
            roof: "copy",
            time_ms: m.wall_ms,
            gpu_ms: m.gpu_ms,
            gpu_roofline_ratio: None,
            bytes: bytes as u64,
            flops,
            ops,
            copy_gbps_interleaved: None,
            copy_gpu_gbps_interleaved: None,
            speedup: None,
            reps: m.reps,
            transfers: None,
            kernel_ms: None,
            note,
            algorithm: None,
            cold_start_s: None,
        });
        self.tick(format!("{name} {shape}"));
    }

    /// Times a memory-bound `run` interleaved with the roofline's best copy, records its row
    /// with that copy's rates (its roofline ratio is taken against them), and raises the
    /// roofline if the copy ran faster than before.
    fn bench_memory(
        &mut self,
        name: &str,
        shape: &str,
        bytes: f64,
        reps: &Reps,
        note: Option<String>,
        run: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Option<Measurement>> {
        self.bench_memory_impl(name, shape, bytes, reps, note, run, false)
    }

    /// [`Runner::bench_memory`] for a small kernel: also times, interleaved with the two, a copy
    /// of the same `bytes` (half read, half written) by the roofline's copy kernel, and adds to
    /// the row's note that copy's time and this row's ratio to it (the roofline ratio stays
    /// against the roofline's copy): on a device with a fixed cost per call, the bound any
    /// kernel of this size meets.
    fn bench_memory_same_size(
        &mut self,
        name: &str,
        shape: &str,
        bytes: f64,
        reps: &Reps,
        note: Option<String>,
        run: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Option<Measurement>> {
        self.bench_memory_impl(name, shape, bytes, reps, note, run, true)
    }

    #[allow(clippy::too_many_arguments)]
    fn bench_memory_impl(
        &mut self,
        name: &str,
        shape: &str,
        bytes: f64,
        reps: &Reps,
        note: Option<String>,
        run: &mut dyn FnMut() -> Result<()>,
        same_size: bool,
    ) -> Result<Option<Measurement>> {
        if self.skip(name, shape) {
            return Ok(None);
        }
        let n4 = ((bytes / 32.0).ceil() as usize).max(1);
        let m = {
            let mut copy = self.rig.copy_run(self.ctx, &self.roofline)?;
            if same_size {
                let mut same = self.rig.copy_run_n4(self.ctx, &self.roofline, n4)?;
                measure_interleaved(
                    self.ctx,
                    self.stamps.as_ref(),
                    reps,
                    &mut [&mut copy, run, &mut same],
                )?
            } else {
                measure_interleaved(self.ctx, self.stamps.as_ref(), reps, &mut [&mut copy, run])?
            }
        };
        let (copy_rate, copy_gpu_rate) = absorb_copy(&mut self.roofline, m[0]);
        let note = if same_size {
            let same_note = format!(
                "a copy of the same {} bytes: {:.3} ms ({:.2} GB/s), this row at {:.2} of it",
                n4 * 32,
                m[2].wall_ms,
                rate((n4 * 32) as f64, m[2].wall_ms),
                m[2].wall_ms / m[1].wall_ms.max(1e-9),
            );
            Some(match note {
                Some(n) => format!("{n}; {same_note}"),
                None => same_note,
            })
        } else {
            note
        };
        self.record(name, shape, Work::Bytes(bytes), m[1], note);
        if let Some(r) = self.results.last_mut() {
            r.copy_gbps_interleaved = Some(copy_rate);
            r.copy_gpu_gbps_interleaved = copy_gpu_rate;
        }
        Ok(Some(m[1]))
    }

    /// Times `run` and records a row.
    fn bench(
        &mut self,
        name: &str,
        shape: &str,
        work: Work,
        reps: &Reps,
        note: Option<String>,
        run: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Option<Measurement>> {
        if self.skip(name, shape) {
            return Ok(None);
        }
        let m = measure(self.ctx, self.stamps.as_ref(), reps, run)?;
        self.record(name, shape, work, m, note);
        Ok(Some(m))
    }

    /// Times a fused chain and its unfused counterpart interleaved (same conditions for
    /// both), records `{group}/fused` (with its speedup) and `{group}/unfused`, and returns
    /// the two measurements (`None` when filtered out).
    #[allow(clippy::too_many_arguments)]
    fn bench_fused_pair(
        &mut self,
        group: &str,
        shape: &str,
        work: Work,
        reps: &Reps,
        notes: [&str; 2],
        fused: &mut dyn FnMut() -> Result<()>,
        unfused: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Option<(Measurement, Measurement)>> {
        if !self.wants(&format!("{group}/fused")) && !self.wants(&format!("{group}/unfused")) {
            self.tick(format!("{group}/fused {shape} (filtered out)"));
            self.tick(format!("{group}/unfused {shape} (filtered out)"));
            return Ok(None);
        }
        let m = measure_interleaved(self.ctx, self.stamps.as_ref(), reps, &mut [fused, unfused])?;
        let (f, u) = (m[0], m[1]);
        let speedup = u.wall_ms / f.wall_ms.max(1e-9);
        self.record(
            &format!("{group}/fused"),
            shape,
            work,
            f,
            Some(notes[0].to_string()),
        );
        if let Some(r) = self.results.last_mut() {
            r.speedup = Some(speedup);
        }
        self.record(
            &format!("{group}/unfused"),
            shape,
            work,
            u,
            Some(notes[1].to_string()),
        );
        Ok(Some((f, u)))
    }
}

/// Fills in every row's roofline ratio against the final roofline (the best of the sweep and
/// of every recheck), and puts the roofline's own rows first.
fn finalize(roofline: &Roofline, results: &mut Vec<KernelResult>) {
    for k in results.iter_mut() {
        let work = match (k.flops, k.ops) {
            (Some(flops), _) => Work::Flops {
                flops: flops as f64,
                bytes: k.bytes as f64,
            },
            (None, Some(ops)) => Work::Ops {
                ops: ops as f64,
                bytes: k.bytes as f64,
            },
            (None, None) => Work::Bytes(k.bytes as f64),
        };
        let copy = k.copy_gbps_interleaved.unwrap_or(roofline.copy_gbps);
        let (_, ratio, roof) = rate_and_ratio(work, k.time_ms, copy, roofline.fma_gflops);
        k.roofline_ratio = ratio;
        k.roof = roof;
        let gpu_copy = k.copy_gpu_gbps_interleaved.or(roofline.copy_gpu_gbps);
        k.gpu_roofline_ratio = match (k.gpu_ms, gpu_copy, roofline.fma_gpu_gflops) {
            (Some(g), Some(copy), Some(fma)) => Some(rate_and_ratio(work, g, copy, fma).1),
            _ => None,
        };
    }
    let mut rows = roofline_rows(roofline);
    rows.append(results);
    *results = rows;
}

/// Runs the roofline sweep and the kernel suite of `cfg` on `ctx`, calling `progress` after
/// each step ([`BenchConfig::steps`] of them). See the module doc for what is measured. The
/// roofline's best points are measured again between sections, and every ratio is taken
/// against the best of all those measurements.
///
/// Errors: invalid configurations ([`Error::InvalidArgument`], e.g. a shape a kernel refuses)
/// and GPU errors.
pub fn run_suite(
    ctx: &Arc<GpuContext>,
    cfg: &BenchConfig,
    progress: &mut dyn FnMut(&Progress),
) -> Result<BenchReport> {
    let shared = ctx;
    let ctx: &GpuContext = ctx;
    let proc_start = ProcSample::now();
    let total = cfg.steps(ctx);
    let roofline_steps = cfg.roofline.steps(ctx);
    let stamps = Stamps::new(ctx)?;
    let (roofline, rig) = sweep(ctx, &cfg.roofline, stamps.as_ref(), &mut |p| {
        progress(&Progress {
            done: p.done,
            total,
            label: p.label.clone(),
        })
    })?;
    let mut runner = Runner {
        ctx,
        stamps,
        rig,
        roofline,
        results: Vec::new(),
        done: roofline_steps,
        total,
        progress,
        filter: cfg.filter.clone(),
    };
    elementwise(&mut runner, cfg)?;
    runner.recheck()?;
    fold(&mut runner, cfg)?;
    for &shape in &cfg.bn_train_shapes {
        runner.recheck()?;
        bn_train(&mut runner, cfg, shape)?;
    }
    let mut eval = Vec::new();
    let mut qat = Vec::new();
    for shape in &cfg.conv_shapes {
        runner.recheck()?;
        let (e, q) = conv(&mut runner, cfg, shape)?;
        eval.extend(e);
        qat.extend(q);
    }
    for shape in &cfg.conv_shapes {
        runner.recheck()?;
        int8_conv(&mut runner, cfg, shape)?;
    }
    runner.recheck()?;
    int8_linear(&mut runner, cfg)?;
    for &batch in &cfg.mnist_batches {
        if !runner.wants("int8_forward/mnist/device") && !runner.wants("int8_forward/mnist/backend")
        {
            runner.tick("int8_forward/mnist/device (filtered out)".to_string());
            runner.tick("int8_forward/mnist/backend (filtered out)".to_string());
            continue;
        }
        runner.recheck()?;
        int8_mnist(&mut runner, cfg, shared, batch)?;
    }
    if ![
        "mnist_forward/gpu",
        "mnist_forward/cpu_reference",
        "mnist_train_step/gpu",
    ]
    .iter()
    .any(|n| runner.wants(n))
    {
        for _ in 0..MNIST_TRAIN_ITEMS {
            runner.tick("mnist (filtered out)".to_string());
        }
    } else {
        runner.recheck()?;
        mnist_float(&mut runner, cfg, shared)?;
    }
    runner.recheck()?;
    let timestamps = runner.stamps.is_some();
    let roofline = runner.roofline;
    let mut kernels = runner.results;
    finalize(&roofline, &mut kernels);
    Ok(BenchReport {
        adapter: roofline.adapter.clone(),
        copy_gbps: roofline.copy_gbps,
        fma_gflops: roofline.fma_gflops,
        kernels,
        fused_speedup_eval: geomean(&eval),
        fused_speedup_qat: geomean(&qat),
        roofline,
        config: cfg.describe(),
        timestamps,
        host_load: proc_start
            .zip(ProcSample::now())
            .map(|(start, end)| end.load_since(start)),
    })
}

fn geomean(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 1.0;
    }
    (v.iter().map(|x| x.max(1e-12).ln()).sum::<f64>() / v.len() as f64).exp()
}

/// The two roofline kernels as rows (ratio 1 by definition).
fn roofline_rows(r: &Roofline) -> Vec<KernelResult> {
    let c = &r.copy_best;
    let f = &r.fma_best;
    vec![
        KernelResult {
            algorithm: None,
            cold_start_s: None,
            name: "roofline/copy_vec4".to_string(),
            shape: format!("{} f32", r.copy_bytes / 8),
            gbps: Some(r.copy_gbps),
            gflops: None,
            gops: None,
            roofline_ratio: 1.0,
            roof: "copy",
            time_ms: c.wall_ms,
            gpu_ms: c.gpu_ms,
            gpu_roofline_ratio: c.gpu_rate.zip(r.copy_gpu_gbps).map(|(a, b)| a / b),
            bytes: r.copy_bytes,
            flops: None,
            ops: None,
            copy_gbps_interleaved: None,
            copy_gpu_gbps_interleaved: None,
            speedup: None,
            reps: 0,
            transfers: None,
            kernel_ms: None,
            note: Some(format!(
                "best of {} points: workgroup {}, {} vec4 per invocation",
                r.copy_sweep.len(),
                c.workgroup_size,
                c.per_invocation
            )),
        },
        KernelResult {
            algorithm: None,
            cold_start_s: None,
            name: "roofline/fma_chains".to_string(),
            shape: format!("{:.3} GFLOP", r.fma_flops as f64 * 1e-9),
            gbps: None,
            gflops: Some(r.fma_gflops),
            gops: None,
            roofline_ratio: 1.0,
            roof: "fma",
            time_ms: f.wall_ms,
            gpu_ms: f.gpu_ms,
            gpu_roofline_ratio: f.gpu_rate.zip(r.fma_gpu_gflops).map(|(a, b)| a / b),
            bytes: 0,
            flops: Some(r.fma_flops),
            ops: None,
            copy_gbps_interleaved: None,
            copy_gpu_gbps_interleaved: None,
            speedup: None,
            reps: 0,
            transfers: None,
            kernel_ms: None,
            note: Some(format!(
                "best of {} points: workgroup {}, {} vec4 fma chains per invocation",
                r.fma_sweep.len(),
                f.workgroup_size,
                f.per_invocation
            )),
        },
    ]
}

/// Fake quant (per tensor, per channel, scalar vs vec4, preallocated vs allocating, with
/// mask) and the observers.
fn elementwise(r: &mut Runner<'_>, cfg: &BenchConfig) -> Result<()> {
    let ctx = r.ctx;
    let shape = cfg.elementwise_shape;
    let n: usize = shape.iter().product();
    let c = shape[1];
    let desc = format!("{}x{}x{}x{} ({n})", shape[0], shape[1], shape[2], shape[3]);
    let x = upload(ctx, &shape, 7, -4.0, 4.0)?;
    let y = GpuTensor::zeros(ctx, &shape, DType::F32)?;
    let mask = GpuTensor::zeros(ctx, &shape, DType::F32)?;
    let range = QuantRange::INT8;
    let per_tensor = GpuQParams::upload(ctx, &QParams::per_tensor(0.03, 3))?;
    let per_channel = GpuQParams::upload(
        ctx,
        &QParams::per_channel(
            (0..c).map(|i| 0.01 + i as f32 * 1e-3).collect(),
            (0..c).map(|i| (i % 7) as i32 - 3).collect(),
            1,
        )?,
    )?;
    let io = 8.0 * n as f64;
    r.bench_memory(
        "fake_quant/per_tensor",
        &desc,
        io,
        &cfg.reps,
        Some("vec4 kernel into a preallocated output".to_string()),
        &mut || fake_quant_into_with(ctx, &x, &per_tensor, range, &y, FakeQuantKernel::Vec4),
    )?;
    r.bench_memory(
        "fake_quant/per_channel",
        &desc,
        io,
        &cfg.reps,
        Some("axis 1; vec4 kernel into a preallocated output".to_string()),
        &mut || fake_quant_into_with(ctx, &x, &per_channel, range, &y, FakeQuantKernel::Vec4),
    )?;
    r.bench_memory(
        "fake_quant/per_tensor/scalar",
        &desc,
        io,
        &cfg.reps,
        Some("one element per invocation, preallocated output".to_string()),
        &mut || fake_quant_into_with(ctx, &x, &per_tensor, range, &y, FakeQuantKernel::Scalar),
    )?;
    r.bench_memory(
        "fake_quant/per_tensor/alloc",
        &desc,
        io,
        &cfg.reps,
        Some("fake_quant(): allocates (and zero-fills) its output each call".to_string()),
        &mut || fake_quant(ctx, &x, &per_tensor, range).map(drop),
    )?;
    r.bench_memory(
        "fake_quant_with_mask/per_channel",
        &desc,
        12.0 * n as f64,
        &cfg.reps,
        Some("axis 1; y and the STE mask as f32 (12 B/element)".to_string()),
        &mut || fake_quant_with_mask_into(ctx, &x, &per_channel, range, &y, &mask),
    )?;
    let read = 4.0 * n as f64;
    for (name, scheme, note) in [
        (
            "observer/per_tensor",
            QScheme::PerTensorAffine,
            "min/max + qparams, affine",
        ),
        (
            "observer/per_channel",
            QScheme::PerChannelSymmetric,
            "min/max + qparams along axis 1, symmetric",
        ),
    ] {
        let spec = ObserverSpec::new(QDtype::QInt8, scheme, range, 1)?;
        r.bench_memory(
            name,
            &desc,
            read,
            &cfg.reps,
            Some(note.to_string()),
            &mut || observe(ctx, &x, &spec).map(drop),
        )?;
    }
    Ok(())
}

/// BatchNorm folding into a conv weight.
fn fold(r: &mut Runner<'_>, cfg: &BenchConfig) -> Result<()> {
    let ctx = r.ctx;
    let shape = cfg.fold_shape;
    let o = shape[0];
    let n: usize = shape.iter().product();
    let w = upload(ctx, &shape, 11, -1.0, 1.0)?;
    let bn = GpuBatchNorm::upload(ctx, &batch_norm(o, 13))?;
    // Read and write the weight; read the four BN vectors, write the bias.
    let bytes = 8.0 * n as f64 + 20.0 * o as f64;
    r.bench_memory(
        "fold_conv_bn",
        &format!("{}x{}x{}x{}", shape[0], shape[1], shape[2], shape[3]),
        bytes,
        &cfg.reps,
        Some("weight and bias, allocating outputs".to_string()),
        &mut || fold_conv_bn(ctx, &w, None, &bn, false).map(drop),
    )?;
    Ok(())
}

/// BatchNorm2d in training mode on `shape`, forward (`bn_train/forward`: statistics, running
/// update, normalize; read x, write y = 8 B/element, plus 32 B/channel: read γ, β and the
/// running statistics, write the running statistics and the saved mean and invstd) and
/// backward (`bn_train/backward`: training form; read x and dy, write dx = 12 B/element, plus
/// 20 B/channel: read mean, invstd and γ, write dβ and dγ), each into preallocated outputs and
/// timed interleaved with the roofline's copy.
fn bn_train(r: &mut Runner<'_>, cfg: &BenchConfig, shape: [usize; 4]) -> Result<()> {
    let ctx = r.ctx;
    let [n, c, h, w] = shape;
    let elems = (n * c * h * w) as f64;
    let channels = c as f64;
    let desc = format!("{n}x{c}x{h}x{w}");
    let x = upload(ctx, &shape, 43, -2.0, 2.0)?;
    let dy = upload(ctx, &shape, 47, -1.0, 1.0)?;
    let bn = GpuBatchNorm::upload(ctx, &batch_norm(c, 53))?;
    let layout = reduction_layout(shape);
    let how = if layout.per_thread {
        "one invocation per channel".to_string()
    } else {
        format!(
            "{} partial invocation(s) per channel, {} elementwise pass",
            layout.partials,
            if layout.plane_grid { "plane" } else { "flat" }
        )
    };
    let out = batch_norm2d(ctx, &x, &bn, 0.1, true, Activation::None, false)?;
    r.bench_memory_same_size(
        "bn_train/forward",
        &desc,
        8.0 * elems + 32.0 * channels,
        &cfg.reps,
        Some(format!(
            "batch statistics, running update, normalize + affine; {how}"
        )),
        &mut || batch_norm2d_into(ctx, &x, &bn, 0.1, true, Activation::None, &out),
    )?;
    let grads = batch_norm2d_backward(ctx, &x, &dy, &bn, &out.stats.stats, true)?;
    r.bench_memory_same_size(
        "bn_train/backward",
        &desc,
        12.0 * elems + 20.0 * channels,
        &cfg.reps,
        Some(format!("sum dy, sum dy*xhat, dx (training form); {how}")),
        &mut || batch_norm2d_backward_into(ctx, &x, &dy, &bn, &out.stats.stats, true, &grads),
    )?;
    Ok(())
}

/// One conv shape: conv alone, fused / prefolded / unfused eval, fused / unfused QAT forward
/// and backward. Returns the eval and QAT forward speedups (`None` when filtered out).
fn conv(
    r: &mut Runner<'_>,
    cfg: &BenchConfig,
    shape: &ConvShape,
) -> Result<(Option<f64>, Option<f64>)> {
    let ctx = r.ctx;
    let batch = cfg.conv_batch;
    let desc = shape.describe(batch);
    let x = upload(ctx, &shape.input(batch), 17, -1.0, 1.0)?;
    let fan_in = (shape.weight()[1] * shape.kernel * shape.kernel).max(1) as f32;
    let bound = (3.0 / fan_in).sqrt();
    let w = upload(ctx, &shape.weight(), 19, -bound, bound)?;
    let bn = GpuBatchNorm::upload(ctx, &batch_norm(shape.out_channels, 23))?;
    let layer = GpuConv2d {
        weight: &w,
        bias: None,
        params: shape.params(),
    };
    let work = Work::Flops {
        flops: shape.flops(batch),
        bytes: shape.min_bytes(batch),
    };
    let reps = cfg.conv_reps;
    let act = Activation::Relu;
    let mut run_conv = || conv2d(ctx, &x, &w, &layer.params, &ConvEpilogue::none()).map(drop);
    // Each row's first run (tuning the class, compiling what is new), by row name.
    let mut colds: Vec<(&str, f64)> = Vec::new();
    if r.wants("conv2d") {
        colds.push(("conv2d", first_run(ctx, &mut run_conv)?));
    }
    let conv_rows = r.results.len();
    let plain = r.bench(
        "conv2d",
        &desc,
        work,
        &reps,
        Some("forward, no epilogue".to_string()),
        &mut run_conv,
    )?;

    let (wf, bf) = fold_conv_bn(ctx, &w, None, &bn, false)?;
    let prefolded = ConvEpilogue {
        out_scale: None,
        bias: Some(&bf),
        activation: act,
    };
    let mut run_prefolded = || conv2d(ctx, &x, &wf, &layer.params, &prefolded).map(drop);
    if r.wants("conv_bn_relu_eval/fused_prefolded") {
        colds.push((
            "conv_bn_relu_eval/fused_prefolded",
            first_run(ctx, &mut run_prefolded)?,
        ));
    }
    r.bench(
        "conv_bn_relu_eval/fused_prefolded",
        &desc,
        work,
        &reps,
        Some("inference: BN folded once beforehand, one conv per run".to_string()),
        &mut run_prefolded,
    )?;
    let mut eval_fused = || conv_bn_act_eval_scaled(ctx, &x, &layer, &bn, act).map(drop);
    let mut eval_unfused = || conv_bn_act_eval_unfused(ctx, &x, &layer, &bn, act).map(drop);
    if r.wants("conv_bn_relu_eval/fused") || r.wants("conv_bn_relu_eval/unfused") {
        colds.push(("conv_bn_relu_eval/fused", first_run(ctx, &mut eval_fused)?));
        colds.push((
            "conv_bn_relu_eval/unfused",
            first_run(ctx, &mut eval_unfused)?,
        ));
    }
    let eval = r.bench_fused_pair(
        "conv_bn_relu_eval",
        &desc,
        work,
        &reps,
        [
            "per-channel scale and folded bias (one O(C) dispatch), then one conv with \
             gamma/sigma, bias and ReLU in its epilogue; no weight refold",
            "conv, BatchNorm (eval), ReLU: separate dispatches and buffers",
        ],
        &mut eval_fused,
        &mut eval_unfused,
    )?;

    let qcfg = QatConfig {
        activation: act,
        freeze_bn: false,
        weight_observer: ObserverSpec::new(
            QDtype::QInt8,
            QScheme::PerChannelSymmetric,
            QuantRange::INT8,
            0,
        )?,
    };
    let mut qat_fused = || conv_bn_qat_forward(ctx, &x, &layer, &bn, 0.1, &qcfg).map(drop);
    let mut qat_unfused =
        || conv_bn_qat_forward_unfused(ctx, &x, &layer, &bn, 0.1, &qcfg).map(drop);
    if r.wants("conv_bn_relu_qat_forward/fused") || r.wants("conv_bn_relu_qat_forward/unfused") {
        colds.push((
            "conv_bn_relu_qat_forward/fused",
            first_run(ctx, &mut qat_fused)?,
        ));
        colds.push((
            "conv_bn_relu_qat_forward/unfused",
            first_run(ctx, &mut qat_unfused)?,
        ));
    }
    let qat = r.bench_fused_pair(
        "conv_bn_relu_qat_forward",
        &desc,
        work,
        &reps,
        [
            "ConvBnReLU2d training step forward, fused passes",
            "ConvBnReLU2d training step forward, one dispatch per op",
        ],
        &mut qat_fused,
        &mut qat_unfused,
    )?;

    let fwd = conv_bn_qat_forward(ctx, &x, &layer, &bn, 0.1, &qcfg)?;
    let dy = upload(ctx, fwd.y.shape(), 59, -1.0, 1.0)?;
    let backward_work = Work::Flops {
        flops: 2.0 * shape.flops(batch),
        bytes: shape.backward_min_bytes(batch),
    };
    let backward = r.bench_fused_pair(
        "conv_bn_relu_qat_backward",
        &desc,
        backward_work,
        &reps,
        [
            "ConvBnReLU2d training step backward: ReLU mask and divide-back folded into the \
             BatchNorm backward; conv input and weight gradients (flops: 2x the forward's)",
            "ConvBnReLU2d training step backward, one dispatch per op (ReLU backward, \
             BatchNorm backward, divide-back)",
        ],
        &mut || conv_bn_qat_backward(ctx, &x, &dy, &layer, &bn, &qcfg, &fwd.saved()).map(drop),
        &mut || {
            conv_bn_qat_backward_unfused(ctx, &x, &dy, &layer, &bn, &qcfg, &fwd.saved()).map(drop)
        },
    )?;
    // Fused forward + backward against the plain conv forward, in the backward row's note.
    if let (Some(p), Some((qf, _)), Some((bf, _))) = (plain, qat, backward) {
        let ratio = (qf.wall_ms + bf.wall_ms) / p.wall_ms.max(1e-9);
        let fused_row = r
            .results
            .iter_mut()
            .rev()
            .find(|k| k.name == "conv_bn_relu_qat_backward/fused");
        if let Some(k) = fused_row {
            if let Some(note) = k.note.as_mut() {
                note.push_str(&format!(
                    "; fused forward + backward = {ratio:.2}x the plain conv forward"
                ));
            }
        }
    }
    // The f32 forward rows of this shape: the variant Auto runs and each row's cold start.
    let algorithm = tuned_variant(ctx, &shape.input(batch), &shape.weight(), &layer.params)?
        .map(ConvVariant::id);
    for row in r.results[conv_rows..].iter_mut() {
        if let Some(&(_, cold)) = colds.iter().find(|(name, _)| row.name == *name) {
            row.algorithm.clone_from(&algorithm);
            row.cold_start_s = Some(cold);
        }
    }
    let speedup =
        |m: Option<(Measurement, Measurement)>| m.map(|(f, u)| u.wall_ms / f.wall_ms.max(1e-9));
    Ok((speedup(eval), speedup(qat)))
}

/// Seconds of one run of `run` until the device is done (a row's cold start).
fn first_run(ctx: &GpuContext, run: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    ctx.wait()?;
    let t = std::time::Instant::now();
    run()?;
    ctx.wait()?;
    Ok(t.elapsed().as_secs_f64())
}

/// Deterministic int8 codes in `[lo, hi]` (xorshift).
fn codes(n: usize, seed: u32, lo: i32, hi: i32) -> Vec<i8> {
    let span = (hi - lo + 1) as u32;
    let mut s = seed.max(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (lo + ((s >> 8) % span) as i32) as i8
        })
        .collect()
}

/// A per-channel requantization in `RequantMode::Float` (the deployment default) with
/// multipliers around `m`, output zero point -5, ReLU-like clamp.
fn bench_requant(channels: usize, m: f64) -> Result<Requant> {
    let real: Vec<f64> = (0..channels)
        .map(|o| m * (1.0 + (o % 7) as f64 * 0.1))
        .collect();
    Requant::new(&real, RequantMode::Float, -5, (-5, 127))
}

fn int8_note(dot: Int8Dot, what: &str) -> String {
    let how = match dot {
        Int8Dot::Portable => "portable dot (extractBits unpack)",
        Int8Dot::Packed => "dot4I8Packed",
    };
    format!(
        "{what}, {how}; i32 accumulation, f32 requantization epilogue; GOP/s = 2·MACs/s \
         against the f32 fma roof"
    )
}

/// The integer conv2d ([`GpuConv2dInt8`], weights prepared once) at one conv shape: the kernel
/// the tuner chooses (`int8_conv2d/tuned`, its `algorithm` and cold start: tuning the class,
/// compiling what is new) and the dot-product kernel on each path:
/// `int8_conv2d/{portable,packed}`.
fn int8_conv(r: &mut Runner<'_>, cfg: &BenchConfig, shape: &ConvShape) -> Result<()> {
    let ctx = r.ctx;
    let batch = cfg.conv_batch;
    let desc = shape.describe(batch);
    let xs = shape.input(batch);
    let x = Array4::from_shape_vec(xs, codes(xs.iter().product(), 29, -128, 127))
        .map_err(|e| Error::invalid(e.to_string()))?;
    let ws = shape.weight();
    let w = Array4::from_shape_vec(ws, codes(ws.iter().product(), 31, -127, 127))
        .map_err(|e| Error::invalid(e.to_string()))?;
    let bias = Array1::from_shape_fn(shape.out_channels, |o| (o as i32 % 13 - 6) * 100);
    let fan_in = (ws[1] * ws[2] * ws[3]).max(1) as f64;
    let rq = bench_requant(shape.out_channels, 0.5 / fan_in.sqrt() / 64.0)?;
    let gx = GpuInt8Tensor::upload(ctx, &x.into_dyn())?;
    let layer = GpuConv2dInt8::new(ctx, 3, &w, Some(&bias), &shape.params(), &rq)?;
    // int8 x, w and y: one byte per element.
    let work = Work::Ops {
        ops: shape.flops(batch),
        bytes: shape.elements(batch),
    };
    let tuned = "int8_conv2d/tuned";
    let first = r.results.len();
    let cold = if r.wants(tuned) {
        Some(first_run(ctx, &mut || layer.forward(ctx, &gx).map(drop))?)
    } else {
        None
    };
    r.bench(
        tuned,
        &desc,
        work,
        &cfg.conv_reps,
        Some(
            "the variant the tuner chose (algorithm): f32_*: conv2d_f, products of the codes \
             in exact f32 (flushed into i32 every 1024), channels x 8 columns x rows per \
             invocation, weights shared by subgroup broadcast (_sg); dot_*: the dot-product \
             kernel; f32 requantization epilogue; GOP/s = 2·MACs/s against the f32 fma roof"
                .to_string(),
        ),
        &mut || layer.forward(ctx, &gx).map(drop),
    )?;
    if cold.is_some() {
        let algorithm = layer.variant_for(ctx, &xs)?.id();
        for row in r.results[first..].iter_mut() {
            row.algorithm = Some(algorithm.clone());
            row.cold_start_s = cold;
        }
    }
    let what = if shape.groups > 1 && shape.groups == shape.in_channels {
        "depthwise 3x3 (conv2d_dw): one word (4 channels) x 4 output rows per invocation, \
         walked left to right"
    } else {
        "packed int8 codes, 4 channels x 4 columns per invocation"
    };
    for dot in int8_dots(ctx) {
        r.bench(
            &format!("int8_conv2d/{}", dot_name(dot)),
            &desc,
            work,
            &cfg.conv_reps,
            Some(int8_note(dot, what)),
            &mut || layer.forward_with(ctx, &gx, dot).map(drop),
        )?;
    }
    Ok(())
}

/// The integer linear layer ([`GpuLinearInt8`]) on each dot-product path:
/// `int8_linear/{portable,packed}`.
fn int8_linear(r: &mut Runner<'_>, cfg: &BenchConfig) -> Result<()> {
    let ctx = r.ctx;
    let [n, inp, out] = cfg.int8_linear_shape;
    let x = Array2::from_shape_vec((n, inp), codes(n * inp, 37, -128, 127))
        .map_err(|e| Error::invalid(e.to_string()))?;
    let w = Array2::from_shape_vec((out, inp), codes(out * inp, 41, -127, 127))
        .map_err(|e| Error::invalid(e.to_string()))?;
    let rq = bench_requant(out, 0.5 / (inp.max(1) as f64).sqrt() / 64.0)?;
    let gx = GpuInt8Tensor::upload(ctx, &x.into_dyn())?;
    let layer = GpuLinearInt8::new(ctx, -2, &w, None, &rq)?;
    let work = Work::Ops {
        ops: 2.0 * (n * inp * out) as f64,
        bytes: (n * inp + out * inp + n * out) as f64,
    };
    for dot in int8_dots(ctx) {
        r.bench(
            &format!("int8_linear/{}", dot_name(dot)),
            &format!("{n}x{inp} w{out}x{inp}"),
            work,
            &cfg.reps,
            Some(int8_note(dot, "4 rows x 4 output channels per invocation")),
            &mut || layer.forward_with(ctx, &gx, dot).map(drop),
        )?;
    }
    Ok(())
}

/// `2·MACs` of one forward of `model` on an input of `shape` (conv and linear layers).
fn int_model_ops(model: &IntModel, shape: &[usize]) -> Result<f64> {
    let mut shapes: Vec<Vec<usize>> = vec![shape.to_vec()];
    let mut ops = 0.0;
    for node in &model.nodes {
        let s = &shapes[node.inputs[0]];
        let y = match &node.layer {
            IntLayer::Conv { weight, params, .. } => {
                let y = params.output_shape(s, weight.shape())?.to_vec();
                let [_, cg, kh, kw] = weight.dim().into();
                ops += 2.0 * (y.iter().product::<usize>() * cg * kh * kw) as f64;
                y
            }
            IntLayer::Linear { weight, .. } => {
                let n = s.first().copied().unwrap_or(1);
                ops += 2.0 * (n * weight.len()) as f64;
                vec![n, weight.nrows()]
            }
            IntLayer::MaxPool2d { kernel, stride } => match s.as_slice() {
                &[n, c, h, w] if h >= *kernel && w >= *kernel => {
                    vec![n, c, (h - kernel) / stride + 1, (w - kernel) / stride + 1]
                }
                _ => return Err(Error::invalid("int_model_ops: bad max_pool2d input")),
            },
            IntLayer::Flatten => {
                let n = s.first().copied().unwrap_or(1);
                vec![n, s.iter().skip(1).product()]
            }
            IntLayer::Add { .. } | IntLayer::Table { .. } => s.clone(),
            IntLayer::MaxPool2dPad { pool } => match s.as_slice() {
                &[n, c, h, w] => {
                    let (oh, ow) = pool.output(h, w)?;
                    vec![n, c, oh, ow]
                }
                _ => return Err(Error::invalid("int_model_ops: bad max pooling input")),
            },
            IntLayer::GlobalAvgPool { .. } => match s.as_slice() {
                &[n, c, _, _] => vec![n, c, 1, 1],
                _ => return Err(Error::invalid("int_model_ops: bad global pooling input")),
            },
        };
        shapes.push(y);
    }
    Ok(ops)
}

/// The Mnist network in int8 (`deploy::convert` of `model::mnist` with trained-like BN
/// statistics, default config): forward at `batch`, device-resident ([`GpuIntModel`]: weights
/// uploaded once, codes stay on the device, input uploaded and output codes downloaded each
/// run) against [`IntModel::forward`] on a [`crate::GpuBackend`] of the same context (which
/// prepares the model, packing and uploading every weight, on each call), timed interleaved:
/// `int8_forward/mnist/device` (with the speedup) and `int8_forward/mnist/backend`.
fn int8_mnist(
    r: &mut Runner<'_>,
    cfg: &BenchConfig,
    ctx: &Arc<GpuContext>,
    batch: usize,
) -> Result<()> {
    use crate::model::mnist;
    let mut m = mnist::mnist(0)?;
    m.eval();
    let calib = mnist::synthetic_batch(32, 1);
    mnist::set_trained_bn_stats(&mut m, &calib, 3)?;
    let net = mnist::deploy_net(&m)?;
    let model = crate::deploy::convert(
        &net,
        &crate::CpuBackend,
        [&calib.into_dyn()],
        &crate::deploy::DeployConfig::default(),
    )?;
    let x = mnist::synthetic_batch(batch, 2).into_dyn();
    let device = GpuIntModel::new(&model, Arc::clone(ctx))?;
    let backend = crate::GpuBackend::new(Arc::clone(ctx));
    if device.forward(&x)? != model.forward(&backend, &x)? {
        return Err(Error::Gpu(
            "int8 Mnist: the device-resident and Backend forwards disagree".to_string(),
        ));
    }
    let weights: usize = model
        .nodes
        .iter()
        .map(|n| match &n.layer {
            IntLayer::Conv { weight, .. } => weight.len(),
            IntLayer::Linear { weight, .. } => weight.len(),
            _ => 0,
        })
        .sum();
    // Read the f32 input and the int8 weights, write the output codes.
    let out: usize = batch * 10;
    let work = Work::Ops {
        ops: int_model_ops(&model, x.shape())?,
        bytes: (4 * x.len() + weights + out) as f64,
    };
    let dot = device.dot();
    let shape = format!("{batch}x1x28x28");
    let mut run_device = || device.forward(&x).map(drop);
    let mut run_backend = || model.forward(&backend, &x).map(drop);
    let m = measure_interleaved(
        r.ctx,
        r.stamps.as_ref(),
        &cfg.reps,
        &mut [&mut run_device, &mut run_backend],
    )?;
    let (d, b) = (m[0], m[1]);
    r.record(
        "int8_forward/mnist/device",
        &shape,
        work,
        d,
        Some(format!(
            "deploy::GpuIntModel: prepared once, codes stay on the device ({} dot); speedup = \
             IntModel::forward time (prepares per call) / this",
            dot_name(dot)
        )),
    );
    if let Some(k) = r.results.last_mut() {
        k.speedup = Some(b.wall_ms / d.wall_ms.max(1e-9));
    }
    r.record(
        "int8_forward/mnist/backend",
        &shape,
        work,
        b,
        Some(
            "IntModel::forward(&GpuBackend): prepares (packs, uploads weights) per call"
                .to_string(),
        ),
    );
    Ok(())
}

/// Multiply-adds ×2 of NNI's Mnist float forward at `batch` (conv1, conv2, fc1, fc2).
fn mnist_flops(batch: usize) -> f64 {
    let per_image = 20 * 24 * 24 * 25 + 50 * 8 * 8 * 20 * 25 + 800 * 500 + 500 * 10;
    2.0 * (batch * per_image) as f64
}

/// Runs `run` once with every compute pass timestamped: the sum of its kernels' GPU time and
/// the passes (`None` without timestamps); and, in a separate run, its transfers.
fn transfers_and_kernel_time(
    ctx: &GpuContext,
    run: &mut dyn FnMut() -> Result<()>,
) -> Result<(u64, Option<(f64, u32)>)> {
    ctx.wait()?;
    let before = ctx.transfer_stats();
    run()?;
    ctx.wait()?;
    let d = ctx.transfer_stats().since(&before);
    let kernels = if ctx.has_timestamps() {
        ctx.begin_kernel_timing(crate::gpu::MAX_TIMED_PASSES)?;
        let ran = run();
        let timing = ctx.end_kernel_timing()?;
        ran?;
        Some((timing.gpu_ms, timing.passes))
    } else {
        None
    };
    Ok((d.uploads + d.downloads, kernels))
}

/// NNI's Mnist network in float on the shipped digits (batch `cfg.mnist_train_batch`):
/// `mnist_forward/gpu` (device-resident: parameters on the device, each run uploads the
/// batch, runs the forward and downloads the logits), `mnist_forward/cpu_reference` (the
/// same forward on the CPU reference, host time) and `mnist_train_step/gpu` (a QAT training
/// step: batch and labels uploaded, forward with fake quantization, backward, SGD, the loss
/// downloaded). Each GPU row carries its transfers per run and the sum of its kernels'
/// GPU-timestamped time.
fn mnist_float(r: &mut Runner<'_>, cfg: &BenchConfig, ctx: &Arc<GpuContext>) -> Result<()> {
    use crate::data::digits::{Digits, MNIST_MEAN, MNIST_STD};
    use crate::model::mnist;
    use crate::optim::Sgd;
    use crate::train::{GpuTrainer, QatOptions};
    let batch = cfg.mnist_train_batch;
    let mut digits = Digits::bundled()?;
    digits.normalize(MNIST_MEAN, MNIST_STD)?;
    let b = digits
        .train
        .batches(batch, None)?
        .next()
        .ok_or_else(|| Error::invalid("mnist benchmark: no training batch"))?;
    let x = b.images.into_dyn();
    let labels = b.labels;
    let net = mnist::deploy_net(&mnist::mnist(0)?)?;
    let sgd = Sgd {
        lr: 0.01,
        momentum: 0.9,
        ..Sgd::new(0.01)
    };
    let shape = format!("{batch}x1x28x28");
    let flops = mnist_flops(batch);
    // Parameters the forward reads: weights, biases, and a BatchNorm's four rows.
    let params: usize = net
        .nodes()
        .iter()
        .map(|node| match &node.op {
            crate::deploy::NodeOp::Conv { conv, bn, .. } => {
                conv.weight.len()
                    + conv.bias.as_ref().map_or(0, |b| b.len())
                    + bn.as_ref().map_or(0, |b| 4 * b.channels())
            }
            crate::deploy::NodeOp::Linear { weight, bias, .. } => {
                weight.len() + bias.as_ref().map_or(0, |b| b.len())
            }
            _ => 0,
        })
        .sum();
    let bytes = (4 * (x.len() + params + 10 * batch)) as f64;

    // Forward: GPU (device-resident) and the CPU reference.
    let mut trainer = GpuTrainer::new(Arc::clone(ctx), &net, sgd)?;
    let mut run_gpu = || -> Result<()> {
        let xd = GpuTensor::upload_f32(ctx, &x)?;
        trainer.forward_eval(&xd)?.download_f32(ctx)?;
        Ok(())
    };
    let gpu = measure(r.ctx, r.stamps.as_ref(), &cfg.reps, &mut run_gpu)?;
    let (transfers, kernels) = transfers_and_kernel_time(r.ctx, &mut run_gpu)?;
    let mut cpu_times = Vec::new();
    for i in 0..cfg.reps.warmup + gpu.reps {
        let t = std::time::Instant::now();
        net.forward_values(&crate::CpuBackend, &x, false)?;
        if i >= cfg.reps.warmup {
            cpu_times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let cpu = Measurement {
        wall_ms: super::timing::median(&mut cpu_times),
        gpu_ms: None,
        reps: cpu_times.len(),
    };
    let work = Work::Flops { flops, bytes };
    let overhead = |k: Option<(f64, u32)>, wall: f64| match k {
        Some((ms, passes)) => format!(
            "; {passes} compute passes, kernels {ms:.2} ms on the GPU clock, wall / kernels \
             {:.2}",
            wall / ms.max(1e-9)
        ),
        None => String::new(),
    };
    r.record(
        "mnist_forward/gpu",
        &shape,
        work,
        gpu,
        Some(format!(
            "GpuTrainer::forward_eval, parameters on the device: upload batch, forward, \
             download logits ({transfers} transfers); speedup = CPU reference time / this{}",
            overhead(kernels, gpu.wall_ms)
        )),
    );
    if let Some(k) = r.results.last_mut() {
        k.speedup = Some(cpu.wall_ms / gpu.wall_ms.max(1e-9));
        k.transfers = Some(transfers);
        k.kernel_ms = kernels.map(|k| k.0);
    }
    r.record(
        "mnist_forward/cpu_reference",
        &shape,
        work,
        cpu,
        Some("deploy::Net::forward_values on the CPU reference (host time)".to_string()),
    );

    // A QAT training step.
    let mut qat = GpuTrainer::new(Arc::clone(ctx), &net, sgd)?;
    qat.enable_qat(QatOptions::default())?;
    let mut run_step = || -> Result<()> {
        let xd = GpuTensor::upload_f32(ctx, &x)?;
        let yd = crate::kernels::train::upload_labels(ctx, &labels, 10)?;
        qat.step(&xd, &yd)?.download_f32(ctx)?;
        Ok(())
    };
    let step = measure(r.ctx, r.stamps.as_ref(), &cfg.reps, &mut run_step)?;
    let (transfers, kernels) = transfers_and_kernel_time(r.ctx, &mut run_step)?;
    r.record(
        "mnist_train_step/gpu",
        &shape,
        Work::Flops {
            flops: 3.0 * flops,
            bytes: 3.0 * bytes,
        },
        step,
        Some(format!(
            "QAT step (fake-quantized weights and activations, ConvBnReLU QAT for conv1): \
             upload batch and labels, forward, backward, SGD, download the loss ({transfers} \
             transfers); flops ~3x the forward{}",
            overhead(kernels, step.wall_ms)
        )),
    );
    if let Some(k) = r.results.last_mut() {
        k.transfers = Some(transfers);
        k.kernel_ms = kernels.map(|k| k.0);
    }
    Ok(())
}

impl BenchReport {
    /// The JSON of `qfuse bench --json` (pretty-printed).
    ///
    /// Errors: [`Error::InvalidArgument`] if serialization fails.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self)
            .map_err(|e| Error::invalid(format!("serializing the bench report: {e}")))
    }

    /// Writes [`BenchReport::to_json`] to `path`, all or nothing
    /// ([`crate::io::file::write_output`]).
    ///
    /// Errors: [`Error::Io`], and a `path` that is not a regular file.
    pub fn write_json(&self, path: &Path) -> Result<()> {
        let json = self.to_json()?;
        crate::io::file::write_output(path, (json + "\n").as_bytes(), &[])
    }

    /// The report as a text table: one row per kernel (name, shape, time, GPU time, rate,
    /// ratio to the roofline), then the fused speedups.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "adapter: {}", self.adapter);
        let _ = writeln!(s, "{}", self.config);
        if let Some(h) = self.host_load {
            let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
            let _ = writeln!(
                s,
                "host: {cpus} CPUs, other processes used {:.0}% of them during the run, load \
                 average {:.2} -> {:.2} (on a CPU adapter the figures depend on host load)",
                100.0 * h.others_cpu_share,
                h.load_average[0],
                h.load_average[1]
            );
        }
        let gpu = |v: Option<f64>| v.map_or(String::new(), |g| format!(" ({g:.1} GPU-timed)"));
        let _ = writeln!(
            s,
            "roofline: copy {:.2} GB/s{}, fma {:.2} GFLOP/s{}",
            self.copy_gbps,
            gpu(self.roofline.copy_gpu_gbps),
            self.fma_gflops,
            gpu(self.roofline.fma_gpu_gflops)
        );
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:<36} {:<30} {:>10} {:>10} {:>16} {:>7} {:>8}",
            "kernel", "shape", "time ms", "gpu ms", "rate", "roof", "speedup"
        );
        for k in &self.kernels {
            let rate = match (k.gbps, k.gflops, k.gops) {
                (Some(g), _, _) => format!("{g:.2} GB/s"),
                (_, Some(f), _) => format!("{f:.2} GFLOP/s"),
                (_, _, Some(o)) => format!("{o:.2} GOP/s"),
                _ => String::new(),
            };
            let gpu_ms = k.gpu_ms.map_or("-".to_string(), |g| format!("{g:.3}"));
            let speedup = k.speedup.map_or(String::new(), |v| format!("{v:.2}x"));
            let variant = match (&k.algorithm, k.cold_start_s) {
                (Some(a), Some(c)) => format!("  {a}, cold {c:.2} s"),
                (None, Some(c)) => format!("  cold {c:.2} s"),
                _ => String::new(),
            };
            let _ = writeln!(
                s,
                "{:<36} {:<30} {:>10.3} {:>10} {:>16} {:>4.2} {:<3} {:>8}{variant}",
                k.name, k.shape, k.time_ms, gpu_ms, rate, k.roofline_ratio, k.roof, speedup
            );
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "fused speedup (geometric mean over conv shapes, unfused/fused time): \
             eval {:.2}x, QAT forward {:.2}x",
            self.fused_speedup_eval, self.fused_speedup_qat
        );
        let _ = write!(
            s,
            "roof: memory-bound kernels: ratio to the copy kernel timed interleaved with them; \
             convs (GFLOP/s, and int8 GOP/s = 2 x MACs/s): ratio to min(fma, intensity x \
             copy){}",
            if self.timestamps {
                "; gpu ms: GPU timestamps around the same work"
            } else {
                "; no GPU timestamps on this device"
            }
        );
        s
    }
}
