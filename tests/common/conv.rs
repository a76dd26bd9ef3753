//! Shared fixtures of the conv2d kernel tests (`gpu_conv_reg.rs`, `gpu_conv_subgroup.rs`): a
//! seeded generator, the shape table, and the check of one case against the CPU reference
//! with several epilogues.

use ndarray::{Array1, Array4, ArrayD};
use qfuse::gpu::{GpuContext, GpuTensor};
use qfuse::kernels::conv2d::{conv2d_with_algorithm, ConvAlgorithm, ConvEpilogue};
use qfuse::ops::{Activation, Conv2dParams};
use qfuse::reference;

/// SplitMix64: a small deterministic generator.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * (((self.next_u64() >> 40) as f32) / (1u32 << 24) as f32)
    }
    pub fn array4(&mut self, shape: [usize; 4]) -> Array4<f32> {
        Array4::from_shape_fn(shape, |_| self.uniform(-1.0, 1.0))
    }
    pub fn array1(&mut self, n: usize, lo: f32, hi: f32) -> Array1<f32> {
        Array1::from_shape_fn(n, |_| self.uniform(lo, hi))
    }
}

pub fn assert_close(what: &str, got: &ArrayD<f32>, want: &ArrayD<f32>, atol: f32, rtol: f32) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    for (i, (&g, &w)) in got.iter().zip(want.iter()).enumerate() {
        if (g.is_nan() && w.is_nan()) || g == w {
            continue;
        }
        let err = (g - w).abs();
        assert!(
            err <= atol + rtol * w.abs(),
            "{what}[{i}] (of shape {:?}): got {g:e}, want {w:e} (atol {atol:e}, rtol {rtol:e})",
            got.shape()
        );
    }
}

pub fn up(ctx: &GpuContext, a: ArrayD<f32>) -> GpuTensor {
    GpuTensor::upload_f32(ctx, &a).unwrap()
}

pub fn p(
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
) -> Conv2dParams {
    Conv2dParams {
        stride,
        padding,
        dilation,
        groups,
        ..Default::default()
    }
}

