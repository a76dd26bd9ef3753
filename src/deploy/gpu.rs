//! [`GpuIntModel`]: an [`IntModel`] prepared once for one GPU, whose forward keeps every
//! intermediate value on the device (packed int8 codes, [`GpuInt8Tensor`]) and downloads only
//! the output codes.
//!
//! [`IntModel::forward`] on a [`crate::GpuBackend`] goes through the host-level
//! [`crate::HostOps`] interface: every op uploads its codes and weights, runs and downloads.
//! Here the weights are packed and uploaded once ([`GpuConv2dInt8`], [`GpuLinearInt8`]), and
//! a forward records quantize → conv / linear / max pool / add / flatten (a repack kernel)
//! → ... on the device. The result is bit-identical to [`IntModel::forward`] on the CPU
//! reference, for both [`crate::quant::RequantMode`]s and both [`Int8Dot`] paths, and bad
//! input gives the CPU path's errors, in its order (a NaN in the input first, then the
//! first layer whose input shape does not fit).

use std::sync::Arc;

use ndarray::ArrayD;

use super::convert::{IntLayer, IntModel};
use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor, Int8Dot};
use crate::kernels::int8::{self as k8, GpuConv2dInt8, GpuInt8Tensor, GpuLinearInt8, GpuQuantized};
use crate::kernels::GpuQParams;
use crate::quant::{AddRequant, QuantRange};

/// One node, prepared.
#[derive(Debug, Clone)]
enum GpuLayer {
    Conv(GpuConv2dInt8),
    Linear(GpuLinearInt8),
    MaxPool2d { kernel: usize, stride: usize },
    Flatten,
    Add(AddRequant),
}

#[derive(Debug, Clone)]
struct GpuNode {
    name: String,
    layer: GpuLayer,
    inputs: Vec<usize>,
}

/// An [`IntModel`] prepared for a GPU: weights packed and uploaded once, every forward on
/// device-resident codes.
///
/// ```no_run
/// # fn demo(model: &qfuse::deploy::IntModel, x: &ndarray::ArrayD<f32>) -> qfuse::Result<()> {
/// use std::sync::Arc;
/// use qfuse::deploy::GpuIntModel;
/// use qfuse::gpu::GpuContext;
///
/// let ctx = Arc::new(GpuContext::new()?); // or GpuContext::from_device(device, queue)
/// let gpu_model = GpuIntModel::new(model, ctx)?;
/// let codes = gpu_model.forward(x)?; // = model.forward(&qfuse::CpuBackend, x)
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct GpuIntModel {
    ctx: Arc<GpuContext>,
    nodes: Vec<GpuNode>,
    /// The input's qparams on the device.
    input_qp: GpuQParams,
    range: QuantRange,
    output: usize,
    /// For each value, the last node reading it (`None`: never read); a value is dropped
    /// after its last reader ran, unless it is the output.
    last_use: Vec<Option<usize>>,
    dot: Option<Int8Dot>,
    model: IntModel,
}

impl GpuIntModel {
    /// Prepares `model` on `ctx`: validates it ([`IntModel::validate`]), packs and uploads
    /// every conv and linear weight with its folded bias and requantization
    /// ([`GpuConv2dInt8::new`], [`GpuLinearInt8::new`]) and the input's qparams. Runs with the
    /// context's dot-product path ([`GpuContext::int8_dot`]) unless
    /// [`GpuIntModel::with_dot`] picks one.
    ///
    /// Errors: an invalid model, the prepared layers' checks, GPU errors.
    pub fn new(model: &IntModel, ctx: Arc<GpuContext>) -> Result<Self> {
        model.validate()?;
        let mut nodes = Vec::with_capacity(model.nodes.len());
        for node in &model.nodes {
            let zp_in = model.values[node.inputs[0]].zero_point[0];
            let layer = match &node.layer {
                IntLayer::Conv {
                    weight,
                    bias,
                    params,
                    requant,
                    ..
                } => GpuLayer::Conv(GpuConv2dInt8::new(
                    &ctx,
                    zp_in,
                    weight,
                    bias.as_ref(),
                    params,
                    requant,
                )?),
                IntLayer::Linear {
                    weight,
                    bias,
                    requant,
                    ..
                } => GpuLayer::Linear(GpuLinearInt8::new(
                    &ctx,
                    zp_in,
                    weight,
                    bias.as_ref(),
                    requant,
                )?),
                IntLayer::MaxPool2d { kernel, stride } => GpuLayer::MaxPool2d {
                    kernel: *kernel,
                    stride: *stride,
                },
                IntLayer::Flatten => GpuLayer::Flatten,
                IntLayer::Add { add, .. } => {
                    add.validate()?;
                    GpuLayer::Add(*add)
                }
            };
            nodes.push(GpuNode {
                name: node.name.clone(),
                layer,
                inputs: node.inputs.clone(),
            });
        }
        let mut last_use = vec![None; model.values.len()];
        for (i, node) in model.nodes.iter().enumerate() {
            for &v in &node.inputs {
                last_use[v] = Some(i);
            }
        }
        Ok(Self {
            input_qp: GpuQParams::upload(&ctx, &model.values[0])?,
            range: model.activation_range,
            output: model.output,
            last_use,
            dot: None,
            model: model.clone(),
            nodes,
            ctx,
        })
    }

    /// This model with an explicit dot-product path for its conv and linear layers.
    ///
    /// Errors: [`Error::InvalidArgument`] for [`Int8Dot::Packed`] where the context does not
    /// offer it ([`GpuContext::check_int8_dot`]).
    pub fn with_dot(mut self, dot: Int8Dot) -> Result<Self> {
        self.ctx.check_int8_dot(dot)?;
        self.dot = Some(dot);
        Ok(self)
    }

