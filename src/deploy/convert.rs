//! From a float [`Net`] and calibration data to an [`IntModel`]: fold BN, observe every
//! value, quantize weights (symmetric), biases (i32 at `s_in · s_w`) and derive each layer's
//! requantization.

use ndarray::{Array1, Array2, Array4, ArrayD, Ix2, Ix4};

use super::net::{fold_conv, Net, NodeOp, ValueId};
use crate::backend::{Backend, HostOps};
use crate::error::{Error, Result};
use crate::io::text::escape;
use crate::ops::{Activation, Conv2dParams, Pool2d};
use crate::quant::{
    AddRequant, ObserverSpec, QDtype, QParams, QScheme, QuantRange, Requant, RequantMode,
};
use crate::reference::{int8, observer};

/// How a [`Net`] is quantized for deployment.
#[derive(Debug, Clone, PartialEq)]
pub struct DeployConfig {
    /// Activations (every value the model writes): a per-tensor spec, min/max observed over
    /// the calibration data. Default: int8 affine `[-128, 127]`.
    pub activation: ObserverSpec,
    /// Weights: a symmetric spec (zero point 0), per tensor or per output channel (axis 0).
    /// Default: int8 per-channel symmetric `[-128, 127]` (PyTorch's default QAT weight).
    pub weight: ObserverSpec,
    /// Requantization arithmetic (default [`RequantMode::Float`]: conv and linear layers as
    /// fbgemm and onnxruntime, residual adds as onnxruntime's MLAS `QLinearAdd`;
    /// [`RequantMode::FixedPoint`]: gemmlowp / TFLite, adds with TFLite's integer add).
    pub requant: RequantMode,
    /// How an engine running the exported model stores activation codes:
    /// [`QDtype::QInt8`] (default; the codes as they are) or [`QDtype::QUInt8`] (code + 128,
    /// zero points + 128; onnxruntime's own QDQ default). Every integer op computes the same
    /// on both but the f32 residual add, which computes on the stored codes
    /// ([`AddRequant::codes`]): the integer model's adds follow the export's type.
    pub activation_codes: QDtype,
}

impl Default for DeployConfig {
    fn default() -> Self {
        let range = QuantRange {
            quant_min: -128,
            quant_max: 127,
        };
        let spec = |qscheme| ObserverSpec {
            dtype: QDtype::QInt8,
            qscheme,
            range,
            axis: 0,
            eps: f32::EPSILON,
            customized_range: false,
        };
        Self {
            activation: spec(QScheme::PerTensorAffine),
            weight: spec(QScheme::PerChannelSymmetric),
            requant: RequantMode::Float,
            activation_codes: QDtype::QInt8,
        }
    }
}

impl DeployConfig {
    /// Checks that integer kernels can run this configuration: both ranges inside
    /// `[-128, 127]` (8-bit signed codes; int4 ranges such as `[-8, 7]` fit), activations per
    /// tensor, weights symmetric with signed codes (zero point 0) and per-channel axis 0.
    ///
    /// Errors: [`Error::InvalidArgument`] naming the offending setting.
    pub fn validate(&self) -> Result<()> {
        for (what, spec) in [("activation", &self.activation), ("weight", &self.weight)] {
            spec.validate()?;
            if spec.range.quant_min < -128 || spec.range.quant_max > 127 {
                return Err(Error::invalid(format!(
                    "{what} range [{}, {}] does not fit the int8 codes [-128, 127] integer \
                     kernels store (use a signed range, e.g. int8 [-128, 127] or int4 [-8, 7])",
                    spec.range.quant_min, spec.range.quant_max
                )));
            }
        }
        if self.activation.qscheme.is_per_channel() {
            return Err(Error::invalid(
                "activations must be quantized per tensor for integer kernels",
            ));
        }
        if !self.weight.qscheme.is_symmetric() || self.weight.dtype != QDtype::QInt8 {
            return Err(Error::invalid(
                "weights must be quantized symmetrically as signed integers (zero point 0) for \
                 integer kernels",
            ));
        }
        if self.weight.qscheme.is_per_channel() && self.weight.axis != 0 {
            return Err(Error::invalid(format!(
                "per-channel weights must use axis 0 (output channels), got {}",
                self.weight.axis
            )));
        }
        Ok(())
    }
}

