//! Quantization-aware training on a [`crate::nn`] tree: QAT modules built from fused float
//! modules (PyTorch's `prepare_qat` / `from_float`, MQBench's nni → nniqat swap), their
//! switches, a training step, and the conversions back.
//!
//! # Conversion: [`prepare_qat`]
//! [`prepare_qat`]`(&mut model, &qconfig)` replaces, in place, every
//! * intrinsic fused module ([`crate::nn::Fused`] with `bn: Some`, from
//!   [`crate::fuse::fuse_modules_qat`]): `ConvBn1d`, `ConvBn2d`, `ConvBnReLU1d`,
//!   `ConvBnReLU2d`, `LinearBn1d` (and the other activations);
//! * folded fused module with a conv / linear head: `ConvReLU1d`, `ConvReLU2d`, `LinearReLU`
//!   (and the other activations);
//! * plain `Conv1d`, `Conv2d`, `Linear`
//!
//! by a QAT module ([`crate::nn::Layer::Qat`] holding a [`QatLayer`]) carrying the same
//! parameters and buffers, a weight fake quant ([`FakeQuantize`], built from
//! [`QatQConfig::weight`]) and, when [`QatQConfig::activation`] is set, an output fake quant
//! (`activation_post_process`). The QAT module's [`kind_name`](crate::nn::Module::kind_name)
//! is PyTorch's class name: `ConvBn2d`, `ConvBnReLU2d`, `LinearBn1d`, `ConvReLU2d`,
//! `LinearReLU` are `torch.ao.nn.intrinsic.qat` types; `Conv2d`, `Conv1d`, `Linear` are
//! `torch.ao.nn.qat` types ([`QatLayer::qualified_name`] gives the full name). The module
//! keeps its training flag and hooks. Transposed convs, `BNReLU2d` and every other kind stay
//! as they are. [`prepare_qat_with`] chooses the qconfig (or none) per module path, for
//! NNI-style configs that target some modules only.
//!
//! A [`FakeQuantConfig`] is an observer kind ([`ObserverKind::MinMax`], or
//! [`ObserverKind::MovingAverage`] with its `averaging_constant`) and an
//! [`crate::quant::ObserverSpec`] (dtype, per tensor / per channel, symmetric / affine,
//! range, channel axis); [`QatQConfig::default_qat`] gives PyTorch's
//! `get_default_qat_qconfig` presets.
//!
//! # Forward, switches
//! See [`QatLayer`] for the forward in training and eval mode (the ConvBn training forward
//! is [`crate::HostOps::conv_bn_qat_forward_with`]; eval is the deploy graph). Over a whole
//! tree, as PyTorch's `model.apply(...)` helpers:
//! [`freeze_bn_stats`] / [`update_bn_stats`] (PyTorch's `freeze_bn`: in training mode the
//! BatchNorm uses its running statistics and leaves them unchanged),
//! [`disable_observer`] / [`enable_observer`] and [`disable_fake_quant`] /
//! [`enable_fake_quant`] (every [`FakeQuantize`] of every QAT module, weight and output).
//!
//! ## γ = 0
//! PyTorch's default QAT path (`_forward_approximate`) divides by `s = γ/σ`, so a channel
//! with γ = 0 gives NaN outputs and a NaN running mean. qfuse stays finite: such a channel
//! takes the two-pass form of the same math (its conv runs with its unscaled weight,
//! fake-quantized, and the BatchNorm normalizes that as usual; its output is `β`, as in the
//! float model). Other channels are computed exactly as PyTorch does. See
//! [`crate::reference::conv_bn::conv_bn_qat_forward_with`].
//!
//! # Training step
//! [`train_step`] runs a forward and a backward through a *sequential* model (containers
//! without a custom forward, run in their declared order) of QAT modules, activations,
//! `Identity` and `Flatten`: the ConvBn QAT modules through
//! [`crate::HostOps::conv_bn_qat_backward`], the plain QAT modules through
//! [`crate::HostOps::conv2d_backward`] with the fake quants' straight-through gradients. It
//! returns the loss, the output, `dx` and the parameter gradients by state-dict name
//! (`conv1.weight`, `conv1.bn.weight`, ...); [`sgd_step`] applies them. A general autograd
//! over arbitrary trees (custom forwards, residual adds, pooling) is out of scope; such
//! models are refused with a typed error.
//!
//! # Conversion back
//! * [`convert_to_float`]: PyTorch's `to_float()` on every QAT module: BatchNorm folded with
//!   the running statistics (`ConvBn2d` → `Conv2d`, `ConvBnReLU2d` → fused `ConvReLU2d`,
//!   `LinearBn1d` → `Linear`; `ConvReLU2d` → `ConvReLU2d`, `Conv2d` → `Conv2d`), fake quants
//!   dropped.
//! * [`convert_to_deployable`]: the same with every folded weight already fake-quantized
//!   with its final qparams, and those qparams (weight and output) by module path: what int8
//!   deployment consumes.
//!
//! # State dicts
//! [`crate::nn::Module::state_dict`] names a QAT module's tensors as `torch.ao` does:
//! `weight`, `bias`, `bn.weight`, `bn.bias`, `bn.running_mean`, `bn.running_var`,
//! `bn.num_batches_tracked`, then `weight_fake_quant.{fake_quant_enabled, observer_enabled,
//! scale, zero_point}`, `weight_fake_quant.activation_post_process.{eps, min_val, max_val}`,
//! and the same under `activation_post_process` for the output fake quant.
//!
//! # Example
//! ```
//! use ndarray::{Array1, Array4, ArrayD, IxDyn};
//! use qfuse::fuse::{fuse_modules_qat, FuseOptions};
//! use qfuse::nn::Module;
//! use qfuse::ops::{BatchNorm, Conv2dParams};
//! use qfuse::qat::{self, QatQConfig};
//! use qfuse::CpuBackend;
//!
//! let bn = BatchNorm {
//!     weight: Some(Array1::ones(4)),
//!     bias: Some(Array1::zeros(4)),
//!     running_mean: Array1::zeros(4),
//!     running_var: Array1::ones(4),
//!     eps: 1e-5,
//!     momentum: 0.1,
//! };
//! let w = Array4::from_shape_fn([4, 3, 3, 3], |(o, i, h, k)| ((o + 2 * i + h + k) % 5) as f32 * 0.1 - 0.2);
//! let mut model = Module::sequential([
//!     Module::conv2d(w, None, Conv2dParams { padding: [1, 1], ..Default::default() })?,
//!     Module::batch_norm2d(bn)?,
//!     Module::relu(),
//! ]);
//! // Intrinsic ConvBnReLU2d, then its QAT module (PyTorch's fbgemm / x86 QAT qconfig).
//! fuse_modules_qat(&mut model, ["0", "1", "2"], FuseOptions { inplace: true, ..Default::default() })?;
//! let converted = qat::prepare_qat(&mut model, &QatQConfig::default_qat("x86")?)?;
//! assert_eq!(converted, ["0"]);
//! assert_eq!(model.get("0")?.kind_name(), "ConvBnReLU2d");
//!
//! // Training-mode forward: fake-quantized BN-scaled weight, batch statistics.
//! let x = ArrayD::from_shape_fn(IxDyn(&[2, 3, 6, 6]), |d| (d[2] as f32 - d[3] as f32) * 0.1);
//! let y = model.forward(&CpuBackend, &x)?;
//! assert_eq!(y.shape(), &[2, 4, 6, 6]);
//!
//! // PyTorch's names in the state dict.
//! let sd = model.state_dict()?;
//! assert!(sd.contains("0.bn.running_mean") && sd.contains("0.weight_fake_quant.scale"));
//!
//! // Freeze the BatchNorm statistics, stop observing; then fold back.
//! qat::freeze_bn_stats(&mut model);
//! qat::disable_observer(&mut model);
//! let float = qat::convert_to_float(&model)?;
//! assert_eq!(float.get("0")?.kind_name(), "ConvReLU2d");
//! let deploy = qat::convert_to_deployable(&model)?;
//! assert!(deploy.qparams.contains_key("0"));
//! # Ok::<(), qfuse::Error>(())
//! ```

