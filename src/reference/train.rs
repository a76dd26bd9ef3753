//! The training ops of NNI's Mnist network that [`super::conv2d`], [`super::batch_norm`] and
//! [`super::activation`] do not already cover, mirroring what PyTorch's autograd computes on the
//! CPU: max pooling backward, linear backward, `log_softmax` backward, the NLL loss (mean
//! reduction) forward and backward, their fusion (cross entropy's backward), classification
//! accuracy, and an [`Sgd`] step. Flatten needs no op (a reshape).
//!
//! The shape and label checks here are shared with the GPU launchers
//! ([`crate::kernels::train`]), so both accept and refuse the same inputs.

use ndarray::{Array1, Array2, Array4, ArrayD, Zip};

use crate::error::{Error, Result};
use crate::optim::Sgd;

/// The training ops' checks (one home each, shared with the kernels).
pub use crate::ops::{
    check_classification, check_labels, check_linear_backward, check_max_pool2d_backward,
    check_observer_update,
};
pub use crate::optim::check_sgd;

/// The flat index (within its `h × w` plane) of the element a max pooling window selects, as
/// PyTorch's CPU kernel (`cpu_max_pool`) records it: scanning the window row by row, an element
/// replaces the current one when it is greater or NaN (`val > max || isnan(val)`), starting
/// from the first element with `max = -inf`. So among equal maxima the first wins, and with
/// NaNs the last NaN.
fn window_argmax(plane: &[f32], w: usize, y0: usize, x0: usize, kernel: usize) -> usize {
    let mut best = y0 * w + x0;
    let mut m = f32::NEG_INFINITY;
    for ky in 0..kernel {
        for kx in 0..kernel {
            let i = (y0 + ky) * w + x0 + kx;
            let v = plane[i];
            if v > m || v.is_nan() {
                m = v;
                best = i;
            }
        }
    }
    best
}

/// Gradient of [`super::layers::max_pool2d`] with respect to its input, mirroring
/// `torch.ops.aten.max_pool2d_with_indices_backward` on the CPU: each upstream gradient goes to
/// the element its window selected (see `window_argmax`: first maximum on ties, last NaN), and
/// gradients of overlapping windows that select the same element add up, in output order.
///
/// Errors: those of [`check_max_pool2d_backward`].
pub fn max_pool2d_backward(
    x: &Array4<f32>,
    dy: &Array4<f32>,
    kernel: usize,
    stride: usize,
) -> Result<Array4<f32>> {
    let (oh, ow) = check_max_pool2d_backward(x.shape(), dy.shape(), kernel, stride)?;
    let (n, c, h, w) = x.dim();
    let xs = x.as_standard_layout();
    let dys = dy.as_standard_layout();
    let (Some(xs), Some(dys)) = (xs.as_slice(), dys.as_slice()) else {
        return Err(Error::invalid(
            "max_pool2d_backward: non-contiguous standard layout",
        ));
    };
    let hw = h * w;
    let mut dx = vec![0.0f32; n * c * hw];
    for plane in 0..n * c {
        let xp = &xs[plane * hw..][..hw];
        let dyp = &dys[plane * oh * ow..][..oh * ow];
        let dxp = &mut dx[plane * hw..][..hw];
        for oy in 0..oh {
            for ox in 0..ow {
                let i = window_argmax(xp, w, oy * stride, ox * stride, kernel);
                dxp[i] += dyp[oy * ow + ox];
            }
        }
    }
    Array4::from_shape_vec((n, c, h, w), dx)
        .map_err(|e| Error::invalid(format!("max_pool2d_backward: {e}")))
}

/// Gradients of [`super::layers::linear`]: `dx = dy · W` `[N, in]`, `dweight = dyᵀ · x`
/// `[out, in]`, `dbias = Σₙ dy` `[out]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearGrads {
    /// dL/dx, `[N, in]`.
    pub dx: Array2<f32>,
    /// dL/dW, `[out, in]`.
    pub dweight: Array2<f32>,
    /// dL/db, `[out]`.
    pub dbias: Array1<f32>,
}

