//! The one error type of qfuse. Every fallible public function returns [`Result`].

use thiserror::Error;

use crate::io::text::{escape, escape_path_str};

/// Everything that can go wrong in qfuse, as a typed value (no panics across the public API).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// Two tensors (or a tensor and what an operation expects) disagree in shape.
    #[error("shape mismatch in {context}: expected {expected:?}, got {got:?}")]
    ShapeMismatch {
        /// Where the mismatch was found (operation and argument).
        context: String,
        /// The shape that was expected.
        expected: Vec<usize>,
        /// The shape that was given.
        got: Vec<usize>,
    },
    /// A quantization scale that is zero, negative, NaN or infinite.
    #[error("scale must be positive and finite, got {scale} (channel {channel})")]
    InvalidScale {
        /// The offending scale.
        scale: f32,
        /// Its channel (0 for per-tensor).
        channel: usize,
    },
    /// `quant_min > quant_max`.
    #[error("quant_min ({quant_min}) must not be greater than quant_max ({quant_max})")]
    InvalidQuantRange {
        /// Lower end of the integer range.
        quant_min: i32,
        /// Upper end of the integer range.
        quant_max: i32,
    },
    /// A zero point outside `[quant_min, quant_max]`.
    #[error("zero_point {zero_point} (channel {channel}) is outside [quant_min, quant_max] = [{quant_min}, {quant_max}]")]
    ZeroPointOutOfRange {
        /// The offending zero point.
        zero_point: i32,
        /// Its channel (0 for per-tensor).
        channel: usize,
        /// Lower end of the integer range.
        quant_min: i32,
        /// Upper end of the integer range.
        quant_max: i32,
    },
    /// A channel axis that the tensor does not have.
    #[error("axis {axis} is out of range for a tensor of rank {rank}")]
    AxisOutOfRange {
        /// The axis asked for (negative counts from the end, as in PyTorch).
        axis: isize,
        /// The tensor's rank.
        rank: usize,
    },
    /// The channel counts of a conv (or linear) and its BatchNorm disagree.
    #[error("channel mismatch: {layer} has {layer_channels} output channels but BatchNorm has {bn_channels}")]
    ChannelMismatch {
        /// What the layer is (conv2d, linear, ...).
        layer: String,
        /// The layer's output channels.
        layer_channels: usize,
        /// BatchNorm's `num_features`.
        bn_channels: usize,
    },
    /// A tensor an operation or a case needs is absent.
    #[error("missing tensor `{}`{context}", escape(.name))]
    MissingTensor {
        /// The tensor's name.
        name: String,
        /// Optional context, already formatted (" in FILE").
        context: String,
    },
    /// A conformance case or state-dict file that cannot be read as what it claims to be.
    #[error("malformed case {}: {reason}", escape_path_str(.path))]
    MalformedCase {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A conformance case names an operation qfuse does not know.
    #[error("unknown op `{}` in {}", escape(.op), escape_path_str(.path))]
    UnknownOp {
        /// The op name from the file's metadata.
        op: String,
        /// The file.
        path: String,
    },
    /// An argument with a value outside what the operation accepts (bad stride, groups, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No GPU adapter could be found or opened.
    #[error("no GPU adapter available: {0}")]
    NoAdapter(String),
    /// A GPU error reported by wgpu (validation, out of memory, device lost, map failure).
    #[error("GPU error: {0}")]
    Gpu(String),
    /// A buffer larger than the device allows.
    #[error("buffer of {size} bytes exceeds the device limit {limit_name} = {limit} bytes")]
    BufferTooLarge {
        /// Requested size in bytes.
        size: u64,
        /// Which limit (`max_buffer_size`, `max_storage_buffer_binding_size`).
        limit_name: &'static str,
        /// The limit in bytes.
        limit: u64,
    },
    /// A GPU tensor used with a [`crate::gpu::GpuContext`] other than the one it was made on
    /// (another device, or another `wgpu::Instance`).
    #[error("tensor `{what}` belongs to {tensor_context}, not to {context} (move it with a download and an upload)")]
    ContextMismatch {
        /// Which argument.
        what: String,
        /// The context the tensor was made on (id and adapter).
        tensor_context: String,
        /// The context of the operation (id and adapter).
        context: String,
    },
    /// A caller's `wgpu::Buffer` without a usage qfuse needs for it.
    #[error("buffer lacks usage {missing} (it has {has}), needed to {purpose}")]
    MissingBufferUsage {
        /// The missing flag (`STORAGE`, `COPY_SRC`, `COPY_DST`).
        missing: &'static str,
        /// The buffer's usages.
        has: String,
        /// What needs it.
        purpose: &'static str,
    },
    /// A file (or bytes) that is not a valid safetensors state dict.
    #[error("malformed state dict {}: {reason}", escape_path_str(.path))]
    MalformedStateDict {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor with another dtype than the operation needs.
    #[error("tensor `{}` is {got}, expected {expected}", escape(.name))]
    DtypeMismatch {
        /// The tensor's name.
        name: String,
        /// Its dtype (PyTorch's name: `float16`, `int64`, ...).
        got: String,
        /// The dtype needed.
        expected: String,
    },
    /// A module name that the state dict has no tensors for (or not the tensors its role needs).
    #[error("unknown module `{}`: {hint}", escape(.name))]
    UnknownModule {
        /// The name as given.
        name: String,
        /// What exists instead (closest names, the modules of the file).
        hint: String,
    },
    /// Folding the BatchNorm `bn` into the layer `layer` of a state dict failed.
    #[error("cannot fold `{}` into `{}`: {source}", escape(.bn), escape(.layer))]
    Fold {
        /// The conv / linear module.
        layer: String,
        /// The BatchNorm module.
        bn: String,
        /// Why.
        #[source]
        source: Box<Error>,
    },
    /// A fusion group whose module types match no fuser pattern (PyTorch: "did not find
    /// fuser method for: ...").
    #[error("did not find fuser method for: ({}) (modules {})", .types.join(", "), quoted(.names))]
    UnsupportedPattern {
        /// The modules of the group.
        names: Vec<String>,
        /// Their type names, in group order.
        types: Vec<String>,
    },
    /// Eval fusion (BatchNorm folding, `fuse_modules`) of a module in training mode.
    #[error("Fusion only for eval! `{}` ({kind}) is in training mode: call eval() before fuse_modules, or use fuse_modules_qat", escape(.name))]
    FusionTrainingMode {
        /// The module's path.
        name: String,
        /// Its type name.
        kind: String,
    },
    /// QAT fusion of modules whose training flags differ (PyTorch: "Conv and BN both must be
    /// in the same mode (train or eval).").
    #[error("modules {} must all be in the same mode (train or eval) to be fused", quoted(.names))]
    FusionModeMismatch {
        /// The modules of the group.
        names: Vec<String>,
    },
    /// A module named in two fusion groups (or twice in one).
    #[error("module `{}` appears in fusion groups {first} and {second}; a module can be fused only once", escape(.name))]
    DuplicateFusionName {
        /// The module's path.
        name: String,
        /// Index of the first group naming it.
        first: usize,
        /// Index of the second group naming it (equal to `first` when a group names it twice).
        second: usize,
    },
    /// An empty fusion group.
    #[error("fusion group {index} is empty")]
    EmptyFusionGroup {
        /// The group's index.
        index: usize,
    },
    /// `load_state_dict(strict = true)` with keys missing from the state dict or keys the
    /// model does not have (PyTorch's message).
    #[error("Error(s) in loading state_dict for {module}:{}", state_dict_key_errors(.missing, .unexpected))]
    StateDictKeys {
        /// The type name of the module loaded into.
        module: String,
        /// Keys of the model that the state dict lacks.
        missing: Vec<String>,
        /// Keys of the state dict that the model does not have.
        unexpected: Vec<String>,
    },
    /// An input path that is not a regular file: a directory, a FIFO, a device, a socket
    /// (qfuse reads only regular files, through symbolic links, so that a read can neither
    /// hang nor run without end).
    #[error("{} is not a regular file but {kind}; qfuse reads only regular files", escape_path_str(.path))]
    NotRegularFile {
        /// The path as given.
        path: String,
        /// What it is (`a directory`, `a FIFO`, ...).
        kind: &'static str,
    },
    /// A size computed from input (a file, a tensor, an allocation, a command-line count)
    /// beyond one of the limits of [`crate::limits`].
    #[error("{what}: {size} {unit} exceeds the limit of {limit} {unit}")]
    TooLarge {
        /// What is too large (already escaped where it holds input).
        what: String,
        /// Its size (`u64::MAX` when it overflows 64 bits).
        size: u64,
        /// The limit.
        limit: u64,
        /// The unit of both (`bytes`, `elements`, `images`).
        unit: &'static str,
    },
    /// A file (or bytes) that is not an ONNX model qfuse can read: not a protobuf `ModelProto`,
    /// a missing graph, an opset below 13, an undefined tensor name, a malformed initializer.
    #[error("malformed ONNX model {}: {reason}", escape_path_str(.path))]
    MalformedOnnx {
        /// The file.
        path: String,
        /// What is wrong with it (names from the file already escaped).
        reason: String,
    },
    /// An ONNX node whose operator (or attribute) qfuse does not import.
    #[error("unsupported ONNX node `{}` (op type `{}`): {reason}", escape(.node), escape(.op_type))]
    UnsupportedOnnxOp {
        /// The node's name (or `#INDEX` for a node without a name).
        node: String,
        /// Its op type, with its domain when that is not the default one (`com.microsoft::Gelu`).
        op_type: String,
        /// Why (the operators qfuse imports, or the attribute value it does not support).
        reason: String,
    },
    /// Evaluating an ONNX node failed (shapes that do not fit, an attribute value the
    /// evaluator does not support).
    #[error("ONNX node `{}` ({op_type}): {source}", escape(.node))]
    OnnxNode {
        /// The node's name (or `#INDEX`).
        node: String,
        /// Its op type.
        op_type: &'static str,
        /// Why.
        #[source]
        source: Box<Error>,
    },
    /// An I/O error with the path it concerns.
    #[error("I/O error on {}: {source}", escape_path_str(.path))]
    Io {
        /// The path.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("`{}`", escape(n)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// PyTorch's `load_state_dict` error lines (missing keys first, then unexpected ones).
fn state_dict_key_errors(missing: &[String], unexpected: &[String]) -> String {
    let list = |keys: &[String]| {
        keys.iter()
            .map(|k| format!("\"{}\"", escape(k)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut s = String::new();
    if !missing.is_empty() {
        s.push_str(&format!(
            "\n\tMissing key(s) in state_dict: {}.",
            list(missing)
        ));
    }
    if !unexpected.is_empty() {
        s.push_str(&format!(
            "\n\tUnexpected key(s) in state_dict: {}.",
            list(unexpected)
        ));
    }
    s
}

/// `Result` with [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Convenience constructor for [`Error::ShapeMismatch`].
    pub fn shape(context: impl Into<String>, expected: &[usize], got: &[usize]) -> Self {
        Error::ShapeMismatch {
            context: context.into(),
            expected: expected.to_vec(),
            got: got.to_vec(),
        }
    }

    /// Convenience constructor for [`Error::AxisOutOfRange`] from a non-negative axis.
    pub fn axis(axis: usize, rank: usize) -> Self {
        Error::AxisOutOfRange {
            axis: isize::try_from(axis).unwrap_or(isize::MAX),
            rank,
        }
    }

    /// Convenience constructor for [`Error::InvalidArgument`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
}
