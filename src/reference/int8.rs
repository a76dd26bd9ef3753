//! Integer inference, the CPU reference: 8-bit codes in, i32 accumulation, fixed-point
//! requantization ([`crate::quant::requant`]) out. This is what a deployed int8 backend
//! computes (PyTorch's `torch.ao.nn.quantized.Conv2d` / `Linear` on fbgemm or qnnpack,
//! TFLite's int8 kernels), and the spec the integer WGSL kernels meet bit for bit.
//!
//! Conventions:
//! - Codes are `i8` (so any range inside `[-128, 127]`: int8 affine or symmetric, int4).
//! - Weights are symmetric (zero point 0), per tensor or per output channel.
//! - The accumulator of output `o` is `bias[o] + Σ (x − x_zp) · w`, summed in i32 with
//!   two's-complement wrapping (as the GPU adds); zero padding contributes nothing (a padded
//!   input equals the zero point).
//! - The output code is `clamp(M[o](acc) + out_zp, clamp_min, clamp_max)`
//!   ([`Requant::apply`]).

use ndarray::{Array1, Array2, Array4, ArrayD, Zip};

use crate::error::{Error, Result};
use crate::ops::Conv2dParams;
use crate::quant::{AddRequant, QParams, QuantRange, Requant, RequantMode};

/// The code-range check of the integer ops (one home: [`QuantRange::check_int8_codes`]).
pub(crate) fn check_code_range(range: QuantRange) -> Result<()> {
    range.check_int8_codes()
}

/// Quantizes `x` to codes with `qp` (per tensor, or per channel along `qp.axis`):
/// `q = clamp(round_ties_even(x · (1/scale)) + zp, qmin, qmax)`, the quantize half of
/// [`crate::reference::fake_quant::fake_quantize`] (PyTorch's `torch.quantize_per_tensor` /
/// `quantize_per_channel`), so `dequantize(quantize(x)) == fake_quantize(x)` bit for bit.
///
/// Errors: invalid qparams for `x`'s shape (see [`QParams::validate`]), a range outside
/// `[-128, 127]`, or a NaN in `x` ([`Error::InvalidArgument`] naming its index: an integer
/// tensor cannot hold it).
pub fn quantize(x: &ArrayD<f32>, qp: &QParams, range: QuantRange) -> Result<ArrayD<i8>> {
    check_code_range(range)?;
    qp.validate(x.shape(), range)?;
    let inner: usize = qp.axis.map_or(1, |a| x.shape()[a + 1..].iter().product());
    let channels = qp.scale.len();
    let (qmin, qmax) = (range.quant_min as f32, range.quant_max as f32);
    let consts: Vec<(f32, f32)> = qp
        .scale
        .iter()
        .zip(&qp.zero_point)
        .map(|(&s, &z)| (1.0f32 / s, z as f32))
        .collect();
    let xs = x.as_standard_layout();
    let mut out = Vec::with_capacity(x.len());
    for (i, &v) in xs.iter().enumerate() {
        if v.is_nan() {
            return Err(Error::invalid(format!(
                "cannot quantize NaN (element {i}) to an integer code"
            )));
        }
        let c = (i / inner) % channels;
        let (inv, zp) = consts[c];
        let q = ((v * inv).round_ties_even() + zp).clamp(qmin, qmax);
        out.push(q as i8);
    }
    ArrayD::from_shape_vec(x.raw_dim(), out).map_err(|e| Error::invalid(e.to_string()))
}

/// Dequantizes codes: `(q − zp) · scale` in f32 (PyTorch's `Tensor.dequantize`), per tensor or
/// per channel along `qp.axis`.
///
/// Errors: qparams that do not fit `q`'s shape.
pub fn dequantize(q: &ArrayD<i8>, qp: &QParams) -> Result<ArrayD<f32>> {
    let range = QuantRange::new(-128, 127)?;
    qp.validate(q.shape(), range)?;
    let inner: usize = qp.axis.map_or(1, |a| q.shape()[a + 1..].iter().product());
    let channels = qp.scale.len();
    let qs = q.as_standard_layout();
    let out: Vec<f32> = qs
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let c = (i / inner) % channels;
            (v as f32 - qp.zero_point[c] as f32) * qp.scale[c]
        })
        .collect();
    ArrayD::from_shape_vec(q.raw_dim(), out).map_err(|e| Error::invalid(e.to_string()))
}