/// Gradients of `torch.nn.functional.linear(x, w, b)` for upstream `dy`, as autograd computes
/// them (`dy.mm(w)`, `dy.t().mm(x)`, `dy.sum(0)`), accumulated in f32 (the summation order
/// differs from PyTorch's BLAS: compare with a tolerance).
///
/// Errors: those of [`check_linear_backward`].
pub fn linear_backward(x: &Array2<f32>, w: &Array2<f32>, dy: &Array2<f32>) -> Result<LinearGrads> {
    check_linear_backward(x.shape(), w.shape(), dy.shape())?;
    Ok(LinearGrads {
        dx: dy.dot(w),
        dweight: dy.t().dot(x),
        dbias: dy.sum_axis(ndarray::Axis(0)),
    })
}

fn checked(op: &str, logp: &Array2<f32>, labels: &[u32]) -> Result<[usize; 2]> {
    let nc = check_classification(op, logp.shape(), &[labels.len()])?;
    check_labels(labels, nc[1])?;
    Ok(nc)
}

/// The negative log-likelihood loss with mean reduction,
/// `torch.nn.functional.nll_loss(logp, labels)`: `−(1/N) Σₙ logp[n, labels[n]]` (summed in
/// f32 in row order, then divided by `N`). An empty batch gives NaN (`0 / 0`, as PyTorch).
///
/// Errors: those of [`check_classification`] and [`check_labels`].
pub fn nll_loss(logp: &Array2<f32>, labels: &[u32]) -> Result<f32> {
    let [n, _] = checked("nll_loss", logp, labels)?;
    let sum: f32 = labels
        .iter()
        .enumerate()
        .map(|(i, &l)| logp[[i, l as usize]])
        .sum();
    Ok(-sum / n as f32)
}

/// Gradient of [`nll_loss`] (mean) with respect to `logp`, for an upstream gradient of 1
/// (`torch.ops.aten.nll_loss_backward`): `−1/N` at each row's label, zero elsewhere.
///
/// Errors: those of [`nll_loss`].
pub fn nll_loss_backward(logp: &Array2<f32>, labels: &[u32]) -> Result<Array2<f32>> {
    let [n, c] = checked("nll_loss", logp, labels)?;
    let g = -1.0 / n as f32;
    let mut d = Array2::<f32>::zeros((n, c));
    for (i, &l) in labels.iter().enumerate() {
        d[[i, l as usize]] = g;
    }
    Ok(d)
}

/// Gradient of [`super::layers::log_softmax`] given its output `y` and upstream `dy`
/// (`torch.ops.aten._log_softmax_backward_data`): per row, `dx = dy − exp(y) · Σ dy`.
///
/// Errors: [`Error::InvalidArgument`] unless `y` is rank 2 (as the forward);
/// [`Error::ShapeMismatch`] when `dy`'s shape is not `y`'s.
pub fn log_softmax_backward(y: &Array2<f32>, dy: &Array2<f32>) -> Result<Array2<f32>> {
    if dy.shape() != y.shape() {
        return Err(Error::shape(
            "log_softmax_backward (dy vs output)",
            y.shape(),
            dy.shape(),
        ));
    }
    let mut dx = Array2::<f32>::zeros(y.raw_dim());
    for ((mut dxr, yr), dyr) in dx.rows_mut().into_iter().zip(y.rows()).zip(dy.rows()) {
        let sum: f32 = dyr.sum();
        Zip::from(&mut dxr)
            .and(&yr)
            .and(&dyr)
            .for_each(|d, &yv, &g| *d = g - yv.exp() * sum);
    }
    Ok(dx)
}

/// [`nll_loss_backward`] followed by [`log_softmax_backward`] in one pass (the backward of
/// `cross_entropy` = `nll_loss(log_softmax(z))`): with `s = −1/N`, per element
/// `dz = [j = label]·s − exp(logp) · s`, the same f32 operations as the two ops composed.
///
/// Errors: those of [`nll_loss`].
pub fn log_softmax_nll_backward(logp: &Array2<f32>, labels: &[u32]) -> Result<Array2<f32>> {
    let [n, c] = checked("nll_loss", logp, labels)?;
    let s = -1.0 / n as f32;
    Ok(Array2::from_shape_fn((n, c), |(i, j)| {
        let g = if labels[i] as usize == j { s } else { 0.0 };
        g - logp[[i, j]].exp() * s
    }))
}

