//! The GPU runtime: a [`GpuContext`] (device, queue, limits, pipeline cache, error capture,
//! and the runtime state it shares with its tensors), [`GpuTensor`] (a pooled storage buffer
//! with a shape, a dtype and the identity of its context), dispatch tiling past the
//! 65,535-workgroups-per-dimension limit, and readback.
//!
//! Everything lives in the context: there is no global state, several contexts can coexist,
//! and an embedder can hand in its own device with [`GpuContext::from_device`] (built with
//! [`crate::wgpu`], version 30).
//!
//! # Submissions: one per launch, or one per recording
//! A launcher encodes its dispatches as one compute pass ([`GpuContext::run`]). Outside a
//! recording each pass is submitted at once. Inside [`GpuContext::record`] every launch of
//! the calling thread goes into one command encoder, submitted once when the closure
//! returns; [`GpuContext::encode_into`] puts them into a caller's `wgpu::CommandEncoder`
//! and submits nothing. A readback ([`GpuTensor::download_f32`], [`GpuContext::read_buffer`])
//! first submits what a recording holds, so it always sees earlier launches. Launchers never
//! wait for the GPU: waiting happens only at readback and [`GpuContext::wait`].
//!
//! # Buffers come from a pool
//! Tensors, kernel parameters ([`GpuContext::params`]) and readback staging buffers come from
//! a per-context pool keyed by size class (powers of two up to 4 KiB, then steps of an
//! eighth) and usage; a dropped tensor gives its buffer back. A repeated forward or training
//! step therefore allocates nothing after the first ([`GpuContext::pool_stats`];
//! [`GpuContext::trim_pool`] drops idle buffers). Reuse is safe because one queue runs its
//! work in order; the exception, `Queue::write_buffer` landing ahead of a still-open encoder,
//! is handled by quarantining buffers freed while an encoder is open (the argument is in
//! `src/gpu/runtime.rs`). [`GpuTensor::zeros`] clears a reused buffer;
//! [`GpuTensor::uninit`] does not (for outputs a kernel writes in full).
//!
//! # Errors, not panics
//! Validation and out-of-memory errors are caught by wgpu error scopes per submission: one
//! pair around a launch outside a recording, one pair around a whole recording (and one
//! around an upload, a readback, a pipeline compilation or a new buffer) — never one per
//! launch inside a recording nor per pooled allocation. The scopes' answers are read without
//! blocking (wgpu native answers at once; an answer not ready yet is checked at the next
//! readback or [`GpuContext::wait`]) and become [`crate::Error::Gpu`] with wgpu's message.
//! [`GpuContext::new`] installs an uncaptured-error handler (so nothing panics; see
//! [`GpuContext::take_uncaptured_error`]) and a device-lost callback: once the device is
//! lost, every later call returns `Error::Gpu("device lost: ...")`. An embedder's device
//! keeps its own handlers unless [`GpuContext::from_device_with`] is asked to install or
//! chain qfuse's ([`EmbedOptions`]; wgpu keeps one of each per device). Buffers larger than
//! the device's `max_buffer_size` or `max_storage_buffer_binding_size` are refused up front
//! with [`crate::Error::BufferTooLarge`].
//!
//! # Tensors know their context
//! A [`GpuTensor`] remembers the [`ContextId`] of the context it was made on; launchers and
//! downloads refuse a tensor of another context (another device, or another
//! `wgpu::Instance`, where wgpu could otherwise resolve its buffer to another buffer's data)
//! with [`crate::Error::ContextMismatch`].
//!
//! # Transfers are counted
//! [`GpuContext::transfer_stats`] counts uploads and downloads (count and bytes each way) and,
//! apart, kernel-parameter writes; [`TransferStats::since`] gives the transfers of a stretch
//! of work (`qfuse bench` reports them).
//!
//! # Async core, blocking layer
//! [`GpuTensor::download_f32_async`] (and [`GpuContext::read_buffer_async`]) are the async
//! core of readback; [`GpuTensor::download_f32`] and the other blocking helpers wrap them
//! with `pollster`.
//!
//! # Adding a kernel
//! 1. **Shader**: write `shaders/<family>.wgsl`. Start it with a header comment that names
//!    every binding as `@group(G) @binding(B)` with its type and meaning, and the dispatch shape
//!    (workgroup size, grid). The naga test in `src/kernels/mod.rs` validates every file in
//!    `shaders/` and checks that header automatically; add the composed `Shader` (with its
//!    override constants) to the variants of `src/kernels/portability.rs`, which translates
//!    it to SPIR-V, MSL and HLSL (a file in no variant fails that test). For 1-D elementwise
//!    kernels declare `override WG: u32 = 256u;`, use `@workgroup_size(WG)`, compute the flat
//!    index as `gid.x + gid.y * (nwg.x * WG)` from `@builtin(global_invocation_id) gid` and
//!    `@builtin(num_workgroups) nwg`, and bounds-check it against the element count. Pass
//!    sizes in a uniform buffer (never bake them into the source), so one pipeline serves every
//!    shape. Never derive sizes from `arrayLength`: pooled buffers may be larger than the
//!    tensor.
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
//! 3. **Arguments**: check that every tensor argument belongs to the context
//!    ([`GpuContext::check_tensors`]), then validate shapes and values with the same checks
//!    (and messages) as the CPU reference.
//! 4. **Bind group**: make the parameters with [`GpuContext::params`] (any `bytemuck::Pod`
//!    struct laid out like the WGSL one, padded to 16 bytes; pooled, no device call once
//!    warm), get the output from `kernels::output` (a new [`GpuTensor::uninit`] when the
//!    kernel writes every element — else [`GpuTensor::zeros`] — or the caller's tensor,
//!    checked by [`crate::kernels::check_output`]), and list the buffers in the same order
//!    as `Kernel::bindings`.
//! 5. **Dispatch**: compute the grid with [`GpuContext::grid_1d`] (or your own for 2-D/3-D
//!    work), then submit one or several [`Launch`]es as one pass with [`GpuContext::run`].
//!    Later launches see earlier launches' writes. Do not submit on the queue yourself:
//!    `run` knows whether a recording is open.
//! 6. **Launcher**: put `my_op(ctx, inputs..) -> Result<GpuTensor>` and
//!    `my_op_into(ctx, inputs.., out: &GpuTensor) -> Result<()>` in
//!    `src/kernels/<family>.rs`, both thin wrappers of one `my_op_impl(.., Option<&GpuTensor>)`;
//!    then call it from [`crate::backend::GpuBackend`]. Test it inside and outside
//!    [`GpuContext::record`].

mod cache;
mod context;
mod dispatch;
mod pipeline;
mod profile;
mod runtime;
mod tensor;

pub use cache::{CacheLoad, CacheRejection, CacheStatus, TUNING_FORMAT_VERSION};
pub use context::{
    backends_from_env, parse_backends, ContextOptions, DeviceLost, DeviceLostFn, EmbedOptions,
    GpuContext, Int8Dot, Launch, ParamsBuffer, UncapturedErrors, DEVICE_LIMITS_VAR,
};
pub use dispatch::grid_1d;
pub use pipeline::{Binding, BindingType, Kernel, Pipeline, Shader};
pub use profile::{KernelTiming, PassTiming, MAX_TIMED_PASSES};
pub use runtime::{ContextId, PoolStats, TransferStats};
pub(crate) use tensor::require_usage;
pub use tensor::{DType, GpuTensor};
