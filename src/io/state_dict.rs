//! PyTorch state dicts as safetensors files: name → tensor, plus the header metadata.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use ndarray::{ArrayD, IxDyn};
use safetensors::SafeTensors;

pub use safetensors::Dtype;

use crate::error::{Error, Result};
use crate::io::file::{read_input, write_output};
use crate::io::text::escape;
use crate::limits::MAX_TENSOR_ELEMENTS;

/// A tensor read from a safetensors file: f32 or i32 (the dtypes qfuse computes with).
/// Tensors of any other dtype are kept as [`RawTensor`]s in [`StateDict::raw`].
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

/// PyTorch's name of a safetensors dtype (`float32`, `int64`, `bfloat16`, ...), for messages.
pub fn dtype_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::BOOL => "bool",
        Dtype::U8 => "uint8",
        Dtype::I8 => "int8",
        Dtype::F8_E5M2 => "float8_e5m2",
        Dtype::F8_E4M3 => "float8_e4m3fn",
        Dtype::I16 => "int16",
        Dtype::U16 => "uint16",
        Dtype::F16 => "float16",
        Dtype::BF16 => "bfloat16",
        Dtype::I32 => "int32",
        Dtype::U32 => "uint32",
        Dtype::F32 => "float32",
        Dtype::F64 => "float64",
        Dtype::I64 => "int64",
        Dtype::U64 => "uint64",
        _ => "an unknown dtype",
    }
}

/// A tensor of a dtype qfuse does not compute with (int64, float16, bfloat16, float64, bool,
/// ...), kept as its little-endian bytes exactly as the file stores them, so that it can be
/// written back unchanged (PyTorch's int64 `num_batches_tracked`, half-precision weights).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl RawTensor {
    /// A raw tensor; [`Error::ShapeMismatch`] unless `data` holds exactly
    /// `shape.product() * dtype.size()` bytes.
    pub fn new(dtype: Dtype, shape: Vec<usize>, data: Vec<u8>) -> Result<Self> {
        let want = shape
            .iter()
            .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| Error::invalid(format!("tensor shape {shape:?} overflows")))?;
        if data.len() != want {
            return Err(Error::shape(
                format!("raw {} tensor data (bytes)", dtype_name(dtype)),
                &[want],
                &[data.len()],
            ));
        }
        Ok(Self { dtype, shape, data })
    }

    /// The dtype.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The bytes, little-endian, row-major, as safetensors stores them.
    pub fn data(&self) -> &[u8] {
        &self.data
    }
}

/// Tensors by name and the file's `__metadata__`. A name is in at most one of
/// [`tensors`](Self::tensors) and [`raw`](Self::raw).
#[derive(Debug, Clone, Default)]
pub struct StateDict {
    /// The f32 and i32 tensors by name.
    pub tensors: BTreeMap<String, HostTensor>,
    /// Tensors of every other dtype by name, kept byte for byte.
    pub raw: BTreeMap<String, RawTensor>,
    /// Header metadata (all strings).
    pub metadata: HashMap<String, String>,
}

fn malformed(path: &str, reason: impl Into<String>) -> Error {
    Error::MalformedStateDict {
        path: path.to_string(),
        reason: reason.into(),
    }
}

/// The largest safetensors header the `safetensors` crate reads (100,000,000 bytes).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// safetensors' dtype names, with their [`Dtype`].
const DTYPES: [(&str, Dtype); 15] = [
    ("BOOL", Dtype::BOOL),
    ("U8", Dtype::U8),
    ("I8", Dtype::I8),
    ("F8_E5M2", Dtype::F8_E5M2),
    ("F8_E4M3", Dtype::F8_E4M3),
    ("I16", Dtype::I16),
    ("U16", Dtype::U16),
    ("F16", Dtype::F16),
    ("BF16", Dtype::BF16),
    ("I32", Dtype::I32),
    ("U32", Dtype::U32),
    ("F32", Dtype::F32),
    ("F64", Dtype::F64),
    ("I64", Dtype::I64),
    ("U64", Dtype::U64),
];

