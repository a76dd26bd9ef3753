//! The float evaluator of an imported ONNX [`Graph`] on any [`Backend`]'s own tensors
//! ([`DeviceGraph`]; [`run`] / [`run_observed`] on host arrays through it): every value a
//! node computes stays on the backend, and the parameters (conv / linear weights and biases,
//! BatchNorm statistics, constant operands of Add / Mul / Concat, QDQ qparams) are placed
//! there once. Values computed from initializers alone (Identity and DequantizeLinear of
//! initializers: shared BatchNorm tensors, int8 QDQ weights) are folded once at prepare.
//! Convs (asymmetric pads zero-padded first), ConvTranspose, BatchNormalization, ReLU / ReLU6
//! / LeakyReLU / HardSwish, Gemm (a linear layer: `alpha` scales the constant weight, `beta` the
//! 1-D bias) and 2-D MatMul with a constant weight, 2-D
//! MaxPool and AveragePool (pads, strides, dilations, `ceil_mode`, `count_include_pad`),
//! GlobalAveragePool, Add and Mul with numpy broadcasting, Concat, Flatten, Reshape, Identity
//! and QuantizeLinear → DequantizeLinear pairs (one fake-quant op with ONNX's rounding) run
//! on the backend; the rest — Clips other than ReLU / ReLU6, Gemms with a transposed A, a
//! computed B or a 2-D C, asymmetric ConvTranspose pads (an
//! error), a QuantizeLinear whose codes something else reads — runs on the host (its inputs
//! downloaded, its output uploaded when a backend op reads it), through the same code as the
//! host-array form. On [`crate::CpuBackend`] both forms are the CPU reference's ops, bit for
//! bit.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;

use ndarray::{Array1, Array2, Array4, ArrayD, Ix2, Ix4, IxDyn};

use super::fold::activation_of;
use super::model::{ConvAttrs, Graph, Node, Op, PoolAttrs, Tensor};
use crate::backend::{Backend, HostOps, Shaped};
use crate::error::{Error, Result};
use crate::io::text::escape;
use crate::limits::check_elements;
use crate::ops::{
    Activation, BatchNorm, BinaryOp, Conv2dParams, ConvTranspose2dParams, PadMode, PoolMode,
    PoolWindow,
};
use crate::quant::{QParams, QuantRange};
use crate::reference::fake_quant::{dequantize_linear_scalar, quantize_linear_scalar};
use crate::reference::layers::{broadcast_binary, concat, global_avg_pool2d, pool2d, zero_pad2d};

/// Runs `graph` on `backend` with the given inputs (by name, every graph input) and returns
/// the graph's outputs, in order, as float arrays: each input is one upload and each output
/// one download ([`DeviceGraph`] on host arrays).
///
/// Errors: [`Error::MissingTensor`] for an input not given, [`Error::ShapeMismatch`] for an
/// input whose static dims disagree, and, naming the node, any op's error (shapes that do not
/// fit, an integer tensor where a float one is needed, attributes the evaluator does not
/// support such as asymmetric ConvTranspose pads or MatMul of rank > 2).
pub fn run<B: Backend>(
    backend: &B,
    graph: &Graph,
    inputs: &[(String, ArrayD<f32>)],
) -> Result<Vec<(String, ArrayD<f32>)>> {
    run_observed(backend, graph, inputs, &mut |_, _| Ok(()))
}

/// [`run`], calling `observe(name, value)` on every graph input and every float value a node
/// computes, as it is computed, where it lives ([`Observed`]; calibration observers reduce
/// it there). An error from `observe` stops the run.
///
/// Errors: those of [`run`], and `observe`'s.
pub fn run_observed<B: Backend>(
    backend: &B,
    graph: &Graph,
    inputs: &[(String, ArrayD<f32>)],
    observe: &mut dyn FnMut(&str, Observed<'_, B>) -> Result<()>,
) -> Result<Vec<(String, ArrayD<f32>)>> {
    let dg = DeviceGraph::prepare(graph, backend.clone())?;
    let dev = dg.upload_inputs(inputs)?;
    dg.run_observed(&dev, observe)?
        .iter()
        .map(|(name, t)| Ok((name.clone(), backend.download(t)?)))
        .collect()
}

/// A float value as an observer sees it: on the backend (what backend ops computed) or on
/// the host (what the host-side ops computed).
pub enum Observed<'a, B: Backend> {
    /// A tensor on the backend.
    Device(&'a B::Tensor),
    /// A host array.
    Host(&'a ArrayD<f32>),
}

/// A value during a run: on the backend, or a host tensor (integer codes, or the output of a
/// host-side op).
enum Val<B: Backend> {
    Dev(B::Tensor),
    Host(Tensor),
    /// A QuantizeLinear's int8 codes, kept as the float input on the backend (node `usize`
    /// quantizes it): a DequantizeLinear with the same qparams reads it as one fake-quant op
    /// on the backend; anything else downloads the input and quantizes it on the host.
    Quant(B::Tensor, usize),
}

/// The values of a run, and the host values uploaded / device values downloaded so far
/// (each crosses at most once).
struct Values<'g, B: Backend> {
    map: HashMap<&'g str, Val<B>>,
    up: RefCell<HashMap<String, B::Tensor>>,
    down: RefCell<HashMap<String, ArrayD<f32>>>,
}

/// A node's constant parameters, placed on the backend in the form its op reads.
struct Params<B: Backend> {
    /// Conv / ConvTranspose: 4-D (a 1-D conv's `[O, C, L]` as `[O, C, 1, L]`); Gemm and
    /// MatMul: `[out, in]`.
    weight: Option<B::Tensor>,
    /// A 1-D bias.
    bias: Option<B::Tensor>,
    /// BatchNormalization's scale, bias, mean and variance.
    bn: Option<BatchNorm<B::Tensor>>,
    /// QuantizeLinear / DequantizeLinear with constant qparams (int8 or uint8 zero points,
    /// per tensor or along a non-negative axis): the host qparams with their code range, and
    /// the backend's qparams.
    qdq: Option<((QParams, QuantRange), B::QParams)>,
    /// A constant folded at prepare (every input constant: Identity or DequantizeLinear of
    /// initializers); the node does not run.
    folded: bool,
}

/// An imported graph prepared on a backend: the constant parameters of its nodes placed
/// once, then any number of runs on the backend's tensors.
///
/// ```no_run
/// use qfuse::onnx::{DeviceGraph, OnnxModel};
/// use qfuse::backend::Device;
/// # fn main() -> qfuse::Result<()> {
/// let model = OnnxModel::load("model.onnx".as_ref())?;
/// let dg = DeviceGraph::prepare(&model.graph, qfuse::CpuBackend)?;
/// let x = ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[1, 3, 32, 32]));
/// let inputs = dg.upload_inputs(&[(model.graph.inputs[0].name.clone(), x)])?;
/// let outputs = dg.run_device(&inputs)?; // (name, tensor on the backend)
/// let y = dg.backend().download(&outputs[0].1)?;
/// # let _ = y; Ok(()) }
/// ```
pub struct DeviceGraph<'g, B: Backend> {
    backend: B,
    graph: &'g Graph,
    params: Vec<Params<B>>,
    /// Values computed from initializers alone, once at prepare (Identity and
    /// DequantizeLinear of initializers: shared BatchNorm tensors, QDQ weights).
    folded: HashMap<String, Tensor>,
    /// Float constants (initializers and folded values) that backend ops read as operands
    /// (Add, Mul, Concat), placed once.
    consts: HashMap<String, B::Tensor>,
}

