//! Loading an ONNX `ModelProto` into qfuse's graph IR ([`Graph`]): the ops convnets use, with
//! their attributes checked, and the initializers as tensors.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use ndarray::{ArrayD, IxDyn};
use prost::Message;

use super::proto;
use crate::error::{Error, Result};
use crate::io::file::read_input;
use crate::io::text::{escape, escape_path_str};
use crate::limits::{check_elements, MAX_CONV_SETTING};
use crate::ops::BatchNorm;

/// The oldest opset of the default ONNX domain qfuse imports.
pub const MIN_OPSET: i64 = 13;

/// The largest ONNX file qfuse reads: 2 GiB, protobuf's own limit for one message.
pub const MAX_ONNX_FILE_BYTES: u64 = 2 << 30;

/// What decoding an ONNX file may allocate beyond twice the file's size: 256 MiB. prost
/// allocates a whole struct for every message on the wire (an empty `NodeProto` is 2 bytes
/// in the file and a few hundred in memory), so [`OnnxModel::from_bytes`] first estimates
/// the decoded size from the wire bytes (one struct per message, the strings' lengths, each
/// packed scalar at its decoded size) and refuses a file whose estimate exceeds
/// `2 × file size + MAX_ONNX_DECODE_OVERHEAD`. A model's weights cost about their size; its
/// nodes, attributes and names need the overhead.
pub const MAX_ONNX_DECODE_OVERHEAD: u64 = 256 << 20;

/// The op types qfuse imports (besides `Constant`, whose tensor becomes an initializer).
pub const SUPPORTED_OPS: &[&str] = &[
    "Conv",
    "ConvTranspose",
    "BatchNormalization",
    "Relu",
    "Clip",
    "LeakyRelu",
    "HardSwish",
    "Gemm",
    "MatMul",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "Add",
    "Mul",
    "Flatten",
    "Reshape",
    "Concat",
    "Identity",
    "QuantizeLinear",
    "DequantizeLinear",
];

/// A constant tensor of the model: an initializer or a `Constant` node's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Tensor {
    /// `FLOAT` (ONNX data type 1).
    F32(ArrayD<f32>),
    /// `INT64` (ONNX data type 7): shapes of `Reshape`.
    I64(ArrayD<i64>),
    /// `INT8` (ONNX data type 3): quantized codes and zero points.
    I8(ArrayD<i8>),
    /// `UINT8` (ONNX data type 2): quantized codes and zero points (QDQ with uint8
    /// activations, onnxruntime's default).
    U8(ArrayD<u8>),
    /// `INT32` (ONNX data type 6): quantized biases.
    I32(ArrayD<i32>),
}

