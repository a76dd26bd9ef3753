//! Training on the CPU reference: [`CpuTrainer`] is [`super::GpuTrainer`] on host arrays, each
//! op the [`crate::reference`] function the GPU kernel is checked against — conv2d and its
//! backward, BatchNorm2d with batch statistics and its training backward, the activations
//! and their backward, max pooling and linear backward, `log_softmax` + NLL and their fused
//! backward, the [`Sgd`] step, and in QAT mode the observers
//! ([`crate::reference::train::observer_update`],
//! [`crate::reference::observer::calculate_qparams`]), fake quant with its straight-through
//! backward and the `ConvBn2d` QAT forward / backward of [`crate::reference::conv_bn`].
//!
//! It is the spec of the device trainer (the tests check a [`super::GpuTrainer`] step against
//! a [`CpuTrainer`] step) and what trains when no GPU adapter opens (slower: one thread, f32
//! matrix products).

use ndarray::{Array1, Array2, Array4, ArrayD, Ix1, Ix2, Ix4, IxDyn};

use crate::deploy::{Net, NodeOp, ValueId};
use crate::error::{Error, Result};
use crate::ops::{Activation, BatchNorm, Conv2d, Conv2dParams, QatConfig, QatForward};
use crate::optim::Sgd;
use crate::quant::QParams;
use crate::reference::{
    activation as ract, batch_norm as rbn, conv2d as rconv, conv_bn as rcb, fake_quant as rfq,
    layers, observer as robs, train as rtrain,
};

use super::trainer::{check_act, check_net, check_set_sgd, untrainable};
use super::{NamedGradients, QatOptions};

const WHO: &str = "CpuTrainer";

/// A trained tensor with its momentum buffer.
#[derive(Debug, Clone)]
struct Param {
    t: ArrayD<f32>,
    buf: Option<ArrayD<f32>>,
}

impl Param {
    fn new(t: ArrayD<f32>, sgd: &Sgd) -> Self {
        let buf = sgd.has_momentum().then(|| ArrayD::zeros(t.raw_dim()));
        Self { t, buf }
    }

    fn step(&mut self, g: &ArrayD<f32>, sgd: &Sgd, first: bool) -> Result<()> {
        rtrain::sgd_step(&mut self.t, g, self.buf.as_mut(), sgd, first)
    }
}

/// A BatchNorm2d being trained: γ and β (with momentum buffers) when affine, the running
/// statistics, eps and momentum.
#[derive(Debug, Clone)]
struct Bn {
    /// γ and β, `Some` when the BatchNorm is affine (a missing one of the two starts as ones /
    /// zeros, as on the device).
    affine: Option<(Param, Param)>,
    running_mean: Array1<f32>,
    running_var: Array1<f32>,
    eps: f32,
    momentum: f32,
}

impl Bn {
    fn new(b: &BatchNorm, sgd: &Sgd) -> Result<Self> {
        b.validate()?;
        let c = b.channels();
        let affine = (b.weight.is_some() || b.bias.is_some()).then(|| {
            let g = b.weight.clone().unwrap_or_else(|| Array1::ones(c));
            let be = b.bias.clone().unwrap_or_else(|| Array1::zeros(c));
            (
                Param::new(g.into_dyn(), sgd),
                Param::new(be.into_dyn(), sgd),
            )
        });
        Ok(Self {
            affine,
            running_mean: b.running_mean.clone(),
            running_var: b.running_var.clone(),
            eps: b.eps,
            momentum: b.momentum,
        })
    }

    /// The BatchNorm as the reference ops take it (its current state).
    fn batch_norm(&self) -> Result<BatchNorm> {
        let (weight, bias) = match &self.affine {
            Some((g, b)) => (Some(to1(&g.t)?), Some(to1(&b.t)?)),
            None => (None, None),
        };
        Ok(BatchNorm {
            weight,
            bias,
            running_mean: self.running_mean.clone(),
            running_var: self.running_var.clone(),
            eps: self.eps,
            momentum: self.momentum,
        })
    }
}

// A net has a handful of nodes; boxing the conv variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
enum Op {
    Conv {
        weight: Param,
        bias: Option<Param>,
        params: Conv2dParams,
        bn: Option<Bn>,
        act: Activation,
    },
    Linear {
        weight: Param,
        bias: Option<Param>,
        act: Activation,
    },
    MaxPool {
        kernel: usize,
        stride: usize,
    },
    Flatten,
    Add {
        act: Activation,
    },
}

