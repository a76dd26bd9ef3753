//! [`DeviceChain`]: a straight-line eval forward of a module tree prepared on a backend, its
//! parameters placed there once, run on the backend's own tensors (on the GPU nothing
//! crosses to the host between the input's upload and the output's download), with the
//! modules' fake-quantization targets ([`super::QuantTargets`]) on the device too: weight and
//! bias fake quant, input and output observers and fake quant, the observers' running
//! statistics updated by [`crate::backend::QuantOps::observe_running`] during calibration.
//!
//! It covers the leaf layers of the float module tree in eval mode: Conv1d / Conv2d /
//! ConvTranspose2d, Linear (on the last dimension), BatchNorm1d / 2d (running statistics),
//! the activations, Identity, MaxPool2d, Flatten, LogSoftmax, and fused modules (BatchNorm
//! folded into the conv or linear once, at preparation, on the backend);
//! [`DeviceChain::from_module`] walks sequential containers and those declared with
//! [`super::Container::with_steps`]. Other custom forwards, custom layers, hooks and QAT
//! modules still run through [`crate::nn::Module::forward`] on host arrays.

use ndarray::{Array2, ArrayD};

use super::container::ForwardStep;
use super::fake_quantize::FakeQuantize;
use super::fused::{Fused, FusedHead};
use super::layer::{BatchNormLayer, Layer};
use super::module::Module;
use super::quant::{QuantTarget, QuantTargets};
use crate::backend::{upload_batch_norm, Backend, Shaped};
use crate::error::{Error, Result};
use crate::ops::{Activation, BatchNorm, Conv2dParams, ConvTranspose2dParams};
use crate::quant::ObserverSpec;

/// One prepared step.
#[derive(Debug, Clone)]
enum Step<B: Backend> {
    /// conv2d (+ folded BatchNorm) + activation; `conv1d`: the input is `(N, C, L)`.
    Conv {
        weight: B::Tensor,
        bias: Option<B::Tensor>,
        params: Conv2dParams,
        act: Activation,
        conv1d: bool,
        /// The module's weight shape when its targets may fake-quantize it (`None`: a
        /// BatchNorm folded at preparation).
        wshape: Option<Vec<usize>>,
    },
    ConvTranspose {
        weight: B::Tensor,
        bias: Option<B::Tensor>,
        params: ConvTranspose2dParams,
        act: Activation,
        wshape: Option<Vec<usize>>,
    },
    Linear {
        weight: B::Tensor,
        bias: Option<B::Tensor>,
        act: Activation,
        wshape: Option<Vec<usize>>,
    },
    BatchNorm {
        bn: BatchNorm<B::Tensor>,
        act: Activation,
        dims: usize,
    },
    Act(Activation),
    Identity,
    MaxPool2d {
        kernel: usize,
        stride: usize,
    },
    Flatten {
        start_dim: isize,
        end_dim: isize,
    },
    LogSoftmax,
}

impl<B: Backend> Step<B> {
    /// The weight, bias and the module's weight shape, for a step whose weight targets can
    /// fake-quantize (not one with a BatchNorm folded in).
    #[allow(clippy::type_complexity)]
    fn weight_and_bias(&self) -> Option<(&B::Tensor, Option<&B::Tensor>, Vec<usize>)> {
        match self {
            Step::Conv {
                weight,
                bias,
                wshape: Some(s),
                ..
            }
            | Step::ConvTranspose {
                weight,
                bias,
                wshape: Some(s),
                ..
            }
            | Step::Linear {
                weight,
                bias,
                wshape: Some(s),
                ..
            } => Some((weight, bias.as_ref(), s.clone())),
            _ => None,
        }
    }
}

fn check_hooks(name: &str, module: &Module) -> Result<()> {
    if !module.forward_pre_hooks().is_empty() || !module.forward_hooks().is_empty() {
        return Err(Error::invalid(format!(
            "`{}` has hooks, which run on host arrays: use Module::forward",
            crate::io::text::escape(name)
        )));
    }
    Ok(())
}

