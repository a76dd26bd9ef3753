//! Training ops on the GPU (`shaders/train.wgsl`), mirroring [`crate::reference::train`]:
//! max pooling backward, linear backward, `log_softmax` backward, the NLL loss (mean) with its
//! backward and the fused `log_softmax` + NLL backward, the top-1 correct count, and the
//! [`Sgd`] step in place, and the running update of observer statistics (so a QAT
//! FakeQuantize observes on the device). With conv2d's input / weight gradients and channel sum
//! ([`super::conv2d`]), BatchNorm2d's backward ([`super::batch_norm`]) and ReLU6's
//! ([`super::activation`]) they cover every op of NNI's Mnist network; flatten is
//! [`GpuTensor::reshape`] (no copy).
//!
//! Each launcher that returns tensors has an `_into` form writing into tensors the caller
//! owns (checked by [`super::check_output`] before anything is launched; the max pooling
//! backward of non-overlapping windows zero-fills its output first, so it needs `COPY_DST`);
//! the SGD step, [`copy_at`], [`observer_update`] and [`count_correct_into`] update their
//! tensors in place.
//!
//! Everything stays on the device: the loss is a `[1]` tensor (download one f32 to read it)
//! and the correct count a `[1]` `u32` accumulator that a whole evaluation adds into (read it
//! once with [`read_count`]). Inputs are validated with the CPU reference's checks and
//! messages; labels uploaded with [`upload_labels`] are range-checked there, and a device
//! label out of range gives a NaN loss / gradient row and poisons the correct count
//! ([`read_count`] then fails).

use bytemuck::{Pod, Zeroable};

use super::{check_output, expect_f32, expect_shape, output, to_u32, WG_CONSTANTS, WORKGROUP_SIZE};
use crate::error::{Error, Result};
use crate::gpu::{Binding, DType, GpuContext, GpuTensor, Kernel, Launch, Shader};
use crate::ops::{Activation, Conv2dParams, PadMode};
use crate::optim::Sgd;

pub(super) static SHADER: Shader = Shader {
    name: "train",
    source: concat!(
        include_str!("../../shaders/lib/float_bits.wgsl"),
        include_str!("../../shaders/train.wgsl")
    ),
};

const A_B_OUT: &[Binding] = &[
    Binding::uniform(0),
    Binding::read(1),
    Binding::read(2),
    Binding::read_write(3),
];

const LABELED: &[Binding] = &[
    Binding::uniform(0),
    Binding::read(1),
    Binding::read_write(3),
    Binding::read(4),
];

static MAX_POOL2D_BACKWARD: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "max_pool2d_backward",
    bindings: A_B_OUT,
};

static MAX_POOL2D_BACKWARD_TILED: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "max_pool2d_backward_tiled",
    bindings: A_B_OUT,
};

static MATMUL: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "matmul",
    bindings: A_B_OUT,
};

static LOG_SOFTMAX_BACKWARD: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "log_softmax_backward",
    bindings: A_B_OUT,
};

static NLL_LOSS: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "nll_loss",
    bindings: LABELED,
};

static NLL_LOSS_BACKWARD: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "nll_loss_backward",
    bindings: LABELED,
};

static LOG_SOFTMAX_NLL_BACKWARD: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "log_softmax_nll_backward",
    bindings: LABELED,
};

static COUNT_CORRECT: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "count_correct",
    bindings: &[
        Binding::uniform(0),
        Binding::read(1),
        Binding::read(4),
        Binding::read_write(5),
    ],
};

static SGD: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "sgd",
    bindings: &[
        Binding::uniform(0),
        Binding::read(2),
        Binding::read_write(3),
        Binding::read_write(6),
    ],
};

static OBSERVER_UPDATE: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "observer_update",
    bindings: &[
        Binding::uniform(0),
        Binding::read(2),
        Binding::read_write(3),
    ],
};

static ADD: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "add",
    bindings: A_B_OUT,
};

static SWAP01: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "swap01",
    bindings: &[
        Binding::uniform(0),
        Binding::read(1),
        Binding::read_write(3),
    ],
};

static CONV_WGRAD_DW3: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "conv_wgrad_dw3",
    bindings: &[
        Binding::uniform(0),
        Binding::read(1),
        Binding::read(2),
        Binding::read_write(3),
    ],
};

static FLIP_TRANSPOSE: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "flip_transpose",
    bindings: &[
        Binding::uniform(0),
        Binding::read(1),
        Binding::read_write(3),
    ],
};

static COL_SUM: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "col_sum",
    bindings: &[
        Binding::uniform(0),
        Binding::read(1),
        Binding::read_write(3),
    ],
};

static COPY_AT: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "copy_at",
    bindings: &[
        Binding::uniform(0),
        Binding::read(1),
        Binding::read_write(3),
    ],
};

static SGD_PLAIN: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "sgd_plain",
    bindings: &[
        Binding::uniform(0),
        Binding::read(2),
        Binding::read_write(3),
    ],
};

/// The uniform of `train.wgsl` (same field order).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
struct Params {
    count: u32,
    rows: u32,
    cols: u32,
    inner: u32,
    c: u32,
    h: u32,
    w: u32,
    oh: u32,
    ow: u32,
    kernel: u32,
    stride: u32,
    a_rs: u32,
    a_cs: u32,
    b_rs: u32,
    b_cs: u32,
    flags: u32,
    lr: f32,
    momentum: f32,
    dampening: f32,
    weight_decay: f32,
    scale: f32,
    p_off: u32,
    g_off: u32,
    _pad: u32,
}

const FIRST: u32 = 1;
const NESTEROV: u32 = 2;
const WEIGHT_DECAY: u32 = 4;
const MOVING_AVERAGE: u32 = 8;
/// The value of a correct-count accumulator that saw a label out of range.
const POISON: u32 = u32::MAX;

fn launch_1d(
    ctx: &GpuContext,
    kernel: &'static Kernel,
    p: &Params,
    buffers: &[&wgpu::Buffer],
    items: usize,
) -> Result<()> {
    let uniform = ctx.params(p)?;
    let mut all: Vec<&wgpu::Buffer> = Vec::with_capacity(buffers.len() + 1);
    all.push(&uniform);
    all.extend_from_slice(buffers);
    ctx.run(&[Launch {
        kernel,
        constants: WG_CONSTANTS,
        buffers: &all,
        workgroups: ctx.grid_1d(items, WORKGROUP_SIZE)?,
    }])?;
    Ok(())
}

fn launch_single(
    ctx: &GpuContext,
    kernel: &'static Kernel,
    p: &Params,
    buffers: &[&wgpu::Buffer],
) -> Result<()> {
    let uniform = ctx.params(p)?;
    let mut all: Vec<&wgpu::Buffer> = Vec::with_capacity(buffers.len() + 1);
    all.push(&uniform);
    all.extend_from_slice(buffers);
    ctx.run(&[Launch {
        kernel,
        constants: &[],
        buffers: &all,
        workgroups: [1, 1, 1],
    }])?;
    Ok(())
}

/// Gradient of [`super::pool::max_pool2d`] with respect to its input `x`, for upstream `dy`
/// `[N, C, OH, OW]`: bit-exact with [`crate::reference::train::max_pool2d_backward`] (the
/// argmax of each window is recomputed from `x` with PyTorch's CPU rule: first maximum on ties,
/// last NaN; gradients of overlapping windows add in output order). Non-overlapping windows
/// (stride = kernel, as in Mnist) run one invocation per window instead of one per input
/// element.
///
/// Errors: those of [`crate::reference::train::check_max_pool2d_backward`]; tensors that are not
/// `f32`; sizes a kernel cannot index.
pub fn max_pool2d_backward(
    ctx: &GpuContext,
    x: &GpuTensor,
    dy: &GpuTensor,
    kernel: usize,
    stride: usize,
) -> Result<GpuTensor> {
    max_pool2d_backward_impl(ctx, x, dy, kernel, stride, None)
}

/// [`max_pool2d_backward`] writing into `dx` (an `f32` tensor of `x`'s shape with its own
/// buffer, see [`super::check_output`]). With non-overlapping windows the kernel writes
/// only each window's argmax, so `dx` is zero-filled first and needs `COPY_DST`.
///
/// Errors: those of [`max_pool2d_backward`] and [`super::check_output`];
/// [`Error::MissingBufferUsage`] for a `dx` without `COPY_DST` when stride = kernel.
pub fn max_pool2d_backward_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    dy: &GpuTensor,
    kernel: usize,
    stride: usize,
    dx: &GpuTensor,
) -> Result<()> {
    max_pool2d_backward_impl(ctx, x, dy, kernel, stride, Some(dx)).map(drop)
}

fn max_pool2d_backward_impl(
    ctx: &GpuContext,
    x: &GpuTensor,
    dy: &GpuTensor,
    kernel: usize,
    stride: usize,
    given: Option<&GpuTensor>,
) -> Result<GpuTensor> {
    ctx.check_tensors(&[("max_pool2d input", x), ("max_pool2d_backward dy", dy)])?;
    let (oh, ow) = crate::ops::check_max_pool2d_backward(x.shape(), dy.shape(), kernel, stride)?;
    expect_f32("max_pool2d input", x)?;
    expect_f32("max_pool2d_backward dy", dy)?;
    let s = x.shape();
    const WHAT: &str = "max_pool2d_backward dx";
    if let Some(dx) = given {
        check_output(ctx, WHAT, dx, s, DType::F32, &[x, dy])?;
    }
    let tiled = stride == kernel;
    let p = Params {
        count: to_u32(x.len(), "max_pool2d input element count")?,
        h: to_u32(s[2], "max_pool2d height")?,
        w: to_u32(s[3], "max_pool2d width")?,
        oh: to_u32(oh, "max_pool2d output height")?,
        ow: to_u32(ow, "max_pool2d output width")?,
        kernel: to_u32(kernel, "max_pool2d kernel")?,
        stride: to_u32(stride, "max_pool2d stride")?,
        ..Params::default()
    };
    let dy_count = to_u32(dy.len(), "max_pool2d output element count")?;
    if tiled {
        // Windows do not overlap: one invocation per window, writing at its argmax only, into
        // a zero-filled dx (elements under no window stay 0).
        let dx = match given {
            Some(dx) => {
                ctx.clear_buffer(WHAT, dx.buffer(), dx.size_bytes())?;
                dx.clone()
            }
            None => GpuTensor::zeros(ctx, s, DType::F32)?,
        };
        let p = Params {
            count: dy_count,
            ..p
        };
        launch_1d(
            ctx,
            &MAX_POOL2D_BACKWARD_TILED,
            &p,
            &[x.buffer(), dy.buffer(), dx.buffer()],
            dy.len(),
        )?;
        return Ok(dx);
    }
    // One invocation per input element, each writing its own.
    let dx = match given {
        Some(dx) => dx.clone(),
        None => GpuTensor::uninit(ctx, s, DType::F32)?,
    };
    launch_1d(
        ctx,
        &MAX_POOL2D_BACKWARD,
        &p,
        &[x.buffer(), dy.buffer(), dx.buffer()],
        dx.len(),
    )?;
    Ok(dx)
}

