//! The kinds of module ([`Layer`]) and the parameters each holds.

use std::any::Any;
use std::fmt;

use ndarray::{Array1, Array2, Array3, Array4, ArrayD};

use super::container::Container;
use super::fused::Fused;
use crate::backend::HostOps;
use crate::error::{Error, Result};
use crate::ops::{Activation, BatchNorm, Conv2dParams, ConvTranspose2dParams, PadMode};

/// What a module is. Each variant mirrors one `torch.nn` type; [`Layer::kind_name`] gives
/// PyTorch's type name.
///
/// `#[non_exhaustive]`: later work (QAT modules) adds variants; match with a wildcard arm.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Layer {
    /// `torch.nn.Conv1d`: weight `[O, C/groups, K]`, input `(N, C, L)`.
    Conv1d(ConvLayer),
    /// `torch.nn.Conv2d`: weight `[O, C/groups, KH, KW]`, input `(N, C, H, W)`.
    Conv2d(ConvLayer),
    /// `torch.nn.ConvTranspose2d`: weight `[Cin, Cout/groups, KH, KW]`.
    ConvTranspose2d(ConvTransposeLayer),
    /// `torch.nn.Linear`: weight `[out, in]`, applied to the last dimension.
    Linear(LinearLayer),
    /// `torch.nn.BatchNorm1d`: input `(N, C)` or `(N, C, L)`.
    BatchNorm1d(BatchNormLayer),
    /// `torch.nn.BatchNorm2d`: input `(N, C, H, W)`.
    BatchNorm2d(BatchNormLayer),
    /// `torch.nn.ReLU`.
    ReLU,
    /// `torch.nn.ReLU6`.
    ReLU6,
    /// `torch.nn.LeakyReLU(negative_slope)`.
    LeakyReLU {
        /// The slope for `x <= 0` (PyTorch's default: 0.01).
        negative_slope: f32,
    },
    /// `torch.nn.Hardswish`.
    Hardswish,
    /// `torch.nn.Identity`: returns its input.
    Identity,
    /// `torch.nn.MaxPool2d(kernel_size, stride)`, no padding, no dilation.
    MaxPool2d {
        /// Square window size.
        kernel_size: usize,
        /// Step (PyTorch's default is `kernel_size`).
        stride: usize,
    },
    /// `torch.nn.Flatten(start_dim, end_dim)` (negative dims count from the end).
    Flatten {
        /// First flattened dimension (PyTorch's default: 1).
        start_dim: isize,
        /// Last flattened dimension, inclusive (PyTorch's default: -1).
        end_dim: isize,
    },
    /// `torch.nn.LogSoftmax(dim)` (a negative dim counts from the end).
    LogSoftmax {
        /// The dimension normalized over.
        dim: isize,
    },
    /// `torch.nn.Sequential` or a user container: named children and a declared forward
    /// order (see [`Container`]).
    Container(Container),
    /// A fused module (`ConvReLU2d`, `ConvBn2d`, `LinearReLU`, `BNReLU2d`, ...): see [`Fused`].
    Fused(Box<Fused>),
    /// A caller-defined module kind (see [`CustomLayer`]).
    Custom(Box<dyn CustomLayer>),
    /// A QAT module (`torch.ao.nn.intrinsic.qat.ConvBnReLU2d`, `torch.ao.nn.qat.Conv2d`,
    /// ...), built by [`crate::qat::prepare_qat`]: see [`crate::qat::QatLayer`].
    Qat(Box<super::QatLayer>),
}

