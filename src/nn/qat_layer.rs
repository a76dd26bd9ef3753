//! [`QatLayer`]: the QAT modules (`torch.ao.nn.qat` / `torch.ao.nn.intrinsic.qat`), their
//! forward in training and eval mode, the saved state of a training step and its backward,
//! and the conversions back to float / deployable layers.

use ndarray::{Array1, Array4, ArrayD, Axis, Ix2, Ix4, IxDyn};

use super::fake_quantize::{FakeQuantize, QatQConfig};
use crate::backend::HostOps;
use crate::error::{Error, Result};
use crate::nn::{BatchNormLayer, ConvLayer, Fused, FusedHead, Layer, LinearLayer};
use crate::ops::{
    self, Activation, BatchNorm, Conv2dParams, QatConfig, QatForward, QatWeightQuant,
};
use crate::quant::{ObserverSpec, QDtype, QParams, QuantRange};
use crate::reference::conv_bn::{qat_scaled_weight, zero_gamma_channels};
use crate::reference::fake_quant::fake_quantize;
use crate::reference::fold::{fuse_conv_bn_weights, fuse_linear_bn_weights};

/// The float layer a QAT module is built around.
#[derive(Debug, Clone, PartialEq)]
pub enum QatHead {
    /// A Conv1d (weight `[O, C/groups, K]`).
    Conv1d(ConvLayer),
    /// A Conv2d (weight `[O, C/groups, KH, KW]`).
    Conv2d(ConvLayer),
    /// A Linear (weight `[out, in]`).
    Linear(LinearLayer),
}

impl QatHead {
    /// Output channels (`out_features` for a Linear).
    pub fn out_channels(&self) -> usize {
        match self {
            QatHead::Conv1d(c) | QatHead::Conv2d(c) => c.out_channels(),
            QatHead::Linear(l) => l.out_features(),
        }
    }

    /// The weight (any rank), copied.
    pub fn weight(&self) -> ArrayD<f32> {
        match self {
            QatHead::Conv1d(c) | QatHead::Conv2d(c) => c.weight.clone(),
            QatHead::Linear(l) => l.weight.clone().into_dyn(),
        }
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Array1<f32>> {
        match self {
            QatHead::Conv1d(c) | QatHead::Conv2d(c) => c.bias.as_ref(),
            QatHead::Linear(l) => l.bias.as_ref(),
        }
    }

    /// PyTorch's type name of the float layer (`Conv1d`, `Conv2d`, `Linear`).
    pub fn kind_name(&self) -> &'static str {
        match self {
            QatHead::Conv1d(_) => "Conv1d",
            QatHead::Conv2d(_) => "Conv2d",
            QatHead::Linear(_) => "Linear",
        }
    }

    fn weight_rank(&self) -> usize {
        match self {
            QatHead::Conv1d(_) => 3,
            QatHead::Conv2d(_) => 4,
            QatHead::Linear(_) => 2,
        }
    }

    /// An axis of the weight as an axis of the 4-D conv2d weight it runs as (`[O, C, 1, K]`
    /// for a Conv1d, `[out, in, 1, 1]` for a Linear).
    fn axis4(&self, axis: usize) -> usize {
        match (self, axis) {
            (QatHead::Conv1d(_), 2) => 3,
            _ => axis,
        }
    }

    /// The conv2d settings it runs with.
    fn params2d(&self) -> Conv2dParams {
        match self {
            QatHead::Conv1d(c) | QatHead::Conv2d(c) => c.params2d(),
            QatHead::Linear(_) => Conv2dParams::default(),
        }
    }

    /// `w` (this head's weight shape) as the 4-D conv2d weight.
    pub(crate) fn to4(&self, w: &ArrayD<f32>) -> Result<Array4<f32>> {
        let s = w.shape().to_vec();
        let shape = match (self, s.as_slice()) {
            (QatHead::Conv1d(_), &[o, c, k]) => [o, c, 1, k],
            (QatHead::Conv2d(_), &[o, c, h, k]) => [o, c, h, k],
            (QatHead::Linear(_), &[o, i]) => [o, i, 1, 1],
            _ => {
                return Err(Error::invalid(format!(
                    "{} weight has shape {s:?}, expected rank {}",
                    self.kind_name(),
                    self.weight_rank()
                )))
            }
        };
        reshape(w, &shape)?
            .into_dimensionality::<Ix4>()
            .map_err(internal)
    }