/// The index of a row's largest score as `torch.argmax` gives it on the CPU: the first maximum
/// on ties, and NaN counts as larger than every number (the first NaN wins).
pub fn argmax(row: impl IntoIterator<Item = f32>) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (j, v) in row.into_iter().enumerate() {
        best = match best {
            None => Some((j, v)),
            Some((_, b)) if !b.is_nan() && (v > b || v.is_nan()) => Some((j, v)),
            keep => keep,
        };
    }
    best.map(|(j, _)| j)
}

/// The number of rows of `scores` `[N, C]` whose [`argmax`] equals the label (top-1 correct
/// predictions: `(scores.argmax(1) == labels).sum()`).
///
/// Errors: those of [`check_classification`] and [`check_labels`].
pub fn count_correct(scores: &Array2<f32>, labels: &[u32]) -> Result<u32> {
    checked("count_correct", scores, labels)?;
    let mut correct = 0u32;
    for (row, &l) in scores.rows().into_iter().zip(labels) {
        if argmax(row.iter().copied()) == Some(l as usize) {
            correct += 1;
        }
    }
    Ok(correct)
}

/// One `torch.optim.SGD` step on one parameter, in place ([`Sgd::update`] per element):
/// `param` and, with momentum, `buf` are updated; `first` marks the step that creates the
/// momentum buffer (it is overwritten with the gradient then). Without momentum `buf` may be
/// `None` and is not touched.
///
/// Errors: those of [`check_sgd`].
pub fn sgd_step(
    param: &mut ArrayD<f32>,
    grad: &ArrayD<f32>,
    buf: Option<&mut ArrayD<f32>>,
    sgd: &Sgd,
    first: bool,
) -> Result<()> {
    check_sgd(
        sgd,
        param.shape(),
        grad.shape(),
        buf.as_ref().map(|b| b.shape()),
    )?;
    match buf {
        Some(buf) if sgd.has_momentum() => {
            Zip::from(param).and(grad).and(buf).for_each(|p, &g, b| {
                let (np, nb) = sgd.update(*p, g, *b, first);
                *p = np;
                *b = nb;
            });
        }
        _ => Zip::from(param).and(grad).for_each(|p, &g| {
            *p = sgd.update(*p, g, 0.0, first).0;
        }),
    }
    Ok(())
}

/// One observer statistic after a batch, as PyTorch's observers combine them: the batch's
/// value on the first batch (`first`); then with `averaging_constant = None`
/// (`MinMaxObserver`) `torch.minimum(cur, old)` for a minimum and `torch.maximum` for a
/// maximum (NaN if either is NaN), and with `Some(c)` (`MovingAverageMinMaxObserver`)
/// `old + c · (cur − old)` in f32.
#[inline]
pub fn observer_combine(
    old: f32,
    cur: f32,
    is_max: bool,
    averaging_constant: Option<f32>,
    first: bool,
) -> f32 {
    if first {
        return cur;
    }
    match averaging_constant {
        Some(c) => old + c * (cur - old),
        None if old.is_nan() || cur.is_nan() => f32::NAN,
        None if is_max => {
            if cur > old {
                cur
            } else {
                old
            }
        }
        None => {
            if cur < old {
                cur
            } else {
                old
            }
        }
    }
}