/// Quantizes a bias to i32 at scale `input_scale · weight_scale[o]` (computed in f32), zero
/// point 0: `round_ties_even(b · (1/(s_in · s_w[o])))`, as fbgemm and TFLite quantize conv and
/// linear biases. `weight_scales` has one entry, or one per bias element.
///
/// Errors: [`Error::ShapeMismatch`] for a wrong number of weight scales,
/// [`Error::InvalidScale`] for a non-positive or non-finite scale product, and
/// [`Error::InvalidArgument`] when a bias is NaN or does not fit i32 at that scale.
pub fn quantize_bias(
    bias: &Array1<f32>,
    input_scale: f32,
    weight_scales: &[f32],
) -> Result<Array1<i32>> {
    if weight_scales.len() != 1 && weight_scales.len() != bias.len() {
        return Err(Error::shape(
            "bias quantization weight scales",
            &[bias.len()],
            &[weight_scales.len()],
        ));
    }
    let mut out = Array1::<i32>::zeros(bias.len());
    for (o, (&b, q)) in bias.iter().zip(out.iter_mut()).enumerate() {
        let sw = weight_scales[if weight_scales.len() == 1 { 0 } else { o }];
        let s = input_scale * sw;
        if !(s.is_finite() && s > 0.0) {
            return Err(Error::InvalidScale {
                scale: s,
                channel: o,
            });
        }
        let v = (b * (1.0f32 / s)).round_ties_even();
        // 2^31 is exactly representable; every f32 below it fits i32 (NaN is not contained).
        if !(-2_147_483_648.0..2_147_483_648.0).contains(&v) {
            return Err(Error::invalid(format!(
                "bias {b} (channel {o}) does not fit an i32 at scale {s}"
            )));
        }
        *q = v as i32;
    }
    Ok(out)
}

/// Integer 2-D convolution with requantization (PyTorch's `torch.ao.nn.quantized.Conv2d`
/// forward, TFLite's int8 `Conv2D` / `DepthwiseConv2D`): input codes `x` `[N, C, H, W]` with
/// zero point `x_zero_point`, symmetric weight codes `w` `[O, C/groups, KH, KW]`, i32 `bias`
/// `[O]`; `acc = bias[o] + Σ (x − x_zp) · w` (wrapping i32), output code `rq.apply(o, acc)`.
/// Zero padding, stride, dilation and groups as in [`crate::reference::conv2d::conv2d`].
///
/// Errors: invalid geometry, a bias that is not `[O]`, or an invalid requantization.
pub fn conv2d_int8(
    x: &Array4<i8>,
    x_zero_point: i32,
    w: &Array4<i8>,
    bias: Option<&Array1<i32>>,
    params: &Conv2dParams,
    rq: &Requant,
) -> Result<Array4<i8>> {
    let [n, o, oh, ow] = params.output_shape(x.shape(), w.shape())?;
    if let Some(b) = bias {
        if b.len() != o {
            return Err(Error::shape("quantized conv2d bias", &[o], b.shape()));
        }
    }
    rq.validate(o)?;
    let (_, c, h, wd) = x.dim();
    let (_, cg, kh, kw) = w.dim();
    let og = o / params.groups;
    let [sh, sw] = params.stride;
    let [ph, pw] = params.pads([kh, kw])?.begin;
    let [dh, dw] = params.dilation;
    let xs = x.as_standard_layout();
    let ws = w.as_standard_layout();
    let (Some(xs), Some(ws)) = (xs.as_slice(), ws.as_slice()) else {
        return Err(Error::invalid("quantized conv2d: non-contiguous layout"));
    };
    let mut out = vec![0i8; n * o * oh * ow];
    let mut acc = vec![0i32; oh * ow];
    for b in 0..n {
        for oc in 0..o {
            let grp = oc / og;
            acc.fill(bias.map_or(0, |bv| bv[oc]));
            for ci in 0..cg {
                let ch = grp * cg + ci;
                let plane = &xs[(b * c + ch) * h * wd..][..h * wd];
                for ky in 0..kh {
                    for kx in 0..kw {
                        let wv = ws[((oc * cg + ci) * kh + ky) * kw + kx] as i32;
                        if wv == 0 {
                            continue;
                        }
                        for oy in 0..oh {
                            let iy = (oy * sh + ky * dh) as isize - ph as isize;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            let row = &plane[iy as usize * wd..][..wd];
                            let arow = &mut acc[oy * ow..][..ow];
                            for (ox, a) in arow.iter_mut().enumerate() {
                                let ix = (ox * sw + kx * dw) as isize - pw as isize;
                                if ix >= 0 && ix < wd as isize {
                                    let xv = row[ix as usize] as i32 - x_zero_point;
                                    *a = a.wrapping_add(xv.wrapping_mul(wv));
                                }
                            }
                        }
                    }
                }
            }
            let dst = &mut out[(b * o + oc) * oh * ow..][..oh * ow];
            for (d, &a) in dst.iter_mut().zip(&acc) {
                *d = rq.apply(oc, a) as i8;
            }
        }
    }
    Array4::from_shape_vec((n, o, oh, ow), out).map_err(|e| Error::invalid(e.to_string()))
}

