//! STUB - to be replaced
use crate::error::{Error, Result};
use crate::ops::{Conv2dGrads, Conv2dParams};
use ndarray::{Array1, Array4};
/// stub
pub fn conv2d(
    _x: &Array4<f32>,
    _w: &Array4<f32>,
    _b: Option<&Array1<f32>>,
    _p: &Conv2dParams,
) -> Result<Array4<f32>> {
    Err(Error::invalid("todo"))
}
/// stub
pub fn conv2d_backward(
    _x: &Array4<f32>,
    _w: &Array4<f32>,
    _dy: &Array4<f32>,
    _p: &Conv2dParams,
) -> Result<Conv2dGrads> {
    Err(Error::invalid("todo"))
}
