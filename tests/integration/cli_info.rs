//! `qfuse info`: the binary names the backend and, on a GPU, what decides which kernels run
//! (subgroups and their sizes, timestamp queries, the packed int8 dot product, the cache
//! directory, and the conv2d forward kernel `ConvAlgorithm::Auto` has chosen per shape class),
//! consistent with the library's own view of the same adapter.

use crate::common;

use std::process::Command;

use qfuse::kernels::conv2d::auto_forward_kernel;
use qfuse::ops::Conv2dParams;

fn info_shows_what_selects_kernels() {
    // An empty cache directory of its own: the binary starts with no tuning decision, as a
    // fresh library context does.
    let cache = std::env::temp_dir().join(format!("qfuse-info-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let out = Command::new(env!("CARGO_BIN_EXE_qfuse"))
        .arg("info")
        .env("QFUSE_CACHE_DIR", &cache)
        .output()
        .expect("qfuse runs");
    let _ = std::fs::remove_dir_all(&cache);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success(),
        "qfuse info failed:\n{stdout}\n{stderr}"
    );
    println!("{stdout}");
    let Some(ctx) = common::gpu() else {
        assert!(stdout.starts_with("backend: cpu"), "{stdout}");
        return;
    };
    assert!(stdout.starts_with("backend: gpu"), "{stdout}");
    assert!(
        stdout.contains(&format!("adapter: {}", ctx.name())),
        "{stdout}"
    );
    let line = |key: &str| {
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with(key))
            .unwrap_or_else(|| panic!("no `{key}` line in:\n{stdout}"))
            .to_string()
    };
    let limits = line("limits");
    let l = ctx.limits();
    for (name, value) in [
        (
            "max_storage_buffer_binding_size",
            l.max_storage_buffer_binding_size,
        ),
        (
            "max_compute_workgroup_storage_size",
            l.max_compute_workgroup_storage_size.into(),
        ),
    ] {
        assert!(limits.contains(&format!("{name} {value} B")), "{limits}");
    }
    let small = qfuse::gpu::ContextOptions::from_env()
        .unwrap()
        .limit_caps
        .is_some();
    assert_eq!(limits.contains("=small"), small, "{limits}");
    if small {
        // What the cut-down context promises: no subgroups, no timestamps, 16 MiB bindings.
        assert!(
            ctx.subgroup_sizes().is_none() && !ctx.has_timestamps(),
            "{limits}"
        );
        assert!(l.max_storage_buffer_binding_size <= 16 << 20, "{limits}");
        assert!(l.max_compute_workgroup_storage_size <= 16 << 10, "{limits}");
    }
    let sg = line("subgroups:");
    match ctx.subgroup_sizes() {
        Some((lo, hi)) => {
            assert!(sg.contains(&format!("subgroup size {lo} to {hi}")), "{sg}")
        }
        None => assert!(sg.contains("subgroups: no"), "{sg}"),
    }
    let ts = line("timestamp queries:");
    assert_eq!(
        ts.contains("timestamp queries: yes"),
        ctx.has_timestamps(),
        "{ts}"
    );
    let dot = line("packed int8 dot product");
    assert_eq!(
        dot.contains(": available"),
        ctx.packed_int8_dot_available(),
        "{dot}"
    );
    assert!(
        dot.contains(&format!("Int8Dot::{:?}", ctx.int8_dot())),
        "{dot}"
    );
    let caches = line("caches in");
    assert!(caches.contains("tuning empty"), "{caches}");
    // What the binary prints for the ResNet-18 layer1 class is what a fresh library context
    // says (not tuned yet: the class and its candidates).
    let fresh = qfuse::gpu::GpuContext::new().unwrap();
    let resnet = line("3x3 s1, 64->64 at 56x56");
    let want = auto_forward_kernel(
        &fresh,
        &[8, 64, 56, 56],
        &[64, 64, 3, 3],
        &Conv2dParams {
            padding: [1, 1],
            ..Conv2dParams::default()
        },
    )
    .unwrap();
    assert!(resnet.ends_with(&want), "{resnet} vs {want}");
    let classes = stdout
        .lines()
        .skip_while(|l| !l.starts_with("conv2d forward kernel"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter(|l| l.contains(": forward_") || l.contains("not tuned yet"))
        .count();
    assert!(classes >= 5, "{stdout}");
}

crate::qfuse_tests! {
    info_shows_what_selects_kernels,
}