/// One integer layer.
#[derive(Debug, Clone, PartialEq)]
pub enum IntLayer {
    /// Integer conv2d: folded, quantized weight, i32 bias, requantization with the
    /// activation clamp.
    Conv {
        /// Weight codes `[O, C/groups, KH, KW]`.
        weight: Array4<i8>,
        /// Weight scales (one, or one per output channel); zero points are 0.
        weight_scale: Vec<f32>,
        /// Bias at scale `s_in · s_w[o]`.
        bias: Option<Array1<i32>>,
        /// Geometry.
        params: Conv2dParams,
        /// Requantization to the output codes.
        requant: Requant,
        /// The fused activation (its integer form is the requantization clamp).
        act: Activation,
    },
    /// Integer linear layer.
    Linear {
        /// Weight codes `[out, in]`.
        weight: Array2<i8>,
        /// Weight scales.
        weight_scale: Vec<f32>,
        /// Bias at scale `s_in · s_w[o]`.
        bias: Option<Array1<i32>>,
        /// Requantization.
        requant: Requant,
        /// The fused activation (its integer form is the requantization clamp).
        act: Activation,
    },
    /// Max pooling on codes.
    MaxPool2d {
        /// Window.
        kernel: usize,
        /// Step.
        stride: usize,
    },
    /// Flatten (codes reshaped).
    Flatten,
    /// Quantized add with clamp.
    Add {
        /// The integer arithmetic.
        add: AddRequant,
        /// The fused activation (its integer form is the clamp).
        act: Activation,
    },
    /// Max pooling on codes with padding (exact; keeps the input's qparams).
    MaxPool2dPad {
        /// Window, stride and padding.
        pool: Pool2d,
    },
    /// Global average pooling on codes ([`int8::global_avg_pool_int8`]): the i32 sum of
    /// `q − z_in` over `H·W`, requantized with `M = s_in / (s_out · H·W)`
    /// ([`int8::global_avg_pool_requant`], from the input and output value qparams and the
    /// input's extent at run time) in this arithmetic.
    GlobalAvgPool {
        /// The requantization arithmetic.
        mode: RequantMode,
    },
    /// An elementwise activation on codes by table ([`int8::activation_table`]).
    Table {
        /// The activation the table computes.
        act: Activation,
        /// 256 output codes, entry `q + 128` for input code `q`.
        table: Vec<i8>,
    },
}

impl IntLayer {
    /// A short kind name (`conv2d`, `linear`, `max_pool2d`, `flatten`, `add`,
    /// `max_pool2d_pad`, `global_avg_pool`, `activation`).
    pub fn kind(&self) -> &'static str {
        match self {
            IntLayer::Conv { .. } => "conv2d",
            IntLayer::Linear { .. } => "linear",
            IntLayer::MaxPool2d { .. } => "max_pool2d",
            IntLayer::Flatten => "flatten",
            IntLayer::Add { .. } => "add",
            IntLayer::MaxPool2dPad { .. } => "max_pool2d_pad",
            IntLayer::GlobalAvgPool { .. } => "global_avg_pool",
            IntLayer::Table { .. } => "activation",
        }
    }
}

/// One node of an [`IntModel`].
#[derive(Debug, Clone, PartialEq)]
pub struct IntNode {
    /// Name (the float node's).
    pub name: String,
    /// The integer computation.
    pub layer: IntLayer,
    /// Input values.
    pub inputs: Vec<ValueId>,
}

/// A model in integer form: int8 weights, i32 biases, per-value activation qparams and
/// per-layer requantization. Runs on any [`HostOps`] ([`IntModel::forward`]), simulates
/// itself with fake quantization ([`IntModel::simulate`]), and saves to / loads from
/// safetensors ([`IntModel::save`], [`IntModel::load`]).
#[derive(Debug, Clone, PartialEq)]
pub struct IntModel {
    /// Nodes in execution order.
    pub nodes: Vec<IntNode>,
    /// Quantization parameters of every value (per tensor; index = [`ValueId`]).
    pub values: Vec<QParams>,
    /// Activation code range.
    pub activation_range: QuantRange,
    /// The output value.
    pub output: ValueId,
}

impl IntModel {
    /// The output's quantization parameters.
    pub fn output_qparams(&self) -> &QParams {
        &self.values[self.output]
    }

