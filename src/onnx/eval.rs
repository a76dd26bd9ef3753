//! A float evaluator of an imported ONNX [`Graph`] on any backend's [`HostOps`]: convs,
//! BatchNorm, activations and linear layers run on the backend (the CPU reference or the GPU
//! kernels); shape plumbing (pads, pools, broadcasting, reshapes) runs on the host.

use std::collections::HashMap;

use ndarray::{concatenate, Array1, Array2, Array4, ArrayD, Axis, Ix2, Ix4, IxDyn};

use super::fold::activation_of;
use super::model::{ConvAttrs, Graph, Node, Op, PoolAttrs, Tensor};
use crate::backend::HostOps;
use crate::error::{Error, Result};
use crate::io::text::escape;
use crate::limits::{check_elements, MAX_CONV_SETTING};
use crate::ops::{Activation, BatchNorm, Conv2dParams, ConvTranspose2dParams, PadMode};

/// Runs `graph` on `backend` with the given inputs (by name, every graph input) and returns
/// the graph's outputs, in order, as float arrays.
///
/// Errors: [`Error::MissingTensor`] for an input not given, [`Error::ShapeMismatch`] for an
/// input whose static dims disagree, and, naming the node, any op's error (shapes that do not
/// fit, an integer tensor where a float one is needed, attributes the evaluator does not
/// support such as asymmetric ConvTranspose pads or MatMul of rank > 2).
pub fn run<B: HostOps + ?Sized>(
    backend: &B,
    graph: &Graph,
    inputs: &[(String, ArrayD<f32>)],
) -> Result<Vec<(String, ArrayD<f32>)>> {
    run_observed(backend, graph, inputs, &mut |_, _| Ok(()))
}

