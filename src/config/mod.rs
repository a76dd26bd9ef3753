//! NNI-style quantization `config_list`: which ops to quantize, which of their tensors
//! (`_input_`, `weight`, `bias`, `_output_`), with which dtype, scheme and granularity, and
//! which modules to fuse first (`fuse_names`).
//!
//! ```
//! use qfuse::config::ConfigList;
//! let cfg = ConfigList::from_json(r#"[{"op_names": ["conv1"], "target_names": ["_input_", "weight"],
//!     "quant_dtype": "int8", "quant_scheme": "affine", "fuse_names": [["conv1", "batchnorm1"]]}]"#)?;
//! assert_eq!(cfg.0[0].fuse_names, vec![vec!["conv1".to_string(), "batchnorm1".to_string()]]);
//! # Ok::<(), qfuse::Error>(())
//! ```

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::quant::{ObserverSpec, QDtype, QScheme, QuantRange};

/// One entry of a `config_list`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
    /// Which tensors of the op: `_input_`, `weight`, `bias`, `_output_`.
    #[serde(default)]
    pub target_names: Vec<String>,
    /// `int8`, `uint8`, `int4`, `uint4`, ...
    #[serde(default = "default_dtype")]
    pub quant_dtype: String,
    /// `affine` or `symmetric`.
    #[serde(default = "default_scheme")]
    pub quant_scheme: String,
    /// `default` (per tensor) or `per_channel`.
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

    /// Parses and validates a `config_list` JSON value (a list of objects).
    pub fn from_value(v: &Value) -> Result<Self> {
        let list: Vec<QuantConfig> = serde_json::from_value(v.clone())
            .map_err(|e| Error::invalid(format!("config_list: {e}")))?;
        for (i, c) in list.iter().enumerate() {
            c.validate()
                .map_err(|e| Error::invalid(format!("config_list[{i}]: {e}")))?;
        }
        Ok(Self(list))
    }
}

impl QuantConfig {
    fn validate(&self) -> Result<()> {
        for t in &self.target_names {
            if !TARGETS.contains(&t.as_str()) {
                return Err(Error::invalid(format!(
                    "unknown target_names value `{t}` (expected one of {TARGETS:?})"
                )));
            }
        }
        self.range()?;
        self.scheme(false)?;
        for g in &self.fuse_names {
            if g.len() < 2 {
                return Err(Error::invalid(format!(
                    "fuse_names group {g:?} must name at least two modules"
                )));
            }
        }
        Ok(())
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
                "unknown quant_dtype `{other}` (expected int8, uint8, int4, uint4, int2, uint2)"
            ))),
        }
    }

    /// The observer scheme for a target; per-channel granularity applies to weights.
    pub fn scheme(&self, per_channel_target: bool) -> Result<QScheme> {
        let per_channel = match self.granularity.as_str() {
            "default" | "per_tensor" => false,
            "per_channel" => per_channel_target,
            other => {
                return Err(Error::invalid(format!(
                    "unknown granularity `{other}` (expected default or per_channel)"
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
                    "unknown quant_scheme `{other}` (expected affine or symmetric)"
                )))
            }
        })
    }

    /// The observer for `target` (`weight` observes per output channel, axis 0, when the
    /// granularity is per_channel).
    pub fn observer(&self, target: &str) -> Result<ObserverSpec> {
        let range = self.range()?;
        let dtype = if range.quant_min < 0 {
            QDtype::QInt8
        } else {
            QDtype::QUInt8
        };
        ObserverSpec::new(dtype, self.scheme(target == "weight")?, range, 0)
    }

    /// Whether this entry applies to an op of this name and type.
    pub fn matches(&self, name: &str, op_type: &str) -> bool {
        if self.exclude_op_names.iter().any(|n| n == name) {
            return false;
        }
        self.op_names.iter().any(|n| n == name) || self.op_types.iter().any(|t| t == op_type)
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
