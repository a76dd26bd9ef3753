//! Fake quantization on the GPU (`shaders/fake_quant.wgsl`), bit-exact with
//! [`crate::reference::fake_quant`].
//!
//! The quantization parameters live on the GPU as a [`GpuQParams`] (scale, `1/scale` and
//! zero point per channel in one buffer), whether they were uploaded from host values
//! ([`GpuQParams::upload`], `1/scale` computed once on the host in f32) or computed on the
//! GPU by [`crate::kernels::observer::observe`] — so QAT chains observe → fake-quant with no
//! host round trip.

use bytemuck::{Pod, Zeroable};

use super::{expect_f32, expect_shape, grid, to_u32, WG_CONSTANTS};
use crate::error::{Error, Result};
use crate::gpu::{Binding, DType, GpuContext, GpuTensor, Kernel, Launch, Shader};
use crate::quant::{QParams, QuantRange};

static SHADER: Shader = Shader {
    name: "fake_quant",
    source: include_str!("../../shaders/fake_quant.wgsl"),
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

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    inner: u32,
    channels: u32,
    quant_min: i32,
    quant_max: i32,
    _pad: [u32; 3],
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
            Some(axis) if axis >= shape.len() => Err(Error::AxisOutOfRange {
                axis,
                rank: shape.len(),
            }),
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
        Ok(Params {
            n: to_u32(x.len(), "fake_quant element count")?,
            inner: to_u32(inner.max(1), "fake_quant inner size")?,
            channels: to_u32(self.channels(), "fake_quant channels")?,
            quant_min: range.quant_min,
            quant_max: range.quant_max,
            _pad: [0; 3],
        })
    }
}

fn prepare(
    ctx: &GpuContext,
    x: &GpuTensor,
    qp: &GpuQParams,
    range: QuantRange,
) -> Result<(wgpu::Buffer, [u32; 3])> {
    expect_f32("fake_quant input", x)?;
    qp.validate(x.shape(), range)?;
    let params = qp.params(x, range)?;
    let grid = grid(ctx, x.len())?;
    Ok((ctx.uniform(&params)?, grid))
}

/// Fake-quantizes `x` (`torch.fake_quantize_per_{tensor,channel}_affine`), bit-exact with
/// [`crate::reference::fake_quant::fake_quantize`]; NaN propagates.
pub fn fake_quant(
    ctx: &GpuContext,
    x: &GpuTensor,
    qp: &GpuQParams,
    range: QuantRange,
) -> Result<GpuTensor> {
    let (uniform, workgroups) = prepare(ctx, x, qp, range)?;
    let y = GpuTensor::zeros(ctx, x.shape(), DType::F32)?;
    ctx.run(&[Launch {
        kernel: &FORWARD,
        constants: WG_CONSTANTS,
        buffers: &[&uniform, x.buffer(), qp.data.buffer(), y.buffer()],
        workgroups,
    }])?;
    Ok(y)
}

/// Fake-quantizes `x` and also returns the straight-through mask (1.0 where
/// `quant_min <= round(x/scale) + zp <= quant_max`, else 0.0; 0.0 for NaN).
pub fn fake_quant_with_mask(
    ctx: &GpuContext,
    x: &GpuTensor,
    qp: &GpuQParams,
    range: QuantRange,
) -> Result<(GpuTensor, GpuTensor)> {
    let (uniform, workgroups) = prepare(ctx, x, qp, range)?;
    let y = GpuTensor::zeros(ctx, x.shape(), DType::F32)?;
    let mask = GpuTensor::zeros(ctx, x.shape(), DType::F32)?;
    ctx.run(&[Launch {
        kernel: &FORWARD_MASK,
        constants: WG_CONSTANTS,
        buffers: &[
            &uniform,
            x.buffer(),
            qp.data.buffer(),
            y.buffer(),
            mask.buffer(),
        ],
        workgroups,
    }])?;
    Ok((y, mask))
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
    let (uniform, workgroups) = prepare(ctx, x, qp, range)?;
    let dx = GpuTensor::zeros(ctx, x.shape(), DType::F32)?;
    ctx.run(&[Launch {
        kernel: &BACKWARD,
        constants: WG_CONSTANTS,
        buffers: &[
            &uniform,
            x.buffer(),
            qp.data.buffer(),
            dx.buffer(),
            dy.buffer(),
        ],
        workgroups,
    }])?;
    Ok(dx)
}
