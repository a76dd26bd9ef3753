//! Module fusion on a [`crate::nn`] tree: `fuse_modules` (eval: BatchNorm folded),
//! `fuse_modules_qat` (training: intrinsic modules that keep the BatchNorm for QAT), the
//! pattern table, caller-registered fusers, and `find_fusable`.
//!
//! # Functions
//! * [`fuse_modules`]`(model, groups, options)`: PyTorch's
//!   `torch.ao.quantization.fuse_modules`. Each group of dotted paths (`["conv1", "bn1",
//!   "relu1"]`) is replaced by one fused module at the first path and `Identity` modules at
//!   the others. Patterns with a BatchNorm are **folded** (`fuse_conv_bn_eval`): `conv + bn`
//!   becomes a plain `Conv2d` with folded weights, `conv + bn + relu` a `ConvReLU2d` holding
//!   the folded conv. Folding needs every module of the group in eval mode.
//! * [`fuse_modules_qat`]: `fuse_modules_qat`. BatchNorm patterns become **intrinsic**
//!   modules that keep the BatchNorm separate ([`crate::nn::Fused`] with `bn: Some`,
//!   kinds `ConvBn2d`, `ConvBnReLU2d`, `LinearBn1d`, `ConvTransposeBn2d`, ...), which QAT
//!   conversion turns into QAT modules. Patterns without a BatchNorm fuse as under
//!   `fuse_modules`.
//! * [`find_fusable`]`(model)`: the fusable chains of the model as groups of paths, ready for
//!   either function.
//!
//! `groups` is one list of names or a list of lists ([`FuseGroups`] converts from
//! `["a", "b"]`, `vec!["a", "b"]`, `vec![vec!["a", "b"], vec!["c", "d"]]`, and
//! `find_fusable`'s output). [`FuseOptions::inplace`] chooses between fusing `model` itself
//! (returns `Ok(None)`) and returning a fused deep copy (`Ok(Some(copy))`, `model`
//! untouched). Either way nothing changes unless every group fuses.
//!
//! # Pattern table
//! [`default_patterns`] lists every built-in pattern: the union of PyTorch's
//! `_DEFAULT_OP_LIST_TO_FUSER_METHOD`, NNI's and MQBench's tables, for 1-D and 2-D:
//!
//! | pattern | `fuse_modules` (eval) | `fuse_modules_qat` |
//! |---|---|---|
//! | Conv{1,2}d + BatchNorm{1,2}d | folded `Conv{1,2}d` | `ConvBn{1,2}d` |
//! | Conv{1,2}d + BatchNorm{1,2}d + act | `Conv{act}{1,2}d` (folded) | `ConvBn{act}{1,2}d` |
//! | Conv{1,2}d + act | `Conv{act}{1,2}d` | same |
//! | ConvTranspose2d + BatchNorm2d | folded `ConvTranspose2d` | `ConvTransposeBn2d` |
//! | ConvTranspose2d + BatchNorm2d + act | `ConvTranspose{act}2d` (folded) | `ConvTransposeBn{act}2d` |
//! | ConvTranspose2d + act | `ConvTranspose{act}2d` | same |
//! | Linear + BatchNorm1d | folded `Linear` | `LinearBn1d` |
//! | Linear + BatchNorm1d + act | `Linear{act}` (folded) | `LinearBn{act}1d` |
//! | Linear + act | `Linear{act}` | same |
//! | BatchNorm{1,2}d + act | `BN{act}{1,2}d` | same |
//!
//! with act ∈ {`ReLU`, `ReLU6`, `LeakyReLU`, `Hardswish`} (so `ConvReLU2d`, `ConvReLU62d`,
//! `LinearLeakyReLU`, `BNHardswish2d`, ...; see [`crate::nn::Fused`] for the naming).
//! Matching is on the exact type names, in order. Transposed convs with `groups > 1` fold
//! correctly (PyTorch's fold does not; see [`crate::reference::fold`]); a Linear folds with a
//! one-feature BatchNorm broadcast (as PyTorch), and with an `affine=False` BatchNorm
//! (PyTorch raises). A [`FuserRegistry`] in [`FuseOptions`] adds patterns or replaces
//! built-in ones.
//!
//! # Hooks
//! As in PyTorch: the forward pre-hooks of the group's first module and the forward hooks of
//! its last module move to the fused module (keeping their [`crate::nn::HookHandle`]s);
//! every other hook of the group is dropped. The `Identity` modules take the first module's
//! training flag; so does a built-in fused module.
//!
//! # Errors
//! Each a typed [`Error`]: [`Error::EmptyFusionGroup`]; [`Error::DuplicateFusionName`] (a
//! path in two groups, or twice in one); [`Error::InvalidArgument`] when one path of the
//! groups contains another; [`Error::UnknownModule`] (the hint names the closest paths);
//! [`Error::UnsupportedPattern`] (listing the module types found); under `fuse_modules`,
//! [`Error::FusionTrainingMode`] for a BatchNorm pattern with a module in training mode
//! (PyTorch's "Fusion only for eval!"); under `fuse_modules_qat`,
//! [`Error::FusionModeMismatch`] when its modules' modes differ; [`Error::ChannelMismatch`]
//! when the conv / linear output channels differ from the BatchNorm's features; and a
//! custom fuser's own errors.
//!
//! # Example
//! ```
//! use ndarray::{Array1, Array2, ArrayD, IxDyn};
//! use qfuse::fuse::{find_fusable, fuse_modules, FuseOptions};
//! use qfuse::nn::Module;
//! use qfuse::ops::BatchNorm;
//! use qfuse::CpuBackend;
//!
//! let bn = BatchNorm {
//!     weight: Some(Array1::from_elem(3, 2.0)),
//!     bias: Some(Array1::from_elem(3, 0.5)),
//!     running_mean: Array1::from_elem(3, 0.1),
//!     running_var: Array1::from_elem(3, 4.0),
//!     eps: 1e-5,
//!     momentum: 0.1,
//! };
//! let mut model = Module::sequential([
//!     Module::linear(Array2::from_elem((3, 4), 0.25), None)?,
//!     Module::batch_norm1d(bn)?,
//!     Module::relu(),
//! ]);
//! model.eval();
//! let groups = find_fusable(&model);
//! assert_eq!(groups, vec![vec!["0", "1", "2"]]);
//!
//! let fused = fuse_modules(&mut model, groups, FuseOptions::default())?
//!     .expect("not inplace: a fused copy");
//! let kinds: Vec<String> = fused.named_children().iter().map(|(_, m)| m.kind_name()).collect();
//! assert_eq!(kinds, ["LinearReLU", "Identity", "Identity"]);
//!
//! let x = ArrayD::from_elem(IxDyn(&[2, 4]), 1.0f32);
//! let want = model.forward(&CpuBackend, &x)?;
//! let got = fused.clone().forward(&CpuBackend, &x)?;
//! assert!(got.iter().zip(want.iter()).all(|(a, b)| (a - b).abs() < 1e-5));
//! # Ok::<(), qfuse::Error>(())
//! ```

