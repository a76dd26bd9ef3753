//! An imported ONNX graph as qfuse's deployment graph ([`crate::deploy::Net`]), so that
//! [`crate::deploy::convert`] turns it into an [`crate::deploy::IntModel`] that runs on
//! codes on any backend: [`to_net`].

use std::collections::HashMap;

use ndarray::{Array1, Array2, Ix2, Ix4};

use super::fold::activation_of;
use super::model::{Graph, Node, Op, Tensor};
use crate::deploy::{Net, ValueId};
use crate::error::{Error, Result};
use crate::ops::{Activation, Conv2d, Conv2dParams, PadMode};

fn no_int_form(graph: &Graph, i: usize, why: &str) -> Error {
    Error::UnsupportedOnnxOp {
        node: graph.node_label(i),
        op_type: graph.nodes[i].op.op_type().into(),
        reason: format!("no integer form in qfuse::deploy: {why}"),
    }
}

fn constant<'a>(graph: &'a Graph, node: &Node, i: usize) -> Option<&'a ndarray::ArrayD<f32>> {
    node.input(i).and_then(|n| graph.f32_initializer(n))
}

/// The deployment graph of `graph`: Conv (2-D, symmetric pads, groups / depthwise),
/// BatchNormalization after a conv, Relu and Clip(0, 6) after a conv, Gemm or Add whose only
/// consumer they are, Gemm (`alpha = beta = 1`, untransposed A, constant weight), MaxPool
/// (2-D, symmetric pads, no dilation, floor), GlobalAveragePool, HardSwish and LeakyRelu
/// (activation nodes: code tables), Flatten (axis 1), Reshape to `[0, -1]` or `[-1, K]` (a
/// flatten), Add of two computed values, Identity; one graph input, one output.
///
/// Errors: [`Error::UnsupportedOnnxOp`] naming the first node without an integer form, and
/// the checks of [`Net`]'s builders. A Reshape taken as a flatten is checked by the caller
/// (compare [`Net::forward_values`] with [`super::run`] on a sample, as `qfuse quantize
/// --int-model` does).
pub fn to_net(graph: &Graph) -> Result<Net> {
    net_of(graph).map(|(net, _)| net)
}