/// The constant named `name`: an initializer, or a value folded at prepare.
fn constant<'a>(
    graph: &'a Graph,
    folded: &'a HashMap<String, Tensor>,
    name: &str,
) -> Option<&'a Tensor> {
    graph.initializers.get(name).or_else(|| folded.get(name))
}

/// The QDQ qparams and code range of node `n` when its scale and zero point are constants
/// ONNX's QuantizeLinear / DequantizeLinear take (a scalar or 1-D scale, int8 or uint8 zero
/// points), per tensor or along a non-negative axis; `None` otherwise (the host form
/// decides).
fn qdq_qparams(
    graph: &Graph,
    folded: &HashMap<String, Tensor>,
    n: &Node,
    axis: i64,
) -> Option<(QParams, QuantRange)> {
    let scale = constant(graph, folded, n.input(1)?)?.as_f32()?;
    let (zp, range): (ArrayD<i32>, _) = match constant(graph, folded, n.input(2)?)? {
        Tensor::I8(z) => (z.mapv(i32::from), QuantRange::INT8),
        Tensor::U8(z) => (z.mapv(i32::from), QuantRange::UINT8),
        _ => return None,
    };
    if scale.ndim() > 1 || zp.len() != scale.len() || scale.is_empty() {
        return None;
    }
    let zps: Vec<i32> = zp.iter().copied().collect();
    let scales: Vec<f32> = scale.iter().copied().collect();
    let qp = if scales.len() == 1 {
        QParams::per_tensor(scales[0], zps[0])
    } else {
        QParams::per_channel(scales, zps, usize::try_from(axis).ok()?).ok()?
    };
    Some((qp, range))
}

impl<'g, B: Backend> DeviceGraph<'g, B> {
    /// Places the constant parameters of `graph`'s nodes on `backend` (one upload each).
    ///
    /// Errors: backend errors.
    pub fn prepare(graph: &'g Graph, backend: B) -> Result<Self> {
        // Constant folding: Identity and DequantizeLinear nodes whose inputs are all
        // constants, evaluated once on the host.
        let mut folded: HashMap<String, Tensor> = HashMap::new();
        let mut is_folded = vec![false; graph.nodes.len()];
        for (i, n) in graph.nodes.iter().enumerate() {
            let all_const = n
                .inputs
                .iter()
                .filter(|s| !s.is_empty())
                .all(|s| constant(graph, &folded, s).is_some());
            if all_const
                && !n.inputs.is_empty()
                && matches!(n.op, Op::Identity | Op::DequantizeLinear { .. })
            {
                let local: HashMap<&str, Tensor> = n
                    .inputs
                    .iter()
                    .filter_map(|s| Some((s.as_str(), folded.get(s)?.clone())))
                    .collect();
                let v = eval_node(&backend, graph, &local, n).map_err(|e| Error::OnnxNode {
                    node: graph.node_label(i),
                    op_type: n.op.op_type(),
                    source: Box::new(e),
                })?;
                folded.insert(n.outputs[0].clone(), v);
                is_folded[i] = true;
            }
        }
        let folded_ref = &folded;
        let konst = |n: &Node, i: usize| {
            n.input(i)
                .and_then(|s| constant(graph, folded_ref, s)?.as_f32())
        };
        let vec1 = |n: &Node, i: usize| konst(n, i).filter(|a| a.ndim() == 1);
        let mut params = Vec::with_capacity(graph.nodes.len());
        for n in &graph.nodes {
            let mut p = Params::<B> {
                weight: None,
                bias: None,
                bn: None,
                qdq: None,
                folded: is_folded[params.len()],
            };
            let up = |a: &ArrayD<f32>| backend.upload(a);
            match &n.op {
                Op::Conv(_) | Op::ConvTranspose(_) => {
                    if let Some(w) = konst(n, 1).filter(|w| w.ndim() == 3 || w.ndim() == 4) {
                        let s = w.shape();
                        p.weight = Some(if w.ndim() == 3 {
                            up(&reshape(w, &[s[0], s[1], 1, s[2]])?)?
                        } else {
                            up(w)?
                        });
                    }
                    if n.input(2).is_none() || vec1(n, 2).is_some() {
                        p.bias = vec1(n, 2).map(up).transpose()?;
                    } else {
                        p.weight = None;
                    }
                }
                // Constant 1-D statistics: placed once (else the host form reads them).
                Op::BatchNormalization { .. } if (1..5).all(|i| vec1(n, i).is_some()) => {
                    p.bn = Some(n.batch_norm(|i, what| {
                        vec1(n, i)
                            .ok_or_else(|| Error::invalid(format!("BatchNorm {what}")))
                            .and_then(up)
                    })?);
                }
                Op::Gemm {
                    alpha,
                    beta,
                    trans_a: false,
                    trans_b,
                } => {
                    if let Some(w) = konst(n, 1).filter(|w| w.ndim() == 2) {
                        if n.input(2).is_none() || vec1(n, 2).is_some() {
                            let w = two_d(w, "B")?;
                            let w = if *trans_b { w } else { w.t().to_owned() };
                            let (w, bias) = gemm_linear(*alpha, *beta, w, vec1(n, 2));
                            p.weight = Some(up(&w.into_dyn())?);
                            p.bias = bias.map(|c| up(&c.into_dyn())).transpose()?;
                        }
                    }
                }
                Op::MatMul => {
                    if let Some(w) = konst(n, 1).filter(|w| w.ndim() == 2) {
                        p.weight = Some(up(&two_d(w, "B")?.t().to_owned().into_dyn())?);
                    }
                }
                Op::QuantizeLinear { axis } | Op::DequantizeLinear { axis } if !p.folded => {
                    if let Some((qp, range)) = qdq_qparams(graph, folded_ref, n, *axis) {
                        let dev = backend.upload_qparams(&qp)?;
                        p.qdq = Some(((qp, range), dev));
                    }
                }
                _ => {}
            }
            params.push(p);
        }
        // Float constant operands of Add, Mul and Concat, placed once.
        let mut consts = HashMap::new();
        for n in &graph.nodes {
            if matches!(n.op, Op::Add | Op::Mul | Op::Concat { .. }) {
                for s in n.inputs.iter().filter(|s| !s.is_empty()) {
                    if consts.contains_key(s) {
                        continue;
                    }
                    if let Some(a) = constant(graph, &folded, s).and_then(Tensor::as_f32) {
                        consts.insert(s.clone(), backend.upload(a)?);
                    }
                }
            }
        }
        Ok(Self {
            backend,
            graph,
            params,
            folded,
            consts,
        })
    }

