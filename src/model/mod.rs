//! Example models built with the [`crate::nn`] module tree: the Mnist network of NNI's
//! module-fusion example ([`mnist`]), with PyTorch's module names so that PyTorch state
//! dicts and NNI configs apply to it unchanged.

pub mod mnist;
