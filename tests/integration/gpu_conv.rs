//! GPU conv2d (forward with every epilogue option, both forward kernels; backward input,
//! weight and bias), linear, max_pool2d and log_softmax against the CPU reference, dispatch
//! tiling past 65,535 workgroups, and errors (the CPU's messages).
//!
//! Tolerances follow the golden cases (atol 1e-4, rtol 1e-4), with atol scaled by the length of
//! the reduction behind each output for the long ones (the GPU sums in another order).
//!
//! Run on a machine without a GPU with `WGPU_BACKEND=vulkan QFUSE_REQUIRE_GPU=1` (lavapipe).

use crate::common;

use std::sync::Arc;

use ndarray::{Array1, Array2, Array4, ArrayD};
use qfuse::gpu::{GpuContext, GpuTensor};
use qfuse::kernels::conv2d::{self as kconv, conv2d_with_algorithm, ConvAlgorithm, ConvEpilogue};
use qfuse::kernels::{linear as klinear, pool as kpool};
use qfuse::ops::{Activation, Conv2dParams};
use qfuse::reference;
use qfuse::{CpuBackend, Error, GpuBackend, HostOps};

/// SplitMix64: a small deterministic generator (no extra dependency).
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32) / (1u32 << 24) as f32
    }
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }
    fn array4(&mut self, shape: [usize; 4]) -> Array4<f32> {
        Array4::from_shape_fn(shape, |_| self.uniform(-1.0, 1.0))
    }
    fn array1(&mut self, n: usize, lo: f32, hi: f32) -> Array1<f32> {
        Array1::from_shape_fn(n, |_| self.uniform(lo, hi))
    }
}