#[derive(Debug, Clone)]
struct TNode {
    name: String,
    op: Op,
    inputs: Vec<ValueId>,
}

/// A fake-quantized value: the tensor it was computed from (where the straight-through mask
/// is evaluated) and its qparams.
#[derive(Debug, Clone)]
struct Quantized {
    pre: ArrayD<f32>,
    qparams: QParams,
}

/// What a BatchNorm's training backward needs: its input (the conv output), the BatchNorm
/// (γ) and the batch mean / invstd it normalized with.
struct SavedBn {
    input: Array4<f32>,
    bn: BatchNorm,
    mean: Array1<f32>,
    invstd: Array1<f32>,
}

/// What a node's backward needs from its forward.
enum Saved {
    Conv {
        x: Array4<f32>,
        /// The weight the conv ran with (fake-quantized in QAT).
        w: Array4<f32>,
        /// The activation's input.
        pre: Array4<f32>,
        /// With a BatchNorm: what its backward needs.
        bn: Option<SavedBn>,
        /// QAT: the weight's qparams.
        wq: Option<QParams>,
    },
    /// QAT conv + BatchNorm (`ConvBn2d`): the conv and the BatchNorm as the forward saw them
    /// (running statistics before its update) and the forward's saved tensors.
    QatConvBn {
        x: Array4<f32>,
        conv: Conv2d,
        bn: BatchNorm,
        cfg: QatConfig,
        fwd: Box<QatForward>,
    },
    Linear {
        x: Array2<f32>,
        w: Array2<f32>,
        pre: Array2<f32>,
        wq: Option<QParams>,
    },
    Pool {
        x: Array4<f32>,
    },
    Flatten {
        shape: Vec<usize>,
    },
    Add {
        pre: ArrayD<f32>,
    },
}

struct Forward {
    out: ArrayD<f32>,
    saved: Vec<Saved>,
    quantized: Vec<Option<Quantized>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Weight,
    Bias,
    BnGamma,
    BnBeta,
}

struct Grad {
    node: usize,
    role: Role,
    g: ArrayD<f32>,
}

/// The QAT state: one `[2, 1]` min/max observer per observed value.
#[derive(Debug, Clone)]
struct QatState {
    opts: QatOptions,
    observers: Vec<Option<Array2<f32>>>,
    observed: bool,
    observers_frozen: bool,
    bn_frozen: bool,
}

impl QatState {
    /// Fake-quantizes value `v` (`y`) with its observer, first updating the observer with
    /// `y`'s min/max when `update` (as [`super::GpuTrainer`]'s observers on the device).
    fn activation(
        &mut self,
        v: usize,
        y: &ArrayD<f32>,
        update: bool,
    ) -> Result<(ArrayD<f32>, Quantized)> {
        let first = !self.observed;
        let c = self.opts.averaging_constant;
        let state = self
            .observers
            .get_mut(v)
            .and_then(Option::as_mut)
            .ok_or_else(|| Error::invalid(format!("internal: value {v} has no observer")))?;
        if update {
            let (mn, mx) = robs::min_max(y);
            let batch = Array2::from_shape_vec((2, 1), vec![mn, mx])
                .map_err(|e| Error::invalid(format!("internal: {e}")))?;
            rtrain::observer_update(state, &batch, Some(c), first)?;
        } else if first {
            return Err(Error::invalid(
                "QAT: the activation observers have seen no batch yet; run a training step \
                 (with observers enabled) before evaluating",
            ));
        }
        let spec = &self.opts.activation;
        let qparams = robs::calculate_qparams(&[state[[0, 0]]], &[state[[1, 0]]], spec);
        let yq = rfq::fake_quantize(y, &qparams, spec.range)?;
        Ok((
            yq,
            Quantized {
                pre: y.clone(),
                qparams,
            },
        ))
    }

    /// Fake-quantizes a weight with qparams observed from it now.
    fn weight(&self, w: &ArrayD<f32>) -> Result<(ArrayD<f32>, QParams)> {
        let spec = &self.opts.weight;
        let qparams = robs::observe_qparams(w, spec)?;
        Ok((rfq::fake_quantize(w, &qparams, spec.range)?, qparams))
    }

    fn weight_backward(
        &self,
        w: &ArrayD<f32>,
        d: &ArrayD<f32>,
        qp: &QParams,
    ) -> Result<ArrayD<f32>> {
        rfq::fake_quantize_backward(w, d, qp, self.opts.weight.range)
    }
}

