//! [`QuantTargets`]: fake quantization of a module's input, weight, bias and output,
//! applied inside its forward.

use std::fmt;

use ndarray::{Array1, Array2, Array4, ArrayD, Ix2, Ix4};

use super::fused::FusedHead;
use super::layer::Layer;
use super::FakeQuantize;
use crate::backend::HostOps;
use crate::error::{Error, Result};

/// Which tensor of a module a [`FakeQuantize`] of [`QuantTargets`] applies to: NNI's `target_names`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QuantTarget {
    /// `_input_`: the module's input.
    Input,
    /// `weight`: the module's weight (after BatchNorm folding, for a fused module).
    Weight,
    /// `bias`: the module's bias.
    Bias,
    /// `_output_`: the module's output (after its activation, for a fused module).
    Output,
}

impl QuantTarget {
    /// Every target, in the order the forward applies them.
    pub const ALL: [QuantTarget; 4] = [
        QuantTarget::Input,
        QuantTarget::Weight,
        QuantTarget::Bias,
        QuantTarget::Output,
    ];

    /// NNI's name: `_input_`, `weight`, `bias`, `_output_`.
    pub fn name(self) -> &'static str {
        match self {
            QuantTarget::Input => "_input_",
            QuantTarget::Weight => "weight",
            QuantTarget::Bias => "bias",
            QuantTarget::Output => "_output_",
        }
    }

    /// Parses NNI's name (`_input_`, `weight`, `bias`, `_output_`; also `_input_0` and
    /// `_output_0`, NNI's canonical forms).
    ///
    /// Errors: [`Error::InvalidArgument`] naming the value.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "_input_" | "_input_0" => Ok(QuantTarget::Input),
            "weight" => Ok(QuantTarget::Weight),
            "bias" => Ok(QuantTarget::Bias),
            "_output_" | "_output_0" => Ok(QuantTarget::Output),
            other => Err(Error::invalid(format!(
                "unknown quantization target `{other}` (expected one of _input_, weight, bias, \
                 _output_)"
            ))),
        }
    }
}

impl fmt::Display for QuantTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// [`FakeQuantize::forward`] with the "never calibrated" check; `None` when `x` passes
/// through unchanged. `what` names the tensor in errors.
fn apply_fq(
    fq: &mut FakeQuantize,
    backend: &dyn HostOps,
    x: &ArrayD<f32>,
    what: &str,
) -> Result<Option<ArrayD<f32>>> {
    if fq.observer_enabled {
        fq.observe(x)?;
    }
    if !fq.fake_quant_enabled {
        return Ok(None);
    }
    if !fq.is_observed() {
        return Err(Error::invalid(format!(
            "fake quantization of {what} has no qparams: calibrate first (its observer is \
             disabled and has never seen data)"
        )));
    }
    backend
        .fake_quant(x, &fq.qparams()?, fq.spec.range)
        .map(Some)
}