/// `|got - want| <= atol + rtol * |want|` element-wise (NaN matches NaN).
fn assert_close(what: &str, got: &ArrayD<f32>, want: &ArrayD<f32>, atol: f32, rtol: f32) {
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

/// atol for outputs that are sums of `len` products of values in [-1, 1] (and scaled by at
/// most 2): the golden 1e-4, grown linearly past 256 terms.
fn atol_for(len: usize) -> f32 {
    1e-4 * (len as f32 / 256.0).max(1.0)
}

fn up4(ctx: &GpuContext, a: &Array4<f32>) -> GpuTensor {
    GpuTensor::upload_f32(ctx, &a.clone().into_dyn()).unwrap()
}

fn up1(ctx: &GpuContext, a: &Array1<f32>) -> GpuTensor {
    GpuTensor::upload_f32(ctx, &a.clone().into_dyn()).unwrap()
}

fn p(stride: [usize; 2], padding: [usize; 2], dilation: [usize; 2], groups: usize) -> Conv2dParams {
    Conv2dParams {
        stride,
        padding,
        dilation,
        groups,
        ..Default::default()
    }
}

/// The golden-like configurations: (input shape, weight shape, settings, name).
fn configs() -> Vec<([usize; 4], [usize; 4], Conv2dParams, &'static str)> {
    vec![
        (
            [2, 3, 8, 8],
            [8, 3, 3, 3],
            p([1, 1], [1, 1], [1, 1], 1),
            "3x3 pad 1",
        ),
        (
            [2, 4, 9, 9],
            [6, 4, 3, 3],
            p([2, 2], [1, 1], [1, 1], 1),
            "stride 2",
        ),
        (
            [1, 3, 10, 10],
            [5, 3, 3, 3],
            p([1, 1], [2, 2], [2, 2], 1),
            "dilation 2",
        ),
        (
            [2, 3, 7, 9],
            [4, 3, 2, 3],
            p([2, 1], [1, 0], [1, 2], 1),
            "nonsquare kernel/stride/padding/dilation",
        ),
        (
            [2, 8, 7, 7],
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
            [2, 16, 5, 5],
            [12, 16, 1, 1],
            p([1, 1], [0, 0], [1, 1], 1),
            "1x1",
        ),
        (
            [2, 1, 12, 12],
            [20, 1, 5, 5],
            p([1, 1], [0, 0], [1, 1], 1),
            "5x5 no padding (mnist conv1)",
        ),
        (
            [2, 24, 13, 11],
            [80, 24, 3, 3],
            p([1, 1], [1, 1], [1, 1], 1),
            "2 channel tiles, 5 pixel tiles, K tail",
        ),
        (
            [1, 10, 9, 9],
            [144, 5, 3, 3],
            p([1, 1], [1, 1], [1, 1], 2),
            "groups 2 with 72 channels per group",
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

/// An epilogue to test: scale, bias, activation.
type EpilogueCase<'a> = (Option<&'a Array1<f32>>, Option<&'a Array1<f32>>, Activation);

/// A conv the CPU refuses: weight, bias, settings.
type BadConv<'a> = (Array4<f32>, Option<&'a Array1<f32>>, Conv2dParams);

fn act_ref(v: f32, act: Activation) -> f32 {
    match act {
        Activation::None => v,
        _ if v.is_nan() => v,
        Activation::Relu => {
            if v < 0.0 {
                0.0
            } else {
                v
            }
        }
        Activation::Relu6 => v.clamp(0.0, 6.0),
        act => qfuse::reference::activation::activate(v, act),
    }
}

/// `act(conv(x, w) * scale[o] + bias[o])` on the CPU.
fn conv_epilogue_ref(
    x: &Array4<f32>,
    w: &Array4<f32>,
    params: &Conv2dParams,
    scale: Option<&Array1<f32>>,
    bias: Option<&Array1<f32>>,
    act: Activation,
) -> Array4<f32> {
    let mut y = reference::conv2d::conv2d(x, w, None, params).unwrap();
    for ((_, o, _, _), v) in y.indexed_iter_mut() {
        let mut t = *v;
        if let Some(s) = scale {
            t *= s[o];
        }
        if let Some(b) = bias {
            t += b[o];
        }
        *v = act_ref(t, act);
    }
    y
}

/// Forward with every epilogue option through `algorithm`, against the CPU.
fn check_forward(
    ctx: &GpuContext,
    rng: &mut Rng,
    xs: [usize; 4],
    ws: [usize; 4],
    params: &Conv2dParams,
    algorithm: ConvAlgorithm,
    what: &str,
) {
    let x = rng.array4(xs);
    let w = rng.array4(ws);
    let o = ws[0];
    let scale = rng.array1(o, -2.0, 2.0);
    let bias = rng.array1(o, -1.0, 1.0);
    let (gx, gw) = (up4(ctx, &x), up4(ctx, &w));
    let (gs, gb) = (up1(ctx, &scale), up1(ctx, &bias));
    let k = ws[1] * ws[2] * ws[3];
    let atol = 2.0 * atol_for(k);
    let cases: [EpilogueCase; 6] = [
        (None, None, Activation::None),
        (None, Some(&bias), Activation::None),
        (Some(&scale), None, Activation::None),
        (Some(&scale), Some(&bias), Activation::Relu),
        (None, Some(&bias), Activation::Relu6),
        (Some(&scale), Some(&bias), Activation::Relu6),
    ];
    for (s, b, act) in cases {
        let epilogue = ConvEpilogue {
            out_scale: s.map(|_| &gs),
            bias: b.map(|_| &gb),
            activation: act,
        };
        let got = conv2d_with_algorithm(ctx, &gx, &gw, params, &epilogue, algorithm)
            .unwrap()
            .download_f32(ctx)
            .unwrap();
        let want = conv_epilogue_ref(&x, &w, params, s, b, act);
        assert_close(
            &format!(
                "{what} {algorithm:?} scale {} bias {} {act:?}",
                s.is_some(),
                b.is_some()
            ),
            &got,
            &want.into_dyn(),
            atol,
            1e-4,
        );
    }
    // ConvEpilogue::none() and the bias-only epilogue are what conv2d with a bias means.
    let got = kconv::conv2d(ctx, &gx, &gw, params, &ConvEpilogue::none())
        .unwrap()
        .download_f32(ctx)
        .unwrap();
    let want = reference::conv2d::conv2d(&x, &w, None, params).unwrap();
    assert_close(&format!("{what} auto"), &got, &want.into_dyn(), atol, 1e-4);
}

/// dx, dweight and dbias against the CPU.
fn check_backward(
    ctx: &GpuContext,
    rng: &mut Rng,
    xs: [usize; 4],
    ws: [usize; 4],
    params: &Conv2dParams,
    what: &str,
) {
    let x = rng.array4(xs);
    let w = rng.array4(ws);
    let out = params.output_shape(&xs, &ws).unwrap();
    let dy = rng.array4(out);
    let want = reference::conv2d::conv2d_backward(&x, &w, &dy, params).unwrap();
    let (gx, gw, gdy) = (up4(ctx, &x), up4(ctx, &w), up4(ctx, &dy));
    let dx = kconv::conv2d_backward_input(ctx, &gdy, &gw, params, xs)
        .unwrap()
        .download_f32(ctx)
        .unwrap();
    let dw = kconv::conv2d_backward_weight(ctx, &gx, &gdy, params, ws)
        .unwrap()
        .download_f32(ctx)
        .unwrap();
    let db = kconv::channel_sum(ctx, &gdy)
        .unwrap()
        .download_f32(ctx)
        .unwrap();
    let og = ws[0] / params.groups;
    let pix = out[0] * out[2] * out[3];
    assert_close(
        &format!("{what} dx"),
        &dx,
        &want.dx.into_dyn(),
        atol_for(og * ws[2] * ws[3]),
        1e-4,
    );
    assert_close(
        &format!("{what} dweight"),
        &dw,
        &want.dweight.into_dyn(),
        atol_for(pix),
        1e-4,
    );
    assert_close(
        &format!("{what} dbias"),
        &db,
        &want.dbias.into_dyn(),
        atol_for(pix),
        1e-4,
    );
}

fn conv2d_forward_every_epilogue_and_kernel() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(1);
    for (xs, ws, params, what) in configs() {
        for algorithm in [ConvAlgorithm::ImplicitGemm, ConvAlgorithm::Direct] {
            check_forward(&ctx, &mut rng, xs, ws, &params, algorithm, what);
        }
    }
}

fn conv2d_backward_matches_reference() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(2);
    for (xs, ws, params, what) in configs() {
        check_backward(&ctx, &mut rng, xs, ws, &params, what);
    }
}

/// Random shapes, odd sizes included: every setting drawn independently, invalid combinations
/// redrawn.
fn conv2d_random_shapes() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(3);
    let mut done = 0;
    while done < 30 {
        let groups = [1, 1, 2, 3][rng.range(0, 3)];
        let cg = rng.range(1, 5);
        let og = [1, 2, 5, 9, 17, 70][rng.range(0, 5)];
        let xs = [
            rng.range(1, 3),
            cg * groups,
            rng.range(1, 13),
            rng.range(1, 13),
        ];
        let ws = [og * groups, cg, rng.range(1, 4), rng.range(1, 4)];
        let params = p(
            [rng.range(1, 3), rng.range(1, 3)],
            [rng.range(0, 2), rng.range(0, 2)],
            [rng.range(1, 2), rng.range(1, 2)],
            groups,
        );
        if params.output_shape(&xs, &ws).is_err() {
            continue;
        }
        let what = format!("random x {xs:?} w {ws:?} {params:?}");
        for algorithm in [ConvAlgorithm::ImplicitGemm, ConvAlgorithm::Direct] {
            check_forward(&ctx, &mut rng, xs, ws, &params, algorithm, &what);
        }
        check_backward(&ctx, &mut rng, xs, ws, &params, &what);
        done += 1;
    }
}