impl Tensor {
    /// The tensor's shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            Tensor::F32(a) => a.shape(),
            Tensor::I64(a) => a.shape(),
            Tensor::I8(a) => a.shape(),
            Tensor::U8(a) => a.shape(),
            Tensor::I32(a) => a.shape(),
        }
    }

    /// The float data, or `None` for an integer tensor.
    pub fn as_f32(&self) -> Option<&ArrayD<f32>> {
        match self {
            Tensor::F32(a) => Some(a),
            _ => None,
        }
    }

    /// ONNX's name of the element type (`float`, `int64`).
    pub fn dtype_name(&self) -> &'static str {
        match self {
            Tensor::F32(_) => "float",
            Tensor::I64(_) => "int64",
            Tensor::I8(_) => "int8",
            Tensor::U8(_) => "uint8",
            Tensor::I32(_) => "int32",
        }
    }

    /// The tensor as a `TensorProto` named `name` (little-endian `raw_data`).
    pub fn to_proto(&self, name: &str) -> proto::TensorProto {
        let (data_type, raw): (i32, Vec<u8>) = match self {
            Tensor::F32(a) => (
                proto::tensor_proto::DataType::Float as i32,
                a.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            Tensor::I64(a) => (
                proto::tensor_proto::DataType::Int64 as i32,
                a.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            Tensor::I8(a) => (
                proto::tensor_proto::DataType::Int8 as i32,
                a.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            Tensor::U8(a) => (
                proto::tensor_proto::DataType::Uint8 as i32,
                a.iter().copied().collect(),
            ),
            Tensor::I32(a) => (
                proto::tensor_proto::DataType::Int32 as i32,
                a.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
        };
        proto::TensorProto {
            dims: self.shape().iter().map(|&d| d as i64).collect(),
            data_type: Some(data_type),
            name: Some(name.to_string()),
            raw_data: Some(raw),
            ..Default::default()
        }
    }
}

/// The attributes of `Conv` and `ConvTranspose`, resolved to explicit values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvAttrs {
    /// `kernel_shape` when given (it must then equal the weight's spatial dims).
    pub kernel_shape: Option<Vec<usize>>,
    /// Strides per spatial dim (default 1).
    pub strides: Vec<usize>,
    /// Padding: the begin of every spatial dim, then the end of every spatial dim (ONNX's
    /// `pads`), zeros by default.
    pub pads: Vec<usize>,
    /// Dilations per spatial dim (default 1).
    pub dilations: Vec<usize>,
    /// Number of groups (default 1).
    pub group: usize,
    /// `ConvTranspose` only: extra output rows / columns at the end (default 0).
    pub output_padding: Vec<usize>,
}

/// The attributes of `MaxPool` and `AveragePool`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolAttrs {
    /// The window per spatial dim.
    pub kernel_shape: Vec<usize>,
    /// Strides per spatial dim (default 1).
    pub strides: Vec<usize>,
    /// Padding, begins then ends (default 0).
    pub pads: Vec<usize>,
    /// Dilations per spatial dim (`MaxPool`; default 1).
    pub dilations: Vec<usize>,
    /// Output sizes rounded up instead of down.
    pub ceil_mode: bool,
    /// `AveragePool`: padded zeros count in the average.
    pub count_include_pad: bool,
}

/// A node's operator with its attributes.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// `Conv` (inputs X, W, optional B).
    Conv(ConvAttrs),
    /// `ConvTranspose` (inputs X, W `[Cin, Cout/group, k...]`, optional B).
    ConvTranspose(ConvAttrs),
    /// `BatchNormalization` in inference mode (inputs X, scale, B, mean, var).
    BatchNormalization {
        /// ε added to the variance (default 1e-5).
        epsilon: f32,
    },
    /// `Relu`.
    Relu,
    /// `Clip` (inputs X, optional min, optional max).
    Clip,
    /// `LeakyRelu`.
    LeakyRelu {
        /// The slope below zero (default 0.01).
        alpha: f32,
    },
    /// `HardSwish`.
    HardSwish,
    /// `Gemm`: `alpha · A' · B' + beta · C`.
    Gemm {
        /// Scale of the product (default 1).
        alpha: f32,
        /// Scale of C (default 1).
        beta: f32,
        /// A is transposed.
        trans_a: bool,
        /// B is transposed (`[out, in]`, as a PyTorch Linear weight).
        trans_b: bool,
    },
    /// `MatMul`.
    MatMul,
    /// `MaxPool`.
    MaxPool(PoolAttrs),
    /// `AveragePool`.
    AveragePool(PoolAttrs),
    /// `GlobalAveragePool`.
    GlobalAveragePool,
    /// `Add` (multidirectional broadcasting).
    Add,
    /// `Mul` (multidirectional broadcasting).
    Mul,
    /// `Flatten`.
    Flatten {
        /// The first dim of the second output dim (default 1; negative counts from the end).
        axis: i64,
    },
    /// `Reshape` (inputs data, shape).
    Reshape {
        /// A 0 in the shape is a zero-sized dim rather than "copy the input's dim".
        allow_zero: bool,
    },
    /// `Concat`.
    Concat {
        /// The axis (negative counts from the end).
        axis: i64,
    },
    /// `Identity`.
    Identity,
    /// `QuantizeLinear` (inputs x, y_scale, optional y_zero_point, int8): per tensor, or per
    /// channel along `axis` with 1-D scales.
    QuantizeLinear {
        /// The channel axis of 1-D scales (default 1; negative counts from the end).
        axis: i64,
    },
    /// `DequantizeLinear` (inputs x (int8 or int32), x_scale, optional x_zero_point).
    DequantizeLinear {
        /// The channel axis of 1-D scales (default 1).
        axis: i64,
    },
}

impl Op {
    /// ONNX's op type name.
    pub fn op_type(&self) -> &'static str {
        match self {
            Op::Conv(_) => "Conv",
            Op::ConvTranspose(_) => "ConvTranspose",
            Op::BatchNormalization { .. } => "BatchNormalization",
            Op::Relu => "Relu",
            Op::Clip => "Clip",
            Op::LeakyRelu { .. } => "LeakyRelu",
            Op::HardSwish => "HardSwish",
            Op::Gemm { .. } => "Gemm",
            Op::MatMul => "MatMul",
            Op::MaxPool(_) => "MaxPool",
            Op::AveragePool(_) => "AveragePool",
            Op::GlobalAveragePool => "GlobalAveragePool",
            Op::Add => "Add",
            Op::Mul => "Mul",
            Op::Flatten { .. } => "Flatten",
            Op::Reshape { .. } => "Reshape",
            Op::Concat { .. } => "Concat",
            Op::Identity => "Identity",
            Op::QuantizeLinear { .. } => "QuantizeLinear",
            Op::DequantizeLinear { .. } => "DequantizeLinear",
        }
    }
}

/// One node of the graph.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// The node's name as in the file (may be empty).
    pub name: String,
    /// The operator.
    pub op: Op,
    /// Input value names (`""` for an absent optional input).
    pub inputs: Vec<String>,
    /// Output value names.
    pub outputs: Vec<String>,
}

impl Node {
    /// The input at `i`, `None` when absent or empty.
    pub fn input(&self, i: usize) -> Option<&str> {
        self.inputs
            .get(i)
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }

