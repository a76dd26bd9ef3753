//! The GPU backend: WGSL kernels via wgpu ([`crate::kernels`]) behind the op-family traits,
//! on [`GpuTensor`]s. Nothing crosses to the host except at [`Device::upload`] /
//! [`Device::download`] (and the few reads documented on the ops that need them).

use std::sync::Arc;

use ndarray::{Array1, Array2, Array4, ArrayD};

use super::{Device, FloatOps, FusedOps, Int8Ops, QuantOps, Shaped};
use crate::error::{Error, Result};
use crate::gpu::{DType, GpuContext, GpuTensor, Int8Dot};
use crate::kernels::int8::{GpuConv2dInt8, GpuInt8Tensor, GpuLinearInt8};
use crate::kernels::{self, GpuBatchNorm, GpuQParams};
use crate::ops::{
    Activation, BatchNorm, BatchNormGrads, BatchNormOutput, Conv2d, Conv2dGrads, Conv2dParams,
    ConvTranspose2dParams, Folded, QatConfig, QatForward, QatGrads, QatSaved, QatStep,
    QatWeightQuant,
};
use crate::quant::{AddRequant, ObserverSpec, QParams, QuantRange, Requant};

impl Shaped for GpuTensor {
    fn dims(&self) -> &[usize] {
        self.shape()
    }
}

impl Shaped for GpuInt8Tensor {
    fn dims(&self) -> &[usize] {
        self.shape()
    }
}

impl crate::ops::ConvWeight for GpuTensor {
    type Bias = GpuTensor;
}

/// Runs every operation on a GPU through [`crate::kernels`], on [`GpuTensor`]s (and packed
/// int8 codes, [`GpuInt8Tensor`]): data stays on the device between ops. Validation
/// happens on the host first (on shapes and host-known values), with the same errors as
/// [`crate::CpuBackend`].
#[derive(Debug, Clone)]
pub struct GpuBackend {
    ctx: Arc<GpuContext>,
    dot: Option<Int8Dot>,
}

/// What the GPU QAT forward keeps for its backward (all on the device). The channels run in
/// the finite γ = 0 form of [`crate::reference::conv_bn::conv_bn_qat_forward_with`] are
/// known from γ and the saved scale factor, on the device, as in the reference.
#[derive(Debug, Clone)]
pub struct GpuQatState {
    /// `s` (`[O]`).
    pub scale_factor: GpuTensor,
    /// `W_q`.
    pub weight_q: GpuTensor,
    /// The fake-quant mask of `W_s`.
    pub weight_mask: GpuTensor,
    /// The BatchNorm input.
    pub bn_input: GpuTensor,
    /// `[2, O]`: mean and invstd BN normalized with.
    pub stats: GpuTensor,
    /// The BatchNorm output before the activation, where it is kept (see
    /// [`kernels::conv_bn::GpuQatForward::bn_out`]: not by the fused forward with ReLU or
    /// ReLU6).
    pub bn_out: Option<GpuTensor>,
    /// Where the backward evaluates the activation's gradient: `bn_out` where it is kept,
    /// else the forward output `y` (the same mask for ReLU and ReLU6).
    pub act_input: GpuTensor,
    /// `conv(x, W_q)` when it is known (a state uploaded from the host); else it is
    /// reconstructed from `bn_input` when downloaded.
    pub conv_out: Option<GpuTensor>,
}

/// The saved state of the GPU QAT step ([`FusedOps::QatSaved`] of [`GpuBackend`]).
pub type GpuQatSaved = GpuQatState;

fn to4(t: &GpuTensor, what: &str) -> Result<[usize; 4]> {
    <[usize; 4]>::try_from(t.shape())
        .map_err(|_| Error::invalid(format!("{what} must be rank 4, got shape {:?}", t.shape())))
}

impl GpuBackend {
    /// A backend on an existing context (shared with other users through the `Arc`).
    pub fn new(ctx: Arc<GpuContext>) -> Self {
        Self { ctx, dot: None }
    }

    /// A backend on a context opened from the system ([`GpuContext::new`]).
    ///
    /// Errors: [`Error::NoAdapter`], [`Error::Gpu`].
    pub fn from_system() -> Result<Self> {
        Ok(Self::new(Arc::new(GpuContext::new()?)))
    }

