//! BatchNorm folding for eval / PTQ, mirroring `torch.nn.utils.fusion.fuse_conv_bn_weights`
//! and `fuse_linear_bn_weights` operation for operation in f32:
//!
//! ```text
//! r  = 1 / sqrt(running_var + eps)            // PyTorch's rsqrt, per output channel
//! conv:   W' = W * (γ * r)                    b' = (b - running_mean) * r * γ + β
//! linear: s = γ * r;  W' = W * s[:, None]     b' = (b - running_mean) * s + β
//! ```
//!
//! with `γ = 1`, `β = 0` for a BatchNorm with `affine=False` and `b = 0` for a layer without
//! bias. Two deliberate differences from PyTorch:
//! * **ConvTranspose with `groups > 1` is folded correctly.** A ConvTranspose weight is
//!   `[Cin, Cout/g, k...]`; PyTorch scales dim 1 by a `Cout`-long vector, which raises for
//!   `g > 1` or silently mis-shapes the depthwise weight. Here the output channel of
//!   `W[i, j, ...]` is `(i / (Cin/g)) * (Cout/g) + j`, which reduces to PyTorch's rule for
//!   `g = 1`.
//! * **Linear + BatchNorm with `affine=False` works** (γ = 1, β = 0); PyTorch raises a
//!   `TypeError`. With a one-channel BatchNorm broadcast over every output, the folded bias
//!   has `out_features` elements even when the linear has no bias (PyTorch returns one).

use ndarray::{Array1, Array2, ArrayD, IxDyn};

use crate::error::{Error, Result};
use crate::ops::{BatchNorm, Folded};

/// Per-channel `γ`, `β` and `r = 1/sqrt(running_var + eps)` of a validated BatchNorm.
struct BnTerms {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    mean: Vec<f32>,
    r: Vec<f32>,
}

fn bn_terms(bn: &BatchNorm) -> Result<BnTerms> {
    bn.validate()?;
    let c = bn.channels();
    let gamma = bn
        .weight
        .as_ref()
        .map_or_else(|| vec![1.0; c], |w| w.to_vec());
    let beta = bn
        .bias
        .as_ref()
        .map_or_else(|| vec![0.0; c], |b| b.to_vec());
    let r = bn
        .running_var
        .iter()
        .map(|&v| 1.0f32 / (v + bn.eps).sqrt())
        .collect();
    Ok(BnTerms {
        gamma,
        beta,
        mean: bn.running_mean.to_vec(),
        r,
    })
}

fn check_bias(layer: &str, bias: Option<&Array1<f32>>, out: usize) -> Result<Vec<f32>> {
    match bias {
        None => Ok(vec![0.0; out]),
        Some(b) if b.len() == out => Ok(b.to_vec()),
        Some(b) => Err(Error::shape(format!("{layer} bias"), &[out], b.shape())),
    }
}

