//! [`HostOps`]: the host-array convenience layer over any [`Backend`]. Each call uploads its
//! arguments ([`Device::upload`]), runs the backend's op on its own tensors and downloads
//! the result. Checks on host values that a device cannot see before uploading (qparams
//! against the tensor) run first, so every backend refuses bad input with the CPU
//! reference's error.

use ndarray::{Array1, Array2, Array4, ArrayD, Dimension, Ix1, Ix2, Ix4};

use super::{upload_batch_norm, upload_conv2d, Backend, Device};
use crate::error::{Error, Result};
use crate::ops::{
    Activation, BatchNorm, BatchNormGrads, BatchNormOutput, Conv2d, Conv2dGrads, Conv2dParams,
    ConvTranspose2dParams, Folded, QatConfig, QatForward, QatGrads, QatWeightQuant,
};
use crate::quant::{AddRequant, ObserverSpec, QParams, QuantRange, Requant};

/// Every operation of qfuse on host `ndarray` arrays, on one backend (object safe: use it
/// as `&dyn HostOps`). Implemented for every [`Backend`] by uploading, running the
/// backend's op and downloading; see [`crate::reference`] for the exact semantics of each.
/// Code that keeps data on the device uses the op-family traits ([`super::FloatOps`], ...)
/// on the backend's tensors instead.
pub trait HostOps {
    /// A human-readable name (`cpu`, or `gpu (adapter name, backend)`).
    fn name(&self) -> String;

    /// Folds BatchNorm into a conv weight of any rank (`torch.nn.utils.fusion.fuse_conv_bn_weights`).
    /// `transpose`: the weight is a ConvTranspose weight `[Cin, Cout/g, k...]`.
    fn fold_conv_bn(
        &self,
        weight: &ArrayD<f32>,
        bias: Option<&Array1<f32>>,
        bn: &BatchNorm,
        transpose: bool,
    ) -> Result<Folded>;

    /// Folds BatchNorm1d into a linear layer (`torch.nn.utils.fusion.fuse_linear_bn_weights`).
    fn fold_linear_bn(
        &self,
        weight: &Array2<f32>,
        bias: Option<&Array1<f32>>,
        bn: &BatchNorm,
    ) -> Result<Folded>;

    /// Fake quantization, per tensor or per channel (`torch.fake_quantize_per_{tensor,channel}_affine`).
    fn fake_quant(&self, x: &ArrayD<f32>, qp: &QParams, range: QuantRange) -> Result<ArrayD<f32>>;

    /// Straight-through gradient of [`HostOps::fake_quant`]: `dy` where the rounded value is in range, else 0.
    fn fake_quant_backward(
        &self,
        x: &ArrayD<f32>,
        dy: &ArrayD<f32>,
        qp: &QParams,
        range: QuantRange,
    ) -> Result<ArrayD<f32>>;

    /// Observes `x` once and returns its qparams (`MinMaxObserver` / `PerChannelMinMaxObserver`
    /// then `calculate_qparams`).
    fn calc_qparams(&self, x: &ArrayD<f32>, spec: &ObserverSpec) -> Result<QParams>;

    /// conv2d (`torch.nn.functional.conv2d`), NCHW input, OIHW weight.
    fn conv2d(
        &self,
        x: &Array4<f32>,
        weight: &Array4<f32>,
        bias: Option<&Array1<f32>>,
        params: &Conv2dParams,
    ) -> Result<Array4<f32>> {
        self.conv2d_act(x, weight, bias, params, Activation::None)
    }

    /// Gradients of conv2d for upstream `dy`.
    fn conv2d_backward(
        &self,
        x: &Array4<f32>,
        weight: &Array4<f32>,
        dy: &Array4<f32>,
        params: &Conv2dParams,
    ) -> Result<Conv2dGrads>;

