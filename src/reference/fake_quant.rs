//! Fake quantization (quantize then dequantize) and its straight-through gradient, mirroring
//! `torch.fake_quantize_per_tensor_affine` / `torch.fake_quantize_per_channel_affine` (the
//! `cachemask` variants PyTorch's autograd uses) on the CPU.
//!
//! The arithmetic, which the GPU kernels reproduce bit for bit, is per element:
//!
//! ```text
//! inv = 1.0f32 / scale                     // once per channel, in f32 (multiply, never divide)
//! qf  = round_ties_even(x * inv) + zp      // zero point added after rounding
//! q   = clamp(qf, quant_min, quant_max)    // NaN propagates
//! y   = (q - zp) * scale
//! dx  = dy if quant_min <= qf <= quant_max else 0
//! ```
//!
//! Differences from PyTorch, all on inputs PyTorch's own kernels treat inconsistently:
//! * **NaN propagates**: a NaN input gives a NaN output. PyTorch's CPU kernel turns NaN into
//!   `quant_min` (an artefact of casting NaN to an integer). The gradient at a NaN input is 0
//!   (NaN is not in range), as in PyTorch.
//! * `±inf` map to `quant_max` / `quant_min` on both the per-tensor and the per-channel path
//!   (PyTorch's per-channel CPU path casts to int64 before clamping and maps both to
//!   `quant_min`).
//! * Scales are validated (positive and finite, [`crate::Error::InvalidScale`]); PyTorch
//!   accepts zero and negative scales.
//! * Masked-out gradients are exactly `+0.0`. PyTorch multiplies `dy` by the mask, which gives
//!   `-0.0` for a negative `dy` (numerically equal) and NaN for an infinite or NaN `dy`.
//! * `q - zp` is computed in f32, which is exact while `|q - zp| < 2^24` (every 8-bit and
//!   16-bit range).

use ndarray::{ArrayD, IxDyn};

use crate::error::{Error, Result};
use crate::quant::{QParams, QuantRange};

/// One element of fake quantization, the single formula both the per-tensor and per-channel
/// paths use (and the GPU kernels reproduce). Mirrors the per-element body of PyTorch's
/// `fake_quantize_per_tensor_affine_cachemask` CPU kernel.
///
/// `inv_scale` must be `1.0f32 / scale` (computed once by the caller); `zero_point`, `qmin`
/// and `qmax` are the integers as f32. Returns `(y, in_range)` where `in_range` is the
/// straight-through mask `qmin <= round_ties_even(x * inv_scale) + zero_point <= qmax`.
/// A NaN `x` gives `(NaN, false)`; `±inf` give the `qmax` / `qmin` values with `false`.
/// The caller guarantees `qmin < qmax` (neither NaN).
#[inline(always)]
pub fn fake_quant_scalar(
    x: f32,
    scale: f32,
    inv_scale: f32,
    zero_point: f32,
    qmin: f32,
    qmax: f32,
) -> (f32, bool) {
    let qf = (x * inv_scale).round_ties_even() + zero_point;
    let in_range = qmin <= qf && qf <= qmax;
    // Branch-free NaN-propagating clamp (`f32::clamp` semantics without its panic path).
    let q = if qf < qmin {
        qmin
    } else if qf > qmax {
        qmax
    } else {
        qf
    };
    ((q - zero_point) * scale, in_range)
}

/// Per-channel constants: `(scale, 1/scale, zero_point as f32)`.
fn channel_constants(qp: &QParams) -> Vec<(f32, f32, f32)> {
    qp.scale
        .iter()
        .zip(&qp.zero_point)
        .map(|(&s, &z)| (s, 1.0f32 / s, z as f32))
        .collect()
}

/// The element count of one channel block: the product of the dims after `axis`.
fn inner_size(shape: &[usize], axis: usize) -> usize {
    shape[axis + 1..].iter().product()
}

/// Runs `f(x, consts, i)` over every element in standard (row-major) order, with the constants
/// of the element's channel. Shared by forward, backward and mask.
fn for_each_channel_block(
    x: &[f32],
    shape: &[usize],
    qp: &QParams,
    mut f: impl FnMut(usize, &[f32], (f32, f32, f32)),
) {
    let consts = channel_constants(qp);
    if x.is_empty() {
        return;
    }
    match qp.axis {
        None => f(0, x, consts[0]),
        Some(axis) => {
            let inner = inner_size(shape, axis);
            let c = consts.len();
            // x is non-empty, so inner >= 1 and c >= 1.
            for (block, chunk) in x.chunks_exact(inner).enumerate() {
                f(block * inner, chunk, consts[block % c]);
            }
        }
    }
}

