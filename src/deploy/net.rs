//! [`Net`]: the float model handed to deployment, as a small graph of the layers integer
//! kernels run (conv2d with its BatchNorm and activation, linear, max pooling, flatten,
//! residual add), built from an [`crate::nn`] module tree by name or by hand.

use ndarray::{Array1, Array2, Array4, ArrayD, Ix2, Ix4, IxDyn};

use crate::backend::{Backend, HostOps, Shaped};
use crate::error::{Error, Result};
use crate::nn::{ForwardStep, FusedHead, Layer, Module};
use crate::ops::{Activation, BatchNorm, Conv2d, Folded, Pool2d};

/// A value in a [`Net`]: `0` is the input, `i + 1` the output of node `i`.
pub type ValueId = usize;

/// What one node computes (float form).
// A net has a handful of nodes; boxing the conv variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum NodeOp {
    /// `act(bn(conv2d(x)))`; BN in eval mode (running statistics), folded into the conv for
    /// deployment.
    Conv {
        /// Weight `[O, C/groups, KH, KW]`, bias and settings (unfolded).
        conv: Conv2d,
        /// The BatchNorm2d that follows the conv, if any.
        bn: Option<BatchNorm>,
        /// The activation that follows (none, ReLU or ReLU6 have integer forms).
        act: Activation,
    },
    /// `act(x · Wᵀ + b)` on `[N, in]`.
    Linear {
        /// Weight `[out, in]`.
        weight: Array2<f32>,
        /// Bias `[out]`.
        bias: Option<Array1<f32>>,
        /// The activation that follows.
        act: Activation,
    },
    /// 2-D max pooling, square window, no padding.
    MaxPool2d {
        /// Window.
        kernel: usize,
        /// Step.
        stride: usize,
    },
    /// `[N, ...] → [N, prod(...)]` (`torch.flatten(x, 1)` / `x.view(N, -1)`).
    Flatten,
    /// `act(a + b)` (a residual connection; `FloatFunctional.add` / `add_relu`).
    Add {
        /// The activation that follows.
        act: Activation,
    },
    /// 2-D max pooling with padding (`nn.MaxPool2d(k, s, padding)`, ONNX `MaxPool` with
    /// `pads`); keeps its input's quantization.
    MaxPool2dPad {
        /// Window, stride and padding.
        pool: Pool2d,
    },
    /// Global average pooling `[N, C, H, W] → [N, C, 1, 1]` (`nn.AdaptiveAvgPool2d(1)`, ONNX
    /// `GlobalAveragePool`); requantizes to its own output quantization.
    GlobalAvgPool,
    /// An activation as a node of its own (HardSwish, LeakyReLU, ...: those that do not
    /// fold into a requantization clamp); its integer form is a 256-entry code table from
    /// its input's quantization to its output's.
    Activation {
        /// The function.
        act: Activation,
    },
}

impl NodeOp {
    /// A short kind name (`conv2d`, `linear`, `max_pool2d`, `flatten`, `add`,
    /// `max_pool2d_pad`, `global_avg_pool`, `activation`).
    pub fn kind(&self) -> &'static str {
        match self {
            NodeOp::Conv { .. } => "conv2d",
            NodeOp::Linear { .. } => "linear",
            NodeOp::MaxPool2d { .. } => "max_pool2d",
            NodeOp::Flatten => "flatten",
            NodeOp::Add { .. } => "add",
            NodeOp::MaxPool2dPad { .. } => "max_pool2d_pad",
            NodeOp::GlobalAvgPool => "global_avg_pool",
            NodeOp::Activation { .. } => "activation",
        }
    }

    /// The activation a conv, linear or add node ends with.
    pub fn activation(&self) -> Activation {
        match self {
            NodeOp::Conv { act, .. } | NodeOp::Linear { act, .. } | NodeOp::Add { act } => *act,
            _ => Activation::None,
        }
    }

    /// Whether this node writes new values (needs its own output quantization): conv, linear,
    /// add, global average pooling and activation nodes do; max pooling and flatten keep
    /// their input's codes and qparams.
    pub fn requantizes(&self) -> bool {
        matches!(
            self,
            NodeOp::Conv { .. }
                | NodeOp::Linear { .. }
                | NodeOp::Add { .. }
                | NodeOp::GlobalAvgPool
                | NodeOp::Activation { .. }
        )
    }
}

