//! Fake quantization on the GPU (`shaders/fake_quant.wgsl`), bit-exact with
//! [`crate::reference::fake_quant`].
//!
//! The quantization parameters live on the GPU as a [`GpuQParams`] (scale, `1/scale` and
//! zero point per channel in one buffer), whether they were uploaded from host values
//! ([`GpuQParams::upload`], `1/scale` computed once on the host in f32) or computed on the
//! GPU by [`crate::kernels::observer::observe`] — so QAT chains observe → fake-quant with no
//! host round trip.
//!
//! Each launcher has an `_into` form writing into caller-provided tensors (no allocation, no
//! first-use zero fill), e.g. [`fake_quant_into`]. By default the kernels read and write
//! `vec4<f32>`s, one per invocation ([`FakeQuantKernel::Vec4`]), with results bit-identical to
//! the one-element-per-invocation kernels ([`FakeQuantKernel::Scalar`]).

use bytemuck::{Pod, Zeroable};

use super::{expect_f32, expect_shape, grid, row_workgroup, to_u32, RowWorkgroup, WG_CONSTANTS};
use crate::error::{Error, Result};
use crate::gpu::{Binding, DType, GpuContext, GpuTensor, Kernel, Launch, ParamsBuffer, Shader};
use crate::quant::{QParams, QuantRange};

pub(super) static SHADER: Shader = Shader {
    name: "fake_quant",
    source: concat!(
        include_str!("../../shaders/lib/float_bits.wgsl"),
        include_str!("../../shaders/fake_quant.wgsl")
    ),
};

static FORWARD: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "forward",
    bindings: &[
        Binding::uniform(0),
        Binding::read(1),
        Binding::read(2),
        Binding::read_write(3),
    ],
};

static FORWARD_MASK: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "forward_mask",
    bindings: &[
        Binding::uniform(0),
        Binding::read(1),
        Binding::read(2),
        Binding::read_write(3),
        Binding::read_write(4),
    ],
};

static BACKWARD: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "backward",
    bindings: &[
        Binding::uniform(0),
        Binding::read(1),
        Binding::read(2),
        Binding::read_write(3),
        Binding::read(5),
    ],
};

const FORWARD_VEC4_BINDINGS: &[Binding] = &[
    Binding::uniform(0),
    Binding::read(2),
    Binding::read(6),
    Binding::read_write(7),
];
const FORWARD_MASK_VEC4_BINDINGS: &[Binding] = &[
    Binding::uniform(0),
    Binding::read(2),
    Binding::read(6),
    Binding::read_write(7),
    Binding::read_write(8),
];
const BACKWARD_VEC4_BINDINGS: &[Binding] = &[
    Binding::uniform(0),
    Binding::read(2),
    Binding::read(6),
    Binding::read_write(7),
    Binding::read(9),
];

static FORWARD_VEC4: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "forward_vec4",
    bindings: FORWARD_VEC4_BINDINGS,
};
static FORWARD_MASK_VEC4: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "forward_mask_vec4",
    bindings: FORWARD_MASK_VEC4_BINDINGS,
};
static BACKWARD_VEC4: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "backward_vec4",
    bindings: BACKWARD_VEC4_BINDINGS,
};
/// `vec4`s per invocation of the forward rows kernel (`ROW_ITEMS` in the shader; the mask and
/// backward rows kernels do [`VEC4_PER_INVOCATION`]).
const ROW_VEC4_PER_INVOCATION: usize = 16;

static FORWARD_ROWS: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "forward_rows",
    bindings: FORWARD_VEC4_BINDINGS,
};
static FORWARD_MASK_ROWS: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "forward_mask_rows",
    bindings: FORWARD_MASK_VEC4_BINDINGS,
};
static BACKWARD_ROWS: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "backward_rows",
    bindings: BACKWARD_VEC4_BINDINGS,
};

/// vec4s each invocation of the vec4 kernels handles.
const VEC4_PER_INVOCATION: usize = 4;

/// Which fake-quant kernels a launcher runs. Both give bit-identical results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FakeQuantKernel {
    /// `vec4<f32>` loads and stores, four vec4s per invocation, where the layout allows:
    /// per tensor (any size of at least 4 elements; the 0-3 tail elements by a second, scalar
    /// dispatch in the same submission), or per channel when the product of the dims after
    /// the axis is a multiple of 4 (one row of workgroups per channel block, so the
    /// qparams are read once per invocation). Anything else runs
    /// [`FakeQuantKernel::Scalar`].
    #[default]
    Vec4,
    /// One element per invocation.
    Scalar,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    inner: u32,
    channels: u32,
    quant_min: i32,
    quant_max: i32,
    n4: u32,
    first: u32,
    rows: u32,
}

