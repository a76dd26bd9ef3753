//! BatchNorm2d forward (training and eval) and backward, in f32 with f64 reductions.

use ndarray::{Array1, Array4};

use crate::error::{Error, Result};
use crate::ops::{BatchNorm, BatchNormGrads, BatchNormOutput};

/// Checks `bn` and that `x` is `[N, C, H, W]` with `C == bn.channels()`.
fn check_input(x_shape: &[usize], bn: &BatchNorm) -> Result<()> {
    bn.validate()?;
    if x_shape.len() != 4 {
        return Err(Error::invalid(format!(
            "batch_norm2d input must be NCHW (rank 4), got shape {x_shape:?}"
        )));
    }
    if x_shape[1] != bn.channels() {
        return Err(Error::ChannelMismatch {
            layer: "input".to_string(),
            layer_channels: x_shape[1],
            bn_channels: bn.channels(),
        });
    }
    Ok(())
}

/// Iterates over the `N` contiguous `H·W` planes of channel `c` of a standard-layout NCHW slice.
fn planes<'a>(data: &'a [f32], shape: &[usize], c: usize) -> impl Iterator<Item = &'a [f32]> {
    let (n, ch, plane) = (shape[0], shape[1], shape[2] * shape[3]);
    (0..n).map(move |i| &data[(i * ch + c) * plane..][..plane])
}

fn gamma(bn: &BatchNorm, c: usize) -> f32 {
    bn.weight.as_ref().map_or(1.0, |w| w[c])
}

fn beta(bn: &BatchNorm, c: usize) -> f32 {
    bn.bias.as_ref().map_or(0.0, |b| b[c])
}

/// BatchNorm over a 4-D input, mirroring `torch.nn.functional.batch_norm(x, running_mean,
/// running_var, weight, bias, training, momentum, eps)` (`torch.nn.BatchNorm2d`).
///
/// * `training`: per channel, the batch mean and the biased variance over N, H, W (reduced in
///   f64) normalize `x`; the running statistics are updated as
///   `running_mean = (1 − m)·running_mean + m·mean` and
///   `running_var = (1 − m)·running_var + m·var·M/(M − 1)` (unbiased, `M = N·H·W`).
/// * eval: the running statistics normalize `x` and are returned unchanged.
///
/// `y = (x − mean)·invstd·γ + β` with `invstd = 1/sqrt(var + eps)`; γ `None` means ones,
/// β `None` zeros. The output also carries the `mean` and `invstd` used.
///
/// Errors: [`BatchNorm::validate`] failures, [`Error::ChannelMismatch`] (layer `input`) when
/// `x` has a channel count other than `bn.channels()`, and [`Error::InvalidArgument`] when
/// training with at most one value per channel (PyTorch: "Expected more than 1 value per
/// channel when training").
pub fn batch_norm2d(x: &Array4<f32>, bn: &BatchNorm, training: bool) -> Result<BatchNormOutput> {
    let shape = x.shape().to_vec();
    check_input(&shape, bn)?;
    let c_count = shape[1];
    let m = shape[0] * shape[2] * shape[3];
    if training && m <= 1 {
        return Err(Error::invalid(format!(
            "Expected more than 1 value per channel when training, got input size {shape:?}"
        )));
    }
    let xs = x.as_standard_layout();
    let Some(xs) = xs.as_slice() else {
        return Err(Error::invalid(
            "batch_norm2d: non-contiguous standard layout",
        ));
    };

    let mut mean = Array1::<f32>::zeros(c_count);
    let mut invstd = Array1::<f32>::zeros(c_count);
    let mut running_mean = bn.running_mean.clone();
    let mut running_var = bn.running_var.clone();
    for c in 0..c_count {
        if training {
            let sum: f64 = planes(xs, &shape, c)
                .flat_map(|p| p.iter())
                .map(|&v| v as f64)
                .sum();
            let mu = sum / m as f64;
            let ssd: f64 = planes(xs, &shape, c)
                .flat_map(|p| p.iter())
                .map(|&v| {
                    let d = v as f64 - mu;
                    d * d
                })
                .sum();
            let var = ssd / m as f64;
            let unbiased = ssd / (m - 1) as f64;
            mean[c] = mu as f32;
            invstd[c] = (1.0 / (var + bn.eps as f64).sqrt()) as f32;
            let mom = bn.momentum;
            running_mean[c] = (1.0 - mom) * bn.running_mean[c] + mom * mu as f32;
            running_var[c] = (1.0 - mom) * bn.running_var[c] + mom * unbiased as f32;
        } else {
            mean[c] = bn.running_mean[c];
            invstd[c] = (1.0 / (bn.running_var[c] as f64 + bn.eps as f64).sqrt()) as f32;
        }
    }

    let plane = shape[2] * shape[3];
    let mut y = vec![0.0f32; xs.len()];
    for (i, (dst, src)) in y
        .chunks_exact_mut(plane.max(1))
        .zip(xs.chunks_exact(plane.max(1)))
        .enumerate()
    {
        let c = i % c_count;
        let (mu, is, g, b) = (mean[c], invstd[c], gamma(bn, c), beta(bn, c));
        for (d, &v) in dst.iter_mut().zip(src) {
            *d = (v - mu) * is * g + b;
        }
    }
    let y = Array4::from_shape_vec([shape[0], shape[1], shape[2], shape[3]], y)
        .map_err(|e| Error::invalid(format!("batch_norm2d internal shape: {e}")))?;
    Ok(BatchNormOutput {
        y,
        running_mean,
        running_var,
        mean,
        invstd,
    })
}

