//! Benchmarks of the kernels against the device's own roofline.
//!
//! - [`measure_roofline`]: the best memory bandwidth (`copy_vec4`: vec4 loads and stores) and
//!   arithmetic throughput (`fma_chains`: independent fma chains in registers) the device
//!   reaches, each over a sweep of workgroup size and work per invocation
//!   (`shaders/roofline.wgsl`).
//! - [`run_suite`]: the roofline, then every kernel of interest with its achieved rate and
//!   its ratio to the roofline, and the fused-vs-unfused comparisons; [`BenchReport`] prints
//!   as a table and serializes to the JSON of `qfuse bench --json`.
//!
//! # What is measured
//! - **Time** is submit-to-completion: encode, submit, wait for the device
//!   ([`GpuContext::wait`]); the median of several runs after warm-up runs ([`Reps`]). With
//!   [`GpuContext::has_timestamps`], as many runs again are bracketed by GPU timestamps
//!   (an empty compute pass before the first and after the last submission), and their
//!   median is reported too.
//! - **Rates**: memory-bound kernels (fake quant, observers, BN folding, BatchNorm training)
//!   in GB/s (10⁹ B/s) of their *minimal logical traffic* (fake quant: read x, write y =
//!   8 B/element; observers: read x = 4 B/element; folding: read and write the weight;
//!   `bn_train/forward`: read x, write y = 8 B/element and 32 B/channel of parameters and
//!   statistics, `bn_train/backward`: read x and dy, write dx = 12 B/element and 20 B/channel,
//!   at every [`BenchConfig::bn_train_shapes`]; their notes add a copy of the same bytes timed
//!   interleaved and the row's time against it, the bound a fixed cost per call puts on a
//!   kernel of that size); convolutions in GFLOP/s with
//!   `2·N·OH·OW·O·(C/g)·KH·KW` flops. Integer (int8) kernels report **GOP/s** in their own
//!   field, `gops` (never `gflops`): `2·MACs` per second, the same count as a float conv's
//!   flops (`int8_conv2d/{portable,packed}` at every conv shape, one entry per dot-product
//!   path, [`crate::gpu::Int8Dot`]; `int8_linear/...`: `2·rows·in·out`), with their minimal
//!   traffic at one byte per int8 element (`ops` and `bytes` in the JSON).
//! - **Mnist int8 forward**: `int8_forward/mnist/device` ([`crate::deploy::GpuIntModel`]:
//!   upload the f32 input, every layer on device-resident codes, download the output codes)
//!   against `int8_forward/mnist/backend` ([`crate::deploy::IntModel::forward`] on a
//!   [`crate::GpuBackend`]: every op uploads, runs and downloads), timed interleaved at each
//!   batch of [`BenchConfig::mnist_batches`]; the device row's `speedup` is the backend time
//!   over its own, its `gops` the model's `2·MACs` per second.
//! - **Roofline**: `copy_gbps` and `fma_gflops` are the best of the sweep and of every later
//!   measurement of the best points (between sections, and interleaved with each
//!   memory-bound kernel), so a roofline measured while the host was briefly busy does not
//!   stay low.
//! - **Roofline ratio**: for memory-bound kernels, GB/s over the GB/s of the best copy point
//!   timed *interleaved* with the kernel (copy, kernel, copy, kernel, ...; the same host
//!   conditions for both, which matters on a CPU adapter); for convolutions GFLOP/s over the
//!   attainable `min(fma GFLOP/s, intensity · copy GB/s)`, with intensity = flops / minimal
//!   bytes (read x and w, write y), so a depthwise conv is held to the memory roof and a 3×3
//!   ResNet conv to the fma roof. Integer GOP/s are held to the same f32 fma roof (there is
//!   no integer roofline kernel; a device with packed int8 dot products can exceed it).
//! - **Fused speedups**: unfused time / fused time per conv shape, for the conv+bn+relu eval
//!   forward ([`crate::kernels::conv_bn::conv_bn_act_eval_scaled`]: `γ/σ` as the conv
//!   epilogue's multiplier, no weight refold; vs
//!   [`crate::kernels::conv_bn::conv_bn_act_eval_unfused`]) and the ConvBnReLU2d QAT forward
//!   ([`crate::kernels::conv_bn::conv_bn_qat_forward`] vs
//!   [`crate::kernels::conv_bn::conv_bn_qat_forward_unfused`]); the report's
//!   `fused_speedup_eval` / `fused_speedup_qat` are their geometric means over the shapes.
//!   Fused and unfused chains are timed interleaved too. The QAT backward
//!   (`conv_bn_relu_qat_backward/{fused,unfused}`:
//!   [`crate::kernels::conv_bn::conv_bn_qat_backward`] vs
//!   [`crate::kernels::conv_bn::conv_bn_qat_backward_unfused`]) is rated with twice the
//!   forward's flops (input and weight gradients); its fused row's note gives fused forward
//!   plus backward over the plain conv forward.
//! - **Filter**: [`BenchConfig::filter`] (`qfuse bench --filter TEXT`) runs only the
//!   benchmarks whose name contains it, after the roofline.
//!
//! On a CPU adapter (lavapipe) the figures depend on the host's load: other processes share
//! the cores that run the "GPU".
//!
//! [`GpuContext::wait`]: crate::gpu::GpuContext::wait
//! [`GpuContext::has_timestamps`]: crate::gpu::GpuContext::has_timestamps

mod roofline;
mod suite;
mod timing;

pub use roofline::{measure_roofline, measure_roofline_with, Roofline, RooflineConfig, SweepPoint};
pub use suite::{run_suite, BenchConfig, BenchReport, ConvShape, HostLoad, KernelResult};
pub use timing::{Measurement, Reps};

/// Where a benchmark run is, for progress bars: `done` of `total` steps, the last one
/// `label`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Steps finished.
    pub done: usize,
    /// Steps planned.
    pub total: usize,
    /// What the last step measured.
    pub label: String,
}
