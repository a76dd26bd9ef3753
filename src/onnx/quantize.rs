//! Post-training quantization of an ONNX model to QDQ: [`quantize_model`] folds the
//! BatchNorms ([`fold_model`]), calibrates the activations around every Conv, ConvTranspose,
//! Gemm and MatMul with min/max observers reduced on the backend while the float graph runs
//! there ([`DeviceGraph`]), quantizes the weights per channel (symmetric int8) and the biases to
//! int32, and writes `QuantizeLinear` / `DequantizeLinear` pairs around each quantized op —
//! the QDQ format onnxruntime, TensorRT and tract read. The observer settings are
//! [`DeployConfig::default`]'s (int8 affine per-tensor activations, int8 symmetric
//! per-channel weights), the ones qfuse's integer models use; the weight and bias codes come
//! from [`crate::reference::int8`].

use std::collections::{HashMap, HashSet};

use ndarray::{Array1, ArrayD, IxDyn};

use super::eval::{DeviceGraph, Observed};
use super::fold::{activation_of, fold_model, OnnxFold};
use super::model::{Graph, OnnxModel, Op, Tensor};
use super::proto;
use crate::backend::Backend;
use crate::config::ConfigList;
use crate::deploy::DeployConfig;
use crate::error::{Error, Result};
use crate::io::text::escape;
use crate::nn::QuantTarget;
use crate::ops::Activation;
use crate::quant::QParams;
use crate::quant::{ObserverSpec, QDtype, QScheme, QuantRange};
use crate::reference::int8::{quantize, quantize_bias};
use crate::reference::observer::{calculate_qparams, observe_qparams};

/// One op that [`quantize_model`] quantized (some of its tensors, per the config).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedOp {
    /// The node's name (`#INDEX` when unnamed).
    pub node: String,
    /// Its op type.
    pub op_type: &'static str,
    /// The input value and its qparams, when the node reads it quantized.
    pub input: Option<(String, QParams)>,
    /// The output value quantized as this node's output (the activation's output when a
    /// ReLU or ReLU6 follows as the only consumer) and its qparams, when it is a target.
    pub output: Option<(String, QParams)>,
    /// The weight's qparams (per channel along the output-channel axis, or per tensor), when
    /// it is a target.
    pub weight: Option<QParams>,
    /// Whether the bias became int32.
    pub bias: bool,
}

/// The result of [`quantize_model`].
#[derive(Debug, Clone)]
pub struct QuantizedModel {
    /// The QDQ model.
    pub model: OnnxModel,
    /// The BatchNorm folds made first.
    pub folds: Vec<OnnxFold>,
    /// The quantized ops, in graph order.
    pub ops: Vec<QuantizedOp>,
    /// The quantizable nodes the config left float (names), in graph order.
    pub left_float: Vec<String>,
    /// How many calibration batches were observed.
    pub batches: usize,
    /// The float model with its BatchNorms folded, which the QDQ model quantizes.
    pub float_model: OnnxModel,
    /// Every quantized activation value of [`QuantizedModel::float_model`]'s graph (by
    /// name) with its per-tensor qparams as calibrated (int8 codes; a uint8 export's zero
    /// points are these + 128): what [`super::to_int_model_from`] builds the integer model
    /// from, so that both share every scale and zero point.
    pub activations: HashMap<String, QParams>,
}

/// A quantizable op: node index, weight input name, the weight's output-channel axis
/// (`None`: per tensor), and the value its output quantization goes after.
struct Target {
    node: usize,
    weight: String,
    axis: Option<usize>,
    output: String,
}

