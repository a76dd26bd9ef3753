//! The Mnist network of NNI's module-fusion example, as a [`crate::nn`] module tree, with
//! PyTorch's module names, so a PyTorch `Mnist().state_dict()` loads into it and NNI's
//! `config_list` applies to it unchanged:
//!
//! ```python
//! class Mnist(torch.nn.Module):
//!     def __init__(self):
//!         super().__init__()
//!         self.conv1 = torch.nn.Conv2d(1, 20, 5, 1)
//!         self.conv2 = torch.nn.Conv2d(20, 50, 5, 1)
//!         self.fc1 = torch.nn.Linear(4 * 4 * 50, 500)
//!         self.fc2 = torch.nn.Linear(500, 10)
//!         self.relu1 = torch.nn.ReLU6()
//!         self.relu2 = torch.nn.ReLU6()
//!         self.relu3 = torch.nn.ReLU6()
//!         self.max_pool1 = torch.nn.MaxPool2d(2, 2)
//!         self.max_pool2 = torch.nn.MaxPool2d(2, 2)
//!         self.batchnorm1 = torch.nn.BatchNorm2d(20)
//!
//!     def forward(self, x):
//!         x = self.relu1(self.batchnorm1(self.conv1(x)))
//!         x = self.max_pool1(x)
//!         x = self.relu2(self.conv2(x))
//!         x = self.max_pool2(x)
//!         x = x.view(-1, 4 * 4 * 50)
//!         x = self.relu3(self.fc1(x))
//!         x = self.fc2(x)
//!         return F.log_softmax(x, dim=1)
//! ```
//!
//! The ten modules are registered in that order (so [`crate::nn::Module::named_modules`] and
//! the state dict list them as PyTorch does); the forward is the container's straight-line
//! steps ([`Container::with_steps`]) in the order above, with `view(-1, 800)` (a flatten)
//! and `log_softmax(dim=1)` functional ops between the children, as in the Python; the host
//! forward and the device one ([`device_forward`]) run the same steps. Its straight-line chains are `conv1 … max_pool2` and `fc1, relu3, fc2`, where
//! [`crate::fuse::find_fusable`] finds `conv1, batchnorm1, relu1`, `conv2, relu2` and
//! `fc1, relu3`.
//!
//! NNI's example quantizes it with [`nni_example_config`] (fuse conv1 with batchnorm1; int8
//! affine on conv1's `_input_`, `weight` and `_output_`):
//!
//! ```
//! use qfuse::config::{self, QuantMode};
//! use qfuse::model::mnist;
//! use qfuse::CpuBackend;
//!
//! let mut model = mnist::mnist(0)?;
//! model.eval();
//! let x = mnist::synthetic_batch(4, 1).into_dyn();
//! let y_float = model.forward(&CpuBackend, &x)?;
//! config::apply(&mut model, &mnist::nni_example_config(), QuantMode::Ptq)?;
//! config::calibrate(&mut model, &CpuBackend, [&x])?;
//! let y_int8 = model.forward(&CpuBackend, &x)?;
//! assert_eq!(y_int8.shape(), &[4, 10]);
//! assert!(y_int8.iter().zip(&y_float).all(|(a, b)| (a - b).abs() < 0.1));
//! # Ok::<(), qfuse::Error>(())
//! ```

use ndarray::{Array1, Array2, Array4, ArrayD, Ix2, IxDyn};

use crate::backend::Backend;
use crate::config::ConfigList;
use crate::error::{Error, Result};
use crate::io::StateDict;
use crate::nn::{BatchNormLayer, Container, DeviceChain, ForwardStep, Layer, Module};
use crate::ops::{BatchNorm, Conv2dParams};

/// The input shape of one image: `[1, 28, 28]` (a batch is `[N, 1, 28, 28]`).
pub const INPUT_SHAPE: [usize; 3] = [1, 28, 28];

/// The module names, in PyTorch's registration (and `named_modules`) order.
pub const MODULE_NAMES: [&str; 10] = [
    "conv1",
    "conv2",
    "fc1",
    "fc2",
    "relu1",
    "relu2",
    "relu3",
    "max_pool1",
    "max_pool2",
    "batchnorm1",
];