    /// The [`BatchNorm`] a BatchNormalization node computes — inference mode: γ, β, the
    /// running mean and variance from inputs 1 to 4, the node's epsilon — with each
    /// per-channel vector read by `param(input index, what it is)` (a host array from a
    /// constant, a value computed by the evaluator, a backend's tensor). The one conversion
    /// the evaluator, the fold and the deployment graph share. Errors: `param`'s; another op.
    pub(crate) fn batch_norm<T>(
        &self,
        mut param: impl FnMut(usize, &'static str) -> Result<T>,
    ) -> Result<BatchNorm<T>> {
        let Op::BatchNormalization { epsilon } = self.op else {
            return Err(Error::invalid(format!(
                "internal: a {} node is no BatchNorm",
                self.op.op_type()
            )));
        };
        Ok(BatchNorm {
            weight: Some(param(1, "scale")?),
            bias: Some(param(2, "B")?),
            running_mean: param(3, "mean")?,
            running_var: param(4, "var")?,
            eps: epsilon,
            momentum: 0.1,
        })
    }
}

/// A graph input that is not an initializer.
#[derive(Debug, Clone, PartialEq)]
pub struct ValueInfo {
    /// Its name.
    pub name: String,
    /// Its shape, `None` for a symbolic or unknown dim; empty when the file gives none.
    pub shape: Vec<Option<usize>>,
}

/// qfuse's view of an ONNX graph: nodes in topological order, the inputs to feed, the outputs,
/// and the constant tensors (initializers and `Constant` nodes).
#[derive(Debug, Clone, PartialEq)]
pub struct Graph {
    /// The nodes, each after the nodes producing its inputs (`Constant` nodes, and Identity
    /// nodes of constants, removed: their outputs are initializers).
    pub nodes: Vec<Node>,
    /// The inputs to feed (graph inputs that no initializer provides).
    pub inputs: Vec<ValueInfo>,
    /// The output names.
    pub outputs: Vec<String>,
    /// Constant tensors by name (the file's initializers, `Constant` values, and the
    /// outputs of Identity nodes of constants).
    pub initializers: BTreeMap<String, Tensor>,
}

impl Graph {
    /// A node's name for messages: its name, or `#INDEX` when it has none.
    pub fn node_label(&self, index: usize) -> String {
        node_label(self.nodes.get(index).map_or("", |n| n.name.as_str()), index)
    }

    /// The float initializer `name`.
    pub fn f32_initializer(&self, name: &str) -> Option<&ArrayD<f32>> {
        self.initializers.get(name).and_then(Tensor::as_f32)
    }

    /// How many node inputs and graph outputs read each value.
    pub fn use_counts(&self) -> HashMap<&str, usize> {
        let mut uses: HashMap<&str, usize> = HashMap::new();
        for n in &self.nodes {
            for i in n.inputs.iter().filter(|i| !i.is_empty()) {
                *uses.entry(i.as_str()).or_default() += 1;
            }
        }
        for o in &self.outputs {
            *uses.entry(o.as_str()).or_default() += 1;
        }
        uses
    }
}

fn node_label(name: &str, index: usize) -> String {
    if name.is_empty() {
        format!("#{index}")
    } else {
        name.to_string()
    }
}

/// An ONNX model: the protobuf message as read (kept for writing a modified model back) and
/// the graph qfuse imported from it.
#[derive(Debug, Clone)]
pub struct OnnxModel {
    /// The model as decoded.
    pub proto: proto::ModelProto,
    /// The imported graph.
    pub graph: Graph,
    /// The opset version of the default domain.
    pub opset: i64,
}

impl OnnxModel {
    /// Reads the ONNX model `path` (a regular file of at most [`MAX_ONNX_FILE_BYTES`]) and
    /// imports its graph.
    ///
    /// Errors: those of [`read_input`]; [`Error::MalformedOnnx`] for bytes that are no
    /// `ModelProto` or a graph qfuse cannot read; [`Error::UnsupportedOnnxOp`] naming the
    /// first node with an operator (or attribute) qfuse does not import;
    /// [`Error::TooLarge`] for a tensor beyond [`crate::limits::MAX_TENSOR_ELEMENTS`].
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = read_input(path, Some(MAX_ONNX_FILE_BYTES))?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }

    /// [`OnnxModel::load`] on bytes; `source` names them in errors. Before decoding, the
    /// memory decoding would take is estimated from the wire bytes and bounded by
    /// [`MAX_ONNX_DECODE_OVERHEAD`] ([`Error::TooLarge`]).
    pub fn from_bytes(bytes: &[u8], source: &str) -> Result<Self> {
        let need = super::budget::decoded_size(bytes).map_err(|reason| Error::MalformedOnnx {
            path: source.to_string(),
            reason: format!("not a protobuf ModelProto ({reason})"),
        })?;
        let limit = (bytes.len() as u64)
            .saturating_mul(2)
            .saturating_add(MAX_ONNX_DECODE_OVERHEAD);
        if need > limit {
            return Err(Error::TooLarge {
                what: format!(
                    "decoding ONNX model {} (estimated from its {} bytes)",
                    escape_path_str(source),
                    bytes.len()
                ),
                size: need,
                limit,
                unit: "bytes",
            });
        }
        let proto = proto::ModelProto::decode(bytes).map_err(|e| Error::MalformedOnnx {
            path: source.to_string(),
            reason: format!("not a protobuf ModelProto ({e})"),
        })?;
        Self::from_proto(proto, source)
    }

