//! Example models: the Mnist network of NNI's module-fusion example ([`mnist`]) built with
//! the [`crate::nn`] module tree, with PyTorch's module names so that PyTorch state dicts
//! and NNI configs apply to it unchanged; and a ResNet basic block ([`resnet`]) as a
//! [`crate::deploy::Net`] for the integer deployment path.

pub mod mnist;
pub mod resnet;
