//! NNI-style quantization `config_list`: which ops to quantize, which of their tensors
//! (`_input_`, `weight`, `bias`, `_output_`), with which dtype, scheme and granularity, and
//! which modules to fuse first (`fuse_names`) — parsed ([`ConfigList`]) and applied to a
//! [`crate::nn::Module`] tree ([`apply`], [`calibrate`], then the model's own forward).
//!
//! # Keys
//! Each entry of the list is an object with:
//!
//! | key | value | default |
//! |---|---|---|
//! | `op_names` | dotted module paths (`"conv1"`, `"layer1.0.conv1"`) | — |
//! | `op_types` | PyTorch type names ([`crate::nn::Module::kind_name`]: `"Conv2d"`, `"Linear"`) | — |
//! | `exclude_op_names` | paths never selected by this entry | `[]` |
//! | `exclude_op_types` | types never selected by this entry | `[]` |
//! | `target_names` | `_input_`, `weight`, `bias`, `_output_` | all four (weight and bias where the module has them) |
//! | `quant_dtype` | `int8` `[-128, 127]`, `uint8` `[0, 255]`, `int4` `[-8, 7]`, `uint4` `[0, 15]`, `int2`, `uint2` | `int8` |
//! | `quant_scheme` | `affine`, `symmetric` | `affine` |
//! | `granularity` | `default` (per tensor), `per_channel` (weights per output channel; activations stay per tensor), `out_channel` (the same) | `default` |
//! | `fuse_names` | groups of 2 or 3 paths to fuse, the first selected by the same entry | `[]` |
//!
//! Selection is NNI's: an entry with both `op_names` and `op_types` selects the modules that
//! satisfy both; with one of them, the modules it names; then the excludes are removed. An
//! entry needs `op_names` or `op_types`. When several entries select a module, a later
//! entry's target replaces an earlier one's (per target). Unknown keys and values are errors
//! naming them; an unknown module path is [`Error::UnknownModule`] naming the closest paths.
//!
//! Observers are PyTorch's `MinMaxObserver` / `PerChannelMinMaxObserver` with
//! `calculate_qparams` (see [`crate::reference::observer`]); the scale and zero point follow
//! PyTorch's formulas exactly.
//!
//! # Applying a config
//! 1. [`apply`]`(model, config, QuantMode::Ptq)`: puts the model in eval mode, fuses every
//!    `fuse_names` group ([`crate::fuse::fuse_modules`]: BatchNorm folded, followers become
//!    `Identity`), and attaches a [`crate::nn::QuantTargets`] (a fake quant with its observer
//!    per target) to each selected module. Nothing changes on error. (`QuantMode::Qat`
//!    fuses for QAT and converts to QAT modules instead: see [`QuantMode::Qat`].)
//! 2. [`calibrate`]`(model, backend, batches)`: runs the model on every batch with observers
//!    and fake quantization enabled, then disables the observers. Each target is observed then
//!    quantized in the same pass, so an op's `_output_` is observed on the output computed
//!    from its quantized input and weight; min/max accumulate over all batches.
//! 3. `model.forward(backend, x)`: the simulated (fake-quantized) model.
//!    [`set_fake_quant_enabled`]`(model, false)` gives the fused float model.
//!
//! ```
//! use ndarray::{Array1, Array2, ArrayD, IxDyn};
//! use qfuse::config::{self, ConfigList, QuantMode};
//! use qfuse::nn::Module;
//! use qfuse::ops::BatchNorm;
//! use qfuse::CpuBackend;
//!
//! let bn = BatchNorm {
//!     weight: Some(Array1::from_elem(4, 2.0)),
//!     bias: Some(Array1::from_elem(4, 0.5)),
//!     running_mean: Array1::zeros(4),
//!     running_var: Array1::ones(4),
//!     eps: 1e-5,
//!     momentum: 0.1,
//! };
//! let mut model = Module::sequential([
//!     Module::linear(Array2::from_shape_fn((4, 3), |(i, j)| (i + j) as f32 * 0.1), None)?,
//!     Module::batch_norm1d(bn)?,
//!     Module::relu(),
//! ]);
//! let cfg = ConfigList::from_json(r#"[{"op_names": ["0"], "target_names": ["_input_", "weight", "_output_"],
//!     "quant_dtype": "int8", "quant_scheme": "affine", "fuse_names": [["0", "1"]]}]"#)?;
//! let applied = config::apply(&mut model, &cfg, QuantMode::Ptq)?;
//! assert_eq!(applied.fused, vec![vec!["0".to_string(), "1".to_string()]]);
//! assert_eq!(model.get("1")?.kind_name(), "Identity");
//!
//! let x = ArrayD::from_shape_fn(IxDyn(&[8, 3]), |d| d[0] as f32 * 0.25 - d[1] as f32);
//! config::calibrate(&mut model, &CpuBackend, [&x])?;
//! let y_sim = model.forward(&CpuBackend, &x)?;
//! config::set_fake_quant_enabled(&mut model, false);
//! let y_fused = model.forward(&CpuBackend, &x)?;
//! assert!(y_sim.iter().zip(&y_fused).all(|(a, b)| (a - b).abs() < 0.1));
//! for (path, target, qp) in config::qparams(&model) {
//!     println!("{path}.{target}: scale {:?}, zero point {:?}", qp.scale, qp.zero_point);
//! }
//! # Ok::<(), qfuse::Error>(())
//! ```
//!
//! # Differences from NNI
//! * `int8` is PyTorch's `qint8` range `[-128, 127]` (NNI uses the narrow `[-127, 127]`),
//!   so the qparams equal those of PyTorch's `MinMaxObserver(qint8)`.
//! * `per_channel` means per output channel for weights (PyTorch's per-channel weight
//!   observer); NNI's `per_channel` quantizes activations per channel, which is not
//!   supported here. `op_names_re`, `exclude_op_names_re`, `target_settings` and the legacy
//!   v2 keys are not supported (unknown-key errors).
//! * Fusion runs PyTorch's `fuse_modules` (BatchNorm folded once with its running
//!   statistics) rather than NNI's fold-in-every-forward wrapper; in eval mode the two agree.
//! * [`QuantMode::Qat`] converts modules with PyTorch's QAT modules ([`crate::qat`]); their
//!   training forward normalizes with batch statistics (PyTorch's `ConvBn2d`), where NNI's
//!   wrapper folds the running statistics in every forward.
//!
mod apply;