/// `out[m, n] = Σₖ a[m·a_rs + k·a_cs] · b[k·b_rs + n·b_cs]` into `out` (`[rows, cols]`,
/// every element written; checked by the caller).
fn matmul_into(
    ctx: &GpuContext,
    a: &GpuTensor,
    b: &GpuTensor,
    [rows, cols, inner]: [usize; 3],
    [a_rs, a_cs]: [usize; 2],
    [b_rs, b_cs]: [usize; 2],
    out: &GpuTensor,
) -> Result<()> {
    if out.len() != rows * cols {
        return Err(Error::invalid("internal: training matmul output shape"));
    }
    let tiles = rows
        .div_ceil(4)
        .checked_mul(cols.div_ceil(4))
        .ok_or_else(|| Error::invalid("linear_backward: tile count overflows"))?;
    let p = Params {
        count: to_u32(tiles, "linear_backward tile count")?,
        rows: to_u32(rows, "linear_backward rows")?,
        cols: to_u32(cols, "linear_backward columns")?,
        inner: to_u32(inner, "linear_backward inner size")?,
        a_rs: to_u32(a_rs, "linear_backward stride")?,
        a_cs: to_u32(a_cs, "linear_backward stride")?,
        b_rs: to_u32(b_rs, "linear_backward stride")?,
        b_cs: to_u32(b_cs, "linear_backward stride")?,
        ..Params::default()
    };
    launch_1d(
        ctx,
        &MATMUL,
        &p,
        &[a.buffer(), b.buffer(), out.buffer()],
        tiles,
    )
}

/// `[cols]` column sums of the `[rows, cols]` tensor `a` into `out` (one invocation per
/// column; `out` checked by the caller).
fn col_sum_into(
    ctx: &GpuContext,
    a: &GpuTensor,
    rows: usize,
    cols: usize,
    out: &GpuTensor,
) -> Result<()> {
    if out.len() != cols {
        return Err(Error::invalid("internal: column sum output shape"));
    }
    let p = Params {
        count: to_u32(cols, "column count")?,
        rows: to_u32(rows, "row count")?,
        cols: to_u32(cols, "column count")?,
        ..Params::default()
    };
    to_u32(a.len(), "element count")?;
    launch_1d(ctx, &COL_SUM, &p, &[a.buffer(), out.buffer()], cols)
}

/// Gradients of [`super::linear::linear`] on the device (see
/// [`crate::reference::train::LinearGrads`]).
#[derive(Debug, Clone)]
pub struct GpuLinearGrads {
    /// dL/dx, `[N, in]`.
    pub dx: GpuTensor,
    /// dL/dW, `[out, in]`.
    pub dweight: GpuTensor,
    /// dL/db, `[out]`.
    pub dbias: GpuTensor,
}

/// Gradients of `x · Wᵀ + b` for upstream `dy` `[N, out]`: `dx = dy · W`, `dweight = dyᵀ · x`
/// (see [`GradKernel`] for the matmul kernels; f32 accumulation in `k` order) and
/// `dbias = Σₙ dy` (one invocation per output, rows in order). Matches
/// [`crate::reference::train::linear_backward`] up to summation order.
///
/// Errors: those of [`crate::reference::train::check_linear_backward`]; tensors that are not
/// `f32`; sizes a kernel cannot index.
pub fn linear_backward(
    ctx: &GpuContext,
    x: &GpuTensor,
    w: &GpuTensor,
    dy: &GpuTensor,
) -> Result<GpuLinearGrads> {
    linear_backward_impl(ctx, x, w, dy, GradKernel::Auto, None)
}

/// [`linear_backward`] writing into `grads` (three `f32` tensors of the gradients' shapes,
/// each with its own buffer, see [`super::check_output`]).
///
/// Errors: those of [`linear_backward`] and [`super::check_output`] (naming
/// `linear_backward dx`, `dweight` or `dbias`).
pub fn linear_backward_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    w: &GpuTensor,
    dy: &GpuTensor,
    grads: &GpuLinearGrads,
) -> Result<()> {
    linear_backward_impl(ctx, x, w, dy, GradKernel::Auto, Some(grads)).map(drop)
}

/// [`linear_backward`] with the matmul kernel chosen by `kernel`.
///
/// Errors: those of [`linear_backward`]; [`Error::InvalidArgument`] for
/// [`GradKernel::Subgroup`] on a device without subgroups.
pub fn linear_backward_with(
    ctx: &GpuContext,
    x: &GpuTensor,
    w: &GpuTensor,
    dy: &GpuTensor,
    kernel: GradKernel,
) -> Result<GpuLinearGrads> {
    linear_backward_impl(ctx, x, w, dy, kernel, None)
}

/// [`linear_backward_with`] writing into `grads` (as [`linear_backward_into`]).
///
/// Errors: those of [`linear_backward_with`] and [`linear_backward_into`].
pub fn linear_backward_with_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    w: &GpuTensor,
    dy: &GpuTensor,
    kernel: GradKernel,
    grads: &GpuLinearGrads,
) -> Result<()> {
    linear_backward_impl(ctx, x, w, dy, kernel, Some(grads)).map(drop)
}

fn linear_backward_impl(
    ctx: &GpuContext,
    x: &GpuTensor,
    w: &GpuTensor,
    dy: &GpuTensor,
    kernel: GradKernel,
    given: Option<&GpuLinearGrads>,
) -> Result<GpuLinearGrads> {
    let sg = kernel.subgroup(ctx)?;
    ctx.check_tensors(&[
        ("linear input", x),
        ("linear weight", w),
        ("linear_backward dy", dy),
    ])?;
    let [n, inp, out] = crate::ops::check_linear_backward(x.shape(), w.shape(), dy.shape())?;
    expect_f32("linear input", x)?;
    expect_f32("linear weight", w)?;
    expect_f32("linear_backward dy", dy)?;
    let dx = output(
        ctx,
        "linear_backward dx",
        given.map(|g| &g.dx),
        &[n, inp],
        DType::F32,
        &[x, w, dy],
    )?;
    let dweight = output(
        ctx,
        "linear_backward dweight",
        given.map(|g| &g.dweight),
        &[out, inp],
        DType::F32,
        &[x, w, dy, &dx],
    )?;
    let dbias = output(
        ctx,
        "linear_backward dbias",
        given.map(|g| &g.dbias),
        &[out],
        DType::F32,
        &[x, w, dy, &dx, &dweight],
    )?;
    if sg {
        let mm = |rows, kin, a| SgMatmul {
            batch: 1,
            rows,
            cols: inp,
            kin,
            kout: 1,
            a,
            b: [0, inp, 1, 0],
        };
        let none = Activation::None;
        matmul_sg_into(ctx, dy, w, mm(n, out, [0, out, 1, 0]), None, none, &dx)?;
        matmul_sg_into(ctx, dy, x, mm(out, n, [0, 1, out, 0]), None, none, &dweight)?;
    } else {
        // dx[n, i] = Σ_o dy[n, o] · w[o, i]
        matmul_into(ctx, dy, w, [n, inp, out], [out, 1], [inp, 1], &dx)?;
        // dw[o, i] = Σ_n dy[n, o] · x[n, i]
        matmul_into(ctx, dy, x, [out, inp, n], [1, out], [inp, 1], &dweight)?;
    }
    col_sum_into(ctx, dy, n, out, &dbias)?;
    Ok(GpuLinearGrads { dx, dweight, dbias })
}

/// Gradient of [`super::pool::log_softmax`] from its output `y` `[N, C]` and upstream `dy`:
/// per row `dx = dy − exp(y) · Σ dy` (one invocation per row), like
/// [`crate::reference::train::log_softmax_backward`] up to summation order and `exp` accuracy.
///
/// Errors: [`Error::InvalidArgument`] unless `y` is a rank-2 `f32` tensor;
/// [`Error::ShapeMismatch`] when `dy`'s shape is not `y`'s.
pub fn log_softmax_backward(ctx: &GpuContext, y: &GpuTensor, dy: &GpuTensor) -> Result<GpuTensor> {
    log_softmax_backward_impl(ctx, y, dy, None)
}

/// [`log_softmax_backward`] writing into `dx` (an `f32` tensor of `y`'s shape with its own
/// buffer, see [`super::check_output`]).
///
/// Errors: those of [`log_softmax_backward`] and [`super::check_output`].
pub fn log_softmax_backward_into(
    ctx: &GpuContext,
    y: &GpuTensor,
    dy: &GpuTensor,
    dx: &GpuTensor,
) -> Result<()> {
    log_softmax_backward_impl(ctx, y, dy, Some(dx)).map(drop)
}

