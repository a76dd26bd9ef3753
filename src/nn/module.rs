//! [`Module`]: a node of the module tree (a [`Layer`], a training flag, hooks).

use std::fmt;

use ndarray::{Array1, Array2, Array3, Array4, ArrayD};

use super::container::Container;
use super::fused::Fused;
use super::hooks::{ForwardHook, ForwardPreHook, HookHandle, HookKind, Hooks};
use super::layer::{
    BatchNormLayer, Conv1dParams, ConvLayer, ConvTransposeLayer, CustomLayer, Layer, LinearLayer,
};
use super::path::unknown;
use super::quant::QuantTargets;
use crate::backend::HostOps;
use crate::error::{Error, Result};
use crate::ops::{Activation, BatchNorm, Conv2dParams, ConvTranspose2dParams};

/// A module: what it is ([`Layer`]), its `training` flag, and its forward hooks. Containers
/// hold child modules, so a `Module` is a tree; see the [module docs](crate::nn).
///
/// A new module is in training mode, as in PyTorch. `Clone` is a deep copy (hooks included,
/// with the same [`HookHandle`]s).
#[derive(Clone)]
pub struct Module {
    layer: Layer,
    training: bool,
    pub(crate) hooks: Hooks,
    /// Fake quantization of the input / weight / bias / output, applied in `forward`.
    quant: Option<Box<QuantTargets>>,
}

impl From<Layer> for Module {
    fn from(layer: Layer) -> Self {
        Self::new(layer)
    }
}

impl fmt::Debug for Module {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Module")
            .field("kind", &self.kind_name())
            .field("training", &self.training)
            .field("hooks", &self.hooks)
            .field("quant", &self.quant)
            .field("layer", &self.layer)
            .finish()
    }
}

impl Module {
    // ----------------------------------------------------------------- construction

    /// A module of kind `layer`, in training mode, without hooks.
    pub fn new(layer: Layer) -> Self {
        Self {
            layer,
            training: true,
            hooks: Hooks::default(),
            quant: None,
        }
    }

    /// `nn.Conv2d` with the given weight `[O, C/groups, KH, KW]`, bias and settings.
    ///
    /// Errors: those of [`ConvLayer::conv2d`].
    pub fn conv2d(
        weight: Array4<f32>,
        bias: Option<Array1<f32>>,
        params: Conv2dParams,
    ) -> Result<Self> {
        Ok(Self::new(Layer::Conv2d(ConvLayer::conv2d(
            weight, bias, params,
        )?)))
    }

    /// `nn.Conv1d` with the given weight `[O, C/groups, K]`, bias and settings.
    ///
    /// Errors: those of [`ConvLayer::conv1d`].
    pub fn conv1d(
        weight: Array3<f32>,
        bias: Option<Array1<f32>>,
        params: Conv1dParams,
    ) -> Result<Self> {
        Ok(Self::new(Layer::Conv1d(ConvLayer::conv1d(
            weight, bias, params,
        )?)))
    }

    /// `nn.ConvTranspose2d` with the given weight `[Cin, Cout/groups, KH, KW]`, bias and
    /// settings.
    ///
    /// Errors: those of [`ConvTransposeLayer::new`].
    pub fn conv_transpose2d(
        weight: Array4<f32>,
        bias: Option<Array1<f32>>,
        params: ConvTranspose2dParams,
    ) -> Result<Self> {
        Ok(Self::new(Layer::ConvTranspose2d(ConvTransposeLayer::new(
            weight, bias, params,
        )?)))
    }

    /// `nn.Linear` with the given weight `[out, in]` and bias.
    ///
    /// Errors: those of [`LinearLayer::new`].
    pub fn linear(weight: Array2<f32>, bias: Option<Array1<f32>>) -> Result<Self> {
        Ok(Self::new(Layer::Linear(LinearLayer::new(weight, bias)?)))
    }

    /// `nn.BatchNorm1d` with the given state.
    ///
    /// Errors: those of [`BatchNorm::validate`].
    pub fn batch_norm1d(bn: BatchNorm) -> Result<Self> {
        Ok(Self::new(Layer::BatchNorm1d(BatchNormLayer::new(bn)?)))
    }

    /// `nn.BatchNorm2d` with the given state.
    ///
    /// Errors: those of [`BatchNorm::validate`].
    pub fn batch_norm2d(bn: BatchNorm) -> Result<Self> {
        Ok(Self::new(Layer::BatchNorm2d(BatchNormLayer::new(bn)?)))
    }

    /// `nn.ReLU()`.
    pub fn relu() -> Self {
        Self::new(Layer::ReLU)
    }