/// One tensor entry of a checked header.
struct Entry<'a> {
    name: &'a str,
    start: u64,
    end: u64,
}

/// Checks safetensors bytes before the `safetensors` crate parses them, so that a rejection
/// says what is wrong: the claimed header length against the file size, the header's JSON
/// error and where, the tensor whose dtype, shape or offsets are wrong and the offsets
/// against the data size, the gap or overlap between two tensors.
fn check_safetensors(bytes: &[u8]) -> std::result::Result<(), String> {
    let size = bytes.len() as u64;
    let Some(len_field) = bytes.get(..8) else {
        return Err(format!(
            "the file has {size} bytes, fewer than the 8 of the header length field"
        ));
    };
    let mut field = [0u8; 8];
    field.copy_from_slice(len_field);
    let n = u64::from_le_bytes(field);
    if n > MAX_HEADER_BYTES {
        return Err(format!(
            "the header length field claims {n} bytes, more than the {MAX_HEADER_BYTES} \
             safetensors allows (file size {size} bytes)"
        ));
    }
    if n > size - 8 {
        return Err(format!(
            "the header length field claims {n} bytes but only {} follow it (file size {size} \
             bytes)",
            size - 8
        ));
    }
    let header_end = 8 + n as usize;
    let header = std::str::from_utf8(&bytes[8..header_end]).map_err(|e| {
        format!(
            "the header ({n} bytes) is not UTF-8: invalid byte at header offset {}",
            e.valid_up_to()
        )
    })?;
    let json: serde_json::Value = serde_json::from_str(header)
        .map_err(|e| format!("the header ({n} bytes) is not valid JSON: {e}"))?;
    let serde_json::Value::Object(map) = json else {
        return Err(format!("the header ({n} bytes) is not a JSON object"));
    };
    let data_len = size - 8 - n;
    let mut entries: Vec<Entry<'_>> = Vec::with_capacity(map.len());
    for (name, info) in &map {
        let shown = escape(name);
        if name == "__metadata__" {
            let serde_json::Value::Object(meta) = info else {
                return Err("`__metadata__` is not a JSON object of strings".into());
            };
            if let Some((k, _)) = meta.iter().find(|(_, v)| !v.is_string()) {
                return Err(format!(
                    "`__metadata__` entry `{}` is not a string",
                    escape(k)
                ));
            }
            continue;
        }
        let bad = |why: String| format!("tensor `{shown}`: {why}");
        let serde_json::Value::Object(info) = info else {
            return Err(bad("its entry is not a JSON object".into()));
        };
        let dtype_s = info
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(|| bad("no `dtype` string".into()))?;
        let dtype = DTYPES
            .iter()
            .find(|(s, _)| *s == dtype_s)
            .map(|(_, d)| *d)
            .ok_or_else(|| {
                bad(format!(
                    "unknown dtype `{}` (expected one of {})",
                    escape(dtype_s),
                    DTYPES.map(|(s, _)| s).join(", ")
                ))
            })?;
        let shape: Vec<u64> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(serde_json::Value::as_u64).collect())
            .ok_or_else(|| bad("no `shape` list of non-negative integers".into()))?;
        let offsets: Vec<u64> = info
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(serde_json::Value::as_u64).collect())
            .filter(|v: &Vec<u64>| v.len() == 2)
            .ok_or_else(|| {
                bad("no `data_offsets` pair [begin, end] of non-negative integers".into())
            })?;
        let (start, end) = (offsets[0], offsets[1]);
        // Every dimension is bounded, even of a tensor with a zero dimension, so that sizes
        // derived from one dimension (a bias of w[0] channels) stay allocatable.
        let nonzero = shape
            .iter()
            .filter(|&&d| d != 0)
            .try_fold(1u64, |acc, &d| acc.checked_mul(d));
        if nonzero.is_none_or(|e| e > MAX_TENSOR_ELEMENTS as u64) {
            return Err(bad(format!(
                "shape {shape:?} has more than {MAX_TENSOR_ELEMENTS} elements (the limit on \
                 one tensor; zero dimensions not counted)"
            )));
        }
        let elements: u64 = if shape.contains(&0) {
            0
        } else {
            nonzero.unwrap_or(0)
        };
        let want = elements * dtype.size() as u64;
        if end < start {
            return Err(bad(format!(
                "data_offsets [{start}, {end}] end before they begin"
            )));
        }
        if end > data_len {
            return Err(bad(format!(
                "data_offsets [{start}, {end}] reach past the data, which has {data_len} bytes \
                 (file size {size} = 8 + header {n} + data {data_len})"
            )));
        }
        if end - start != want {
            return Err(bad(format!(
                "{dtype_s} shape {shape:?} needs {want} bytes but data_offsets [{start}, {end}] \
                 hold {}",
                end - start
            )));
        }
        entries.push(Entry { name, start, end });
    }
    entries.sort_by_key(|e| (e.start, e.end));
    let mut covered = 0u64;
    let mut prev: Option<&Entry<'_>> = None;
    for e in &entries {
        if e.start != covered {
            let what = if e.start < covered {
                "overlap"
            } else {
                "leave a gap"
            };
            return Err(match prev {
                Some(p) => format!(
                    "tensors `{}` (data_offsets [{}, {}]) and `{}` ([{}, {}]) {what}",
                    escape(p.name),
                    p.start,
                    p.end,
                    escape(e.name),
                    e.start,
                    e.end
                ),
                None => format!(
                    "the data does not begin with a tensor: the first, `{}`, has \
                     data_offsets [{}, {}]",
                    escape(e.name),
                    e.start,
                    e.end
                ),
            });
        }
        covered = e.end;
        prev = Some(e);
    }
    if covered != data_len {
        return Err(format!(
            "the tensors cover {covered} bytes of data but the file has {data_len} after its \
             header ({} unaccounted bytes at the end; file size {size} = 8 + header {n} + \
             data {data_len})",
            data_len - covered
        ));
    }
    Ok(())
}