/// Trains a [`Net`] on the CPU reference: [`super::GpuTrainer`]'s forward, backward, SGD
/// and QAT with host arrays, each op the [`crate::reference`] function the GPU kernel is
/// checked against — conv2d and its backward, BatchNorm2d with batch statistics and its
/// training backward, the activations and their backward, max pooling and linear backward,
/// `log_softmax` + NLL and their fused backward, the [`Sgd`] step, and in QAT mode the
/// observers ([`rtrain::observer_update`], [`robs::calculate_qparams`]), fake quant with its
/// straight-through backward and the `ConvBn2d` QAT forward / backward
/// ([`rcb::conv_bn_qat_forward`], [`rcb::conv_bn_qat_backward`]).
///
/// It is the spec of the device trainer (the tests check a [`super::GpuTrainer`] step
/// against a [`CpuTrainer`] step) and what trains when no GPU adapter opens (slower: one
/// thread). [`super::Trainer`] drives either.
#[derive(Debug, Clone)]
pub struct CpuTrainer {
    nodes: Vec<TNode>,
    output: ValueId,
    sgd: Sgd,
    steps: u64,
    qat: Option<QatState>,
}

fn internal(e: impl std::fmt::Display) -> Error {
    Error::invalid(format!("internal: {e}"))
}

fn to1(a: &ArrayD<f32>) -> Result<Array1<f32>> {
    a.clone().into_dimensionality::<Ix1>().map_err(internal)
}

fn to4(a: &ArrayD<f32>, name: &str) -> Result<Array4<f32>> {
    a.clone().into_dimensionality::<Ix4>().map_err(|_| {
        Error::invalid(format!(
            "`{}` needs a 4-D NCHW input, got shape {:?}",
            name.escape_debug(),
            a.shape()
        ))
    })
}

fn to2(a: &ArrayD<f32>, name: &str) -> Result<Array2<f32>> {
    a.clone().into_dimensionality::<Ix2>().map_err(|_| {
        Error::invalid(format!(
            "`{}` needs a 2-D [N, features] input, got shape {:?} (flatten it first)",
            name.escape_debug(),
            a.shape()
        ))
    })
}

fn bias1(b: Option<&Param>) -> Result<Option<Array1<f32>>> {
    b.map(|p| to1(&p.t)).transpose()
}

/// The gradient of `act` at its input `pre` for upstream `d`.
fn act_backward(pre: ArrayD<f32>, d: ArrayD<f32>, act: Activation) -> Result<ArrayD<f32>> {
    if act == Activation::None {
        Ok(d)
    } else {
        ract::activation_backward(&pre, &d, act)
    }
}

impl CpuTrainer {
    /// Copies `net`'s parameters and BatchNorm state, with zeroed momentum buffers.
    ///
    /// Errors: [`Error::InvalidArgument`] for an empty net or an activation other than none,
    /// ReLU or ReLU6, for bad SGD settings ([`Sgd::validate`]) or a bad BatchNorm
    /// ([`BatchNorm::validate`]) — what [`super::GpuTrainer::new`] refuses.
    pub fn new(net: &Net, sgd: Sgd) -> Result<Self> {
        check_net(WHO, net, &sgd)?;
        let mut nodes = Vec::with_capacity(net.nodes().len());
        for node in net.nodes() {
            let op = match &node.op {
                NodeOp::Conv { conv, bn, act } => {
                    check_act(WHO, &node.name, *act)?;
                    Op::Conv {
                        weight: Param::new(conv.weight.clone().into_dyn(), &sgd),
                        bias: conv
                            .bias
                            .as_ref()
                            .map(|b| Param::new(b.clone().into_dyn(), &sgd)),
                        params: conv.params,
                        bn: bn.as_ref().map(|b| Bn::new(b, &sgd)).transpose()?,
                        act: *act,
                    }
                }
                NodeOp::Linear { weight, bias, act } => {
                    check_act(WHO, &node.name, *act)?;
                    Op::Linear {
                        weight: Param::new(weight.clone().into_dyn(), &sgd),
                        bias: bias
                            .as_ref()
                            .map(|b| Param::new(b.clone().into_dyn(), &sgd)),
                        act: *act,
                    }
                }
                NodeOp::MaxPool2d { kernel, stride } => Op::MaxPool {
                    kernel: *kernel,
                    stride: *stride,
                },
                NodeOp::Flatten => Op::Flatten,
                NodeOp::Add { act } => {
                    check_act(WHO, &node.name, *act)?;
                    Op::Add { act: *act }
                }
                NodeOp::MaxPool2dPad { .. } | NodeOp::GlobalAvgPool | NodeOp::Activation { .. } => {
                    return Err(untrainable(WHO, &node.name, node.op.kind()))
                }
            };
            nodes.push(TNode {
                name: node.name.clone(),
                op,
                inputs: node.inputs.clone(),
            });
        }
        Ok(Self {
            nodes,
            output: net.output(),
            sgd,
            steps: 0,
            qat: None,
        })
    }

