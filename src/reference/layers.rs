//! The remaining layers of the MNIST example network: 2-D max pooling, linear and
//! `log_softmax`, mirroring `torch.nn.functional.max_pool2d`, `linear` and `log_softmax`.

use ndarray::{Array1, Array2, Array4, ArrayD, Axis, IxDyn};

use crate::ops::{BinaryOp, PoolMode, PoolWindow};

use crate::error::Result;

/// 2-D max pooling of an NCHW tensor with a square `kernel` and `stride`, no padding, no
/// dilation, floor mode: mirrors `torch.nn.functional.max_pool2d(x, kernel, stride)`. The
/// output is `[N, C, (H - k) / s + 1, (W - k) / s + 1]`. NaN propagates (a window containing
/// NaN gives NaN, as PyTorch's kernel does).
///
/// Errors: [`crate::Error::InvalidArgument`] for a zero kernel or stride, or a kernel larger
/// than the input's height or width.
pub fn max_pool2d(x: &Array4<f32>, kernel: usize, stride: usize) -> Result<Array4<f32>> {
    let (n, c, h, w) = x.dim();
    let (oh, ow) = max_pool2d_output(h, w, kernel, stride)?;
    let mut out = Array4::<f32>::zeros((n, c, oh, ow));
    for ((b, ch, i, j), o) in out.indexed_iter_mut() {
        let mut m = f32::NEG_INFINITY;
        for ki in 0..kernel {
            for kj in 0..kernel {
                let v = x[[b, ch, i * stride + ki, j * stride + kj]];
                if v > m || v.is_nan() {
                    m = v;
                    if v.is_nan() {
                        break;
                    }
                }
            }
            if m.is_nan() {
                break;
            }
        }
        *o = m;
    }
    Ok(out)
}

/// 2-D max pooling with padding ([`crate::ops::Pool2d`]: `torch.nn.functional.max_pool2d(x,
/// kernel, stride, padding)`, floor mode, no dilation) on any ordered element type: f32
/// (NaN propagates) and int8 codes ([`crate::reference::int8::max_pool2d_pad_int8`]) share
/// this one window walk. Padded positions are skipped (never the maximum), and every window
/// holds at least one input position ([`crate::ops::Pool2d::output`] requires padding <
/// kernel).
///
/// Errors: those of [`crate::ops::Pool2d::output`].
#[allow(clippy::eq_op)] // `v != v` is the generic NaN test.
pub fn max_pool2d_pad<T: Copy + PartialOrd + Default>(
    x: &Array4<T>,
    p: &crate::ops::Pool2d,
) -> Result<Array4<T>> {
    let (n, c, h, w) = x.dim();
    let (oh, ow) = p.output(h, w)?;
    let [kh, kw] = p.kernel;
    let [sh, sw] = p.stride;
    let [ph, pw] = p.padding;
    let mut out = Array4::<T>::default((n, c, oh, ow));
    for ((b, ch, i, j), o) in out.indexed_iter_mut() {
        let mut m: Option<T> = None;
        'window: for ki in 0..kh {
            let Some(y) = (i * sh + ki).checked_sub(ph).filter(|&y| y < h) else {
                continue;
            };
            for kj in 0..kw {
                let Some(xx) = (j * sw + kj).checked_sub(pw).filter(|&xx| xx < w) else {
                    continue;
                };
                let v = x[[b, ch, y, xx]];
                if v != v {
                    m = Some(v);
                    break 'window;
                }
                if m.is_none_or(|m| v > m) {
                    m = Some(v);
                }
            }
        }
        // Padding < kernel leaves at least one input position in every window.
        *o = m.unwrap_or_default();
    }
    Ok(out)
}