/// The forward's first straight-line chain (before `view(-1, 800)`).
const CHAIN_CONV: [&str; 7] = [
    "conv1",
    "batchnorm1",
    "relu1",
    "max_pool1",
    "conv2",
    "relu2",
    "max_pool2",
];
/// The forward's second chain (after the view, before `log_softmax`).
const CHAIN_FC: [&str; 3] = ["fc1", "relu3", "fc2"];

/// Features after the conv part (`4 * 4 * 50`).
const FLAT: usize = 800;

/// SplitMix64: a small seeded generator (not PyTorch's stream: the values differ from
/// `torch.manual_seed`, the distributions are the same).
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in `[-bound, bound)`.
    fn symmetric(&mut self, bound: f32) -> f32 {
        (self.unit() * 2.0 - 1.0) * bound
    }
}

/// The network built from its ten modules (checked by the constructors).
fn assemble(
    conv1: Module,
    conv2: Module,
    fc1: Module,
    fc2: Module,
    batchnorm1: Module,
) -> Result<Module> {
    let c = Container::new("Mnist")
        .with_child("conv1", conv1)?
        .with_child("conv2", conv2)?
        .with_child("fc1", fc1)?
        .with_child("fc2", fc2)?
        .with_child("relu1", Module::relu6())?
        .with_child("relu2", Module::relu6())?
        .with_child("relu3", Module::relu6())?
        .with_child("max_pool1", Module::max_pool2d(2, 2)?)?
        .with_child("max_pool2", Module::max_pool2d(2, 2)?)?
        .with_child("batchnorm1", batchnorm1)?
        .with_steps(forward_steps())?;
    Ok(Module::container(c))
}

/// The forward as [`ForwardStep`]s: the conv chain, `x.view(-1, 4 * 4 * 50)` (a flatten
/// from dim 1: the same for `[N, 50, 4, 4]`, and for any other shape an error where the view
/// might regroup rows), the fc chain, `F.log_softmax(x, dim=1)`.
fn forward_steps() -> Vec<ForwardStep> {
    let mut steps: Vec<ForwardStep> = CHAIN_CONV.iter().map(|&n| ForwardStep::child(n)).collect();
    steps.push(ForwardStep::op(Module::flatten(1, -1)));
    steps.extend(CHAIN_FC.iter().map(|&n| ForwardStep::child(n)));
    steps.push(ForwardStep::op(Module::log_softmax(1)));
    steps
}

/// The eval forward of a Mnist network built by [`mnist`] (float, or after
/// `fuse_modules`, with or without the fake-quant targets of [`crate::config::apply`]),
/// prepared on `backend`: its parameters placed there once, the forward on the backend's
/// tensors ([`DeviceChain::from_module`]). On the GPU one forward is one upload (the batch)
/// and one download (the log-probabilities).
///
/// Errors: those of [`DeviceChain::from_module`].
pub fn device_forward<B: Backend>(model: &Module, backend: B) -> Result<DeviceChain<B>> {
    DeviceChain::from_module(model, backend)
}

/// PyTorch's default `Conv2d` / `Linear` initialisation: `kaiming_uniform_(a=sqrt(5))` for
/// the weight, which is uniform in `±1/sqrt(fan_in)`, and the bias uniform in
/// `±1/sqrt(fan_in)`.
fn default_init(rng: &mut Rng, shape: &[usize]) -> (ArrayD<f32>, Array1<f32>) {
    let fan_in: usize = shape[1..].iter().product();
    let bound = 1.0 / (fan_in as f32).sqrt();
    let w = ArrayD::from_shape_simple_fn(IxDyn(shape), || rng.symmetric(bound));
    let b = Array1::from_shape_simple_fn(shape[0], || rng.symmetric(bound));
    (w, b)
}