    /// This backend with an explicit dot-product path for its integer conv and linear
    /// layers (else the context's, [`GpuContext::int8_dot`]).
    ///
    /// Errors: [`Error::InvalidArgument`] for [`Int8Dot::Packed`] where the context does not
    /// offer it ([`GpuContext::check_int8_dot`]).
    pub fn with_int8_dot(mut self, dot: Int8Dot) -> Result<Self> {
        self.ctx.check_int8_dot(dot)?;
        self.dot = Some(dot);
        Ok(self)
    }

    /// The dot-product path the integer layers use now.
    pub fn int8_dot(&self) -> Int8Dot {
        self.dot.unwrap_or_else(|| self.ctx.int8_dot())
    }

    /// The context.
    pub fn context(&self) -> &Arc<GpuContext> {
        &self.ctx
    }

    /// `R` equal-length 1-D `f32` tensors stacked as the rows of one `[R, C]` tensor, by
    /// device copies (in the open recording, else one submission).
    ///
    /// Errors: [`Error::ShapeMismatch`] for rows of other shapes; GPU errors.
    pub fn stack_rows(&self, rows: &[&GpuTensor]) -> Result<GpuTensor> {
        let c = rows.first().map_or(0, |r| r.len());
        for (i, r) in rows.iter().enumerate() {
            self.ctx.check_tensor("stacked row", r)?;
            if r.shape() != [c] || r.dtype() != DType::F32 {
                return Err(Error::shape(format!("stacked row {i}"), &[c], r.shape()));
            }
        }
        let out = GpuTensor::uninit(&self.ctx, &[rows.len(), c], DType::F32)?;
        if c == 0 {
            return Ok(out);
        }
        let bytes = (c * 4) as u64;
        let copies: Vec<_> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| (r.buffer(), 0, out.buffer(), i as u64 * bytes, bytes))
            .collect();
        self.ctx.copy_regions("stacking rows", &copies)?;
        Ok(out)
    }

    /// The rows of a `[R, C]` `f32` tensor as `R` tensors `[C]`, by device copies (in the
    /// open recording, else one submission).
    ///
    /// Errors: [`Error::InvalidArgument`] for a tensor that is not 2-D `f32`; GPU errors.
    pub fn split_rows(&self, t: &GpuTensor) -> Result<Vec<GpuTensor>> {
        self.ctx.check_tensor("split tensor", t)?;
        let [r, c] = <[usize; 2]>::try_from(t.shape())
            .ok()
            .filter(|_| t.dtype() == DType::F32)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "split_rows needs a [R, C] f32 tensor, got {:?} {:?}",
                    t.dtype(),
                    t.shape()
                ))
            })?;
        let rows = (0..r)
            .map(|_| GpuTensor::uninit(&self.ctx, &[c], DType::F32))
            .collect::<Result<Vec<_>>>()?;
        if c == 0 {
            return Ok(rows);
        }
        let bytes = (c * 4) as u64;
        let copies: Vec<_> = rows
            .iter()
            .enumerate()
            .map(|(i, row)| (t.buffer(), i as u64 * bytes, row.buffer(), 0, bytes))
            .collect();
        self.ctx.copy_regions("splitting rows", &copies)?;
        Ok(rows)
    }

    /// A device BatchNorm in the kernels' packed form ([`GpuBatchNorm`], `[4, C]`), built
    /// on the device (γ = 1 and β = 0 are written for `affine=False`).
    ///
    /// Errors: [`BatchNorm::validate`]'s, on the tensors' shapes; GPU errors.
    pub fn pack_batch_norm(&self, bn: &BatchNorm<GpuTensor>) -> Result<GpuBatchNorm> {
        let c = bn.running_mean.len();
        let check = |name: &str, t: &GpuTensor| {
            if t.shape() == [c] && t.dtype() == DType::F32 {
                Ok(())
            } else {
                Err(Error::shape(format!("BatchNorm {name}"), &[c], t.shape()))
            }
        };
        check("running_mean", &bn.running_mean)?;
        check("running_var", &bn.running_var)?;
        if let Some(w) = &bn.weight {
            check("weight", w)?;
        }
        if let Some(b) = &bn.bias {
            check("bias", b)?;
        }
        let ones;
        let zeros;
        let w = match &bn.weight {
            Some(w) => w,
            None => {
                ones = GpuTensor::from_slice_f32(&self.ctx, &vec![1.0; c], &[c])?;
                &ones
            }
        };
        let b = match &bn.bias {
            Some(b) => b,
            None => {
                zeros = GpuTensor::zeros(&self.ctx, &[c], DType::F32)?;
                &zeros
            }
        };
        let data = self.stack_rows(&[w, b, &bn.running_mean, &bn.running_var])?;
        GpuBatchNorm::from_packed(data, bn.eps)
    }

    /// A kernel QAT forward as the backend's step.
    fn qat_step(
        &self,
        f: kernels::conv_bn::GpuQatForward,
    ) -> Result<QatStep<GpuTensor, GpuQParams, GpuQatState>> {
        let (running_mean, running_var) = self.stats_rows(&f.stats.running)?;
        let act_input = f.bn_out.clone().unwrap_or_else(|| f.y.clone());
        Ok(QatStep {
            y: f.y,
            running_mean,
            running_var,
            weight_qparams: f.weight_qparams,
            saved: GpuQatState {
                scale_factor: f.scale_factor,
                weight_q: f.weight_q,
                weight_mask: f.weight_mask,
                bn_input: f.bn_input,
                stats: f.stats.stats,
                act_input,
                bn_out: f.bn_out,
                conv_out: f.conv_out,
            },
        })
    }

    fn stats_rows(&self, t: &GpuTensor) -> Result<(GpuTensor, GpuTensor)> {
        let mut rows = self.split_rows(t)?;
        match (rows.pop(), rows.pop(), rows.is_empty()) {
            (Some(second), Some(first), true) => Ok((first, second)),
            _ => Err(Error::Gpu(format!(
                "internal: per-channel stats are {:?}, not [2, C]",
                t.shape()
            ))),
        }
    }
}