    /// The optimizer settings.
    pub fn sgd(&self) -> Sgd {
        self.sgd
    }

    /// Changes the optimizer settings, as [`super::GpuTrainer::set_sgd`] (momentum only if
    /// the trainer was created with it).
    ///
    /// Errors: [`Error::InvalidArgument`] for bad settings or momentum added later.
    pub fn set_sgd(&mut self, sgd: Sgd) -> Result<()> {
        check_set_sgd(WHO, &self.sgd, &sgd)?;
        self.sgd = sgd;
        Ok(())
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Turns on quantization-aware training, as [`super::GpuTrainer::enable_qat`].
    ///
    /// Errors: [`QatOptions::validate`]; QAT already on.
    pub fn enable_qat(&mut self, opts: QatOptions) -> Result<()> {
        if self.qat.is_some() {
            return Err(Error::invalid(format!("{WHO}: QAT is already enabled")));
        }
        opts.validate()?;
        let mut observers = vec![Some(Array2::zeros((2, 1)))];
        observers.extend(self.nodes.iter().map(|n| {
            matches!(n.op, Op::Conv { .. } | Op::Linear { .. } | Op::Add { .. })
                .then(|| Array2::zeros((2, 1)))
        }));
        self.qat = Some(QatState {
            opts,
            observers,
            observed: false,
            observers_frozen: false,
            bn_frozen: false,
        });
        Ok(())
    }

    /// Whether QAT is on.
    pub fn qat_enabled(&self) -> bool {
        self.qat.is_some()
    }

    /// Freezes (or thaws) the QAT activation observers, as
    /// [`super::GpuTrainer::freeze_observers`].
    ///
    /// Errors: [`Error::InvalidArgument`] when QAT is off.
    pub fn freeze_observers(&mut self, frozen: bool) -> Result<()> {
        self.qat_mut("freeze_observers")?.observers_frozen = frozen;
        Ok(())
    }

    /// Freezes (or thaws) the BatchNorm statistics of QAT conv + BN layers, as
    /// [`super::GpuTrainer::freeze_bn_stats`].
    ///
    /// Errors: [`Error::InvalidArgument`] when QAT is off.
    pub fn freeze_bn_stats(&mut self, frozen: bool) -> Result<()> {
        self.qat_mut("freeze_bn_stats")?.bn_frozen = frozen;
        Ok(())
    }

    /// The QAT observers' activation ranges by value (value 0 the input, value `i + 1` node
    /// `i`'s output; `None` for values QAT does not observe), as
    /// [`super::GpuTrainer::activation_ranges`].
    ///
    /// Errors: [`Error::InvalidArgument`] when QAT is off or no training step has run since
    /// it was enabled.
    pub fn activation_ranges(&self) -> Result<Vec<Option<(f32, f32)>>> {
        let q = self.qat.as_ref().ok_or_else(|| {
            Error::invalid(format!("{WHO}::activation_ranges: QAT is not enabled"))
        })?;
        if !q.observed {
            return Err(Error::invalid(
                "QAT: the activation observers have seen no batch yet",
            ));
        }
        Ok(q.observers
            .iter()
            .map(|o| o.as_ref().map(|s| (s[[0, 0]], s[[1, 0]])))
            .collect())
    }

    fn qat_mut(&mut self, what: &str) -> Result<&mut QatState> {
        self.qat
            .as_mut()
            .ok_or_else(|| Error::invalid(format!("{WHO}::{what}: QAT is not enabled")))
    }

    /// Runs the net (training mode: batch statistics, running-statistics and observer
    /// updates; eval mode: running statistics, nothing changes).
    fn run(&mut self, x: &ArrayD<f32>, training: bool) -> Result<Forward> {
        let Self {
            nodes, output, qat, ..
        } = self;
        let update = training && qat.as_ref().is_some_and(|q| !q.observers_frozen);
        let mut values: Vec<ArrayD<f32>> = Vec::with_capacity(nodes.len() + 1);
        values.push(match qat.as_mut() {
            Some(q) => q.activation(0, x, update)?.0,
            None => x.clone(),
        });
        let mut saved = Vec::with_capacity(if training { nodes.len() } else { 0 });
        let mut quantized = Vec::with_capacity(saved.capacity());
        for (i, node) in nodes.iter_mut().enumerate() {
            let get = |v: ValueId| -> Result<&ArrayD<f32>> {
                values.get(v).ok_or_else(|| {
                    Error::invalid(format!("internal: value {v} read before it was computed"))
                })
            };
            let x = get(node.inputs[0])?;
            let name = node.name.as_str();
            let (y, s) = match &mut node.op {
                Op::Conv {
                    weight,
                    bias,
                    params,
                    bn,
                    act,
                } => {
                    let xi = to4(x, name)?;
                    let b = bias1(bias.as_ref())?;
                    match (bn, qat.as_ref()) {
                        (Some(bn), Some(q)) => {
                            let cfg = QatConfig {
                                activation: *act,
                                freeze_bn: !training || q.bn_frozen,
                                weight_observer: q.opts.weight,
                            };
                            let conv = Conv2d {
                                weight: to4(&weight.t, name)?,
                                bias: b,
                                params: *params,
                            };
                            let before = bn.batch_norm()?;
                            // The finite γ = 0 form (s = 1 where γ = 0), as the GPU trainer.
                            let fwd = rcb::conv_bn_qat_forward_with(
                                &xi,
                                &conv,
                                &before,
                                &cfg,
                                &crate::ops::QatWeightQuant::default(),
                            )?;
                            if !cfg.freeze_bn {
                                bn.running_mean = fwd.running_mean.clone();
                                bn.running_var = fwd.running_var.clone();
                            }
                            let y = fwd.y.clone().into_dyn();
                            let s = Saved::QatConvBn {
                                x: xi,
                                conv,
                                bn: before,
                                cfg,
                                fwd: Box::new(fwd),
                            };
                            (y, s)
                        }
                        (bn, q) => {
                            // QAT without BatchNorm: the weight fake-quantized with qparams
                            // observed from it now.
                            let (w, wq) = match (q, bn.is_some()) {
                                (Some(q), false) => {
                                    let (t, qp) = q.weight(&weight.t)?;
                                    (to4(&t, name)?, Some(qp))
                                }
                                _ => (to4(&weight.t, name)?, None),
                            };
                            let conv_out = rconv::conv2d(&xi, &w, b.as_ref(), params)?;
                            let (pre, saved_bn) = match bn {
                                Some(bn) => {
                                    let b = bn.batch_norm()?;
                                    let out = rbn::batch_norm2d(&conv_out, &b, training)?;
                                    if training {
                                        bn.running_mean = out.running_mean;
                                        bn.running_var = out.running_var;
                                    }
                                    let saved = SavedBn {
                                        input: conv_out,
                                        bn: b,
                                        mean: out.mean,
                                        invstd: out.invstd,
                                    };
                                    (out.y, Some(saved))
                                }
                                None => (conv_out, None),
                            };
                            let y = ract::activation(&pre.clone().into_dyn(), *act);
                            let s = Saved::Conv {
                                x: xi,
                                w,
                                pre,
                                bn: saved_bn,
                                wq,
                            };
                            (y, s)
                        }
                    }
                }
                Op::Linear { weight, bias, act } => {
                    let xi = to2(x, name)?;
                    let (w, wq) = match qat.as_ref() {
                        Some(q) => {
                            let (t, qp) = q.weight(&weight.t)?;
                            (t, Some(qp))
                        }
                        None => (weight.t.clone(), None),
                    };
                    let w = w.into_dimensionality::<Ix2>().map_err(internal)?;
                    let pre = layers::linear(&xi, &w, bias1(bias.as_ref())?.as_ref())?;
                    let y = ract::activation(&pre.clone().into_dyn(), *act);
                    (y, Saved::Linear { x: xi, w, pre, wq })
                }
                Op::MaxPool { kernel, stride } => {
                    let xi = to4(x, name)?;
                    let y = layers::max_pool2d(&xi, *kernel, *stride)?.into_dyn();
                    (y, Saved::Pool { x: xi })
                }
                Op::Flatten => {
                    let shape = crate::ops::flatten_shape(x.shape())?;
                    let y = x
                        .as_standard_layout()
                        .to_owned()
                        .into_shape_with_order(IxDyn(&shape))
                        .map_err(internal)?;
                    (
                        y,
                        Saved::Flatten {
                            shape: x.shape().to_vec(),
                        },
                    )
                }
                Op::Add { act } => {
                    let other = get(node.inputs[1])?;
                    if other.shape() != x.shape() {
                        return Err(Error::shape(
                            format!("`{}` add (b vs a)", name.escape_debug()),
                            x.shape(),
                            other.shape(),
                        ));
                    }
                    let pre = x + other;
                    let y = ract::activation(&pre, *act);
                    (y, Saved::Add { pre })
                }
            };
            // QAT: requantizing outputs are fake-quantized with their observers.
            let (y, q) = match qat.as_mut() {
                Some(q)
                    if matches!(
                        node.op,
                        Op::Conv { .. } | Op::Linear { .. } | Op::Add { .. }
                    ) =>
                {
                    let (yq, info) = q.activation(i + 1, &y, update)?;
                    (yq, Some(info))
                }
                _ => (y, None),
            };
            if training {
                saved.push(s);
                quantized.push(q);
            }
            values.push(y);
        }
        if update {
            if let Some(q) = qat.as_mut() {
                q.observed = true;
            }
        }
        let out = values
            .get(*output)
            .cloned()
            .ok_or_else(|| Error::invalid("internal: the net's output was not computed"))?;
        Ok(Forward {
            out,
            saved,
            quantized,
        })
    }

    /// The net's output (logits) for `x` in eval mode (BatchNorms use their running
    /// statistics; nothing changes).
    ///
    /// Errors: shape errors of the ops (an input the net cannot take); in QAT mode before any
    /// training step, [`Error::InvalidArgument`].
    pub fn forward_eval(&mut self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        Ok(self.run(x, false)?.out)
    }

    /// The number of rows of `x` the net classifies as `labels` says, in eval mode
    /// ([`rtrain::count_correct`]).
    ///
    /// Errors: as [`CpuTrainer::forward_eval`]; labels that are not one per row or out of
    /// range.
    pub fn count_correct(&mut self, x: &ArrayD<f32>, labels: &[u32]) -> Result<u32> {
        let logits = self.forward_eval(x)?;
        rtrain::count_correct(&to2(&logits, "the net's output")?, labels)
    }

    /// Forward in training mode and backward of `nll_loss(log_softmax(net(x)), labels)`.
    fn loss_and_grads(&mut self, x: &ArrayD<f32>, labels: &[u32]) -> Result<(f32, Vec<Grad>)> {
        // Labels out of range are refused before the forward moves any statistics (as the
        // device trainer's upload refuses them), when a linear layer gives the output.
        let classes = self
            .output
            .checked_sub(1)
            .and_then(|i| self.nodes.get(i))
            .and_then(|n| match &n.op {
                Op::Linear { weight, .. } => weight.t.shape().first().copied(),
                _ => None,
            });
        if let Some(c) = classes {
            rtrain::check_labels(labels, c)?;
        }
        let Forward {
            out: logits,
            saved,
            quantized,
        } = self.run(x, true)?;
        let qat = self.qat.as_ref();
        let logp = layers::log_softmax(&to2(&logits, "the net's output")?);
        let loss = rtrain::nll_loss(&logp, labels)?;
        let dlogits = rtrain::log_softmax_nll_backward(&logp, labels)?;
        let mut grads: Vec<Option<ArrayD<f32>>> = vec![None; self.nodes.len() + 1];
        grads[self.output] = Some(dlogits.into_dyn());
        let mut out = Vec::new();
        let accumulate = |grads: &mut Vec<Option<ArrayD<f32>>>, v: ValueId, g: ArrayD<f32>| {
            let merged = match grads[v].take() {
                Some(prev) => {
                    if prev.shape() != g.shape() {
                        return Err(Error::shape(
                            "gradient sum (b vs a)",
                            prev.shape(),
                            g.shape(),
                        ));
                    }
                    prev + g
                }
                None => g,
            };
            grads[v] = Some(merged);
            Ok(())
        };
        for (i, (node, s)) in self.nodes.iter().zip(saved).enumerate().rev() {
            let Some(d) = grads[i + 1].take() else {
                continue;
            };
            // QAT: the output's fake quant, straight through inside its range.
            let d = match (qat, &quantized[i]) {
                (Some(q), Some(info)) => rfq::fake_quantize_backward(
                    &info.pre,
                    &d,
                    &info.qparams,
                    q.opts.activation.range,
                )?,
                _ => d,
            };
            let input = node.inputs[0];
            // The net's input (value 0) needs no gradient.
            let wants_dx = input != 0;
            let mut push = |role: Role, g: ArrayD<f32>| out.push(Grad { node: i, role, g });
            match (&node.op, s) {
                (
                    Op::Conv {
                        weight,
                        bias,
                        params,
                        act,
                        ..
                    },
                    Saved::Conv { x, w, pre, bn, wq },
                ) => {
                    let dpre = act_backward(pre.into_dyn(), d, *act)?;
                    let dpre = to4(&dpre, &node.name)?;
                    let dconv = match bn {
                        Some(sb) => {
                            let g = rbn::batch_norm2d_backward_with_stats(
                                &sb.input, &dpre, &sb.bn, &sb.mean, &sb.invstd, true,
                            )?;
                            if sb.bn.weight.is_some() {
                                push(Role::BnGamma, g.dweight.into_dyn());
                                push(Role::BnBeta, g.dbias.into_dyn());
                            }
                            g.dx
                        }
                        None => dpre,
                    };
                    let g = rconv::conv2d_backward(&x, &w, &dconv, params)?;
                    if wants_dx {
                        accumulate(&mut grads, input, g.dx.into_dyn())?;
                    }
                    let mut dw = g.dweight.into_dyn();
                    if let (Some(q), Some(qp)) = (qat, &wq) {
                        dw = q.weight_backward(&weight.t, &dw, qp)?;
                    }
                    push(Role::Weight, dw);
                    if bias.is_some() {
                        push(Role::Bias, g.dbias.into_dyn());
                    }
                }
                (
                    Op::Conv { bn: Some(bn), .. },
                    Saved::QatConvBn {
                        x,
                        conv,
                        bn: b,
                        cfg,
                        fwd,
                    },
                ) => {
                    let d4 = to4(&d, &node.name)?;
                    let g = rcb::conv_bn_qat_backward(&x, &d4, &conv, &b, &cfg, &fwd)?;
                    if wants_dx {
                        accumulate(&mut grads, input, g.dx.into_dyn())?;
                    }
                    push(Role::Weight, g.dweight.into_dyn());
                    if let Some(db) = g.dbias {
                        push(Role::Bias, db.into_dyn());
                    }
                    if bn.affine.is_some() {
                        push(Role::BnGamma, g.dbn_weight.into_dyn());
                        push(Role::BnBeta, g.dbn_bias.into_dyn());
                    }
                }
                (Op::Linear { weight, bias, act }, Saved::Linear { x, w, pre, wq }) => {
                    let dpre = act_backward(pre.into_dyn(), d, *act)?;
                    let g = rtrain::linear_backward(&x, &w, &to2(&dpre, &node.name)?)?;
                    if wants_dx {
                        accumulate(&mut grads, input, g.dx.into_dyn())?;
                    }
                    let mut dw = g.dweight.into_dyn();
                    if let (Some(q), Some(qp)) = (qat, &wq) {
                        dw = q.weight_backward(&weight.t, &dw, qp)?;
                    }
                    push(Role::Weight, dw);
                    if bias.is_some() {
                        push(Role::Bias, g.dbias.into_dyn());
                    }
                }
                (Op::MaxPool { kernel, stride }, Saved::Pool { x }) => {
                    if wants_dx {
                        let d4 = to4(&d, &node.name)?;
                        let dx = rtrain::max_pool2d_backward(&x, &d4, *kernel, *stride)?;
                        accumulate(&mut grads, input, dx.into_dyn())?;
                    }
                }
                (Op::Flatten, Saved::Flatten { shape }) => {
                    if wants_dx {
                        let dx = d.into_shape_with_order(IxDyn(&shape)).map_err(internal)?;
                        accumulate(&mut grads, input, dx)?;
                    }
                }
                (Op::Add { act }, Saved::Add { pre }) => {
                    let dpre = act_backward(pre, d, *act)?;
                    let other = node.inputs[1];
                    if other != 0 {
                        accumulate(&mut grads, other, dpre.clone())?;
                    }
                    if wants_dx {
                        accumulate(&mut grads, input, dpre)?;
                    }
                }
                _ => return Err(Error::invalid("internal: forward record out of order")),
            }
        }
        Ok((loss, out))
    }

    /// One training step on a batch `x` with `labels`, as [`super::GpuTrainer::step`]:
    /// forward in training mode, the loss `nll_loss(log_softmax(net(x)), labels)` (mean),
    /// backward, and one [`Sgd`] step on every weight, bias and BatchNorm γ / β. Returns the
    /// loss.
    ///
    /// Errors: shape errors of the ops (an input the net cannot take), labels that are not
    /// one per row or out of range. After an error the BatchNorm running statistics and QAT
    /// observers may have moved.
    pub fn step(&mut self, x: &ArrayD<f32>, labels: &[u32]) -> Result<f32> {
        let (loss, grads) = self.loss_and_grads(x, labels)?;
        let first = self.steps == 0;
        let sgd = self.sgd;
        for g in &grads {
            let node = &mut self.nodes[g.node];
            let p = match (&mut node.op, g.role) {
                (Op::Conv { weight, .. } | Op::Linear { weight, .. }, Role::Weight) => weight,
                (Op::Conv { bias: Some(b), .. } | Op::Linear { bias: Some(b), .. }, Role::Bias) => {
                    b
                }
                (
                    Op::Conv {
                        bn:
                            Some(Bn {
                                affine: Some((gamma, beta)),
                                ..
                            }),
                        ..
                    },
                    role @ (Role::BnGamma | Role::BnBeta),
                ) => {
                    if role == Role::BnGamma {
                        gamma
                    } else {
                        beta
                    }
                }
                _ => return Err(Error::invalid("internal: a gradient without its parameter")),
            };
            p.step(&g.g, &sgd, first)?;
        }
        self.steps += 1;
        Ok(loss)
    }

    /// The loss and every parameter's gradient for one batch, by name (`conv1.weight`,
    /// `conv1.bias`, `conv1.bn.weight`, `conv1.bn.bias`, `fc1.weight`, ...), without changing
    /// the parameters (the BatchNorm running statistics and QAT observers move, as in any
    /// training-mode forward), as [`super::GpuTrainer::gradients`].
    ///
    /// Errors: as [`CpuTrainer::step`].
    pub fn gradients(&mut self, x: &ArrayD<f32>, labels: &[u32]) -> Result<(f32, NamedGradients)> {
        let (loss, grads) = self.loss_and_grads(x, labels)?;
        let named = grads
            .into_iter()
            .map(|g| {
                let name = &self.nodes[g.node].name;
                let suffix = match g.role {
                    Role::Weight => "weight",
                    Role::Bias => "bias",
                    Role::BnGamma => "bn.weight",
                    Role::BnBeta => "bn.bias",
                };
                (format!("{name}.{suffix}"), g.g)
            })
            .collect();
        Ok((loss, named))
    }

    /// The trained model as a [`Net`], with the original node names, as
    /// [`super::GpuTrainer::to_net`].
    ///
    /// Errors: none in practice (the net was valid when the trainer was made).
    pub fn to_net(&self) -> Result<Net> {
        let mut net = Net::new();
        for node in &self.nodes {
            let input = node.inputs[0];
            match &node.op {
                Op::Conv {
                    weight,
                    bias,
                    params,
                    bn,
                    act,
                } => {
                    let conv = Conv2d {
                        weight: to4(&weight.t, &node.name)?,
                        bias: bias1(bias.as_ref())?,
                        params: *params,
                    };
                    let mut v = net.conv(&node.name, conv, input)?;
                    if let Some(bn) = bn {
                        v = net.batch_norm(v, bn.batch_norm()?)?;
                    }
                    net.activation(v, *act)?;
                }
                Op::Linear { weight, bias, act } => {
                    let w = weight
                        .t
                        .clone()
                        .into_dimensionality::<Ix2>()
                        .map_err(internal)?;
                    let v = net.linear(&node.name, w, bias1(bias.as_ref())?, input)?;
                    net.activation(v, *act)?;
                }
                Op::MaxPool { kernel, stride } => {
                    net.max_pool2d(&node.name, *kernel, *stride, input)?;
                }
                Op::Flatten => {
                    net.flatten(&node.name, input)?;
                }
                Op::Add { act } => {
                    let v = net.add(&node.name, input, node.inputs[1])?;
                    net.activation(v, *act)?;
                }
            }
        }
        net.set_output(self.output)?;
        Ok(net)
    }
}