/// One fake quant ([`FakeQuantize`]) on the device: its settings and switches, the
/// observer's running statistics `[2, C]` and the current qparams as backend tensors.
#[derive(Debug, Clone)]
struct DeviceFakeQuant<B: Backend> {
    target: QuantTarget,
    spec: ObserverSpec,
    averaging_constant: Option<f32>,
    observer_enabled: bool,
    fake_quant_enabled: bool,
    state: Option<B::Tensor>,
    qparams: Option<B::QParams>,
    /// Observed on the device since preparation ([`DeviceChain::write_back`] copies it).
    observed_here: bool,
}

/// The fake quants of one step, and the weight / bias fake-quantized once at preparation
/// when their observers are off.
#[derive(Debug, Clone)]
struct StepQuant<B: Backend> {
    fqs: Vec<DeviceFakeQuant<B>>,
    weight_q: Option<B::Tensor>,
    bias_q: Option<B::Tensor>,
}

#[derive(Debug, Clone)]
struct Entry<B: Backend> {
    /// The module's path (its name in errors; where [`DeviceChain::write_back`] writes).
    name: String,
    step: Step<B>,
    quant: Option<StepQuant<B>>,
}

/// A chain of leaf modules prepared on backend `B` for the eval forward, with their
/// fake-quantization targets.
///
/// ```
/// use qfuse::nn::{DeviceChain, Module};
/// use qfuse::backend::{CpuBackend, Device};
///
/// # fn main() -> qfuse::Result<()> {
/// let mut chain = DeviceChain::new(CpuBackend);
/// chain.push("relu", &Module::relu6())?;
/// chain.push("flat", &Module::flatten(1, -1))?;
/// let x = ndarray::ArrayD::from_elem(vec![2, 3, 4], 7.0f32);
/// let y = chain.forward(&CpuBackend.upload(&x)?)?;
/// assert_eq!(CpuBackend.download(&y)?.shape(), &[2, 12]);
/// # Ok(()) }
/// ```
///
/// A PTQ simulation on the device: [`DeviceChain::from_module`] of a model after
/// [`crate::config::apply`], [`DeviceChain::forward_mut`] on calibration batches (observers
/// update on the device), [`DeviceChain::write_back`] (the observed ranges and qparams into
/// the module tree); [`crate::config::calibrate`] does exactly that.
#[derive(Debug, Clone)]
pub struct DeviceChain<B: Backend> {
    backend: B,
    steps: Vec<Entry<B>>,
}

