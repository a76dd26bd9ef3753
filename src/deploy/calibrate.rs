//! Activation-range calibration of a [`Net`] on a backend's own tensors: the fused float
//! model (BN folded once, on the host, as [`super::convert_with_ranges`] folds it) runs on the
//! device, and each value [`super::convert_with_ranges`] reads is observed there by
//! [`crate::backend::QuantOps::observe_running`] (a min/max accumulated over the batches).
//! Each batch is one upload; the parameters are uploaded once and the observers' states are
//! downloaded once, at the end.

use ndarray::ArrayD;

use super::convert::{convert_with_ranges, DeployConfig, IntModel};
use super::net::{check_rank, check_same, fold_conv, Net, NodeOp};
use crate::backend::{Backend, CpuBackend, Shaped};
use crate::error::{Error, Result};
use crate::ops::{Activation, Conv2dParams};
use crate::quant::ObserverSpec;

/// One node prepared on the backend.
enum Prepared<B: Backend> {
    Conv {
        weight: B::Tensor,
        bias: Option<B::Tensor>,
        params: Conv2dParams,
        act: Activation,
    },
    Linear {
        weight: B::Tensor,
        bias: Option<B::Tensor>,
        act: Activation,
    },
    MaxPool2d {
        kernel: usize,
        stride: usize,
    },
    Flatten,
    Add {
        act: Activation,
    },
}

fn prepare<B: Backend>(net: &Net, backend: &B) -> Result<Vec<Prepared<B>>> {
    let up1 = |a: &ndarray::Array1<f32>| backend.upload(&a.clone().into_dyn());
    net.nodes()
        .iter()
        .map(|node| {
            Ok(match &node.op {
                NodeOp::Conv { conv, bn, act } => {
                    let (w, b) = match bn {
                        Some(bn) => {
                            let (w, b) = fold_conv(&CpuBackend, conv, bn)?;
                            (w, Some(b))
                        }
                        None => (conv.weight.clone(), conv.bias.clone()),
                    };
                    Prepared::Conv {
                        weight: backend.upload(&w.into_dyn())?,
                        bias: b.as_ref().map(up1).transpose()?,
                        params: conv.params,
                        act: *act,
                    }
                }
                NodeOp::Linear { weight, bias, act } => Prepared::Linear {
                    weight: backend.upload(&weight.clone().into_dyn())?,
                    bias: bias.as_ref().map(up1).transpose()?,
                    act: *act,
                },
                NodeOp::MaxPool2d { kernel, stride } => Prepared::MaxPool2d {
                    kernel: *kernel,
                    stride: *stride,
                },
                NodeOp::Flatten => Prepared::Flatten,
                NodeOp::Add { act } => Prepared::Add { act: *act },
            })
        })
        .collect()
}

/// Observes the activation ranges of `net`'s fused float model (BN folded, as deployed) on
/// `backend`'s tensors over the `calibration` batches, with `spec` (per tensor): the input
/// and every requantizing node's output (conv, linear, add) get `Some((min, max))` over all
/// batches, the other values `None` (they inherit their input's qparams), in the layout
/// [`super::convert_with_ranges`] takes.
///
/// Errors: [`Error::InvalidArgument`] for no batch; shape errors between nodes; the errors of
/// [`crate::backend::QuantOps::observe_running`] (a per-channel `spec`, ...).
pub fn calibrate_ranges<'a, B: Backend>(
    net: &Net,
    backend: &B,
    calibration: impl IntoIterator<Item = &'a ArrayD<f32>>,
    spec: &ObserverSpec,
) -> Result<Vec<Option<(f32, f32)>>> {
    if spec.qscheme.is_per_channel() {
        return Err(Error::invalid(
            "deployment calibrates activations per tensor; got a per-channel spec",
        ));
    }
    let steps = prepare(net, backend)?;
    let observed: Vec<bool> = std::iter::once(true)
        .chain(net.nodes().iter().map(|n| n.op.requantizes()))
        .collect();
    let mut states: Vec<Option<B::Tensor>> = vec![None; observed.len()];
    let mut batches = 0usize;
    for x in calibration {
        let mut values: Vec<B::Tensor> = Vec::with_capacity(observed.len());
        values.push(backend.upload(x)?);
        for (node, step) in net.nodes().iter().zip(&steps) {
            let input = &values[node.inputs[0]];
            let y = match step {
                Prepared::Conv {
                    weight,
                    bias,
                    params,
                    act,
                } => {
                    check_rank(input.dims(), 4, &node.name)?;
                    backend.conv2d(input, weight, bias.as_ref(), params, *act)?
                }
                Prepared::Linear { weight, bias, act } => {
                    check_rank(input.dims(), 2, &node.name)?;
                    backend.linear(input, weight, bias.as_ref(), *act)?
                }
                Prepared::MaxPool2d { kernel, stride } => {
                    check_rank(input.dims(), 4, &node.name)?;
                    backend.max_pool2d(input, *kernel, *stride)?
                }
                Prepared::Flatten => {
                    backend.reshape(input, &crate::ops::flatten_shape(input.dims())?)?
                }
                Prepared::Add { act } => {
                    let other = &values[node.inputs[1]];
                    check_same(input, other, &node.name)?;
                    backend.activation(&backend.add(input, other)?, *act)?
                }
            };
            values.push(y);
        }
        for ((state, v), &obs) in states.iter_mut().zip(&values).zip(&observed) {
            if obs {
                *state = Some(backend.observe_running(state.take(), v, spec, None)?.0);
            }
        }
        batches += 1;
    }
    if batches == 0 {
        return Err(Error::invalid(
            "deployment needs at least one calibration batch",
        ));
    }
    states
        .iter()
        .map(|s| {
            s.as_ref()
                .map(|s| {
                    let s = backend.download(s)?;
                    match s.as_slice() {
                        Some(&[min, max]) => Ok((min, max)),
                        _ => Err(Error::invalid(format!(
                            "internal: a per-tensor observer state of shape {:?}",
                            s.shape()
                        ))),
                    }
                })
                .transpose()
        })
        .collect()
}

/// [`super::convert`] with the calibration on `backend`'s tensors ([`calibrate_ranges`] with
/// `config.activation`), then [`convert_with_ranges`] (weights folded and quantized on the
/// host by the CPU reference). The same [`IntModel`] as [`super::convert`] wherever the
/// observed values are the same.
///
/// Errors: those of [`calibrate_ranges`] and [`convert_with_ranges`].
pub fn convert_on<'a, B: Backend>(
    net: &Net,
    backend: &B,
    calibration: impl IntoIterator<Item = &'a ArrayD<f32>>,
    config: &DeployConfig,
) -> Result<IntModel> {
    config.validate()?;
    let ranges = calibrate_ranges(net, backend, calibration, &config.activation)?;
    convert_with_ranges(net, &CpuBackend, &ranges, config)
}
