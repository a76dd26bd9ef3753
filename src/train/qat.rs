//! Quantization-aware training on the device: the settings ([`QatOptions`]) and the state a
//! [`super::GpuTrainer`] keeps when QAT is on — one `[2, 1]` min/max observer per quantized
//! activation, updated on the device — and the fake-quant helpers of its forward and
//! backward.
//!
//! What is simulated is what [`crate::deploy::convert`] deploys: every conv and linear weight
//! fake-quantized with the weight spec (observed on each forward from the current weight, as
//! the deployment quantizes the final one; for a conv with BatchNorm the BN-scaled weight
//! `W·γ/√(running_var + ε)`, PyTorch's `ConvBn2d` QAT), and the input and every conv, linear
//! and add output fake-quantized per tensor with `MovingAverageMinMaxObserver` statistics.
//! Gradients pass the fake quants straight through inside the quantization range and are
//! zero outside it (PyTorch's `FakeQuantize` backward).

use crate::deploy::DeployConfig;
use crate::error::{Error, Result};
use crate::gpu::{DType, GpuContext, GpuTensor};
use crate::kernels::{self, GpuQParams};
use crate::quant::{ObserverSpec, QuantRange};

/// The quantization a [`super::GpuTrainer`] simulates in QAT mode
/// ([`super::GpuTrainer::enable_qat`]).
#[derive(Debug, Clone, PartialEq)]
pub struct QatOptions {
    /// Weights: symmetric, per tensor or per output channel (axis 0), signed codes.
    pub weight: ObserverSpec,
    /// Activations (the input and every conv, linear and add output): per tensor.
    pub activation: ObserverSpec,
    /// The activation observers' moving-average constant (PyTorch's default QAT qconfig:
    /// `MovingAverageMinMaxObserver` with 0.01); in `(0, 1]`.
    pub averaging_constant: f32,
}

impl Default for QatOptions {
    /// The deployment's defaults ([`DeployConfig::default`]: int8 per-channel symmetric
    /// weights, int8 affine activations) with averaging constant 0.01.
    fn default() -> Self {
        Self::for_deployment(&DeployConfig::default())
    }
}

impl QatOptions {
    /// The quantization `config` deploys, so that the integer model
    /// ([`crate::deploy::convert_with_ranges`] with [`super::GpuTrainer::activation_ranges`])
    /// computes what training simulated.
    pub fn for_deployment(config: &DeployConfig) -> Self {
        Self {
            weight: config.weight,
            activation: config.activation,
            averaging_constant: 0.01,
        }
    }

    /// Checks the settings: the specs as [`DeployConfig::validate`] checks them (what the
    /// integer kernels can run), and the averaging constant in `(0, 1]`.
    ///
    /// Errors: [`Error::InvalidArgument`] naming the setting.
    pub fn validate(&self) -> Result<()> {
        DeployConfig {
            weight: self.weight,
            activation: self.activation,
            ..DeployConfig::default()
        }
        .validate()?;
        let c = self.averaging_constant;
        if !(c > 0.0 && c <= 1.0) {
            return Err(Error::invalid(format!(
                "QAT averaging constant must be in (0, 1], got {c}"
            )));
        }
        Ok(())
    }
}

/// The QAT state of a trainer.
#[derive(Debug, Clone)]
pub(super) struct QatState {
    pub opts: QatOptions,
    /// One `[2, 1]` min/max per observed value (the input and requantizing outputs).
    pub observers: Vec<Option<GpuTensor>>,
    /// Whether a training forward has fed the observers yet.
    pub observed: bool,
    /// Observers frozen (PyTorch's `disable_observer`): qparams stay as they are.
    pub observers_frozen: bool,
    /// BatchNorm statistics frozen (`freeze_bn_stats`): running statistics in training too.
    pub bn_frozen: bool,
}

/// A fake-quantized value of the forward: the input it was computed from (where the
/// backward's straight-through mask is evaluated) and its qparams.
#[derive(Debug, Clone)]
pub(super) struct Quantized {
    pub pre: GpuTensor,
    pub qparams: GpuQParams,
    pub range: QuantRange,
}

impl Quantized {
    /// The straight-through backward of this fake quant: `d` where `pre` lies inside the
    /// quantization range, 0 outside.
    pub fn backward(&self, ctx: &GpuContext, d: &GpuTensor) -> Result<GpuTensor> {
        kernels::fake_quant::fake_quant_backward(ctx, &self.pre, d, &self.qparams, self.range)
    }
}

impl QatState {
    pub fn new(ctx: &GpuContext, opts: QatOptions, observed: &[bool]) -> Result<Self> {
        opts.validate()?;
        let observers = observed
            .iter()
            .map(|&o| {
                o.then(|| GpuTensor::zeros(ctx, &[2, 1], DType::F32))
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            opts,
            observers,
            observed: false,
            observers_frozen: false,
            bn_frozen: false,
        })
    }

    /// Fake-quantizes value `v` (`y`) with its observer, first updating the observer with
    /// `y`'s min/max when `update`. Returns the fake-quantized tensor and what the backward
    /// needs.
    pub fn activation(
        &self,
        ctx: &GpuContext,
        v: usize,
        y: &GpuTensor,
        update: bool,
    ) -> Result<(GpuTensor, Quantized)> {
        let state = self
            .observers
            .get(v)
            .and_then(Option::as_ref)
            .ok_or_else(|| Error::invalid(format!("internal: value {v} has no observer")))?;
        if update {
            let mm = kernels::observer::min_max(ctx, y, None)?;
            kernels::train::observer_update(
                ctx,
                state,
                &mm,
                Some(self.opts.averaging_constant),
                !self.observed,
            )?;
        } else if !self.observed {
            return Err(Error::invalid(
                "QAT: the activation observers have seen no batch yet; run a training step \
                 (with observers enabled) before evaluating",
            ));
        }
        let spec = &self.opts.activation;
        let qparams = kernels::observer::calc_qparams(ctx, state, spec, None)?;
        let yq = kernels::fake_quant::fake_quant(ctx, y, &qparams, spec.range)?;
        Ok((
            yq,
            Quantized {
                pre: y.clone(),
                qparams,
                range: spec.range,
            },
        ))
    }

    /// Fake-quantizes a weight with qparams observed from it now.
    pub fn weight(&self, ctx: &GpuContext, w: &GpuTensor) -> Result<(GpuTensor, Quantized)> {
        let spec = &self.opts.weight;
        let qparams = kernels::observer::observe(ctx, w, spec)?;
        let wq = kernels::fake_quant::fake_quant(ctx, w, &qparams, spec.range)?;
        Ok((
            wq,
            Quantized {
                pre: w.clone(),
                qparams,
                range: spec.range,
            },
        ))
    }

    /// The observers' ranges, downloaded: `Some((min, max))` per observed value.
    pub fn ranges(&self, ctx: &GpuContext) -> Result<Vec<Option<(f32, f32)>>> {
        if !self.observed {
            return Err(Error::invalid(
                "QAT: the activation observers have seen no batch yet",
            ));
        }
        self.observers
            .iter()
            .map(|o| {
                o.as_ref()
                    .map(|t| {
                        let mm = t.download_f32(ctx)?;
                        Ok((mm[[0, 0]], mm[[1, 0]]))
                    })
                    .transpose()
            })
            .collect()
    }
}
