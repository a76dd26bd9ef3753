//! Conformance case files: one safetensors file per case, `in.*` inputs, `out.*` expected
//! outputs, and `op` / `params` / `atol` / `rtol` in the header metadata
//! (format described in the golden folder's README).

use std::path::{Path, PathBuf};

use ndarray::ArrayD;
use serde_json::Value;

use super::state_dict::{dtype_name, load_state_dict, parse_state_dict, HostTensor, StateDict};
use super::text::escape;
use crate::error::{Error, Result};

/// A state dict that is not safetensors is, for a case file, a malformed case.
fn as_case_error(e: Error) -> Error {
    match e {
        Error::MalformedStateDict { path, reason } => Error::MalformedCase { path, reason },
        other => other,
    }
}

/// One conformance case.
#[derive(Debug, Clone)]
pub struct Case {
    /// Where it came from (file path or a label).
    pub path: String,
    /// The operation (`fold_conv_bn`, `fake_quant_per_tensor`, ...).
    pub op: String,
    /// The operation's settings (a JSON object).
    pub params: Value,
    /// Absolute tolerance.
    pub atol: f32,
    /// Relative tolerance.
    pub rtol: f32,
    /// All tensors, with their `in.` / `out.` prefixes.
    pub tensors: StateDict,
}

impl Case {
    /// Reads and checks a case file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let sd = load_state_dict(path).map_err(as_case_error)?;
        Self::from_state_dict(sd, &path.display().to_string())
    }

    /// Parses a case from bytes; `origin` names it in errors.
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Self> {
        Self::from_state_dict(
            parse_state_dict(bytes, origin).map_err(as_case_error)?,
            origin,
        )
    }

    fn from_state_dict(sd: StateDict, origin: &str) -> Result<Self> {
        let malformed = |reason: String| Error::MalformedCase {
            path: origin.to_string(),
            reason,
        };
        let meta = |key: &str| {
            sd.metadata
                .get(key)
                .cloned()
                .ok_or_else(|| malformed(format!("metadata has no `{}`", escape(key))))
        };
        let op = meta("op")?;
        let params: Value = serde_json::from_str(&meta("params")?)
            .map_err(|e| malformed(format!("`params` is not JSON: {e}")))?;
        if !params.is_object() {
            return Err(malformed("`params` is not a JSON object".into()));
        }
        let tol = |key: &str| -> Result<f32> {
            let s = meta(key)?;
            let v: f32 = s.trim().parse().map_err(|_| {
                malformed(format!(
                    "`{}` = `{}` is not a number",
                    escape(key),
                    escape(&s)
                ))
            })?;
            if v.is_finite() && v >= 0.0 {
                Ok(v)
            } else {
                Err(malformed(format!("`{key}` = {v} must be finite and >= 0")))
            }
        };
        let atol = tol("atol")?;
        let rtol = tol("rtol")?;
        if let Some((name, t)) = sd.raw.iter().next() {
            return Err(malformed(format!(
                "tensor `{}` has dtype {}; case files hold only float32 and int32",
                escape(name),
                dtype_name(t.dtype())
            )));
        }
        if !sd.tensors.keys().any(|k| k.starts_with("out.")) {
            return Err(malformed("no expected output (`out.*`) tensor".into()));
        }
        Ok(Case {
            path: origin.to_string(),
            op,
            params,
            atol,
            rtol,
            tensors: sd,
        })
    }

    fn missing(&self, name: &str) -> Error {
        Error::MissingTensor {
            name: name.to_string(),
            context: format!(" in {}", self.path),
        }
    }

    fn get_f32(&self, name: &str) -> Result<&ArrayD<f32>> {
        match self.tensors.tensors.get(name) {
            Some(HostTensor::F32(a)) => Ok(a),
            Some(HostTensor::I32(_)) => Err(Error::MalformedCase {
                path: self.path.clone(),
                reason: format!("tensor `{}` is int32, expected float32", escape(name)),
            }),
            None => Err(self.missing(name)),
        }
    }

    /// Input tensor `in.NAME` (f32), or [`Error::MissingTensor`].
    pub fn input(&self, name: &str) -> Result<&ArrayD<f32>> {
        self.get_f32(&format!("in.{name}"))
    }

    /// Optional input `in.NAME` (absent is `None`).
    pub fn input_opt(&self, name: &str) -> Result<Option<&ArrayD<f32>>> {
        let key = format!("in.{name}");
        if self.tensors.tensors.contains_key(&key) {
            self.get_f32(&key).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Integer input `in.NAME` (i32).
    pub fn input_i32(&self, name: &str) -> Result<&ArrayD<i32>> {
        let key = format!("in.{name}");
        match self.tensors.tensors.get(&key) {
            Some(HostTensor::I32(a)) => Ok(a),
            Some(HostTensor::F32(_)) => Err(Error::MalformedCase {
                path: self.path.clone(),
                reason: format!("tensor `{}` is float32, expected int32", escape(&key)),
            }),
            None => Err(self.missing(&key)),
        }
    }

    /// Expected outputs: `(name without "out.", tensor)` in name order.
    pub fn expected(&self) -> impl Iterator<Item = (&str, &HostTensor)> {
        self.tensors
            .tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("out.").map(|n| (n, v)))
    }

    fn param(&self, key: &str) -> Result<&Value> {
        self.params.get(key).ok_or_else(|| Error::MalformedCase {
            path: self.path.clone(),
            reason: format!("params has no `{}`", escape(key)),
        })
    }

    fn bad_param(&self, key: &str, want: &str) -> Error {
        Error::MalformedCase {
            path: self.path.clone(),
            reason: format!(
                "params `{}` must be {want}, got {}",
                escape(key),
                escape(&self.params[key].to_string())
            ),
        }
    }

    /// A float parameter: a JSON number that is finite as a float32 (`1e39`, which becomes
    /// infinity in float32, is refused as the command line refuses it).
    pub fn param_f32(&self, key: &str) -> Result<f32> {
        let v = self
            .param(key)?
            .as_f64()
            .ok_or_else(|| self.bad_param(key, "a number"))?;
        let f = v as f32;
        if v.is_finite() && !f.is_finite() {
            return Err(self.bad_param(key, "a number within float32's range (|x| < 3.4e38)"));
        }
        Ok(f)
    }

    /// An integer parameter.
    pub fn param_i32(&self, key: &str) -> Result<i32> {
        self.param(key)?
            .as_i64()
            .and_then(|v| i32::try_from(v).ok())
            .ok_or_else(|| self.bad_param(key, "a 32-bit integer"))
    }

    /// A non-negative integer parameter.
    pub fn param_usize(&self, key: &str) -> Result<usize> {
        self.param(key)?
            .as_u64()
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| self.bad_param(key, "a non-negative integer"))
    }

    /// An optional non-negative integer parameter.
    pub fn param_usize_opt(&self, key: &str) -> Result<Option<usize>> {
        if self.params.get(key).is_none_or(Value::is_null) {
            Ok(None)
        } else {
            self.param_usize(key).map(Some)
        }
    }

    /// An optional integer parameter that may be negative (a PyTorch axis; absent or `null`
    /// is `None`).
    pub fn param_isize_opt(&self, key: &str) -> Result<Option<isize>> {
        if self.params.get(key).is_none_or(Value::is_null) {
            return Ok(None);
        }
        self.param(key)?
            .as_i64()
            .and_then(|v| isize::try_from(v).ok())
            .map(Some)
            .ok_or_else(|| self.bad_param(key, "an integer"))
    }

    /// An optional boolean parameter (absent or `null` is `None`).
    pub fn param_bool_opt(&self, key: &str) -> Result<Option<bool>> {
        if self.params.get(key).is_none_or(Value::is_null) {
            Ok(None)
        } else {
            self.param_bool(key).map(Some)
        }
    }

    /// An optional float parameter (absent or `null` is `None`).
    pub fn param_f32_opt(&self, key: &str) -> Result<Option<f32>> {
        if self.params.get(key).is_none_or(Value::is_null) {
            Ok(None)
        } else {
            self.param_f32(key).map(Some)
        }
    }

    /// A boolean parameter.
    pub fn param_bool(&self, key: &str) -> Result<bool> {
        self.param(key)?
            .as_bool()
            .ok_or_else(|| self.bad_param(key, "a boolean"))
    }

    /// A string parameter.
    pub fn param_str(&self, key: &str) -> Result<&str> {
        self.param(key)?
            .as_str()
            .ok_or_else(|| self.bad_param(key, "a string"))
    }

    /// A `[h, w]` pair parameter (a single integer `n` means `[n, n]`, as in PyTorch).
    pub fn param_pair(&self, key: &str) -> Result<[usize; 2]> {
        let v = self.param(key)?;
        let size = |v: &Value| v.as_u64().and_then(|n| usize::try_from(n).ok());
        if let Some(n) = size(v) {
            return Ok([n, n]);
        }
        match v.as_array().map(|a| a.as_slice()) {
            Some([a, b]) => match (size(a), size(b)) {
                (Some(a), Some(b)) => Ok([a, b]),
                _ => Err(self.bad_param(key, "a pair of non-negative integers")),
            },
            _ => Err(self.bad_param(key, "a pair of non-negative integers")),
        }
    }
}

/// Every entry named `*.safetensors` in `dir`, sorted by name, whatever it is: a directory,
/// a FIFO, a dangling symbolic link or a link loop so named is listed too, and fails as a
/// case when read (never skipped silently).
pub fn case_files(dir: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
    let dir = dir.as_ref();
    let entries = std::fs::read_dir(dir).map_err(|source| Error::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| Error::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let p = entry.path();
        if p.extension().is_some_and(|e| e == "safetensors") {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}
