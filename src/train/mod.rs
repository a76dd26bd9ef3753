//! Training on the device: [`GpuTrainer`] keeps a model's parameters, BatchNorm state and SGD
//! momentum on the GPU and runs forward (recording what backward needs), backward and
//! [`Sgd`] without host round trips — a step uploads its batch and labels and returns the
//! loss as a `[1]` device tensor (download it, or don't). A step, and an eval forward, are
//! each one submission ([`GpuContext::record`]). [`fit`] runs epochs over a
//! [`crate::data::digits::Split`] and reports progress through a callback (the library draws
//! nothing; the CLI can show a bar).
//!
//! The model is a [`Net`]: the graph of conv2d (with an optional BatchNorm2d, trained with
//! batch statistics and running-statistics updates as PyTorch's `train()` mode), linear, max
//! pooling, flatten and residual add, each with none / ReLU / ReLU6 — built from any module
//! tree by name ([`Net::module`]; NNI's Mnist network: [`crate::model::mnist::deploy_net`]),
//! so custom-forward containers train too — followed by `log_softmax` and the NLL loss (mean),
//! as NNI's example trains (`F.nll_loss(F.log_softmax(x), y)`). [`GpuTrainer::to_net`] gives
//! the trained model back for evaluation, PTQ and integer deployment ([`crate::deploy`]).
//!
//! QAT ([`GpuTrainer::enable_qat`], [`QatOptions`]) fine-tunes the same net with what
//! [`crate::deploy`] will run simulated on the device: fake-quantized weights (a conv with
//! BatchNorm as PyTorch's `ConvBn2d` / `ConvBnReLU2d` QAT), fake-quantized activations whose
//! moving-average observers update on the device, straight-through gradients, and PyTorch's
//! late-training freezes ([`GpuTrainer::freeze_observers`], [`GpuTrainer::freeze_bn_stats`]);
//! [`GpuTrainer::activation_ranges`] and [`GpuTrainer::to_net`] feed
//! [`crate::deploy::convert_with_ranges`] (PyTorch's `convert`).
//!
//! [`CpuTrainer`] is the same trainer on the CPU reference ops (host arrays): the spec the
//! device trainer is tested against, and the trainer when no adapter opens. Both implement
//! [`Trainer`] (a host-batch step, accuracy on a split, [`Trainer::to_net`], the QAT
//! controls), which [`fit`] and [`evaluate`] take.
//!
//! Each op is a [`crate::kernels`] launcher checked against the CPU reference
//! ([`crate::reference::train`] and the conv / BatchNorm / activation backwards); the wiring
//! of the backward is checked against finite differences in the tests.
//!
//! ```no_run
//! use std::sync::Arc;
//! use qfuse::data::digits::{Digits, MNIST_MEAN, MNIST_STD};
//! use qfuse::gpu::GpuContext;
//! use qfuse::optim::Sgd;
//! use qfuse::train::{fit, FitOptions, GpuTrainer, Progress};
//!
//! # fn main() -> qfuse::Result<()> {
//! let ctx = Arc::new(GpuContext::new()?);
//! let mut digits = Digits::bundled()?;
//! digits.normalize(MNIST_MEAN, MNIST_STD)?;
//! let net = qfuse::model::mnist::deploy_net(&qfuse::model::mnist::mnist(0)?)?;
//! let sgd = Sgd { lr: 0.05, momentum: 0.9, ..Sgd::new(0.05) };
//! let mut trainer = GpuTrainer::new(ctx, &net, sgd)?;
//! let opts = FitOptions { epochs: 3, batch_size: 64, seed: 0 };
//! let report = fit(&mut trainer, &digits.train, Some(&digits.test), &opts, &mut |p| {
//!     if let Progress::Epoch { epoch, train_loss, test_accuracy, .. } = p {
//!         eprintln!("epoch {epoch}: loss {train_loss:.4}, test accuracy {test_accuracy:?}");
//!     }
//! })?;
//! let trained = trainer.to_net()?; // for PTQ / deployment
//! # let _ = (report, trained); Ok(()) }
//! ```

use std::sync::Arc;

use ndarray::{Array1, Array2, ArrayD, Ix2, Ix4};

use crate::data::digits::Split;
use crate::deploy::{Net, NodeOp, ValueId};
use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor};
use crate::kernels::{self, conv2d::ConvEpilogue, GpuBatchNorm};
use crate::ops::{Activation, BatchNorm, Conv2d, Conv2dParams, QatConfig};
use crate::optim::Sgd;

mod cpu;
mod qat;
mod trainer;
pub use cpu::CpuTrainer;
pub use qat::QatOptions;
use qat::{QatState, Quantized};
pub use trainer::Trainer;
use trainer::{check_act, check_net, check_set_sgd, untrainable};

/// A trained tensor with its momentum buffer.
#[derive(Debug, Clone)]
struct Param {
    t: GpuTensor,
    buf: Option<GpuTensor>,
}

