//! The subgroup conv2d forward (`forward_sg` of `shaders/conv2d_subgroup.wgsl`,
//! [`ConvAlgorithm::Subgroup`]) against the CPU reference, on whatever adapter runs the tests
//! when its device has `wgpu::Features::SUBGROUP` (lavapipe does, subgroup size 8): both tiles
//! (8, 16 channels), the 3-tap stride-1 inner loop on and off, one, two and four output rows
//! per invocation (`forward_sg_r2` / `forward_sg_r4`, output heights that are not multiples
//! of 2 or 4), workgroups that fill whole
//! subgroups of 8 (weights shared by broadcast) and workgroups that leave a partial subgroup
//! (5, 12: the in-shader fallback to per-invocation weight loads), over the shapes of
//! `gpu_conv_reg.rs` (odd widths, padding, stride 2, dilation, groups, depthwise, batch 1 and
//! 3, partial channel blocks, epilogues) and a grid tiled over x and y. Also: what
//! the untimed tile choice, the tile checks, and a device without `SUBGROUP` (the subgroup
//! path refused, no subgroup candidate for Auto).
//!
//! Run on a machine without a GPU with `WGPU_BACKEND=vulkan QFUSE_REQUIRE_GPU=1` (lavapipe).

use crate::common;

use qfuse::gpu::{GpuContext, GpuTensor};
use qfuse::kernels::conv2d::{conv2d, conv2d_with_algorithm, ConvAlgorithm, ConvEpilogue, RegTile};
use qfuse::ops::Conv2dParams;

use common::conv::{check, p, up, Case, Rng};

/// The shared shape table and the partial row-quad shapes of the multi-row kernels.
fn configs() -> Vec<Case> {
    let mut cases = common::conv::configs();
    cases.extend(common::conv::partial_quad_configs());
    cases
}

/// The test context when its device has subgroups; `None` (with a line saying so) otherwise.
fn sg_gpu() -> Option<std::sync::Arc<GpuContext>> {
    let ctx = common::gpu()?;
    if !ctx.has_subgroups() {
        println!(
            "skipping subgroup test: {} has no wgpu::Features::SUBGROUP",
            ctx.name()
        );
        return None;
    }
    Some(ctx)
}

fn subgroup_default_tile_matches_reference() {
    let Some(ctx) = sg_gpu() else { return };
    let mut rng = Rng(31);
    for case in configs() {
        check(&ctx, &mut rng, &case, ConvAlgorithm::Subgroup);
    }
}

fn subgroup_every_tile_with_8_channels_matches_reference() {
    let Some(ctx) = sg_gpu() else { return };
    every_tile_matches_reference(&ctx, 8, Rng(32));
}

fn subgroup_every_tile_with_16_channels_matches_reference() {
    let Some(ctx) = sg_gpu() else { return };
    every_tile_matches_reference(&ctx, 16, Rng(39));
}

/// Every tile variant with `channels` output channels per block, each on three shapes of the
/// table (not all: 32 tiles x 22 shapes took minutes on lavapipe, most of it compiling the
/// variants): two 3x3 stride-1 shapes, where rows 2 / 4 run forward_sg_r2 / forward_sg_r4
/// (partial row quads, groups, partial channel blocks among them), and one other shape
/// (strides, dilation, 1x1, 5x5, non-square: forward_sg). The shapes rotate with the tile, so
/// every shape of the table meets several tiles.
fn every_tile_matches_reference(ctx: &GpuContext, channels: u32, mut rng: Rng) {
    let (three_by_three, other): (Vec<Case>, Vec<Case>) =
        configs().into_iter().partition(|(_, w, params, _)| {
            w[2] == 3 && w[3] == 3 && params.stride == [1, 1] && params.dilation == [1, 1]
        });
    assert!(three_by_three.len() >= 8 && other.len() >= 4);
    let mut t = if channels == 8 { 0 } else { 16 };
    for (k3_stride1, rows) in [(false, 1), (true, 1), (true, 2), (true, 4)] {
        // 8 and 64: whole subgroups of 8 (broadcast path on lavapipe); 5 and 12: a partial
        // subgroup (the per-invocation fallback for those lanes).
        for workgroup in [5, 8, 12, 64] {
            let tile = RegTile {
                channels,
                k3_stride1,
                workgroup,
                rows,
            };
            for case in [
                &three_by_three[(2 * t) % three_by_three.len()],
                &three_by_three[(2 * t + 1) % three_by_three.len()],
                &other[t % other.len()],
            ] {
                check(ctx, &mut rng, case, ConvAlgorithm::SubgroupWith(tile));
            }
            t += 1;
        }
    }
}