    /// Imports the graph of a decoded model.
    pub fn from_proto(proto: proto::ModelProto, source: &str) -> Result<Self> {
        let bad = |reason: String| Error::MalformedOnnx {
            path: source.to_string(),
            reason,
        };
        let opset = default_opset(&proto).map_err(&bad)?;
        let g = proto
            .graph
            .as_ref()
            .ok_or_else(|| bad("the model has no graph".into()))?;
        let graph = import_graph(g, source)?;
        Ok(Self {
            proto,
            graph,
            opset,
        })
    }

    /// The model as protobuf bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.proto.encode_to_vec()
    }

    /// Writes the model to `output` through [`crate::io::file::Outputs`]: a temporary file
    /// beside it, renamed into place once complete; refused when `output` is one of `inputs`
    /// (the same path, a symbolic or a hard link).
    pub fn write(&self, output: &Path, inputs: &[&Path]) -> Result<()> {
        let mut outputs = crate::io::file::Outputs::new(inputs);
        outputs.stage(output, &self.to_bytes())?;
        outputs.commit()
    }
}

fn default_opset(model: &proto::ModelProto) -> std::result::Result<i64, String> {
    let v = model
        .opset_import
        .iter()
        .find(|o| matches!(o.domain.as_deref(), None | Some("") | Some("ai.onnx")))
        .map(|o| o.version.unwrap_or(0))
        .ok_or_else(|| "no opset_import for the default domain".to_string())?;
    if v < MIN_OPSET {
        return Err(format!(
            "opset {v} of the default domain; qfuse imports opset {MIN_OPSET} and later \
             (convert the model with onnx.version_converter)"
        ));
    }
    Ok(v)
}

/// A tensor from a `TensorProto`: float or int64, dims checked, data from `raw_data`
/// (little-endian) or the typed field, never external.
pub fn tensor_from_proto(t: &proto::TensorProto) -> std::result::Result<Tensor, Error> {
    let name = t.name.as_deref().unwrap_or("");
    let what = || format!("tensor `{}`", escape(name));
    let malformed = |reason: String| Error::invalid(format!("{}: {reason}", what()));
    if t.data_location == Some(proto::tensor_proto::DataLocation::External as i32)
        || !t.external_data.is_empty()
    {
        return Err(malformed(
            "its data is stored outside the model (external data is not supported)".into(),
        ));
    }
    if t.segment.is_some() {
        return Err(malformed("segmented tensors are not supported".into()));
    }
    let mut shape = Vec::with_capacity(t.dims.len().min(64));
    for &d in &t.dims {
        let d = usize::try_from(d).map_err(|_| malformed(format!("negative dim {d}")))?;
        shape.push(d);
    }
    let n = check_elements(&what(), &shape)?;
    let raw = t.raw_data.as_deref();
    let dtype = t.data_type.unwrap_or(0);
    if dtype == proto::tensor_proto::DataType::Float as i32 {
        let data: Vec<f32> = match raw {
            Some(raw) => {
                check_raw_len(raw, n, 4).map_err(malformed)?;
                raw.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            }
            None => {
                if t.float_data.len() != n {
                    return Err(malformed(format!(
                        "float_data has {} values for {n} elements",
                        t.float_data.len()
                    )));
                }
                t.float_data.clone()
            }
        };
        let a = ArrayD::from_shape_vec(IxDyn(&shape), data)
            .map_err(|e| malformed(format!("internal: {e}")))?;
        Ok(Tensor::F32(a))
    } else if dtype == proto::tensor_proto::DataType::Int64 as i32 {
        let data: Vec<i64> = match raw {
            Some(raw) => {
                check_raw_len(raw, n, 8).map_err(malformed)?;
                raw.chunks_exact(8)
                    .map(|c| {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(c);
                        i64::from_le_bytes(b)
                    })
                    .collect()
            }
            None => {
                if t.int64_data.len() != n {
                    return Err(malformed(format!(
                        "int64_data has {} values for {n} elements",
                        t.int64_data.len()
                    )));
                }
                t.int64_data.clone()
            }
        };
        let a = ArrayD::from_shape_vec(IxDyn(&shape), data)
            .map_err(|e| malformed(format!("internal: {e}")))?;
        Ok(Tensor::I64(a))
    } else if dtype == proto::tensor_proto::DataType::Int8 as i32
        || dtype == proto::tensor_proto::DataType::Uint8 as i32
        || dtype == proto::tensor_proto::DataType::Int32 as i32
    {
        let uint8 = dtype == proto::tensor_proto::DataType::Uint8 as i32;
        let int8 = dtype == proto::tensor_proto::DataType::Int8 as i32;
        let size = if int8 || uint8 { 1 } else { 4 };
        // All three are stored one element per int32_data entry when not raw.
        let data: Vec<i32> = match raw {
            Some(raw) => {
                check_raw_len(raw, n, size).map_err(malformed)?;
                if int8 {
                    raw.iter().map(|&b| i32::from(b as i8)).collect()
                } else if uint8 {
                    raw.iter().map(|&b| i32::from(b)).collect()
                } else {
                    raw.chunks_exact(4)
                        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect()
                }
            }
            None => {
                if t.int32_data.len() != n {
                    return Err(malformed(format!(
                        "int32_data has {} values for {n} elements",
                        t.int32_data.len()
                    )));
                }
                t.int32_data.clone()
            }
        };
        if uint8 {
            let codes = data
                .iter()
                .map(|&v| u8::try_from(v).map_err(|_| malformed(format!("uint8 value {v}"))))
                .collect::<Result<Vec<u8>>>()?;
            let a = ArrayD::from_shape_vec(IxDyn(&shape), codes)
                .map_err(|e| malformed(format!("internal: {e}")))?;
            Ok(Tensor::U8(a))
        } else if int8 {
            let codes = data
                .iter()
                .map(|&v| i8::try_from(v).map_err(|_| malformed(format!("int8 value {v}"))))
                .collect::<Result<Vec<i8>>>()?;
            let a = ArrayD::from_shape_vec(IxDyn(&shape), codes)
                .map_err(|e| malformed(format!("internal: {e}")))?;
            Ok(Tensor::I8(a))
        } else {
            let a = ArrayD::from_shape_vec(IxDyn(&shape), data)
                .map_err(|e| malformed(format!("internal: {e}")))?;
            Ok(Tensor::I32(a))
        }
    } else {
        let dt = proto::tensor_proto::DataType::try_from(dtype)
            .map(|d| d.as_str_name().to_string())
            .unwrap_or_else(|_| format!("data type {dtype}"));
        Err(malformed(format!(
            "element type {dt} is not supported (FLOAT, INT64, INT8, UINT8 and INT32 are)"
        )))
    }
}