/// The Mnist network with PyTorch's default initialisation, seeded by `seed`: convs and
/// linears uniform in `±1/sqrt(fan_in)` (weight and bias, as `kaiming_uniform_(a=sqrt(5))`
/// and PyTorch's bias init), batchnorm1 at γ = 1, β = 0, running mean 0, running variance 1.
/// The same seed gives the same weights; the values are not those of `torch.manual_seed`.
///
/// In training mode, as every new module; call `eval()` for inference.
///
/// Errors: none in practice (the shapes are fixed); typed errors from the constructors.
pub fn mnist(seed: u64) -> Result<Module> {
    let mut rng = Rng::new(seed);
    let conv = |rng: &mut Rng, o: usize, i: usize| -> Result<Module> {
        let (w, b) = default_init(rng, &[o, i, 5, 5]);
        let w = into4(w)?;
        Module::conv2d(w, Some(b), Conv2dParams::default())
    };
    let linear = |rng: &mut Rng, o: usize, i: usize| -> Result<Module> {
        let (w, b) = default_init(rng, &[o, i]);
        let w = w
            .into_dimensionality::<Ix2>()
            .map_err(|e| Error::invalid(format!("internal: {e}")))?;
        Module::linear(w, Some(b))
    };
    let conv1 = conv(&mut rng, 20, 1)?;
    let conv2 = conv(&mut rng, 50, 20)?;
    let fc1 = linear(&mut rng, 500, FLAT)?;
    let fc2 = linear(&mut rng, 10, 500)?;
    let bn = Module::new(Layer::BatchNorm2d(BatchNormLayer::with_features(20)));
    assemble(conv1, conv2, fc1, fc2, bn)
}

fn into4(w: ArrayD<f32>) -> Result<Array4<f32>> {
    w.into_dimensionality::<ndarray::Ix4>()
        .map_err(|e| Error::invalid(format!("internal: {e}")))
}

/// Reads `{prefix}{name}` as an f32 tensor of shape `shape`; a missing tensor's error says
/// which names in the file end in `name` (a prefix to strip).
fn tensor(sd: &StateDict, prefix: &str, name: &str, shape: &[usize]) -> Result<ArrayD<f32>> {
    let key = format!("{prefix}{name}");
    if !sd.contains(&key) {
        // Prefixes under which the file has the whole network, else names ending in `name`.
        let prefixes: Vec<&str> = sd
            .names()
            .into_iter()
            .filter_map(|n| n.strip_suffix(name))
            .filter(|p| {
                ["conv1.weight", "fc2.bias", "batchnorm1.running_var"]
                    .iter()
                    .all(|k| sd.contains(&format!("{p}{k}")))
            })
            .collect();
        let similar: Vec<String> = sd
            .names()
            .into_iter()
            .filter(|n| n.ends_with(name))
            .take(3)
            .map(|n| format!("`{}`", crate::io::text::escape(n)))
            .collect();
        let context = match (prefixes.first(), similar.is_empty()) {
            (Some(p), _) => format!(
                " in the Mnist state dict (the file has the network under the prefix `{}`)",
                crate::io::text::escape(p)
            ),
            (None, false) => format!(
                " in the Mnist state dict (the file has {})",
                similar.join(", ")
            ),
            (None, true) => " in the Mnist state dict".to_string(),
        };
        return Err(Error::MissingTensor { name: key, context });
    }
    let a = sd.f32(&key)?;
    if a.shape() != shape {
        return Err(Error::shape(key, shape, a.shape()));
    }
    Ok(a.clone())
}