    /// The dot-product path a forward uses now.
    pub fn dot(&self) -> Int8Dot {
        self.dot.unwrap_or_else(|| self.ctx.int8_dot())
    }

    /// The context the model lives on.
    pub fn context(&self) -> &Arc<GpuContext> {
        &self.ctx
    }

    /// The integer model it was prepared from.
    pub fn model(&self) -> &IntModel {
        &self.model
    }

    /// The integer forward of [`IntModel::forward`] on the device: uploads `x`, quantizes it,
    /// runs every layer on device-resident codes and downloads the output codes (blocking).
    /// Bit-identical to `IntModel::forward(&CpuBackend, x)`.
    ///
    /// Errors: the CPU path's, with its messages and in its order: an empty batch, NaN in
    /// `x` (the first one by row-major index), a layer whose input does not fit; GPU errors.
    pub fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<i8>> {
        if x.is_empty() {
            return Err(Error::invalid("the input batch is empty"));
        }
        let gx = GpuTensor::upload_f32(&self.ctx, x)?;
        let out = self.forward_gpu(&gx)?;
        out.check(&self.ctx)?;
        out.codes.download(&self.ctx)
    }

    /// The device-resident forward: quantizes `x` (an `f32` tensor) with the input's qparams
    /// and runs every layer, recording the dispatches without waiting for them. Returns the
    /// output codes with the quantize kernel's NaN status: call
    /// [`GpuQuantized::check`] or [`GpuQuantized::into_checked`] before trusting the codes
    /// (a NaN input gives codes computed from 0 in its place).
    ///
    /// Errors: an empty or non-`f32` input, a layer whose input does not fit (the CPU path's
    /// message; when the input holds a NaN, the NaN error instead, as on the CPU path, which
    /// downloads the status word), GPU errors.
    pub fn forward_gpu(&self, x: &GpuTensor) -> Result<GpuQuantized> {
        if x.is_empty() {
            return Err(Error::invalid("the input batch is empty"));
        }
        let q = k8::quantize(&self.ctx, x, &self.input_qp, self.range)?;
        match self.run(q.codes.clone()) {
            Ok(codes) => Ok(GpuQuantized {
                codes,
                nan_index: q.nan_index,
            }),
            Err(e) => {
                q.check(&self.ctx)?;
                Err(e)
            }
        }
    }

    /// The forward from input codes already on the device (quantized with the input's
    /// qparams, [`IntModel::values`]`[0]`): every layer recorded without waiting; returns the
    /// output codes.
    ///
    /// Errors: an empty input, a layer whose input does not fit (the CPU path's messages),
    /// GPU errors.
    pub fn forward_codes(&self, x: &GpuInt8Tensor) -> Result<GpuInt8Tensor> {
        if x.is_empty() {
            return Err(Error::invalid("the input batch is empty"));
        }
        self.run(x.clone())
    }

    fn run(&self, input: GpuInt8Tensor) -> Result<GpuInt8Tensor> {
        let ctx = &*self.ctx;
        let dot = self.dot();
        let mut values: Vec<Option<GpuInt8Tensor>> = vec![None; self.model.values.len()];
        values[0] = Some(input);
        for (i, node) in self.nodes.iter().enumerate() {
            let get = |v: usize| -> Result<&GpuInt8Tensor> {
                values[v].as_ref().ok_or_else(|| {
                    Error::invalid(format!("internal: value {v} of `{}` is gone", node.name))
                })
            };
            let xin = get(node.inputs[0])?;
            let y = match &node.layer {
                GpuLayer::Conv(conv) => {
                    need_rank(xin, 4, &node.name)?;
                    conv.forward_with(ctx, xin, dot)?
                }
                GpuLayer::Linear(lin) => {
                    need_rank(xin, 2, &node.name)?;
                    lin.forward_with(ctx, xin, dot)?
                }
                GpuLayer::MaxPool2d { kernel, stride } => {
                    need_rank(xin, 4, &node.name)?;
                    k8::max_pool2d_int8(ctx, xin, *kernel, *stride)?
                }
                GpuLayer::Flatten => k8::flatten_int8(ctx, xin)?,
                GpuLayer::Add(add) => {
                    let b = get(node.inputs[1])?;
                    if xin.shape() != b.shape() {
                        return Err(Error::shape(
                            format!("`{}` add", node.name),
                            xin.shape(),
                            b.shape(),
                        ));
                    }
                    k8::add_int8(ctx, xin, b, add)?
                }
            };
            for &v in &node.inputs {
                if self.last_use[v] == Some(i) && v != self.output {
                    values[v] = None;
                }
            }
            values[i + 1] = Some(y);
        }
        values[self.output]
            .take()
            .ok_or_else(|| Error::invalid(format!("value {} does not exist", self.output)))
    }
}

/// The rank checks of the CPU path (`as4` / `as2` of [`IntModel::forward`]), same messages.
fn need_rank(x: &GpuInt8Tensor, rank: usize, name: &str) -> Result<()> {
    if x.shape().len() == rank {
        return Ok(());
    }
    Err(Error::invalid(if rank == 4 {
        format!("`{name}` needs a 4-D NCHW input, got shape {:?}", x.shape())
    } else {
        format!(
            "`{name}` needs a 2-D [N, features] input, got shape {:?} (flatten it first)",
            x.shape()
        )
    }))
}
