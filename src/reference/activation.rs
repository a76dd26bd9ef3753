//! Elementwise activations that close a fused pattern, and their gradients, mirroring PyTorch's
//! CPU kernels including their NaN behaviour:
//!
//! | activation | forward | backward (PyTorch kernel) |
//! |---|---|---|
//! | `None` | `x` | `dy` |
//! | `Relu` | `torch.relu` = `clamp_min(x, 0)` | `threshold_backward`: `0 if x <= 0 else dy` |
//! | `Relu6` | `torch.nn.functional.relu6` = `hardtanh(x, 0, 6)` | `hardtanh_backward`: `0 if x <= 0 or x >= 6 else dy` |
//! | `LeakyRelu { s }` | `leaky_relu(x, s)` = `x if x > 0 else x * s` | `leaky_relu_backward`: `dy if x > 0 else dy * s` |
//! | `Hardswish` | `hardswish(x)` = `x * min(max(x + 3, 0), 6) / 6` | `hardswish_backward`: `0 if x < -3`, `dy if x >= 3`, else `dy * (x / 3 + 0.5)` |
//!
//! NaN propagates through every forward. Because PyTorch's ReLU / ReLU6 backward kernels test
//! for the *zeroing* condition, a NaN input lets the gradient through (`NaN <= 0` is false);
//! LeakyReLU's backward gives `dy * s` for a NaN input (`NaN > 0` is false); Hardswish's
//! backward gives NaN for a NaN input. This reference does the same.
//!
//! The formulas are those of PyTorch's vectorized CPU kernels (`aten/src/ATen/native/cpu/
//! Activation.cpp`), which serve contiguous f32 tensors, evaluated in the same order in f32
//! (`(x * clamp) / 6`, a division, not a multiplication by 1/6). At exactly `x = 3`
//! the Hardswish gradient is `dy` (the vectorized kernel's `x >= 3` test; PyTorch's scalar
//! and CUDA kernels give `1.5 * dy` there).

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

/// LeakyReLU of one element: `x > 0 ? x : x * slope` (NaN propagates).
#[inline]
fn leaky_relu(x: f32, slope: f32) -> f32 {
    if x > 0.0 {
        x
    } else {
        x * slope
    }
}

/// Hardswish of one element: `x * clamp(x + 3, 0, 6) / 6` in f32, in PyTorch's order
/// (NaN propagates).
#[inline]
fn hardswish(x: f32) -> f32 {
    x * (x + 3.0).clamp(0.0, 6.0) / 6.0
}

/// One activation applied to one element (see the [module docs](self)).
#[inline]
pub fn activate(x: f32, act: Activation) -> f32 {
    match act {
        Activation::None => x,
        Activation::Relu => relu(x),
        Activation::Relu6 => relu6(x),
        Activation::LeakyRelu { negative_slope } => leaky_relu(x, negative_slope),
        Activation::Hardswish => hardswish(x),
    }
}

/// The gradient of one activation at input `x` for upstream `dy` (see the
/// [module docs](self)).
#[inline]
pub fn activate_backward(x: f32, dy: f32, act: Activation) -> f32 {
    match act {
        Activation::None => dy,
        Activation::Relu => {
            if x <= 0.0 {
                0.0
            } else {
                dy
            }
        }
        Activation::Relu6 => {
            if x <= 0.0 || x >= 6.0 {
                0.0
            } else {
                dy
            }
        }
        Activation::LeakyRelu { negative_slope } => {
            if x > 0.0 {
                dy
            } else {
                dy * negative_slope
            }
        }
        Activation::Hardswish => {
            if x < -3.0 {
                0.0
            } else if x >= 3.0 {
                dy
            } else {
                // NaN lands here: dy * NaN = NaN, as in PyTorch's vectorized kernel.
                dy * (x / 3.0 + 0.5)
            }
        }
    }
}

/// Applies `act` elementwise: identity, `torch.relu` (`max(x, 0)`),
/// `torch.nn.functional.relu6` (`clamp(x, 0, 6)`), `leaky_relu(x, negative_slope)` or
/// `hardswish`. NaN propagates, as in PyTorch.
pub fn activation(x: &ArrayD<f32>, act: Activation) -> ArrayD<f32> {
    match act {
        Activation::None => x.to_owned(),
        act => x.mapv(|v| activate(v, act)),
    }
}

