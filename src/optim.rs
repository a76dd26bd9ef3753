//! Optimizers: [`Sgd`], stochastic gradient descent with momentum, dampening, weight decay and
//! Nesterov momentum, with the semantics of `torch.optim.SGD`. The update of one element
//! ([`Sgd::update`]) is the formula's one home: the CPU reference
//! ([`crate::reference::train::sgd_step`]) applies it per element, and the GPU kernel
//! (`shaders/train.wgsl`, [`crate::kernels::train::sgd_step`]) computes the same operations in
//! the same order with the same fused multiply-adds.

use crate::error::{Error, Result};

/// `torch.optim.SGD(params, lr, momentum, dampening, weight_decay, nesterov)` settings.
///
/// Per parameter `p` with gradient `g` and momentum buffer `buf`, one step is:
///
/// ```text
/// d = g + weight_decay · p                      (only when weight_decay ≠ 0)
/// buf = d                                       (first step, when momentum ≠ 0)
/// buf = momentum · buf + (1 − dampening) · d    (later steps, when momentum ≠ 0)
/// d = d + momentum · buf  (nesterov)  or  d = buf   (when momentum ≠ 0)
/// p = p − lr · d
/// ```
///
/// evaluated in f32 as PyTorch's vectorized CPU kernels do: each `a + α·b` (`Tensor.add(b,
/// alpha=α)`) is one fused multiply-add `fma(b, α, a)`; `momentum · buf` is rounded before its
/// add.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sgd {
    /// Learning rate (`lr`), ≥ 0.
    pub lr: f32,
    /// Momentum factor, ≥ 0 (0: no momentum buffer).
    pub momentum: f32,
    /// Dampening of the momentum's new gradient, in `[0, 1]` usually (PyTorch accepts any).
    pub dampening: f32,
    /// L2 penalty (`weight_decay`), ≥ 0.
    pub weight_decay: f32,
    /// Nesterov momentum (needs `momentum > 0` and `dampening = 0`).
    pub nesterov: bool,
}

impl Sgd {
    /// Plain SGD with learning rate `lr` (no momentum, dampening or weight decay).
    pub fn new(lr: f32) -> Self {
        Self {
            lr,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        }
    }

    /// `torch.optim.SGD`'s checks: `lr`, `momentum` and `weight_decay` finite and ≥ 0,
    /// `dampening` finite, and Nesterov only with a positive momentum and zero dampening.
    ///
    /// Errors: [`Error::InvalidArgument`] naming the setting (PyTorch's messages).
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("learning rate", self.lr),
            ("momentum value", self.momentum),
            ("weight_decay value", self.weight_decay),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::invalid(format!("SGD: Invalid {name}: {v}")));
            }
        }
        if !self.dampening.is_finite() {
            return Err(Error::invalid(format!(
                "SGD: Invalid dampening value: {}",
                self.dampening
            )));
        }
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            return Err(Error::invalid(
                "SGD: Nesterov momentum requires a momentum and zero dampening",
            ));
        }
        Ok(())
    }

    /// `true` when the step keeps a momentum buffer (`momentum ≠ 0`).
    pub fn has_momentum(&self) -> bool {
        self.momentum != 0.0
    }

    /// One step for one element: returns the new parameter and the new momentum buffer (the
    /// buffer is returned unchanged without momentum). `first` marks the first step, when
    /// PyTorch creates the buffer as a copy of the gradient.
    #[inline]
    pub fn update(&self, p: f32, g: f32, buf: f32, first: bool) -> (f32, f32) {
        let mut d = g;
        if self.weight_decay != 0.0 {
            d = p.mul_add(self.weight_decay, d);
        }
        let mut buf = buf;
        if self.momentum != 0.0 {
            buf = if first {
                d
            } else {
                d.mul_add(1.0 - self.dampening, buf * self.momentum)
            };
            d = if self.nesterov {
                buf.mul_add(self.momentum, d)
            } else {
                buf
            };
        }
        (d.mul_add(-self.lr, p), buf)
    }
}