fn check_raw_len(raw: &[u8], n: usize, size: usize) -> std::result::Result<(), String> {
    match n.checked_mul(size) {
        Some(b) if b == raw.len() => Ok(()),
        _ => Err(format!(
            "raw_data has {} bytes for {n} elements of {size} bytes",
            raw.len()
        )),
    }
}

/// The attributes of one node, by name.
struct Attrs<'a> {
    node: &'a str,
    op_type: &'a str,
    map: HashMap<&'a str, &'a proto::AttributeProto>,
}

impl<'a> Attrs<'a> {
    fn unsupported(&self, reason: String) -> Error {
        Error::UnsupportedOnnxOp {
            node: self.node.to_string(),
            op_type: self.op_type.to_string(),
            reason,
        }
    }

    fn int(&self, name: &str, default: i64) -> Result<i64> {
        match self.map.get(name) {
            None => Ok(default),
            Some(a) => {
                a.i.ok_or_else(|| self.unsupported(format!("attribute {name} is not an integer")))
            }
        }
    }

    fn float(&self, name: &str, default: f32) -> Result<f32> {
        match self.map.get(name) {
            None => Ok(default),
            Some(a) => match a.f {
                Some(v) if v.is_finite() => Ok(v),
                Some(v) => Err(self.unsupported(format!("attribute {name} = {v} is not finite"))),
                None => Err(self.unsupported(format!("attribute {name} is not a float"))),
            },
        }
    }

    fn string(&self, name: &str) -> Result<Option<String>> {
        match self.map.get(name) {
            None => Ok(None),
            Some(a) => match &a.s {
                Some(s) => Ok(Some(String::from_utf8_lossy(s).into_owned())),
                None => Err(self.unsupported(format!("attribute {name} is not a string"))),
            },
        }
    }

    /// A list of non-negative settings, each at most [`MAX_CONV_SETTING`].
    fn sizes(&self, name: &str) -> Result<Option<Vec<usize>>> {
        let Some(a) = self.map.get(name) else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(a.ints.len().min(16));
        for &v in &a.ints {
            match usize::try_from(v) {
                Ok(u) if u <= MAX_CONV_SETTING => out.push(u),
                _ => {
                    return Err(self.unsupported(format!(
                        "attribute {name} has {v}, outside [0, {MAX_CONV_SETTING}]"
                    )))
                }
            }
        }
        Ok(Some(out))
    }

    fn bool(&self, name: &str) -> Result<bool> {
        match self.int(name, 0)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(self.unsupported(format!("attribute {name} = {v} is not 0 or 1"))),
        }
    }

    /// Refuses the attributes qfuse does not know for this op.
    fn only(&self, known: &[&str]) -> Result<()> {
        for k in self.map.keys() {
            if !known.contains(k) {
                return Err(self.unsupported(format!("attribute `{}` is not supported", escape(k))));
            }
        }
        Ok(())
    }

    fn auto_pad_explicit(&self) -> Result<()> {
        match self.string("auto_pad")?.as_deref() {
            None | Some("NOTSET") | Some("VALID") => Ok(()),
            Some(other) => Err(self.unsupported(format!(
                "auto_pad `{}` is not supported (NOTSET with explicit pads, and VALID, are)",
                escape(other)
            ))),
        }
    }
}