/// A contiguous row-major copy (or view) of `x` as a slice.
fn standard_slice<'a>(x: &'a ndarray::CowArray<'_, f32, IxDyn>) -> Result<&'a [f32]> {
    x.as_slice()
        .ok_or_else(|| Error::invalid("internal: standard-layout array is not contiguous"))
}

fn build(shape: &[usize], data: Vec<f32>) -> Result<ArrayD<f32>> {
    ArrayD::from_shape_vec(IxDyn(shape), data)
        .map_err(|e| Error::invalid(format!("internal: cannot build output array: {e}")))
}

/// Fake-quantizes `x` with per-tensor or per-channel `qp` over `range`: the forward of
/// `torch.fake_quantize_per_tensor_affine` (scalar scale and zero point) and
/// `torch.fake_quantize_per_channel_affine` (int32 zero points), computed as described in the
/// [module docs](self).
///
/// Unlike PyTorch, **a NaN input gives a NaN output** (PyTorch gives `quant_min`'s value), and
/// `±inf` give the `quant_max` / `quant_min` values on the per-channel path too.
///
/// Errors: everything [`QParams::validate`] reports ([`Error::InvalidQuantRange`],
/// [`Error::InvalidScale`], [`Error::ZeroPointOutOfRange`], [`Error::AxisOutOfRange`],
/// [`Error::ShapeMismatch`]).
pub fn fake_quantize(x: &ArrayD<f32>, qp: &QParams, range: QuantRange) -> Result<ArrayD<f32>> {
    qp.validate(x.shape(), range)?;
    let (qmin, qmax) = (range.quant_min as f32, range.quant_max as f32);
    let xs = x.as_standard_layout();
    let src = standard_slice(&xs)?;
    let mut out = vec![0.0f32; src.len()];
    for_each_channel_block(src, x.shape(), qp, |start, chunk, (s, inv, z)| {
        for (o, &v) in out[start..start + chunk.len()].iter_mut().zip(chunk) {
            *o = fake_quant_scalar(v, s, inv, z, qmin, qmax).0;
        }
    });
    build(x.shape(), out)
}

/// Fake quantization and its straight-through mask in one pass: `(y, mask)` with `mask` 1.0
/// where `quant_min <= round_ties_even(x * inv) + zp <= quant_max` and 0.0 elsewhere (NaN
/// inputs included). Mirrors `torch.fake_quantize_per_tensor_affine_cachemask` /
/// `torch.fake_quantize_per_channel_affine_cachemask` (which return the mask as bool).
/// Same semantics and errors as [`fake_quantize`].
pub fn fake_quantize_with_mask(
    x: &ArrayD<f32>,
    qp: &QParams,
    range: QuantRange,
) -> Result<(ArrayD<f32>, ArrayD<f32>)> {
    qp.validate(x.shape(), range)?;
    let (qmin, qmax) = (range.quant_min as f32, range.quant_max as f32);
    let xs = x.as_standard_layout();
    let src = standard_slice(&xs)?;
    let mut y = vec![0.0f32; src.len()];
    let mut mask = vec![0.0f32; src.len()];
    for_each_channel_block(src, x.shape(), qp, |start, chunk, (s, inv, z)| {
        let end = start + chunk.len();
        for ((yo, mo), &v) in y[start..end]
            .iter_mut()
            .zip(&mut mask[start..end])
            .zip(chunk)
        {
            let (val, ok) = fake_quant_scalar(v, s, inv, z, qmin, qmax);
            *yo = val;
            *mo = if ok { 1.0 } else { 0.0 };
        }
    });
    Ok((build(x.shape(), y)?, build(x.shape(), mask)?))
}