fn targets(graph: &Graph, file_initializers: &HashSet<String>) -> Vec<Target> {
    let uses = graph.use_counts();
    let mut consumer: HashMap<&str, usize> = HashMap::new();
    for (i, n) in graph.nodes.iter().enumerate() {
        for inp in n.inputs.iter().filter(|s| !s.is_empty()) {
            consumer.insert(inp.as_str(), i);
        }
    }
    let mut out = Vec::new();
    for (i, n) in graph.nodes.iter().enumerate() {
        let Some(w) = n.input(1) else { continue };
        // The activation must be computed (a graph input or a node's output), not constant.
        if n.input(0)
            .is_none_or(|x| graph.initializers.contains_key(x))
        {
            continue;
        }
        let Some(wt) = graph.f32_initializer(w) else {
            continue;
        };
        if !file_initializers.contains(w)
            || n.input(2).is_some_and(|b| {
                !file_initializers.contains(b)
                    || graph.f32_initializer(b).is_none_or(|b| b.ndim() != 1)
            })
        {
            continue;
        }
        let axis = match &n.op {
            Op::Conv(_) if wt.ndim() >= 3 => Some(0),
            Op::ConvTranspose(a) if wt.ndim() >= 3 => (a.group == 1).then_some(1),
            Op::Gemm {
                alpha,
                beta,
                trans_a: false,
                trans_b,
            } if *alpha == 1.0 && *beta == 1.0 && wt.ndim() == 2 => {
                Some(if *trans_b { 0 } else { 1 })
            }
            Op::MatMul if wt.ndim() == 2 => Some(1),
            _ => continue,
        };
        // A ReLU / ReLU6 that is the only consumer: quantize after it (the fused epilogue).
        let y = n.outputs[0].as_str();
        let output = match (uses.get(y), consumer.get(y)) {
            (Some(1), Some(&a))
                if matches!(
                    activation_of(graph, &graph.nodes[a]),
                    Some(Activation::Relu | Activation::Relu6)
                ) && graph.nodes[a].input(0) == Some(y) =>
            {
                graph.nodes[a].outputs[0].clone()
            }
            _ => y.to_string(),
        };
        out.push(Target {
            node: i,
            weight: w.to_string(),
            axis,
            output,
        });
    }
    out
}

/// The outputs of the ops the integer model requantizes besides the weighted ones: Add (after
/// its ReLU / ReLU6 when that is its only consumer), GlobalAveragePool, HardSwish and
/// LeakyRelu, in graph order.
fn requantized_outputs(graph: &Graph) -> Vec<String> {
    let uses = graph.use_counts();
    let mut out = Vec::new();
    for n in &graph.nodes {
        let y = n.outputs[0].as_str();
        let v = match n.op {
            Op::Add => {
                let act = graph.nodes.iter().find(|a| {
                    a.input(0) == Some(y)
                        && matches!(
                            activation_of(graph, a),
                            Some(Activation::Relu | Activation::Relu6)
                        )
                });
                match act {
                    Some(a) if uses.get(y) == Some(&1) => a.outputs[0].clone(),
                    _ => y.to_string(),
                }
            }
            Op::GlobalAveragePool | Op::HardSwish | Op::LeakyRelu { .. } => y.to_string(),
            _ => continue,
        };
        out.push(v);
    }
    out
}

/// A value that max pooling, Flatten, Reshape or Identity computes from a quantized value
/// holds that value's codes: it takes the same qparams (as the integer model's pooling and
/// flatten keep their input's), so its QuantizeLinear is exact.
fn inherit_through_passthrough(graph: &Graph, act_qp: &mut HashMap<String, QParams>) {
    for n in &graph.nodes {
        let passthrough = matches!(
            n.op,
            Op::MaxPool(_) | Op::Flatten { .. } | Op::Reshape { .. } | Op::Identity
        );
        let (Some(x), true) = (n.input(0), passthrough) else {
            continue;
        };
        if let Some(qp) = act_qp.get(x).cloned() {
            if let Some(slot) = act_qp.get_mut(&n.outputs[0]) {
                *slot = qp;
            } else {
                act_qp.insert(n.outputs[0].clone(), qp);
            }
        }
    }
}

fn scalar_f32(name: &str, v: f32) -> proto::TensorProto {
    Tensor::F32(ArrayD::from_elem(IxDyn(&[]), v)).to_proto(name)
}

/// The scale and zero point initializers of per-tensor activation qparams: the zero point
/// int8, or uint8 (+ 128) for [`QDtype::QUInt8`] codes.
fn activation_protos(
    name: &str,
    qp: &QParams,
    codes: QDtype,
) -> Result<(proto::TensorProto, proto::TensorProto)> {
    match codes {
        QDtype::QInt8 => params_protos(name, qp),
        QDtype::QUInt8 => {
            let z = qp.zero_point[0];
            let zp = u8::try_from(z + 128)
                .map_err(|_| Error::invalid(format!("zero point {z} is not an int8 code")))?;
            Ok((
                scalar_f32(&format!("{name}_scale"), qp.scale[0]),
                Tensor::U8(ArrayD::from_elem(IxDyn(&[]), zp))
                    .to_proto(&format!("{name}_zero_point")),
            ))
        }
    }
}

