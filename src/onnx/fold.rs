//! BatchNorm folding over an ONNX graph: [`find_fusable`] finds Conv / ConvTranspose / Gemm →
//! BatchNormalization (→ activation) chains that the pattern table of
//! [`crate::fuse::fuse_modules`] accepts, and [`fold_model`] folds each BatchNorm into its
//! layer through the backend's [`HostOps::fold_conv_bn`] / [`HostOps::fold_linear_bn`] (on
//! the CPU, [`crate::reference::fold`], the one home of the formula; on the GPU its kernels,
//! checked against it), with that BatchNorm's own epsilon.

use std::collections::{HashMap, HashSet};

use ndarray::{Array1, Array2, ArrayD, Ix2};

use super::model::{Graph, Node, OnnxModel, Op, Tensor};
use super::proto;
use crate::backend::HostOps;
use crate::error::{Error, Result};
use crate::fold_state_dict::FoldSpec;
use crate::fuse::is_builtin;
use crate::io::file::Outputs;
use crate::io::text::escape;
use crate::ops::Activation;

/// A chain of nodes that folds: a head (Conv, ConvTranspose or Gemm), its BatchNormalization,
/// and the activation after it, if any (the activation node stays in the graph; ONNX has no
/// fused op for it).
#[derive(Debug, Clone, PartialEq)]
pub struct Fusable {
    /// Index of the head node in [`Graph::nodes`].
    pub head: usize,
    /// Index of the BatchNormalization node.
    pub bn: usize,
    /// Index of the activation node, when the pattern includes one.
    pub act: Option<usize>,
    /// The pattern as module type names of the fusion table (`["Conv2d", "BatchNorm2d",
    /// "ReLU6"]`).
    pub types: Vec<&'static str>,
    /// The BatchNorm's epsilon.
    pub epsilon: f32,
}

/// One fold that [`fold_model`] made, for reports.
#[derive(Debug, Clone, PartialEq)]
pub struct OnnxFold {
    /// The head node's name (`#INDEX` when unnamed).
    pub head: String,
    /// The BatchNormalization node's name.
    pub bn: String,
    /// The activation node's name, when the pattern has one.
    pub act: Option<String>,
    /// The pattern's module type names.
    pub types: Vec<&'static str>,
    /// The BatchNorm's epsilon.
    pub epsilon: f32,
    /// The head's weight initializer (its name before folding).
    pub weight: String,
    /// The head's weight shape.
    pub weight_shape: Vec<usize>,
    /// The BatchNorm's scale initializer.
    pub bn_scale: String,
}

/// The result of [`fold_model`].
#[derive(Debug, Clone)]
pub struct FoldedModel {
    /// The folded model (imported again from its rewritten protobuf).
    pub model: OnnxModel,
    /// The folds, in graph order.
    pub folds: Vec<OnnxFold>,
}

