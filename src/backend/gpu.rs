//! The GPU backend: WGSL kernels via wgpu behind the [`Backend`] interface.

use std::sync::Arc;

use ndarray::{Array1, Array2, Array4, ArrayD, Ix1};

use super::Backend;
use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor};
use crate::kernels::{self, GpuBatchNorm, GpuQParams};
use crate::ops::{
    Activation, BatchNorm, BatchNormGrads, BatchNormOutput, Conv2d, Conv2dGrads, Conv2dParams,
    ConvTranspose2dParams, Folded, QatConfig, QatForward, QatGrads, QatWeightQuant,
};
use crate::quant::{AddRequant, ObserverSpec, QParams, QuantRange, Requant};

/// Runs every operation on a GPU through [`crate::kernels`]: uploads the host arrays, runs
/// the kernels, downloads the results. Validation happens on the host first, with the same
/// errors as [`crate::CpuBackend`].
///
/// Each call is self-contained (upload, kernels, download); to keep data on the device
/// between ops, use [`crate::kernels`] on [`GpuTensor`]s directly.
#[derive(Debug, Clone)]
pub struct GpuBackend {
    ctx: Arc<GpuContext>,
}

fn to_array1(a: ArrayD<f32>) -> Result<Array1<f32>> {
    a.into_dimensionality::<Ix1>()
        .map_err(|e| Error::Gpu(format!("internal: folded bias is not 1-D: {e}")))
}

impl GpuBackend {
    /// A backend on an existing context (shared with other users through the `Arc`).
    pub fn new(ctx: Arc<GpuContext>) -> Self {
        Self { ctx }
    }

    /// A backend on a context opened from the system ([`GpuContext::new`]).
    ///
    /// Errors: [`Error::NoAdapter`], [`Error::Gpu`].
    pub fn from_system() -> Result<Self> {
        Ok(Self::new(Arc::new(GpuContext::new()?)))
    }

    /// The context.
    pub fn context(&self) -> &Arc<GpuContext> {
        &self.ctx
    }

    fn upload_opt(&self, a: Option<&Array1<f32>>) -> Result<Option<GpuTensor>> {
        a.map(|b| GpuTensor::upload_f32(&self.ctx, &b.clone().into_dyn()))
            .transpose()
    }

    /// Uploads `x`, `weight` and `bias`, runs `launch` with a bias + activation epilogue, and
    /// downloads the 4-D result (the shared body of conv2d and conv_transpose2d).
    fn run_conv(
        &self,
        op: &str,
        x: &Array4<f32>,
        weight: &Array4<f32>,
        bias: Option<&Array1<f32>>,
        act: Activation,
        launch: impl FnOnce(
            &GpuContext,
            &GpuTensor,
            &GpuTensor,
            &kernels::conv2d::ConvEpilogue,
        ) -> Result<GpuTensor>,
    ) -> Result<Array4<f32>> {
        let gx = GpuTensor::upload_f32(&self.ctx, &x.clone().into_dyn())?;
        let gw = GpuTensor::upload_f32(&self.ctx, &weight.clone().into_dyn())?;
        let gb = self.upload_opt(bias)?;
        let epilogue = kernels::conv2d::ConvEpilogue {
            bias: gb.as_ref(),
            out_scale: None,
            activation: act,
        };
        launch(&self.ctx, &gx, &gw, &epilogue)?
            .download_f32(&self.ctx)?
            .into_dimensionality::<ndarray::Ix4>()
            .map_err(|e| Error::Gpu(format!("internal: {op} output is not 4-D: {e}")))
    }

    fn download_folded(&self, w: GpuTensor, b: GpuTensor) -> Result<Folded> {
        Ok(Folded {
            weight: w.download_f32(&self.ctx)?,
            bias: to_array1(b.download_f32(&self.ctx)?)?,
        })
    }

