//! `FakeQuantize` modules and QAT qconfigs: which observer, which quantization, and the state
//! a fake quant carries between steps.

use ndarray::ArrayD;

use crate::backend::HostOps;
use crate::error::{Error, Result};
use crate::quant::{ObserverSpec, QDtype, QParams, QScheme, QuantRange};
use crate::reference::observer::{calculate_qparams, min_max, min_max_per_channel};
use crate::reference::train::observer_combine;

/// How an observer combines the statistics of successive batches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ObserverKind {
    /// `MinMaxObserver` / `PerChannelMinMaxObserver`: the running minimum and maximum over
    /// every batch seen.
    MinMax,
    /// `MovingAverageMinMaxObserver` / `MovingAveragePerChannelMinMaxObserver`: the first
    /// batch's min/max, then `min += c·(min_batch − min)` (likewise max).
    MovingAverage {
        /// `averaging_constant` `c`, in `[0, 1]` (PyTorch's default: 0.01).
        averaging_constant: f32,
    },
}

impl ObserverKind {
    /// PyTorch's default `averaging_constant`, 0.01.
    pub const DEFAULT_AVERAGING_CONSTANT: f32 = 0.01;

    /// `MovingAverage` with PyTorch's default constant 0.01.
    pub fn moving_average() -> Self {
        Self::MovingAverage {
            averaging_constant: Self::DEFAULT_AVERAGING_CONSTANT,
        }
    }

    /// PyTorch's class name of this observer for a per-tensor or per-channel scheme
    /// (`MinMaxObserver`, `PerChannelMinMaxObserver`, `MovingAverageMinMaxObserver`,
    /// `MovingAveragePerChannelMinMaxObserver`).
    pub fn type_name(&self, per_channel: bool) -> &'static str {
        match (self, per_channel) {
            (Self::MinMax, false) => "MinMaxObserver",
            (Self::MinMax, true) => "PerChannelMinMaxObserver",
            (Self::MovingAverage { .. }, false) => "MovingAverageMinMaxObserver",
            (Self::MovingAverage { .. }, true) => "MovingAveragePerChannelMinMaxObserver",
        }
    }
}

/// One fake quant's settings (PyTorch's `FakeQuantize.with_args(observer=..., ...)`): the
/// observer kind and what it computes qparams for ([`ObserverSpec`]: dtype, scheme, range,
/// `ch_axis`, eps).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FakeQuantConfig {
    /// Observer kind.
    pub observer: ObserverKind,
    /// Dtype, scheme (per tensor / per channel, symmetric / affine), integer range, channel
    /// axis, scale eps.
    pub spec: ObserverSpec,
}

impl FakeQuantConfig {
    /// A validated config. Errors: [`Error::InvalidQuantRange`] for a bad range,
    /// [`Error::InvalidArgument`] for an averaging constant outside `[0, 1]` or a negative
    /// or NaN eps.
    pub fn new(observer: ObserverKind, spec: ObserverSpec) -> Result<Self> {
        let c = Self { observer, spec };
        c.validate()?;
        Ok(c)
    }

    /// A running min/max observer with `spec` (validated as [`FakeQuantConfig::new`]).
    pub fn min_max(spec: ObserverSpec) -> Result<Self> {
        Self::new(ObserverKind::MinMax, spec)
    }

    /// A moving-average observer (constant 0.01) with `spec` (validated).
    pub fn moving_average(spec: ObserverSpec) -> Result<Self> {
        Self::new(ObserverKind::moving_average(), spec)
    }

    /// Checks the range, the averaging constant and eps.
    pub fn validate(&self) -> Result<()> {
        self.spec.validate()?;
        if let ObserverKind::MovingAverage { averaging_constant } = self.observer {
            if !(0.0..=1.0).contains(&averaging_constant) {
                return Err(Error::invalid(format!(
                    "averaging_constant must be in [0, 1], got {averaging_constant}"
                )));
            }
        }
        if self.spec.eps.is_nan() || self.spec.eps < 0.0 {
            return Err(Error::invalid(format!(
                "observer eps must be >= 0, got {}",
                self.spec.eps
            )));
        }
        Ok(())
    }