/// The activation a node computes, when it is one the fusion table knows: `Relu`,
/// `LeakyRelu`, `HardSwish`, and `Clip` with constant bounds `[0, 6]` (ReLU6).
pub(crate) fn activation_of(graph: &Graph, node: &Node) -> Option<Activation> {
    match &node.op {
        Op::Relu => Some(Activation::Relu),
        Op::LeakyRelu { alpha } => Some(Activation::LeakyRelu {
            negative_slope: *alpha,
        }),
        Op::HardSwish => Some(Activation::Hardswish),
        Op::Clip => {
            let bound = |i: usize| -> Option<Option<f32>> {
                match node.input(i) {
                    None => Some(None),
                    Some(name) => {
                        let t = graph.f32_initializer(name)?;
                        (t.len() == 1).then(|| t.iter().next().copied())
                    }
                }
            };
            match (bound(1)?, bound(2)?) {
                (Some(lo), Some(hi)) if lo == 0.0 && hi == 6.0 => Some(Activation::Relu6),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The module type name of a head node, when it can take a BatchNorm: `Conv1d` / `Conv2d` by
/// the weight's rank, `ConvTranspose2d`, and `Linear` for a `Gemm` with `alpha = beta = 1`,
/// an untransposed A and a constant 2-D weight. The weight (and bias) must be float
/// initializers.
fn head_type(graph: &Graph, node: &Node) -> Option<&'static str> {
    let w = graph.f32_initializer(node.input(1)?)?;
    if let Some(b) = node.input(2) {
        graph.f32_initializer(b)?;
    }
    match &node.op {
        Op::Conv(_) => match w.ndim() {
            3 => Some("Conv1d"),
            4 => Some("Conv2d"),
            _ => None,
        },
        Op::ConvTranspose(_) => (w.ndim() == 4).then_some("ConvTranspose2d"),
        Op::Gemm {
            alpha,
            beta,
            trans_a,
            ..
        } => (*alpha == 1.0 && *beta == 1.0 && !*trans_a && w.ndim() == 2).then_some("Linear"),
        _ => None,
    }
}

/// Finds every chain that [`fold_model`] folds: a Conv, ConvTranspose or Gemm whose only
/// consumer is a BatchNormalization (inference mode, constant statistics), optionally followed
/// by an activation that is the BatchNorm's only consumer, where the tuple of module type
/// names is a pattern of the fusion table ([`crate::fuse::default_patterns`]). Intermediate
/// values that are graph outputs are never folded away.
pub fn find_fusable(graph: &Graph) -> Vec<Fusable> {
    let uses = graph.use_counts();
    // Each value's single consumer (node index), for values read exactly once by a node.
    let mut consumer: HashMap<&str, usize> = HashMap::new();
    for (i, n) in graph.nodes.iter().enumerate() {
        for inp in n.inputs.iter().filter(|s| !s.is_empty()) {
            consumer.insert(inp.as_str(), i);
        }
    }
    let only_consumer = |value: &str| -> Option<usize> {
        (uses.get(value) == Some(&1))
            .then(|| consumer.get(value).copied())
            .flatten()
    };
    let mut out = Vec::new();
    let mut taken: HashSet<usize> = HashSet::new();
    for (h, head) in graph.nodes.iter().enumerate() {
        let Some(head_kind) = head_type(graph, head) else {
            continue;
        };
        let Some(b) = only_consumer(&head.outputs[0]) else {
            continue;
        };
        let bn = &graph.nodes[b];
        let Op::BatchNormalization { epsilon } = bn.op else {
            continue;
        };
        if bn.input(0) != Some(head.outputs[0].as_str())
            || !(1..5).all(|i| {
                bn.input(i)
                    .and_then(|n| graph.f32_initializer(n))
                    .is_some_and(|t| t.ndim() == 1)
            })
        {
            continue;
        }
        let bn_kind = if head_kind == "Conv2d" || head_kind == "ConvTranspose2d" {
            "BatchNorm2d"
        } else {
            "BatchNorm1d"
        };
        let act = only_consumer(&bn.outputs[0]).and_then(|a| {
            let node = &graph.nodes[a];
            let kind = activation_of(graph, node)?.kind_name();
            (node.input(0) == Some(bn.outputs[0].as_str())).then_some((a, kind))
        });
        let mut types = vec![head_kind, bn_kind];
        let mut act_index = None;
        if let Some((a, kind)) = act {
            let mut with_act = types.clone();
            with_act.push(kind);
            if is_builtin(&with_act) {
                types = with_act;
                act_index = Some(a);
            }
        }
        if !is_builtin(&types) || taken.contains(&h) || taken.contains(&b) {
            continue;
        }
        taken.extend([h, b]);
        out.push(Fusable {
            head: h,
            bn: b,
            act: act_index,
            types,
            epsilon,
        });
    }
    out
}

fn vec1(graph: &Graph, name: Option<&str>, what: &str) -> Result<Array1<f32>> {
    let name = name.ok_or_else(|| Error::invalid(format!("internal: {what} missing")))?;
    let t = graph
        .f32_initializer(name)
        .ok_or_else(|| Error::invalid(format!("internal: {what} not constant")))?;
    // A Gemm bias [1, out] folds as [out].
    let n = t.len();
    if t.ndim() == 1 || (t.ndim() == 2 && t.shape()[0] == 1) {
        Ok(Array1::from_iter(t.iter().copied()))
    } else {
        Err(Error::shape(
            format!("{what} `{}`", escape(name)),
            &[n],
            t.shape(),
        ))
    }
}

/// The folded weight and bias of one [`Fusable`], in the head's own layout.
fn fold_one<B: HostOps + ?Sized>(
    backend: &B,
    graph: &Graph,
    f: &Fusable,
) -> Result<(ArrayD<f32>, Array1<f32>)> {
    let head = &graph.nodes[f.head];
    let bn_node = &graph.nodes[f.bn];
    let w = graph
        .f32_initializer(head.input(1).unwrap_or(""))
        .ok_or_else(|| Error::invalid("internal: weight not constant"))?;
    let bias = match head.input(2) {
        Some(b) => Some(vec1(graph, Some(b), "bias")?),
        None => None,
    };
    let bn = bn_node
        .batch_norm(|i, what| vec1(graph, bn_node.input(i), &format!("BatchNorm {what}")))?;
    match &head.op {
        Op::Conv(_) => {
            let folded = backend.fold_conv_bn(w, bias.as_ref(), &bn, false)?;
            Ok((folded.weight, folded.bias))
        }
        Op::ConvTranspose(attrs) => {
            // The group count the fold infers from the channels must be the node's.
            let per_group = w.shape()[1];
            let expected = per_group.checked_mul(attrs.group);
            if expected != Some(bn.channels()) {
                return Err(Error::ChannelMismatch {
                    layer: "conv_transpose".into(),
                    layer_channels: expected.unwrap_or(usize::MAX),
                    bn_channels: bn.channels(),
                });
            }
            let folded = backend.fold_conv_bn(w, bias.as_ref(), &bn, true)?;
            Ok((folded.weight, folded.bias))
        }
        Op::Gemm { trans_b, .. } => {
            let w2 = w
                .clone()
                .into_dimensionality::<Ix2>()
                .map_err(|e| Error::invalid(format!("internal: {e}")))?;
            // PyTorch's Linear layout [out, in]; transB = 0 stores [in, out].
            let w_out_in: Array2<f32> = if *trans_b { w2 } else { w2.t().to_owned() };
            let out = w_out_in.nrows();
            if bn.channels() != out {
                return Err(Error::ChannelMismatch {
                    layer: "linear".into(),
                    layer_channels: out,
                    bn_channels: bn.channels(),
                });
            }
            let folded = backend.fold_linear_bn(&w_out_in, bias.as_ref(), &bn)?;
            let fw = folded
                .weight
                .into_dimensionality::<Ix2>()
                .map_err(|e| Error::invalid(format!("internal: {e}")))?;
            let fw = if *trans_b { fw } else { fw.t().to_owned() };
            Ok((fw.into_dyn(), folded.bias))
        }
        _ => Err(Error::invalid("internal: not a fold head")),
    }
}

/// A name not in `used`, from `base` (`base`, `base_1`, `base_2`, ...); records it.
fn fresh_name(used: &mut HashSet<String>, base: &str) -> String {
    let mut name = base.to_string();
    let mut k = 0u64;
    while used.contains(&name) {
        k += 1;
        name = format!("{base}_{k}");
    }
    used.insert(name.clone());
    name
}

/// Folds every BatchNorm that [`find_fusable`] finds into its layer and returns the rewritten
/// model: the head's weight and bias initializers replaced by the folded ones (new
/// initializers when another node shares them), the head writing the BatchNorm's output, the
/// BatchNorm node and the initializers only it used removed. Activations stay as they are.
///
/// Errors: the fold's own ([`Error::ChannelMismatch`], [`Error::ShapeMismatch`] for a
/// BatchNorm whose tensors disagree with the layer), each wrapped in [`Error::Fold`] naming
/// the two nodes.
pub fn fold_model<B: HostOps + ?Sized>(backend: &B, model: &OnnxModel) -> Result<FoldedModel> {
    let graph = &model.graph;
    let fusable = find_fusable(graph);
    let mut proto_model = model.proto.clone();
    let g = proto_model
        .graph
        .as_mut()
        .ok_or_else(|| Error::invalid("internal: model without graph"))?;
    // Every name in the graph, for fresh initializer names.
    let mut used: HashSet<String> = graph.initializers.keys().cloned().collect();
    for n in &g.node {
        used.extend(n.input.iter().cloned());
        used.extend(n.output.iter().cloned());
    }
    used.extend(g.input.iter().filter_map(|v| v.name.clone()));
    // How many node inputs read each initializer (to know which can be replaced in place).
    let mut readers: HashMap<String, usize> = HashMap::new();
    for n in &graph.nodes {
        for i in n.inputs.iter().filter(|s| !s.is_empty()) {
            *readers.entry(i.clone()).or_default() += 1;
        }
    }
    // Tensors replaced in place must be initializers of the file (not `Constant` outputs).
    let file_initializers: HashSet<String> = g
        .initializer
        .iter()
        .filter_map(|t| t.name.clone())
        .collect();
    let in_place = |name: &str| {
        readers.get(name) == Some(&1)
            && file_initializers.contains(name)
            && !graph.outputs.iter().any(|o| o == name)
    };
    let mut replaced: HashMap<String, Tensor> = HashMap::new();
    let mut added: Vec<proto::TensorProto> = Vec::new();
    // Node rewrites keyed by the node's output name (unique): new inputs, new output.
    let mut head_rewrites: HashMap<String, (Vec<String>, String)> = HashMap::new();
    let mut removed_bn_outputs: HashSet<String> = HashSet::new();
    let mut folds = Vec::with_capacity(fusable.len());
    for f in &fusable {
        let head = &graph.nodes[f.head];
        let bn = &graph.nodes[f.bn];
        let (weight, bias) = fold_one(backend, graph, f).map_err(|e| Error::Fold {
            layer: graph.node_label(f.head),
            bn: graph.node_label(f.bn),
            source: Box::new(e),
        })?;
        let w_name = head.inputs[1].clone();
        let mut inputs = head.inputs.clone();
        let weight_shape = weight.shape().to_vec();
        let weight = Tensor::F32(weight);
        if in_place(&w_name) {
            replaced.insert(w_name.clone(), weight);
        } else {
            let name = fresh_name(&mut used, &format!("{w_name}_folded"));
            added.push(weight.to_proto(&name));
            inputs[1] = name;
        }
        let bias = Tensor::F32(bias.into_dyn());
        match head.input(2) {
            Some(b) if in_place(b) => {
                replaced.insert(b.to_string(), bias);
            }
            other => {
                let base =
                    other.map_or_else(|| format!("{w_name}_bias"), |b| format!("{b}_folded"));
                let name = fresh_name(&mut used, &base);
                added.push(bias.to_proto(&name));
                if inputs.len() < 3 {
                    inputs.resize(3, String::new());
                }
                inputs[2] = name;
            }
        }
        head_rewrites.insert(head.outputs[0].clone(), (inputs, bn.outputs[0].clone()));
        removed_bn_outputs.insert(bn.outputs[0].clone());
        folds.push(OnnxFold {
            head: graph.node_label(f.head),
            bn: graph.node_label(f.bn),
            act: f.act.map(|a| graph.node_label(a)),
            types: f.types.clone(),
            epsilon: f.epsilon,
            weight: w_name,
            weight_shape,
            bn_scale: bn.inputs[1].clone(),
        });
    }
    // Rewrite the nodes: heads take the folded tensors and write the BatchNorm's output.
    let mut old_head_outputs = HashSet::new();
    g.node.retain(|n| {
        !(n.op_type.as_deref() == Some("BatchNormalization")
            && n.output.len() == 1
            && removed_bn_outputs.contains(&n.output[0]))
    });
    for n in &mut g.node {
        if let Some(out) = n.output.first().cloned() {
            if let Some((inputs, new_out)) = head_rewrites.get(&out) {
                n.input = inputs.clone();
                n.output[0] = new_out.clone();
                old_head_outputs.insert(out);
            }
        }
    }
    // Identity nodes that fed only removed BatchNorms (shared statistics) go too.
    let bn_inputs: HashSet<&str> = fusable
        .iter()
        .flat_map(|f| graph.nodes[f.bn].inputs[1..].iter().map(String::as_str))
        .collect();
    let mut read: HashSet<String> = g.output.iter().filter_map(|v| v.name.clone()).collect();
    for n in &g.node {
        read.extend(n.input.iter().cloned());
    }
    g.node.retain(|n| {
        !(n.op_type.as_deref() == Some("Identity")
            && n.output.len() == 1
            && bn_inputs.contains(n.output[0].as_str())
            && !read.contains(&n.output[0]))
    });
    g.value_info.retain(|v| {
        !v.name
            .as_ref()
            .is_some_and(|n| old_head_outputs.contains(n))
    });
    // Replace folded initializers in place; drop the ones no node reads any more.
    let mut still_read: HashSet<String> = HashSet::new();
    for n in &g.node {
        still_read.extend(n.input.iter().cloned());
    }
    still_read.extend(g.output.iter().filter_map(|v| v.name.clone()));
    let mut dropped = HashSet::new();
    g.initializer.retain_mut(|t| {
        let name = t.name.clone().unwrap_or_default();
        if let Some(new) = replaced.get(&name) {
            *t = new.to_proto(&name);
        }
        let keep = still_read.contains(&name) || !was_read(&readers, &name);
        if !keep {
            dropped.insert(name);
        }
        keep
    });
    g.initializer.extend(added);
    g.input
        .retain(|v| !v.name.as_ref().is_some_and(|n| dropped.contains(n)));
    let model = OnnxModel::from_proto(proto_model, "the folded model")?;
    Ok(FoldedModel { model, folds })
}

/// Whether a node of the original graph read `name` (initializers nobody read are kept).
fn was_read(readers: &HashMap<String, usize>, name: &str) -> bool {
    readers.get(name).is_some_and(|&n| n > 0)
}

/// Reads the ONNX model `input`, folds it ([`fold_model`]) and writes the folded model to
/// `output` ([`OnnxModel::write`]). Returns the folds.
pub fn fold_file<B: HostOps + ?Sized>(
    backend: &B,
    input: &std::path::Path,
    output: &std::path::Path,
) -> Result<FoldedModel> {
    // Refused before any work: an output that is the input.
    Outputs::new(&[input]).check(output)?;
    let model = OnnxModel::load(input)?;
    let folded = fold_model(backend, &model)?;
    folded.model.write(output, &[input])?;
    Ok(folded)
}

/// The state-dict folds ([`FoldSpec`]s) that the ONNX export of the same model implies: for
/// each chain [`find_fusable`] finds, the layer and BatchNorm modules named by their
/// initializers (`MODULE.weight`, as `torch.onnx.export` names them), the BatchNorm's own
/// epsilon, and `transpose` for a ConvTranspose. Activations are not named (the folded state
/// dict keeps the plain layer names).
///
/// Errors: [`Error::UnsupportedOnnxOp`] for a chain whose weight or BatchNorm scale
/// initializer is not named `MODULE.weight` (a graph exported with constant folding, or not
/// from PyTorch).
pub fn state_dict_specs(graph: &Graph) -> Result<Vec<FoldSpec>> {
    let module = |node: usize, input: &str| -> Result<String> {
        input
            .strip_suffix(".weight")
            .filter(|m| !m.is_empty())
            .map(str::to_string)
            .ok_or_else(|| Error::UnsupportedOnnxOp {
                node: graph.node_label(node),
                op_type: graph.nodes[node].op.op_type().into(),
                reason: format!(
                    "its initializer `{}` is not named MODULE.weight, so no state-dict module \
                     corresponds to it",
                    escape(input)
                ),
            })
    };
    find_fusable(graph)
        .iter()
        .map(|f| {
            let head = &graph.nodes[f.head];
            let bn = &graph.nodes[f.bn];
            let layer = module(f.head, &head.inputs[1])?;
            let bn_module = module(f.bn, &bn.inputs[1])?;
            Ok(FoldSpec::new(layer, bn_module)
                .with_eps(f.epsilon)
                .transposed(matches!(head.op, Op::ConvTranspose(_))))
        })
        .collect()
}
