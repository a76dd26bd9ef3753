//! A ResNet basic block (`torchvision.models.resnet.BasicBlock`, identity shortcut) as a
//! [`Net`] for integer deployment: `conv1` (3×3) + `bn1` + ReLU, `conv2` (3×3) + `bn2`,
//! `add` of the block's input, ReLU. Seeded weights (PyTorch's default conv init bound) and
//! BN statistics like a trained network's. [`basic_block_module`] is the same block as a
//! module tree (a container whose forward is declared with
//! [`crate::nn::Container::with_steps`], the residual add a [`ForwardStep::Add`]).

use ndarray::{Array1, Array4};

use crate::deploy::Net;
use crate::error::Result;
use crate::nn::{Container, ForwardStep, Module};
use crate::ops::{Activation, BatchNorm, Conv2d, Conv2dParams};

/// A small SplitMix64 stream for seeded parameters.
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
    }
    fn symmetric(&mut self, bound: f32) -> f32 {
        (self.unit() * 2.0 - 1.0) * bound
    }
}

fn conv3x3(rng: &mut Rng, c: usize) -> Conv2d {
    let bound = 1.0 / ((c * 9) as f32).sqrt();
    Conv2d {
        weight: Array4::from_shape_simple_fn((c, c, 3, 3), || rng.symmetric(bound)),
        bias: None,
        params: Conv2dParams {
            padding: [1, 1],
            ..Default::default()
        },
    }
}

fn trained_bn(rng: &mut Rng, c: usize, scale: f32) -> BatchNorm {
    BatchNorm {
        weight: Some(Array1::from_shape_simple_fn(c, || 0.5 + rng.unit())),
        bias: Some(Array1::from_shape_simple_fn(c, || rng.symmetric(0.3))),
        running_mean: Array1::from_shape_simple_fn(c, || rng.symmetric(0.2 * scale)),
        running_var: Array1::from_shape_simple_fn(c, || (0.3 + rng.unit()) * scale * scale),
        eps: 1e-5,
        momentum: 0.1,
    }
}

/// The basic block with `channels` channels in and out, parameters drawn from `seed`.
///
/// Errors: none for `channels >= 1` (the builder's checks cannot fail on these shapes);
/// `channels == 0` is [`crate::Error::InvalidArgument`].
pub fn basic_block(channels: usize, seed: u64) -> Result<Net> {
    if channels == 0 {
        return Err(crate::Error::invalid(
            "a basic block needs at least one channel",
        ));
    }
    let mut rng = Rng(seed ^ 0x7E57_B10C);
    // Conv outputs of unit-variance inputs have a standard deviation near 1/sqrt(3) with this
    // init; BN statistics of that size make BN normalize, as after training.
    let s = 0.58;
    let mut net = Net::new();
    let x = net.input();
    let h = net.conv("conv1", conv3x3(&mut rng, channels), x)?;
    net.batch_norm(h, trained_bn(&mut rng, channels, s))?;
    net.activation(h, Activation::Relu)?;
    let h2 = net.conv("conv2", conv3x3(&mut rng, channels), h)?;
    net.batch_norm(h2, trained_bn(&mut rng, channels, s))?;
    let y = net.add("add", h2, x)?;
    net.activation(y, Activation::Relu)?;
    net.set_output(y)?;
    Ok(net)
}

/// [`basic_block`] as a module tree (the same parameters for the same seed), in eval mode:
/// a `BasicBlock` container with children `conv1`, `bn1`, `conv2`, `bn2` and the forward
/// `relu(bn2(conv2(relu(bn1(conv1(x))))) + x)` declared as steps (the ReLUs functional ops,
/// the add [`ForwardStep::Add`]`(0)`). Fusion finds `conv1`+`bn1` and `conv2`+`bn2`;
/// [`crate::nn::DeviceChain::from_module`] runs it on a backend's tensors, and
/// [`Net::from_module`] turns it back into [`basic_block`]'s graph.
///
/// Errors: as [`basic_block`].
pub fn basic_block_module(channels: usize, seed: u64) -> Result<Module> {
    let net = basic_block(channels, seed)?;
    let nodes = net.nodes();
    let conv = |i: usize| -> Result<(Module, Module)> {
        match &nodes[i].op {
            crate::deploy::NodeOp::Conv {
                conv, bn: Some(bn), ..
            } => Ok((
                Module::conv2d(conv.weight.clone(), conv.bias.clone(), conv.params)?,
                Module::batch_norm2d(bn.clone())?,
            )),
            _ => Err(crate::Error::invalid("internal: basic block layout")),
        }
    };
    let (conv1, bn1) = conv(0)?;
    let (conv2, bn2) = conv(1)?;
    let c = Container::new("BasicBlock")
        .with_child("conv1", conv1)?
        .with_child("bn1", bn1)?
        .with_child("conv2", conv2)?
        .with_child("bn2", bn2)?
        .with_steps([
            ForwardStep::child("conv1"),
            ForwardStep::child("bn1"),
            ForwardStep::op(Module::relu()),
            ForwardStep::child("conv2"),
            ForwardStep::child("bn2"),
            ForwardStep::Add(0),
            ForwardStep::op(Module::relu()),
        ])?;
    let mut m = Module::container(c);
    m.eval();
    Ok(m)
}

/// A seeded input batch `[n, channels, size, size]`: the post-ReLU activations a block inside
/// a network sees (non-negative, mean near 0.5).
pub fn synthetic_input(n: usize, channels: usize, size: usize, seed: u64) -> Array4<f32> {
    let mut rng = Rng(seed ^ 0x1A9E);
    Array4::from_shape_simple_fn((n, channels, size, size), || {
        let v = rng.symmetric(1.0) + 0.3;
        v.max(0.0) * 1.5
    })
}