    fn preset(observer: ObserverKind, dtype: QDtype, scheme: QScheme, range: QuantRange) -> Self {
        Self {
            observer,
            spec: ObserverSpec {
                dtype,
                qscheme: scheme,
                range,
                axis: 0,
                eps: f32::EPSILON,
                customized_range: range != dtype.default_range(),
            },
        }
    }

    /// PyTorch's `default_weight_fake_quant`: qint8 `[-128, 127]`, per-tensor symmetric,
    /// moving average (0.01).
    pub fn default_weight() -> Self {
        Self::preset(
            ObserverKind::moving_average(),
            QDtype::QInt8,
            QScheme::PerTensorSymmetric,
            QuantRange::INT8,
        )
    }

    /// PyTorch's `default_fused_per_channel_wt_fake_quant` (the weight of
    /// `get_default_qat_qconfig("x86" | "fbgemm" | "onednn")`): qint8 `[-128, 127]`,
    /// per-channel symmetric along axis 0, moving average (0.01).
    pub fn default_per_channel_weight() -> Self {
        Self::preset(
            ObserverKind::moving_average(),
            QDtype::QInt8,
            QScheme::PerChannelSymmetric,
            QuantRange::INT8,
        )
    }

    /// PyTorch's activation fake quant of the default QAT qconfigs: quint8, per-tensor
    /// affine, moving average (0.01), over `[0, 127]` with `reduce_range` (x86 / fbgemm) or
    /// `[0, 255]` without (qnnpack / onednn).
    pub fn default_activation(reduce_range: bool) -> Self {
        let range = if reduce_range {
            QuantRange {
                quant_min: 0,
                quant_max: 127,
            }
        } else {
            QuantRange::UINT8
        };
        Self::preset(
            ObserverKind::moving_average(),
            QDtype::QUInt8,
            QScheme::PerTensorAffine,
            range,
        )
    }
}

/// What [`crate::qat::prepare_qat`] gives each module (PyTorch's QAT `QConfig`): the weight
/// fake quant and, optionally, a fake quant of the module's output
/// (`activation_post_process`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QatQConfig {
    /// The weight fake quant (`qconfig.weight`).
    pub weight: FakeQuantConfig,
    /// The output fake quant (`qconfig.activation`), or `None` for weight-only QAT.
    pub activation: Option<FakeQuantConfig>,
}

impl QatQConfig {
    /// A qconfig with a weight and an optional output fake quant.
    pub fn new(weight: FakeQuantConfig, activation: Option<FakeQuantConfig>) -> Self {
        Self { weight, activation }
    }

    /// Weight fake quant only.
    pub fn weight_only(weight: FakeQuantConfig) -> Self {
        Self {
            weight,
            activation: None,
        }
    }

    /// PyTorch's `get_default_qat_qconfig(backend)` for `x86` / `fbgemm` (per-channel
    /// weight, activation `[0, 127]`), `qnnpack` (per-tensor weight, activation `[0, 255]`)
    /// and `onednn` (per-channel weight, activation `[0, 255]`); every observer a moving
    /// average with constant 0.01.
    ///
    /// Errors: [`Error::InvalidArgument`] for another backend name.
    pub fn default_qat(backend: &str) -> Result<Self> {
        let (weight, reduce) = match backend {
            "x86" | "fbgemm" => (FakeQuantConfig::default_per_channel_weight(), true),
            "qnnpack" => (FakeQuantConfig::default_weight(), false),
            "onednn" => (FakeQuantConfig::default_per_channel_weight(), false),
            other => {
                return Err(Error::invalid(format!(
                    "unknown QAT backend `{other}` (expected x86, fbgemm, qnnpack or onednn)"
                )))
            }
        };
        Ok(Self {
            weight,
            activation: Some(FakeQuantConfig::default_activation(reduce)),
        })
    }

    /// Checks both fake quant configs ([`FakeQuantConfig::validate`]).
    pub fn validate(&self) -> Result<()> {
        self.weight.validate()?;
        if let Some(a) = &self.activation {
            a.validate()?;
        }
        Ok(())
    }
}

