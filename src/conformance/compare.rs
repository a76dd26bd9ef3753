//! Element-wise comparison with PyTorch's `allclose` rule: `|got - want| <= atol + rtol·|want|`.

use crate::io::state_dict::HostTensor;

/// The outcome of comparing one output tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// Output name.
    pub name: String,
    /// Largest `|got - want|` (0 for exact integer matches; infinite for NaN mismatches).
    pub max_abs_err: f64,
    /// Largest `|got - want| / (atol + rtol·|want|)`: ≤ 1 passes (0/0 counts as 0).
    pub worst_ratio: f64,
    /// Number of elements outside the tolerance.
    pub mismatches: usize,
    /// A shape or dtype disagreement, if any.
    pub problem: Option<String>,
}

impl Comparison {
    /// Whether this output passes.
    pub fn passed(&self) -> bool {
        self.problem.is_none() && self.mismatches == 0
    }
}

/// Compares `got` against `want`. Integer tensors must be exact; float tensors follow the
/// tolerance, with NaN equal to NaN and infinities equal only to themselves.
pub fn compare(
    name: &str,
    got: &HostTensor,
    want: &HostTensor,
    atol: f32,
    rtol: f32,
) -> Comparison {
    let mut c = Comparison {
        name: name.to_string(),
        max_abs_err: 0.0,
        worst_ratio: 0.0,
        mismatches: 0,
        problem: None,
    };
    if got.shape() != want.shape() {
        c.problem = Some(format!(
            "shape {:?}, expected {:?}",
            got.shape(),
            want.shape()
        ));
        return c;
    }
    match (got, want) {
        (HostTensor::I32(g), HostTensor::I32(w)) => {
            for (a, b) in g.iter().zip(w.iter()) {
                let d = (*a as i64 - *b as i64).unsigned_abs() as f64;
                c.max_abs_err = c.max_abs_err.max(d);
                if d != 0.0 {
                    c.mismatches += 1;
                    c.worst_ratio = f64::INFINITY;
                }
            }
        }
        (HostTensor::F32(g), HostTensor::F32(w)) => {
            let (atol, rtol) = (atol as f64, rtol as f64);
            for (a, b) in g.iter().zip(w.iter()) {
                let (a, b) = (*a as f64, *b as f64);
                if a.is_nan() && b.is_nan() {
                    continue;
                }
                let (d, ok) = if a.is_nan() || b.is_nan() || a.is_infinite() || b.is_infinite() {
                    let same = a == b;
                    (if same { 0.0 } else { f64::INFINITY }, same)
                } else {
                    let d = (a - b).abs();
                    (d, d <= atol + rtol * b.abs())
                };
                c.max_abs_err = c.max_abs_err.max(d);
                let allowed = atol + rtol * b.abs();
                let ratio = if d == 0.0 {
                    0.0
                } else if allowed == 0.0 {
                    f64::INFINITY
                } else {
                    d / allowed
                };
                c.worst_ratio = c.worst_ratio.max(ratio);
                if !ok {
                    c.mismatches += 1;
                }
            }
        }
        (HostTensor::F32(_), HostTensor::I32(_)) => {
            c.problem = Some("float32 output where int32 is expected".into());
        }
        (HostTensor::I32(_), HostTensor::F32(_)) => {
            c.problem = Some("int32 output where float32 is expected".into());
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{arr1, ArrayD};

    fn f(v: &[f32]) -> HostTensor {
        HostTensor::F32(arr1(v).into_dyn())
    }

    #[test]
    fn tolerance_rule_and_nan() {
        let c = compare(
            "y",
            &f(&[1.0, f32::NAN]),
            &f(&[1.0001, f32::NAN]),
            0.0,
            1e-3,
        );
        assert!(c.passed(), "{c:?}");
        let c = compare("y", &f(&[1.0]), &f(&[1.01]), 0.0, 1e-3);
        assert!(!c.passed());
        assert_eq!(c.mismatches, 1);
        let c = compare("y", &f(&[f32::NAN]), &f(&[0.0]), 1.0, 1.0);
        assert!(!c.passed());
        let c = compare("y", &f(&[f32::INFINITY]), &f(&[f32::INFINITY]), 0.0, 0.0);
        assert!(c.passed());
    }

    #[test]
    fn exact_when_tolerance_zero_and_shape_checked() {
        assert!(!compare("y", &f(&[1.0]), &f(&[1.0000001]), 0.0, 0.0).passed());
        let c = compare("y", &f(&[1.0, 2.0]), &f(&[1.0]), 1.0, 1.0);
        assert!(c.problem.unwrap().contains("shape [2], expected [1]"));
        let i = |v: i32| HostTensor::I32(ArrayD::from_elem(vec![1], v));
        assert!(!compare("zp", &i(3), &i(4), 10.0, 10.0).passed());
        assert!(compare("zp", &i(3), &f(&[3.0]), 1.0, 1.0).problem.is_some());
    }
}