fn spatial_list(
    attrs: &Attrs<'_>,
    name: &str,
    value: Option<Vec<usize>>,
    len: usize,
    default: usize,
    positive: bool,
) -> Result<Vec<usize>> {
    let v = value.unwrap_or_else(|| vec![default; len]);
    if v.len() != len {
        return Err(attrs.unsupported(format!(
            "attribute {name} has {} values, expected {len}",
            v.len()
        )));
    }
    if positive && v.contains(&0) {
        return Err(attrs.unsupported(format!("attribute {name} has a zero")));
    }
    Ok(v)
}

fn conv_attrs(attrs: &Attrs<'_>, transpose: bool) -> Result<ConvAttrs> {
    let mut known = vec![
        "auto_pad",
        "dilations",
        "group",
        "kernel_shape",
        "pads",
        "strides",
    ];
    if transpose {
        known.push("output_padding");
    }
    attrs.only(&known)?;
    attrs.auto_pad_explicit()?;
    let kernel_shape = attrs.sizes("kernel_shape")?;
    let strides = attrs.sizes("strides")?;
    let dilations = attrs.sizes("dilations")?;
    let pads = attrs.sizes("pads")?;
    let output_padding = attrs.sizes("output_padding")?;
    // The spatial rank: from any list given, else from the weight at evaluation (1 or 2 here
    // is resolved lazily: an empty list means "defaults").
    let rank = kernel_shape
        .as_ref()
        .map(Vec::len)
        .or(strides.as_ref().map(Vec::len))
        .or(dilations.as_ref().map(Vec::len))
        .or(pads.as_ref().map(|p| p.len() / 2))
        .or(output_padding.as_ref().map(Vec::len))
        .unwrap_or(0);
    if rank == 0 && kernel_shape.is_some() {
        return Err(attrs.unsupported("kernel_shape is empty".into()));
    }
    let group = attrs.int("group", 1)?;
    let group = usize::try_from(group)
        .ok()
        .filter(|g| (1..=MAX_CONV_SETTING).contains(g))
        .ok_or_else(|| attrs.unsupported(format!("group {group} is not a positive count")))?;
    Ok(ConvAttrs {
        kernel_shape,
        strides: spatial_list(attrs, "strides", strides, rank, 1, true)?,
        pads: spatial_list(attrs, "pads", pads, 2 * rank, 0, false)?,
        dilations: spatial_list(attrs, "dilations", dilations, rank, 1, true)?,
        group,
        output_padding: spatial_list(attrs, "output_padding", output_padding, rank, 0, false)?,
    })
}

fn pool_attrs(attrs: &Attrs<'_>, max: bool) -> Result<PoolAttrs> {
    let mut known = vec!["auto_pad", "ceil_mode", "kernel_shape", "pads", "strides"];
    if max {
        known.extend(["dilations", "storage_order"]);
    } else {
        known.push("count_include_pad");
    }
    attrs.only(&known)?;
    attrs.auto_pad_explicit()?;
    if attrs.int("storage_order", 0)? != 0 {
        return Err(attrs.unsupported("storage_order 1 is not supported".into()));
    }
    let kernel_shape = attrs
        .sizes("kernel_shape")?
        .filter(|k| !k.is_empty())
        .ok_or_else(|| attrs.unsupported("kernel_shape is required".into()))?;
    if kernel_shape.contains(&0) {
        return Err(attrs.unsupported("kernel_shape has a zero".into()));
    }
    let rank = kernel_shape.len();
    let strides = attrs.sizes("strides")?;
    let pads = attrs.sizes("pads")?;
    let dilations = attrs.sizes("dilations")?;
    Ok(PoolAttrs {
        strides: spatial_list(attrs, "strides", strides, rank, 1, true)?,
        pads: spatial_list(attrs, "pads", pads, 2 * rank, 0, false)?,
        dilations: spatial_list(attrs, "dilations", dilations, rank, 1, true)?,
        kernel_shape,
        ceil_mode: attrs.bool("ceil_mode")?,
        count_include_pad: attrs.bool("count_include_pad")?,
    })
}

/// How many inputs (min, max) and outputs each op takes.
fn arity(op: &Op) -> (usize, usize, usize) {
    match op {
        Op::Conv(_) | Op::ConvTranspose(_) => (2, 3, 1),
        Op::BatchNormalization { .. } => (5, 5, 1),
        Op::Clip | Op::QuantizeLinear { .. } | Op::DequantizeLinear { .. } => (1, 3, 1),
        Op::Gemm { .. } => (2, 3, 1),
        Op::MatMul | Op::Add | Op::Mul | Op::Reshape { .. } => (2, 2, 1),
        Op::Concat { .. } => (1, usize::MAX, 1),
        _ => (1, 1, 1),
    }
}