/// Gradients of [`batch_norm2d`] for upstream `dy`, given the `mean` and `invstd` the forward
/// normalized with (`fwd`), mirroring autograd of `torch.nn.functional.batch_norm`
/// (`torch.ops.aten.native_batch_norm_backward`). With `x̂ = (x − mean)·invstd` and
/// `M = N·H·W`, per channel:
///
/// * training: `dx = γ·invstd/M · (M·dy − Σdy − x̂·Σ(dy·x̂))`;
/// * eval: `dx = dy·γ·invstd`;
/// * both: `dweight = Σ(dy·x̂)`, `dbias = Σdy` (γ `None` is treated as ones; the
///   gradients of γ and β are returned regardless).
///
/// Errors: as [`batch_norm2d`], [`Error::ShapeMismatch`] when `dy` is not the shape of `x` or
/// `fwd.mean` / `fwd.invstd` do not have one value per channel.
pub fn batch_norm2d_backward(
    x: &Array4<f32>,
    dy: &Array4<f32>,
    bn: &BatchNorm,
    fwd: &BatchNormOutput,
    training: bool,
) -> Result<BatchNormGrads> {
    batch_norm2d_backward_with_stats(x, dy, bn, &fwd.mean, &fwd.invstd, training)
}

/// [`batch_norm2d_backward`] with the forward's `mean` and `invstd` given directly (what the
/// fused QAT backward keeps), mirroring `torch.ops.aten.native_batch_norm_backward`.
///
/// Errors: as [`batch_norm2d_backward`].
pub fn batch_norm2d_backward_with_stats(
    x: &Array4<f32>,
    dy: &Array4<f32>,
    bn: &BatchNorm,
    mean: &Array1<f32>,
    invstd: &Array1<f32>,
    training: bool,
) -> Result<BatchNormGrads> {
    let shape = x.shape().to_vec();
    check_input(&shape, bn)?;
    if dy.shape() != x.shape() {
        return Err(Error::shape(
            "batch_norm2d_backward dy (input shape)",
            x.shape(),
            dy.shape(),
        ));
    }
    let c_count = shape[1];
    for (name, a) in [("mean", mean), ("invstd", invstd)] {
        if a.len() != c_count {
            return Err(Error::shape(
                format!("batch_norm2d_backward saved {name}"),
                &[c_count],
                a.shape(),
            ));
        }
    }
    let m = shape[0] * shape[2] * shape[3];
    if training && m == 0 {
        return Err(Error::invalid(format!(
            "batch_norm2d_backward: empty input {shape:?} in training"
        )));
    }
    let xs = x.as_standard_layout();
    let dys = dy.as_standard_layout();
    let (Some(xs), Some(dys)) = (xs.as_slice(), dys.as_slice()) else {
        return Err(Error::invalid(
            "batch_norm2d_backward: non-contiguous standard layout",
        ));
    };

    let mut dweight = Array1::<f32>::zeros(c_count);
    let mut dbias = Array1::<f32>::zeros(c_count);
    let mut coef = vec![(0.0f64, 0.0f64, 0.0f64); c_count];
    for c in 0..c_count {
        let (mu, is) = (mean[c] as f64, invstd[c] as f64);
        let mut sum_dy = 0.0f64;
        let mut sum_dy_xhat = 0.0f64;
        for (xp, dp) in planes(xs, &shape, c).zip(planes(dys, &shape, c)) {
            for (&xv, &dv) in xp.iter().zip(dp) {
                sum_dy += dv as f64;
                sum_dy_xhat += dv as f64 * (xv as f64 - mu) * is;
            }
        }
        dweight[c] = sum_dy_xhat as f32;
        dbias[c] = sum_dy as f32;
        let g = gamma(bn, c) as f64;
        // dx = a·dy + b·x̂ + d
        coef[c] = if training {
            let mf = m as f64;
            (g * is, -g * is * sum_dy_xhat / mf, -g * is * sum_dy / mf)
        } else {
            (g * is, 0.0, 0.0)
        };
    }

    let plane = shape[2] * shape[3];
    let mut dx = vec![0.0f32; xs.len()];
    for (i, ((dst, xp), dp)) in dx
        .chunks_exact_mut(plane.max(1))
        .zip(xs.chunks_exact(plane.max(1)))
        .zip(dys.chunks_exact(plane.max(1)))
        .enumerate()
    {
        let c = i % c_count;
        let (mu, is) = (mean[c] as f64, invstd[c] as f64);
        let (a, b, d) = coef[c];
        for ((o, &xv), &dv) in dst.iter_mut().zip(xp).zip(dp) {
            let xhat = (xv as f64 - mu) * is;
            *o = (a * dv as f64 + b * xhat + d) as f32;
        }
    }
    let dx = Array4::from_shape_vec([shape[0], shape[1], shape[2], shape[3]], dx)
        .map_err(|e| Error::invalid(format!("batch_norm2d_backward internal shape: {e}")))?;
    Ok(BatchNormGrads { dx, dweight, dbias })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::conv_bn::test_util::{self as tu, rand_vec};

    fn rand4(shape: [usize; 4], seed: u64) -> Array4<f32> {
        Array4::from_shape_vec(shape, rand_vec(shape.iter().product(), seed)).unwrap()
    }

    fn bn(c: usize, seed: u64, affine: bool) -> BatchNorm {
        let r = |s| Array1::from(rand_vec(c, s));
        BatchNorm {
            weight: affine.then(|| r(seed).mapv(|v| 1.0 + 0.5 * v)),
            bias: affine.then(|| r(seed + 1)),
            running_mean: r(seed + 2).mapv(|v| 0.3 * v),
            running_var: r(seed + 3).mapv(|v| 1.0 + 0.5 * v),
            eps: 1e-5,
            momentum: 0.1,
        }
    }

    #[test]
    fn training_statistics() {
        let x = rand4([3, 2, 4, 5], 1).mapv(|v| 2.0 * v + 0.7);
        let b = bn(2, 5, true);
        let out = batch_norm2d(&x, &b, true).unwrap();
        for c in 0..2 {
            let vals: Vec<f64> = x
                .index_axis(ndarray::Axis(1), c)
                .iter()
                .map(|&v| v as f64)
                .collect();
            let m = vals.len() as f64;
            let mu = vals.iter().sum::<f64>() / m;
            let var = vals.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / m;
            assert!((out.mean[c] as f64 - mu).abs() < 1e-6);
            assert!((out.invstd[c] as f64 - 1.0 / (var + 1e-5).sqrt()).abs() < 1e-5);
            let rm = 0.9 * b.running_mean[c] as f64 + 0.1 * mu;
            let rv = 0.9 * b.running_var[c] as f64 + 0.1 * var * m / (m - 1.0);
            assert!((out.running_mean[c] as f64 - rm).abs() < 1e-6);
            assert!((out.running_var[c] as f64 - rv).abs() < 1e-6);
            // normalized output has zero mean, unit variance (before the affine)
            let g = b.weight.as_ref().unwrap()[c];
            let be = b.bias.as_ref().unwrap()[c];
            let ys: Vec<f64> = out
                .y
                .index_axis(ndarray::Axis(1), c)
                .iter()
                .map(|&v| ((v - be) / g) as f64)
                .collect();
            assert!(ys.iter().sum::<f64>().abs() / m < 1e-5);
        }
    }

    #[test]
    fn eval_uses_running_stats_and_keeps_them() {
        let x = rand4([2, 3, 2, 2], 2);
        let b = bn(3, 9, false);
        let out = batch_norm2d(&x, &b, false).unwrap();
        assert_eq!(out.running_mean, b.running_mean);
        assert_eq!(out.running_var, b.running_var);
        assert_eq!(out.mean, b.running_mean);
        for ((n, c, h, w), &v) in out.y.indexed_iter() {
            let want = (x[[n, c, h, w]] - b.running_mean[c]) / (b.running_var[c] + 1e-5).sqrt();
            assert!((v - want).abs() < 1e-6);
        }
        // one value per channel is fine in eval
        let x1 = rand4([1, 3, 1, 1], 3);
        assert!(batch_norm2d(&x1, &b, false).is_ok());
    }

    #[test]
    fn errors() {
        let b = bn(3, 1, true);
        // channel mismatch
        let e = batch_norm2d(&rand4([2, 4, 3, 3], 1), &b, true).unwrap_err();
        assert!(
            matches!(&e, Error::ChannelMismatch { layer, layer_channels: 4, bn_channels: 3 }
                if layer == "input"),
            "{e}"
        );
        // one value per channel in training
        let e = batch_norm2d(&rand4([1, 3, 1, 1], 1), &b, true).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m)
                if m.contains("Expected more than 1 value per channel when training")),
            "{e}"
        );
        assert!(batch_norm2d(&Array4::zeros([0, 3, 2, 2]), &b, true).is_err());
        // inconsistent BatchNorm
        let mut bad = b.clone();
        bad.running_var = Array1::ones(2);
        assert!(matches!(
            batch_norm2d(&rand4([2, 3, 2, 2], 1), &bad, false).unwrap_err(),
            Error::ShapeMismatch { .. }
        ));
        let mut bad = b.clone();
        bad.eps = -1.0;
        assert!(matches!(
            batch_norm2d(&rand4([2, 3, 2, 2], 1), &bad, false).unwrap_err(),
            Error::InvalidArgument(_)
        ));
        // backward: dy shape and saved stats
        let x = rand4([2, 3, 2, 2], 1);
        let fwd = batch_norm2d(&x, &b, true).unwrap();
        let e = batch_norm2d_backward(&x, &rand4([2, 3, 2, 1], 2), &b, &fwd, true).unwrap_err();
        assert!(
            matches!(&e, Error::ShapeMismatch { expected, got, .. }
                if expected == &[2, 3, 2, 2] && got == &[2, 3, 2, 1]),
            "{e}"
        );
        let mut f2 = fwd.clone();
        f2.invstd = Array1::ones(2);
        assert!(batch_norm2d_backward(&x, &x, &b, &f2, true).is_err());
    }

    /// `L = Σ dy · batch_norm2d(x)`, with the forward re-run in f64 for finite differences.
    fn loss_f64(
        x: &Array4<f64>,
        dy: &Array4<f32>,
        b: &BatchNorm,
        gamma: &[f64],
        beta: &[f64],
        training: bool,
    ) -> f64 {
        let (n, c, h, w) = x.dim();
        let m = (n * h * w) as f64;
        let mut total = 0.0;
        for ci in 0..c {
            let xc = x.index_axis(ndarray::Axis(1), ci);
            let (mu, var) = if training {
                let mu = xc.sum() / m;
                (mu, xc.mapv(|v| (v - mu).powi(2)).sum() / m)
            } else {
                (b.running_mean[ci] as f64, b.running_var[ci] as f64)
            };
            let is = 1.0 / (var + b.eps as f64).sqrt();
            let dc = dy.index_axis(ndarray::Axis(1), ci);
            total += xc
                .iter()
                .zip(dc.iter())
                .map(|(&v, &d)| ((v - mu) * is * gamma[ci] + beta[ci]) * d as f64)
                .sum::<f64>();
        }
        total
    }

    #[test]
    fn backward_matches_finite_differences() {
        for training in [true, false] {
            let x = rand4([2, 3, 2, 3], 11).mapv(|v| 1.5 * v + 0.2);
            let dy = rand4([2, 3, 2, 3], 12);
            let b = bn(3, 13, true);
            let fwd = batch_norm2d(&x, &b, training).unwrap();
            let grads = batch_norm2d_backward(&x, &dy, &b, &fwd, training).unwrap();
            let x64 = x.mapv(|v| v as f64);
            let gamma: Vec<f64> = b
                .weight
                .as_ref()
                .unwrap()
                .iter()
                .map(|&v| v as f64)
                .collect();
            let beta: Vec<f64> = b.bias.as_ref().unwrap().iter().map(|&v| v as f64).collect();
            let h = 1e-6;
            let tol = |fd: f64| 1e-4 * (1.0 + fd.abs());
            for idx in 0..x.len() {
                let mut xp = x64.clone();
                let mut xm = x64.clone();
                xp.as_slice_mut().unwrap()[idx] += h;
                xm.as_slice_mut().unwrap()[idx] -= h;
                let fd = (loss_f64(&xp, &dy, &b, &gamma, &beta, training)
                    - loss_f64(&xm, &dy, &b, &gamma, &beta, training))
                    / (2.0 * h);
                let got = grads.dx.as_slice().unwrap()[idx] as f64;
                assert!(
                    (got - fd).abs() < tol(fd),
                    "train={training} dx[{idx}]: {got} vs {fd}"
                );
            }
            for c in 0..3 {
                let (mut gp, mut gm) = (gamma.clone(), gamma.clone());
                gp[c] += h;
                gm[c] -= h;
                let fd = (loss_f64(&x64, &dy, &b, &gp, &beta, training)
                    - loss_f64(&x64, &dy, &b, &gm, &beta, training))
                    / (2.0 * h);
                assert!((grads.dweight[c] as f64 - fd).abs() < tol(fd));
                let (mut bp, mut bm) = (beta.clone(), beta.clone());
                bp[c] += h;
                bm[c] -= h;
                let fd = (loss_f64(&x64, &dy, &b, &gamma, &bp, training)
                    - loss_f64(&x64, &dy, &b, &gamma, &bm, training))
                    / (2.0 * h);
                assert!((grads.dbias[c] as f64 - fd).abs() < tol(fd));
            }
        }
    }

    #[test]
    fn golden_batch_norm2d() {
        for path in tu::golden_files("batch_norm2d") {
            let case = tu::load(&path);
            let params = case.params();
            let training = params["training"].as_bool().unwrap();
            let b = BatchNorm {
                weight: case.get1_opt("in.weight"),
                bias: case.get1_opt("in.bias"),
                running_mean: case.get1("in.running_mean"),
                running_var: case.get1("in.running_var"),
                eps: params["eps"].as_f64().unwrap() as f32,
                momentum: params["momentum"].as_f64().unwrap() as f32,
            };
            let out = batch_norm2d(&case.get4("in.x"), &b, training).unwrap();
            let e_y = case.check("out.y", &out.y.into_dyn());
            let e_rm = case.check("out.running_mean", &out.running_mean.into_dyn());
            let e_rv = case.check("out.running_var", &out.running_var.into_dyn());
            eprintln!(
                "{}: worst abs err y {e_y:e}, running_mean {e_rm:e}, running_var {e_rv:e}",
                path.display()
            );
        }
    }
}
