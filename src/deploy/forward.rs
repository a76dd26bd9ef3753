//! [`DeviceNet`]: a [`Net`] prepared once on a backend, and the one interpreter of its float
//! forward. [`Net::forward_values`] (evaluation on host arrays), [`super::calibrate_ranges`]
//! (activation ranges observed on the device) and [`super::convert`] run through it on any
//! [`Backend`].
//!
//! Preparing places every conv and linear weight and bias on the backend once — with each
//! conv's BatchNorm folded into it by the CPU reference (the spec, on the host, as
//! [`super::convert_with_ranges`] folds the weights it quantizes) or kept as a BatchNorm on
//! the backend, applied after the conv. A forward then runs conv / linear / max pool /
//! flatten / add / activation nodes — padded max pooling and global average pooling included
//! ([`crate::backend::FloatOps::pool2d`], [`crate::backend::FloatOps::global_avg_pool2d`]) —
//! on the backend's own tensors: on the GPU the input is one upload and only what the caller
//! asks for comes back. An observer hook sees every value as it is computed
//! (calibration reduces it there, [`crate::backend::QuantOps::observe_running`]).

use ndarray::ArrayD;

use super::net::{check_rank, check_same, fold_conv, Net, NodeOp, ValueId};
use crate::backend::{upload_batch_norm, Backend, CpuBackend, Shaped};
use crate::error::{Error, Result};
use crate::ops::{flatten_shape, Activation, BatchNorm, Conv2dParams};

/// One node prepared on the backend.
#[derive(Debug, Clone)]
enum Step<B: Backend> {
    Conv {
        weight: B::Tensor,
        bias: Option<B::Tensor>,
        /// The BatchNorm applied after the conv when it is not folded.
        bn: Option<BatchNorm<B::Tensor>>,
        params: Conv2dParams,
        act: Activation,
    },
    Linear {
        weight: B::Tensor,
        bias: Option<B::Tensor>,
        act: Activation,
    },
    MaxPool2d {
        kernel: usize,
        stride: usize,
    },
    Flatten,
    Add {
        act: Activation,
    },
    MaxPool2dPad(crate::ops::Pool2d),
    GlobalAvgPool,
    Act(Activation),
}

/// A [`Net`]'s float model prepared on a backend: parameters placed once, every forward on
/// the backend's tensors.
///
/// ```
/// use ndarray::{Array1, Array4, ArrayD, IxDyn};
/// use qfuse::deploy::{DeviceNet, Net};
/// use qfuse::ops::{Conv2d, Conv2dParams};
///
/// let mut net = Net::new();
/// let conv = Conv2d {
///     weight: Array4::from_elem((2, 1, 3, 3), 0.5),
///     bias: Some(Array1::zeros(2)),
///     params: Conv2dParams::default(),
/// };
/// net.conv("conv", conv, net.input())?;
/// let on_cpu = DeviceNet::prepare(&net, qfuse::CpuBackend, true)?;
/// let y = on_cpu.forward(&ArrayD::from_elem(IxDyn(&[1, 1, 4, 4]), 1.0))?;
/// assert_eq!(y.shape(), &[1, 2, 2, 2]);
/// assert_eq!(y[[0, 1, 0, 0]], 4.5);
/// # Ok::<(), qfuse::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct DeviceNet<B: Backend> {
    backend: B,
    steps: Vec<Step<B>>,
    names: Vec<String>,
    inputs: Vec<Vec<ValueId>>,
    output: ValueId,
    /// For each value, the last node reading it (`None`: never read); a value is dropped
    /// after its last reader ran unless it is the output or the caller keeps every value.
    last_use: Vec<Option<usize>>,
    folded: bool,
}

impl<B: Backend> DeviceNet<B> {
    /// Prepares `net` on `backend`. With `fold`, each conv's BatchNorm is folded into its
    /// weight and bias (`fuse_conv_bn_weights`, by the CPU reference on the host: the fused
    /// float model a deployment quantizes); without, it is placed on the backend and applied
    /// after the conv in eval mode. Each parameter is one upload.
    ///
    /// Errors: a BatchNorm that does not validate, backend errors.
    pub fn prepare(net: &Net, backend: B, fold: bool) -> Result<Self> {
        let up = |a: ArrayD<f32>| backend.upload(&a);
        let mut steps = Vec::with_capacity(net.nodes().len());
        for node in net.nodes() {
            steps.push(match &node.op {
                NodeOp::Conv { conv, bn, act } => {
                    let (w, b, bn) = match (bn, fold) {
                        (Some(bn), true) => {
                            let (w, b) = fold_conv(&CpuBackend, conv, bn)?;
                            (w, Some(b), None)
                        }
                        (bn, _) => (
                            conv.weight.clone(),
                            conv.bias.clone(),
                            bn.as_ref()
                                .map(|bn| upload_batch_norm(&backend, bn))
                                .transpose()?,
                        ),
                    };
                    Step::Conv {
                        weight: up(w.into_dyn())?,
                        bias: b.map(|b| up(b.into_dyn())).transpose()?,
                        bn,
                        params: conv.params,
                        act: *act,
                    }
                }
                NodeOp::Linear { weight, bias, act } => Step::Linear {
                    weight: up(weight.clone().into_dyn())?,
                    bias: bias.clone().map(|b| up(b.into_dyn())).transpose()?,
                    act: *act,
                },
                NodeOp::MaxPool2d { kernel, stride } => Step::MaxPool2d {
                    kernel: *kernel,
                    stride: *stride,
                },
                NodeOp::Flatten => Step::Flatten,
                NodeOp::Add { act } => Step::Add { act: *act },
                NodeOp::MaxPool2dPad { pool } => Step::MaxPool2dPad(*pool),
                NodeOp::GlobalAvgPool => Step::GlobalAvgPool,
                NodeOp::Activation { act } => Step::Act(*act),
            });
        }
        let mut last_use = vec![None; net.value_count()];
        for (i, node) in net.nodes().iter().enumerate() {
            for &v in &node.inputs {
                last_use[v] = Some(i);
            }
        }
        Ok(Self {
            steps,
            names: net.nodes().iter().map(|n| n.name.clone()).collect(),
            inputs: net.nodes().iter().map(|n| n.inputs.clone()).collect(),
            output: net.output(),
            last_use,
            folded: fold,
            backend,
        })
    }

