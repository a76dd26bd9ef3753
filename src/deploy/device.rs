//! [`DeviceIntModel`]: an [`IntModel`] prepared once on a backend, and the one graph
//! interpreter of the integer forward. [`IntModel::forward`] runs through it on any
//! [`Backend`]; [`GpuIntModel`] is it on the [`GpuBackend`].
//!
//! Preparing packs and places every conv and linear weight with its folded bias and
//! requantization on the backend once ([`Int8Ops::prepare_conv2d_int8`],
//! [`Int8Ops::prepare_linear_int8`]) and the input's qparams. A forward then runs quantize →
//! conv / linear / max pool / add / flatten → ... on the backend's codes: on the GPU every
//! intermediate stays on the device and only the output codes are downloaded. The result
//! is bit-identical across backends, for both [`crate::quant::RequantMode`]s and both
//! [`Int8Dot`] paths, and bad input gives the same errors in the same order on every
//! backend (a NaN in the input first, then the first layer whose input shape does not fit).

use std::sync::Arc;

use ndarray::ArrayD;

use super::convert::{IntLayer, IntModel};
use crate::backend::{Backend, GpuBackend, Int8Ops, Shaped};
use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor, Int8Dot};
use crate::kernels::int8::{self as k8, GpuQuantized};
use crate::ops::Pool2d;
use crate::quant::{AddRequant, QuantRange, RequantMode};

/// One node, prepared on backend `B`.
#[derive(Debug, Clone)]
enum Prepared<B: Int8Ops> {
    Conv(B::Conv2dInt8),
    Linear(B::LinearInt8),
    MaxPool2d {
        kernel: usize,
        stride: usize,
    },
    Flatten,
    Add(AddRequant),
    MaxPool2dPad(Pool2d),
    /// Global average pooling: the input's zero point and scale, the output's scale and
    /// zero point, the arithmetic; the requantization follows the input's extent.
    GlobalAvgPool {
        x_zp: i32,
        s_in: f32,
        out: (f32, i32),
        mode: RequantMode,
    },
    Table(Vec<i8>),
}

#[derive(Debug, Clone)]
struct PreparedNode<B: Int8Ops> {
    name: String,
    layer: Prepared<B>,
    inputs: Vec<usize>,
}

/// An [`IntModel`] prepared on a backend: weights packed and placed once, every forward on
/// the backend's codes.
///
/// ```
/// # fn demo(model: &qfuse::deploy::IntModel, x: &ndarray::ArrayD<f32>) -> qfuse::Result<()> {
/// use qfuse::deploy::DeviceIntModel;
///
/// let on_cpu = DeviceIntModel::prepare(model, qfuse::CpuBackend)?;
/// let codes = on_cpu.forward(x)?; // = model.forward(&qfuse::CpuBackend, x)
/// # let _ = codes; Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct DeviceIntModel<B: Backend> {
    backend: B,
    nodes: Vec<PreparedNode<B>>,
    /// The input's qparams on the backend.
    input_qp: B::QParams,
    range: QuantRange,
    output: usize,
    /// For each value, the last node reading it (`None`: never read); a value is dropped
    /// after its last reader ran, unless it is the output.
    last_use: Vec<Option<usize>>,
    model: IntModel,
}

/// The integer model on the GPU, device-resident: [`DeviceIntModel`] on [`GpuBackend`].
pub type GpuIntModel = DeviceIntModel<GpuBackend>;

/// The rank checks of the integer forward (same messages as the simulations').
fn need_rank(dims: &[usize], rank: usize, name: &str) -> Result<()> {
    if dims.len() == rank {
        return Ok(());
    }
    Err(Error::invalid(if rank == 4 {
        format!("`{name}` needs a 4-D NCHW input, got shape {dims:?}")
    } else {
        format!("`{name}` needs a 2-D [N, features] input, got shape {dims:?} (flatten it first)")
    }))
}