    /// The backend the graph runs on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The graph.
    pub fn graph(&self) -> &'g Graph {
        self.graph
    }

    /// Checks host inputs against the graph's inputs (every one given, static dims equal)
    /// and uploads them, in the graph's input order.
    ///
    /// Errors: [`Error::MissingTensor`], [`Error::ShapeMismatch`], backend errors.
    pub fn upload_inputs(
        &self,
        inputs: &[(String, ArrayD<f32>)],
    ) -> Result<Vec<(String, B::Tensor)>> {
        self.graph
            .inputs
            .iter()
            .map(|v| {
                let (_, x) = inputs.iter().find(|(n, _)| *n == v.name).ok_or_else(|| {
                    Error::MissingTensor {
                        name: v.name.clone(),
                        context: " (a graph input)".into(),
                    }
                })?;
                self.check_input(&v.name, x.shape())?;
                Ok((v.name.clone(), self.backend.upload(x)?))
            })
            .collect()
    }

    fn check_input(&self, name: &str, dims: &[usize]) -> Result<()> {
        let Some(v) = self.graph.inputs.iter().find(|v| v.name == name) else {
            return Ok(());
        };
        let ok = v.shape.is_empty()
            || (v.shape.len() == dims.len()
                && v.shape
                    .iter()
                    .zip(dims)
                    .all(|(d, &s)| d.is_none_or(|d| d == s)));
        if !ok {
            let expected: Vec<usize> = v.shape.iter().map(|d| d.unwrap_or(0)).collect();
            return Err(Error::shape(
                format!("graph input `{}` (0 = any size)", escape(&v.name)),
                &expected,
                dims,
            ));
        }
        Ok(())
    }

    /// Runs the graph on inputs already on the backend (by name, every graph input);
    /// returns the graph's outputs, in order, on the backend.
    ///
    /// Errors: as [`run`].
    pub fn run_device(&self, inputs: &[(String, B::Tensor)]) -> Result<Vec<(String, B::Tensor)>> {
        self.run_observed(inputs, &mut |_, _| Ok(()))
    }

    /// [`DeviceGraph::run_device`] with an observer, as [`run_observed`].
    ///
    /// Errors: as [`run_observed`].
    pub fn run_observed(
        &self,
        inputs: &[(String, B::Tensor)],
        observe: &mut dyn FnMut(&str, Observed<'_, B>) -> Result<()>,
    ) -> Result<Vec<(String, B::Tensor)>> {
        let graph = self.graph;
        let mut values = Values {
            map: HashMap::new(),
            up: RefCell::new(HashMap::new()),
            down: RefCell::new(HashMap::new()),
        };
        for v in &graph.inputs {
            let (_, x) =
                inputs
                    .iter()
                    .find(|(n, _)| *n == v.name)
                    .ok_or_else(|| Error::MissingTensor {
                        name: v.name.clone(),
                        context: " (a graph input)".into(),
                    })?;
            self.check_input(&v.name, x.dims())?;
            observe(&v.name, Observed::Device(x))?;
            values.map.insert(v.name.as_str(), Val::Dev(x.clone()));
        }
        for (i, node) in graph.nodes.iter().enumerate() {
            if self.params[i].folded {
                continue;
            }
            let out = self.node(i, &values).map_err(|e| Error::OnnxNode {
                node: graph.node_label(i),
                op_type: node.op.op_type(),
                source: Box::new(e),
            })?;
            match &out {
                Val::Dev(t) => observe(&node.outputs[0], Observed::Device(t))?,
                Val::Host(Tensor::F32(a)) => observe(&node.outputs[0], Observed::Host(a))?,
                Val::Host(_) | Val::Quant(..) => {}
            }
            values.map.insert(node.outputs[0].as_str(), out);
        }
        graph
            .outputs
            .iter()
            .map(|name| {
                let t = match values.map.get(name.as_str()) {
                    Some(Val::Dev(t)) => t.clone(),
                    Some(Val::Host(t)) => self.upload_f32(t, name)?,
                    Some(Val::Quant(x, q)) => {
                        self.upload_f32(&self.quantize_on_host(x, *q, &values)?, name)?
                    }
                    None => match constant(graph, &self.folded, name) {
                        Some(t) => self.upload_f32(t, name)?,
                        None => {
                            return Err(Error::MissingTensor {
                                name: name.clone(),
                                context: String::new(),
                            })
                        }
                    },
                };
                Ok((name.clone(), t))
            })
            .collect()
    }

    fn upload_f32(&self, t: &Tensor, name: &str) -> Result<B::Tensor> {
        let a = t.as_f32().ok_or_else(|| {
            Error::invalid(format!("graph output `{}` is not float", escape(name)))
        })?;
        self.backend.upload(a)
    }

    /// The host codes of QuantizeLinear node `q` whose input `x` is on the backend (the
    /// input downloaded once per run).
    fn quantize_on_host(&self, x: &B::Tensor, q: usize, values: &Values<'_, B>) -> Result<Tensor> {
        let node = &self.graph.nodes[q];
        let name = node.input(0).unwrap_or("");
        let a = self.downloaded(name, x, values)?;
        let mut local: HashMap<&str, Tensor> = HashMap::new();
        local.insert(name, Tensor::F32(a));
        self.add_folded(node, &mut local);
        eval_node(&self.backend, self.graph, &local, node)
    }

    /// Device value `name` on the host, downloaded at most once per run.
    fn downloaded(&self, name: &str, t: &B::Tensor, values: &Values<'_, B>) -> Result<ArrayD<f32>> {
        let mut down = values.down.borrow_mut();
        if !down.contains_key(name) {
            down.insert(name.to_string(), self.backend.download(t)?);
        }
        down.get(name).cloned().ok_or_else(|| internal("down"))
    }

    /// The folded constants `node` reads, into a host node's values.
    fn add_folded<'a>(&'a self, node: &'a Node, local: &mut HashMap<&'a str, Tensor>) {
        for name in node.inputs.iter().filter(|s| !s.is_empty()) {
            if let Some(t) = self.folded.get(name) {
                local.insert(name.as_str(), t.clone());
            }
        }
    }

    /// A float constant (initializer or folded value).
    fn konst(&self, name: &str) -> Option<&ArrayD<f32>> {
        constant(self.graph, &self.folded, name).and_then(Tensor::as_f32)
    }

    /// Input `i` of `node` on the backend (uploaded when it is a host value), or `None` when
    /// it is not a float value.
    fn dev<'v>(
        &'v self,
        values: &'v Values<'_, B>,
        node: &Node,
        i: usize,
    ) -> Result<Option<Cow<'v, B::Tensor>>> {
        let Some(name) = node.input(i) else {
            return Ok(None);
        };
        if let Some(t) = self.consts.get(name) {
            return Ok(Some(Cow::Borrowed(t)));
        }
        Ok(match values.map.get(name) {
            Some(Val::Dev(t)) => Some(Cow::Borrowed(t)),
            Some(Val::Host(Tensor::F32(a))) => {
                // A host value read by several backend ops is uploaded once.
                let mut up = values.up.borrow_mut();
                if !up.contains_key(name) {
                    up.insert(name.to_string(), self.backend.upload(a)?);
                }
                up.get(name).cloned().map(Cow::Owned)
            }
            Some(Val::Host(_)) | Some(Val::Quant(..)) => None,
            None => match self.konst(name) {
                Some(a) => Some(Cow::Owned(self.backend.upload(a)?)),
                None => None,
            },
        })
    }

    /// Node `i`: on the backend when its op and inputs allow, else on the host.
    fn node(&self, i: usize, values: &Values<'_, B>) -> Result<Val<B>> {
        let graph = self.graph;
        let node = &graph.nodes[i];
        let p = &self.params[i];
        let b = &self.backend;
        // Inputs that are computed values (not constants): the first must be a float on the
        // backend or the host for any backend form.
        let computed = |k: usize| node.input(k).is_some_and(|s| values.map.contains_key(s));
        let y = match &node.op {
            Op::Conv(a) | Op::ConvTranspose(a) if p.weight.is_some() && computed(0) => {
                let Some(x) = self.dev(values, node, 0)? else {
                    return self.host(i, values);
                };
                let w = p.weight.as_ref().ok_or_else(|| internal("weight"))?;
                let s = conv_settings(
                    x.dims(),
                    self.konst(node.input(1).unwrap_or(""))
                        .map(|w| w.shape())
                        .unwrap_or(&[]),
                    a,
                )?;
                let transpose = matches!(node.op, Op::ConvTranspose(_));
                let symmetric = s.pads[0] == s.pads[2] && s.pads[1] == s.pads[3];
                if !symmetric && transpose {
                    // Refused by the host form.
                    return self.host(i, values);
                }
                let dims = x.dims().to_vec();
                let x4 = if s.one_d {
                    b.reshape(&x, &[dims[0], dims[1], 1, dims[2]])?
                } else {
                    x.into_owned()
                };
                // Asymmetric conv pads: zero-padded first, as the host form does.
                let (x4, pads) = if symmetric {
                    (x4, s.pads)
                } else {
                    (b.pad2d(&x4, s.pads)?, [0; 4])
                };
                let s = ConvSettings { pads, ..s };
                let y = if transpose {
                    let params = ConvTranspose2dParams {
                        stride: s.stride,
                        padding: [s.pads[0], s.pads[1]],
                        output_padding: s.output_padding,
                        dilation: s.dilation,
                        groups: a.group,
                    };
                    b.conv_transpose2d(&x4, w, p.bias.as_ref(), &params, Activation::None)?
                } else {
                    let params = Conv2dParams {
                        stride: s.stride,
                        padding: [s.pads[0], s.pads[1]],
                        dilation: s.dilation,
                        groups: a.group,
                        pad_mode: PadMode::Explicit,
                    };
                    b.conv2d(&x4, w, p.bias.as_ref(), &params, Activation::None)?
                };
                if s.one_d {
                    let d = y.dims().to_vec();
                    b.reshape(&y, &[d[0], d[1], d[3]])?
                } else {
                    y
                }
            }
            Op::BatchNormalization { .. } if p.bn.is_some() && computed(0) => {
                let Some(x) = self.dev(values, node, 0)? else {
                    return self.host(i, values);
                };
                let bn = p.bn.as_ref().ok_or_else(|| internal("bn"))?;
                let s = x.dims().to_vec();
                if s.len() < 2 {
                    return Err(Error::invalid(format!(
                        "BatchNormalization input must have rank >= 2, got {s:?}"
                    )));
                }
                let rest: usize = s[2..].iter().product();
                let x4 = b.reshape(&x, &[s[0], s[1], rest, 1])?;
                let y = b.batch_norm2d(&x4, bn, false, Activation::None)?.y;
                b.reshape(&y, &s)?
            }
            Op::Relu | Op::LeakyRelu { .. } | Op::HardSwish | Op::Clip if computed(0) => {
                let act = match activation_of(graph, node) {
                    Some(a) => a,
                    None if matches!(node.op, Op::Clip)
                        && node.input(2).is_none()
                        && node
                            .input(1)
                            .and_then(|n| graph.f32_initializer(n))
                            .is_some_and(|c| c.len() == 1 && c.iter().all(|&v| v == 0.0)) =>
                    {
                        Activation::Relu
                    }
                    None => return self.host(i, values),
                };
                let Some(x) = self.dev(values, node, 0)? else {
                    return self.host(i, values);
                };
                b.activation(&x, act)?
            }
            Op::Gemm { .. } | Op::MatMul if p.weight.is_some() && computed(0) => {
                let Some(x) = self.dev(values, node, 0)? else {
                    return self.host(i, values);
                };
                if x.dims().len() != 2 {
                    return self.host(i, values);
                }
                let w = p.weight.as_ref().ok_or_else(|| internal("weight"))?;
                b.linear(&x, w, p.bias.as_ref(), Activation::None)?
            }
            Op::MaxPool(pa) | Op::AveragePool(pa) if computed(0) => {
                let Some(x) = self.dev(values, node, 0)? else {
                    return self.host(i, values);
                };
                let (window, mode) = pool_window(&node.op, pa, x.dims())?;
                let [k, _] = window.kernel;
                let [s, _] = window.stride;
                // Square, unpadded, floor-mode max pooling: the training forward's kernel.
                if mode == PoolMode::Max
                    && window.kernel == [k, k]
                    && window.stride == [s, s]
                    && window.pads == [0; 4]
                    && window.dilation == [1, 1]
                    && !window.ceil_mode
                {
                    b.max_pool2d(&x, k, s)?
                } else {
                    b.pool2d(&x, &window, mode)?
                }
            }
            Op::GlobalAveragePool if computed(0) => {
                let Some(x) = self.dev(values, node, 0)? else {
                    return self.host(i, values);
                };
                let (four, out) = global_pool_shapes(x.dims())?;
                let y = b.global_avg_pool2d(&b.reshape(&x, &four)?)?;
                b.reshape(&y, &out)?
            }
            Op::Add | Op::Mul if computed(0) || computed(1) => {
                let (Some(x), Some(y)) = (self.dev(values, node, 0)?, self.dev(values, node, 1)?)
                else {
                    return self.host(i, values);
                };
                if matches!(node.op, Op::Add) && x.dims() == y.dims() {
                    b.add(&x, &y)?
                } else {
                    let op = if matches!(node.op, Op::Add) {
                        BinaryOp::Add
                    } else {
                        BinaryOp::Mul
                    };
                    b.binary(&x, &y, op)?
                }
            }
            Op::Concat { axis } if (0..node.inputs.len()).any(computed) => {
                let mut parts = Vec::with_capacity(node.inputs.len());
                for k in 0..node.inputs.len() {
                    match self.dev(values, node, k)? {
                        Some(t) => parts.push(t),
                        None => return self.host(i, values),
                    }
                }
                let refs: Vec<&B::Tensor> = parts.iter().map(|t| t.as_ref()).collect();
                b.concat(&refs, *axis)?
            }
            Op::QuantizeLinear { .. } if p.qdq.is_some() && computed(0) => {
                let Some(x) = self.dev(values, node, 0)? else {
                    return self.host(i, values);
                };
                return Ok(Val::Quant(x.into_owned(), i));
            }
            Op::DequantizeLinear { .. } if p.qdq.is_some() => {
                let quant = node.input(0).and_then(|s| values.map.get(s));
                let (Some(Val::Quant(x, q)), Some((qp, dqp))) = (quant, &p.qdq) else {
                    return self.host(i, values);
                };
                // The same qparams and code type on both sides: one fake-quant op on the
                // backend.
                if self.params[*q].qdq.as_ref().map(|(h, _)| h) != Some(qp) {
                    return self.host(i, values);
                }
                b.fake_quant_onnx(x, dqp, qp.1)?
            }
            Op::Flatten { .. } | Op::Reshape { .. } | Op::Identity
                if matches!(
                    node.input(0).and_then(|s| values.map.get(s)),
                    Some(Val::Dev(_))
                ) =>
            {
                let Some(Val::Dev(x)) = node.input(0).and_then(|s| values.map.get(s)) else {
                    return self.host(i, values);
                };
                match &node.op {
                    Op::Identity => x.clone(),
                    Op::Flatten { axis } => b.reshape(x, &flatten_target(x.dims(), *axis)?)?,
                    Op::Reshape { .. }
                        if node.input(1).is_some_and(|s| values.map.contains_key(s)) =>
                    {
                        return self.host(i, values)
                    }
                    Op::Reshape { allow_zero } => {
                        let shape = reshape_shape(graph, node)?;
                        b.reshape(x, &reshape_target(x.dims(), &shape, *allow_zero)?)?
                    }
                    _ => return Err(internal("reshape")),
                }
            }
            _ => return self.host(i, values),
        };
        Ok(Val::Dev(y))
    }

    /// Node `i` on the host: its computed inputs downloaded, then the host-array form.
    fn host(&self, i: usize, values: &Values<'_, B>) -> Result<Val<B>> {
        let node = &self.graph.nodes[i];
        let mut local: HashMap<&str, Tensor> = HashMap::new();
        self.add_folded(node, &mut local);
        for name in node.inputs.iter().filter(|s| !s.is_empty()) {
            match values.map.get(name.as_str()) {
                // A device value read by several host ops is downloaded once.
                Some(Val::Dev(t)) => {
                    local.insert(
                        name.as_str(),
                        Tensor::F32(self.downloaded(name, t, values)?),
                    );
                }
                Some(Val::Host(t)) => {
                    local.insert(name.as_str(), t.clone());
                }
                Some(Val::Quant(x, q)) => {
                    local.insert(name.as_str(), self.quantize_on_host(x, *q, values)?);
                }
                None => {}
            }
        }
        Ok(Val::Host(eval_node(
            &self.backend,
            self.graph,
            &local,
            node,
        )?))
    }
}