pub use apply::{
    apply, calibrate, calibrate_host, qparams, reset_observers, set_fake_quant_enabled,
    set_observer_enabled, AppliedConfig, QuantMode,
};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::text::{escape, escape_list};
use crate::nn::QuantTarget;
use crate::quant::{ObserverSpec, QDtype, QScheme, QuantRange};

/// One entry of a `config_list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantConfig {
    /// Names of the ops this entry applies to.
    #[serde(default)]
    pub op_names: Vec<String>,
    /// Types of the ops this entry applies to (`Conv2d`, `Linear`, ...).
    #[serde(default)]
    pub op_types: Vec<String>,
    /// Names excluded even when matched by type.
    #[serde(default)]
    pub exclude_op_names: Vec<String>,
    /// Types excluded even when matched by name.
    #[serde(default)]
    pub exclude_op_types: Vec<String>,
    /// Which tensors of the op: `_input_`, `weight`, `bias`, `_output_` (empty: all that the
    /// module has).
    #[serde(default)]
    pub target_names: Vec<String>,
    /// `int8`, `uint8`, `int4`, `uint4`, ...
    #[serde(default = "default_dtype")]
    pub quant_dtype: String,
    /// `affine` or `symmetric`.
    #[serde(default = "default_scheme")]
    pub quant_scheme: String,
    /// `default` (per tensor), or `per_channel` / `out_channel` (weights per output channel).
    #[serde(default = "default_granularity")]
    pub granularity: String,
    /// Groups of module names to fuse before quantizing.
    #[serde(default)]
    pub fuse_names: Vec<Vec<String>>,
}

fn default_dtype() -> String {
    "int8".into()
}
fn default_scheme() -> String {
    "affine".into()
}
fn default_granularity() -> String {
    "default".into()
}

/// A whole `config_list`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ConfigList(pub Vec<QuantConfig>);

/// The tensors of an op that a config can target.
pub const TARGETS: &[&str] = &["_input_", "weight", "bias", "_output_"];

impl ConfigList {
    /// Parses and validates a `config_list` JSON string.
    pub fn from_json(s: &str) -> Result<Self> {
        let v: Value =
            serde_json::from_str(s).map_err(|e| Error::invalid(format!("config_list: {e}")))?;
        Self::from_value(&v)
    }

    /// The config list as a JSON value (every key written, defaults included); parses back
    /// with [`ConfigList::from_value`].
    pub fn to_value(&self) -> Value {
        serde_json::to_value(&self.0).unwrap_or(Value::Null)
    }

    /// Parses and validates a `config_list` JSON value (a list of objects).
    pub fn from_value(v: &Value) -> Result<Self> {
        check_shape(v)?;
        let list: Vec<QuantConfig> = serde_json::from_value(v.clone())
            .map_err(|e| Error::invalid(format!("config_list: {e}")))?;
        for (i, c) in list.iter().enumerate() {
            c.validate()
                .map_err(|e| Error::invalid(format!("config_list[{i}]: {e}")))?;
        }
        Ok(Self(list))
    }
}