fn parse_op(n: &proto::NodeProto, label: &str) -> Result<Op> {
    let op_type = n.op_type.as_deref().unwrap_or("");
    let domain = n.domain.as_deref().unwrap_or("");
    let shown_type = if domain.is_empty() || domain == "ai.onnx" {
        op_type.to_string()
    } else {
        format!("{domain}::{op_type}")
    };
    let mut map = HashMap::new();
    for a in &n.attribute {
        let name = a.name.as_deref().unwrap_or("");
        if map.insert(name, a).is_some() {
            return Err(Error::UnsupportedOnnxOp {
                node: label.to_string(),
                op_type: shown_type,
                reason: format!("attribute `{}` is given twice", escape(name)),
            });
        }
    }
    let attrs = Attrs {
        node: label,
        op_type: &shown_type,
        map,
    };
    if shown_type != op_type || !SUPPORTED_OPS.contains(&op_type) {
        return Err(attrs.unsupported(format!(
            "qfuse imports {} and Constant (opset {MIN_OPSET} and later)",
            SUPPORTED_OPS.join(", ")
        )));
    }
    let op = match op_type {
        "Conv" => Op::Conv(conv_attrs(&attrs, false)?),
        "ConvTranspose" => {
            if attrs.map.contains_key("output_shape") {
                return Err(attrs.unsupported(
                    "attribute output_shape is not supported (give pads and output_padding)".into(),
                ));
            }
            Op::ConvTranspose(conv_attrs(&attrs, true)?)
        }
        "BatchNormalization" => {
            attrs.only(&["epsilon", "momentum", "training_mode", "spatial"])?;
            if attrs.int("training_mode", 0)? != 0 {
                return Err(attrs.unsupported(
                    "training_mode 1 is not supported (export the model in eval mode)".into(),
                ));
            }
            if attrs.int("spatial", 1)? != 1 {
                return Err(attrs.unsupported("spatial 0 is not supported".into()));
            }
            let epsilon = attrs.float("epsilon", 1e-5)?;
            if epsilon < 0.0 {
                return Err(attrs.unsupported(format!("epsilon {epsilon} is negative")));
            }
            attrs.float("momentum", 0.9)?;
            Op::BatchNormalization { epsilon }
        }
        "Relu" => {
            attrs.only(&[])?;
            Op::Relu
        }
        "Clip" => {
            attrs.only(&[])?;
            Op::Clip
        }
        "LeakyRelu" => {
            attrs.only(&["alpha"])?;
            Op::LeakyRelu {
                alpha: attrs.float("alpha", 0.01)?,
            }
        }
        "HardSwish" => {
            attrs.only(&[])?;
            Op::HardSwish
        }
        "Gemm" => {
            attrs.only(&["alpha", "beta", "transA", "transB"])?;
            Op::Gemm {
                alpha: attrs.float("alpha", 1.0)?,
                beta: attrs.float("beta", 1.0)?,
                trans_a: attrs.bool("transA")?,
                trans_b: attrs.bool("transB")?,
            }
        }
        "MatMul" => {
            attrs.only(&[])?;
            Op::MatMul
        }
        "MaxPool" => Op::MaxPool(pool_attrs(&attrs, true)?),
        "AveragePool" => Op::AveragePool(pool_attrs(&attrs, false)?),
        "GlobalAveragePool" => {
            attrs.only(&[])?;
            Op::GlobalAveragePool
        }
        "Add" => {
            attrs.only(&[])?;
            Op::Add
        }
        "Mul" => {
            attrs.only(&[])?;
            Op::Mul
        }
        "Flatten" => {
            attrs.only(&["axis"])?;
            Op::Flatten {
                axis: attrs.int("axis", 1)?,
            }
        }
        "Reshape" => {
            attrs.only(&["allowzero"])?;
            Op::Reshape {
                allow_zero: attrs.bool("allowzero")?,
            }
        }
        "Concat" => {
            attrs.only(&["axis"])?;
            let axis = attrs
                .map
                .get("axis")
                .and_then(|a| a.i)
                .ok_or_else(|| attrs.unsupported("attribute axis is required".into()))?;
            Op::Concat { axis }
        }
        "Identity" => {
            attrs.only(&[])?;
            Op::Identity
        }
        "QuantizeLinear" | "DequantizeLinear" => {
            attrs.only(&["axis", "saturate"])?;
            if attrs.int("saturate", 1)? != 1 {
                return Err(attrs.unsupported("saturate 0 is not supported".into()));
            }
            let axis = attrs.int("axis", 1)?;
            if op_type == "QuantizeLinear" {
                Op::QuantizeLinear { axis }
            } else {
                Op::DequantizeLinear { axis }
            }
        }
        _ => return Err(attrs.unsupported("internal: op listed but not parsed".into())),
    };
    let (min_in, max_in, outs) = arity(&op);
    if n.input.len() < min_in || n.input.len() > max_in {
        return Err(attrs.unsupported(format!(
            "{} inputs, expected {}",
            n.input.len(),
            if min_in == max_in {
                format!("{min_in}")
            } else if max_in == usize::MAX {
                format!("at least {min_in}")
            } else {
                format!("{min_in} to {max_in}")
            }
        )));
    }
    if n.output.len() != outs {
        return Err(attrs.unsupported(format!(
            "{} outputs, expected {outs} (optional outputs are not supported)",
            n.output.len()
        )));
    }
    Ok(op)
}