/// Folds a BatchNorm into a conv weight of any rank (conv1d/2d/3d: `[Cout, Cin/g, k...]`), or,
/// with `transpose`, into a ConvTranspose weight `[Cin, Cout/g, k...]`. Mirrors
/// `torch.nn.utils.fusion.fuse_conv_bn_weights(conv_w, conv_b, rm, rv, eps, bn_w, bn_b,
/// transpose)` in f32: `W' = W * (γ * r)` per output channel, `b' = (b - rm) * r * γ + β`,
/// `r = 1/sqrt(rv + eps)`.
///
/// For `transpose`, the number of groups is inferred as `g = bn.channels() / weight.shape[1]`
/// and the output channel of `W[i, j, ...]` is `(i / (Cin/g)) * (Cout/g) + j`: correct for
/// grouped and depthwise ConvTranspose, where PyTorch fails or mis-shapes the weight (see the
/// [module docs](self)).
///
/// Errors: [`Error::InvalidArgument`] for a weight of rank < 3 or (transpose) a group count
/// that does not divide `Cin`; [`Error::ChannelMismatch`] (layer `conv` / `conv_transpose`)
/// when the weight's output channels disagree with the BatchNorm; [`Error::ShapeMismatch`] for
/// a bias that is not `Cout` long or an inconsistent BatchNorm.
pub fn fuse_conv_bn_weights(
    weight: &ArrayD<f32>,
    bias: Option<&Array1<f32>>,
    bn: &BatchNorm,
    transpose: bool,
) -> Result<Folded> {
    let shape = weight.shape().to_vec();
    crate::ops::check_conv_weight_rank(&shape)?;
    let terms = bn_terms(bn)?;
    let cout = bn.channels();
    let layer = if transpose { "conv_transpose" } else { "conv" };
    let inner: usize = shape[2..].iter().product();
    // channel_of(row) for row = flat index / inner, i.e. (dim0, dim1) flattened.
    let (d0, d1) = (shape[0], shape[1]);
    let channel_of: Box<dyn Fn(usize) -> usize> = if transpose {
        if d1 == 0 || !cout.is_multiple_of(d1) || cout / d1 == 0 {
            return Err(Error::ChannelMismatch {
                layer: layer.to_string(),
                layer_channels: d1,
                bn_channels: cout,
            });
        }
        let g = cout / d1;
        if !d0.is_multiple_of(g) {
            return Err(Error::invalid(format!(
                "conv_transpose weight {shape:?} with BatchNorm of {cout} channels implies \
                 groups = {g}, which does not divide the {d0} input channels"
            )));
        }
        let cin_per_g = d0 / g;
        Box::new(move |row| {
            let (i, j) = (row / d1, row % d1);
            (i / cin_per_g) * d1 + j
        })
    } else {
        if d0 != cout {
            return Err(Error::ChannelMismatch {
                layer: layer.to_string(),
                layer_channels: d0,
                bn_channels: cout,
            });
        }
        Box::new(move |row| row / d1)
    };
    let b = check_bias(layer, bias, cout)?;
    let scale: Vec<f32> = terms
        .gamma
        .iter()
        .zip(&terms.r)
        .map(|(&g, &r)| g * r)
        .collect();
    let ws = weight.as_standard_layout();
    let src = ws
        .as_slice()
        .ok_or_else(|| Error::invalid("internal: standard-layout array is not contiguous"))?;
    let mut out = vec![0.0f32; src.len()];
    if inner > 0 {
        for (row, (o, w)) in out
            .chunks_exact_mut(inner)
            .zip(src.chunks_exact(inner))
            .enumerate()
        {
            let s = scale[channel_of(row)];
            for (o, &w) in o.iter_mut().zip(w) {
                *o = w * s;
            }
        }
    }
    let bias: Array1<f32> = (0..cout)
        .map(|c| (b[c] - terms.mean[c]) * terms.r[c] * terms.gamma[c] + terms.beta[c])
        .collect();
    let weight = ArrayD::from_shape_vec(IxDyn(&shape), out)
        .map_err(|e| Error::invalid(format!("internal: {e}")))?;
    Ok(Folded { weight, bias })
}