/// Long reductions (K = 1152 forward, 2 * 16 * 16 = 512 pixels backward).
fn conv2d_long_reductions() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(4);
    let xs = [2, 128, 16, 16];
    let ws = [72, 128, 3, 3];
    let params = p([1, 1], [1, 1], [1, 1], 1);
    check_forward(
        &ctx,
        &mut rng,
        xs,
        ws,
        &params,
        ConvAlgorithm::ImplicitGemm,
        "K 1152",
    );
    check_backward(&ctx, &mut rng, xs, ws, &params, "K 1152");
}

fn conv2d_empty_batch_and_channels() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(5);
    let params = p([1, 1], [1, 1], [1, 1], 1);
    let x = Array4::<f32>::zeros([0, 3, 5, 5]);
    let w = rng.array4([4, 3, 3, 3]);
    let bias = rng.array1(4, -1.0, 1.0);
    let gpu = GpuBackend::new(Arc::clone(&ctx));
    let y = gpu.conv2d(&x, &w, Some(&bias), &params).unwrap();
    assert_eq!(y.shape(), &[0, 4, 5, 5]);
    let g = gpu.conv2d_backward(&x, &w, &y, &params).unwrap();
    assert_eq!(g.dx.shape(), &[0, 3, 5, 5]);
    assert!(g.dweight.iter().all(|&v| v == 0.0));
    assert!(g.dbias.iter().all(|&v| v == 0.0));
    // No input channels: the output is the bias.
    let x = Array4::<f32>::zeros([1, 0, 3, 3]);
    let w = Array4::<f32>::zeros([2, 0, 1, 1]);
    let b = Array1::from(vec![1.5f32, -2.0]);
    let y = gpu
        .conv2d(&x, &w, Some(&b), &Conv2dParams::default())
        .unwrap();
    assert!(y.indexed_iter().all(|((_, o, _, _), &v)| v == b[o]));
}

