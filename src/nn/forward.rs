//! The forward of each [`Layer`] on a [`HostOps`].

use ndarray::{Array4, ArrayD, Ix2, Ix4, IxDyn};

use super::fused::{Fused, FusedHead};
use super::layer::{BatchNormLayer, ConvLayer, ConvTransposeLayer, Layer, LinearLayer};
use crate::backend::HostOps;
use crate::error::{Error, Result};
use crate::ops::{self, Activation};

/// Runs `layer` (with training flag `training`) on `x`; `path` is the module's hook path
/// (containers pass it on to their children).
pub(crate) fn forward_layer(
    layer: &mut Layer,
    training: bool,
    b: &dyn HostOps,
    x: &ArrayD<f32>,
    path: &str,
) -> Result<ArrayD<f32>> {
    match layer {
        Layer::Conv1d(c) => conv_forward(b, c, x, Activation::None, 3),
        Layer::Conv2d(c) => conv_forward(b, c, x, Activation::None, 4),
        Layer::ConvTranspose2d(c) => conv_transpose_forward(b, c, x, Activation::None),
        Layer::Linear(l) => linear_forward(b, l, x, Activation::None),
        Layer::BatchNorm1d(bn) => bn_forward(b, bn, x, training, Activation::None, 1),
        Layer::BatchNorm2d(bn) => bn_forward(b, bn, x, training, Activation::None, 2),
        Layer::ReLU => b.activation(x, Activation::Relu),
        Layer::ReLU6 => b.activation(x, Activation::Relu6),
        Layer::LeakyReLU { negative_slope } => b.activation(
            x,
            Activation::LeakyRelu {
                negative_slope: *negative_slope,
            },
        ),
        Layer::Hardswish => b.activation(x, Activation::Hardswish),
        Layer::Identity => Ok(x.clone()),
        Layer::MaxPool2d {
            kernel_size,
            stride,
        } => {
            let x4 = to4(x, "MaxPool2d")?;
            Ok(b.max_pool2d(&x4, *kernel_size, *stride)?.into_dyn())
        }
        Layer::Flatten { start_dim, end_dim } => flatten(x, *start_dim, *end_dim),
        Layer::LogSoftmax { dim } => log_softmax(b, x, *dim),
        Layer::Container(c) => c.forward(b, x, path, training),
        Layer::Fused(f) => fused_forward(b, f, x, training),
        Layer::Custom(c) => c.forward(b, x, training),
        Layer::Qat(q) => q.forward(b, x, training),
    }
}

/// `x` reshaped to `shape` (a copy in standard layout).
pub(crate) fn reshape(x: &ArrayD<f32>, shape: &[usize]) -> Result<ArrayD<f32>> {
    x.as_standard_layout()
        .into_owned()
        .into_shape_with_order(IxDyn(shape))
        .map_err(|e| Error::invalid(format!("internal reshape to {shape:?}: {e}")))
}

fn to4(x: &ArrayD<f32>, what: &str) -> Result<Array4<f32>> {
    if x.ndim() != 4 {
        return Err(Error::invalid(format!(
            "{what} expects a 4-D input (N, C, H, W), got shape {:?}",
            x.shape()
        )));
    }
    x.clone()
        .into_dimensionality::<Ix4>()
        .map_err(|e| Error::invalid(format!("internal: {e}")))
}

/// A `(N, C, L)` input as `(N, C, 1, L)`.
fn from1d(x: &ArrayD<f32>, what: &str) -> Result<Array4<f32>> {
    if x.ndim() != 3 {
        return Err(Error::invalid(format!(
            "{what} expects a 3-D input (N, C, L), got shape {:?}",
            x.shape()
        )));
    }
    let s = x.shape();
    to4(&reshape(x, &[s[0], s[1], 1, s[2]])?, what)
}

/// A `(N, O, 1, L)` output back as `(N, O, L)`.
fn to1d(y: Array4<f32>) -> Result<ArrayD<f32>> {
    let s = y.shape().to_vec();
    reshape(&y.into_dyn(), &[s[0], s[1], s[3]])
}

/// `expect_rank`: 3 for a Conv1d, 4 for a Conv2d.
fn check_conv_rank(c: &ConvLayer, expect_rank: usize) -> Result<&'static str> {
    let what = if expect_rank == 3 { "Conv1d" } else { "Conv2d" };
    if c.weight.ndim() != expect_rank {
        return Err(Error::invalid(format!(
            "{what} weight must be rank {expect_rank}, got shape {:?}",
            c.weight.shape()
        )));
    }
    Ok(what)
}