fn log_softmax_backward_impl(
    ctx: &GpuContext,
    y: &GpuTensor,
    dy: &GpuTensor,
    given: Option<&GpuTensor>,
) -> Result<GpuTensor> {
    ctx.check_tensors(&[("log_softmax output", y), ("log_softmax_backward dy", dy)])?;
    let [rows, cols] = <[usize; 2]>::try_from(y.shape()).map_err(|_| {
        Error::invalid(format!(
            "log_softmax input must be [N, C] (rank 2), got shape {:?}",
            y.shape()
        ))
    })?;
    expect_shape("log_softmax_backward (dy vs output)", y.shape(), dy)?;
    expect_f32("log_softmax output", y)?;
    expect_f32("log_softmax_backward dy", dy)?;
    to_u32(y.len(), "log_softmax element count")?;
    let dx = output(
        ctx,
        "log_softmax_backward dx",
        given,
        y.shape(),
        DType::F32,
        &[y, dy],
    )?;
    let p = Params {
        count: to_u32(rows, "log_softmax rows")?,
        cols: to_u32(cols, "log_softmax columns")?,
        ..Params::default()
    };
    launch_1d(
        ctx,
        &LOG_SOFTMAX_BACKWARD,
        &p,
        &[y.buffer(), dy.buffer(), dx.buffer()],
        rows,
    )?;
    Ok(dx)
}

/// Uploads class labels after checking them against `classes`
/// ([`crate::reference::train::check_labels`]): a `u32` tensor `[N]`.
///
/// Errors: [`Error::InvalidArgument`] for a label `≥ classes`; GPU errors.
pub fn upload_labels(ctx: &GpuContext, labels: &[u32], classes: usize) -> Result<GpuTensor> {
    crate::ops::check_labels(labels, classes)?;
    GpuTensor::from_slice_u32(ctx, labels, &[labels.len()])
}

fn classification(op: &str, scores: &GpuTensor, labels: &GpuTensor) -> Result<[usize; 2]> {
    let nc = crate::ops::check_classification(op, scores.shape(), labels.shape())?;
    expect_f32(&format!("{op} input"), scores)?;
    if labels.dtype() != DType::U32 {
        return Err(Error::invalid(format!(
            "{op} labels must be a u32 tensor, got {:?}",
            labels.dtype()
        )));
    }
    to_u32(scores.len(), &format!("{op} element count"))?;
    Ok(nc)
}

/// The NLL loss with mean reduction of log-probabilities `logp` `[N, C]` and `labels` `[N]`
/// (`u32`), as a `[1]` tensor on the device: `−(1/N) Σₙ logp[n, labels[n]]`, reduced in one
/// workgroup (like [`crate::reference::train::nll_loss`] up to summation order). A device label
/// `≥ C`, or `N = 0`, gives NaN.
///
/// Errors: those of [`crate::reference::train::check_classification`]; a `logp` that is not
/// `f32` or labels that are not `u32`.
pub fn nll_loss(ctx: &GpuContext, logp: &GpuTensor, labels: &GpuTensor) -> Result<GpuTensor> {
    nll_loss_impl(ctx, logp, labels, None)
}

/// [`nll_loss`] writing into `loss` (an `f32` tensor `[1]` with its own buffer, see
/// [`super::check_output`]).
///
/// Errors: those of [`nll_loss`] and [`super::check_output`].
pub fn nll_loss_into(
    ctx: &GpuContext,
    logp: &GpuTensor,
    labels: &GpuTensor,
    loss: &GpuTensor,
) -> Result<()> {
    nll_loss_impl(ctx, logp, labels, Some(loss)).map(drop)
}

fn nll_loss_impl(
    ctx: &GpuContext,
    logp: &GpuTensor,
    labels: &GpuTensor,
    given: Option<&GpuTensor>,
) -> Result<GpuTensor> {
    ctx.check_tensors(&[
        ("nll_loss log-probabilities", logp),
        ("nll_loss labels", labels),
    ])?;
    let [n, c] = classification("nll_loss", logp, labels)?;
    let loss = output(
        ctx,
        "nll_loss output",
        given,
        &[1],
        DType::F32,
        &[logp, labels],
    )?;
    let p = Params {
        rows: to_u32(n, "nll_loss rows")?,
        cols: to_u32(c, "nll_loss classes")?,
        ..Params::default()
    };
    launch_single(
        ctx,
        &NLL_LOSS,
        &p,
        &[logp.buffer(), loss.buffer(), labels.buffer()],
    )?;
    Ok(loss)
}