fn params_protos(name: &str, qp: &QParams) -> Result<(proto::TensorProto, proto::TensorProto)> {
    let zp: Vec<i8> = qp
        .zero_point
        .iter()
        .map(|&z| i8::try_from(z).map_err(|_| Error::invalid(format!("zero point {z}"))))
        .collect::<Result<_>>()?;
    if qp.axis.is_some() {
        let n = qp.scale.len();
        Ok((
            Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[n]), qp.scale.clone()).map_err(internal)?)
                .to_proto(&format!("{name}_scale")),
            Tensor::I8(ArrayD::from_shape_vec(IxDyn(&[n]), zp).map_err(internal)?)
                .to_proto(&format!("{name}_zero_point")),
        ))
    } else {
        Ok((
            scalar_f32(&format!("{name}_scale"), qp.scale[0]),
            Tensor::I8(ArrayD::from_elem(IxDyn(&[]), zp[0]))
                .to_proto(&format!("{name}_zero_point")),
        ))
    }
}

fn internal(e: impl std::fmt::Display) -> Error {
    Error::invalid(format!("internal: {e}"))
}

fn qdq_node(
    op: &str,
    inputs: [String; 3],
    output: String,
    axis: Option<usize>,
) -> proto::NodeProto {
    proto::NodeProto {
        name: Some(output.clone()),
        op_type: Some(op.to_string()),
        // An absent optional input (the int32 bias's zero point) is left out.
        input: inputs.into_iter().filter(|s| !s.is_empty()).collect(),
        output: vec![output],
        attribute: axis
            .map(|a| proto::AttributeProto {
                name: Some("axis".into()),
                i: Some(a as i64),
                r#type: Some(proto::attribute_proto::AttributeType::Int as i32),
                ..Default::default()
            })
            .into_iter()
            .collect(),
        ..Default::default()
    }
}

/// Observes the float values named in `observed` while `graph` runs on `backend` over
/// `batches`: the graph's parameters are placed once ([`DeviceGraph`]), each batch is one
/// upload per graph input, each value is reduced where it lives (values of host-side ops
/// are uploaded for it) by
/// [`crate::backend::QuantOps::observe_running`] (`averaging_constant`: `None` for
/// `MinMaxObserver`'s running min/max, `Some(c)` for `MovingAverageMinMaxObserver`'s), and
/// each observer's state is downloaded once, at the end. Returns each value's per-tensor
/// qparams with its spec.
///
/// Errors: [`Error::InvalidArgument`] for a value no batch computed, a NaN range; those of
/// [`DeviceGraph`]'s runs and of `observe_running`.
pub(crate) fn calibrate<B: Backend>(
    backend: &B,
    graph: &Graph,
    batches: &[Vec<(String, ArrayD<f32>)>],
    observed: &[(String, ObserverSpec)],
    averaging_constant: Option<f32>,
) -> Result<HashMap<String, QParams>> {
    let dg = DeviceGraph::prepare(graph, backend.clone())?;
    let wanted: HashMap<&str, &ObserverSpec> =
        observed.iter().map(|(v, s)| (v.as_str(), s)).collect();
    let mut states: HashMap<String, B::Tensor> = HashMap::new();
    for batch in batches {
        let inputs = dg.upload_inputs(batch)?;
        dg.run_observed(&inputs, &mut |name, value| {
            let Some(spec) = wanted.get(name) else {
                return Ok(());
            };
            let uploaded;
            let t = match value {
                Observed::Device(t) => t,
                Observed::Host(a) => {
                    uploaded = backend.upload(a)?;
                    &uploaded
                }
            };
            let prev = states.remove(name);
            let (s, _) = backend.observe_running(prev, t, spec, averaging_constant)?;
            states.insert(name.to_string(), s);
            Ok(())
        })?;
    }
    observed
        .iter()
        .map(|(v, spec)| {
            let s = states.get(v).ok_or_else(|| {
                Error::invalid(format!(
                    "calibration never computed `{}`",
                    crate::io::text::escape(v)
                ))
            })?;
            let s = backend.download(s)?;
            let (min, max) = match s.as_slice() {
                Some(&[min, max]) => (min, max),
                _ => return Err(internal(format!("observer state of shape {:?}", s.shape()))),
            };
            if min.is_nan() || max.is_nan() {
                return Err(Error::invalid(format!(
                    "calibration of `{}` saw NaN; cannot quantize it",
                    crate::io::text::escape(v)
                )));
            }
            Ok((v.clone(), calculate_qparams(&[min], &[max], spec)))
        })
        .collect()
}

/// How [`quantize_model_with`] observes the activations during calibration.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum ActivationObserver {
    /// `MinMaxObserver`: the running minimum and maximum over every batch.
    #[default]
    MinMax,
    /// `MovingAverageMinMaxObserver`: the first batch's min / max, then
    /// `m ← m + c · (batch − m)` for each later batch, with this averaging constant `c`
    /// (PyTorch's default: [`MOVING_AVERAGE_CONSTANT`]).
    MovingAverage(f32),
}

/// PyTorch's `MovingAverageMinMaxObserver` default averaging constant.
pub const MOVING_AVERAGE_CONSTANT: f32 = 0.01;

