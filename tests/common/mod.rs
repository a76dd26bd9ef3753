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

/// A context on a device of the test adapter opened by hand (through `GpuContext::from_device`)
/// with `features` (those the adapter and `QFUSE_DEVICE_LIMITS` allow) and the limits
/// `QFUSE_DEVICE_LIMITS` gives (`ContextOptions::from_env`), changed by `edit` (e.g. fewer
/// workgroups per dimension, so grids tile at test sizes). `None` without an adapter (as
/// [`gpu`]).
pub fn custom_context(
    label: &str,
    features: qfuse::wgpu::Features,
    edit: impl FnOnce(&mut qfuse::wgpu::Limits),
) -> Option<GpuContext> {
    use qfuse::wgpu;
    gpu()?;
    let options = qfuse::gpu::ContextOptions::from_env().unwrap();
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    desc.backends = qfuse::gpu::backends_from_env().unwrap();
    let instance = wgpu::Instance::new(desc);
    let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
        power_preference: wgpu::PowerPreference::HighPerformance,
        ..Default::default()
    }))
    .expect("an adapter (common::gpu found one)");
    let mut limits = match &options.limit_caps {
        Some(caps) => adapter.limits().or_worse_values_from(caps),
        None => adapter.limits(),
    };
    edit(&mut limits);
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some(label),
        required_features: features & options.optional_features & adapter.features(),
        required_limits: limits,
        ..Default::default()
    }))
    .expect("a device with the requested limits");
    Some(GpuContext::from_device(device, queue).unwrap())
}