/// The backend methods (upload, kernels, download) against the CPU backend.
fn backend_matches_cpu() {
    let Some(ctx) = common::gpu() else { return };
    let gpu = GpuBackend::new(Arc::clone(&ctx));
    let cpu = CpuBackend;
    let mut rng = Rng(6);
    for (xs, ws, params, what) in configs() {
        let x = rng.array4(xs);
        let w = rng.array4(ws);
        let b = rng.array1(ws[0], -1.0, 1.0);
        let k = ws[1] * ws[2] * ws[3];
        for bias in [None, Some(&b)] {
            let got = gpu.conv2d(&x, &w, bias, &params).unwrap();
            let want = cpu.conv2d(&x, &w, bias, &params).unwrap();
            assert_close(
                &format!("backend conv2d {what}"),
                &got.into_dyn(),
                &want.into_dyn(),
                atol_for(k),
                1e-4,
            );
        }
        let out = params.output_shape(&xs, &ws).unwrap();
        let dy = rng.array4(out);
        let got = gpu.conv2d_backward(&x, &w, &dy, &params).unwrap();
        let want = cpu.conv2d_backward(&x, &w, &dy, &params).unwrap();
        let pix = out[0] * out[2] * out[3];
        let og = ws[0] / params.groups;
        assert_close(
            &format!("backend dx {what}"),
            &got.dx.into_dyn(),
            &want.dx.into_dyn(),
            atol_for(og * ws[2] * ws[3]),
            1e-4,
        );
        assert_close(
            &format!("backend dweight {what}"),
            &got.dweight.into_dyn(),
            &want.dweight.into_dyn(),
            atol_for(pix),
            1e-4,
        );
        assert_close(
            &format!("backend dbias {what}"),
            &got.dbias.into_dyn(),
            &want.dbias.into_dyn(),
            atol_for(pix),
            1e-4,
        );
    }
    let x = Array2::from_shape_fn((5, 37), |_| rng.uniform(-1.0, 1.0));
    let w = Array2::from_shape_fn((11, 37), |_| rng.uniform(-1.0, 1.0));
    let b = rng.array1(11, -1.0, 1.0);
    assert_close(
        "backend linear",
        &gpu.linear(&x, &w, Some(&b)).unwrap().into_dyn(),
        &cpu.linear(&x, &w, Some(&b)).unwrap().into_dyn(),
        1e-4,
        1e-4,
    );
    let x4 = rng.array4([2, 3, 9, 8]);
    assert_eq!(
        gpu.max_pool2d(&x4, 2, 2).unwrap(),
        cpu.max_pool2d(&x4, 2, 2).unwrap()
    );
    assert_close(
        "backend log_softmax",
        &gpu.log_softmax(&x).unwrap().into_dyn(),
        &cpu.log_softmax(&x).unwrap().into_dyn(),
        1e-5,
        1e-5,
    );
}

fn linear_matches_reference() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(7);
    for (n, inp, out) in [
        (1, 1, 1),
        (3, 2, 3),
        (7, 33, 65),
        (64, 800, 500),
        (130, 17, 10),
        (0, 4, 3),
    ] {
        let x = Array2::from_shape_fn((n, inp), |_| rng.uniform(-1.0, 1.0));
        let w = Array2::from_shape_fn((out, inp), |_| rng.uniform(-1.0, 1.0));
        let b = rng.array1(out, -1.0, 1.0);
        let gx = GpuTensor::upload_f32(&ctx, &x.clone().into_dyn()).unwrap();
        let gw = GpuTensor::upload_f32(&ctx, &w.clone().into_dyn()).unwrap();
        let gb = up1(&ctx, &b);
        for bias in [None, Some(&b)] {
            let got = klinear::linear(&ctx, &gx, &gw, bias.map(|_| &gb))
                .unwrap()
                .download_f32(&ctx)
                .unwrap();
            let want = reference::layers::linear(&x, &w, bias).unwrap();
            assert_close(
                &format!("linear {n}x{inp} -> {out}"),
                &got,
                &want.into_dyn(),
                atol_for(inp),
                1e-4,
            );
        }
        let got = klinear::linear_act(&ctx, &gx, &gw, Some(&gb), Activation::Relu6)
            .unwrap()
            .download_f32(&ctx)
            .unwrap();
        let want = reference::layers::linear(&x, &w, Some(&b))
            .unwrap()
            .mapv(|v| act_ref(v, Activation::Relu6));
        assert_close(
            "linear + relu6",
            &got,
            &want.into_dyn(),
            atol_for(inp),
            1e-4,
        );
    }
}

