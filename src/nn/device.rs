//! [`DeviceChain`]: a straight-line eval forward of a module tree prepared on a backend, its
//! parameters placed there once, run on the backend's own tensors (on the GPU nothing
//! crosses to the host between the input's upload and the output's download), with the
//! modules' fake-quantization targets ([`super::QuantTargets`]) on the device too: weight and
//! bias fake quant, input and output observers and fake quant, the observers' running
//! statistics updated by [`crate::backend::QuantOps::observe_running`] during calibration.
//!
//! It covers the leaf layers of the float module tree in eval mode: Conv1d / Conv2d /
//! ConvTranspose2d, Linear (on the last dimension), BatchNorm1d / 2d (running statistics),
//! the activations, Identity, MaxPool2d, Flatten, LogSoftmax, fused modules (BatchNorm
//! folded into the conv or linear once, at preparation, on the backend), and the QAT modules
//! of [`crate::qat`] in eval mode (`Conv2d` / `Linear` / `ConvReLU2d` ... QAT: the weight
//! fake quant on the weight; `ConvBn2d` / `ConvBnReLU2d` / `LinearBn1d` QAT: the deploy graph
//! with the BatchNorm's running statistics, the weight fake quant on the BN-scaled weight,
//! as [`crate::qat::QatLayer`]'s eval forward; the output fake quant after). The QAT
//! modules' weight and output observers update on the device like the targets' do.
//! [`DeviceChain::from_module`] walks sequential containers and those declared with
//! [`super::Container::with_steps`], residual adds and branches included (the values a
//! later step reads are kept on the device). Custom forward closures, custom layers and hooks
//! still run through [`crate::nn::Module::forward`] on host arrays.

use ndarray::{Array1, Array2, ArrayD};

use super::container::{kept_values, ForwardStep};
use super::fake_quantize::FakeQuantize;
use super::fused::{Fused, FusedHead};
use super::layer::{BatchNormLayer, Layer};
use super::module::Module;
use super::qat_layer::{QatHead, QatLayer};
use super::quant::QuantTarget;
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
        /// A QAT conv + BatchNorm in eval mode.
        qat_bn: Option<QatBn<B>>,
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
        /// A QAT `LinearBn1d` in eval mode (its input must be `(N, in_features)`).
        qat_bn: Option<QatBn<B>>,
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
    /// Keeps the current value in slot `k` (a value a later add or branch reads).
    Keep(usize),
    /// `current + slot k`.
    AddKept(usize),
    /// The value of slot `k` becomes the current one.
    Resume(usize),
}

/// A QAT conv / linear + BatchNorm in eval mode ([`QatLayer`]'s deploy graph): the step's
/// weight is the BN-scaled weight `W·s` (`s = γ/√(running_var + ε)`, 1 where γ = 0) with
/// the γ = 0 channels zeroed, its bias the folded bias; the weight fake quant sees `scaled`.
#[derive(Debug, Clone)]
struct QatBn<B: Backend> {
    /// `W·s` in the module's weight shape.
    scaled: B::Tensor,
    /// A BatchNorm whose fold multiplies the γ = 0 channels by 0 and the others by 1
    /// (`None`: no γ = 0 channel): applied to the fake-quantized weight.
    zero_gamma: Option<BatchNorm<B::Tensor>>,
}

impl<B: Backend> Step<B> {
    /// The weight the weight fake quant sees, the bias, and the module's weight shape, for a
    /// step whose weight targets can fake-quantize (not one with a BatchNorm folded in).
    #[allow(clippy::type_complexity)]
    fn weight_and_bias(&self) -> Option<(&B::Tensor, Option<&B::Tensor>, Vec<usize>)> {
        match self {
            Step::Conv {
                weight,
                bias,
                wshape: Some(s),
                qat_bn,
                ..
            }
            | Step::Linear {
                weight,
                bias,
                wshape: Some(s),
                qat_bn,
                ..
            } => Some((
                qat_bn.as_ref().map_or(weight, |q| &q.scaled),
                bias.as_ref(),
                s.clone(),
            )),
            Step::ConvTranspose {
                weight,
                bias,
                wshape: Some(s),
                ..
            } => Some((weight, bias.as_ref(), s.clone())),
            _ => None,
        }
    }