/// The quantization targets of one module: fake quantization of its input, weight, bias and
/// output, each a [`FakeQuantize`] (PyTorch's `FakeQuantize`: an observer, the stored
/// qparams, and the *observer enabled* / *fake quant enabled* switches), applied inside the
/// module's forward.
///
/// [`QuantTargets`] holds up to four of them, one per NNI target (`_input_`, `weight`,
/// `bias`, `_output_`). A [`Module`](super::Module) with targets
/// ([`Module::set_quant_targets`](super::Module::set_quant_targets)) runs, inside its forward
/// (after its forward pre-hooks, before its forward hooks):
///
/// ```text
/// x' = FQ_input(x)
/// y  = op(x') with weight FQ_weight(W) and bias FQ_bias(b)
/// y' = FQ_output(y)
/// ```
///
/// where each `FQ` is [`FakeQuantize::forward`]: observe when the observer is enabled (the
/// qparams are recomputed from the running statistics, this batch included), then
/// fake-quantize with the stored qparams when fake quant is enabled. So in calibration
/// (both switches on) every target is observed *then* quantized in the same pass, and the
/// output observer sees the output computed from the quantized input and weight (PyTorch's
/// and NNI's calibration order). Unlike a bare `FakeQuantize`, a target that was never
/// observed refuses to fake-quantize (an error, instead of PyTorch's scale 1 / zero point 0).
///
/// `op` is the module's whole forward: for a fused `ConvReLU2d` the output target comes
/// after the ReLU, as NNI quantizes a fused module's output after its activation. Weight and
/// bias targets need a module with a weight ([`weight_channel_axis`]): `Conv1d`, `Conv2d`,
/// `ConvTranspose2d`, `Linear`, and fused modules whose BatchNorm is folded (`ConvReLU2d`,
/// `LinearReLU`, ...); the layer keeps its float parameters. QAT modules
/// ([`crate::qat::QatLayer`]) quantize their weight and output themselves; a target set on
/// them holds the input fake quant only. In [`Module::forward`](super::Module::forward) the
/// statistics are reduced on the host (tensors cross the [`HostOps`] interface as host
/// arrays) and the fake quantization runs on the backend; [`super::DeviceChain`] runs the
/// same targets, observers included, on a backend's own tensors
/// ([`crate::config::calibrate`] calibrates through it).
///
/// [`crate::config`] builds these from an NNI-style `config_list`; they can also be set by
/// hand:
///
/// ```
/// use ndarray::{Array2, ArrayD, IxDyn};
/// use qfuse::nn::{Module, QuantTarget, QuantTargets};
/// use qfuse::qat::{FakeQuantConfig, FakeQuantize};
/// use qfuse::quant::{ObserverSpec, QDtype, QScheme, QuantRange};
/// use qfuse::CpuBackend;
///
/// let spec = ObserverSpec::new(QDtype::QInt8, QScheme::PerTensorAffine, QuantRange::INT8, 0)?;
/// let fq = || FakeQuantize::new(FakeQuantConfig::min_max(spec)?);
/// let mut fc = Module::linear(Array2::from_elem((2, 3), 0.3), None)?;
/// let mut q = QuantTargets::default();
/// q.set(QuantTarget::Input, Some(fq()?));
/// q.set(QuantTarget::Weight, Some(fq()?));
/// fc.set_quant_targets(Some(q));
///
/// // Calibration: observers and fake quant enabled (a new FakeQuantize's state).
/// let x = ArrayD::from_shape_fn(IxDyn(&[4, 3]), |d| d[0] as f32 - d[1] as f32 * 0.5);
/// fc.forward(&CpuBackend, &x)?;
/// let input = fc.quant_targets().and_then(|q| q.get(QuantTarget::Input)).unwrap();
/// assert_eq!((input.min_val.as_slice(), input.max_val.as_slice()), (&[-1.0f32][..], &[3.0f32][..]));
/// assert_eq!(input.qparams()?.scale, vec![4.0 / 255.0]);
/// # Ok::<(), qfuse::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QuantTargets {
    /// `_input_`.
    pub input: Option<FakeQuantize>,
    /// `weight`.
    pub weight: Option<FakeQuantize>,
    /// `bias`.
    pub bias: Option<FakeQuantize>,
    /// `_output_`.
    pub output: Option<FakeQuantize>,
}

impl QuantTargets {
    /// The fake quant of `target`.
    pub fn get(&self, target: QuantTarget) -> Option<&FakeQuantize> {
        match target {
            QuantTarget::Input => self.input.as_ref(),
            QuantTarget::Weight => self.weight.as_ref(),
            QuantTarget::Bias => self.bias.as_ref(),
            QuantTarget::Output => self.output.as_ref(),
        }
    }

    /// The fake quant of `target`, mutably.
    pub fn get_mut(&mut self, target: QuantTarget) -> Option<&mut FakeQuantize> {
        self.slot(target).as_mut()
    }

    /// Sets (or with `None` removes) the fake quant of `target`; returns the previous one.
    pub fn set(&mut self, target: QuantTarget, fq: Option<FakeQuantize>) -> Option<FakeQuantize> {
        std::mem::replace(self.slot(target), fq)
    }

