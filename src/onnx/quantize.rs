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
use crate::deploy::DeployConfig;
use crate::error::{Error, Result};
use crate::ops::Activation;
use crate::quant::ObserverSpec;
use crate::quant::QParams;
use crate::reference::int8::{quantize, quantize_bias};
use crate::reference::observer::{calculate_qparams, observe_qparams};

/// One op that [`quantize_model`] quantized.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedOp {
    /// The node's name (`#INDEX` when unnamed).
    pub node: String,
    /// Its op type.
    pub op_type: &'static str,
    /// The quantized input value and its qparams.
    pub input: (String, QParams),
    /// The quantized output value (the activation's output when a ReLU or ReLU6 follows as
    /// the only consumer) and its qparams.
    pub output: (String, QParams),
    /// The weight's qparams (per channel along `axis`, or per tensor).
    pub weight: QParams,
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
    /// How many calibration batches were observed.
    pub batches: usize,
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

fn scalar_f32(name: &str, v: f32) -> proto::TensorProto {
    Tensor::F32(ArrayD::from_elem(IxDyn(&[]), v)).to_proto(name)
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

/// Observes the float values named `observed` while `graph` runs on `backend` over
/// `batches`: the graph's parameters are placed once ([`DeviceGraph`]), each batch is one
/// upload per graph input, each value is reduced where it lives by
/// [`crate::backend::QuantOps::observe_running`] (`averaging_constant`: `None` for
/// `MinMaxObserver`'s running min/max, `Some(c)` for `MovingAverageMinMaxObserver`'s), and
/// each observer's state is downloaded once, at the end. Returns each value's per-tensor
/// qparams with `spec`.
///
/// Errors: [`Error::InvalidArgument`] for a value no batch computed, a NaN range; those of
/// [`DeviceGraph`]'s runs and of `observe_running`.
pub(crate) fn calibrate<B: Backend>(
    backend: &B,
    graph: &Graph,
    batches: &[Vec<(String, ArrayD<f32>)>],
    observed: &[String],
    spec: &ObserverSpec,
    averaging_constant: Option<f32>,
) -> Result<HashMap<String, QParams>> {
    let dg = DeviceGraph::prepare(graph, backend.clone())?;
    let wanted: HashSet<&str> = observed.iter().map(String::as_str).collect();
    let mut states: HashMap<String, B::Tensor> = HashMap::new();
    for batch in batches {
        let inputs = dg.upload_inputs(batch)?;
        dg.run_observed(&inputs, &mut |name, value| {
            if !wanted.contains(name) {
                return Ok(());
            }
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
        .map(|v| {
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

/// Quantizes `model` to QDQ after folding its BatchNorms; `batches` are the calibration
/// inputs (each a list of `(graph input name, tensor)`, every graph input), run in float on
/// `backend`.
///
/// Errors: [`Error::InvalidArgument`] for no batches or a model with nothing to quantize;
/// those of [`fold_model`] and [`super::run_observed`]; a bias that does not fit int32 at its scale.
pub fn quantize_model<B: Backend>(
    backend: &B,
    model: &OnnxModel,
    batches: &[Vec<(String, ArrayD<f32>)>],
) -> Result<QuantizedModel> {
    if batches.is_empty() {
        return Err(Error::invalid(
            "quantization needs at least one calibration batch",
        ));
    }
    let folded = fold_model(backend, model)?;
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
    let targets = targets(graph, &file_initializers);
    if targets.is_empty() {
        return Err(Error::invalid(
            "the model has no Conv, ConvTranspose, Gemm or MatMul with constant weights to quantize",
        ));
    }
    let cfg = DeployConfig::default();
    // Calibrate: one min/max observer per quantized activation value.
    let mut observed: Vec<String> = Vec::new();
    for t in &targets {
        let x = graph.nodes[t.node].inputs[0].clone();
        for v in [x, t.output.clone()] {
            if !observed.contains(&v) {
                observed.push(v);
            }
        }
    }
    let act_qp = calibrate(backend, graph, batches, &observed, &cfg.activation, None)?;

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
        let (s, z) = params_protos(&base, qp)?;
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
        let n = &graph.nodes[t.node];
        let w = graph
            .f32_initializer(&t.weight)
            .ok_or_else(|| internal("weight"))?;
        let mut spec = cfg.weight;
        let wqp = match t.axis {
            Some(axis) => {
                spec.axis = axis as isize;
                observe_qparams(w, &spec)?
            }
            None => {
                spec.qscheme = crate::quant::QScheme::PerTensorSymmetric;
                observe_qparams(w, &spec)?
            }
        };
        let codes = quantize(w, &wqp, spec.range)?;
        let x_name = n.inputs[0].clone();
        let xqp = act_qp[&x_name].clone();
        let mut inputs = n.inputs.clone();
        let wbase = fresh(&mut used, format!("{}_q", t.weight));
        let (ws, wz) = params_protos(&wbase, &wqp)?;
        let (ws_name, wz_name) = (
            ws.name.clone().unwrap_or_default(),
            wz.name.clone().unwrap_or_default(),
        );
        new_inits.extend([ws, wz]);
        let w_codes = fresh(&mut used, format!("{}_quantized", t.weight));
        new_inits.push(Tensor::I8(codes).to_proto(&w_codes));
        let w_dq = fresh(&mut used, format!("{}_dequantized", t.weight));
        let mut extra = vec![qdq_node(
            "DequantizeLinear",
            [w_codes, ws_name, wz_name],
            w_dq.clone(),
            t.axis,
        )];
        inputs[1] = w_dq;
        if let Some(b) = n.input(2) {
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
        }
        replaced_inits.insert(t.weight.clone(), proto::TensorProto::default());
        weight_nodes.insert(t.node, extra);
        node_inputs.insert(t.node, inputs);
        ops.push(QuantizedOp {
            node: graph.node_label(t.node),
            op_type: n.op.op_type(),
            input: (x_name, xqp),
            output: (t.output.clone(), act_qp[&t.output].clone()),
            weight: wqp,
        });
    }
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
        for inp in &mut n.input {
            if let Some(r) = input_renames.get(inp) {
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
        batches: batches.len(),
    })
}
