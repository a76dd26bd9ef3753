//! Fused modules: one layer (conv, transposed conv, linear or BatchNorm), an optional
//! unfolded BatchNorm, and an activation.

use super::layer::{BatchNormLayer, ConvLayer, ConvTransposeLayer, LinearLayer};
use crate::error::{Error, Result};
use crate::ops::Activation;

/// The layer a fused module starts with.
#[derive(Debug, Clone, PartialEq)]
pub enum FusedHead {
    /// A Conv1d.
    Conv1d(ConvLayer),
    /// A Conv2d.
    Conv2d(ConvLayer),
    /// A ConvTranspose2d.
    ConvTranspose2d(ConvTransposeLayer),
    /// A Linear.
    Linear(LinearLayer),
    /// A BatchNorm1d (`BNReLU1d`, ...).
    BatchNorm1d(BatchNormLayer),
    /// A BatchNorm2d (`BNReLU2d`, ...).
    BatchNorm2d(BatchNormLayer),
}

impl FusedHead {
    /// Output channels (`out_features` for a Linear, `num_features` for a BatchNorm).
    pub fn out_channels(&self) -> usize {
        match self {
            FusedHead::Conv1d(c) | FusedHead::Conv2d(c) => c.out_channels(),
            FusedHead::ConvTranspose2d(c) => c.out_channels(),
            FusedHead::Linear(l) => l.out_features(),
            FusedHead::BatchNorm1d(b) | FusedHead::BatchNorm2d(b) => b.num_features(),
        }
    }

    /// PyTorch's type name of the head on its own (`Conv2d`, `Linear`, `BatchNorm2d`, ...).
    pub fn kind_name(&self) -> &'static str {
        match self {
            FusedHead::Conv1d(_) => "Conv1d",
            FusedHead::Conv2d(_) => "Conv2d",
            FusedHead::ConvTranspose2d(_) => "ConvTranspose2d",
            FusedHead::Linear(_) => "Linear",
            FusedHead::BatchNorm1d(_) => "BatchNorm1d",
            FusedHead::BatchNorm2d(_) => "BatchNorm2d",
        }
    }

    fn is_batch_norm(&self) -> bool {
        matches!(self, FusedHead::BatchNorm1d(_) | FusedHead::BatchNorm2d(_))
    }
}

/// A fused module: `act(bn(head(x)))`, one module in the tree (a leaf: its parts are fields,
/// not children, unlike PyTorch's `_FusedModule` Sequentials).
///
/// Two forms, as in PyTorch:
/// * **Folded** (`bn: None`), what [`crate::fuse::fuse_modules`] builds: the BatchNorm, if
///   there was one, is already folded into the head's weight and bias. Kinds `ConvReLU2d`,
///   `ConvReLU1d`, `ConvTransposeReLU2d`, `LinearReLU`, `BNReLU2d`, `BNReLU1d` and their
///   ReLU6 / LeakyReLU / Hardswish variants. The forward is one conv / linear with bias and
///   activation ([`crate::HostOps::conv2d_act`], ...), or the BatchNorm with the activation
///   ([`crate::HostOps::batch_norm2d_act`]).
/// * **Intrinsic** (`bn: Some`), what [`crate::fuse::fuse_modules_qat`] builds for QAT:
///   the BatchNorm is kept separate (`torch.ao.nn.intrinsic.ConvBn2d`, `ConvBnReLU2d`,
///   `LinearBn1d`, MQBench's `ConvTransposeBn2d`, ...), so that QAT conversion can build its
///   modules from it. The forward in training mode is head → BatchNorm with batch statistics
///   (updating the running statistics) → activation; in eval mode it folds the BatchNorm on the
///   fly and runs the fused path ([`crate::HostOps::conv_bn_act_eval`] for convs).
///
/// # Kind names
/// `kind_name = stem + ("Bn" if bn) + act + dims`, with stem `Conv` / `ConvTranspose` /
/// `Linear` / `BN`, act `ReLU` / `ReLU6` / `LeakyReLU` / `Hardswish` / nothing, and dims `1d` /
/// `2d` (for a Linear: `1d` with a BatchNorm, else nothing). This gives PyTorch's names
/// where PyTorch has the module (`ConvReLU2d`, `ConvBn2d`, `ConvBnReLU1d`, `LinearReLU`,
/// `LinearBn1d`, `BNReLU2d`, `LinearLeakyReLU`) and the same scheme elsewhere
/// (`ConvReLU62d`, `ConvBnHardswish2d`, `ConvTransposeBnReLU2d`, `LinearBnReLU1d`, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct Fused {
    /// The first layer (folded weights in the folded form).
    pub head: FusedHead,
    /// The unfolded BatchNorm of an intrinsic (QAT) module; `None` once folded. Always `None`
    /// for a BatchNorm head.
    pub bn: Option<BatchNormLayer>,
    /// The activation (`Activation::None` for `ConvBn2d` / `LinearBn1d`).
    pub act: Activation,
}