mod train;

use std::collections::BTreeMap;

pub use crate::nn::fake_quantize::{FakeQuantConfig, FakeQuantize, ObserverKind, QatQConfig};
pub use crate::nn::qat_layer::{DeployQParams, FinalQParams, QatHead, QatLayer};
pub use train::{sgd_step, train_step, Gradients, TrainStep};

use crate::error::Result;
use crate::nn::{Layer, Module};

/// PyTorch's `prepare_qat(model, inplace=True)` with one qconfig for every module: converts
/// every convertible module (see the [module docs](self#conversion-prepare_qat)) to its QAT
/// module, in place. Returns the converted paths, in [`Module::named_modules`] order.
/// Already-QAT modules are left alone, so a second call converts nothing.
///
/// On error the model is unchanged.
///
/// Errors: the qconfig's validation errors, [`crate::Error::AxisOutOfRange`] for a
/// per-channel weight axis a weight does not have, [`crate::Error::ChannelMismatch`] for an
/// intrinsic module whose BatchNorm does not fit its head.
pub fn prepare_qat(model: &mut Module, qconfig: &QatQConfig) -> Result<Vec<String>> {
    prepare_qat_with(model, |_, _| Some(*qconfig))
}

/// [`prepare_qat`] with a qconfig chosen per module: `qconfig_for(path, module)` is called
/// for every module of the tree (in [`Module::named_modules`] order) and returns the
/// qconfig to convert it with, or `None` to leave it float (PyTorch's per-module
/// `qconfig` attribute, NNI's targeted config entries). Returns the converted paths.
///
/// On error the model is unchanged. Errors: as [`prepare_qat`].
pub fn prepare_qat_with(
    model: &mut Module,
    mut qconfig_for: impl FnMut(&str, &Module) -> Option<QatQConfig>,
) -> Result<Vec<String>> {
    let mut plan = Vec::new();
    for (path, m) in model.named_modules() {
        let Some(q) = qconfig_for(&path, m) else {
            continue;
        };
        if let Some(qat) = QatLayer::from_layer(m.layer(), &q)? {
            plan.push((path, qat));
        }
    }
    let mut paths = Vec::with_capacity(plan.len());
    for (path, qat) in plan {
        *model.get_mut(&path)?.layer_mut() = Layer::Qat(Box::new(qat));
        paths.push(path);
    }
    Ok(paths)
}