fn max_pool2d_matches_reference_incl_nan() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(8);
    for (shape, kernel, stride) in [
        ([2, 3, 8, 8], 2, 2),
        ([1, 2, 9, 7], 3, 2),
        ([2, 1, 5, 6], 2, 1),
        ([1, 4, 24, 24], 2, 2),
        ([1, 1, 4, 4], 4, 3),
        ([3, 2, 7, 5], 1, 1),
    ] {
        let mut x = rng.array4(shape);
        // NaNs (with distinct payloads) and infinities in some windows.
        let len = x.len();
        let flat = x.as_slice_mut().unwrap();
        for i in (0..len).step_by(13) {
            flat[i] = f32::from_bits(0x7fc0_0000 | i as u32);
        }
        for i in (5..len).step_by(17) {
            flat[i] = f32::NEG_INFINITY;
        }
        flat[len - 1] = f32::INFINITY;
        let gx = up4(&ctx, &x);
        let got = kpool::max_pool2d(&ctx, &gx, kernel, stride)
            .unwrap()
            .download_f32(&ctx)
            .unwrap();
        let want = reference::layers::max_pool2d(&x, kernel, stride).unwrap();
        assert_eq!(got.shape(), want.shape());
        for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "max_pool2d {shape:?} k{kernel} s{stride} [{i}]: {g} vs {w}"
            );
        }
        assert!(got.iter().any(|v| v.is_nan()));
    }
}

fn log_softmax_matches_reference() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(9);
    // Rows of up to 1024 columns: one invocation per row (300 rows: two workgroups); longer
    // rows: a workgroup each.
    for (n, c) in [
        (1, 1),
        (3, 10),
        (300, 10),
        (4, 255),
        (2, 257),
        (5, 1000),
        (3, 1025),
        (2, 3000),
        (0, 3),
    ] {
        let x = Array2::from_shape_fn((n, c), |_| rng.uniform(-20.0, 20.0));
        let gx = GpuTensor::upload_f32(&ctx, &x.clone().into_dyn()).unwrap();
        let got = kpool::log_softmax(&ctx, &gx)
            .unwrap()
            .download_f32(&ctx)
            .unwrap();
        let want = reference::layers::log_softmax(&x);
        assert_close(
            &format!("log_softmax {n}x{c}"),
            &got,
            &want.into_dyn(),
            1e-5,
            1e-5,
        );
    }
    let inf = f32::INFINITY;
    let nan = f32::NAN;
    let x = ndarray::arr2(&[
        [1.0f32, 2.0, 3.0],
        [1000.0, 1000.0, 1000.0],
        [0.0, nan, 1.0],
        [0.0, inf, 1.0],
        [-inf, -inf, -inf],
        [-inf, 0.0, 1.0],
    ]);
    let gx = GpuTensor::upload_f32(&ctx, &x.clone().into_dyn()).unwrap();
    let got = kpool::log_softmax(&ctx, &gx)
        .unwrap()
        .download_f32(&ctx)
        .unwrap()
        .into_dimensionality::<ndarray::Ix2>()
        .unwrap();
    let want = reference::layers::log_softmax(&x);
    assert!(got.row(2).iter().all(|v| v.is_nan()));
    assert!(got.row(3).iter().all(|v| v.is_nan()));
    assert!(got.row(4).iter().all(|v| v.is_nan()));
    assert_eq!(got[[5, 0]], f32::NEG_INFINITY);
    assert_close(
        "log_softmax edges",
        &got.into_dyn(),
        &want.into_dyn(),
        1e-5,
        1e-5,
    );
}