/// `torch.ao.quantization.FakeQuantize`: an observer with running statistics, the stored
/// quantization parameters, and the two switches.
///
/// [`FakeQuantize::forward`] does what PyTorch's does: when `observer_enabled`, the observer
/// sees the input, and `scale` / `zero_point` become its `calculate_qparams()` (so the
/// current batch's statistics are used in the same step); then, when `fake_quant_enabled`,
/// the input is fake-quantized with the stored `scale` / `zero_point`, else passed through.
/// As in PyTorch, the switches do not depend on train / eval mode.
///
/// State (PyTorch's buffers, the names of [`crate::nn::Module::state_dict`]):
/// `fake_quant_enabled`, `observer_enabled`, `scale` (`[1.0]` initially), `zero_point`
/// (`[0]`), and the observer's `eps`, `min_val` and `max_val` (per tensor: one value, `+inf` /
/// `-inf` before any observation; per channel: one per channel, empty before any
/// observation).
#[derive(Debug, Clone, PartialEq)]
pub struct FakeQuantize {
    /// Observer kind.
    pub observer: ObserverKind,
    /// Dtype, scheme, range, channel axis and eps.
    pub spec: ObserverSpec,
    /// The observer's running minimum (`min_val`).
    pub min_val: Vec<f32>,
    /// The observer's running maximum (`max_val`).
    pub max_val: Vec<f32>,
    /// Stored scales (`scale` buffer; one per channel for per-channel schemes once observed).
    pub scale: Vec<f32>,
    /// Stored zero points (`zero_point` buffer).
    pub zero_point: Vec<i32>,
    /// Whether the observer runs in [`FakeQuantize::forward`].
    pub observer_enabled: bool,
    /// Whether [`FakeQuantize::forward`] fake-quantizes (else it passes the input through).
    pub fake_quant_enabled: bool,
}

impl FakeQuantize {
    /// A fresh fake quant (never observed, both switches on), as `qconfig.weight()` builds
    /// it. Errors: those of [`FakeQuantConfig::validate`].
    pub fn new(config: FakeQuantConfig) -> Result<Self> {
        config.validate()?;
        let per_channel = config.spec.qscheme.is_per_channel();
        let (min_val, max_val) = if per_channel {
            (Vec::new(), Vec::new())
        } else {
            (vec![f32::INFINITY], vec![f32::NEG_INFINITY])
        };
        Ok(Self {
            observer: config.observer,
            spec: config.spec,
            min_val,
            max_val,
            scale: vec![1.0],
            zero_point: vec![0],
            observer_enabled: true,
            fake_quant_enabled: true,
        })
    }

    /// The settings this fake quant was built with.
    pub fn config(&self) -> FakeQuantConfig {
        FakeQuantConfig {
            observer: self.observer,
            spec: self.spec,
        }
    }

    /// The observer's averaging constant: `None` for running min / max, `Some(c)` for the
    /// moving average (the form [`crate::reference::train::observer_update`] and
    /// [`crate::backend::QuantOps::observe_running`] take).
    pub fn averaging_constant(&self) -> Option<f32> {
        match self.observer {
            ObserverKind::MinMax => None,
            ObserverKind::MovingAverage { averaging_constant } => Some(averaging_constant),
        }
    }

    /// Whether the scheme is per channel.
    pub fn is_per_channel(&self) -> bool {
        self.spec.qscheme.is_per_channel()
    }

    /// The integer range.
    pub fn range(&self) -> QuantRange {
        self.spec.range
    }

    /// Whether the observer has seen any data (its statistics are not the initial ones).
    pub fn is_observed(&self) -> bool {
        if self.is_per_channel() {
            !self.min_val.is_empty()
        } else {
            let initial = self.min_val.first() == Some(&f32::INFINITY)
                && self.max_val.first() == Some(&f32::NEG_INFINITY);
            !(self.min_val.is_empty() || initial)
        }
    }