    /// A fake-quantized weight (module shape) as the step runs it: a QAT conv + BatchNorm
    /// zeroes its γ = 0 channels.
    fn finish_weight(&self, b: &B, wq: B::Tensor) -> Result<B::Tensor> {
        match self {
            Step::Conv {
                qat_bn:
                    Some(QatBn {
                        zero_gamma: Some(m),
                        ..
                    }),
                ..
            } => Ok(b.fold_conv_bn(&wq, None, m, false)?.weight),
            Step::Linear {
                qat_bn:
                    Some(QatBn {
                        zero_gamma: Some(m),
                        ..
                    }),
                ..
            } => Ok(b.fold_linear_bn(&wq, None, m)?.weight),
            _ => Ok(wq),
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

/// Where a fake quant of a step lives in the module tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FqHome {
    /// A [`QuantTargets`] target of the module.
    Target(QuantTarget),
    /// A QAT module's `weight_fake_quant`.
    QatWeight,
    /// A QAT module's `activation_post_process`.
    QatOutput,
}

impl FqHome {
    /// The fake quants that run at each point of a step, in order.
    const INPUT: &'static [FqHome] = &[FqHome::Target(QuantTarget::Input)];
    const WEIGHT: &'static [FqHome] = &[FqHome::Target(QuantTarget::Weight), FqHome::QatWeight];
    const BIAS: &'static [FqHome] = &[FqHome::Target(QuantTarget::Bias)];
    const OUTPUT: &'static [FqHome] = &[FqHome::QatOutput, FqHome::Target(QuantTarget::Output)];

    /// Its name in messages (`` `conv1._input_` ``, `` `conv1.weight_fake_quant` ``).
    fn name(self, path: &str) -> String {
        match self {
            FqHome::Target(t) => target_name(path, t),
            FqHome::QatWeight => format!("`{}.weight_fake_quant`", crate::io::text::escape(path)),
            FqHome::QatOutput => format!(
                "`{}.activation_post_process`",
                crate::io::text::escape(path)
            ),
        }
    }
}

/// One fake quant ([`FakeQuantize`]) on the device: its settings and switches, the
/// observer's running statistics `[2, C]` and the current qparams as backend tensors.
#[derive(Debug, Clone)]
struct DeviceFakeQuant<B: Backend> {
    home: FqHome,
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
    /// The number of kept-value slots ([`Step::Keep`]).
    slots: usize,
}

fn unsupported(name: &str, module: &Module) -> Error {
    Error::invalid(format!(
        "`{}` ({}) has no device forward yet: only leaf float layers, fused modules and QAT \
         modules run in a DeviceChain",
        crate::io::text::escape(name),
        module.kind_name()
    ))
}

/// Every fake quant of `module`, where it lives: its quantization targets, and a QAT
/// module's weight and output fake quants.
fn fake_quants_of(module: &Module) -> Vec<(FqHome, &FakeQuantize)> {
    let mut out: Vec<(FqHome, &FakeQuantize)> = module
        .quant_targets()
        .map(|q| q.iter().map(|(t, f)| (FqHome::Target(t), f)).collect())
        .unwrap_or_default();
    if let Layer::Qat(q) = module.layer() {
        out.push((FqHome::QatWeight, &q.weight_fake_quant));
        if let Some(a) = &q.activation_post_process {
            out.push((FqHome::QatOutput, a));
        }
    }
    out
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
    fn upload(b: &B, home: FqHome, fq: &FakeQuantize) -> Result<Self> {
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
            home,
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
                self.home.name(path)
            )));
        };
        b.fake_quant(x, qp, self.spec.range).map(Some)
    }
}

impl<B: Backend> StepQuant<B> {
    fn has(&self, homes: &[FqHome]) -> bool {
        self.fqs.iter().any(|f| homes.contains(&f.home))
    }

    fn get(&self, home: FqHome) -> Option<&DeviceFakeQuant<B>> {
        self.fqs.iter().find(|f| f.home == home)
    }

