//! Training kernels (`kernels::train`, `shaders/train.wgsl`) against the CPU reference
//! (`reference::train`, `optim::Sgd`): max pooling backward (bit-exact, ties and NaN), linear
//! backward, log_softmax backward, NLL loss and its backward, the fused backward, the correct
//! count (with its poison on bad labels), SGD with momentum / Nesterov / weight decay, and the
//! shared errors.
//!
//! Run with `WGPU_BACKEND=vulkan QFUSE_REQUIRE_GPU=1` (lavapipe); without an adapter each test
//! prints one skip line.

use crate::common;

use ndarray::{Array2, Array4, ArrayD, IxDyn};
use qfuse::gpu::{DType, GpuContext, GpuTensor};
use qfuse::kernels::train as k;
use qfuse::optim::Sgd;
use qfuse::reference::{layers, train as r};
use qfuse::Error;

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
    }
    fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
    fn labels(&mut self, n: usize, c: u32) -> Vec<u32> {
        (0..n)
            .map(|_| (self.next_u64() % u64::from(c)) as u32)
            .collect()
    }
}

fn up(ctx: &GpuContext, a: &ArrayD<f32>) -> GpuTensor {
    GpuTensor::upload_f32(ctx, a).unwrap()
}

fn down(ctx: &GpuContext, t: &GpuTensor) -> ArrayD<f32> {
    t.download_f32(ctx).unwrap()
}

/// max |got − want| ≤ atol + rtol·|want|, NaN where NaN, the same infinity where infinite.
fn assert_close(what: &str, got: &ArrayD<f32>, want: &ArrayD<f32>, atol: f32, rtol: f32) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    for (i, (&g, &w)) in got.iter().zip(want.iter()).enumerate() {
        let ok = (g.is_nan() && w.is_nan()) || g == w || (g - w).abs() <= atol + rtol * w.abs();
        assert!(ok, "{what}: element {i}: got {g:e}, want {w:e}");
    }
}

fn assert_bits(what: &str, got: &ArrayD<f32>, want: &ArrayD<f32>) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    for (i, (&g, &w)) in got.iter().zip(want.iter()).enumerate() {
        assert!(
            g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
            "{what}: element {i}: got {g:e}, want {w:e}"
        );
    }
}

fn max_pool2d_backward_is_bit_exact() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(1);
    for (shape, kernel, stride) in [
        ([2, 3, 8, 8], 2, 2),   // Mnist's pooling
        ([1, 2, 7, 9], 3, 2),   // overlapping, ragged edge
        ([2, 1, 6, 6], 3, 1),   // heavy overlap: sums of several windows
        ([1, 4, 24, 24], 2, 2), // Mnist conv1 plane size
        ([1, 2, 7, 9], 2, 2),   // stride = kernel with a ragged edge: rows under no window
        ([2, 2, 9, 9], 3, 3),   // stride = kernel, 3x3 windows
    ] {
        let n: usize = shape.iter().product();
        // Few distinct values so ties are common; a few NaNs.
        let mut v: Vec<f32> = (0..n).map(|_| (rng.next_u64() % 5) as f32 - 2.0).collect();
        for _ in 0..n / 40 {
            let i = (rng.next_u64() % n as u64) as usize;
            v[i] = f32::NAN;
        }
        let x = Array4::from_shape_vec(shape, v).unwrap();
        let (oh, ow) = layers::max_pool2d_output(shape[2], shape[3], kernel, stride).unwrap();
        // Some -0.0 upstream values: a lone window's gradient is 0 + dy (+0.0), as on the CPU.
        let mut dyv = rng.vec(shape[0] * shape[1] * oh * ow, -1.0, 1.0);
        for v in dyv.iter_mut().step_by(7) {
            *v = -0.0;
        }
        let dy = Array4::from_shape_vec((shape[0], shape[1], oh, ow), dyv).unwrap();
        let want = r::max_pool2d_backward(&x, &dy, kernel, stride).unwrap();
        let gx = up(&ctx, &x.clone().into_dyn());
        let gdy = up(&ctx, &dy.clone().into_dyn());
        let got = k::max_pool2d_backward(&ctx, &gx, &gdy, kernel, stride).unwrap();
        assert_bits(
            &format!("max_pool2d_backward {shape:?} k{kernel} s{stride}"),
            &down(&ctx, &got),
            &want.into_dyn(),
        );
    }
    // The same refusals as the CPU.
    let gx = GpuTensor::zeros(&ctx, &[1, 1, 4, 4], DType::F32).unwrap();
    let bad = GpuTensor::zeros(&ctx, &[1, 1, 3, 3], DType::F32).unwrap();
    let e = k::max_pool2d_backward(&ctx, &gx, &bad, 2, 2).unwrap_err();
    let cpu = r::max_pool2d_backward(
        &Array4::zeros((1, 1, 4, 4)),
        &Array4::zeros((1, 1, 3, 3)),
        2,
        2,
    )
    .unwrap_err();
    assert_eq!(e.to_string(), cpu.to_string());
    assert!(k::max_pool2d_backward(&ctx, &gx, &bad, 0, 2).is_err());
}