/// One node: a name (the module's dotted path), what it computes and the values it reads.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Name, e.g. `conv1` or `layer1.0.conv2`.
    pub name: String,
    /// The computation.
    pub op: NodeOp,
    /// Input values (one; two for [`NodeOp::Add`]).
    pub inputs: Vec<ValueId>,
}

/// A float model for deployment: nodes in execution order, each reading earlier values.
///
/// ```
/// use ndarray::{Array1, Array4};
/// use qfuse::deploy::Net;
/// use qfuse::ops::{Activation, Conv2d, Conv2dParams};
///
/// let mut net = Net::new();
/// let x = net.input();
/// let conv = Conv2d {
///     weight: Array4::from_elem((4, 3, 3, 3), 0.1),
///     bias: Some(Array1::zeros(4)),
///     params: Conv2dParams { padding: [1, 1], ..Default::default() },
/// };
/// let y = net.conv("conv", conv, x)?;
/// net.activation(y, Activation::Relu)?;
/// let z = net.add("add", y, y)?;
/// net.set_output(z)?;
/// assert_eq!(net.nodes().len(), 2);
/// # Ok::<(), qfuse::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Net {
    nodes: Vec<Node>,
    output: Option<ValueId>,
}

impl Net {
    /// An empty net (its output is the input until nodes are added).
    pub fn new() -> Self {
        Self::default()
    }

    /// The input value.
    pub fn input(&self) -> ValueId {
        0
    }

    /// The nodes, in execution order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The output value: the one set by [`Net::set_output`], else the last node's.
    pub fn output(&self) -> ValueId {
        self.output.unwrap_or(self.nodes.len())
    }

    /// Number of values (input included).
    pub fn value_count(&self) -> usize {
        self.nodes.len() + 1
    }

    /// Marks `v` as the output.
    ///
    /// Errors: [`Error::InvalidArgument`] for a value that does not exist.
    pub fn set_output(&mut self, v: ValueId) -> Result<()> {
        self.check_value(v)?;
        self.output = Some(v);
        Ok(())
    }

    fn check_value(&self, v: ValueId) -> Result<()> {
        if v > self.nodes.len() {
            return Err(Error::invalid(format!(
                "value {v} does not exist (the net has {} values)",
                self.nodes.len() + 1
            )));
        }
        Ok(())
    }

    fn push(&mut self, name: &str, op: NodeOp, inputs: Vec<ValueId>) -> Result<ValueId> {
        for &v in &inputs {
            self.check_value(v)?;
        }
        if self.nodes.iter().any(|n| n.name == name) {
            return Err(Error::invalid(format!(
                "the net already has a node named `{name}`"
            )));
        }
        self.nodes.push(Node {
            name: name.to_string(),
            op,
            inputs,
        });
        Ok(self.nodes.len())
    }

    /// Appends a conv2d reading `input`.
    ///
    /// Errors: an unknown input value, a duplicate name, or a bias that is not `[O]`.
    pub fn conv(&mut self, name: &str, conv: Conv2d, input: ValueId) -> Result<ValueId> {
        if let Some(b) = &conv.bias {
            if b.len() != conv.weight.shape()[0] {
                return Err(Error::shape(
                    format!("`{name}` conv bias"),
                    &[conv.weight.shape()[0]],
                    b.shape(),
                ));
            }
        }
        let op = NodeOp::Conv {
            conv,
            bn: None,
            act: Activation::None,
        };
        self.push(name, op, vec![input])
    }

    /// Appends a linear layer reading `input`.
    ///
    /// Errors: an unknown input, a duplicate name, or a bias that is not `[out]`.
    pub fn linear(
        &mut self,
        name: &str,
        weight: Array2<f32>,
        bias: Option<Array1<f32>>,
        input: ValueId,
    ) -> Result<ValueId> {
        if let Some(b) = &bias {
            if b.len() != weight.nrows() {
                return Err(Error::shape(
                    format!("`{name}` linear bias"),
                    &[weight.nrows()],
                    b.shape(),
                ));
            }
        }
        let op = NodeOp::Linear {
            weight,
            bias,
            act: Activation::None,
        };
        self.push(name, op, vec![input])
    }