    /// The observer's forward: updates `min_val` / `max_val` with `x` (an empty tensor is
    /// ignored), then stores `calculate_qparams()` as `scale` / `zero_point`. Runs whatever
    /// `observer_enabled` says ([`FakeQuantize::forward`] checks it).
    ///
    /// Errors: [`Error::AxisOutOfRange`] for a per-channel axis `x` does not have;
    /// [`Error::ShapeMismatch`] when the per-channel count differs from earlier batches.
    pub fn observe(&mut self, x: &ArrayD<f32>) -> Result<()> {
        if x.is_empty() {
            return Ok(());
        }
        let per_channel = self.is_per_channel();
        let (cur_min, cur_max) = if per_channel {
            // A negative axis is resolved against the first batch's rank and kept so.
            let spec = self.spec.for_rank(x.ndim())?;
            let cur = min_max_per_channel(x, spec.channel_axis(x.ndim())?)?;
            self.spec = spec;
            cur
        } else {
            let (a, b) = min_max(x);
            (vec![a], vec![b])
        };
        let first = !self.is_observed();
        if per_channel && !first && cur_min.len() != self.min_val.len() {
            return Err(Error::shape(
                format!(
                    "per-channel observer (channels along axis {})",
                    self.spec.axis
                ),
                &[self.min_val.len()],
                &[cur_min.len()],
            ));
        }
        if first {
            self.min_val = cur_min;
            self.max_val = cur_max;
        } else {
            // One formula for every backend: reference::train::observer_combine.
            let c = self.averaging_constant();
            for (m, v) in self.min_val.iter_mut().zip(cur_min) {
                *m = observer_combine(*m, v, false, c, false);
            }
            for (m, v) in self.max_val.iter_mut().zip(cur_max) {
                *m = observer_combine(*m, v, true, c, false);
            }
        }
        let qp = self.calculate_qparams();
        self.scale = qp.scale;
        self.zero_point = qp.zero_point;
        Ok(())
    }

    /// The observer's `calculate_qparams()` from its current statistics (scale 1.0, zero
    /// point 0 before any observation), per [`crate::reference::observer::calculate_qparams`].
    pub fn calculate_qparams(&self) -> QParams {
        calculate_qparams(&self.min_val, &self.max_val, &self.spec)
    }

    /// The stored `scale` / `zero_point` as [`QParams`] (per channel along `spec.axis` for
    /// per-channel schemes).
    ///
    /// Errors: [`Error::ShapeMismatch`] for a per-tensor fake quant whose stored scale is not
    /// one value, or scale and zero point of different lengths.
    pub fn qparams(&self) -> Result<QParams> {
        if self.scale.len() != self.zero_point.len() {
            return Err(Error::shape(
                "FakeQuantize zero_point (vs scale)",
                &[self.scale.len()],
                &[self.zero_point.len()],
            ));
        }
        if self.is_per_channel() {
            let axis = usize::try_from(self.spec.axis).unwrap_or(0);
            QParams::per_channel(self.scale.clone(), self.zero_point.clone(), axis)
        } else {
            match (self.scale.as_slice(), self.zero_point.as_slice()) {
                ([s], [z]) => Ok(QParams::per_tensor(*s, *z)),
                _ => Err(Error::shape(
                    "per-tensor FakeQuantize scale",
                    &[1],
                    &[self.scale.len()],
                )),
            }
        }
    }

    /// PyTorch's `FakeQuantize.forward`: observe (when `observer_enabled`), then
    /// fake-quantize with the stored qparams on `backend` (when `fake_quant_enabled`).
    ///
    /// Errors: those of [`FakeQuantize::observe`], [`FakeQuantize::qparams`] and the
    /// backend's fake quant (a NaN scale from NaN data is [`Error::InvalidScale`]).
    pub fn forward(&mut self, backend: &dyn HostOps, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        if self.observer_enabled {
            self.observe(x)?;
        }
        if self.fake_quant_enabled {
            backend.fake_quant(x, &self.qparams()?, self.spec.range)
        } else {
            Ok(x.clone())
        }
    }

    /// The straight-through gradient of the last [`FakeQuantize::forward`] at input `x`:
    /// `dy` where the rounded value is in range (with the stored qparams), `dy` everywhere
    /// when fake quant is disabled.
    ///
    /// Errors: those of [`FakeQuantize::qparams`] and the backend's fake quant backward.
    pub fn backward(
        &self,
        backend: &dyn HostOps,
        x: &ArrayD<f32>,
        dy: &ArrayD<f32>,
    ) -> Result<ArrayD<f32>> {
        if self.fake_quant_enabled {
            backend.fake_quant_backward(x, dy, &self.qparams()?, self.spec.range)
        } else {
            Ok(dy.clone())
        }
    }
}
