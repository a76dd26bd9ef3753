//! BatchNorm folding in a whole PyTorch state dict, by module name: what
//! `torch.ao.quantization.fuse_modules` does to an eval-mode model, done to its `state_dict()`
//! (a safetensors file) instead, so that the fused model's `load_state_dict` accepts the result.
//!
//! For each [`FoldSpec`] `LAYER,BN`:
//! * `LAYER.weight` (and `LAYER.bias` when present) are replaced by the folded weight and bias
//!   ([`HostOps::fold_conv_bn`] for a weight of rank ≥ 3, transposed when
//!   [`FoldSpec::transpose`]; [`HostOps::fold_linear_bn`] for rank 2). A layer without bias
//!   gains one, as PyTorch's folded module does.
//! * Every `BN.*` tensor (`weight`, `bias`, `running_mean`, `running_var`,
//!   `num_batches_tracked`) is dropped: the fused model's BatchNorm is an `nn.Identity`.
//! * With a ReLU (`LAYER,BN,RELU`) PyTorch's fused module is `nni.ConvReLUNd(conv, relu)`, a
//!   `Sequential`, so the folded tensors are written as `LAYER.0.weight` / `LAYER.0.bias`.
//! * Every other tensor is copied unchanged, whatever its dtype (int64, float16, bfloat16, ...,
//!   kept byte for byte as [`RawTensor`](crate::io::state_dict::RawTensor)s), and the
//!   `__metadata__` is kept.
//!
//! Only the tensors that are folded must be float32. Module names are dotted paths exactly as
//! they appear in the state dict's keys (`layer1.0.conv1`, `features.3`); a QAT `ConvBn2d`
//! folds with `conv1,conv1.bn`.
//!
//! ```
//! use ndarray::{arr1, ArrayD, IxDyn};
//! use qfuse::fold_state_dict::{fold_state_dict, FoldSpec};
//! use qfuse::io::state_dict::{HostTensor, StateDict};
//! use qfuse::CpuBackend;
//!
//! let f32t = |v: ArrayD<f32>| HostTensor::F32(v);
//! let mut sd = StateDict::default();
//! sd.tensors.insert("fc.weight".into(), f32t(ArrayD::ones(IxDyn(&[2, 3]))));
//! sd.tensors.insert("bn.running_mean".into(), f32t(arr1(&[0.5f32, -1.0]).into_dyn()));
//! sd.tensors.insert("bn.running_var".into(), f32t(arr1(&[4.0f32, 1.0]).into_dyn()));
//! let spec = FoldSpec::parse("fc,bn")?.with_eps(0.0);
//! let out = fold_state_dict(&CpuBackend, &sd, &[spec])?;
//! assert_eq!(out.names(), ["fc.bias", "fc.weight"]);
//! assert_eq!(out.f32("fc.weight")?[[0, 0]], 0.5);
//! assert_eq!(out.f32("fc.bias")?.as_slice().unwrap(), &[-0.25, 1.0]);
//! # Ok::<(), qfuse::Error>(())
//! ```

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ndarray::{Array1, Array2, ArrayD, Ix1, Ix2};

use crate::backend::HostOps;
use crate::error::{Error, Result};
use crate::io::file::{write_output, Outputs};
use crate::io::state_dict::{load_state_dict, HostTensor, StateDict};
use crate::io::text::escape;
use crate::ops::{BatchNorm, Folded};

/// `torch.nn.BatchNorm*d`'s default `eps`.
pub const DEFAULT_EPS: f32 = 1e-5;

/// The tensors a `torch.nn.BatchNorm*d` has in its state dict.
const BN_KEYS: [&str; 5] = [
    "weight",
    "bias",
    "running_mean",
    "running_var",
    "num_batches_tracked",
];