/// [`to_net`] and, for each of the net's values, the graph values that carry it, in graph
/// order (a conv's value is also its BatchNorm's and its ReLU's output when they merge into
/// it; a QDQ export quantizes the last).
fn net_of(graph: &Graph) -> Result<(Net, Vec<Vec<String>>)> {
    let [input] = graph.inputs.as_slice() else {
        return Err(Error::invalid(format!(
            "a deployment net has one input; the graph has {}",
            graph.inputs.len()
        )));
    };
    let [output] = graph.outputs.as_slice() else {
        return Err(Error::invalid(format!(
            "a deployment net has one output; the graph has {}",
            graph.outputs.len()
        )));
    };
    let uses = graph.use_counts();
    let mut net = Net::new();
    let mut values: HashMap<&str, ValueId> = HashMap::new();
    values.insert(input.name.as_str(), net.input());
    let value = |values: &HashMap<&str, ValueId>, i: usize, name: Option<&str>| {
        name.and_then(|n| values.get(n).copied())
            .ok_or_else(|| no_int_form(graph, i, "an input is not a computed value"))
    };
    for (i, n) in graph.nodes.iter().enumerate() {
        let label = graph.node_label(i);
        let x = value(&values, i, n.input(0));
        let y = match &n.op {
            Op::Conv(a) => {
                let w = constant(graph, n, 1)
                    .ok_or_else(|| no_int_form(graph, i, "the weight is not constant"))?;
                let w = w
                    .clone()
                    .into_dimensionality::<Ix4>()
                    .map_err(|_| no_int_form(graph, i, "only 2-D convs"))?;
                let two = |v: &[usize], d: usize| -> [usize; 2] {
                    if v.is_empty() {
                        [d, d]
                    } else {
                        [v[0], v[1]]
                    }
                };
                let pads = if a.pads.is_empty() {
                    vec![0; 4]
                } else {
                    a.pads.clone()
                };
                if pads.len() != 4 || pads[0] != pads[2] || pads[1] != pads[3] {
                    return Err(no_int_form(graph, i, "asymmetric pads"));
                }
                let bias = match n.input(2) {
                    Some(_) => Some(Array1::from_iter(
                        constant(graph, n, 2)
                            .ok_or_else(|| no_int_form(graph, i, "the bias is not constant"))?
                            .iter()
                            .copied(),
                    )),
                    None => None,
                };
                let conv = Conv2d {
                    weight: w,
                    bias,
                    params: Conv2dParams {
                        stride: two(&a.strides, 1),
                        padding: [pads[0], pads[1]],
                        dilation: two(&a.dilations, 1),
                        groups: a.group,
                        pad_mode: PadMode::Explicit,
                    },
                };
                net.conv(&label, conv, x?)?
            }
            Op::BatchNormalization { .. } => {
                let bn = n.batch_norm(|k, _| {
                    Ok(Array1::from_iter(
                        constant(graph, n, k)
                            .ok_or_else(|| no_int_form(graph, i, "statistics not constant"))?
                            .iter()
                            .copied(),
                    ))
                })?;
                let x = x?;
                single_consumer(graph, &uses, i, n)?;
                net.batch_norm(x, bn)?
            }
            Op::Relu | Op::Clip => {
                let act = activation_of(graph, n)
                    .or_else(|| {
                        // Clip with min 0 and no max is a ReLU.
                        (matches!(n.op, Op::Clip)
                            && n.input(2).is_none()
                            && constant(graph, n, 1).is_some_and(|c| c.iter().all(|&v| v == 0.0)))
                        .then_some(Activation::Relu)
                    })
                    .filter(|a| matches!(a, Activation::Relu | Activation::Relu6))
                    .ok_or_else(|| no_int_form(graph, i, "only ReLU and Clip(0, 6)"))?;
                let x = x?;
                single_consumer(graph, &uses, i, n)?;
                net.activation(x, act)?
            }
            Op::Gemm {
                alpha,
                beta,
                trans_a,
                trans_b,
            } => {
                if *alpha != 1.0 || *beta != 1.0 || *trans_a {
                    return Err(no_int_form(graph, i, "alpha, beta 1 and transA 0 only"));
                }
                let w = constant(graph, n, 1)
                    .ok_or_else(|| no_int_form(graph, i, "the weight is not constant"))?
                    .clone()
                    .into_dimensionality::<Ix2>()
                    .map_err(|_| no_int_form(graph, i, "the weight is not 2-D"))?;
                let w: Array2<f32> = if *trans_b { w } else { w.t().to_owned() };
                let bias = match n.input(2) {
                    Some(_) => {
                        let b = constant(graph, n, 2)
                            .ok_or_else(|| no_int_form(graph, i, "the bias is not constant"))?;
                        if b.len() != w.nrows() {
                            return Err(no_int_form(graph, i, "the bias is not [out]"));
                        }
                        Some(Array1::from_iter(b.iter().copied()))
                    }
                    None => None,
                };
                net.linear(&label, w, bias, x?)?
            }
            Op::MaxPool(p) => {
                let k = &p.kernel_shape;
                let s = if p.strides.is_empty() {
                    vec![1; k.len()]
                } else {
                    p.strides.clone()
                };
                let pads = if p.pads.is_empty() {
                    vec![0; 2 * k.len()]
                } else {
                    p.pads.clone()
                };
                if k.len() != 2
                    || s.len() != 2
                    || pads.len() != 4
                    || pads[0] != pads[2]
                    || pads[1] != pads[3]
                    || p.dilations.iter().any(|&d| d != 1)
                    || p.ceil_mode
                {
                    return Err(no_int_form(
                        graph,
                        i,
                        "MaxPool 2-D with symmetric pads, no dilation, floor mode",
                    ));
                }
                if pads.iter().all(|&v| v == 0) && k[0] == k[1] && s[0] == s[1] {
                    net.max_pool2d(&label, k[0], s[0], x?)?
                } else {
                    let pool = crate::ops::Pool2d {
                        kernel: [k[0], k[1]],
                        stride: [s[0], s[1]],
                        padding: [pads[0], pads[1]],
                    };
                    net.max_pool2d_pad(&label, pool, x?)?
                }
            }
            Op::GlobalAveragePool => net.global_avg_pool(&label, x?)?,
            Op::HardSwish => net.activation_node(&label, Activation::Hardswish, x?)?,
            Op::LeakyRelu { alpha } => net.activation_node(
                &label,
                Activation::LeakyRelu {
                    negative_slope: *alpha,
                },
                x?,
            )?,
            Op::Flatten { axis: 1 } => net.flatten(&label, x?)?,
            Op::Reshape { allow_zero: false } => {
                let shape = n.input(1).and_then(|s| graph.initializers.get(s));
                let flat = matches!(shape, Some(Tensor::I64(s))
                    if s.len() == 2 && (s[[0]] == 0 && s[[1]] == -1 || s[[0]] == -1 && s[[1]] > 0));
                if !flat {
                    return Err(no_int_form(
                        graph,
                        i,
                        "only a Reshape to [0, -1] or [-1, K]",
                    ));
                }
                net.flatten(&label, x?)?
            }
            Op::Add => {
                let b = value(&values, i, n.input(1))?;
                net.add(&label, x?, b)?
            }
            Op::Identity => x?,
            _ => return Err(no_int_form(graph, i, "not among the deployable ops")),
        };
        values.insert(n.outputs[0].as_str(), y);
    }
    let out = values
        .get(output.as_str())
        .copied()
        .ok_or_else(|| Error::invalid("the graph output is not a computed value"))?;
    net.set_output(out)?;
    let mut names: Vec<Vec<String>> = vec![Vec::new(); net.value_count()];
    names[net.input()].push(input.name.clone());
    for n in &graph.nodes {
        if let Some(&v) = values.get(n.outputs[0].as_str()) {
            names[v].push(n.outputs[0].clone());
        }
    }
    Ok((net, names))
}