    /// [`StepQuant::run`] without observing.
    fn quantize(
        &self,
        b: &B,
        homes: &[FqHome],
        x: &B::Tensor,
        path: &str,
    ) -> Result<Option<B::Tensor>> {
        let mut out: Option<B::Tensor> = None;
        for home in homes {
            let Some(f) = self.get(*home) else { continue };
            if let Some(y) = f.quantize(b, out.as_ref().unwrap_or(x), path)? {
                out = Some(y);
            }
        }
        Ok(out)
    }

    /// The fake quants of `homes` in that order on `x`, each on what the previous one gave
    /// (`observe`: observers update first); `None` when none of them changes `x`.
    fn run(
        &mut self,
        b: &B,
        homes: &[FqHome],
        x: &B::Tensor,
        observe: bool,
        path: &str,
    ) -> Result<Option<B::Tensor>> {
        let mut out: Option<B::Tensor> = None;
        for home in homes {
            let Some(f) = self.fqs.iter_mut().find(|f| f.home == *home) else {
                continue;
            };
            let cur = out.as_ref().unwrap_or(x);
            let y = if observe {
                f.apply(b, cur, true, path)?
            } else {
                f.quantize(b, cur, path)?
            };
            if y.is_some() {
                out = y;
            }
        }
        Ok(out)
    }
}