/// Gradient of [`activation`] at input `x` for upstream `dy`, mirroring the autograd formulas
/// PyTorch uses: identity passes `dy`; ReLU is `threshold_backward(dy, x, 0)` (`0` where
/// `x <= 0`, else `dy`); ReLU6 is `hardtanh_backward(dy, x, 0, 6)` (`0` where `x <= 0` or
/// `x >= 6`, else `dy`); LeakyReLU is `leaky_relu_backward` (`dy` where `x > 0`, else
/// `dy * negative_slope`); Hardswish is `hardswish_backward` (`0` where `x < -3`, `dy` where
/// `x >= 3`, else `dy * (x / 3 + 0.5)`). For ReLU / ReLU6 a NaN `x` passes `dy` through, as in
/// PyTorch (the kernels test the zeroing condition, which is false for NaN); see the
/// [module docs](self) for the others.
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
        act => Zip::from(x)
            .and(dy)
            .map_collect(|&x, &d| activate_backward(x, d, act)),
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
    fn leaky_relu_and_hardswish() {
        let x = arr1(&[-4.0f32, -3.0, -1.5, -0.0, 0.0, 1.0, 3.0, 4.0, f32::NAN]).into_dyn();
        let leaky = Activation::LeakyRelu {
            negative_slope: 0.1,
        };
        let y = activation(&x, leaky);
        let want = [
            -4.0f32 * 0.1,
            -3.0 * 0.1,
            -1.5 * 0.1,
            -0.0,
            0.0,
            1.0,
            3.0,
            4.0,
        ];
        assert_eq!(&y.as_slice().unwrap()[..8], &want);
        assert!(y[4].to_bits() == 0 && y[3].to_bits() == (-0.0f32).to_bits());
        assert!(y[8].is_nan());
        let y = activation(&x, Activation::Hardswish);
        // hardswish(-1.5) = -1.5 * 1.5 / 6 = -0.375; hardswish(1) = 1 * 4 / 6.
        let want = [0.0f32, 0.0, -0.375, -0.0, 0.0, 4.0 / 6.0, 3.0, 4.0];
        for (g, w) in y.iter().zip(want) {
            assert_eq!(
                g.to_bits() & 0x7fff_ffff,
                w.to_bits() & 0x7fff_ffff,
                "{g} vs {w}"
            );
        }
        // -4 * 0 / 6 is -0.0, as in PyTorch.
        assert_eq!(y[0].to_bits(), (-0.0f32).to_bits());
        assert!(y[8].is_nan());

        let dy = ArrayD::from_elem(x.raw_dim(), 2.0f32);
        let g = activation_backward(&x, &dy, leaky).unwrap();
        assert_eq!(
            &g.as_slice().unwrap()[..8],
            &[0.2, 0.2, 0.2, 0.2, 0.2, 2.0, 2.0, 2.0]
        );
        assert_eq!(g[8], 0.2); // NaN > 0 is false: dy * slope
        let g = activation_backward(&x, &dy, Activation::Hardswish).unwrap();
        // x = -3: 2 * (-1 + 0.5) = -1; x = -1.5: 2 * 0 = 0; x = ±0: 1; x = 1: 2 * (1/3 + 0.5).
        let want = [
            0.0f32,
            -1.0,
            0.0,
            1.0,
            1.0,
            2.0 * (1.0 / 3.0 + 0.5),
            2.0,
            2.0,
        ];
        assert_eq!(&g.as_slice().unwrap()[..8], &want);
        assert!(g[8].is_nan());
    }

    #[test]
    fn parse() {
        assert_eq!(
            Activation::parse("hardswish").unwrap(),
            Activation::Hardswish
        );
        assert_eq!(
            Activation::parse("leaky_relu").unwrap(),
            Activation::LeakyRelu {
                negative_slope: 0.01
            }
        );
        assert_eq!(
            Activation::parse("leaky_relu:0.2").unwrap(),
            Activation::LeakyRelu {
                negative_slope: 0.2
            }
        );
        assert!(Activation::parse("leaky_relu:x").is_err());
        let e = Activation::parse("gelu").unwrap_err().to_string();
        assert!(e.contains("unknown activation `gelu`"), "{e}");
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