/// A BatchNorm or activation merges into its producer: the producer's output must have no
/// other reader.
fn single_consumer(graph: &Graph, uses: &HashMap<&str, usize>, i: usize, n: &Node) -> Result<()> {
    let x = n.input(0).unwrap_or("");
    if uses.get(x).copied().unwrap_or(0) != 1 {
        return Err(no_int_form(
            graph,
            i,
            "its input is also read elsewhere, so it cannot merge into the layer before it",
        ));
    }
    Ok(())
}

/// The integer model of an ONNX graph (fold its BatchNorms first, [`super::fold_model`]):
/// [`to_int_model_with`] with [`crate::deploy::DeployConfig::default`] and min/max
/// observers.
///
/// Errors: those of [`to_int_model_with`].
pub fn to_int_model<B: crate::backend::Backend>(
    backend: &B,
    graph: &Graph,
    batches: &[Vec<(String, ndarray::ArrayD<f32>)>],
) -> Result<crate::deploy::IntModel> {
    to_int_model_with(
        backend,
        graph,
        batches,
        &crate::deploy::DeployConfig::default(),
        None,
    )
}

/// The integer model of an ONNX graph (fold its BatchNorms first, [`super::fold_model`]):
/// [`to_net`], a check that the net computes the graph's output on the first calibration
/// batch (within `1e-4` relative: a Reshape taken as a flatten must be one), then the
/// conversion with `config`, calibrated on `backend`'s tensors
/// ([`crate::deploy::calibrate_prepared`]: the net's parameters placed once, one upload per
/// batch, each observer downloaded once; `averaging_constant` as [`crate::backend::QuantOps::observe_running`]
/// takes it, `None` for min/max).
///
/// Errors: those of [`to_net`], [`super::run`] and [`crate::deploy::convert_with_ranges`];
/// [`Error::InvalidArgument`] when the net and the graph disagree or no batch is given.
pub fn to_int_model_with<B: crate::backend::Backend>(
    backend: &B,
    graph: &Graph,
    batches: &[Vec<(String, ndarray::ArrayD<f32>)>],
    config: &crate::deploy::DeployConfig,
    averaging_constant: Option<f32>,
) -> Result<crate::deploy::IntModel> {
    config.validate()?;
    let net = to_net(graph)?;
    let sample = batches
        .first()
        .ok_or_else(|| Error::invalid("the integer model needs a calibration batch"))?;
    // The net is placed on the backend once: checked on its output alone, then calibrated.
    let dnet = check_net(backend, graph, &net, sample)?;
    let ranges = crate::deploy::calibrate_prepared(
        &net,
        &dnet,
        batches.iter().filter_map(|b| b.first().map(|(_, x)| x)),
        &config.activation,
        averaging_constant,
    )?;
    crate::deploy::convert_with_ranges(&net, &crate::backend::CpuBackend, &ranges, config)
}