    /// The host form of a GPU QAT forward.
    fn download_qat_forward(
        &self,
        f: &kernels::conv_bn::GpuQatForward,
        gconv: &kernels::conv_bn::GpuConv2d,
    ) -> Result<QatForward> {
        use kernels::batch_norm::{download4, download_rows};
        let ctx = &*self.ctx;
        let conv_out = kernels::conv_bn::qat_conv_out(ctx, f, gconv)?;
        let rows = |t: &GpuTensor| -> Result<[Array1<f32>; 2]> {
            download_rows(ctx, t)?
                .try_into()
                .map_err(|_| Error::Gpu("internal: per-channel stats are not [2, C]".into()))
        };
        let [mean, invstd] = rows(&f.stats.stats)?;
        let [running_mean, running_var] = rows(&f.stats.running)?;
        Ok(QatForward {
            y: download4(ctx, &f.y)?,
            running_mean,
            running_var,
            weight_qparams: f.weight_qparams.download(ctx)?,
            saved: crate::ops::QatSaved {
                scale_factor: to_array1(f.scale_factor.download_f32(ctx)?)?,
                weight_q: download4(ctx, &f.weight_q)?,
                weight_mask: download4(ctx, &f.weight_mask)?,
                conv_out: download4(ctx, &conv_out)?,
                bn_input: download4(ctx, &f.bn_input)?,
                mean,
                invstd,
                bn_out: download4(ctx, &f.bn_out)?,
            },
        })
    }
}

impl Backend for GpuBackend {
    fn name(&self) -> String {
        format!("gpu ({})", self.ctx.name())
    }

    fn fold_conv_bn(
        &self,
        weight: &ArrayD<f32>,
        bias: Option<&Array1<f32>>,
        bn: &BatchNorm,
        transpose: bool,
    ) -> Result<Folded> {
        kernels::fold::check_conv_weight_rank(weight.shape())?;
        let gbn = GpuBatchNorm::upload(&self.ctx, bn)?;
        let w = GpuTensor::upload_f32(&self.ctx, weight)?;
        let b = self.upload_opt(bias)?;
        let (w, b) = kernels::fold::fold_conv_bn(&self.ctx, &w, b.as_ref(), &gbn, transpose)?;
        self.download_folded(w, b)
    }

    fn fold_linear_bn(
        &self,
        weight: &Array2<f32>,
        bias: Option<&Array1<f32>>,
        bn: &BatchNorm,
    ) -> Result<Folded> {
        let gbn = GpuBatchNorm::upload(&self.ctx, bn)?;
        let w = GpuTensor::upload_f32(&self.ctx, &weight.clone().into_dyn())?;
        let b = self.upload_opt(bias)?;
        let (w, b) = kernels::fold::fold_linear_bn(&self.ctx, &w, b.as_ref(), &gbn)?;
        self.download_folded(w, b)
    }

    fn fake_quant(&self, x: &ArrayD<f32>, qp: &QParams, range: QuantRange) -> Result<ArrayD<f32>> {
        qp.validate(x.shape(), range)?;
        let gx = GpuTensor::upload_f32(&self.ctx, x)?;
        let gqp = GpuQParams::upload(&self.ctx, qp)?;
        kernels::fake_quant::fake_quant(&self.ctx, &gx, &gqp, range)?.download_f32(&self.ctx)
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
        let gx = GpuTensor::upload_f32(&self.ctx, x)?;
        let gdy = GpuTensor::upload_f32(&self.ctx, dy)?;
        let gqp = GpuQParams::upload(&self.ctx, qp)?;
        kernels::fake_quant::fake_quant_backward(&self.ctx, &gx, &gdy, &gqp, range)?
            .download_f32(&self.ctx)
    }

    fn calc_qparams(&self, x: &ArrayD<f32>, spec: &ObserverSpec) -> Result<QParams> {
        spec.validate()?;
        if spec.qscheme.is_per_channel() {
            spec.channel_axis(x.ndim())?;
        }
        let gx = GpuTensor::upload_f32(&self.ctx, x)?;
        kernels::observer::observe(&self.ctx, &gx, spec)?.download(&self.ctx)
    }