mod patterns;
mod registry;

use std::collections::HashMap;

pub use patterns::default_patterns;
pub(crate) use patterns::is_builtin;
pub use registry::{FuseContext, FuserFn, FuserRegistry};

use crate::error::{Error, Result};
use crate::nn::Module;

/// Groups of dotted module paths to fuse: one group or several (PyTorch's
/// `modules_to_fuse`, a list of names or a list of lists).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FuseGroups(pub Vec<Vec<String>>);

impl FuseGroups {
    /// The groups.
    pub fn groups(&self) -> &[Vec<String>] {
        &self.0
    }
}

fn owned<S: AsRef<str>>(g: &[S]) -> Vec<String> {
    g.iter().map(|s| s.as_ref().to_string()).collect()
}

impl From<Vec<Vec<String>>> for FuseGroups {
    fn from(g: Vec<Vec<String>>) -> Self {
        Self(g)
    }
}

impl From<&Vec<Vec<String>>> for FuseGroups {
    fn from(g: &Vec<Vec<String>>) -> Self {
        Self(g.clone())
    }
}

impl From<&[Vec<String>]> for FuseGroups {
    fn from(g: &[Vec<String>]) -> Self {
        Self(g.to_vec())
    }
}

impl From<Vec<Vec<&str>>> for FuseGroups {
    fn from(g: Vec<Vec<&str>>) -> Self {
        Self(g.iter().map(|g| owned(g)).collect())
    }
}