    /// BatchNorm2d forward (`torch.nn.functional.batch_norm`): batch statistics and running
    /// update when `training`, running statistics otherwise.
    fn batch_norm2d(
        &self,
        x: &Array4<f32>,
        bn: &BatchNorm,
        training: bool,
    ) -> Result<BatchNormOutput> {
        self.batch_norm2d_act(x, bn, training, Activation::None)
    }

    /// Gradients of BatchNorm2d given the forward's `mean`/`invstd`.
    fn batch_norm2d_backward(
        &self,
        x: &Array4<f32>,
        dy: &Array4<f32>,
        bn: &BatchNorm,
        fwd: &BatchNormOutput,
        training: bool,
    ) -> Result<BatchNormGrads>;

    /// Elementwise activation.
    fn activation(&self, x: &ArrayD<f32>, act: Activation) -> Result<ArrayD<f32>>;

    /// Gradient of the activation at input `x` for upstream `dy`.
    fn activation_backward(
        &self,
        x: &ArrayD<f32>,
        dy: &ArrayD<f32>,
        act: Activation,
    ) -> Result<ArrayD<f32>>;

    /// Fused eval forward of conv+bn+act: folds BN, then one conv with bias and activation.
    /// Returns the output and the folded parameters.
    fn conv_bn_act_eval(
        &self,
        x: &Array4<f32>,
        conv: &Conv2d,
        bn: &BatchNorm,
        act: Activation,
    ) -> Result<(Array4<f32>, Folded)>;

    /// `ConvBn2d` / `ConvBnReLU2d` QAT forward in training mode (PyTorch's step, NaN where
    /// γ = 0 as PyTorch gives).
    fn conv_bn_qat_forward(
        &self,
        x: &Array4<f32>,
        conv: &Conv2d,
        bn: &BatchNorm,
        cfg: &QatConfig,
    ) -> Result<QatForward>;

    /// The QAT step that qfuse's QAT modules ([`crate::qat`]) run: as
    /// [`HostOps::conv_bn_qat_forward`], with the weight fake quant's qparams given or
    /// observed and fake quant switchable (`weight`), and finite where γ = 0 (PyTorch gives
    /// NaN there): see [`crate::reference::conv_bn::conv_bn_qat_forward_with`] for the exact
    /// semantics. Its backward is [`HostOps::conv_bn_qat_backward`].
    fn conv_bn_qat_forward_with(
        &self,
        x: &Array4<f32>,
        conv: &Conv2d,
        bn: &BatchNorm,
        cfg: &QatConfig,
        weight: &QatWeightQuant,
    ) -> Result<QatForward>;

    /// Backward of [`HostOps::conv_bn_qat_forward`] (or of
    /// [`HostOps::conv_bn_qat_forward_with`]) for upstream `dy`.
    fn conv_bn_qat_backward(
        &self,
        x: &Array4<f32>,
        dy: &Array4<f32>,
        conv: &Conv2d,
        bn: &BatchNorm,
        cfg: &QatConfig,
        fwd: &QatForward,
    ) -> Result<QatGrads>;

    /// 2-D max pooling, no padding (`torch.nn.functional.max_pool2d`).
    fn max_pool2d(&self, x: &Array4<f32>, kernel: usize, stride: usize) -> Result<Array4<f32>>;

    /// Linear layer `x · Wᵀ + b` (`torch.nn.functional.linear`), x `[N, in]`, W `[out, in]`.
    fn linear(
        &self,
        x: &Array2<f32>,
        weight: &Array2<f32>,
        bias: Option<&Array1<f32>>,
    ) -> Result<Array2<f32>> {
        self.linear_act(x, weight, bias, Activation::None)
    }

    /// `log_softmax` along dim 1 of `[N, C]`.
    fn log_softmax(&self, x: &Array2<f32>) -> Result<Array2<f32>>;

    /// Transposed conv2d (`torch.nn.functional.conv_transpose2d`): NCHW input `[N, Cin, H, W]`,
    /// weight `[Cin, Cout/groups, KH, KW]`, output `[N, Cout, OH, OW]` (see
    /// [`ConvTranspose2dParams::output_shape`]).
    fn conv_transpose2d(
        &self,
        x: &Array4<f32>,
        weight: &Array4<f32>,
        bias: Option<&Array1<f32>>,
        params: &ConvTranspose2dParams,
    ) -> Result<Array4<f32>> {
        self.conv_transpose2d_act(x, weight, bias, params, Activation::None)
    }