fn internal(what: &str) -> Error {
    Error::invalid(format!("internal: {what}"))
}

/// Flatten's `[outer, inner]` target (ONNX: the dims before `axis`, the dims from it).
fn flatten_target(shape: &[usize], axis: i64) -> Result<Vec<usize>> {
    let r = shape.len() as i64;
    let ax = if axis < 0 { axis + r } else { axis };
    if !(0..=r).contains(&ax) {
        return Err(Error::AxisOutOfRange {
            axis: isize::try_from(axis).unwrap_or(isize::MAX),
            rank: shape.len(),
        });
    }
    let ax = ax as usize;
    Ok(vec![
        shape[..ax].iter().product(),
        shape[ax..].iter().product(),
    ])
}

/// Reshape's constant 1-D int64 shape input.
fn reshape_shape(graph: &Graph, node: &Node) -> Result<Vec<i64>> {
    let name = node.input(1).unwrap_or("");
    match graph.initializers.get(name) {
        Some(Tensor::I64(s)) if s.ndim() == 1 => Ok(s.iter().copied().collect()),
        Some(other) => Err(Error::DtypeMismatch {
            name: name.to_string(),
            got: format!("{} {:?}", other.dtype_name(), other.shape()),
            expected: "a 1-D int64 shape".into(),
        }),
        None => Err(Error::MissingTensor {
            name: name.to_string(),
            context: String::new(),
        }),
    }
}