fn subgroup_resnet_like_shapes() {
    let Some(ctx) = sg_gpu() else { return };
    let mut rng = Rng(33);
    // 256 input channels (K = 2304), a 14-wide row (two 8-pixel blocks, the second partial),
    // 40 output channels (a partial 16-channel block).
    for case in [
        (
            [1, 256, 14, 14],
            [40, 256, 3, 3],
            p([1, 1], [1, 1], [1, 1], 1),
            "256x14x14",
        ),
        (
            [2, 32, 15, 15],
            [48, 32, 3, 3],
            p([2, 2], [1, 1], [1, 1], 1),
            "stride 2 downsampling",
        ),
    ] {
        check(&ctx, &mut rng, &case, ConvAlgorithm::Subgroup);
    }
}

/// A context whose device allows only 16 workgroups per dimension (so that the grid is tiled
/// over x and y even at test sizes), with `features` requested.
fn context_with(features: wgpu::Features, max_per_dim: u32) -> Option<GpuContext> {
    common::custom_context("subgroup test", features, |l| {
        l.max_compute_workgroups_per_dimension = max_per_dim
    })
}

fn subgroup_small_grid_limit() {
    let Some(ctx) = context_with(wgpu::Features::SUBGROUP, 16) else {
        return;
    };
    if !ctx.has_subgroups() {
        return;
    }
    let mut rng = Rng(34);
    // 2 * 24 * 3 = 144 pixel blocks in 18 workgroups of 8, times 2 channel blocks of 8: 36
    // workgroups, more than 16 per dimension.
    let tile = RegTile {
        channels: 8,
        k3_stride1: true,
        workgroup: 8,
        rows: 1,
    };
    let case = (
        [2, 4, 24, 24],
        [12, 4, 3, 3],
        p([1, 1], [1, 1], [1, 1], 1),
        "small grid",
    );
    assert!(ctx.grid_1d(36, 1).unwrap()[1] > 1);
    check(&ctx, &mut rng, &case, ConvAlgorithm::SubgroupWith(tile));
    check(&ctx, &mut rng, &case, ConvAlgorithm::Subgroup);
}

fn device_without_subgroups_refuses_and_auto_falls_back() {
    let Some(ctx) = context_with(wgpu::Features::empty(), 65535) else {
        return;
    };
    assert!(!ctx.has_subgroups());
    assert_eq!(ctx.subgroup_sizes(), None);
    let params = p([1, 1], [1, 1], [1, 1], 1);
    let mut rng = Rng(35);
    let xa = rng.array4([1, 8, 9, 9]);
    let wa = rng.array4([16, 8, 3, 3]);
    let (gx, gw) = (up(&ctx, xa.into_dyn()), up(&ctx, wa.into_dyn()));
    for algorithm in [
        ConvAlgorithm::Subgroup,
        ConvAlgorithm::SubgroupWith(RegTile {
            channels: 8,
            k3_stride1: true,
            workgroup: 64,
            rows: 1,
        }),
    ] {
        let err = conv2d_with_algorithm(&ctx, &gx, &gw, &params, &ConvEpilogue::none(), algorithm)
            .unwrap_err();
        assert!(err.to_string().contains("SUBGROUP"), "{err}");
    }
    // No subgroup variant is a tuning candidate there, and Auto still runs (forward_reg below
    // the tuning threshold; a timed choice among forward_reg, gemm and direct above it).
    let cands = qfuse::kernels::conv2d::candidates(&ctx, &[16, 8, 3, 3], &params, [1, 16, 9, 9]);
    assert!(cands
        .iter()
        .all(|v| !matches!(v, qfuse::kernels::conv2d::ConvVariant::Subgroup { .. })));
    let case = ([1, 8, 9, 9], [16, 8, 3, 3], params, "no subgroups, auto");
    check(&ctx, &mut rng, &case, ConvAlgorithm::Auto);
}