    /// `act(conv2d(x, weight, bias))`: a conv with bias and activation (the forward of a fused
    /// eval `ConvReLU2d` whose BatchNorm is already folded).
    fn conv2d_act(
        &self,
        x: &Array4<f32>,
        weight: &Array4<f32>,
        bias: Option<&Array1<f32>>,
        params: &Conv2dParams,
        act: Activation,
    ) -> Result<Array4<f32>>;

    /// `act(conv_transpose2d(x, weight, bias))`.
    fn conv_transpose2d_act(
        &self,
        x: &Array4<f32>,
        weight: &Array4<f32>,
        bias: Option<&Array1<f32>>,
        params: &ConvTranspose2dParams,
        act: Activation,
    ) -> Result<Array4<f32>>;

    /// `act(linear(x, weight, bias))`.
    fn linear_act(
        &self,
        x: &Array2<f32>,
        weight: &Array2<f32>,
        bias: Option<&Array1<f32>>,
        act: Activation,
    ) -> Result<Array2<f32>>;

    /// Quantizes `x` to 8-bit codes with `qp` (per tensor or per channel):
    /// [`crate::reference::int8::quantize`].
    fn quantize(&self, x: &ArrayD<f32>, qp: &QParams, range: QuantRange) -> Result<ArrayD<i8>>;

    /// Dequantizes codes: [`crate::reference::int8::dequantize`].
    fn dequantize(&self, q: &ArrayD<i8>, qp: &QParams) -> Result<ArrayD<f32>>;

    /// Integer conv2d with requantization and the activation clamp in its epilogue:
    /// [`crate::reference::int8::conv2d_int8`].
    fn conv2d_int8(
        &self,
        x: &Array4<i8>,
        x_zero_point: i32,
        weight: &Array4<i8>,
        bias: Option<&Array1<i32>>,
        params: &Conv2dParams,
        requant: &Requant,
    ) -> Result<Array4<i8>>;

    /// Integer linear layer with requantization: [`crate::reference::int8::linear_int8`].
    fn linear_int8(
        &self,
        x: &Array2<i8>,
        x_zero_point: i32,
        weight: &Array2<i8>,
        bias: Option<&Array1<i32>>,
        requant: &Requant,
    ) -> Result<Array2<i8>>;

    /// Max pooling on codes: [`crate::reference::int8::max_pool2d_int8`].
    fn max_pool2d_int8(&self, x: &Array4<i8>, kernel: usize, stride: usize) -> Result<Array4<i8>>;

    /// Quantized elementwise add with clamp: [`crate::reference::int8::add_int8`].
    fn add_int8(&self, a: &ArrayD<i8>, b: &ArrayD<i8>, add: &AddRequant) -> Result<ArrayD<i8>>;

    /// BatchNorm2d forward followed by an activation: as [`HostOps::batch_norm2d`], with `y`
    /// replaced by `act(y)` (the forward of a `BNReLU2d`).
    fn batch_norm2d_act(
        &self,
        x: &Array4<f32>,
        bn: &BatchNorm,
        training: bool,
        act: Activation,
    ) -> Result<BatchNormOutput>;
}

/// A downloaded array in dimensionality `D` (a backend that breaks an op's rank contract
/// gets this error).
pub(crate) fn into_dim<T, D: Dimension>(a: ArrayD<T>, what: &str) -> Result<ndarray::Array<T, D>> {
    a.into_dimensionality::<D>()
        .map_err(|e| Error::invalid(format!("internal: {what} has the wrong rank: {e}")))
}

pub(crate) fn to1(a: ArrayD<f32>, what: &str) -> Result<Array1<f32>> {
    into_dim::<f32, Ix1>(a, what)
}