    /// The backend the net lives on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Whether the BatchNorms were folded into their convs.
    pub fn folded(&self) -> bool {
        self.folded
    }

    /// Number of values (the input and one per node).
    pub fn value_count(&self) -> usize {
        self.steps.len() + 1
    }

    /// The float forward on host arrays: uploads `x`, runs every node on the backend and
    /// downloads the output.
    ///
    /// Errors: shape mismatches between nodes (naming the node), backend errors.
    pub fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let y = self.forward_device(&self.backend.upload(x)?)?;
        self.backend.download(&y)
    }

    /// The forward on a tensor already on the backend; returns the output, on the backend.
    ///
    /// Errors: as [`DeviceNet::forward`].
    pub fn forward_device(&self, x: &B::Tensor) -> Result<B::Tensor> {
        self.forward_observed(x, &mut |_, _| Ok(()))
    }

    /// [`DeviceNet::forward_device`], calling `observe(v, value)` on every value as it is
    /// computed (value 0, the input, first; value `i + 1` right after node `i`). An error
    /// from `observe` stops the forward.
    ///
    /// Errors: as [`DeviceNet::forward`], and `observe`'s.
    pub fn forward_observed(
        &self,
        x: &B::Tensor,
        observe: &mut dyn FnMut(ValueId, &B::Tensor) -> Result<()>,
    ) -> Result<B::Tensor> {
        let mut values = self.run(x.clone(), false, observe)?;
        values[self.output]
            .take()
            .ok_or_else(|| Error::invalid(format!("value {} does not exist", self.output)))
    }

    /// Every value of the forward (index = [`ValueId`]), on the backend.
    ///
    /// Errors: as [`DeviceNet::forward`].
    pub fn forward_values_device(&self, x: &B::Tensor) -> Result<Vec<B::Tensor>> {
        self.run(x.clone(), true, &mut |_, _| Ok(()))?
            .into_iter()
            .map(|v| v.ok_or_else(|| Error::invalid("internal: a value was not kept")))
            .collect()
    }

    /// The interpreter: every node on the backend's tensors, in order. Keeps every value
    /// when `keep_all`, else drops each after its last reader.
    fn run(
        &self,
        input: B::Tensor,
        keep_all: bool,
        observe: &mut dyn FnMut(ValueId, &B::Tensor) -> Result<()>,
    ) -> Result<Vec<Option<B::Tensor>>> {
        let b = &self.backend;
        let mut values: Vec<Option<B::Tensor>> = vec![None; self.value_count()];
        observe(0, &input)?;
        values[0] = Some(input);
        for (i, step) in self.steps.iter().enumerate() {
            let name = &self.names[i];
            let inputs = &self.inputs[i];
            let get = |v: usize| -> Result<&B::Tensor> {
                values[v].as_ref().ok_or_else(|| {
                    Error::invalid(format!("internal: value {v} of `{name}` is gone"))
                })
            };
            let x = get(inputs[0])?;
            let y = match step {
                Step::Conv {
                    weight,
                    bias,
                    bn,
                    params,
                    act,
                } => {
                    check_rank(x.dims(), 4, name)?;
                    match bn {
                        None => b.conv2d(x, weight, bias.as_ref(), params, *act)?,
                        Some(bn) => {
                            let y = b.conv2d(x, weight, bias.as_ref(), params, Activation::None)?;
                            b.batch_norm2d(&y, bn, false, *act)?.y
                        }
                    }
                }
                Step::Linear { weight, bias, act } => {
                    check_rank(x.dims(), 2, name)?;
                    b.linear(x, weight, bias.as_ref(), *act)?
                }
                Step::MaxPool2d { kernel, stride } => {
                    check_rank(x.dims(), 4, name)?;
                    b.max_pool2d(x, *kernel, *stride)?
                }
                Step::Flatten => b.reshape(x, &flatten_shape(x.dims())?)?,
                Step::Add { act } => {
                    let other = get(inputs[1])?;
                    check_same(x, other, name)?;
                    b.activation(&b.add(x, other)?, *act)?
                }
                // Padded max pooling: the general window, padding never wins.
                Step::MaxPool2dPad(pool) => {
                    check_rank(x.dims(), 4, name)?;
                    let window = crate::ops::PoolWindow {
                        kernel: pool.kernel,
                        stride: pool.stride,
                        dilation: [1, 1],
                        pads: [
                            pool.padding[0],
                            pool.padding[1],
                            pool.padding[0],
                            pool.padding[1],
                        ],
                        ceil_mode: false,
                    };
                    b.pool2d(x, &window, crate::ops::PoolMode::Max)?
                }
                Step::GlobalAvgPool => {
                    check_rank(x.dims(), 4, name)?;
                    b.global_avg_pool2d(x)?
                }
                Step::Act(act) => b.activation(x, *act)?,
            };
            observe(i + 1, &y)?;
            if !keep_all {
                for &v in inputs {
                    if self.last_use[v] == Some(i) && v != self.output {
                        values[v] = None;
                    }
                }
            }
            values[i + 1] = Some(y);
        }
        Ok(values)
    }
}