    /// Checks internal consistency (value references, qparams, requantizations), as a model
    /// loaded from a file must pass before it runs.
    ///
    /// Errors: [`Error::InvalidArgument`] / [`Error::ShapeMismatch`] naming the node.
    pub fn validate(&self) -> Result<()> {
        if self.values.len() != self.nodes.len() + 1 {
            return Err(Error::invalid(format!(
                "integer model has {} nodes but {} value qparams (expected nodes + 1)",
                self.nodes.len(),
                self.values.len()
            )));
        }
        if self.output >= self.values.len() {
            return Err(Error::invalid(format!(
                "integer model output value {} does not exist",
                self.output
            )));
        }
        for v in &self.values {
            if v.axis.is_some() {
                return Err(Error::invalid("activation qparams must be per tensor"));
            }
            v.validate(&[1], self.activation_range)?;
        }
        for (i, node) in self.nodes.iter().enumerate() {
            let want = if matches!(node.layer, IntLayer::Add { .. }) {
                2
            } else {
                1
            };
            if node.inputs.len() != want || node.inputs.iter().any(|&v| v > i) {
                return Err(Error::invalid(format!(
                    "node `{}` must read {want} earlier value(s), reads {:?}",
                    node.name, node.inputs
                )));
            }
            match &node.layer {
                IntLayer::Conv {
                    weight, requant, ..
                } => requant.validate(weight.shape()[0])?,
                IntLayer::Linear {
                    weight, requant, ..
                } => requant.validate(weight.nrows())?,
                IntLayer::Add { add, .. } => add.validate()?,
                IntLayer::MaxPool2d { kernel, stride } if *kernel == 0 || *stride == 0 => {
                    return Err(Error::invalid(format!(
                        "node `{}`: max_pool2d kernel and stride must be positive",
                        node.name
                    )))
                }
                IntLayer::MaxPool2dPad { pool } => {
                    pool.output(pool.kernel[0], pool.kernel[1]).map_err(|e| {
                        Error::invalid(format!("node `{}`: {e}", escape(&node.name)))
                    })?;
                }
                IntLayer::Table { table, .. } => int8::check_table(table)?,
                _ => {}
            }
        }
        Ok(())
    }
}

/// A running min/max over calibration batches (`MinMaxObserver`).
#[derive(Debug, Clone, Copy)]
struct MinMax {
    min: f32,
    max: f32,
}

impl MinMax {
    fn new() -> Self {
        Self {
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
        }
    }
    fn observe(&mut self, x: &ArrayD<f32>) {
        let (a, b) = observer::min_max(x);
        self.min = self.min.min(a);
        self.max = self.max.max(b);
    }
}

/// Converts `net` to integer form, calibrating activations on `calibration` (each an input
/// batch; min/max over all of them, of the fused float model: BN folded, as deployed). The
/// float model runs on `backend` ([`Net::forward_values`]) and every value is downloaded
/// and observed on the host; [`super::convert_on`] observes on the device instead (the same
/// model from the same values).
///
/// Per conv (BN folded in) and linear: weight codes with `config.weight` qparams of the
/// folded weight; bias codes `round(b / (s_in · s_w[o]))`; requantization multipliers
/// `s_in · s_w[o] / s_out` in gemmlowp fixed point; the activation as the clamp. Max pooling
/// and flatten keep their input's qparams; add requantizes both inputs to its output's.
///
/// Errors: an invalid config, no calibration batch, a NaN in calibration outputs, layers
/// with no integer form (activations other than ReLU / ReLU6), and shape errors.
pub fn convert<'a, B: Backend>(
    net: &Net,
    backend: &B,
    calibration: impl IntoIterator<Item = &'a ArrayD<f32>>,
    config: &DeployConfig,
) -> Result<IntModel> {
    config.validate()?;
    let mut stats = vec![MinMax::new(); net.value_count()];
    let mut batches = 0;
    let dnet = super::DeviceNet::prepare(net, backend.clone(), true)?;
    for x in calibration {
        let values = dnet.forward_values_device(&backend.upload(x)?)?;
        for (s, v) in stats.iter_mut().zip(&values) {
            s.observe(&backend.download(v)?);
        }
        batches += 1;
    }
    if batches == 0 {
        return Err(Error::invalid(
            "deployment needs at least one calibration batch",
        ));
    }
    let ranges: Vec<Option<(f32, f32)>> = stats.iter().map(|s| Some((s.min, s.max))).collect();
    convert_with_ranges(net, &crate::backend::CpuBackend, &ranges, config)
}

