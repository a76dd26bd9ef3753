//! A training step through a sequential QAT model, and plain SGD.

use std::collections::{BTreeMap, BTreeSet};

use ndarray::{ArrayD, IxDyn};

use crate::backend::HostOps;
use crate::error::{Error, Result};
use crate::nn::qat_layer::StepSaved;
use crate::nn::{Layer, Module};
use crate::ops::Activation;

/// Parameter gradients by state-dict name (`conv1.weight`, `conv1.bn.bias`, ...).
pub type Gradients = BTreeMap<String, ArrayD<f32>>;

/// What [`train_step`] returns.
#[derive(Debug, Clone)]
pub struct TrainStep {
    /// The loss the loss function returned.
    pub loss: f32,
    /// The model's output.
    pub output: ArrayD<f32>,
    /// dL/dx for the model's input.
    pub dx: ArrayD<f32>,
    /// dL/dθ for every parameter of the QAT modules on the path, by state-dict name.
    /// A module run more than once gets the sum.
    pub grads: Gradients,
}

/// One recorded forward step.
enum Tape {
    Qat { path: String, saved: Box<StepSaved> },
    Act { act: Activation, input: ArrayD<f32> },
    Reshape { input_shape: Vec<usize> },
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// The leaves the model runs, in order, or why it has no training step here.
fn leaves(m: &Module, path: &str, out: &mut Vec<String>) -> Result<()> {
    let refuse = |why: &str| {
        Err(Error::invalid(format!(
            "train_step: `{}` ({}) {why}",
            if path.is_empty() { "<root>" } else { path },
            m.kind_name()
        )))
    };
    match m.layer() {
        Layer::Container(c) => {
            if c.has_custom_forward() {
                return refuse("has a custom forward; train_step runs sequential containers only");
            }
            for name in c.forward_order() {
                if let Some(child) = c.child(&name) {
                    leaves(child, &join(path, &name), out)?;
                }
            }
            Ok(())
        }
        Layer::Qat(q) => {
            if q.bn.is_some() && !m.is_training() {
                return refuse("is in eval mode; its training step needs train()");
            }
            out.push(path.to_string());
            Ok(())
        }
        Layer::ReLU
        | Layer::ReLU6
        | Layer::LeakyReLU { .. }
        | Layer::Hardswish
        | Layer::Identity
        | Layer::Flatten { .. } => {
            out.push(path.to_string());
            Ok(())
        }
        _ => refuse(
            "has no backward in train_step (supported: QAT modules, activations, Identity, \
             Flatten, sequential containers)",
        ),
    }
}

/// One training step through a sequential QAT model: forward in each module's own mode
/// (fake quants observe, BatchNorms of ConvBn QAT modules update their running statistics,
/// as [`Module::forward`] does), `loss(output)` → `(loss, dL/doutput)`, then the backward:
/// ConvBn / LinearBn QAT modules through [`HostOps::conv_bn_qat_backward`], plain QAT
/// modules through [`HostOps::conv2d_backward`] (a linear as a 1×1 conv), fake quants
/// straight through, activations through [`HostOps::activation_backward`]. Parameters are
/// not changed (see [`sgd_step`]).
///
/// The model must be a sequential chain: containers without a custom forward (run in their
/// declared order), QAT modules ([`crate::qat::prepare_qat`]), activations, `Identity` and
/// `Flatten`; QAT modules with a BatchNorm in training mode. Hooks are not run. Anything
/// else is refused before the forward starts (a full autograd over the tree is out of scope).
///
/// Errors: [`Error::InvalidArgument`] for a model outside that scope or a loss gradient
/// whose shape is not the output's ([`Error::ShapeMismatch`]); the forward's, the loss
/// function's and the backward's errors (after such an error the observers and running
/// statistics of the modules already run have moved, as after a failed forward).
pub fn train_step(
    model: &mut Module,
    backend: &dyn HostOps,
    x: &ArrayD<f32>,
    loss: impl FnOnce(&ArrayD<f32>) -> Result<(f32, ArrayD<f32>)>,
) -> Result<TrainStep> {
    let mut order = Vec::new();
    leaves(model, "", &mut order)?;
    let mut tape = Vec::with_capacity(order.len());
    let mut h = x.clone();
    for path in &order {
        let m = model.get_mut(path)?;
        let training = m.is_training();
        let act = m.layer().as_activation();
        let (y, entry) = match m.layer_mut() {
            Layer::Qat(q) => {
                let (y, saved) = q.forward_impl(backend, &h, training, true)?;
                let saved = saved
                    .ok_or_else(|| Error::invalid(format!("internal: `{path}` saved nothing")))?;
                (
                    y,
                    Tape::Qat {
                        path: path.clone(),
                        saved: Box::new(saved),
                    },
                )
            }
            Layer::Identity => (
                h.clone(),
                Tape::Reshape {
                    input_shape: h.shape().to_vec(),
                },
            ),
            Layer::Flatten { .. } => {
                let y = m.forward(backend, &h)?;
                (
                    y,
                    Tape::Reshape {
                        input_shape: h.shape().to_vec(),
                    },
                )
            }
            _ => match act {
                Some(act) => (
                    backend.activation(&h, act)?,
                    Tape::Act {
                        act,
                        input: h.clone(),
                    },
                ),
                None => {
                    return Err(Error::invalid(format!(
                        "internal: train_step cannot run `{path}`"
                    )))
                }
            },
        };
        tape.push(entry);
        h = y;
    }
    let (loss_value, dout) = loss(&h)?;
    if dout.shape() != h.shape() {
        return Err(Error::shape(
            "train_step loss gradient (model output shape)",
            h.shape(),
            dout.shape(),
        ));
    }
    let mut grads = Gradients::new();
    let mut d = dout;
    for entry in tape.iter().rev() {
        d = match entry {
            Tape::Qat { path, saved } => {
                let Layer::Qat(q) = model.get(path)?.layer() else {
                    return Err(Error::invalid(format!(
                        "internal: `{path}` is no longer a QAT module"
                    )));
                };
                let (dx, g) = q.backward(backend, saved, &d)?;
                for (name, grad) in g {
                    let k = join(path, name);
                    match grads.get_mut(&k) {
                        Some(acc) if acc.shape() == grad.shape() => *acc += &grad,
                        _ => {
                            grads.insert(k, grad);
                        }
                    }
                }
                dx
            }
            Tape::Act { act, input } => backend.activation_backward(input, &d, *act)?,
            Tape::Reshape { input_shape } => d
                .as_standard_layout()
                .into_owned()
                .into_shape_with_order(IxDyn(input_shape))
                .map_err(|e| Error::invalid(format!("internal reshape: {e}")))?,
        };
    }
    Ok(TrainStep {
        loss: loss_value,
        output: h,
        dx: d,
        grads,
    })
}

/// Plain SGD: `θ ← θ − lr·grad` for every gradient, matched to the model's parameters by
/// state-dict name (weights, biases, BatchNorm γ / β of any module kind).
///
/// On error the model is unchanged. Errors: [`Error::InvalidArgument`] for a gradient name
/// that is not a parameter of the model; [`Error::ShapeMismatch`] for a gradient whose
/// shape is not its parameter's.
pub fn sgd_step(model: &mut Module, grads: &Gradients, lr: f32) -> Result<()> {
    let mut copy = model.clone();
    let mut used = BTreeSet::new();
    let mut err: Option<Error> = None;
    crate::nn::for_each_param_mut(&mut copy, "", &mut |name, mut p| {
        let Some(g) = grads.get(name) else { return };
        used.insert(name.to_string());
        if g.shape() != p.shape() {
            err.get_or_insert_with(|| {
                Error::shape(format!("gradient of `{name}`"), p.shape(), g.shape())
            });
            return;
        }
        p.zip_mut_with(g, |a, &b| *a -= lr * b);
    });
    if let Some(e) = err {
        return Err(e);
    }
    if let Some(unknown) = grads.keys().find(|k| !used.contains(*k)) {
        return Err(Error::invalid(format!(
            "sgd_step: `{unknown}` is not a parameter of the model"
        )));
    }
    *model = copy;
    Ok(())
}