/// Straight-through gradient of [`fake_quantize`] for upstream `dy`: `dx = dy` where
/// `quant_min <= round_ties_even(x * inv) + zp <= quant_max`, else exactly 0. Mirrors
/// `torch.fake_quantize_per_tensor_affine` / `torch.fake_quantize_per_channel_affine`
/// backward (`_fake_quantize_per_tensor_affine_cachemask_backward`, i.e. `dy * mask`).
///
/// A NaN `x` is not in range, so its gradient is 0. Where the mask is 0 the result is `+0.0`,
/// even for a negative, NaN or infinite `dy` (PyTorch's `dy * mask` gives `-0.0` / NaN there).
///
/// Errors: those of [`fake_quantize`], and [`Error::ShapeMismatch`] when `dy`'s shape is not
/// `x`'s.
pub fn fake_quantize_backward(
    x: &ArrayD<f32>,
    dy: &ArrayD<f32>,
    qp: &QParams,
    range: QuantRange,
) -> Result<ArrayD<f32>> {
    qp.validate(x.shape(), range)?;
    if dy.shape() != x.shape() {
        return Err(Error::shape(
            "fake_quantize_backward (dy vs x)",
            x.shape(),
            dy.shape(),
        ));
    }
    let (qmin, qmax) = (range.quant_min as f32, range.quant_max as f32);
    let xs = x.as_standard_layout();
    let src = standard_slice(&xs)?;
    let dys = dy.as_standard_layout();
    let g = standard_slice(&dys)?;
    let mut out = vec![0.0f32; src.len()];
    for_each_channel_block(src, x.shape(), qp, |start, chunk, (s, inv, z)| {
        let end = start + chunk.len();
        for ((o, &d), &v) in out[start..end].iter_mut().zip(&g[start..end]).zip(chunk) {
            let ok = fake_quant_scalar(v, s, inv, z, qmin, qmax).1;
            *o = if ok { d } else { 0.0 };
        }
    });
    build(x.shape(), out)
}

/// ONNX `QuantizeLinear` of one value: `saturate(round_half_to_even(x / scale) +
/// zero_point)` into `[qmin, qmax]`, a division as the ONNX operator defines it (PyTorch's
/// fake quantization multiplies by `1/scale`, which rounds differently in rare ties); NaN
/// gives code 0, as onnxruntime's cast does.
#[inline(always)]
pub fn quantize_linear_scalar(x: f32, scale: f32, zero_point: i32, qmin: i32, qmax: i32) -> i32 {
    let q = (x / scale).round_ties_even() + zero_point as f32;
    if q.is_nan() {
        0
    } else {
        q.clamp(qmin as f32, qmax as f32) as i32
    }
}

/// ONNX `DequantizeLinear` of one code: `(q − zero_point) · scale` in f32.
#[inline(always)]
pub fn dequantize_linear_scalar(q: i64, zero_point: i64, scale: f32) -> f32 {
    (q - zero_point) as f32 * scale
}