    fn slot(&mut self, target: QuantTarget) -> &mut Option<FakeQuantize> {
        match target {
            QuantTarget::Input => &mut self.input,
            QuantTarget::Weight => &mut self.weight,
            QuantTarget::Bias => &mut self.bias,
            QuantTarget::Output => &mut self.output,
        }
    }

    /// The targets that are set, in forward order (input, weight, bias, output).
    pub fn iter(&self) -> impl Iterator<Item = (QuantTarget, &FakeQuantize)> {
        QuantTarget::ALL
            .into_iter()
            .filter_map(move |t| self.get(t).map(|fq| (t, fq)))
    }

    /// The targets that are set, mutably, in forward order.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (QuantTarget, &mut FakeQuantize)> {
        [
            (QuantTarget::Input, self.input.as_mut()),
            (QuantTarget::Weight, self.weight.as_mut()),
            (QuantTarget::Bias, self.bias.as_mut()),
            (QuantTarget::Output, self.output.as_mut()),
        ]
        .into_iter()
        .filter_map(|(t, fq)| fq.map(|fq| (t, fq)))
    }

    /// Whether no target is set.
    pub fn is_empty(&self) -> bool {
        self.iter().next().is_none()
    }
}

/// The axis of `layer`'s weight that holds its output channels (the per-channel axis of a
/// weight observer: 0 for convs and linears, 1 for transposed convs), or `None` when the
/// layer has no weight that a [`QuantTarget::Weight`] can quantize.
pub fn weight_channel_axis(layer: &Layer) -> Option<usize> {
    match layer {
        Layer::Conv1d(_) | Layer::Conv2d(_) | Layer::Linear(_) => Some(0),
        Layer::ConvTranspose2d(_) => Some(1),
        Layer::Fused(f) if f.bn.is_none() => match &f.head {
            FusedHead::Conv1d(_) | FusedHead::Conv2d(_) | FusedHead::Linear(_) => Some(0),
            FusedHead::ConvTranspose2d(_) => Some(1),
            _ => None,
        },
        _ => None,
    }
}

/// Whether `layer` has a bias that a [`QuantTarget::Bias`] can quantize (a layer with a
/// quantizable weight and `bias: Some`).
pub fn has_quantizable_bias(layer: &Layer) -> bool {
    match layer {
        Layer::Conv1d(c) | Layer::Conv2d(c) => c.bias.is_some(),
        Layer::ConvTranspose2d(c) => c.bias.is_some(),
        Layer::Linear(l) => l.bias.is_some(),
        Layer::Fused(f) if f.bn.is_none() => match &f.head {
            FusedHead::Conv1d(c) | FusedHead::Conv2d(c) => c.bias.is_some(),
            FusedHead::ConvTranspose2d(c) => c.bias.is_some(),
            FusedHead::Linear(l) => l.bias.is_some(),
            _ => false,
        },
        _ => false,
    }
}

