//! [`DeviceChain`]: a straight-line eval forward of leaf modules prepared on a backend, its
//! parameters placed there once, run on the backend's own tensors (on the GPU nothing
//! crosses to the host between the input's upload and the output's download).
//!
//! It covers the leaf layers of the float module tree in eval mode: Conv1d / Conv2d /
//! ConvTranspose2d, Linear (on the last dimension), BatchNorm1d / 2d (running statistics),
//! the activations, Identity, MaxPool2d, Flatten, LogSoftmax, and fused modules (BatchNorm
//! folded into the conv or linear once, at preparation, on the backend). Containers, custom
//! layers, hooks and QAT modules still run through [`crate::nn::Module::forward`] on host
//! arrays.

use ndarray::ArrayD;

use super::fused::{Fused, FusedHead};
use super::layer::{BatchNormLayer, Layer};
use super::module::Module;
use crate::backend::{upload_batch_norm, Backend, Shaped};
use crate::error::{Error, Result};
use crate::ops::{Activation, BatchNorm, Conv2dParams, ConvTranspose2dParams};

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
    },
    ConvTranspose {
        weight: B::Tensor,
        bias: Option<B::Tensor>,
        params: ConvTranspose2dParams,
        act: Activation,
    },
    Linear {
        weight: B::Tensor,
        bias: Option<B::Tensor>,
        act: Activation,
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

/// A chain of leaf modules prepared on backend `B` for the eval forward.
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
#[derive(Debug, Clone)]
pub struct DeviceChain<B: Backend> {
    backend: B,
    steps: Vec<(String, Step<B>)>,
}

fn unsupported(name: &str, module: &Module) -> Error {
    Error::invalid(format!(
        "`{}` ({}) has no device forward yet: only leaf float layers and fused modules \
         run in a DeviceChain",
        crate::io::text::escape(name),
        module.kind_name()
    ))
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

    /// Appends the eval forward of leaf module `module` (named `name` in errors), placing
    /// its parameters on the backend; a fused module's BatchNorm is folded on the backend
    /// now.
    ///
    /// Errors: [`Error::InvalidArgument`] for containers, custom layers, QAT modules or
    /// modules with hooks; the layers' own checks; backend errors.
    pub fn push(&mut self, name: &str, module: &Module) -> Result<()> {
        if !module.forward_pre_hooks().is_empty() || !module.forward_hooks().is_empty() {
            return Err(Error::invalid(format!(
                "`{}` has hooks, which run on host arrays: use Module::forward",
                crate::io::text::escape(name)
            )));
        }
        let step = self.prepare(name, module)?;
        self.steps.push((name.to_string(), step));
        Ok(())
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
            },
            Layer::ConvTranspose2d(c) => Step::ConvTranspose {
                weight: self.up(&c.weight.clone().into_dyn())?,
                bias: self.up1(c.bias.as_ref())?,
                params: c.params,
                act: Activation::None,
            },
            Layer::Linear(l) => Step::Linear {
                weight: self.up(&l.weight.clone().into_dyn())?,
                bias: self.up1(l.bias.as_ref())?,
                act: Activation::None,
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
                }
            }
            FusedHead::ConvTranspose2d(c) => {
                let w = self.up(&c.weight.clone().into_dyn())?;
                let bias = self.up1(c.bias.as_ref())?;
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
                }
            }
            FusedHead::Linear(l) => {
                let w = self.up(&l.weight.clone().into_dyn())?;
                let bias = self.up1(l.bias.as_ref())?;
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

    /// The eval forward of every step in order, on the backend's tensors.
    ///
    /// Errors: the ops' shape checks (naming the step), backend errors.
    pub fn forward(&self, x: &B::Tensor) -> Result<B::Tensor> {
        let mut h = x.clone();
        for (_, step) in &self.steps {
            h = self.step(step, &h)?;
        }
        Ok(h)
    }

    fn step(&self, step: &Step<B>, x: &B::Tensor) -> Result<B::Tensor> {
        let b = &self.backend;
        match step {
            Step::Conv {
                weight,
                bias,
                params,
                act,
                conv1d,
            } => {
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
            } => b.conv_transpose2d(x, weight, bias.as_ref(), params, *act),
            Step::Linear { weight, bias, act } => {
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
}

fn rank<const R: usize>(dims: &[usize], what: &str) -> Result<[usize; R]> {
    <[usize; R]>::try_from(dims).map_err(|_| {
        Error::invalid(format!(
            "{what} expects a rank-{R} input, got shape {dims:?}"
        ))
    })
}