fn subgroup_tile_choice_and_checks() {
    let params = p([1, 1], [1, 1], [1, 1], 1);
    let t = RegTile::for_subgroup_conv(64, [3, 3], &params, [8, 64, 56, 56]);
    assert_eq!(
        (t.channels, t.k3_stride1, t.workgroup, t.rows),
        (16, true, 64, 4)
    );
    // Four rows from OH = 8 up, two below (down to 2), one at OH = 1.
    for (oh, rows) in [(8, 4), (14, 4), (7, 2), (2, 2), (1, 1)] {
        assert_eq!(
            RegTile::for_subgroup_conv(16, [3, 3], &params, [1, 16, oh, 8]).rows,
            rows,
            "OH {oh}"
        );
    }
    assert_eq!(
        RegTile::for_subgroup_conv(8, [3, 3], &params, [1, 8, 8, 8]).channels,
        8
    );
    assert_eq!(
        RegTile::for_subgroup_conv(12, [3, 3], &params, [1, 8, 8, 8]).channels,
        8
    );
    let s2 = RegTile::for_subgroup_conv(16, [3, 3], &p([2, 2], [1, 1], [1, 1], 1), [1, 8, 8, 8]);
    assert!(!s2.k3_stride1);
    assert_eq!(s2.rows, 1);
    // Two or four rows only for 3x3, stride 1, dilation 1, at least two output rows.
    for (kernel, params, out) in [
        ([3, 5], params, [1, 8, 8, 8]),
        ([5, 3], params, [1, 8, 8, 8]),
        ([3, 3], p([1, 1], [1, 1], [2, 1], 1), [1, 8, 8, 8]),
        ([3, 3], p([2, 1], [1, 1], [1, 1], 1), [1, 8, 8, 8]),
        ([3, 3], params, [1, 8, 1, 8]),
    ] {
        assert_eq!(
            RegTile::for_subgroup_conv(16, kernel, &params, out).rows,
            1,
            "{kernel:?} {params:?} {out:?}"
        );
    }
    // The workgroup is fixed (one pipeline per tile, whatever the shape).
    assert_eq!(
        RegTile::for_subgroup_conv(512, [3, 3], &params, [8, 512, 7, 7]).workgroup,
        qfuse::kernels::conv2d::VARIANT_WORKGROUP
    );

    let Some(ctx) = sg_gpu() else { return };
    let (min, max) = ctx.subgroup_sizes().expect("sizes with SUBGROUP");
    assert!(min >= 1 && min <= max, "subgroup sizes {min}..{max}");
    let x = GpuTensor::zeros(&ctx, &[1, 2, 4, 4], qfuse::gpu::DType::F32).unwrap();
    let w = GpuTensor::zeros(&ctx, &[2, 2, 3, 3], qfuse::gpu::DType::F32).unwrap();
    for (channels, workgroup, rows) in [
        (4, 64, 1),
        (1, 64, 1),
        (32, 64, 1),
        (8, 0, 1),
        (16, 512, 1),
        (16, 64, 0),
        (16, 64, 3),
        (16, 64, 8),
    ] {
        let tile = RegTile {
            channels,
            k3_stride1: false,
            workgroup,
            rows,
        };
        let err = conv2d_with_algorithm(
            &ctx,
            &x,
            &w,
            &params,
            &ConvEpilogue::none(),
            ConvAlgorithm::SubgroupWith(tile),
        )
        .unwrap_err();
        assert!(err.to_string().contains("subgroup tile"), "{err}");
    }
    // Auto (forward_reg below the tuning threshold) agrees with the subgroup kernel.
    let mut rng = Rng(36);
    let xa = rng.array4([1, 8, 9, 9]);
    let wa = rng.array4([16, 8, 3, 3]);
    let (gx, gw) = (up(&ctx, xa.into_dyn()), up(&ctx, wa.into_dyn()));
    let auto = conv2d(&ctx, &gx, &gw, &params, &ConvEpilogue::none())
        .unwrap()
        .download_f32(&ctx)
        .unwrap();
    let forced = conv2d_with_algorithm(
        &ctx,
        &gx,
        &gw,
        &params,
        &ConvEpilogue::none(),
        ConvAlgorithm::Subgroup,
    )
    .unwrap()
    .download_f32(&ctx)
    .unwrap();
    let tol = 1e-5 * auto.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    for (a, b) in auto.iter().zip(&forced) {
        assert!((a - b).abs() <= tol, "{a} vs {b}");
    }
}

