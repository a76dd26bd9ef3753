//! The CPU backend: the ndarray reference ([`crate::reference`]) behind the op-family traits,
//! on host arrays (`ArrayD<f32>`, `ArrayD<i8>`, host [`QParams`]).

use ndarray::{Array1, Array2, Array4, ArrayD, Dimension, Ix1, Ix2, Ix4};

use super::{Device, FloatOps, FusedOps, Int8Ops, QuantOps};
use crate::error::{Error, Result};
use crate::ops::{
    Activation, BatchNorm, BatchNormGrads, BatchNormOutput, Conv2d, Conv2dGrads, Conv2dParams,
    ConvTranspose2dParams, Folded, QatConfig, QatForward, QatGrads, QatStep, QatWeightQuant,
};
use crate::quant::{AddRequant, ObserverSpec, QParams, QuantRange, Requant};
use crate::reference as r;

/// The CPU reference (ndarray, f32). Always available; the spec the GPU must meet.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend;

/// An integer conv2d prepared on the CPU: the layer's codes, bias, settings and
/// requantization ([`crate::reference::int8::conv2d_int8`] runs it).
#[derive(Debug, Clone)]
pub struct CpuConv2dInt8 {
    x_zero_point: i32,
    weight: Array4<i8>,
    bias: Option<Array1<i32>>,
    params: Conv2dParams,
    requant: Requant,
}

/// An integer linear layer prepared on the CPU ([`crate::reference::int8::linear_int8`]).
#[derive(Debug, Clone)]
pub struct CpuLinearInt8 {
    x_zero_point: i32,
    weight: Array2<i8>,
    bias: Option<Array1<i32>>,
    requant: Requant,
}

fn dim<T: Clone, D: Dimension>(a: &ArrayD<T>, what: &str) -> Result<ndarray::Array<T, D>> {
    a.view()
        .into_dimensionality::<D>()
        .map(|v| v.to_owned())
        .map_err(|_| {
            Error::invalid(format!(
                "{what}: expected rank {}, got shape {:?}",
                D::NDIM.unwrap_or(0),
                a.shape()
            ))
        })
}

fn a4(a: &ArrayD<f32>, what: &str) -> Result<Array4<f32>> {
    dim::<f32, Ix4>(a, what)
}

fn a1(a: &ArrayD<f32>, what: &str) -> Result<Array1<f32>> {
    dim::<f32, Ix1>(a, what)
}

fn a1_opt(a: Option<&ArrayD<f32>>, what: &str) -> Result<Option<Array1<f32>>> {
    a.map(|a| a1(a, what)).transpose()
}

fn host_bn(bn: &BatchNorm<ArrayD<f32>>) -> Result<BatchNorm> {
    bn.try_map(|a| a1(a, "BatchNorm vector"))
}

fn host_conv(conv: &Conv2d<ArrayD<f32>>) -> Result<Conv2d> {
    Ok(Conv2d {
        weight: a4(&conv.weight, "conv2d weight")?,
        bias: a1_opt(conv.bias.as_ref(), "conv2d bias")?,
        params: conv.params,
    })
}

fn dyn_folded(f: Folded) -> Folded<ArrayD<f32>, ArrayD<f32>> {
    Folded {
        weight: f.weight,
        bias: f.bias.into_dyn(),
    }
}

impl Device for CpuBackend {
    type Tensor = ArrayD<f32>;
    type Codes = ArrayD<i8>;
    type QParams = QParams;

    fn name(&self) -> String {
        "cpu".to_string()
    }
    fn upload(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        Ok(x.clone())
    }
    fn download(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        Ok(x.clone())
    }
    fn upload_codes(&self, q: &ArrayD<i8>) -> Result<ArrayD<i8>> {
        Ok(q.clone())
    }
    fn download_codes(&self, q: &ArrayD<i8>) -> Result<ArrayD<i8>> {
        Ok(q.clone())
    }
    fn upload_qparams(&self, qp: &QParams) -> Result<QParams> {
        Ok(qp.clone())
    }
    fn download_qparams(&self, qp: &QParams) -> Result<QParams> {
        Ok(qp.clone())
    }
    fn reshape(&self, x: &ArrayD<f32>, shape: &[usize]) -> Result<ArrayD<f32>> {
        crate::ops::check_reshape(x.shape(), shape)?;
        x.as_standard_layout()
            .into_owned()
            .into_shape_with_order(shape.to_vec())
            .map_err(|e| Error::invalid(format!("reshape: {e}")))
    }
}