    fn set_weight(&mut self, w: ArrayD<f32>) -> Result<()> {
        match self {
            QatHead::Conv1d(c) | QatHead::Conv2d(c) => c.weight = w,
            QatHead::Linear(l) => l.weight = w.into_dimensionality::<Ix2>().map_err(internal)?,
        }
        Ok(())
    }

    fn set_bias(&mut self, b: Option<Array1<f32>>) {
        match self {
            QatHead::Conv1d(c) | QatHead::Conv2d(c) => c.bias = b,
            QatHead::Linear(l) => l.bias = b,
        }
    }

    fn into_fused_head(self) -> FusedHead {
        match self {
            QatHead::Conv1d(c) => FusedHead::Conv1d(c),
            QatHead::Conv2d(c) => FusedHead::Conv2d(c),
            QatHead::Linear(l) => FusedHead::Linear(l),
        }
    }

    fn into_layer(self) -> Layer {
        match self {
            QatHead::Conv1d(c) => Layer::Conv1d(c),
            QatHead::Conv2d(c) => Layer::Conv2d(c),
            QatHead::Linear(l) => Layer::Linear(l),
        }
    }
}

fn internal(e: ndarray::ShapeError) -> Error {
    Error::invalid(format!("internal reshape: {e}"))
}

fn reshape(x: &ArrayD<f32>, shape: &[usize]) -> Result<ArrayD<f32>> {
    x.as_standard_layout()
        .into_owned()
        .into_shape_with_order(IxDyn(shape))
        .map_err(internal)
}

/// A QAT module: a conv or linear layer, an optional unfolded BatchNorm, an activation, the
/// weight fake quant and an optional output fake quant. One type for PyTorch's
///
/// * `torch.ao.nn.intrinsic.qat` modules, built from intrinsic fused modules: `ConvBn1d`,
///   `ConvBn2d`, `ConvBnReLU1d`, `ConvBnReLU2d`, `LinearBn1d` (`bn: Some`), `ConvReLU1d`,
///   `ConvReLU2d`, `LinearReLU` (`bn: None`, an activation);
/// * `torch.ao.nn.qat` modules, built from plain layers: `Conv1d`, `Conv2d`, `Linear`.
///
/// Other activations follow [`Fused`]'s naming (`ConvBnReLU62d`, `LinearHardswish`, ...).
/// [`QatLayer::kind_name`] is PyTorch's class name; [`QatLayer::qualified_name`] adds the
/// module path, which tells a QAT `Conv2d` from a float one.
///
/// # Forward
/// * **With a BatchNorm, training mode**: one QAT step on the backend
///   ([`crate::HostOps::conv_bn_qat_forward_with`], PyTorch's `_forward_approximate`): the
///   weight fake quant sees the BN-scaled weight `W·γ/σ` (its observer updated when
///   enabled, its stored qparams used), conv with the fake-quantized weight, divide back,
///   BatchNorm with batch statistics (running statistics and `num_batches_tracked`
///   updated), activation. With [`QatLayer::freeze_bn`] the BatchNorm uses and keeps its
///   running statistics. Channels with γ = 0 take the finite two-pass form (see
///   [`crate::reference::conv_bn::conv_bn_qat_forward_with`]) where PyTorch gives NaN.
/// * **With a BatchNorm, eval mode**: the deploy graph: one conv (linear) with the
///   fake-quantized BN-scaled weight `W_q` and the folded bias `β + (b − running_mean)·γ/σ`,
///   then the activation (PyTorch's eval forward computes the same up to rounding).
/// * **Without a BatchNorm**: `act(conv(x, fake_quant(W)) + b)` in both modes.
/// * Then the output fake quant (`activation_post_process`), when there is one.
///
/// As in PyTorch, a fake quant observes whenever its observer is enabled, in eval mode too
/// (see [`crate::qat::disable_observer`]).
#[derive(Debug, Clone, PartialEq)]
pub struct QatLayer {
    /// The conv / linear layer (weight, bias, settings; PyTorch's `weight`, `bias`).
    pub head: QatHead,
    /// The BatchNorm of the intrinsic modules (`ConvBn2d`'s `bn`), `None` for the others.
    pub bn: Option<BatchNormLayer>,
    /// The activation (`Activation::None` for `ConvBn2d`, `Conv2d`, `Linear`, ...).
    pub act: Activation,
    /// PyTorch's `freeze_bn`: in training mode, the BatchNorm normalizes with its running
    /// statistics and does not update them ([`crate::qat::freeze_bn_stats`]).
    pub freeze_bn: bool,
    /// The weight fake quant (`weight_fake_quant`).
    pub weight_fake_quant: FakeQuantize,
    /// The output fake quant (`activation_post_process`), if the qconfig has one.
    pub activation_post_process: Option<FakeQuantize>,
}