fn gconv(conv: &Conv2d<GpuTensor>) -> kernels::conv_bn::GpuConv2d<'_> {
    Conv2d {
        weight: &conv.weight,
        bias: conv.bias.as_ref(),
        params: conv.params,
    }
}

impl Device for GpuBackend {
    type Tensor = GpuTensor;
    type Codes = GpuInt8Tensor;
    type QParams = GpuQParams;

    fn name(&self) -> String {
        format!("gpu ({})", self.ctx.name())
    }
    fn upload(&self, x: &ArrayD<f32>) -> Result<GpuTensor> {
        GpuTensor::upload_f32(&self.ctx, x)
    }
    fn download(&self, x: &GpuTensor) -> Result<ArrayD<f32>> {
        x.download_f32(&self.ctx)
    }
    fn upload_codes(&self, q: &ArrayD<i8>) -> Result<GpuInt8Tensor> {
        GpuInt8Tensor::upload(&self.ctx, q)
    }
    fn download_codes(&self, q: &GpuInt8Tensor) -> Result<ArrayD<i8>> {
        q.download(&self.ctx)
    }
    fn upload_qparams(&self, qp: &QParams) -> Result<GpuQParams> {
        GpuQParams::upload(&self.ctx, qp)
    }
    fn download_qparams(&self, qp: &GpuQParams) -> Result<QParams> {
        qp.download(&self.ctx)
    }
    fn reshape(&self, x: &GpuTensor, shape: &[usize]) -> Result<GpuTensor> {
        crate::ops::check_reshape(x.shape(), shape)?;
        x.reshape(shape)
    }
}

impl FloatOps for GpuBackend {
    fn conv2d(
        &self,
        x: &GpuTensor,
        weight: &GpuTensor,
        bias: Option<&GpuTensor>,
        params: &Conv2dParams,
        act: Activation,
    ) -> Result<GpuTensor> {
        let out = params.output_shape(x.shape(), weight.shape())?;
        if let Some(b) = bias {
            if b.shape() != [out[1]] {
                return Err(Error::shape("conv2d bias", &[out[1]], b.shape()));
            }
        }
        let epilogue = kernels::conv2d::ConvEpilogue {
            bias,
            out_scale: None,
            activation: act,
        };
        kernels::conv2d::conv2d(&self.ctx, x, weight, params, &epilogue)
    }