/// Quantization parameters on the GPU: one `u32` buffer of `3 * C` words, `scale[C]`
/// (f32 bits), `inv[C] = 1/scale` (f32 bits), `zero_point[C]` (i32 bits); `C = 1` per
/// tensor. This is the layout `fake_quant.wgsl` reads and `observer.wgsl` writes.
#[derive(Debug, Clone)]
pub struct GpuQParams {
    data: GpuTensor,
    axis: Option<usize>,
    host: Option<QParams>,
}

impl GpuQParams {
    /// Uploads host qparams, computing `inv = 1.0f32 / scale` on the host (as PyTorch does).
    /// Scale and zero-point lengths must agree; the full check against a tensor and a range
    /// ([`QParams::validate`]) happens when the qparams are used.
    pub fn upload(ctx: &GpuContext, qp: &QParams) -> Result<Self> {
        let c = qp.scale.len();
        if qp.zero_point.len() != c {
            return Err(Error::shape(
                "qparams (zero_point vs scale)",
                &[c],
                &[qp.zero_point.len()],
            ));
        }
        let mut words = Vec::with_capacity(3 * c);
        words.extend(qp.scale.iter().map(|s| s.to_bits()));
        words.extend(qp.scale.iter().map(|s| (1.0f32 / s).to_bits()));
        words.extend(qp.zero_point.iter().map(|&z| z as u32));
        let data = GpuTensor::from_slice_u32(ctx, &words, &[3, c])?;
        Ok(Self {
            data,
            axis: qp.axis,
            host: Some(qp.clone()),
        })
    }

    /// Wraps a `[3, C]` `u32` tensor in the layout above (as written by the observer kernel).
    pub fn from_tensor(data: GpuTensor, axis: Option<usize>) -> Result<Self> {
        if data.dtype() != DType::U32 || data.shape().len() != 2 || data.shape()[0] != 3 {
            return Err(Error::invalid(format!(
                "GPU qparams must be a [3, C] u32 tensor, got {:?} {:?}",
                data.dtype(),
                data.shape()
            )));
        }
        if axis.is_none() && data.shape()[1] != 1 {
            return Err(Error::shape("per-tensor qparams", &[1], &[data.shape()[1]]));
        }
        Ok(Self {
            data,
            axis,
            host: None,
        })
    }

    /// The `[3, C]` `u32` tensor (scale bits, inv bits, zero points).
    pub fn tensor(&self) -> &GpuTensor {
        &self.data
    }

    /// Number of channels (1 per tensor).
    pub fn channels(&self) -> usize {
        self.data.shape()[1]
    }

    /// `None` per tensor, `Some(axis)` per channel.
    pub fn axis(&self) -> Option<usize> {
        self.axis
    }

    /// Reads the parameters back: `(scale, inv, zero_point)` per channel.
    pub fn download_raw(&self, ctx: &GpuContext) -> Result<(Vec<f32>, Vec<f32>, Vec<i32>)> {
        let words = self.data.download_u32(ctx)?;
        let words = words.as_slice().unwrap_or(&[]);
        let c = self.channels();
        let scale = words[..c].iter().map(|&w| f32::from_bits(w)).collect();
        let inv = words[c..2 * c].iter().map(|&w| f32::from_bits(w)).collect();
        let zp = words[2 * c..3 * c].iter().map(|&w| w as i32).collect();
        Ok((scale, inv, zp))
    }

    /// Reads the parameters back as host [`QParams`].
    pub fn download(&self, ctx: &GpuContext) -> Result<QParams> {
        let (scale, _, zero_point) = self.download_raw(ctx)?;
        Ok(QParams {
            scale,
            zero_point,
            axis: self.axis,
        })
    }

