//! Elementwise activations that close a fused pattern, and their gradients, mirroring PyTorch's
//! CPU kernels including their NaN behaviour:
//!
//! | activation | forward | backward (PyTorch kernel) |
//! |---|---|---|
//! | `None` | `x` | `dy` |
//! | `Relu` | `torch.relu` = `clamp_min(x, 0)` | `threshold_backward`: `0 if x <= 0 else dy` |
//! | `Relu6` | `torch.nn.functional.relu6` = `hardtanh(x, 0, 6)` | `hardtanh_backward`: `0 if x <= 0 or x >= 6 else dy` |
//!
//! NaN propagates through both forwards. Because PyTorch's backward kernels test for the
//! *zeroing* condition, a NaN input lets the gradient through (`NaN <= 0` is false); this
//! reference does the same.

use ndarray::{ArrayD, Zip};

use crate::error::{Error, Result};
use crate::ops::Activation;

/// ReLU of one element: `clamp_min(x, 0)` (NaN propagates; `-0.0` stays `-0.0`).
#[inline]
fn relu(x: f32) -> f32 {
    if x < 0.0 {
        0.0
    } else {
        x
    }
}

/// ReLU6 of one element: `clamp(x, 0, 6)` (NaN propagates).
#[inline]
fn relu6(x: f32) -> f32 {
    // `f32::clamp` returns NaN for NaN (and cannot panic with these constant bounds).
    x.clamp(0.0, 6.0)
}

/// Applies `act` elementwise: identity, `torch.relu` (`max(x, 0)`) or
/// `torch.nn.functional.relu6` (`clamp(x, 0, 6)`). NaN propagates, as in PyTorch.
pub fn activation(x: &ArrayD<f32>, act: Activation) -> ArrayD<f32> {
    match act {
        Activation::None => x.to_owned(),
        Activation::Relu => x.mapv(relu),
        Activation::Relu6 => x.mapv(relu6),
    }
}

/// Gradient of [`activation`] at input `x` for upstream `dy`, mirroring the autograd formulas
/// PyTorch uses: identity passes `dy`; ReLU is `threshold_backward(dy, x, 0)` (`0` where
/// `x <= 0`, else `dy`); ReLU6 is `hardtanh_backward(dy, x, 0, 6)` (`0` where `x <= 0` or
/// `x >= 6`, else `dy`). A NaN `x` passes `dy` through, as in PyTorch (the kernels test the
/// zeroing condition, which is false for NaN).
///
/// Errors: [`Error::ShapeMismatch`] when `dy`'s shape is not `x`'s.
pub fn activation_backward(
    x: &ArrayD<f32>,
    dy: &ArrayD<f32>,
    act: Activation,
) -> Result<ArrayD<f32>> {
    if x.shape() != dy.shape() {
        return Err(Error::shape(
            "activation_backward (dy vs x)",
            x.shape(),
            dy.shape(),
        ));
    }
    let out = match act {
        Activation::None => dy.to_owned(),
        Activation::Relu => Zip::from(x)
            .and(dy)
            .map_collect(|&x, &d| if x <= 0.0 { 0.0 } else { d }),
        Activation::Relu6 => {
            Zip::from(x)
                .and(dy)
                .map_collect(|&x, &d| if x <= 0.0 || x >= 6.0 { 0.0 } else { d })
        }
    };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{arr1, IxDyn};

    #[test]
    fn forward() {
        let x = arr1(&[-1.0f32, 0.0, 3.0, 6.0, 7.5, f32::NAN]).into_dyn();
        let y = activation(&x, Activation::Relu);
        assert_eq!(&y.as_slice().unwrap()[..5], &[0.0, 0.0, 3.0, 6.0, 7.5]);
        assert!(y[5].is_nan());
        let y = activation(&x, Activation::Relu6);
        assert_eq!(&y.as_slice().unwrap()[..5], &[0.0, 0.0, 3.0, 6.0, 6.0]);
        assert!(y[5].is_nan());
        let y = activation(&x, Activation::None);
        assert_eq!(&y.as_slice().unwrap()[..5], &x.as_slice().unwrap()[..5]);
    }

    #[test]
    fn backward() {
        let x = arr1(&[-1.0f32, 0.0, 3.0, 6.0, 7.5, f32::NAN]).into_dyn();
        let dy = arr1(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).into_dyn();
        let g = activation_backward(&x, &dy, Activation::Relu).unwrap();
        assert_eq!(g.as_slice().unwrap(), &[0.0, 0.0, 3.0, 4.0, 5.0, 6.0]);
        let g = activation_backward(&x, &dy, Activation::Relu6).unwrap();
        assert_eq!(g.as_slice().unwrap(), &[0.0, 0.0, 3.0, 0.0, 0.0, 6.0]);
        let g = activation_backward(&x, &dy, Activation::None).unwrap();
        assert_eq!(g, dy);
    }

    #[test]
    fn error_shape() {
        let x = ArrayD::<f32>::zeros(IxDyn(&[2, 3]));
        let dy = ArrayD::<f32>::zeros(IxDyn(&[3, 2]));
        let e = activation_backward(&x, &dy, Activation::Relu).unwrap_err();
        assert_eq!(
            e.to_string(),
            "shape mismatch in activation_backward (dy vs x): expected [2, 3], got [3, 2]"
        );
    }
}