    fn conv2d_backward(
        &self,
        x: &GpuTensor,
        weight: &GpuTensor,
        dy: &GpuTensor,
        params: &Conv2dParams,
    ) -> Result<Conv2dGrads<GpuTensor, GpuTensor>> {
        let out = params.output_shape(x.shape(), weight.shape())?;
        if dy.shape() != out {
            return Err(Error::shape(
                "conv2d_backward dy (forward output shape)",
                &out,
                dy.shape(),
            ));
        }
        let x_shape = to4(x, "conv2d input")?;
        let w_shape = to4(weight, "conv2d weight")?;
        let ctx = &*self.ctx;
        Ok(Conv2dGrads {
            dx: kernels::conv2d::conv2d_backward_input(ctx, dy, weight, params, x_shape)?,
            dweight: kernels::conv2d::conv2d_backward_weight(ctx, x, dy, params, w_shape)?,
            dbias: kernels::conv2d::channel_sum(ctx, dy)?,
        })
    }

    fn conv_transpose2d(
        &self,
        x: &GpuTensor,
        weight: &GpuTensor,
        bias: Option<&GpuTensor>,
        params: &ConvTranspose2dParams,
        act: Activation,
    ) -> Result<GpuTensor> {
        let out = params.output_shape(x.shape(), weight.shape())?;
        if let Some(b) = bias {
            if b.shape() != [out[1]] {
                return Err(Error::shape("conv_transpose2d bias", &[out[1]], b.shape()));
            }
        }
        let epilogue = kernels::conv2d::ConvEpilogue {
            bias,
            out_scale: None,
            activation: act,
        };
        kernels::conv2d::conv_transpose2d(&self.ctx, x, weight, params, &epilogue)
    }

    fn batch_norm2d(
        &self,
        x: &GpuTensor,
        bn: &BatchNorm<GpuTensor>,
        training: bool,
        act: Activation,
    ) -> Result<BatchNormOutput<GpuTensor, GpuTensor>> {
        self.ctx.record(|| {
            let gbn = self.pack_batch_norm(bn)?;
            let out = kernels::batch_norm::batch_norm2d(
                &self.ctx,
                x,
                &gbn,
                bn.momentum,
                training,
                act,
                false,
            )?;
            let (mean, invstd) = self.stats_rows(&out.stats.stats)?;
            let (running_mean, running_var) = self.stats_rows(&out.stats.running)?;
            Ok(BatchNormOutput {
                y: out.y,
                running_mean,
                running_var,
                mean,
                invstd,
            })
        })
    }

    fn batch_norm2d_backward(
        &self,
        x: &GpuTensor,
        dy: &GpuTensor,
        bn: &BatchNorm<GpuTensor>,
        fwd: &BatchNormOutput<GpuTensor, GpuTensor>,
        training: bool,
    ) -> Result<BatchNormGrads<GpuTensor, GpuTensor>> {
        self.ctx.record(|| {
            use kernels::batch_norm as kbn;
            let gbn = self.pack_batch_norm(bn)?;
            kbn::check_input(x, &gbn)?;
            if dy.shape() != x.shape() {
                return Err(Error::shape(
                    "batch_norm2d_backward dy (input shape)",
                    x.shape(),
                    dy.shape(),
                ));
            }
            let c = gbn.channels();
            for (name, a) in [("mean", &fwd.mean), ("invstd", &fwd.invstd)] {
                if a.shape() != [c] {
                    return Err(Error::shape(
                        format!("batch_norm2d_backward saved {name}"),
                        &[c],
                        a.shape(),
                    ));
                }
            }
            let stats = self.stack_rows(&[&fwd.mean, &fwd.invstd])?;
            let g = kbn::batch_norm2d_backward(&self.ctx, x, dy, &gbn, &stats, training)?;
            let (dbias, dweight) = self.stats_rows(&g.dparams)?;
            Ok(BatchNormGrads {
                dx: g.dx,
                dweight,
                dbias,
            })
        })
    }

    fn add(&self, a: &GpuTensor, b: &GpuTensor) -> Result<GpuTensor> {
        crate::ops::check_add(a.shape(), b.shape())?;
        kernels::train::add(&self.ctx, a, b)
    }

    fn activation(&self, x: &GpuTensor, act: Activation) -> Result<GpuTensor> {
        kernels::activation::activation(&self.ctx, x, act)
    }