fn conv_forward(
    b: &dyn HostOps,
    c: &ConvLayer,
    x: &ArrayD<f32>,
    act: Activation,
    expect_rank: usize,
) -> Result<ArrayD<f32>> {
    let what = check_conv_rank(c, expect_rank)?;
    let w4 = c.weight4()?;
    if expect_rank == 3 {
        let y = b.conv2d_act(&from1d(x, what)?, &w4, c.bias.as_ref(), &c.params2d(), act)?;
        to1d(y)
    } else {
        let y = b.conv2d_act(&to4(x, what)?, &w4, c.bias.as_ref(), &c.params2d(), act)?;
        Ok(y.into_dyn())
    }
}

fn conv_transpose_forward(
    b: &dyn HostOps,
    c: &ConvTransposeLayer,
    x: &ArrayD<f32>,
    act: Activation,
) -> Result<ArrayD<f32>> {
    let x4 = to4(x, "ConvTranspose2d")?;
    Ok(
        b.conv_transpose2d_act(&x4, &c.weight, c.bias.as_ref(), &c.params, act)?
            .into_dyn(),
    )
}

/// Linear on the last dimension of `x` (any rank ≥ 1), as `torch.nn.functional.linear`.
fn linear_forward(
    b: &dyn HostOps,
    l: &LinearLayer,
    x: &ArrayD<f32>,
    act: Activation,
) -> Result<ArrayD<f32>> {
    linear_with(b, &l.weight, l.bias.as_ref(), x, act)
}

fn linear_with(
    b: &dyn HostOps,
    w: &ndarray::Array2<f32>,
    bias: Option<&ndarray::Array1<f32>>,
    x: &ArrayD<f32>,
    act: Activation,
) -> Result<ArrayD<f32>> {
    let Some((&last, lead)) = x.shape().split_last() else {
        return Err(Error::invalid(
            "Linear expects an input of rank >= 1, got a scalar",
        ));
    };
    let (out, inp) = w.dim();
    if last != inp {
        return Err(Error::shape(
            format!("Linear input (in_features = {inp}) last dimension"),
            &[inp],
            &[last],
        ));
    }
    let m: usize = lead.iter().product();
    let x2 = reshape(x, &[m, last])?
        .into_dimensionality::<Ix2>()
        .map_err(|e| Error::invalid(format!("internal: {e}")))?;
    let y = b.linear_act(&x2, w, bias, act)?;
    let mut shape = lead.to_vec();
    shape.push(out);
    reshape(&y.into_dyn(), &shape)
}

/// BatchNorm (`dims` 1: `(N, C)` or `(N, C, L)`; 2: `(N, C, H, W)`) followed by `act`,
/// updating the running statistics in training mode.
fn bn_forward(
    b: &dyn HostOps,
    bn: &mut BatchNormLayer,
    x: &ArrayD<f32>,
    training: bool,
    act: Activation,
    dims: usize,
) -> Result<ArrayD<f32>> {
    let shape = x.shape().to_vec();
    let x4 = if dims == 2 {
        to4(x, "BatchNorm2d")?
    } else {
        match *shape.as_slice() {
            [n, c] => to4(&reshape(x, &[n, c, 1, 1])?, "BatchNorm1d")?,
            [n, c, l] => to4(&reshape(x, &[n, c, 1, l])?, "BatchNorm1d")?,
            _ => {
                return Err(Error::invalid(format!(
                    "BatchNorm1d expects a 2-D (N, C) or 3-D (N, C, L) input, got shape \
                     {shape:?}"
                )))
            }
        }
    };
    let out = b.batch_norm2d_act(&x4, &bn.bn, training, act)?;
    if training {
        bn.bn.running_mean = out.running_mean;
        bn.bn.running_var = out.running_var;
        bn.num_batches_tracked += 1;
    }
    reshape(&out.y.into_dyn(), &shape)
}