/// Calls `f` on every QAT module of the tree; returns how many `f` reported as affected.
fn for_each_qat(model: &mut Module, mut f: impl FnMut(&mut QatLayer) -> bool) -> usize {
    let mut n = 0;
    model.visit_mut(&mut |_, m| {
        if let Layer::Qat(q) = m.layer_mut() {
            if f(q) {
                n += 1;
            }
        }
    });
    n
}

/// PyTorch's `model.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)`: every QAT module
/// with a BatchNorm (`ConvBn*`, `ConvBnReLU*`, `LinearBn1d`) normalizes with its running
/// statistics and stops updating them, in training mode too. Returns how many modules.
pub fn freeze_bn_stats(model: &mut Module) -> usize {
    for_each_qat(model, QatLayer::freeze_bn_stats)
}

/// PyTorch's `model.apply(torch.ao.nn.intrinsic.qat.update_bn_stats)`: undoes
/// [`freeze_bn_stats`]. Returns how many modules.
pub fn update_bn_stats(model: &mut Module) -> usize {
    for_each_qat(model, QatLayer::update_bn_stats)
}

fn set_fake_quants(model: &mut Module, f: impl Fn(&mut FakeQuantize)) -> usize {
    for_each_qat(model, |q| {
        q.fake_quants_mut().for_each(&f);
        true
    })
}

/// PyTorch's `model.apply(torch.ao.quantization.disable_observer)`: every fake quant
/// (weight and output) of every QAT module keeps its statistics and stored qparams. Returns
/// how many QAT modules.
pub fn disable_observer(model: &mut Module) -> usize {
    set_fake_quants(model, |f| f.observer_enabled = false)
}

/// PyTorch's `model.apply(torch.ao.quantization.enable_observer)`. Returns how many QAT
/// modules.
pub fn enable_observer(model: &mut Module) -> usize {
    set_fake_quants(model, |f| f.observer_enabled = true)
}

/// PyTorch's `model.apply(torch.ao.quantization.disable_fake_quant)`: every fake quant of
/// every QAT module passes its input through (its observer still runs when enabled).
/// Returns how many QAT modules.
pub fn disable_fake_quant(model: &mut Module) -> usize {
    set_fake_quants(model, |f| f.fake_quant_enabled = false)
}

/// PyTorch's `model.apply(torch.ao.quantization.enable_fake_quant)`. Returns how many QAT
/// modules.
pub fn enable_fake_quant(model: &mut Module) -> usize {
    set_fake_quants(model, |f| f.fake_quant_enabled = true)
}

/// A copy of `model` with every QAT module replaced by its float layer
/// ([`QatLayer::to_float`]: BatchNorm folded with the running statistics; `ConvBnReLU2d` →
/// fused `ConvReLU2d`). Training flags and hooks are kept. `model` is unchanged.
///
/// Errors: the folding's errors.
pub fn convert_to_float(model: &Module) -> Result<Module> {
    let mut plan = Vec::new();
    for (path, m) in model.named_modules() {
        if let Layer::Qat(q) = m.layer() {
            plan.push((path, q.to_float()?));
        }
    }
    let mut out = model.clone();
    for (path, layer) in plan {
        *out.get_mut(&path)?.layer_mut() = layer;
    }
    Ok(out)
}

/// What [`convert_to_deployable`] returns.
#[derive(Debug, Clone)]
pub struct Deployable {
    /// The float model with folded, fake-quantized weights (its forward simulates int8
    /// weights; outputs are not fake-quantized: their qparams are in `qparams`).
    pub model: Module,
    /// The final qparams of every converted module, by path.
    pub qparams: BTreeMap<String, DeployQParams>,
}

/// [`convert_to_float`] with every folded weight fake-quantized with its final qparams
/// ([`QatLayer::to_deployable`]: the weight fake quant's stored `scale` / `zero_point`, or,
/// if it never observed anything, the qparams of its observer seeing the folded weight),
/// plus those qparams and the output fake quants' by module path. This is what int8
/// deployment consumes (the int8 kernels themselves are not part of qfuse yet). `model` is
/// unchanged.
///
/// Errors: the folding's and the fake quants' errors.
pub fn convert_to_deployable(model: &Module) -> Result<Deployable> {
    let mut plan = Vec::new();
    let mut qparams = BTreeMap::new();
    for (path, m) in model.named_modules() {
        if let Layer::Qat(q) = m.layer() {
            let (layer, qp) = q.to_deployable()?;
            qparams.insert(path.clone(), qp);
            plan.push((path, layer));
        }
    }
    let mut out = model.clone();
    for (path, layer) in plan {
        *out.get_mut(&path)?.layer_mut() = layer;
    }
    Ok(Deployable {
        model: out,
        qparams,
    })
}