/// (input shape, weight shape, settings, name).
pub type Case = ([usize; 4], [usize; 4], Conv2dParams, &'static str);

pub fn configs() -> Vec<Case> {
    vec![
        (
            [2, 3, 8, 8],
            [8, 3, 3, 3],
            p([1, 1], [1, 1], [1, 1], 1),
            "3x3 pad 1",
        ),
        (
            [1, 5, 9, 17],
            [9, 5, 3, 3],
            p([1, 1], [1, 1], [1, 1], 1),
            "width 17, 9 channels",
        ),
        (
            [3, 4, 7, 7],
            [16, 4, 3, 3],
            p([1, 1], [1, 1], [1, 1], 1),
            "7x7 batch 3",
        ),
        (
            [1, 2, 5, 1],
            [3, 2, 3, 3],
            p([1, 1], [1, 1], [1, 1], 1),
            "width 1",
        ),
        (
            [1, 3, 6, 12],
            [5, 3, 3, 3],
            p([1, 1], [0, 0], [1, 1], 1),
            "3x3 no padding",
        ),
        (
            [1, 3, 6, 11],
            [7, 3, 3, 3],
            p([1, 1], [2, 2], [1, 1], 1),
            "3x3 pad 2",
        ),
        (
            [2, 4, 9, 9],
            [6, 4, 3, 3],
            p([2, 2], [1, 1], [1, 1], 1),
            "stride 2",
        ),
        (
            [1, 3, 10, 21],
            [5, 3, 3, 3],
            p([1, 1], [2, 2], [2, 2], 1),
            "dilation 2",
        ),
        (
            [2, 3, 7, 19],
            [4, 3, 2, 3],
            p([2, 1], [1, 0], [1, 2], 1),
            "nonsquare kernel/stride/padding/dilation",
        ),
        (
            [1, 3, 8, 13],
            [4, 3, 3, 3],
            p([1, 2], [1, 1], [1, 1], 1),
            "stride 1x2",
        ),
        (
            [2, 8, 7, 10],
            [8, 1, 3, 3],
            p([1, 1], [1, 1], [1, 1], 8),
            "depthwise",
        ),
        (
            [1, 4, 6, 6],
            [8, 1, 3, 3],
            p([2, 2], [1, 1], [1, 1], 4),
            "depthwise x2 multiplier, stride 2",
        ),
        (
            [1, 6, 6, 5],
            [10, 3, 3, 3],
            p([1, 1], [1, 1], [1, 1], 2),
            "groups 2",
        ),
        (
            [1, 6, 5, 9],
            [9, 2, 3, 3],
            p([1, 1], [1, 1], [1, 1], 3),
            "groups 3, 3 per group",
        ),
        (
            [2, 16, 5, 5],
            [12, 16, 1, 1],
            p([1, 1], [0, 0], [1, 1], 1),
            "1x1",
        ),
        (
            [2, 1, 12, 12],
            [20, 1, 5, 5],
            p([1, 1], [0, 0], [1, 1], 1),
            "5x5 no padding",
        ),
        (
            [1, 3, 9, 9],
            [6, 3, 3, 5],
            p([1, 1], [1, 2], [1, 1], 1),
            "3x5 kernel",
        ),
        (
            [2, 24, 13, 11],
            [80, 24, 3, 3],
            p([1, 1], [1, 1], [1, 1], 1),
            "80 channels, long reduction",
        ),
        (
            [2, 3, 7, 8],
            [8, 3, 2, 4],
            Conv2dParams::same([1, 1], 1),
            "padding='same', even kernel 2x4 (extra row and column at the bottom and right)",
        ),
        (
            [1, 6, 9, 6],
            [16, 3, 4, 2],
            Conv2dParams::same([1, 3], 2),
            "padding='same', kernel 4x2, dilation [1, 3], groups 2",
        ),
        (
            [1, 4, 9, 10],
            [8, 4, 3, 3],
            Conv2dParams::same([1, 1], 1),
            "padding='same', 3x3 (symmetric)",
        ),
    ]
}

/// Forward through `algorithm` with a few epilogues, against the CPU.
pub fn check(ctx: &GpuContext, rng: &mut Rng, case: &Case, algorithm: ConvAlgorithm) {
    let (xs, ws, params, what) = case;
    let x = rng.array4(*xs);
    let w = rng.array4(*ws);
    let o = ws[0];
    let scale = rng.array1(o, -2.0, 2.0);
    let bias = rng.array1(o, -1.0, 1.0);
    let (gx, gw) = (up(ctx, x.clone().into_dyn()), up(ctx, w.clone().into_dyn()));
    let (gs, gb) = (
        up(ctx, scale.clone().into_dyn()),
        up(ctx, bias.clone().into_dyn()),
    );
    let k = ws[1] * ws[2] * ws[3];
    let atol = 2e-4 * (k as f32 / 256.0).max(1.0);
    let plain = reference::conv2d::conv2d(&x, &w, None, params).unwrap();
    for (with_scale, with_bias, act) in [
        (false, false, Activation::None),
        (true, true, Activation::Relu),
        (false, true, Activation::Relu6),
    ] {
        let epilogue = ConvEpilogue {
            out_scale: with_scale.then_some(&gs),
            bias: with_bias.then_some(&gb),
            activation: act,
        };
        let got = conv2d_with_algorithm(ctx, &gx, &gw, params, &epilogue, algorithm)
            .unwrap()
            .download_f32(ctx)
            .unwrap();
        let mut want = plain.clone();
        for ((_, c, _, _), v) in want.indexed_iter_mut() {
            let mut t = *v;
            if with_scale {
                t *= scale[c];
            }
            if with_bias {
                t += bias[c];
            }
            *v = match act {
                Activation::Relu => t.max(0.0),
                Activation::Relu6 => t.clamp(0.0, 6.0),
                _ => t,
            };
        }
        assert_close(
            &format!("{what} {algorithm:?} scale {with_scale} bias {with_bias} {act:?}"),
            &got,
            &want.into_dyn(),
            atol,
            1e-4,
        );
    }
}

/// Output heights 3, 6, 2 and 1 (not multiples of 4: the last row quad of `forward_sg_r4`
/// partly past OH), for the multi-row subgroup kernels.
pub fn partial_quad_configs() -> Vec<Case> {
    vec![
        // Output heights 3, 6, 2 and 1 (not multiples of 4: the last row quad of
        // forward_sg_r4 partly past OH), batch 2 so the quad after a partial one is another
        // image's.
        (
            [2, 5, 3, 10],
            [16, 5, 3, 3],
            p([1, 1], [1, 1], [1, 1], 1),
            "3x3 height 3",
        ),
        (
            [2, 5, 6, 9],
            [24, 5, 3, 3],
            p([1, 1], [1, 1], [1, 1], 1),
            "3x3 height 6",
        ),
        (
            [3, 4, 4, 7],
            [8, 4, 3, 3],
            p([1, 1], [0, 0], [1, 1], 1),
            "3x3 no padding, height 2",
        ),
        (
            [2, 6, 3, 6],
            [16, 3, 3, 3],
            p([1, 1], [0, 0], [1, 1], 2),
            "3x3 groups 2, height 1",
        ),
    ]
}