impl<B: Backend> DeviceChain<B> {
    /// An empty chain on `backend`.
    pub fn new(backend: B) -> Self {
        Self {
            backend,
            steps: Vec::new(),
            slots: 0,
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
    /// module with hooks, a custom layer, or a module with BatchNorm in training mode (a
    /// QAT conv + BatchNorm included: the chain is the eval forward); the errors of
    /// [`DeviceChain::push`].
    pub fn from_module(model: &Module, backend: B) -> Result<Self> {
        let mut chain = Self::new(backend);
        chain.push_tree("", model)?;
        Ok(chain)
    }

    fn push_tree(&mut self, path: &str, m: &Module) -> Result<()> {
        let Layer::Container(c) = m.layer() else {
            let training_bn = matches!(m.layer(), Layer::BatchNorm1d(_) | Layer::BatchNorm2d(_))
                || matches!(m.layer(), Layer::Fused(f) if f.bn.is_some()
                    || matches!(f.head, FusedHead::BatchNorm1d(_) | FusedHead::BatchNorm2d(_)))
                || matches!(m.layer(), Layer::Qat(q) if q.bn.is_some());
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
        let only = |t: QuantTarget| -> Vec<(FqHome, &FakeQuantize)> {
            targets
                .and_then(|q| q.get(t))
                .map(|fq| (FqHome::Target(t), fq))
                .into_iter()
                .collect()
        };
        let input = only(QuantTarget::Input);
        if !input.is_empty() {
            self.push_entry(path, Step::Identity, &input)?;
        }
        match c.steps() {
            Some(steps) => {
                let kept = kept_values(steps);
                let mut slot_of: Vec<(usize, usize)> = Vec::new();
                self.keep_value(path, 0, &kept, &mut slot_of);
                for (i, step) in steps.iter().enumerate() {
                    let slot = |k: usize| {
                        slot_of
                            .iter()
                            .find(|(v, _)| *v == k)
                            .map(|(_, s)| *s)
                            .ok_or_else(|| Error::invalid(format!("internal: value {k} not kept")))
                    };
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
                        ForwardStep::Add(k) => {
                            let step = Step::AddKept(slot(*k)?);
                            self.push_entry(
                                &format!("{} (value {k})", join(path, "<add>")),
                                step,
                                &[],
                            )?;
                        }
                        ForwardStep::Branch(k) => {
                            let step = Step::Resume(slot(*k)?);
                            self.push_entry(
                                &format!("{} (value {k})", join(path, "<branch>")),
                                step,
                                &[],
                            )?;
                        }
                    }
                    self.keep_value(path, i + 1, &kept, &mut slot_of);
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
        let output = only(QuantTarget::Output);
        if !output.is_empty() {
            self.push_entry(path, Step::Identity, &output)?;
        }
        Ok(())
    }

    /// Keeps value `v` of the container at `path` in a new slot when a later step reads it.
    fn keep_value(
        &mut self,
        path: &str,
        v: usize,
        kept: &[usize],
        slot_of: &mut Vec<(usize, usize)>,
    ) {
        if kept.contains(&v) {
            let k = self.slots;
            self.slots += 1;
            slot_of.push((v, k));
            self.steps.push(Entry {
                name: format!("{} (value {v})", join(path, "<keep>")),
                step: Step::Keep(k),
                quant: None,
            });
        }
    }

    /// Appends the eval forward of leaf module `module` (named `name` in errors), placing
    /// its parameters on the backend; a fused module's BatchNorm is folded on the backend
    /// now. Its quantization targets come along: each fake quant's statistics and qparams
    /// are uploaded, and a weight or bias whose observer is off is fake-quantized once, now.
    ///
    /// A QAT module ([`crate::qat::QatLayer`]) runs its eval forward (whatever its training
    /// flag: [`DeviceChain::from_module`] refuses a QAT conv + BatchNorm in training mode),
    /// its weight and output fake quants with it.
    ///
    /// Errors: [`Error::InvalidArgument`] for containers, custom layers or modules with
    /// hooks, and for weight / bias targets on a module without a weight (or a fused module
    /// whose BatchNorm is not folded, or a QAT module); the layers' own checks; backend
    /// errors.
    pub fn push(&mut self, name: &str, module: &Module) -> Result<()> {
        check_hooks(name, module)?;
        let step = self.prepare(name, module)?;
        self.push_entry(name, step, &fake_quants_of(module))
    }

    fn push_entry(
        &mut self,
        name: &str,
        step: Step<B>,
        fqs: &[(FqHome, &FakeQuantize)],
    ) -> Result<()> {
        let quant = if fqs.is_empty() {
            None
        } else {
            Some(self.prepare_quant(name, &step, fqs)?)
        };
        self.steps.push(Entry {
            name: name.to_string(),
            step,
            quant,
        });
        Ok(())
    }

    fn prepare_quant(
        &self,
        name: &str,
        step: &Step<B>,
        fqs: &[(FqHome, &FakeQuantize)],
    ) -> Result<StepQuant<B>> {
        let b = &self.backend;
        let mut sq = StepQuant {
            fqs: Vec::new(),
            weight_q: None,
            bias_q: None,
        };
        for &(home, fq) in fqs {
            sq.fqs.push(DeviceFakeQuant::upload(b, home, fq)?);
        }
        let qat = matches!(
            step,
            Step::Conv {
                qat_bn: Some(_),
                ..
            } | Step::Linear {
                qat_bn: Some(_),
                ..
            }
        ) || sq.get(FqHome::QatWeight).is_some();
        if qat
            && sq.has(&[
                FqHome::Target(QuantTarget::Weight),
                FqHome::Target(QuantTarget::Bias),
            ])
        {
            return Err(Error::invalid(format!(
                "module `{}` is a QAT module: its weight fake quant is weight_fake_quant, and \
                 QAT modules do not fake-quantize their bias (weight / bias targets on it)",
                crate::io::text::escape(name)
            )));
        }
        if sq.has(FqHome::WEIGHT) || sq.has(FqHome::BIAS) {
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
            let weight_fq = FqHome::WEIGHT.iter().find_map(|&h| sq.get(h));
            if let Some(f) = weight_fq.filter(fixed) {
                let w = b.reshape(w, &shape)?;
                sq.weight_q = f
                    .quantize(b, &w, name)?
                    .map(|wq| step.finish_weight(b, wq))
                    .transpose()?;
            }
            let bias_fq = sq.get(FqHome::Target(QuantTarget::Bias));
            if let (Some(f), Some(bias)) = (bias_fq.filter(fixed), bias) {
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
                qat_bn: None,
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
                qat_bn: None,
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
            Layer::Qat(q) => self.prepare_qat(q)?,
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
                    qat_bn: None,
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
                    qat_bn: None,
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

    /// A QAT module's eval forward ([`QatLayer`]): without a BatchNorm, the conv / linear
    /// with the weight fake quant on its weight; with one, the deploy graph: the BN-scaled
    /// weight `W·s` (the one formula, [`crate::reference::conv_bn::qat_scaled_weight`]) for
    /// the weight fake quant, the γ = 0 channels zeroed after it, and the folded bias
    /// `β + (b − running_mean)·γ/σ`, each computed once here and uploaded.
    fn prepare_qat(&self, q: &QatLayer) -> Result<Step<B>> {
        let w = q.head.weight();
        let wshape = Some(w.shape().to_vec());
        let (weight, bias, qat_bn) = match &q.bn {
            None => (
                match &q.head {
                    QatHead::Linear(_) => self.up(&w)?,
                    _ => self.up(&q.head.to4(&w)?.into_dyn())?,
                },
                self.up1(q.head.bias())?,
                None,
            ),
            Some(bnl) => {
                let (_, w_s) = crate::reference::conv_bn::qat_scaled_weight(&w, &bnl.bn)?;
                let zero = crate::reference::conv_bn::zero_gamma_channels(&bnl.bn);
                let mut w_run = w_s.clone();
                for &c in &zero {
                    w_run.index_axis_mut(ndarray::Axis(0), c).fill(0.0);
                }
                let w_run = match &q.head {
                    QatHead::Linear(_) => w_run,
                    _ => q.head.to4(&w_run)?.into_dyn(),
                };
                let bias = super::qat_layer::folded_bias(q.head.bias(), &bnl.bn)?;
                let zero_gamma = if zero.is_empty() {
                    None
                } else {
                    let c = q.head.out_channels();
                    let mask =
                        Array1::from_shape_fn(c, |i| if zero.contains(&i) { 0.0 } else { 1.0 });
                    let mask_bn = BatchNorm {
                        weight: Some(mask),
                        bias: None,
                        running_mean: Array1::zeros(c),
                        running_var: Array1::ones(c),
                        eps: 0.0,
                        momentum: 0.1,
                    };
                    Some(upload_batch_norm(&self.backend, &mask_bn)?)
                };
                (
                    self.up(&w_run)?,
                    Some(self.up(&bias.into_dyn())?),
                    Some(QatBn {
                        scaled: self.up(&w_s)?,
                        zero_gamma,
                    }),
                )
            }
        };
        Ok(match &q.head {
            QatHead::Conv1d(c) | QatHead::Conv2d(c) => Step::Conv {
                weight,
                bias,
                params: c.params2d(),
                act: q.act,
                conv1d: matches!(q.head, QatHead::Conv1d(_)),
                wshape,
                qat_bn,
            },
            QatHead::Linear(_) => Step::Linear {
                weight,
                bias,
                act: q.act,
                wshape,
                qat_bn,
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
        let mut slots: Vec<Option<B::Tensor>> = vec![None; self.slots];
        let mut h = x.clone();
        for e in &self.steps {
            h = match (&e.quant, slot_step(b, &e.step, &h, &mut slots)) {
                (_, Some(r)) => r?,
                (None, None) => run_step(b, &e.step, &h, None, None)?,
                (Some(q), None) => run_entry(
                    b,
                    &e.step,
                    (q.weight_q.as_ref(), q.bias_q.as_ref()),
                    &h,
                    |homes, v| q.quantize(b, homes, v, &e.name),
                )?,
            };
        }
        Ok(h)
    }

    /// [`crate::nn::Module::forward`]'s semantics on the device: the forward of
    /// [`DeviceChain::forward`], with every enabled observer first observing what its fake
    /// quant sees (input, weight, bias, output, in that order, each on the values the
    /// earlier targets quantized; a QAT module's weight fake quant as the weight, its output
    /// fake quant before the module's `_output_` target), its running statistics and qparams
    /// updated on the backend ([`crate::backend::QuantOps::observe_running`]). Calibration
    /// runs this on each batch, then [`DeviceChain::write_back`].
    ///
    /// Errors: those of [`DeviceChain::forward`]; an observer's (a per-channel count that
    /// changes between batches).
    pub fn forward_mut(&mut self, x: &B::Tensor) -> Result<B::Tensor> {
        let b = &self.backend;
        let mut slots: Vec<Option<B::Tensor>> = vec![None; self.slots];
        let mut h = x.clone();
        for e in &mut self.steps {
            let Entry { name, step, quant } = e;
            h = match (quant, slot_step(b, step, &h, &mut slots)) {
                (_, Some(r)) => r?,
                (None, None) => run_step(b, step, &h, None, None)?,
                (Some(q), None) => run_entry(b, step, (None, None), &h, |homes, v| {
                    q.run(b, homes, v, true, name)
                })?,
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
                let m = model.get_mut(&e.name)?;
                let fq = match f.home {
                    FqHome::Target(t) => m.quant_targets_mut().and_then(|q| q.get_mut(t)),
                    FqHome::QatWeight => match m.layer_mut() {
                        Layer::Qat(q) => Some(&mut q.weight_fake_quant),
                        _ => None,
                    },
                    FqHome::QatOutput => match m.layer_mut() {
                        Layer::Qat(q) => q.activation_post_process.as_mut(),
                        _ => None,
                    },
                };
                let fq = fq.ok_or_else(|| {
                    Error::invalid(format!(
                        "write_back: the model has no fake quant {}",
                        f.home.name(&e.name)
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

/// A kept-value step ([`Step::Keep`], [`Step::AddKept`], [`Step::Resume`]) on the current
/// value `h`; `None` for the other steps.
fn slot_step<B: Backend>(
    b: &B,
    step: &Step<B>,
    h: &B::Tensor,
    slots: &mut [Option<B::Tensor>],
) -> Option<Result<B::Tensor>> {
    let kept = |slots: &[Option<B::Tensor>], k: usize| -> Result<B::Tensor> {
        slots
            .get(k)
            .and_then(Clone::clone)
            .ok_or_else(|| Error::invalid(format!("internal: kept value {k} missing")))
    };
    Some(match step {
        Step::Keep(k) => match slots.get_mut(*k) {
            Some(s) => {
                *s = Some(h.clone());
                Ok(h.clone())
            }
            None => Err(Error::invalid(format!("internal: no slot {k}"))),
        },
        Step::AddKept(k) => kept(slots, *k).and_then(|v| b.add(h, &v)),
        Step::Resume(k) => kept(slots, *k),
        _ => return None,
    })
}

/// One step with its fake quants (`fq`: the fake quants at each point, see [`FqHome`]);
/// `prepared`: the weight and bias fake-quantized at preparation, used when given.
fn run_entry<B: Backend>(
    b: &B,
    step: &Step<B>,
    prepared: (Option<&B::Tensor>, Option<&B::Tensor>),
    h: &B::Tensor,
    mut fq: impl FnMut(&[FqHome], &B::Tensor) -> Result<Option<B::Tensor>>,
) -> Result<B::Tensor> {
    let input = fq(FqHome::INPUT, h)?;
    let h_in = input.as_ref().unwrap_or(h);
    let (wq, bq) = match step.weight_and_bias() {
        Some((w, bias, shape)) => {
            let wq = match prepared.0 {
                Some(c) => Some(c.clone()),
                None => fq(FqHome::WEIGHT, &b.reshape(w, &shape)?)?
                    .map(|wq| step.finish_weight(b, wq))
                    .transpose()?,
            };
            let bq = match (prepared.1, bias) {
                (Some(c), _) => Some(c.clone()),
                (None, Some(bias)) => fq(FqHome::BIAS, bias)?,
                (None, None) => None,
            };
            (wq, bq)
        }
        None => (None, None),
    };
    let y = run_step(b, step, h_in, wq.as_ref(), bq.as_ref())?;
    Ok(fq(FqHome::OUTPUT, &y)?.unwrap_or(y))
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
            weight,
            bias,
            act,
            qat_bn,
            ..
        } => {
            let (weight, bias) = (&pick(weight)?, &pick_bias(bias));
            let dims = x.dims().to_vec();
            if qat_bn.is_some() && dims.len() != 2 {
                return Err(Error::invalid(format!(
                    "LinearBn1d expects a 2-D input (N, in_features), got shape {dims:?}"
                )));
            }
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
        Step::Keep(_) | Step::AddKept(_) | Step::Resume(_) => Err(Error::invalid(
            "internal: a kept-value step runs in slot_step",
        )),
    }
}

fn rank<const R: usize>(dims: &[usize], what: &str) -> Result<[usize; R]> {
    <[usize; R]>::try_from(dims).map_err(|_| {
        Error::invalid(format!(
            "{what} expects a rank-{R} input, got shape {dims:?}"
        ))
    })
}