impl FloatOps for CpuBackend {
    fn conv2d(
        &self,
        x: &ArrayD<f32>,
        weight: &ArrayD<f32>,
        bias: Option<&ArrayD<f32>>,
        params: &Conv2dParams,
        act: Activation,
    ) -> Result<ArrayD<f32>> {
        params.output_shape(x.shape(), weight.shape())?;
        let y = r::conv2d::conv2d(
            &a4(x, "conv2d input")?,
            &a4(weight, "conv2d weight")?,
            a1_opt(bias, "conv2d bias")?.as_ref(),
            params,
        )?
        .into_dyn();
        Ok(match act {
            Activation::None => y,
            act => r::activation::activation(&y, act),
        })
    }
    fn conv2d_backward(
        &self,
        x: &ArrayD<f32>,
        weight: &ArrayD<f32>,
        dy: &ArrayD<f32>,
        params: &Conv2dParams,
    ) -> Result<Conv2dGrads<ArrayD<f32>, ArrayD<f32>>> {
        params.output_shape(x.shape(), weight.shape())?;
        let g = r::conv2d::conv2d_backward(
            &a4(x, "conv2d input")?,
            &a4(weight, "conv2d weight")?,
            &a4(dy, "conv2d_backward dy")?,
            params,
        )?;
        Ok(Conv2dGrads {
            dx: g.dx.into_dyn(),
            dweight: g.dweight.into_dyn(),
            dbias: g.dbias.into_dyn(),
        })
    }
    fn conv_transpose2d(
        &self,
        x: &ArrayD<f32>,
        weight: &ArrayD<f32>,
        bias: Option<&ArrayD<f32>>,
        params: &ConvTranspose2dParams,
        act: Activation,
    ) -> Result<ArrayD<f32>> {
        params.output_shape(x.shape(), weight.shape())?;
        let y = r::conv2d::conv_transpose2d(
            &a4(x, "conv_transpose2d input")?,
            &a4(weight, "conv_transpose2d weight")?,
            a1_opt(bias, "conv_transpose2d bias")?.as_ref(),
            params,
        )?
        .into_dyn();
        Ok(match act {
            Activation::None => y,
            act => r::activation::activation(&y, act),
        })
    }
    fn batch_norm2d(
        &self,
        x: &ArrayD<f32>,
        bn: &BatchNorm<ArrayD<f32>>,
        training: bool,
        act: Activation,
    ) -> Result<BatchNormOutput<ArrayD<f32>, ArrayD<f32>>> {
        let bn = host_bn(bn)?;
        let o = r::batch_norm::batch_norm2d(&a4(x, "batch_norm2d input")?, &bn, training)?;
        let y = o.y.into_dyn();
        Ok(BatchNormOutput {
            y: match act {
                Activation::None => y,
                act => r::activation::activation(&y, act),
            },
            running_mean: o.running_mean.into_dyn(),
            running_var: o.running_var.into_dyn(),
            mean: o.mean.into_dyn(),
            invstd: o.invstd.into_dyn(),
        })
    }
    fn batch_norm2d_backward(
        &self,
        x: &ArrayD<f32>,
        dy: &ArrayD<f32>,
        bn: &BatchNorm<ArrayD<f32>>,
        fwd: &BatchNormOutput<ArrayD<f32>, ArrayD<f32>>,
        training: bool,
    ) -> Result<BatchNormGrads<ArrayD<f32>, ArrayD<f32>>> {
        let hfwd = BatchNormOutput {
            y: a4(&fwd.y, "batch_norm2d output")?,
            running_mean: a1(&fwd.running_mean, "running mean")?,
            running_var: a1(&fwd.running_var, "running variance")?,
            mean: a1(&fwd.mean, "mean")?,
            invstd: a1(&fwd.invstd, "invstd")?,
        };
        let g = r::batch_norm::batch_norm2d_backward(
            &a4(x, "batch_norm2d input")?,
            &a4(dy, "batch_norm2d_backward dy")?,
            &host_bn(bn)?,
            &hfwd,
            training,
        )?;
        Ok(BatchNormGrads {
            dx: g.dx.into_dyn(),
            dweight: g.dweight.into_dyn(),
            dbias: g.dbias.into_dyn(),
        })
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
    fn add(&self, a: &ArrayD<f32>, b: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        crate::ops::check_add(a.shape(), b.shape())?;
        Ok(a + b)
    }
    fn max_pool2d(&self, x: &ArrayD<f32>, kernel: usize, stride: usize) -> Result<ArrayD<f32>> {
        Ok(r::layers::max_pool2d(&a4(x, "max_pool2d input")?, kernel, stride)?.into_dyn())
    }
    fn linear(
        &self,
        x: &ArrayD<f32>,
        weight: &ArrayD<f32>,
        bias: Option<&ArrayD<f32>>,
        act: Activation,
    ) -> Result<ArrayD<f32>> {
        let y = r::layers::linear(
            &dim::<f32, Ix2>(x, "linear input")?,
            &dim::<f32, Ix2>(weight, "linear weight")?,
            a1_opt(bias, "linear bias")?.as_ref(),
        )?
        .into_dyn();
        Ok(match act {
            Activation::None => y,
            act => r::activation::activation(&y, act),
        })
    }
    fn log_softmax(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        Ok(r::layers::log_softmax(&dim::<f32, Ix2>(x, "log_softmax input")?).into_dyn())
    }
    fn pool2d(
        &self,
        x: &ArrayD<f32>,
        window: &crate::ops::PoolWindow,
        mode: crate::ops::PoolMode,
    ) -> Result<ArrayD<f32>> {
        window.output_shape(x.shape())?;
        Ok(r::layers::pool2d(&a4(x, "pool2d input")?, window, mode)?.into_dyn())
    }
    fn pad2d(&self, x: &ArrayD<f32>, pads: [usize; 4]) -> Result<ArrayD<f32>> {
        crate::ops::pad2d_output_shape(x.shape(), pads)?;
        Ok(r::layers::zero_pad2d(&a4(x, "pad2d input")?, pads)?.into_dyn())
    }
    fn global_avg_pool2d(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        crate::ops::global_pool_extent(x.shape())?;
        Ok(r::layers::global_avg_pool2d(&a4(x, "global average pooling input")?)?.into_dyn())
    }
    fn binary(
        &self,
        a: &ArrayD<f32>,
        b: &ArrayD<f32>,
        op: crate::ops::BinaryOp,
    ) -> Result<ArrayD<f32>> {
        r::layers::broadcast_binary(a, b, op)
    }
    fn concat(&self, parts: &[&ArrayD<f32>], axis: i64) -> Result<ArrayD<f32>> {
        r::layers::concat(parts, axis)
    }
}

impl QuantOps for CpuBackend {
    fn fake_quant(&self, x: &ArrayD<f32>, qp: &QParams, range: QuantRange) -> Result<ArrayD<f32>> {
        r::fake_quant::fake_quantize(x, qp, range)
    }
    fn fake_quant_onnx(
        &self,
        x: &ArrayD<f32>,
        qp: &QParams,
        range: QuantRange,
    ) -> Result<ArrayD<f32>> {
        r::fake_quant::fake_quantize_onnx(x, qp, range)
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
    fn observe_running(
        &self,
        state: Option<ArrayD<f32>>,
        x: &ArrayD<f32>,
        spec: &ObserverSpec,
        averaging_constant: Option<f32>,
    ) -> Result<(ArrayD<f32>, QParams)> {
        let (axis, c, spec) = crate::ops::check_running_observer(
            x.shape(),
            state.as_ref().map(|s| s.shape()),
            spec,
            averaging_constant,
        )?;
        let (mn, mx) = match axis {
            Some(a) => r::observer::min_max_per_channel(x, a)?,
            None => {
                let (a, b) = r::observer::min_max(x);
                (vec![a], vec![b])
            }
        };
        let batch = Array2::from_shape_vec((2, c), mn.into_iter().chain(mx).collect())
            .map_err(|e| Error::invalid(format!("internal: observer min/max: {e}")))?;
        let state = match state {
            None => batch,
            Some(s) => {
                let mut s = dim::<f32, Ix2>(&s, "observer state")?;
                r::train::observer_update(&mut s, &batch, averaging_constant, false)?;
                s
            }
        };
        let (mins, maxs) = (state.row(0).to_vec(), state.row(1).to_vec());
        let qp = r::observer::calculate_qparams(&mins, &maxs, &spec);
        Ok((state.into_dyn(), qp))
    }
    fn fold_conv_bn(
        &self,
        weight: &ArrayD<f32>,
        bias: Option<&ArrayD<f32>>,
        bn: &BatchNorm<ArrayD<f32>>,
        transpose: bool,
    ) -> Result<Folded<ArrayD<f32>, ArrayD<f32>>> {
        crate::ops::check_conv_weight_rank(weight.shape())?;
        let f = r::fold::fuse_conv_bn_weights(
            weight,
            a1_opt(bias, "conv bias")?.as_ref(),
            &host_bn(bn)?,
            transpose,
        )?;
        Ok(dyn_folded(f))
    }
    fn fold_linear_bn(
        &self,
        weight: &ArrayD<f32>,
        bias: Option<&ArrayD<f32>>,
        bn: &BatchNorm<ArrayD<f32>>,
    ) -> Result<Folded<ArrayD<f32>, ArrayD<f32>>> {
        let f = r::fold::fuse_linear_bn_weights(
            &dim::<f32, Ix2>(weight, "linear weight")?,
            a1_opt(bias, "linear bias")?.as_ref(),
            &host_bn(bn)?,
        )?;
        Ok(dyn_folded(f))
    }
}

impl Int8Ops for CpuBackend {
    type Conv2dInt8 = CpuConv2dInt8;
    type LinearInt8 = CpuLinearInt8;