/// Parses safetensors bytes; `origin` names the source in errors. f32 and i32 tensors become
/// [`HostTensor`]s, every other dtype a [`RawTensor`]. Bytes that are not a safetensors file
/// are [`Error::MalformedStateDict`], whose reason says what is wrong: the claimed header
/// length against the file size, the JSON error, the tensor and its offsets against the data
/// size; a tensor with more than [`MAX_TENSOR_ELEMENTS`] elements is refused.
pub fn parse_state_dict(bytes: &[u8], origin: &str) -> Result<StateDict> {
    check_safetensors(bytes)
        .map_err(|why| malformed(origin, format!("not a safetensors file: {why}")))?;
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| malformed(origin, format!("not a safetensors file: {e}")))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| malformed(origin, format!("not a safetensors file: {e}")))?;
    let mut tensors = BTreeMap::new();
    let mut raw = BTreeMap::new();
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let data = view.data();
        let shown = escape(&name);
        let tensor = match view.dtype() {
            Dtype::F32 => {
                let v: Vec<f32> = data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                HostTensor::F32(
                    ArrayD::from_shape_vec(IxDyn(&shape), v)
                        .map_err(|e| malformed(origin, format!("tensor `{shown}`: {e}")))?,
                )
            }
            Dtype::I32 => {
                let v: Vec<i32> = data
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                HostTensor::I32(
                    ArrayD::from_shape_vec(IxDyn(&shape), v)
                        .map_err(|e| malformed(origin, format!("tensor `{shown}`: {e}")))?,
                )
            }
            other => {
                let t = RawTensor::new(other, shape, data.to_vec())
                    .map_err(|e| malformed(origin, format!("tensor `{shown}`: {e}")))?;
                raw.insert(name, t);
                continue;
            }
        };
        tensors.insert(name, tensor);
    }
    Ok(StateDict {
        tensors,
        raw,
        metadata,
    })
}

