//! Applying a [`ConfigList`] to a module tree: fusion, quantization targets, calibration.

use std::collections::HashMap;

use ndarray::ArrayD;

use super::ConfigList;
use crate::backend::{Backend, HostOps};
use crate::error::{Error, Result};
use crate::fuse::{fuse_modules, fuse_modules_qat, FuseOptions};
use crate::io::text::{escape, escape_list};
use crate::nn::{
    has_quantizable_bias, weight_channel_axis, DeviceChain, Layer, Module, QuantTarget,
};
use crate::qat::{prepare_qat_with, FakeQuantConfig, FakeQuantize, QatLayer, QatQConfig};
use crate::quant::{ObserverSpec, QParams};

/// The flow a config is applied for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantMode {
    /// Post-training quantization: eval mode, [`fuse_modules`] (BatchNorm folded), every
    /// target a [`FakeQuantize`] with a min/max observer (`MinMaxObserver` /
    /// `PerChannelMinMaxObserver`), calibrated by [`calibrate`].
    Ptq,
    /// Quantization-aware training: training mode, [`fuse_modules_qat`] (intrinsic
    /// `ConvBn2d`, ... keeping the BatchNorm), then every selected module with a `weight`
    /// target that has a QAT form becomes a QAT module ([`prepare_qat_with`]: its weight and
    /// `_output_` targets are the QAT module's `weight_fake_quant` and
    /// `activation_post_process`); `_input_` targets, and the targets of modules without a
    /// QAT form, are [`crate::nn::QuantTargets`]. Every observer is a moving average with
    /// constant 0.01 (NNI's QAT min/max EMA, PyTorch's QAT default). Train with
    /// [`crate::qat`]; QAT modules do not quantize their bias (an explicit `bias` target on
    /// one is an error).
    Qat,
}

/// What [`apply`] did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AppliedConfig {
    /// The fused groups, in config order (the first path of each holds the fused module, the
    /// others are `Identity`).
    pub fused: Vec<Vec<String>>,
    /// Every module given quantization targets, in `named_modules` order, with its targets
    /// in forward order.
    pub quantized: Vec<(String, Vec<QuantTarget>)>,
}

/// One target chosen for a module: its observer, whether `target_names` named it (else it
/// came from the default "every target"), and the entry that chose it.
#[derive(Debug, Clone)]
struct Choice {
    target: QuantTarget,
    spec: ObserverSpec,
    explicit: bool,
    entry: usize,
}

fn in_entry(e: Error, i: usize, key: &str) -> Error {
    match e {
        Error::UnknownModule { name, hint } => Error::UnknownModule {
            name,
            hint: format!("{hint} (in config_list[{i}].{key})"),
        },
        other => other,
    }
}