    /// `nn.ReLU6()`.
    pub fn relu6() -> Self {
        Self::new(Layer::ReLU6)
    }

    /// `nn.LeakyReLU(negative_slope)`.
    pub fn leaky_relu(negative_slope: f32) -> Self {
        Self::new(Layer::LeakyReLU { negative_slope })
    }

    /// `nn.Hardswish()`.
    pub fn hardswish() -> Self {
        Self::new(Layer::Hardswish)
    }

    /// The activation module for `act` (`nn.Identity()` for [`Activation::None`]).
    pub fn activation(act: Activation) -> Self {
        Self::new(Layer::from_activation(act))
    }

    /// `nn.Identity()`.
    pub fn identity() -> Self {
        Self::new(Layer::Identity)
    }

    /// `nn.MaxPool2d(kernel_size, stride)`.
    ///
    /// Errors: [`Error::InvalidArgument`] for a zero kernel size or stride.
    pub fn max_pool2d(kernel_size: usize, stride: usize) -> Result<Self> {
        if kernel_size == 0 || stride == 0 {
            return Err(Error::invalid(format!(
                "MaxPool2d kernel_size and stride must be positive, got {kernel_size} and \
                 {stride}"
            )));
        }
        Ok(Self::new(Layer::MaxPool2d {
            kernel_size,
            stride,
        }))
    }

    /// `nn.Flatten(start_dim, end_dim)` (PyTorch's defaults: `1`, `-1`).
    pub fn flatten(start_dim: isize, end_dim: isize) -> Self {
        Self::new(Layer::Flatten { start_dim, end_dim })
    }

    /// `nn.LogSoftmax(dim)`.
    pub fn log_softmax(dim: isize) -> Self {
        Self::new(Layer::LogSoftmax { dim })
    }

    /// `nn.Sequential(*modules)`: children `"0"`, `"1"`, …
    pub fn sequential(modules: impl IntoIterator<Item = Module>) -> Self {
        Self::new(Layer::Container(Container::sequential(modules)))
    }

    /// A module from a [`Container`] (a user container or a `Sequential`).
    pub fn container(c: Container) -> Self {
        Self::new(Layer::Container(c))
    }

    /// A fused module.
    pub fn fused(f: Fused) -> Self {
        Self::new(Layer::Fused(Box::new(f)))
    }

    /// A module of a caller-defined kind.
    pub fn custom(c: Box<dyn CustomLayer>) -> Self {
        Self::new(Layer::Custom(c))
    }

    // ----------------------------------------------------------------- what it is

    /// What the module is.
    pub fn layer(&self) -> &Layer {
        &self.layer
    }

    /// What the module is, mutably (parameters can be edited in place).
    pub fn layer_mut(&mut self) -> &mut Layer {
        &mut self.layer
    }

    /// The layer, dropping the training flag, hooks and quantization targets.
    pub fn into_layer(self) -> Layer {
        self.layer
    }

    /// PyTorch's type name (see [`Layer::kind_name`]).
    pub fn kind_name(&self) -> String {
        self.layer.kind_name()
    }

    /// The container, if this module is one.
    pub fn as_container(&self) -> Option<&Container> {
        match &self.layer {
            Layer::Container(c) => Some(c),
            _ => None,
        }
    }

    /// The container, mutably, if this module is one.
    pub fn as_container_mut(&mut self) -> Option<&mut Container> {
        match &mut self.layer {
            Layer::Container(c) => Some(c),
            _ => None,
        }
    }

    // ----------------------------------------------------------------- train / eval

    /// This module's `training` flag.
    pub fn is_training(&self) -> bool {
        self.training
    }

    /// Sets this module's `training` flag only (PyTorch's `m.training = mode`).
    pub fn set_training(&mut self, mode: bool) {
        self.training = mode;
    }

    /// Sets the `training` flag of this module and every descendant (PyTorch's
    /// `m.train(mode)`).
    pub fn train(&mut self, mode: bool) -> &mut Self {
        self.training = mode;
        if let Layer::Container(c) = &mut self.layer {
            for (_, m) in c.children_mut() {
                m.train(mode);
            }
        }
        self
    }

    /// `train(false)` (PyTorch's `m.eval()`).
    pub fn eval(&mut self) -> &mut Self {
        self.train(false)
    }

    // ----------------------------------------------------------------- the tree

    /// The direct children, in registration order (none for a leaf).
    pub fn named_children(&self) -> Vec<(&str, &Module)> {
        match &self.layer {
            Layer::Container(c) => c.children().collect(),
            _ => Vec::new(),
        }
    }