/// Converts `net` to integer form with activation ranges observed elsewhere — by QAT's
/// FakeQuantize observers ([`crate::train::GpuTrainer::activation_ranges`]), as PyTorch's
/// `convert` takes a QAT model's observer state — instead of a calibration pass: `ranges[v]`
/// is value `v`'s `(min, max)` (value 0 the input, value `i + 1` node `i`'s output). Only the
/// input and the outputs of requantizing nodes (conv, linear, add) are read; the others
/// inherit their input's qparams and may be `None`. Weights, biases and requantization as
/// [`convert`].
///
/// Errors: as [`convert`]; [`Error::InvalidArgument`] for a `ranges` of the wrong length, or a
/// missing, NaN or reversed (`min > max`) range where one is read.
pub fn convert_with_ranges(
    net: &Net,
    backend: &dyn HostOps,
    ranges: &[Option<(f32, f32)>],
    config: &DeployConfig,
) -> Result<IntModel> {
    config.validate()?;
    if ranges.len() != net.value_count() {
        return Err(Error::invalid(format!(
            "deployment: {} activation ranges for a net of {} values",
            ranges.len(),
            net.value_count()
        )));
    }
    // Value qparams: observed for the input and requantizing nodes, inherited otherwise.
    let act_qp = |r: Option<(f32, f32)>, what: &str| -> Result<Option<QParams>> {
        let Some((min, max)) = r else {
            return Ok(None);
        };
        if min.is_nan() || max.is_nan() {
            return Err(Error::invalid(format!(
                "calibration of {what} saw NaN; cannot quantize it"
            )));
        }
        if min > max {
            return Err(Error::invalid(format!(
                "deployment: the activation range of {what} is reversed ({min} > {max})"
            )));
        }
        Ok(Some(observer::calculate_qparams(
            &[min],
            &[max],
            &config.activation,
        )))
    };
    let mut qparams = Vec::with_capacity(net.value_count());
    qparams.push(act_qp(ranges[0], "the input")?);
    for (i, node) in net.nodes().iter().enumerate() {
        qparams.push(if node.op.requantizes() {
            act_qp(ranges[i + 1], &format!("`{}`", escape(&node.name)))?
        } else {
            None
        });
    }
    convert_with_qparams(net, backend, &qparams, config)
}

/// Converts `net` to integer form with the activation qparams given — those of a QDQ export
/// calibrated once (`qfuse quantize --int-model`: the file and the integer model share
/// every scale and zero point, [`crate::onnx::to_int_model_from`]) — instead of observed
/// ranges: `qparams[v]` is value `v`'s per-tensor qparams (value 0 the input, value `i + 1`
/// node `i`'s output). Only the input and the outputs of requantizing nodes are read; the
/// others inherit their input's qparams and may be `None`. Weights, biases and
/// requantization as [`convert`].
///
/// Errors: as [`convert`]; [`Error::InvalidArgument`] for a `qparams` of the wrong length, a
/// missing one where one is read, one that is not per tensor, has a scale that is not
/// positive and finite or a zero point outside the activation range.
pub fn convert_with_qparams(
    net: &Net,
    backend: &dyn HostOps,
    qparams: &[Option<QParams>],
    config: &DeployConfig,
) -> Result<IntModel> {
    config.validate()?;
    if qparams.len() != net.value_count() {
        return Err(Error::invalid(format!(
            "deployment: {} activation qparams for a net of {} values",
            qparams.len(),
            net.value_count()
        )));
    }
    let act_range = config.activation.range;
    let given = |v: usize, what: &str| -> Result<QParams> {
        let Some(qp) = &qparams[v] else {
            return Err(Error::invalid(format!(
                "deployment: no activation range for {what}"
            )));
        };
        let per_tensor = qp.scale.len() == 1 && qp.zero_point.len() == 1 && qp.axis.is_none();
        let ok = per_tensor
            && qp.scale[0].is_finite()
            && qp.scale[0] > 0.0
            && (act_range.quant_min..=act_range.quant_max).contains(&qp.zero_point[0]);
        if !ok {
            return Err(Error::invalid(format!(
                "deployment: the qparams of {what} ({qp:?}) are not per-tensor qparams of \
                 the activation range [{}, {}]",
                act_range.quant_min, act_range.quant_max
            )));
        }
        Ok(qp.clone())
    };
    let mut values: Vec<QParams> = Vec::with_capacity(net.value_count());
    values.push(given(0, "the input")?);
    for (i, node) in net.nodes().iter().enumerate() {
        let qp = if node.op.requantizes() {
            given(i + 1, &format!("`{}`", escape(&node.name)))?
        } else {
            values[node.inputs[0]].clone()
        };
        values.push(qp);
    }
    let range = config.activation.range;
    let mut nodes = Vec::with_capacity(net.nodes().len());
    for (i, node) in net.nodes().iter().enumerate() {
        let out = &values[i + 1];
        let (s_out, z_out) = (out.scale[0], out.zero_point[0]);
        let bounds = |act: Activation| -> Result<(i32, i32)> {
            act.int8_bounds(s_out, z_out, range)
                .map_err(|e| Error::invalid(format!("node `{}`: {e}", node.name)))
        };
        let layer = match &node.op {
            NodeOp::Conv { conv, bn, act } => {
                let (w, b) = match bn {
                    Some(bn) => {
                        let (w, b) = fold_conv(backend, conv, bn)?;
                        (w, Some(b))
                    }
                    None => (conv.weight.clone(), conv.bias.clone()),
                };
                let s_in = values[node.inputs[0]].scale[0];
                let (wq, ws) = quantize_weight(&w.into_dyn(), config)?;
                let weight = wq
                    .into_dimensionality::<Ix4>()
                    .map_err(|e| Error::invalid(e.to_string()))?;
                IntLayer::Conv {
                    bias: b.map(|b| int8::quantize_bias(&b, s_in, &ws)).transpose()?,
                    requant: requant(s_in, &ws, (s_out, z_out), bounds(*act)?, config.requant)?,
                    weight,
                    weight_scale: ws,
                    params: conv.params,
                    act: *act,
                }
            }
            NodeOp::Linear { weight, bias, act } => {
                let s_in = values[node.inputs[0]].scale[0];
                let (wq, ws) = quantize_weight(&weight.clone().into_dyn(), config)?;
                let weight = wq
                    .into_dimensionality::<Ix2>()
                    .map_err(|e| Error::invalid(e.to_string()))?;
                IntLayer::Linear {
                    bias: bias
                        .as_ref()
                        .map(|b| int8::quantize_bias(b, s_in, &ws))
                        .transpose()?,
                    requant: requant(s_in, &ws, (s_out, z_out), bounds(*act)?, config.requant)?,
                    weight,
                    weight_scale: ws,
                    act: *act,
                }
            }
            NodeOp::MaxPool2d { kernel, stride } => IntLayer::MaxPool2d {
                kernel: *kernel,
                stride: *stride,
            },
            NodeOp::Flatten => IntLayer::Flatten,
            NodeOp::Add { act } => {
                let a = &values[node.inputs[0]];
                let b = &values[node.inputs[1]];
                IntLayer::Add {
                    add: AddRequant::new(
                        (a.scale[0], a.zero_point[0]),
                        (b.scale[0], b.zero_point[0]),
                        (s_out, z_out),
                        bounds(*act)?,
                        config.requant,
                        config.activation_codes,
                    )?,
                    act: *act,
                }
            }
            NodeOp::MaxPool2dPad { pool } => IntLayer::MaxPool2dPad { pool: *pool },
            NodeOp::GlobalAvgPool => IntLayer::GlobalAvgPool {
                mode: config.requant,
            },
            NodeOp::Activation { act } => {
                let a = &values[node.inputs[0]];
                IntLayer::Table {
                    act: *act,
                    table: int8::activation_table(
                        *act,
                        (a.scale[0], a.zero_point[0]),
                        (s_out, z_out),
                        range,
                    )?,
                }
            }
        };
        nodes.push(super::IntNode {
            name: node.name.clone(),
            layer,
            inputs: node.inputs.clone(),
        });
    }
    let model = IntModel {
        nodes,
        values,
        activation_range: range,
        output: net.output(),
    };
    model.validate()?;
    Ok(model)
}