/// Reads a safetensors file into a [`StateDict`]: only a regular file, of at most
/// [`MAX_INPUT_FILE_BYTES`](crate::limits::MAX_INPUT_FILE_BYTES) bytes
/// ([`read_input`]: [`Error::Io`], [`Error::NotRegularFile`], [`Error::TooLarge`]);
/// [`Error::MalformedStateDict`] when it is not safetensors.
pub fn load_state_dict(path: impl AsRef<Path>) -> Result<StateDict> {
    let path = path.as_ref();
    let bytes = read_input(path, None)?;
    parse_state_dict(&bytes, &path.display().to_string())
}

impl StateDict {
    /// Whether a tensor of any dtype has this name.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.raw.contains_key(name)
    }

    /// The dtype of the tensor `name`, if there is one.
    pub fn dtype(&self, name: &str) -> Option<Dtype> {
        match self.tensors.get(name) {
            Some(HostTensor::F32(_)) => Some(Dtype::F32),
            Some(HostTensor::I32(_)) => Some(Dtype::I32),
            None => self.raw.get(name).map(RawTensor::dtype),
        }
    }

    /// The shape of the tensor `name`, if there is one.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        match self.tensors.get(name) {
            Some(t) => Some(t.shape()),
            None => self.raw.get(name).map(RawTensor::shape),
        }
    }

    /// Every tensor name, of any dtype, in sorted order.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .tensors
            .keys()
            .chain(self.raw.keys())
            .map(String::as_str)
            .collect();
        names.sort_unstable();
        names
    }

    /// Removes the tensor `name` of any dtype; whether there was one.
    pub fn remove(&mut self, name: &str) -> bool {
        let a = self.tensors.remove(name).is_some();
        let b = self.raw.remove(name).is_some();
        a || b
    }

    fn wrong_dtype(&self, name: &str, expected: &str) -> Error {
        match self.dtype(name) {
            Some(d) => Error::DtypeMismatch {
                name: name.to_string(),
                got: dtype_name(d).to_string(),
                expected: expected.to_string(),
            },
            None => Error::MissingTensor {
                name: name.to_string(),
                context: String::new(),
            },
        }
    }

    /// An f32 tensor by name; [`Error::MissingTensor`] when absent, [`Error::DtypeMismatch`]
    /// when it has another dtype.
    pub fn f32(&self, name: &str) -> Result<&ArrayD<f32>> {
        match self.tensors.get(name) {
            Some(HostTensor::F32(a)) => Ok(a),
            _ => Err(self.wrong_dtype(name, "float32")),
        }
    }

    /// An optional f32 tensor (absent means `None` in PyTorch terms).
    pub fn f32_opt(&self, name: &str) -> Result<Option<&ArrayD<f32>>> {
        if self.contains(name) {
            self.f32(name).map(Some)
        } else {
            Ok(None)
        }
    }

    /// An i32 tensor by name; [`Error::MissingTensor`] when absent, [`Error::DtypeMismatch`]
    /// when it has another dtype.
    pub fn i32(&self, name: &str) -> Result<&ArrayD<i32>> {
        match self.tensors.get(name) {
            Some(HostTensor::I32(a)) => Ok(a),
            _ => Err(self.wrong_dtype(name, "int32")),
        }
    }

    /// Serializes to safetensors bytes: every tensor (f32, i32 and raw ones byte for byte),
    /// with the metadata. [`Error::InvalidArgument`] when a name is both in
    /// [`tensors`](Self::tensors) and in [`raw`](Self::raw).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        if let Some(dup) = self.raw.keys().find(|k| self.tensors.contains_key(*k)) {
            return Err(Error::invalid(format!(
                "tensor `{}` is both a host tensor and a raw tensor",
                escape(dup)
            )));
        }
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
                .map_err(|e| Error::invalid(format!("tensor `{}`: {e}", escape(name))))?;
            views.push((name.clone(), view));
        }
        for (name, t) in &self.raw {
            let view = safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.data)
                .map_err(|e| Error::invalid(format!("tensor `{}`: {e}", escape(name))))?;
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

    /// Writes to a safetensors file, all or nothing ([`write_output`]: a temporary beside it,
    /// renamed into place).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        write_output(path.as_ref(), &self.to_bytes()?, &[])
    }
}