    /// Every module of the tree with its dotted path, in PyTorch's `named_modules()` order:
    /// pre-order, this module first (path `""`), children in registration order. Fused
    /// modules are leaves.
    pub fn named_modules(&self) -> Vec<(String, &Module)> {
        fn walk<'a>(m: &'a Module, path: String, out: &mut Vec<(String, &'a Module)>) {
            let children = m.named_children();
            out.push((path.clone(), m));
            for (name, c) in children {
                let p = if path.is_empty() {
                    name.to_string()
                } else {
                    format!("{path}.{name}")
                };
                walk(c, p, out);
            }
        }
        let mut out = Vec::new();
        walk(self, String::new(), &mut out);
        out
    }

    /// The module at dotted `path` (`"layer1.0.conv1"`; `""` is this module), as
    /// `get_submodule`.
    ///
    /// Errors: [`Error::UnknownModule`] whose hint names the closest existing paths
    /// ([`Module::closest_paths`]).
    pub fn get(&self, path: &str) -> Result<&Module> {
        if path.is_empty() {
            return Ok(self);
        }
        let mut cur = self;
        for tok in path.split('.') {
            match cur.as_container().and_then(|c| c.child(tok)) {
                Some(m) => cur = m,
                None => return Err(self.unknown_path(path)),
            }
        }
        Ok(cur)
    }

    /// The module at dotted `path`, mutably.
    ///
    /// Errors: [`Error::UnknownModule`] naming the closest existing paths.
    pub fn get_mut(&mut self, path: &str) -> Result<&mut Module> {
        if path.is_empty() {
            return Ok(self);
        }
        self.get(path)?;
        let mut cur = self;
        for tok in path.split('.') {
            cur = cur
                .as_container_mut()
                .and_then(|c| c.child_mut(tok))
                .ok_or_else(|| Error::invalid(format!("internal: `{path}` vanished")))?;
        }
        Ok(cur)
    }

    /// Whether a module exists at `path`.
    pub fn contains(&self, path: &str) -> bool {
        self.get(path).is_ok()
    }

    /// Puts `module` at dotted `path` (same name, same place among its siblings) and returns
    /// the module that was there (PyTorch's `setattr` on the parent).
    ///
    /// Errors: [`Error::UnknownModule`]; [`Error::InvalidArgument`] for `""` (the root
    /// cannot be replaced through itself: assign it instead).
    pub fn replace(&mut self, path: &str, module: Module) -> Result<Module> {
        if path.is_empty() {
            return Err(Error::invalid(
                "cannot replace the root module (path \"\"); assign it instead",
            ));
        }
        self.get(path)?;
        let (parent, name) = match path.rsplit_once('.') {
            Some((p, n)) => (p, n),
            None => ("", path),
        };
        let slot = self
            .get_mut(parent)?
            .as_container_mut()
            .and_then(|c| c.child_mut(name))
            .ok_or_else(|| Error::invalid(format!("internal: `{path}` vanished")))?;
        Ok(std::mem::replace(slot, module))
    }

    /// Calls `f` on every module of the tree with its dotted path, in
    /// [`Module::named_modules`] order (a module's children are visited after `f` returns, so
    /// `f` may replace them).
    pub fn visit_mut(&mut self, f: &mut dyn FnMut(&str, &mut Module)) {
        fn walk(m: &mut Module, path: &str, f: &mut dyn FnMut(&str, &mut Module)) {
            f(path, m);
            if let Layer::Container(c) = &mut m.layer {
                for (name, child) in c.children_mut() {
                    let p = if path.is_empty() {
                        name.to_string()
                    } else {
                        format!("{path}.{name}")
                    };
                    walk(child, &p, f);
                }
            }
        }
        walk(self, "", f);
    }

    /// The existing dotted paths closest to `path` by edit distance (at most 3, nearest first;
    /// none farther than `max(3, len/2)` edits): the suggestions of
    /// [`Error::UnknownModule`].
    pub fn closest_paths(&self, path: &str) -> Vec<String> {
        let all = self.named_modules();
        super::path::closest(path, all.iter().map(|(p, _)| p.as_str()))
    }

    pub(crate) fn unknown_path(&self, path: &str) -> Error {
        let all = self.named_modules();
        unknown(path, all.iter().map(|(p, _)| p.as_str()))
    }

    // ----------------------------------------------------------------- hooks

    /// Registers a forward pre-hook, run before this module's forward with `(path, input)`;
    /// returning `Some(x)` replaces the input (see [`ForwardPreHook`]).
    pub fn register_forward_pre_hook(
        &mut self,
        hook: impl Fn(&str, &ArrayD<f32>) -> Option<ArrayD<f32>> + Send + Sync + 'static,
    ) -> HookHandle {
        let h = HookHandle::fresh(HookKind::Pre);
        let hook: ForwardPreHook = std::sync::Arc::new(hook);
        self.hooks.pre.push((h, hook));
        h
    }

