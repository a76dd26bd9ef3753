//! The Mnist network of NNI's module-fusion example: conv1 (5×5, 1→20), batchnorm1, ReLU6,
//! maxpool 2, conv2 (5×5, 20→50), ReLU6, maxpool 2, fc1 (800→500), ReLU6, fc2 (500→10),
//! log_softmax — with the NNI-style config applied: fuse (`fuse_names`), observe
//! (min/max calibration), and simulate (fake quantization of the configured targets).
//!
//! Runs on any [`Backend`], so the same model runs on the CPU reference and on the GPU.

use std::collections::BTreeMap;

use ndarray::{Array1, Array2, Array4, ArrayD, Ix1, Ix2, Ix4};

use crate::backend::Backend;
use crate::config::ConfigList;
use crate::error::{Error, Result};
use crate::io::StateDict;
use crate::ops::{Activation, BatchNorm, Conv2d, Conv2dParams};
use crate::quant::{ObserverSpec, QParams};

/// A linear layer's parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Array2<f32>,
    /// `[out]`, optional.
    pub bias: Option<Array1<f32>>,
}

/// A quantized tensor of an op: its observer and, once calibrated, its qparams.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantTarget {
    /// `_input_`, `weight` or `_output_`.
    pub target: String,
    /// How its qparams are computed.
    pub observer: ObserverSpec,
    /// Computed by [`Mnist::calibrate`].
    pub qparams: Option<QParams>,
}

/// The network, its parameters, and its quantization state.
#[derive(Debug, Clone, PartialEq)]
pub struct Mnist {
    /// conv1 (5×5, 1→20).
    pub conv1: Conv2d,
    /// batchnorm1; `None` once fused into conv1 (it becomes Identity).
    pub batchnorm1: Option<BatchNorm>,
    /// conv2 (5×5, 20→50).
    pub conv2: Conv2d,
    /// fc1 (800→500).
    pub fc1: Linear,
    /// fc2 (500→10).
    pub fc2: Linear,
    /// Quantized targets by op name (`conv1`, `conv2`, `fc1`, `fc2`).
    pub quant: BTreeMap<String, Vec<QuantTarget>>,
}

/// The quantizable ops, in forward order, with their NNI type names.
pub const OPS: &[(&str, &str)] = &[
    ("conv1", "Conv2d"),
    ("conv2", "Conv2d"),
    ("fc1", "Linear"),
    ("fc2", "Linear"),
];

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Float,
    Calibrate,
    Simulate,
}

fn tensor<D: ndarray::Dimension>(sd: &StateDict, name: &str) -> Result<ndarray::Array<f32, D>> {
    let a = sd.f32(name)?;
    a.clone()
        .into_dimensionality::<D>()
        .map_err(|_| Error::invalid(format!("`{name}` has shape {:?}", a.shape())))
}

fn tensor_opt<D: ndarray::Dimension>(
    sd: &StateDict,
    name: &str,
) -> Result<Option<ndarray::Array<f32, D>>> {
    match sd.f32_opt(name)? {
        None => Ok(None),
        Some(_) => tensor(sd, name).map(Some),
    }
}

fn check_shape(name: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::shape(name, want, got))
    }
}

impl Mnist {
    /// Loads the network from a PyTorch state dict whose keys start with `prefix`
    /// (`conv1.weight`, `batchnorm1.running_mean`, ...), checking every shape.
    pub fn from_state_dict(sd: &StateDict, prefix: &str) -> Result<Self> {
        let k = |n: &str| format!("{prefix}{n}");
        let conv = |name: &str, shape: [usize; 4]| -> Result<Conv2d> {
            let weight: Array4<f32> = tensor::<Ix4>(sd, &k(&format!("{name}.weight")))?;
            check_shape(&k(&format!("{name}.weight")), weight.shape(), &shape)?;
            let bias = tensor_opt::<Ix1>(sd, &k(&format!("{name}.bias")))?;
            if let Some(b) = &bias {
                check_shape(&k(&format!("{name}.bias")), b.shape(), &[shape[0]])?;
            }
            Ok(Conv2d {
                weight,
                bias,
                params: Conv2dParams::default(),
            })
        };
        let linear = |name: &str, shape: [usize; 2]| -> Result<Linear> {
            let weight = tensor::<Ix2>(sd, &k(&format!("{name}.weight")))?;
            check_shape(&k(&format!("{name}.weight")), weight.shape(), &shape)?;
            let bias = tensor_opt::<Ix1>(sd, &k(&format!("{name}.bias")))?;
            if let Some(b) = &bias {
                check_shape(&k(&format!("{name}.bias")), b.shape(), &[shape[0]])?;
            }
            Ok(Linear { weight, bias })
        };
        let bn = BatchNorm {
            weight: tensor_opt::<Ix1>(sd, &k("batchnorm1.weight"))?,
            bias: tensor_opt::<Ix1>(sd, &k("batchnorm1.bias"))?,
            running_mean: tensor::<Ix1>(sd, &k("batchnorm1.running_mean"))?,
            running_var: tensor::<Ix1>(sd, &k("batchnorm1.running_var"))?,
            eps: 1e-5,
            momentum: 0.1,
        };
        bn.validate()?;
        check_shape(
            &k("batchnorm1.running_mean"),
            bn.running_mean.shape(),
            &[20],
        )?;
        Ok(Self {
            conv1: conv("conv1", [20, 1, 5, 5])?,
            batchnorm1: Some(bn),
            conv2: conv("conv2", [50, 20, 5, 5])?,
            fc1: linear("fc1", [500, 800])?,
            fc2: linear("fc2", [10, 500])?,
            quant: BTreeMap::new(),
        })
    }

