//! Running an [`IntModel`]: the integer forward (what deployed int8 hardware computes) and
//! the fake-quantization simulations it is compared with, fused and unfused.

use ndarray::{Array1, ArrayD};

use super::convert::{weight_qparams, DeployConfig, IntLayer, IntModel};
use super::net::{as2, as4, check_same, flatten, Net, NodeOp};
use super::DeviceIntModel;
use crate::backend::{Backend, HostOps};
use crate::error::{Error, Result};
use crate::quant::QParams;

/// The weight qparams of stored scales (zero points 0; per channel along axis 0 when there
/// is more than one scale).
fn weight_qp(scales: &[f32]) -> Result<QParams> {
    if scales.len() == 1 {
        Ok(QParams::per_tensor(scales[0], 0))
    } else {
        QParams::per_channel(scales.to_vec(), vec![0; scales.len()], 0)
    }
}

/// The bias a fake-quant simulation adds: each i32 bias code times its scale
/// `s_in · s_w[o]` (computed in f32, as [`crate::reference::int8::quantize_bias`] does).
fn dequantized_bias(bias: &Array1<i32>, s_in: f32, ws: &[f32]) -> Array1<f32> {
    Array1::from_iter(bias.iter().enumerate().map(|(o, &b)| {
        let sw = ws[if ws.len() == 1 { 0 } else { o }];
        b as f32 * (s_in * sw)
    }))
}

impl IntModel {
    fn check_input(&self, x: &ArrayD<f32>) -> Result<()> {
        self.validate()?;
        if x.is_empty() {
            return Err(Error::invalid("the input batch is empty"));
        }
        Ok(())
    }

    /// The integer forward on `backend`: quantizes `x` with the input's qparams, runs every
    /// layer on codes (i32 accumulation, fixed-point requantization, clamps), and returns the
    /// output codes (dequantize with [`IntModel::output_qparams`]). Prepares the model on the
    /// backend for this call and runs the one graph interpreter
    /// ([`super::DeviceIntModel`]; keep one to prepare once).
    ///
    /// Errors: an invalid model, an input of the wrong shape or holding NaN, backend errors.
    pub fn forward<B: Backend>(&self, backend: &B, x: &ArrayD<f32>) -> Result<ArrayD<i8>> {
        self.check_input(x)?;
        DeviceIntModel::prepare(self, backend.clone())?.forward(x)
    }

    /// [`IntModel::forward`], returning the codes of every value (index = value id).
    ///
    /// Errors: as [`IntModel::forward`].
    pub fn forward_values<B: Backend>(
        &self,
        backend: &B,
        x: &ArrayD<f32>,
    ) -> Result<Vec<ArrayD<i8>>> {
        self.check_input(x)?;
        DeviceIntModel::prepare(self, backend.clone())?.forward_values(x)
    }

    /// [`IntModel::forward`], dequantized to f32.
    ///
    /// Errors: as [`IntModel::forward`].
    pub fn forward_dequantized<B: Backend>(
        &self,
        backend: &B,
        x: &ArrayD<f32>,
    ) -> Result<ArrayD<f32>> {
        let q = self.forward(backend, x)?;
        HostOps::dequantize(backend, &q, self.output_qparams())
    }

    /// The fused fake-quantization simulation of this model, in f32 on `backend`: the input
    /// and every layer's output fake-quantized with the model's qparams, each conv / linear
    /// computed in float with the dequantized (= fake-quantized) folded weight and the
    /// dequantized i32 bias, the activation applied before the output's fake quantization.
    /// This is what QAT with fused modules and a quantized bias simulates. Returns the output
    /// (on the output's quantization grid).
    ///
    /// Errors: as [`IntModel::forward`].
    pub fn simulate(&self, backend: &dyn HostOps, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let values = self.simulate_values(backend, x)?;
        take(values, self.output)
    }