/// The Mnist network from a PyTorch state dict (`Mnist().state_dict()` saved with
/// `safetensors.torch.save_file`), its keys prefixed by `prefix` (`""` for a plain state dict;
/// `"in.model."` for the golden `model_mnist_ptq` case): `conv1.weight`, `conv1.bias`, …,
/// `batchnorm1.running_var`, with PyTorch's shapes. Loading is strict, as
/// `load_state_dict(strict=True)`: every tensor must be there with its shape, and a tensor
/// under `prefix` that the network does not have is an error (`batchnorm1.num_batches_tracked`
/// is read when present). BatchNorm eps and momentum are PyTorch's defaults (1e-5, 0.1).
///
/// In training mode, as every new module; call `eval()` for inference.
///
/// Errors: [`Error::MissingTensor`] (naming tensors of the file that end in the missing name,
/// and the prefix they suggest), [`Error::ShapeMismatch`], [`Error::DtypeMismatch`] (a tensor
/// that is not f32), [`Error::InvalidArgument`] for unexpected tensors under `prefix`.
pub fn mnist_from_state_dict(sd: &StateDict, prefix: &str) -> Result<Module> {
    let t = |name: &str, shape: &[usize]| tensor(sd, prefix, name, shape);
    let vec1 = |name: &str, n: usize| -> Result<Array1<f32>> {
        t(name, &[n])?
            .into_dimensionality::<ndarray::Ix1>()
            .map_err(|e| Error::invalid(format!("internal: {e}")))
    };
    let conv = |name: &str, o: usize, i: usize| -> Result<Module> {
        let w = into4(t(&format!("{name}.weight"), &[o, i, 5, 5])?)?;
        let b = vec1(&format!("{name}.bias"), o)?;
        Module::conv2d(w, Some(b), Conv2dParams::default())
    };
    let linear = |name: &str, o: usize, i: usize| -> Result<Module> {
        let w = t(&format!("{name}.weight"), &[o, i])?
            .into_dimensionality::<Ix2>()
            .map_err(|e| Error::invalid(format!("internal: {e}")))?;
        let b = vec1(&format!("{name}.bias"), o)?;
        Module::linear(w, Some(b))
    };
    let conv1 = conv("conv1", 20, 1)?;
    let conv2 = conv("conv2", 50, 20)?;
    let fc1 = linear("fc1", 500, FLAT)?;
    let fc2 = linear("fc2", 10, 500)?;
    let mut bn = BatchNormLayer::new(BatchNorm {
        weight: Some(vec1("batchnorm1.weight", 20)?),
        bias: Some(vec1("batchnorm1.bias", 20)?),
        running_mean: vec1("batchnorm1.running_mean", 20)?,
        running_var: vec1("batchnorm1.running_var", 20)?,
        eps: 1e-5,
        momentum: 0.1,
    })?;
    let tracked = format!("{prefix}batchnorm1.num_batches_tracked");
    if let Some(raw) = sd.raw.get(&tracked) {
        if raw.shape().is_empty() && raw.data().len() == 8 {
            let mut b = [0u8; 8];
            b.copy_from_slice(raw.data());
            bn.num_batches_tracked = i64::from_le_bytes(b).max(0) as u64;
        }
    }
    let known = [
        "conv1.weight",
        "conv1.bias",
        "conv2.weight",
        "conv2.bias",
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
        "batchnorm1.weight",
        "batchnorm1.bias",
        "batchnorm1.running_mean",
        "batchnorm1.running_var",
        "batchnorm1.num_batches_tracked",
    ];
    let unexpected: Vec<&str> = sd
        .names()
        .into_iter()
        .filter(|n| n.starts_with(prefix) && !known.contains(&&n[prefix.len()..]))
        .collect();
    if !unexpected.is_empty() {
        const SHOWN: usize = 8;
        let mut list = unexpected[..unexpected.len().min(SHOWN)]
            .iter()
            .map(|n| format!("`{}`", crate::io::text::escape(n)))
            .collect::<Vec<_>>()
            .join(", ");
        if unexpected.len() > SHOWN {
            list.push_str(&format!(" (and {} more)", unexpected.len() - SHOWN));
        }
        return Err(Error::invalid(format!(
            "unexpected tensors for the Mnist network under prefix `{}`: {list} (is the \
             prefix right?)",
            crate::io::text::escape(prefix)
        )));
    }
    assemble(conv1, conv2, fc1, fc2, Module::new(Layer::BatchNorm2d(bn)))
}