fn linear_backward_matches_cpu() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(2);
    // Mnist's fc2 and a slice of fc1, plus ragged sizes (not multiples of 4).
    for (n, inp, out) in [(64, 500, 10), (64, 800, 37), (5, 7, 3), (1, 1, 1)] {
        let x = Array2::from_shape_vec((n, inp), rng.vec(n * inp, -1.0, 1.0)).unwrap();
        let w = Array2::from_shape_vec((out, inp), rng.vec(out * inp, -0.5, 0.5)).unwrap();
        let dy = Array2::from_shape_vec((n, out), rng.vec(n * out, -1.0, 1.0)).unwrap();
        let want = r::linear_backward(&x, &w, &dy).unwrap();
        let (gx, gw, gdy) = (
            up(&ctx, &x.into_dyn()),
            up(&ctx, &w.into_dyn()),
            up(&ctx, &dy.into_dyn()),
        );
        for kernel in grad_kernels(&ctx) {
            let g = k::linear_backward_with(&ctx, &gx, &gw, &gdy, kernel).unwrap();
            let what = format!("linear_backward {n}x{inp}->{out} {kernel:?}");
            assert_close(
                &what,
                &down(&ctx, &g.dx),
                &want.dx.clone().into_dyn(),
                1e-4,
                1e-4,
            );
            assert_close(
                &what,
                &down(&ctx, &g.dweight),
                &want.dweight.clone().into_dyn(),
                1e-4,
                1e-4,
            );
            assert_close(
                &what,
                &down(&ctx, &g.dbias),
                &want.dbias.clone().into_dyn(),
                1e-4,
                1e-4,
            );
        }
    }
    let x = GpuTensor::zeros(&ctx, &[2, 3], DType::F32).unwrap();
    let w = GpuTensor::zeros(&ctx, &[4, 3], DType::F32).unwrap();
    let dy = GpuTensor::zeros(&ctx, &[2, 5], DType::F32).unwrap();
    let e = k::linear_backward(&ctx, &x, &w, &dy).unwrap_err();
    let cpu = r::linear_backward(
        &Array2::zeros((2, 3)),
        &Array2::zeros((4, 3)),
        &Array2::zeros((2, 5)),
    )
    .unwrap_err();
    assert_eq!(e.to_string(), cpu.to_string());
}