impl Layer {
    /// PyTorch's type name of the module: `Conv2d`, `BatchNorm2d`, `ReLU`, `Sequential`, the
    /// container's declared type name, `ConvReLU2d` (see [`Fused::kind_name`]), ... Used in
    /// messages, pattern tables and NNI's `op_types`.
    pub fn kind_name(&self) -> String {
        match self {
            Layer::Conv1d(_) => "Conv1d".into(),
            Layer::Conv2d(_) => "Conv2d".into(),
            Layer::ConvTranspose2d(_) => "ConvTranspose2d".into(),
            Layer::Linear(_) => "Linear".into(),
            Layer::BatchNorm1d(_) => "BatchNorm1d".into(),
            Layer::BatchNorm2d(_) => "BatchNorm2d".into(),
            Layer::ReLU => "ReLU".into(),
            Layer::ReLU6 => "ReLU6".into(),
            Layer::LeakyReLU { .. } => "LeakyReLU".into(),
            Layer::Hardswish => "Hardswish".into(),
            Layer::Identity => "Identity".into(),
            Layer::MaxPool2d { .. } => "MaxPool2d".into(),
            Layer::Flatten { .. } => "Flatten".into(),
            Layer::LogSoftmax { .. } => "LogSoftmax".into(),
            Layer::Container(c) => c.type_name().to_string(),
            Layer::Fused(f) => f.kind_name(),
            Layer::Custom(c) => c.kind_name(),
            Layer::Qat(q) => q.kind_name(),
        }
    }

    /// The activation this layer is, for the activation kinds (`ReLU`, `ReLU6`, `LeakyReLU`,
    /// `Hardswish`); `None` otherwise.
    pub fn as_activation(&self) -> Option<Activation> {
        match *self {
            Layer::ReLU => Some(Activation::Relu),
            Layer::ReLU6 => Some(Activation::Relu6),
            Layer::LeakyReLU { negative_slope } => Some(Activation::LeakyRelu { negative_slope }),
            Layer::Hardswish => Some(Activation::Hardswish),
            _ => None,
        }
    }

    /// The activation layer for `act` (`Identity` for [`Activation::None`]).
    pub fn from_activation(act: Activation) -> Layer {
        match act {
            Activation::None => Layer::Identity,
            Activation::Relu => Layer::ReLU,
            Activation::Relu6 => Layer::ReLU6,
            Activation::LeakyRelu { negative_slope } => Layer::LeakyReLU { negative_slope },
            Activation::Hardswish => Layer::Hardswish,
        }
    }
}

/// A convolution's parameters (`Conv1d` or `Conv2d`, told apart by the [`Layer`] variant and
/// the weight's rank).
#[derive(Debug, Clone, PartialEq)]
pub struct ConvLayer {
    /// `[O, C/groups, KH, KW]` (Conv2d) or `[O, C/groups, K]` (Conv1d).
    pub weight: ArrayD<f32>,
    /// `[O]`, or `None` (`bias=False`).
    pub bias: Option<Array1<f32>>,
    /// Settings. A Conv1d uses the second (width) entry of `stride`, `padding` and
    /// `dilation`; its first entries are `1`, `0`, `1` (it runs as a conv2d on `(N, C, 1, L)`).
    pub params: Conv2dParams,
}

/// `torch.nn.Conv1d` settings (zero padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv1dParams {
    /// Stride.
    pub stride: usize,
    /// Zero padding on each side.
    pub padding: usize,
    /// Dilation.
    pub dilation: usize,
    /// Number of groups.
    pub groups: usize,
}

impl Default for Conv1dParams {
    fn default() -> Self {
        Self {
            stride: 1,
            padding: 0,
            dilation: 1,
            groups: 1,
        }
    }
}

fn check_bias(what: &str, bias: Option<&Array1<f32>>, out: usize) -> Result<()> {
    match bias {
        Some(b) if b.len() != out => Err(Error::shape(format!("{what} bias"), &[out], b.shape())),
        _ => Ok(()),
    }
}

fn check_settings(what: &str, stride: &[usize], dilation: &[usize], groups: usize) -> Result<()> {
    if groups == 0 || stride.contains(&0) || dilation.contains(&0) {
        return Err(Error::invalid(format!(
            "{what} stride, dilation and groups must be positive, got stride {stride:?}, \
             dilation {dilation:?}, groups {groups}"
        )));
    }
    Ok(())
}

impl ConvLayer {
    /// A Conv2d layer. Errors: [`Error::InvalidArgument`] for non-positive settings or groups
    /// that do not divide the output channels; [`Error::ShapeMismatch`] for a bias that is not
    /// `[O]`.
    pub fn conv2d(
        weight: Array4<f32>,
        bias: Option<Array1<f32>>,
        params: Conv2dParams,
    ) -> Result<Self> {
        let o = weight.shape()[0];
        check_settings("Conv2d", &params.stride, &params.dilation, params.groups)?;
        if !o.is_multiple_of(params.groups) {
            return Err(Error::invalid(format!(
                "Conv2d groups = {} must divide output channels {o}",
                params.groups
            )));
        }
        check_bias("Conv2d", bias.as_ref(), o)?;
        Ok(Self {
            weight: weight.into_dyn(),
            bias,
            params,
        })
    }

