//! Small model paths built on the [`crate::Backend`] interface. The full module tree and
//! fusion API grows from here.

pub mod mnist;