    fn conv2d(
        &self,
        x: &Array4<f32>,
        weight: &Array4<f32>,
        bias: Option<&Array1<f32>>,
        params: &Conv2dParams,
    ) -> Result<Array4<f32>> {
        self.conv2d_act(x, weight, bias, params, Activation::None)
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
        self.run_conv("conv2d", x, weight, bias, act, |ctx, gx, gw, epilogue| {
            kernels::conv2d::conv2d(ctx, gx, gw, params, epilogue)
        })
    }

    fn conv_transpose2d(
        &self,
        x: &Array4<f32>,
        weight: &Array4<f32>,
        bias: Option<&Array1<f32>>,
        params: &ConvTranspose2dParams,
    ) -> Result<Array4<f32>> {
        self.conv_transpose2d_act(x, weight, bias, params, Activation::None)
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
        self.run_conv(
            "conv_transpose2d",
            x,
            weight,
            bias,
            act,
            |ctx, gx, gw, epilogue| {
                kernels::conv2d::conv_transpose2d(ctx, gx, gw, params, epilogue)
            },
        )
    }

    fn conv2d_backward(
        &self,
        x: &Array4<f32>,
        weight: &Array4<f32>,
        dy: &Array4<f32>,
        params: &Conv2dParams,
    ) -> Result<Conv2dGrads> {
        let out = params.output_shape(x.shape(), weight.shape())?;
        if dy.shape() != out {
            return Err(Error::shape(
                "conv2d_backward dy (forward output shape)",
                &out,
                dy.shape(),
            ));
        }
        let gx = GpuTensor::upload_f32(&self.ctx, &x.clone().into_dyn())?;
        let gw = GpuTensor::upload_f32(&self.ctx, &weight.clone().into_dyn())?;
        let gdy = GpuTensor::upload_f32(&self.ctx, &dy.clone().into_dyn())?;
        let x_shape = [x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]];
        let w_shape = [
            weight.shape()[0],
            weight.shape()[1],
            weight.shape()[2],
            weight.shape()[3],
        ];
        let dx = kernels::conv2d::conv2d_backward_input(&self.ctx, &gdy, &gw, params, x_shape)?;
        let dw = kernels::conv2d::conv2d_backward_weight(&self.ctx, &gx, &gdy, params, w_shape)?;
        let db = kernels::conv2d::channel_sum(&self.ctx, &gdy)?;
        let four = |a: ArrayD<f32>| {
            a.into_dimensionality::<ndarray::Ix4>()
                .map_err(|e| Error::Gpu(format!("internal: conv2d gradient is not 4-D: {e}")))
        };
        Ok(Conv2dGrads {
            dx: four(dx.download_f32(&self.ctx)?)?,
            dweight: four(dw.download_f32(&self.ctx)?)?,
            dbias: to_array1(db.download_f32(&self.ctx)?)?,
        })
    }

    fn batch_norm2d(
        &self,
        x: &Array4<f32>,
        bn: &BatchNorm,
        training: bool,
    ) -> Result<BatchNormOutput> {
        self.batch_norm2d_act(x, bn, training, Activation::None)
    }

    fn batch_norm2d_act(
        &self,
        x: &Array4<f32>,
        bn: &BatchNorm,
        training: bool,
        act: Activation,
    ) -> Result<BatchNormOutput> {
        use kernels::batch_norm as kbn;
        let gbn = GpuBatchNorm::upload(&self.ctx, bn)?;
        let gx = GpuTensor::upload_f32(&self.ctx, &x.clone().into_dyn())?;
        let out = kbn::batch_norm2d(&self.ctx, &gx, &gbn, bn.momentum, training, act, false)?;
        let [mean, invstd]: [Array1<f32>; 2] = kbn::download_rows(&self.ctx, &out.stats.stats)?
            .try_into()
            .map_err(|_| Error::Gpu("internal: batch_norm2d stats are not [2, C]".into()))?;
        let [running_mean, running_var]: [Array1<f32>; 2] =
            kbn::download_rows(&self.ctx, &out.stats.running)?
                .try_into()
                .map_err(|_| Error::Gpu("internal: batch_norm2d running is not [2, C]".into()))?;
        Ok(BatchNormOutput {
            y: kbn::download4(&self.ctx, &out.y)?,
            running_mean,
            running_var,
            mean,
            invstd,
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
        use kernels::batch_norm as kbn;
        let gbn = GpuBatchNorm::upload(&self.ctx, bn)?;
        let gx = GpuTensor::upload_f32(&self.ctx, &x.clone().into_dyn())?;
        kbn::check_input(&gx, &gbn)?;
        if dy.shape() != x.shape() {
            return Err(Error::shape(
                "batch_norm2d_backward dy (input shape)",
                x.shape(),
                dy.shape(),
            ));
        }
        let c = bn.channels();
        for (name, a) in [("mean", &fwd.mean), ("invstd", &fwd.invstd)] {
            if a.len() != c {
                return Err(Error::shape(
                    format!("batch_norm2d_backward saved {name}"),
                    &[c],
                    a.shape(),
                ));
            }
        }
        let gdy = GpuTensor::upload_f32(&self.ctx, &dy.clone().into_dyn())?;
        let stats = kbn::upload_stats(&self.ctx, &fwd.mean, &fwd.invstd)?;
        let g = kbn::batch_norm2d_backward(&self.ctx, &gx, &gdy, &gbn, &stats, training)?;
        let [dbias, dweight]: [Array1<f32>; 2] = kbn::download_rows(&self.ctx, &g.dparams)?
            .try_into()
            .map_err(|_| Error::Gpu("internal: batch_norm2d grads are not [2, C]".into()))?;
        Ok(BatchNormGrads {
            dx: kbn::download4(&self.ctx, &g.dx)?,
            dweight,
            dbias,
        })
    }

    fn activation(&self, x: &ArrayD<f32>, act: Activation) -> Result<ArrayD<f32>> {
        let gx = GpuTensor::upload_f32(&self.ctx, x)?;
        kernels::activation::activation(&self.ctx, &gx, act)?.download_f32(&self.ctx)
    }

    fn activation_backward(
        &self,
        x: &ArrayD<f32>,
        dy: &ArrayD<f32>,
        act: Activation,
    ) -> Result<ArrayD<f32>> {
        if x.shape() != dy.shape() {
            return Err(Error::shape(
                "activation_backward (dy vs x)",
                x.shape(),
                dy.shape(),
            ));
        }
        let gx = GpuTensor::upload_f32(&self.ctx, x)?;
        let gdy = GpuTensor::upload_f32(&self.ctx, dy)?;
        kernels::activation::activation_backward(&self.ctx, &gx, &gdy, act)?.download_f32(&self.ctx)
    }

    fn conv_bn_act_eval(
        &self,
        x: &Array4<f32>,
        conv: &Conv2d,
        bn: &BatchNorm,
        act: Activation,
    ) -> Result<(Array4<f32>, Folded)> {
        let gbn = GpuBatchNorm::upload(&self.ctx, bn)?;
        let gx = GpuTensor::upload_f32(&self.ctx, &x.clone().into_dyn())?;
        let gw = GpuTensor::upload_f32(&self.ctx, &conv.weight.clone().into_dyn())?;
        let gb = self.upload_opt(conv.bias.as_ref())?;
        let gconv = kernels::conv_bn::GpuConv2d {
            weight: &gw,
            bias: gb.as_ref(),
            params: conv.params,
        };
        let r = kernels::conv_bn::conv_bn_act_eval(&self.ctx, &gx, &gconv, &gbn, act)?;
        let y = kernels::batch_norm::download4(&self.ctx, &r.y)?;
        Ok((y, self.download_folded(r.weight, r.bias)?))
    }

    fn conv_bn_qat_forward(
        &self,
        x: &Array4<f32>,
        conv: &Conv2d,
        bn: &BatchNorm,
        cfg: &QatConfig,
    ) -> Result<QatForward> {
        let ctx = &*self.ctx;
        let gbn = GpuBatchNorm::upload(ctx, bn)?;
        let gx = GpuTensor::upload_f32(ctx, &x.clone().into_dyn())?;
        let gw = GpuTensor::upload_f32(ctx, &conv.weight.clone().into_dyn())?;
        let gb = self.upload_opt(conv.bias.as_ref())?;
        let gconv = kernels::conv_bn::GpuConv2d {
            weight: &gw,
            bias: gb.as_ref(),
            params: conv.params,
        };
        let f = kernels::conv_bn::conv_bn_qat_forward(ctx, &gx, &gconv, &gbn, bn.momentum, cfg)?;
        self.download_qat_forward(&f, &gconv)
    }

    fn conv_bn_qat_forward_with(
        &self,
        x: &Array4<f32>,
        conv: &Conv2d,
        bn: &BatchNorm,
        cfg: &QatConfig,
        weight: &QatWeightQuant,
    ) -> Result<QatForward> {
        let ctx = &*self.ctx;
        let gbn = GpuBatchNorm::upload(ctx, bn)?;
        // The finite γ = 0 form: s = 1 in those channels, through a scale BatchNorm whose γ
        // there is sqrt(running_var + eps), rounded as the shader rounds it (correctly).
        let zero = crate::reference::conv_bn::zero_gamma_channels(bn);
        let scale_bn = if zero.is_empty() {
            None
        } else {
            let mut sb = bn.clone();
            if let Some(w) = sb.weight.as_mut() {
                for &c in &zero {
                    w[c] = (bn.running_var[c] + bn.eps).sqrt();
                }
            }
            Some(GpuBatchNorm::upload(ctx, &sb)?)
        };
        let gqp = match &weight.qparams {
            Some(q) => Some(GpuQParams::upload(ctx, q)?),
            None => None,
        };
        let gx = GpuTensor::upload_f32(ctx, &x.clone().into_dyn())?;
        let gw = GpuTensor::upload_f32(ctx, &conv.weight.clone().into_dyn())?;
        let gb = self.upload_opt(conv.bias.as_ref())?;
        let gconv = kernels::conv_bn::GpuConv2d {
            weight: &gw,
            bias: gb.as_ref(),
            params: conv.params,
        };
        let gweight = kernels::conv_bn::GpuQatWeight {
            qparams: gqp.as_ref(),
            fake_quant_enabled: weight.fake_quant_enabled,
            scale_bn: scale_bn.as_ref(),
        };
        let f = kernels::conv_bn::conv_bn_qat_forward_with(
            ctx,
            &gx,
            &gconv,
            &gbn,
            bn.momentum,
            cfg,
            &gweight,
        )?;
        self.download_qat_forward(&f, &gconv)
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
        use kernels::batch_norm::{download4, upload_stats};
        let ctx = &*self.ctx;
        // The CPU reference's checks, in its order and with its messages.
        crate::reference::conv_bn::check_qat_backward(x, dy, conv, bn, fwd)?;
        let gbn = GpuBatchNorm::upload(ctx, bn)?;
        let o = conv.weight.shape()[0];
        let sv = &fwd.saved;
        for (name, a) in [("mean", &sv.mean), ("invstd", &sv.invstd)] {
            if a.len() != o {
                return Err(Error::shape(
                    format!("batch_norm2d_backward saved {name}"),
                    &[o],
                    a.shape(),
                ));
            }
        }
        let up4 = |a: &Array4<f32>| GpuTensor::upload_f32(ctx, &a.clone().into_dyn());
        let gx = up4(x)?;
        let gdy = up4(dy)?;
        let gw = up4(&conv.weight)?;
        let gb = self.upload_opt(conv.bias.as_ref())?;
        let gs = GpuTensor::upload_f32(ctx, &sv.scale_factor.clone().into_dyn())?;
        let gwq = up4(&sv.weight_q)?;
        let gmask = up4(&sv.weight_mask)?;
        let gbn_in = up4(&sv.bn_input)?;
        let gbn_out = up4(&sv.bn_out)?;
        let stats = upload_stats(ctx, &sv.mean, &sv.invstd)?;
        let gconv = kernels::conv_bn::GpuConv2d {
            weight: &gw,
            bias: gb.as_ref(),
            params: conv.params,
        };
        let saved = kernels::conv_bn::GpuQatSaved {
            scale_factor: &gs,
            weight_q: &gwq,
            weight_mask: &gmask,
            bn_input: &gbn_in,
            stats: &stats,
            act_input: &gbn_out,
        };
        let g = kernels::conv_bn::conv_bn_qat_backward(ctx, &gx, &gdy, &gconv, &gbn, cfg, &saved)?;
        let mut dbn_weight = to_array1(g.dbn_weight.download_f32(ctx)?)?;
        // Channels of the finite γ = 0 form (conv_bn_qat_forward_with): dγ is the BatchNorm
        // affine part only; the kernels add the weight-scaling and divide-back parts for
        // every channel, so those channels are recomputed on the host.
        for (c, v) in crate::reference::conv_bn::zero_gamma_bn_weight_grads(dy, bn, cfg, fwd)? {
            if let Some(d) = dbn_weight.get_mut(c) {
                *d = v;
            }
        }
        Ok(QatGrads {
            dx: download4(ctx, &g.dx)?,
            dweight: download4(ctx, &g.dweight)?,
            dbias: match &g.dbias {
                Some(t) => Some(to_array1(t.download_f32(ctx)?)?),
                None => None,
            },
            dbn_weight,
            dbn_bias: to_array1(g.dbn_bias.download_f32(ctx)?)?,
        })
    }

    fn max_pool2d(&self, x: &Array4<f32>, kernel: usize, stride: usize) -> Result<Array4<f32>> {
        let gx = GpuTensor::upload_f32(&self.ctx, &x.clone().into_dyn())?;
        kernels::pool::max_pool2d(&self.ctx, &gx, kernel, stride)?
            .download_f32(&self.ctx)?
            .into_dimensionality::<ndarray::Ix4>()
            .map_err(|e| Error::Gpu(format!("internal: max_pool2d output is not 4-D: {e}")))
    }

    fn linear(
        &self,
        x: &Array2<f32>,
        weight: &Array2<f32>,
        bias: Option<&Array1<f32>>,
    ) -> Result<Array2<f32>> {
        self.linear_act(x, weight, bias, Activation::None)
    }

    fn linear_act(
        &self,
        x: &Array2<f32>,
        weight: &Array2<f32>,
        bias: Option<&Array1<f32>>,
        act: Activation,
    ) -> Result<Array2<f32>> {
        let gx = GpuTensor::upload_f32(&self.ctx, &x.clone().into_dyn())?;
        let gw = GpuTensor::upload_f32(&self.ctx, &weight.clone().into_dyn())?;
        let gb = self.upload_opt(bias)?;
        kernels::linear::linear_act(&self.ctx, &gx, &gw, gb.as_ref(), act)?
            .download_f32(&self.ctx)?
            .into_dimensionality::<ndarray::Ix2>()
            .map_err(|e| Error::Gpu(format!("internal: linear output is not 2-D: {e}")))
    }

    fn log_softmax(&self, x: &Array2<f32>) -> Result<Array2<f32>> {
        let gx = GpuTensor::upload_f32(&self.ctx, &x.clone().into_dyn())?;
        kernels::pool::log_softmax(&self.ctx, &gx)?
            .download_f32(&self.ctx)?
            .into_dimensionality::<ndarray::Ix2>()
            .map_err(|e| Error::Gpu(format!("internal: log_softmax output is not 2-D: {e}")))
    }
    // Integer (deployed int8) ops: kernels::int8 on packed codes, bit-exact with the CPU
    // reference; validation first, with the reference's errors.
    fn quantize(&self, x: &ArrayD<f32>, qp: &QParams, range: QuantRange) -> Result<ArrayD<i8>> {
        range.validate()?;
        if range.quant_min < -128 || range.quant_max > 127 {
            return Err(Error::invalid(format!(
                "integer tensors hold 8-bit signed codes; range [{}, {}] does not fit [-128, 127]",
                range.quant_min, range.quant_max
            )));
        }
        qp.validate(x.shape(), range)?;
        let gx = GpuTensor::upload_f32(&self.ctx, x)?;
        let gqp = GpuQParams::upload(&self.ctx, qp)?;
        kernels::int8::quantize(&self.ctx, &gx, &gqp, range)?
            .into_checked(&self.ctx)?
            .download(&self.ctx)
    }
    fn dequantize(&self, q: &ArrayD<i8>, qp: &QParams) -> Result<ArrayD<f32>> {
        qp.validate(q.shape(), QuantRange::new(-128, 127)?)?;
        let gq = kernels::int8::GpuInt8Tensor::upload(&self.ctx, q)?;
        let gqp = GpuQParams::upload(&self.ctx, qp)?;
        kernels::int8::dequantize(&self.ctx, &gq, &gqp)?.download_f32(&self.ctx)
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
        let gx = kernels::int8::GpuInt8Tensor::upload(&self.ctx, &x.clone().into_dyn())?;
        kernels::int8::conv2d_int8(&self.ctx, &gx, x_zero_point, weight, bias, params, requant)?
            .download(&self.ctx)?
            .into_dimensionality::<ndarray::Ix4>()
            .map_err(|e| Error::Gpu(format!("internal: conv2d_int8 output is not 4-D: {e}")))
    }
    fn linear_int8(
        &self,
        x: &Array2<i8>,
        x_zero_point: i32,
        weight: &Array2<i8>,
        bias: Option<&Array1<i32>>,
        requant: &Requant,
    ) -> Result<Array2<i8>> {
        // kernels::int8::linear_int8 checks `in` (the reference's error) before anything else.
        let gx = kernels::int8::GpuInt8Tensor::upload(&self.ctx, &x.clone().into_dyn())?;
        kernels::int8::linear_int8(&self.ctx, &gx, x_zero_point, weight, bias, requant)?
            .download(&self.ctx)?
            .into_dimensionality::<ndarray::Ix2>()
            .map_err(|e| Error::Gpu(format!("internal: linear_int8 output is not 2-D: {e}")))
    }
    fn max_pool2d_int8(&self, x: &Array4<i8>, kernel: usize, stride: usize) -> Result<Array4<i8>> {
        let gx = kernels::int8::GpuInt8Tensor::upload(&self.ctx, &x.clone().into_dyn())?;
        kernels::int8::max_pool2d_int8(&self.ctx, &gx, kernel, stride)?
            .download(&self.ctx)?
            .into_dimensionality::<ndarray::Ix4>()
            .map_err(|e| Error::Gpu(format!("internal: max_pool2d_int8 output is not 4-D: {e}")))
    }
    fn add_int8(&self, a: &ArrayD<i8>, b: &ArrayD<i8>, add: &AddRequant) -> Result<ArrayD<i8>> {
        if a.shape() != b.shape() {
            return Err(Error::shape("quantized add", a.shape(), b.shape()));
        }
        add.validate()?;
        let ga = kernels::int8::GpuInt8Tensor::upload(&self.ctx, a)?;
        let gb = kernels::int8::GpuInt8Tensor::upload(&self.ctx, b)?;
        kernels::int8::add_int8(&self.ctx, &ga, &gb, add)?.download(&self.ctx)
    }
}