    /// Appends max pooling.
    ///
    /// Errors: zero kernel or stride, unknown input, duplicate name.
    pub fn max_pool2d(
        &mut self,
        name: &str,
        kernel: usize,
        stride: usize,
        input: ValueId,
    ) -> Result<ValueId> {
        if kernel == 0 || stride == 0 {
            return Err(Error::invalid(format!(
                "`{name}`: max_pool2d kernel and stride must be positive"
            )));
        }
        self.push(name, NodeOp::MaxPool2d { kernel, stride }, vec![input])
    }

    /// Appends max pooling with padding ([`Pool2d`]).
    ///
    /// Errors: a zero kernel or stride, a padding not smaller than the kernel (checked by
    /// [`Pool2d::output`] on a `kernel`-sized input), unknown input, duplicate name.
    pub fn max_pool2d_pad(&mut self, name: &str, pool: Pool2d, input: ValueId) -> Result<ValueId> {
        pool.output(pool.kernel[0], pool.kernel[1])
            .map_err(|e| Error::invalid(format!("`{name}`: {e}")))?;
        self.push(name, NodeOp::MaxPool2dPad { pool }, vec![input])
    }

    /// Appends global average pooling (`[N, C, H, W] → [N, C, 1, 1]`).
    ///
    /// Errors: unknown input, duplicate name.
    pub fn global_avg_pool(&mut self, name: &str, input: ValueId) -> Result<ValueId> {
        self.push(name, NodeOp::GlobalAvgPool, vec![input])
    }

    /// Appends an activation as a node of its own ([`NodeOp::Activation`]; a ReLU or ReLU6
    /// after a conv, linear or add is better attached with [`Net::activation`], where it
    /// becomes the requantization clamp).
    ///
    /// Errors: unknown input, duplicate name.
    pub fn activation_node(
        &mut self,
        name: &str,
        act: Activation,
        input: ValueId,
    ) -> Result<ValueId> {
        self.push(name, NodeOp::Activation { act }, vec![input])
    }

    /// Appends a flatten (`[N, ...] → [N, prod]`).
    ///
    /// Errors: unknown input, duplicate name.
    pub fn flatten(&mut self, name: &str, input: ValueId) -> Result<ValueId> {
        self.push(name, NodeOp::Flatten, vec![input])
    }

    /// Appends `a + b`.
    ///
    /// Errors: unknown inputs, duplicate name.
    pub fn add(&mut self, name: &str, a: ValueId, b: ValueId) -> Result<ValueId> {
        self.push(
            name,
            NodeOp::Add {
                act: Activation::None,
            },
            vec![a, b],
        )
    }

    fn producer_mut(&mut self, v: ValueId, what: &str) -> Result<&mut Node> {
        self.check_value(v)?;
        if v == 0 {
            return Err(Error::invalid(format!(
                "a {what} must follow a conv, linear or add node, not the net's input"
            )));
        }
        Ok(&mut self.nodes[v - 1])
    }

    /// Attaches a BatchNorm2d (eval) to the conv that produces `v` (before any activation).
    ///
    /// Errors: [`Error::InvalidArgument`] when `v` is not produced by a conv without BN and
    /// activation; [`Error::ChannelMismatch`] for a BN of another width.
    pub fn batch_norm(&mut self, v: ValueId, bn: BatchNorm) -> Result<ValueId> {
        bn.validate()?;
        let node = self.producer_mut(v, "BatchNorm")?;
        let name = node.name.clone();
        match &mut node.op {
            NodeOp::Conv {
                conv,
                bn: slot @ None,
                act: Activation::None,
            } => {
                let o = conv.weight.shape()[0];
                if bn.channels() != o {
                    return Err(Error::ChannelMismatch {
                        layer: name,
                        layer_channels: o,
                        bn_channels: bn.channels(),
                    });
                }
                *slot = Some(bn);
                Ok(v)
            }
            other => Err(Error::invalid(format!(
                "a BatchNorm2d must directly follow a conv2d; `{name}` is a {} that already has \
                 a BatchNorm or an activation",
                other.kind()
            ))),
        }
    }

