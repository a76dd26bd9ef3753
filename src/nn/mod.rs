//! A module tree mirroring `torch.nn`: layers, containers with dotted paths, train/eval,
//! forward hooks, fused modules, and a forward on any [`crate::HostOps`].
//!
//! # Types
//! * [`Module`]: one node: a [`Layer`] (what it is), a `training` flag, forward hooks.
//!   `Clone` is a deep copy.
//! * [`Layer`]: the kinds, each a `torch.nn` type: `Conv1d`, `Conv2d`, `ConvTranspose2d`
//!   ([`ConvLayer`], [`ConvTransposeLayer`]), `Linear` ([`LinearLayer`]), `BatchNorm1d`,
//!   `BatchNorm2d` ([`BatchNormLayer`]), `ReLU`, `ReLU6`, `LeakyReLU`, `Hardswish`,
//!   `Identity`, `MaxPool2d`, `Flatten`, `LogSoftmax`, containers ([`Container`]:
//!   `Sequential` and user containers), fused modules ([`Fused`]) and caller-defined kinds ([`CustomLayer`]).
//!   Parameters are public `ndarray` fields (weights in PyTorch's layouts, so a state dict
//!   maps onto them one to one).
//! * [`Module::kind_name`] gives PyTorch's type name (`Conv2d`, `BatchNorm2d`, `ConvReLU2d`,
//!   the container's declared name, ...), for messages, fuser patterns and NNI's `op_types`.
//!
//! # Building a model
//! Leaves come from [`Module`]'s constructors (weights in, as PyTorch's layouts); containers
//! from [`Module::sequential`] (children `"0"`, `"1"`, …) or [`Container`] (named children,
//! a declared forward order, optionally a custom forward closure for residual connections):
//!
//! ```
//! use ndarray::{Array1, Array4, ArrayD, IxDyn};
//! use qfuse::nn::{Container, Module};
//! use qfuse::ops::{BatchNorm, Conv2dParams};
//! use qfuse::CpuBackend;
//!
//! let bn = |c: usize| BatchNorm {
//!     weight: Some(Array1::ones(c)),
//!     bias: Some(Array1::zeros(c)),
//!     running_mean: Array1::zeros(c),
//!     running_var: Array1::ones(c),
//!     eps: 1e-5,
//!     momentum: 0.1,
//! };
//! let same = Conv2dParams { padding: [1, 1], ..Default::default() };
//! let block = Container::new("Block")
//!     .with_child("conv1", Module::conv2d(Array4::from_elem([4, 4, 3, 3], 0.01), None, same)?)?
//!     .with_child("bn1", Module::batch_norm2d(bn(4))?)?
//!     .with_child("relu", Module::relu())?;
//! let mut model = Module::sequential([
//!     Module::conv2d(Array4::from_elem([4, 3, 1, 1], 0.1), Some(Array1::zeros(4)), Conv2dParams::default())?,
//!     Module::container(block),
//! ]);
//! model.eval();
//!
//! // Dotted paths, PyTorch's named_modules() order.
//! let paths: Vec<String> = model.named_modules().into_iter().map(|(p, _)| p).collect();
//! assert_eq!(paths, ["", "0", "1", "1.conv1", "1.bn1", "1.relu"]);
//! assert_eq!(model.get("1.bn1")?.kind_name(), "BatchNorm2d");
//!
//! // Forward on any backend (host arrays in and out).
//! let x = ArrayD::from_elem(IxDyn(&[2, 3, 8, 8]), 1.0f32);
//! let y = model.forward(&CpuBackend, &x)?;
//! assert_eq!(y.shape(), &[2, 4, 8, 8]);
//! # Ok::<(), qfuse::Error>(())
//! ```
//!
//! # Walking and replacing modules
//! * [`Module::named_modules`] (pre-order, this module first with path `""`, children in
//!   registration order) and [`Module::named_children`];
//! * [`Module::get`] / [`Module::get_mut`] by dotted path (`"layer1.0.conv1"`; a `Sequential`
//!   child is addressed by its index, `"features.3"`); an unknown path is
//!   [`crate::Error::UnknownModule`] naming the closest existing paths;
//! * [`Module::replace`] puts a module at a path (same name and place) and returns the old
//!   one; [`Module::visit_mut`] visits every module mutably, with its path;
//! * [`Module::layer`] / [`Module::layer_mut`] to read or edit what a module is.
//!
//! # Train / eval
//! Every module has its own `training` flag (new modules train, as in PyTorch).
//! [`Module::train`] / [`Module::eval`] set it on the module and all its descendants;
//! [`Module::set_training`] on the module alone. In training mode a BatchNorm normalizes with
//! batch statistics and updates its running statistics; in eval mode it uses them.
//!
//! # Containers and their forward order
//! A container's forward runs its children one after the other in its *declared forward
//! order* (by default the registration order; [`Container::with_order`] declares another),
//! each output feeding the next. A custom forward ([`Container::with_forward`]) replaces that
//! with a closure that runs children by name ([`Scope::call`]), and declares the
//! straight-line chains it contains, which is where [`crate::fuse::find_fusable`] looks for
//! fusable patterns.
//!
//! # Hooks
//! [`Module::register_forward_pre_hook`] (called with `(path, input)`) and
//! [`Module::register_forward_hook`] (`(path, input, output)`) return a [`HookHandle`];
//! `handle.remove(&mut root)` (or [`Module::remove_hook`]) removes the hook. A hook that
//! returns `Some` replaces the input (pre) or output (post), as in PyTorch. The path is the
//! module's dotted path relative to the module whose `forward` was called.
//!
//! # Fused modules
//! [`Fused`] is one module kind for every fused pattern: a head layer (conv, transposed conv,
//! linear or BatchNorm), an optional unfolded BatchNorm (kept by QAT fusion; `None` once
//! folded) and an [`crate::ops::Activation`]. See [`Fused`] for the forms, the forward, and
//! the kind names; [`crate::fuse`] builds them.
//!
//! # Quantization targets
//! A module can carry [`QuantTargets`]: fake quantization (with min/max observers) of its
//! input, weight, bias and output, applied inside its forward as
//! `FQ(output)(op(FQ(input)(x), FQ(weight)(W), FQ(bias)(b)))`
//! ([`Module::set_quant_targets`]; [`crate::config::apply`] attaches them from an NNI-style
//! config). See [`QuantTargets`].
//!
//! # On a device
//! [`Module::forward`] takes and returns host arrays (each op a round trip through the
//! backend). [`DeviceChain::from_module`] prepares a tree's eval forward on a backend
//! instead — parameters and fake-quant state placed once, sequential containers and
//! [`Container::with_steps`] forwards walked — so a forward is one upload and one download,
//! and calibration ([`DeviceChain::forward_mut`], [`crate::config::calibrate`]) updates the
//! observers on the device.
//!
//! # QAT modules and state dicts
//! [`crate::qat::prepare_qat`] turns fused and plain conv / linear modules into QAT modules
//! ([`Layer::Qat`]). [`Module::state_dict`] / [`Module::load_state_dict`] read and write
//! every parameter and buffer by PyTorch's dotted names (fused modules as PyTorch's
//! `Sequential`s: `conv1.0.weight`; QAT modules as `torch.ao`'s: `conv1.bn.running_mean`,
//! `conv1.weight_fake_quant.scale`), with `num_batches_tracked` as int64.
//!
//! # Differences from PyTorch
//! * Fused modules are leaves: `named_modules` does not list their parts (PyTorch's
//!   `_FusedModule` is a `Sequential` with children `0`, `1`, `2`).
//! * Conv padding is zeros only; `MaxPool2d` has no padding or dilation; `BatchNorm` always
//!   tracks running statistics, with a fixed momentum.
//! * Hook handles take the tree to remove from (`handle.remove(&mut model)`), and keep
//!   working after fusion moves their hook.

mod container;
mod device;
pub(crate) mod fake_quantize;
mod forward;
mod fused;
mod hooks;
mod layer;
mod module;
mod path;
pub(crate) mod qat_layer;
mod quant;
mod state_dict;

pub use container::{Container, ForwardFn, ForwardStep, Scope};
pub use device::DeviceChain;
// The QAT module types live here, beside the layers that hold them (`Layer::Qat`); their
// public home is `crate::qat`, which holds the QAT procedures.
use fake_quantize::FakeQuantize;
pub use fused::{Fused, FusedHead};
pub use hooks::{ForwardHook, ForwardPreHook, HookHandle, HookKind};
pub use layer::{
    BatchNormLayer, Conv1dParams, ConvLayer, ConvTransposeLayer, CustomLayer, Layer, LinearLayer,
};
pub use module::Module;
use qat_layer::{QatHead, QatLayer};
pub use quant::{has_quantizable_bias, weight_channel_axis, QuantTarget, QuantTargets};
pub(crate) use state_dict::for_each_param_mut;
pub use state_dict::IncompatibleKeys;