fn loss_ops_match_cpu() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(3);
    for (n, c) in [(64, 10), (300, 10), (3, 1), (7, 33)] {
        let z = Array2::from_shape_vec((n, c), rng.vec(n * c, -4.0, 4.0)).unwrap();
        let logp = layers::log_softmax(&z);
        let labels = rng.labels(n, c as u32);
        let gl = k::upload_labels(&ctx, &labels, c).unwrap();
        let glogp = up(&ctx, &logp.clone().into_dyn());
        let what = format!("[{n}, {c}]");

        let loss = down(&ctx, &k::nll_loss(&ctx, &glogp, &gl).unwrap());
        let want = r::nll_loss(&logp, &labels).unwrap();
        assert_eq!(loss.shape(), &[1]);
        assert!(
            (loss[[0]] - want).abs() <= 1e-5 * (1.0 + want.abs()),
            "{what}: {loss} vs {want}"
        );

        let g = k::nll_loss_backward(&ctx, &glogp, &gl).unwrap();
        let want_g = r::nll_loss_backward(&logp, &labels).unwrap();
        assert_bits(
            &format!("nll_loss_backward {what}"),
            &down(&ctx, &g),
            &want_g.clone().into_dyn(),
        );

        let dx = k::log_softmax_backward(&ctx, &glogp, &g).unwrap();
        let want_dx = r::log_softmax_backward(&logp, &want_g).unwrap();
        assert_close(
            &format!("log_softmax_backward {what}"),
            &down(&ctx, &dx),
            &want_dx.clone().into_dyn(),
            1e-6,
            1e-5,
        );

        let fused = k::log_softmax_nll_backward(&ctx, &glogp, &gl).unwrap();
        let want_fused = r::log_softmax_nll_backward(&logp, &labels).unwrap();
        assert_eq!(want_fused, want_dx);
        assert_close(
            &format!("log_softmax_nll_backward {what}"),
            &down(&ctx, &fused),
            &want_fused.into_dyn(),
            1e-6,
            1e-5,
        );

        let count = k::count_correct(&ctx, &up(&ctx, &z.clone().into_dyn()), &gl).unwrap();
        assert_eq!(
            k::read_count(&ctx, &count).unwrap(),
            r::count_correct(&z, &labels).unwrap(),
            "{what}"
        );
    }
    // An arbitrary upstream gradient through log_softmax_backward.
    let y = layers::log_softmax(&Array2::from_shape_vec((4, 5), rng.vec(20, -2.0, 2.0)).unwrap());
    let dy = Array2::from_shape_vec((4, 5), rng.vec(20, -1.0, 1.0)).unwrap();
    let got = k::log_softmax_backward(
        &ctx,
        &up(&ctx, &y.clone().into_dyn()),
        &up(&ctx, &dy.clone().into_dyn()),
    )
    .unwrap();
    assert_close(
        "log_softmax_backward",
        &down(&ctx, &got),
        &r::log_softmax_backward(&y, &dy).unwrap().into_dyn(),
        1e-6,
        1e-5,
    );
}

