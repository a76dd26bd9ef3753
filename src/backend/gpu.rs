//! The GPU backend: WGSL kernels via wgpu behind the [`Backend`] interface.

use std::sync::Arc;

use ndarray::{Array1, Array2, Array4, ArrayD, Ix1};

use super::Backend;
use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor};
use crate::kernels::{self, GpuBatchNorm, GpuQParams};
use crate::ops::{
    Activation, BatchNorm, BatchNormGrads, BatchNormOutput, Conv2d, Conv2dGrads, Conv2dParams,
    Folded, QatConfig, QatForward, QatGrads,
};
use crate::quant::{ObserverSpec, QParams, QuantRange};

/// Runs every operation on a GPU through [`crate::kernels`]: uploads the host arrays, runs
/// the kernels, downloads the results. Validation happens on the host first, with the same
/// errors as [`crate::CpuBackend`].
///
/// Operations without a GPU kernel yet (conv2d, batch norm, the fused conv+bn paths, pooling,
/// linear, log_softmax) return [`Error::Gpu`] saying so.
#[derive(Debug, Clone)]
pub struct GpuBackend {
    ctx: Arc<GpuContext>,
}

fn not_yet(op: &str) -> Error {
    Error::Gpu(format!("{op} is not yet implemented on the GPU"))
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

    fn download_folded(&self, w: GpuTensor, b: GpuTensor) -> Result<Folded> {
        Ok(Folded {
            weight: w.download_f32(&self.ctx)?,
            bias: to_array1(b.download_f32(&self.ctx)?)?,
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
        spec.range.validate()?;
        if spec.qscheme.is_per_channel() && spec.axis >= x.ndim() {
            return Err(Error::AxisOutOfRange {
                axis: spec.axis,
                rank: x.ndim(),
            });
        }
        let gx = GpuTensor::upload_f32(&self.ctx, x)?;
        kernels::observer::observe(&self.ctx, &gx, spec)?.download(&self.ctx)
    }

    fn conv2d(
        &self,
        _x: &Array4<f32>,
        _weight: &Array4<f32>,
        _bias: Option<&Array1<f32>>,
        _params: &Conv2dParams,
    ) -> Result<Array4<f32>> {
        Err(not_yet("conv2d"))
    }

    fn conv2d_backward(
        &self,
        _x: &Array4<f32>,
        _weight: &Array4<f32>,
        _dy: &Array4<f32>,
        _params: &Conv2dParams,
    ) -> Result<Conv2dGrads> {
        Err(not_yet("conv2d_backward"))
    }

    fn batch_norm2d(
        &self,
        _x: &Array4<f32>,
        _bn: &BatchNorm,
        _training: bool,
    ) -> Result<BatchNormOutput> {
        Err(not_yet("batch_norm2d"))
    }

    fn batch_norm2d_backward(
        &self,
        _x: &Array4<f32>,
        _dy: &Array4<f32>,
        _bn: &BatchNorm,
        _fwd: &BatchNormOutput,
        _training: bool,
    ) -> Result<BatchNormGrads> {
        Err(not_yet("batch_norm2d_backward"))
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
        _x: &Array4<f32>,
        _conv: &Conv2d,
        _bn: &BatchNorm,
        _act: Activation,
    ) -> Result<(Array4<f32>, Folded)> {
        Err(not_yet("conv_bn_act_eval"))
    }

    fn conv_bn_qat_forward(
        &self,
        _x: &Array4<f32>,
        _conv: &Conv2d,
        _bn: &BatchNorm,
        _cfg: &QatConfig,
    ) -> Result<QatForward> {
        Err(not_yet("conv_bn_qat_forward"))
    }

    fn conv_bn_qat_backward(
        &self,
        _x: &Array4<f32>,
        _dy: &Array4<f32>,
        _conv: &Conv2d,
        _bn: &BatchNorm,
        _cfg: &QatConfig,
        _fwd: &QatForward,
    ) -> Result<QatGrads> {
        Err(not_yet("conv_bn_qat_backward"))
    }

    fn max_pool2d(&self, _x: &Array4<f32>, _kernel: usize, _stride: usize) -> Result<Array4<f32>> {
        Err(not_yet("max_pool2d"))
    }

    fn linear(
        &self,
        _x: &Array2<f32>,
        _weight: &Array2<f32>,
        _bias: Option<&Array1<f32>>,
    ) -> Result<Array2<f32>> {
        Err(not_yet("linear"))
    }

    fn log_softmax(&self, _x: &Array2<f32>) -> Result<Array2<f32>> {
        Err(not_yet("log_softmax"))
    }
}