/// Not a check: times the register-blocked and subgroup forwards (one, two and four output rows
/// per invocation, four also with 8 channels) at ResNet-18 3x3 shapes
/// (batch from `QFUSE_TIMING_BATCH`, default 8), interleaved, and prints the best GFLOP/s of
/// 5 runs each. Run with
/// `cargo test --release --test integration -- --ignored gpu_conv_subgroup::subgroup_timing`.
fn subgroup_timing() {
    let Some(ctx) = sg_gpu() else { return };
    let batch: usize = std::env::var("QFUSE_TIMING_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let mut rng = Rng(37);
    let params = p([1, 1], [1, 1], [1, 1], 1);
    for (c, s, groups) in [
        (64, 56, 1),
        (128, 28, 1),
        (256, 14, 1),
        (512, 7, 1),
        (144, 56, 144),
    ] {
        let x = up(&ctx, rng.array4([batch, c, s, s]).into_dyn());
        let w = up(&ctx, rng.array4([c, c / groups, 3, 3]).into_dyn());
        let gp = Conv2dParams { groups, ..params };
        let flops = 2.0 * (batch * s * s * c * (c / groups) * 9) as f64;
        let tile = RegTile::for_subgroup_conv(c / groups, [3, 3], &gp, [batch, c, s, s]);
        let one_row = RegTile { rows: 1, ..tile };
        let two_rows = RegTile { rows: 2, ..tile };
        let four_rows = RegTile { rows: 4, ..tile };
        let four_rows_8 = RegTile {
            rows: 4,
            channels: 8,
            ..tile
        };
        let algorithms = [
            ("reg", ConvAlgorithm::RegisterBlocked),
            ("sg rows 1", ConvAlgorithm::SubgroupWith(one_row)),
            ("sg rows 2", ConvAlgorithm::SubgroupWith(two_rows)),
            ("sg rows 4", ConvAlgorithm::SubgroupWith(four_rows)),
            ("sg rows 4 x8", ConvAlgorithm::SubgroupWith(four_rows_8)),
            ("auto", ConvAlgorithm::Auto),
        ];
        let run = |algorithm| {
            let t = std::time::Instant::now();
            conv2d_with_algorithm(&ctx, &x, &w, &gp, &ConvEpilogue::none(), algorithm).unwrap();
            ctx.wait().unwrap();
            t.elapsed().as_secs_f64()
        };
        let mut best = [f64::MAX; 6];
        for rep in 0..6 {
            for (i, (_, algorithm)) in algorithms.iter().enumerate() {
                let t = run(*algorithm);
                if rep > 0 {
                    best[i] = best[i].min(t);
                }
            }
        }
        let mut line = format!("{batch}x{c}x{s}x{s} g{groups}:");
        for ((name, _), t) in algorithms.iter().zip(best) {
            line += &format!("  {name} {:.1} ms {:.2} GFLOP/s", t * 1e3, flops / t / 1e9);
        }
        println!("{line}");
    }
}

/// Not a check: runs one conv `QFUSE_TIMING_REPS` times (default 15) and prints every
/// submit-to-completion time, for looking at the spread. Shape from `QFUSE_TIMING_SHAPE`
/// (`N,C,S,G`, default `8,512,7,1`: N x C x S x S input, C output channels, 3x3, pad 1,
/// groups G). Run with
/// `cargo test --release --test integration -- --ignored gpu_conv_subgroup::repeat_timing`.
fn repeat_timing() {
    let Some(ctx) = sg_gpu() else { return };
    let shape: Vec<usize> = std::env::var("QFUSE_TIMING_SHAPE")
        .unwrap_or_else(|_| "8,512,7,1".to_string())
        .split(',')
        .map(|v| v.trim().parse().expect("QFUSE_TIMING_SHAPE: N,C,S,G"))
        .collect();
    let [n, c, s, groups] = shape[..] else {
        panic!("QFUSE_TIMING_SHAPE: N,C,S,G");
    };
    let reps: usize = std::env::var("QFUSE_TIMING_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let mut rng = Rng(38);
    let x = up(&ctx, rng.array4([n, c, s, s]).into_dyn());
    let w = up(&ctx, rng.array4([c, c / groups, 3, 3]).into_dyn());
    let params = p([1, 1], [1, 1], [1, 1], groups);
    let flops = 2.0 * (n * s * s * c * (c / groups) * 9) as f64;
    let mut times = Vec::new();
    for _ in 0..reps + 1 {
        let t = std::time::Instant::now();
        conv2d(&ctx, &x, &w, &params, &ConvEpilogue::none()).unwrap();
        ctx.wait().unwrap();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.remove(0);
    let all: Vec<String> = times.iter().map(|t| format!("{t:.0}")).collect();
    times.sort_by(f64::total_cmp);
    println!(
        "{n}x{c}x{s}x{s} g{groups}: median {:.1} ms ({:.2} GFLOP/s), min {:.1} ms; all [{}]",
        times[times.len() / 2],
        flops / times[times.len() / 2] / 1e6,
        times[0],
        all.join(" ")
    );
}

crate::qfuse_tests! {
    subgroup_default_tile_matches_reference: subgroups,
    subgroup_every_tile_with_8_channels_matches_reference: subgroups,
    subgroup_every_tile_with_16_channels_matches_reference: subgroups,
    subgroup_resnet_like_shapes: subgroups,
    subgroup_small_grid_limit: subgroups,
    device_without_subgroups_refuses_and_auto_falls_back: gpu,
    subgroup_tile_choice_and_checks: subgroups,
    subgroup_timing: subgroups + manual,
    repeat_timing: subgroups + manual,
}