/// Applies `config` to `model`: see the [module docs](super#applying-a-config).
///
/// [`QuantMode::Ptq`]: puts the whole model in eval mode; fuses every `fuse_names` group with
/// [`fuse_modules`]; attaches fake quants (observer and fake quant enabled, never observed)
/// to the selected modules' targets: `_input_` and `_output_` on any module, `weight` and
/// `bias` on modules with a weight ([`weight_channel_axis`]; a per-channel weight observer
/// uses that axis). Modules that already have targets keep those the config does not set.
///
/// [`QuantMode::Qat`]: puts the whole model in training mode, fuses with
/// [`fuse_modules_qat`], and converts the selected modules that have a weight target to QAT
/// modules: see [`QuantMode::Qat`].
///
/// Selection happens on the model *before* fusion, so `op_types: ["Conv2d"]` selects a conv
/// that fusion then turns into a `ConvReLU2d`. Every `op_names`, `exclude_op_names` and
/// `fuse_names` path must exist, and every entry must select at least one module.
///
/// As in NNI, the first module of a fuse group must be selected by the entry that declares
/// the group, and the other modules of the group (which become `Identity`) take no targets:
/// naming one in `op_names` is an error, and `op_types` skips them.
///
/// Errors (the model is unchanged on error): [`Error::UnknownModule`] naming the closest
/// paths; [`Error::InvalidArgument`] for an entry that selects nothing, a fuse group whose
/// head the entry does not select, a fused follower with targets, an explicit `weight` /
/// `bias` target on a module without a weight (or, in QAT mode, on a module that becomes a
/// QAT module); fusion's errors ([`crate::fuse`]) and QAT conversion's ([`crate::qat`]).
pub fn apply(model: &mut Module, config: &ConfigList, mode: QuantMode) -> Result<AppliedConfig> {
    // ---- selection, on the model as given
    let modules: Vec<(String, String)> = model
        .named_modules()
        .into_iter()
        .map(|(p, m)| (p, m.kind_name()))
        .collect();
    let mut chosen: Vec<(String, Vec<Choice>)> = Vec::new();
    let mut groups: Vec<Vec<String>> = Vec::new();
    for (i, entry) in config.0.iter().enumerate() {
        for (key, names) in [
            ("op_names", &entry.op_names),
            ("exclude_op_names", &entry.exclude_op_names),
        ] {
            for n in names {
                model.get(n).map_err(|e| in_entry(e, i, key))?;
            }
        }
        for g in &entry.fuse_names {
            for n in g {
                model.get(n).map_err(|e| in_entry(e, i, "fuse_names"))?;
            }
        }
        let selected: Vec<&String> = modules
            .iter()
            .filter(|(p, k)| (!p.is_empty() || entry.op_names.contains(p)) && entry.matches(p, k))
            .map(|(p, _)| p)
            .collect();
        if selected.is_empty() {
            let mut kinds: Vec<&str> = modules
                .iter()
                .filter(|(p, _)| !p.is_empty())
                .map(|(_, k)| k.as_str())
                .collect();
            kinds.sort_unstable();
            kinds.dedup();
            return Err(Error::invalid(format!(
                "config_list[{i}] selects no module (op_names {}, op_types {}, excluding {} and \
                 types {}); the model's module types are {kinds:?}",
                escape_list(&entry.op_names),
                escape_list(&entry.op_types),
                escape_list(&entry.exclude_op_names),
                escape_list(&entry.exclude_op_types)
            )));
        }
        for g in &entry.fuse_names {
            if !selected.contains(&&g[0]) {
                return Err(Error::invalid(format!(
                    "config_list[{i}]: fuse_names group {} starts with `{}`, which this entry \
                     does not select: the first module of a group must be one the same entry \
                     quantizes",
                    escape_list(g),
                    escape(&g[0])
                )));
            }
            groups.push(g.clone());
        }
        let explicit = entry.targets()?;
        let targets: Vec<(QuantTarget, bool)> = if explicit.is_empty() {
            QuantTarget::ALL.iter().map(|&t| (t, false)).collect()
        } else {
            explicit.iter().map(|&t| (t, true)).collect()
        };
        for path in selected {
            let slot = match chosen.iter().position(|(p, _)| p == path) {
                Some(k) => &mut chosen[k].1,
                None => {
                    chosen.push((path.clone(), Vec::new()));
                    let last = chosen.len() - 1;
                    &mut chosen[last].1
                }
            };
            for &(target, explicit) in &targets {
                let spec = entry
                    .observer(target.name())
                    .map_err(|e| Error::invalid(format!("config_list[{i}]: {e}")))?;
                slot.retain(|c| c.target != target);
                slot.push(Choice {
                    target,
                    spec,
                    explicit,
                    entry: i,
                });
            }
        }
    }
    // Fused followers become Identity: no targets of their own.
    for g in &groups {
        for follower in &g[1..] {
            if let Some((i, _)) = config
                .0
                .iter()
                .enumerate()
                .find(|(_, e)| e.op_names.contains(follower))
            {
                return Err(Error::invalid(format!(
                    "`{}` is fused into `{}` (fuse_names) and becomes an Identity: it \
                     takes no quantization settings of its own, but config_list[{i}].op_names \
                     names it",
                    escape(follower),
                    escape(&g[0])
                )));
            }
            chosen.retain(|(p, _)| p != follower);
        }
    }
    // Keep named_modules order.
    chosen.sort_by_key(|(p, _)| modules.iter().position(|(q, _)| q == p));

    // ---- fuse and attach, on a copy
    let observer = |spec: ObserverSpec| match mode {
        QuantMode::Ptq => FakeQuantConfig::min_max(spec),
        QuantMode::Qat => FakeQuantConfig::moving_average(spec),
    };
    let mut work = model.clone();
    let inplace = FuseOptions {
        inplace: true,
        ..Default::default()
    };
    match mode {
        QuantMode::Ptq => {
            work.eval();
            if !groups.is_empty() {
                fuse_modules(&mut work, groups.clone(), inplace)?;
            }
        }
        QuantMode::Qat => {
            work.train(true);
            if !groups.is_empty() {
                fuse_modules_qat(&mut work, groups.clone(), inplace)?;
            }
            // Modules with a weight target and a QAT form become QAT modules, which hold the
            // weight and output fake quants; the input stays a QuantTargets fake quant.
            let mut qconfigs: HashMap<String, QatQConfig> = HashMap::new();
            for (path, choices) in &mut chosen {
                let Some(w) = choices.iter().find(|c| c.target == QuantTarget::Weight) else {
                    continue;
                };
                let mut wspec = w.spec;
                wspec.axis = 0;
                let out = choices
                    .iter()
                    .find(|c| c.target == QuantTarget::Output)
                    .map(|c| observer(c.spec))
                    .transpose()?;
                let qc = QatQConfig::new(observer(wspec)?, out);
                let m = work.get(path)?;
                if QatLayer::from_layer(m.layer(), &qc)?.is_none() {
                    continue;
                }
                if let Some(b) = choices
                    .iter()
                    .find(|c| c.target == QuantTarget::Bias && c.explicit)
                {
                    return Err(Error::invalid(format!(
                        "config_list[{}] quantizes the bias of `{path}`, which becomes a QAT \
                         module ({}): QAT modules do not fake-quantize their bias",
                        b.entry,
                        m.kind_name()
                    )));
                }
                choices.retain(|c| c.target == QuantTarget::Input);
                qconfigs.insert(path.clone(), qc);
            }
            prepare_qat_with(&mut work, |p, _| qconfigs.get(p).copied())?;
        }
    }
    let mut applied = AppliedConfig {
        fused: groups,
        quantized: Vec::new(),
    };
    for (path, choices) in chosen {
        let m = work.get_mut(&path)?;
        let kind = m.kind_name();
        let axis = weight_channel_axis(m.layer());
        let has_bias = has_quantizable_bias(m.layer());
        let mut q = m.quant_targets().cloned().unwrap_or_default();
        for mut c in choices {
            match c.target {
                QuantTarget::Weight | QuantTarget::Bias if axis.is_none() => {
                    if c.explicit {
                        return Err(Error::invalid(format!(
                            "config_list[{}] quantizes the {} of `{path}`, a {kind}, which has \
                             no weight to quantize (weight and bias targets need a Conv, \
                             ConvTranspose or Linear, or a fused module with its BatchNorm \
                             folded)",
                            c.entry,
                            c.target.name()
                        )));
                    }
                    continue;
                }
                QuantTarget::Bias if !has_bias => continue,
                QuantTarget::Weight => {
                    if let Some(a) = axis {
                        c.spec.axis = a as isize;
                    }
                }
                _ => {}
            }
            q.set(c.target, Some(FakeQuantize::new(observer(c.spec)?)?));
        }
        if !q.is_empty() {
            m.set_quant_targets(Some(q));
        }
        let targets = targets_of(m);
        if !targets.is_empty() {
            applied.quantized.push((path.clone(), targets));
        }
    }
    *model = work;
    Ok(applied)
}