impl From<&[&[&str]]> for FuseGroups {
    fn from(g: &[&[&str]]) -> Self {
        Self(g.iter().map(|g| owned(g)).collect())
    }
}

impl<const N: usize> From<[&[&str]; N]> for FuseGroups {
    fn from(g: [&[&str]; N]) -> Self {
        Self(g.iter().map(|g| owned(g)).collect())
    }
}

impl From<Vec<String>> for FuseGroups {
    fn from(g: Vec<String>) -> Self {
        Self(vec![g])
    }
}

impl From<Vec<&str>> for FuseGroups {
    fn from(g: Vec<&str>) -> Self {
        Self(vec![owned(&g)])
    }
}

impl From<&[&str]> for FuseGroups {
    fn from(g: &[&str]) -> Self {
        Self(vec![owned(g)])
    }
}

impl<const N: usize> From<[&str; N]> for FuseGroups {
    fn from(g: [&str; N]) -> Self {
        Self(vec![owned(&g)])
    }
}

/// Options of [`fuse_modules`] / [`fuse_modules_qat`].
#[derive(Debug, Clone, Default)]
pub struct FuseOptions {
    /// Fuse the model itself (`Ok(None)`), instead of returning a fused deep copy
    /// (`Ok(Some(copy))`, the default, as PyTorch's `inplace=False`).
    pub inplace: bool,
    /// Caller-registered fusers, looked up before the built-in table (PyTorch's
    /// `fuse_custom_config_dict["additional_fuser_method_mapping"]`).
    pub additional_fuser_method_mapping: FuserRegistry,
}

/// Eval fusion, PyTorch's `fuse_modules`: BatchNorms folded. See the [module docs](self).
///
/// Returns `Ok(None)` with `options.inplace` (the model is fused), else `Ok(Some(copy))` (the
/// model is untouched). On error the model is unchanged.
///
/// Errors: see the [module docs](self#errors).
pub fn fuse_modules(
    model: &mut Module,
    groups: impl Into<FuseGroups>,
    options: FuseOptions,
) -> Result<Option<Module>> {
    fuse_impl(model, groups.into(), options, false)
}

/// QAT fusion, PyTorch's `fuse_modules_qat`: BatchNorm patterns become intrinsic modules
/// that keep the BatchNorm (`ConvBn2d`, `ConvBnReLU2d`, `LinearBn1d`, ...). See the
/// [module docs](self).
///
/// Returns and errors as [`fuse_modules`] (with [`Error::FusionModeMismatch`] in place of
/// [`Error::FusionTrainingMode`]).
pub fn fuse_modules_qat(
    model: &mut Module,
    groups: impl Into<FuseGroups>,
    options: FuseOptions,
) -> Result<Option<Module>> {
    fuse_impl(model, groups.into(), options, true)
}

/// Checks the groups' shape: no empty group, no path twice, no path inside another.
fn check_groups(groups: &FuseGroups) -> Result<()> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (gi, g) in groups.0.iter().enumerate() {
        if g.is_empty() {
            return Err(Error::EmptyFusionGroup { index: gi });
        }
        for name in g {
            if let Some(&first) = seen.get(name.as_str()) {
                return Err(Error::DuplicateFusionName {
                    name: name.clone(),
                    first,
                    second: gi,
                });
            }
            seen.insert(name, gi);
        }
    }
    let all: Vec<&str> = seen.keys().copied().collect();
    for a in &all {
        for b in &all {
            if a != b && (a.is_empty() || b.starts_with(&format!("{a}."))) {
                return Err(Error::invalid(format!(
                    "cannot fuse `{a}` and `{b}`: one contains the other"
                )));
            }
        }
    }
    Ok(())
}