/// One fusion: the BatchNorm `bn` folded into the conv or linear `layer`, optionally closed
/// by the ReLU `relu`.
#[derive(Debug, Clone, PartialEq)]
pub struct FoldSpec {
    /// The conv / linear module (`LAYER.weight`, optional `LAYER.bias`).
    pub layer: String,
    /// The BatchNorm module (`BN.running_mean`, `BN.running_var`, optional `BN.weight`,
    /// `BN.bias`, `BN.num_batches_tracked`).
    pub bn: String,
    /// The ReLU that closes a conv+bn+relu fusion: the output is then named as PyTorch's
    /// `ConvReLUNd` names it, `LAYER.0.weight` / `LAYER.0.bias`. A ReLU has no tensors; its
    /// name is only checked not to have any.
    pub relu: Option<String>,
    /// The conv weight is a ConvTranspose weight `[Cin, Cout/g, k...]` (ignored for a linear).
    pub transpose: bool,
    /// The BatchNorm's `eps` (not stored in state dicts).
    pub eps: f32,
}

impl FoldSpec {
    /// `layer` + `bn`, not transposed, `eps` = [`DEFAULT_EPS`].
    pub fn new(layer: impl Into<String>, bn: impl Into<String>) -> Self {
        Self {
            layer: layer.into(),
            bn: bn.into(),
            relu: None,
            transpose: false,
            eps: DEFAULT_EPS,
        }
    }

    /// Parses `LAYER,BN` or `LAYER,BN,RELU` (whitespace around names is ignored), optionally
    /// followed by per-fusion options after a colon: `:eps=E` (this BatchNorm's eps) and
    /// `:transpose` (a ConvTranspose weight; also `transpose=true|false`), combinable
    /// (`up,bn2:transpose:eps=1e-3`). Without options: not transposed, eps [`DEFAULT_EPS`].
    /// [`Error::InvalidArgument`] for anything else.
    pub fn parse(value: &str) -> Result<Self> {
        Self::parse_with_defaults(value, DEFAULT_EPS, false)
    }

    /// [`FoldSpec::parse`] with the eps and transpose a fusion gets when its own options do
    /// not set them (the command line's `--eps` and `--transpose`).
    pub fn parse_with_defaults(value: &str, eps: f32, transpose: bool) -> Result<Self> {
        let (names, options) = match value.split_once(':') {
            Some((names, options)) => (names, Some(options)),
            None => (value, None),
        };
        let parts: Vec<&str> = names.split(',').map(str::trim).collect();
        let bad = |why: String| {
            Error::invalid(format!(
                "--fuse `{}`: {why}; expected LAYER,BN or LAYER,BN,RELU (module names as in \
                 the state dict's keys, e.g. conv1,bn1), optionally followed by :eps=E and/or \
                 :transpose",
                escape(value)
            ))
        };
        if !(2..=3).contains(&parts.len()) {
            return Err(bad(format!(
                "{} module name{} given",
                parts.len(),
                if parts.len() == 1 { "" } else { "s" }
            )));
        }
        for p in &parts {
            check_name(p).map_err(bad)?;
        }
        let mut spec = Self::new(parts[0], parts[1])
            .with_eps(eps)
            .transposed(transpose);
        spec.relu = parts.get(2).map(|r| r.to_string());
        let (mut eps_set, mut transpose_set) = (false, false);
        for option in options
            .into_iter()
            .flat_map(|o| o.split(':'))
            .map(str::trim)
        {
            let (key, val) = match option.split_once('=') {
                Some((k, v)) => (k.trim(), Some(v.trim())),
                None => (option, None),
            };
            let seen = match key {
                "eps" => &mut eps_set,
                "transpose" => &mut transpose_set,
                _ => {
                    return Err(bad(format!(
                        "unknown option `{}` (options: eps=E, transpose, transpose=false)",
                        escape(option)
                    )))
                }
            };
            if std::mem::replace(seen, true) {
                return Err(bad(format!("option `{key}` given twice")));
            }
            match (key, val) {
                ("eps", Some(v)) => {
                    spec.eps = v
                        .parse::<f32>()
                        .map_err(|_| bad(format!("eps `{}` is not a number", escape(v))))?;
                }
                ("transpose", None | Some("true")) => spec.transpose = true,
                ("transpose", Some("false")) => spec.transpose = false,
                _ => {
                    return Err(bad(format!(
                        "option `{}` needs {}",
                        escape(option),
                        if key == "eps" {
                            "a value (eps=E)"
                        } else {
                            "no value, true or false"
                        }
                    )))
                }
            }
        }
        Ok(spec)
    }

    /// With the closing ReLU `relu`.
    pub fn with_relu(mut self, relu: impl Into<String>) -> Self {
        self.relu = Some(relu.into());
        self
    }

