//! The CPU backend: the ndarray reference behind the [`Backend`] interface.

use ndarray::{Array1, Array2, Array4, ArrayD};

use super::Backend;
use crate::error::Result;
use crate::ops::{
    Activation, BatchNorm, BatchNormGrads, BatchNormOutput, Conv2d, Conv2dGrads, Conv2dParams,
    ConvTranspose2dParams, Folded, QatConfig, QatForward, QatGrads,
};
use crate::quant::{AddRequant, ObserverSpec, QParams, QuantRange, Requant};
use crate::reference as r;

/// The CPU reference (ndarray, f32). Always available; the spec the GPU must meet.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend;

impl Backend for CpuBackend {
    fn name(&self) -> String {
        "cpu".to_string()
    }
    fn fold_conv_bn(
        &self,
        weight: &ArrayD<f32>,
        bias: Option<&Array1<f32>>,
        bn: &BatchNorm,
        transpose: bool,
    ) -> Result<Folded> {
        r::fold::fuse_conv_bn_weights(weight, bias, bn, transpose)
    }
    fn fold_linear_bn(
        &self,
        weight: &Array2<f32>,
        bias: Option<&Array1<f32>>,
        bn: &BatchNorm,
    ) -> Result<Folded> {
        r::fold::fuse_linear_bn_weights(weight, bias, bn)
    }
    fn fake_quant(&self, x: &ArrayD<f32>, qp: &QParams, range: QuantRange) -> Result<ArrayD<f32>> {
        r::fake_quant::fake_quantize(x, qp, range)
    }
    fn fake_quant_backward(
        &self,
        x: &ArrayD<f32>,
        dy: &ArrayD<f32>,
        qp: &QParams,
        range: QuantRange,
    ) -> Result<ArrayD<f32>> {
        r::fake_quant::fake_quantize_backward(x, dy, qp, range)
    }
    fn calc_qparams(&self, x: &ArrayD<f32>, spec: &ObserverSpec) -> Result<QParams> {
        r::observer::observe_qparams(x, spec)
    }
    fn conv2d(
        &self,
        x: &Array4<f32>,
        weight: &Array4<f32>,
        bias: Option<&Array1<f32>>,
        params: &Conv2dParams,
    ) -> Result<Array4<f32>> {
        r::conv2d::conv2d(x, weight, bias, params)
    }
    fn conv2d_backward(
        &self,
        x: &Array4<f32>,
        weight: &Array4<f32>,
        dy: &Array4<f32>,
        params: &Conv2dParams,
    ) -> Result<Conv2dGrads> {
        r::conv2d::conv2d_backward(x, weight, dy, params)
    }
    fn batch_norm2d(
        &self,
        x: &Array4<f32>,
        bn: &BatchNorm,
        training: bool,
    ) -> Result<BatchNormOutput> {
        r::batch_norm::batch_norm2d(x, bn, training)
    }
    fn batch_norm2d_backward(
        &self,
        x: &Array4<f32>,
        dy: &Array4<f32>,
        bn: &BatchNorm,
        fwd: &BatchNormOutput,
        training: bool,
    ) -> Result<BatchNormGrads> {
        r::batch_norm::batch_norm2d_backward(x, dy, bn, fwd, training)
    }
    fn activation(&self, x: &ArrayD<f32>, act: Activation) -> Result<ArrayD<f32>> {
        Ok(r::activation::activation(x, act))
    }
    fn activation_backward(
        &self,
        x: &ArrayD<f32>,
        dy: &ArrayD<f32>,
        act: Activation,
    ) -> Result<ArrayD<f32>> {
        r::activation::activation_backward(x, dy, act)
    }
    fn conv_bn_act_eval(
        &self,
        x: &Array4<f32>,
        conv: &Conv2d,
        bn: &BatchNorm,
        act: Activation,
    ) -> Result<(Array4<f32>, Folded)> {
        r::conv_bn::conv_bn_act_eval(x, conv, bn, act)
    }
    fn conv_bn_qat_forward(
        &self,
        x: &Array4<f32>,
        conv: &Conv2d,
        bn: &BatchNorm,
        cfg: &QatConfig,
    ) -> Result<QatForward> {
        r::conv_bn::conv_bn_qat_forward(x, conv, bn, cfg)
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
        r::conv_bn::conv_bn_qat_backward(x, dy, conv, bn, cfg, fwd)
    }
    fn max_pool2d(&self, x: &Array4<f32>, kernel: usize, stride: usize) -> Result<Array4<f32>> {
        r::layers::max_pool2d(x, kernel, stride)
    }
    fn linear(
        &self,
        x: &Array2<f32>,
        weight: &Array2<f32>,
        bias: Option<&Array1<f32>>,
    ) -> Result<Array2<f32>> {
        r::layers::linear(x, weight, bias)
    }
    fn log_softmax(&self, x: &Array2<f32>) -> Result<Array2<f32>> {
        Ok(r::layers::log_softmax(x))
    }
    fn conv_transpose2d(
        &self,
        x: &Array4<f32>,
        weight: &Array4<f32>,
        bias: Option<&Array1<f32>>,
        params: &ConvTranspose2dParams,
    ) -> Result<Array4<f32>> {
        r::conv2d::conv_transpose2d(x, weight, bias, params)
    }
    fn quantize(&self, x: &ArrayD<f32>, qp: &QParams, range: QuantRange) -> Result<ArrayD<i8>> {
        r::int8::quantize(x, qp, range)
    }
    fn dequantize(&self, q: &ArrayD<i8>, qp: &QParams) -> Result<ArrayD<f32>> {
        r::int8::dequantize(q, qp)
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
        r::int8::conv2d_int8(x, x_zero_point, weight, bias, params, requant)
    }
    fn linear_int8(
        &self,
        x: &Array2<i8>,
        x_zero_point: i32,
        weight: &Array2<i8>,
        bias: Option<&Array1<i32>>,
        requant: &Requant,
    ) -> Result<Array2<i8>> {
        r::int8::linear_int8(x, x_zero_point, weight, bias, requant)
    }
    fn max_pool2d_int8(&self, x: &Array4<i8>, kernel: usize, stride: usize) -> Result<Array4<i8>> {
        r::int8::max_pool2d_int8(x, kernel, stride)
    }
    fn add_int8(&self, a: &ArrayD<i8>, b: &ArrayD<i8>, add: &AddRequant) -> Result<ArrayD<i8>> {
        r::int8::add_int8(a, b, add)
    }
}
