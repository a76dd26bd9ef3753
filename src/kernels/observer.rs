//! Observers on the GPU (`shaders/observer.wgsl`): min/max per tensor or per channel, then
//! quantization parameters, bit-exact with [`crate::reference::observer`].
//!
//! [`observe`] records three dispatches in one submission (partial reductions, final
//! reduction, qparams) and returns a [`GpuQParams`] that stays on the GPU, ready for
//! [`crate::kernels::fake_quant::fake_quant`]. The divisions in the qparams formula use a
//! correctly rounded integer-arithmetic division in WGSL (`div_rn`, exposed for testing as
//! [`div_rn`]) because WGSL's `/` is only accurate to 2.5 ulp.
//!
//! NaN propagates: a NaN in a channel gives that channel a NaN min, max, scale and `1/scale`
//! (zero point `clamp(0, qmin, qmax)` for affine schemes, the usual constant for symmetric
//! ones), as on the CPU.

use bytemuck::{Pod, Zeroable};

use super::{expect_f32, expect_shape, output, to_u32, GpuQParams};
use crate::error::{Error, Result};
use crate::gpu::{Binding, DType, GpuContext, GpuTensor, Kernel, Launch, ParamsBuffer, Shader};
use crate::quant::ObserverSpec;

pub(super) static SHADER: Shader = Shader {
    name: "observer",
    source: concat!(
        include_str!("../../shaders/lib/float_bits.wgsl"),
        include_str!("../../shaders/lib/exact_float.wgsl"),
        include_str!("../../shaders/observer.wgsl")
    ),
};

/// Workgroup size of every observer entry point (`WGR` in the shader).
const WGR: u32 = 64;

static MINMAX_PARTIAL: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "minmax_partial",
    bindings: &[
        Binding::uniform(0),
        Binding::read(1),
        Binding::read_write(2),
        Binding::read(7),
    ],
};

static MINMAX_FINAL: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "minmax_final",
    bindings: &[
        Binding::uniform(0),
        Binding::read_write(2),
        Binding::read_write(3),
    ],
};

static MINMAX_SMALL: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "minmax_small",
    bindings: &[
        Binding::uniform(0),
        Binding::read(1),
        Binding::read_write(3),
    ],
};

static CALC_QPARAMS: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "calc_qparams",
    bindings: &[
        Binding::uniform(0),
        Binding::read_write(3),
        Binding::read_write(4),
    ],
};

static DIV_RN_TEST: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "div_rn_test",
    bindings: &[
        Binding::uniform(0),
        Binding::read(1),
        Binding::read(5),
        Binding::read_write(6),
    ],
};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
struct Params {
    m: u32,
    inner: u32,
    channels: u32,
    groups: u32,
    chunk: u32,
    row_stride: u32,
    step_rows: u32,
    step_units: u32,
    vec4: u32,
    tail: u32,
    n: u32,
    quant_min: i32,
    quant_max: i32,
    zp_symmetric: i32,
    symmetric: u32,
    eps: f32,
    denom: f32,
    _pad: [u32; 3],
}

/// Units (vec4s, or f32s where a channel's runs are not whole vec4s) each invocation of
/// `minmax_partial` folds in registers, at least, before the workgroup reduction; bounds the
/// number of partial results per channel.
const UNITS_PER_THREAD: usize = 256;
/// Lanes side by side on consecutive units in `minmax_partial` (`LANES`): each run of 8
/// invocations (a SIMD row on CPU adapters) streams through a contiguous range.
const LANES: u32 = 8;
/// Streams (contiguous ranges) per `minmax_partial` workgroup.
const STREAMS: usize = (WGR / LANES) as usize;
/// Upper bound on partial workgroups per channel.
const MAX_GROUPS: usize = 1024;
/// Up to this many elements per channel, one thread reduces a channel on its own
/// (`minmax_small`) instead of workgroups per channel in two passes.
const SMALL_M: usize = 256;

/// Shape of a reduction: channels, elements per channel, inner size (elements per contiguous
/// run of a channel; `m` when there is one channel).
struct Layout {
    channels: usize,
    m: usize,
    inner: usize,
}

fn layout(x: &GpuTensor, axis: Option<usize>) -> Result<Layout> {
    let shape = x.shape();
    match axis {
        None => Ok(Layout {
            channels: 1,
            m: x.len(),
            inner: x.len(),
        }),
        Some(axis) => {
            if axis >= shape.len() {
                return Err(Error::axis(axis, shape.len()));
            }
            let channels = shape[axis];
            let m = x.len().checked_div(channels).unwrap_or(0);
            // One channel: its elements are the whole tensor, contiguous.
            let inner = if channels == 1 {
                m
            } else {
                shape[axis + 1..].iter().product()
            };
            Ok(Layout { channels, m, inner })
        }
    }
}