/// Global average pooling of an NCHW tensor to `[N, C, 1, 1]` (ONNX `GlobalAveragePool`,
/// `torch.nn.AdaptiveAvgPool2d(1)`): ndarray's `mean_axis` over the `H·W` values of each
/// channel (its f32 sum, then the division), the summation the ONNX evaluator uses too, so
/// both observe the same calibration ranges.
///
/// Errors: those of [`crate::ops::global_pool_extent`].
pub fn global_avg_pool2d(x: &Array4<f32>) -> Result<Array4<f32>> {
    let (n, c, _, _) = x.dim();
    let count = crate::ops::global_pool_extent(x.shape())?;
    let flat = x
        .as_standard_layout()
        .into_owned()
        .into_dyn()
        .into_shape_with_order(ndarray::IxDyn(&[n, c, count]))
        .map_err(|e| crate::Error::invalid(format!("global average pooling: {e}")))?;
    let mean = flat
        .mean_axis(Axis(2))
        .ok_or_else(|| crate::Error::invalid("global average pooling over an empty extent"))?;
    mean.into_shape_with_order((n, c, 1, 1))
        .map_err(|e| crate::Error::invalid(format!("global average pooling: {e}")))
}

/// The pooling geometry (one home: [`crate::ops::max_pool2d_output`]).
pub use crate::ops::max_pool2d_output;

/// 2-D pooling with ONNX's full window (`MaxPool` / `AveragePool`: kernel, strides,
/// dilations, per-side pads, `ceil_mode`, `count_include_pad`; PyTorch's `MaxPool2d` /
/// `AvgPool2d`) of an NCHW tensor. Each window is walked row by row: max pooling keeps
/// `v` when `v > m` or `v` is NaN (so NaN propagates), starting from −∞; average pooling
/// sums the input positions in that order from `0.0` in f32 and divides once by the count
/// ([`PoolMode::Avg`]). The GPU kernel follows the same order, bit for bit.
///
/// Errors: those of [`PoolWindow::output_shape`].
pub fn pool2d(x: &Array4<f32>, p: &PoolWindow, mode: PoolMode) -> Result<Array4<f32>> {
    let [n, c, oh, ow] = p.output_shape(x.shape())?;
    let (h, w) = (x.dim().2, x.dim().3);
    let [kh, kw] = p.kernel;
    let [sh, sw] = p.stride;
    let [dh, dw] = p.dilation;
    let [pt, pl, pb, pr] = p.pads;
    let mut out = Array4::<f32>::zeros((n, c, oh, ow));
    for ((b, ch, oy, ox), o) in out.indexed_iter_mut() {
        let mut acc = if mode == PoolMode::Max {
            f32::NEG_INFINITY
        } else {
            0.0
        };
        let mut count = 0usize;
        let mut padded_count = 0usize;
        for ky in 0..kh {
            // Position in the padded input, then in the input (negative: in the top pad).
            let yp = oy * sh + ky * dh;
            for kx in 0..kw {
                let xp = ox * sw + kx * dw;
                if yp < h + pt + pb && xp < w + pl + pr {
                    padded_count += 1;
                }
                if yp < pt || xp < pl || yp - pt >= h || xp - pl >= w {
                    continue;
                }
                let v = x[[b, ch, yp - pt, xp - pl]];
                count += 1;
                match mode {
                    PoolMode::Max => {
                        if v > acc || v.is_nan() {
                            acc = v;
                        }
                    }
                    PoolMode::Avg { .. } => acc += v,
                }
            }
        }
        *o = match mode {
            PoolMode::Max => acc,
            PoolMode::Avg { count_include_pad } => {
                let div = if count_include_pad {
                    padded_count
                } else {
                    count
                };
                // Pads < kernel: every window holds an input position, so div >= 1.
                acc / div.max(1) as f32
            }
        };
    }
    Ok(out)
}

