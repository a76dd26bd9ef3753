//! Containers: `Sequential` and user containers with named children and a declared forward
//! order.

use std::fmt;
use std::sync::Arc;

use ndarray::ArrayD;

use super::path::unknown_child;
use super::Module;
use crate::backend::HostOps;
use crate::error::{Error, Result};

/// A container's custom forward: given a [`Scope`] (to run children by name) and the input,
/// returns the output. See [`Container::with_forward`].
pub type ForwardFn = Arc<dyn Fn(&mut Scope<'_>, &ArrayD<f32>) -> Result<ArrayD<f32>> + Send + Sync>;

/// Named children, in registration order, and how the forward runs them.
///
/// * **Registration order** (the order of [`Container::with_child`] / [`Container::push`])
///   is the order of [`Module::named_modules`] and [`Module::named_children`], as in PyTorch.
/// * **Declared forward order**: the forward runs the children one after the other, each
///   output feeding the next. It is the registration order unless declared with
///   [`Container::with_order`] (a list of child names; a name may repeat, a child may be
///   left out).
/// * **Custom forward** ([`Container::with_forward`]): a closure replaces the sequential run,
///   for data flow a sequence cannot express (residual adds, ...). It still declares its
///   straight-line *chains*: the runs of children where each output feeds only the next.
///
/// [`crate::fuse::find_fusable`] looks for fusable patterns only inside the declared order
/// (or chains), never across them, and never at a child the declared order uses twice.
///
/// `Sequential` ([`Container::sequential`], [`Module::sequential`]) is a container of type
/// name `Sequential` whose children are named `"0"`, `"1"`, … and run in registration order.
#[derive(Clone)]
pub struct Container {
    type_name: String,
    children: Vec<(String, Module)>,
    /// `None`: one chain, the registration order.
    chains: Option<Vec<Vec<String>>>,
    forward: Option<ForwardFn>,
    /// A straight-line forward of children and functional ops ([`Container::with_steps`]).
    steps: Option<Vec<ForwardStep>>,
}

/// One step of a container forward declared with [`Container::with_steps`].
///
/// Each step takes the current value and makes the next one. The values are numbered: `0`
/// is the container's input and `k` the output of the `k`-th step (counting from 1), so
/// [`ForwardStep::Add`] and [`ForwardStep::Branch`] can refer to any earlier value — a
/// residual connection, or a second branch (a downsampling shortcut) from a fork point.
#[derive(Debug, Clone)]
pub enum ForwardStep {
    /// Runs the child of this name.
    Child(String),
    /// A functional op between children, as PyTorch's `x.view(-1, n)` or `F.log_softmax(x,
    /// dim=1)` in a `forward`: a leaf module without parameters or state (`Flatten`,
    /// `LogSoftmax`, `ReLU`, `ReLU6`, `LeakyReLU`, `Hardswish`, `Identity`, `MaxPool2d`),
    /// not part of the module tree.
    Op(Box<Module>),
    /// `current + value[k]` (PyTorch's `out += identity`): adds the earlier value `k` (`0`:
    /// the container's input) to the current one; the shapes must be equal.
    Add(usize),
    /// Continues from the earlier value `k` (`0`: the container's input): a second branch
    /// from a fork point, e.g. a shortcut `downsample(x)` computed after the main branch and
    /// then added to it.
    Branch(usize),
}

impl ForwardStep {
    /// [`ForwardStep::Child`] of `name`.
    pub fn child(name: impl Into<String>) -> Self {
        Self::Child(name.into())
    }

    /// [`ForwardStep::Op`] of `module`.
    pub fn op(module: Module) -> Self {
        Self::Op(Box::new(module))
    }

    /// The earlier value this step reads besides the current one ([`ForwardStep::Add`],
    /// [`ForwardStep::Branch`]).
    pub fn reads(&self) -> Option<usize> {
        match self {
            Self::Add(k) | Self::Branch(k) => Some(*k),
            Self::Child(_) | Self::Op(_) => None,
        }
    }
}

/// The values (by number, see [`ForwardStep`]) that a later [`ForwardStep::Add`] or
/// [`ForwardStep::Branch`] reads: those a forward keeps.
pub(crate) fn kept_values(steps: &[ForwardStep]) -> Vec<usize> {
    let mut kept: Vec<usize> = steps.iter().filter_map(ForwardStep::reads).collect();
    kept.sort_unstable();
    kept.dedup();
    kept
}

/// Whether `m` can be a [`ForwardStep::Op`]: a parameterless leaf without hooks or targets.
fn is_functional(m: &Module) -> bool {
    use super::Layer;
    m.forward_pre_hooks().is_empty()
        && m.forward_hooks().is_empty()
        && m.quant_targets().is_none()
        && matches!(
            m.layer(),
            Layer::Flatten { .. }
                | Layer::LogSoftmax { .. }
                | Layer::ReLU
                | Layer::ReLU6
                | Layer::LeakyReLU { .. }
                | Layer::Hardswish
                | Layer::Identity
                | Layer::MaxPool2d { .. }
        )
}

impl Container {
    /// An empty container reported as `type_name` by [`Module::kind_name`] (the name of the
    /// user's `nn.Module` subclass, e.g. `"BasicBlock"`).
    pub fn new(type_name: impl Into<String>) -> Self {
        Self {
            type_name: type_name.into(),
            children: Vec::new(),
            chains: None,
            forward: None,
            steps: None,
        }
    }

    /// A `Sequential` of `modules`, named `"0"`, `"1"`, …
    pub fn sequential(modules: impl IntoIterator<Item = Module>) -> Self {
        let mut c = Self::new("Sequential");
        for (i, m) in modules.into_iter().enumerate() {
            c.children.push((i.to_string(), m));
        }
        c
    }

    /// The type name.
    pub fn type_name(&self) -> &str {
        &self.type_name
    }

    /// Adds (or, for an existing name, replaces in place, as PyTorch's `add_module`) a child.
    ///
    /// Errors: [`Error::InvalidArgument`] for an empty name or one containing `.`.
    pub fn push(&mut self, name: impl Into<String>, module: Module) -> Result<()> {
        let name = name.into();
        if name.is_empty() || name.contains('.') {
            return Err(Error::invalid(format!(
                "module name can't be empty or contain \".\", got `{name}`"
            )));
        }
        match self.children.iter_mut().find(|(n, _)| *n == name) {
            Some((_, m)) => *m = module,
            None => self.children.push((name, module)),
        }
        Ok(())
    }

    /// Builder form of [`Container::push`].
    pub fn with_child(mut self, name: impl Into<String>, module: Module) -> Result<Self> {
        self.push(name, module)?;
        Ok(self)
    }

    /// Declares the forward order: the children to run, in order, each output feeding the
    /// next (`["conv", "bn", "relu"]`, a `Vec`, ...). Replaces a custom forward.
    ///
    /// Errors: [`Error::UnknownModule`] for a name that is not a child.
    pub fn with_order<S: AsRef<str>>(mut self, order: impl IntoIterator<Item = S>) -> Result<Self> {
        let order = self.check_names(order)?;
        self.chains = Some(vec![order]);
        self.forward = None;
        self.steps = None;
        Ok(self)
    }

    /// Declares a forward of children, functional ops and residual adds / branches
    /// ([`ForwardStep`]), for a `forward` that a child order cannot express: functional calls
    /// between children (NNI's Mnist: the conv children, `x.view(-1, 800)`, the fc children,
    /// `F.log_softmax(x, dim=1)`), or a residual block (`relu(bn2(conv2(relu(bn1(conv1(x)))))
    /// + x)`: the children, then [`ForwardStep::Add`]`(0)`, then a ReLU op). The host forward
    /// runs the steps in order; [`crate::nn::DeviceChain::from_module`] runs the same steps on
    /// a backend's tensors, and [`crate::deploy::Net::from_module`] builds the same graph for
    /// training and deployment. The chains ([`Container::chains`], where fusion looks) are the
    /// runs of children between ops, adds and branches, also cut after a child whose output a
    /// later step reads. The container counts as having a custom forward
    /// ([`Container::has_custom_forward`]).
    ///
    /// ```
    /// use qfuse::nn::{Container, ForwardStep, Module};
    ///
    /// let c = Container::new("Head")
    ///     .with_child("fc", Module::linear(ndarray::Array2::from_elem((2, 12), 0.1), None)?)?
    ///     .with_steps([
    ///         ForwardStep::op(Module::flatten(1, -1)),
    ///         ForwardStep::child("fc"),
    ///         ForwardStep::op(Module::log_softmax(1)),
    ///     ])?;
    /// assert_eq!(c.chains(), vec![vec!["fc".to_string()]]);
    /// let y = Module::container(c).forward(&qfuse::CpuBackend, &ndarray::ArrayD::zeros(vec![3, 3, 4]))?;
    /// assert_eq!(y.shape(), &[3, 2]);
    /// # Ok::<(), qfuse::Error>(())
    /// ```
    ///
    /// A residual block:
    ///
    /// ```
    /// use ndarray::{Array1, Array4, ArrayD};
    /// use qfuse::nn::{Container, ForwardStep, Module};
    /// use qfuse::ops::Conv2dParams;
    ///
    /// let conv = || {
    ///     let w = Array4::from_shape_fn((2, 2, 3, 3), |(o, c, h, w)| ((o + c + h + w) % 3) as f32 * 0.1);
    ///     let p = Conv2dParams { padding: [1, 1], ..Default::default() };
    ///     Module::conv2d(w, Some(Array1::zeros(2)), p)
    /// };
    /// let block = Container::new("BasicBlock")
    ///     .with_child("conv1", conv()?)?
    ///     .with_child("conv2", conv()?)?
    ///     .with_steps([
    ///         ForwardStep::child("conv1"),
    ///         ForwardStep::op(Module::relu()),
    ///         ForwardStep::child("conv2"),
    ///         ForwardStep::Add(0), // + the block's input
    ///         ForwardStep::op(Module::relu()),
    ///     ])?;
    /// assert_eq!(block.chains(), vec![vec!["conv1".to_string()], vec!["conv2".to_string()]]);
    /// let x = ArrayD::from_elem(vec![1, 2, 4, 4], 1.0f32);
    /// let y = Module::container(block).forward(&qfuse::CpuBackend, &x)?;
    /// assert_eq!(y.shape(), x.shape());
    /// # Ok::<(), qfuse::Error>(())
    /// ```
    ///
    /// Errors: [`Error::UnknownModule`] for a child name that is not a child;
    /// [`Error::InvalidArgument`] for an op that is not a parameterless leaf (or has hooks or
    /// quantization targets), or an add / branch that reads a value not computed yet.
    pub fn with_steps(mut self, steps: impl IntoIterator<Item = ForwardStep>) -> Result<Self> {
        let steps: Vec<ForwardStep> = steps.into_iter().collect();
        for (i, step) in steps.iter().enumerate() {
            if let Some(k) = step.reads() {
                if k > i {
                    return Err(Error::invalid(format!(
                        "forward step {} ({step:?}) reads value {k}, which is not computed \
                         yet (values: 0 the input, k the output of step k; step {} can read \
                         0..={i})",
                        i + 1,
                        i + 1
                    )));
                }
            }
        }
        let kept = kept_values(&steps);
        let mut chains: Vec<Vec<String>> = Vec::new();
        let mut run: Vec<String> = Vec::new();
        for (i, step) in steps.iter().enumerate() {
            match step {
                ForwardStep::Child(name) => {
                    run.extend(self.check_names([name])?);
                    // A value a later step reads is not fused away.
                    if kept.contains(&(i + 1)) {
                        chains.push(std::mem::take(&mut run));
                    }
                }
                ForwardStep::Add(_) | ForwardStep::Branch(_) => {
                    if !run.is_empty() {
                        chains.push(std::mem::take(&mut run));
                    }
                }
                ForwardStep::Op(m) => {
                    if !is_functional(m) {
                        return Err(Error::invalid(format!(
                            "a forward step op must be a parameterless leaf module without \
                             hooks or quantization targets (Flatten, LogSoftmax, an \
                             activation, Identity, MaxPool2d), got {}",
                            m.kind_name()
                        )));
                    }
                    if !run.is_empty() {
                        chains.push(std::mem::take(&mut run));
                    }
                }
            }
        }
        if !run.is_empty() {
            chains.push(run);
        }
        let plan = steps.clone();
        self.chains = Some(chains);
        self.forward = Some(Arc::new(move |s: &mut Scope<'_>, x: &ArrayD<f32>| {
            let mut saved: Vec<(usize, ArrayD<f32>)> = Vec::new();
            if kept.first() == Some(&0) {
                saved.push((0, x.clone()));
            }
            let value = |saved: &[(usize, ArrayD<f32>)], k: usize| {
                saved
                    .iter()
                    .find(|(i, _)| *i == k)
                    .map(|(_, v)| v.clone())
                    .ok_or_else(|| Error::invalid(format!("internal: value {k} not kept")))
            };
            let mut h = x.clone();
            for (i, step) in plan.iter().enumerate() {
                h = match step {
                    ForwardStep::Child(name) => s.call(name, &h)?,
                    ForwardStep::Op(m) => m.clone().forward(s.backend(), &h)?,
                    ForwardStep::Add(k) => {
                        let v = value(&saved, *k)?;
                        crate::ops::check_add(h.shape(), v.shape())?;
                        h + v
                    }
                    ForwardStep::Branch(k) => value(&saved, *k)?,
                };
                if kept.contains(&(i + 1)) {
                    saved.push((i + 1, h.clone()));
                }
            }
            Ok(h)
        }));
        self.steps = Some(steps);
        Ok(self)
    }

    /// The straight-line steps declared with [`Container::with_steps`], if any.
    pub fn steps(&self) -> Option<&[ForwardStep]> {
        self.steps.as_deref()
    }

    /// Declares a custom forward `f` and its straight-line `chains` (each a list of child
    /// names whose outputs feed straight into the next; see the [type docs](Container)), as
    /// any nested iterable of names: `[["a", "b"], ["c", "d"]]`, `vec![vec!["a", "b", "c"],
    /// vec!["d"]]`, ...
    ///
    /// ```
    /// use ndarray::ArrayD;
    /// use qfuse::nn::{Container, Module};
    ///
    /// // relu(x + identity(x)): the add happens between the two children, so they form two
    /// // chains and are never fused together.
    /// let block = Container::new("Residual")
    ///     .with_child("body", Module::identity())?
    ///     .with_child("relu", Module::relu())?
    ///     .with_forward([["body"], ["relu"]], |s, x| {
    ///         let y = s.call("body", x)? + x;
    ///         s.call("relu", &y)
    ///     })?;
    /// let mut m = Module::container(block);
    /// let x = ArrayD::from_elem(ndarray::IxDyn(&[2]), -1.0f32);
    /// assert_eq!(m.forward(&qfuse::CpuBackend, &x)?, ArrayD::<f32>::zeros(ndarray::IxDyn(&[2])));
    /// # Ok::<(), qfuse::Error>(())
    /// ```
    ///
    /// Errors: [`Error::UnknownModule`] for a name that is not a child.
    pub fn with_forward<C, S>(
        mut self,
        chains: impl IntoIterator<Item = C>,
        f: impl Fn(&mut Scope<'_>, &ArrayD<f32>) -> Result<ArrayD<f32>> + Send + Sync + 'static,
    ) -> Result<Self>
    where
        C: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut checked = Vec::new();
        for c in chains {
            checked.push(self.check_names(c)?);
        }
        self.chains = Some(checked);
        self.forward = Some(Arc::new(f));
        self.steps = None;
        Ok(self)
    }

    fn check_names<S: AsRef<str>>(
        &self,
        names: impl IntoIterator<Item = S>,
    ) -> Result<Vec<String>> {
        names
            .into_iter()
            .map(|n| {
                let n = n.as_ref();
                if self.child(n).is_some() {
                    Ok(n.to_string())
                } else {
                    Err(unknown_child(
                        n,
                        self.children.iter().map(|(k, _)| k.as_str()),
                    ))
                }
            })
            .collect()
    }

    /// Whether the forward is a custom closure.
    pub fn has_custom_forward(&self) -> bool {
        self.forward.is_some()
    }

    /// The declared straight-line chains: one chain (the declared order, by default the
    /// registration order) for a sequential forward; the declared chains for a custom one.
    pub fn chains(&self) -> Vec<Vec<String>> {
        match &self.chains {
            Some(c) => c.clone(),
            None => vec![self.children.iter().map(|(n, _)| n.clone()).collect()],
        }
    }

    /// The declared forward order (the chains, concatenated).
    pub fn forward_order(&self) -> Vec<String> {
        self.chains().concat()
    }

    /// The children, in registration order.
    pub fn children(&self) -> impl Iterator<Item = (&str, &Module)> {
        self.children.iter().map(|(n, m)| (n.as_str(), m))
    }

    /// The children, mutably, in registration order.
    pub fn children_mut(&mut self) -> impl Iterator<Item = (&str, &mut Module)> {
        self.children.iter_mut().map(|(n, m)| (n.as_str(), m))
    }

    /// The child called `name`.
    pub fn child(&self, name: &str) -> Option<&Module> {
        self.children
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, m)| m)
    }

    /// The child called `name`, mutably.
    pub fn child_mut(&mut self, name: &str) -> Option<&mut Module> {
        self.children
            .iter_mut()
            .find(|(n, _)| n == name)
            .map(|(_, m)| m)
    }

    /// Number of children.
    pub fn len(&self) -> usize {
        self.children.len()
    }

    /// Whether there are no children.
    pub fn is_empty(&self) -> bool {
        self.children.is_empty()
    }

    /// Runs the forward with children's hook paths under `prefix`.
    pub(crate) fn forward(
        &mut self,
        backend: &dyn HostOps,
        x: &ArrayD<f32>,
        prefix: &str,
        training: bool,
    ) -> Result<ArrayD<f32>> {
        if let Some(f) = self.forward.clone() {
            let mut scope = Scope {
                backend,
                children: &mut self.children,
                prefix,
                training,
            };
            return f(&mut scope, x);
        }
        let order = self.forward_order();
        let mut scope = Scope {
            backend,
            children: &mut self.children,
            prefix,
            training,
        };
        let mut y = x.clone();
        for name in &order {
            y = scope.call(name, &y)?;
        }
        Ok(y)
    }
}