fn lookup<'a>(
    graph: &'a Graph,
    values: &'a HashMap<&str, Tensor>,
    name: &str,
) -> Result<&'a Tensor> {
    values
        .get(name)
        .or_else(|| graph.initializers.get(name))
        .ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            context: String::new(),
        })
}

fn float<'a>(
    graph: &'a Graph,
    values: &'a HashMap<&str, Tensor>,
    node: &Node,
    i: usize,
) -> Result<&'a ArrayD<f32>> {
    let name = node
        .input(i)
        .ok_or_else(|| Error::invalid(format!("input {i} is missing")))?;
    let t = lookup(graph, values, name)?;
    t.as_f32().ok_or_else(|| Error::DtypeMismatch {
        name: name.to_string(),
        got: t.dtype_name().into(),
        expected: "float".into(),
    })
}

fn opt_vec(
    graph: &Graph,
    values: &HashMap<&str, Tensor>,
    node: &Node,
    i: usize,
) -> Result<Option<Array1<f32>>> {
    match node.input(i) {
        None => Ok(None),
        Some(_) => {
            let a = float(graph, values, node, i)?;
            if a.ndim() != 1 {
                return Err(Error::shape(
                    format!("input {i} (a vector)"),
                    &[a.len()],
                    a.shape(),
                ));
            }
            Ok(Some(Array1::from_iter(a.iter().copied())))
        }
    }
}

fn dim4(a: ArrayD<f32>, what: &str) -> Result<Array4<f32>> {
    let shape = a.shape().to_vec();
    a.into_dimensionality::<Ix4>()
        .map_err(|_| Error::invalid(format!("{what} must have rank 4, got shape {shape:?}")))
}

fn scalar(
    graph: &Graph,
    values: &HashMap<&str, Tensor>,
    node: &Node,
    i: usize,
) -> Result<Option<f32>> {
    match node.input(i) {
        None => Ok(None),
        Some(_) => {
            let a = float(graph, values, node, i)?;
            if a.len() != 1 {
                return Err(Error::shape(
                    format!("input {i} (a scalar)"),
                    &[],
                    a.shape(),
                ));
            }
            Ok(a.iter().next().copied())
        }
    }
}

