//! BatchNorm2d on the GPU (`shaders/batch_norm.wgsl`), matching
//! [`crate::reference::batch_norm`] to about 1e-6 (the reference reduces in f64; the kernels
//! reduce in f32, per invocation and then per channel).
//!
//! The BatchNorm's parameters live on the GPU as a [`GpuBatchNorm`] (`γ`, `β`, running mean,
//! running variance, `eps`). Per-channel results are `[2, C]` tensors:
//!
//! - `stats`: row 0 the mean, row 1 `invstd = 1/sqrt(var + eps)` used to normalize (batch
//!   statistics in training, running statistics in eval);
//! - `running`: row 0 the running mean, row 1 the running variance after the step (copies in
//!   eval);
//! - `dparams` (backward): row 0 `dβ = Σdy`, row 1 `dγ = Σdy·x̂`.
//!
//! Pass structure, laid out by the shape ([`reduction_layout`]); no pass uses workgroup
//! memory or barriers. A channel of at most 128 values is reduced by one invocation, which
//! in training also writes the statistics, the running update and the normalized output
//! (affine and activation included) in the same dispatch (the backward likewise `Σdy`,
//! `Σdy·x̂` and `dx`). Otherwise `P` invocations per channel each reduce a contiguous run of it
//! (Welford's mean and M2 on the values less the run's first; plain sums in the backward), a
//! second dispatch combines a channel's `P` partials in order (Chan et al., shifted by the
//! first partial's mean) into the statistics (the grads), and a third writes the normalized
//! output (`dx`), on a grid over runs of 16 consecutive values of the `N·C` planes when they
//! hold at least 64 values. A producer may write the partials itself (the depthwise conv's
//! statistics epilogue, `batch_norm2d_pre_reduced_into`): then only the combination and the
//! normalize run. Eval
//! statistics are one dispatch, then one elementwise pass. An activation's backward can be
//! folded into the backward (see [`batch_norm2d_backward_act`]); `vec4`s when `H·W` is a
//! multiple of 4.
//! Everything a launcher records goes in one submission.

use bytemuck::{Pod, Zeroable};
use ndarray::{Array1, Array4, Ix2, Ix4};

use super::{check_output, expect_f32, expect_shape, output, to_u32, GpuBatchNorm};
use crate::error::{Error, Result};
use crate::gpu::{Binding, DType, GpuContext, GpuTensor, Kernel, Launch, ParamsBuffer, Shader};
use crate::ops::Activation;

pub(super) static SHADER: Shader = Shader {
    name: "batch_norm",
    source: concat!(
        include_str!("../../shaders/lib/float_bits.wgsl"),
        include_str!("../../shaders/lib/activation.wgsl"),
        include_str!("../../shaders/lib/partial_run.wgsl"),
        include_str!("../../shaders/batch_norm.wgsl")
    ),
};

/// Workgroup size of every entry point (`WGR` in the shader).
const WGR: u32 = 256;
/// BatchNorm reductions: values (or `vec4`s) an invocation reduces at least before more
/// invocations share a channel.
const MIN_ITEMS: usize = 16;
/// BatchNorm reductions: values (or `vec4`s) an invocation reduces at most.
const MAX_ITEMS: usize = 128;
/// BatchNorm reductions: fewer invocations than this in all share channels (while each keeps
/// at least [`MIN_ITEMS`] values) so that the device has work for all its cores.
const TARGET_INVOCATIONS: usize = 4096;
/// BatchNorm reductions: upper bound on the partial invocations of one channel.
const MAX_PARTIALS: usize = 1024;
/// BatchNorm elementwise passes: planes (`H·W` values, or `vec4`s) at least this long run on
/// a grid over runs of planes (the channel one per invocation) instead of a flat grid (the
/// channel of each element by division).
const PLANE_MIN: usize = 64;
/// Consecutive values (or `vec4`s) an invocation of a plane grid's elementwise pass takes
/// (`PLANE_ITEMS` in the shader).
const PLANE_ITEMS: u32 = 16;

const fn kernel(entry_point: &'static str, bindings: &'static [Binding]) -> Kernel {
    Kernel {
        shader: &SHADER,
        entry_point,
        bindings,
    }
}

const THREAD_BINDINGS: &[Binding] = &[
    Binding::uniform(0),
    Binding::read(1),
    Binding::read_write(2),
    Binding::read(3),
    Binding::read_write(4),
    Binding::read_write(5),
    Binding::read_write(6),
    Binding::read_write(7),
];
static STATS_THREAD: Kernel = kernel("stats_thread", THREAD_BINDINGS);

/// The grads go to binding 2 (see the shader's header): 8 storage buffers, WebGPU's default
/// `max_storage_buffers_per_shader_stage`.
static BACKWARD_THREAD: Kernel = kernel(
    "backward_thread",
    &[
        Binding::uniform(0),
        Binding::read(1),
        Binding::read_write(2),
        Binding::read(3),
        Binding::read_write(4),
        Binding::read_write(6),
        Binding::read(8),
        Binding::read(9),
        Binding::read(11),
    ],
);

static STATS_PARTIAL: Kernel = kernel(
    "stats_partial",
    &[
        Binding::uniform(0),
        Binding::read(1),
        Binding::read_write(2),
    ],
);
static STATS_PARTIAL4: Kernel = kernel(
    "stats_partial4",
    &[
        Binding::uniform(0),
        Binding::read_write(2),
        Binding::read(12),
    ],
);

static STATS_FINAL: Kernel = kernel(
    "stats_final",
    &[
        Binding::uniform(0),
        Binding::read_write(2),
        Binding::read(3),
        Binding::read_write(4),
        Binding::read_write(5),
    ],
);