    fn activation_backward(
        &self,
        x: &GpuTensor,
        dy: &GpuTensor,
        act: Activation,
    ) -> Result<GpuTensor> {
        if x.shape() != dy.shape() {
            return Err(Error::shape(
                "activation_backward (dy vs x)",
                x.shape(),
                dy.shape(),
            ));
        }
        kernels::activation::activation_backward(&self.ctx, x, dy, act)
    }

    fn max_pool2d(&self, x: &GpuTensor, kernel: usize, stride: usize) -> Result<GpuTensor> {
        kernels::pool::max_pool2d(&self.ctx, x, kernel, stride)
    }

    fn linear(
        &self,
        x: &GpuTensor,
        weight: &GpuTensor,
        bias: Option<&GpuTensor>,
        act: Activation,
    ) -> Result<GpuTensor> {
        kernels::linear::linear_act(&self.ctx, x, weight, bias, act)
    }

    fn log_softmax(&self, x: &GpuTensor) -> Result<GpuTensor> {
        kernels::pool::log_softmax(&self.ctx, x)
    }

    fn pool2d(
        &self,
        x: &GpuTensor,
        window: &crate::ops::PoolWindow,
        mode: crate::ops::PoolMode,
    ) -> Result<GpuTensor> {
        kernels::graph_ops::pool2d(&self.ctx, x, window, mode)
    }

    fn pad2d(&self, x: &GpuTensor, pads: [usize; 4]) -> Result<GpuTensor> {
        kernels::graph_ops::pad2d(&self.ctx, x, pads)
    }

    fn global_avg_pool2d(&self, x: &GpuTensor) -> Result<GpuTensor> {
        kernels::graph_ops::global_avg_pool2d(&self.ctx, x)
    }

    fn binary(&self, a: &GpuTensor, b: &GpuTensor, op: crate::ops::BinaryOp) -> Result<GpuTensor> {
        kernels::graph_ops::binary(&self.ctx, a, b, op)
    }

    fn concat(&self, parts: &[&GpuTensor], axis: i64) -> Result<GpuTensor> {
        kernels::graph_ops::concat(&self.ctx, parts, axis)
    }
}

impl QuantOps for GpuBackend {
    fn fake_quant(&self, x: &GpuTensor, qp: &GpuQParams, range: QuantRange) -> Result<GpuTensor> {
        qp.validate(x.shape(), range)?;
        kernels::fake_quant::fake_quant(&self.ctx, x, qp, range)
    }

    fn fake_quant_onnx(
        &self,
        x: &GpuTensor,
        qp: &GpuQParams,
        range: QuantRange,
    ) -> Result<GpuTensor> {
        kernels::graph_ops::fake_quant_onnx(&self.ctx, x, qp, range)
    }

    fn fake_quant_backward(
        &self,
        x: &GpuTensor,
        dy: &GpuTensor,
        qp: &GpuQParams,
        range: QuantRange,
    ) -> Result<GpuTensor> {
        qp.validate(x.shape(), range)?;
        if dy.shape() != x.shape() {
            return Err(Error::shape(
                "fake_quantize_backward (dy vs x)",
                x.shape(),
                dy.shape(),
            ));
        }
        kernels::fake_quant::fake_quant_backward(&self.ctx, x, dy, qp, range)
    }

    fn calc_qparams(&self, x: &GpuTensor, spec: &ObserverSpec) -> Result<GpuQParams> {
        spec.validate()?;
        if spec.qscheme.is_per_channel() {
            spec.channel_axis(x.shape().len())?;
        }
        kernels::observer::observe(&self.ctx, x, spec)
    }

    fn observe_running(
        &self,
        state: Option<GpuTensor>,
        x: &GpuTensor,
        spec: &ObserverSpec,
        averaging_constant: Option<f32>,
    ) -> Result<(GpuTensor, GpuQParams)> {
        let (axis, _, spec) = crate::ops::check_running_observer(
            x.shape(),
            state.as_ref().map(|s| s.shape()),
            spec,
            averaging_constant,
        )?;
        self.ctx.record(|| {
            let batch = kernels::observer::min_max(&self.ctx, x, axis)?;
            let state = match state {
                None => batch,
                Some(s) => {
                    kernels::train::observer_update(
                        &self.ctx,
                        &s,
                        &batch,
                        averaging_constant,
                        false,
                    )?;
                    s
                }
            };
            let qp = kernels::observer::calc_qparams(&self.ctx, &state, &spec, axis)?;
            Ok((state, qp))
        })
    }