    /// Applies an NNI-style config: fuses each `fuse_names` group, attaches observers to the
    /// targets of the matched ops, and calibrates them on `calibration` (min/max over it).
    pub fn apply_config(
        &mut self,
        b: &dyn Backend,
        config: &ConfigList,
        calibration: &Array4<f32>,
    ) -> Result<()> {
        for entry in &config.0 {
            for group in &entry.fuse_names {
                self.fuse(b, group)?;
            }
        }
        for entry in &config.0 {
            for (name, op_type) in OPS {
                if !entry.matches(name, op_type) {
                    continue;
                }
                let targets = self.quant.entry(name.to_string()).or_default();
                for t in &entry.target_names {
                    if t == "bias" {
                        return Err(Error::invalid(format!(
                            "quantizing the bias of `{name}` is not supported by this model path"
                        )));
                    }
                    targets.retain(|q| &q.target != t);
                    targets.push(QuantTarget {
                        target: t.clone(),
                        observer: entry.observer(t)?,
                        qparams: None,
                    });
                }
            }
        }
        for name in &config
            .0
            .iter()
            .flat_map(|e| e.op_names.clone())
            .collect::<Vec<_>>()
        {
            if !OPS.iter().any(|(n, _)| n == name) {
                return Err(Error::invalid(format!(
                    "config names op `{name}`, which the Mnist network does not have (ops: conv1, conv2, fc1, fc2)"
                )));
            }
        }
        self.calibrate(b, calibration)
    }

    /// Fuses a group of modules. This model knows `["conv1", "batchnorm1"]` (BN folded into
    /// conv1, batchnorm1 becomes Identity), as `torch.ao.quantization.fuse_modules` does.
    pub fn fuse(&mut self, b: &dyn Backend, group: &[String]) -> Result<()> {
        match group {
            [c, n] if c == "conv1" && n == "batchnorm1" => {
                let bn = self.batchnorm1.take().ok_or_else(|| {
                    Error::invalid("batchnorm1 is already fused into conv1".to_string())
                })?;
                let folded = b.fold_conv_bn(
                    &self.conv1.weight.clone().into_dyn(),
                    self.conv1.bias.as_ref(),
                    &bn,
                    false,
                )?;
                self.conv1.weight = folded
                    .weight
                    .into_dimensionality::<Ix4>()
                    .map_err(|e| Error::Gpu(format!("folded weight rank: {e}")))?;
                self.conv1.bias = Some(folded.bias);
                Ok(())
            }
            other => Err(Error::invalid(format!(
                "the Mnist network cannot fuse {other:?} (it fuses [\"conv1\", \"batchnorm1\"])"
            ))),
        }
    }

    /// Observes every target on `x` (min/max) and stores its qparams. Each target is
    /// quantized as soon as it is observed, so an op's `_output_` is observed on the output
    /// computed from its quantized input and weight (NNI's and PyTorch's calibration order).
    pub fn calibrate(&mut self, b: &dyn Backend, x: &Array4<f32>) -> Result<()> {
        self.run(b, x, Mode::Calibrate)?;
        Ok(())
    }

    /// Forward: float where nothing is quantized, simulated (fake-quantized) where targets
    /// are calibrated. Returns log-probabilities `[N, 10]`.
    pub fn forward(&mut self, b: &dyn Backend, x: &Array4<f32>) -> Result<Array2<f32>> {
        self.run(b, x, Mode::Simulate)
    }

    /// Forward in float, ignoring quantization (after fusion: the fused float model).
    pub fn forward_float_fused(&mut self, b: &dyn Backend, x: &Array4<f32>) -> Result<Array2<f32>> {
        self.run(b, x, Mode::Float)
    }