    fn quantize(&self, x: &ArrayD<f32>, qp: &QParams, range: QuantRange) -> Result<ArrayD<i8>> {
        r::int8::quantize(x, qp, range)
    }
    fn dequantize(&self, q: &ArrayD<i8>, qp: &QParams) -> Result<ArrayD<f32>> {
        r::int8::dequantize(q, qp)
    }
    fn prepare_conv2d_int8(
        &self,
        x_zero_point: i32,
        weight: &Array4<i8>,
        bias: Option<&Array1<i32>>,
        params: &Conv2dParams,
        requant: &Requant,
    ) -> Result<CpuConv2dInt8> {
        Ok(CpuConv2dInt8 {
            x_zero_point,
            weight: weight.clone(),
            bias: bias.cloned(),
            params: *params,
            requant: requant.clone(),
        })
    }
    fn conv2d_int8(&self, layer: &CpuConv2dInt8, x: &ArrayD<i8>) -> Result<ArrayD<i8>> {
        Ok(r::int8::conv2d_int8(
            &dim::<i8, Ix4>(x, "conv2d_int8 input")?,
            layer.x_zero_point,
            &layer.weight,
            layer.bias.as_ref(),
            &layer.params,
            &layer.requant,
        )?
        .into_dyn())
    }
    fn prepare_linear_int8(
        &self,
        x_zero_point: i32,
        weight: &Array2<i8>,
        bias: Option<&Array1<i32>>,
        requant: &Requant,
    ) -> Result<CpuLinearInt8> {
        Ok(CpuLinearInt8 {
            x_zero_point,
            weight: weight.clone(),
            bias: bias.cloned(),
            requant: requant.clone(),
        })
    }
    fn linear_int8(&self, layer: &CpuLinearInt8, x: &ArrayD<i8>) -> Result<ArrayD<i8>> {
        Ok(r::int8::linear_int8(
            &dim::<i8, Ix2>(x, "linear_int8 input")?,
            layer.x_zero_point,
            &layer.weight,
            layer.bias.as_ref(),
            &layer.requant,
        )?
        .into_dyn())
    }
    fn max_pool2d_int8(&self, x: &ArrayD<i8>, kernel: usize, stride: usize) -> Result<ArrayD<i8>> {
        Ok(
            r::int8::max_pool2d_int8(&dim::<i8, Ix4>(x, "max_pool2d_int8 input")?, kernel, stride)?
                .into_dyn(),
        )
    }
    fn add_int8(&self, a: &ArrayD<i8>, b: &ArrayD<i8>, add: &AddRequant) -> Result<ArrayD<i8>> {
        r::int8::add_int8(a, b, add)
    }
    fn flatten_int8(&self, x: &ArrayD<i8>) -> Result<ArrayD<i8>> {
        let shape = crate::ops::flatten_shape(x.shape())?;
        x.as_standard_layout()
            .into_owned()
            .into_shape_with_order(shape.to_vec())
            .map_err(|e| Error::invalid(format!("flatten: {e}")))
    }
    fn max_pool2d_pad_int8(&self, x: &ArrayD<i8>, pool: &crate::ops::Pool2d) -> Result<ArrayD<i8>> {
        Ok(
            r::int8::max_pool2d_pad_int8(&dim::<i8, Ix4>(x, "max pooling input")?, pool)?
                .into_dyn(),
        )
    }
    fn global_avg_pool_int8(
        &self,
        x: &ArrayD<i8>,
        x_zero_point: i32,
        requant: &Requant,
    ) -> Result<ArrayD<i8>> {
        crate::ops::global_pool_extent(x.shape())?;
        Ok(r::int8::global_avg_pool_int8(
            &dim::<i8, Ix4>(x, "global average pooling input")?,
            x_zero_point,
            requant,
        )?
        .into_dyn())
    }
    fn lookup_int8(&self, x: &ArrayD<i8>, table: &[i8]) -> Result<ArrayD<i8>> {
        r::int8::lookup_int8(x, table)
    }
}

impl FusedOps for CpuBackend {
    type QatSaved = QatForward;