    /// The checks of [`QParams::validate`]: in full (same errors as the CPU) for uploaded
    /// qparams; for GPU-computed ones (values unknown to the host) the range, the axis and
    /// the channel count.
    pub fn validate(&self, shape: &[usize], range: QuantRange) -> Result<()> {
        if let Some(host) = &self.host {
            return host.validate(shape, range);
        }
        range.validate()?;
        let c = self.channels();
        match self.axis {
            None if c != 1 => Err(Error::shape("per-tensor qparams", &[1], &[c])),
            None => Ok(()),
            Some(axis) if axis >= shape.len() => Err(Error::axis(axis, shape.len())),
            Some(axis) if c != shape[axis] => Err(Error::shape(
                format!("per-channel scale (axis {axis} of input {shape:?})"),
                &[shape[axis]],
                &[c],
            )),
            Some(_) => Ok(()),
        }
    }

    fn params(&self, x: &GpuTensor, range: QuantRange) -> Result<Params> {
        let shape = x.shape();
        let inner: usize = match self.axis {
            Some(axis) => shape[axis + 1..].iter().product(),
            None => 1,
        };
        let channels = self.channels();
        Ok(Params {
            n: to_u32(x.len(), "fake_quant element count")?,
            inner: to_u32(inner.max(1), "fake_quant inner size")?,
            channels: to_u32(channels, "fake_quant channels")?,
            quant_min: range.quant_min,
            quant_max: range.quant_max,
            n4: to_u32(x.len() / 4, "fake_quant vec4 count")?,
            first: 0,
            rows: to_u32(x.len() / inner.max(1), "fake_quant channel blocks")?,
        })
    }
}

/// The scalar, per-tensor vec4 and per-channel rows kernels of one launcher.
struct Variant {
    scalar: &'static Kernel,
    vec4: &'static Kernel,
    rows: &'static Kernel,
    /// `vec4`s per invocation of `rows` (its shader's count).
    rows_per_invocation: usize,
}

const FORWARD_KERNELS: Variant = Variant {
    scalar: &FORWARD,
    vec4: &FORWARD_VEC4,
    rows: &FORWARD_ROWS,
    rows_per_invocation: ROW_VEC4_PER_INVOCATION,
};
const FORWARD_MASK_KERNELS: Variant = Variant {
    scalar: &FORWARD_MASK,
    vec4: &FORWARD_MASK_VEC4,
    rows: &FORWARD_MASK_ROWS,
    rows_per_invocation: VEC4_PER_INVOCATION,
};
const BACKWARD_KERNELS: Variant = Variant {
    scalar: &BACKWARD,
    vec4: &BACKWARD_VEC4,
    rows: &BACKWARD_ROWS,
    rows_per_invocation: VEC4_PER_INVOCATION,
};

/// How a launch covers the tensor.
enum Plan {
    /// The scalar kernel over every element.
    Scalar([u32; 3]),
    /// The per-tensor vec4 kernel over the vec4s, then the scalar kernel over the tail
    /// elements (`first = 4 * n4`) when there are any.
    Vec4 {
        grid: [u32; 3],
        tail: Option<[u32; 3]>,
    },
    /// The per-channel rows kernel, with its workgroup size.
    Rows { grid: [u32; 3], wg: RowWorkgroup },
}

/// A validated launch: the uniform, the kernels and how they cover the tensor (the rows
/// kernel's grid is sized for `variant`'s rows kernel, so the two travel together).
struct Prepared {
    uniform: ParamsBuffer,
    variant: &'static Variant,
    plan: Plan,
}

/// Validates `x` and `qp` and returns the uniform and how `variant`'s kernels cover the
/// tensor.
fn prepare(
    ctx: &GpuContext,
    x: &GpuTensor,
    qp: &GpuQParams,
    range: QuantRange,
    kernel: FakeQuantKernel,
    variant: &'static Variant,
) -> Result<Prepared> {
    ctx.check_tensors(&[("fake_quant input", x), ("qparams", qp.tensor())])?;
    expect_f32("fake_quant input", x)?;
    qp.validate(x.shape(), range)?;
    let mut params = qp.params(x, range)?;
    let n = x.len();
    let n4 = n / 4;
    let max = ctx.limits().max_compute_workgroups_per_dimension as usize;
    let vec4 = kernel == FakeQuantKernel::Vec4 && n4 > 0;
    let plan = if vec4 && params.channels == 1 {
        let vec4_grid = grid(ctx, n4.div_ceil(VEC4_PER_INVOCATION))?;
        let tail = if n > 4 * n4 {
            params.first = params.n4 * 4;
            Some(grid(ctx, n - 4 * n4)?)
        } else {
            None
        };
        Plan::Vec4 {
            grid: vec4_grid,
            tail,
        }
    } else if vec4 && params.inner.is_multiple_of(4) && params.rows > 0 {
        let inner4 = params.inner as usize / 4;
        let invocations = inner4.div_ceil(variant.rows_per_invocation);
        let wg = row_workgroup(invocations);
        let gx = invocations.div_ceil(wg.size as usize);
        let rows = params.rows as usize;
        let gy = rows.min(max);
        let gz = rows.div_ceil(gy);
        if gx <= max && gz <= max {
            Plan::Rows {
                grid: [gx as u32, gy as u32, gz as u32],
                wg,
            }
        } else {
            Plan::Scalar(grid(ctx, n)?)
        }
    } else {
        Plan::Scalar(grid(ctx, n)?)
    };
    Ok(Prepared {
        uniform: ctx.params(&params)?,
        variant,
        plan,
    })
}

