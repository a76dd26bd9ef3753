//! The register-blocked conv2d forward (`forward_reg`, [`ConvAlgorithm::RegisterBlocked`]),
//! forced on whatever adapter runs the tests, against the CPU reference: every tile it can run
//! (1, 2, 4, 8 channels; the 3-tap stride-1 inner loop on and off; several workgroup sizes),
//! epilogues, odd output widths (the 8-pixel blocks' tails), strides, dilation, padding,
//! groups, depthwise, batch 1, channel counts that leave a partial channel block, and a grid
//! tiled over x and y. Also: the tile choice (fixed workgroup), the tile checks, and `Auto`
//! below the tuning threshold running it.
//!
//! Run on a machine without a GPU with `WGPU_BACKEND=vulkan QFUSE_REQUIRE_GPU=1` (lavapipe).

use crate::common;

use qfuse::gpu::{GpuContext, GpuTensor};
use qfuse::kernels::conv2d::{conv2d, conv2d_with_algorithm, ConvAlgorithm, ConvEpilogue, RegTile};

use common::conv::{check, configs, p, up, Rng};

fn register_blocked_default_tile_matches_reference() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(21);
    for case in configs() {
        check(&ctx, &mut rng, &case, ConvAlgorithm::RegisterBlocked);
    }
}

fn register_blocked_every_tile_matches_reference() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(22);
    for case in configs() {
        for channels in [1, 2, 4, 8] {
            for k3_stride1 in [false, true] {
                for workgroup in [8, 24, 64] {
                    let tile = RegTile {
                        channels,
                        k3_stride1,
                        workgroup,
                        rows: 1,
                    };
                    check(
                        &ctx,
                        &mut rng,
                        &case,
                        ConvAlgorithm::RegisterBlockedWith(tile),
                    );
                }
            }
        }
    }
}

fn register_blocked_resnet_like_shape() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(23);
    // 256 input channels (K = 2304), a 14-wide row (two 8-pixel blocks, the second partial).
    let case = (
        [1, 256, 14, 14],
        [32, 256, 3, 3],
        p([1, 1], [1, 1], [1, 1], 1),
        "256x14x14",
    );
    check(&ctx, &mut rng, &case, ConvAlgorithm::RegisterBlocked);
}

/// A context whose device allows only 16 workgroups per dimension, so that the grid is tiled
/// over x and y even at test sizes.
fn small_grid_context() -> Option<GpuContext> {
    common::custom_context("small grid", wgpu::Features::empty(), |l| {
        l.max_compute_workgroups_per_dimension = 16
    })
}

fn register_blocked_small_grid_limit() {
    let Some(ctx) = small_grid_context() else {
        return;
    };
    let mut rng = Rng(24);
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
    check(
        &ctx,
        &mut rng,
        &case,
        ConvAlgorithm::RegisterBlockedWith(tile),
    );
    check(&ctx, &mut rng, &case, ConvAlgorithm::RegisterBlocked);
}

fn register_tile_choice_and_checks() {
    let params = p([1, 1], [1, 1], [1, 1], 1);
    let t = RegTile::for_conv(64, 3, &params);
    assert_eq!((t.channels, t.k3_stride1, t.workgroup), (8, true, 64));
    assert_eq!(RegTile::for_conv(1, 3, &params).channels, 1);
    assert_eq!(RegTile::for_conv(3, 3, &params).channels, 2);
    assert_eq!(RegTile::for_conv(6, 3, &params).channels, 4);
    // The workgroup is fixed (one pipeline per tile, whatever the shape).
    assert_eq!(
        RegTile::for_conv(512, 3, &params).workgroup,
        qfuse::kernels::conv2d::VARIANT_WORKGROUP
    );
    assert!(!RegTile::for_conv(8, 3, &p([2, 2], [1, 1], [1, 1], 1)).k3_stride1);
    assert!(!RegTile::for_conv(8, 3, &p([1, 1], [1, 1], [1, 2], 1)).k3_stride1);
    assert!(!RegTile::for_conv(8, 5, &params).k3_stride1);

    let Some(ctx) = common::gpu() else { return };
    let x = GpuTensor::zeros(&ctx, &[1, 2, 4, 4], qfuse::gpu::DType::F32).unwrap();
    let w = GpuTensor::zeros(&ctx, &[2, 2, 3, 3], qfuse::gpu::DType::F32).unwrap();
    for tile in [
        RegTile {
            channels: 3,
            k3_stride1: false,
            workgroup: 64,
            rows: 1,
        },
        RegTile {
            channels: 8,
            k3_stride1: false,
            workgroup: 0,
            rows: 1,
        },
        RegTile {
            channels: 8,
            k3_stride1: false,
            workgroup: 512,
            rows: 1,
        },
        RegTile {
            channels: 8,
            k3_stride1: true,
            workgroup: 64,
            rows: 2,
        },
    ] {
        let err = conv2d_with_algorithm(
            &ctx,
            &x,
            &w,
            &params,
            &ConvEpilogue::none(),
            ConvAlgorithm::RegisterBlockedWith(tile),
        )
        .unwrap_err();
        assert!(err.to_string().contains("register tile"), "{err}");
    }
    // Auto runs the register-blocked kernel below the tuning threshold: the same results as
    // forcing it (bit for bit: same kernel, same tile).
    let mut rng = Rng(25);
    let xa = rng.array4([1, 3, 9, 9]);
    let wa = rng.array4([4, 3, 3, 3]);
    let (gx, gw) = (up(&ctx, xa.into_dyn()), up(&ctx, wa.into_dyn()));
    let auto = conv2d(&ctx, &gx, &gw, &params, &ConvEpilogue::none())
        .unwrap()
        .download_f32(&ctx)
        .unwrap();
    let reg = conv2d_with_algorithm(
        &ctx,
        &gx,
        &gw,
        &params,
        &ConvEpilogue::none(),
        ConvAlgorithm::RegisterBlocked,
    )
    .unwrap()
    .download_f32(&ctx)
    .unwrap();
    assert_eq!(auto, reg);
}

crate::qfuse_tests! {
    register_blocked_default_tile_matches_reference: gpu,
    register_blocked_every_tile_matches_reference: gpu,
    register_blocked_resnet_like_shape: gpu,
    register_blocked_small_grid_limit,
    register_tile_choice_and_checks: gpu,
}