    /// A Conv1d layer (weight `[O, C/groups, K]`). Errors: as [`ConvLayer::conv2d`].
    pub fn conv1d(
        weight: Array3<f32>,
        bias: Option<Array1<f32>>,
        params: Conv1dParams,
    ) -> Result<Self> {
        let o = weight.shape()[0];
        check_settings(
            "Conv1d",
            &[params.stride],
            &[params.dilation],
            params.groups,
        )?;
        if !o.is_multiple_of(params.groups) {
            return Err(Error::invalid(format!(
                "Conv1d groups = {} must divide output channels {o}",
                params.groups
            )));
        }
        check_bias("Conv1d", bias.as_ref(), o)?;
        Ok(Self {
            weight: weight.into_dyn(),
            bias,
            params: Conv2dParams {
                stride: [1, params.stride],
                padding: [0, params.padding],
                dilation: [1, params.dilation],
                groups: params.groups,
                pad_mode: PadMode::Explicit,
            },
        })
    }

    /// Output channels (`weight.shape[0]`).
    pub fn out_channels(&self) -> usize {
        self.weight.shape().first().copied().unwrap_or(0)
    }

    /// Input channels (`weight.shape[1] * groups`).
    pub fn in_channels(&self) -> usize {
        self.weight.shape().get(1).copied().unwrap_or(0) * self.params.groups
    }

    /// The weight as the 4-D conv2d weight it runs as (`[O, C/g, 1, K]` for a Conv1d).
    pub(crate) fn weight4(&self) -> Result<Array4<f32>> {
        let s = self.weight.shape();
        match s.len() {
            3 => self
                .weight
                .as_standard_layout()
                .into_owned()
                .into_shape_with_order((s[0], s[1], 1, s[2]))
                .map_err(internal),
            4 => self
                .weight
                .clone()
                .into_dimensionality::<ndarray::Ix4>()
                .map_err(internal),
            r => Err(Error::invalid(format!(
                "conv weight must be rank 3 (Conv1d) or 4 (Conv2d), got rank {r}"
            ))),
        }
    }

    /// The settings it runs with as a conv2d (a Conv1d's first entries forced to 1, 0, 1).
    pub(crate) fn params2d(&self) -> Conv2dParams {
        if self.weight.ndim() == 3 {
            Conv2dParams {
                stride: [1, self.params.stride[1]],
                padding: [0, self.params.padding[1]],
                dilation: [1, self.params.dilation[1]],
                groups: self.params.groups,
                pad_mode: self.params.pad_mode,
            }
        } else {
            self.params
        }
    }
}

fn internal(e: ndarray::ShapeError) -> Error {
    Error::invalid(format!("internal reshape: {e}"))
}

/// A transposed convolution's parameters (`torch.nn.ConvTranspose2d`).
#[derive(Debug, Clone, PartialEq)]
pub struct ConvTransposeLayer {
    /// `[Cin, Cout/groups, KH, KW]`.
    pub weight: Array4<f32>,
    /// `[Cout]`, or `None`.
    pub bias: Option<Array1<f32>>,
    /// Settings (incl. `output_padding`).
    pub params: ConvTranspose2dParams,
}

impl ConvTransposeLayer {
    /// A ConvTranspose2d layer. Errors: [`Error::InvalidArgument`] for non-positive settings,
    /// groups that do not divide the input channels, or an `output_padding` not smaller than
    /// the stride or the dilation; [`Error::ShapeMismatch`] for a bias that is not `[Cout]`.
    pub fn new(
        weight: Array4<f32>,
        bias: Option<Array1<f32>>,
        params: ConvTranspose2dParams,
    ) -> Result<Self> {
        check_settings(
            "ConvTranspose2d",
            &params.stride,
            &params.dilation,
            params.groups,
        )?;
        let cin = weight.shape()[0];
        if !cin.is_multiple_of(params.groups) {
            return Err(Error::invalid(format!(
                "ConvTranspose2d groups = {} must divide input channels {cin}",
                params.groups
            )));
        }
        for i in 0..2 {
            if params.output_padding[i] >= params.stride[i]
                && params.output_padding[i] >= params.dilation[i]
            {
                return Err(Error::invalid(format!(
                    "ConvTranspose2d output padding must be smaller than either stride or \
                     dilation, got {params:?}"
                )));
            }
        }
        let layer = Self {
            weight,
            bias,
            params,
        };
        check_bias("ConvTranspose2d", layer.bias.as_ref(), layer.out_channels())?;
        Ok(layer)
    }