/// The fake quants of a module by target: its [`crate::nn::QuantTargets`] and, for a QAT
/// module, its weight fake quant and output fake quant (`activation_post_process`).
fn fake_quants_of(m: &Module) -> Vec<(QuantTarget, &FakeQuantize)> {
    let mut out: Vec<(QuantTarget, &FakeQuantize)> = Vec::new();
    if let Some(q) = m.quant_targets() {
        out.extend(q.iter());
    }
    if let Layer::Qat(q) = m.layer() {
        out.push((QuantTarget::Weight, &q.weight_fake_quant));
        if let Some(a) = &q.activation_post_process {
            out.push((QuantTarget::Output, a));
        }
    }
    out.sort_by_key(|(t, _)| *t);
    out
}

fn targets_of(m: &Module) -> Vec<QuantTarget> {
    fake_quants_of(m).into_iter().map(|(t, _)| t).collect()
}

/// Calls `f` on every fake quant of the tree (quantization targets and QAT modules');
/// returns how many there are.
fn for_each_fake_quant(model: &mut Module, f: &mut dyn FnMut(&mut FakeQuantize)) -> usize {
    let mut n = 0;
    model.visit_mut(&mut |_, m| {
        if let Some(q) = m.quant_targets_mut() {
            for (_, fq) in q.iter_mut() {
                f(fq);
                n += 1;
            }
        }
        if let Layer::Qat(q) = m.layer_mut() {
            for fq in q.fake_quants_mut() {
                f(fq);
                n += 1;
            }
        }
    });
    n
}