/// The `minmax_partial` layout of a reduction of `l` over `n` elements: units, strides,
/// groups (wrapping `u32` arithmetic for the strides, as the shader advances addresses).
fn partial_params(l: &Layout, n: usize) -> Result<Params> {
    let vec4 = l.channels == 1 || l.inner.is_multiple_of(4);
    let per_unit = if vec4 { 4 } else { 1 };
    let inner = (l.inner / per_unit).max(1);
    let m = l.m / per_unit;
    let groups = m
        .div_ceil(WGR as usize * UNITS_PER_THREAD)
        .clamp(1, MAX_GROUPS);
    let chunk = m.div_ceil(groups * STREAMS);
    let row_stride = l.channels as u64 * inner as u64;
    let step_rows = (u64::from(LANES) / inner as u64).wrapping_mul(row_stride);
    Ok(Params {
        m: to_u32(m, "observer units per channel")?,
        inner: to_u32(inner, "observer inner size")?,
        channels: to_u32(l.channels, "observer channels")?,
        groups: groups as u32,
        chunk: to_u32(chunk, "observer chunk")?,
        row_stride: row_stride as u32,
        step_rows: step_rows as u32,
        step_units: (u64::from(LANES) % inner as u64) as u32,
        vec4: u32::from(vec4),
        // Per tensor, the elements after the last whole vec4; per channel, none.
        tail: to_u32(if l.channels == 1 { 4 * m } else { n }, "observer elements")?,
        n: to_u32(n, "observer elements")?,
        ..Params::default()
    })
}

/// Grid `[x, y, z]` with one slice of `x` workgroups per channel, channels spread over y, z.
fn channel_grid(ctx: &GpuContext, x: u32, channels: usize) -> Result<[u32; 3]> {
    let max = ctx.limits().max_compute_workgroups_per_dimension as usize;
    let cy = channels.min(max);
    let cz = channels.div_ceil(cy.max(1));
    if cz > max {
        return Err(Error::invalid(format!(
            "{channels} channels exceed what one dispatch can cover"
        )));
    }
    Ok([x, cy as u32, cz as u32])
}

/// The buffers and grids of the reduction.
struct Reduction {
    uniform: ParamsBuffer,
    partials: GpuTensor,
    minmax: GpuTensor,
    /// `Some(grid)`: one `minmax_small` pass; `None`: partial and final passes.
    small_grid: Option<[u32; 3]>,
    partial_grid: [u32; 3],
    final_grid: [u32; 3],
}

impl Reduction {
    /// Submits the dispatches that fill `minmax` from `x`, then `then` (if any), in one
    /// command buffer.
    fn run(&self, ctx: &GpuContext, x: &GpuTensor, then: Option<Launch<'_>>) -> Result<()> {
        let small_buffers = [&self.uniform, x.buffer(), self.minmax.buffer()];
        let partial_buffers = [
            &self.uniform,
            x.buffer(),
            self.partials.buffer(),
            x.buffer(),
        ];
        let final_buffers = [&self.uniform, self.partials.buffer(), self.minmax.buffer()];
        let mut launches = match self.small_grid {
            Some(workgroups) => vec![Launch {
                kernel: &MINMAX_SMALL,
                constants: &[],
                buffers: &small_buffers,
                workgroups,
            }],
            None => vec![
                Launch {
                    kernel: &MINMAX_PARTIAL,
                    constants: &[],
                    buffers: &partial_buffers,
                    workgroups: self.partial_grid,
                },
                Launch {
                    kernel: &MINMAX_FINAL,
                    constants: &[],
                    buffers: &final_buffers,
                    workgroups: self.final_grid,
                },
            ],
        };
        launches.extend(then);
        ctx.run(&launches).map(|_| ())
    }
}

fn prepare_reduction(
    ctx: &GpuContext,
    x: &GpuTensor,
    axis: Option<usize>,
    extra: Params,
    given_minmax: Option<&GpuTensor>,
) -> Result<Reduction> {
    ctx.check_tensor("observer input", x)?;
    expect_f32("observer input", x)?;
    let l = layout(x, axis)?;
    let small = l.m <= SMALL_M;
    let shape = if small {
        Params {
            m: to_u32(l.m, "observer elements per channel")?,
            inner: to_u32(l.inner.max(1), "observer inner size")?,
            channels: to_u32(l.channels, "observer channels")?,
            groups: 1,
            ..Params::default()
        }
    } else {
        partial_params(&l, x.len())?
    };
    let groups = shape.groups as usize;
    let params = Params {
        quant_min: extra.quant_min,
        quant_max: extra.quant_max,
        zp_symmetric: extra.zp_symmetric,
        symmetric: extra.symmetric,
        eps: extra.eps,
        denom: extra.denom,
        ..shape
    };
    let partials = GpuTensor::zeros(ctx, &[l.channels, groups, 2], DType::F32)?;
    let minmax = output(
        ctx,
        "observer min/max",
        given_minmax,
        &[2, l.channels],
        DType::F32,
        &[x],
    )?;
    Ok(Reduction {
        uniform: ctx.params(&params)?,
        partials,
        minmax,
        small_grid: if small {
            Some(ctx.grid_1d(l.channels, WGR)?)
        } else {
            None
        },
        partial_grid: channel_grid(ctx, groups as u32, l.channels)?,
        final_grid: channel_grid(ctx, 1, l.channels)?,
    })
}