    /// Attaches an activation to the conv, linear or add node that produces `v`.
    ///
    /// Errors: [`Error::InvalidArgument`] when `v` is not produced by such a node, or that node
    /// already has an activation.
    pub fn activation(&mut self, v: ValueId, act: Activation) -> Result<ValueId> {
        if act == Activation::None {
            return Ok(v);
        }
        let node = self.producer_mut(v, "activation")?;
        let name = node.name.clone();
        match &mut node.op {
            NodeOp::Conv { act: slot, .. }
            | NodeOp::Linear { act: slot, .. }
            | NodeOp::Add { act: slot }
                if *slot == Activation::None =>
            {
                *slot = act;
                Ok(v)
            }
            other => Err(Error::invalid(format!(
                "an activation must follow a conv2d, linear or add without one; `{name}` is a {}{}",
                other.kind(),
                if other.activation() != Activation::None {
                    " that already has one"
                } else {
                    ""
                }
            ))),
        }
    }

    /// Appends (or attaches) the module `layer` named `name` reading `input`: Conv2d, a fused
    /// conv / linear (`ConvBnReLU2d`, `ConvReLU2d`, `LinearReLU`, ... with its BN kept
    /// unfolded when it has one), Linear, BatchNorm2d and activations (attached to the
    /// producer of `input`), Identity (nothing), MaxPool2d, Flatten.
    ///
    /// Errors: [`Error::InvalidArgument`] naming a module kind with no integer form (Conv1d,
    /// ConvTranspose2d, LeakyReLU, QAT modules, containers, ...), and the errors of the
    /// builder method it maps to.
    pub fn layer(&mut self, name: &str, layer: &Layer, input: ValueId) -> Result<ValueId> {
        let unsupported = || {
            Error::invalid(format!(
                "`{name}` ({}) has no integer form in qfuse::deploy (supported: Conv2d, Linear, \
                 BatchNorm2d after a conv, ReLU, ReLU6, Identity, MaxPool2d, Flatten and their \
                 fused modules)",
                layer.kind_name()
            ))
        };
        match layer {
            Layer::Conv2d(c) => self.conv(name, conv2d_of(name, c)?, input),
            Layer::Linear(l) => self.linear(name, l.weight.clone(), l.bias.clone(), input),
            Layer::BatchNorm2d(b) => self.batch_norm(input, b.bn.clone()),
            Layer::ReLU | Layer::ReLU6 => {
                let act = layer.as_activation().ok_or_else(unsupported)?;
                self.activation(input, act)
            }
            Layer::Identity => Ok(input),
            Layer::MaxPool2d {
                kernel_size,
                stride,
            } => self.max_pool2d(name, *kernel_size, *stride, input),
            Layer::Flatten { start_dim: 1, .. } => self.flatten(name, input),
            Layer::Fused(f) => {
                let v = match &f.head {
                    FusedHead::Conv2d(c) => self.conv(name, conv2d_of(name, c)?, input)?,
                    FusedHead::Linear(l) if f.bn.is_none() => {
                        self.linear(name, l.weight.clone(), l.bias.clone(), input)?
                    }
                    _ => return Err(unsupported()),
                };
                if let Some(b) = &f.bn {
                    self.batch_norm(v, b.bn.clone())?;
                }
                match f.act {
                    Activation::None | Activation::Relu | Activation::Relu6 => {
                        self.activation(v, f.act)
                    }
                    _ => Err(unsupported()),
                }
            }
            _ => Err(unsupported()),
        }
    }

    /// The whole module tree `model` as a net, walked as [`crate::nn::DeviceChain`] walks
    /// it: leaves as [`Net::layer`] takes them (each named by its dotted path), sequential
    /// containers in their forward order, and containers declared with
    /// [`crate::nn::Container::with_steps`] step by step — functional ops as layers (named
    /// `<container path>.<kind>`, numbered from the second of a kind), a
    /// [`crate::nn::ForwardStep::Add`] as an add node (`<path>.add`), a
    /// [`crate::nn::ForwardStep::Branch`] continuing from the earlier value. So any model the
    /// module tree builds from these layers — residual blocks included — trains on the device
    /// ([`crate::train::GpuTrainer`]) and deploys. Quantization targets and hooks are not
    /// part of the graph.
    ///
    /// ```
    /// use qfuse::deploy::Net;
    /// use qfuse::model::resnet;
    ///
    /// let block = resnet::basic_block_module(4, 7)?;
    /// assert_eq!(Net::from_module(&block)?, resnet::basic_block(4, 7)?);
    /// # Ok::<(), qfuse::Error>(())
    /// ```
    ///
    /// Errors: [`Error::InvalidArgument`] for a container with a custom forward closure, a
    /// layer with no form here ([`Net::layer`]), or a BatchNorm / activation that would attach
    /// to a value a later add or branch reads (a net attaches them to their producer);
    /// the builder's errors.
    pub fn from_module(model: &Module) -> Result<Net> {
        let mut net = Net::new();
        let mut frozen = Vec::new();
        let out = net.push_tree("", model, 0, &mut frozen)?;
        net.set_output(out)?;
        Ok(net)
    }