/// The keys of an entry.
const KEYS: &[&str] = &[
    "op_names",
    "op_types",
    "exclude_op_names",
    "exclude_op_types",
    "target_names",
    "quant_dtype",
    "quant_scheme",
    "granularity",
    "fuse_names",
];

/// Checks the JSON's shape (a list of objects, known keys, each value of its key's type),
/// so that errors name the entry and the key.
fn check_shape(v: &Value) -> Result<()> {
    let list = v.as_array().ok_or_else(|| {
        Error::invalid(format!(
            "config_list must be a list of objects, got {}",
            kind(v)
        ))
    })?;
    let strings = |x: &Value| x.as_array().is_some_and(|a| a.iter().all(Value::is_string));
    for (i, entry) in list.iter().enumerate() {
        let obj = entry.as_object().ok_or_else(|| {
            Error::invalid(format!(
                "config_list[{i}] must be an object, got {}",
                kind(entry)
            ))
        })?;
        for (key, val) in obj {
            let (ok, want) = match key.as_str() {
                "quant_dtype" | "quant_scheme" | "granularity" => (val.is_string(), "a string"),
                "fuse_names" => (
                    val.as_array().is_some_and(|a| a.iter().all(strings)),
                    "a list of lists of module names",
                ),
                k if KEYS.contains(&k) => (strings(val), "a list of strings"),
                other => {
                    return Err(Error::invalid(format!(
                        "config_list[{i}]: unknown key `{}` (expected one of {})",
                        escape(other),
                        KEYS.join(", ")
                    )))
                }
            };
            if !ok {
                return Err(Error::invalid(format!(
                    "config_list[{i}].{key} must be {want}, got {val}"
                )));
            }
        }
    }
    Ok(())
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

impl QuantConfig {
    fn validate(&self) -> Result<()> {
        for t in &self.target_names {
            if QuantTarget::parse(t).is_err() {
                return Err(Error::invalid(format!(
                    "unknown target_names value `{}` (expected one of {TARGETS:?})",
                    escape(t)
                )));
            }
        }
        self.range()?;
        self.scheme(false)?;
        for g in &self.fuse_names {
            if g.len() < 2 {
                return Err(Error::invalid(format!(
                    "fuse_names group {} must name at least two modules",
                    escape_list(g)
                )));
            }
        }
        if self.op_names.is_empty() && self.op_types.is_empty() {
            return Err(Error::invalid(
                "the entry selects no module: give op_names or op_types",
            ));
        }
        Ok(())
    }

    /// The targets of `target_names`, in forward order, without repeats; empty when
    /// `target_names` is (meaning every target the module has).
    ///
    /// Errors: [`Error::InvalidArgument`] naming an unknown target.
    pub fn targets(&self) -> Result<Vec<QuantTarget>> {
        let mut out = Vec::new();
        for t in &self.target_names {
            let t = QuantTarget::parse(t)?;
            if !out.contains(&t) {
                out.push(t);
            }
        }
        out.sort();
        Ok(out)
    }

    /// The integer range of `quant_dtype`.
    pub fn range(&self) -> Result<QuantRange> {
        match self.quant_dtype.as_str() {
            "int8" => Ok(QuantRange::INT8),
            "uint8" => Ok(QuantRange::UINT8),
            "int4" => Ok(QuantRange::INT4),
            "uint4" => Ok(QuantRange::UINT4),
            "int2" => QuantRange::new(-2, 1),
            "uint2" => QuantRange::new(0, 3),
            other => Err(Error::invalid(format!(
                "unknown quant_dtype `{}` (expected int8, uint8, int4, uint4, int2, uint2)",
                escape(other)
            ))),
        }
    }

    /// The observer scheme for a target; per-channel granularity applies to weights.
    pub fn scheme(&self, per_channel_target: bool) -> Result<QScheme> {
        let per_channel = match self.granularity.as_str() {
            "default" | "per_tensor" => false,
            "per_channel" | "out_channel" => per_channel_target,
            other => {
                return Err(Error::invalid(format!(
                    "unknown granularity `{}` (expected default, per_channel or out_channel)",
                    escape(other)
                )))
            }
        };
        Ok(match (self.quant_scheme.as_str(), per_channel) {
            ("affine", false) => QScheme::PerTensorAffine,
            ("affine", true) => QScheme::PerChannelAffine,
            ("symmetric", false) => QScheme::PerTensorSymmetric,
            ("symmetric", true) => QScheme::PerChannelSymmetric,
            (other, _) => {
                return Err(Error::invalid(format!(
                    "unknown quant_scheme `{}` (expected affine or symmetric)",
                    escape(other)
                )))
            }
        })
    }

    /// The observer for `target` (`weight` observes per output channel, axis 0, when the
    /// granularity is per_channel; [`apply`] sets the axis of a transposed conv's weight to
    /// 1). Signed dtypes observe as `qint8` (symmetric zero point 0), unsigned as `quint8`
    /// (symmetric zero point `(quant_min + quant_max + 1) / 2`, 128 for uint8).
    pub fn observer(&self, target: &str) -> Result<ObserverSpec> {
        let range = self.range()?;
        let dtype = if range.quant_min < 0 {
            QDtype::QInt8
        } else {
            QDtype::QUInt8
        };
        ObserverSpec::new(dtype, self.scheme(target == "weight")?, range, 0)
    }

    /// Whether this entry selects an op of this name and type (NNI's rule: with both
    /// `op_names` and `op_types`, both must hold; with one, it must; the excludes win).
    pub fn matches(&self, name: &str, op_type: &str) -> bool {
        if self.exclude_op_names.iter().any(|n| n == name)
            || self.exclude_op_types.iter().any(|t| t == op_type)
        {
            return false;
        }
        let by_name = self.op_names.iter().any(|n| n == name);
        let by_type = self.op_types.iter().any(|t| t == op_type);
        match (self.op_names.is_empty(), self.op_types.is_empty()) {
            (false, false) => by_name && by_type,
            (false, true) => by_name,
            (true, false) => by_type,
            (true, true) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_keys_and_values_are_named() {
        let e = ConfigList::from_json(r#"[{"op_names": ["a"], "quant_bits": 8}]"#).unwrap_err();
        assert!(e.to_string().contains("quant_bits"), "{e}");
        let e = ConfigList::from_json(r#"[{"quant_dtype": "int7"}]"#).unwrap_err();
        assert!(e.to_string().contains("int7"), "{e}");
        let e = ConfigList::from_json(r#"[{"target_names": ["_inputs_"]}]"#).unwrap_err();
        assert!(e.to_string().contains("_inputs_"), "{e}");
        let e = ConfigList::from_json(r#"[{"quant_scheme": "asym"}]"#).unwrap_err();
        assert!(e.to_string().contains("asym"), "{e}");
        let e = ConfigList::from_json(r#"[{"fuse_names": [["conv1"]]}]"#).unwrap_err();
        assert!(e.to_string().contains("at least two"), "{e}");
        let e = ConfigList::from_json(
            r#"[{"op_types": ["Conv2d"]}, {"granularity": "per_token", "op_names": ["a"]}]"#,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("config_list[1]") && e.to_string().contains("per_token"),
            "{e}"
        );
        let e = ConfigList::from_json(r#"[{"target_names": ["weight"]}]"#).unwrap_err();
        assert!(e.to_string().contains("op_names or op_types"), "{e}");
        let e = ConfigList::from_json(r#"{"op_names": ["a"]}"#).unwrap_err();
        assert!(e.to_string().contains("config_list"), "{e}");
    }

    #[test]
    fn selection_is_nni_s() {
        let c = |j: &str| ConfigList::from_json(j).unwrap().0.remove(0);
        let both = c(r#"[{"op_names": ["a", "b"], "op_types": ["Linear"]}]"#);
        assert!(both.matches("a", "Linear"));
        assert!(!both.matches("a", "Conv2d"));
        assert!(!both.matches("c", "Linear"));
        let types = c(r#"[{"op_types": ["Linear"], "exclude_op_names": ["b"]}]"#);
        assert!(types.matches("a", "Linear") && !types.matches("b", "Linear"));
        let names = c(r#"[{"op_names": ["a", "b"], "exclude_op_types": ["ReLU"]}]"#);
        assert!(names.matches("a", "Linear") && !names.matches("b", "ReLU"));
        let t = c(
            r#"[{"op_names": ["a"], "target_names": ["_output_", "weight", "_input_0", "weight"]}]"#,
        );
        assert_eq!(
            t.targets().unwrap(),
            [QuantTarget::Input, QuantTarget::Weight, QuantTarget::Output]
        );
    }

    #[test]
    fn observer_follows_granularity() {
        let c = &ConfigList::from_json(
            r#"[{"op_types": ["Conv2d"], "quant_dtype": "uint8", "quant_scheme": "symmetric", "granularity": "per_channel"}]"#,
        )
        .unwrap()
        .0[0];
        assert_eq!(
            c.observer("weight").unwrap().qscheme,
            QScheme::PerChannelSymmetric
        );
        assert_eq!(
            c.observer("_input_").unwrap().qscheme,
            QScheme::PerTensorSymmetric
        );
        assert_eq!(c.observer("_input_").unwrap().dtype, QDtype::QUInt8);
        assert!(c.matches("anything", "Conv2d"));
    }
}