/// Weight codes and scales with `config.weight` (min/max of this weight, symmetric).
pub(crate) fn weight_qparams(w: &ArrayD<f32>, config: &DeployConfig) -> Result<QParams> {
    let qp = observer::observe_qparams(w, &config.weight)?;
    if qp.scale.iter().any(|s| !s.is_finite()) {
        return Err(Error::invalid(
            "a weight holds NaN or infinity; cannot quantize it",
        ));
    }
    Ok(qp)
}

fn quantize_weight(w: &ArrayD<f32>, config: &DeployConfig) -> Result<(ArrayD<i8>, Vec<f32>)> {
    let qp = weight_qparams(w, config)?;
    let q = int8::quantize(w, &qp, config.weight.range)?;
    Ok((q, qp.scale))
}

/// The requantization of a conv or linear layer: per output channel the multiplier
/// `M[o] = (s_in · s_w[o]) / s_out` computed in f32, in that order — as PyTorch's fbgemm
/// (`act_times_w_scale / output_scale`) and onnxruntime's `QLinearConv` compute it, so that
/// `RequantMode::Float` rounds with their multiplier bit for bit (an f64 quotient rounded to
/// f32 differs from it in the last bit for about a quarter of the channels, which flips a
/// code now and then).
fn requant(
    s_in: f32,
    ws: &[f32],
    (s_out, z_out): (f32, i32),
    bounds: (i32, i32),
    mode: RequantMode,
) -> Result<Requant> {
    let real: Vec<f64> = ws
        .iter()
        .map(|&sw| f64::from((s_in * sw) / s_out))
        .collect();
    Requant::new(&real, mode, z_out, bounds)
}