/// Updates an observer's running statistics `state` `[2, C]` (row 0 minima, row 1 maxima, the
/// layout of [`super::observer`]'s min/max and of the GPU observer) with a batch's `[2, C]`
/// min/max, per [`observer_combine`].
///
/// Errors: [`Error::ShapeMismatch`] unless both are `[2, C]` with the same `C`;
/// [`Error::InvalidArgument`] for an averaging constant outside `[0, 1]`.
pub fn observer_update(
    state: &mut Array2<f32>,
    batch: &Array2<f32>,
    averaging_constant: Option<f32>,
    first: bool,
) -> Result<()> {
    check_observer_update(state.shape(), batch.shape(), averaging_constant)?;
    Zip::indexed(state).and(batch).for_each(|(row, _), s, &c| {
        *s = observer_combine(*s, c, row == 1, averaging_constant, first);
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{arr1, arr2, Array};

    #[test]
    fn max_pool_backward_routes_to_the_argmax() {
        // One 4×4 plane, kernel 2 stride 2; ties go to the first element of the window.
        let x = Array::from_shape_vec(
            (1, 1, 4, 4),
            vec![
                1.0,
                3.0,
                0.0,
                0.0, //
                3.0,
                2.0,
                0.0,
                0.0, //
                5.0,
                1.0,
                f32::NAN,
                1.0, //
                1.0,
                9.0,
                2.0,
                f32::NAN,
            ],
        )
        .unwrap();
        let dy = Array::from_shape_vec((1, 1, 2, 2), vec![10.0, 20.0, 30.0, 40.0]).unwrap();
        let dx = max_pool2d_backward(&x, &dy, 2, 2).unwrap();
        let want = [
            0.0, 10.0, 20.0, 0.0, // first 3 (tie with the 3 below), first 0 of four zeros
            0.0, 0.0, 0.0, 0.0, //
            0.0, 0.0, 0.0, 0.0, //
            0.0, 30.0, 0.0, 40.0, // 9; the last NaN of the window
        ];
        assert_eq!(dx.as_slice().unwrap(), &want);
        // Overlapping windows (kernel 3, stride 1) add up on a shared maximum.
        let x = Array::from_shape_fn((1, 1, 4, 4), |(_, _, i, j)| {
            if (i, j) == (0, 1) {
                100.0
            } else {
                (i * 4 + j) as f32 * 0.1
            }
        });
        let dy = Array4::from_elem((1, 1, 2, 2), 1.0f32);
        let dx = max_pool2d_backward(&x, &dy, 3, 1).unwrap();
        assert_eq!(dx[[0, 0, 0, 1]], 2.0); // windows (0,0) and (0,1) pick the 100
        assert_eq!(dx[[0, 0, 3, 2]], 1.0); // window (1,0) picks its largest, 1.4
        assert_eq!(dx[[0, 0, 3, 3]], 1.0); // window (1,1): 1.5
        assert_eq!(dx.sum(), 4.0);
        let e = max_pool2d_backward(&x, &Array4::zeros((1, 1, 3, 2)), 3, 1).unwrap_err();
        assert!(matches!(e, Error::ShapeMismatch { .. }));
    }

    #[test]
    fn linear_backward_hand_computed() {
        let x = arr2(&[[1.0f32, 2.0], [3.0, 4.0]]);
        let w = arr2(&[[1.0f32, 0.0], [0.5, -1.0], [2.0, 2.0]]);
        let dy = arr2(&[[1.0f32, 0.0, 1.0], [0.0, 2.0, -1.0]]);
        let g = linear_backward(&x, &w, &dy).unwrap();
        assert_eq!(g.dx, arr2(&[[3.0f32, 2.0], [-1.0, -4.0]]));
        assert_eq!(g.dweight, arr2(&[[1.0f32, 2.0], [6.0, 8.0], [-2.0, -2.0]]));
        assert_eq!(g.dbias, arr1(&[1.0f32, 2.0, 0.0]));
        assert!(linear_backward(&x, &w, &arr2(&[[1.0f32, 2.0]])).is_err());
        assert!(linear_backward(&x, &arr2(&[[1.0f32]]), &dy).is_err());
    }

    #[test]
    fn nll_and_log_softmax_backward() {
        let z = arr2(&[[1.0f32, 2.0, 3.0], [0.5, 0.5, -1.0]]);
        let logp = super::super::layers::log_softmax(&z);
        let labels = [2u32, 0];
        let loss = nll_loss(&logp, &labels).unwrap();
        assert!((loss - (-(logp[[0, 2]] + logp[[1, 0]]) / 2.0)).abs() < 1e-7);
        let g = nll_loss_backward(&logp, &labels).unwrap();
        assert_eq!(g, arr2(&[[0.0f32, 0.0, -0.5], [-0.5, 0.0, 0.0]]));
        let composed = log_softmax_backward(&logp, &g).unwrap();
        let fused = log_softmax_nll_backward(&logp, &labels).unwrap();
        assert_eq!(composed, fused);
        // Cross entropy's gradient: (softmax − onehot) / N; rows sum to 0.
        for i in 0..2 {
            let row_sum: f32 = fused.row(i).sum();
            assert!(row_sum.abs() < 1e-7);
            for j in 0..3 {
                let want = (logp[[i, j]].exp() - f32::from(labels[i] as usize == j)) / 2.0;
                assert!((fused[[i, j]] - want).abs() < 1e-7);
            }
        }
        let e = nll_loss(&logp, &[3, 0]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid argument: Target 3 is out of bounds (classes: 3)"
        );
        assert!(matches!(
            nll_loss(&logp, &[0]).unwrap_err(),
            Error::ShapeMismatch { .. }
        ));
        assert!(log_softmax_backward(&logp, &arr2(&[[1.0f32]])).is_err());
        assert!(nll_loss(&Array2::zeros((0, 3)), &[]).unwrap().is_nan());
    }

    #[test]
    fn argmax_and_accuracy() {
        assert_eq!(argmax([1.0, 3.0, 3.0, 2.0]), Some(1));
        assert_eq!(argmax([1.0, f32::NAN, 5.0, f32::NAN]), Some(1));
        assert_eq!(argmax([f32::NEG_INFINITY; 3]), Some(0));
        assert_eq!(argmax([]), None);
        let s = arr2(&[[0.1f32, 0.9], [0.8, 0.2], [0.5, 0.5]]);
        assert_eq!(count_correct(&s, &[1, 1, 0]).unwrap(), 2);
        assert!(count_correct(&s, &[1, 2, 0]).is_err());
        assert!(count_correct(&Array2::zeros((2, 0)), &[0, 0]).is_err());
    }

    #[test]
    fn observer_statistics() {
        let mut state = arr2(&[[0.0f32, 0.0], [0.0, 0.0]]);
        observer_update(&mut state, &arr2(&[[-1.0f32, 2.0], [3.0, 4.0]]), None, true).unwrap();
        assert_eq!(state, arr2(&[[-1.0f32, 2.0], [3.0, 4.0]]));
        observer_update(
            &mut state,
            &arr2(&[[-2.0f32, 5.0], [1.0, 9.0]]),
            None,
            false,
        )
        .unwrap();
        assert_eq!(state, arr2(&[[-2.0f32, 2.0], [3.0, 9.0]]));
        observer_update(
            &mut state,
            &arr2(&[[0.0f32, 2.0], [5.0, 9.0]]),
            Some(0.5),
            false,
        )
        .unwrap();
        assert_eq!(state, arr2(&[[-1.0f32, 2.0], [4.0, 9.0]]));
        let nan = arr2(&[[f32::NAN, 0.0], [0.0, 0.0]]);
        observer_update(&mut state, &nan, None, false).unwrap();
        assert!(state[[0, 0]].is_nan());
        assert!(observer_update(&mut state, &arr2(&[[0.0f32], [0.0]]), None, false).is_err());
        assert!(observer_update(&mut state, &nan, Some(1.5), false).is_err());
    }

    #[test]
    fn sgd_step_in_place() {
        let sgd = Sgd {
            lr: 0.1,
            momentum: 0.9,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        };
        let mut p = arr1(&[1.0f32, 2.0]).into_dyn();
        let g = arr1(&[1.0f32, -1.0]).into_dyn();
        let mut b = ArrayD::<f32>::zeros(p.raw_dim());
        sgd_step(&mut p, &g, Some(&mut b), &sgd, true).unwrap();
        assert_eq!(b, g);
        sgd_step(&mut p, &g, Some(&mut b), &sgd, false).unwrap();
        // buf = 0.9 + 1 = 1.9; p = 1 - 0.1 - 0.19.
        assert!((p[[0]] - 0.71).abs() < 1e-6);
        assert!((b[[1]] + 1.9).abs() < 1e-6);
        let e = sgd_step(&mut p, &g, None, &sgd, false).unwrap_err();
        assert!(e.to_string().contains("momentum buffer"));
        let mut wrong = ArrayD::<f32>::zeros(ndarray::IxDyn(&[3]));
        assert!(sgd_step(&mut p, &g, Some(&mut wrong), &sgd, false).is_err());
        let mut q = arr1(&[1.0f32]).into_dyn();
        sgd_step(
            &mut q,
            &arr1(&[2.0f32]).into_dyn(),
            None,
            &Sgd::new(0.5),
            true,
        )
        .unwrap();
        assert_eq!(q[[0]], 0.0);
    }
}