impl fmt::Debug for Container {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Container")
            .field("type_name", &self.type_name)
            .field("children", &self.children)
            .field("chains", &self.chains)
            .field("custom_forward", &self.forward.is_some())
            .field("steps", &self.steps)
            .finish()
    }
}

/// What a custom forward ([`Container::with_forward`]) sees: the backend, the container's
/// training flag, and its children, run by name.
pub struct Scope<'a> {
    backend: &'a dyn HostOps,
    children: &'a mut Vec<(String, Module)>,
    prefix: &'a str,
    training: bool,
}

impl Scope<'_> {
    /// Runs child `name` on `x` (with its hooks; its hook path is the container's path plus
    /// `.name`).
    ///
    /// Errors: [`Error::UnknownModule`] when there is no such child; the child's errors.
    pub fn call(&mut self, name: &str, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let path = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        let backend = self.backend;
        let Some(pos) = self.children.iter().position(|(n, _)| n == name) else {
            return Err(unknown_child(
                name,
                self.children.iter().map(|(n, _)| n.as_str()),
            ));
        };
        self.children[pos].1.forward_at(backend, x, &path)
    }

    /// The backend the forward runs on.
    pub fn backend(&self) -> &dyn HostOps {
        self.backend
    }

    /// The container's training flag.
    pub fn training(&self) -> bool {
        self.training
    }
}