    fn push_tree(
        &mut self,
        path: &str,
        m: &Module,
        input: ValueId,
        frozen: &mut Vec<ValueId>,
    ) -> Result<ValueId> {
        let join = |name: &str| {
            if path.is_empty() {
                name.to_string()
            } else {
                format!("{path}.{name}")
            }
        };
        let Layer::Container(c) = m.layer() else {
            return self.leaf(path, m.layer(), input, frozen);
        };
        let Some(steps) = c.steps() else {
            if c.has_custom_forward() {
                return Err(Error::invalid(format!(
                    "`{}` ({}) has a custom forward closure: declare it with \
                     Container::with_steps to build a net from it",
                    crate::io::text::escape(path),
                    m.kind_name()
                )));
            }
            let mut h = input;
            for name in c.forward_order() {
                if let Some(child) = c.child(&name) {
                    h = self.push_tree(&join(&name), child, h, frozen)?;
                }
            }
            return Ok(h);
        };
        let mut values = vec![input];
        let mut counts: Vec<(&'static str, usize)> = Vec::new();
        let mut name_of = |kind: &'static str| {
            let n = match counts.iter_mut().find(|(k, _)| *k == kind) {
                Some((_, n)) => {
                    *n += 1;
                    *n
                }
                None => {
                    counts.push((kind, 1));
                    1
                }
            };
            if n == 1 {
                join(kind)
            } else {
                join(&format!("{kind}{n}"))
            }
        };
        let kept: Vec<usize> = steps.iter().filter_map(ForwardStep::reads).collect();
        let freeze = |v: usize, id: ValueId, frozen: &mut Vec<ValueId>| {
            if kept.contains(&v) {
                frozen.push(id);
            }
        };
        freeze(0, input, frozen);
        let mut h = input;
        for (i, step) in steps.iter().enumerate() {
            h = match step {
                ForwardStep::Child(name) => {
                    let child = c
                        .child(name)
                        .ok_or_else(|| Error::invalid(format!("internal: no child `{name}`")))?;
                    self.push_tree(&join(name), child, h, frozen)?
                }
                ForwardStep::Op(op) => {
                    let kind = match op.layer() {
                        Layer::Flatten { .. } => "flatten",
                        Layer::MaxPool2d { .. } => "max_pool",
                        _ => "op",
                    };
                    let name = name_of(kind);
                    self.leaf(&name, op.layer(), h, frozen)?
                }
                ForwardStep::Add(k) => {
                    let name = name_of("add");
                    self.add(&name, h, values[*k])?
                }
                ForwardStep::Branch(k) => values[*k],
            };
            values.push(h);
            freeze(i + 1, h, frozen);
        }
        Ok(h)
    }

    /// [`Net::layer`], refusing to attach a BatchNorm or activation to a frozen value.
    fn leaf(
        &mut self,
        name: &str,
        layer: &Layer,
        input: ValueId,
        frozen: &[ValueId],
    ) -> Result<ValueId> {
        let attaches = matches!(layer, Layer::BatchNorm2d(_) | Layer::ReLU | Layer::ReLU6);
        if attaches && frozen.contains(&input) {
            return Err(Error::invalid(format!(
                "`{}` ({}) would attach to a value that a later add or branch reads: a net \
                 attaches BatchNorms and activations to their producer, so that value would \
                 change",
                crate::io::text::escape(name),
                layer.kind_name()
            )));
        }
        self.layer(name, layer, input)
    }