/// The Mnist network back from a [`crate::deploy::Net`] of its shape (as [`deploy_net`]
/// builds and [`crate::train::GpuTrainer::to_net`] returns after training): `conv1` with
/// `batchnorm1` attached, `conv2`, `fc1`, `fc2`, with their parameters and the BatchNorm's
/// statistics, eps and momentum, as a module tree in training mode (call `eval()`), ready for
/// NNI's `config_list` and fusion.
///
/// Errors: [`Error::InvalidArgument`] naming the node that is missing or does not have the
/// Mnist network's kind, shapes or activation.
pub fn mnist_from_net(net: &crate::deploy::Net) -> Result<Module> {
    use crate::deploy::NodeOp;
    use crate::ops::Activation;
    let node = |name: &str| {
        net.nodes()
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| Error::invalid(format!("mnist_from_net: the net has no node `{name}`")))
    };
    let conv =
        |name: &str, o: usize, i: usize, want_bn: bool| -> Result<(Module, Option<BatchNorm>)> {
            match &node(name)?.op {
                NodeOp::Conv { conv, bn, act }
                    if conv.weight.shape() == [o, i, 5, 5]
                        && conv.params == Conv2dParams::default()
                        && *act == Activation::Relu6
                        && bn.is_some() == want_bn =>
                {
                    Ok((
                        Module::conv2d(conv.weight.clone(), conv.bias.clone(), conv.params)?,
                        bn.clone(),
                    ))
                }
                _ => Err(Error::invalid(format!(
                    "mnist_from_net: `{name}` is not the Mnist network's conv ({o}×{i}×5×5, \
                 ReLU6{})",
                    if want_bn { ", with BatchNorm" } else { "" }
                ))),
            }
        };
    let linear = |name: &str, o: usize, i: usize, act: Activation| -> Result<Module> {
        match &node(name)?.op {
            NodeOp::Linear {
                weight,
                bias,
                act: a,
            } if weight.shape() == [o, i] && *a == act => {
                Module::linear(weight.clone(), bias.clone())
            }
            _ => Err(Error::invalid(format!(
                "mnist_from_net: `{name}` is not the Mnist network's linear ({o}×{i}, {act:?})"
            ))),
        }
    };
    let (conv1, bn) = conv("conv1", 20, 1, true)?;
    let bn = bn.ok_or_else(|| Error::invalid("mnist_from_net: `conv1` has no BatchNorm"))?;
    let (conv2, _) = conv("conv2", 50, 20, false)?;
    let fc1 = linear("fc1", 500, FLAT, Activation::Relu6)?;
    let fc2 = linear("fc2", 10, 500, Activation::None)?;
    let batchnorm1 = Module::new(Layer::BatchNorm2d(BatchNormLayer::new(bn)?));
    assemble(conv1, conv2, fc1, fc2, batchnorm1)
}

/// The `config_list` of NNI's module-fusion example: fuse `conv1` with `batchnorm1`, then
/// int8 affine, per tensor, on conv1's `_input_`, `weight` and `_output_`.
pub fn nni_example_config() -> ConfigList {
    ConfigList(vec![crate::config::QuantConfig {
        op_names: vec!["conv1".into()],
        op_types: Vec::new(),
        exclude_op_names: Vec::new(),
        exclude_op_types: Vec::new(),
        target_names: vec!["_input_".into(), "weight".into(), "_output_".into()],
        quant_dtype: "int8".into(),
        quant_scheme: "affine".into(),
        granularity: "default".into(),
        fuse_names: vec![vec!["conv1".into(), "batchnorm1".into()]],
    }])
}