/// A BatchNorm2d on the device: `[4, C]` (γ, β, running mean, running variance) and eps in
/// [`GpuBatchNorm`], with its momentum and the momentum buffers of γ and β.
#[derive(Debug, Clone)]
struct Bn {
    bn: GpuBatchNorm,
    momentum: f32,
    affine: bool,
    buf_gamma: Option<GpuTensor>,
    buf_beta: Option<GpuTensor>,
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

/// What a node's backward needs from its forward.
enum Saved {
    Conv {
        x: GpuTensor,
        y: GpuTensor,
        /// BatchNorm input (the conv output) and `[2, C]` mean / invstd, with a BN.
        bn: Option<(GpuTensor, GpuTensor)>,
        /// QAT: the fake-quantized weight.
        wq: Option<(GpuTensor, Quantized)>,
    },
    /// QAT conv + BatchNorm (PyTorch's `ConvBn2d` / `ConvBnReLU2d`): the fused forward's
    /// saved tensors.
    QatConvBn {
        x: GpuTensor,
        fwd: Box<kernels::conv_bn::GpuQatForward>,
        cfg: crate::ops::QatConfig,
    },
    Linear {
        x: GpuTensor,
        y: GpuTensor,
        /// QAT: the fake-quantized weight.
        wq: Option<(GpuTensor, Quantized)>,
    },
    Pool {
        x: GpuTensor,
    },
    Flatten {
        shape: Vec<usize>,
    },
    Add {
        y: GpuTensor,
    },
}

/// A forward's output and, in training, what the backward needs: per node its saved tensors
/// and, in QAT, its output fake quant.
struct Forward {
    out: GpuTensor,
    saved: Vec<Saved>,
    quantized: Vec<Option<Quantized>>,
}

/// A gradient waiting for the optimizer: which parameter (node index and role) and the
/// device tensor.
struct Grad {
    node: usize,
    role: Role,
    g: GpuTensor,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Weight,
    Bias,
    /// `[2, C]` BatchNorm grads: row 0 dβ, row 1 dγ.
    BnParams,
    /// `[C]` dγ (QAT conv + BatchNorm).
    BnGamma,
    /// `[C]` dβ (QAT conv + BatchNorm).
    BnBeta,
}

/// Gradients by parameter name (`conv1.weight`, `conv1.bn.bias`, ...), downloaded.
pub type NamedGradients = Vec<(String, ArrayD<f32>)>;

/// Trains a [`Net`] on the GPU (see the [module docs](self)).
#[derive(Debug)]
pub struct GpuTrainer {
    ctx: Arc<GpuContext>,
    nodes: Vec<TNode>,
    output: ValueId,
    sgd: Sgd,
    steps: u64,
    qat: Option<QatState>,
}

fn up(ctx: &GpuContext, a: ArrayD<f32>) -> Result<GpuTensor> {
    GpuTensor::upload_f32(ctx, &a)
}

fn param(ctx: &GpuContext, a: ArrayD<f32>, sgd: &Sgd) -> Result<Param> {
    let t = up(ctx, a)?;
    let buf = momentum_buffer(ctx, &t, sgd)?;
    Ok(Param { t, buf })
}

fn momentum_buffer(ctx: &GpuContext, t: &GpuTensor, sgd: &Sgd) -> Result<Option<GpuTensor>> {
    if sgd.has_momentum() {
        Ok(Some(GpuTensor::zeros(
            ctx,
            t.shape(),
            crate::gpu::DType::F32,
        )?))
    } else {
        Ok(None)
    }
}

fn bn_buffer(ctx: &GpuContext, c: usize, sgd: &Sgd, affine: bool) -> Result<Option<GpuTensor>> {
    if sgd.has_momentum() && affine {
        Ok(Some(GpuTensor::zeros(ctx, &[c], crate::gpu::DType::F32)?))
    } else {
        Ok(None)
    }
}

/// `act` backward from the activation's output (same mask as from its input for none, ReLU
/// and ReLU6).
fn act_backward(
    ctx: &GpuContext,
    y: &GpuTensor,
    d: GpuTensor,
    act: Activation,
) -> Result<GpuTensor> {
    if act == Activation::None {
        Ok(d)
    } else {
        kernels::activation::activation_backward(ctx, y, &d, act)
    }
}

impl GpuTrainer {
    /// Uploads `net`'s parameters and BatchNorm state and zeroed momentum buffers.
    ///
    /// Errors: [`Error::InvalidArgument`] for an empty net or an activation other than none,
    /// ReLU or ReLU6, for bad SGD settings ([`Sgd::validate`]); GPU errors.
    pub fn new(ctx: Arc<GpuContext>, net: &Net, sgd: Sgd) -> Result<Self> {
        check_net("GpuTrainer", net, &sgd)?;
        let mut nodes = Vec::with_capacity(net.nodes().len());
        for node in net.nodes() {
            let op = match &node.op {
                NodeOp::Conv { conv, bn, act } => {
                    check_act("GpuTrainer", &node.name, *act)?;
                    let bn = match bn {
                        Some(b) => {
                            let affine = b.weight.is_some() || b.bias.is_some();
                            let c = b.channels();
                            Some(Bn {
                                bn: GpuBatchNorm::upload(&ctx, b)?,
                                momentum: b.momentum,
                                affine,
                                buf_gamma: bn_buffer(&ctx, c, &sgd, affine)?,
                                buf_beta: bn_buffer(&ctx, c, &sgd, affine)?,
                            })
                        }
                        None => None,
                    };
                    Op::Conv {
                        weight: param(&ctx, conv.weight.clone().into_dyn(), &sgd)?,
                        bias: match &conv.bias {
                            Some(b) => Some(param(&ctx, b.clone().into_dyn(), &sgd)?),
                            None => None,
                        },
                        params: conv.params,
                        bn,
                        act: *act,
                    }
                }
                NodeOp::Linear { weight, bias, act } => {
                    check_act("GpuTrainer", &node.name, *act)?;
                    Op::Linear {
                        weight: param(&ctx, weight.clone().into_dyn(), &sgd)?,
                        bias: match bias {
                            Some(b) => Some(param(&ctx, b.clone().into_dyn(), &sgd)?),
                            None => None,
                        },
                        act: *act,
                    }
                }
                NodeOp::MaxPool2d { kernel, stride } => Op::MaxPool {
                    kernel: *kernel,
                    stride: *stride,
                },
                NodeOp::Flatten => Op::Flatten,
                NodeOp::Add { act } => {
                    check_act("GpuTrainer", &node.name, *act)?;
                    Op::Add { act: *act }
                }
                NodeOp::MaxPool2dPad { .. } | NodeOp::GlobalAvgPool | NodeOp::Activation { .. } => {
                    return Err(untrainable("GpuTrainer", &node.name, node.op.kind()))
                }
            };
            nodes.push(TNode {
                name: node.name.clone(),
                op,
                inputs: node.inputs.clone(),
            });
        }
        Ok(Self {
            ctx,
            nodes,
            output: net.output(),
            sgd,
            steps: 0,
            qat: None,
        })
    }