static BACKWARD_PARTIAL: Kernel = kernel(
    "backward_partial",
    &[
        Binding::uniform(0),
        Binding::read(1),
        Binding::read_write(2),
        Binding::read_write(4),
        Binding::read(8),
        Binding::read(9),
    ],
);
static BACKWARD_PARTIAL4: Kernel = kernel(
    "backward_partial4",
    &[
        Binding::uniform(0),
        Binding::read_write(2),
        Binding::read_write(4),
        Binding::read(12),
        Binding::read(15),
        Binding::read(16),
    ],
);

static BACKWARD_FINAL: Kernel = kernel(
    "backward_final",
    &[
        Binding::uniform(0),
        Binding::read_write(2),
        Binding::read_write(10),
    ],
);

static EVAL_STATS: Kernel = kernel(
    "eval_stats",
    &[
        Binding::uniform(0),
        Binding::read(3),
        Binding::read_write(4),
        Binding::read_write(5),
    ],
);

const NORMALIZE_BINDINGS: &[Binding] = &[
    Binding::uniform(0),
    Binding::read(1),
    Binding::read(3),
    Binding::read_write(4),
    Binding::read_write(6),
    Binding::read_write(7),
];
static NORMALIZE: Kernel = kernel("normalize", NORMALIZE_BINDINGS);
static NORMALIZE_PLANE: Kernel = kernel("normalize_plane", NORMALIZE_BINDINGS);

const NORMALIZE4_BINDINGS: &[Binding] = &[
    Binding::uniform(0),
    Binding::read(3),
    Binding::read_write(4),
    Binding::read(12),
    Binding::read_write(13),
    Binding::read_write(14),
];
static NORMALIZE4: Kernel = kernel("normalize4", NORMALIZE4_BINDINGS);
static NORMALIZE_PLANE4: Kernel = kernel("normalize_plane4", NORMALIZE4_BINDINGS);

const BACKWARD_DX_BINDINGS: &[Binding] = &[
    Binding::uniform(0),
    Binding::read(1),
    Binding::read(3),
    Binding::read_write(4),
    Binding::read_write(6),
    Binding::read(8),
    Binding::read(9),
    Binding::read_write(10),
    Binding::read(11),
];
static BACKWARD_DX: Kernel = kernel("backward_dx", BACKWARD_DX_BINDINGS);
static BACKWARD_DX_PLANE: Kernel = kernel("backward_dx_plane", BACKWARD_DX_BINDINGS);

const BACKWARD_DX4_BINDINGS: &[Binding] = &[
    Binding::uniform(0),
    Binding::read(3),
    Binding::read_write(4),
    Binding::read_write(10),
    Binding::read(11),
    Binding::read(12),
    Binding::read_write(13),
    Binding::read(15),
    Binding::read(16),
];
static BACKWARD_DX4: Kernel = kernel("backward_dx4", BACKWARD_DX4_BINDINGS);
static BACKWARD_DX_PLANE4: Kernel = kernel("backward_dx_plane4", BACKWARD_DX4_BINDINGS);

/// The uniform of `batch_norm.wgsl` (same field order).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
struct Params {
    n: u32,
    channels: u32,
    hw: u32,
    m: u32,
    groups: u32,
    act: u32,
    write_pre: u32,
    training: u32,
    eps: f32,
    momentum: f32,
    has_divisor: u32,
    slope: f32,
    _pad2: u32,
    fuse: u32,
    _pad: [u32; 2],
}

/// The shader code of an activation (as `activation.wgsl`): 0 none, 1 ReLU, 2 ReLU6,
/// 3 LeakyReLU, 4 Hardswish.
pub(crate) fn activation_code(act: Activation) -> u32 {
    super::activation::code(act)
}

/// How the per-channel reductions of a BatchNorm over `C` channels of `M = N·H·W` values, and
/// its elementwise passes, are laid out on the device (see [`reduction_layout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReductionLayout {
    /// Invocations that share one channel in the first pass, each reducing a contiguous run
    /// of it (see [`reduction_layout`]); a second pass combines a channel's partial results in
    /// order. 1 on scalars: [`ReductionLayout::per_thread`].
    pub partials: u32,
    /// `H·W` is a multiple of 4: the kernels load and store `vec4`s (four values of one
    /// channel), and the thresholds below count values in `vec4`s.
    pub vec4: bool,
    /// One invocation per channel reduces it and writes its elementwise output (normalized
    /// `y`, or `dx`) in the same dispatch (`partials == 1`, not `vec4`).
    pub per_thread: bool,
    /// The elementwise pass (when not [`ReductionLayout::per_thread`]) runs on a grid over the
    /// `N·C` planes, each invocation a run of 16 consecutive values (or `vec4`s) of one plane
    /// with its channel's coefficients loaded once, instead of a flat grid that finds each
    /// element's channel by division: planes of at least 64 values (or `vec4`s).
    pub plane_grid: bool,
}

/// The layout of the BatchNorm passes over an NCHW `shape` (`C` channels of `M = N·H·W`
/// values), chosen by the shape: one invocation per channel while a channel has at most 128
/// values (70,000 channels of 2 values: each invocation reduces and normalizes its channel
/// alone, one dispatch), else `ceil(M / 128)` invocations per channel, more when all of them
/// would be fewer than 4096 (while each keeps at least 16 values), at most 1024. With `H·W`
/// a multiple of 4 the values are counted in `vec4`s. No pass uses workgroup memory or
/// barriers (see `shaders/batch_norm.wgsl`).
pub fn reduction_layout(shape: [usize; 4]) -> ReductionLayout {
    let [n, channels, h, w] = shape;
    let hw = h * w;
    let vec4 = hw.is_multiple_of(4) && hw > 0;
    let unit = if vec4 { 4 } else { 1 };
    let partials = partial_count(n * hw / unit, channels);
    ReductionLayout {
        partials: partials as u32,
        vec4,
        per_thread: !vec4 && partials == 1,
        plane_grid: hw / unit >= PLANE_MIN,
    }
}