/// Minimum and maximum of `x` per tensor (`axis = None`, like `torch.aminmax(x)`) or per
/// channel along `axis` (like `PerChannelMinMaxObserver`), as a `[2, C]` tensor: row 0 the
/// minima, row 1 the maxima (`C = 1` per tensor). NaN in a channel gives NaN for both; a
/// channel without elements gives `(+inf, -inf)`. Matches
/// [`crate::reference::observer::min_max`] / [`crate::reference::observer::min_max_per_channel`].
///
/// Errors: [`Error::AxisOutOfRange`].
pub fn min_max(ctx: &GpuContext, x: &GpuTensor, axis: Option<usize>) -> Result<GpuTensor> {
    let r = prepare_reduction(ctx, x, axis, Params::default(), None)?;
    r.run(ctx, x, None)?;
    Ok(r.minmax)
}

/// [`min_max`] writing into `out` (an `f32` tensor `[2, C]` with its own buffer, see
/// [`super::check_output`]).
pub fn min_max_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    axis: Option<usize>,
    out: &GpuTensor,
) -> Result<()> {
    let r = prepare_reduction(ctx, x, axis, Params::default(), Some(out))?;
    r.run(ctx, x, None)
}

/// The qparams settings of `spec` as the shader takes them, computed exactly as the CPU
/// reference does (`denom` in f64 then f32, symmetric zero point by dtype and range).
fn qparams_settings(spec: &ObserverSpec) -> Result<Params> {
    spec.validate()?;
    let qmin = i64::from(spec.range.quant_min);
    let qmax = i64::from(spec.range.quant_max);
    let symmetric = spec.qscheme.is_symmetric();
    let denom = if symmetric {
        ((qmax - qmin) as f64 / 2.0) as f32
    } else {
        (qmax - qmin) as f64 as f32
    };
    let zp_symmetric = spec.symmetric_zero_point();
    Ok(Params {
        quant_min: spec.range.quant_min,
        quant_max: spec.range.quant_max,
        zp_symmetric,
        symmetric: u32::from(symmetric),
        eps: spec.eps,
        denom,
        ..Params::default()
    })
}

/// Quantization parameters from a `[2, C]` min/max tensor (as [`min_max`] returns, or kept
/// by a running observer), computed on the GPU like
/// [`crate::reference::observer::calculate_qparams`]: scale, `1/scale` and zero point per
/// channel. `axis` is recorded in the result (`None` per tensor, then `C` must be 1).
///
/// Errors: [`Error::InvalidQuantRange`], [`Error::ShapeMismatch`] for a bad min/max shape.
pub fn calc_qparams(
    ctx: &GpuContext,
    minmax: &GpuTensor,
    spec: &ObserverSpec,
    axis: Option<usize>,
) -> Result<GpuQParams> {
    let qp = calc_qparams_impl(ctx, minmax, spec, axis, None)?;
    GpuQParams::from_tensor(qp, axis)
}

/// [`calc_qparams`] writing into `out`, a `u32` tensor `[3, C]` with its own buffer (see
/// [`super::check_output`]) in [`GpuQParams`]' layout; wrap it with
/// [`GpuQParams::from_tensor`] to use it.
pub fn calc_qparams_into(
    ctx: &GpuContext,
    minmax: &GpuTensor,
    spec: &ObserverSpec,
    axis: Option<usize>,
    out: &GpuTensor,
) -> Result<()> {
    calc_qparams_impl(ctx, minmax, spec, axis, Some(out)).map(drop)
}

fn calc_qparams_impl(
    ctx: &GpuContext,
    minmax: &GpuTensor,
    spec: &ObserverSpec,
    axis: Option<usize>,
    given: Option<&GpuTensor>,
) -> Result<GpuTensor> {
    ctx.check_tensor("observer min/max", minmax)?;
    expect_f32("observer min/max", minmax)?;
    let c = minmax.shape().get(1).copied().unwrap_or(0);
    expect_shape("observer min/max", &[2, c], minmax)?;
    if axis.is_none() && c != 1 {
        return Err(Error::shape("per-tensor min/max", &[2, 1], minmax.shape()));
    }
    let params = Params {
        channels: to_u32(c, "observer channels")?,
        ..qparams_settings(spec)?
    };
    let uniform = ctx.params(&params)?;
    let qp = output(ctx, "qparams", given, &[3, c], DType::U32, &[minmax])?;
    let workgroups = ctx.grid_1d(c, WGR)?;
    ctx.run(&[Launch {
        kernel: &CALC_QPARAMS,
        constants: &[],
        buffers: &[&uniform, minmax.buffer(), qp.buffer()],
        workgroups,
    }])?;
    Ok(qp)
}

