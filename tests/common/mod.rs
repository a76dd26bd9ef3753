//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod conv;
pub mod golden;
pub mod harness;
#[path = "../../src/bin/qfuse/runtime_dir.rs"]
pub mod runtime_dir;

use std::sync::{Arc, OnceLock};

use qfuse::gpu::GpuContext;

/// The test GPU context, created once per test binary (`WGPU_BACKEND`, `WGPU_ADAPTER_NAME`
/// honoured). Without an adapter: panics when `QFUSE_REQUIRE_GPU=1` (so CI cannot go green by
/// skipping), else prints one `skipping GPU test: no adapter (<reason>)` line and returns
/// `None`.
pub fn gpu() -> Option<Arc<GpuContext>> {
    match gpu_context() {
        Ok(ctx) => Some(ctx),
        Err(reason) => {
            if std::env::var("QFUSE_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!(
                    "QFUSE_REQUIRE_GPU=1 but no GPU context could be created: {reason} \
                     (on Linux without a GPU: install mesa-vulkan-drivers and set \
                     WGPU_BACKEND=vulkan)"
                );
            }
            println!("skipping GPU test: no adapter ({reason})");
            None
        }
    }
}

/// The test GPU context (created on first use, once per test binary) or why there is none.
pub fn gpu_context() -> Result<Arc<GpuContext>, String> {
    static CTX: OnceLock<Result<Arc<GpuContext>, String>> = OnceLock::new();
    CTX.get_or_init(|| GpuContext::new().map(Arc::new).map_err(|e| e.to_string()))
        .clone()
}