impl Fused {
    /// A fused module, checked: a BatchNorm head takes no second BatchNorm, and the
    /// BatchNorm's `num_features` must equal the head's output channels.
    ///
    /// Errors: [`Error::InvalidArgument`], [`Error::ChannelMismatch`], and those of
    /// [`crate::ops::BatchNorm::validate`].
    pub fn new(head: FusedHead, bn: Option<BatchNormLayer>, act: Activation) -> Result<Self> {
        if let Some(b) = &bn {
            if head.is_batch_norm() {
                return Err(Error::invalid(
                    "a fused module with a BatchNorm head takes no second BatchNorm",
                ));
            }
            b.bn.validate()?;
            if b.num_features() != head.out_channels() {
                return Err(Error::ChannelMismatch {
                    layer: head.kind_name().to_string(),
                    layer_channels: head.out_channels(),
                    bn_channels: b.num_features(),
                });
            }
        }
        Ok(Self { head, bn, act })
    }

    /// PyTorch's type name (see [the table](Fused#kind-names)).
    pub fn kind_name(&self) -> String {
        let (stem, dims) = match &self.head {
            FusedHead::Conv1d(_) => ("Conv", "1d"),
            FusedHead::Conv2d(_) => ("Conv", "2d"),
            FusedHead::ConvTranspose2d(_) => ("ConvTranspose", "2d"),
            FusedHead::Linear(_) => ("Linear", if self.bn.is_some() { "1d" } else { "" }),
            FusedHead::BatchNorm1d(_) => ("BN", "1d"),
            FusedHead::BatchNorm2d(_) => ("BN", "2d"),
        };
        let bn = if self.bn.is_some() { "Bn" } else { "" };
        let act = match self.act {
            Activation::None => "",
            a => a.kind_name(),
        };
        format!("{stem}{bn}{act}{dims}")
    }

    /// Whether the BatchNorm is kept separate (an intrinsic module for QAT).
    pub fn is_intrinsic(&self) -> bool {
        self.bn.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::Conv2dParams;
    use ndarray::{Array2, Array3, Array4};

    #[test]
    fn kind_names() {
        let c2 =
            ConvLayer::conv2d(Array4::zeros([4, 2, 1, 1]), None, Conv2dParams::default()).unwrap();
        let c1 = ConvLayer::conv1d(Array3::zeros([4, 2, 1]), None, Default::default()).unwrap();
        let ct =
            ConvTransposeLayer::new(Array4::zeros([2, 4, 1, 1]), None, Default::default()).unwrap();
        let l = LinearLayer::new(Array2::zeros((4, 3)), None).unwrap();
        let bn = || Some(BatchNormLayer::with_features(4));
        let name =
            |h: FusedHead, bn: Option<BatchNormLayer>, a| Fused::new(h, bn, a).unwrap().kind_name();
        let relu = Activation::Relu;
        assert_eq!(
            name(FusedHead::Conv1d(c1.clone()), None, relu),
            "ConvReLU1d"
        );
        assert_eq!(name(FusedHead::Conv1d(c1), bn(), relu), "ConvBnReLU1d");
        assert_eq!(
            name(FusedHead::Conv2d(c2.clone()), bn(), Activation::None),
            "ConvBn2d"
        );
        assert_eq!(
            name(FusedHead::Conv2d(c2), None, Activation::Relu6),
            "ConvReLU62d"
        );
        assert_eq!(
            name(FusedHead::ConvTranspose2d(ct.clone()), bn(), relu),
            "ConvTransposeBnReLU2d"
        );
        assert_eq!(
            name(FusedHead::ConvTranspose2d(ct), None, Activation::Hardswish),
            "ConvTransposeHardswish2d"
        );
        assert_eq!(name(FusedHead::Linear(l.clone()), None, relu), "LinearReLU");
        assert_eq!(
            name(FusedHead::Linear(l.clone()), bn(), Activation::None),
            "LinearBn1d"
        );
        assert_eq!(
            name(
                FusedHead::Linear(l),
                None,
                Activation::LeakyRelu {
                    negative_slope: 0.01
                }
            ),
            "LinearLeakyReLU"
        );
        let b = BatchNormLayer::with_features(4);
        assert_eq!(
            name(FusedHead::BatchNorm2d(b.clone()), None, relu),
            "BNReLU2d"
        );
        assert_eq!(
            name(FusedHead::BatchNorm1d(b.clone()), None, relu),
            "BNReLU1d"
        );
        assert!(Fused::new(FusedHead::BatchNorm2d(b), bn(), relu).is_err());
    }
}
