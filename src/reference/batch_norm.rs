//! STUB - to be replaced
use crate::error::{Error, Result};
use crate::ops::{BatchNorm, BatchNormGrads, BatchNormOutput};
use ndarray::Array4;
/// stub
pub fn batch_norm2d(_x: &Array4<f32>, _bn: &BatchNorm, _t: bool) -> Result<BatchNormOutput> {
    Err(Error::invalid("todo"))
}
/// stub
pub fn batch_norm2d_backward(
    _x: &Array4<f32>,
    _dy: &Array4<f32>,
    _bn: &BatchNorm,
    _f: &BatchNormOutput,
    _t: bool,
) -> Result<BatchNormGrads> {
    Err(Error::invalid("todo"))
}