fn eval_node<B: HostOps + ?Sized>(
    backend: &B,
    graph: &Graph,
    values: &HashMap<&str, Tensor>,
    node: &Node,
) -> Result<Tensor> {
    let x = |i| float(graph, values, node, i);
    let y = match &node.op {
        Op::Conv(a) => conv(backend, x(0)?, x(1)?, opt_vec(graph, values, node, 2)?, a)?,
        Op::ConvTranspose(a) => {
            conv_transpose(backend, x(0)?, x(1)?, opt_vec(graph, values, node, 2)?, a)?
        }
        Op::BatchNormalization { .. } => {
            let input = x(0)?;
            let bn = node.batch_norm(|i, _| {
                opt_vec(graph, values, node, i)?
                    .ok_or_else(|| Error::invalid(format!("input {i} is missing")))
            })?;
            batch_norm(backend, input, &bn)?
        }
        Op::Relu | Op::LeakyRelu { .. } | Op::HardSwish => {
            let act = activation_of(graph, node)
                .ok_or_else(|| Error::invalid("internal: not an activation"))?;
            backend.activation(x(0)?, act)?
        }
        Op::Clip => {
            let lo = scalar(graph, values, node, 1)?;
            let hi = scalar(graph, values, node, 2)?;
            match (lo, hi) {
                (Some(l), Some(h)) if l == 0.0 && h == 6.0 => {
                    backend.activation(x(0)?, Activation::Relu6)?
                }
                (Some(0.0), None) => backend.activation(x(0)?, Activation::Relu)?,
                _ => {
                    let (l, h) = (lo.unwrap_or(f32::NEG_INFINITY), hi.unwrap_or(f32::INFINITY));
                    // ONNX Clip: min(max(x, lo), hi); NaN stays NaN.
                    x(0)?.mapv(|v| if v.is_nan() { v } else { v.max(l).min(h) })
                }
            }
        }
        Op::Gemm {
            alpha,
            beta,
            trans_a,
            trans_b,
        } => {
            let a = two_d(x(0)?, "A")?;
            let a = if *trans_a { a.t().to_owned() } else { a };
            let b = two_d(x(1)?, "B")?;
            let w = if *trans_b { b } else { b.t().to_owned() };
            let c = match node.input(2) {
                Some(_) => Some(x(2)?),
                None => None,
            };
            // A 1-D (or no) C: one linear layer, as on the device.
            if c.is_none_or(|c| c.ndim() == 1) {
                let (w, bias) = gemm_linear(*alpha, *beta, w, c);
                backend.linear(&a, &w, bias.as_ref())?.into_dyn()
            } else {
                let y = backend.linear(&a, &w, None)?.into_dyn().mapv(|v| v * alpha);
                match c {
                    None => y,
                    Some(c) => broadcast_binary(&y, &c.mapv(|v| v * beta), BinaryOp::Add)?,
                }
            }
        }
        Op::MatMul => {
            let (a, b) = (x(0)?, x(1)?);
            if a.ndim() != 2 || b.ndim() != 2 {
                return Err(Error::invalid(format!(
                    "MatMul of shapes {:?} and {:?}: qfuse evaluates 2-D MatMul only",
                    a.shape(),
                    b.shape()
                )));
            }
            let b = two_d(b, "B")?;
            backend
                .linear(&two_d(a, "A")?, &b.t().to_owned(), None)?
                .into_dyn()
        }
        Op::MaxPool(p) | Op::AveragePool(p) => {
            let (window, mode) = pool_window(&node.op, p, x(0)?.shape())?;
            pool2d(&dim4(x(0)?.clone(), "pool input")?, &window, mode)?.into_dyn()
        }
        Op::GlobalAveragePool => {
            let a = x(0)?;
            let (four, out) = global_pool_shapes(a.shape())?;
            let y = global_avg_pool2d(&dim4(reshape(a, &four)?, "GlobalAveragePool")?)?;
            reshape(&y.into_dyn(), &out)?
        }
        Op::Add => broadcast_binary(x(0)?, x(1)?, BinaryOp::Add)?,
        Op::Mul => broadcast_binary(x(0)?, x(1)?, BinaryOp::Mul)?,
        Op::Flatten { axis } => {
            let a = x(0)?;
            let r = a.ndim() as i64;
            let ax = if *axis < 0 { axis + r } else { *axis };
            if !(0..=r).contains(&ax) {
                return Err(Error::AxisOutOfRange {
                    axis: isize::try_from(*axis).unwrap_or(isize::MAX),
                    rank: a.ndim(),
                });
            }
            let ax = ax as usize;
            let outer: usize = a.shape()[..ax].iter().product();
            let inner: usize = a.shape()[ax..].iter().product();
            reshape(a, &[outer, inner])?
        }
        Op::Reshape { allow_zero } => {
            let name = node.input(1).unwrap_or("");
            let shape = match lookup(graph, values, name)? {
                Tensor::I64(s) if s.ndim() == 1 => s.iter().copied().collect::<Vec<i64>>(),
                other => {
                    return Err(Error::DtypeMismatch {
                        name: name.to_string(),
                        got: format!("{} {:?}", other.dtype_name(), other.shape()),
                        expected: "a 1-D int64 shape".into(),
                    })
                }
            };
            let a = x(0)?;
            let target = reshape_target(a.shape(), &shape, *allow_zero)?;
            reshape(a, &target)?
        }
        Op::Concat { axis } => {
            let parts = (0..node.inputs.len()).map(x).collect::<Result<Vec<_>>>()?;
            concat(&parts, *axis)?
        }
        Op::Identity => return lookup(graph, values, node.input(0).unwrap_or("")).cloned(),
        Op::QuantizeLinear { axis } => {
            let input = x(0)?;
            // No zero point: ONNX's default, uint8 with zero point 0.
            let zp = match node.input(2) {
                Some(name) => Some(lookup(graph, values, name)?),
                None => None,
            };
            let q = QdqParams::new(input.shape(), x(1)?, zp, *axis)?;
            return match zp {
                Some(Tensor::I8(_)) => Ok(Tensor::I8(
                    q.quantize(input, (-128, 127))?.mapv(|v| v as i8),
                )),
                None | Some(Tensor::U8(_)) => {
                    Ok(Tensor::U8(q.quantize(input, (0, 255))?.mapv(|v| v as u8)))
                }
                Some(other) => Err(Error::invalid(format!(
                    "QuantizeLinear zero point is {}, only int8 and uint8 are supported",
                    other.dtype_name()
                ))),
            };
        }
        Op::DequantizeLinear { axis } => {
            let name = node.input(0).unwrap_or("");
            let input = lookup(graph, values, name)?;
            let zp = match node.input(2) {
                Some(n) => Some(lookup(graph, values, n)?),
                None => None,
            };
            let q = QdqParams::new(input.shape(), x(1)?, zp, *axis)?;
            match input {
                Tensor::I8(a) => q.dequantize(a.mapv(i32::from).view())?,
                Tensor::U8(a) => q.dequantize(a.mapv(i32::from).view())?,
                Tensor::I32(a) => q.dequantize(a.view())?,
                other => {
                    return Err(Error::DtypeMismatch {
                        name: name.to_string(),
                        got: other.dtype_name().into(),
                        expected: "int8, uint8 or int32".into(),
                    })
                }
            }
        }
    };
    Ok(Tensor::F32(y))
}

/// The scales and zero points of a QuantizeLinear / DequantizeLinear, per tensor or per
/// channel along an axis (ONNX: 1-D scales of the axis's length).
struct QdqParams {
    scale: Vec<f32>,
    zero_point: Vec<i32>,
    /// Elements per channel step (the product of the dims after the axis).
    inner: usize,
}

impl QdqParams {
    fn new(shape: &[usize], scale: &ArrayD<f32>, zp: Option<&Tensor>, axis: i64) -> Result<Self> {
        let zero_point: Vec<i32> = match zp {
            None => vec![0; scale.len()],
            Some(Tensor::I8(z)) => z.iter().map(|&v| i32::from(v)).collect(),
            Some(Tensor::U8(z)) => z.iter().map(|&v| i32::from(v)).collect(),
            Some(Tensor::I32(z)) => z.iter().copied().collect(),
            Some(other) => {
                return Err(Error::invalid(format!(
                    "zero point of type {} is not supported",
                    other.dtype_name()
                )))
            }
        };
        if zero_point.len() != scale.len() {
            return Err(Error::shape(
                "zero point",
                scale.shape(),
                &[zero_point.len()],
            ));
        }
        let scale_v: Vec<f32> = scale.iter().copied().collect();
        if let Some(i) = scale_v.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(Error::InvalidScale {
                scale: scale_v[i],
                channel: i,
            });
        }
        let inner =
            if scale.ndim() == 0 || (scale.ndim() == 1 && scale.len() == 1 && shape.is_empty()) {
                1
            } else if scale.ndim() == 1 {
                let r = shape.len() as i64;
                let ax = if axis < 0 { axis + r } else { axis };
                if !(0..r).contains(&ax) {
                    return Err(Error::AxisOutOfRange {
                        axis: isize::try_from(axis).unwrap_or(isize::MAX),
                        rank: shape.len(),
                    });
                }
                let ax = ax as usize;
                if shape[ax] != scale.len() && scale.len() != 1 {
                    return Err(Error::shape("per-axis scale", &[shape[ax]], scale.shape()));
                }
                if scale.len() == 1 {
                    1
                } else {
                    shape[ax + 1..].iter().product()
                }
            } else {
                return Err(Error::invalid(format!(
                    "scale of shape {:?}: only scalar and 1-D scales are supported",
                    scale.shape()
                )));
            };
        Ok(Self {
            scale: scale_v,
            zero_point,
            inner: inner.max(1),
        })
    }

    fn channel(&self, i: usize) -> usize {
        (i / self.inner) % self.scale.len()
    }

    /// ONNX QuantizeLinear to the code range `(lo, hi)` (int8 or uint8):
    /// `saturate(round_half_to_even(x / scale) + zero_point)` (a division, as the ONNX
    /// operator defines it; PyTorch's fake quantization multiplies by `1/scale`, which
    /// rounds differently in rare ties).
    fn quantize(&self, x: &ArrayD<f32>, (lo, hi): (i32, i32)) -> Result<ArrayD<i32>> {
        let xs = x.as_standard_layout();
        let codes: Vec<i32> = xs
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let c = self.channel(i);
                quantize_linear_scalar(v, self.scale[c], self.zero_point[c], lo, hi)
            })
            .collect();
        ArrayD::from_shape_vec(x.raw_dim(), codes)
            .map_err(|e| Error::invalid(format!("internal: {e}")))
    }

    /// ONNX DequantizeLinear: `(x − zero_point) · scale` in f32.
    fn dequantize(&self, q: ndarray::ArrayViewD<'_, i32>) -> Result<ArrayD<f32>> {
        let qs = q.as_standard_layout();
        let v: Vec<f32> = qs
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let ch = self.channel(i);
                dequantize_linear_scalar(
                    i64::from(c),
                    i64::from(self.zero_point[ch]),
                    self.scale[ch],
                )
            })
            .collect();
        ArrayD::from_shape_vec(q.raw_dim(), v).map_err(|e| Error::invalid(format!("internal: {e}")))
    }
}