/// Partial invocations per channel for `units` values (or `vec4`s) in each of `channels`
/// channels ([`reduction_layout`]; also the QAT backward's divide-back sums in
/// [`super::conv_bn`]): `ceil(units / 128)`, more while all of them would be fewer than 4096
/// and each keeps at least 16 values, at most 1024.
pub(crate) fn partial_count(units: usize, channels: usize) -> usize {
    let by_size = units.div_ceil(MAX_ITEMS);
    let by_parallel = TARGET_INVOCATIONS
        .div_ceil(channels.max(1))
        .min(units / MIN_ITEMS);
    by_size.max(by_parallel).clamp(1, MAX_PARTIALS)
}

/// A 16-byte tensor (one `vec4`) bound where a kernel declares a binding it does not use in
/// this call. Never read, so not cleared (a pooled buffer keeps what it held: no staged write
/// per call).
pub(crate) fn dummy(ctx: &GpuContext) -> Result<GpuTensor> {
    GpuTensor::uninit(ctx, &[4], DType::F32)
}

/// Downloads a `[R, C]` tensor (such as `stats`, `running`, `dparams`) as its `R` rows.
///
/// Errors: [`Error::Gpu`] for a tensor that is not 2-D, and download errors.
pub fn download_rows(ctx: &GpuContext, t: &GpuTensor) -> Result<Vec<Array1<f32>>> {
    let a = t
        .download_f32(ctx)?
        .into_dimensionality::<Ix2>()
        .map_err(|e| Error::Gpu(format!("expected a [R, C] tensor: {e}")))?;
    Ok(a.outer_iter().map(|r| r.to_owned()).collect())
}

/// Downloads a rank-4 tensor.
///
/// Errors: [`Error::Gpu`] for a tensor that is not rank 4, and download errors.
pub fn download4(ctx: &GpuContext, t: &GpuTensor) -> Result<Array4<f32>> {
    t.download_f32(ctx)?
        .into_dimensionality::<Ix4>()
        .map_err(|e| Error::Gpu(format!("expected a rank-4 tensor: {e}")))
}

/// Uploads per-channel `mean` and `invstd` as the `[2, C]` `stats` tensor the backward takes.
///
/// Errors: [`Error::ShapeMismatch`] when their lengths differ.
pub fn upload_stats(
    ctx: &GpuContext,
    mean: &Array1<f32>,
    invstd: &Array1<f32>,
) -> Result<GpuTensor> {
    let c = mean.len();
    if invstd.len() != c {
        return Err(Error::shape(
            "batch_norm2d stats invstd",
            &[c],
            invstd.shape(),
        ));
    }
    let data: Vec<f32> = mean.iter().chain(invstd.iter()).copied().collect();
    GpuTensor::from_slice_f32(ctx, &data, &[2, c])
}

/// The checks of the CPU reference's `check_input`: `x` is `[N, C, H, W]` with
/// `C == bn.channels()` (the BatchNorm itself was validated when uploaded). Returns the shape.
pub fn check_input(x: &GpuTensor, bn: &GpuBatchNorm) -> Result<[usize; 4]> {
    let s = x.shape();
    if s.len() != 4 {
        return Err(Error::invalid(format!(
            "batch_norm2d input must be NCHW (rank 4), got shape {s:?}"
        )));
    }
    if s[1] != bn.channels() {
        return Err(Error::ChannelMismatch {
            layer: "input".to_string(),
            layer_channels: s[1],
            bn_channels: bn.channels(),
        });
    }
    expect_f32("batch_norm2d input", x)?;
    Ok([s[0], s[1], s[2], s[3]])
}

/// `Err` (PyTorch's message) when training with at most one value per channel.
pub fn check_training_size(shape: &[usize]) -> Result<()> {
    let m = shape[0] * shape[2] * shape[3];
    if m <= 1 {
        return Err(Error::invalid(format!(
            "Expected more than 1 value per channel when training, got input size {shape:?}"
        )));
    }
    Ok(())
}

/// Sizes of a BatchNorm over `shape` (`[N, C, H, W]`) and the layout of its reductions.
fn params_for(shape: [usize; 4], bn: &GpuBatchNorm) -> Result<(Params, ReductionLayout)> {
    let [n, c, h, w] = shape;
    let m = n * h * w;
    let layout = reduction_layout(shape);
    let p = Params {
        n: to_u32(n * c * h * w, "batch_norm2d element count")?,
        channels: to_u32(c, "batch_norm2d channels")?,
        hw: to_u32((h * w).max(1), "batch_norm2d plane size")?,
        m: to_u32(m, "batch_norm2d values per channel")?,
        groups: layout.partials,
        eps: bn.eps(),
        ..Params::default()
    };
    Ok((p, layout))
}

/// Per-channel statistics of a BatchNorm step: what normalizes and the running statistics
/// after the step (see the module doc for the `[2, C]` layouts).
#[derive(Debug, Clone)]
pub struct GpuBatchNormStats {
    /// `[2, C]`: mean, invstd.
    pub stats: GpuTensor,
    /// `[2, C]`: running mean, running variance after the step.
    pub running: GpuTensor,
}

/// The launches of the statistics: in training one reduction (which, with one invocation per
/// channel and a normalize asked for, also normalizes) or, for split channels, a reduction
/// and a combination (the combination alone for partials a producer wrote); in eval one.
struct StatsPlan {
    uniform: ParamsBuffer,
    partials: GpuTensor,
    out: GpuBatchNormStats,
    training: bool,
    /// The reduction also writes the normalized output.
    fused: bool,
    /// The partials were written by the producer of `x` (the depthwise conv's statistics
    /// epilogue): no partial pass, only the combination.
    pre_reduced: bool,
    layout: ReductionLayout,
    dummies: [GpuTensor; 2],
    reduce_grid: [u32; 3],
    final_grid: [u32; 3],
    eval_grid: [u32; 3],
}