/// The integer model of a QDQ export's graph with the export's own activation qparams
/// (`qfuse quantize --int-model`: calibrated once, so the QDQ file and the integer model
/// share every scale and zero point): [`to_net`] of [`super::QuantizedModel::float_model`],
/// the same check as [`to_int_model_with`] on `sample` (one calibration batch), then
/// [`crate::deploy::convert_with_qparams`] with each value's qparams from
/// [`super::QuantizedModel::activations`] (a value carried by several graph values — a conv
/// and its ReLU — takes the last one's that has qparams), weights quantized with `config`.
///
/// Errors: those of [`to_net`], [`super::run`] and [`crate::deploy::convert_with_qparams`]
/// (a value the integer model requantizes that the export left float, named);
/// [`Error::InvalidArgument`] when the net and the graph disagree.
pub fn to_int_model_from<B: crate::backend::Backend>(
    backend: &B,
    quantized: &super::QuantizedModel,
    sample: &[(String, ndarray::ArrayD<f32>)],
    config: &crate::deploy::DeployConfig,
) -> Result<crate::deploy::IntModel> {
    config.validate()?;
    let graph = &quantized.float_model.graph;
    let (net, names) = net_of(graph)?;
    check_net(backend, graph, &net, sample)?;
    let qparams: Vec<Option<crate::quant::QParams>> = names
        .iter()
        .map(|aliases| {
            aliases
                .iter()
                .rev()
                .find_map(|n| quantized.activations.get(n).cloned())
        })
        .collect();
    crate::deploy::convert_with_qparams(&net, &crate::backend::CpuBackend, &qparams, config)
}

/// Whether `net` computes `graph`'s output on `sample` (within `1e-4` relative: a Reshape
/// taken as a flatten must be one), the net placed on `backend` once; returns it placed.
fn check_net<B: crate::backend::Backend>(
    backend: &B,
    graph: &Graph,
    net: &Net,
    sample: &[(String, ndarray::ArrayD<f32>)],
) -> Result<crate::deploy::DeviceNet<B>> {
    let first = sample
        .first()
        .ok_or_else(|| Error::invalid("the integer model needs a calibration batch"))?;
    let want = super::run(backend, graph, sample)?;
    let dnet = crate::deploy::DeviceNet::prepare(net, backend.clone(), true)?;
    let got = &dnet.forward(&first.1)?;
    let want = &want[0].1;
    let scale = want.iter().fold(1.0f32, |a, v| a.max(v.abs()));
    let agree = got.shape() == want.shape()
        && got
            .iter()
            .zip(want)
            .all(|(a, b)| (a - b).abs() <= 1e-4 * scale);
    if !agree {
        return Err(Error::invalid(
            "the deployment net does not compute the graph's output (a Reshape that is not a \
             flatten?)",
        ));
    }
    Ok(dnet)
}

/// The one [`crate::deploy::DeployConfig`] of an NNI-style `config_list`, for an integer
/// model: qfuse's [`crate::deploy::IntModel`] has no mixed precision (every conv and linear
/// runs on int8 codes with one activation and one weight setting), so every entry must give
/// the same `quant_dtype`, `quant_scheme` and `granularity`, target all of `_input_`,
/// `weight` and `_output_` (`target_names` empty or naming them), and the setting must be one
/// integer kernels run ([`crate::deploy::DeployConfig::validate`]: signed codes, symmetric
/// weights). Whether the config selects every layer is the caller's to check (the QDQ
/// export's [`super::QuantizedModel::left_float`]).
///
/// Errors: [`Error::InvalidArgument`] saying which entry differs or which setting integer
/// kernels cannot run.
pub fn deploy_config_of(config: &crate::config::ConfigList) -> Result<crate::deploy::DeployConfig> {
    use crate::nn::QuantTarget;
    let first = config
        .0
        .first()
        .ok_or_else(|| Error::invalid("the config_list is empty"))?;
    for (k, e) in config.0.iter().enumerate() {
        if (&e.quant_dtype, &e.quant_scheme, &e.granularity)
            != (&first.quant_dtype, &first.quant_scheme, &first.granularity)
        {
            return Err(Error::invalid(format!(
                "config_list[{k}] differs from config_list[0] in quant_dtype, quant_scheme or \
                 granularity: an integer model has one setting for every layer (mixed \
                 precision stays in the QDQ export)"
            )));
        }
        let ts = e.targets()?;
        for t in [QuantTarget::Input, QuantTarget::Weight, QuantTarget::Output] {
            if !ts.is_empty() && !ts.contains(&t) {
                return Err(Error::invalid(format!(
                    "config_list[{k}] leaves `{t}` float: an integer model quantizes the input, \
                     weight and output of every layer"
                )));
            }
        }
    }
    let mut weight = first.observer("weight")?;
    weight.axis = 0;
    let cfg = crate::deploy::DeployConfig {
        activation: first.observer("_output_")?,
        weight,
        ..crate::deploy::DeployConfig::default()
    };
    cfg.validate().map_err(|e| match e {
        Error::InvalidArgument(m) => {
            Error::invalid(format!("config_list[0] for an integer model: {m}"))
        }
        other => other,
    })?;
    Ok(cfg)
}