/// Parameter gradients of one module, by parameter name (`weight`, `bn.bias`, ...).
pub(crate) type NamedGrads = Vec<(&'static str, ArrayD<f32>)>;

/// The state a training-mode forward saves for [`QatLayer::backward`].
#[derive(Debug, Clone)]
pub(crate) struct StepSaved {
    kind: SavedKind,
    in_shape: Vec<usize>,
    /// The output fake quant's input, when there is one.
    out_fq_input: Option<ArrayD<f32>>,
}

#[derive(Debug, Clone)]
enum SavedKind {
    /// A QAT conv + BatchNorm step on the backend.
    Bn {
        x4: Array4<f32>,
        conv: ops::Conv2d,
        /// The BatchNorm before the step's running update.
        bn: BatchNorm,
        cfg: QatConfig,
        fwd: Box<QatForward>,
    },
    /// conv / linear with a fake-quantized weight, then the activation.
    Plain {
        x4: Array4<f32>,
        w_q4: Array4<f32>,
        /// The weight and the qparams it was fake-quantized with (`None`: fake quant off).
        w: ArrayD<f32>,
        w_qparams: Option<QParams>,
        /// Pre-activation output, 4-D.
        pre4: Array4<f32>,
    },
}

/// The qparams of a deployable layer ([`crate::qat::convert_to_deployable`]).
#[derive(Debug, Clone, PartialEq)]
pub struct FinalQParams {
    /// Scale(s) and zero point(s).
    pub qparams: QParams,
    /// The integer range.
    pub range: QuantRange,
    /// The quantized dtype.
    pub dtype: QDtype,
}

/// What int8 deployment of one converted module needs besides its weights.
#[derive(Debug, Clone, PartialEq)]
pub struct DeployQParams {
    /// The qparams the folded weight was fake-quantized with.
    pub weight: FinalQParams,
    /// The output fake quant's final qparams, when the module has an observed one.
    pub activation: Option<FinalQParams>,
}

impl QatLayer {
    /// A QAT module from its parts and a qconfig (fresh fake quants, `freeze_bn = false`).
    ///
    /// Errors: [`Error::ChannelMismatch`] when the BatchNorm's `num_features` differs from
    /// the head's output channels; [`Error::AxisOutOfRange`] for a per-channel weight axis
    /// the weight does not have; the qconfig's validation errors.
    pub fn new(
        head: QatHead,
        bn: Option<BatchNormLayer>,
        act: Activation,
        qconfig: &QatQConfig,
    ) -> Result<Self> {
        qconfig.validate()?;
        if let Some(b) = &bn {
            b.bn.validate()?;
            if b.num_features() != head.out_channels() {
                return Err(Error::ChannelMismatch {
                    layer: head.kind_name().to_string(),
                    layer_channels: head.out_channels(),
                    bn_channels: b.num_features(),
                });
            }
        }
        let spec = qconfig.weight.spec;
        let mut qconfig = *qconfig;
        if spec.qscheme.is_per_channel() {
            // The weight's rank is known: resolve a negative axis once.
            qconfig.weight.spec = spec.for_rank(head.weight_rank())?;
        }
        Ok(Self {
            head,
            bn,
            act,
            freeze_bn: false,
            weight_fake_quant: FakeQuantize::new(qconfig.weight)?,
            activation_post_process: qconfig.activation.map(FakeQuantize::new).transpose()?,
        })
    }

    /// The QAT module for a float layer (PyTorch's `from_float`), or `None` for a layer
    /// that has no QAT form: `Conv1d`, `Conv2d`, `Linear` and the fused modules with such a
    /// head (intrinsic `ConvBn*` / `LinearBn1d` with their BatchNorm, folded `ConvReLU*` /
    /// `LinearReLU` and the other activations) convert; transposed convs, BatchNorm heads
    /// (`BNReLU2d`), already-QAT modules and everything else do not.
    ///
    /// Errors: those of [`QatLayer::new`].
    pub fn from_layer(layer: &Layer, qconfig: &QatQConfig) -> Result<Option<Self>> {
        let (head, bn, act) = match layer {
            Layer::Conv1d(c) => (QatHead::Conv1d(c.clone()), None, Activation::None),
            Layer::Conv2d(c) => (QatHead::Conv2d(c.clone()), None, Activation::None),
            Layer::Linear(l) => (QatHead::Linear(l.clone()), None, Activation::None),
            Layer::Fused(f) => {
                let head = match &f.head {
                    FusedHead::Conv1d(c) => QatHead::Conv1d(c.clone()),
                    FusedHead::Conv2d(c) => QatHead::Conv2d(c.clone()),
                    FusedHead::Linear(l) => QatHead::Linear(l.clone()),
                    _ => return Ok(None),
                };
                (head, f.bn.clone(), f.act)
            }
            _ => return Ok(None),
        };
        Self::new(head, bn, act, qconfig).map(Some)
    }

    /// PyTorch's class name: `ConvBn2d`, `ConvBnReLU2d`, `ConvBn1d`, `ConvBnReLU1d`,
    /// `LinearBn1d`, `ConvReLU2d`, `ConvReLU1d`, `LinearReLU`, `Conv2d`, `Conv1d`, `Linear`
    /// (other activations as [`Fused`] names them).
    pub fn kind_name(&self) -> String {
        let bn = self.bn.is_some();
        let (stem, dims) = match &self.head {
            QatHead::Conv1d(_) => ("Conv", "1d"),
            QatHead::Conv2d(_) => ("Conv", "2d"),
            QatHead::Linear(_) => ("Linear", if bn { "1d" } else { "" }),
        };
        let act = match self.act {
            Activation::None => "",
            a => a.kind_name(),
        };
        format!("{stem}{}{act}{dims}", if bn { "Bn" } else { "" })
    }

    /// The class with its module path: `torch.ao.nn.intrinsic.qat.ConvBnReLU2d` for the
    /// intrinsic modules (a BatchNorm or an activation), `torch.ao.nn.qat.Conv2d` for the
    /// plain ones.
    pub fn qualified_name(&self) -> String {
        let module = if self.bn.is_some() || self.act != Activation::None {
            "torch.ao.nn.intrinsic.qat"
        } else {
            "torch.ao.nn.qat"
        };
        format!("{module}.{}", self.kind_name())
    }

    /// `freeze_bn_stats()`: for a module with a BatchNorm, sets [`QatLayer::freeze_bn`];
    /// whether it has one.
    pub fn freeze_bn_stats(&mut self) -> bool {
        if self.bn.is_some() {
            self.freeze_bn = true;
        }
        self.bn.is_some()
    }

    /// `update_bn_stats()`: for a module with a BatchNorm, clears [`QatLayer::freeze_bn`];
    /// whether it has one.
    pub fn update_bn_stats(&mut self) -> bool {
        if self.bn.is_some() {
            self.freeze_bn = false;
        }
        self.bn.is_some()
    }

    /// Every fake quant of the module (the weight's, then the output's).
    pub fn fake_quants_mut(&mut self) -> impl Iterator<Item = &mut FakeQuantize> {
        std::iter::once(&mut self.weight_fake_quant).chain(self.activation_post_process.as_mut())
    }

    /// The forward (see the [type docs](QatLayer#forward)) with the module's `training`
    /// flag. Updates the fake quants' observers (when enabled) and, in training mode with a
    /// BatchNorm that is not frozen, its running statistics.
    ///
    /// Input ranks: Conv2d `(N, C, H, W)`, Conv1d `(N, C, L)`, Linear `(…, in)`, LinearBn1d
    /// `(N, in)`.
    ///
    /// Errors: [`Error::InvalidArgument`] / [`Error::ShapeMismatch`] for inputs of the wrong
    /// rank or shape; the backend's and the fake quants' errors.
    pub fn forward(
        &mut self,
        backend: &dyn HostOps,
        x: &ArrayD<f32>,
        training: bool,
    ) -> Result<ArrayD<f32>> {
        Ok(self.forward_impl(backend, x, training, false)?.0)
    }

    /// The input as the 4-D input of the conv2d the head runs as, for the BatchNorm forms and
    /// the convs (not for a plain Linear, which takes any rank).
    fn input4(&self, x: &ArrayD<f32>) -> Result<Array4<f32>> {
        let s = x.shape().to_vec();
        let shape = match (&self.head, s.as_slice()) {
            (QatHead::Conv2d(_), &[n, c, h, w]) => [n, c, h, w],
            (QatHead::Conv1d(_), &[n, c, l]) => [n, c, 1, l],
            (QatHead::Linear(l), &[n, i]) => {
                if i != l.in_features() {
                    return Err(Error::shape(
                        format!(
                            "Linear input (in_features = {}) last dimension",
                            l.in_features()
                        ),
                        &[l.in_features()],
                        &[i],
                    ));
                }
                [n, i, 1, 1]
            }
            (QatHead::Conv2d(_), _) => {
                return Err(Error::invalid(format!(
                    "{} expects a 4-D input (N, C, H, W), got shape {s:?}",
                    self.kind_name()
                )))
            }
            (QatHead::Conv1d(_), _) => {
                return Err(Error::invalid(format!(
                    "{} expects a 3-D input (N, C, L), got shape {s:?}",
                    self.kind_name()
                )))
            }
            (QatHead::Linear(_), _) => {
                return Err(Error::invalid(format!(
                    "{} expects a 2-D input (N, in_features), got shape {s:?}",
                    self.kind_name()
                )))
            }
        };
        reshape(x, &shape)?
            .into_dimensionality::<Ix4>()
            .map_err(internal)
    }

    /// A 4-D conv2d output back in the head's output rank.
    fn output_from4(&self, y: Array4<f32>) -> Result<ArrayD<f32>> {
        let s = y.shape().to_vec();
        match &self.head {
            QatHead::Conv2d(_) => Ok(y.into_dyn()),
            QatHead::Conv1d(_) => reshape(&y.into_dyn(), &[s[0], s[1], s[3]]),
            QatHead::Linear(_) => reshape(&y.into_dyn(), &[s[0], s[1]]),
        }
    }

    /// The weight observer's spec along the 4-D weight's axes.
    fn spec4(&self) -> ObserverSpec {
        let mut spec = self.weight_fake_quant.spec;
        let axis = usize::try_from(spec.axis).unwrap_or(0);
        spec.axis = self.head.axis4(axis) as isize;
        spec
    }

    /// The forward; with `save`, also what [`QatLayer::backward`] needs (training mode
    /// only for the BatchNorm forms).
    pub(crate) fn forward_impl(
        &mut self,
        b: &dyn HostOps,
        x: &ArrayD<f32>,
        training: bool,
        save: bool,
    ) -> Result<(ArrayD<f32>, Option<StepSaved>)> {
        let (y, kind) = if self.bn.is_some() {
            if training {
                self.bn_train(b, x, save)?
            } else {
                if save {
                    return Err(Error::invalid(format!(
                        "{} in eval mode has no training step (call train() first)",
                        self.kind_name()
                    )));
                }
                (self.bn_eval(b, x)?, None)
            }
        } else {
            self.plain(b, x, save)?
        };
        let (y, out_fq_input) = match self.activation_post_process.as_mut() {
            Some(apq) => {
                let out = apq.forward(b, &y)?;
                (out, if save { Some(y) } else { None })
            }
            None => (y, None),
        };
        let saved = kind.filter(|_| save).map(|kind| StepSaved {
            kind,
            in_shape: x.shape().to_vec(),
            out_fq_input,
        });
        Ok((y, saved))
    }

    /// The fake-quantized weight of the plain forms, with the qparams used (`None` when fake
    /// quant is disabled); the observer sees `w` first when enabled.
    fn quantize_weight(
        &mut self,
        b: &dyn HostOps,
        w: &ArrayD<f32>,
    ) -> Result<(ArrayD<f32>, Option<QParams>)> {
        let fq = &mut self.weight_fake_quant;
        if fq.observer_enabled {
            fq.observe(w)?;
        }
        if fq.fake_quant_enabled {
            let qp = fq.qparams()?;
            Ok((b.fake_quant(w, &qp, fq.spec.range)?, Some(qp)))
        } else {
            Ok((w.clone(), None))
        }
    }

    /// conv / linear with the fake-quantized weight and the activation.
    fn plain(
        &mut self,
        b: &dyn HostOps,
        x: &ArrayD<f32>,
        save: bool,
    ) -> Result<(ArrayD<f32>, Option<SavedKind>)> {
        let w = self.head.weight();
        // Check the input before the observer moves.
        let x4 = match &self.head {
            QatHead::Linear(l) => {
                let Some(&last) = x.shape().last() else {
                    return Err(Error::invalid(
                        "Linear expects an input of rank >= 1, got a scalar",
                    ));
                };
                if last != l.in_features() {
                    return Err(Error::shape(
                        format!(
                            "Linear input (in_features = {}) last dimension",
                            l.in_features()
                        ),
                        &[l.in_features()],
                        &[last],
                    ));
                }
                let m = x.len() / last.max(1);
                reshape(x, &[m, last, 1, 1])?
                    .into_dimensionality::<Ix4>()
                    .map_err(internal)?
            }
            _ => self.input4(x)?,
        };
        let (w_q, w_qparams) = self.quantize_weight(b, &w)?;
        let act = self.act;
        let bias = self.head.bias().cloned();
        let y = match &self.head {
            QatHead::Linear(l) => {
                let (m, inp) = (x4.shape()[0], x4.shape()[1]);
                let x2 = reshape(&x4.clone().into_dyn(), &[m, inp])?
                    .into_dimensionality::<Ix2>()
                    .map_err(internal)?;
                let w2 = w_q.clone().into_dimensionality::<Ix2>().map_err(internal)?;
                let y2 = if save {
                    b.linear(&x2, &w2, bias.as_ref())?
                } else {
                    b.linear_act(&x2, &w2, bias.as_ref(), act)?
                };
                let mut shape = x.shape()[..x.ndim() - 1].to_vec();
                shape.push(l.out_features());
                if save {
                    let pre4 = reshape(&y2.clone().into_dyn(), &[m, l.out_features(), 1, 1])?
                        .into_dimensionality::<Ix4>()
                        .map_err(internal)?;
                    let y = activate(b, &y2.into_dyn(), act)?;
                    let kind = SavedKind::Plain {
                        x4,
                        w_q4: self.head.to4(&w_q)?,
                        w,
                        w_qparams,
                        pre4,
                    };
                    return Ok((reshape(&y, &shape)?, Some(kind)));
                }
                reshape(&y2.into_dyn(), &shape)?
            }
            _ => {
                let w_q4 = self.head.to4(&w_q)?;
                let params = self.head.params2d();
                if save {
                    let pre4 = b.conv2d(&x4, &w_q4, bias.as_ref(), &params)?;
                    let y4 = activate(b, &pre4.clone().into_dyn(), act)?
                        .into_dimensionality::<Ix4>()
                        .map_err(internal)?;
                    let kind = SavedKind::Plain {
                        x4,
                        w_q4,
                        w,
                        w_qparams,
                        pre4,
                    };
                    return Ok((self.output_from4(y4)?, Some(kind)));
                }
                let y4 = b.conv2d_act(&x4, &w_q4, bias.as_ref(), &params, act)?;
                self.output_from4(y4)?
            }
        };
        Ok((y, None))
    }

    /// Training-mode forward of the BatchNorm forms: one QAT step on the backend.
    fn bn_train(
        &mut self,
        b: &dyn HostOps,
        x: &ArrayD<f32>,
        save: bool,
    ) -> Result<(ArrayD<f32>, Option<SavedKind>)> {
        let x4 = self.input4(x)?;
        let w = self.head.weight();
        let w4 = self.head.to4(&w)?;
        let spec4 = self.spec4();
        let axis4 = usize::try_from(spec4.axis).unwrap_or(0);
        let bias = self.head.bias().cloned();
        let params = self.head.params2d();
        let Some(bnl) = self.bn.as_mut() else {
            return Err(Error::invalid("internal: no BatchNorm"));
        };
        // Check the shapes before the observer moves.
        params.output_shape(x4.shape(), w4.shape())?;
        let (_, w_s) = qat_scaled_weight(&w, &bnl.bn)?;
        let fq = &mut self.weight_fake_quant;
        if fq.observer_enabled {
            fq.observe(&w_s)?;
        }
        let mut qp = fq.qparams()?;
        if qp.axis.is_some() {
            qp.axis = Some(axis4);
        }
        let wq = QatWeightQuant {
            qparams: Some(qp),
            fake_quant_enabled: fq.fake_quant_enabled,
        };
        let cfg = QatConfig {
            activation: self.act,
            freeze_bn: self.freeze_bn,
            weight_observer: spec4,
        };
        let conv = ops::Conv2d {
            weight: w4,
            bias,
            params,
        };
        let fwd = b.conv_bn_qat_forward_with(&x4, &conv, &bnl.bn, &cfg, &wq)?;
        let bn_before = if save { Some(bnl.bn.clone()) } else { None };
        if !self.freeze_bn {
            bnl.bn.running_mean = fwd.running_mean.clone();
            bnl.bn.running_var = fwd.running_var.clone();
            bnl.num_batches_tracked += 1;
        }
        let y = self.output_from4(fwd.y.clone())?;
        let kind = bn_before.map(|bn| SavedKind::Bn {
            x4,
            conv,
            bn,
            cfg,
            fwd: Box::new(fwd),
        });
        Ok((y, kind))
    }

    /// Eval-mode forward of the BatchNorm forms: the deploy graph.
    fn bn_eval(&mut self, b: &dyn HostOps, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let (x4, x2) = match &self.head {
            QatHead::Linear(_) => {
                let x4 = self.input4(x)?;
                let (n, i) = (x4.shape()[0], x4.shape()[1]);
                let x2 = x
                    .as_standard_layout()
                    .into_owned()
                    .into_shape_with_order((n, i))
                    .map_err(internal)?;
                (None, Some(x2))
            }
            _ => (Some(self.input4(x)?), None),
        };
        let w = self.head.weight();
        let params = self.head.params2d();
        let Some(bnl) = self.bn.as_ref() else {
            return Err(Error::invalid("internal: no BatchNorm"));
        };
        if let Some(x4) = &x4 {
            params.output_shape(x4.shape(), self.head.to4(&w)?.shape())?;
        }
        let bn = bnl.bn.clone();
        let (_, w_s) = qat_scaled_weight(&w, &bn)?;
        let fq = &mut self.weight_fake_quant;
        if fq.observer_enabled {
            fq.observe(&w_s)?;
        }
        let mut w_q = if fq.fake_quant_enabled {
            b.fake_quant(&w_s, &fq.qparams()?, fq.spec.range)?
        } else {
            w_s
        };
        for c in zero_gamma_channels(&bn) {
            w_q.index_axis_mut(Axis(0), c).fill(0.0);
        }
        let bias = folded_bias(self.head.bias(), &bn)?;
        match (x4, x2) {
            (Some(x4), _) => {
                let y4 =
                    b.conv2d_act(&x4, &self.head.to4(&w_q)?, Some(&bias), &params, self.act)?;
                self.output_from4(y4)
            }
            (None, Some(x2)) => {
                let w2 = w_q.into_dimensionality::<Ix2>().map_err(internal)?;
                Ok(b.linear_act(&x2, &w2, Some(&bias), self.act)?.into_dyn())
            }
            (None, None) => Err(Error::invalid("internal: no input")),
        }
    }

    /// The backward of a training-mode forward that saved `saved`, for upstream `dy`:
    /// `dx` and the parameter gradients, named as the parameters (`weight`, `bias`,
    /// `bn.weight`, `bn.bias`).
    pub(crate) fn backward(
        &self,
        b: &dyn HostOps,
        saved: &StepSaved,
        dy: &ArrayD<f32>,
    ) -> Result<(ArrayD<f32>, NamedGrads)> {
        let dy = match (&self.activation_post_process, &saved.out_fq_input) {
            (Some(apq), Some(pre)) => apq.backward(b, pre, dy)?,
            _ => dy.clone(),
        };
        let w_shape = self.head.weight().shape().to_vec();
        let mut grads: NamedGrads = Vec::new();
        let dx = match &saved.kind {
            SavedKind::Bn {
                x4,
                conv,
                bn,
                cfg,
                fwd,
            } => {
                let dy4 = reshape(&dy, fwd.y.shape())?
                    .into_dimensionality::<Ix4>()
                    .map_err(internal)?;
                let g = b.conv_bn_qat_backward(x4, &dy4, conv, bn, cfg, fwd)?;
                grads.push(("weight", reshape(&g.dweight.into_dyn(), &w_shape)?));
                if let Some(db) = g.dbias {
                    grads.push(("bias", db.into_dyn()));
                }
                if let Some(bnl) = &self.bn {
                    if bnl.bn.weight.is_some() {
                        grads.push(("bn.weight", g.dbn_weight.into_dyn()));
                    }
                    if bnl.bn.bias.is_some() {
                        grads.push(("bn.bias", g.dbn_bias.into_dyn()));
                    }
                }
                reshape(&g.dx.into_dyn(), &saved.in_shape)?
            }
            SavedKind::Plain {
                x4,
                w_q4,
                w,
                w_qparams,
                pre4,
            } => {
                let dy4 = reshape(&dy, pre4.shape())?;
                let dpre = match self.act {
                    Activation::None => dy4,
                    act => b.activation_backward(&pre4.clone().into_dyn(), &dy4, act)?,
                };
                let dpre4 = dpre.into_dimensionality::<Ix4>().map_err(internal)?;
                let g = b.conv2d_backward(x4, w_q4, &dpre4, &self.head.params2d())?;
                let dw_q = reshape(&g.dweight.into_dyn(), &w_shape)?;
                let dw = match w_qparams {
                    Some(qp) => {
                        b.fake_quant_backward(w, &dw_q, qp, self.weight_fake_quant.spec.range)?
                    }
                    None => dw_q,
                };
                grads.push(("weight", dw));
                if self.head.bias().is_some() {
                    grads.push(("bias", g.dbias.into_dyn()));
                }
                reshape(&g.dx.into_dyn(), &saved.in_shape)?
            }
        };
        Ok((dx, grads))
    }

    /// The float parts after folding the BatchNorm with its running statistics
    /// (`fuse_conv_bn_weights` / `fuse_linear_bn_weights`): the head with the folded weight
    /// and bias (the head itself without a BatchNorm).
    fn folded_head(&self) -> Result<QatHead> {
        let Some(bnl) = &self.bn else {
            return Ok(self.head.clone());
        };
        let mut head = self.head.clone();
        match &self.head {
            QatHead::Conv1d(c) | QatHead::Conv2d(c) => {
                let f = fuse_conv_bn_weights(&c.weight, c.bias.as_ref(), &bnl.bn, false)?;
                head.set_weight(f.weight)?;
                head.set_bias(Some(f.bias));
            }
            QatHead::Linear(l) => {
                let f = fuse_linear_bn_weights(&l.weight, l.bias.as_ref(), &bnl.bn)?;
                head.set_weight(f.weight)?;
                head.set_bias(Some(f.bias));
            }
        }
        Ok(head)
    }

    fn layer_of(&self, head: QatHead) -> Result<Layer> {
        if self.act == Activation::None {
            Ok(head.into_layer())
        } else {
            Ok(Layer::Fused(Box::new(Fused::new(
                head.into_fused_head(),
                None,
                self.act,
            )?)))
        }
    }

    /// PyTorch's `to_float()`: the float layer, BatchNorm folded with its running statistics
    /// (`ConvBn2d` → `Conv2d`, `ConvBnReLU2d` → fused `ConvReLU2d`, `LinearBn1d` → `Linear`,
    /// `ConvReLU2d` → fused `ConvReLU2d`, `Conv2d` → `Conv2d`, ...). The fake quants are
    /// dropped.
    ///
    /// Errors: the folding's errors.
    pub fn to_float(&self) -> Result<Layer> {
        self.layer_of(self.folded_head()?)
    }

    /// [`QatLayer::to_float`] with the folded weight fake-quantized with the weight fake
    /// quant's final qparams: its stored `scale` / `zero_point` once it has observed
    /// anything, else the qparams of its observer (same settings) seeing the folded weight
    /// once. Returns the layer and the qparams, with the output fake quant's when it has
    /// observed anything.
    ///
    /// Errors: the folding's and the fake quant's errors.
    pub fn to_deployable(&self) -> Result<(Layer, DeployQParams)> {
        let mut head = self.folded_head()?;
        let w = head.weight();
        let fq = &self.weight_fake_quant;
        let qp = if fq.is_observed() {
            fq.qparams()?
        } else {
            let mut fresh = FakeQuantize::new(fq.config())?;
            fresh.observe(&w)?;
            fresh.qparams()?
        };
        head.set_weight(fake_quantize(&w, &qp, fq.spec.range)?)?;
        let final_of = |f: &FakeQuantize, qparams: QParams| FinalQParams {
            qparams,
            range: f.spec.range,
            dtype: f.spec.dtype,
        };
        let activation = match &self.activation_post_process {
            Some(a) if a.is_observed() => Some(final_of(a, a.qparams()?)),
            _ => None,
        };
        Ok((
            self.layer_of(head)?,
            DeployQParams {
                weight: final_of(fq, qp),
                activation,
            },
        ))
    }
}

/// `act(x)` (a copy for [`Activation::None`]).
fn activate(b: &dyn HostOps, x: &ArrayD<f32>, act: Activation) -> Result<ArrayD<f32>> {
    match act {
        Activation::None => Ok(x.clone()),
        a => b.activation(x, a),
    }
}

/// The folded bias of the deploy graph: `β + (b − running_mean)·γ / sqrt(running_var + eps)`
/// (γ = 1, β = 0 for `affine=False`; `b = 0` without a conv bias).
///
/// Errors: [`Error::ShapeMismatch`] for a bias whose length is not the BatchNorm's; BatchNorm
/// validation errors.
pub(crate) fn folded_bias(bias: Option<&Array1<f32>>, bn: &BatchNorm) -> Result<Array1<f32>> {
    bn.validate()?;
    let c = bn.channels();
    if let Some(b) = bias {
        if b.len() != c {
            return Err(Error::shape("conv bias", &[c], b.shape()));
        }
    }
    Ok(Array1::from_shape_fn(c, |i| {
        let g = bn.weight.as_ref().map_or(1.0, |w| w[i]);
        let beta = bn.bias.as_ref().map_or(0.0, |b| b[i]);
        let s = g / (bn.running_var[i] + bn.eps).sqrt();
        let b = bias.map_or(0.0, |b| b[i]);
        beta + (b - bn.running_mean[i]) * s
    }))
}