fn per_element(
    ctx: &GpuContext,
    (kernel, what): (&'static Kernel, &str),
    logp: &GpuTensor,
    labels: &GpuTensor,
    given: Option<&GpuTensor>,
) -> Result<GpuTensor> {
    ctx.check_tensors(&[
        ("nll_loss log-probabilities", logp),
        ("nll_loss labels", labels),
    ])?;
    let [n, c] = classification("nll_loss", logp, labels)?;
    let d = output(ctx, what, given, logp.shape(), DType::F32, &[logp, labels])?;
    let p = Params {
        count: to_u32(d.len(), "nll_loss element count")?,
        rows: to_u32(n, "nll_loss rows")?,
        cols: to_u32(c, "nll_loss classes")?,
        scale: -1.0 / n as f32,
        ..Params::default()
    };
    launch_1d(
        ctx,
        kernel,
        &p,
        &[logp.buffer(), d.buffer(), labels.buffer()],
        d.len(),
    )?;
    Ok(d)
}

/// Gradient of [`nll_loss`] with respect to `logp` (upstream 1): `−1/N` at each label, exactly
/// [`crate::reference::train::nll_loss_backward`] (a device label `≥ C` gives a NaN row).
///
/// Errors: as [`nll_loss`].
pub fn nll_loss_backward(
    ctx: &GpuContext,
    logp: &GpuTensor,
    labels: &GpuTensor,
) -> Result<GpuTensor> {
    per_element(ctx, NLL_BACKWARD, logp, labels, None)
}

/// [`nll_loss_backward`] writing into `d` (an `f32` tensor of `logp`'s shape with its own
/// buffer, see [`super::check_output`]).
///
/// Errors: those of [`nll_loss`] and [`super::check_output`].
pub fn nll_loss_backward_into(
    ctx: &GpuContext,
    logp: &GpuTensor,
    labels: &GpuTensor,
    d: &GpuTensor,
) -> Result<()> {
    per_element(ctx, NLL_BACKWARD, logp, labels, Some(d)).map(drop)
}

const NLL_BACKWARD: (&Kernel, &str) = (&NLL_LOSS_BACKWARD, "nll_loss_backward output");
const LOG_SOFTMAX_NLL: (&Kernel, &str) =
    (&LOG_SOFTMAX_NLL_BACKWARD, "log_softmax_nll_backward output");

/// [`nll_loss_backward`] then [`log_softmax_backward`] in one kernel: the gradient of
/// `nll_loss(log_softmax(z))` with respect to `z`, from `logp = log_softmax(z)`:
/// `[j = label]·s − exp(logp)·s` with `s = −1/N` (like
/// [`crate::reference::train::log_softmax_nll_backward`] up to `exp` accuracy; a device label
/// `≥ C` gives a NaN row).
///
/// Errors: as [`nll_loss`].
pub fn log_softmax_nll_backward(
    ctx: &GpuContext,
    logp: &GpuTensor,
    labels: &GpuTensor,
) -> Result<GpuTensor> {
    per_element(ctx, LOG_SOFTMAX_NLL, logp, labels, None)
}

/// [`log_softmax_nll_backward`] writing into `dz` (an `f32` tensor of `logp`'s shape with
/// its own buffer, see [`super::check_output`]).
///
/// Errors: those of [`nll_loss`] and [`super::check_output`].
pub fn log_softmax_nll_backward_into(
    ctx: &GpuContext,
    logp: &GpuTensor,
    labels: &GpuTensor,
    dz: &GpuTensor,
) -> Result<()> {
    per_element(ctx, LOG_SOFTMAX_NLL, logp, labels, Some(dz)).map(drop)
}

/// A zeroed correct-count accumulator (`u32` `[1]`) for [`count_correct_into`].
pub fn new_counter(ctx: &GpuContext) -> Result<GpuTensor> {
    GpuTensor::zeros(ctx, &[1], DType::U32)
}

/// Adds to `counter` (`u32` `[1]`, from [`new_counter`]) the number of rows of `scores`
/// `[N, C]` whose argmax (first maximum on ties, NaN largest: `torch.argmax`) equals the label
/// — [`crate::reference::train::count_correct`] on the device, one workgroup. A device label
/// `≥ C` poisons the counter ([`read_count`] then fails).
///
/// Errors: those of [`crate::reference::train::check_classification`]; a counter that is not
/// a `u32` `[1]` tensor.
pub fn count_correct_into(
    ctx: &GpuContext,
    scores: &GpuTensor,
    labels: &GpuTensor,
    counter: &GpuTensor,
) -> Result<()> {
    ctx.check_tensors(&[
        ("count_correct scores", scores),
        ("count_correct labels", labels),
        ("count_correct counter", counter),
    ])?;
    let [n, c] = classification("count_correct", scores, labels)?;
    if counter.dtype() != DType::U32 || counter.shape() != [1] {
        return Err(Error::invalid(format!(
            "count_correct counter must be a u32 tensor of shape [1], got {:?} {:?}",
            counter.dtype(),
            counter.shape()
        )));
    }
    let p = Params {
        rows: to_u32(n, "count_correct rows")?,
        cols: to_u32(c, "count_correct classes")?,
        ..Params::default()
    };
    launch_single(
        ctx,
        &COUNT_CORRECT,
        &p,
        &[scores.buffer(), labels.buffer(), counter.buffer()],
    )
}

/// [`count_correct_into`] a new counter.
///
/// Errors: as [`count_correct_into`].
pub fn count_correct(
    ctx: &GpuContext,
    scores: &GpuTensor,
    labels: &GpuTensor,
) -> Result<GpuTensor> {
    let counter = new_counter(ctx)?;
    count_correct_into(ctx, scores, labels, &counter)?;
    Ok(counter)
}

/// Downloads a correct-count accumulator (one `u32`).
///
/// Errors: [`Error::InvalidArgument`] when a counted batch had a label out of range (the
/// counter is poisoned), or for a tensor that is not a `u32` `[1]`; GPU errors.
pub fn read_count(ctx: &GpuContext, counter: &GpuTensor) -> Result<u32> {
    if counter.shape() != [1] {
        return Err(Error::shape("read_count counter", &[1], counter.shape()));
    }
    let v = counter.download_u32(ctx)?[[0]];
    if v == POISON {
        return Err(Error::invalid(
            "count_correct: a label was out of range for the scores' classes",
        ));
    }
    Ok(v)
}

/// One `torch.optim.SGD` step on the device, in place: `param` and (with momentum) `buf`
/// are updated from `grad` ([`Sgd::update`] per element, the same fma order as the CPU
/// reference [`crate::reference::train::sgd_step`]); `first` marks the step that creates the
/// momentum buffer (it is overwritten with the gradient). Without momentum `buf` may be
/// `None`.
///
/// Errors: those of [`crate::reference::train::check_sgd`]; tensors that are not `f32`; a
/// buffer that is the parameter or the gradient.
pub fn sgd_step(
    ctx: &GpuContext,
    param: &GpuTensor,
    grad: &GpuTensor,
    buf: Option<&GpuTensor>,
    sgd: &Sgd,
    first: bool,
) -> Result<()> {
    ctx.check_tensors(&[("sgd_step parameter", param), ("sgd_step gradient", grad)])?;
    if let Some(b) = buf {
        ctx.check_tensor("sgd_step momentum buffer", b)?;
    }
    crate::optim::check_sgd(sgd, param.shape(), grad.shape(), buf.map(|b| b.shape()))?;
    if param.buffer() == grad.buffer() {
        return Err(Error::invalid(
            "sgd_step: the gradient must not be the parameter's buffer",
        ));
    }
    sgd_launch(ctx, (param, 0), (grad, 0), param.len(), buf, sgd, first)
}

/// [`sgd_step`] on `len` elements of `param` from element `p_off`, with the gradient from
/// element `g_off` of `grad` (a parameter packed in a larger buffer, e.g. BatchNorm's γ and β
/// rows of [`super::GpuBatchNorm`]). The momentum buffer holds `len` elements.
///
/// Errors: [`Error::InvalidArgument`] for ranges outside the tensors, a momentum buffer of
/// another size, bad settings ([`Sgd::validate`]), or tensors that are not `f32`.
pub fn sgd_step_range(
    ctx: &GpuContext,
    (param, p_off): (&GpuTensor, usize),
    (grad, g_off): (&GpuTensor, usize),
    len: usize,
    buf: Option<&GpuTensor>,
    sgd: &Sgd,
    first: bool,
) -> Result<()> {
    let fits = |t: &GpuTensor, off: usize| off.checked_add(len).is_some_and(|e| e <= t.len());
    if !fits(param, p_off) || !fits(grad, g_off) {
        return Err(Error::invalid(format!(
            "sgd_step_range: {len} elements from {p_off} / {g_off} exceed the parameter \
             ({}) or gradient ({}) tensor",
            param.len(),
            grad.len()
        )));
    }
    let shape = [len];
    crate::optim::check_sgd(sgd, &shape, &shape, buf.map(|_| &shape[..]))?;
    if let Some(b) = buf {
        if b.len() != len {
            return Err(Error::shape("sgd_step momentum buffer", &[len], b.shape()));
        }
    }
    if param.buffer() == grad.buffer() {
        return Err(Error::invalid(
            "sgd_step: the gradient must not be the parameter's buffer",
        ));
    }
    sgd_launch(ctx, (param, p_off), (grad, g_off), len, buf, sgd, first)
}

fn sgd_launch(
    ctx: &GpuContext,
    (param, p_off): (&GpuTensor, usize),
    (grad, g_off): (&GpuTensor, usize),
    len: usize,
    buf: Option<&GpuTensor>,
    sgd: &Sgd,
    first: bool,
) -> Result<()> {
    expect_f32("sgd_step parameter", param)?;
    expect_f32("sgd_step gradient", grad)?;
    let mut flags = 0;
    if first {
        flags |= FIRST;
    }
    if sgd.nesterov {
        flags |= NESTEROV;
    }
    if sgd.weight_decay != 0.0 {
        flags |= WEIGHT_DECAY;
    }
    let p = Params {
        count: to_u32(len, "sgd_step element count")?,
        flags,
        lr: sgd.lr,
        momentum: sgd.momentum,
        dampening: sgd.dampening,
        weight_decay: sgd.weight_decay,
        p_off: to_u32(p_off, "sgd_step parameter offset")?,
        g_off: to_u32(g_off, "sgd_step gradient offset")?,
        ..Params::default()
    };
    to_u32(param.len(), "sgd_step parameter size")?;
    to_u32(grad.len(), "sgd_step gradient size")?;
    match buf {
        Some(buf) if sgd.has_momentum() => {
            expect_f32("sgd_step momentum buffer", buf)?;
            if buf.buffer() == param.buffer() || buf.buffer() == grad.buffer() {
                return Err(Error::invalid(
                    "sgd_step: the momentum buffer must be its own tensor",
                ));
            }
            launch_1d(
                ctx,
                &SGD,
                &p,
                &[grad.buffer(), param.buffer(), buf.buffer()],
                len,
            )
        }
        _ => launch_1d(ctx, &SGD_PLAIN, &p, &[grad.buffer(), param.buffer()], len),
    }
}

/// `a + b` elementwise (same shape), a new tensor: residual adds and gradient accumulation.
///
/// Errors: [`Error::ShapeMismatch`] when the shapes differ; tensors that are not `f32`.
pub fn add(ctx: &GpuContext, a: &GpuTensor, b: &GpuTensor) -> Result<GpuTensor> {
    add_impl(ctx, a, b, None)
}

/// [`add`] writing into `out` (an `f32` tensor of `a`'s shape with its own buffer, see
/// [`super::check_output`]).
///
/// Errors: those of [`add`] and [`super::check_output`].
pub fn add_into(ctx: &GpuContext, a: &GpuTensor, b: &GpuTensor, out: &GpuTensor) -> Result<()> {
    add_impl(ctx, a, b, Some(out)).map(drop)
}

fn add_impl(
    ctx: &GpuContext,
    a: &GpuTensor,
    b: &GpuTensor,
    given: Option<&GpuTensor>,
) -> Result<GpuTensor> {
    ctx.check_tensors(&[("add input", a), ("add input", b)])?;
    expect_shape("add (b vs a)", a.shape(), b)?;
    expect_f32("add input", a)?;
    expect_f32("add input", b)?;
    let out = output(ctx, "add output", given, a.shape(), DType::F32, &[a, b])?;
    let p = Params {
        count: to_u32(a.len(), "add element count")?,
        ..Params::default()
    };
    launch_1d(
        ctx,
        &ADD,
        &p,
        &[a.buffer(), b.buffer(), out.buffer()],
        a.len(),
    )?;
    Ok(out)
}

/// Copies the `f32` tensor `src` into `dst` from element `offset` on, as a kernel launch (so
/// inside [`GpuContext::record`] it runs in order with the other launches): e.g. a
/// BatchNorm step's running statistics into rows 2 and 3 of its [`super::GpuBatchNorm`].
///
/// Errors: [`Error::InvalidArgument`] when `src` does not fit in `dst` from `offset`, for
/// tensors that are not `f32` or share a buffer; tensors of another context.
pub fn copy_at(ctx: &GpuContext, src: &GpuTensor, dst: &GpuTensor, offset: usize) -> Result<()> {
    ctx.check_tensors(&[("copy_at source", src), ("copy_at destination", dst)])?;
    expect_f32("copy_at source", src)?;
    expect_f32("copy_at destination", dst)?;
    if offset
        .checked_add(src.len())
        .is_none_or(|end| end > dst.len())
    {
        return Err(Error::invalid(format!(
            "copy_at: {} elements from {offset} exceed the destination ({} elements)",
            src.len(),
            dst.len()
        )));
    }
    if src.buffer() == dst.buffer() {
        return Err(Error::invalid(
            "copy_at: the source must not be the destination's buffer",
        ));
    }
    let p = Params {
        count: to_u32(src.len(), "copy_at element count")?,
        p_off: to_u32(offset, "copy_at offset")?,
        ..Params::default()
    };
    to_u32(dst.len(), "copy_at destination size")?;
    launch_1d(ctx, &COPY_AT, &p, &[src.buffer(), dst.buffer()], src.len())
}

/// Updates running observer statistics in place on the device: `state` `[2, C]` (row 0
/// minima, row 1 maxima) combined with a batch's `[2, C]` min/max (as
/// [`super::observer::min_max`] returns) per
/// [`crate::reference::train::observer_combine`]: the batch's on the `first` step, then
/// running min / max (`averaging_constant = None`, `MinMaxObserver`) or the moving average
/// (`Some(c)`). Qparams then come from [`super::observer::calc_qparams`] on `state`, so an
/// observer's forward never leaves the device.
///
/// Errors: those of [`crate::reference::train::check_observer_update`]; tensors that are not
/// `f32`; a batch that is the state's buffer.
pub fn observer_update(
    ctx: &GpuContext,
    state: &GpuTensor,
    batch: &GpuTensor,
    averaging_constant: Option<f32>,
    first: bool,
) -> Result<()> {
    let c = crate::ops::check_observer_update(state.shape(), batch.shape(), averaging_constant)?;
    expect_f32("observer state", state)?;
    expect_f32("observer batch min/max", batch)?;
    if state.buffer() == batch.buffer() {
        return Err(Error::invalid(
            "observer_update: the batch min/max must not be the state's buffer",
        ));
    }
    let mut flags = 0;
    if first {
        flags |= FIRST;
    }
    if averaging_constant.is_some() {
        flags |= MOVING_AVERAGE;
    }
    let p = Params {
        count: to_u32(state.len(), "observer state element count")?,
        rows: to_u32(c, "observer channels")?,
        flags,
        scale: averaging_constant.unwrap_or(0.0),
        ..Params::default()
    };
    launch_1d(
        ctx,
        &OBSERVER_UPDATE,
        &p,
        &[batch.buffer(), state.buffer()],
        state.len(),
    )
}

/// `[A, B, ...]` → `[B, A, ...]` (the first two dimensions swapped, a copy).
///
/// Errors: [`Error::InvalidArgument`] for a tensor of rank < 2 or not `f32`.
pub fn swap01(ctx: &GpuContext, a: &GpuTensor) -> Result<GpuTensor> {
    swap01_impl(ctx, a, None)
}

/// [`swap01`] writing into `out` (an `f32` tensor of the swapped shape with its own buffer,
/// see [`super::check_output`]).
///
/// Errors: those of [`swap01`] and [`super::check_output`].
pub fn swap01_into(ctx: &GpuContext, a: &GpuTensor, out: &GpuTensor) -> Result<()> {
    swap01_impl(ctx, a, Some(out)).map(drop)
}

fn swap01_impl(ctx: &GpuContext, a: &GpuTensor, given: Option<&GpuTensor>) -> Result<GpuTensor> {
    ctx.check_tensor("swap01 input", a)?;
    let s = a.shape();
    if s.len() < 2 {
        return Err(Error::invalid(format!(
            "swap01 needs rank >= 2, got shape {s:?}"
        )));
    }
    expect_f32("swap01 input", a)?;
    let inner: usize = s[2..].iter().product();
    let mut shape = s.to_vec();
    shape.swap(0, 1);
    let out = output(ctx, "swap01 output", given, &shape, DType::F32, &[a])?;
    let p = Params {
        count: to_u32(a.len(), "swap01 element count")?,
        rows: to_u32(s[0], "swap01 rows")?,
        cols: to_u32(s[1], "swap01 columns")?,
        inner: to_u32(inner, "swap01 inner size")?,
        ..Params::default()
    };
    launch_1d(ctx, &SWAP01, &p, &[a.buffer(), out.buffer()], a.len())?;
    Ok(out)
}

/// Output channels per invocation of `flip_transpose` (`FLIP_O` in `shaders/train.wgsl`).
const FLIP_O: usize = 8;

/// A conv weight `[O, C, KH, KW]` flipped in space and with O and C swapped:
/// `[C, O, KH, KW]`, `out[c, o, ky, kx] = w[o, c, KH−1−ky, KW−1−kx]`.
fn flip_transpose(ctx: &GpuContext, w: &GpuTensor) -> Result<GpuTensor> {
    let [o, c, kh, kw] = <[usize; 4]>::try_from(w.shape())
        .map_err(|_| Error::invalid("flip_transpose: weight must be rank 4"))?;
    // Every element is written.
    let out = GpuTensor::uninit(ctx, &[c, o, kh, kw], DType::F32)?;
    // One invocation per input channel and block of FLIP_O output channels; the element count
    // bounds every index.
    to_u32(w.len(), "conv weight element count")?;
    let invocations = c
        .checked_mul(o.div_ceil(FLIP_O))
        .ok_or_else(|| Error::invalid("flip_transpose: invocation count overflows"))?;
    let p = Params {
        count: to_u32(invocations, "flip_transpose invocations")?,
        rows: to_u32(o, "conv output channels")?,
        cols: to_u32(c, "conv input channels")?,
        h: to_u32(kh, "conv kernel height")?,
        w: to_u32(kw, "conv kernel width")?,
        ..Params::default()
    };
    launch_1d(
        ctx,
        &FLIP_TRANSPOSE,
        &p,
        &[w.buffer(), out.buffer()],
        invocations,
    )?;
    Ok(out)
}

/// Whether the gradients of a conv can run as forward convolutions (explicit padding smaller
/// than the kernel, stride 1, dilation 1, one group).
fn forward_form(params: &Conv2dParams, w_shape: &[usize]) -> bool {
    params.groups == 1 && unit_stride_form(params, w_shape)
}

/// Explicit padding smaller than the kernel, stride 1, dilation 1 (any groups).
fn unit_stride_form(params: &Conv2dParams, w_shape: &[usize]) -> bool {
    params.pad_mode == PadMode::Explicit
        && params.stride == [1, 1]
        && params.dilation == [1, 1]
        && w_shape.len() == 4
        && params.padding[0] < w_shape[2]
        && params.padding[1] < w_shape[3]
}

/// Whether a conv is depthwise with one output channel per input channel (`groups = C = O`,
/// weight `[C, 1, KH, KW]`) in [`unit_stride_form`]: its input gradient is the depthwise
/// conv of `dy` with the weight flipped in space.
fn depthwise_form(params: &Conv2dParams, w_shape: &[usize], channels: usize) -> bool {
    unit_stride_form(params, w_shape)
        && params.groups == channels
        && w_shape[0] == channels
        && w_shape[1] == 1
        && channels > 1
}

/// The input gradient of a conv2d (the `dx` of
/// [`crate::reference::conv2d::conv2d_backward`]), as [`super::conv2d::conv2d_backward_input`]
/// computes it, but for stride-1, undilated, ungrouped convs as a forward convolution
/// through [`super::conv2d::conv2d`]'s fast kernels: `dx = conv2d(dy, w')` with `w'` the
/// weight flipped in space with input and output channels swapped, and padding `K − 1 − p`.
/// Other settings use the gather kernel. Matches the reference up to summation order.
///
/// Errors: those of [`super::conv2d::conv2d_backward_input`].
pub fn conv2d_input_grad(
    ctx: &GpuContext,
    dy: &GpuTensor,
    w: &GpuTensor,
    params: &Conv2dParams,
    x_shape: [usize; 4],
) -> Result<GpuTensor> {
    conv2d_input_grad_impl(ctx, dy, w, params, x_shape, GradKernel::Auto, None)
}

/// [`conv2d_input_grad`] writing into `dx` (an `f32` tensor of shape `x_shape` with its own
/// buffer, see [`super::check_output`]).
///
/// Errors: those of [`conv2d_input_grad`] and [`super::check_output`].
pub fn conv2d_input_grad_into(
    ctx: &GpuContext,
    dy: &GpuTensor,
    w: &GpuTensor,
    params: &Conv2dParams,
    x_shape: [usize; 4],
    dx: &GpuTensor,
) -> Result<()> {
    conv2d_input_grad_impl(ctx, dy, w, params, x_shape, GradKernel::Auto, Some(dx)).map(drop)
}

/// [`conv2d_input_grad`] with the kernels chosen by `kernel`: for stride-1, undilated,
/// ungrouped convs [`GradKernel::Subgroup`] computes the column matrix `Wᵀ·dy` per image
/// with the subgroup matmul and adds it back into `dx` (`col2im`); [`GradKernel::Portable`]
/// runs the flipped-weight forward convolution. Other settings use the gather kernel either
/// way.
///
/// Errors: those of [`conv2d_input_grad`]; [`Error::InvalidArgument`] for
/// [`GradKernel::Subgroup`] on a device without subgroups.
pub fn conv2d_input_grad_with(
    ctx: &GpuContext,
    dy: &GpuTensor,
    w: &GpuTensor,
    params: &Conv2dParams,
    x_shape: [usize; 4],
    kernel: GradKernel,
) -> Result<GpuTensor> {
    conv2d_input_grad_impl(ctx, dy, w, params, x_shape, kernel, None)
}

/// [`conv2d_input_grad_with`] writing into `dx` (as [`conv2d_input_grad_into`]).
///
/// Errors: those of [`conv2d_input_grad_with`] and [`super::check_output`].
pub fn conv2d_input_grad_with_into(
    ctx: &GpuContext,
    dy: &GpuTensor,
    w: &GpuTensor,
    params: &Conv2dParams,
    x_shape: [usize; 4],
    kernel: GradKernel,
    dx: &GpuTensor,
) -> Result<()> {
    conv2d_input_grad_impl(ctx, dy, w, params, x_shape, kernel, Some(dx)).map(drop)
}

/// A conv gradient by the general kernels of [`super::conv2d`] (the settings the fast paths
/// do not take), into `given` when given.
fn grad_fallback(
    given: Option<&GpuTensor>,
    into: impl FnOnce(&GpuTensor) -> Result<()>,
    new: impl FnOnce() -> Result<GpuTensor>,
) -> Result<GpuTensor> {
    match given {
        Some(out) => {
            into(out)?;
            Ok(out.clone())
        }
        None => new(),
    }
}

/// The checks of a conv gradient's fast paths (both operands of `ctx`, `f32`) and its
/// output `conv2d_backward <what>` of `shape` (`given`, or a new tensor).
fn grad_output(
    ctx: &GpuContext,
    (name, operand): (&str, &GpuTensor),
    dy: &GpuTensor,
    what: &str,
    given: Option<&GpuTensor>,
    shape: &[usize],
) -> Result<GpuTensor> {
    ctx.check_tensors(&[(name, operand), ("conv2d_backward dy", dy)])?;
    expect_f32(name, operand)?;
    expect_f32("conv2d_backward dy", dy)?;
    output(
        ctx,
        &format!("conv2d_backward {what}"),
        given,
        shape,
        DType::F32,
        &[operand, dy],
    )
}

fn conv2d_input_grad_impl(
    ctx: &GpuContext,
    dy: &GpuTensor,
    w: &GpuTensor,
    params: &Conv2dParams,
    x_shape: [usize; 4],
    kernel: GradKernel,
    given: Option<&GpuTensor>,
) -> Result<GpuTensor> {
    let sg = kernel.subgroup(ctx)?;
    let out = params.output_shape(&x_shape, w.shape())?;
    let depthwise = depthwise_form(params, w.shape(), x_shape[1]);
    if dy.shape() != out || !(forward_form(params, w.shape()) || depthwise) {
        return grad_fallback(
            given,
            |dx| super::conv2d::conv2d_backward_input_into(ctx, dy, w, params, x_shape, dx),
            || super::conv2d::conv2d_backward_input(ctx, dy, w, params, x_shape),
        );
    }
    // Every path below writes each element of dx.
    let dx = grad_output(ctx, ("conv2d weight", w), dy, "dx", given, &x_shape)?;
    // Where dx and dy have the same plane ("same" padding), the flipped-weight forward conv
    // computes no padded tap more than the forward did and runs the tuned conv kernels
    // (2.8× the subgroup matmul at 1×64×56×56 on lavapipe); other planes (a valid conv's
    // gradient would pad dy by K − 1) keep the column matrix.
    let same_plane = out[2] == x_shape[2] && out[3] == x_shape[3];
    if sg && !same_plane && !depthwise && conv_dgrad_sg(ctx, dy, w, params, x_shape, &dx)? {
        return Ok(dx);
    }
    let [o, c, kh, kw] = <[usize; 4]>::try_from(w.shape())
        .map_err(|_| Error::invalid("internal: conv weight rank"))?;
    let p = Conv2dParams {
        padding: [kh - 1 - params.padding[0], kw - 1 - params.padding[1]],
        groups: params.groups,
        ..Conv2dParams::default()
    };
    // Depthwise: the flipped weight keeps its [C, 1, KH, KW] layout (a [1, C, KH, KW]
    // transpose holds the same elements in the same order).
    let wt_shape = if depthwise {
        [o, c, kh, kw]
    } else {
        [c, o, kh, kw]
    };
    let got = p.output_shape(dy.shape(), &wt_shape)?;
    if got != x_shape {
        return Err(Error::invalid(format!(
            "internal: conv input gradient {got:?}, expected {x_shape:?}"
        )));
    }
    let wt = flip_transpose(ctx, w)?.reshape(&wt_shape)?;
    let none = super::conv2d::ConvEpilogue::none();
    super::conv2d::conv2d_into(ctx, dy, &wt, &p, &none, &dx)?;
    Ok(dx)
}

/// The weight gradient of a conv2d (the `dweight` of
/// [`crate::reference::conv2d::conv2d_backward`]), as
/// [`super::conv2d::conv2d_backward_weight`] computes it, but for stride-1, undilated,
/// ungrouped convs as a forward convolution through [`super::conv2d::conv2d`]'s fast kernels:
/// with `x` seen as `[C, N, H, W]` and `dy` as an `[O, N, OH, OW]` weight,
/// `dweight[o, c] = conv2d(x', dy')[c, o]` (padding `p`), then transposed back. Other
/// settings use the reduction kernel. Matches the reference up to summation order.
///
/// Errors: those of [`super::conv2d::conv2d_backward_weight`].
pub fn conv2d_weight_grad(
    ctx: &GpuContext,
    x: &GpuTensor,
    dy: &GpuTensor,
    params: &Conv2dParams,
    w_shape: [usize; 4],
) -> Result<GpuTensor> {
    conv2d_weight_grad_impl(ctx, x, dy, params, w_shape, GradKernel::Auto, None)
}

/// [`conv2d_weight_grad`] writing into `dweight` (an `f32` tensor of shape `w_shape` with
/// its own buffer, see [`super::check_output`]).
///
/// Errors: those of [`conv2d_weight_grad`] and [`super::check_output`].
pub fn conv2d_weight_grad_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    dy: &GpuTensor,
    params: &Conv2dParams,
    w_shape: [usize; 4],
    dweight: &GpuTensor,
) -> Result<()> {
    conv2d_weight_grad_impl(ctx, x, dy, params, w_shape, GradKernel::Auto, Some(dweight)).map(drop)
}