    /// With [`FoldSpec::transpose`] set to `transpose`.
    pub fn transposed(mut self, transpose: bool) -> Self {
        self.transpose = transpose;
        self
    }

    /// With the BatchNorm `eps`.
    pub fn with_eps(mut self, eps: f32) -> Self {
        self.eps = eps;
        self
    }

    /// Where the folded tensors go: `LAYER`, or `LAYER.0` with a ReLU.
    pub fn output_prefix(&self) -> String {
        match self.relu {
            Some(_) => format!("{}.0", self.layer),
            None => self.layer.clone(),
        }
    }

    fn names(&self) -> impl Iterator<Item = &str> {
        [
            Some(self.layer.as_str()),
            Some(self.bn.as_str()),
            self.relu.as_deref(),
        ]
        .into_iter()
        .flatten()
    }
}

impl fmt::Display for FoldSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Shown in messages: the names escaped.
        write!(f, "{},{}", escape(&self.layer), escape(&self.bn))?;
        if let Some(r) = &self.relu {
            write!(f, ",{}", escape(r))?;
        }
        Ok(())
    }
}

impl FromStr for FoldSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

/// A module name must be a dotted path of non-empty parts without whitespace or commas.
fn check_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("empty module name".into());
    }
    if name.split('.').any(str::is_empty) {
        return Err(format!(
            "`{name_}` is not a module name (empty part between dots)",
            name_ = escape(name)
        ));
    }
    if name.chars().any(|c| c.is_whitespace() || c == ',') {
        return Err(format!(
            "`{name_}` is not a module name (whitespace or comma)",
            name_ = escape(name)
        ));
    }
    Ok(())
}

/// What one fusion did.
#[derive(Debug, Clone, PartialEq)]
pub struct FoldedLayer {
    /// The fusion.
    pub spec: FoldSpec,
    /// `conv`, `conv_transpose` or `linear`.
    pub kind: &'static str,
    /// The layer weight's shape.
    pub weight_shape: Vec<usize>,
    /// The tensors written (folded weight and bias).
    pub written: Vec<String>,
    /// The tensors removed (the layer's old weight/bias when renamed, every BatchNorm tensor).
    pub dropped: Vec<String>,
}

/// What [`fold_file`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct FoldReport {
    /// One entry per [`FoldSpec`], in order.
    pub folded: Vec<FoldedLayer>,
    /// How many tensors were copied unchanged.
    pub copied: usize,
    /// How many tensors the output has.
    pub total: usize,
}

/// Folds every fusion of `specs` into a copy of `sd` on `backend` (see the
/// [module docs](self)). `sd` is not changed.
///
/// Errors: [`Error::InvalidArgument`] for a malformed name, a module named in two fusions,
/// a bad `eps`; [`Error::UnknownModule`] for a layer without any tensor named `LAYER.*` or a
/// BatchNorm without `BN.*` (the message lists the closest names and the candidates);
/// [`Error::Fold`] (with the cause as its source) for a module that lacks the tensors of its
/// role, a tensor that is not float32 ([`Error::DtypeMismatch`]), shapes or channel counts
/// that disagree ([`Error::ShapeMismatch`], [`Error::ChannelMismatch`]), a `BN.*` tensor a
/// BatchNorm does not have, an output name that exists, or a backend failure. Everything but
/// the backend's own failures is found before the backend is used.
pub fn fold_state_dict(
    backend: &dyn HostOps,
    sd: &StateDict,
    specs: &[FoldSpec],
) -> Result<StateDict> {
    let plan = plan(sd, specs)?;
    fold_planned(backend, sd, plan).map(|(out, _)| out)
}

/// Reads the safetensors state dict `input`, folds `specs` with [`fold_state_dict`] and
/// writes the result to `output`: [`FoldJob::prepare`] then [`FoldJob::run`].
pub fn fold_file(
    backend: &dyn HostOps,
    input: &Path,
    output: &Path,
    specs: &[FoldSpec],
) -> Result<FoldReport> {
    FoldJob::prepare(input, output, specs)?.run(backend)
}