/// A normalize's activation and whether it writes the pre-activation output (also what a
/// [`StatsPlan`] may fuse into its reduction).
#[derive(Clone, Copy)]
struct FuseNormalize {
    act: Activation,
    keep_pre: bool,
}

/// The 1-D grid of a first reduction pass: `partials` invocations for each of `channels`
/// channels (`partial_count`; here and in [`super::conv_bn`]).
pub(crate) fn partial_grid(ctx: &GpuContext, channels: usize, partials: usize) -> Result<[u32; 3]> {
    let invocations = channels
        .checked_mul(partials)
        .ok_or_else(|| Error::invalid("too many channels for one dispatch"))?;
    ctx.grid_1d(invocations, WGR)
}

impl StatsPlan {
    #[allow(clippy::too_many_arguments)]
    fn new(
        ctx: &GpuContext,
        shape: [usize; 4],
        bn: &GpuBatchNorm,
        momentum: f32,
        training: bool,
        given: Option<(&GpuBatchNormStats, &GpuTensor)>,
        normalize: Option<FuseNormalize>,
        pre_reduced: Option<(&GpuTensor, usize)>,
    ) -> Result<Self> {
        let (mut p, mut layout) = params_for(shape, bn)?;
        p.momentum = momentum;
        let c = shape[1];
        if let Some((t, parts)) = pre_reduced {
            if !training {
                return Err(Error::invalid(
                    "internal: statistics partials given to an eval BatchNorm",
                ));
            }
            ctx.check_tensor("batch_norm2d statistics partials", t)?;
            expect_shape("batch_norm2d statistics partials", &[3, c, parts], t)?;
            expect_f32("batch_norm2d statistics partials", t)?;
            p.groups = to_u32(parts, "batch_norm2d statistics partials")?;
            layout.partials = p.groups;
            layout.per_thread = false;
        }
        let fused = training && layout.per_thread && normalize.is_some();
        if let Some(f) = normalize.filter(|_| fused) {
            p.act = activation_code(f.act);
            p.slope = super::activation::slope(f.act);
            p.write_pre = u32::from(f.keep_pre);
            p.fuse = 1;
        }
        let split = training && !layout.per_thread;
        let out = match given {
            Some((out, x)) => {
                let inputs = [x, bn.tensor()];
                check_output(
                    ctx,
                    "batch_norm2d stats",
                    &out.stats,
                    &[2, c],
                    DType::F32,
                    &inputs,
                )?;
                let inputs = [x, bn.tensor(), &out.stats];
                check_output(
                    ctx,
                    "batch_norm2d running",
                    &out.running,
                    &[2, c],
                    DType::F32,
                    &inputs,
                )?;
                out.clone()
            }
            None => GpuBatchNormStats {
                stats: GpuTensor::uninit(ctx, &[2, c], DType::F32)?,
                running: GpuTensor::uninit(ctx, &[2, c], DType::F32)?,
            },
        };
        Ok(Self {
            uniform: ctx.params(&p)?,
            partials: match pre_reduced {
                Some((t, _)) => t.clone(),
                None if split => {
                    GpuTensor::uninit(ctx, &[3, c, layout.partials as usize], DType::F32)?
                }
                None => dummy(ctx)?,
            },
            out,
            training,
            fused,
            pre_reduced: pre_reduced.is_some(),
            layout,
            dummies: [dummy(ctx)?, dummy(ctx)?],
            reduce_grid: partial_grid(ctx, c, layout.partials as usize)?,
            final_grid: if split {
                ctx.grid_1d(c, WGR)?
            } else {
                [0, 0, 0]
            },
            eval_grid: ctx.grid_1d(c, WGR)?,
        })
    }

    /// The launches; `y` and `pre` are the normalize's outputs when the reduction writes
    /// them ([`StatsPlan::fused`]).
    fn launches<'a>(
        &'a self,
        x: &'a GpuTensor,
        bn: &'a GpuBatchNorm,
        y_pre: Option<(&'a wgpu::Buffer, &'a wgpu::Buffer)>,
        out: &mut Vec<(&'static Kernel, Vec<&'a wgpu::Buffer>, [u32; 3])>,
    ) {
        let (u, part) = (&self.uniform, self.partials.buffer());
        let (stats, running) = (self.out.stats.buffer(), self.out.running.buffer());
        if self.training {
            let (y, pre) = match y_pre.filter(|_| self.fused) {
                Some(b) => b,
                None => (self.dummies[0].buffer(), self.dummies[1].buffer()),
            };
            let params = bn.tensor().buffer();
            let x = x.buffer();
            // Pre-reduced partials are there: only the combination below.
            if !self.pre_reduced {
                out.push(if self.layout.per_thread {
                    (
                        &STATS_THREAD,
                        vec![u, x, part, params, stats, running, y, pre],
                        self.reduce_grid,
                    )
                } else if self.layout.vec4 {
                    (&STATS_PARTIAL4, vec![u, part, x], self.reduce_grid)
                } else {
                    (&STATS_PARTIAL, vec![u, x, part], self.reduce_grid)
                });
            }
            if self.final_grid[0] > 0 {
                out.push((
                    &STATS_FINAL,
                    vec![u, part, params, stats, running],
                    self.final_grid,
                ));
            }
        } else {
            out.push((
                &EVAL_STATS,
                vec![u, bn.tensor().buffer(), stats, running],
                self.eval_grid,
            ));
        }
    }
}