/// [`conv2d_weight_grad`] with the kernels chosen by `kernel`: for ungrouped convs with
/// explicit padding (any stride and dilation) [`GradKernel::Subgroup`] runs an implicit GEMM
/// (`dweight[o, (c, ky, kx)] = Σ dy[n, o, oy, ox] · x[n, c, iy, ix]`, rows of `dy` shared by
/// subgroup broadcast); [`GradKernel::Portable`] the transposed forward convolution for
/// stride-1 convs. Other settings use the reduction kernel either way.
///
/// Errors: those of [`conv2d_weight_grad`]; [`Error::InvalidArgument`] for
/// [`GradKernel::Subgroup`] on a device without subgroups.
pub fn conv2d_weight_grad_with(
    ctx: &GpuContext,
    x: &GpuTensor,
    dy: &GpuTensor,
    params: &Conv2dParams,
    w_shape: [usize; 4],
    kernel: GradKernel,
) -> Result<GpuTensor> {
    conv2d_weight_grad_impl(ctx, x, dy, params, w_shape, kernel, None)
}

/// [`conv2d_weight_grad_with`] writing into `dweight` (as [`conv2d_weight_grad_into`]).
///
/// Errors: those of [`conv2d_weight_grad_with`] and [`super::check_output`].
pub fn conv2d_weight_grad_with_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    dy: &GpuTensor,
    params: &Conv2dParams,
    w_shape: [usize; 4],
    kernel: GradKernel,
    dweight: &GpuTensor,
) -> Result<()> {
    conv2d_weight_grad_impl(ctx, x, dy, params, w_shape, kernel, Some(dweight)).map(drop)
}

