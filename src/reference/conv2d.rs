//! 2-D convolution (NCHW input, OIHW weight, zero padding), its gradients, and the transposed
//! convolution, in f32.
//!
//! Both directions are computed per image and per group with im2col and a single-precision
//! GEMM (`ndarray`'s `matrixmultiply`), accumulating in f32 like PyTorch's CPU kernels. The
//! transposed convolution is the input gradient of a convolution (GEMM, then col2im).

use ndarray::linalg::general_mat_mul;
use ndarray::{Array1, Array4, ArrayView2, ArrayViewMut2};

use crate::error::{Error, Result};
use crate::ops::{Conv2dGrads, Conv2dParams, ConvTranspose2dParams};

/// Geometry of one convolution, validated.
#[derive(Debug, Clone, Copy)]
struct Geom {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    groups: usize,
    /// Input channels per group.
    cg: usize,
    /// Output channels per group.
    og: usize,
    /// Rows of the im2col matrix: `cg * kh * kw`.
    k: usize,
    p: Conv2dParams,
    /// Zero rows above and columns left of the input (`Conv2dParams::pads`' `begin`).
    pad: [usize; 2],
}

impl Geom {
    fn new(x: &[usize], w: &[usize], p: &Conv2dParams) -> Result<Self> {
        let (out, pads) = p.geometry(x, w)?;
        let groups = p.groups;
        Ok(Self {
            n: x[0],
            c: x[1],
            h: x[2],
            w: x[3],
            o: w[0],
            kh: w[2],
            kw: w[3],
            oh: out[2],
            ow: out[3],
            groups,
            cg: x[1] / groups,
            og: w[0] / groups,
            k: w[1] * w[2] * w[3],
            p: *p,
            pad: pads.begin,
        })
    }

    fn out_shape(&self) -> [usize; 4] {
        [self.n, self.o, self.oh, self.ow]
    }

    /// Input row index `ih` for output row `oh` and kernel row `kh`, or `None` in the padding.
    #[inline]
    fn in_row(&self, oh: usize, kh: usize) -> Option<usize> {
        let pos = oh * self.p.stride[0] + kh * self.p.dilation[0];
        pos.checked_sub(self.pad[0]).filter(|&i| i < self.h)
    }

    /// Input column index `iw` for output column `ow` and kernel column `kw`, or `None`.
    #[inline]
    fn in_col(&self, ow: usize, kw: usize) -> Option<usize> {
        let pos = ow * self.p.stride[1] + kw * self.p.dilation[1];
        pos.checked_sub(self.pad[1]).filter(|&i| i < self.w)
    }