/// Runs `(kernel, buffers, grid)` triples in one submission.
fn submit(
    ctx: &GpuContext,
    list: &[(&'static Kernel, Vec<&wgpu::Buffer>, [u32; 3])],
) -> Result<()> {
    let launches: Vec<Launch> = list
        .iter()
        .map(|(kernel, buffers, workgroups)| Launch {
            kernel,
            constants: &[],
            buffers,
            workgroups: *workgroups,
        })
        .collect();
    ctx.run(&launches).map(|_| ())
}

/// Per-channel statistics of `x` `[N, C, H, W]`: with `training`, the batch mean and biased
/// variance over N, H, W (one read of `x`) and the running-statistics update with `momentum`
/// (unbiased variance `var·M/(M−1)`); in eval, the running statistics (returned unchanged).
///
/// Errors (the CPU's): [`Error::InvalidArgument`] for a tensor that is not rank 4 or, in
/// training, at most one value per channel; [`Error::ChannelMismatch`] (layer `input`).
pub fn batch_stats(
    ctx: &GpuContext,
    x: &GpuTensor,
    bn: &GpuBatchNorm,
    momentum: f32,
    training: bool,
) -> Result<GpuBatchNormStats> {
    batch_stats_impl(ctx, x, bn, momentum, training, None)
}

/// [`batch_stats`] writing into `out` (two `f32` tensors `[2, C]`, each with its own
/// buffer, see [`super::check_output`]).
pub fn batch_stats_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    bn: &GpuBatchNorm,
    momentum: f32,
    training: bool,
    out: &GpuBatchNormStats,
) -> Result<()> {
    batch_stats_impl(ctx, x, bn, momentum, training, Some(out)).map(drop)
}

/// `Ok` when `x` and the BatchNorm were made on `ctx`.
fn check_context(ctx: &GpuContext, x: &GpuTensor, bn: &GpuBatchNorm) -> Result<()> {
    ctx.check_tensors(&[
        ("batch_norm2d input", x),
        ("batch_norm2d parameters", bn.tensor()),
    ])
}

fn batch_stats_impl(
    ctx: &GpuContext,
    x: &GpuTensor,
    bn: &GpuBatchNorm,
    momentum: f32,
    training: bool,
    given: Option<&GpuBatchNormStats>,
) -> Result<GpuBatchNormStats> {
    check_context(ctx, x, bn)?;
    let shape = check_input(x, bn)?;
    if training {
        check_training_size(&shape)?;
    }
    let plan = StatsPlan::new(
        ctx,
        shape,
        bn,
        momentum,
        training,
        given.map(|g| (g, x)),
        None,
        None,
    )?;
    let mut list = Vec::new();
    plan.launches(x, bn, None, &mut list);
    submit(ctx, &list)?;
    Ok(plan.out)
}

/// `y = act((x − mean)·invstd·γ + β)` with per-channel `stats` (`[2, C]`: mean, invstd) and
/// the BatchNorm's affine; with `keep_pre`, also the pre-activation values (the BatchNorm
/// output). One elementwise pass.
///
/// Errors: as [`batch_stats`] (without the training-size check), and
/// [`Error::ShapeMismatch`] for `stats` that is not `[2, C]`.
pub fn normalize(
    ctx: &GpuContext,
    x: &GpuTensor,
    bn: &GpuBatchNorm,
    stats: &GpuTensor,
    act: Activation,
    keep_pre: bool,
) -> Result<(GpuTensor, Option<GpuTensor>)> {
    normalize_impl(ctx, x, bn, stats, act, keep_pre, None)
}

/// [`normalize`] writing into `y` and, when given, `pre` (the output before the
/// activation); each an `f32` tensor of `x`'s shape with its own buffer (see
/// [`super::check_output`]).
pub fn normalize_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    bn: &GpuBatchNorm,
    stats: &GpuTensor,
    act: Activation,
    y: &GpuTensor,
    pre: Option<&GpuTensor>,
) -> Result<()> {
    normalize_impl(ctx, x, bn, stats, act, pre.is_some(), Some((y, pre))).map(drop)
}

fn normalize_impl(
    ctx: &GpuContext,
    x: &GpuTensor,
    bn: &GpuBatchNorm,
    stats: &GpuTensor,
    act: Activation,
    keep_pre: bool,
    given: Option<(&GpuTensor, Option<&GpuTensor>)>,
) -> Result<(GpuTensor, Option<GpuTensor>)> {
    check_context(ctx, x, bn)?;
    ctx.check_tensor("batch_norm2d stats", stats)?;
    let shape = check_input(x, bn)?;
    expect_shape("batch_norm2d stats", &[2, shape[1]], stats)?;
    expect_f32("batch_norm2d stats", stats)?;
    let mut list = Vec::new();
    let f = FuseNormalize { act, keep_pre };
    let n = normalize_plan(ctx, shape, bn, f, given, &[x, stats], true)?;
    n.launch(x, bn, stats, &mut list);
    submit(ctx, &list)?;
    Ok((n.y, n.pre))
}

/// The outputs of a normalize and, when it runs as its own pass (`uniform` is `Some`), its
/// launch.
struct NormalizePlan {
    uniform: Option<ParamsBuffer>,
    y: GpuTensor,
    pre: Option<GpuTensor>,
    pre_or_dummy: GpuTensor,
    layout: ReductionLayout,
    grid: [u32; 3],
}

/// The grid of an elementwise pass (`normalize` / `backward_dx` and their `_plane`, `4`
/// forms) over an NCHW `shape`: over the `N·C` planes' runs of `PLANE_ITEMS` consecutive
/// values with [`ReductionLayout::plane_grid`], else flat over the elements (or `vec4`s:
/// `H·W` a multiple of 4, so a `vec4` stays in one channel).
fn elementwise_grid(
    ctx: &GpuContext,
    shape: [usize; 4],
    layout: ReductionLayout,
) -> Result<[u32; 3]> {
    let [n, c, h, w] = shape;
    let unit = if layout.vec4 { 4 } else { 1 };
    if layout.plane_grid {
        // One invocation per run of PLANE_ITEMS consecutive values of a plane.
        let runs = (h * w / unit).div_ceil(PLANE_ITEMS as usize);
        let invocations = (n * c)
            .checked_mul(runs)
            .ok_or_else(|| Error::invalid("batch_norm2d: too many elements for one dispatch"))?;
        to_u32(invocations, "batch_norm2d elementwise invocations")?;
        return ctx.grid_1d(invocations, WGR);
    }
    ctx.grid_1d(n * c * h * w / unit, WGR)
}