fn fuse_impl(
    model: &mut Module,
    groups: FuseGroups,
    options: FuseOptions,
    is_qat: bool,
) -> Result<Option<Module>> {
    check_groups(&groups)?;
    let registry = &options.additional_fuser_method_mapping;
    // Plan every replacement first; apply only when all groups fused.
    let mut plan: Vec<(String, Module)> = Vec::new();
    for names in &groups.0 {
        let mods: Vec<&Module> = names.iter().map(|n| model.get(n)).collect::<Result<_>>()?;
        let types: Vec<String> = mods.iter().map(|m| m.kind_name()).collect();
        let first = mods[0];
        let last = mods[mods.len() - 1];
        let mut fused = if let Some(f) = registry.get(&types) {
            let copies: Vec<Module> = mods
                .iter()
                .map(|m| {
                    let mut c = (*m).clone();
                    c.clear_hooks();
                    c
                })
                .collect();
            f(&FuseContext { is_qat, names }, &copies)?
        } else if patterns::is_builtin(&types) {
            let mut m = patterns::builtin_fuse(is_qat, names, &mods)?;
            m.set_training(first.is_training());
            m
        } else {
            return Err(Error::UnsupportedPattern {
                names: names.clone(),
                types,
            });
        };
        fused.hooks.pre.extend(first.hooks.pre.iter().cloned());
        fused.hooks.post.extend(last.hooks.post.iter().cloned());
        plan.push((names[0].clone(), fused));
        for n in &names[1..] {
            let mut id = Module::identity();
            id.set_training(first.is_training());
            plan.push((n.clone(), id));
        }
    }
    let apply = |target: &mut Module, plan: Vec<(String, Module)>| -> Result<()> {
        for (path, m) in plan {
            target.replace(&path, m)?;
        }
        Ok(())
    };
    if options.inplace {
        apply(model, plan)?;
        Ok(None)
    } else {
        let mut copy = model.clone();
        apply(&mut copy, plan)?;
        Ok(Some(copy))
    }
}

/// The fusable chains of `model` under the built-in patterns: see [`find_fusable_with`].
pub fn find_fusable(model: &Module) -> Vec<Vec<String>> {
    find_fusable_with(model, &FuserRegistry::default())
}

/// The fusable chains of `model`, as groups of dotted paths that [`fuse_modules`] and
/// [`fuse_modules_qat`] accept: inside every container (visited in
/// [`Module::named_modules`] order), each declared straight-line chain
/// ([`crate::nn::Container::chains`]: a `Sequential`'s children, a container's declared
/// forward order, a custom forward's declared chains) is scanned from its start, taking at
/// each position the **longest** pattern that matches (`conv + bn + relu` before
/// `conv + bn`), built-in or registered in `fusers`, then continuing after it. Children the
/// declared order uses more than once are never part of a group (fusing them would change
/// their other uses).
///
/// It looks at types only: whether the modules are in eval mode (needed by
/// [`fuse_modules`] for BatchNorm patterns) or have matching channel counts is checked when
/// fusing.
pub fn find_fusable_with(model: &Module, fusers: &FuserRegistry) -> Vec<Vec<String>> {
    let max_len = patterns::MAX_BUILTIN_LEN.max(fusers.max_len());
    let mut out = Vec::new();
    for (path, m) in model.named_modules() {
        let Some(c) = m.as_container() else { continue };
        let order = c.forward_order();
        let used_once = |n: &String| order.iter().filter(|o| *o == n).count() == 1;
        let full = |n: &str| {
            if path.is_empty() {
                n.to_string()
            } else {
                format!("{path}.{n}")
            }
        };
        for chain in c.chains() {
            let mut i = 0;
            while i < chain.len() {
                let mut matched = 0;
                for len in (2..=max_len.min(chain.len() - i)).rev() {
                    let names = &chain[i..i + len];
                    if !names.iter().all(&used_once) {
                        continue;
                    }
                    let types: Vec<String> = names
                        .iter()
                        .filter_map(|n| c.child(n).map(Module::kind_name))
                        .collect();
                    if types.len() == len
                        && (fusers.get(&types).is_some() || patterns::is_builtin(&types))
                    {
                        out.push(names.iter().map(|n| full(n)).collect());
                        matched = len;
                        break;
                    }
                }
                i += matched.max(1);
            }
        }
    }
    out
}