    /// Registers a forward hook, run after this module's forward with
    /// `(path, input, output)`; returning `Some(y)` replaces the output (see
    /// [`ForwardHook`]).
    pub fn register_forward_hook(
        &mut self,
        hook: impl Fn(&str, &ArrayD<f32>, &ArrayD<f32>) -> Option<ArrayD<f32>> + Send + Sync + 'static,
    ) -> HookHandle {
        let h = HookHandle::fresh(HookKind::Post);
        let hook: ForwardHook = std::sync::Arc::new(hook);
        self.hooks.post.push((h, hook));
        h
    }

    /// Removes the hook `handle` from this module or any descendant; whether it was found.
    pub fn remove_hook(&mut self, handle: HookHandle) -> bool {
        if self.hooks.remove(handle) {
            return true;
        }
        if let Layer::Container(c) = &mut self.layer {
            for (_, m) in c.children_mut() {
                if m.remove_hook(handle) {
                    return true;
                }
            }
        }
        false
    }

    /// The handles of this module's forward pre-hooks, in the order they run.
    pub fn forward_pre_hooks(&self) -> Vec<HookHandle> {
        self.hooks.pre.iter().map(|(h, _)| *h).collect()
    }

    /// The handles of this module's forward (post-)hooks, in the order they run.
    pub fn forward_hooks(&self) -> Vec<HookHandle> {
        self.hooks.post.iter().map(|(h, _)| *h).collect()
    }

    /// Removes every hook of this module (not of its descendants).
    pub fn clear_hooks(&mut self) {
        self.hooks = Hooks::default();
    }

    // ----------------------------------------------------------------- quantization

    /// This module's quantization targets (fake quantization of its input, weight, bias and
    /// output, applied in [`Module::forward`]; see [`crate::nn::QuantTargets`]), if any.
    pub fn quant_targets(&self) -> Option<&QuantTargets> {
        self.quant.as_deref()
    }

    /// This module's quantization targets, mutably.
    pub fn quant_targets_mut(&mut self) -> Option<&mut QuantTargets> {
        self.quant.as_deref_mut()
    }

    /// Sets (or with `None` removes) this module's quantization targets; returns the previous
    /// ones. Fusion ([`crate::fuse`]) builds new modules without targets: attach them after
    /// fusing (as [`crate::config::apply`] does).
    pub fn set_quant_targets(&mut self, targets: Option<QuantTargets>) -> Option<QuantTargets> {
        std::mem::replace(&mut self.quant, targets.map(Box::new)).map(|b| *b)
    }

    // ----------------------------------------------------------------- forward

    /// Runs the module on `x` on `backend` (the CPU reference or the GPU), host arrays in and
    /// out, with its hooks and those of every module it runs. Hooks see paths relative to
    /// this module (`""` for itself). A module with quantization targets fake-quantizes its
    /// input, weight, bias and output inside the forward (after the pre-hooks, before the
    /// hooks; see [`crate::nn::QuantTargets`]).
    ///
    /// `&mut self`: a training-mode BatchNorm updates its running statistics (and
    /// `num_batches_tracked`), as in PyTorch.
    ///
    /// Input ranks: Conv2d, ConvTranspose2d, BatchNorm2d, MaxPool2d take `(N, C, H, W)`;
    /// Conv1d `(N, C, L)`; BatchNorm1d `(N, C)` or `(N, C, L)`; Linear `(…, in)`; the
    /// activations, Identity, Flatten and LogSoftmax any rank.
    ///
    /// Errors: [`Error::InvalidArgument`] / [`Error::ShapeMismatch`] for inputs of the wrong
    /// rank or shape, and the errors of the backend's ops.
    pub fn forward(&mut self, backend: &dyn HostOps, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        self.forward_at(backend, x, "")
    }

    /// [`Module::forward`] with this module at hook path `path`.
    pub(crate) fn forward_at(
        &mut self,
        backend: &dyn HostOps,
        x: &ArrayD<f32>,
        path: &str,
    ) -> Result<ArrayD<f32>> {
        let replaced = self.hooks.run_pre(path, x);
        let input = replaced.as_ref().unwrap_or(x);
        let training = self.training;
        let y = match self.quant.as_deref_mut() {
            Some(q) => {
                super::quant::forward_quantized(q, &mut self.layer, training, backend, input, path)?
            }
            None => super::forward::forward_layer(&mut self.layer, training, backend, input, path)?,
        };
        if self.hooks.post.is_empty() {
            return Ok(y);
        }
        Ok(self.hooks.run_post(path, input, y))
    }
}