/// One of the four forms of an elementwise pass: `flat`, `plane`, `flat4`, `plane4`.
fn pick(layout: ReductionLayout, forms: [&'static Kernel; 4]) -> &'static Kernel {
    forms[usize::from(layout.vec4) * 2 + usize::from(layout.plane_grid)]
}

fn normalize_plan(
    ctx: &GpuContext,
    shape: [usize; 4],
    bn: &GpuBatchNorm,
    f: FuseNormalize,
    given: Option<(&GpuTensor, Option<&GpuTensor>)>,
    inputs: &[&GpuTensor],
    launched: bool,
) -> Result<NormalizePlan> {
    let FuseNormalize { act, keep_pre } = f;
    let (mut p, layout) = params_for(shape, bn)?;
    p.act = activation_code(act);
    p.slope = super::activation::slope(act);
    p.write_pre = u32::from(keep_pre);
    let mut inputs = inputs.to_vec();
    inputs.push(bn.tensor());
    let (given_y, given_pre) = match given {
        Some((y, pre)) => (Some(y), pre),
        None => (None, None),
    };
    let y = output(
        ctx,
        "batch_norm2d output",
        given_y,
        &shape,
        DType::F32,
        &inputs,
    )?;
    let pre = if keep_pre {
        inputs.push(&y);
        Some(output(
            ctx,
            "batch_norm2d pre-activation output",
            given_pre,
            &shape,
            DType::F32,
            &inputs,
        )?)
    } else {
        None
    };
    let pre_or_dummy = match &pre {
        Some(t) => t.clone(),
        None => dummy(ctx)?,
    };
    Ok(NormalizePlan {
        uniform: if launched {
            Some(ctx.params(&p)?)
        } else {
            None
        },
        y,
        pre,
        pre_or_dummy,
        layout,
        grid: elementwise_grid(ctx, shape, layout)?,
    })
}

impl NormalizePlan {
    /// Pushes the normalize pass, unless the statistics pass writes the output itself (the
    /// plan was made without a launch).
    fn launch<'a>(
        &'a self,
        x: &'a GpuTensor,
        bn: &'a GpuBatchNorm,
        stats: &'a GpuTensor,
        out: &mut Vec<(&'static Kernel, Vec<&'a wgpu::Buffer>, [u32; 3])>,
    ) {
        let Some(uniform) = &self.uniform else {
            return;
        };
        let (u, x, params, stats) = (&**uniform, x.buffer(), bn.tensor().buffer(), stats.buffer());
        let (y, pre) = (self.y.buffer(), self.pre_or_dummy.buffer());
        let kernel = pick(
            self.layout,
            [&NORMALIZE, &NORMALIZE_PLANE, &NORMALIZE4, &NORMALIZE_PLANE4],
        );
        out.push(if self.layout.vec4 {
            (kernel, vec![u, params, stats, x, y, pre], self.grid)
        } else {
            (kernel, vec![u, x, params, stats, y, pre], self.grid)
        });
    }
}

/// What [`batch_norm2d`] returns, all on the GPU.
#[derive(Debug, Clone)]
pub struct GpuBatchNormOutput {
    /// `act(bn(x))`.
    pub y: GpuTensor,
    /// The BatchNorm output before the activation (only when asked for with `keep_pre`).
    pub pre: Option<GpuTensor>,
    /// `[2, C]` mean and invstd used to normalize, `[2, C]` running statistics after the step.
    pub stats: GpuBatchNormStats,
}

/// BatchNorm2d forward ([`crate::reference::batch_norm::batch_norm2d`]) with an optional
/// activation after it, in one submission: in training one dispatch (statistics, running
/// update, normalize + affine + activation), or three when channels are split
/// ([`reduction_layout`]); in eval the statistics and one elementwise pass. `keep_pre` also
/// returns the output before the activation.
///
/// Errors: those of [`batch_stats`].
pub fn batch_norm2d(
    ctx: &GpuContext,
    x: &GpuTensor,
    bn: &GpuBatchNorm,
    momentum: f32,
    training: bool,
    act: Activation,
    keep_pre: bool,
) -> Result<GpuBatchNormOutput> {
    batch_norm2d_impl(ctx, x, bn, momentum, training, act, keep_pre, None, None)
}

/// [`batch_norm2d`] writing into `out` (shaped as [`batch_norm2d`] returns it: `pre` given
/// means `keep_pre`), for instance the result of a first call reused step after step. Each
/// tensor is checked by [`super::check_output`].
pub fn batch_norm2d_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    bn: &GpuBatchNorm,
    momentum: f32,
    training: bool,
    act: Activation,
    out: &GpuBatchNormOutput,
) -> Result<()> {
    let keep_pre = out.pre.is_some();
    batch_norm2d_impl(
        ctx,
        x,
        bn,
        momentum,
        training,
        act,
        keep_pre,
        Some(out),
        None,
    )
    .map(drop)
}