/// Folds a BatchNorm1d into a linear layer (weight `[out, in]`). Mirrors
/// `torch.nn.utils.fusion.fuse_linear_bn_weights(linear_w, linear_b, rm, rv, eps, bn_w, bn_b)`
/// in f32: `s = γ * r`, `W' = W * s[:, None]`, `b' = (b - rm) * s + β`.
///
/// A BatchNorm with one channel is broadcast over all `out` rows (as in PyTorch). Unlike
/// PyTorch, `affine=False` (γ and β absent) works, and the folded bias always has `out`
/// elements.
///
/// Errors: [`Error::ChannelMismatch`] (layer `linear`) when `out != bn.channels()` and
/// `bn.channels() != 1`; [`Error::ShapeMismatch`] for a bias that is not `out` long or an
/// inconsistent BatchNorm.
pub fn fuse_linear_bn_weights(
    weight: &Array2<f32>,
    bias: Option<&Array1<f32>>,
    bn: &BatchNorm,
) -> Result<Folded> {
    let terms = bn_terms(bn)?;
    let (out, _) = weight.dim();
    let c = bn.channels();
    if c != out && c != 1 {
        return Err(Error::ChannelMismatch {
            layer: "linear".to_string(),
            layer_channels: out,
            bn_channels: c,
        });
    }
    let b = check_bias("linear", bias, out)?;
    let ch = |o: usize| if c == 1 { 0 } else { o };
    let s: Vec<f32> = (0..out)
        .map(|o| terms.gamma[ch(o)] * terms.r[ch(o)])
        .collect();
    let mut w = weight.to_owned();
    for (mut row, &so) in w.rows_mut().into_iter().zip(&s) {
        row.mapv_inplace(|v| v * so);
    }
    let bias: Array1<f32> = (0..out)
        .map(|o| (b[o] - terms.mean[ch(o)]) * s[o] + terms.beta[ch(o)])
        .collect();
    Ok(Folded {
        weight: w.into_dyn(),
        bias,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{arr1, Array};

    fn bn(c: usize) -> BatchNorm {
        BatchNorm {
            weight: Some(Array1::from_iter((0..c).map(|i| 0.5 + 0.25 * i as f32))),
            bias: Some(Array1::from_iter((0..c).map(|i| 0.1 * i as f32 - 0.2))),
            running_mean: Array1::from_iter((0..c).map(|i| 0.3 * i as f32 - 0.5)),
            running_var: Array1::from_iter((0..c).map(|i| 0.5 + i as f32)),
            eps: 1e-5,
            momentum: 0.1,
        }
    }

    fn r(bn: &BatchNorm, c: usize) -> f32 {
        1.0 / (bn.running_var[c] + bn.eps).sqrt()
    }

    #[test]
    fn conv2d_matches_formula() {
        let b = bn(4);
        let w = Array::from_shape_fn(IxDyn(&[4, 2, 3, 3]), |d| {
            (d[0] * 18 + d[1] * 9 + d[2] * 3 + d[3]) as f32 * 0.01 - 0.3
        });
        let bias = arr1(&[0.1f32, -0.2, 0.3, 0.0]);
        let f = fuse_conv_bn_weights(&w, Some(&bias), &b, false).unwrap();
        for (idx, &v) in w.indexed_iter() {
            let c = idx[0];
            let g = b.weight.as_ref().unwrap()[c];
            assert_eq!(f.weight[&idx], v * (g * r(&b, c)));
        }
        for c in 0..4 {
            let g = b.weight.as_ref().unwrap()[c];
            let want = (bias[c] - b.running_mean[c]) * r(&b, c) * g + b.bias.as_ref().unwrap()[c];
            assert_eq!(f.bias[c], want);
        }
        // Non-standard layout input folds to the same thing.
        let wr: ArrayD<f32> = w
            .clone()
            .reversed_axes()
            .as_standard_layout()
            .to_owned()
            .reversed_axes();
        assert!(!wr.is_standard_layout());
        assert_eq!(
            fuse_conv_bn_weights(&wr, Some(&bias), &b, false).unwrap(),
            f
        );
    }

    #[test]
    fn conv1d_3d_and_defaults() {
        let mut b = bn(3);
        b.weight = None;
        b.bias = None;
        let w = ArrayD::from_elem(IxDyn(&[3, 1, 2]), 2.0f32);
        let f = fuse_conv_bn_weights(&w, None, &b, false).unwrap();
        for c in 0..3 {
            assert_eq!(f.weight[[c, 0, 1]], 2.0 * (1.0 * r(&b, c)));
            assert_eq!(f.bias[c], (0.0 - b.running_mean[c]) * r(&b, c) * 1.0 + 0.0);
        }
        let w = ArrayD::from_elem(IxDyn(&[3, 2, 2, 2, 2]), 1.0f32);
        let f = fuse_conv_bn_weights(&w, None, &b, false).unwrap();
        assert_eq!(f.weight.shape(), &[3, 2, 2, 2, 2]);
        assert_eq!(f.weight[[2, 1, 1, 1, 1]], r(&b, 2));
    }

    #[test]
    fn conv_transpose_groups_2() {
        // ConvTranspose2d(in=4, out=6, groups=2): weight [4, 3, 1, 2].
        // Input channels 0,1 belong to group 0 (output channels 0..3),
        // input channels 2,3 to group 1 (output channels 3..6).
        let b = BatchNorm {
            weight: Some(arr1(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0])),
            bias: Some(arr1(&[0.0f32, 0.0, 0.0, 0.0, 0.0, 1.0])),
            running_mean: arr1(&[0.0f32; 6]),
            running_var: arr1(&[1.0f32; 6]),
            eps: 0.0,
            momentum: 0.1,
        };
        let w = ArrayD::from_elem(IxDyn(&[4, 3, 1, 2]), 1.0f32);
        let f = fuse_conv_bn_weights(&w, None, &b, true).unwrap();
        let want = [
            [1.0f32, 2.0, 3.0],
            [1.0, 2.0, 3.0],
            [4.0, 5.0, 6.0],
            [4.0, 5.0, 6.0],
        ];
        let w4: ndarray::Array4<f32> = f.weight.clone().into_dimensionality().unwrap();
        for ((i, j, _, k), &v) in w4.indexed_iter() {
            assert_eq!(v, want[i][j], "at {i},{j},{k}");
        }
        assert_eq!(f.bias.to_vec(), vec![0.0, 0.0, 0.0, 0.0, 0.0, 1.0]);
        // groups = 1 reduces to PyTorch's dim-1 rule.
        let w = ArrayD::from_elem(IxDyn(&[2, 6, 1, 1]), 1.0f32);
        let f = fuse_conv_bn_weights(&w, None, &b, true).unwrap();
        for i in 0..2 {
            for j in 0..6 {
                assert_eq!(f.weight[[i, j, 0, 0]], (j + 1) as f32);
            }
        }
        // Depthwise: [6, 1, k, k], g = 6.
        let w = ArrayD::from_elem(IxDyn(&[6, 1, 2, 2]), 1.0f32);
        let f = fuse_conv_bn_weights(&w, None, &b, true).unwrap();
        for i in 0..6 {
            assert_eq!(f.weight[[i, 0, 1, 1]], (i + 1) as f32);
        }
    }

    #[test]
    fn linear_matches_formula() {
        let b = bn(3);
        let w = Array2::from_shape_fn((3, 4), |(i, j)| (i * 4 + j) as f32 * 0.1 - 0.5);
        let bias = arr1(&[0.5f32, -0.5, 1.0]);
        let f = fuse_linear_bn_weights(&w, Some(&bias), &b).unwrap();
        for o in 0..3 {
            let s = b.weight.as_ref().unwrap()[o] * r(&b, o);
            for i in 0..4 {
                assert_eq!(f.weight[[o, i]], w[[o, i]] * s);
            }
            assert_eq!(
                f.bias[o],
                (bias[o] - b.running_mean[o]) * s + b.bias.as_ref().unwrap()[o]
            );
        }
        // One-channel BN broadcasts; affine=False works.
        let mut b1 = bn(1);
        b1.weight = None;
        b1.bias = None;
        let f = fuse_linear_bn_weights(&w, None, &b1).unwrap();
        assert_eq!(f.bias.len(), 3);
        assert_eq!(f.weight[[2, 3]], w[[2, 3]] * r(&b1, 0));
        assert_eq!(f.bias[1], (0.0 - b1.running_mean[0]) * r(&b1, 0));
    }

    #[test]
    fn error_channel_mismatch() {
        let w = ArrayD::zeros(IxDyn(&[4, 2, 3, 3]));
        let e = fuse_conv_bn_weights(&w, None, &bn(5), false).unwrap_err();
        assert!(matches!(e, Error::ChannelMismatch { .. }));
        assert_eq!(
            e.to_string(),
            "channel mismatch: conv has 4 output channels but BatchNorm has 5"
        );
        let e = fuse_conv_bn_weights(&w, None, &bn(5), true).unwrap_err();
        assert_eq!(
            e.to_string(),
            "channel mismatch: conv_transpose has 2 output channels but BatchNorm has 5"
        );
        let e = fuse_linear_bn_weights(&Array2::zeros((4, 2)), None, &bn(5)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "channel mismatch: linear has 4 output channels but BatchNorm has 5"
        );
    }

    #[test]
    fn error_other() {
        // groups = 6 / 2 = 3 does not divide Cin = 4.
        let w = ArrayD::zeros(IxDyn(&[4, 2, 3, 3]));
        let e = fuse_conv_bn_weights(&w, None, &bn(6), true).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)));
        let e =
            fuse_conv_bn_weights(&ArrayD::zeros(IxDyn(&[4, 2])), None, &bn(4), false).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)));
        let e = fuse_conv_bn_weights(&w, Some(&arr1(&[0.0f32; 3])), &bn(4), false).unwrap_err();
        assert_eq!(
            e.to_string(),
            "shape mismatch in conv bias: expected [4], got [3]"
        );
        let mut bad = bn(4);
        bad.running_var = arr1(&[1.0f32; 3]);
        let e = fuse_conv_bn_weights(&w, None, &bad, false).unwrap_err();
        assert_eq!(
            e.to_string(),
            "shape mismatch in BatchNorm running_var: expected [4], got [3]"
        );
        let e = fuse_linear_bn_weights(&Array2::zeros((4, 2)), Some(&arr1(&[0.0f32])), &bn(4))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "shape mismatch in linear bias: expected [4], got [1]"
        );
    }
}