/// Observes `x` once and returns its qparams on the GPU: `MinMaxObserver` for per-tensor
/// schemes, `PerChannelMinMaxObserver` along `spec.axis` for per-channel schemes, then
/// `calculate_qparams` — one submission, no host round trip. Bit-exact with
/// [`crate::reference::observer::observe_qparams`] (scale and zero point; `1/scale` is the
/// correctly rounded f32 reciprocal, as the CPU fake quant computes it).
///
/// Errors: those of [`ObserverSpec::validate`], [`Error::AxisOutOfRange`] (a negative axis
/// counts from the end, [`crate::quant::resolve_axis`]).
pub fn observe(ctx: &GpuContext, x: &GpuTensor, spec: &ObserverSpec) -> Result<GpuQParams> {
    let axis = if spec.qscheme.is_per_channel() {
        Some(spec.channel_axis(x.shape().len())?)
    } else {
        None
    };
    let qp = observe_impl(ctx, x, spec, None)?;
    GpuQParams::from_tensor(qp, axis)
}

/// [`observe`] writing the qparams into `out`, a `u32` tensor `[3, C]` with its own buffer
/// (see [`super::check_output`]) in [`GpuQParams`]' layout; wrap it with
/// [`GpuQParams::from_tensor`] to use it.
pub fn observe_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    spec: &ObserverSpec,
    out: &GpuTensor,
) -> Result<()> {
    observe_impl(ctx, x, spec, Some(out)).map(drop)
}

fn observe_impl(
    ctx: &GpuContext,
    x: &GpuTensor,
    spec: &ObserverSpec,
    given: Option<&GpuTensor>,
) -> Result<GpuTensor> {
    let settings = qparams_settings(spec)?;
    let axis = if spec.qscheme.is_per_channel() {
        Some(spec.channel_axis(x.shape().len())?)
    } else {
        None
    };
    let r = prepare_reduction(ctx, x, axis, settings, None)?;
    let c = r.minmax.shape()[1];
    let qp = output(ctx, "qparams", given, &[3, c], DType::U32, &[x])?;
    let qp_grid = ctx.grid_1d(c, WGR)?;
    let qp_buffers = [&r.uniform, r.minmax.buffer(), qp.buffer()];
    r.run(
        ctx,
        x,
        Some(Launch {
            kernel: &CALC_QPARAMS,
            constants: &[],
            buffers: &qp_buffers,
            workgroups: qp_grid,
        }),
    )?;
    Ok(qp)
}

/// Elementwise `div_rn(a, b)`: the shader's correctly rounded f32 division, exposed so tests
/// can check it against Rust's `a / b` (which is IEEE 754 round-to-nearest-even).
///
/// Errors: [`Error::ShapeMismatch`] unless `a` and `b` have the same shape.
pub fn div_rn(ctx: &GpuContext, a: &GpuTensor, b: &GpuTensor) -> Result<GpuTensor> {
    div_rn_impl(ctx, a, b, None)
}

/// [`div_rn`] writing into `out` (an `f32` tensor of `a`'s shape with a buffer of its own,
/// see [`super::check_output`]).
pub fn div_rn_into(ctx: &GpuContext, a: &GpuTensor, b: &GpuTensor, out: &GpuTensor) -> Result<()> {
    div_rn_impl(ctx, a, b, Some(out)).map(drop)
}

fn div_rn_impl(
    ctx: &GpuContext,
    a: &GpuTensor,
    b: &GpuTensor,
    given: Option<&GpuTensor>,
) -> Result<GpuTensor> {
    ctx.check_tensors(&[("div_rn numerator", a), ("div_rn denominator", b)])?;
    expect_f32("div_rn numerator", a)?;
    expect_f32("div_rn denominator", b)?;
    expect_shape("div_rn (b vs a)", a.shape(), b)?;
    let params = Params {
        n: to_u32(a.len(), "div_rn element count")?,
        ..Params::default()
    };
    let uniform = ctx.params(&params)?;
    let out = output(ctx, "div_rn output", given, a.shape(), DType::F32, &[a, b])?;
    let workgroups = ctx.grid_1d(a.len(), WGR)?;
    ctx.run(&[Launch {
        kernel: &DIV_RN_TEST,
        constants: &[],
        buffers: &[&uniform, a.buffer(), b.buffer(), out.buffer()],
        workgroups,
    }])?;
    Ok(out)
}