    /// Fills `cols` (`k x oh*ow`, row-major) with the patches of image `img`
    /// (`c x h x w`, row-major) for group `g`.
    fn im2col(&self, img: &[f32], g: usize, cols: &mut [f32]) {
        let spatial = self.oh * self.ow;
        let plane = self.h * self.w;
        for ci in 0..self.cg {
            let chan = &img[(g * self.cg + ci) * plane..][..plane];
            for kh in 0..self.kh {
                for kw in 0..self.kw {
                    let row = (ci * self.kh + kh) * self.kw + kw;
                    let dst = &mut cols[row * spatial..][..spatial];
                    for oh in 0..self.oh {
                        let out_row = &mut dst[oh * self.ow..][..self.ow];
                        match self.in_row(oh, kh) {
                            None => out_row.fill(0.0),
                            Some(ih) => {
                                let src = &chan[ih * self.w..][..self.w];
                                for (ow, v) in out_row.iter_mut().enumerate() {
                                    *v = self.in_col(ow, kw).map_or(0.0, |iw| src[iw]);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Adds the columns `cols` (`k x oh*ow`) back into image gradient `img` for group `g`
    /// (the adjoint of [`Geom::im2col`]).
    fn col2im(&self, cols: &[f32], g: usize, img: &mut [f32]) {
        let spatial = self.oh * self.ow;
        let plane = self.h * self.w;
        for ci in 0..self.cg {
            let chan = &mut img[(g * self.cg + ci) * plane..][..plane];
            for kh in 0..self.kh {
                for kw in 0..self.kw {
                    let row = (ci * self.kh + kh) * self.kw + kw;
                    let src = &cols[row * spatial..][..spatial];
                    for oh in 0..self.oh {
                        let Some(ih) = self.in_row(oh, kh) else {
                            continue;
                        };
                        let dst = &mut chan[ih * self.w..][..self.w];
                        let src_row = &src[oh * self.ow..][..self.ow];
                        for (ow, &v) in src_row.iter().enumerate() {
                            if let Some(iw) = self.in_col(ow, kw) {
                                dst[iw] += v;
                            }
                        }
                    }
                }
            }
        }
    }
}

fn view2(data: &[f32], rows: usize, cols: usize) -> Result<ArrayView2<'_, f32>> {
    ArrayView2::from_shape((rows, cols), data)
        .map_err(|e| Error::invalid(format!("conv2d internal view: {e}")))
}

fn view2_mut(data: &mut [f32], rows: usize, cols: usize) -> Result<ArrayViewMut2<'_, f32>> {
    ArrayViewMut2::from_shape((rows, cols), data)
        .map_err(|e| Error::invalid(format!("conv2d internal view: {e}")))
}

fn to_array4(shape: [usize; 4], data: Vec<f32>) -> Result<Array4<f32>> {
    Array4::from_shape_vec(shape, data)
        .map_err(|e| Error::invalid(format!("conv2d internal shape: {e}")))
}

/// 2-D convolution, mirroring `torch.nn.functional.conv2d(x, w, b, stride, padding, dilation,
/// groups)` with zero padding: input `x` is `[N, C, H, W]`, weight `w` is
/// `[O, C/groups, KH, KW]`, optional bias `b` has `O` elements; the output is
/// `[N, O, OH, OW]` with `OH = (H + 2·pad_h − dil_h·(KH−1) − 1) / stride_h + 1` (likewise `OW`).
/// Groups (including depthwise, `groups == C`) are supported. Accumulates in f32.
///
/// Errors: invalid settings or shapes (see [`Conv2dParams::output_shape`]), or a bias whose
/// length is not `O` ([`Error::ShapeMismatch`]).
pub fn conv2d(
    x: &Array4<f32>,
    w: &Array4<f32>,
    b: Option<&Array1<f32>>,
    p: &Conv2dParams,
) -> Result<Array4<f32>> {
    let g = Geom::new(x.shape(), w.shape(), p)?;
    if let Some(b) = b {
        if b.len() != g.o {
            return Err(Error::shape("conv2d bias", &[g.o], b.shape()));
        }
    }
    let xs = x.as_standard_layout();
    let ws = w.as_standard_layout();
    let (Some(xs), Some(ws)) = (xs.as_slice(), ws.as_slice()) else {
        return Err(Error::invalid("conv2d: non-contiguous standard layout"));
    };
    let spatial = g.oh * g.ow;
    let img_len = g.c * g.h * g.w;
    let mut out = vec![0.0f32; g.n * g.o * spatial];
    let mut cols = vec![0.0f32; g.k * spatial];
    for n in 0..g.n {
        let img = &xs[n * img_len..][..img_len];
        for grp in 0..g.groups {
            g.im2col(img, grp, &mut cols);
            let wm = view2(&ws[grp * g.og * g.k..][..g.og * g.k], g.og, g.k)?;
            let cm = view2(&cols, g.k, spatial)?;
            let dst = &mut out[(n * g.o + grp * g.og) * spatial..][..g.og * spatial];
            let mut ym = view2_mut(dst, g.og, spatial)?;
            general_mat_mul(1.0, &wm, &cm, 0.0, &mut ym);
        }
        if let Some(b) = b {
            for (oc, &bv) in b.iter().enumerate() {
                for v in &mut out[(n * g.o + oc) * spatial..][..spatial] {
                    *v += bv;
                }
            }
        }
    }
    to_array4(g.out_shape(), out)
}

/// Gradients of [`conv2d`] for upstream gradient `dy` (the shape of the forward output),
/// mirroring what autograd computes for `torch.nn.functional.conv2d`
/// (`torch.nn.grad.conv2d_input` / `conv2d_weight`): `dx` is the transposed convolution of
/// `dy` with `w`, `dweight` the correlation of `x` with `dy`, and `dbias` the sum of `dy` over
/// N, H and W. Accumulates in f32.
///
/// Errors: as [`conv2d`], and [`Error::ShapeMismatch`] when `dy` is not `[N, O, OH, OW]`.
pub fn conv2d_backward(
    x: &Array4<f32>,
    w: &Array4<f32>,
    dy: &Array4<f32>,
    p: &Conv2dParams,
) -> Result<Conv2dGrads> {
    let g = Geom::new(x.shape(), w.shape(), p)?;
    if dy.shape() != g.out_shape() {
        return Err(Error::shape(
            "conv2d_backward dy (forward output shape)",
            &g.out_shape(),
            dy.shape(),
        ));
    }
    let xs = x.as_standard_layout();
    let ws = w.as_standard_layout();
    let dys = dy.as_standard_layout();
    let (Some(xs), Some(ws), Some(dys)) = (xs.as_slice(), ws.as_slice(), dys.as_slice()) else {
        return Err(Error::invalid(
            "conv2d_backward: non-contiguous standard layout",
        ));
    };
    let spatial = g.oh * g.ow;
    let img_len = g.c * g.h * g.w;
    let mut dx = vec![0.0f32; g.n * img_len];
    let mut dw = vec![0.0f32; g.o * g.k];
    let mut db = vec![0.0f32; g.o];
    let mut cols = vec![0.0f32; g.k * spatial];
    let mut dcols = vec![0.0f32; g.k * spatial];
    for n in 0..g.n {
        let img = &xs[n * img_len..][..img_len];
        let dimg = &mut dx[n * img_len..][..img_len];
        for grp in 0..g.groups {
            let dym = view2(
                &dys[(n * g.o + grp * g.og) * spatial..][..g.og * spatial],
                g.og,
                spatial,
            )?;
            // dweight_g += dy_g · colsᵀ
            g.im2col(img, grp, &mut cols);
            let cm = view2(&cols, g.k, spatial)?;
            let mut dwm = view2_mut(&mut dw[grp * g.og * g.k..][..g.og * g.k], g.og, g.k)?;
            general_mat_mul(1.0, &dym, &cm.t(), 1.0, &mut dwm);
            // dcols = W_gᵀ · dy_g, scattered back into dx
            let wm = view2(&ws[grp * g.og * g.k..][..g.og * g.k], g.og, g.k)?;
            let mut dcm = view2_mut(&mut dcols, g.k, spatial)?;
            general_mat_mul(1.0, &wm.t(), &dym, 0.0, &mut dcm);
            g.col2im(&dcols, grp, dimg);
        }
        for (oc, acc) in db.iter_mut().enumerate() {
            *acc += dys[(n * g.o + oc) * spatial..][..spatial]
                .iter()
                .sum::<f32>();
        }
    }
    Ok(Conv2dGrads {
        dx: to_array4([g.n, g.c, g.h, g.w], dx)?,
        dweight: to_array4([g.o, g.cg, g.kh, g.kw], dw)?,
        dbias: Array1::from(db),
    })
}

/// 2-D transposed convolution, mirroring `torch.nn.functional.conv_transpose2d(x, w, b, stride,
/// padding, output_padding, groups, dilation)`: input `x` is `[N, Cin, H, W]`, weight `w` is
/// `[Cin, Cout/groups, KH, KW]`, optional bias `b` has `Cout` elements; the output is
/// `[N, Cout, OH, OW]` with `OH = (H − 1)·stride_h − 2·pad_h + dil_h·(KH − 1) + out_pad_h + 1`
/// (likewise `OW`; see [`ConvTranspose2dParams::output_shape`]). Each output element is
/// `Σ x[n, ci, iy, ix] · w[ci, co mod (Cout/g), ky, kx]` over the input channels `ci` of the
/// output channel's group and the taps with `oy = iy·stride_h + ky·dil_h − pad_h` (likewise
/// `ox`), plus the bias: the input gradient of [`conv2d`] with the same weight, which is how it
/// is computed (per image and group, `colsᵀ = W_gᵀ · x_g`, then col2im). Accumulates in f32.
///
/// Errors: those of [`ConvTranspose2dParams::output_shape`], and a bias whose length is not
/// `Cout` ([`Error::ShapeMismatch`], context `conv_transpose2d bias`).
pub fn conv_transpose2d(
    x: &Array4<f32>,
    w: &Array4<f32>,
    b: Option<&Array1<f32>>,
    p: &ConvTranspose2dParams,
) -> Result<Array4<f32>> {
    let out = p.output_shape(x.shape(), w.shape())?;
    if let Some(b) = b {
        if b.len() != out[1] {
            return Err(Error::shape("conv_transpose2d bias", &[out[1]], b.shape()));
        }
    }
    let groups = p.groups;
    // The conv whose input gradient this is: input `out`, weight `w` ([O = Cin, Cout/g, ...]),
    // output `x`. Its geometry is built directly (not from `Conv2dParams::output_shape`), so
    // output_padding (and any geometry PyTorch accepts) is honoured.
    let g = Geom {
        n: out[0],
        c: out[1],
        h: out[2],
        w: out[3],
        o: w.shape()[0],
        kh: w.shape()[2],
        kw: w.shape()[3],
        oh: x.shape()[2],
        ow: x.shape()[3],
        groups,
        cg: out[1] / groups,
        og: w.shape()[0] / groups,
        k: w.shape()[1] * w.shape()[2] * w.shape()[3],
        p: p.as_conv(),
        pad: p.padding,
    };
    let xs = x.as_standard_layout();
    let ws = w.as_standard_layout();
    let (Some(xs), Some(ws)) = (xs.as_slice(), ws.as_slice()) else {
        return Err(Error::invalid(
            "conv_transpose2d: non-contiguous standard layout",
        ));
    };
    let spatial = g.oh * g.ow;
    let img_len = g.c * g.h * g.w;
    let mut y = vec![0.0f32; g.n * img_len];
    let mut cols = vec![0.0f32; g.k * spatial];
    for n in 0..g.n {
        let dimg = &mut y[n * img_len..][..img_len];
        for grp in 0..g.groups {
            let xm = view2(
                &xs[(n * g.o + grp * g.og) * spatial..][..g.og * spatial],
                g.og,
                spatial,
            )?;
            let wm = view2(&ws[grp * g.og * g.k..][..g.og * g.k], g.og, g.k)?;
            let mut cm = view2_mut(&mut cols, g.k, spatial)?;
            general_mat_mul(1.0, &wm.t(), &xm, 0.0, &mut cm);
            g.col2im(&cols, grp, dimg);
        }
        if let Some(b) = b {
            let plane = g.h * g.w;
            for (oc, &bv) in b.iter().enumerate() {
                for v in &mut dimg[oc * plane..][..plane] {
                    *v += bv;
                }
            }
        }
    }
    to_array4(out, y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::conv_bn::test_util::{self as tu, rand_vec};

    fn rand4(shape: [usize; 4], seed: u64) -> Array4<f32> {
        Array4::from_shape_vec(shape, rand_vec(shape.iter().product(), seed)).unwrap()
    }

    /// Direct (naive) convolution in f64 for cross-checking.
    fn naive(
        x: &Array4<f32>,
        w: &Array4<f32>,
        b: Option<&Array1<f32>>,
        p: &Conv2dParams,
    ) -> Array4<f64> {
        let s = p.output_shape(x.shape(), w.shape()).unwrap();
        let (cg, og) = (w.shape()[1], w.shape()[0] / p.groups);
        let mut y = Array4::<f64>::zeros(s);
        for n in 0..s[0] {
            for o in 0..s[1] {
                let grp = o / og;
                for oh in 0..s[2] {
                    for ow in 0..s[3] {
                        let mut acc = b.map_or(0.0, |b| b[o] as f64);
                        for ci in 0..cg {
                            for kh in 0..w.shape()[2] {
                                for kw in 0..w.shape()[3] {
                                    let ih = (oh * p.stride[0] + kh * p.dilation[0]) as isize
                                        - p.padding[0] as isize;
                                    let iw = (ow * p.stride[1] + kw * p.dilation[1]) as isize
                                        - p.padding[1] as isize;
                                    if ih < 0
                                        || iw < 0
                                        || ih >= x.shape()[2] as isize
                                        || iw >= x.shape()[3] as isize
                                    {
                                        continue;
                                    }
                                    acc += x[[n, grp * cg + ci, ih as usize, iw as usize]] as f64
                                        * w[[o, ci, kh, kw]] as f64;
                                }
                            }
                        }
                        y[[n, o, oh, ow]] = acc;
                    }
                }
            }
        }
        y
    }

    fn settings() -> Vec<([usize; 4], [usize; 4], Conv2dParams)> {
        vec![
            ([2, 3, 7, 6], [4, 3, 3, 3], Conv2dParams::default()),
            (
                [1, 4, 9, 8],
                [6, 2, 3, 2],
                Conv2dParams {
                    stride: [2, 1],
                    padding: [1, 2],
                    dilation: [1, 2],
                    groups: 2,
                    ..Default::default()
                },
            ),
            (
                [2, 4, 5, 5],
                [4, 1, 3, 3],
                Conv2dParams {
                    stride: [1, 1],
                    padding: [1, 1],
                    dilation: [1, 1],
                    groups: 4,
                    ..Default::default()
                },
            ),
            (
                [1, 2, 10, 9],
                [3, 2, 3, 3],
                Conv2dParams {
                    stride: [3, 2],
                    padding: [2, 0],
                    dilation: [2, 3],
                    groups: 1,
                    ..Default::default()
                },
            ),
        ]
    }

    #[test]
    fn matches_naive_convolution() {
        for (i, (xs, ws, p)) in settings().into_iter().enumerate() {
            let x = rand4(xs, 10 + i as u64);
            let w = rand4(ws, 20 + i as u64);
            let b = Array1::from(rand_vec(ws[0], 30 + i as u64));
            let got = conv2d(&x, &w, Some(&b), &p).unwrap();
            let want = naive(&x, &w, Some(&b), &p);
            assert_eq!(got.shape(), want.shape());
            for (g, w) in got.iter().zip(want.iter()) {
                assert!((*g as f64 - w).abs() < 1e-5, "case {i}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn non_standard_layout_input() {
        let x = rand4([3, 2, 5, 4], 1);
        let xt = x.view().permuted_axes([0, 1, 3, 2]).to_owned();
        let xt = xt.permuted_axes([0, 1, 3, 2]); // same logical values, Fortran-ish strides
        let w = rand4([2, 2, 3, 3], 2);
        let p = Conv2dParams::default();
        assert_eq!(
            conv2d(&x, &w, None, &p).unwrap(),
            conv2d(&xt, &w, None, &p).unwrap()
        );
    }

    #[test]
    fn empty_batch() {
        let x = Array4::<f32>::zeros([0, 2, 5, 5]);
        let w = rand4([3, 2, 3, 3], 2);
        let p = Conv2dParams::default();
        let y = conv2d(&x, &w, None, &p).unwrap();
        assert_eq!(y.shape(), &[0, 3, 3, 3]);
        let g = conv2d_backward(&x, &w, &y, &p).unwrap();
        assert_eq!(g.dx.shape(), &[0, 2, 5, 5]);
        assert!(g.dweight.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn errors() {
        let x = rand4([1, 3, 5, 5], 1);
        let w = rand4([4, 3, 3, 3], 2);
        let p = Conv2dParams::default();
        let bad_b = Array1::<f32>::zeros(3);
        let e = conv2d(&x, &w, Some(&bad_b), &p).unwrap_err();
        assert!(
            matches!(&e, Error::ShapeMismatch { context, expected, got }
                if context.contains("bias") && expected == &[4] && got == &[3]),
            "{e}"
        );
        // weight input channels disagree
        let w2 = rand4([4, 2, 3, 3], 2);
        let e = conv2d(&x, &w2, None, &p).unwrap_err();
        assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
        assert!(e.to_string().contains("shape mismatch"), "{e}");
        // kernel too large
        let w3 = rand4([4, 3, 7, 7], 2);
        assert!(matches!(
            conv2d(&x, &w3, None, &p).unwrap_err(),
            Error::InvalidArgument(_)
        ));
        // bad settings
        for bad in [
            Conv2dParams {
                stride: [0, 1],
                ..p
            },
            Conv2dParams { groups: 0, ..p },
            Conv2dParams { groups: 2, ..p },
        ] {
            assert!(matches!(
                conv2d(&x, &w, None, &bad).unwrap_err(),
                Error::InvalidArgument(_)
            ));
        }
        // dy of the wrong shape
        let dy = Array4::<f32>::zeros([1, 4, 3, 2]);
        let e = conv2d_backward(&x, &w, &dy, &p).unwrap_err();
        assert!(
            matches!(&e, Error::ShapeMismatch { expected, got, .. }
                if expected == &[1, 4, 3, 3] && got == &[1, 4, 3, 2]),
            "{e}"
        );
    }

    /// Central finite differences in f64 (through the naive f64 convolution) of
    /// `L = Σ dy · conv(x, w, b)`.
    #[test]
    fn backward_matches_finite_differences() {
        for (i, (xs, ws, p)) in settings().into_iter().enumerate() {
            let x = rand4(xs, 40 + i as u64);
            let w = rand4(ws, 50 + i as u64);
            let b = Array1::from(rand_vec(ws[0], 60 + i as u64));
            let out = p.output_shape(&xs, &ws).unwrap();
            let dy = rand4(out, 70 + i as u64);
            let grads = conv2d_backward(&x, &w, &dy, &p).unwrap();
            let loss = |x: &Array4<f32>, w: &Array4<f32>, b: &Array1<f32>| -> f64 {
                naive(x, w, Some(b), &p)
                    .iter()
                    .zip(dy.iter())
                    .map(|(y, d)| y * *d as f64)
                    .sum()
            };
            // The loss is linear in each argument, so a step of 1/2 is exact up to rounding.
            let h = 0.5f32;
            let check = |name: &str, got: f32, plus: f64, minus: f64| {
                let fd = (plus - minus) / (2.0 * h as f64);
                assert!(
                    (got as f64 - fd).abs() < 1e-4 * (1.0 + fd.abs()),
                    "case {i} {name}: {got} vs fd {fd}"
                );
            };
            for idx in (0..x.len()).step_by(7) {
                let mut xp = x.clone();
                let mut xm = x.clone();
                xp.as_slice_mut().unwrap()[idx] += h;
                xm.as_slice_mut().unwrap()[idx] -= h;
                check(
                    "dx",
                    grads.dx.as_slice().unwrap()[idx],
                    loss(&xp, &w, &b),
                    loss(&xm, &w, &b),
                );
            }
            for idx in 0..w.len() {
                let mut wp = w.clone();
                let mut wm = w.clone();
                wp.as_slice_mut().unwrap()[idx] += h;
                wm.as_slice_mut().unwrap()[idx] -= h;
                check(
                    "dw",
                    grads.dweight.as_slice().unwrap()[idx],
                    loss(&x, &wp, &b),
                    loss(&x, &wm, &b),
                );
            }
            for idx in 0..b.len() {
                let mut bp = b.clone();
                let mut bm = b.clone();
                bp[idx] += h;
                bm[idx] -= h;
                check("db", grads.dbias[idx], loss(&x, &w, &bp), loss(&x, &w, &bm));
            }
        }
    }

    /// Direct transposed convolution in f64 (scatter form).
    fn naive_transpose(
        x: &Array4<f32>,
        w: &Array4<f32>,
        b: Option<&Array1<f32>>,
        p: &ConvTranspose2dParams,
    ) -> Array4<f64> {
        let s = p.output_shape(x.shape(), w.shape()).unwrap();
        let (cin, coutg) = (w.shape()[0], w.shape()[1]);
        let cing = cin / p.groups;
        let mut y = Array4::<f64>::zeros(s);
        for n in 0..s[0] {
            for co in 0..s[1] {
                let bv = b.map_or(0.0, |b| b[co] as f64);
                for oy in 0..s[2] {
                    for ox in 0..s[3] {
                        y[[n, co, oy, ox]] = bv;
                    }
                }
            }
            for ci in 0..cin {
                let grp = ci / cing;
                for iy in 0..x.shape()[2] {
                    for ix in 0..x.shape()[3] {
                        for j in 0..coutg {
                            for ky in 0..w.shape()[2] {
                                for kx in 0..w.shape()[3] {
                                    let oy = (iy * p.stride[0] + ky * p.dilation[0]) as isize
                                        - p.padding[0] as isize;
                                    let ox = (ix * p.stride[1] + kx * p.dilation[1]) as isize
                                        - p.padding[1] as isize;
                                    if oy < 0
                                        || ox < 0
                                        || oy >= s[2] as isize
                                        || ox >= s[3] as isize
                                    {
                                        continue;
                                    }
                                    y[[n, grp * coutg + j, oy as usize, ox as usize]] +=
                                        x[[n, ci, iy, ix]] as f64 * w[[ci, j, ky, kx]] as f64;
                                }
                            }
                        }
                    }
                }
            }
        }
        y
    }

    #[test]
    fn conv_transpose_matches_naive() {
        let cases = [
            ([2, 4, 5, 4], [4, 3, 3, 3], ConvTranspose2dParams::default()),
            (
                [1, 4, 4, 5],
                [4, 2, 3, 2],
                ConvTranspose2dParams {
                    stride: [2, 3],
                    padding: [1, 0],
                    output_padding: [1, 2],
                    dilation: [1, 2],
                    groups: 2,
                },
            ),
            (
                [2, 3, 3, 3],
                [3, 1, 3, 3],
                ConvTranspose2dParams {
                    stride: [2, 2],
                    padding: [1, 1],
                    output_padding: [1, 0],
                    dilation: [1, 1],
                    groups: 3,
                },
            ),
            (
                // output_padding below the dilation but not the stride.
                [1, 2, 4, 3],
                [2, 2, 2, 2],
                ConvTranspose2dParams {
                    stride: [1, 1],
                    padding: [0, 1],
                    output_padding: [1, 0],
                    dilation: [2, 1],
                    groups: 1,
                },
            ),
        ];
        for (i, (xs, ws, p)) in cases.into_iter().enumerate() {
            let x = rand4(xs, 80 + i as u64);
            let w = rand4(ws, 90 + i as u64);
            let out = p.output_shape(&xs, &ws).unwrap();
            let b = Array1::from(rand_vec(out[1], 100 + i as u64));
            let got = conv_transpose2d(&x, &w, Some(&b), &p).unwrap();
            let want = naive_transpose(&x, &w, Some(&b), &p);
            assert_eq!(got.shape(), want.shape(), "case {i}");
            for (g, w) in got.iter().zip(want.iter()) {
                assert!((*g as f64 - w).abs() < 1e-5, "case {i}: {g} vs {w}");
            }
        }
    }

    /// A transposed conv with `output_padding = 0` is the input gradient of the conv.
    #[test]
    fn conv_transpose_is_conv_input_gradient() {
        let p = Conv2dParams {
            stride: [2, 1],
            padding: [1, 1],
            dilation: [1, 2],
            groups: 2,
            ..Default::default()
        };
        let x = rand4([2, 4, 7, 6], 5);
        let w = rand4([6, 2, 3, 3], 6);
        let out = p.output_shape(x.shape(), w.shape()).unwrap();
        let dy = rand4(out, 7);
        let g = conv2d_backward(&x, &w, &dy, &p).unwrap();
        let tp = ConvTranspose2dParams {
            stride: p.stride,
            padding: p.padding,
            output_padding: [0, 0],
            dilation: p.dilation,
            groups: p.groups,
        };
        let y = conv_transpose2d(&dy, &w, None, &tp).unwrap();
        assert_eq!(y.shape(), g.dx.shape());
        for (a, b) in y.iter().zip(g.dx.iter()) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn conv_transpose_errors() {
        let x = rand4([1, 4, 3, 3], 1);
        let w = rand4([4, 2, 3, 3], 2);
        let p = ConvTranspose2dParams::default();
        let e = conv_transpose2d(&x, &w, Some(&Array1::zeros(3)), &p).unwrap_err();
        assert_eq!(
            e.to_string(),
            "shape mismatch in conv_transpose2d bias: expected [2], got [3]"
        );
        let e = conv_transpose2d(&x, &rand4([3, 2, 3, 3], 2), None, &p).unwrap_err();
        assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
        let bad = ConvTranspose2dParams {
            output_padding: [1, 0],
            ..p
        };
        let e = conv_transpose2d(&x, &w, None, &bad).unwrap_err();
        assert!(
            e.to_string()
                .contains("output padding must be smaller than either stride or dilation"),
            "{e}"
        );
        let e =
            conv_transpose2d(&x, &w, None, &ConvTranspose2dParams { groups: 3, ..p }).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        let e = conv_transpose2d(
            &x,
            &w,
            None,
            &ConvTranspose2dParams {
                padding: [3, 0],
                ..p
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("not positive"), "{e}");
    }

    #[test]
    fn golden_conv2d() {
        let files = tu::golden_files("conv2d");
        for path in files {
            let case = tu::load(&path);
            let p = case.conv_params();
            let x = case.get4("in.x");
            let w = case.get4("in.weight");
            let b = case.get1_opt("in.bias");
            let y = conv2d(&x, &w, b.as_ref(), &p).unwrap();
            let worst = case.check("out.y", &y.into_dyn());
            eprintln!("{}: worst abs err y = {worst:e}", path.display());
        }
    }
}