/// Checks against the PyTorch golden cases (`tests/golden`, plus the folders of
/// `$QFUSE_GOLDEN_DIR`) for the ops of this file, `fake_quant.rs` and `observer.rs`.
#[cfg(test)]
mod golden {
    use std::collections::HashMap;
    use std::path::PathBuf;

    use ndarray::{Array1, Array2, ArrayD, IxDyn};
    use safetensors::{Dtype, SafeTensors};

    use super::{fuse_conv_bn_weights, fuse_linear_bn_weights};
    use crate::ops::BatchNorm;
    use crate::quant::{ObserverSpec, QDtype, QParams, QScheme, QuantRange};
    use crate::reference::fake_quant::{fake_quantize, fake_quantize_backward};
    use crate::reference::observer::observe_qparams;

    struct Case {
        name: String,
        t: HashMap<String, ArrayD<f32>>,
        params: serde_json::Value,
        atol: f32,
        rtol: f32,
    }

    impl Case {
        fn get(&self, k: &str) -> &ArrayD<f32> {
            self.t
                .get(k)
                .unwrap_or_else(|| panic!("{}: missing {k}", self.name))
        }
        fn opt1(&self, k: &str) -> Option<Array1<f32>> {
            self.t
                .get(k)
                .map(|a| a.clone().into_dimensionality().unwrap())
        }
        fn p(&self, k: &str) -> i64 {
            self.params[k].as_i64().unwrap()
        }
        fn close(&self, what: &str, got: &ArrayD<f32>, want: &ArrayD<f32>) {
            assert_eq!(got.shape(), want.shape(), "{}: {what} shape", self.name);
            for (i, (&g, &w)) in got.iter().zip(want.iter()).enumerate() {
                let ok = if self.atol == 0.0 && self.rtol == 0.0 {
                    g.to_bits() == w.to_bits() || g == w
                } else {
                    (g - w).abs() <= self.atol + self.rtol * w.abs()
                };
                assert!(ok, "{}: {what}[{i}] = {g:e}, want {w:e}", self.name);
            }
        }
    }