/// [`run`], calling `observe(name, value)` on every graph input and every float value a node
/// computes, as it is computed (calibration observers; an error from `observe` stops the
/// run).
pub fn run_observed<B: HostOps + ?Sized>(
    backend: &B,
    graph: &Graph,
    inputs: &[(String, ArrayD<f32>)],
    observe: &mut dyn FnMut(&str, &ArrayD<f32>) -> Result<()>,
) -> Result<Vec<(String, ArrayD<f32>)>> {
    let mut values: HashMap<&str, Tensor> = HashMap::new();
    for v in &graph.inputs {
        let (_, x) =
            inputs
                .iter()
                .find(|(n, _)| *n == v.name)
                .ok_or_else(|| Error::MissingTensor {
                    name: v.name.clone(),
                    context: " (a graph input)".into(),
                })?;
        let ok = v.shape.is_empty()
            || (v.shape.len() == x.ndim()
                && v.shape
                    .iter()
                    .zip(x.shape())
                    .all(|(d, &s)| d.is_none_or(|d| d == s)));
        if !ok {
            let expected: Vec<usize> = v.shape.iter().map(|d| d.unwrap_or(0)).collect();
            return Err(Error::shape(
                format!("graph input `{}` (0 = any size)", escape(&v.name)),
                &expected,
                x.shape(),
            ));
        }
        observe(&v.name, x)?;
        values.insert(v.name.as_str(), Tensor::F32(x.clone()));
    }
    for (i, node) in graph.nodes.iter().enumerate() {
        let out = eval_node(backend, graph, &values, node).map_err(|e| Error::OnnxNode {
            node: graph.node_label(i),
            op_type: node.op.op_type(),
            source: Box::new(e),
        })?;
        if let Tensor::F32(a) = &out {
            observe(&node.outputs[0], a)?;
        }
        values.insert(node.outputs[0].as_str(), out);
    }
    graph
        .outputs
        .iter()
        .map(|name| {
            let t = lookup(graph, &values, name)?;
            let a = t.as_f32().ok_or_else(|| {
                Error::invalid(format!("graph output `{}` is not float", escape(name)))
            })?;
            Ok((name.clone(), a.clone()))
        })
        .collect()
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
            // The common case, a PyTorch Linear: the bias goes to the backend.
            if *alpha == 1.0 && *beta == 1.0 && c.is_none_or(|c| c.ndim() == 1) {
                let bias = c.map(|c| Array1::from_iter(c.iter().copied()));
                backend.linear(&a, &w, bias.as_ref())?.into_dyn()
            } else {
                let y = backend.linear(&a, &w, None)?.into_dyn().mapv(|v| v * alpha);
                match c {
                    None => y,
                    Some(c) => broadcast_binary(&y, &c.mapv(|v| v * beta), |p, q| p + q)?,
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
        Op::MaxPool(p) => pool(x(0)?, p, true)?,
        Op::AveragePool(p) => pool(x(0)?, p, false)?,
        Op::GlobalAveragePool => global_average_pool(x(0)?)?,
        Op::Add => broadcast_binary(x(0)?, x(1)?, |p, q| p + q)?,
        Op::Mul => broadcast_binary(x(0)?, x(1)?, |p, q| p * q)?,
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
            let parts = (0..node.inputs.len())
                .map(|i| x(i).map(|a| a.view()))
                .collect::<Result<Vec<_>>>()?;
            let r = parts[0].ndim() as i64;
            let ax = if *axis < 0 { axis + r } else { *axis };
            if !(0..r).contains(&ax) {
                return Err(Error::AxisOutOfRange {
                    axis: isize::try_from(*axis).unwrap_or(isize::MAX),
                    rank: parts[0].ndim(),
                });
            }
            let ax = ax as usize;
            let mut shape = parts[0].shape().to_vec();
            let mut total = 0usize;
            for p in &parts {
                let mut s = p.shape().to_vec();
                if s.len() != shape.len() {
                    return Err(Error::shape("Concat input", &shape, &s));
                }
                total = total
                    .checked_add(s[ax])
                    .ok_or_else(|| Error::invalid("Concat size overflows"))?;
                s[ax] = shape[ax];
                if s != shape {
                    return Err(Error::shape("Concat input", &shape, p.shape()));
                }
            }
            shape[ax] = total;
            check_elements("Concat output", &shape)?;
            concatenate(Axis(ax), &parts).map_err(|e| Error::invalid(format!("Concat: {e}")))?
        }
        Op::Identity => return lookup(graph, values, node.input(0).unwrap_or("")).cloned(),
        Op::QuantizeLinear { axis } => {
            let input = x(0)?;
            let zp = match node.input(2) {
                Some(name) => lookup(graph, values, name)?,
                None => {
                    return Err(Error::invalid(
                        "QuantizeLinear without a zero point (uint8 output) is not supported",
                    ))
                }
            };
            let q = QdqParams::new(input.shape(), x(1)?, Some(zp), *axis)?;
            if !matches!(zp, Tensor::I8(_)) {
                return Err(Error::invalid(format!(
                    "QuantizeLinear zero point is {}, only int8 is supported",
                    zp.dtype_name()
                )));
            }
            return Ok(Tensor::I8(q.quantize(input)?));
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
                Tensor::I32(a) => q.dequantize(a.view())?,
                other => {
                    return Err(Error::DtypeMismatch {
                        name: name.to_string(),
                        got: other.dtype_name().into(),
                        expected: "int8 or int32".into(),
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

    /// ONNX QuantizeLinear to int8: `saturate(round_half_to_even(x / scale) + zero_point)`
    /// (a division, as the ONNX operator defines it; PyTorch's fake quantization multiplies by
    /// `1/scale`, which rounds differently in rare ties).
    fn quantize(&self, x: &ArrayD<f32>) -> Result<ArrayD<i8>> {
        let xs = x.as_standard_layout();
        let codes: Vec<i8> = xs
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let c = self.channel(i);
                let q = (v / self.scale[c]).round_ties_even() + self.zero_point[c] as f32;
                // NaN saturates to 0 as in onnxruntime's cast.
                if q.is_nan() {
                    0
                } else {
                    q.clamp(-128.0, 127.0) as i8
                }
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
                (i64::from(c) - i64::from(self.zero_point[ch])) as f32 * self.scale[ch]
            })
            .collect();
        ArrayD::from_shape_vec(q.raw_dim(), v).map_err(|e| Error::invalid(format!("internal: {e}")))
    }
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

/// Numpy-style broadcasting of two arrays (ONNX's multidirectional broadcasting).
fn broadcast_binary(
    a: &ArrayD<f32>,
    b: &ArrayD<f32>,
    f: impl Fn(f32, f32) -> f32,
) -> Result<ArrayD<f32>> {
    let r = a.ndim().max(b.ndim());
    let dim = |s: &[usize], i: usize| {
        let off = r - s.len();
        if i < off {
            1
        } else {
            s[i - off]
        }
    };
    let mut shape = Vec::with_capacity(r);
    for i in 0..r {
        let (p, q) = (dim(a.shape(), i), dim(b.shape(), i));
        shape.push(match (p, q) {
            (p, q) if p == q => p,
            (1, q) => q,
            (p, 1) => p,
            _ => {
                return Err(Error::invalid(format!(
                    "shapes {:?} and {:?} do not broadcast",
                    a.shape(),
                    b.shape()
                )))
            }
        });
    }
    check_elements("broadcast output", &shape)?;
    let av = a
        .broadcast(IxDyn(&shape))
        .ok_or_else(|| Error::invalid("internal: broadcast"))?;
    let bv = b
        .broadcast(IxDyn(&shape))
        .ok_or_else(|| Error::invalid("internal: broadcast"))?;
    Ok(ndarray::Zip::from(&av)
        .and(&bv)
        .map_collect(|&p, &q| f(p, q)))
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

fn conv_view(x: &ArrayD<f32>, w: &ArrayD<f32>, a: &ConvAttrs) -> Result<Conv2dView> {
    let rank = w.ndim().saturating_sub(2);
    if !(rank == 1 || rank == 2) || x.ndim() != w.ndim() {
        return Err(Error::invalid(format!(
            "qfuse evaluates 1-D and 2-D convs; input {:?}, weight {:?}",
            x.shape(),
            w.shape()
        )));
    }
    if let Some(k) = &a.kernel_shape {
        if k.as_slice() != &w.shape()[2..] {
            return Err(Error::shape("kernel_shape", &w.shape()[2..], k));
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
    if rank == 1 {
        let to4 = |a: &ArrayD<f32>| -> Result<Array4<f32>> {
            let s = a.shape();
            dim4(reshape(a, &[s[0], s[1], 1, s[2]])?, "conv1d")
        };
        Ok(Conv2dView {
            x: to4(x)?,
            w: to4(w)?,
            stride: [1, strides[0]],
            dilation: [1, dil[0]],
            pads: [0, pads[0], 0, pads[1]],
            output_padding: [0, opad[0]],
            one_d: true,
        })
    } else {
        Ok(Conv2dView {
            x: dim4(x.clone(), "conv input")?,
            w: dim4(w.clone(), "conv weight")?,
            stride: [strides[0], strides[1]],
            dilation: [dil[0], dil[1]],
            pads: [pads[0], pads[1], pads[2], pads[3]],
            output_padding: [opad[0], opad[1]],
            one_d: false,
        })
    }
}

fn back_from_view(y: Array4<f32>, one_d: bool) -> Result<ArrayD<f32>> {
    if one_d {
        let (n, c, _, l) = y.dim();
        reshape(&y.into_dyn(), &[n, c, l])
    } else {
        Ok(y.into_dyn())
    }
}

/// Zero-pads `[N, C, H, W]` by `[top, left, bottom, right]`.
fn zero_pad(x: &Array4<f32>, pads: [usize; 4]) -> Result<Array4<f32>> {
    let (n, c, h, w) = x.dim();
    let add = |a: usize, b: usize, d: usize| {
        a.checked_add(b)
            .and_then(|s| s.checked_add(d))
            .ok_or_else(|| Error::invalid("padding overflows"))
    };
    let (ph, pw) = (add(pads[0], pads[2], h)?, add(pads[1], pads[3], w)?);
    check_elements("padded input", &[n, c, ph, pw])?;
    let mut out = Array4::<f32>::zeros((n, c, ph, pw));
    out.slice_mut(ndarray::s![
        ..,
        ..,
        pads[0]..pads[0] + h,
        pads[1]..pads[1] + w
    ])
    .assign(x);
    Ok(out)
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
        (zero_pad(&v.x, v.pads)?, [0, 0])
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

fn global_average_pool(x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
    if x.ndim() < 3 {
        return Err(Error::invalid(format!(
            "GlobalAveragePool input must have rank >= 3, got {:?}",
            x.shape()
        )));
    }
    let s = x.shape();
    let rest: usize = s[2..].iter().product();
    let flat = reshape(x, &[s[0], s[1], rest])?;
    let mean = flat
        .mean_axis(Axis(2))
        .ok_or_else(|| Error::invalid("GlobalAveragePool over an empty spatial extent"))?;
    let mut out_shape = vec![s[0], s[1]];
    out_shape.extend(std::iter::repeat_n(1, s.len() - 2));
    reshape(&mean, &out_shape)
}

/// The output size of one pooled dim (ONNX / PyTorch: with `ceil_mode`, a last window that
/// starts in the end padding is dropped).
fn pool_out(
    input: usize,
    k: usize,
    s: usize,
    d: usize,
    pb: usize,
    pe: usize,
    ceil: bool,
) -> Result<usize> {
    let err = || {
        Error::invalid(format!(
            "pool window {k} (dilation {d}) does not fit input {input} with pads {pb}+{pe}"
        ))
    };
    let reach = k
        .checked_sub(1)
        .and_then(|k1| k1.checked_mul(d))
        .and_then(|r| r.checked_add(1))
        .ok_or_else(err)?;
    let padded = input
        .checked_add(pb)
        .and_then(|v| v.checked_add(pe))
        .ok_or_else(err)?;
    let span = padded.checked_sub(reach).ok_or_else(err)?;
    let mut out = if ceil { span.div_ceil(s) } else { span / s } + 1;
    if ceil && (out - 1) * s >= input + pb {
        out -= 1;
    }
    Ok(out)
}

fn pool(x: &ArrayD<f32>, p: &PoolAttrs, max: bool) -> Result<ArrayD<f32>> {
    if p.kernel_shape.len() != 2 || x.ndim() != 4 {
        return Err(Error::invalid(format!(
            "qfuse evaluates 2-D pooling only; input {:?}, kernel {:?}",
            x.shape(),
            p.kernel_shape
        )));
    }
    // ONNX requires pads smaller than the kernel (every window sees an input element).
    if (0..4).any(|i| p.pads[i] >= p.kernel_shape[i % 2]) {
        return Err(Error::invalid(format!(
            "pool pads {:?} must be smaller than the kernel {:?}",
            p.pads, p.kernel_shape
        )));
    }
    let (n, c, h, w) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let (kh, kw) = (p.kernel_shape[0], p.kernel_shape[1]);
    let (sh, sw) = (p.strides[0], p.strides[1]);
    let (dh, dw) = (p.dilations[0], p.dilations[1]);
    let (pt, pl, pb, pr) = (p.pads[0], p.pads[1], p.pads[2], p.pads[3]);
    if kh.max(kw).max(sh).max(sw).max(dh).max(dw) > MAX_CONV_SETTING {
        return Err(Error::invalid("pool setting too large"));
    }
    let oh = pool_out(h, kh, sh, dh, pt, pb, p.ceil_mode)?;
    let ow = pool_out(w, kw, sw, dw, pl, pr, p.ceil_mode)?;
    check_elements("pool output", &[n, c, oh, ow])?;
    let x4 = x
        .view()
        .into_dimensionality::<Ix4>()
        .map_err(|e| Error::invalid(format!("internal: {e}")))?;
    let mut out = Array4::<f32>::zeros((n, c, oh, ow));
    for ((b, ch, oy, ox), o) in out.indexed_iter_mut() {
        let mut acc = if max { f32::NEG_INFINITY } else { 0.0 };
        let mut count = 0usize;
        let mut padded_count = 0usize;
        for ky in 0..kh {
            let yy = (oy * sh + ky * dh) as isize - pt as isize;
            for kx in 0..kw {
                let xx = (ox * sw + kx * dw) as isize - pl as isize;
                // Window positions inside the padded extent (for count_include_pad).
                if yy < h as isize + pb as isize && xx < w as isize + pr as isize {
                    padded_count += 1;
                }
                if yy < 0 || xx < 0 || yy >= h as isize || xx >= w as isize {
                    continue;
                }
                let v = x4[[b, ch, yy as usize, xx as usize]];
                count += 1;
                if max {
                    if v > acc || v.is_nan() {
                        acc = v;
                    }
                } else {
                    acc += v;
                }
            }
        }
        *o = if max {
            acc
        } else {
            let div = if p.count_include_pad {
                padded_count
            } else {
                count
            };
            acc / div.max(1) as f32
        };
    }
    Ok(out.into_dyn())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_sizes_follow_onnx() {
        // ResNet stem: 112 -> 56 with k3 s2 p1.
        assert_eq!(pool_out(112, 3, 2, 1, 1, 1, false).unwrap(), 56);
        // ceil_mode drops a window starting in the end padding.
        assert_eq!(pool_out(5, 2, 2, 1, 0, 0, true).unwrap(), 3);
        assert_eq!(pool_out(4, 2, 2, 1, 1, 1, true).unwrap(), 3);
        assert!(pool_out(1, 3, 1, 1, 0, 0, false).is_err());
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
        let y = broadcast_binary(&a, &b, |p, q| p + q).unwrap();
        assert_eq!(y.shape(), &[2, 3]);
        assert_eq!(y.as_slice().unwrap(), &[11.0, 21.0, 31.0, 12.0, 22.0, 32.0]);
        let c = ArrayD::<f32>::zeros(IxDyn(&[4]));
        assert!(broadcast_binary(
            &a,
            &c.clone().into_shape_with_order(IxDyn(&[4])).unwrap(),
            |p, q| p + q
        )
        .is_ok());
        let bad = ArrayD::<f32>::zeros(IxDyn(&[2, 4]));
        assert!(broadcast_binary(&b, &bad, |p, q| p + q).is_err());
    }
}