fn up<B: Device, D: Dimension>(b: &B, a: &ndarray::Array<f32, D>) -> Result<B::Tensor> {
    b.upload(&a.view().into_dyn().to_owned())
}

fn up_opt<B: Device>(b: &B, a: Option<&Array1<f32>>) -> Result<Option<B::Tensor>> {
    a.map(|a| up(b, a)).transpose()
}

fn down4<B: Device>(b: &B, t: &B::Tensor, what: &str) -> Result<Array4<f32>> {
    into_dim::<f32, Ix4>(b.download(t)?, what)
}

fn down1<B: Device>(b: &B, t: &B::Tensor, what: &str) -> Result<Array1<f32>> {
    to1(b.download(t)?, what)
}

fn down_folded<B: Device>(b: &B, f: &Folded<B::Tensor, B::Tensor>) -> Result<Folded> {
    Ok(Folded {
        weight: b.download(&f.weight)?,
        bias: down1(b, &f.bias, "folded bias")?,
    })
}

fn down_bn_out<B: Device>(
    b: &B,
    o: &BatchNormOutput<B::Tensor, B::Tensor>,
) -> Result<BatchNormOutput> {
    Ok(BatchNormOutput {
        y: down4(b, &o.y, "batch_norm2d output")?,
        running_mean: down1(b, &o.running_mean, "running mean")?,
        running_var: down1(b, &o.running_var, "running variance")?,
        mean: down1(b, &o.mean, "mean")?,
        invstd: down1(b, &o.invstd, "invstd")?,
    })
}

impl<B: Backend> HostOps for B {
    fn name(&self) -> String {
        Device::name(self)
    }

    fn fold_conv_bn(
        &self,
        weight: &ArrayD<f32>,
        bias: Option<&Array1<f32>>,
        bn: &BatchNorm,
        transpose: bool,
    ) -> Result<Folded> {
        crate::ops::check_conv_weight_rank(weight.shape())?;
        let gbn = upload_batch_norm(self, bn)?;
        let w = self.upload(weight)?;
        let b = up_opt(self, bias)?;
        let f = super::QuantOps::fold_conv_bn(self, &w, b.as_ref(), &gbn, transpose)?;
        down_folded(self, &f)
    }

    fn fold_linear_bn(
        &self,
        weight: &Array2<f32>,
        bias: Option<&Array1<f32>>,
        bn: &BatchNorm,
    ) -> Result<Folded> {
        let gbn = upload_batch_norm(self, bn)?;
        let w = up(self, weight)?;
        let b = up_opt(self, bias)?;
        let f = super::QuantOps::fold_linear_bn(self, &w, b.as_ref(), &gbn)?;
        down_folded(self, &f)
    }

    fn fake_quant(&self, x: &ArrayD<f32>, qp: &QParams, range: QuantRange) -> Result<ArrayD<f32>> {
        qp.validate(x.shape(), range)?;
        let gx = self.upload(x)?;
        let gqp = self.upload_qparams(qp)?;
        self.download(&super::QuantOps::fake_quant(self, &gx, &gqp, range)?)
    }

    fn fake_quant_backward(
        &self,
        x: &ArrayD<f32>,
        dy: &ArrayD<f32>,
        qp: &QParams,
        range: QuantRange,
    ) -> Result<ArrayD<f32>> {
        qp.validate(x.shape(), range)?;
        if dy.shape() != x.shape() {
            return Err(Error::shape(
                "fake_quantize_backward (dy vs x)",
                x.shape(),
                dy.shape(),
            ));
        }
        let gx = self.upload(x)?;
        let gdy = self.upload(dy)?;
        let gqp = self.upload_qparams(qp)?;
        self.download(&super::QuantOps::fake_quant_backward(
            self, &gx, &gdy, &gqp, range,
        )?)
    }

    fn calc_qparams(&self, x: &ArrayD<f32>, spec: &ObserverSpec) -> Result<QParams> {
        let gx = self.upload(x)?;
        self.download_qparams(&super::QuantOps::calc_qparams(self, &gx, spec)?)
    }