    fn cases(op: &str) -> Vec<Case> {
        let files: Vec<PathBuf> = crate::test_golden::golden_files(op);
        files
            .into_iter()
            .map(|path| {
                let bytes = std::fs::read(&path).unwrap();
                let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
                let meta = meta.metadata().clone().unwrap_or_default();
                let st = SafeTensors::deserialize(&bytes).unwrap();
                let mut t = HashMap::new();
                for (name, view) in st.tensors() {
                    let data: Vec<f32> = match view.dtype() {
                        Dtype::F32 => view
                            .data()
                            .chunks_exact(4)
                            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                            .collect(),
                        Dtype::I32 => view
                            .data()
                            .chunks_exact(4)
                            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32)
                            .collect(),
                        d => panic!("unexpected dtype {d:?}"),
                    };
                    t.insert(
                        name,
                        ArrayD::from_shape_vec(IxDyn(view.shape()), data).unwrap(),
                    );
                }
                let num = |k: &str| meta.get(k).map_or(0.0, |v| v.parse::<f32>().unwrap());
                Case {
                    name: path.display().to_string(),
                    params: serde_json::from_str(&meta["params"]).unwrap(),
                    atol: num("atol"),
                    rtol: num("rtol"),
                    t,
                }
            })
            .collect()
    }

    fn bn(c: &Case) -> BatchNorm {
        BatchNorm {
            weight: c.opt1("in.bn.weight"),
            bias: c.opt1("in.bn.bias"),
            running_mean: c.opt1("in.bn.running_mean").unwrap(),
            running_var: c.opt1("in.bn.running_var").unwrap(),
            eps: c.params["eps"].as_f64().unwrap() as f32,
            momentum: 0.1,
        }
    }

    #[test]
    fn golden_fold_conv_bn() {
        for c in cases("fold_conv_bn") {
            let transpose = c.params["transpose"].as_bool().unwrap();
            let f = fuse_conv_bn_weights(
                c.get("in.conv.weight"),
                c.opt1("in.conv.bias").as_ref(),
                &bn(&c),
                transpose,
            )
            .unwrap();
            c.close("weight", &f.weight, c.get("out.weight"));
            c.close("bias", &f.bias.into_dyn(), c.get("out.bias"));
        }
    }

    #[test]
    fn golden_fold_linear_bn() {
        for c in cases("fold_linear_bn") {
            let w: Array2<f32> = c
                .get("in.linear.weight")
                .clone()
                .into_dimensionality()
                .unwrap();
            let f = fuse_linear_bn_weights(&w, c.opt1("in.linear.bias").as_ref(), &bn(&c)).unwrap();
            c.close("weight", &f.weight, c.get("out.weight"));
            c.close("bias", &f.bias.into_dyn(), c.get("out.bias"));
        }
    }

    fn range(c: &Case) -> QuantRange {
        QuantRange::new(c.p("quant_min") as i32, c.p("quant_max") as i32).unwrap()
    }

    fn check_fq(c: &Case, qp: &QParams) {
        let x = c.get("in.x");
        let y = fake_quantize(x, qp, range(c)).unwrap();
        c.close("y", &y, c.get("out.y"));
        let dx = fake_quantize_backward(x, c.get("in.dy"), qp, range(c)).unwrap();
        c.close("dx", &dx, c.get("out.dx"));
    }

    #[test]
    fn golden_fake_quant_per_tensor() {
        for c in cases("fake_quant_per_tensor") {
            let s = c.params["scale"].as_f64().unwrap() as f32;
            check_fq(&c, &QParams::per_tensor(s, c.p("zero_point") as i32));
        }
    }

    #[test]
    fn golden_fake_quant_per_channel() {
        for c in cases("fake_quant_per_channel") {
            let qp = QParams::per_channel(
                c.get("in.scale").iter().copied().collect(),
                c.get("in.zero_point").iter().map(|&z| z as i32).collect(),
                c.p("axis") as usize,
            )
            .unwrap();
            check_fq(&c, &qp);
        }
    }

    #[test]
    fn golden_calc_qparams() {
        for c in cases("calc_qparams") {
            let spec = ObserverSpec::new(
                QDtype::parse(c.params["dtype"].as_str().unwrap()).unwrap(),
                QScheme::parse(c.params["qscheme"].as_str().unwrap()).unwrap(),
                range(&c),
                c.params["axis"].as_i64().unwrap_or(0) as isize,
            )
            .unwrap();
            // PyTorch's has_customized_qrange, when the case says.
            let spec = match c.params["customized_range"].as_bool() {
                Some(customized) => spec.with_customized_range(customized).unwrap(),
                None => spec,
            };
            let qp = observe_qparams(c.get("in.x"), &spec).unwrap();
            let n = qp.scale.len();
            // Bit-exact, though the case allows rtol 1e-6: the arithmetic is PyTorch's.
            assert_eq!(
                qp.scale,
                c.get("out.scale").iter().copied().collect::<Vec<_>>(),
                "{}",
                c.name
            );
            let zp: Vec<f32> = qp.zero_point.iter().map(|&z| z as f32).collect();
            assert_eq!(zp.len(), n);
            assert_eq!(
                zp,
                c.get("out.zero_point").iter().copied().collect::<Vec<_>>(),
                "{}",
                c.name
            );
        }
    }
}