/// [`batch_norm2d_into`] in training for an `x` whose producer already wrote its statistics
/// partials (`partials` `[3, C, parts]`: count, mean and M2 of `parts` contiguous runs of each
/// channel's values, in order, as `shaders/lib/partial_run.wgsl` lays them out; the depthwise
/// conv's statistics epilogue, [`super::conv2d::conv2d_dw_stats_into`]): the combination and
/// the normalize, without a statistics pass over `x`.
///
/// Errors: those of [`batch_norm2d_into`]; partials of another shape.
pub(crate) fn batch_norm2d_pre_reduced_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    bn: &GpuBatchNorm,
    momentum: f32,
    act: Activation,
    partials: (&GpuTensor, usize),
    out: &GpuBatchNormOutput,
) -> Result<()> {
    let keep_pre = out.pre.is_some();
    batch_norm2d_impl(
        ctx,
        x,
        bn,
        momentum,
        true,
        act,
        keep_pre,
        Some(out),
        Some(partials),
    )
    .map(drop)
}

#[allow(clippy::too_many_arguments)]
fn batch_norm2d_impl(
    ctx: &GpuContext,
    x: &GpuTensor,
    bn: &GpuBatchNorm,
    momentum: f32,
    training: bool,
    act: Activation,
    keep_pre: bool,
    given: Option<&GpuBatchNormOutput>,
    pre_reduced: Option<(&GpuTensor, usize)>,
) -> Result<GpuBatchNormOutput> {
    check_context(ctx, x, bn)?;
    let shape = check_input(x, bn)?;
    if training {
        check_training_size(&shape)?;
    }
    let plan = StatsPlan::new(
        ctx,
        shape,
        bn,
        momentum,
        training,
        given.map(|g| (&g.stats, x)),
        Some(FuseNormalize { act, keep_pre }),
        pre_reduced,
    )?;
    let stats_out = [&plan.out.stats, &plan.out.running];
    let norm = normalize_plan(
        ctx,
        shape,
        bn,
        FuseNormalize { act, keep_pre },
        given.map(|g| (&g.y, g.pre.as_ref())),
        &[x, stats_out[0], stats_out[1]],
        !plan.fused,
    )?;
    let mut list = Vec::new();
    plan.launches(
        x,
        bn,
        Some((norm.y.buffer(), norm.pre_or_dummy.buffer())),
        &mut list,
    );
    norm.launch(x, bn, &plan.out.stats, &mut list);
    submit(ctx, &list)?;
    Ok(GpuBatchNormOutput {
        y: norm.y,
        pre: norm.pre,
        stats: plan.out,
    })
}

/// Gradients of [`batch_norm2d`], on the GPU.
#[derive(Debug, Clone)]
pub struct GpuBatchNormGrads {
    /// dL/dx (divided by the per-channel `divisor` when one was given).
    pub dx: GpuTensor,
    /// `[2, C]`: row 0 `dβ = Σdy`, row 1 `dγ = Σdy·x̂` (after the activation's backward).
    pub dparams: GpuTensor,
}

/// [`batch_norm2d_backward_act`] without an activation.
pub fn batch_norm2d_backward(
    ctx: &GpuContext,
    x: &GpuTensor,
    dy: &GpuTensor,
    bn: &GpuBatchNorm,
    stats: &GpuTensor,
    training: bool,
) -> Result<GpuBatchNormGrads> {
    batch_norm2d_backward_act(
        ctx,
        x,
        dy,
        bn,
        stats,
        training,
        Activation::None,
        None,
        None,
    )
}

/// [`batch_norm2d_backward`] writing into `out` (`dx` of `x`'s shape, `dparams` `[2, C]`,
/// `f32`, each with its own buffer, see [`super::check_output`]).
pub fn batch_norm2d_backward_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    dy: &GpuTensor,
    bn: &GpuBatchNorm,
    stats: &GpuTensor,
    training: bool,
    out: &GpuBatchNormGrads,
) -> Result<()> {
    batch_norm2d_backward_act_into(
        ctx,
        x,
        dy,
        bn,
        stats,
        training,
        Activation::None,
        None,
        None,
        out,
    )
}

/// Gradients of `act(batch_norm2d(x))` for upstream `dy`, given the forward's `stats`
/// (`[2, C]`: mean, invstd), mirroring
/// [`crate::reference::batch_norm::batch_norm2d_backward_with_stats`] after
/// [`crate::reference::activation::activation_backward`]:
/// `dy' = act_backward(act_x, dy)`; per channel `Σdy'`, `Σdy'·x̂` (see [`reduction_layout`]);
/// then `dx = γ·invstd·(dy' − (Σdy' + x̂·Σdy'·x̂)/M)` in training, `dx = γ·invstd·dy'` in
/// eval. `act_x` is where the activation's gradient is evaluated: its input (the BatchNorm
/// output), or, for ReLU and ReLU6 only, its output (the same mask); LeakyReLU and Hardswish
/// need the input. It is required unless `act` is [`Activation::None`]. With a `divisor` (`[C]`), `dx` comes out divided by it per channel
/// (the QAT backward's `d conv_out = dBN_in / s`). One dispatch, or three when channels are
/// split ([`reduction_layout`]), in one submission.
///
/// Errors (the CPU's): as [`batch_stats`]; [`Error::ShapeMismatch`] when `dy` (or `act_x`) is
/// not the shape of `x` or `stats` is not `[2, C]`; [`Error::InvalidArgument`] for an empty
/// input in training or a missing `act_x`.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm2d_backward_act(
    ctx: &GpuContext,
    x: &GpuTensor,
    dy: &GpuTensor,
    bn: &GpuBatchNorm,
    stats: &GpuTensor,
    training: bool,
    act: Activation,
    act_x: Option<&GpuTensor>,
    divisor: Option<&GpuTensor>,
) -> Result<GpuBatchNormGrads> {
    batch_norm2d_backward_impl(ctx, x, dy, bn, stats, training, act, act_x, divisor, None)
}