    fn conv2d_backward(
        &self,
        x: &Array4<f32>,
        weight: &Array4<f32>,
        dy: &Array4<f32>,
        params: &Conv2dParams,
    ) -> Result<Conv2dGrads> {
        let g = super::FloatOps::conv2d_backward(
            self,
            &up(self, x)?,
            &up(self, weight)?,
            &up(self, dy)?,
            params,
        )?;
        Ok(Conv2dGrads {
            dx: down4(self, &g.dx, "conv2d dx")?,
            dweight: down4(self, &g.dweight, "conv2d dweight")?,
            dbias: down1(self, &g.dbias, "conv2d dbias")?,
        })
    }

    fn batch_norm2d_backward(
        &self,
        x: &Array4<f32>,
        dy: &Array4<f32>,
        bn: &BatchNorm,
        fwd: &BatchNormOutput,
        training: bool,
    ) -> Result<BatchNormGrads> {
        let gbn = upload_batch_norm(self, bn)?;
        let gfwd = BatchNormOutput {
            y: up(self, &fwd.y)?,
            running_mean: up(self, &fwd.running_mean)?,
            running_var: up(self, &fwd.running_var)?,
            mean: up(self, &fwd.mean)?,
            invstd: up(self, &fwd.invstd)?,
        };
        let g = super::FloatOps::batch_norm2d_backward(
            self,
            &up(self, x)?,
            &up(self, dy)?,
            &gbn,
            &gfwd,
            training,
        )?;
        Ok(BatchNormGrads {
            dx: down4(self, &g.dx, "batch_norm2d dx")?,
            dweight: down1(self, &g.dweight, "batch_norm2d dweight")?,
            dbias: down1(self, &g.dbias, "batch_norm2d dbias")?,
        })
    }

    fn activation(&self, x: &ArrayD<f32>, act: Activation) -> Result<ArrayD<f32>> {
        let gx = self.upload(x)?;
        self.download(&super::FloatOps::activation(self, &gx, act)?)
    }

    fn activation_backward(
        &self,
        x: &ArrayD<f32>,
        dy: &ArrayD<f32>,
        act: Activation,
    ) -> Result<ArrayD<f32>> {
        let gx = self.upload(x)?;
        let gdy = self.upload(dy)?;
        self.download(&super::FloatOps::activation_backward(self, &gx, &gdy, act)?)
    }

    fn conv_bn_act_eval(
        &self,
        x: &Array4<f32>,
        conv: &Conv2d,
        bn: &BatchNorm,
        act: Activation,
    ) -> Result<(Array4<f32>, Folded)> {
        let gbn = upload_batch_norm(self, bn)?;
        let gconv = upload_conv2d(self, conv)?;
        let (y, f) = super::FusedOps::conv_bn_act_eval(self, &up(self, x)?, &gconv, &gbn, act)?;
        Ok((
            down4(self, &y, "conv_bn_act_eval output")?,
            down_folded(self, &f)?,
        ))
    }

    fn conv_bn_qat_forward(
        &self,
        x: &Array4<f32>,
        conv: &Conv2d,
        bn: &BatchNorm,
        cfg: &QatConfig,
    ) -> Result<QatForward> {
        let gbn = upload_batch_norm(self, bn)?;
        let gconv = upload_conv2d(self, conv)?;
        let f =
            super::FusedOps::conv_bn_qat_forward_pytorch(self, &up(self, x)?, &gconv, &gbn, cfg)?;
        self.qat_forward_to_host(&f, &gconv, &gbn)
    }