fn conv2d_weight_grad_impl(
    ctx: &GpuContext,
    x: &GpuTensor,
    dy: &GpuTensor,
    params: &Conv2dParams,
    w_shape: [usize; 4],
    kernel: GradKernel,
    given: Option<&GpuTensor>,
) -> Result<GpuTensor> {
    let sg = kernel.subgroup(ctx)?;
    let out = params.output_shape(x.shape(), &w_shape)?;
    let sg_form = sg
        && params.pad_mode == PadMode::Explicit
        && params.groups == 1
        && w_shape[1] == x.shape()[1];
    let dw3 = depthwise_form(params, &w_shape, x.shape()[1]) && w_shape[2..] == [3, 3];
    if dy.shape() != out || !(sg_form || dw3 || forward_form(params, &w_shape)) {
        return grad_fallback(
            given,
            |dw| super::conv2d::conv2d_backward_weight_into(ctx, x, dy, params, w_shape, dw),
            || super::conv2d::conv2d_backward_weight(ctx, x, dy, params, w_shape),
        );
    }
    // Every path below writes each element of dweight.
    let dw = grad_output(ctx, ("conv2d input", x), dy, "dweight", given, &w_shape)?;
    if dw3 {
        conv_wgrad_dw3(ctx, x, dy, params, &dw)?;
        return Ok(dw);
    }
    if sg_form {
        if w_shape[2] == 3 && w_shape[3] == 3 && params.stride[1] == 1 && params.dilation[1] == 1 {
            conv_wgrad3_sg(ctx, x, dy, params, w_shape, &dw)?;
        } else {
            conv_wgrad_sg(ctx, x, dy, params, w_shape, &dw)?;
        }
        return Ok(dw);
    }
    let [o, c, kh, kw] = w_shape;
    let p = Conv2dParams {
        padding: params.padding,
        ..Conv2dParams::default()
    };
    let xs = x.shape();
    let g_shape = p.output_shape(&[xs[1], xs[0], xs[2], xs[3]], &[o, out[0], out[2], out[3]])?;
    if g_shape != [c, o, kh, kw] {
        return Err(Error::invalid(format!(
            "internal: conv weight gradient {g_shape:?}, expected {:?}",
            [c, o, kh, kw]
        )));
    }
    let xt = swap01(ctx, x)?;
    let dyt = swap01(ctx, dy)?;
    let g = super::conv2d::conv2d(ctx, &xt, &dyt, &p, &super::conv2d::ConvEpilogue::none())?;
    swap01_into(ctx, &g, &dw)?;
    Ok(dw)
}

/// The subgroup matmuls of the training backward (`shaders/matmul_sg.wgsl`): a module of its
/// own, since only devices with [`wgpu::Features::SUBGROUP`] can compile it.
pub(super) static SG_SHADER: Shader = Shader {
    name: "matmul_sg",
    source: concat!(
        include_str!("../../shaders/lib/float_bits.wgsl"),
        include_str!("../../shaders/lib/activation.wgsl"),
        include_str!("../../shaders/matmul_sg.wgsl")
    ),
};

const SG_BINDINGS: &[Binding] = &[
    Binding::uniform(0),
    Binding::read(1),
    Binding::read(2),
    Binding::read_write(3),
    Binding::read(4),
];

static MATMUL_SG: Kernel = Kernel {
    shader: &SG_SHADER,
    entry_point: "matmul_sg",
    bindings: SG_BINDINGS,
};

static CONV_WGRAD_SG: Kernel = Kernel {
    shader: &SG_SHADER,
    entry_point: "conv_wgrad_sg",
    bindings: SG_BINDINGS,
};

static CONV_WGRAD3_SG2: Kernel = Kernel {
    shader: &SG_SHADER,
    entry_point: "conv_wgrad3_sg2",
    bindings: SG_BINDINGS,
};

static CONV_WGRAD3_SG4: Kernel = Kernel {
    shader: &SG_SHADER,
    entry_point: "conv_wgrad3_sg4",
    bindings: SG_BINDINGS,
};

/// The sliding-window 3×3 weight gradient for an output `ow` columns wide: four columns per
/// step where they tile the row, else two (`shaders/matmul_sg.wgsl` has the measurements).
fn wgrad3_kernel(ow: usize) -> &'static Kernel {
    if ow.is_multiple_of(4) {
        &CONV_WGRAD3_SG4
    } else {
        &CONV_WGRAD3_SG2
    }
}

static COL2IM: Kernel = Kernel {
    shader: &SG_SHADER,
    entry_point: "col2im",
    bindings: &[
        Binding::uniform(0),
        Binding::read(1),
        Binding::read_write(3),
    ],
};