/// Turns fake quantization on or off in every fake quant of the tree (PyTorch's
/// `model.apply(enable_fake_quant)` / `disable_fake_quant`); off, the model runs in float
/// (after [`apply`]: the fused float model). Returns the number of fake quants.
pub fn set_fake_quant_enabled(model: &mut Module, enabled: bool) -> usize {
    for_each_fake_quant(model, &mut |fq| fq.fake_quant_enabled = enabled)
}

/// Turns observing on or off in every fake quant of the tree (PyTorch's
/// `enable_observer` / `disable_observer`). Returns the number of fake quants.
pub fn set_observer_enabled(model: &mut Module, enabled: bool) -> usize {
    for_each_fake_quant(model, &mut |fq| fq.observer_enabled = enabled)
}

/// Forgets every fake quant's statistics and qparams (before calibrating afresh). Returns
/// the number of fake quants.
pub fn reset_observers(model: &mut Module) -> usize {
    for_each_fake_quant(model, &mut |fq| {
        if let Ok(mut fresh) = FakeQuantize::new(fq.config()) {
            fresh.observer_enabled = fq.observer_enabled;
            fresh.fake_quant_enabled = fq.fake_quant_enabled;
            *fq = fresh;
        }
    })
}

/// Post-training calibration on `backend`'s own tensors: enables the observers and fake
/// quantization of every target, prepares the model once on the backend
/// ([`DeviceChain::from_module`]: parameters uploaded once, each fake quant's statistics
/// with them), runs it on each batch (one upload per batch, nothing downloaded; each
/// observer's min/max or moving average updated on the device by
/// [`crate::backend::QuantOps::observe_running`], on top of what earlier calls observed; see
/// [`reset_observers`]), writes the observed ranges and qparams back into the model
/// ([`DeviceChain::write_back`]: one download per statistic), then disables the observers,
/// so the model's forward is the simulated (fake-quantized) model with the calibrated
/// qparams. The CPU reference and the GPU give the same qparams wherever the observed values
/// are the same (bit for bit: min/max and `calculate_qparams` are exact on both).
///
/// Within a pass each target is observed then quantized, so later targets see quantized
/// values: an op's `_output_` is observed on the output computed from its quantized input
/// and weight, as PyTorch's and NNI's calibration do. The model must be in eval mode
/// ([`apply`] in PTQ mode sets it). Returns the number of batches.
///
/// It takes what [`DeviceChain::from_module`] takes: sequential containers and those
/// declared with [`crate::nn::Container::with_steps`] (residual adds and branches included),
/// float and fused layers, and the QAT modules of a [`QuantMode::Qat`] model in eval mode
/// (their weight and output fake quants observe on the device too; put the model in eval
/// mode first, as a QAT conv + BatchNorm in training mode normalizes with batch statistics).
///
/// Errors: [`Error::InvalidArgument`] when the model has no quantization targets (call
/// [`apply`] first) or there are no batches; those of [`DeviceChain::from_module`] (models
/// with custom layers, hooks or custom forward closures: use [`calibrate_host`]; BatchNorm
/// in training mode); the forward's errors (the observers are disabled again either way,
/// and the model keeps its earlier statistics).
pub fn calibrate<'a, B: Backend>(
    model: &mut Module,
    backend: &B,
    batches: impl IntoIterator<Item = &'a ArrayD<f32>>,
) -> Result<usize> {
    if set_observer_enabled(model, true) == 0 {
        return Err(Error::invalid(
            "the model has no quantization targets to calibrate: apply a config first",
        ));
    }
    set_fake_quant_enabled(model, true);
    let result = calibrate_on_device(model, backend, batches);
    set_observer_enabled(model, false);
    match result? {
        0 => Err(Error::invalid("calibrate needs at least one batch")),
        n => Ok(n),
    }
}