/// A state-dict file fold whose input is read and checked, ready to run on a backend. Lets a
/// caller report every input error before it opens a GPU.
#[derive(Debug)]
pub struct FoldJob {
    sd: StateDict,
    plan: Vec<Resolved>,
    input: PathBuf,
    output: PathBuf,
}

impl FoldJob {
    /// Refuses an `output` that is the input file (same path, a symlink or a hard link to it:
    /// [`Error::InvalidArgument`], before anything is read) or not a regular file
    /// ([`Error::NotRegularFile`]), reads `input` (a regular file only: [`Error::Io`],
    /// [`Error::NotRegularFile`], [`Error::TooLarge`], [`Error::MalformedStateDict`]) and
    /// resolves and checks every fusion against it (the errors of [`fold_state_dict`]).
    pub fn prepare(input: &Path, output: &Path, specs: &[FoldSpec]) -> Result<Self> {
        Outputs::new(&[input]).check(output)?;
        let sd = load_state_dict(input)?;
        let plan = plan(&sd, specs)?;
        Ok(Self {
            sd,
            plan,
            input: input.to_path_buf(),
            output: output.to_path_buf(),
        })
    }

    /// Folds on `backend` and writes the output through a temporary file in the same folder,
    /// renamed into place ([`crate::io::file::Outputs`]), so that a failure leaves no partial
    /// output; stale temporaries of the same output left by a killed run are removed. The
    /// input file is not touched.
    pub fn run(self, backend: &dyn HostOps) -> Result<FoldReport> {
        let (out, folded) = fold_planned(backend, &self.sd, self.plan)?;
        let names = out.names();
        let copied = names
            .iter()
            .filter(|n| !folded.iter().any(|f| f.written.iter().any(|w| w == *n)))
            .count();
        let total = names.len();
        write_output(&self.output, &out.to_bytes()?, &[&self.input])?;
        Ok(FoldReport {
            folded,
            copied,
            total,
        })
    }
}

/// Checks the specs and resolves each against `sd`.
fn plan(sd: &StateDict, specs: &[FoldSpec]) -> Result<Vec<Resolved>> {
    check_specs(specs)?;
    let plan: Vec<Resolved> = specs
        .iter()
        .map(|spec| resolve(sd, spec))
        .collect::<Result<_>>()?;
    // Output names must be new after every removal, and written once.
    let removed: BTreeSet<&str> = plan
        .iter()
        .flat_map(|r| r.remove.iter().map(String::as_str))
        .collect();
    let mut written: BTreeSet<&str> = BTreeSet::new();
    for r in &plan {
        for name in &r.report.written {
            if (sd.contains(name) && !removed.contains(name.as_str()))
                || !written.insert(name.as_str())
            {
                return Err(r.wrap(Error::invalid(format!(
                    "the folded tensor `{name_}` would replace another tensor of that name",
                    name_ = escape(name)
                ))));
            }
        }
    }
    Ok(plan)
}

/// Folds the resolved fusions and builds the output state dict.
fn fold_planned(
    backend: &dyn HostOps,
    sd: &StateDict,
    plan: Vec<Resolved>,
) -> Result<(StateDict, Vec<FoldedLayer>)> {
    let mut folded = Vec::with_capacity(plan.len());
    for r in &plan {
        folded.push(r.fold(backend)?);
    }
    let mut out = sd.clone();
    for r in &plan {
        for name in &r.remove {
            out.remove(name);
        }
    }
    let mut reports = Vec::with_capacity(plan.len());
    for (r, Folded { weight, bias }) in plan.into_iter().zip(folded) {
        for (name, t) in r.report.written.iter().zip([weight, bias.into_dyn()]) {
            out.tensors.insert(name.clone(), HostTensor::F32(t));
        }
        reports.push(r.report);
    }
    Ok((out, reports))
}