    /// [`IntModel::simulate`], returning every value (index = value id).
    ///
    /// Errors: as [`IntModel::forward`].
    pub fn simulate_values(
        &self,
        backend: &dyn HostOps,
        x: &ArrayD<f32>,
    ) -> Result<Vec<ArrayD<f32>>> {
        self.check_input(x)?;
        let mut vals: Vec<ArrayD<f32>> = Vec::with_capacity(self.values.len());
        vals.push(backend.fake_quant(x, &self.values[0], self.activation_range)?);
        for i in 0..self.nodes.len() {
            let ins: Vec<&ArrayD<f32>> = self.nodes[i].inputs.iter().map(|&v| &vals[v]).collect();
            let y = self.simulate_node(backend, i, &ins)?;
            vals.push(y);
        }
        Ok(vals)
    }

    /// One node of [`IntModel::simulate`]: node `i` on its (fake-quantized) inputs.
    ///
    /// Errors: shape mismatches, backend errors.
    pub fn simulate_node(
        &self,
        backend: &dyn HostOps,
        i: usize,
        ins: &[&ArrayD<f32>],
    ) -> Result<ArrayD<f32>> {
        let range = self.activation_range;
        let node = &self.nodes[i];
        let out_qp = &self.values[i + 1];
        let s_in = self.values[node.inputs[0]].scale[0];
        let xin = ins[0];
        let y = match &node.layer {
            IntLayer::Conv {
                weight,
                weight_scale,
                bias,
                params,
                act,
                ..
            } => {
                let w = crate::reference::int8::dequantize(
                    &weight.clone().into_dyn(),
                    &weight_qp(weight_scale)?,
                )?;
                let w = as4(&w, &node.name)?;
                let b = bias
                    .as_ref()
                    .map(|b| dequantized_bias(b, s_in, weight_scale));
                let y = backend.conv2d_act(&as4(xin, &node.name)?, &w, b.as_ref(), params, *act)?;
                backend.fake_quant(&y.into_dyn(), out_qp, range)?
            }
            IntLayer::Linear {
                weight,
                weight_scale,
                bias,
                act,
                ..
            } => {
                let w = crate::reference::int8::dequantize(
                    &weight.clone().into_dyn(),
                    &weight_qp(weight_scale)?,
                )?;
                let w = as2(&w, &node.name)?;
                let b = bias
                    .as_ref()
                    .map(|b| dequantized_bias(b, s_in, weight_scale));
                let y = backend.linear_act(&as2(xin, &node.name)?, &w, b.as_ref(), *act)?;
                backend.fake_quant(&y.into_dyn(), out_qp, range)?
            }
            IntLayer::MaxPool2d { kernel, stride } => backend
                .max_pool2d(&as4(xin, &node.name)?, *kernel, *stride)?
                .into_dyn(),
            IntLayer::Flatten => flatten(xin)?,
            IntLayer::Add { act, .. } => {
                let b = ins[1];
                check_same(xin, b, &node.name)?;
                let y = backend.activation(&(xin + b), *act)?;
                backend.fake_quant(&y, out_qp, range)?
            }
            IntLayer::MaxPool2dPad { pool } => {
                crate::reference::layers::max_pool2d_pad(&as4(xin, &node.name)?, pool)?.into_dyn()
            }
            IntLayer::GlobalAvgPool { .. } => {
                let y = crate::reference::layers::global_avg_pool2d(&as4(xin, &node.name)?)?;
                backend.fake_quant(&y.into_dyn(), out_qp, range)?
            }
            IntLayer::Table { act, .. } => {
                let y = backend.activation(xin, *act)?;
                backend.fake_quant(&y, out_qp, range)?
            }
        };
        Ok(y)
    }
}

fn take<T>(values: Vec<T>, v: usize) -> Result<T> {
    values
        .into_iter()
        .nth(v)
        .ok_or_else(|| Error::invalid(format!("value {v} does not exist")))
}

/// The unfused fake-quantization simulation (what QAT without module fusion simulates): each
/// conv runs with its *unfolded* weight fake-quantized (its own per-channel qparams) and its
/// float bias, then BatchNorm (eval) in float, then the activation, then the output's fake
/// quantization with `model`'s activation qparams. Linear, pooling, flatten and add as in
/// [`IntModel::simulate`] but with float biases.
///
/// Errors: `net` and `model` disagreeing in structure, and those of [`IntModel::forward`].
pub fn simulate_unfused(
    net: &Net,
    model: &IntModel,
    config: &DeployConfig,
    backend: &dyn HostOps,
    x: &ArrayD<f32>,
) -> Result<ArrayD<f32>> {
    let values = simulate_unfused_values(net, model, config, backend, x)?;
    take(values, model.output)
}