/// A depthwise conv with 1024 groups of 65 x 64 outputs through the implicit GEMM needs
/// 1024 x 65 = 66,560 workgroup tiles: more than one dimension allows, so the grid is tiled
/// over x and y. Every output must still be written exactly once, the last ones included.
fn large_conv_output_tiles_dispatch() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(10);
    let xs = [1, 1024, 65, 64];
    let ws = [1024, 1, 3, 3];
    let params = p([1, 1], [1, 1], [1, 1], 1024);
    let out = params.output_shape(&xs, &ws).unwrap();
    let tiles = 1024 * (out[0] * out[2] * out[3]).div_ceil(kconv::GEMM_TILE[1]);
    let [gx_, gy_, _] = ctx.grid_1d(tiles, 1).unwrap();
    assert!(
        tiles > 65_535 && gy_ > 1 && gx_ <= 65_535,
        "expected a 2-D grid for {tiles} tiles, got [{gx_}, {gy_}]"
    );
    let x = rng.array4(xs);
    let w = rng.array4(ws);
    let bias = rng.array1(1024, -1.0, 1.0);
    let (gx, gw, gb) = (up4(&ctx, &x), up4(&ctx, &w), up1(&ctx, &bias));
    let epilogue = ConvEpilogue {
        bias: Some(&gb),
        ..ConvEpilogue::none()
    };
    let got = conv2d_with_algorithm(
        &ctx,
        &gx,
        &gw,
        &params,
        &epilogue,
        ConvAlgorithm::ImplicitGemm,
    )
    .unwrap()
    .download_f32(&ctx)
    .unwrap();
    let want = reference::conv2d::conv2d(&x, &w, Some(&bias), &params).unwrap();
    assert_close("66,560-tile conv", &got, &want.into_dyn(), 1e-4, 1e-4);
}

/// A conv whose inputs fit but whose output passes the device's storage binding limit (16 MiB
/// on a context cut down with `QFUSE_DEVICE_LIMITS=small`) is refused with the typed
/// `Error::BufferTooLarge` before anything is allocated or dispatched, by every algorithm; the
/// context keeps working.
fn conv_output_past_the_binding_limit_is_refused() {
    let Some(ctx) = common::gpu() else { return };
    let l = ctx.limits();
    let limit = l.max_storage_buffer_binding_size.min(l.max_buffer_size);
    // [1, 1, 32, 32] through O 1x1 filters: O * 4 KiB of output, one 4 KiB step past the limit.
    let o = usize::try_from(limit / 4096 + 1).unwrap();
    let mut rng = Rng(12);
    let x = rng.array4([1, 1, 32, 32]);
    let w = rng.array4([o, 1, 1, 1]);
    let (gx, gw) = (up4(&ctx, &x), up4(&ctx, &w));
    let params = Conv2dParams::default();
    for algorithm in [
        ConvAlgorithm::Auto,
        ConvAlgorithm::Direct,
        ConvAlgorithm::ImplicitGemm,
        ConvAlgorithm::RegisterBlocked,
    ] {
        let e = conv2d_with_algorithm(&ctx, &gx, &gw, &params, &ConvEpilogue::none(), algorithm)
            .unwrap_err();
        assert!(
            matches!(e, Error::BufferTooLarge { size, limit: l, .. }
                if size == o as u64 * 4096 && l == limit),
            "{algorithm:?}: {e:?}"
        );
    }
    let small = rng.array4([2, 1, 3, 3]);
    let y = conv2d_with_algorithm(
        &ctx,
        &gx,
        &up4(&ctx, &small),
        &params,
        &ConvEpilogue::none(),
        ConvAlgorithm::Auto,
    )
    .unwrap()
    .download_f32(&ctx)
    .unwrap();
    let want = reference::conv2d::conv2d(&x, &small, None, &params).unwrap();
    assert_close("after the refusal", &y, &want.into_dyn(), 1e-5, 1e-5);
}

/// A context whose device allows only 16 workgroups per dimension, so that every kernel's
/// grid is tiled over x and y even at test sizes.
fn small_grid_context() -> Option<GpuContext> {
    common::custom_context("small grid", wgpu::Features::empty(), |l| {
        l.max_compute_workgroups_per_dimension = 16
    })
}