    fn conv_bn_qat_forward_with(
        &self,
        x: &Array4<f32>,
        conv: &Conv2d,
        bn: &BatchNorm,
        cfg: &QatConfig,
        weight: &QatWeightQuant,
    ) -> Result<QatForward> {
        let gbn = upload_batch_norm(self, bn)?;
        let gconv = upload_conv2d(self, conv)?;
        let gweight = QatWeightQuant {
            qparams: weight
                .qparams
                .as_ref()
                .map(|q| self.upload_qparams(q))
                .transpose()?,
            fake_quant_enabled: weight.fake_quant_enabled,
        };
        let f =
            super::FusedOps::conv_bn_qat_forward(self, &up(self, x)?, &gconv, &gbn, cfg, &gweight)?;
        self.qat_forward_to_host(&f, &gconv, &gbn)
    }

    fn conv_bn_qat_backward(
        &self,
        x: &Array4<f32>,
        dy: &Array4<f32>,
        conv: &Conv2d,
        bn: &BatchNorm,
        cfg: &QatConfig,
        fwd: &QatForward,
    ) -> Result<QatGrads> {
        // The CPU reference's checks, in its order and with its messages, before anything
        // crosses to the device.
        crate::reference::conv_bn::check_qat_backward(x, dy, conv, bn, fwd)?;
        let gbn = upload_batch_norm(self, bn)?;
        let gconv = upload_conv2d(self, conv)?;
        let gfwd = self.qat_forward_from_host(fwd)?;
        let g = super::FusedOps::conv_bn_qat_backward(
            self,
            &up(self, x)?,
            &up(self, dy)?,
            &gconv,
            &gbn,
            cfg,
            &gfwd,
        )?;
        Ok(QatGrads {
            dx: down4(self, &g.dx, "QAT dx")?,
            dweight: down4(self, &g.dweight, "QAT dweight")?,
            dbias: g
                .dbias
                .as_ref()
                .map(|t| down1(self, t, "QAT dbias"))
                .transpose()?,
            dbn_weight: down1(self, &g.dbn_weight, "QAT dbn_weight")?,
            dbn_bias: down1(self, &g.dbn_bias, "QAT dbn_bias")?,
        })
    }

    fn max_pool2d(&self, x: &Array4<f32>, kernel: usize, stride: usize) -> Result<Array4<f32>> {
        let y = super::FloatOps::max_pool2d(self, &up(self, x)?, kernel, stride)?;
        down4(self, &y, "max_pool2d output")
    }

    fn log_softmax(&self, x: &Array2<f32>) -> Result<Array2<f32>> {
        let y = super::FloatOps::log_softmax(self, &up(self, x)?)?;
        into_dim::<f32, Ix2>(self.download(&y)?, "log_softmax output")
    }

    fn conv2d_act(
        &self,
        x: &Array4<f32>,
        weight: &Array4<f32>,
        bias: Option<&Array1<f32>>,
        params: &Conv2dParams,
        act: Activation,
    ) -> Result<Array4<f32>> {
        let out = params.output_shape(x.shape(), weight.shape())?;
        if let Some(b) = bias {
            if b.len() != out[1] {
                return Err(Error::shape("conv2d bias", &[out[1]], b.shape()));
            }
        }
        let y = super::FloatOps::conv2d(
            self,
            &up(self, x)?,
            &up(self, weight)?,
            up_opt(self, bias)?.as_ref(),
            params,
            act,
        )?;
        down4(self, &y, "conv2d output")
    }

    fn conv_transpose2d_act(
        &self,
        x: &Array4<f32>,
        weight: &Array4<f32>,
        bias: Option<&Array1<f32>>,
        params: &ConvTranspose2dParams,
        act: Activation,
    ) -> Result<Array4<f32>> {
        let out = params.output_shape(x.shape(), weight.shape())?;
        if let Some(b) = bias {
            if b.len() != out[1] {
                return Err(Error::shape("conv_transpose2d bias", &[out[1]], b.shape()));
            }
        }
        let y = super::FloatOps::conv_transpose2d(
            self,
            &up(self, x)?,
            &up(self, weight)?,
            up_opt(self, bias)?.as_ref(),
            params,
            act,
        )?;
        down4(self, &y, "conv_transpose2d output")
    }

