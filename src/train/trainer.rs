//! [`Trainer`]: what [`super::fit`], [`super::evaluate`] and a training pipeline (train,
//! PTQ, QAT, deploy) need from a trainer, on host batches, implemented by the device trainer
//! ([`GpuTrainer`]) and the CPU reference one ([`CpuTrainer`]), and the checks both share.

use ndarray::Array4;

use crate::data::digits::Split;
use crate::deploy::Net;
use crate::error::{Error, Result};
use crate::gpu::GpuTensor;
use crate::kernels;
use crate::ops::Activation;
use crate::optim::Sgd;

use super::{CpuTrainer, GpuTrainer, QatOptions};

/// A trainer of a [`Net`] on host batches: [`GpuTrainer`] (on the device) or [`CpuTrainer`]
/// (the CPU reference, for when no adapter opens). The methods mirror the trainers' own; see
/// [`GpuTrainer`] for their semantics.
pub trait Trainer {
    /// Where it trains, for reports: `GPU <adapter name (backend)>` or `CPU reference`.
    fn device(&self) -> String;

    /// One training step on a host batch (`images` `[N, C, H, W]`, one label per image):
    /// forward, `nll_loss(log_softmax(·))`, backward, one SGD step. Returns the loss (on the
    /// GPU its one download).
    ///
    /// Errors: as [`GpuTrainer::step`] / [`CpuTrainer::step`]; labels out of range.
    fn train_batch(&mut self, images: &Array4<f32>, labels: &[u32]) -> Result<f32>;

    /// How many images of `split` the net classifies right, in eval mode, in batches of
    /// `batch_size` (on the GPU counted on the device, one number downloaded).
    ///
    /// Errors: [`Error::InvalidArgument`] for a zero batch size; forward errors.
    fn count_correct_split(&mut self, split: &Split, batch_size: usize) -> Result<u64>;

    /// The trained model ([`GpuTrainer::to_net`]).
    ///
    /// Errors: GPU errors.
    fn to_net(&self) -> Result<Net>;

    /// The optimizer settings.
    fn sgd(&self) -> Sgd;

    /// Changes the optimizer settings ([`GpuTrainer::set_sgd`]).
    ///
    /// Errors: bad settings, momentum added later.
    fn set_sgd(&mut self, sgd: Sgd) -> Result<()>;

    /// Steps taken so far.
    fn steps(&self) -> u64;

    /// Turns on QAT ([`GpuTrainer::enable_qat`]).
    ///
    /// Errors: bad options, QAT already on.
    fn enable_qat(&mut self, opts: QatOptions) -> Result<()>;

    /// Whether QAT is on.
    fn qat_enabled(&self) -> bool;

    /// Freezes or thaws the QAT activation observers ([`GpuTrainer::freeze_observers`]).
    ///
    /// Errors: QAT off.
    fn freeze_observers(&mut self, frozen: bool) -> Result<()>;

    /// Freezes or thaws the QAT BatchNorm statistics ([`GpuTrainer::freeze_bn_stats`]).
    ///
    /// Errors: QAT off.
    fn freeze_bn_stats(&mut self, frozen: bool) -> Result<()>;

    /// The QAT observers' ranges by value ([`GpuTrainer::activation_ranges`]).
    ///
    /// Errors: QAT off or nothing observed yet.
    fn activation_ranges(&self) -> Result<Vec<Option<(f32, f32)>>>;
}

/// The checks of a trainer's constructor: SGD settings and a net with nodes.
pub(super) fn check_net(who: &str, net: &Net, sgd: &Sgd) -> Result<()> {
    sgd.validate()?;
    if net.nodes().is_empty() {
        return Err(Error::invalid(format!("{who}: the net has no nodes")));
    }
    Ok(())
}

/// The error for a deployment node the trainers have no backward for (padded max pooling,
/// global average pooling, activation nodes).
pub(super) fn untrainable(who: &str, name: &str, kind: &str) -> Error {
    Error::invalid(format!(
        "{who}: `{}` is a {kind} node, which the trainer does not train (conv2d, linear, \
         max_pool2d, flatten and add only)",
        name.escape_debug()
    ))
}

/// The activations a trainer takes: none, ReLU, ReLU6 (their gradient mask is the same read
/// from the output or the input).
pub(super) fn check_act(who: &str, name: &str, act: Activation) -> Result<()> {
    match act {
        Activation::None | Activation::Relu | Activation::Relu6 => Ok(()),
        other => Err(Error::invalid(format!(
            "{who}: `{}` ends with {other:?}; the trainer takes none, ReLU or ReLU6 (their \
             gradient mask is read from the output)",
            name.escape_debug()
        ))),
    }
}