/// A seeded batch of `n` synthetic MNIST-like digits `[n, 1, 28, 28]`, for demos and tests
/// where the MNIST dataset cannot be downloaded: each image has two to four pen strokes
/// (quadratic Bézier curves with soft, about 2-pixel-wide edges, intensity in `[0, 1]`)
/// inside the central 20×20 box on a black background, normalised as the NNI example's
/// `transforms.Normalize((0.1307,), (0.3081,))` does, so values lie in `[-0.4242, 2.8215]`
/// like real MNIST inputs. They are not digits: use them for numerical comparisons (float
/// against fused against quantized), not for accuracy.
pub fn synthetic_batch(n: usize, seed: u64) -> Array4<f32> {
    const MEAN: f32 = 0.1307;
    const STD: f32 = 0.3081;
    let mut rng = Rng::new(seed ^ 0xA5A5_0000_0000_0001);
    let mut out = Array4::<f32>::zeros([n, 1, 28, 28]);
    for i in 0..n {
        let mut img = Array2::<f32>::zeros((28, 28));
        let strokes = 2 + (rng.next_u64() % 3) as usize;
        let mut pt = || (4.0 + rng.unit() * 20.0, 4.0 + rng.unit() * 20.0);
        let mut prev = pt();
        for _ in 0..strokes {
            let (p0, p1, p2) = (prev, pt(), pt());
            prev = p2;
            for s in 0..=40 {
                let t = s as f32 / 40.0;
                let u = 1.0 - t;
                let y = u * u * p0.0 + 2.0 * u * t * p1.0 + t * t * p2.0;
                let x = u * u * p0.1 + 2.0 * u * t * p1.1 + t * t * p2.1;
                let (r0, c0) = (y.floor() as i64, x.floor() as i64);
                for r in (r0 - 2).max(0)..=(r0 + 3).min(27) {
                    for c in (c0 - 2).max(0)..=(c0 + 3).min(27) {
                        let d2 = (r as f32 - y).powi(2) + (c as f32 - x).powi(2);
                        let v = (-d2 / 1.2).exp();
                        let px = &mut img[[r as usize, c as usize]];
                        *px = px.max(v);
                    }
                }
            }
        }
        for ((r, c), v) in img.indexed_iter() {
            // 8-bit pixels, as MNIST's, then ToTensor and Normalize.
            let byte = (v.clamp(0.0, 1.0) * 255.0).round();
            out[[i, 0, r, c]] = (byte / 255.0 - MEAN) / STD;
        }
    }
    out
}

/// The Mnist network as a [`crate::deploy::Net`] for integer deployment: `conv1` (with
/// `batchnorm1` and `relu1` attached), `max_pool1`, `conv2` + `relu2`, `max_pool2`, the
/// `view(-1, 800)` as a flatten named `view`, `fc1` + `relu3`, `fc2`. The final
/// `log_softmax` stays in float on the dequantized output. Works on the unfused model (BN
/// kept, folded by [`crate::deploy::convert`]) and on one fused by
/// [`crate::fuse::fuse_modules`] (fused modules, `Identity` in place of BN and activations).
///
/// Errors: [`Error::UnknownModule`] when a module of the network is missing, and
/// [`crate::deploy::Net::layer`]'s errors for a module with no integer form.
pub fn deploy_net(model: &Module) -> Result<crate::deploy::Net> {
    let mut net = crate::deploy::Net::new();
    let mut v = net.input();
    for name in CHAIN_CONV {
        v = net.module(model, name, v)?;
    }
    v = net.flatten("view", v)?;
    for name in CHAIN_FC {
        v = net.module(model, name, v)?;
    }
    net.set_output(v)?;
    Ok(net)
}