    /// Output channels (`weight.shape[1] * groups`).
    pub fn out_channels(&self) -> usize {
        self.weight.shape()[1] * self.params.groups
    }

    /// Input channels (`weight.shape[0]`).
    pub fn in_channels(&self) -> usize {
        self.weight.shape()[0]
    }
}

/// A linear layer's parameters (`torch.nn.Linear`).
#[derive(Debug, Clone, PartialEq)]
pub struct LinearLayer {
    /// `[out, in]`.
    pub weight: Array2<f32>,
    /// `[out]`, or `None`.
    pub bias: Option<Array1<f32>>,
}

impl LinearLayer {
    /// A Linear layer. Errors: [`Error::ShapeMismatch`] for a bias that is not `[out]`.
    pub fn new(weight: Array2<f32>, bias: Option<Array1<f32>>) -> Result<Self> {
        check_bias("Linear", bias.as_ref(), weight.shape()[0])?;
        Ok(Self { weight, bias })
    }

    /// `out_features`.
    pub fn out_features(&self) -> usize {
        self.weight.shape()[0]
    }

    /// `in_features`.
    pub fn in_features(&self) -> usize {
        self.weight.shape()[1]
    }
}

/// A BatchNorm's state (`torch.nn.BatchNorm1d` / `BatchNorm2d`): parameters, running
/// statistics, and `num_batches_tracked` (incremented by each training-mode forward).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchNormLayer {
    /// γ, β, running statistics, eps, momentum.
    pub bn: BatchNorm,
    /// Training-mode forwards run so far (PyTorch's `num_batches_tracked` buffer).
    pub num_batches_tracked: u64,
}

impl BatchNormLayer {
    /// A BatchNorm layer. Errors: those of [`BatchNorm::validate`].
    pub fn new(bn: BatchNorm) -> Result<Self> {
        bn.validate()?;
        Ok(Self {
            bn,
            num_batches_tracked: 0,
        })
    }

    /// A BatchNorm with PyTorch's initial state for `num_features` channels: γ = 1, β = 0,
    /// running mean 0, running variance 1, `eps = 1e-5`, `momentum = 0.1`.
    pub fn with_features(num_features: usize) -> Self {
        Self {
            bn: BatchNorm {
                weight: Some(Array1::ones(num_features)),
                bias: Some(Array1::zeros(num_features)),
                running_mean: Array1::zeros(num_features),
                running_var: Array1::ones(num_features),
                eps: 1e-5,
                momentum: 0.1,
            },
            num_batches_tracked: 0,
        }
    }

    /// `num_features`.
    pub fn num_features(&self) -> usize {
        self.bn.channels()
    }
}

/// A caller-defined module kind, for what [`Layer`] does not cover (for example the result
/// of a custom fuser). Implement [`CustomLayer::clone_box`] as `Box::new(self.clone())`.
pub trait CustomLayer: Send + Sync + fmt::Debug {
    /// The type name reported by [`Layer::kind_name`] (and matched by fuser patterns).
    fn kind_name(&self) -> String;

    /// The forward on `backend`; `training` is the module's training flag.
    fn forward(
        &mut self,
        backend: &dyn HostOps,
        x: &ArrayD<f32>,
        training: bool,
    ) -> Result<ArrayD<f32>>;

    /// A boxed deep copy.
    fn clone_box(&self) -> Box<dyn CustomLayer>;

    /// For downcasting to the concrete type.
    fn as_any(&self) -> &dyn Any;

    /// For downcasting to the concrete type.
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

impl Clone for Box<dyn CustomLayer> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}