/// Checks a caller-provided output with the shared check ([`super::check_output`]): the
/// shape of `x`, `f32`, made on `ctx`, and a buffer of its own (not `x`'s or another
/// output's: the kernel reads those while it writes this one).
fn check_output(
    ctx: &GpuContext,
    what: &str,
    x: &GpuTensor,
    out: &GpuTensor,
    others: &[&GpuTensor],
) -> Result<()> {
    super::check_output(ctx, what, out, x.shape(), DType::F32, others)
}

/// Records the launch(es) of `prepared` in one submission. `scalar_buffers` are the scalar
/// kernel's buffers (uniform, x, qp, out, then mask or dy); `vec4_buffers` the vec4 and rows
/// kernels' (uniform, qp, x, out, then mask or dy).
fn launch(
    ctx: &GpuContext,
    prepared: &Prepared,
    scalar_buffers: &[&wgpu::Buffer],
    vec4_buffers: &[&wgpu::Buffer],
) -> Result<()> {
    let variant = prepared.variant;
    let scalar = |workgroups| Launch {
        kernel: variant.scalar,
        constants: WG_CONSTANTS,
        buffers: scalar_buffers,
        workgroups,
    };
    let vector = |kernel, workgroups| Launch {
        kernel,
        constants: WG_CONSTANTS,
        buffers: vec4_buffers,
        workgroups,
    };
    match prepared.plan {
        Plan::Scalar(grid) => ctx.run(&[scalar(grid)])?,
        Plan::Vec4 { grid, tail: None } => ctx.run(&[vector(variant.vec4, grid)])?,
        Plan::Vec4 {
            grid,
            tail: Some(tail),
        } => ctx.run(&[vector(variant.vec4, grid), scalar(tail)])?,
        Plan::Rows { grid, wg } => ctx.run(&[Launch {
            kernel: variant.rows,
            constants: wg.constants,
            buffers: vec4_buffers,
            workgroups: grid,
        }])?,
    };
    Ok(())
}

/// Fake-quantizes `x` (`torch.fake_quantize_per_{tensor,channel}_affine`), bit-exact with
/// [`crate::reference::fake_quant::fake_quantize`]; NaN propagates. Allocates the output;
/// [`fake_quant_into`] writes into one you provide.
pub fn fake_quant(
    ctx: &GpuContext,
    x: &GpuTensor,
    qp: &GpuQParams,
    range: QuantRange,
) -> Result<GpuTensor> {
    let y = GpuTensor::uninit(ctx, x.shape(), DType::F32)?;
    fake_quant_into(ctx, x, qp, range, &y)?;
    Ok(y)
}

/// [`fake_quant`] writing into `out` (an `f32` tensor of `x`'s shape with its own buffer):
/// no allocation, nothing else recorded but the kernel.
///
/// Errors: those of [`fake_quant`], and [`Error::ShapeMismatch`] / [`Error::InvalidArgument`]
/// for an `out` of the wrong shape or type or sharing `x`'s buffer.
pub fn fake_quant_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    qp: &GpuQParams,
    range: QuantRange,
    out: &GpuTensor,
) -> Result<()> {
    fake_quant_into_with(ctx, x, qp, range, out, FakeQuantKernel::default())
}

