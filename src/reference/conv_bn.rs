//! STUB - to be replaced
use crate::error::{Error, Result};
use crate::ops::{Activation, BatchNorm, Conv2d, Folded, QatConfig, QatForward, QatGrads};
use ndarray::Array4;
/// stub
pub fn conv_bn_act_eval(
    _x: &Array4<f32>,
    _c: &Conv2d,
    _bn: &BatchNorm,
    _a: Activation,
) -> Result<(Array4<f32>, Folded)> {
    Err(Error::invalid("todo"))
}
/// stub
pub fn conv_bn_qat_forward(
    _x: &Array4<f32>,
    _c: &Conv2d,
    _bn: &BatchNorm,
    _cfg: &QatConfig,
) -> Result<QatForward> {
    Err(Error::invalid("todo"))
}
/// stub
pub fn conv_bn_qat_backward(
    _x: &Array4<f32>,
    _dy: &Array4<f32>,
    _c: &Conv2d,
    _bn: &BatchNorm,
    _cfg: &QatConfig,
    _f: &QatForward,
) -> Result<QatGrads> {
    Err(Error::invalid("todo"))
}