/// Zero-pads an NCHW tensor by `[top, left, bottom, right]` (`torch.nn.functional.pad`;
/// the asymmetric pads of an ONNX Conv).
///
/// Errors: those of [`crate::ops::pad2d_output_shape`].
pub fn zero_pad2d(x: &Array4<f32>, pads: [usize; 4]) -> Result<Array4<f32>> {
    let [n, c, ph, pw] = crate::ops::pad2d_output_shape(x.shape(), pads)?;
    let (h, w) = (x.dim().2, x.dim().3);
    let mut out = Array4::<f32>::zeros((n, c, ph, pw));
    out.slice_mut(ndarray::s![
        ..,
        ..,
        pads[0]..pads[0] + h,
        pads[1]..pads[1] + w
    ])
    .assign(x);
    Ok(out)
}

/// `a op b` with numpy (ONNX multidirectional) broadcasting ([`crate::ops::broadcast_shape`]),
/// one f32 rounding per element ([`BinaryOp::apply`]).
///
/// Errors: those of [`crate::ops::broadcast_shape`].
pub fn broadcast_binary(a: &ArrayD<f32>, b: &ArrayD<f32>, op: BinaryOp) -> Result<ArrayD<f32>> {
    let shape = crate::ops::broadcast_shape(a.shape(), b.shape())?;
    let internal = || crate::Error::invalid("internal: broadcast");
    let av = a.broadcast(IxDyn(&shape)).ok_or_else(internal)?;
    let bv = b.broadcast(IxDyn(&shape)).ok_or_else(internal)?;
    Ok(ndarray::Zip::from(&av)
        .and(&bv)
        .map_collect(|&p, &q| op.apply(p, q)))
}

/// The parts concatenated along `axis` (negative: from the end), ONNX `Concat` /
/// `torch.cat`.
///
/// Errors: those of [`crate::ops::concat_shape`].
pub fn concat(parts: &[&ArrayD<f32>], axis: i64) -> Result<ArrayD<f32>> {
    let shapes: Vec<&[usize]> = parts.iter().map(|p| p.shape()).collect();
    let (ax, _) = crate::ops::concat_shape(&shapes, axis)?;
    let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
    ndarray::concatenate(Axis(ax), &views)
        .map_err(|e| crate::Error::invalid(format!("Concat: {e}")))
}

/// Linear layer `x · Wᵀ + b` for `x` `[N, in]`, weight `[out, in]`, bias `[out]`: mirrors
/// `torch.nn.functional.linear` (f32 accumulation; the summation order differs from PyTorch's
/// BLAS, so compare with a tolerance).
///
/// Errors: those of [`crate::ops::check_linear`] (the one geometry check, shared with the
/// GPU): [`crate::Error::ShapeMismatch`] when `x`'s columns differ from the weight's (naming
/// both shapes) or the bias is not `out` long; [`crate::Error::TooLarge`] for an output past
/// the element limit (checked before allocating).
pub fn linear(x: &Array2<f32>, w: &Array2<f32>, b: Option<&Array1<f32>>) -> Result<Array2<f32>> {
    crate::ops::check_linear(
        [x.nrows(), x.ncols()],
        [w.nrows(), w.ncols()],
        b.map(|b| b.shape()),
    )?;
    let mut y = x.dot(&w.t());
    if let Some(b) = b {
        y += b;
    }
    Ok(y)
}