/// Rows × columns of one `matmul_sg` / `conv_wgrad_sg` invocation's tile.
const SG_TILE: [usize; 2] = [16, 4];

/// The uniform of `matmul_sg.wgsl` (same field order).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
struct SgParams {
    rows: u32,
    cols: u32,
    kin: u32,
    kout: u32,
    a_bs: u32,
    a_rs: u32,
    a_cs: u32,
    a_ko: u32,
    b_bs: u32,
    b_rs: u32,
    b_cs: u32,
    b_ko: u32,
    mtiles: u32,
    ctiles: u32,
    count: u32,
    bias_mode: u32,
    act: u32,
    slope: f32,
    c: u32,
    h: u32,
    w: u32,
    oh: u32,
    ow: u32,
    kh: u32,
    kw: u32,
    sh: u32,
    sw: u32,
    ph: u32,
    pw: u32,
    dh: u32,
    dw: u32,
    _pad0: u32,
}

/// Which kernels the training matmuls run: [`linear_backward_with`],
/// [`conv2d_input_grad_with`], [`conv2d_weight_grad_with`]. Results agree up to summation
/// order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum GradKernel {
    /// [`GradKernel::Subgroup`] where the device has subgroups
    /// ([`GpuContext::has_subgroups`]), else [`GradKernel::Portable`].
    #[default]
    Auto,
    /// Every device: the 4×4-tile strided matmul of `shaders/train.wgsl` and, for convs, the
    /// conv2d forward kernels on flipped / transposed operands.
    Portable,
    /// `shaders/matmul_sg.wgsl`: 16 rows × 4 columns per invocation with the rows of one
    /// operand loaded once per 8 lanes and shared by subgroup broadcast (several times
    /// faster on lavapipe, where every storage load is a per-lane loop). Needs a device with
    /// [`wgpu::Features::SUBGROUP`]; correct for any subgroup size.
    Subgroup,
}

impl GradKernel {
    /// Whether this choice runs the subgroup kernels on `ctx`.
    fn subgroup(self, ctx: &GpuContext) -> Result<bool> {
        match self {
            GradKernel::Auto => Ok(ctx.has_subgroups()),
            GradKernel::Portable => Ok(false),
            GradKernel::Subgroup if ctx.has_subgroups() => Ok(true),
            GradKernel::Subgroup => Err(Error::invalid(format!(
                "GradKernel::Subgroup: the device of {} was not created with \
                 wgpu::Features::SUBGROUP",
                ctx.name()
            ))),
        }
    }
}

/// Invocations per workgroup for `cols` columns: enough 4-column groups to cover them, a
/// multiple of 8 (whole subgroups on lavapipe), at most 64.
fn sg_workgroup(cols: usize) -> usize {
    cols.div_ceil(SG_TILE[1]).next_multiple_of(8).clamp(8, 64)
}

/// A strided, batched matmul for `matmul_sg` (see the shader header): `[batch, rows, cols]`
/// with a two-level reduction `kout × kin`, and each operand's strides `[batch, row (A) /
/// k (B), column (A) / column (B), k block]`.
#[derive(Debug, Clone, Copy)]
struct SgMatmul {
    batch: usize,
    rows: usize,
    cols: usize,
    kin: usize,
    kout: usize,
    /// A: `[batch, row, k, k block]` strides.
    a: [usize; 4],
    /// B: `[batch, k, column, k block]` strides.
    b: [usize; 4],
}

impl SgMatmul {
    /// The largest element index an operand with these strides reads, plus one.
    fn extent(&self, [bs, s1, s2, ko]: [usize; 4], d1: usize) -> Option<usize> {
        let last = |n: usize| n.checked_sub(1);
        let terms = [
            last(self.batch)?.checked_mul(bs)?,
            last(d1)?.checked_mul(s1)?,
            last(self.kin)?.checked_mul(s2)?,
            last(self.kout)?.checked_mul(ko)?,
        ];
        terms
            .iter()
            .try_fold(0usize, |acc, &t| acc.checked_add(t))?
            .checked_add(1)
    }

    /// The uniform and grid, after checking that every index fits the operands and `u32`.
    fn params(
        &self,
        ctx: &GpuContext,
        a_len: usize,
        b_len: usize,
        wg: usize,
    ) -> Result<(SgParams, [u32; 3])> {
        let fits =
            |s: [usize; 4], d1: usize, len: usize| self.extent(s, d1).is_some_and(|e| e <= len);
        // A is indexed [batch, row, k]; B [batch, k, column] with its column stride second.
        let b_for_extent = [self.b[0], self.b[2], self.b[1], self.b[3]];
        if !fits(self.a, self.rows, a_len) || !fits(b_for_extent, self.cols, b_len) {
            return Err(Error::invalid(
                "internal: a training matmul reads past its operands",
            ));
        }
        let out = self
            .batch
            .checked_mul(self.rows)
            .and_then(|v| v.checked_mul(self.cols))
            .ok_or_else(|| Error::invalid("training matmul: output size overflows"))?;
        to_u32(out, "training matmul output size")?;
        to_u32(a_len, "training matmul operand size")?;
        to_u32(b_len, "training matmul operand size")?;
        let mtiles = self.rows.div_ceil(SG_TILE[0]);
        let ctiles = self.cols.div_ceil(SG_TILE[1] * wg);
        let count = self
            .batch
            .checked_mul(mtiles)
            .and_then(|v| v.checked_mul(ctiles))
            .ok_or_else(|| Error::invalid("training matmul: tile count overflows"))?;
        let u = |v: usize| to_u32(v, "training matmul size");
        let p = SgParams {
            rows: u(self.rows)?,
            cols: u(self.cols)?,
            kin: u(self.kin)?,
            kout: u(self.kout)?,
            a_bs: u(self.a[0])?,
            a_rs: u(self.a[1])?,
            a_cs: u(self.a[2])?,
            a_ko: u(self.a[3])?,
            b_bs: u(self.b[0])?,
            b_rs: u(self.b[1])?,
            b_cs: u(self.b[2])?,
            b_ko: u(self.b[3])?,
            mtiles: u(mtiles)?,
            ctiles: u(ctiles)?,
            count: u(count)?,
            ..SgParams::default()
        };
        Ok((p, ctx.grid_1d(count, 1)?))
    }
}

fn sg_constants(wg: usize) -> [(&'static str, f64); 1] {
    [("MM_WG", wg as f64)]
}

/// Runs `matmul_sg` for `m` into a new `[batch·rows, cols]`-element tensor of `shape`.
fn matmul_sg(
    ctx: &GpuContext,
    a: &GpuTensor,
    b: &GpuTensor,
    m: SgMatmul,
    shape: &[usize],
) -> Result<GpuTensor> {
    let out = GpuTensor::uninit(ctx, shape, DType::F32)?;
    matmul_sg_into(ctx, a, b, m, None, Activation::None, &out)?;
    Ok(out)
}

/// `matmul_sg` for `m` into `out` (`batch·rows·cols` elements), with a bias per column
/// (`[cols]`) and an activation in the epilogue.
fn matmul_sg_into(
    ctx: &GpuContext,
    a: &GpuTensor,
    b: &GpuTensor,
    m: SgMatmul,
    bias: Option<&GpuTensor>,
    act: Activation,
    out: &GpuTensor,
) -> Result<()> {
    let wg = sg_workgroup(m.cols);
    let (mut p, workgroups) = m.params(ctx, a.len(), b.len(), wg)?;
    if out.len() != m.batch * m.rows * m.cols {
        return Err(Error::invalid("internal: training matmul output shape"));
    }
    if let Some(bias) = bias {
        if bias.len() != m.cols {
            return Err(Error::invalid("internal: matmul bias length"));
        }
        p.bias_mode = 1;
    }
    p.act = super::activation::code(act);
    p.slope = super::activation::slope(act);
    let uniform = ctx.params(&p)?;
    let constants = sg_constants(wg);
    let bias = bias.map_or(b.buffer(), |t| t.buffer());
    ctx.run(&[Launch {
        kernel: &MATMUL_SG,
        constants: &constants,
        buffers: &[&uniform, a.buffer(), b.buffer(), out.buffer(), bias],
        workgroups,
    }])
}

/// `y = act(x · Wᵀ + b)` for `x` `[N, in]`, `w` `[out, in]`, `bias` `[out]` into `y`
/// `[N, out]` with the subgroup matmul (the caller checked shapes, types and `y`): the linear
/// forward on CPU adapters with subgroups ([`super::linear`]).
pub(crate) fn linear_sg_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    w: &GpuTensor,
    bias: Option<&GpuTensor>,
    act: Activation,
    y: &GpuTensor,
) -> Result<()> {
    let [n, inp] = <[usize; 2]>::try_from(x.shape())
        .map_err(|_| Error::invalid("internal: linear input rank"))?;
    let out = w.shape()[0];
    let m = SgMatmul {
        batch: 1,
        rows: n,
        cols: out,
        kin: inp,
        kout: 1,
        a: [0, inp, 1, 0],
        b: [0, 1, inp, 0],
    };
    matmul_sg_into(ctx, x, w, m, bias, act, y)
}