impl ActivationObserver {
    /// The averaging constant [`crate::backend::QuantOps::observe_running`] takes: `None`
    /// for min/max.
    pub fn averaging_constant(&self) -> Option<f32> {
        match self {
            Self::MinMax => None,
            Self::MovingAverage(c) => Some(*c),
        }
    }
}

/// Options of [`quantize_model_with`].
#[derive(Debug, Clone, Default)]
pub struct QuantizeOptions {
    /// Which nodes and which of their tensors to quantize, with which settings (an NNI-style
    /// `config_list`, selected as [`quantize_model_with`] says); `None`: every quantizable node, its input, weight, bias
    /// and output, with [`DeployConfig::default`]'s settings.
    pub config: Option<ConfigList>,
    /// The activation observer.
    pub observer: ActivationObserver,
    /// The code type of the QDQ activations: [`QDtype::QInt8`] (default) or
    /// [`QDtype::QUInt8`] (onnxruntime's own QDQ default, which its x86 CPU EP runs on its
    /// integer kernels): the same codes + 128, zero points + 128, so the same arithmetic.
    /// Weights stay int8.
    pub activation_codes: QDtype,
}

/// What is quantized of one quantizable node: the observer settings of its input, weight and
/// output (`None`: left float) and whether its bias becomes int32 (it does when the input and
/// the weight are quantized and the node has a constant bias).
#[derive(Debug, Clone, PartialEq)]
struct NodePlan {
    /// The node's index in the graph.
    node: usize,
    /// The input activation's observer (per tensor).
    input: Option<ObserverSpec>,
    /// The weight's observer (per channel along the node's output-channel axis, or per
    /// tensor).
    weight: Option<ObserverSpec>,
    /// Whether the bias is a target.
    bias: bool,
    /// The output activation's observer (per tensor).
    output: Option<ObserverSpec>,
}

/// The PyTorch module type a quantizable node stands for (`Conv1d` / `Conv2d` by the
/// weight's rank, `ConvTranspose1d` / `ConvTranspose2d`, `Linear` for Gemm and MatMul).
fn torch_type(graph: &Graph, node: &super::model::Node) -> &'static str {
    let rank = node
        .input(1)
        .and_then(|w| graph.f32_initializer(w))
        .map_or(0, |w| w.ndim());
    match (&node.op, rank) {
        (Op::Conv(_), 3) => "Conv1d",
        (Op::Conv(_), _) => "Conv2d",
        (Op::ConvTranspose(_), 3) => "ConvTranspose1d",
        (Op::ConvTranspose(_), _) => "ConvTranspose2d",
        _ => "Linear",
    }
}

/// The names a config can select a node by: its name (`#INDEX` when unnamed) and, when its
/// weight is named `MODULE.weight` (as `torch.onnx.export` names it), the module path.
fn node_names(graph: &Graph, i: usize) -> Vec<String> {
    let mut names = vec![graph.node_label(i)];
    if let Some(m) = graph.nodes[i]
        .input(1)
        .and_then(|w| w.strip_suffix(".weight"))
    {
        names.push(m.to_string());
    }
    names
}

/// Checks an activation observer setting QDQ can express: int8 codes `[-128, 127]` (what
/// ONNX QuantizeLinear with an int8 zero point saturates to), per tensor.
fn check_activation(spec: &ObserverSpec, what: &str) -> Result<()> {
    if spec.dtype != QDtype::QInt8 || spec.range != QuantRange::INT8 {
        return Err(Error::invalid(format!(
            "{what}: QDQ activations are int8 [-128, 127] (ONNX QuantizeLinear with an int8 \
             zero point); got [{}, {}]",
            spec.range.quant_min, spec.range.quant_max
        )));
    }
    if spec.qscheme.is_per_channel() {
        return Err(Error::invalid(format!(
            "{what}: activations are quantized per tensor"
        )));
    }
    Ok(())
}

/// Checks a weight observer setting: signed codes inside `[-128, 127]` (int8, int4, int2:
/// stored as int8 codes).
fn check_weight(spec: &ObserverSpec, what: &str) -> Result<()> {
    if spec.dtype != QDtype::QInt8 || spec.range.quant_min < -128 || spec.range.quant_max > 127 {
        return Err(Error::invalid(format!(
            "{what}: QDQ weights are signed codes inside int8 [-128, 127] (int8, int4, int2); \
             got [{}, {}]",
            spec.range.quant_min, spec.range.quant_max
        )));
    }
    Ok(())
}