/// Gemm `alpha · A·W + beta · C` with a 1-D (or no) `C` as one linear layer: the weight
/// `[out, in]` scaled by `alpha` and the bias `C` by `beta` (the one home of this rewrite, for
/// the host form and the device form). Scaling by 1 changes nothing.
fn gemm_linear(
    alpha: f32,
    beta: f32,
    w: Array2<f32>,
    c: Option<&ArrayD<f32>>,
) -> (Array2<f32>, Option<Array1<f32>>) {
    let w = if alpha == 1.0 {
        w
    } else {
        w.mapv(|v| v * alpha)
    };
    let bias = c.map(|c| c.iter().map(|&v| v * beta).collect::<Array1<f32>>());
    (w, bias)
}

fn two_d(a: &ArrayD<f32>, what: &str) -> Result<Array2<f32>> {
    a.clone()
        .into_dimensionality::<Ix2>()
        .map_err(|_| Error::invalid(format!("{what} must be 2-D, got shape {:?}", a.shape())))
}

fn reshape(a: &ArrayD<f32>, shape: &[usize]) -> Result<ArrayD<f32>> {
    a.as_standard_layout()
        .to_owned()
        .into_shape_with_order(IxDyn(shape))
        .map_err(|_| Error::invalid(format!("cannot reshape {:?} to {shape:?}", a.shape())))
}

/// ONNX Reshape's target: `0` copies the input's dim (unless `allow_zero`), one `-1` is
/// inferred; the element count must stay.
fn reshape_target(from: &[usize], shape: &[i64], allow_zero: bool) -> Result<Vec<usize>> {
    let n: usize = check_elements("Reshape input", from)?;
    let mut out = Vec::with_capacity(shape.len().min(64));
    let mut infer = None;
    for (i, &d) in shape.iter().enumerate() {
        match d {
            -1 if infer.is_none() => {
                infer = Some(i);
                out.push(1);
            }
            0 if !allow_zero => out.push(*from.get(i).ok_or_else(|| {
                Error::invalid(format!("Reshape: 0 at {i} copies a dim the input lacks"))
            })?),
            d if d >= 0 => out
                .push(usize::try_from(d).map_err(|_| Error::invalid(format!("Reshape dim {d}")))?),
            d => {
                return Err(Error::invalid(format!(
                    "Reshape: invalid dim {d} in {shape:?}"
                )))
            }
        }
    }
    let known = check_elements("Reshape target", &out)?;
    if let Some(i) = infer {
        if known == 0 || !n.is_multiple_of(known) {
            return Err(Error::invalid(format!(
                "Reshape: cannot infer the -1 of {shape:?} from {from:?}"
            )));
        }
        out[i] = n / known;
    }
    if check_elements("Reshape target", &out)? != n {
        return Err(Error::invalid(format!(
            "cannot reshape {from:?} to {shape:?}"
        )));
    }
    Ok(out)
}

/// Per spatial dim, the conv settings with ONNX's defaults for lists not given.
fn resolved(list: &[usize], rank: usize, default: usize) -> Vec<usize> {
    if list.is_empty() {
        vec![default; rank]
    } else {
        list.to_vec()
    }
}

/// A conv input and weight as 2-D (`[N, C, L]` → `[N, C, 1, L]`) and the 2-D settings.
struct Conv2dView {
    x: Array4<f32>,
    w: Array4<f32>,
    stride: [usize; 2],
    dilation: [usize; 2],
    /// `[top, left, bottom, right]`.
    pads: [usize; 4],
    output_padding: [usize; 2],
    one_d: bool,
}

/// The 2-D settings of a conv of input `x` and weight `w` (a 1-D conv as `[N, C, 1, L]`), with
/// ONNX's defaults for lists not given.
struct ConvSettings {
    stride: [usize; 2],
    dilation: [usize; 2],
    /// `[top, left, bottom, right]`.
    pads: [usize; 4],
    output_padding: [usize; 2],
    one_d: bool,
}

fn conv_settings(x: &[usize], w: &[usize], a: &ConvAttrs) -> Result<ConvSettings> {
    let rank = w.len().saturating_sub(2);
    if !(rank == 1 || rank == 2) || x.len() != w.len() {
        return Err(Error::invalid(format!(
            "qfuse evaluates 1-D and 2-D convs; input {x:?}, weight {w:?}"
        )));
    }
    if let Some(k) = &a.kernel_shape {
        if k.as_slice() != &w[2..] {
            return Err(Error::shape("kernel_shape", &w[2..], k));
        }
    }
    let strides = resolved(&a.strides, rank, 1);
    let dil = resolved(&a.dilations, rank, 1);
    let pads = resolved(&a.pads, 2 * rank, 0);
    let opad = resolved(&a.output_padding, rank, 0);
    if strides.len() != rank || dil.len() != rank || pads.len() != 2 * rank || opad.len() != rank {
        return Err(Error::invalid(format!(
            "the conv attributes do not match the weight's {rank} spatial dims"
        )));
    }
    Ok(if rank == 1 {
        ConvSettings {
            stride: [1, strides[0]],
            dilation: [1, dil[0]],
            pads: [0, pads[0], 0, pads[1]],
            output_padding: [0, opad[0]],
            one_d: true,
        }
    } else {
        ConvSettings {
            stride: [strides[0], strides[1]],
            dilation: [dil[0], dil[1]],
            pads: [pads[0], pads[1], pads[2], pads[3]],
            output_padding: [opad[0], opad[1]],
            one_d: false,
        }
    })
}

fn conv_view(x: &ArrayD<f32>, w: &ArrayD<f32>, a: &ConvAttrs) -> Result<Conv2dView> {
    let s = conv_settings(x.shape(), w.shape(), a)?;
    let to4 = |a: &ArrayD<f32>, what: &str| -> Result<Array4<f32>> {
        if s.one_d {
            let d = a.shape();
            dim4(reshape(a, &[d[0], d[1], 1, d[2]])?, "conv1d")
        } else {
            dim4(a.clone(), what)
        }
    };
    Ok(Conv2dView {
        x: to4(x, "conv input")?,
        w: to4(w, "conv weight")?,
        stride: s.stride,
        dilation: s.dilation,
        pads: s.pads,
        output_padding: s.output_padding,
        one_d: s.one_d,
    })
}