fn small_grid_limit_tiles_every_kernel() {
    let Some(ctx) = small_grid_context() else {
        return;
    };
    assert_eq!(ctx.limits().max_compute_workgroups_per_dimension, 16);
    let mut rng = Rng(11);
    // forward: 2 * 6 * 24 * 24 = 6912 outputs (27 workgroups of 256), 18 GEMM tiles.
    let (xs, ws) = ([2, 4, 24, 24], [6, 4, 3, 3]);
    let params = p([1, 1], [1, 1], [1, 1], 1);
    assert!(ctx.grid_1d(18, 1).unwrap()[1] > 1 && ctx.grid_1d(6912, 256).unwrap()[1] > 1);
    for algorithm in [ConvAlgorithm::ImplicitGemm, ConvAlgorithm::Direct] {
        check_forward(&ctx, &mut rng, xs, ws, &params, algorithm, "small grid");
    }
    // backward: 6 * 4 * 9 = 216 weight workgroups; then 1 * 3 * 40 * 40 = 4800 dx (19
    // workgroups of 256); and a channel sum over 40 channels (40 workgroups).
    check_backward(&ctx, &mut rng, [2, 4, 12, 12], ws, &params, "small grid");
    let (xs, ws) = ([1, 3, 40, 40], [2, 3, 3, 3]);
    check_backward(&ctx, &mut rng, xs, ws, &params, "small grid, 6400 dx");
    let t = rng.array4([2, 40, 3, 3]);
    let got = kconv::channel_sum(&ctx, &up4(&ctx, &t))
        .unwrap()
        .download_f32(&ctx)
        .unwrap();
    let want = t
        .sum_axis(ndarray::Axis(3))
        .sum_axis(ndarray::Axis(2))
        .sum_axis(ndarray::Axis(0));
    assert_close("small grid channel_sum", &got, &want.into_dyn(), 1e-5, 1e-5);
    // pooling: 2 * 3 * 40 * 40 outputs (stride 1): 38 workgroups; log_softmax: 40 rows.
    let x = rng.array4([2, 3, 41, 41]);
    let got = kpool::max_pool2d(&ctx, &up4(&ctx, &x), 2, 1)
        .unwrap()
        .download_f32(&ctx)
        .unwrap();
    assert_eq!(
        got,
        reference::layers::max_pool2d(&x, 2, 1).unwrap().into_dyn()
    );
    let x = Array2::from_shape_fn((40, 7), |_| rng.uniform(-3.0, 3.0));
    let got = kpool::log_softmax(
        &ctx,
        &GpuTensor::upload_f32(&ctx, &x.clone().into_dyn()).unwrap(),
    )
    .unwrap()
    .download_f32(&ctx)
    .unwrap();
    assert_close(
        "small grid log_softmax",
        &got,
        &reference::layers::log_softmax(&x).into_dyn(),
        1e-5,
        1e-5,
    );
    // linear: 1000 rows -> 16 pixel tiles x 2 channel tiles.
    let x = Array2::from_shape_fn((1000, 9), |_| rng.uniform(-1.0, 1.0));
    let w = Array2::from_shape_fn((70, 9), |_| rng.uniform(-1.0, 1.0));
    let got = klinear::linear(
        &ctx,
        &GpuTensor::upload_f32(&ctx, &x.clone().into_dyn()).unwrap(),
        &GpuTensor::upload_f32(&ctx, &w.clone().into_dyn()).unwrap(),
        None,
    )
    .unwrap()
    .download_f32(&ctx)
    .unwrap();
    let want = reference::layers::linear(&x, &w, None).unwrap();
    assert_close("small grid linear", &got, &want.into_dyn(), 1e-4, 1e-4);
}

fn err_string<T: std::fmt::Debug>(r: qfuse::Result<T>) -> String {
    r.unwrap_err().to_string()
}