    /// [`Net::layer`] with the module at dotted `path` of `model`, named `path`.
    ///
    /// Errors: [`Error::UnknownModule`] for a missing path, and those of [`Net::layer`].
    pub fn module(&mut self, model: &Module, path: &str, input: ValueId) -> Result<ValueId> {
        self.layer(path, model.get(path)?.layer(), input)
    }

    /// Runs the float model (no quantization) on `backend`; with `fold`, each conv's BN is
    /// folded into its weight and bias first (the fused float model, folded by the CPU
    /// reference), else applied after the conv. Returns every value (index = [`ValueId`]),
    /// downloaded. Runs through the one float interpreter, [`super::DeviceNet`]: the
    /// parameters and `x` are uploaded once, every value is downloaded once (keep a
    /// [`super::DeviceNet`] to prepare once and download only what you need).
    ///
    /// Errors: shape mismatches between nodes, and backend errors.
    pub fn forward_values<B: Backend>(
        &self,
        backend: &B,
        x: &ArrayD<f32>,
        fold: bool,
    ) -> Result<Vec<ArrayD<f32>>> {
        let dnet = super::DeviceNet::prepare(self, backend.clone(), fold)?;
        dnet.forward_values_device(&backend.upload(x)?)?
            .iter()
            .map(|v| backend.download(v))
            .collect()
    }
}

/// The folded weight and bias of a conv followed by BN (`fuse_conv_bn_weights`); a conv
/// without bias folds with zeros, as PyTorch does.
pub(crate) fn fold_conv(
    backend: &dyn HostOps,
    conv: &Conv2d,
    bn: &BatchNorm,
) -> Result<(Array4<f32>, Array1<f32>)> {
    let Folded { weight, bias } = backend.fold_conv_bn(
        &conv.weight.clone().into_dyn(),
        conv.bias.as_ref(),
        bn,
        false,
    )?;
    let w = weight
        .into_dimensionality::<Ix4>()
        .map_err(|e| Error::invalid(format!("folded conv weight is not 4-D: {e}")))?;
    Ok((w, bias))
}

fn conv2d_of(name: &str, c: &crate::nn::ConvLayer) -> Result<Conv2d> {
    let weight = c.weight.clone().into_dimensionality::<Ix4>().map_err(|_| {
        Error::invalid(format!(
            "`{name}`: conv weight must be 4-D [O, C/groups, KH, KW], got {:?}",
            c.weight.shape()
        ))
    })?;
    Ok(Conv2d {
        weight,
        bias: c.bias.clone(),
        params: c.params,
    })
}

/// The one rank check of a node's input: 4-D NCHW (conv, max pooling) or 2-D `[N, features]`
/// (linear).
pub(crate) fn check_rank(shape: &[usize], rank: usize, name: &str) -> Result<()> {
    if shape.len() == rank {
        return Ok(());
    }
    Err(Error::invalid(if rank == 4 {
        format!("`{name}` needs a 4-D NCHW input, got shape {shape:?}")
    } else {
        format!("`{name}` needs a 2-D [N, features] input, got shape {shape:?} (flatten it first)")
    }))
}

pub(crate) fn as4<T: Clone>(x: &ArrayD<T>, name: &str) -> Result<ndarray::Array4<T>> {
    check_rank(x.shape(), 4, name)?;
    x.clone()
        .into_dimensionality::<Ix4>()
        .map_err(|e| Error::invalid(format!("`{name}`: {e}")))
}

pub(crate) fn as2<T: Clone>(x: &ArrayD<T>, name: &str) -> Result<ndarray::Array2<T>> {
    check_rank(x.shape(), 2, name)?;
    x.clone()
        .into_dimensionality::<Ix2>()
        .map_err(|e| Error::invalid(format!("`{name}`: {e}")))
}

pub(crate) fn flatten<T: Clone>(x: &ArrayD<T>) -> Result<ArrayD<T>> {
    let shape = crate::ops::flatten_shape(x.shape())?;
    x.as_standard_layout()
        .to_owned()
        .into_shape_with_order(IxDyn(&shape))
        .map_err(|e| Error::invalid(format!("flatten: {e}")))
}

pub(crate) fn check_same(a: &impl Shaped, b: &impl Shaped, name: &str) -> Result<()> {
    if a.dims() != b.dims() {
        return Err(Error::shape(format!("`{name}` add"), a.dims(), b.dims()));
    }
    Ok(())
}