fn unsupported(name: &str, module: &Module) -> Error {
    Error::invalid(format!(
        "`{}` ({}) has no device forward yet: only leaf float layers and fused modules \
         run in a DeviceChain",
        crate::io::text::escape(name),
        module.kind_name()
    ))
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

fn target_name(path: &str, t: QuantTarget) -> String {
    let path = crate::io::text::escape(path);
    if path.is_empty() {
        format!("`{t}`")
    } else {
        format!("`{path}.{t}`")
    }
}

impl<B: Backend> DeviceFakeQuant<B> {
    /// The device form of `fq` (its statistics and qparams uploaded when it has observed).
    fn upload(b: &B, target: QuantTarget, fq: &FakeQuantize) -> Result<Self> {
        let (state, qparams) = if fq.is_observed() {
            let c = fq.min_val.len();
            if fq.max_val.len() != c {
                return Err(Error::shape(
                    "FakeQuantize max_val (vs min_val)",
                    &[c],
                    &[fq.max_val.len()],
                ));
            }
            let mm = Array2::from_shape_vec((2, c), [&fq.min_val[..], &fq.max_val[..]].concat())
                .map_err(|e| Error::invalid(format!("internal: observer state: {e}")))?;
            (
                Some(b.upload(&mm.into_dyn())?),
                Some(b.upload_qparams(&fq.qparams()?)?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            target,
            spec: fq.spec,
            averaging_constant: fq.averaging_constant(),
            observer_enabled: fq.observer_enabled,
            fake_quant_enabled: fq.fake_quant_enabled,
            state,
            qparams,
            observed_here: false,
        })
    }

    /// [`FakeQuantize::forward`] on the device: observe `x` when `observe` and the observer
    /// is enabled (an empty `x` is ignored, as on the host), then fake-quantize with the
    /// current qparams when fake quant is enabled (`None`: `x` passes through).
    fn apply(
        &mut self,
        b: &B,
        x: &B::Tensor,
        observe: bool,
        path: &str,
    ) -> Result<Option<B::Tensor>> {
        if observe && self.observer_enabled && !x.dims().contains(&0) {
            let (state, qp) =
                b.observe_running(self.state.clone(), x, &self.spec, self.averaging_constant)?;
            self.spec = self.spec.for_rank(x.dims().len())?;
            self.state = Some(state);
            self.qparams = Some(qp);
            self.observed_here = true;
        }
        self.quantize(b, x, path)
    }

    /// The fake quantization alone (no observing).
    fn quantize(&self, b: &B, x: &B::Tensor, path: &str) -> Result<Option<B::Tensor>> {
        if !self.fake_quant_enabled {
            return Ok(None);
        }
        let Some(qp) = &self.qparams else {
            return Err(Error::invalid(format!(
                "fake quantization of {} has no qparams: calibrate first (its observer is \
                 disabled and has never seen data)",
                target_name(path, self.target)
            )));
        };
        b.fake_quant(x, qp, self.spec.range).map(Some)
    }
}

impl<B: Backend> StepQuant<B> {
    fn get_mut(&mut self, t: QuantTarget) -> Option<&mut DeviceFakeQuant<B>> {
        self.fqs.iter_mut().find(|f| f.target == t)
    }

    fn get(&self, t: QuantTarget) -> Option<&DeviceFakeQuant<B>> {
        self.fqs.iter().find(|f| f.target == t)
    }
}

impl<B: Backend> DeviceChain<B> {
    /// An empty chain on `backend`.
    pub fn new(backend: B) -> Self {
        Self {
            backend,
            steps: Vec::new(),
        }
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The eval forward of a whole module tree, prepared on `backend`: leaves as
    /// [`DeviceChain::push`] takes them, sequential containers in their forward order, and
    /// containers declared with [`super::Container::with_steps`] step by step (their
    /// functional ops included); a container's own `_input_` / `_output_` targets around its
    /// children. Every step keeps its module's path as its name.
    ///
    /// Errors: [`Error::InvalidArgument`] for a container with another custom forward, a
    /// module with hooks, a custom layer, a QAT module, or a module with BatchNorm in
    /// training mode (the chain is the eval forward); the errors of [`DeviceChain::push`].
    pub fn from_module(model: &Module, backend: B) -> Result<Self> {
        let mut chain = Self::new(backend);
        chain.push_tree("", model)?;
        Ok(chain)
    }

    fn push_tree(&mut self, path: &str, m: &Module) -> Result<()> {
        let Layer::Container(c) = m.layer() else {
            let training_bn = matches!(m.layer(), Layer::BatchNorm1d(_) | Layer::BatchNorm2d(_))
                || matches!(m.layer(), Layer::Fused(f) if f.bn.is_some()
                    || matches!(f.head, FusedHead::BatchNorm1d(_) | FusedHead::BatchNorm2d(_)));
            if training_bn && m.is_training() {
                return Err(Error::invalid(format!(
                    "`{}` ({}) is in training mode: a DeviceChain runs the eval forward \
                     (call eval() first)",
                    crate::io::text::escape(path),
                    m.kind_name()
                )));
            }
            return self.push(path, m);
        };
        check_hooks(path, m)?;
        let targets = m.quant_targets();
        if let Some(q) = targets {
            if q.weight.is_some() || q.bias.is_some() {
                return Err(Error::invalid(format!(
                    "module `{}` ({}) has no weight and bias to fake-quantize",
                    crate::io::text::escape(path),
                    m.kind_name()
                )));
            }
        }
        let only = |t: QuantTarget| -> Option<QuantTargets> {
            let fq = targets?.get(t)?.clone();
            let mut q = QuantTargets::default();
            q.set(t, Some(fq));
            Some(q)
        };
        if let Some(q) = only(QuantTarget::Input) {
            self.push_entry(path, Step::Identity, Some(&q))?;
        }
        match c.steps() {
            Some(steps) => {
                for step in steps {
                    match step {
                        ForwardStep::Child(name) => {
                            let child = c.child(name).ok_or_else(|| {
                                Error::invalid(format!("internal: no child `{name}`"))
                            })?;
                            self.push_tree(&join(path, name), child)?;
                        }
                        ForwardStep::Op(op) => {
                            let name = format!("{} ({})", join(path, "<op>"), op.kind_name());
                            self.push(&name, op)?;
                        }
                    }
                }
            }
            None if c.has_custom_forward() => {
                return Err(Error::invalid(format!(
                    "`{}` ({}) has a custom forward closure, which runs on host arrays: \
                     declare it with Container::with_steps to run it in a DeviceChain",
                    crate::io::text::escape(path),
                    m.kind_name()
                )))
            }
            None => {
                for name in c.forward_order() {
                    if let Some(child) = c.child(&name) {
                        self.push_tree(&join(path, &name), child)?;
                    }
                }
            }
        }
        if let Some(q) = only(QuantTarget::Output) {
            self.push_entry(path, Step::Identity, Some(&q))?;
        }
        Ok(())
    }

    /// Appends the eval forward of leaf module `module` (named `name` in errors), placing
    /// its parameters on the backend; a fused module's BatchNorm is folded on the backend
    /// now. Its quantization targets come along: each fake quant's statistics and qparams
    /// are uploaded, and a weight or bias whose observer is off is fake-quantized once, now.
    ///
    /// Errors: [`Error::InvalidArgument`] for containers, custom layers, QAT modules or
    /// modules with hooks, and for weight / bias targets on a module without a weight (or a
    /// fused module whose BatchNorm is not folded); the layers' own checks; backend errors.
    pub fn push(&mut self, name: &str, module: &Module) -> Result<()> {
        check_hooks(name, module)?;
        let step = self.prepare(name, module)?;
        self.push_entry(name, step, module.quant_targets())
    }

    fn push_entry(
        &mut self,
        name: &str,
        step: Step<B>,
        targets: Option<&QuantTargets>,
    ) -> Result<()> {
        let quant = match targets.filter(|q| !q.is_empty()) {
            Some(q) => Some(self.prepare_quant(name, &step, q)?),
            None => None,
        };
        self.steps.push(Entry {
            name: name.to_string(),
            step,
            quant,
        });
        Ok(())
    }

    fn prepare_quant(&self, name: &str, step: &Step<B>, q: &QuantTargets) -> Result<StepQuant<B>> {
        let b = &self.backend;
        let mut fqs = Vec::new();
        for (t, fq) in q.iter() {
            fqs.push(DeviceFakeQuant::upload(b, t, fq)?);
        }
        let mut sq = StepQuant {
            fqs,
            weight_q: None,
            bias_q: None,
        };
        if q.weight.is_some() || q.bias.is_some() {
            let Some((w, bias, shape)) = step.weight_and_bias() else {
                return Err(Error::invalid(format!(
                    "module `{}` has no weight and bias to fake-quantize (weight and bias \
                     targets need a Conv, ConvTranspose or Linear, or a fused module with its \
                     BatchNorm folded)",
                    crate::io::text::escape(name)
                )));
            };
            // Fixed qparams (observer off): the quantized weight and bias once, now.
            let fixed = |f: &&DeviceFakeQuant<B>| !f.observer_enabled && f.qparams.is_some();
            if let Some(f) = sq.get(QuantTarget::Weight).filter(fixed) {
                let w = b.reshape(w, &shape)?;
                sq.weight_q = f.quantize(b, &w, name)?;
            }
            if let (Some(f), Some(bias)) = (sq.get(QuantTarget::Bias).filter(fixed), bias) {
                sq.bias_q = f.quantize(b, bias, name)?;
            }
        }
        Ok(sq)
    }

    fn up(&self, a: &ArrayD<f32>) -> Result<B::Tensor> {
        self.backend.upload(a)
    }

    fn up1(&self, a: Option<&ndarray::Array1<f32>>) -> Result<Option<B::Tensor>> {
        a.map(|a| self.up(&a.clone().into_dyn())).transpose()
    }

    fn bn(&self, l: &BatchNormLayer) -> Result<BatchNorm<B::Tensor>> {
        upload_batch_norm(&self.backend, &l.bn)
    }

    fn prepare(&self, name: &str, module: &Module) -> Result<Step<B>> {
        Ok(match module.layer() {
            Layer::Conv1d(c) | Layer::Conv2d(c) => Step::Conv {
                weight: self.up(&c.weight4()?.into_dyn())?,
                bias: self.up1(c.bias.as_ref())?,
                params: c.params2d(),
                act: Activation::None,
                conv1d: matches!(module.layer(), Layer::Conv1d(_)),
                wshape: Some(c.weight.shape().to_vec()),
            },
            Layer::ConvTranspose2d(c) => Step::ConvTranspose {
                weight: self.up(&c.weight.clone().into_dyn())?,
                bias: self.up1(c.bias.as_ref())?,
                params: c.params,
                act: Activation::None,
                wshape: Some(c.weight.shape().to_vec()),
            },
            Layer::Linear(l) => Step::Linear {
                weight: self.up(&l.weight.clone().into_dyn())?,
                bias: self.up1(l.bias.as_ref())?,
                act: Activation::None,
                wshape: Some(l.weight.shape().to_vec()),
            },
            Layer::BatchNorm1d(bn) => Step::BatchNorm {
                bn: self.bn(bn)?,
                act: Activation::None,
                dims: 1,
            },
            Layer::BatchNorm2d(bn) => Step::BatchNorm {
                bn: self.bn(bn)?,
                act: Activation::None,
                dims: 2,
            },
            Layer::ReLU => Step::Act(Activation::Relu),
            Layer::ReLU6 => Step::Act(Activation::Relu6),
            Layer::LeakyReLU { negative_slope } => Step::Act(Activation::LeakyRelu {
                negative_slope: *negative_slope,
            }),
            Layer::Hardswish => Step::Act(Activation::Hardswish),
            Layer::Identity => Step::Identity,
            Layer::MaxPool2d {
                kernel_size,
                stride,
            } => Step::MaxPool2d {
                kernel: *kernel_size,
                stride: *stride,
            },
            Layer::Flatten { start_dim, end_dim } => Step::Flatten {
                start_dim: *start_dim,
                end_dim: *end_dim,
            },
            Layer::LogSoftmax { dim } if *dim == 1 || *dim == -1 => Step::LogSoftmax,
            Layer::Fused(f) => self.prepare_fused(f)?,
            _ => return Err(unsupported(name, module)),
        })
    }

    fn prepare_fused(&self, f: &Fused) -> Result<Step<B>> {
        let b = &self.backend;
        let bn = f.bn.as_ref().map(|l| self.bn(l)).transpose()?;
        Ok(match &f.head {
            FusedHead::Conv1d(c) | FusedHead::Conv2d(c) => {
                let w = self.up(&c.weight4()?.into_dyn())?;
                let bias = self.up1(c.bias.as_ref())?;
                let wshape = bn.is_none().then(|| c.weight.shape().to_vec());
                let (weight, bias) = match &bn {
                    Some(bn) => {
                        let fo = b.fold_conv_bn(&w, bias.as_ref(), bn, false)?;
                        (fo.weight, Some(fo.bias))
                    }
                    None => (w, bias),
                };
                Step::Conv {
                    weight,
                    bias,
                    params: c.params2d(),
                    act: f.act,
                    conv1d: matches!(f.head, FusedHead::Conv1d(_)),
                    wshape,
                }
            }
            FusedHead::ConvTranspose2d(c) => {
                let w = self.up(&c.weight.clone().into_dyn())?;
                let bias = self.up1(c.bias.as_ref())?;
                let wshape = bn.is_none().then(|| c.weight.shape().to_vec());
                let (weight, bias) = match &bn {
                    Some(bn) => {
                        let fo = b.fold_conv_bn(&w, bias.as_ref(), bn, true)?;
                        (fo.weight, Some(fo.bias))
                    }
                    None => (w, bias),
                };
                Step::ConvTranspose {
                    weight,
                    bias,
                    params: c.params,
                    act: f.act,
                    wshape,
                }
            }
            FusedHead::Linear(l) => {
                let w = self.up(&l.weight.clone().into_dyn())?;
                let bias = self.up1(l.bias.as_ref())?;
                let wshape = bn.is_none().then(|| l.weight.shape().to_vec());
                let (weight, bias) = match &bn {
                    Some(bn) => {
                        let fo = b.fold_linear_bn(&w, bias.as_ref(), bn)?;
                        (fo.weight, Some(fo.bias))
                    }
                    None => (w, bias),
                };
                Step::Linear {
                    weight,
                    bias,
                    act: f.act,
                    wshape,
                }
            }
            FusedHead::BatchNorm1d(l) => Step::BatchNorm {
                bn: self.bn(l)?,
                act: f.act,
                dims: 1,
            },
            FusedHead::BatchNorm2d(l) => Step::BatchNorm {
                bn: self.bn(l)?,
                act: f.act,
                dims: 2,
            },
        })
    }

    /// The eval forward of every step in order, on the backend's tensors, with every fake
    /// quant that is enabled applied with its current qparams. Observers do not update here
    /// (see [`DeviceChain::forward_mut`]).
    ///
    /// Errors: the ops' shape checks (naming the step); a fake quant that is enabled but has
    /// never observed (calibrate first); backend errors.
    pub fn forward(&self, x: &B::Tensor) -> Result<B::Tensor> {
        let b = &self.backend;
        let mut h = x.clone();
        for e in &self.steps {
            h = match &e.quant {
                None => run_step(b, &e.step, &h, None, None)?,
                Some(q) => {
                    let fixed = |t: QuantTarget, v: &B::Tensor| -> Result<Option<B::Tensor>> {
                        match q.get(t) {
                            Some(f) => f.quantize(b, v, &e.name),
                            None => Ok(None),
                        }
                    };
                    let input = fixed(QuantTarget::Input, &h)?;
                    let h_in = input.as_ref().unwrap_or(&h);
                    let (wq, bq) = match e.step.weight_and_bias() {
                        Some((w, bias, shape)) => {
                            let wq = match (&q.weight_q, q.get(QuantTarget::Weight)) {
                                (Some(c), _) => Some(c.clone()),
                                (None, Some(_)) => {
                                    fixed(QuantTarget::Weight, &b.reshape(w, &shape)?)?
                                }
                                (None, None) => None,
                            };
                            let bq = match (&q.bias_q, bias) {
                                (Some(c), _) => Some(c.clone()),
                                (None, Some(bias)) => fixed(QuantTarget::Bias, bias)?,
                                (None, None) => None,
                            };
                            (wq, bq)
                        }
                        None => (None, None),
                    };
                    let y = run_step(b, &e.step, h_in, wq.as_ref(), bq.as_ref())?;
                    fixed(QuantTarget::Output, &y)?.unwrap_or(y)
                }
            };
        }
        Ok(h)
    }

    /// [`crate::nn::Module::forward`]'s semantics on the device: the forward of
    /// [`DeviceChain::forward`], with every enabled observer first observing what its fake
    /// quant sees (input, weight, bias, output, in that order, each on the values the
    /// earlier targets quantized), its running statistics and qparams updated on the
    /// backend ([`crate::backend::QuantOps::observe_running`]). Calibration runs this on each batch, then
    /// [`DeviceChain::write_back`].
    ///
    /// Errors: those of [`DeviceChain::forward`]; an observer's (a per-channel count that
    /// changes between batches).
    pub fn forward_mut(&mut self, x: &B::Tensor) -> Result<B::Tensor> {
        let b = &self.backend;
        let mut h = x.clone();
        for e in &mut self.steps {
            h = match &mut e.quant {
                None => run_step(b, &e.step, &h, None, None)?,
                Some(q) => {
                    let name = e.name.as_str();
                    let mut apply = |t: QuantTarget, v: &B::Tensor| -> Result<Option<B::Tensor>> {
                        match q.get_mut(t) {
                            Some(f) => f.apply(b, v, true, name),
                            None => Ok(None),
                        }
                    };
                    let input = apply(QuantTarget::Input, &h)?;
                    let h_in = input.as_ref().unwrap_or(&h);
                    let (wq, bq) = match e.step.weight_and_bias() {
                        Some((w, bias, shape)) => {
                            let wq = apply(QuantTarget::Weight, &b.reshape(w, &shape)?)?;
                            let bq = match bias {
                                Some(bias) => apply(QuantTarget::Bias, bias)?,
                                None => None,
                            };
                            (wq, bq)
                        }
                        None => (None, None),
                    };
                    let y = run_step(b, &e.step, h_in, wq.as_ref(), bq.as_ref())?;
                    apply(QuantTarget::Output, &y)?.unwrap_or(y)
                }
            };
        }
        Ok(h)
    }

    /// Copies what the observers saw on the device back into `model`'s fake quants (the
    /// modules at the steps' paths): running minima and maxima, scale and zero point, the
    /// resolved channel axis. One download per observed statistic and qparams: the edge
    /// after a calibration. Fake quants that did not observe here are left as they are.
    ///
    /// Errors: [`Error::UnknownModule`] when `model` lacks a step's module, or
    /// [`Error::InvalidArgument`] when the module lacks the target (not the model the chain
    /// was built from); backend errors.
    pub fn write_back(&self, model: &mut Module) -> Result<()> {
        let b = &self.backend;
        for e in &self.steps {
            let Some(q) = &e.quant else { continue };
            for f in q.fqs.iter().filter(|f| f.observed_here) {
                let (Some(state), Some(qp)) = (&f.state, &f.qparams) else {
                    continue;
                };
                let mm = b.download(state)?;
                let c = mm.len() / 2;
                let flat: Vec<f32> = mm.iter().copied().collect();
                let qp = b.download_qparams(qp)?;
                let fq = model
                    .get_mut(&e.name)?
                    .quant_targets_mut()
                    .and_then(|t| t.get_mut(f.target))
                    .ok_or_else(|| {
                        Error::invalid(format!(
                            "write_back: the model has no fake quant {}",
                            target_name(&e.name, f.target)
                        ))
                    })?;
                fq.spec = f.spec;
                fq.min_val = flat[..c].to_vec();
                fq.max_val = flat[c..].to_vec();
                fq.scale = qp.scale;
                fq.zero_point = qp.zero_point;
            }
        }
        Ok(())
    }

    /// The number of fake quants in the chain.
    pub fn fake_quant_count(&self) -> usize {
        self.steps
            .iter()
            .filter_map(|e| e.quant.as_ref())
            .map(|q| q.fqs.len())
            .sum()
    }

    /// Turns every observer of the chain on or off (as
    /// [`crate::config::set_observer_enabled`] on a module tree).
    pub fn set_observer_enabled(&mut self, enabled: bool) {
        for q in self.steps.iter_mut().filter_map(|e| e.quant.as_mut()) {
            for f in &mut q.fqs {
                f.observer_enabled = enabled;
            }
        }
    }

    /// Turns every fake quantization of the chain on or off (as
    /// [`crate::config::set_fake_quant_enabled`]); a weight or bias quantized at
    /// preparation is dropped when turned off.
    pub fn set_fake_quant_enabled(&mut self, enabled: bool) {
        for q in self.steps.iter_mut().filter_map(|e| e.quant.as_mut()) {
            for f in &mut q.fqs {
                f.fake_quant_enabled = enabled;
            }
            if !enabled {
                q.weight_q = None;
                q.bias_q = None;
            }
        }
    }
}

/// Runs `step` on `x`, with the weight and bias replaced by `wq` / `bq` when given (the
/// weight in the module's shape, reshaped to the step's).
fn run_step<B: Backend>(
    b: &B,
    step: &Step<B>,
    x: &B::Tensor,
    wq: Option<&B::Tensor>,
    bq: Option<&B::Tensor>,
) -> Result<B::Tensor> {
    let pick = |w: &B::Tensor| -> Result<B::Tensor> {
        match wq {
            Some(q) => b.reshape(q, w.dims()),
            None => Ok(w.clone()),
        }
    };
    let pick_bias = |bias: &Option<B::Tensor>| bq.or(bias.as_ref()).cloned();
    match step {
        Step::Conv {
            weight,
            bias,
            params,
            act,
            conv1d,
            ..
        } => {
            let (weight, bias) = (&pick(weight)?, &pick_bias(bias));
            if *conv1d {
                let [n, c, l] = rank::<3>(x.dims(), "Conv1d")?;
                let y = b.conv2d(
                    &b.reshape(x, &[n, c, 1, l])?,
                    weight,
                    bias.as_ref(),
                    params,
                    *act,
                )?;
                let s = y.dims().to_vec();
                b.reshape(&y, &[s[0], s[1], s[3]])
            } else {
                rank::<4>(x.dims(), "Conv2d")?;
                b.conv2d(x, weight, bias.as_ref(), params, *act)
            }
        }
        Step::ConvTranspose {
            weight,
            bias,
            params,
            act,
            ..
        } => b.conv_transpose2d(x, &pick(weight)?, pick_bias(bias).as_ref(), params, *act),
        Step::Linear {
            weight, bias, act, ..
        } => {
            let (weight, bias) = (&pick(weight)?, &pick_bias(bias));
            let dims = x.dims().to_vec();
            let Some((&last, lead)) = dims.split_last() else {
                return Err(Error::invalid(
                    "Linear expects an input of rank >= 1, got a scalar",
                ));
            };
            let m: usize = lead.iter().product();
            let y = b.linear(&b.reshape(x, &[m, last])?, weight, bias.as_ref(), *act)?;
            let mut shape = lead.to_vec();
            shape.push(y.dims()[1]);
            b.reshape(&y, &shape)
        }
        Step::BatchNorm { bn, act, dims } => {
            let s = x.dims().to_vec();
            let x4 = match (*dims, s.as_slice()) {
                (2, [_, _, _, _]) => x.clone(),
                (1, [n, c]) => b.reshape(x, &[*n, *c, 1, 1])?,
                (1, [n, c, l]) => b.reshape(x, &[*n, *c, 1, *l])?,
                _ => {
                    return Err(Error::invalid(format!(
                        "BatchNorm{dims}d got an input of shape {s:?}"
                    )))
                }
            };
            let y = b.batch_norm2d(&x4, bn, false, *act)?.y;
            b.reshape(&y, &s)
        }
        Step::Act(act) => b.activation(x, *act),
        Step::Identity => Ok(x.clone()),
        Step::MaxPool2d { kernel, stride } => b.max_pool2d(x, *kernel, *stride),
        Step::Flatten { start_dim, end_dim } => {
            let shape = crate::ops::flatten_dims(x.dims(), *start_dim, *end_dim)?;
            b.reshape(x, &shape)
        }
        Step::LogSoftmax => {
            rank::<2>(x.dims(), "LogSoftmax (dim 1)")?;
            b.log_softmax(x)
        }
    }
}

fn rank<const R: usize>(dims: &[usize], what: &str) -> Result<[usize; R]> {
    <[usize; R]>::try_from(dims).map_err(|_| {
        Error::invalid(format!(
            "{what} expects a rank-{R} input, got shape {dims:?}"
        ))
    })
}
