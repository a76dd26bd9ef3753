//! `qfuse info`: the backend qfuse would use, and what decides which kernels run on it.

use std::process::ExitCode;

use qfuse::gpu::Int8Dot;
use qfuse::kernels::conv2d::auto_forward_kernel;
use qfuse::ops::{Conv2dParams, PadMode};

/// Representative convs, one per shape class, for the forward kernel `ConvAlgorithm::Auto`
/// picks: `(what, input [N, C, H, W], weight [O, C/groups, KH, KW], settings)`.
fn shape_classes() -> Vec<(&'static str, [usize; 4], [usize; 4], Conv2dParams)> {
    let pad1 = Conv2dParams {
        padding: [1, 1],
        ..Conv2dParams::default()
    };
    vec![
        (
            "3x3 s1, 64->64 at 56x56 (ResNet-18 layer1)",
            [8, 64, 56, 56],
            [64, 64, 3, 3],
            pad1,
        ),
        (
            "3x3 s1, 512->512 at 7x7 (ResNet-18 layer4)",
            [8, 512, 7, 7],
            [512, 512, 3, 3],
            pad1,
        ),
        (
            "3x3 s2, 64->128 at 56x56",
            [8, 64, 56, 56],
            [128, 64, 3, 3],
            Conv2dParams {
                stride: [2, 2],
                ..pad1
            },
        ),
        (
            "1x1, 256->64 at 28x28",
            [8, 256, 28, 28],
            [64, 256, 1, 1],
            Conv2dParams::default(),
        ),
        (
            "3x3 depthwise, 32 channels at 56x56",
            [8, 32, 56, 56],
            [32, 1, 3, 3],
            Conv2dParams { groups: 32, ..pad1 },
        ),
        (
            "5x5, 1->20 at 28x28 (Mnist conv1)",
            [64, 1, 28, 28],
            [20, 1, 5, 5],
            Conv2dParams::default(),
        ),
        (
            "2x2 padding='same', 16->16 at 32x32",
            [8, 16, 32, 32],
            [16, 16, 2, 2],
            Conv2dParams {
                pad_mode: PadMode::Same,
                ..Conv2dParams::default()
            },
        ),
    ]
}

fn describe_load(load: &qfuse::gpu::CacheLoad) -> String {
    use qfuse::gpu::CacheLoad;
    match load {
        CacheLoad::Disabled => "off".to_string(),
        CacheLoad::Unsupported => "not offered by the device".to_string(),
        CacheLoad::Missing => "empty".to_string(),
        CacheLoad::Loaded { entries } => format!("{entries} loaded"),
        CacheLoad::Rejected(why) => format!("ignored ({why})"),
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// Prints the backend and, for a GPU, its limits and the features that select kernels.
pub fn run() -> qfuse::Result<ExitCode> {
    let ctx = match crate::cache_dir::open(false) {
        Ok(ctx) => ctx,
        Err(e) => {
            println!("backend: cpu (the CPU reference serves: {e})");
            return Ok(ExitCode::SUCCESS);
        }
    };
    let l = ctx.limits();
    let info = ctx.adapter_info();
    println!("backend: gpu");
    println!("adapter: {}", ctx.name());
    println!(
        "device type: {:?}, driver: {} {}",
        info.device_type, info.driver, info.driver_info
    );
    let cut = qfuse::gpu::ContextOptions::from_env()?.limit_caps.is_some();
    println!(
        "limits{}: max_buffer_size {} B, max_storage_buffer_binding_size {} B, \
         max_compute_workgroups_per_dimension {}, max_compute_invocations_per_workgroup {}, \
         max_compute_workgroup_storage_size {} B",
        if cut {
            format!(
                " (cut to a small GPU's by {}=small; subgroups and timestamp queries not \
                 requested)",
                qfuse::gpu::DEVICE_LIMITS_VAR
            )
        } else {
            " (the adapter's own)".to_string()
        },
        l.max_buffer_size,
        l.max_storage_buffer_binding_size,
        l.max_compute_workgroups_per_dimension,
        l.max_compute_invocations_per_workgroup,
        l.max_compute_workgroup_storage_size
    );
    println!("what decides which kernels run:");
    match ctx.subgroup_sizes() {
        Some((lo, hi)) => println!(
            "  subgroups: yes (subgroup size {lo} to {hi}): subgroup conv2d forward available"
        ),
        None => println!("  subgroups: no (wgpu::Features::SUBGROUP not on this device)"),
    }
    println!(
        "  timestamp queries: {}{}",
        yes_no(ctx.has_timestamps()),
        if ctx.has_timestamps() {
            " (benchmarks time kernels on the GPU clock)"
        } else {
            " (benchmarks time kernels on the host clock)"
        }
    );
    println!(
        "  packed int8 dot product (WGSL dot4I8Packed): {}; int8 conv/linear use Int8Dot::{}",
        if ctx.packed_int8_dot_available() {
            "available"
        } else {
            "not available"
        },
        match ctx.int8_dot() {
            Int8Dot::Packed => "Packed",
            Int8Dot::Portable => "Portable",
        }
    );
    println!(
        "  cpu adapter: {} (the linear layer's subgroup matmul runs there; the conv2d forward is \
         chosen by timing, not by adapter type)",
        yes_no(qfuse::kernels::conv2d::is_cpu_adapter(&ctx))
    );
    let status = ctx.cache_status();
    match &status.dir {
        Some(dir) => println!(
            "  caches in {}: tuning {}, pipelines {}",
            qfuse::io::text::escape_path(dir),
            describe_load(&status.tuning),
            describe_load(&status.pipelines)
        ),
        None => println!("  caches: in memory only (no cache directory found)"),
    }
    println!(
        "conv2d forward kernel ConvAlgorithm::Auto picks, per shape class (timed at the first \
         conv of a class, then cached):"
    );
    for (what, x, w, p) in shape_classes() {
        println!("  {what}: {}", auto_forward_kernel(&ctx, &x, &w, &p)?);
    }
    Ok(ExitCode::SUCCESS)
}