fn fused_forward(
    b: &dyn HostOps,
    f: &mut Fused,
    x: &ArrayD<f32>,
    training: bool,
) -> Result<ArrayD<f32>> {
    let act = f.act;
    match (&mut f.head, &mut f.bn) {
        (FusedHead::Conv1d(c), None) => conv_forward(b, c, x, act, 3),
        (FusedHead::Conv2d(c), None) => conv_forward(b, c, x, act, 4),
        (FusedHead::Conv1d(c), Some(bn)) => conv_bn_forward(b, c, bn, x, training, act, 3),
        (FusedHead::Conv2d(c), Some(bn)) => conv_bn_forward(b, c, bn, x, training, act, 4),
        (FusedHead::ConvTranspose2d(c), None) => conv_transpose_forward(b, c, x, act),
        (FusedHead::ConvTranspose2d(c), Some(bn)) => {
            if training {
                let y = conv_transpose_forward(b, c, x, Activation::None)?;
                bn_forward(b, bn, &y, true, act, 2)
            } else {
                let folded =
                    b.fold_conv_bn(&c.weight.clone().into_dyn(), c.bias.as_ref(), &bn.bn, true)?;
                let w = folded
                    .weight
                    .into_dimensionality::<Ix4>()
                    .map_err(|e| Error::invalid(format!("internal: {e}")))?;
                let x4 = to4(x, "ConvTranspose2d")?;
                Ok(
                    b.conv_transpose2d_act(&x4, &w, Some(&folded.bias), &c.params, act)?
                        .into_dyn(),
                )
            }
        }
        (FusedHead::Linear(l), None) => linear_forward(b, l, x, act),
        (FusedHead::Linear(l), Some(bn)) => {
            if x.ndim() != 2 {
                return Err(Error::invalid(format!(
                    "LinearBn1d expects a 2-D input (N, in_features), got shape {:?}",
                    x.shape()
                )));
            }
            if training {
                let y = linear_forward(b, l, x, Activation::None)?;
                bn_forward(b, bn, &y, true, act, 1)
            } else {
                let folded = b.fold_linear_bn(&l.weight, l.bias.as_ref(), &bn.bn)?;
                let w = folded
                    .weight
                    .into_dimensionality::<Ix2>()
                    .map_err(|e| Error::invalid(format!("internal: {e}")))?;
                linear_with(b, &w, Some(&folded.bias), x, act)
            }
        }
        (FusedHead::BatchNorm1d(bn), None) => bn_forward(b, bn, x, training, act, 1),
        (FusedHead::BatchNorm2d(bn), None) => bn_forward(b, bn, x, training, act, 2),
        (FusedHead::BatchNorm1d(_) | FusedHead::BatchNorm2d(_), Some(_)) => Err(Error::invalid(
            "a fused module with a BatchNorm head takes no second BatchNorm",
        )),
    }
}

/// Intrinsic `ConvBn{1,2}d` / `ConvBn*{1,2}d`: training: conv → BatchNorm with batch
/// statistics (running statistics updated) → act; eval: the fused eval path (BatchNorm folded
/// on the fly, one conv with bias and activation).
fn conv_bn_forward(
    b: &dyn HostOps,
    c: &ConvLayer,
    bn: &mut BatchNormLayer,
    x: &ArrayD<f32>,
    training: bool,
    act: Activation,
    rank: usize,
) -> Result<ArrayD<f32>> {
    if training {
        let y = conv_forward(b, c, x, Activation::None, rank)?;
        return bn_forward(b, bn, &y, true, act, rank - 2);
    }
    let what = check_conv_rank(c, rank)?;
    let conv = ops::Conv2d {
        weight: c.weight4()?,
        bias: c.bias.clone(),
        params: c.params2d(),
    };
    if rank == 3 {
        let (y, _) = b.conv_bn_act_eval(&from1d(x, what)?, &conv, &bn.bn, act)?;
        to1d(y)
    } else {
        let (y, _) = b.conv_bn_act_eval(&to4(x, what)?, &conv, &bn.bn, act)?;
        Ok(y.into_dyn())
    }
}

/// `torch.log_softmax(x, dim)`: `dim` moved last, the backend's `[M, C]` log_softmax, moved
/// back.
fn log_softmax(b: &dyn HostOps, x: &ArrayD<f32>, dim: isize) -> Result<ArrayD<f32>> {
    let r = x.ndim() as isize;
    let d = if dim < 0 { dim + r } else { dim };
    if r == 0 || d < 0 || d >= r {
        return Err(Error::invalid(format!(
            "LogSoftmax(dim={dim}) does not fit an input of shape {:?}",
            x.shape()
        )));
    }
    if x.is_empty() {
        return Ok(x.clone());
    }
    let d = d as usize;
    let mut perm: Vec<usize> = (0..x.ndim()).filter(|&i| i != d).collect();
    perm.push(d);
    let moved = x.view().permuted_axes(perm.clone());
    let moved_shape = moved.shape().to_vec();
    let c = x.shape()[d];
    let m = x.len() / c;
    let x2 = moved
        .as_standard_layout()
        .into_owned()
        .into_shape_with_order((m, c))
        .map_err(|e| Error::invalid(format!("internal reshape: {e}")))?;
    let y = reshape(&b.log_softmax(&x2)?.into_dyn(), &moved_shape)?;
    let mut inverse = vec![0; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inverse[p] = i;
    }
    Ok(y.permuted_axes(inverse).as_standard_layout().into_owned())
}

/// `torch.flatten(x, start_dim, end_dim)`.
fn flatten(x: &ArrayD<f32>, start_dim: isize, end_dim: isize) -> Result<ArrayD<f32>> {
    reshape(x, &ops::flatten_dims(x.shape(), start_dim, end_dim)?)
}