fn check_specs(specs: &[FoldSpec]) -> Result<()> {
    let mut seen: Vec<(&str, &FoldSpec)> = Vec::new();
    for spec in specs {
        for name in spec.names() {
            check_name(name).map_err(|why| Error::invalid(format!("fusion `{spec}`: {why}")))?;
            if let Some((_, first)) = seen.iter().find(|(n, _)| *n == name) {
                return Err(Error::invalid(if std::ptr::eq(*first, spec) {
                    format!(
                        "fusion `{spec}` names module `{name_}` twice",
                        name_ = escape(name)
                    )
                } else {
                    format!(
                        "module `{name_}` is fused twice: in `{first}` and in `{spec}`; \
                         each module can be folded only once",
                        name_ = escape(name)
                    )
                }));
            }
            seen.push((name, spec));
        }
        if !(spec.eps.is_finite() && spec.eps >= 0.0) {
            return Err(Error::invalid(format!(
                "fusion `{spec}`: eps must be finite and >= 0, got {}",
                spec.eps
            )));
        }
    }
    Ok(())
}

/// Tensor names under `prefix.`.
fn under<'a>(sd: &'a StateDict, prefix: &str) -> Vec<&'a str> {
    let p = format!("{prefix}.");
    sd.names()
        .into_iter()
        .filter(|n| n.starts_with(&p))
        .collect()
}

/// The role a module name is looked up in, for messages.
#[derive(Clone, Copy)]
enum Role {
    Layer,
    BatchNorm,
}

impl Role {
    /// The tensor that marks a module of this role.
    fn key(self) -> &'static str {
        match self {
            Role::Layer => "weight",
            Role::BatchNorm => "running_mean",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Role::Layer => {
                "conv/linear layers (modules with a `.weight` and no running statistics)"
            }
            Role::BatchNorm => "BatchNorms (modules with a `.running_mean`)",
        }
    }

    fn candidates(self, sd: &StateDict) -> Vec<String> {
        let mut mods: BTreeSet<String> = BTreeSet::new();
        for n in sd.names() {
            if let Some(m) = n.strip_suffix(&format!(".{}", self.key())) {
                let is_bn = sd.contains(&format!("{m}.running_mean"));
                let keep = match self {
                    Role::Layer => !is_bn,
                    Role::BatchNorm => true,
                };
                if keep {
                    mods.insert(m.to_string());
                }
            }
        }
        mods.into_iter().collect()
    }
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn list(names: &[String], max: usize) -> String {
    let shown: Vec<String> = names
        .iter()
        .take(max)
        .map(|n| format!("`{}`", escape(n)))
        .collect();
    let mut s = shown.join(", ");
    if names.len() > max {
        s.push_str(&format!(" (and {} more)", names.len() - max));
    }
    s
}

/// [`Error::UnknownModule`] for `name`, with the closest names of its role and the list.
fn unknown_module(sd: &StateDict, name: &str, role: Role) -> Error {
    let candidates = role.candidates(sd);
    let mut hint = String::new();
    if sd.contains(name) {
        if let Some((module, _)) = name.rsplit_once('.') {
            hint = format!(
                "`{name_}` is a tensor; give the module name, `{module_}`. ",
                name_ = escape(name),
                module_ = escape(module)
            );
        }
    }
    if hint.is_empty() {
        // Same name under a wrapper (`module.conv1` from DataParallel), then edit distance.
        let suffix = format!(".{name}");
        let mut close: Vec<(usize, &String)> = candidates
            .iter()
            .filter(|c| c.ends_with(&suffix))
            .map(|c| (0, c))
            .collect();
        if close.is_empty() {
            let limit = (name.chars().count() / 3).max(2);
            close = candidates
                .iter()
                .map(|c| (levenshtein(name, c), c))
                .filter(|(d, _)| *d <= limit)
                .collect();
            close.sort();
        }
        if !close.is_empty() {
            let close: Vec<String> = close.into_iter().take(3).map(|(_, c)| c.clone()).collect();
            hint = format!("did you mean {}? ", list(&close, 3));
        }
    }
    let key = role.key();
    hint.push_str(&format!(
        "the state dict has no tensor `{}.{key}`; ",
        escape(name)
    ));
    if candidates.is_empty() {
        hint.push_str(&format!("it has no {}", role.describe()));
    } else {
        hint.push_str(&format!(
            "its {}: {}",
            role.describe(),
            list(&candidates, 12)
        ));
    }
    Error::UnknownModule {
        name: name.to_string(),
        hint,
    }
}