/// Gives `batchnorm1` the statistics a trained network would have: running mean and variance
/// of `conv1`'s output on `x` (so BN normalizes), γ in `[0.5, 1.5)` and β in `[-0.25, 0.25)`
/// drawn from `seed`. A freshly built BN (mean 0, variance 1, γ 1, β 0) folds into almost
/// nothing; this makes folding matter, as it does in a trained model.
///
/// Errors: a model without `conv1` / `batchnorm1` of the Mnist shapes, or an input that is
/// not `[N, 1, 28, 28]`.
pub fn set_trained_bn_stats(model: &mut Module, x: &Array4<f32>, seed: u64) -> Result<()> {
    let Layer::Conv2d(conv1) = model.get("conv1")?.layer() else {
        return Err(Error::invalid("`conv1` must be an unfused Conv2d"));
    };
    let w = into4(conv1.weight.clone())?;
    let y = crate::reference::conv2d::conv2d(x, &w, conv1.bias.as_ref(), &conv1.params)?;
    let c = y.shape()[1];
    let count = (y.len() / c) as f32;
    let mut rng = Rng::new(seed ^ 0xB0B0);
    let mut mean = Array1::<f32>::zeros(c);
    let mut var = Array1::<f32>::zeros(c);
    for ch in 0..c {
        let plane = y.index_axis(ndarray::Axis(1), ch);
        let m = plane.sum() / count;
        let v = plane.iter().map(|&a| (a - m) * (a - m)).sum::<f32>() / (count - 1.0).max(1.0);
        mean[ch] = m;
        var[ch] = v;
    }
    let Layer::BatchNorm2d(bn) = model.get_mut("batchnorm1")?.layer_mut() else {
        return Err(Error::invalid(
            "`batchnorm1` must be an unfused BatchNorm2d",
        ));
    };
    if bn.num_features() != c {
        return Err(Error::ChannelMismatch {
            layer: "conv1".into(),
            layer_channels: c,
            bn_channels: bn.num_features(),
        });
    }
    bn.bn.running_mean = mean;
    bn.bn.running_var = var;
    bn.bn.weight = Some(Array1::from_shape_simple_fn(c, || 0.5 + rng.unit()));
    bn.bn.bias = Some(Array1::from_shape_simple_fn(c, || rng.symmetric(0.25)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuBackend;

    #[test]
    fn names_and_shapes() {
        let mut m = mnist(3).unwrap();
        let names: Vec<String> = m.named_modules().into_iter().map(|(p, _)| p).collect();
        assert_eq!(names[1..], MODULE_NAMES.map(String::from));
        assert_eq!(m.kind_name(), "Mnist");
        assert_eq!(m.get("relu1").unwrap().kind_name(), "ReLU6");
        assert_eq!(
            crate::fuse::find_fusable(&m),
            vec![
                vec!["conv1", "batchnorm1", "relu1"],
                vec!["conv2", "relu2"],
                vec!["fc1", "relu3"]
            ]
        );
        m.eval();
        let x = synthetic_batch(3, 7).into_dyn();
        let y = m.forward(&CpuBackend, &x).unwrap();
        assert_eq!(y.shape(), &[3, 10]);
        for row in y.rows() {
            let p: f32 = row.iter().map(|v| v.exp()).sum();
            assert!((p - 1.0).abs() < 1e-5);
        }
        let bad = ArrayD::zeros(IxDyn(&[2, 1, 27, 28]));
        assert!(matches!(
            m.forward(&CpuBackend, &bad),
            Err(Error::ShapeMismatch { .. })
        ));
    }

    #[test]
    fn from_net_round_trips_and_refuses_other_nets() {
        let mut m = mnist(3).unwrap();
        let x = synthetic_batch(2, 4);
        set_trained_bn_stats(&mut m, &x, 5).unwrap();
        m.eval();
        let net = deploy_net(&m).unwrap();
        let mut back = mnist_from_net(&net).unwrap();
        back.eval();
        let x = x.into_dyn();
        assert_eq!(
            back.forward(&CpuBackend, &x).unwrap(),
            m.forward(&CpuBackend, &x).unwrap()
        );
        assert_eq!(back.state_dict_keys(), m.state_dict_keys());
        let mut other = crate::deploy::Net::new();
        let v = other.input();
        let v = other.flatten("view", v).unwrap();
        other.set_output(v).unwrap();
        let e = mnist_from_net(&other).unwrap_err().to_string();
        assert!(e.contains("no node `conv1`"), "{e}");
    }

    #[test]
    fn seeded() {
        let w = |s| match mnist(s).unwrap().get("fc1").unwrap().layer() {
            Layer::Linear(l) => l.weight.clone(),
            _ => unreachable!(),
        };
        assert_eq!(w(1), w(1));
        assert_ne!(w(1), w(2));
        let a = w(1);
        let bound = 1.0 / (800f32).sqrt();
        assert!(a.iter().all(|v| v.abs() <= bound));
        let mean = a.mean().unwrap();
        assert!(mean.abs() < 1e-3, "{mean}");
        assert_eq!(synthetic_batch(2, 5), synthetic_batch(2, 5));
        let x = synthetic_batch(16, 5);
        let lo = (0.0 - 0.1307) / 0.3081;
        let hi = (1.0 - 0.1307) / 0.3081;
        assert!(x.iter().all(|&v| v >= lo - 1e-6 && v <= hi + 1e-6));
        let ink = x.iter().filter(|&&v| v > 0.0).count() as f32 / x.len() as f32;
        assert!((0.05..0.4).contains(&ink), "{ink}");
    }
}