/// [`simulate_unfused`], returning every value (index = value id).
///
/// Errors: as [`simulate_unfused`].
pub fn simulate_unfused_values(
    net: &Net,
    model: &IntModel,
    config: &DeployConfig,
    backend: &dyn HostOps,
    x: &ArrayD<f32>,
) -> Result<Vec<ArrayD<f32>>> {
    model.check_input(x)?;
    if net.nodes().len() != model.nodes.len()
        || net
            .nodes()
            .iter()
            .zip(&model.nodes)
            .any(|(a, b)| a.name != b.name || a.inputs != b.inputs)
    {
        return Err(Error::invalid(
            "the float net and the integer model have different structures",
        ));
    }
    let mut vals: Vec<ArrayD<f32>> = Vec::with_capacity(model.values.len());
    vals.push(backend.fake_quant(x, &model.values[0], model.activation_range)?);
    for (i, node) in net.nodes().iter().enumerate() {
        let ins: Vec<&ArrayD<f32>> = node.inputs.iter().map(|&v| &vals[v]).collect();
        let y = simulate_node_unfused(net, model, config, backend, i, &ins)?;
        vals.push(y);
    }
    Ok(vals)
}

/// One node of [`simulate_unfused`]: node `i` of `net` on its (fake-quantized) inputs, with
/// `model`'s output qparams.
///
/// Errors: shape mismatches, backend errors.
pub fn simulate_node_unfused(
    net: &Net,
    model: &IntModel,
    config: &DeployConfig,
    backend: &dyn HostOps,
    i: usize,
    ins: &[&ArrayD<f32>],
) -> Result<ArrayD<f32>> {
    let range = model.activation_range;
    let node = &net.nodes()[i];
    let out_qp = &model.values[i + 1];
    let xin = ins[0];
    let y = match &node.op {
        NodeOp::Conv { conv, bn, act } => {
            let w = conv.weight.clone().into_dyn();
            let wq = backend.fake_quant(&w, &weight_qparams(&w, config)?, config.weight.range)?;
            let y = backend.conv2d(
                &as4(xin, &node.name)?,
                &as4(&wq, &node.name)?,
                conv.bias.as_ref(),
                &conv.params,
            )?;
            let y = match bn {
                Some(bn) => backend.batch_norm2d(&y, bn, false)?.y,
                None => y,
            };
            let y = backend.activation(&y.into_dyn(), *act)?;
            backend.fake_quant(&y, out_qp, range)?
        }
        NodeOp::Linear { weight, bias, act } => {
            let w = weight.clone().into_dyn();
            let wq = backend.fake_quant(&w, &weight_qparams(&w, config)?, config.weight.range)?;
            let y = backend.linear_act(
                &as2(xin, &node.name)?,
                &as2(&wq, &node.name)?,
                bias.as_ref(),
                *act,
            )?;
            backend.fake_quant(&y.into_dyn(), out_qp, range)?
        }
        NodeOp::MaxPool2d { kernel, stride } => backend
            .max_pool2d(&as4(xin, &node.name)?, *kernel, *stride)?
            .into_dyn(),
        NodeOp::Flatten => flatten(xin)?,
        NodeOp::Add { act } => {
            let b = ins[1];
            check_same(xin, b, &node.name)?;
            let y = backend.activation(&(xin + b), *act)?;
            backend.fake_quant(&y, out_qp, range)?
        }
        NodeOp::MaxPool2dPad { pool } => {
            crate::reference::layers::max_pool2d_pad(&as4(xin, &node.name)?, pool)?.into_dyn()
        }
        NodeOp::GlobalAvgPool => {
            let y = crate::reference::layers::global_avg_pool2d(&as4(xin, &node.name)?)?;
            backend.fake_quant(&y.into_dyn(), out_qp, range)?
        }
        NodeOp::Activation { act } => {
            let y = backend.activation(xin, *act)?;
            backend.fake_quant(&y, out_qp, range)?
        }
    };
    Ok(y)
}
