//! Activations on the GPU (`shaders/activation.wgsl`), bit-exact with
//! [`crate::reference::activation`]: identity, ReLU, ReLU6, LeakyReLU, forward and backward,
//! with PyTorch's NaN behaviour (NaN propagates forward; see the reference for the
//! gradients). Hardswish matches up to the accuracy of the device's f32 division (its `/ 6`
//! forward and `/ 3` backward; exact on devices with correctly rounded division).

use bytemuck::{Pod, Zeroable};

use super::{expect_f32, expect_shape, grid, output, to_u32, WG_CONSTANTS};
use crate::error::Result;
use crate::gpu::{Binding, DType, GpuContext, GpuTensor, Kernel, Launch, ParamsBuffer, Shader};
use crate::ops::Activation;

pub(super) static SHADER: Shader = Shader {
    name: "activation",
    source: concat!(
        include_str!("../../shaders/lib/float_bits.wgsl"),
        include_str!("../../shaders/lib/activation.wgsl"),
        include_str!("../../shaders/activation.wgsl")
    ),
};

static FORWARD: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "forward",
    bindings: &[
        Binding::uniform(0),
        Binding::read(1),
        Binding::read_write(2),
    ],
};

static BACKWARD: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "backward",
    bindings: &[
        Binding::uniform(0),
        Binding::read(1),
        Binding::read_write(2),
        Binding::read(3),
    ],
};

static FORWARD4: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "forward4",
    bindings: &[
        Binding::uniform(0),
        Binding::read(4),
        Binding::read_write(5),
    ],
};

static BACKWARD4: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "backward4",
    bindings: &[
        Binding::uniform(0),
        Binding::read(4),
        Binding::read_write(5),
        Binding::read(6),
    ],
};

/// `vec4`s per invocation of `forward4` / `backward4` (`ITEMS4` in the shader).
const ITEMS4: usize = 4;

/// The kernel of `n` elements, scalar or on `vec4`s (`n` a multiple of 4), and its grid.
fn launch_shape(
    ctx: &GpuContext,
    n: usize,
    scalar: &'static Kernel,
    vec4: &'static Kernel,
) -> Result<(&'static Kernel, [u32; 3])> {
    if n.is_multiple_of(4) {
        Ok((vec4, grid(ctx, (n / 4).div_ceil(ITEMS4))?))
    } else {
        Ok((scalar, grid(ctx, n)?))
    }
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    act: u32,
    slope: f32,
    _pad: u32,
}

/// The shader code of an activation, shared by `activation.wgsl`, `conv2d.wgsl` and
/// `batch_norm.wgsl`: 0 none, 1 ReLU, 2 ReLU6, 3 LeakyReLU, 4 Hardswish.
pub(crate) fn code(act: Activation) -> u32 {
    match act {
        Activation::None => 0,
        Activation::Relu => 1,
        Activation::Relu6 => 2,
        Activation::LeakyRelu { .. } => 3,
        Activation::Hardswish => 4,
    }
}

/// The LeakyReLU slope the shaders read (0 for every other activation).
pub(crate) fn slope(act: Activation) -> f32 {
    match act {
        Activation::LeakyRelu { negative_slope } => negative_slope,
        _ => 0.0,
    }
}

fn params(ctx: &GpuContext, x: &GpuTensor, act: Activation) -> Result<ParamsBuffer> {
    ctx.params(&Params {
        n: to_u32(x.len(), "activation element count")?,
        act: code(act),
        slope: slope(act),
        _pad: 0,
    })
}

/// Applies `act` elementwise (like [`crate::reference::activation::activation`]).
pub fn activation(ctx: &GpuContext, x: &GpuTensor, act: Activation) -> Result<GpuTensor> {
    activation_impl(ctx, x, act, None)
}

/// [`activation`] writing into `out` (an `f32` tensor of `x`'s shape with its own buffer,
/// see [`super::check_output`]).
pub fn activation_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    act: Activation,
    out: &GpuTensor,
) -> Result<()> {
    activation_impl(ctx, x, act, Some(out)).map(drop)
}

fn activation_impl(
    ctx: &GpuContext,
    x: &GpuTensor,
    act: Activation,
    out: Option<&GpuTensor>,
) -> Result<GpuTensor> {
    ctx.check_tensor("activation input", x)?;
    expect_f32("activation input", x)?;
    let uniform = params(ctx, x, act)?;
    let y = output(ctx, "activation output", out, x.shape(), DType::F32, &[x])?;
    let (kernel, workgroups) = launch_shape(ctx, x.len(), &FORWARD, &FORWARD4)?;
    ctx.run(&[Launch {
        kernel,
        constants: WG_CONSTANTS,
        buffers: &[&uniform, x.buffer(), y.buffer()],
        workgroups,
    }])?;
    Ok(y)
}

/// Gradient of [`activation`] at `x` for upstream `dy` (like
/// [`crate::reference::activation::activation_backward`]).
///
/// Errors: [`crate::Error::ShapeMismatch`] when `dy`'s shape is not `x`'s.
pub fn activation_backward(
    ctx: &GpuContext,
    x: &GpuTensor,
    dy: &GpuTensor,
    act: Activation,
) -> Result<GpuTensor> {
    activation_backward_impl(ctx, x, dy, act, None)
}

/// [`activation_backward`] writing into `dx` (an `f32` tensor of `x`'s shape with its own
/// buffer, see [`super::check_output`]).
pub fn activation_backward_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    dy: &GpuTensor,
    act: Activation,
    dx: &GpuTensor,
) -> Result<()> {
    activation_backward_impl(ctx, x, dy, act, Some(dx)).map(drop)
}

fn activation_backward_impl(
    ctx: &GpuContext,
    x: &GpuTensor,
    dy: &GpuTensor,
    act: Activation,
    out: Option<&GpuTensor>,
) -> Result<GpuTensor> {
    ctx.check_tensors(&[("activation input", x), ("activation_backward dy", dy)])?;
    expect_shape("activation_backward (dy vs x)", x.shape(), dy)?;
    expect_f32("activation input", x)?;
    expect_f32("activation_backward dy", dy)?;
    let uniform = params(ctx, x, act)?;
    let dx = output(
        ctx,
        "activation_backward dx",
        out,
        x.shape(),
        DType::F32,
        &[x, dy],
    )?;
    let (kernel, workgroups) = launch_shape(ctx, x.len(), &BACKWARD, &BACKWARD4)?;
    ctx.run(&[Launch {
        kernel,
        constants: WG_CONSTANTS,
        buffers: &[&uniform, x.buffer(), dx.buffer(), dy.buffer()],
        workgroups,
    }])?;
    Ok(dx)
}
