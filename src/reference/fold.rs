//! STUB - to be replaced
use crate::error::{Error, Result};
use crate::ops::{BatchNorm, Folded};
use ndarray::{Array1, Array2, ArrayD};
/// stub
pub fn fuse_conv_bn_weights(
    _w: &ArrayD<f32>,
    _b: Option<&Array1<f32>>,
    _bn: &BatchNorm,
    _t: bool,
) -> Result<Folded> {
    Err(Error::invalid("todo"))
}
/// stub
pub fn fuse_linear_bn_weights(
    _w: &Array2<f32>,
    _b: Option<&Array1<f32>>,
    _bn: &BatchNorm,
) -> Result<Folded> {
    Err(Error::invalid("todo"))
}