/// A rank-1 f32 tensor, if present.
fn vector(sd: &StateDict, name: &str) -> Result<Option<Array1<f32>>> {
    match sd.f32_opt(name)? {
        None => Ok(None),
        Some(a) => a
            .clone()
            .into_dimensionality::<Ix1>()
            .map(Some)
            .map_err(|_| {
                Error::shape(
                    format!("`{name_}` (a per-channel vector)", name_ = escape(name)),
                    &[a.len()],
                    a.shape(),
                )
            }),
    }
}

/// One fusion resolved against the input and checked, not yet folded.
#[derive(Debug)]
struct Resolved {
    weight: ArrayD<f32>,
    bias: Option<Array1<f32>>,
    bn: BatchNorm,
    /// Every input tensor the fusion replaces or drops.
    remove: Vec<String>,
    report: FoldedLayer,
}

impl Resolved {
    fn wrap(&self, source: Error) -> Error {
        Error::Fold {
            layer: self.report.spec.layer.clone(),
            bn: self.report.spec.bn.clone(),
            source: Box::new(source),
        }
    }

    fn fold(&self, backend: &dyn HostOps) -> Result<Folded> {
        let folded = match self.report.kind {
            "linear" => {
                let w2: Array2<f32> = self
                    .weight
                    .clone()
                    .into_dimensionality::<Ix2>()
                    .map_err(|e| self.wrap(Error::invalid(format!("internal: {e}"))))?;
                backend.fold_linear_bn(&w2, self.bias.as_ref(), &self.bn)
            }
            _ => backend.fold_conv_bn(
                &self.weight,
                self.bias.as_ref(),
                &self.bn,
                self.report.spec.transpose,
            ),
        }
        .map_err(|e| self.wrap(e))?;
        if folded.weight.shape() != self.weight.shape() {
            return Err(self.wrap(Error::shape(
                "internal: folded weight",
                self.weight.shape(),
                folded.weight.shape(),
            )));
        }
        Ok(folded)
    }
}