/// Checks an SGD step: settings ([`Sgd::validate`]); the gradient and, with momentum, the
/// buffer must have the parameter's shape.
///
/// Errors: [`Error::InvalidArgument`] for bad settings; [`Error::ShapeMismatch`] otherwise.
pub fn check_sgd(
    sgd: &Sgd,
    param_shape: &[usize],
    grad_shape: &[usize],
    buf_shape: Option<&[usize]>,
) -> Result<()> {
    sgd.validate()?;
    if grad_shape != param_shape {
        return Err(Error::shape(
            "sgd_step gradient (parameter shape)",
            param_shape,
            grad_shape,
        ));
    }
    if sgd.has_momentum() {
        match buf_shape {
            None => {
                return Err(Error::invalid(
                    "sgd_step: momentum != 0 needs a momentum buffer",
                ))
            }
            Some(b) if b != param_shape => {
                return Err(Error::shape(
                    "sgd_step momentum buffer (parameter shape)",
                    param_shape,
                    b,
                ))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_follows_torch_sgd() {
        // Hand-computed: p = 1, g = 0.5, wd = 0.1 -> d = 0.6; first step buf = 0.6;
        // p = 1 - 0.1 * 0.6 = 0.94.
        let sgd = Sgd {
            lr: 0.1,
            momentum: 0.9,
            dampening: 0.0,
            weight_decay: 0.1,
            nesterov: false,
        };
        let (p, buf) = sgd.update(1.0, 0.5, 123.0, true);
        assert!((buf - 0.6).abs() < 1e-7 && (p - 0.94).abs() < 1e-7);
        // Second step: d = 0.5 + 0.1 * 0.94 = 0.594; buf = 0.9 * 0.6 + 0.594 = 1.134;
        // p = 0.94 - 0.1134.
        let (p2, buf2) = sgd.update(p, 0.5, buf, false);
        assert!((buf2 - 1.134).abs() < 1e-6, "{buf2}");
        assert!((p2 - (0.94 - 0.1134)).abs() < 1e-6, "{p2}");
        // Nesterov: d = d + m * buf.
        let nag = Sgd {
            nesterov: true,
            weight_decay: 0.0,
            ..sgd
        };
        let (p, buf) = nag.update(1.0, 0.5, 0.0, true);
        assert_eq!(buf, 0.5);
        assert!((p - (1.0 - 0.1 * (0.5 + 0.45))).abs() < 1e-7);
        // Plain SGD ignores the buffer.
        let (p, buf) = Sgd::new(0.5).update(2.0, 1.0, 7.0, false);
        assert_eq!((p, buf), (1.5, 7.0));
        // Dampening scales the new gradient after the first step only.
        let damp = Sgd {
            dampening: 0.5,
            weight_decay: 0.0,
            ..sgd
        };
        assert_eq!(damp.update(0.0, 1.0, 0.0, true).1, 1.0);
        assert!((damp.update(0.0, 1.0, 1.0, false).1 - 1.4).abs() < 1e-7);
    }

    #[test]
    fn validation_matches_torch() {
        assert!(Sgd::new(0.01).validate().is_ok());
        let e = Sgd::new(-1.0).validate().unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid argument: SGD: Invalid learning rate: -1"
        );
        assert!(Sgd::new(f32::NAN).validate().is_err());
        let bad = Sgd {
            momentum: -0.1,
            ..Sgd::new(0.1)
        };
        assert!(bad.validate().is_err());
        let bad = Sgd {
            weight_decay: -0.1,
            ..Sgd::new(0.1)
        };
        assert!(bad.validate().is_err());
        let bad = Sgd {
            nesterov: true,
            ..Sgd::new(0.1)
        };
        assert!(bad.validate().unwrap_err().to_string().contains("Nesterov"));
        let bad = Sgd {
            nesterov: true,
            momentum: 0.9,
            dampening: 0.1,
            ..Sgd::new(0.1)
        };
        assert!(bad.validate().is_err());
    }
}