fn shape_of(v: &proto::ValueInfoProto) -> Vec<Option<usize>> {
    let Some(proto::type_proto::Value::TensorType(t)) =
        v.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return Vec::new();
    };
    let Some(shape) = &t.shape else {
        return Vec::new();
    };
    shape
        .dim
        .iter()
        .map(|d| match d.value {
            Some(proto::tensor_shape_proto::dimension::Value::DimValue(v)) => {
                usize::try_from(v).ok()
            }
            _ => None,
        })
        .collect()
}

fn import_graph(g: &proto::GraphProto, source: &str) -> Result<Graph> {
    let bad = |reason: String| Error::MalformedOnnx {
        path: source.to_string(),
        reason,
    };
    if !g.sparse_initializer.is_empty() {
        return Err(bad("sparse initializers are not supported".into()));
    }
    let mut initializers = BTreeMap::new();
    for t in &g.initializer {
        let name = t.name.clone().unwrap_or_default();
        if name.is_empty() {
            return Err(bad("an initializer has no name".into()));
        }
        let tensor = tensor_from_proto(t).map_err(|e| match e {
            Error::InvalidArgument(m) => bad(m),
            other => other,
        })?;
        if initializers.insert(name.clone(), tensor).is_some() {
            return Err(bad(format!(
                "initializer `{}` is given twice",
                escape(&name)
            )));
        }
    }
    // Every value defined once: graph inputs, initializers, node outputs.
    let mut defined: HashSet<String> = initializers.keys().cloned().collect();
    let mut inputs = Vec::new();
    for v in &g.input {
        let name = v.name.clone().unwrap_or_default();
        if name.is_empty() {
            return Err(bad("a graph input has no name".into()));
        }
        if initializers.contains_key(&name) {
            continue; // IR < 4 lists initializers among the inputs.
        }
        if !defined.insert(name.clone()) {
            return Err(bad(format!(
                "graph input `{}` is given twice",
                escape(&name)
            )));
        }
        inputs.push(ValueInfo {
            shape: shape_of(v),
            name,
        });
    }
    let mut nodes = Vec::with_capacity(g.node.len().min(1 << 16));
    for (index, n) in g.node.iter().enumerate() {
        let label = node_label(n.name.as_deref().unwrap_or(""), index);
        for i in n.input.iter().filter(|i| !i.is_empty()) {
            if !defined.contains(i) {
                return Err(bad(format!(
                    "node `{}` reads `{}`, which no graph input, initializer or earlier node \
                     defines (nodes must be in topological order)",
                    escape(&label),
                    escape(i)
                )));
            }
        }
        let is_constant = n.op_type.as_deref() == Some("Constant")
            && matches!(n.domain.as_deref(), None | Some("") | Some("ai.onnx"));
        for o in &n.output {
            if o.is_empty() {
                return Err(bad(format!(
                    "node `{}` has an output without a name",
                    escape(&label)
                )));
            }
            if !defined.insert(o.clone()) {
                return Err(bad(format!(
                    "value `{}` is defined twice (node `{}`)",
                    escape(o),
                    escape(&label)
                )));
            }
        }
        if is_constant {
            let unsupported = |reason: &str| Error::UnsupportedOnnxOp {
                node: label.clone(),
                op_type: "Constant".into(),
                reason: reason.to_string(),
            };
            let [a] = n.attribute.as_slice() else {
                return Err(unsupported("a Constant needs exactly one attribute, value"));
            };
            let (Some("value"), Some(t), [out]) =
                (a.name.as_deref(), a.t.as_ref(), n.output.as_slice())
            else {
                return Err(unsupported(
                    "only a Constant with a `value` tensor and one output is supported",
                ));
            };
            if !n.input.is_empty() {
                return Err(unsupported("a Constant takes no inputs"));
            }
            let tensor = tensor_from_proto(t).map_err(|e| match e {
                Error::InvalidArgument(m) => bad(m),
                other => other,
            })?;
            initializers.insert(out.clone(), tensor);
            continue;
        }
        let op = parse_op(n, &label)?;
        // Identity of a constant is that constant: torch.onnx.export shares equal tensors
        // (a fresh model's BatchNorm statistics) through Identity nodes, so its output joins
        // the initializers and the node goes, as a Constant's does; find_fusable and the
        // evaluators then see every BatchNorm's statistics as constants.
        if let (Op::Identity, [src], [out]) = (&op, n.input.as_slice(), n.output.as_slice()) {
            if let Some(t) = initializers.get(src).cloned() {
                initializers.insert(out.clone(), t);
                continue;
            }
        }
        nodes.push(Node {
            name: n.name.clone().unwrap_or_default(),
            op,
            inputs: n.input.clone(),
            outputs: n.output.clone(),
        });
    }
    let mut outputs = Vec::with_capacity(g.output.len().min(1 << 16));
    for v in &g.output {
        let name = v.name.clone().unwrap_or_default();
        if !defined.contains(&name) {
            return Err(bad(format!(
                "graph output `{}` is not defined by any node, input or initializer",
                escape(&name)
            )));
        }
        outputs.push(name);
    }
    if outputs.is_empty() {
        return Err(bad("the graph has no outputs".into()));
    }
    Ok(Graph {
        nodes,
        inputs,
        outputs,
        initializers,
    })
}