/// Resolves one fusion against the input: finds and checks its tensors (everything the
/// backend would check, so errors do not depend on the backend).
fn resolve(sd: &StateDict, spec: &FoldSpec) -> Result<Resolved> {
    let (layer, bn) = (spec.layer.as_str(), spec.bn.as_str());
    let wrap = |source: Error| Error::Fold {
        layer: layer.to_string(),
        bn: bn.to_string(),
        source: Box::new(source),
    };
    let w_name = format!("{layer}.weight");
    let b_name = format!("{layer}.bias");
    let layer_tensors = under(sd, layer);
    if layer_tensors.is_empty() {
        return Err(unknown_module(sd, layer, Role::Layer));
    }
    if !sd.contains(&w_name) {
        return Err(wrap(Error::MissingTensor {
            name: w_name,
            context: format!(
                " (`{layer_}` is not a conv or linear layer; its tensors: {})",
                list(&to_strings(&layer_tensors), 6),
                layer_ = escape(layer)
            ),
        }));
    }
    let bn_tensors = under(sd, bn);
    if bn_tensors.is_empty() {
        return Err(unknown_module(sd, bn, Role::BatchNorm));
    }
    for t in &bn_tensors {
        let key = &t[bn.len() + 1..];
        if !BN_KEYS.contains(&key) {
            return Err(wrap(Error::invalid(format!(
                "`{bn_}` is not a BatchNorm: it has the tensor `{t_}`, and a BatchNorm has only \
                 weight, bias, running_mean, running_var and num_batches_tracked (nothing is \
                 dropped that is not a BatchNorm's)",
                bn_ = escape(bn),
                t_ = escape(t)
            ))));
        }
    }
    let rm_name = format!("{bn}.running_mean");
    let rv_name = format!("{bn}.running_var");
    for name in [&rm_name, &rv_name] {
        if !sd.contains(name) {
            return Err(wrap(Error::MissingTensor {
                name: name.clone(),
                context: format!(
                    " (`{bn_}` has no running statistics, as with track_running_stats=False, \
                     and cannot be folded; its tensors: {})",
                    list(&to_strings(&bn_tensors), 6),
                    bn_ = escape(bn)
                ),
            }));
        }
    }
    if let Some(relu) = &spec.relu {
        if let Some(t) = under(sd, relu).first() {
            return Err(wrap(Error::invalid(format!(
                "`{relu_}` is not a ReLU: it has the tensor `{t_}`, and a ReLU has none",
                relu_ = escape(relu),
                t_ = escape(t)
            ))));
        }
    }

    let weight = sd.f32(&w_name).map_err(wrap)?.clone();
    let bias = vector(sd, &b_name).map_err(wrap)?;
    let running_mean = vector(sd, &rm_name).map_err(wrap)?.unwrap_or_default();
    let channels = running_mean.len();
    let bn_vec = |key: &str| -> Result<Option<Array1<f32>>> {
        let name = format!("{bn}.{key}");
        let v = vector(sd, &name)?;
        match &v {
            Some(a) if a.len() != channels => Err(Error::shape(
                format!(
                    "`{name_}` (BatchNorm of {channels} channels, from running_mean)",
                    name_ = escape(&name)
                ),
                &[channels],
                a.shape(),
            )),
            _ => Ok(v),
        }
    };
    let batch_norm = BatchNorm {
        weight: bn_vec("weight").map_err(wrap)?,
        bias: bn_vec("bias").map_err(wrap)?,
        running_var: bn_vec("running_var").map_err(wrap)?.unwrap_or_default(),
        running_mean,
        eps: spec.eps,
        momentum: 0.1,
    };
    let shape = weight.shape().to_vec();
    let mismatch = |kind: &str, layer_channels: usize| {
        wrap(Error::ChannelMismatch {
            layer: format!("{kind} `{layer_}`", layer_ = escape(layer)),
            layer_channels,
            bn_channels: channels,
        })
    };
    let (kind, out_channels) = match shape.len() {
        2 => {
            if spec.relu.is_some() {
                return Err(wrap(Error::invalid(
                    "PyTorch has no (Linear, BatchNorm1d, ReLU) fusion; fold `LAYER,BN` and \
                     keep the ReLU as it is",
                )));
            }
            if shape[0] != channels && channels != 1 {
                return Err(mismatch("linear", shape[0]));
            }
            ("linear", shape[0])
        }
        r if r >= 3 && !spec.transpose => {
            if shape[0] != channels {
                return Err(mismatch("conv", shape[0]));
            }
            ("conv", channels)
        }
        r if r >= 3 => {
            if spec.relu.is_some() {
                return Err(wrap(Error::invalid(
                    "PyTorch has no (ConvTranspose, BatchNorm, ReLU) fusion; fold `LAYER,BN` \
                     and keep the ReLU as it is",
                )));
            }
            let per_group = shape[1];
            if per_group == 0 || channels % per_group != 0 {
                return Err(mismatch("conv_transpose", per_group));
            }
            let groups = channels / per_group;
            if shape[0] % groups != 0 {
                return Err(wrap(Error::invalid(format!(
                    "conv_transpose weight {shape:?} with a BatchNorm of {channels} channels \
                     implies groups = {groups}, which does not divide the {} input channels",
                    shape[0]
                ))));
            }
            ("conv_transpose", channels)
        }
        _ => {
            return Err(wrap(Error::invalid(format!(
                "`{w_name_}` has shape {shape:?}: expected a linear weight [out, in] (rank 2) or \
                 a conv weight [out, in/groups, k...] (rank >= 3)",
                w_name_ = escape(&w_name)
            ))))
        }
    };
    if let Some(b) = &bias {
        if b.len() != out_channels {
            return Err(wrap(Error::shape(
                format!(
                    "`{b_name_}` ({kind} of {out_channels} output channels)",
                    b_name_ = escape(&b_name)
                ),
                &[out_channels],
                b.shape(),
            )));
        }
    }
    batch_norm.validate().map_err(wrap)?;

    let prefix = spec.output_prefix();
    let written = vec![format!("{prefix}.weight"), format!("{prefix}.bias")];
    let mut remove = vec![w_name];
    if sd.contains(&b_name) {
        remove.push(b_name);
    }
    remove.extend(bn_tensors.iter().map(|s| s.to_string()));
    let dropped = remove
        .iter()
        .filter(|n| !written.contains(n))
        .cloned()
        .collect();
    Ok(Resolved {
        weight,
        bias,
        bn: batch_norm,
        remove,
        report: FoldedLayer {
            spec: spec.clone(),
            kind,
            weight_shape: shape,
            written,
            dropped,
        },
    })
}

fn to_strings(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}