    fn fold_conv_bn(
        &self,
        weight: &GpuTensor,
        bias: Option<&GpuTensor>,
        bn: &BatchNorm<GpuTensor>,
        transpose: bool,
    ) -> Result<Folded<GpuTensor, GpuTensor>> {
        self.ctx.record(|| {
            crate::ops::check_conv_weight_rank(weight.shape())?;
            let gbn = self.pack_batch_norm(bn)?;
            let (weight, bias) =
                kernels::fold::fold_conv_bn(&self.ctx, weight, bias, &gbn, transpose)?;
            Ok(Folded { weight, bias })
        })
    }

    fn fold_linear_bn(
        &self,
        weight: &GpuTensor,
        bias: Option<&GpuTensor>,
        bn: &BatchNorm<GpuTensor>,
    ) -> Result<Folded<GpuTensor, GpuTensor>> {
        self.ctx.record(|| {
            let gbn = self.pack_batch_norm(bn)?;
            let (weight, bias) = kernels::fold::fold_linear_bn(&self.ctx, weight, bias, &gbn)?;
            Ok(Folded { weight, bias })
        })
    }
}

impl Int8Ops for GpuBackend {
    type Conv2dInt8 = GpuConv2dInt8;
    type LinearInt8 = GpuLinearInt8;

    /// Quantizes on the device, then reads the kernel's NaN status word (4 bytes) so a NaN
    /// input is refused with the reference's error.
    fn quantize(&self, x: &GpuTensor, qp: &GpuQParams, range: QuantRange) -> Result<GpuInt8Tensor> {
        range.check_int8_codes()?;
        qp.validate(x.shape(), range)?;
        kernels::int8::quantize(&self.ctx, x, qp, range)?.into_checked(&self.ctx)
    }
    fn dequantize(&self, q: &GpuInt8Tensor, qp: &GpuQParams) -> Result<GpuTensor> {
        qp.validate(q.shape(), QuantRange::new(-128, 127)?)?;
        kernels::int8::dequantize(&self.ctx, q, qp)
    }
    fn prepare_conv2d_int8(
        &self,
        x_zero_point: i32,
        weight: &Array4<i8>,
        bias: Option<&Array1<i32>>,
        params: &Conv2dParams,
        requant: &Requant,
    ) -> Result<GpuConv2dInt8> {
        GpuConv2dInt8::new(&self.ctx, x_zero_point, weight, bias, params, requant)
    }
    fn conv2d_int8(&self, layer: &GpuConv2dInt8, x: &GpuInt8Tensor) -> Result<GpuInt8Tensor> {
        layer.forward_with(&self.ctx, x, self.int8_dot())
    }
    fn prepare_linear_int8(
        &self,
        x_zero_point: i32,
        weight: &Array2<i8>,
        bias: Option<&Array1<i32>>,
        requant: &Requant,
    ) -> Result<GpuLinearInt8> {
        GpuLinearInt8::new(&self.ctx, x_zero_point, weight, bias, requant)
    }
    fn linear_int8(&self, layer: &GpuLinearInt8, x: &GpuInt8Tensor) -> Result<GpuInt8Tensor> {
        layer.forward_with(&self.ctx, x, self.int8_dot())
    }
    fn max_pool2d_int8(
        &self,
        x: &GpuInt8Tensor,
        kernel: usize,
        stride: usize,
    ) -> Result<GpuInt8Tensor> {
        kernels::int8::max_pool2d_int8(&self.ctx, x, kernel, stride)
    }
    fn add_int8(
        &self,
        a: &GpuInt8Tensor,
        b: &GpuInt8Tensor,
        add: &AddRequant,
    ) -> Result<GpuInt8Tensor> {
        if a.shape() != b.shape() {
            return Err(Error::shape("quantized add", a.shape(), b.shape()));
        }
        add.validate()?;
        kernels::int8::add_int8(&self.ctx, a, b, add)
    }
    fn flatten_int8(&self, x: &GpuInt8Tensor) -> Result<GpuInt8Tensor> {
        kernels::int8::flatten_int8(&self.ctx, x)
    }
    fn max_pool2d_pad_int8(
        &self,
        x: &GpuInt8Tensor,
        pool: &crate::ops::Pool2d,
    ) -> Result<GpuInt8Tensor> {
        kernels::int8_pool::max_pool2d_pad_int8(&self.ctx, x, pool)
    }
    fn global_avg_pool_int8(
        &self,
        x: &GpuInt8Tensor,
        x_zero_point: i32,
        requant: &Requant,
    ) -> Result<GpuInt8Tensor> {
        kernels::int8_pool::global_avg_pool_int8(&self.ctx, x, x_zero_point, requant)
    }
    fn lookup_int8(&self, x: &GpuInt8Tensor, table: &[i8]) -> Result<GpuInt8Tensor> {
        kernels::int8_pool::lookup_int8(&self.ctx, x, table)
    }
}