fn errors_match_cpu() {
    let Some(ctx) = common::gpu() else { return };
    let gpu = GpuBackend::new(Arc::clone(&ctx));
    let cpu = CpuBackend;
    let mut rng = Rng(12);
    let x = rng.array4([1, 3, 5, 5]);
    let w = rng.array4([4, 3, 3, 3]);
    let d = Conv2dParams::default();
    // conv2d: bias, weight channels, kernel too large, bad settings.
    let bad_b = Array1::<f32>::zeros(3);
    let cases: Vec<BadConv> = vec![
        (w.clone(), Some(&bad_b), d),
        (rng.array4([4, 2, 3, 3]), None, d),
        (rng.array4([4, 3, 7, 7]), None, d),
        (
            w.clone(),
            None,
            Conv2dParams {
                stride: [0, 1],
                ..d
            },
        ),
        (
            w.clone(),
            None,
            Conv2dParams {
                dilation: [1, 0],
                ..d
            },
        ),
        (w.clone(), None, Conv2dParams { groups: 0, ..d }),
        (w.clone(), None, Conv2dParams { groups: 2, ..d }),
    ];
    for (wt, b, params) in &cases {
        let want = err_string(cpu.conv2d(&x, wt, *b, params));
        assert_eq!(err_string(gpu.conv2d(&x, wt, *b, params)), want);
        // The launcher itself gives the same message.
        let gb = b.map(|b| up1(&ctx, b));
        let epilogue = ConvEpilogue {
            bias: gb.as_ref(),
            ..ConvEpilogue::none()
        };
        let got = err_string(kconv::conv2d(
            &ctx,
            &up4(&ctx, &x),
            &up4(&ctx, wt),
            params,
            &epilogue,
        ));
        assert_eq!(got, want);
    }
    assert!(matches!(
        gpu.conv2d(&x, &w, Some(&bad_b), &d).unwrap_err(),
        Error::ShapeMismatch { .. }
    ));
    // Epilogue scale of the wrong length.
    let gs = up1(&ctx, &bad_b);
    let epilogue = ConvEpilogue {
        out_scale: Some(&gs),
        ..ConvEpilogue::none()
    };
    let e = kconv::conv2d(&ctx, &up4(&ctx, &x), &up4(&ctx, &w), &d, &epilogue).unwrap_err();
    assert_eq!(
        e.to_string(),
        "shape mismatch in conv2d out_scale: expected [4], got [3]"
    );
    // Rank errors come from Conv2dParams::output_shape, as on the CPU.
    let x3 = GpuTensor::zeros(&ctx, &[3, 5, 5], qfuse::gpu::DType::F32).unwrap();
    let e = kconv::conv2d(&ctx, &x3, &up4(&ctx, &w), &d, &ConvEpilogue::none()).unwrap_err();
    assert_eq!(
        e.to_string(),
        err_string(d.output_shape(&[3, 5, 5], w.shape()))
    );
    // conv2d_backward: dy of the wrong shape (and the forward's errors first).
    let bad_dy = Array4::<f32>::zeros([1, 4, 3, 2]);
    let want = err_string(cpu.conv2d_backward(&x, &w, &bad_dy, &d));
    assert!(want.contains("conv2d_backward dy"), "{want}");
    assert_eq!(err_string(gpu.conv2d_backward(&x, &w, &bad_dy, &d)), want);
    let gdy = up4(&ctx, &bad_dy);
    assert_eq!(
        err_string(kconv::conv2d_backward_input(
            &ctx,
            &gdy,
            &up4(&ctx, &w),
            &d,
            [1, 3, 5, 5]
        )),
        want
    );
    assert_eq!(
        err_string(kconv::conv2d_backward_weight(
            &ctx,
            &up4(&ctx, &x),
            &gdy,
            &d,
            [4, 3, 3, 3]
        )),
        want
    );
    let w_bad = rng.array4([4, 2, 3, 3]);
    assert_eq!(
        err_string(gpu.conv2d_backward(&x, &w_bad, &bad_dy, &d)),
        err_string(cpu.conv2d_backward(&x, &w_bad, &bad_dy, &d))
    );
    let e = kconv::channel_sum(&ctx, &x3).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    // max_pool2d.
    for (k, s) in [(0, 1), (2, 0), (6, 1)] {
        assert_eq!(
            err_string(gpu.max_pool2d(&x, k, s)),
            err_string(cpu.max_pool2d(&x, k, s))
        );
    }
    let e = kpool::max_pool2d(&ctx, &x3, 2, 2).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    // linear.
    let xl = Array2::<f32>::zeros((3, 2));
    let wl = Array2::<f32>::zeros((3, 2));
    let bl = Array1::<f32>::zeros(2);
    let wl_bad = Array2::<f32>::zeros((3, 3));
    assert_eq!(
        err_string(gpu.linear(&xl, &wl_bad, None)),
        err_string(cpu.linear(&xl, &wl_bad, None))
    );
    assert_eq!(
        err_string(gpu.linear(&xl, &wl, Some(&bl))),
        err_string(cpu.linear(&xl, &wl, Some(&bl)))
    );
    let e = kpool::log_softmax(&ctx, &x3).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert!(ctx.take_uncaptured_error().is_none());
}

crate::qfuse_tests! {
    conv2d_forward_every_epilogue_and_kernel: gpu,
    conv2d_backward_matches_reference: gpu,
    conv2d_random_shapes: gpu,
    conv2d_long_reductions: gpu,
    conv2d_empty_batch_and_channels: gpu,
    backend_matches_cpu: gpu,
    linear_matches_reference: gpu,
    max_pool2d_matches_reference_incl_nan: gpu,
    log_softmax_matches_reference: gpu,
    large_conv_output_tiles_dispatch: large_buffers,
    conv_output_past_the_binding_limit_is_refused: gpu,
    small_grid_limit_tiles_every_kernel: gpu,
    errors_match_cpu: gpu,
}