/// [`batch_norm2d_backward_act`] writing into `out` (`dx` of `x`'s shape, `dparams`
/// `[2, C]`, `f32`, each with its own buffer, see [`super::check_output`]).
#[allow(clippy::too_many_arguments)]
pub fn batch_norm2d_backward_act_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    dy: &GpuTensor,
    bn: &GpuBatchNorm,
    stats: &GpuTensor,
    training: bool,
    act: Activation,
    act_x: Option<&GpuTensor>,
    divisor: Option<&GpuTensor>,
    out: &GpuBatchNormGrads,
) -> Result<()> {
    batch_norm2d_backward_impl(
        ctx,
        x,
        dy,
        bn,
        stats,
        training,
        act,
        act_x,
        divisor,
        Some(out),
    )
    .map(drop)
}

#[allow(clippy::too_many_arguments)]
fn batch_norm2d_backward_impl(
    ctx: &GpuContext,
    x: &GpuTensor,
    dy: &GpuTensor,
    bn: &GpuBatchNorm,
    stats: &GpuTensor,
    training: bool,
    act: Activation,
    act_x: Option<&GpuTensor>,
    divisor: Option<&GpuTensor>,
    given: Option<&GpuBatchNormGrads>,
) -> Result<GpuBatchNormGrads> {
    check_context(ctx, x, bn)?;
    ctx.check_tensors(&[
        ("batch_norm2d_backward dy", dy),
        ("batch_norm2d_backward saved stats", stats),
    ])?;
    if let Some(a) = act_x {
        ctx.check_tensor("batch_norm2d_backward activation input", a)?;
    }
    if let Some(d) = divisor {
        ctx.check_tensor("batch_norm2d_backward divisor", d)?;
    }
    let shape = check_input(x, bn)?;
    expect_shape("batch_norm2d_backward dy (input shape)", &shape, dy)?;
    expect_f32("batch_norm2d_backward dy", dy)?;
    let c = shape[1];
    expect_shape(
        "batch_norm2d_backward saved stats (mean, invstd)",
        &[2, c],
        stats,
    )?;
    expect_f32("batch_norm2d_backward saved stats", stats)?;
    if training && shape[0] * shape[2] * shape[3] == 0 {
        return Err(Error::invalid(format!(
            "batch_norm2d_backward: empty input {shape:?} in training"
        )));
    }
    let dummy = dummy(ctx)?;
    let act_x = match (act, act_x) {
        (Activation::None, _) => &dummy,
        (_, Some(a)) => {
            expect_shape("batch_norm2d_backward activation input", &shape, a)?;
            expect_f32("batch_norm2d_backward activation input", a)?;
            a
        }
        (_, None) => {
            return Err(Error::invalid(
                "batch_norm2d_backward: an activation needs its input (act_x)",
            ))
        }
    };
    if let Some(d) = divisor {
        expect_shape("batch_norm2d_backward divisor", &[c], d)?;
        expect_f32("batch_norm2d_backward divisor", d)?;
    }
    let (mut p, layout) = params_for(shape, bn)?;
    p.act = activation_code(act);
    p.slope = super::activation::slope(act);
    p.training = u32::from(training);
    p.has_divisor = u32::from(divisor.is_some());
    p.fuse = u32::from(layout.per_thread);
    let uniform = ctx.params(&p)?;
    let partials = if !layout.per_thread {
        Some(GpuTensor::uninit(
            ctx,
            &[2, c, layout.partials as usize],
            DType::F32,
        )?)
    } else {
        None
    };
    let mut inputs = vec![x, dy, stats, bn.tensor()];
    inputs.push(act_x);
    inputs.extend(divisor);
    let dparams = output(
        ctx,
        "batch_norm2d_backward dparams",
        given.map(|g| &g.dparams),
        &[2, c],
        DType::F32,
        &inputs,
    )?;
    inputs.push(&dparams);
    let dx = output(
        ctx,
        "batch_norm2d_backward dx",
        given.map(|g| &g.dx),
        &shape,
        DType::F32,
        &inputs,
    )?;
    // With one invocation per channel the reduction writes the grads where the partials go.
    let (u, part) = (&*uniform, partials.as_ref().unwrap_or(&dparams).buffer());
    let div = divisor.unwrap_or(&dummy).buffer();
    let (xb, params, st, dxb, dyb, ax, gr) = (
        x.buffer(),
        bn.tensor().buffer(),
        stats.buffer(),
        dx.buffer(),
        dy.buffer(),
        act_x.buffer(),
        dparams.buffer(),
    );
    let reduce_grid = partial_grid(ctx, c, layout.partials as usize)?;
    let mut list = vec![if layout.per_thread {
        (
            &BACKWARD_THREAD,
            vec![u, xb, part, params, st, dxb, dyb, ax, div],
            reduce_grid,
        )
    } else if layout.vec4 {
        (
            &BACKWARD_PARTIAL4,
            vec![u, part, st, xb, dyb, ax],
            reduce_grid,
        )
    } else {
        (
            &BACKWARD_PARTIAL,
            vec![u, xb, part, st, dyb, ax],
            reduce_grid,
        )
    }];
    if !layout.per_thread {
        list.push((&BACKWARD_FINAL, vec![u, part, gr], ctx.grid_1d(c, WGR)?));
        let grid = elementwise_grid(ctx, shape, layout)?;
        let kernel = pick(
            layout,
            [
                &BACKWARD_DX,
                &BACKWARD_DX_PLANE,
                &BACKWARD_DX4,
                &BACKWARD_DX_PLANE4,
            ],
        );
        list.push(if layout.vec4 {
            (kernel, vec![u, params, st, gr, div, xb, dxb, dyb, ax], grid)
        } else {
            (kernel, vec![u, xb, params, st, dxb, dyb, ax, gr, div], grid)
        });
    }
    submit(ctx, &list)?;
    Ok(GpuBatchNormGrads { dx, dparams })
}