/// The quantization plan of `graph`'s quantizable nodes (Conv, ConvTranspose, Gemm and MatMul
/// with constant weights, in graph order) under `config`: NNI's selection rule
/// ([`crate::config::QuantConfig::matches`]) with a node's names ([`Graph::node_label`], and
/// `MODULE` for a weight named `MODULE.weight`) and types (the PyTorch module type —
/// `Conv2d`, `ConvTranspose2d`, `Linear`, ... — or the ONNX op type); a later entry's target
/// replaces an earlier one's; `target_names` empty means all four. `None` quantizes every
/// node with [`DeployConfig::default`]'s settings. Nodes no entry selects are left out (they
/// stay float).
///
/// Errors: [`Error::InvalidArgument`] naming (escaped) an `op_names` entry that names no
/// quantizable node, a `fuse_names` (ONNX BatchNorms are folded from the graph), or a
/// setting QDQ cannot express (activations other than int8 per tensor, unsigned weights).
fn select(graph: &Graph, targets: &[Target], config: Option<&ConfigList>) -> Result<Vec<NodePlan>> {
    let cfg = DeployConfig::default();
    let Some(config) = config else {
        return Ok(targets
            .iter()
            .map(|t| NodePlan {
                node: t.node,
                input: Some(cfg.activation),
                weight: Some(cfg.weight),
                bias: true,
                output: Some(cfg.activation),
            })
            .collect());
    };
    let names: Vec<Vec<String>> = targets.iter().map(|t| node_names(graph, t.node)).collect();
    for (k, entry) in config.0.iter().enumerate() {
        if !entry.fuse_names.is_empty() {
            return Err(Error::invalid(format!(
                "config_list[{k}]: fuse_names does not apply to an ONNX model (its BatchNorms \
                 are folded from the graph)"
            )));
        }
        for n in &entry.op_names {
            if !names.iter().any(|ns| ns.contains(n)) {
                return Err(Error::invalid(format!(
                    "config_list[{k}]: op_names `{}` names no Conv, ConvTranspose, Gemm or \
                     MatMul with constant weights (by node name or MODULE of MODULE.weight)",
                    escape(n)
                )));
            }
        }
    }
    let mut plans = Vec::new();
    for (t, ns) in targets.iter().zip(&names) {
        let node = &graph.nodes[t.node];
        let types = [torch_type(graph, node), node.op.op_type()];
        let mut plan = NodePlan {
            node: t.node,
            input: None,
            weight: None,
            bias: false,
            output: None,
        };
        let mut selected = false;
        for (k, entry) in config.0.iter().enumerate() {
            let hit = ns
                .iter()
                .any(|n| types.iter().any(|ty| entry.matches(n, ty)))
                && !ns.iter().any(|n| entry.exclude_op_names.contains(n))
                && !types
                    .iter()
                    .any(|ty| entry.exclude_op_types.iter().any(|e| e == ty));
            if !hit {
                continue;
            }
            selected = true;
            let what = format!("config_list[{k}] on `{}`", escape(&ns[0]));
            let mut ts = entry.targets()?;
            if ts.is_empty() {
                ts = vec![
                    QuantTarget::Input,
                    QuantTarget::Weight,
                    QuantTarget::Bias,
                    QuantTarget::Output,
                ];
            }
            for target in ts {
                match target {
                    QuantTarget::Input => {
                        let s = entry.observer("_input_")?;
                        check_activation(&s, &what)?;
                        plan.input = Some(s);
                    }
                    QuantTarget::Output => {
                        let s = entry.observer("_output_")?;
                        check_activation(&s, &what)?;
                        plan.output = Some(s);
                    }
                    QuantTarget::Weight => {
                        let s = entry.observer("weight")?;
                        check_weight(&s, &what)?;
                        plan.weight = Some(s);
                    }
                    QuantTarget::Bias => plan.bias = true,
                }
            }
        }
        if selected {
            plans.push(plan);
        }
    }
    Ok(plans)
}

/// Quantizes `model` to QDQ after folding its BatchNorms ([`quantize_model_with`] with the
/// default options: every quantizable node, min/max observers).
///
/// Errors: those of [`quantize_model_with`].
pub fn quantize_model<B: Backend>(
    backend: &B,
    model: &OnnxModel,
    batches: &[Vec<(String, ArrayD<f32>)>],
) -> Result<QuantizedModel> {
    quantize_model_with(backend, model, batches, &QuantizeOptions::default())
}