/// ONNX `QuantizeLinear` followed by `DequantizeLinear` with the same qparams (per tensor,
/// or per channel along `qp.axis`): each element through [`quantize_linear_scalar`] and
/// [`dequantize_linear_scalar`] — what a QDQ pair computes on a float value.
///
/// Errors: everything [`QParams::validate`] reports.
pub fn fake_quantize_onnx(x: &ArrayD<f32>, qp: &QParams, range: QuantRange) -> Result<ArrayD<f32>> {
    qp.validate(x.shape(), range)?;
    let xs = x.as_standard_layout();
    let src = standard_slice(&xs)?;
    let mut out = vec![0.0f32; src.len()];
    let mut c = 0usize;
    for_each_channel_block(src, x.shape(), qp, |start, chunk, (s, _, _)| {
        let z = qp.zero_point[c % qp.zero_point.len()];
        c += 1;
        for (o, &v) in out[start..start + chunk.len()].iter_mut().zip(chunk) {
            let q = quantize_linear_scalar(v, s, z, range.quant_min, range.quant_max);
            *o = dequantize_linear_scalar(i64::from(q), i64::from(z), s);
        }
    });
    build(x.shape(), out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{arr1, Array, ArrayD, IxDyn};

    fn t(v: &[f32]) -> ArrayD<f32> {
        arr1(v).into_dyn()
    }

    fn fq(v: &[f32], s: f32, z: i32, r: QuantRange) -> Vec<f32> {
        fake_quantize(&t(v), &QParams::per_tensor(s, z), r)
            .unwrap()
            .iter()
            .copied()
            .collect()
    }

    #[test]
    fn ties_to_even() {
        let y = fq(&[0.5, 1.5, 2.5, -0.5, -2.5], 1.0, 0, QuantRange::INT8);
        assert_eq!(y, vec![0.0, 2.0, 2.0, -0.0, -2.0]);
        // -0.5 rounds to -0.0; adding the zero point 0.0 gives +0.0.
        assert!(y[3].is_sign_positive());
        let y = fq(
            &[0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5],
            1.0,
            3,
            QuantRange::UINT8,
        );
        assert_eq!(y, vec![0.0, 2.0, 2.0, 4.0, 0.0, -2.0, -2.0, -3.0]);
    }

    #[test]
    fn reciprocal_not_division() {
        let s = 0.3f32;
        let x = -74.25f32;
        let r = QuantRange::new(-1000, 1000).unwrap();
        let y = fq(&[x], s, 0, r)[0];
        assert_eq!(y, -248.0 * s);
        // Division would have given -247.
        assert_eq!((x / s).round_ties_even(), -247.0);
    }

    #[test]
    fn bounds_and_mask() {
        let r = QuantRange::new(-10, 127).unwrap();
        let x = t(&[-1.0, -0.5, -0.51, 12.7, 12.75, 12.76, 12.8]);
        let qp = QParams::per_tensor(0.1, 0);
        let y = fake_quantize(&x, &qp, r).unwrap();
        let want = [-1.0f32, -0.5, -0.5, 12.7, 12.7, 12.7, 12.7];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        let dy = ArrayD::from_elem(IxDyn(&[7]), 2.0f32);
        let dx = fake_quantize_backward(&x, &dy, &qp, r).unwrap();
        assert_eq!(dx.as_slice().unwrap(), &[2.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0]);
        let (y2, m) = fake_quantize_with_mask(&x, &qp, r).unwrap();
        assert_eq!(y2, y);
        assert_eq!(m.as_slice().unwrap(), &[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn nan_propagates_and_inf_clamps() {
        let x = t(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0]);
        let qp = QParams::per_tensor(0.1, 10);
        let y = fake_quantize(&x, &qp, QuantRange::UINT8).unwrap();
        assert!(y[0].is_nan());
        assert_eq!(y[1], (255.0 - 10.0) * 0.1);
        assert_eq!(y[2], (0.0 - 10.0) * 0.1);
        assert_eq!(y[3], 0.0);
        assert!(y[3].is_sign_positive());
        let dy = ArrayD::from_elem(IxDyn(&[4]), 1.0f32);
        let dx = fake_quantize_backward(&x, &dy, &qp, QuantRange::UINT8).unwrap();
        assert_eq!(dx.as_slice().unwrap(), &[0.0, 0.0, 0.0, 1.0]);
        // Per channel too.
        let qp = QParams::per_channel(vec![0.1], vec![0], 0).unwrap();
        let y = fake_quantize(&t(&[f32::NAN]), &qp, QuantRange::INT8).unwrap();
        assert!(y[0].is_nan());
    }

    #[test]
    fn per_channel_axes_and_layouts() {
        let x = Array::from_shape_fn(IxDyn(&[2, 3, 4]), |d| {
            (d[0] * 12 + d[1] * 4 + d[2]) as f32 * 0.37 - 4.0
        });
        let r = QuantRange::INT8;
        for axis in 0..3 {
            let c = x.shape()[axis];
            let scales: Vec<f32> = (0..c).map(|i| 0.05 + 0.03 * i as f32).collect();
            let zps: Vec<i32> = (0..c).map(|i| i as i32 - 1).collect();
            let qp = QParams::per_channel(scales.clone(), zps.clone(), axis).unwrap();
            let y = fake_quantize(&x, &qp, r).unwrap();
            for (idx, &v) in x.indexed_iter() {
                let ch = idx[axis];
                let want = fq(&[v], scales[ch], zps[ch], r)[0];
                assert_eq!(y[&idx], want);
            }
            // A non-standard-layout input (owned, axes reversed) gives the same answer per
            // element as its standard-layout copy.
            let xr: ArrayD<f32> = x.clone().reversed_axes();
            assert!(!xr.is_standard_layout());
            let qpt = QParams::per_channel(scales.clone(), zps.clone(), 2 - axis).unwrap();
            let a = fake_quantize(&xr, &qpt, r).unwrap();
            let b = fake_quantize(&xr.as_standard_layout().to_owned(), &qpt, r).unwrap();
            assert_eq!(a, b);
            assert_eq!(a, y.t());
            let dy = ArrayD::from_elem(xr.raw_dim(), 1.0f32);
            let dx = fake_quantize_backward(&xr, &dy, &qpt, r).unwrap();
            let (_, m) = fake_quantize_with_mask(&xr, &qpt, r).unwrap();
            assert_eq!(dx, m);
        }
    }

    #[test]
    fn empty_input() {
        let x = ArrayD::<f32>::zeros(IxDyn(&[0, 3]));
        let qp = QParams::per_channel(vec![0.1; 3], vec![0; 3], 1).unwrap();
        let y = fake_quantize(&x, &qp, QuantRange::INT8).unwrap();
        assert_eq!(y.shape(), &[0, 3]);
        let dx = fake_quantize_backward(&x, &x, &qp, QuantRange::INT8).unwrap();
        assert_eq!(dx.shape(), &[0, 3]);
    }

    #[test]
    fn error_invalid_scale() {
        let x = t(&[1.0]);
        for s in [0.0f32, -0.1, f32::NAN, f32::INFINITY] {
            let e = fake_quantize(&x, &QParams::per_tensor(s, 0), QuantRange::INT8).unwrap_err();
            assert!(matches!(e, Error::InvalidScale { .. }));
            assert_eq!(
                e.to_string(),
                format!("scale must be positive and finite, got {s} (channel 0)")
            );
        }
        let qp = QParams::per_channel(vec![0.1, 0.0], vec![0, 0], 0).unwrap();
        let e = fake_quantize(&t(&[1.0, 2.0]), &qp, QuantRange::INT8).unwrap_err();
        assert_eq!(
            e.to_string(),
            "scale must be positive and finite, got 0 (channel 1)"
        );
    }

    #[test]
    fn error_zero_point_out_of_range() {
        let e = fake_quantize(
            &t(&[1.0]),
            &QParams::per_tensor(0.1, 300),
            QuantRange::UINT8,
        )
        .unwrap_err();
        assert!(matches!(e, Error::ZeroPointOutOfRange { .. }));
        assert_eq!(
            e.to_string(),
            "zero_point 300 (channel 0) is outside [quant_min, quant_max] = [0, 255]"
        );
    }

    #[test]
    fn error_invalid_quant_range() {
        let r = QuantRange {
            quant_min: 6,
            quant_max: 5,
        };
        let e = fake_quantize(&t(&[1.0]), &QParams::per_tensor(0.1, 5), r).unwrap_err();
        assert!(matches!(e, Error::InvalidQuantRange { .. }));
        assert_eq!(
            e.to_string(),
            "quant_min (6) must not be greater than quant_max (5)"
        );
    }

    /// PyTorch accepts `quant_min == quant_max`: every value quantizes to that code, and the
    /// gradient passes only where `round(x / scale) + zp` is that code.
    #[test]
    fn single_value_range() {
        let r = QuantRange::new(5, 5).unwrap();
        let x = t(&[-1.0, 0.0, 0.04, 0.06, 1.0]);
        let qp = QParams::per_tensor(0.1, 5);
        assert_eq!(
            fake_quantize(&x, &qp, r).unwrap().as_slice().unwrap(),
            &[0.0; 5]
        );
        let dy = t(&[1.0; 5]);
        let dx = fake_quantize_backward(&x, &dy, &qp, r).unwrap();
        assert_eq!(dx.as_slice().unwrap(), &[0.0, 1.0, 1.0, 0.0, 0.0]);
        let qp = QParams::per_tensor(0.1, 4);
        let e = fake_quantize(&x, &qp, r).unwrap_err();
        assert!(matches!(e, Error::ZeroPointOutOfRange { .. }), "{e}");
    }

    #[test]
    fn error_axis_out_of_range() {
        let qp = QParams::per_channel(vec![0.1], vec![0], 2).unwrap();
        let e = fake_quantize(&t(&[1.0]), &qp, QuantRange::INT8).unwrap_err();
        assert!(matches!(e, Error::AxisOutOfRange { .. }));
        assert_eq!(
            e.to_string(),
            "axis 2 is out of range for a tensor of rank 1"
        );
    }

    #[test]
    fn error_per_channel_length() {
        let x = ArrayD::<f32>::zeros(IxDyn(&[2, 3]));
        let qp = QParams::per_channel(vec![0.1; 2], vec![0; 2], 1).unwrap();
        let e = fake_quantize(&x, &qp, QuantRange::INT8).unwrap_err();
        assert!(matches!(e, Error::ShapeMismatch { .. }));
        assert_eq!(
            e.to_string(),
            "shape mismatch in per-channel scale (axis 1 of input [2, 3]): expected [3], got [2]"
        );
    }

    #[test]
    fn error_dy_shape() {
        let x = t(&[1.0, 2.0]);
        let dy = t(&[1.0]);
        let e = fake_quantize_backward(&x, &dy, &QParams::per_tensor(0.1, 0), QuantRange::INT8)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "shape mismatch in fake_quantize_backward (dy vs x): expected [2], got [1]"
        );
    }
}