/// Integer linear layer (PyTorch's `torch.ao.nn.quantized.Linear`, TFLite's int8
/// `FullyConnected`): `x` `[N, in]` codes with zero point `x_zero_point`, symmetric weight
/// codes `[out, in]`, i32 bias `[out]`; `acc = bias[o] + Σ_k (x[k] − x_zp) · w[o, k]`, output
/// code `rq.apply(o, acc)`.
///
/// Errors: [`Error::ShapeMismatch`] for mismatched `in` or bias length; an invalid
/// requantization.
pub fn linear_int8(
    x: &Array2<i8>,
    x_zero_point: i32,
    w: &Array2<i8>,
    bias: Option<&Array1<i32>>,
    rq: &Requant,
) -> Result<Array2<i8>> {
    crate::ops::check_linear_int8_input(x.shape(), w.shape())?;
    let outs = w.nrows();
    if let Some(b) = bias {
        if b.len() != outs {
            return Err(Error::shape("quantized linear bias", &[outs], b.shape()));
        }
    }
    rq.validate(outs)?;
    let mut out = Array2::<i8>::zeros((x.nrows(), outs));
    for (xrow, mut orow) in x.outer_iter().zip(out.outer_iter_mut()) {
        for (o, (wrow, dst)) in w.outer_iter().zip(orow.iter_mut()).enumerate() {
            let mut acc = bias.map_or(0, |b| b[o]);
            for (&xv, &wv) in xrow.iter().zip(wrow.iter()) {
                acc = acc.wrapping_add((xv as i32 - x_zero_point).wrapping_mul(wv as i32));
            }
            *dst = rq.apply(o, acc) as i8;
        }
    }
    Ok(out)
}

/// 2-D max pooling on codes (PyTorch's `max_pool2d` on a quantized tensor): because
/// quantization is monotonic, the max of the codes is the code of the max, and the output
/// keeps the input's scale and zero point. Square `kernel` and `stride`, no padding, floor
/// mode, as [`crate::reference::layers::max_pool2d`].
///
/// Errors: zero kernel or stride, or a kernel larger than the input.
pub fn max_pool2d_int8(x: &Array4<i8>, kernel: usize, stride: usize) -> Result<Array4<i8>> {
    let (n, c, h, w) = x.dim();
    let (oh, ow) = super::layers::max_pool2d_output(h, w, kernel, stride)?;
    let mut out = Array4::<i8>::zeros((n, c, oh, ow));
    for ((b, ch, i, j), o) in out.indexed_iter_mut() {
        let mut m = i8::MIN;
        for ki in 0..kernel {
            for kj in 0..kernel {
                m = m.max(x[[b, ch, i * stride + ki, j * stride + kj]]);
            }
        }
        *o = m;
    }
    Ok(out)
}