/// Quantizes `model` to QDQ after folding its BatchNorms; `batches` are the calibration
/// inputs (each a list of `(graph input name, tensor)`, every graph input), run in float on
/// `backend` with the activation observers reduced there. `options.config` chooses the
/// nodes and targets (below); a node left out, or a target left out, stays float — no
/// QuantizeLinear / DequantizeLinear reads or writes it, except that a value quantized as
/// its producer's output is read dequantized by every consumer (as NNI's simulation
/// quantizes an output for every reader), and one quantized as some node's input is read
/// dequantized by the other nodes that are not quantizable ops (pools, adds, ...). A bias
/// becomes int32 at `input scale × weight scale` when it is a target and the node's input
/// and weight are quantized; else it stays float.
///
/// Errors: [`Error::InvalidArgument`] for no batches, a model with nothing to quantize, a
/// config that selects nothing, a value given two different settings; those of
/// [`fold_model`] and [`super::run_observed`]; a bias that does not fit int32 at its scale.
pub fn quantize_model_with<B: Backend>(
    backend: &B,
    model: &OnnxModel,
    batches: &[Vec<(String, ArrayD<f32>)>],
    options: &QuantizeOptions,
) -> Result<QuantizedModel> {
    if batches.is_empty() {
        return Err(Error::invalid(
            "quantization needs at least one calibration batch",
        ));
    }
    // The folds read and write parameters, which are edge data: folded once on the host
    // (the reference), not round-tripped through the backend per fold.
    let folded = fold_model(&crate::CpuBackend, model)?;
    let graph = &folded.model.graph;
    let proto_graph = folded
        .model
        .proto
        .graph
        .as_ref()
        .ok_or_else(|| internal("no graph"))?;
    let file_initializers: HashSet<String> = proto_graph
        .initializer
        .iter()
        .filter_map(|t| t.name.clone())
        .collect();
    let all_targets = targets(graph, &file_initializers);
    if all_targets.is_empty() {
        return Err(Error::invalid(
            "the model has no Conv, ConvTranspose, Gemm or MatMul with constant weights to quantize",
        ));
    }
    let plans = select(graph, &all_targets, options.config.as_ref())?;
    let plan_of: HashMap<usize, &NodePlan> = plans.iter().map(|p| (p.node, p)).collect();
    let targets: Vec<&Target> = all_targets
        .iter()
        .filter(|t| plan_of.contains_key(&t.node))
        .collect();
    if targets.is_empty() {
        return Err(Error::invalid(
            "the config selects none of the model's Conv, ConvTranspose, Gemm and MatMul nodes",
        ));
    }
    // The activation values to observe, each with its one setting.
    let mut observed: Vec<String> = Vec::new();
    let mut spec_of: HashMap<String, ObserverSpec> = HashMap::new();
    let mut out_quantized: HashSet<String> = HashSet::new();
    for t in &targets {
        let p = plan_of[&t.node];
        let x = graph.nodes[t.node].inputs[0].clone();
        for (v, spec, is_out) in [(x, p.input, false), (t.output.clone(), p.output, true)] {
            let Some(spec) = spec else { continue };
            if is_out {
                out_quantized.insert(v.clone());
            }
            match spec_of.get(&v) {
                Some(s) if *s != spec => {
                    return Err(Error::invalid(format!(
                        "`{}` would be quantized with two different settings",
                        escape(&v)
                    )))
                }
                Some(_) => {}
                None => {
                    spec_of.insert(v.clone(), spec);
                    observed.push(v);
                }
            }
        }
    }
    // The outputs of the ops `to_net`'s integer model requantizes (Add, GlobalAveragePool,
    // activation nodes), so that the QDQ model quantizes the values the integer model does
    // (without a config: a config quantizes what it selects).
    if options.config.is_none() {
        let spec = DeployConfig::default().activation;
        for v in requantized_outputs(graph) {
            if !spec_of.contains_key(&v) {
                spec_of.insert(v.clone(), spec);
                observed.push(v);
            }
        }
    }
    // Quantizable nodes whose activation input stays float: left out, or without an input
    // target, reading a value that is not some producer's quantized output.
    let float_readers: HashSet<usize> = all_targets
        .iter()
        .filter(|t| {
            plan_of.get(&t.node).is_none_or(|p| p.input.is_none())
                && !out_quantized.contains(&graph.nodes[t.node].inputs[0])
        })
        .map(|t| t.node)
        .collect();
    let with_specs: Vec<(String, ObserverSpec)> =
        observed.iter().map(|v| (v.clone(), spec_of[v])).collect();
    let mut act_qp = calibrate(
        backend,
        graph,
        batches,
        &with_specs,
        options.observer.averaging_constant(),
    )?;
    inherit_through_passthrough(graph, &mut act_qp);

    // Rewrite the protobuf.
    let mut proto_model = folded.model.proto.clone();
    let g = proto_model
        .graph
        .as_mut()
        .ok_or_else(|| internal("no graph"))?;
    let mut used: HashSet<String> = file_initializers.clone();
    for n in &g.node {
        used.extend(n.input.iter().cloned());
        used.extend(n.output.iter().cloned());
    }
    let fresh = |used: &mut HashSet<String>, base: String| {
        let mut name = base.clone();
        let mut k = 0;
        while used.contains(&name) {
            k += 1;
            name = format!("{base}_{k}");
        }
        used.insert(name.clone());
        name
    };
    let mut new_inits: Vec<proto::TensorProto> = Vec::new();
    let mut replaced_inits: HashMap<String, proto::TensorProto> = HashMap::new();
    // Activation QDQ: value -> (its dequantized name, the Q/DQ nodes).
    let graph_inputs: HashSet<String> = graph.inputs.iter().map(|v| v.name.clone()).collect();
    let mut act_nodes: HashMap<String, Vec<proto::NodeProto>> = HashMap::new();
    let mut input_renames: HashMap<String, String> = HashMap::new();
    let mut producer_renames: HashMap<String, String> = HashMap::new();
    for v in &observed {
        let qp = &act_qp[v];
        let base = fresh(&mut used, format!("{v}_q"));
        let (s, z) = activation_protos(&base, qp, options.activation_codes)?;
        let (s_name, z_name) = (
            s.name.clone().unwrap_or_default(),
            z.name.clone().unwrap_or_default(),
        );
        new_inits.extend([s, z]);
        let codes = fresh(&mut used, format!("{v}_quantized"));
        // A graph input keeps its name: its consumers read the dequantized copy. A node's
        // output keeps its name on the dequantized copy: the node writes a float temporary.
        let (float_name, dq_name) = if graph_inputs.contains(v) {
            let dq = fresh(&mut used, format!("{v}_dequantized"));
            input_renames.insert(v.clone(), dq.clone());
            (v.clone(), dq)
        } else {
            let f = fresh(&mut used, format!("{v}_float"));
            producer_renames.insert(v.clone(), f.clone());
            (f, v.clone())
        };
        act_nodes.insert(
            v.clone(),
            vec![
                qdq_node(
                    "QuantizeLinear",
                    [float_name, s_name.clone(), z_name.clone()],
                    codes.clone(),
                    None,
                ),
                qdq_node("DequantizeLinear", [codes, s_name, z_name], dq_name, None),
            ],
        );
    }
    // Weights and biases.
    let mut ops = Vec::with_capacity(targets.len());
    let mut weight_nodes: HashMap<usize, Vec<proto::NodeProto>> = HashMap::new();
    let mut node_inputs: HashMap<usize, Vec<String>> = HashMap::new();
    for t in &targets {
        let p = plan_of[&t.node];
        let n = &graph.nodes[t.node];
        let x_name = n.inputs[0].clone();
        // The input as this node reads it: quantized when it is a target, or when the value
        // is its producer's quantized output.
        let xqp = if float_readers.contains(&t.node) {
            None
        } else {
            act_qp.get(&x_name).cloned()
        };
        let mut inputs = n.inputs.clone();
        let mut extra = Vec::new();
        let mut wqp = None;
        if let Some(mut spec) = p.weight {
            let w = graph
                .f32_initializer(&t.weight)
                .ok_or_else(|| internal("weight"))?;
            let axis = if spec.qscheme.is_per_channel() {
                match t.axis {
                    Some(axis) => {
                        spec.axis = axis as isize;
                        Some(axis)
                    }
                    None => {
                        spec.qscheme = if spec.qscheme.is_symmetric() {
                            QScheme::PerTensorSymmetric
                        } else {
                            QScheme::PerTensorAffine
                        };
                        None
                    }
                }
            } else {
                None
            };
            let q = observe_qparams(w, &spec)?;
            let codes = quantize(w, &q, spec.range)?;
            let wbase = fresh(&mut used, format!("{}_q", t.weight));
            let (ws, wz) = params_protos(&wbase, &q)?;
            let (ws_name, wz_name) = (
                ws.name.clone().unwrap_or_default(),
                wz.name.clone().unwrap_or_default(),
            );
            new_inits.extend([ws, wz]);
            let w_codes = fresh(&mut used, format!("{}_quantized", t.weight));
            new_inits.push(Tensor::I8(codes).to_proto(&w_codes));
            let w_dq = fresh(&mut used, format!("{}_dequantized", t.weight));
            extra.push(qdq_node(
                "DequantizeLinear",
                [w_codes, ws_name, wz_name],
                w_dq.clone(),
                axis,
            ));
            inputs[1] = w_dq;
            replaced_inits.insert(t.weight.clone(), proto::TensorProto::default());
            wqp = Some(q);
        }
        let mut bias_quantized = false;
        if let (Some(b), true, Some(xqp), Some(wqp)) = (n.input(2), p.bias, &xqp, &wqp) {
            let bias = graph.f32_initializer(b).ok_or_else(|| internal("bias"))?;
            let bias1 = Array1::from_iter(bias.iter().copied());
            let bq = quantize_bias(&bias1, xqp.scale[0], &wqp.scale)?;
            let scales: Vec<f32> = (0..bias1.len())
                .map(|o| xqp.scale[0] * wqp.scale[if wqp.scale.len() == 1 { 0 } else { o }])
                .collect();
            let b_codes = fresh(&mut used, format!("{b}_quantized"));
            new_inits.push(Tensor::I32(bq.into_dyn()).to_proto(&b_codes));
            let b_scale = fresh(&mut used, format!("{b}_q_scale"));
            new_inits.push(
                Tensor::F32(
                    ArrayD::from_shape_vec(IxDyn(&[scales.len()]), scales).map_err(internal)?,
                )
                .to_proto(&b_scale),
            );
            let b_dq = fresh(&mut used, format!("{b}_dequantized"));
            extra.push(qdq_node(
                "DequantizeLinear",
                [b_codes, b_scale, String::new()],
                b_dq.clone(),
                Some(0),
            ));
            inputs[2] = b_dq;
            // The float bias is no longer read by this node.
            replaced_inits.insert(b.to_string(), proto::TensorProto::default());
            bias_quantized = true;
        }
        weight_nodes.insert(t.node, extra);
        node_inputs.insert(t.node, inputs);
        ops.push(QuantizedOp {
            node: graph.node_label(t.node),
            op_type: n.op.op_type(),
            input: xqp.map(|q| (x_name, q)),
            output: p
                .output
                .map(|_| (t.output.clone(), act_qp[&t.output].clone())),
            weight: wqp,
            bias: bias_quantized,
        });
    }
    let left_float = all_targets
        .iter()
        .filter(|t| !plan_of.contains_key(&t.node))
        .map(|t| graph.node_label(t.node))
        .collect();
    // Assemble the nodes: graph-input QDQ first, then each node with its weight DQs before it
    // and its output's QDQ after it.
    let old_nodes = std::mem::take(&mut g.node);
    let mut nodes = Vec::with_capacity(old_nodes.len() * 3);
    for v in graph.inputs.iter().map(|v| &v.name) {
        if let Some(qdq) = act_nodes.get(v) {
            nodes.extend(qdq.iter().cloned());
        }
    }
    // Map proto nodes to graph nodes by output name (Constant nodes have no graph node).
    let index_of: HashMap<&str, usize> = graph
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.outputs[0].as_str(), i))
        .collect();
    for mut n in old_nodes {
        let out = n.output.first().cloned().unwrap_or_default();
        let gi = index_of.get(out.as_str()).copied();
        if let Some(i) = gi {
            if let Some(extra) = weight_nodes.remove(&i) {
                nodes.extend(extra);
            }
            if let Some(inputs) = node_inputs.remove(&i) {
                n.input = inputs;
            }
        }
        let float_reader = gi.is_some_and(|i| float_readers.contains(&i));
        for (k, inp) in n.input.iter_mut().enumerate() {
            if float_reader && k == 0 {
                // A node left float reads the float value (a node's output under the name its
                // producer now writes).
                if let Some(f) = producer_renames.get(inp) {
                    *inp = f.clone();
                }
            } else if let Some(r) = input_renames.get(inp) {
                *inp = r.clone();
            }
        }
        let qdq = act_nodes.get(&out).filter(|_| !graph_inputs.contains(&out));
        if let Some(f) = producer_renames.get(&out) {
            n.output[0] = f.clone();
        }
        nodes.push(n);
        if let Some(qdq) = qdq {
            nodes.extend(qdq.iter().cloned());
        }
    }
    g.node = nodes;
    g.value_info.clear();
    // Drop the float weights and biases no node reads any more.
    let mut read: HashSet<String> = HashSet::new();
    for n in &g.node {
        read.extend(n.input.iter().cloned());
    }
    g.initializer.retain(|t| {
        let name = t.name.clone().unwrap_or_default();
        !replaced_inits.contains_key(&name) || read.contains(&name)
    });
    g.initializer.extend(new_inits);
    let model = OnnxModel::from_proto(proto_model, "the quantized model")?;
    Ok(QuantizedModel {
        model,
        folds: folded.folds,
        ops,
        left_float,
        batches: batches.len(),
        float_model: folded.model,
        activations: act_qp,
    })
}
