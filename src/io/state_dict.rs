//! PyTorch state dicts as safetensors files: name → tensor, plus the header metadata.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use ndarray::{ArrayD, IxDyn};
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

/// A tensor read from a safetensors file: f32 or i32 (the dtypes qfuse's cases use).
#[derive(Debug, Clone, PartialEq)]
pub enum HostTensor {
    /// float32.
    F32(ArrayD<f32>),
    /// int32 (zero points).
    I32(ArrayD<i32>),
}

impl HostTensor {
    /// The shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            HostTensor::F32(a) => a.shape(),
            HostTensor::I32(a) => a.shape(),
        }
    }
}

/// Tensors by name and the file's `__metadata__`.
#[derive(Debug, Clone, Default)]
pub struct StateDict {
    /// Tensors by name.
    pub tensors: BTreeMap<String, HostTensor>,
    /// Header metadata (all strings).
    pub metadata: HashMap<String, String>,
}

fn malformed(path: &str, reason: impl Into<String>) -> Error {
    Error::MalformedCase {
        path: path.to_string(),
        reason: reason.into(),
    }
}

/// Parses safetensors bytes; `origin` names the source in errors.
pub fn parse_state_dict(bytes: &[u8], origin: &str) -> Result<StateDict> {
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| malformed(origin, format!("not a safetensors file: {e}")))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| malformed(origin, format!("not a safetensors file: {e}")))?;
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let data = view.data();
        let tensor = match view.dtype() {
            Dtype::F32 => {
                let v: Vec<f32> = data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                HostTensor::F32(
                    ArrayD::from_shape_vec(IxDyn(&shape), v)
                        .map_err(|e| malformed(origin, format!("tensor `{name}`: {e}")))?,
                )
            }
            Dtype::I32 => {
                let v: Vec<i32> = data
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                HostTensor::I32(
                    ArrayD::from_shape_vec(IxDyn(&shape), v)
                        .map_err(|e| malformed(origin, format!("tensor `{name}`: {e}")))?,
                )
            }
            other => {
                return Err(malformed(
                    origin,
                    format!("tensor `{name}` has dtype {other:?}; only F32 and I32 are supported"),
                ))
            }
        };
        tensors.insert(name, tensor);
    }
    Ok(StateDict { tensors, metadata })
}

/// Reads a safetensors file into a [`StateDict`].
pub fn load_state_dict(path: impl AsRef<Path>) -> Result<StateDict> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse_state_dict(&bytes, &path.display().to_string())
}

impl StateDict {
    /// An f32 tensor by name, or [`Error::MissingTensor`].
    pub fn f32(&self, name: &str) -> Result<&ArrayD<f32>> {
        match self.tensors.get(name) {
            Some(HostTensor::F32(a)) => Ok(a),
            Some(HostTensor::I32(_)) => Err(Error::invalid(format!(
                "tensor `{name}` is int32, expected float32"
            ))),
            None => Err(Error::MissingTensor {
                name: name.to_string(),
                context: String::new(),
            }),
        }
    }

    /// An optional f32 tensor (absent means `None` in PyTorch terms).
    pub fn f32_opt(&self, name: &str) -> Result<Option<&ArrayD<f32>>> {
        match self.tensors.get(name) {
            None => Ok(None),
            Some(_) => self.f32(name).map(Some),
        }
    }

    /// An i32 tensor by name, or [`Error::MissingTensor`].
    pub fn i32(&self, name: &str) -> Result<&ArrayD<i32>> {
        match self.tensors.get(name) {
            Some(HostTensor::I32(a)) => Ok(a),
            Some(HostTensor::F32(_)) => Err(Error::invalid(format!(
                "tensor `{name}` is float32, expected int32"
            ))),
            None => Err(Error::MissingTensor {
                name: name.to_string(),
                context: String::new(),
            }),
        }
    }

    /// Serializes to safetensors bytes (f32 and i32 tensors, with metadata).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = Vec::new();
        let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, t) in &self.tensors {
            let (dtype, bytes) = match t {
                HostTensor::F32(a) => (
                    Dtype::F32,
                    a.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(),
                ),
                HostTensor::I32(a) => (
                    Dtype::I32,
                    a.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(),
                ),
            };
            owned.push((name.clone(), dtype, t.shape().to_vec(), bytes));
        }
        let mut views = views;
        for (name, dtype, shape, bytes) in &owned {
            let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .map_err(|e| Error::invalid(format!("tensor `{name}`: {e}")))?;
            views.push((name.clone(), view));
        }
        let meta = if self.metadata.is_empty() {
            None
        } else {
            Some(self.metadata.clone())
        };
        safetensors::serialize(views, &meta)
            .map_err(|e| Error::invalid(format!("cannot serialize state dict: {e}")))
    }

    /// Writes to a safetensors file.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_bytes()?;
        std::fs::write(path, bytes).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })
    }
}