    /// The calibrated qparams: `(op, target, qparams)`.
    pub fn qparams(&self) -> Vec<(String, String, QParams)> {
        let mut v = Vec::new();
        for (op, targets) in &self.quant {
            for t in targets {
                if let Some(qp) = &t.qparams {
                    v.push((op.clone(), t.target.clone(), qp.clone()));
                }
            }
        }
        v
    }

    /// Observes or fake-quantizes `value` as target `target` of `op`, per `mode`.
    fn target(
        &mut self,
        b: &dyn Backend,
        op: &str,
        target: &str,
        value: ArrayD<f32>,
        mode: Mode,
    ) -> Result<ArrayD<f32>> {
        let Some(t) = self
            .quant
            .get_mut(op)
            .and_then(|ts| ts.iter_mut().find(|t| t.target == target))
        else {
            return Ok(value);
        };
        match mode {
            Mode::Float => Ok(value),
            Mode::Calibrate => {
                // As a FakeQuantize module in calibration: observe, then quantize with the
                // qparams just computed, so later targets see the quantized values.
                let qp = b.calc_qparams(&value, &t.observer)?;
                let y = b.fake_quant(&value, &qp, t.observer.range)?;
                t.qparams = Some(qp);
                Ok(y)
            }
            Mode::Simulate => match &t.qparams {
                Some(qp) => b.fake_quant(&value, qp, t.observer.range),
                None => Err(Error::invalid(format!(
                    "`{op}.{target}` has an observer but was never calibrated"
                ))),
            },
        }
    }

    fn conv(
        &mut self,
        b: &dyn Backend,
        name: &str,
        x: Array4<f32>,
        mode: Mode,
    ) -> Result<Array4<f32>> {
        let layer = if name == "conv1" {
            &self.conv1
        } else {
            &self.conv2
        };
        let (w, bias, params) = (layer.weight.clone(), layer.bias.clone(), layer.params);
        let x = to4(self.target(b, name, "_input_", x.into_dyn(), mode)?)?;
        let w = to4(self.target(b, name, "weight", w.into_dyn(), mode)?)?;
        let y = b.conv2d(&x, &w, bias.as_ref(), &params)?;
        to4(self.target(b, name, "_output_", y.into_dyn(), mode)?)
    }

    fn linear(
        &mut self,
        b: &dyn Backend,
        name: &str,
        x: Array2<f32>,
        mode: Mode,
    ) -> Result<Array2<f32>> {
        let layer = if name == "fc1" { &self.fc1 } else { &self.fc2 };
        let (w, bias) = (layer.weight.clone(), layer.bias.clone());
        let x = to2(self.target(b, name, "_input_", x.into_dyn(), mode)?)?;
        let w = to2(self.target(b, name, "weight", w.into_dyn(), mode)?)?;
        let y = b.linear(&x, &w, bias.as_ref())?;
        to2(self.target(b, name, "_output_", y.into_dyn(), mode)?)
    }

    fn run(&mut self, b: &dyn Backend, x: &Array4<f32>, mode: Mode) -> Result<Array2<f32>> {
        if x.shape()[1..] != [1, 28, 28] {
            return Err(Error::shape(
                "Mnist input",
                &[x.shape()[0], 1, 28, 28],
                x.shape(),
            ));
        }
        let relu6 = |b: &dyn Backend, a: Array4<f32>| -> Result<Array4<f32>> {
            to4(b.activation(&a.into_dyn(), Activation::Relu6)?)
        };
        let mut h = self.conv(b, "conv1", x.clone(), mode)?;
        if let Some(bn) = &self.batchnorm1 {
            h = b.batch_norm2d(&h, bn, false)?.y;
        }
        let h = b.max_pool2d(&relu6(b, h)?, 2, 2)?;
        let h = self.conv(b, "conv2", h, mode)?;
        let h = b.max_pool2d(&relu6(b, h)?, 2, 2)?;
        let n = h.shape()[0];
        let flat = h
            .as_standard_layout()
            .into_owned()
            .into_shape_with_order((n, 800))
            .map_err(|e| Error::invalid(format!("flatten: {e}")))?;
        let h = self.linear(b, "fc1", flat, mode)?;
        let h = to2(b.activation(&h.into_dyn(), Activation::Relu6)?)?;
        let h = self.linear(b, "fc2", h, mode)?;
        b.log_softmax(&h)
    }
}

fn to4(a: ArrayD<f32>) -> Result<Array4<f32>> {
    let shape = a.shape().to_vec();
    a.into_dimensionality::<Ix4>()
        .map_err(|_| Error::invalid(format!("expected a rank-4 tensor, got shape {shape:?}")))
}

fn to2(a: ArrayD<f32>) -> Result<Array2<f32>> {
    let shape = a.shape().to_vec();
    a.into_dimensionality::<Ix2>()
        .map_err(|_| Error::invalid(format!("expected a rank-2 tensor, got shape {shape:?}")))
}
