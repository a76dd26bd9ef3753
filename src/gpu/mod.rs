//! The GPU runtime: a [`GpuContext`] (device, queue, limits, pipeline cache, error capture),
//! [`GpuTensor`] (a storage buffer with a shape and a dtype), dispatch tiling past the
//! 65,535-workgroups-per-dimension limit, and readback.
//!
//! Everything lives in the context: there is no global state, several contexts can coexist,
//! and an embedder can hand in its own device with [`GpuContext::from_device`].
//!
//! # Errors, not panics
//! Pipeline creation and every submission run inside wgpu error scopes (validation and
//! out-of-memory); what they catch becomes [`crate::Error::Gpu`] with wgpu's message. The
//! context installs an uncaptured-error handler (so nothing panics; see
//! [`GpuContext::take_uncaptured_error`]) and a device-lost callback: once the device is lost,
//! every later call returns `Error::Gpu("device lost: ...")`. Buffers larger than the device's
//! `max_buffer_size` or `max_storage_buffer_binding_size` are refused up front with
//! [`crate::Error::BufferTooLarge`].
//!
//! # Async core, blocking layer
//! Kernel launches only encode and submit, so they are synchronous and never wait for the GPU.
//! Waiting happens at readback: [`GpuTensor::download_f32_async`] (and
//! [`GpuContext::read_buffer_async`]) are the async core; [`GpuTensor::download_f32`] and the
//! other blocking helpers wrap them with `pollster`.
//!
//! # Adding a kernel
//! 1. **Shader**: write `shaders/<family>.wgsl`. Start it with a header comment that names
//!    every binding as `@group(G) @binding(B)` with its type and meaning, and the dispatch shape
//!    (workgroup size, grid). The naga test in `src/kernels/mod.rs` validates every file in
//!    `shaders/` and checks that header automatically. For 1-D elementwise kernels declare
//!    `override WG: u32 = 256u;`, use `@workgroup_size(WG)`, compute the flat index as
//!    `gid.x + gid.y * (nwg.x * WG)` from `@builtin(global_invocation_id) gid` and
//!    `@builtin(num_workgroups) nwg`, and bounds-check it against the element count. Pass
//!    sizes in a uniform buffer (never bake them into the source), so one pipeline serves every
//!    shape.
//! 2. **Pipeline lookup**: describe each entry point as a `static` [`Kernel`]:
//!    ```ignore
//!    static SHADER: Shader = Shader { name: "my_op", source: include_str!("../../shaders/my_op.wgsl") };
//!    static FORWARD: Kernel = Kernel {
//!        shader: &SHADER,
//!        entry_point: "forward",
//!        bindings: &[Binding::uniform(0), Binding::read(1), Binding::read_write(2)],
//!    };
//!    ```
//!    [`GpuContext::pipeline`] compiles it once per (shader, entry point, bindings, override
//!    constants) and caches it; [`GpuContext::run`] looks it up for you.
//! 3. **Bind group**: make the uniform with [`GpuContext::uniform`] (any `bytemuck::Pod`
//!    struct laid out like the WGSL one, padded to 16 bytes), allocate outputs with
//!    [`GpuTensor::zeros`], and list the buffers in the same order as `Kernel::bindings`.
//! 4. **Dispatch**: compute the grid with [`GpuContext::grid_1d`] (or your own for 2-D/3-D
//!    work), then submit one or several [`Launch`]es in one command buffer with
//!    [`GpuContext::run`]. Later launches see earlier launches' writes.
//! 5. **Launcher**: put a function in `src/kernels/<family>.rs` taking `&GpuContext` and
//!    `&GpuTensor`s, validating its inputs with the same checks (and messages) as the CPU
//!    reference before dispatching, and returning new [`GpuTensor`]s; then call it from
//!    [`crate::backend::GpuBackend`] (upload, run, download).

mod context;
mod dispatch;
mod pipeline;
mod runtime;
mod tensor;

pub use context::{
    backends_from_env, parse_backends, DeviceLost, DeviceLostFn, EmbedOptions, GpuContext, Int8Dot,
    Launch, ParamsBuffer, UncapturedErrors,
};
pub use dispatch::grid_1d;
pub use pipeline::{Binding, BindingType, Kernel, Pipeline, Shader};
pub use runtime::{ContextId, PoolStats, TransferStats};
pub use tensor::{DType, GpuTensor};