impl FusedOps for GpuBackend {
    type QatSaved = GpuQatState;

    fn conv_bn_act_eval(
        &self,
        x: &GpuTensor,
        conv: &Conv2d<GpuTensor>,
        bn: &BatchNorm<GpuTensor>,
        act: Activation,
    ) -> Result<(GpuTensor, Folded<GpuTensor, GpuTensor>)> {
        self.ctx.record(|| {
            let gbn = self.pack_batch_norm(bn)?;
            let r = kernels::conv_bn::conv_bn_act_eval(&self.ctx, x, &gconv(conv), &gbn, act)?;
            Ok((
                r.y,
                Folded {
                    weight: r.weight,
                    bias: r.bias,
                },
            ))
        })
    }

    /// On the device, with no read: the finite γ = 0 form is decided per channel by the
    /// kernel ([`kernels::conv_bn::GpuQatWeight::finite_zero_gamma`]).
    fn conv_bn_qat_forward(
        &self,
        x: &GpuTensor,
        conv: &Conv2d<GpuTensor>,
        bn: &BatchNorm<GpuTensor>,
        cfg: &QatConfig,
        weight: &QatWeightQuant<GpuQParams>,
    ) -> Result<QatStep<GpuTensor, GpuQParams, GpuQatState>> {
        self.ctx.record(|| {
            let gbn = self.pack_batch_norm(bn)?;
            let gweight = kernels::conv_bn::GpuQatWeight {
                qparams: weight.qparams.as_ref(),
                fake_quant_enabled: weight.fake_quant_enabled,
                finite_zero_gamma: true,
            };
            let f = kernels::conv_bn::conv_bn_qat_forward_with(
                &self.ctx,
                x,
                &gconv(conv),
                &gbn,
                bn.momentum,
                cfg,
                &gweight,
            )?;
            self.qat_step(f)
        })
    }

    fn conv_bn_qat_forward_pytorch(
        &self,
        x: &GpuTensor,
        conv: &Conv2d<GpuTensor>,
        bn: &BatchNorm<GpuTensor>,
        cfg: &QatConfig,
    ) -> Result<QatStep<GpuTensor, GpuQParams, GpuQatState>> {
        self.ctx.record(|| {
            let gbn = self.pack_batch_norm(bn)?;
            let f = kernels::conv_bn::conv_bn_qat_forward(
                &self.ctx,
                x,
                &gconv(conv),
                &gbn,
                bn.momentum,
                cfg,
            )?;
            self.qat_step(f)
        })
    }