/// 2-D max pooling on codes with padding ([`crate::ops::Pool2d`]; ONNX `MaxPool` with
/// `pads`, as onnxruntime runs it between `DequantizeLinear` and `QuantizeLinear` of the same
/// qparams): the window walk of [`super::layers::max_pool2d_pad`], padded positions never
/// win. Exact: the max of codes is the code of the max of the dequantized values (the
/// output keeps the input's qparams).
///
/// Errors: those of [`crate::ops::Pool2d::output`].
pub fn max_pool2d_pad_int8(x: &Array4<i8>, p: &crate::ops::Pool2d) -> Result<Array4<i8>> {
    super::layers::max_pool2d_pad(x, p)
}

/// The requantization of global average pooling on codes: one multiplier
/// `M = s_in / (s_out · (H·W as f32))`, computed in f32 in that order (onnxruntime's
/// `QLinearGlobalAveragePool` scale), clamped to `bounds`.
///
/// Errors: those of [`Requant::new`] (a multiplier that is not finite or too large).
pub fn global_avg_pool_requant(
    s_in: f32,
    (s_out, z_out): (f32, i32),
    extent: usize,
    mode: crate::quant::RequantMode,
    bounds: (i32, i32),
) -> Result<Requant> {
    let m = s_in / (s_out * extent as f32);
    Requant::new(&[f64::from(m)], mode, z_out, bounds)
}

/// Global average pooling on codes (ONNX `GlobalAveragePool` between `DequantizeLinear` and
/// `QuantizeLinear`, which onnxruntime runs as `QLinearGlobalAveragePool`): per `(n, c)` the
/// exact i32 sum `acc = Σ (q − x_zp)` over `H·W`, then `requant.apply(0, acc)` — in
/// [`crate::quant::RequantMode::Float`] `clamp(round_ties_even(f32(acc) · M) + z_out)` with
/// `M` of [`global_avg_pool_requant`], bit for bit what onnxruntime computes. Output
/// `[N, C, 1, 1]`.
///
/// Errors: those of [`crate::ops::global_pool_extent`], an invalid `requant` (it must have
/// one multiplier).
pub fn global_avg_pool_int8(
    x: &Array4<i8>,
    x_zero_point: i32,
    requant: &Requant,
) -> Result<Array4<i8>> {
    crate::ops::global_pool_extent(x.shape())?;
    requant.validate(1)?;
    if requant.scales.len() != 1 {
        return Err(Error::invalid(
            "global average pooling takes one requantization multiplier",
        ));
    }
    let (n, c, _, _) = x.dim();
    let mut out = Array4::<i8>::zeros((n, c, 1, 1));
    for ((b, ch, _, _), o) in out.indexed_iter_mut() {
        let acc: i32 = x
            .slice(ndarray::s![b, ch, .., ..])
            .iter()
            .map(|&q| i32::from(q) - x_zero_point)
            .sum();
        *o = requant.apply(0, acc) as i8;
    }
    Ok(out)
}

/// The 256-entry table of an elementwise activation on codes: entry `q + 128` is the output
/// code of input code `q`, `clamp(round_ties_even(act((q − z_in) · s_in) / s_out) + z_out)`
/// — `DequantizeLinear`, the activation in f32, then `QuantizeLinear` (ONNX's `x / scale`),
/// as onnxruntime runs an activation between them. Every activation has this integer form
/// (HardSwish, LeakyReLU, ...). The activation is ONNX's: HardSwish is
/// `x · max(0, min(1, x · f32(1/6) + 0.5))` (ONNX's `alpha = 1/6`, `beta = 0.5`, as
/// onnxruntime computes it), which differs in the last bit from PyTorch's
/// `x · relu6(x + 3) / 6` ([`super::activation::activate`]) for a few inputs; the others are
/// [`super::activation::activate`].
///
/// Errors: a range outside `[-128, 127]`, invalid qparams.
pub fn activation_table(
    act: crate::ops::Activation,
    (s_in, z_in): (f32, i32),
    (s_out, z_out): (f32, i32),
    range: QuantRange,
) -> Result<Vec<i8>> {
    check_code_range(range)?;
    for (s, z) in [(s_in, z_in), (s_out, z_out)] {
        QParams::per_tensor(s, z).validate(&[1], range)?;
    }
    let (lo, hi) = (range.quant_min as f32, range.quant_max as f32);
    Ok((-128i32..=127)
        .map(|q| {
            let x = (q - z_in) as f32 * s_in;
            let y = match act {
                crate::ops::Activation::Hardswish => x * (x * (1.0f32 / 6.0) + 0.5).clamp(0.0, 1.0),
                other => super::activation::activate(x, other),
            };
            ((y / s_out).round_ties_even() + z_out as f32).clamp(lo, hi) as i8
        })
        .collect())
}