/// The weight and bias slots of a layer with a quantizable weight.
enum WeightSlot<'a> {
    Dyn(&'a mut ArrayD<f32>),
    D4(&'a mut Array4<f32>),
    D2(&'a mut Array2<f32>),
}

fn slots(layer: &mut Layer) -> Option<(WeightSlot<'_>, &mut Option<Array1<f32>>)> {
    match layer {
        Layer::Conv1d(c) | Layer::Conv2d(c) => Some((WeightSlot::Dyn(&mut c.weight), &mut c.bias)),
        Layer::ConvTranspose2d(c) => Some((WeightSlot::D4(&mut c.weight), &mut c.bias)),
        Layer::Linear(l) => Some((WeightSlot::D2(&mut l.weight), &mut l.bias)),
        Layer::Fused(f) if f.bn.is_none() => match &mut f.head {
            FusedHead::Conv1d(c) | FusedHead::Conv2d(c) => {
                Some((WeightSlot::Dyn(&mut c.weight), &mut c.bias))
            }
            FusedHead::ConvTranspose2d(c) => Some((WeightSlot::D4(&mut c.weight), &mut c.bias)),
            FusedHead::Linear(l) => Some((WeightSlot::D2(&mut l.weight), &mut l.bias)),
            _ => None,
        },
        _ => None,
    }
}

impl WeightSlot<'_> {
    fn get(&self) -> ArrayD<f32> {
        match self {
            WeightSlot::Dyn(w) => (*w).clone(),
            WeightSlot::D4(w) => (*w).clone().into_dyn(),
            WeightSlot::D2(w) => (*w).clone().into_dyn(),
        }
    }

    /// Puts `w` in the slot; returns the previous weight (as ArrayD).
    fn swap(&mut self, w: ArrayD<f32>) -> Result<ArrayD<f32>> {
        let internal = |e: ndarray::ShapeError| Error::invalid(format!("internal: {e}"));
        Ok(match self {
            WeightSlot::Dyn(slot) => std::mem::replace(*slot, w),
            WeightSlot::D4(slot) => {
                std::mem::replace(*slot, w.into_dimensionality::<Ix4>().map_err(internal)?)
                    .into_dyn()
            }
            WeightSlot::D2(slot) => {
                std::mem::replace(*slot, w.into_dimensionality::<Ix2>().map_err(internal)?)
                    .into_dyn()
            }
        })
    }
}

fn target_name(path: &str, t: QuantTarget) -> String {
    if path.is_empty() {
        format!("`{t}`")
    } else {
        format!("`{path}.{t}`")
    }
}

/// The forward of a module with quantization targets: `FQ_output(op(FQ_input(x), FQ_weight(W),
/// FQ_bias(b)))`, where `op` is [`super::forward::forward_layer`]. The layer's own weight and
/// bias are left as they were.
pub(crate) fn forward_quantized(
    q: &mut QuantTargets,
    layer: &mut Layer,
    training: bool,
    b: &dyn HostOps,
    x: &ArrayD<f32>,
    path: &str,
) -> Result<ArrayD<f32>> {
    let xq = match &mut q.input {
        Some(fq) => apply_fq(fq, b, x, &target_name(path, QuantTarget::Input))?,
        None => None,
    };
    let input = xq.as_ref().unwrap_or(x);
    let y = if q.weight.is_none() && q.bias.is_none() {
        super::forward::forward_layer(layer, training, b, input, path)?
    } else {
        let kind = layer.kind_name();
        let no_weight = || {
            Error::invalid(format!(
                "module `{path}` ({kind}) has no weight and bias to fake-quantize (weight and bias \
                 targets need a Conv, ConvTranspose or Linear, or a fused module with its \
                 BatchNorm folded)"
            ))
        };
        // Fake-quantize the parameters, swap them in, run, swap the originals back.
        let (wq, bq) = {
            let (w, bias) = slots(layer).ok_or_else(no_weight)?;
            let wq = match &mut q.weight {
                Some(fq) => apply_fq(fq, b, &w.get(), &target_name(path, QuantTarget::Weight))?,
                None => None,
            };
            let bq = match (&mut q.bias, bias.as_ref()) {
                (Some(fq), Some(bv)) => apply_fq(
                    fq,
                    b,
                    &bv.clone().into_dyn(),
                    &target_name(path, QuantTarget::Bias),
                )?
                .map(|a| {
                    a.into_dimensionality::<ndarray::Ix1>()
                        .map_err(|e| Error::invalid(format!("internal: {e}")))
                })
                .transpose()?,
                _ => None,
            };
            (wq, bq)
        };
        let (old_w, old_b) = {
            let (mut w, bias) = slots(layer).ok_or_else(no_weight)?;
            let old_w = match wq {
                Some(wq) => Some(w.swap(wq)?),
                None => None,
            };
            let old_b = bq.map(|bq| bias.replace(bq));
            (old_w, old_b)
        };
        let y = super::forward::forward_layer(layer, training, b, input, path);
        if let Some((mut w, bias)) = slots(layer) {
            if let Some(old_w) = old_w {
                w.swap(old_w)?;
            }
            if let Some(old_b) = old_b {
                *bias = old_b;
            }
        }
        y?
    };
    match &mut q.output {
        Some(fq) => Ok(apply_fq(fq, b, &y, &target_name(path, QuantTarget::Output))?.unwrap_or(y)),
        None => Ok(y),
    }
}