    /// The GPU context.
    pub fn context(&self) -> &Arc<GpuContext> {
        &self.ctx
    }

    /// The optimizer settings.
    pub fn sgd(&self) -> Sgd {
        self.sgd
    }

    /// Changes the optimizer settings (a learning-rate schedule, ...). Momentum can be turned
    /// on only if the trainer was created with it (the buffers exist).
    ///
    /// Errors: [`Error::InvalidArgument`] for bad settings or momentum added later.
    pub fn set_sgd(&mut self, sgd: Sgd) -> Result<()> {
        check_set_sgd("GpuTrainer", &self.sgd, &sgd)?;
        self.sgd = sgd;
        Ok(())
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Turns on quantization-aware training ([`QatOptions`]; PyTorch's `prepare_qat` of a
    /// fused model): from now on the forward, in training and in eval, fake-quantizes every
    /// conv and linear weight (a conv with BatchNorm as `ConvBn2d` QAT: the BN-scaled weight,
    /// batch statistics divided back) and the input and every conv, linear and add output,
    /// whose observers update on each training forward, on the device. Fused activations
    /// stay fused (ConvBnReLU2d). The observers start empty: the first training step fills
    /// them.
    ///
    /// Errors: [`QatOptions::validate`]; QAT already on; GPU errors.
    pub fn enable_qat(&mut self, opts: QatOptions) -> Result<()> {
        if self.qat.is_some() {
            return Err(Error::invalid("GpuTrainer: QAT is already enabled"));
        }
        let mut observed = vec![true];
        observed.extend(
            self.nodes
                .iter()
                .map(|n| matches!(n.op, Op::Conv { .. } | Op::Linear { .. } | Op::Add { .. })),
        );
        self.qat = Some(QatState::new(&self.ctx, opts, &observed)?);
        Ok(())
    }

    /// Whether QAT is on ([`GpuTrainer::enable_qat`]).
    pub fn qat_enabled(&self) -> bool {
        self.qat.is_some()
    }

    /// Freezes (or thaws) the QAT activation observers, as PyTorch's `disable_observer`
    /// late in fine-tuning: their qparams stay as they are. Weights are always observed from
    /// their current values.
    ///
    /// Errors: [`Error::InvalidArgument`] when QAT is off.
    pub fn freeze_observers(&mut self, frozen: bool) -> Result<()> {
        self.qat_mut("freeze_observers")?.observers_frozen = frozen;
        Ok(())
    }

    /// Freezes (or thaws) the BatchNorm statistics of QAT conv + BN layers, as PyTorch's
    /// `freeze_bn_stats`: training forwards normalize with the running statistics and leave
    /// them unchanged.
    ///
    /// Errors: [`Error::InvalidArgument`] when QAT is off.
    pub fn freeze_bn_stats(&mut self, frozen: bool) -> Result<()> {
        self.qat_mut("freeze_bn_stats")?.bn_frozen = frozen;
        Ok(())
    }

    /// The QAT observers' activation ranges, downloaded, indexed by value (value 0 the input,
    /// value `i + 1` node `i`'s output; `None` for values QAT does not observe), for
    /// [`crate::deploy::convert_with_ranges`] (PyTorch's `convert` of a QAT model).
    ///
    /// Errors: [`Error::InvalidArgument`] when QAT is off or no training step has run since
    /// it was enabled; GPU errors.
    pub fn activation_ranges(&self) -> Result<Vec<Option<(f32, f32)>>> {
        match &self.qat {
            Some(q) => q.ranges(&self.ctx),
            None => Err(Error::invalid(
                "GpuTrainer::activation_ranges: QAT is not enabled",
            )),
        }
    }

    fn qat_mut(&mut self, what: &str) -> Result<&mut QatState> {
        self.qat
            .as_mut()
            .ok_or_else(|| Error::invalid(format!("GpuTrainer::{what}: QAT is not enabled")))
    }

    /// Runs the net: in training mode BatchNorms normalize with batch statistics and update
    /// their running statistics (on the device), in eval mode they use the running ones.
    /// Returns the output value (logits) and, in training, what the backward needs.
    fn run(&mut self, x: &GpuTensor, training: bool) -> Result<Forward> {
        let ctx = Arc::clone(&self.ctx);
        let ctx = &*ctx;
        let qat = self.qat.as_ref();
        // QAT observers update in training unless frozen.
        let update = training && qat.is_some_and(|q| !q.observers_frozen);
        let mut values: Vec<GpuTensor> = Vec::with_capacity(self.nodes.len() + 1);
        values.push(match qat {
            Some(q) => q.activation(ctx, 0, x, update)?.0,
            None => x.clone(),
        });
        let mut saved = Vec::with_capacity(if training { self.nodes.len() } else { 0 });
        let mut quantized = Vec::with_capacity(saved.capacity());
        for (i, node) in self.nodes.iter_mut().enumerate() {
            let get = |v: ValueId| -> Result<GpuTensor> {
                values.get(v).cloned().ok_or_else(|| {
                    Error::invalid(format!("internal: value {v} read before it was computed"))
                })
            };
            let x = get(node.inputs[0])?;
            // QAT: the weight fake-quantized with qparams observed from it now.
            let fq_weight = |w: &GpuTensor| -> Result<Option<(GpuTensor, Quantized)>> {
                qat.map(|q| q.weight(ctx, w)).transpose()
            };
            let (y, s) = match &mut node.op {
                Op::Conv {
                    weight,
                    bias,
                    params,
                    bn,
                    act,
                } => match (bn, qat) {
                    (None, _) => {
                        let wq = fq_weight(&weight.t)?;
                        let epilogue = ConvEpilogue {
                            out_scale: None,
                            bias: bias.as_ref().map(|b| &b.t),
                            activation: *act,
                        };
                        let w = wq.as_ref().map_or(&weight.t, |(t, _)| t);
                        let y = kernels::conv2d::conv2d(ctx, &x, w, params, &epilogue)?;
                        let s = Saved::Conv {
                            x,
                            y: y.clone(),
                            bn: None,
                            wq,
                        };
                        (y, s)
                    }
                    (Some(bn), Some(q)) => {
                        let cfg = QatConfig {
                            activation: *act,
                            freeze_bn: !training || q.bn_frozen,
                            weight_observer: q.opts.weight,
                        };
                        let conv = Conv2d {
                            weight: &weight.t,
                            bias: bias.as_ref().map(|b| &b.t),
                            params: *params,
                        };
                        // qfuse's finite γ = 0 form (s = 1 where γ = 0), as the QAT
                        // modules and the CPU trainer use.
                        let fwd = kernels::conv_bn::conv_bn_qat_forward_with(
                            ctx,
                            &x,
                            &conv,
                            &bn.bn,
                            bn.momentum,
                            &cfg,
                            &kernels::conv_bn::GpuQatWeight {
                                finite_zero_gamma: true,
                                ..Default::default()
                            },
                        )?;
                        // The running statistics after the step are written by
                        // `loss_and_grads` after the backward, which reads the ones this
                        // forward normalized its weight with.
                        let y = fwd.y.clone();
                        let s = Saved::QatConvBn {
                            x,
                            fwd: Box::new(fwd),
                            cfg,
                        };
                        (y, s)
                    }
                    (Some(bn), None) => {
                        let epilogue = ConvEpilogue {
                            out_scale: None,
                            bias: bias.as_ref().map(|b| &b.t),
                            activation: Activation::None,
                        };
                        let conv_out =
                            kernels::conv2d::conv2d(ctx, &x, &weight.t, params, &epilogue)?;
                        let out = kernels::batch_norm::batch_norm2d(
                            ctx,
                            &conv_out,
                            &bn.bn,
                            bn.momentum,
                            training,
                            *act,
                            false,
                        )?;
                        if training {
                            // running mean / variance after the step → rows 2 and 3.
                            let c = bn.bn.channels();
                            kernels::train::copy_at(
                                ctx,
                                &out.stats.running,
                                bn.bn.tensor(),
                                2 * c,
                            )?;
                        }
                        let s = Saved::Conv {
                            x,
                            y: out.y.clone(),
                            bn: Some((conv_out, out.stats.stats)),
                            wq: None,
                        };
                        (out.y, s)
                    }
                },
                Op::Linear { weight, bias, act } => {
                    let wq = fq_weight(&weight.t)?;
                    let w = wq.as_ref().map_or(&weight.t, |(t, _)| t);
                    let y =
                        kernels::linear::linear_act(ctx, &x, w, bias.as_ref().map(|b| &b.t), *act)?;
                    (y.clone(), Saved::Linear { x, y, wq })
                }
                Op::MaxPool { kernel, stride } => {
                    let y = kernels::pool::max_pool2d(ctx, &x, *kernel, *stride)?;
                    (y, Saved::Pool { x })
                }
                Op::Flatten => {
                    let s = x.shape();
                    let rest: usize = s.iter().skip(1).product();
                    let n = s.first().copied().unwrap_or(0);
                    let y = x.reshape(&[n, rest])?;
                    (y, Saved::Flatten { shape: s.to_vec() })
                }
                Op::Add { act } => {
                    let b = get(node.inputs[1])?;
                    let mut y = kernels::train::add(ctx, &x, &b)?;
                    if *act != Activation::None {
                        y = kernels::activation::activation(ctx, &y, *act)?;
                    }
                    (y.clone(), Saved::Add { y })
                }
            };
            // QAT: requantizing outputs are fake-quantized with their observers.
            let (y, q) = match qat {
                Some(q)
                    if matches!(
                        node.op,
                        Op::Conv { .. } | Op::Linear { .. } | Op::Add { .. }
                    ) =>
                {
                    let (yq, info) = q.activation(ctx, i + 1, &y, update)?;
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
            if let Some(q) = self.qat.as_mut() {
                q.observed = true;
            }
        }
        let out = values
            .get(self.output)
            .cloned()
            .ok_or_else(|| Error::invalid("internal: the net's output was not computed"))?;
        Ok(Forward {
            out,
            saved,
            quantized,
        })
    }

    /// The net's output (logits) for `x` (a device batch, e.g. `[N, 1, 28, 28]`), in eval mode
    /// (BatchNorms use their running statistics; nothing changes).
    ///
    /// Errors: shape errors of the ops (an input the net cannot take); GPU errors.
    pub fn forward_eval(&mut self, x: &GpuTensor) -> Result<GpuTensor> {
        let ctx = Arc::clone(&self.ctx);
        ctx.record(|| Ok(self.run(x, false)?.out))
    }

    /// Forward in training mode and backward of `nll_loss(log_softmax(net(x)), labels)`:
    /// returns the loss (`[1]`, on the device) and the gradients, without updating anything
    /// but the BatchNorm running statistics (as a PyTorch forward in `train()` mode).
    fn loss_and_grads(
        &mut self,
        x: &GpuTensor,
        labels: &GpuTensor,
    ) -> Result<(GpuTensor, Vec<Grad>)> {
        let Forward {
            out: logits,
            saved,
            quantized,
        } = self.run(x, true)?;
        let ctx = Arc::clone(&self.ctx);
        let ctx = &*ctx;
        let logp = kernels::pool::log_softmax(ctx, &logits)?;
        let loss = kernels::train::nll_loss(ctx, &logp, labels)?;
        let dlogits = kernels::train::log_softmax_nll_backward(ctx, &logp, labels)?;
        let mut grads: Vec<Option<GpuTensor>> = vec![None; self.nodes.len() + 1];
        grads[self.output] = Some(dlogits);
        let mut out = Vec::new();
        let accumulate = |grads: &mut Vec<Option<GpuTensor>>, v: ValueId, g: GpuTensor| {
            let merged = match grads[v].take() {
                Some(prev) => kernels::train::add(ctx, &prev, &g)?,
                None => g,
            };
            grads[v] = Some(merged);
            Ok::<(), Error>(())
        };
        for (i, (node, s)) in self.nodes.iter().zip(&saved).enumerate().rev() {
            let Some(d) = grads[i + 1].take() else {
                continue;
            };
            // QAT: the output's fake quant, straight through inside its range.
            let d = match &quantized[i] {
                Some(info) => info.backward(ctx, &d)?,
                None => d,
            };
            let input = node.inputs[0];
            // The net's input (value 0) needs no gradient.
            let wants_dx = input != 0;
            match (&node.op, s) {
                (
                    Op::Conv {
                        weight,
                        bias,
                        params,
                        bn,
                        act,
                    },
                    Saved::Conv {
                        x,
                        y,
                        bn: saved_bn,
                        wq,
                    },
                ) => {
                    let dconv = match (bn, saved_bn) {
                        (Some(bn), Some((conv_out, stats))) => {
                            let g = kernels::batch_norm::batch_norm2d_backward_act(
                                ctx,
                                conv_out,
                                &d,
                                &bn.bn,
                                stats,
                                true,
                                *act,
                                Some(y),
                                None,
                            )?;
                            if bn.affine {
                                out.push(Grad {
                                    node: i,
                                    role: Role::BnParams,
                                    g: g.dparams,
                                });
                            }
                            g.dx
                        }
                        _ => act_backward(ctx, y, d, *act)?,
                    };
                    let ws = <[usize; 4]>::try_from(weight.t.shape())
                        .map_err(|_| Error::invalid("internal: conv weight rank"))?;
                    let xs = <[usize; 4]>::try_from(x.shape())
                        .map_err(|_| Error::invalid("internal: conv input rank"))?;
                    if wants_dx {
                        let w = wq.as_ref().map_or(&weight.t, |(t, _)| t);
                        let dx = kernels::train::conv2d_input_grad(ctx, &dconv, w, params, xs)?;
                        accumulate(&mut grads, input, dx)?;
                    }
                    let mut dw = kernels::train::conv2d_weight_grad(ctx, x, &dconv, params, ws)?;
                    if let Some((_, info)) = wq {
                        dw = info.backward(ctx, &dw)?;
                    }
                    out.push(Grad {
                        node: i,
                        role: Role::Weight,
                        g: dw,
                    });
                    if bias.is_some() {
                        out.push(Grad {
                            node: i,
                            role: Role::Bias,
                            g: kernels::conv2d::channel_sum(ctx, &dconv)?,
                        });
                    }
                }
                (
                    Op::Conv {
                        weight,
                        bias,
                        params,
                        bn: Some(bn),
                        ..
                    },
                    Saved::QatConvBn { x, fwd, cfg },
                ) => {
                    let conv = Conv2d {
                        weight: &weight.t,
                        bias: bias.as_ref().map(|b| &b.t),
                        params: *params,
                    };
                    let g = kernels::conv_bn::conv_bn_qat_backward(
                        ctx,
                        x,
                        &d,
                        &conv,
                        &bn.bn,
                        cfg,
                        &fwd.saved(),
                    )?;
                    if wants_dx {
                        accumulate(&mut grads, input, g.dx)?;
                    }
                    out.push(Grad {
                        node: i,
                        role: Role::Weight,
                        g: g.dweight,
                    });
                    if let Some(db) = g.dbias {
                        out.push(Grad {
                            node: i,
                            role: Role::Bias,
                            g: db,
                        });
                    }
                    if bn.affine {
                        out.push(Grad {
                            node: i,
                            role: Role::BnGamma,
                            g: g.dbn_weight,
                        });
                        out.push(Grad {
                            node: i,
                            role: Role::BnBeta,
                            g: g.dbn_bias,
                        });
                    }
                }
                (Op::Linear { weight, bias, act }, Saved::Linear { x, y, wq }) => {
                    let dpre = act_backward(ctx, y, d, *act)?;
                    let w = wq.as_ref().map_or(&weight.t, |(t, _)| t);
                    let g = kernels::train::linear_backward(ctx, x, w, &dpre)?;
                    if wants_dx {
                        accumulate(&mut grads, input, g.dx)?;
                    }
                    let dweight = match wq {
                        Some((_, info)) => info.backward(ctx, &g.dweight)?,
                        None => g.dweight,
                    };
                    out.push(Grad {
                        node: i,
                        role: Role::Weight,
                        g: dweight,
                    });
                    if bias.is_some() {
                        out.push(Grad {
                            node: i,
                            role: Role::Bias,
                            g: g.dbias,
                        });
                    }
                }
                (Op::MaxPool { kernel, stride }, Saved::Pool { x }) => {
                    if wants_dx {
                        let dx = kernels::train::max_pool2d_backward(ctx, x, &d, *kernel, *stride)?;
                        accumulate(&mut grads, input, dx)?;
                    }
                }
                (Op::Flatten, Saved::Flatten { shape }) => {
                    if wants_dx {
                        accumulate(&mut grads, input, d.reshape(shape)?)?;
                    }
                }
                (Op::Add { act }, Saved::Add { y }) => {
                    let dpre = act_backward(ctx, y, d, *act)?;
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
        // QAT conv + BN: the running statistics after the step, written now that the
        // backward has read the step's `1/sqrt(running_var + eps)` (dγ's weight-scaling and
        // divide-back parts, as autograd of PyTorch's `ConvBn2d` computes them).
        for (node, s) in self.nodes.iter().zip(&saved) {
            if let (Op::Conv { bn: Some(bn), .. }, Saved::QatConvBn { fwd, cfg, .. }) =
                (&node.op, s)
            {
                if !cfg.freeze_bn {
                    let c = bn.bn.channels();
                    kernels::train::copy_at(ctx, &fwd.stats.running, bn.bn.tensor(), 2 * c)?;
                }
            }
        }
        Ok((loss, out))
    }

    /// One training step on a device batch `x` with `labels` (`u32` `[N]`, e.g. from
    /// [`kernels::train::upload_labels`]): forward in training mode, the loss
    /// `nll_loss(log_softmax(net(x)), labels)` (mean), backward, and one [`Sgd`] step on
    /// every weight, bias and BatchNorm γ / β. Returns the loss as a `[1]` device tensor;
    /// nothing is downloaded.
    ///
    /// Errors: shape errors of the ops (an input the net cannot take, labels that are not
    /// one per row); GPU errors. After an error the parameters may be partly updated.
    pub fn step(&mut self, x: &GpuTensor, labels: &GpuTensor) -> Result<GpuTensor> {
        let ctx = Arc::clone(&self.ctx);
        ctx.record(|| self.step_recorded(x, labels))
    }

    /// [`GpuTrainer::step`]'s launches (recorded by it into one submission).
    fn step_recorded(&mut self, x: &GpuTensor, labels: &GpuTensor) -> Result<GpuTensor> {
        let (loss, grads) = self.loss_and_grads(x, labels)?;
        let first = self.steps == 0;
        let ctx = Arc::clone(&self.ctx);
        let sgd = self.sgd;
        for g in &grads {
            let node = &self.nodes[g.node];
            match (&node.op, g.role) {
                (Op::Conv { weight, .. } | Op::Linear { weight, .. }, Role::Weight) => {
                    kernels::train::sgd_step(
                        &ctx,
                        &weight.t,
                        &g.g,
                        weight.buf.as_ref(),
                        &sgd,
                        first,
                    )?
                }
                (Op::Conv { bias: Some(b), .. } | Op::Linear { bias: Some(b), .. }, Role::Bias) => {
                    kernels::train::sgd_step(&ctx, &b.t, &g.g, b.buf.as_ref(), &sgd, first)?
                }
                (Op::Conv { bn: Some(bn), .. }, Role::BnParams) => {
                    let c = bn.bn.channels();
                    let t = bn.bn.tensor();
                    // γ: row 0 of the BN tensor, its gradient row 1 of dparams; β: row 1 / row 0.
                    kernels::train::sgd_step_range(
                        &ctx,
                        (t, 0),
                        (&g.g, c),
                        c,
                        bn.buf_gamma.as_ref(),
                        &sgd,
                        first,
                    )?;
                    kernels::train::sgd_step_range(
                        &ctx,
                        (t, c),
                        (&g.g, 0),
                        c,
                        bn.buf_beta.as_ref(),
                        &sgd,
                        first,
                    )?;
                }
                (Op::Conv { bn: Some(bn), .. }, role @ (Role::BnGamma | Role::BnBeta)) => {
                    let c = bn.bn.channels();
                    let (at, buf) = if role == Role::BnGamma {
                        (0, bn.buf_gamma.as_ref())
                    } else {
                        (c, bn.buf_beta.as_ref())
                    };
                    kernels::train::sgd_step_range(
                        &ctx,
                        (bn.bn.tensor(), at),
                        (&g.g, 0),
                        c,
                        buf,
                        &sgd,
                        first,
                    )?;
                }
                _ => return Err(Error::invalid("internal: a gradient without its parameter")),
            }
        }
        self.steps += 1;
        Ok(loss)
    }

    /// The loss and every parameter's gradient for one batch, downloaded, by name
    /// (`conv1.weight`, `conv1.bias`, `conv1.bn.weight`, `conv1.bn.bias`, `fc1.weight`, ...),
    /// without changing the parameters (the BatchNorm running statistics move, as in any
    /// training-mode forward). For checks and debugging; [`GpuTrainer::step`] keeps everything
    /// on the device.
    ///
    /// Errors: as [`GpuTrainer::step`].
    pub fn gradients(
        &mut self,
        x: &GpuTensor,
        labels: &GpuTensor,
    ) -> Result<(f32, NamedGradients)> {
        let (loss, grads) = self.loss_and_grads(x, labels)?;
        let ctx = &self.ctx;
        let mut named = Vec::new();
        for g in grads {
            let name = &self.nodes[g.node].name;
            match g.role {
                Role::Weight => named.push((format!("{name}.weight"), g.g.download_f32(ctx)?)),
                Role::Bias => named.push((format!("{name}.bias"), g.g.download_f32(ctx)?)),
                Role::BnGamma => named.push((format!("{name}.bn.weight"), g.g.download_f32(ctx)?)),
                Role::BnBeta => named.push((format!("{name}.bn.bias"), g.g.download_f32(ctx)?)),
                Role::BnParams => {
                    let d = g.g.download_f32(ctx)?;
                    let c = d.shape()[1];
                    let rows = d
                        .into_shape_with_order((2, c))
                        .map_err(|e| Error::invalid(format!("internal: {e}")))?;
                    named.push((
                        format!("{name}.bn.weight"),
                        rows.row(1).to_owned().into_dyn(),
                    ));
                    named.push((format!("{name}.bn.bias"), rows.row(0).to_owned().into_dyn()));
                }
            }
        }
        let loss = loss.download_f32(ctx)?[[0]];
        Ok((loss, named))
    }

    /// Adds to `counter` (from [`kernels::train::new_counter`]) the number of rows of the
    /// batch `x` the net classifies as `labels` says, in eval mode, on the device.
    ///
    /// Errors: as [`GpuTrainer::forward_eval`] and [`kernels::train::count_correct_into`].
    pub fn count_correct_into(
        &mut self,
        x: &GpuTensor,
        labels: &GpuTensor,
        counter: &GpuTensor,
    ) -> Result<()> {
        let ctx = Arc::clone(&self.ctx);
        ctx.record(|| {
            let logits = self.run(x, false)?.out;
            kernels::train::count_correct_into(&ctx, &logits, labels, counter)
        })
    }

    /// The trained model as a [`Net`] (parameters and BatchNorm state downloaded), with the
    /// original node names, for evaluation on any backend, PTQ and integer deployment.
    ///
    /// Errors: GPU errors.
    pub fn to_net(&self) -> Result<Net> {
        let ctx = &self.ctx;
        let mut net = Net::new();
        for node in &self.nodes {
            let input = node.inputs[0];
            let v = match &node.op {
                Op::Conv {
                    weight,
                    bias,
                    params,
                    bn,
                    act,
                } => {
                    let conv = Conv2d {
                        weight: weight
                            .t
                            .download_f32(ctx)?
                            .into_dimensionality::<Ix4>()
                            .map_err(|e| Error::invalid(format!("internal: {e}")))?,
                        bias: download_vec(ctx, bias.as_ref())?,
                        params: *params,
                    };
                    let mut v = net.conv(&node.name, conv, input)?;
                    if let Some(bn) = bn {
                        let d = bn.bn.tensor().download_f32(ctx)?;
                        let c = bn.bn.channels();
                        let rows: Array2<f32> = d
                            .into_shape_with_order((4, c))
                            .map_err(|e| Error::invalid(format!("internal: {e}")))?;
                        let batch_norm = BatchNorm {
                            weight: bn.affine.then(|| rows.row(0).to_owned()),
                            bias: bn.affine.then(|| rows.row(1).to_owned()),
                            running_mean: rows.row(2).to_owned(),
                            running_var: rows.row(3).to_owned(),
                            eps: bn.bn.eps(),
                            momentum: bn.momentum,
                        };
                        v = net.batch_norm(v, batch_norm)?;
                    }
                    net.activation(v, *act)?
                }
                Op::Linear { weight, bias, act } => {
                    let w = weight
                        .t
                        .download_f32(ctx)?
                        .into_dimensionality::<Ix2>()
                        .map_err(|e| Error::invalid(format!("internal: {e}")))?;
                    let v = net.linear(&node.name, w, download_vec(ctx, bias.as_ref())?, input)?;
                    net.activation(v, *act)?
                }
                Op::MaxPool { kernel, stride } => {
                    net.max_pool2d(&node.name, *kernel, *stride, input)?
                }
                Op::Flatten => net.flatten(&node.name, input)?,
                Op::Add { act } => {
                    let v = net.add(&node.name, input, node.inputs[1])?;
                    net.activation(v, *act)?
                }
            };
            let _ = v;
        }
        net.set_output(self.output)?;
        Ok(net)
    }
}

fn download_vec(ctx: &GpuContext, p: Option<&Param>) -> Result<Option<Array1<f32>>> {
    match p {
        None => Ok(None),
        Some(p) => Ok(Some(Array1::from(
            p.t.download_f32(ctx)?.into_raw_vec_and_offset().0,
        ))),
    }
}

/// Settings of [`fit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FitOptions {
    /// Passes over the training split.
    pub epochs: usize,
    /// Images per step (the last batch of an epoch may be smaller).
    pub batch_size: usize,
    /// Seed of the shuffle; epoch `e` shuffles with `seed + e`.
    pub seed: u64,
}

/// What [`fit`] reports as it goes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Progress {
    /// After each step: its loss (one f32 downloaded per step).
    Step {
        /// Epoch, from 0.
        epoch: usize,
        /// Epochs in all.
        epochs: usize,
        /// Step within the epoch, from 0.
        step: usize,
        /// Steps per epoch.
        steps: usize,
        /// The step's loss (mean over its batch).
        loss: f32,
    },
    /// After each epoch.
    Epoch {
        /// Epoch, from 0.
        epoch: usize,
        /// Epochs in all.
        epochs: usize,
        /// Mean of the epoch's step losses, weighted by batch size.
        train_loss: f32,
        /// Test accuracy after the epoch (when a test split was given), in [0, 1].
        test_accuracy: Option<f32>,
    },
}

/// What [`fit`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct FitReport {
    /// Mean training loss per epoch.
    pub epoch_losses: Vec<f32>,
    /// Test accuracy after each epoch (empty without a test split).
    pub test_accuracy: Vec<f32>,
    /// Steps taken.
    pub steps: u64,
}

/// Test accuracy of the trainer's net on `split`, in eval mode, in batches of `batch_size`
/// ([`Trainer::count_correct_split`]: on the GPU counted on the device and one number
/// downloaded at the end).
///
/// Errors: [`Error::InvalidArgument`] for an empty split or zero batch size; those of
/// [`GpuTrainer::count_correct_into`] / [`CpuTrainer::count_correct`].
pub fn evaluate<T: Trainer + ?Sized>(
    trainer: &mut T,
    split: &Split,
    batch_size: usize,
) -> Result<f32> {
    if split.is_empty() {
        return Err(Error::invalid("evaluate: the split is empty"));
    }
    let correct = trainer.count_correct_split(split, batch_size)?;
    Ok(correct as f32 / split.len() as f32)
}

/// Trains for `opts.epochs` epochs over `train` (shuffled per epoch with `opts.seed + epoch`),
/// calling `progress` after every step and epoch; with a `test` split, evaluates after each
/// epoch.
///
/// Errors: [`Error::InvalidArgument`] for zero epochs or batch size or an empty split; a loss
/// that is not finite (training diverged: lower the learning rate); those of
/// [`Trainer::train_batch`] and [`evaluate`].
pub fn fit<T: Trainer + ?Sized>(
    trainer: &mut T,
    train: &Split,
    test: Option<&Split>,
    opts: &FitOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<FitReport> {
    if opts.epochs == 0 || opts.batch_size == 0 || train.is_empty() {
        return Err(Error::invalid(format!(
            "fit: epochs ({}) and batch size ({}) must be positive and the split non-empty ({} \
             images)",
            opts.epochs,
            opts.batch_size,
            train.len()
        )));
    }
    let mut report = FitReport {
        epoch_losses: Vec::new(),
        test_accuracy: Vec::new(),
        steps: 0,
    };
    for epoch in 0..opts.epochs {
        let batches = train.batches(opts.batch_size, Some(opts.seed.wrapping_add(epoch as u64)))?;
        let steps = batches.len();
        let mut weighted = 0.0f64;
        for (step, batch) in batches.enumerate() {
            let loss = trainer.train_batch(&batch.images, &batch.labels)?;
            if !loss.is_finite() {
                return Err(Error::invalid(format!(
                    "fit: the loss is {loss} at epoch {epoch}, step {step} (training diverged; \
                     lower the learning rate)"
                )));
            }
            weighted += f64::from(loss) * batch.labels.len() as f64;
            report.steps += 1;
            progress(&Progress::Step {
                epoch,
                epochs: opts.epochs,
                step,
                steps,
                loss,
            });
        }
        let train_loss = (weighted / train.len() as f64) as f32;
        report.epoch_losses.push(train_loss);
        let test_accuracy = match test {
            Some(t) => {
                let a = evaluate(trainer, t, opts.batch_size)?;
                report.test_accuracy.push(a);
                Some(a)
            }
            None => None,
        };
        progress(&Progress::Epoch {
            epoch,
            epochs: opts.epochs,
            train_loss,
            test_accuracy,
        });
    }
    Ok(report)
}