/// [`fake_quant_into`] with an explicit choice of kernel (for tests and benchmarks; both are
/// bit-identical).
pub fn fake_quant_into_with(
    ctx: &GpuContext,
    x: &GpuTensor,
    qp: &GpuQParams,
    range: QuantRange,
    out: &GpuTensor,
    kernel: FakeQuantKernel,
) -> Result<()> {
    let prepared = prepare(ctx, x, qp, range, kernel, &FORWARD_KERNELS)?;
    check_output(ctx, "fake_quant output", x, out, &[x])?;
    let (q, xb, ob) = (qp.data.buffer(), x.buffer(), out.buffer());
    let uniform = &prepared.uniform;
    launch(ctx, &prepared, &[uniform, xb, q, ob], &[uniform, q, xb, ob])
}

/// Fake-quantizes `x` and also returns the straight-through mask (1.0 where
/// `quant_min <= round(x/scale) + zp <= quant_max`, else 0.0; 0.0 for NaN).
pub fn fake_quant_with_mask(
    ctx: &GpuContext,
    x: &GpuTensor,
    qp: &GpuQParams,
    range: QuantRange,
) -> Result<(GpuTensor, GpuTensor)> {
    let y = GpuTensor::uninit(ctx, x.shape(), DType::F32)?;
    let mask = GpuTensor::uninit(ctx, x.shape(), DType::F32)?;
    fake_quant_with_mask_into(ctx, x, qp, range, &y, &mask)?;
    Ok((y, mask))
}

/// [`fake_quant_with_mask`] writing into `out` and `mask` (`f32` tensors of `x`'s shape, each
/// with its own buffer).
///
/// Errors: those of [`fake_quant_into`], for either output.
pub fn fake_quant_with_mask_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    qp: &GpuQParams,
    range: QuantRange,
    out: &GpuTensor,
    mask: &GpuTensor,
) -> Result<()> {
    let prepared = prepare(
        ctx,
        x,
        qp,
        range,
        FakeQuantKernel::default(),
        &FORWARD_MASK_KERNELS,
    )?;
    check_output(ctx, "fake_quant output", x, out, &[x])?;
    check_output(ctx, "fake_quant mask", x, mask, &[x, out])?;
    let (q, xb, ob, mb) = (qp.data.buffer(), x.buffer(), out.buffer(), mask.buffer());
    let uniform = &prepared.uniform;
    launch(
        ctx,
        &prepared,
        &[uniform, xb, q, ob, mb],
        &[uniform, q, xb, ob, mb],
    )
}

/// Straight-through gradient: `dx = dy` where the rounded value of `x` is in range, else 0
/// (bit-exact with [`crate::reference::fake_quant::fake_quantize_backward`]).
pub fn fake_quant_backward(
    ctx: &GpuContext,
    x: &GpuTensor,
    dy: &GpuTensor,
    qp: &GpuQParams,
    range: QuantRange,
) -> Result<GpuTensor> {
    expect_f32("fake_quant input", x)?;
    qp.validate(x.shape(), range)?;
    expect_shape("fake_quantize_backward (dy vs x)", x.shape(), dy)?;
    expect_f32("fake_quant_backward dy", dy)?;
    let dx = GpuTensor::uninit(ctx, x.shape(), DType::F32)?;
    fake_quant_backward_into(ctx, x, dy, qp, range, &dx)?;
    Ok(dx)
}

/// [`fake_quant_backward`] writing into `dx` (an `f32` tensor of `x`'s shape with its own
/// buffer).
///
/// Errors: those of [`fake_quant_backward`], and those of [`fake_quant_into`] for `dx`.
pub fn fake_quant_backward_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    dy: &GpuTensor,
    qp: &GpuQParams,
    range: QuantRange,
    dx: &GpuTensor,
) -> Result<()> {
    ctx.check_tensor("fake_quant_backward dy", dy)?;
    expect_f32("fake_quant input", x)?;
    qp.validate(x.shape(), range)?;
    expect_shape("fake_quantize_backward (dy vs x)", x.shape(), dy)?;
    expect_f32("fake_quant_backward dy", dy)?;
    let prepared = prepare(
        ctx,
        x,
        qp,
        range,
        FakeQuantKernel::default(),
        &BACKWARD_KERNELS,
    )?;
    check_output(ctx, "fake_quant_backward dx", x, dx, &[x, dy])?;
    let (q, xb, db, dyb) = (qp.data.buffer(), x.buffer(), dx.buffer(), dy.buffer());
    let uniform = &prepared.uniform;
    launch(
        ctx,
        &prepared,
        &[uniform, xb, q, db, dyb],
        &[uniform, q, xb, db, dyb],
    )
}
