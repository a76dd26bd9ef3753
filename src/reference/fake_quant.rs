//! STUB - to be replaced
use crate::error::{Error, Result};
use crate::quant::{QParams, QuantRange};
use ndarray::ArrayD;
/// stub
pub fn fake_quantize(_x: &ArrayD<f32>, _qp: &QParams, _r: QuantRange) -> Result<ArrayD<f32>> {
    Err(Error::invalid("todo"))
}
/// stub
pub fn fake_quantize_backward(
    _x: &ArrayD<f32>,
    _dy: &ArrayD<f32>,
    _qp: &QParams,
    _r: QuantRange,
) -> Result<ArrayD<f32>> {
    Err(Error::invalid("todo"))
}