fn back_from_view(y: Array4<f32>, one_d: bool) -> Result<ArrayD<f32>> {
    if one_d {
        let (n, c, _, l) = y.dim();
        reshape(&y.into_dyn(), &[n, c, l])
    } else {
        Ok(y.into_dyn())
    }
}

fn conv<B: HostOps + ?Sized>(
    backend: &B,
    x: &ArrayD<f32>,
    w: &ArrayD<f32>,
    bias: Option<Array1<f32>>,
    a: &ConvAttrs,
) -> Result<ArrayD<f32>> {
    let v = conv_view(x, w, a)?;
    let symmetric = v.pads[0] == v.pads[2] && v.pads[1] == v.pads[3];
    let (input, padding) = if symmetric {
        (v.x, [v.pads[0], v.pads[1]])
    } else {
        (zero_pad2d(&v.x, v.pads)?, [0, 0])
    };
    let params = Conv2dParams {
        stride: v.stride,
        padding,
        dilation: v.dilation,
        groups: a.group,
        pad_mode: PadMode::Explicit,
    };
    let y = backend.conv2d(&input, &v.w, bias.as_ref(), &params)?;
    back_from_view(y, v.one_d)
}

fn conv_transpose<B: HostOps + ?Sized>(
    backend: &B,
    x: &ArrayD<f32>,
    w: &ArrayD<f32>,
    bias: Option<Array1<f32>>,
    a: &ConvAttrs,
) -> Result<ArrayD<f32>> {
    let v = conv_view(x, w, a)?;
    if v.pads[0] != v.pads[2] || v.pads[1] != v.pads[3] {
        return Err(Error::invalid(format!(
            "ConvTranspose with asymmetric pads {:?} is not supported",
            a.pads
        )));
    }
    let params = ConvTranspose2dParams {
        stride: v.stride,
        padding: [v.pads[0], v.pads[1]],
        output_padding: v.output_padding,
        dilation: v.dilation,
        groups: a.group,
    };
    let y = backend.conv_transpose2d(&v.x, &v.w, bias.as_ref(), &params)?;
    back_from_view(y, v.one_d)
}

/// Inference BatchNorm over dim 1 of any input of rank ≥ 2 (as `[N, C, rest, 1]`).
fn batch_norm<B: HostOps + ?Sized>(
    backend: &B,
    x: &ArrayD<f32>,
    bn: &BatchNorm,
) -> Result<ArrayD<f32>> {
    if x.ndim() < 2 {
        return Err(Error::invalid(format!(
            "BatchNormalization input must have rank >= 2, got {:?}",
            x.shape()
        )));
    }
    let s = x.shape();
    let rest: usize = s[2..].iter().product();
    let x4 = dim4(reshape(x, &[s[0], s[1], rest, 1])?, "BatchNormalization")?;
    let y = backend.batch_norm2d(&x4, bn, false)?.y;
    reshape(&y.into_dyn(), s)
}

/// GlobalAveragePool of a rank ≥ 3 input as the 2-D op sees it: `[N, C, rest, 1]`, and the
/// output shape `[N, C, 1, ...]`.
fn global_pool_shapes(s: &[usize]) -> Result<([usize; 4], Vec<usize>)> {
    if s.len() < 3 {
        return Err(Error::invalid(format!(
            "GlobalAveragePool input must have rank >= 3, got {s:?}"
        )));
    }
    let rest = check_elements("GlobalAveragePool input", &s[2..])?;
    let mut out = vec![s[0], s[1]];
    out.extend(std::iter::repeat_n(1, s.len() - 2));
    Ok(([s[0], s[1], rest, 1], out))
}

/// An ONNX MaxPool / AveragePool as a 2-D [`PoolWindow`] and [`PoolMode`] (2-D pooling
/// only, on an NCHW input).
fn pool_window(op: &Op, p: &PoolAttrs, x: &[usize]) -> Result<(PoolWindow, PoolMode)> {
    if p.kernel_shape.len() != 2 || x.len() != 4 || p.pads.len() != 4 {
        return Err(Error::invalid(format!(
            "qfuse evaluates 2-D pooling only; input {x:?}, kernel {:?}",
            p.kernel_shape
        )));
    }
    let two = |v: &[usize], d: usize| {
        [
            v.first().copied().unwrap_or(d),
            v.get(1).copied().unwrap_or(d),
        ]
    };
    let window = PoolWindow {
        kernel: [p.kernel_shape[0], p.kernel_shape[1]],
        stride: two(&p.strides, 1),
        dilation: two(&p.dilations, 1),
        pads: [p.pads[0], p.pads[1], p.pads[2], p.pads[3]],
        ceil_mode: p.ceil_mode,
    };
    let mode = match op {
        Op::MaxPool(_) => PoolMode::Max,
        _ => PoolMode::Avg {
            count_include_pad: p.count_include_pad,
        },
    };
    Ok((window, mode))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::pool_output_dim;

    #[test]
    fn pool_sizes_follow_onnx() {
        // ResNet stem: 112 -> 56 with k3 s2 p1.
        assert_eq!(pool_output_dim(112, 3, 2, 1, 1, 1, false).unwrap(), 56);
        // ceil_mode drops a window starting in the end padding.
        assert_eq!(pool_output_dim(5, 2, 2, 1, 0, 0, true).unwrap(), 3);
        assert_eq!(pool_output_dim(4, 2, 2, 1, 1, 1, true).unwrap(), 3);
        assert!(pool_output_dim(1, 3, 1, 1, 0, 0, false).is_err());
    }

    #[test]
    fn reshape_targets() {
        assert_eq!(
            reshape_target(&[2, 3, 4], &[0, -1], false).unwrap(),
            vec![2, 12]
        );
        assert_eq!(reshape_target(&[2, 3, 4], &[-1], false).unwrap(), vec![24]);
        assert!(reshape_target(&[2, 3, 4], &[5, -1], false).is_err());
        assert!(reshape_target(&[2, 3, 4], &[-1, -1], false).is_err());
        assert!(reshape_target(&[2, 3], &[0, 0, 0], false).is_err());
    }

    #[test]
    fn broadcasting() {
        let a = ArrayD::from_shape_vec(IxDyn(&[2, 1]), vec![1.0, 2.0]).unwrap();
        let b = ArrayD::from_shape_vec(IxDyn(&[3]), vec![10.0, 20.0, 30.0]).unwrap();
        let y = broadcast_binary(&a, &b, BinaryOp::Add).unwrap();
        assert_eq!(y.shape(), &[2, 3]);
        assert_eq!(y.as_slice().unwrap(), &[11.0, 21.0, 31.0, 12.0, 22.0, 32.0]);
        let c = ArrayD::<f32>::zeros(IxDyn(&[4]));
        assert!(broadcast_binary(
            &a,
            &c.clone().into_shape_with_order(IxDyn(&[4])).unwrap(),
            BinaryOp::Add
        )
        .is_ok());
        let bad = ArrayD::<f32>::zeros(IxDyn(&[2, 4]));
        assert!(broadcast_binary(&b, &bad, BinaryOp::Add).is_err());
    }
}