fn correct_count_accumulates_ties_nan_and_poison() {
    let Some(ctx) = common::gpu() else { return };
    let scores = Array2::from_shape_vec(
        (5, 3),
        vec![
            1.0,
            3.0,
            3.0, // tie: first max (1)
            f32::NAN,
            9.0,
            1.0, // NaN is the max (0)
            0.0,
            f32::NAN,
            f32::NAN, // first NaN (1)
            -1.0,
            -1.0,
            -1.0, // all equal (0)
            0.0,
            0.0,
            5.0, // 2
        ],
    )
    .unwrap();
    let labels = [1u32, 0, 1, 0, 1];
    assert_eq!(r::count_correct(&scores, &labels).unwrap(), 4);
    let gs = up(&ctx, &scores.into_dyn());
    let gl = k::upload_labels(&ctx, &labels, 3).unwrap();
    let counter = k::new_counter(&ctx).unwrap();
    for _ in 0..3 {
        k::count_correct_into(&ctx, &gs, &gl, &counter).unwrap();
    }
    assert_eq!(k::read_count(&ctx, &counter).unwrap(), 12);
    // A device label out of range poisons the counter for good; the loss is NaN.
    let bad = GpuTensor::from_slice_u32(&ctx, &[1, 0, 3, 0, 1], &[5]).unwrap();
    k::count_correct_into(&ctx, &gs, &bad, &counter).unwrap();
    k::count_correct_into(&ctx, &gs, &gl, &counter).unwrap();
    let e = k::read_count(&ctx, &counter).unwrap_err();
    assert!(e.to_string().contains("out of range"), "{e}");
    let logp = up(&ctx, &ArrayD::zeros(IxDyn(&[5, 3])));
    assert!(down(&ctx, &k::nll_loss(&ctx, &logp, &bad).unwrap())[[0]].is_nan());
    // Uploading checks labels like the CPU reference; shapes and dtypes are checked.
    let e = k::upload_labels(&ctx, &[0, 3], 3).unwrap_err();
    assert_eq!(
        e.to_string(),
        r::check_labels(&[0, 3], 3).unwrap_err().to_string()
    );
    let e = k::nll_loss(
        &ctx,
        &logp,
        &GpuTensor::from_slice_u32(&ctx, &[0, 0], &[2]).unwrap(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    let float_labels = GpuTensor::zeros(&ctx, &[5], DType::F32).unwrap();
    assert!(k::nll_loss(&ctx, &logp, &float_labels).is_err());
    // An empty batch: NaN loss, as PyTorch and the CPU reference.
    let empty = GpuTensor::zeros(&ctx, &[0, 3], DType::F32).unwrap();
    let no_labels = GpuTensor::zeros(&ctx, &[0], DType::U32).unwrap();
    assert!(down(&ctx, &k::nll_loss(&ctx, &empty, &no_labels).unwrap())[[0]].is_nan());
}

fn sgd_step_matches_cpu_over_several_steps() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(4);
    let base = Sgd {
        lr: 0.05,
        momentum: 0.9,
        dampening: 0.0,
        weight_decay: 5e-4,
        nesterov: false,
    };
    let configs = [
        base,
        Sgd {
            nesterov: true,
            ..base
        },
        Sgd {
            dampening: 0.3,
            weight_decay: 0.0,
            ..base
        },
        Sgd::new(0.1),
        Sgd {
            weight_decay: 0.01,
            ..Sgd::new(0.1)
        },
    ];
    for sgd in configs {
        let n = 1000;
        let mut p = ArrayD::from_shape_vec(IxDyn(&[10, 100]), rng.vec(n, -1.0, 1.0)).unwrap();
        let mut b = ArrayD::<f32>::zeros(IxDyn(&[10, 100]));
        let gp = up(&ctx, &p);
        let gb = GpuTensor::zeros(&ctx, &[10, 100], DType::F32).unwrap();
        for step in 0..4 {
            let g = ArrayD::from_shape_vec(IxDyn(&[10, 100]), rng.vec(n, -1.0, 1.0)).unwrap();
            let gg = up(&ctx, &g);
            let buf = sgd.has_momentum().then_some(&gb);
            k::sgd_step(&ctx, &gp, &gg, buf, &sgd, step == 0).unwrap();
            r::sgd_step(
                &mut p,
                &g,
                sgd.has_momentum().then_some(&mut b),
                &sgd,
                step == 0,
            )
            .unwrap();
        }
        // The same fma order; allow one rounding for devices whose fma is not fused.
        assert_close(
            &format!("sgd {sgd:?} param"),
            &down(&ctx, &gp),
            &p,
            1e-7,
            1e-6,
        );
        if sgd.has_momentum() {
            assert_close(
                &format!("sgd {sgd:?} buffer"),
                &down(&ctx, &gb),
                &b,
                1e-7,
                1e-6,
            );
        }
    }
    // Refusals shared with the CPU.
    let p = GpuTensor::zeros(&ctx, &[3], DType::F32).unwrap();
    let g = GpuTensor::zeros(&ctx, &[3], DType::F32).unwrap();
    let e = k::sgd_step(&ctx, &p, &g, None, &base, false).unwrap_err();
    assert!(e.to_string().contains("momentum buffer"), "{e}");
    let e = k::sgd_step(&ctx, &p, &g, None, &Sgd::new(-1.0), false).unwrap_err();
    assert_eq!(
        e.to_string(),
        Sgd::new(-1.0).validate().unwrap_err().to_string()
    );
    let g4 = GpuTensor::zeros(&ctx, &[4], DType::F32).unwrap();
    assert!(matches!(
        k::sgd_step(&ctx, &p, &g4, None, &Sgd::new(0.1), false).unwrap_err(),
        Error::ShapeMismatch { .. }
    ));
    assert!(k::sgd_step(&ctx, &p, &p, None, &Sgd::new(0.1), false).is_err());
    assert!(k::sgd_step(&ctx, &p, &g, Some(&p), &base, false).is_err());
}

fn flatten_is_a_reshape_without_copy() {
    let Some(ctx) = common::gpu() else { return };
    let x = up(
        &ctx,
        &ArrayD::from_shape_fn(IxDyn(&[2, 3, 2, 2]), |d| d[1] as f32),
    );
    let flat = x.reshape(&[2, 12]).unwrap();
    assert_eq!(flat.buffer(), x.buffer());
    let got = down(&ctx, &flat);
    let want = down(&ctx, &x);
    assert_eq!(got.shape(), &[2, 12]);
    assert_eq!(got.as_slice().unwrap(), want.as_slice().unwrap());
}

fn observer_update_matches_cpu() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(5);
    for averaging in [None, Some(0.01f32), Some(1.0)] {
        let c = 7;
        let mut state = Array2::<f32>::zeros((2, c));
        let gstate = GpuTensor::zeros(&ctx, &[2, c], DType::F32).unwrap();
        for step in 0..5 {
            let x = ArrayD::from_shape_vec(IxDyn(&[c, 30]), rng.vec(c * 30, -3.0, 3.0)).unwrap();
            let gx = up(&ctx, &x);
            // The batch statistics on the device, as a per-channel observer sees them.
            let batch = qfuse::kernels::observer::min_max(&ctx, &gx, Some(0)).unwrap();
            let host_batch = down(&ctx, &batch)
                .into_dimensionality::<ndarray::Ix2>()
                .unwrap();
            k::observer_update(&ctx, &gstate, &batch, averaging, step == 0).unwrap();
            r::observer_update(&mut state, &host_batch, averaging, step == 0).unwrap();
        }
        assert_close(
            &format!("observer_update {averaging:?}"),
            &down(&ctx, &gstate),
            &state.into_dyn(),
            1e-6,
            1e-6,
        );
    }
    let s = GpuTensor::zeros(&ctx, &[2, 3], DType::F32).unwrap();
    let b = GpuTensor::zeros(&ctx, &[2, 4], DType::F32).unwrap();
    let e = k::observer_update(&ctx, &s, &b, None, false).unwrap_err();
    let cpu = r::check_observer_update(&[2, 3], &[2, 4], None).unwrap_err();
    assert_eq!(e.to_string(), cpu.to_string());
    assert!(k::observer_update(&ctx, &s, &s, None, false).is_err());
    let nan =
        GpuTensor::from_slice_f32(&ctx, &[f32::NAN, 0.0, 0.0, 1.0, 1.0, 1.0], &[2, 3]).unwrap();
    k::observer_update(&ctx, &s, &nan, None, false).unwrap();
    let got = down(&ctx, &s);
    assert!(got[[0, 0]].is_nan() && got[[1, 2]] == 1.0 && got[[0, 1]] == 0.0);
}