/// The conv weight gradient as `conv_wgrad_sg` (groups 1, explicit padding) into `out`
/// (`[O, C, KH, KW]`, checked by the caller).
fn conv_wgrad_sg(
    ctx: &GpuContext,
    x: &GpuTensor,
    dy: &GpuTensor,
    params: &Conv2dParams,
    w_shape: [usize; 4],
    out: &GpuTensor,
) -> Result<()> {
    let [n, c, h, w] = <[usize; 4]>::try_from(x.shape())
        .map_err(|_| Error::invalid("internal: conv input rank"))?;
    let [o, _, kh, kw] = w_shape;
    let [_, _, oh, ow] =
        <[usize; 4]>::try_from(dy.shape()).map_err(|_| Error::invalid("internal: conv dy rank"))?;
    let ohw = oh * ow;
    let cols = c * kh * kw;
    // A = dy: row o at o·OH·OW, pixel stride 1, image n at n·O·OH·OW (the k blocks).
    let m = SgMatmul {
        batch: 1,
        rows: o,
        cols,
        kin: ohw,
        kout: n,
        a: [0, ohw, 1, o * ohw],
        b: [0, 0, 0, 0],
    };
    let wg = sg_workgroup(cols);
    let (mut p, workgroups) = m.params(ctx, dy.len(), 1, wg)?;
    to_u32(x.len(), "conv2d input element count")?;
    let u = |v: usize| to_u32(v, "conv2d size");
    p.c = u(c)?;
    p.h = u(h)?;
    p.w = u(w)?;
    p.oh = u(oh)?;
    p.ow = u(ow)?;
    p.kh = u(kh)?;
    p.kw = u(kw)?;
    p.sh = u(params.stride[0])?;
    p.sw = u(params.stride[1])?;
    p.ph = u(params.padding[0])?;
    p.pw = u(params.padding[1])?;
    p.dh = u(params.dilation[0])?;
    p.dw = u(params.dilation[1])?;
    check_tap_reach(params, oh, ow, kh, kw)?;
    if out.shape() != w_shape {
        return Err(Error::invalid(
            "internal: conv weight gradient output shape",
        ));
    }
    let uniform = ctx.params(&p)?;
    let constants = sg_constants(wg);
    ctx.run(&[Launch {
        kernel: &CONV_WGRAD_SG,
        constants: &constants,
        buffers: &[&uniform, dy.buffer(), x.buffer(), out.buffer(), x.buffer()],
        workgroups,
    }])
}

/// The weight gradient of a depthwise 3×3 conv ([`depthwise_form`]) as `conv_wgrad_dw3`
/// into `out` (`[C, 1, 3, 3]`, checked by the caller): one invocation per channel, a window
/// of 3 inputs sliding along each input row. Workgroups of 8, so the channels spread over a
/// CPU adapter's threads.
fn conv_wgrad_dw3(
    ctx: &GpuContext,
    x: &GpuTensor,
    dy: &GpuTensor,
    params: &Conv2dParams,
    out: &GpuTensor,
) -> Result<()> {
    let [n, c, h, w] = <[usize; 4]>::try_from(x.shape())
        .map_err(|_| Error::invalid("internal: conv input rank"))?;
    let [_, _, oh, ow] =
        <[usize; 4]>::try_from(dy.shape()).map_err(|_| Error::invalid("internal: conv dy rank"))?;
    check_tap_reach(params, oh, ow, 3, 3)?;
    to_u32(x.len(), "conv2d input element count")?;
    to_u32(dy.len(), "conv2d_backward dy element count")?;
    let u = |v: usize| to_u32(v, "conv2d size");
    let p = Params {
        count: u(c)?,
        inner: u(n)?,
        h: u(h)?,
        w: u(w)?,
        oh: u(oh)?,
        ow: u(ow)?,
        a_rs: u(params.padding[0])?,
        a_cs: u(params.padding[1])?,
        ..Params::default()
    };
    let uniform = ctx.params(&p)?;
    let wg = 8u32;
    ctx.run(&[Launch {
        kernel: &CONV_WGRAD_DW3,
        constants: &[("WG", f64::from(wg))],
        buffers: &[&uniform, x.buffer(), dy.buffer(), out.buffer()],
        workgroups: ctx.grid_1d(c, wg)?,
    }])
}

/// Input channels per invocation of `conv_wgrad3_sg2` / `conv_wgrad3_sg4`.
const WGRAD3_CHANNELS: usize = 2;

/// Every tap index `o·S + k·D + P` along both axes fits `i32` (the shaders compute them so).
fn check_tap_reach(
    params: &Conv2dParams,
    oh: usize,
    ow: usize,
    kh: usize,
    kw: usize,
) -> Result<()> {
    for (out_len, s, k, d, pad) in [
        (
            oh,
            params.stride[0],
            kh,
            params.dilation[0],
            params.padding[0],
        ),
        (
            ow,
            params.stride[1],
            kw,
            params.dilation[1],
            params.padding[1],
        ),
    ] {
        let reach = out_len
            .checked_mul(s)
            .and_then(|v| v.checked_add(k.checked_mul(d)?))
            .and_then(|v| v.checked_add(pad));
        if reach.is_none_or(|r| r > i32::MAX as usize) {
            return Err(Error::invalid("conv2d weight gradient: sizes exceed i32"));
        }
    }
    Ok(())
}

/// The weight gradient of a 3×3 conv with stride and dilation 1 along the width (groups 1,
/// explicit padding) as `conv_wgrad3_sg2` / `conv_wgrad3_sg4` ([`wgrad3_kernel`]) into `out`
/// (`[O, C, 3, 3]`, checked by the caller): 16 output channels × 2 input channels × 9 taps per
/// invocation, a window of input values sliding along each row, 2 or 4 columns per step.
fn conv_wgrad3_sg(
    ctx: &GpuContext,
    x: &GpuTensor,
    dy: &GpuTensor,
    params: &Conv2dParams,
    w_shape: [usize; 4],
    out: &GpuTensor,
) -> Result<()> {
    let [n, c, h, w] = <[usize; 4]>::try_from(x.shape())
        .map_err(|_| Error::invalid("internal: conv input rank"))?;
    let [o, _, kh, kw] = w_shape;
    let [_, _, oh, ow] =
        <[usize; 4]>::try_from(dy.shape()).map_err(|_| Error::invalid("internal: conv dy rank"))?;
    check_tap_reach(params, oh, ow, kh, kw)?;
    if out.shape() != w_shape {
        return Err(Error::invalid(
            "internal: conv weight gradient output shape",
        ));
    }
    to_u32(x.len(), "conv2d input element count")?;
    to_u32(dy.len(), "conv2d_backward dy element count")?;
    to_u32(out.len(), "conv2d weight element count")?;
    // One subgroup of lavapipe per workgroup: the channel tiles spread over its threads.
    let wg = 8;
    let mtiles = o.div_ceil(16);
    let ctiles = c.div_ceil(WGRAD3_CHANNELS * wg);
    let count = mtiles
        .checked_mul(ctiles)
        .ok_or_else(|| Error::invalid("conv2d weight gradient: tile count overflows"))?;
    let u = |v: usize| to_u32(v, "conv2d size");
    let p = SgParams {
        rows: u(o)?,
        cols: u(c)?,
        kout: u(n)?,
        a_ko: u(o * oh * ow)?,
        mtiles: u(mtiles)?,
        ctiles: u(ctiles)?,
        count: u(count)?,
        c: u(c)?,
        h: u(h)?,
        w: u(w)?,
        oh: u(oh)?,
        ow: u(ow)?,
        kh: u(kh)?,
        kw: u(kw)?,
        sh: u(params.stride[0])?,
        sw: u(params.stride[1])?,
        ph: u(params.padding[0])?,
        pw: u(params.padding[1])?,
        dh: u(params.dilation[0])?,
        dw: u(params.dilation[1])?,
        ..SgParams::default()
    };
    let uniform = ctx.params(&p)?;
    let constants = sg_constants(wg);
    ctx.run(&[Launch {
        kernel: wgrad3_kernel(ow),
        constants: &constants,
        buffers: &[&uniform, dy.buffer(), x.buffer(), out.buffer(), x.buffer()],
        workgroups: ctx.grid_1d(count, 1)?,
    }])
}

/// The conv input gradient as `matmul_sg` (`col = Wᵀ·dy` per image) and `col2im` (stride 1,
/// dilation 1, groups 1) into `dx` (`x_shape`, checked by the caller); `false` (nothing
/// launched) when the column matrix would exceed a storage binding.
fn conv_dgrad_sg(
    ctx: &GpuContext,
    dy: &GpuTensor,
    w: &GpuTensor,
    params: &Conv2dParams,
    x_shape: [usize; 4],
    dx: &GpuTensor,
) -> Result<bool> {
    let [n, c, h, wd] = x_shape;
    let [o, _, kh, kw] = <[usize; 4]>::try_from(w.shape())
        .map_err(|_| Error::invalid("internal: conv weight rank"))?;
    let [_, _, oh, ow] =
        <[usize; 4]>::try_from(dy.shape()).map_err(|_| Error::invalid("internal: conv dy rank"))?;
    let ohw = oh * ow;
    let ckk = c * kh * kw;
    let col_len = [n, ckk, ohw]
        .iter()
        .try_fold(1usize, |acc, &v| acc.checked_mul(v))
        .filter(|&l| (l as u64).saturating_mul(4) <= ctx.limits().max_storage_buffer_binding_size);
    if col_len.is_none() {
        return Ok(false);
    }
    if dx.shape() != x_shape {
        return Err(Error::invalid("internal: conv input gradient output shape"));
    }
    let m = SgMatmul {
        batch: n,
        rows: ckk,
        cols: ohw,
        kin: o,
        kout: 1,
        a: [0, 1, ckk, 0],
        b: [o * ohw, ohw, 1, 0],
    };
    let col = matmul_sg(ctx, w, dy, m, &[n, ckk, ohw])?;
    let u = |v: usize| to_u32(v, "conv2d size");
    let p = SgParams {
        count: u(dx.len())?,
        c: u(c)?,
        h: u(h)?,
        w: u(wd)?,
        oh: u(oh)?,
        ow: u(ow)?,
        kh: u(kh)?,
        kw: u(kw)?,
        ph: u(params.padding[0])?,
        pw: u(params.padding[1])?,
        ..SgParams::default()
    };
    let wg = 64;
    let uniform = ctx.params(&p)?;
    let constants = sg_constants(wg);
    ctx.run(&[Launch {
        kernel: &COL2IM,
        constants: &constants,
        buffers: &[&uniform, col.buffer(), dx.buffer()],
        workgroups: ctx.grid_1d(dx.len(), wg as u32)?,
    }])?;
    Ok(true)
}