    /// On the device, with no read (the finite γ = 0 channels included).
    fn conv_bn_qat_backward(
        &self,
        x: &GpuTensor,
        dy: &GpuTensor,
        conv: &Conv2d<GpuTensor>,
        bn: &BatchNorm<GpuTensor>,
        cfg: &QatConfig,
        fwd: &QatStep<GpuTensor, GpuQParams, GpuQatState>,
    ) -> Result<QatGrads<GpuTensor, GpuTensor>> {
        self.ctx.record(|| {
            let ctx = &*self.ctx;
            let gbn = self.pack_batch_norm(bn)?;
            let sv = &fwd.saved;
            let o = gbn.channels();
            if sv.stats.shape() != [2, o] {
                return Err(Error::shape(
                    "batch_norm2d_backward saved mean / invstd",
                    &[2, o],
                    sv.stats.shape(),
                ));
            }
            let saved = kernels::conv_bn::GpuQatSaved {
                scale_factor: &sv.scale_factor,
                weight_q: &sv.weight_q,
                weight_mask: &sv.weight_mask,
                bn_input: &sv.bn_input,
                stats: &sv.stats,
                act_input: &sv.act_input,
            };
            let g = kernels::conv_bn::conv_bn_qat_backward(
                ctx,
                x,
                dy,
                &gconv(conv),
                &gbn,
                cfg,
                &saved,
            )?;
            Ok(QatGrads {
                dx: g.dx,
                dweight: g.dweight,
                dbias: g.dbias,
                dbn_weight: g.dbn_weight,
                dbn_bias: g.dbn_bias,
            })
        })
    }

    fn qat_forward_to_host(
        &self,
        fwd: &QatStep<GpuTensor, GpuQParams, GpuQatState>,
        conv: &Conv2d<GpuTensor>,
        bn: &BatchNorm<GpuTensor>,
    ) -> Result<QatForward> {
        use kernels::batch_norm::download4;
        let ctx = &*self.ctx;
        let sv = &fwd.saved;
        let conv_out = match &sv.conv_out {
            Some(c) => c.clone(),
            None => kernels::conv_bn::qat_conv_out_of(
                ctx,
                &sv.bn_input,
                &sv.scale_factor,
                &gconv(conv),
            )?,
        };
        let bn_out = match &sv.bn_out {
            Some(b) => b.clone(),
            None => kernels::conv_bn::qat_bn_out_of(
                ctx,
                &sv.bn_input,
                &sv.stats,
                &self.pack_batch_norm(bn)?,
            )?,
        };
        let (mean, invstd) = self.stats_rows(&sv.stats)?;
        let d1 = |t: &GpuTensor| super::host::to1(t.download_f32(ctx)?, "per-channel vector");
        Ok(QatForward {
            y: download4(ctx, &fwd.y)?,
            running_mean: d1(&fwd.running_mean)?,
            running_var: d1(&fwd.running_var)?,
            weight_qparams: fwd.weight_qparams.download(ctx)?,
            saved: QatSaved {
                scale_factor: d1(&sv.scale_factor)?,
                weight_q: download4(ctx, &sv.weight_q)?,
                weight_mask: download4(ctx, &sv.weight_mask)?,
                conv_out: download4(ctx, &conv_out)?,
                bn_input: download4(ctx, &sv.bn_input)?,
                mean: d1(&mean)?,
                invstd: d1(&invstd)?,
                bn_out: download4(ctx, &bn_out)?,
            },
        })
    }

    fn qat_forward_from_host(
        &self,
        fwd: &QatForward,
    ) -> Result<QatStep<GpuTensor, GpuQParams, GpuQatState>> {
        let ctx = &*self.ctx;
        let sv = &fwd.saved;
        let c = sv.mean.len();
        if sv.invstd.len() != c {
            return Err(Error::shape(
                "batch_norm2d_backward saved invstd",
                &[c],
                sv.invstd.shape(),
            ));
        }
        let up = |a: ArrayD<f32>| GpuTensor::upload_f32(ctx, &a);
        let stats = kernels::batch_norm::upload_stats(ctx, &sv.mean, &sv.invstd)?;
        let bn_out = up(sv.bn_out.clone().into_dyn())?;
        Ok(QatStep {
            y: up(fwd.y.clone().into_dyn())?,
            running_mean: up(fwd.running_mean.clone().into_dyn())?,
            running_var: up(fwd.running_var.clone().into_dyn())?,
            weight_qparams: GpuQParams::upload(ctx, &fwd.weight_qparams)?,
            saved: GpuQatState {
                scale_factor: up(sv.scale_factor.clone().into_dyn())?,
                weight_q: up(sv.weight_q.clone().into_dyn())?,
                weight_mask: up(sv.weight_mask.clone().into_dyn())?,
                bn_input: up(sv.bn_input.clone().into_dyn())?,
                stats,
                bn_out: Some(bn_out.clone()),
                act_input: bn_out,
                conv_out: Some(up(sv.conv_out.clone().into_dyn())?),
            },
        })
    }
}