/// The check of `set_sgd`: valid settings, and momentum only if the buffers exist.
pub(super) fn check_set_sgd(who: &str, old: &Sgd, new: &Sgd) -> Result<()> {
    new.validate()?;
    if new.has_momentum() && !old.has_momentum() {
        return Err(Error::invalid(format!(
            "{who}::set_sgd: momentum needs buffers; create the trainer with momentum"
        )));
    }
    Ok(())
}

/// The classes labels are checked against before upload (the device cannot refuse a label
/// without a download): the output features of the net's last linear layer when it gives
/// the output (what the CPU reference checks against), else the digits' 10.
fn gpu_classes(t: &GpuTrainer) -> usize {
    t.output
        .checked_sub(1)
        .and_then(|i| t.nodes.get(i))
        .and_then(|n| match &n.op {
            super::Op::Linear { weight, .. } => weight.t.shape().first().copied(),
            _ => None,
        })
        .unwrap_or(crate::data::digits::CLASSES)
}

impl Trainer for GpuTrainer {
    fn device(&self) -> String {
        format!("GPU {}", self.context().name())
    }

    fn train_batch(&mut self, images: &Array4<f32>, labels: &[u32]) -> Result<f32> {
        let ctx = std::sync::Arc::clone(self.context());
        let x = GpuTensor::upload_f32(&ctx, &images.clone().into_dyn())?;
        let y = kernels::train::upload_labels(&ctx, labels, gpu_classes(self))?;
        Ok(GpuTrainer::step(self, &x, &y)?.download_f32(&ctx)?[[0]])
    }

    fn count_correct_split(&mut self, split: &Split, batch_size: usize) -> Result<u64> {
        let ctx = std::sync::Arc::clone(self.context());
        let counter = kernels::train::new_counter(&ctx)?;
        for batch in split.batches(batch_size, None)? {
            let x = GpuTensor::upload_f32(&ctx, &batch.images.into_dyn())?;
            let y = kernels::train::upload_labels(&ctx, &batch.labels, gpu_classes(self))?;
            self.count_correct_into(&x, &y, &counter)?;
        }
        Ok(u64::from(kernels::train::read_count(&ctx, &counter)?))
    }

    fn to_net(&self) -> Result<Net> {
        GpuTrainer::to_net(self)
    }

    fn sgd(&self) -> Sgd {
        GpuTrainer::sgd(self)
    }

    fn set_sgd(&mut self, sgd: Sgd) -> Result<()> {
        GpuTrainer::set_sgd(self, sgd)
    }

    fn steps(&self) -> u64 {
        GpuTrainer::steps(self)
    }

    fn enable_qat(&mut self, opts: QatOptions) -> Result<()> {
        GpuTrainer::enable_qat(self, opts)
    }

    fn qat_enabled(&self) -> bool {
        GpuTrainer::qat_enabled(self)
    }

    fn freeze_observers(&mut self, frozen: bool) -> Result<()> {
        GpuTrainer::freeze_observers(self, frozen)
    }

    fn freeze_bn_stats(&mut self, frozen: bool) -> Result<()> {
        GpuTrainer::freeze_bn_stats(self, frozen)
    }

    fn activation_ranges(&self) -> Result<Vec<Option<(f32, f32)>>> {
        GpuTrainer::activation_ranges(self)
    }
}

impl Trainer for CpuTrainer {
    fn device(&self) -> String {
        "CPU reference".to_string()
    }

    fn train_batch(&mut self, images: &Array4<f32>, labels: &[u32]) -> Result<f32> {
        CpuTrainer::step(self, &images.clone().into_dyn(), labels)
    }

    fn count_correct_split(&mut self, split: &Split, batch_size: usize) -> Result<u64> {
        let mut correct = 0u64;
        for batch in split.batches(batch_size, None)? {
            correct += u64::from(self.count_correct(&batch.images.into_dyn(), &batch.labels)?);
        }
        Ok(correct)
    }

    fn to_net(&self) -> Result<Net> {
        CpuTrainer::to_net(self)
    }

    fn sgd(&self) -> Sgd {
        CpuTrainer::sgd(self)
    }

    fn set_sgd(&mut self, sgd: Sgd) -> Result<()> {
        CpuTrainer::set_sgd(self, sgd)
    }

    fn steps(&self) -> u64 {
        CpuTrainer::steps(self)
    }

    fn enable_qat(&mut self, opts: QatOptions) -> Result<()> {
        CpuTrainer::enable_qat(self, opts)
    }

    fn qat_enabled(&self) -> bool {
        CpuTrainer::qat_enabled(self)
    }

    fn freeze_observers(&mut self, frozen: bool) -> Result<()> {
        CpuTrainer::freeze_observers(self, frozen)
    }

    fn freeze_bn_stats(&mut self, frozen: bool) -> Result<()> {
        CpuTrainer::freeze_bn_stats(self, frozen)
    }

    fn activation_ranges(&self) -> Result<Vec<Option<(f32, f32)>>> {
        CpuTrainer::activation_ranges(self)
    }
}