/// Every [`k::GradKernel`] the device runs (the subgroup one only where it has subgroups;
/// elsewhere it is refused).
fn grad_kernels(ctx: &GpuContext) -> Vec<k::GradKernel> {
    let mut v = vec![k::GradKernel::Auto, k::GradKernel::Portable];
    if ctx.has_subgroups() {
        v.push(k::GradKernel::Subgroup);
    } else {
        let x = GpuTensor::zeros(ctx, &[1, 1], DType::F32).unwrap();
        let e = k::linear_backward_with(ctx, &x, &x, &x, k::GradKernel::Subgroup).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    }
    v
}

fn conv_grads_match_cpu() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(6);
    // (x shape, weight shape, padding, stride): the Mnist convs (conv2 with its channels at
    // batch 2: 50 output channels, not a multiple of the 16-row tile), padded, and a strided
    // one (the gather fallback for dx; the subgroup weight gradient takes any stride).
    for (xs, ws, pad, stride) in [
        ([4, 1, 12, 12], [5, 1, 5, 5], 0, 1),
        ([2, 1, 28, 28], [20, 1, 5, 5], 0, 1),
        ([2, 20, 12, 12], [50, 20, 5, 5], 0, 1),
        ([3, 6, 10, 10], [7, 6, 5, 5], 0, 1),
        ([2, 4, 9, 7], [3, 4, 3, 3], 1, 1),
        // A 3×5 kernel: the flipped weight of dx reverses each window in both dimensions.
        ([2, 3, 8, 9], [4, 3, 3, 5], 1, 1),
        ([2, 3, 9, 9], [4, 3, 3, 3], 1, 2),
        ([2, 3, 8, 8], [4, 3, 4, 4], 9, 1), // 'same' with an even kernel: the fallback
        // 3×3 with stride and dilation 2 along the height only, padding (1, 2): the sliding-
        // window weight gradient (conv_wgrad3_sg2) with 20 rows (a partial 16-row tile) and
        // 19 input channels (several channel tiles, a partial channel pair).
        ([2, 19, 11, 9], [20, 19, 3, 3], 8, 2),
        // Output widths that are multiples of 4 (conv_wgrad3_sg4: two steps of 4 columns; 12,
        // three), and 6 (conv_wgrad3_sg2 without a partial step).
        ([2, 5, 6, 8], [18, 5, 3, 3], 1, 1),
        ([1, 3, 5, 12], [4, 3, 3, 3], 1, 1),
        ([2, 3, 5, 6], [4, 3, 3, 3], 1, 1),
        // Depthwise 3×3 (groups = C = O), padding (1, 0): the flipped depthwise forward for
        // dx, conv_wgrad_dw3 for dweight.
        ([2, 5, 7, 9], [5, 1, 3, 3], 7, 1),
        // ... and padding (0, 1): 8 output rows, two whole 4-row blocks of conv_wgrad_dw3.
        ([1, 3, 10, 6], [3, 1, 3, 3], 6, 1),
    ] {
        let params = if pad == 9 {
            qfuse::ops::Conv2dParams {
                pad_mode: qfuse::ops::PadMode::Same,
                ..Default::default()
            }
        } else if pad == 7 {
            qfuse::ops::Conv2dParams {
                padding: [1, 0],
                groups: 5,
                ..Default::default()
            }
        } else if pad == 6 {
            qfuse::ops::Conv2dParams {
                padding: [0, 1],
                groups: 3,
                ..Default::default()
            }
        } else if pad == 8 {
            qfuse::ops::Conv2dParams {
                padding: [1, 2],
                stride: [2, 1],
                dilation: [2, 1],
                ..Default::default()
            }
        } else {
            qfuse::ops::Conv2dParams {
                padding: [pad, pad],
                stride: [stride, stride],
                ..Default::default()
            }
        };
        let x = Array4::from_shape_vec(xs, rng.vec(xs.iter().product(), -1.0, 1.0)).unwrap();
        let w = Array4::from_shape_vec(ws, rng.vec(ws.iter().product(), -0.5, 0.5)).unwrap();
        let out = params.output_shape(&xs, &ws).unwrap();
        let dy = Array4::from_shape_vec(
            (out[0], out[1], out[2], out[3]),
            rng.vec(out.iter().product(), -1.0, 1.0),
        )
        .unwrap();
        let want = qfuse::reference::conv2d::conv2d_backward(&x, &w, &dy, &params).unwrap();
        let (gx, gw, gdy) = (
            up(&ctx, &x.into_dyn()),
            up(&ctx, &w.into_dyn()),
            up(&ctx, &dy.into_dyn()),
        );
        for kernel in grad_kernels(&ctx) {
            let dx = k::conv2d_input_grad_with(&ctx, &gdy, &gw, &params, xs, kernel).unwrap();
            let dw = k::conv2d_weight_grad_with(&ctx, &gx, &gdy, &params, ws, kernel).unwrap();
            let what = format!("conv grads x {xs:?} w {ws:?} pad {pad} stride {stride} {kernel:?}");
            assert_close(
                &what,
                &down(&ctx, &dx),
                &want.dx.clone().into_dyn(),
                1e-4,
                1e-4,
            );
            assert_close(
                &what,
                &down(&ctx, &dw),
                &want.dweight.clone().into_dyn(),
                1e-4,
                1e-4,
            );
        }
    }
    // An infinite input in the last column of every row: 7 output columns in steps of 2
    // (conv_wgrad3_sg2), whose last step's idle column reads that input and must not multiply
    // it by a zero dy (0 * inf = NaN), and 8 in steps of 4; taps 0 never read it and stay
    // finite, as in the reference.
    for (xs, ws) in [([1, 2, 3, 7], [3, 2, 3, 3]), ([1, 2, 3, 8], [3, 2, 3, 3])] {
        let params = qfuse::ops::Conv2dParams {
            padding: [1, 1],
            ..Default::default()
        };
        let mut x = Array4::from_shape_vec(xs, rng.vec(xs.iter().product(), -1.0, 1.0)).unwrap();
        x.slice_mut(ndarray::s![.., .., .., xs[3] - 1])
            .fill(f32::INFINITY);
        let w = Array4::from_shape_vec(ws, rng.vec(ws.iter().product(), -0.5, 0.5)).unwrap();
        let out = params.output_shape(&xs, &ws).unwrap();
        let dy = Array4::from_shape_vec(
            (out[0], out[1], out[2], out[3]),
            rng.vec(out.iter().product(), 0.5, 1.0),
        )
        .unwrap();
        let want = qfuse::reference::conv2d::conv2d_backward(&x, &w, &dy, &params).unwrap();
        assert!(want.dweight.iter().step_by(3).all(|v| v.is_finite()));
        let (gx, gdy) = (up(&ctx, &x.into_dyn()), up(&ctx, &dy.into_dyn()));
        for kernel in grad_kernels(&ctx) {
            let dw = k::conv2d_weight_grad_with(&ctx, &gx, &gdy, &params, ws, kernel).unwrap();
            assert_close(
                &format!("conv weight grad, inf in the last column, x {xs:?} {kernel:?}"),
                &down(&ctx, &dw),
                &want.dweight.clone().into_dyn(),
                1e-4,
                1e-4,
            );
        }
    }
    let x = up(
        &ctx,
        &ArrayD::from_shape_fn(IxDyn(&[2, 3, 4]), |d| {
            (d[0] * 100 + d[1] * 10 + d[2]) as f32
        }),
    );
    let t = down(&ctx, &k::swap01(&ctx, &x).unwrap());
    assert_eq!(t.shape(), &[3, 2, 4]);
    assert_eq!(t[[2, 1, 3]], 123.0);
    assert!(k::swap01(&ctx, &up(&ctx, &ArrayD::zeros(IxDyn(&[3])))).is_err());
}

