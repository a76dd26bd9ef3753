//! STUB - to be replaced
use crate::error::{Error, Result};
use crate::quant::{ObserverSpec, QParams};
use ndarray::ArrayD;
/// stub
pub fn observe_qparams(_x: &ArrayD<f32>, _s: &ObserverSpec) -> Result<QParams> {
    Err(Error::invalid("todo"))
}