/// An elementwise op on codes by table lookup: `y = table[x + 128]`
/// ([`activation_table`]).
///
/// Errors: [`Error::InvalidArgument`] for a table that does not have 256 entries.
pub fn lookup_int8(x: &ArrayD<i8>, table: &[i8]) -> Result<ArrayD<i8>> {
    check_table(table)?;
    Ok(x.mapv(|q| table[(i32::from(q) + 128) as usize]))
}

pub use crate::quant::check_table;

/// Quantized elementwise add with a fused clamp (ONNX `QLinearAdd`, PyTorch's
/// `torch.ao.nn.quantized.QFunctional` `add` / `add_relu`), in the arithmetic
/// [`AddRequant::apply`] defines: onnxruntime's (MLAS) f32 form or TFLite's fixed point.
///
/// Errors: [`Error::ShapeMismatch`] when `a` and `b` differ in shape; an invalid `add`.
pub fn add_int8(a: &ArrayD<i8>, b: &ArrayD<i8>, add: &AddRequant) -> Result<ArrayD<i8>> {
    if a.shape() != b.shape() {
        return Err(Error::shape("quantized add", a.shape(), b.shape()));
    }
    add.validate()?;
    let mut out = ArrayD::<i8>::zeros(a.raw_dim());
    let zip = Zip::from(&mut out).and(a).and(b);
    match add.mode {
        RequantMode::Float => {
            let offset = add.float_offset();
            zip.for_each(|o, &x, &y| *o = add.apply_float(x as i32, y as i32, offset) as i8)
        }
        RequantMode::FixedPoint => {
            zip.for_each(|o, &x, &y| *o = add.apply(x as i32, y as i32) as i8)
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::QDtype;
    use crate::reference::{conv2d, fake_quant};
    use ndarray::{Array, IxDyn};

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn quantize_then_dequantize_is_fake_quant() {
        let mut s = 3;
        let x = Array::from_shape_fn(IxDyn(&[3, 4, 5]), |_| lcg(&mut s) * 3.0);
        let r = QuantRange::new(-128, 127).unwrap();
        let qp = QParams::per_tensor(0.021, -5);
        let q = quantize(&x, &qp, r).unwrap();
        let fq = fake_quant::fake_quantize(&x, &qp, r).unwrap();
        assert_eq!(dequantize(&q, &qp).unwrap(), fq);
        let qp = QParams::per_channel(vec![0.01, 0.02, 0.03, 0.05], vec![0, 1, -2, 3], 1).unwrap();
        let q = quantize(&x, &qp, r).unwrap();
        let fq = fake_quant::fake_quantize(&x, &qp, r).unwrap();
        assert_eq!(dequantize(&q, &qp).unwrap(), fq);
    }

    #[test]
    fn quantize_rejects_nan_and_wide_ranges() {
        let x = ArrayD::from_shape_vec(IxDyn(&[2]), vec![1.0, f32::NAN]).unwrap();
        let r = QuantRange::new(-128, 127).unwrap();
        let e = quantize(&x, &QParams::per_tensor(0.1, 0), r).unwrap_err();
        assert!(e.to_string().contains("NaN"), "{e}");
        let x = ArrayD::from_shape_vec(IxDyn(&[1]), vec![1.0]).unwrap();
        let u8r = QuantRange::new(0, 255).unwrap();
        assert!(quantize(&x, &QParams::per_tensor(0.1, 0), u8r).is_err());
    }

    #[test]
    fn bias_quantization() {
        let b = Array1::from(vec![0.5f32, -0.25, 0.0]);
        let q = quantize_bias(&b, 0.5, &[0.01, 0.02, 0.03]).unwrap();
        assert_eq!(q.to_vec(), vec![100, -25, 0]);
        assert!(quantize_bias(&b, 0.5, &[0.01, 0.02]).is_err());
        assert!(quantize_bias(&b, 0.0, &[0.01]).is_err());
        assert!(quantize_bias(&Array1::from(vec![1e10f32]), 1e-3, &[1e-3]).is_err());
    }

    /// The integer conv equals the f32 conv of dequantized operands when the requantization
    /// multiplier is exactly representable and no rounding happens.
    #[test]
    fn conv_int8_matches_float_conv_of_codes() {
        let mut s = 11;
        let x = Array4::from_shape_fn((2, 4, 6, 5), |_| (lcg(&mut s) * 100.0) as i8);
        let w = Array4::from_shape_fn((6, 2, 3, 3), |_| (lcg(&mut s) * 100.0) as i8);
        let bias = Array1::from_shape_fn(6, |i| i as i32 * 1000 - 2500);
        let p = Conv2dParams {
            stride: [2, 1],
            padding: [1, 1],
            dilation: [1, 2],
            groups: 2,
            ..Default::default()
        };
        let zp = 7;
        // Multiplier 2^-8, wide clamp: out = round(acc / 256) with ties away from zero.
        let rq = Requant::new(&[1.0 / 256.0], RequantMode::FixedPoint, 0, (-128, 127)).unwrap();
        let got = conv2d_int8(&x, zp, &w, Some(&bias), &p, &rq).unwrap();
        let xf = x.mapv(|v| (v as i32 - zp) as f32);
        let wf = w.mapv(|v| v as f32);
        let bf = bias.mapv(|v| v as f32);
        let want = conv2d::conv2d(&xf, &wf, Some(&bf), &p).unwrap();
        assert_eq!(got.shape(), want.shape());
        for (g, a) in got.iter().zip(want.iter()) {
            let exact = a / 256.0;
            let r = if exact.fract().abs() == 0.5 {
                exact + 0.5 * exact.signum()
            } else {
                exact.round()
            };
            assert_eq!(*g as f32, r.clamp(-128.0, 127.0), "acc {a}");
        }
    }

    #[test]
    fn linear_int8_and_clamp() {
        let x = Array2::from_shape_vec((1, 3), vec![10i8, -20, 30]).unwrap();
        let w = Array2::from_shape_vec((2, 3), vec![1i8, 2, 3, -1, -2, -3]).unwrap();
        let rq = Requant::new(&[0.5; 2], RequantMode::FixedPoint, 1, (0, 127)).unwrap();
        // acc (zp 0) = 10 - 40 + 90 = 60 → 30 + 1; second channel -60 → -30 + 1 → clamp 0.
        let y = linear_int8(&x, 0, &w, Some(&Array1::from(vec![0, 0])), &rq).unwrap();
        assert_eq!(y.row(0).to_vec(), vec![31, 0]);
        assert!(linear_int8(&x, 0, &w.t().to_owned(), None, &rq).is_err());
        assert!(linear_int8(&x, 0, &w, Some(&Array1::from(vec![0])), &rq).is_err());
    }

    #[test]
    fn max_pool_and_add() {
        let x = Array4::from_shape_vec((1, 1, 2, 2), vec![-5i8, 7, 3, -128]).unwrap();
        assert_eq!(max_pool2d_int8(&x, 2, 2).unwrap()[[0, 0, 0, 0]], 7);
        assert!(max_pool2d_int8(&x, 3, 1).is_err());
        assert!(max_pool2d_int8(&x, 0, 1).is_err());
        let a = x.clone().into_dyn();
        for mode in [RequantMode::Float, RequantMode::FixedPoint] {
            for codes in [QDtype::QInt8, QDtype::QUInt8] {
                let add = AddRequant::new((0.1, 0), (0.1, 0), (0.1, 0), (-128, 127), mode, codes)
                    .unwrap();
                let s = add_int8(&a, &a, &add).unwrap();
                assert_eq!(
                    s.iter().copied().collect::<Vec<_>>(),
                    vec![-10, 14, 6, -128]
                );
            }
        }
        let add = AddRequant::new(
            (0.1, 0),
            (0.1, 0),
            (0.1, 0),
            (-128, 127),
            RequantMode::Float,
            QDtype::QInt8,
        )
        .unwrap();
        let b = Array4::<i8>::zeros((1, 1, 1, 2)).into_dyn();
        assert!(add_int8(&a, &b, &add).is_err());
    }
}