    fn conv_bn_act_eval(
        &self,
        x: &ArrayD<f32>,
        conv: &Conv2d<ArrayD<f32>>,
        bn: &BatchNorm<ArrayD<f32>>,
        act: Activation,
    ) -> Result<(ArrayD<f32>, Folded<ArrayD<f32>, ArrayD<f32>>)> {
        let (y, f) = r::conv_bn::conv_bn_act_eval(
            &a4(x, "conv_bn input")?,
            &host_conv(conv)?,
            &host_bn(bn)?,
            act,
        )?;
        Ok((y.into_dyn(), dyn_folded(f)))
    }
    fn conv_bn_qat_forward(
        &self,
        x: &ArrayD<f32>,
        conv: &Conv2d<ArrayD<f32>>,
        bn: &BatchNorm<ArrayD<f32>>,
        cfg: &QatConfig,
        weight: &QatWeightQuant<QParams>,
    ) -> Result<QatStep<ArrayD<f32>, QParams, QatForward>> {
        let f = r::conv_bn::conv_bn_qat_forward_with(
            &a4(x, "QAT input")?,
            &host_conv(conv)?,
            &host_bn(bn)?,
            cfg,
            weight,
        )?;
        Ok(QatStep {
            y: f.y.clone().into_dyn(),
            running_mean: f.running_mean.clone().into_dyn(),
            running_var: f.running_var.clone().into_dyn(),
            weight_qparams: f.weight_qparams.clone(),
            saved: f,
        })
    }
    fn conv_bn_qat_forward_pytorch(
        &self,
        x: &ArrayD<f32>,
        conv: &Conv2d<ArrayD<f32>>,
        bn: &BatchNorm<ArrayD<f32>>,
        cfg: &QatConfig,
    ) -> Result<QatStep<ArrayD<f32>, QParams, QatForward>> {
        let f = r::conv_bn::conv_bn_qat_forward(
            &a4(x, "QAT input")?,
            &host_conv(conv)?,
            &host_bn(bn)?,
            cfg,
        )?;
        self.qat_forward_from_host(&f)
    }
    fn conv_bn_qat_backward(
        &self,
        x: &ArrayD<f32>,
        dy: &ArrayD<f32>,
        conv: &Conv2d<ArrayD<f32>>,
        bn: &BatchNorm<ArrayD<f32>>,
        cfg: &QatConfig,
        fwd: &QatStep<ArrayD<f32>, QParams, QatForward>,
    ) -> Result<QatGrads<ArrayD<f32>, ArrayD<f32>>> {
        let g = r::conv_bn::conv_bn_qat_backward(
            &a4(x, "QAT input")?,
            &a4(dy, "QAT dy")?,
            &host_conv(conv)?,
            &host_bn(bn)?,
            cfg,
            &fwd.saved,
        )?;
        Ok(QatGrads {
            dx: g.dx.into_dyn(),
            dweight: g.dweight.into_dyn(),
            dbias: g.dbias.map(|b| b.into_dyn()),
            dbn_weight: g.dbn_weight.into_dyn(),
            dbn_bias: g.dbn_bias.into_dyn(),
        })
    }
    fn qat_forward_to_host(
        &self,
        fwd: &QatStep<ArrayD<f32>, QParams, QatForward>,
        _conv: &Conv2d<ArrayD<f32>>,
        _bn: &BatchNorm<ArrayD<f32>>,
    ) -> Result<QatForward> {
        Ok(fwd.saved.clone())
    }
    fn qat_forward_from_host(
        &self,
        fwd: &QatForward,
    ) -> Result<QatStep<ArrayD<f32>, QParams, QatForward>> {
        Ok(QatStep {
            y: fwd.y.clone().into_dyn(),
            running_mean: fwd.running_mean.clone().into_dyn(),
            running_var: fwd.running_var.clone().into_dyn(),
            weight_qparams: fwd.weight_qparams.clone(),
            saved: fwd.clone(),
        })
    }
}