/// `log_softmax` along dim 1 of `[N, C]`: mirrors `torch.nn.functional.log_softmax(x, dim=1)`,
/// computed stably as `(x - max) - ln(Σ exp(x - max))` per row, the order PyTorch's CPU kernel
/// uses. A row containing NaN or `+inf` gives NaN (as in PyTorch: `inf - inf`).
pub fn log_softmax(x: &Array2<f32>) -> Array2<f32> {
    let mut y = x.to_owned();
    for mut row in y.axis_iter_mut(Axis(0)) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| {
            if m.is_nan() || v.is_nan() {
                f32::NAN
            } else if v > m {
                v
            } else {
                m
            }
        });
        let sum: f32 = row.iter().map(|&v| (v - max).exp()).sum();
        let lse = sum.ln();
        row.mapv_inplace(|v| (v - max) - lse);
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use ndarray::{arr1, arr2, Array};

    #[test]
    fn max_pool() {
        let x = Array::from_shape_fn((1, 2, 5, 5), |(_, c, i, j)| {
            (c * 25 + i * 5 + j) as f32 * if (i + j) % 2 == 0 { 1.0 } else { -1.0 }
        });
        let y = max_pool2d(&x, 2, 2).unwrap();
        assert_eq!(y.dim(), (1, 2, 2, 2));
        for c in 0..2 {
            for i in 0..2 {
                for j in 0..2 {
                    let mut m = f32::NEG_INFINITY;
                    for a in 0..2 {
                        for b in 0..2 {
                            m = m.max(x[[0, c, 2 * i + a, 2 * j + b]]);
                        }
                    }
                    assert_eq!(y[[0, c, i, j]], m);
                }
            }
        }
        let y = max_pool2d(&x, 3, 1).unwrap();
        assert_eq!(y.dim(), (1, 2, 3, 3));
        let mut xn = x.clone();
        xn[[0, 0, 0, 0]] = f32::NAN;
        let y = max_pool2d(&xn, 2, 2).unwrap();
        assert!(y[[0, 0, 0, 0]].is_nan());
        assert!(!y[[0, 0, 0, 1]].is_nan());
    }

    #[test]
    fn max_pool_errors() {
        let x = Array4::<f32>::zeros((1, 1, 3, 4));
        let e = max_pool2d(&x, 0, 1).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)));
        assert!(max_pool2d(&x, 2, 0).is_err());
        let e = max_pool2d(&x, 4, 1).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid argument: max_pool2d kernel 4 is larger than the input's spatial size [3, 4]"
        );
    }

    #[test]
    fn linear_layer() {
        let x = arr2(&[[1.0f32, 2.0], [3.0, 4.0], [0.0, -1.0]]);
        let w = arr2(&[[1.0f32, 0.0], [0.5, -1.0], [2.0, 2.0]]);
        let b = arr1(&[0.0f32, 1.0, -1.0]);
        let y = linear(&x, &w, Some(&b)).unwrap();
        assert_eq!(
            y,
            arr2(&[[1.0f32, -0.5, 5.0], [3.0, -1.5, 13.0], [0.0, 2.0, -3.0]])
        );
        let y = linear(&x, &w, None).unwrap();
        assert_eq!(y[[2, 1]], 1.0);
        let e = linear(&x, &Array2::zeros((3, 3)), None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "shape mismatch in linear: input [3, 2] vs weight [3, 3] (in_features): expected [3, 3], got [3, 2]"
        );
        let e = linear(&x, &w, Some(&arr1(&[0.0f32; 2]))).unwrap_err();
        assert!(matches!(e, Error::ShapeMismatch { .. }));
        // No in_features: empty inputs, an output of 2^40 elements, refused before allocating.
        let e = linear(
            &Array2::zeros((1 << 20, 0)),
            &Array2::zeros((1 << 20, 0)),
            None,
        )
        .unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }), "{e}");
        assert!(
            e.to_string().contains("linear output [1048576, 1048576]"),
            "{e}"
        );
    }

    #[test]
    fn log_softmax_rows() {
        let x = arr2(&[[1.0f32, 2.0, 3.0], [1000.0, 1000.0, 1000.0]]);
        let y = log_softmax(&x);
        let lse = (1.0f32.exp() + 2.0f32.exp() + 3.0f32.exp()).ln();
        for j in 0..3 {
            assert!((y[[0, j]] - (x[[0, j]] - lse)).abs() < 1e-6);
            assert!((y[[1, j]] + 3.0f32.ln()).abs() < 1e-6);
        }
        let y = log_softmax(&arr2(&[[0.0f32, f32::NAN]]));
        assert!(y[[0, 0]].is_nan() && y[[0, 1]].is_nan());
    }
}