impl<B: Backend> DeviceIntModel<B> {
    /// Prepares `model` on `backend`: validates it ([`IntModel::validate`]), prepares every
    /// conv and linear layer and places the input's qparams.
    ///
    /// Errors: an invalid model, the prepared layers' checks, backend errors.
    pub fn prepare(model: &IntModel, backend: B) -> Result<Self> {
        model.validate()?;
        let mut nodes = Vec::with_capacity(model.nodes.len());
        for (i, node) in model.nodes.iter().enumerate() {
            let zp_in = model.values[node.inputs[0]].zero_point[0];
            let layer = match &node.layer {
                IntLayer::Conv {
                    weight,
                    bias,
                    params,
                    requant,
                    ..
                } => Prepared::Conv(backend.prepare_conv2d_int8(
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
                } => Prepared::Linear(backend.prepare_linear_int8(
                    zp_in,
                    weight,
                    bias.as_ref(),
                    requant,
                )?),
                IntLayer::MaxPool2d { kernel, stride } => Prepared::MaxPool2d {
                    kernel: *kernel,
                    stride: *stride,
                },
                IntLayer::Flatten => Prepared::Flatten,
                IntLayer::Add { add, .. } => {
                    add.validate()?;
                    Prepared::Add(*add)
                }
                IntLayer::MaxPool2dPad { pool } => Prepared::MaxPool2dPad(*pool),
                IntLayer::GlobalAvgPool { mode } => {
                    let (qi, qo) = (&model.values[node.inputs[0]], &model.values[i + 1]);
                    Prepared::GlobalAvgPool {
                        x_zp: qi.zero_point[0],
                        s_in: qi.scale[0],
                        out: (qo.scale[0], qo.zero_point[0]),
                        mode: *mode,
                    }
                }
                IntLayer::Table { table, .. } => Prepared::Table(table.clone()),
            };
            nodes.push(PreparedNode {
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
            input_qp: backend.upload_qparams(&model.values[0])?,
            range: model.activation_range,
            output: model.output,
            last_use,
            model: model.clone(),
            nodes,
            backend,
        })
    }

    /// The backend the model lives on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The integer model it was prepared from.
    pub fn model(&self) -> &IntModel {
        &self.model
    }

    /// The integer forward of [`IntModel::forward`]: uploads `x`, quantizes it, runs every
    /// layer on the backend's codes and downloads the output codes.
    ///
    /// Errors: an empty batch, NaN in `x` (the first one by row-major index), a layer whose
    /// input does not fit; backend errors.
    pub fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<i8>> {
        if x.is_empty() {
            return Err(Error::invalid("the input batch is empty"));
        }
        let codes = self.forward_device(&self.backend.upload(x)?)?;
        self.backend.download_codes(&codes)
    }

    /// The forward on a tensor already on the backend: quantizes `x` with the input's
    /// qparams and runs every layer; returns the output codes, on the backend.
    ///
    /// Errors: as [`DeviceIntModel::forward`].
    pub fn forward_device(&self, x: &B::Tensor) -> Result<B::Codes> {
        if x.dims().iter().product::<usize>() == 0 {
            return Err(Error::invalid("the input batch is empty"));
        }
        let q = self.backend.quantize(x, &self.input_qp, self.range)?;
        let mut values = self.run(q, false)?;
        values[self.output]
            .take()
            .ok_or_else(|| Error::invalid(format!("value {} does not exist", self.output)))
    }

    /// The forward from input codes already on the backend (quantized with the input's
    /// qparams, [`IntModel::values`]`[0]`); returns the output codes.
    ///
    /// Errors: an empty input, a layer whose input does not fit; backend errors.
    pub fn forward_codes(&self, x: &B::Codes) -> Result<B::Codes> {
        if x.dims().iter().product::<usize>() == 0 {
            return Err(Error::invalid("the input batch is empty"));
        }
        let mut values = self.run(x.clone(), false)?;
        values[self.output]
            .take()
            .ok_or_else(|| Error::invalid(format!("value {} does not exist", self.output)))
    }

    /// The codes of every value (index = value id), downloaded.
    ///
    /// Errors: as [`DeviceIntModel::forward`].
    pub fn forward_values(&self, x: &ArrayD<f32>) -> Result<Vec<ArrayD<i8>>> {
        if x.is_empty() {
            return Err(Error::invalid("the input batch is empty"));
        }
        let q = self
            .backend
            .quantize(&self.backend.upload(x)?, &self.input_qp, self.range)?;
        self.run(q, true)?
            .iter()
            .map(|v| match v {
                Some(c) => self.backend.download_codes(c),
                None => Err(Error::invalid("internal: a value was not kept")),
            })
            .collect()
    }

    /// The graph interpreter: every node on the backend's codes, in order. Keeps every
    /// value when `keep_all`, else drops each after its last reader.
    fn run(&self, input: B::Codes, keep_all: bool) -> Result<Vec<Option<B::Codes>>> {
        let b = &self.backend;
        let mut values: Vec<Option<B::Codes>> = vec![None; self.model.values.len()];
        values[0] = Some(input);
        for (i, node) in self.nodes.iter().enumerate() {
            let get = |v: usize| -> Result<&B::Codes> {
                values[v].as_ref().ok_or_else(|| {
                    Error::invalid(format!("internal: value {v} of `{}` is gone", node.name))
                })
            };
            let xin = get(node.inputs[0])?;
            let y = match &node.layer {
                Prepared::Conv(conv) => {
                    need_rank(xin.dims(), 4, &node.name)?;
                    b.conv2d_int8(conv, xin)?
                }
                Prepared::Linear(lin) => {
                    need_rank(xin.dims(), 2, &node.name)?;
                    b.linear_int8(lin, xin)?
                }
                Prepared::MaxPool2d { kernel, stride } => {
                    need_rank(xin.dims(), 4, &node.name)?;
                    b.max_pool2d_int8(xin, *kernel, *stride)?
                }
                Prepared::Flatten => b.flatten_int8(xin)?,
                Prepared::Add(add) => {
                    let y = get(node.inputs[1])?;
                    if xin.dims() != y.dims() {
                        return Err(Error::shape(
                            format!("`{}` add", node.name),
                            xin.dims(),
                            y.dims(),
                        ));
                    }
                    b.add_int8(xin, y, add)?
                }
                Prepared::MaxPool2dPad(pool) => {
                    need_rank(xin.dims(), 4, &node.name)?;
                    b.max_pool2d_pad_int8(xin, pool)?
                }
                Prepared::GlobalAvgPool {
                    x_zp,
                    s_in,
                    out,
                    mode,
                } => {
                    need_rank(xin.dims(), 4, &node.name)?;
                    let extent = crate::ops::global_pool_extent(xin.dims())?;
                    let range = (self.range.quant_min, self.range.quant_max);
                    let rq = crate::reference::int8::global_avg_pool_requant(
                        *s_in, *out, extent, *mode, range,
                    )?;
                    b.global_avg_pool_int8(xin, *x_zp, &rq)?
                }
                Prepared::Table(table) => b.lookup_int8(xin, table)?,
            };
            if !keep_all {
                for &v in &node.inputs {
                    if self.last_use[v] == Some(i) && v != self.output {
                        values[v] = None;
                    }
                }
            }
            values[i + 1] = Some(y);
        }
        Ok(values)
    }
}

impl DeviceIntModel<GpuBackend> {
    /// Prepares `model` on `ctx` ([`DeviceIntModel::prepare`] on a [`GpuBackend`]). Runs
    /// with the context's dot-product path ([`GpuContext::int8_dot`]) unless
    /// [`GpuIntModel::with_dot`] picks one.
    ///
    /// Errors: an invalid model, the prepared layers' checks, GPU errors.
    pub fn new(model: &IntModel, ctx: Arc<GpuContext>) -> Result<Self> {
        Self::prepare(model, GpuBackend::new(ctx))
    }

    /// This model with an explicit dot-product path for its conv and linear layers.
    ///
    /// Errors: [`Error::InvalidArgument`] for [`Int8Dot::Packed`] where the context does not
    /// offer it ([`GpuContext::check_int8_dot`]).
    pub fn with_dot(mut self, dot: Int8Dot) -> Result<Self> {
        self.backend = self.backend.with_int8_dot(dot)?;
        Ok(self)
    }

    /// The dot-product path a forward uses now.
    pub fn dot(&self) -> Int8Dot {
        self.backend.int8_dot()
    }

    /// The context the model lives on.
    pub fn context(&self) -> &Arc<GpuContext> {
        self.backend.context()
    }

    /// The device-resident forward without waiting: quantizes `x` (an `f32` tensor) with
    /// the input's qparams and records every layer. Returns the output codes with the
    /// quantize kernel's NaN status: call [`GpuQuantized::check`] or
    /// [`GpuQuantized::into_checked`] before trusting the codes (a NaN input gives codes
    /// computed from 0 in its place). [`DeviceIntModel::forward_device`] checks it instead.
    ///
    /// Errors: an empty or non-`f32` input, a layer whose input does not fit (when the
    /// input holds a NaN, the NaN error instead, as on the CPU, which reads the status
    /// word), GPU errors.
    pub fn forward_gpu(&self, x: &GpuTensor) -> Result<GpuQuantized> {
        if x.is_empty() {
            return Err(Error::invalid("the input batch is empty"));
        }
        let ctx = &**self.context();
        self.range.check_int8_codes()?;
        let q = k8::quantize(ctx, x, &self.input_qp, self.range)?;
        match self.run(q.codes.clone(), false) {
            Ok(mut values) => Ok(GpuQuantized {
                codes: values[self.output].take().ok_or_else(|| {
                    Error::invalid(format!("value {} does not exist", self.output))
                })?,
                nan_index: q.nan_index,
            }),
            Err(e) => {
                q.check(ctx)?;
                Err(e)
            }
        }
    }
}