fn calibrate_on_device<'a, B: Backend>(
    model: &mut Module,
    backend: &B,
    batches: impl IntoIterator<Item = &'a ArrayD<f32>>,
) -> Result<usize> {
    let mut chain = DeviceChain::from_module(model, backend.clone())?;
    let mut n = 0;
    for x in batches {
        chain.forward_mut(&backend.upload(x)?)?;
        n += 1;
    }
    if n > 0 {
        chain.write_back(model)?;
    }
    Ok(n)
}

/// [`calibrate`] through the host-array layer: [`Module::forward`] on each batch, so it
/// takes any module tree — the adapter for custom layers, custom forward closures and hooks
/// (and for a model in training mode), which run on host arrays — with each
/// observer's statistics reduced on the host ([`FakeQuantize::observe`], the CPU
/// reference's min/max and update) and every op a round trip through `backend`. Same
/// semantics and errors as [`calibrate`] otherwise.
pub fn calibrate_host<'a>(
    model: &mut Module,
    backend: &dyn HostOps,
    batches: impl IntoIterator<Item = &'a ArrayD<f32>>,
) -> Result<usize> {
    if set_observer_enabled(model, true) == 0 {
        return Err(Error::invalid(
            "the model has no quantization targets to calibrate: apply a config first",
        ));
    }
    set_fake_quant_enabled(model, true);
    let mut n = 0;
    let mut result = Ok(());
    for x in batches {
        if let Err(e) = model.forward(backend, x) {
            result = Err(e);
            break;
        }
        n += 1;
    }
    set_observer_enabled(model, false);
    result?;
    if n == 0 {
        return Err(Error::invalid("calibrate needs at least one batch"));
    }
    Ok(n)
}

/// Every observed target's qparams: `(module path, target, qparams)`, in `named_modules`
/// order and forward order within a module (targets never observed are left out). QAT
/// modules' weight and output fake quants count as the `weight` and `_output_` targets.
pub fn qparams(model: &Module) -> Vec<(String, QuantTarget, QParams)> {
    let mut out = Vec::new();
    for (path, m) in model.named_modules() {
        for (t, fq) in fake_quants_of(m) {
            if fq.is_observed() {
                if let Ok(qp) = fq.qparams() {
                    out.push((path.clone(), t, qp));
                }
            }
        }
    }
    out
}