fn copy_at_writes_a_range() {
    let Some(ctx) = common::gpu() else { return };
    let dst = GpuTensor::from_slice_f32(&ctx, &[9.0; 6], &[2, 3]).unwrap();
    let src = GpuTensor::from_slice_f32(&ctx, &[1.0, 2.0], &[2]).unwrap();
    k::copy_at(&ctx, &src, &dst, 3).unwrap();
    assert_eq!(
        down(&ctx, &dst).into_raw_vec_and_offset().0,
        [9.0, 9.0, 9.0, 1.0, 2.0, 9.0]
    );
    // Past the end, the same buffer, a u32 tensor: refused.
    assert!(k::copy_at(&ctx, &src, &dst, 5).is_err());
    assert!(k::copy_at(&ctx, &src, &dst, usize::MAX).is_err());
    assert!(k::copy_at(&ctx, &dst, &dst, 0).is_err());
    let labels = k::upload_labels(&ctx, &[1, 2], 3).unwrap();
    assert!(k::copy_at(&ctx, &labels, &dst, 0).is_err());
}

crate::qfuse_tests! {
    copy_at_writes_a_range: gpu,
    conv_grads_match_cpu: gpu,
    max_pool2d_backward_is_bit_exact: gpu,
    linear_backward_matches_cpu: gpu,
    loss_ops_match_cpu: gpu,
    correct_count_accumulates_ties_nan_and_poison: gpu,
    sgd_step_matches_cpu_over_several_steps: gpu,
    flatten_is_a_reshape_without_copy: gpu,
    observer_update_matches_cpu: gpu,
}