    fn linear_act(
        &self,
        x: &Array2<f32>,
        weight: &Array2<f32>,
        bias: Option<&Array1<f32>>,
        act: Activation,
    ) -> Result<Array2<f32>> {
        let y = super::FloatOps::linear(
            self,
            &up(self, x)?,
            &up(self, weight)?,
            up_opt(self, bias)?.as_ref(),
            act,
        )?;
        into_dim::<f32, Ix2>(self.download(&y)?, "linear output")
    }

    fn quantize(&self, x: &ArrayD<f32>, qp: &QParams, range: QuantRange) -> Result<ArrayD<i8>> {
        range.check_int8_codes()?;
        qp.validate(x.shape(), range)?;
        let gx = self.upload(x)?;
        let gqp = self.upload_qparams(qp)?;
        self.download_codes(&super::Int8Ops::quantize(self, &gx, &gqp, range)?)
    }

    fn dequantize(&self, q: &ArrayD<i8>, qp: &QParams) -> Result<ArrayD<f32>> {
        qp.validate(q.shape(), QuantRange::new(-128, 127)?)?;
        let gq = self.upload_codes(q)?;
        let gqp = self.upload_qparams(qp)?;
        self.download(&super::Int8Ops::dequantize(self, &gq, &gqp)?)
    }

    fn conv2d_int8(
        &self,
        x: &Array4<i8>,
        x_zero_point: i32,
        weight: &Array4<i8>,
        bias: Option<&Array1<i32>>,
        params: &Conv2dParams,
        requant: &Requant,
    ) -> Result<Array4<i8>> {
        params.output_shape(x.shape(), weight.shape())?;
        let layer = self.prepare_conv2d_int8(x_zero_point, weight, bias, params, requant)?;
        let gx = self.upload_codes(&x.view().into_dyn().to_owned())?;
        let y = super::Int8Ops::conv2d_int8(self, &layer, &gx)?;
        into_dim::<i8, Ix4>(self.download_codes(&y)?, "conv2d_int8 output")
    }

    fn linear_int8(
        &self,
        x: &Array2<i8>,
        x_zero_point: i32,
        weight: &Array2<i8>,
        bias: Option<&Array1<i32>>,
        requant: &Requant,
    ) -> Result<Array2<i8>> {
        crate::ops::check_linear_int8_input(x.shape(), weight.shape())?;
        let layer = self.prepare_linear_int8(x_zero_point, weight, bias, requant)?;
        let gx = self.upload_codes(&x.view().into_dyn().to_owned())?;
        let y = super::Int8Ops::linear_int8(self, &layer, &gx)?;
        into_dim::<i8, Ix2>(self.download_codes(&y)?, "linear_int8 output")
    }

    fn max_pool2d_int8(&self, x: &Array4<i8>, kernel: usize, stride: usize) -> Result<Array4<i8>> {
        let gx = self.upload_codes(&x.view().into_dyn().to_owned())?;
        let y = super::Int8Ops::max_pool2d_int8(self, &gx, kernel, stride)?;
        into_dim::<i8, Ix4>(self.download_codes(&y)?, "max_pool2d_int8 output")
    }

    fn add_int8(&self, a: &ArrayD<i8>, b: &ArrayD<i8>, add: &AddRequant) -> Result<ArrayD<i8>> {
        if a.shape() != b.shape() {
            return Err(Error::shape("quantized add", a.shape(), b.shape()));
        }
        add.validate()?;
        let ga = self.upload_codes(a)?;
        let gb = self.upload_codes(b)?;
        self.download_codes(&super::Int8Ops::add_int8(self, &ga, &gb, add)?)
    }

    fn batch_norm2d_act(
        &self,
        x: &Array4<f32>,
        bn: &BatchNorm,
        training: bool,
        act: Activation,
    ) -> Result<BatchNormOutput> {
        let gbn = upload_batch_norm(self, bn)?;
        let o = super::FloatOps::batch_norm2d(self, &up(self, x)?, &gbn, training, act)?;
        down_bn_out(self, &o)
    }
}
