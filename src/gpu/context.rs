//! [`GpuContext`]: the device, queue, limits, pipeline cache and error capture.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context as TaskContext, Poll, Waker};

use wgpu::util::DeviceExt;

use crate::error::{Error, Result};
use crate::gpu::pipeline::{BindingType, Kernel, Pipeline, PipelineKey};

/// Locks a mutex, ignoring poisoning (the data it guards stays consistent: caches and
/// message slots).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One dispatch of a kernel, for [`GpuContext::run`].
#[derive(Debug, Clone, Copy)]
pub struct Launch<'a> {
    /// The entry point to run.
    pub kernel: &'a Kernel,
    /// WGSL `override` constants (by name or `@id`), part of the pipeline cache key.
    pub constants: &'a [(&'a str, f64)],
    /// One buffer per entry of `kernel.bindings`, in the same order (bound whole).
    pub buffers: &'a [&'a wgpu::Buffer],
    /// Workgroup counts `[x, y, z]`; a launch with a zero count is skipped.
    pub workgroups: [u32; 3],
}

/// How the integer conv2d / linear kernels form the dot product of four packed int8 lanes
/// (see [`GpuContext::int8_dot`]). Both give the same (exact) i32 sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Int8Dot {
    /// Manual sign-extending unpack (`extractBits`) and i32 multiply-adds: valid WGSL
    /// everywhere.
    Portable,
    /// WGSL's `dot4I8Packed` (language extension `packed_4x8_integer_dot_product`), which
    /// naga lowers to the device's packed integer dot product instruction where there is one.
    Packed,
}

/// A GPU device and everything qfuse keeps about it: queue, adapter info, limits, compiled
/// pipelines, and what the device reported asynchronously (loss, uncaptured errors).
///
/// `GpuContext` is `Send + Sync`; share it with an `Arc`. Construct it from the system with
/// [`GpuContext::new`] / [`GpuContext::new_async`], or from an embedder's device with
/// [`GpuContext::from_device`].
pub struct GpuContext {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    timestamps: bool,
    subgroups: bool,
    modules: Mutex<HashMap<&'static str, wgpu::ShaderModule>>,
    pipelines: Mutex<HashMap<PipelineKey, Arc<Pipeline>>>,
    lost: Arc<Mutex<Option<String>>>,
    uncaptured: Arc<Mutex<Option<String>>>,
    packed_dot_available: bool,
    int8_dot_packed: AtomicBool,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext")
            .field("adapter", &self.info.name)
            .field("backend", &self.info.backend)
            .field("pipelines", &lock(&self.pipelines).len())
            .finish_non_exhaustive()
    }
}

/// The backends `WGPU_BACKEND` names (comma-separated, wgpu's names, any case), or
/// [`wgpu::Backends::PRIMARY`] when it is unset or empty. Unlike
/// `wgpu::Backends::from_env`, which skips a name it does not know (so a typo silently
/// finds no adapter), a wrong name is an error that quotes the value.
///
/// Errors: [`Error::InvalidArgument`] (see [`parse_backends`]).
pub fn backends_from_env() -> Result<wgpu::Backends> {
    match std::env::var("WGPU_BACKEND") {
        Ok(value) => parse_backends(&value),
        Err(std::env::VarError::NotPresent) => Ok(wgpu::Backends::PRIMARY),
        Err(std::env::VarError::NotUnicode(value)) => Err(Error::invalid(format!(
            "WGPU_BACKEND={value:?} is not a backend (not valid UTF-8; expected {BACKEND_NAMES})"
        ))),
    }
}

/// The backend names wgpu knows, for messages.
const BACKEND_NAMES: &str = "vulkan, metal, dx12, gl, webgpu or noop, several separated by commas";

/// Parses a `WGPU_BACKEND` value: backend names as wgpu spells them (`vulkan`/`vk`,
/// `metal`/`mtl`, `dx12`/`d3d12`, `gl`/`gles`/`opengl`, `webgpu`, `noop`, any case),
/// separated by commas; empty (or blank) means [`wgpu::Backends::PRIMARY`].
///
/// Errors: [`Error::InvalidArgument`] naming the value and the first unknown name, e.g.
/// `WGPU_BACKEND="vulkn" is not a backend (expected vulkan, metal, dx12, gl, ...)`.
pub fn parse_backends(value: &str) -> Result<wgpu::Backends> {
    if value.trim().is_empty() {
        return Ok(wgpu::Backends::PRIMARY);
    }
    let mut backends = wgpu::Backends::empty();
    for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let one = wgpu::Backends::from_comma_list(name);
        if one.is_empty() {
            return Err(Error::invalid(if value.contains(',') {
                format!(
                    "WGPU_BACKEND={value:?}: {name:?} is not a backend (expected {BACKEND_NAMES})"
                )
            } else {
                format!("WGPU_BACKEND={value:?} is not a backend (expected {BACKEND_NAMES})")
            }));
        }
        backends |= one;
    }
    Ok(backends)
}

impl GpuContext {
    /// Opens a device from the system.
    ///
    /// - Backends: `WGPU_BACKEND` if set (e.g. `vulkan`, `metal`, `dx12`, `gl`), else
    ///   [`wgpu::Backends::PRIMARY`] (see [`backends_from_env`]: a name wgpu does not know is
    ///   an error naming it). Other `WGPU_*` instance variables (validation, debug) are
    ///   honoured too.
    /// - Adapter: the first whose name contains `WGPU_ADAPTER_NAME` (case-insensitive) if
    ///   set, else the high-performance one.
    /// - Device: requested with the adapter's own limits (binding and buffer sizes,
    ///   workgroup storage, ...); the optional features requested, each only when the adapter
    ///   offers it, are [`wgpu::Features::TIMESTAMP_QUERY`] (for benchmarks, see
    ///   [`GpuContext::has_timestamps`]) and [`wgpu::Features::SUBGROUP`] (for the subgroup
    ///   kernels, see [`GpuContext::has_subgroups`]).
    ///
    /// Errors: [`Error::InvalidArgument`] for a `WGPU_BACKEND` that names no backend,
    /// [`Error::NoAdapter`] when no adapter matches, [`Error::Gpu`] when the device cannot be
    /// opened.
    pub async fn new_async() -> Result<Self> {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        desc.backends = backends_from_env()?;
        let backends = desc.backends;
        let instance = wgpu::Instance::new(desc);

        let adapter = match std::env::var("WGPU_ADAPTER_NAME") {
            Ok(wanted) if !wanted.is_empty() => {
                let wanted_lc = wanted.to_lowercase();
                let adapters = instance.enumerate_adapters(backends).await;
                let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
                adapters
                    .into_iter()
                    .find(|a| a.get_info().name.to_lowercase().contains(&wanted_lc))
                    .ok_or_else(|| {
                        Error::NoAdapter(format!(
                            "WGPU_ADAPTER_NAME={wanted:?} matches none of the adapters on \
                             backends {backends:?}: {names:?}"
                        ))
                    })?
            }
            _ => instance
                .request_adapter(&wgpu::RequestAdapterOptions {
                    power_preference: wgpu::PowerPreference::HighPerformance,
                    force_fallback_adapter: false,
                    compatible_surface: None,
                    ..Default::default()
                })
                .await
                .map_err(|e| Error::NoAdapter(format!("{e} (backends {backends:?})")))?,
        };

        let info = adapter.get_info();
        let optional =
            adapter.features() & (wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::SUBGROUP);
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("qfuse"),
                required_features: optional,
                required_limits: adapter.limits(),
                ..Default::default()
            })
            .await
            .map_err(|e| {
                Error::Gpu(format!(
                    "cannot open a device on adapter {:?} ({:?}): {e}",
                    info.name, info.backend
                ))
            })?;
        let packed = packed_dot_in(&instance);
        Ok(Self::build(device, queue, info, packed))
    }

    /// Blocking form of [`GpuContext::new_async`] (via `pollster`).
    pub fn new() -> Result<Self> {
        pollster::block_on(Self::new_async())
    }

    /// Wraps a device an embedder already opened. Limits come from `device.limits()` (what
    /// the device was created with, so request generous limits when you create it) and the
    /// adapter info from `device.adapter_info()`. Optional features are those
    /// `device.features()` reports: the subgroup kernels run only on a device created with
    /// [`wgpu::Features::SUBGROUP`] ([`GpuContext::has_subgroups`]).
    ///
    /// This installs an uncaptured-error handler and a device-lost callback on the device,
    /// replacing any the embedder set: qfuse needs them so that nothing panics and a lost
    /// device becomes an error.
    ///
    /// The WGSL language features (for [`GpuContext::int8_dot`]) are those of a native
    /// instance with no backends enabled (they depend on the wgpu / naga build, not on the
    /// device): on native builds that includes `dot4I8Packed`. On the web, where a device
    /// says nothing about its instance, the portable path is chosen; use
    /// [`GpuContext::set_int8_dot`] to change it.
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue) -> Result<Self> {
        let info = device.adapter_info();
        let packed = if cfg!(target_arch = "wasm32") {
            false
        } else {
            let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
            desc.backends = wgpu::Backends::empty();
            packed_dot_in(&wgpu::Instance::new(desc))
        };
        Ok(Self::build(device, queue, info, packed))
    }

    fn build(
        device: wgpu::Device,
        queue: wgpu::Queue,
        info: wgpu::AdapterInfo,
        packed_dot_available: bool,
    ) -> Self {
        let lost = Arc::new(Mutex::new(None));
        let uncaptured = Arc::new(Mutex::new(None));
        {
            let lost = Arc::clone(&lost);
            device.set_device_lost_callback(move |reason, message| {
                *lock(&lost) = Some(format!("{reason:?}: {message}"));
            });
        }
        {
            let uncaptured = Arc::clone(&uncaptured);
            device.on_uncaptured_error(Arc::new(move |error: wgpu::Error| {
                *lock(&uncaptured) = Some(error.to_string());
            }));
        }
        let limits = device.limits();
        let timestamps = device.features().contains(wgpu::Features::TIMESTAMP_QUERY);
        let subgroups = device.features().contains(wgpu::Features::SUBGROUP);
        Self {
            device,
            queue,
            info,
            limits,
            timestamps,
            subgroups,
            modules: Mutex::new(HashMap::new()),
            pipelines: Mutex::new(HashMap::new()),
            lost,
            uncaptured,
            packed_dot_available,
            int8_dot_packed: AtomicBool::new(packed_dot_available),
        }
    }

    /// `true` when WGSL's `dot4I8Packed` (language extension `packed_4x8_integer_dot_product`)
    /// can be used: detected from the instance's
    /// [`wgpu::Instance::wgsl_language_features`] in [`GpuContext::new`] (see
    /// [`GpuContext::from_device`] for an embedder's device).
    pub fn packed_int8_dot_available(&self) -> bool {
        self.packed_dot_available
    }

    /// The dot-product path the integer conv2d / linear kernels use by default:
    /// [`Int8Dot::Packed`] when available, else [`Int8Dot::Portable`], unless changed with
    /// [`GpuContext::set_int8_dot`]. The choice selects which shader module a launch
    /// compiles (the portable module never mentions `dot4I8Packed`).
    pub fn int8_dot(&self) -> Int8Dot {
        if self.int8_dot_packed.load(Ordering::Relaxed) {
            Int8Dot::Packed
        } else {
            Int8Dot::Portable
        }
    }

    /// Forces the default dot-product path of the integer kernels (for every later launch on
    /// this context; the launchers' `_with` forms take one per call instead).
    ///
    /// Errors: [`Error::InvalidArgument`] when asking for [`Int8Dot::Packed`] where it is
    /// not available ([`GpuContext::packed_int8_dot_available`]).
    pub fn set_int8_dot(&self, dot: Int8Dot) -> Result<()> {
        self.check_int8_dot(dot)?;
        self.int8_dot_packed
            .store(dot == Int8Dot::Packed, Ordering::Relaxed);
        Ok(())
    }

    /// `Ok` when `dot` can run on this context.
    ///
    /// Errors: [`Error::InvalidArgument`] for [`Int8Dot::Packed`] where WGSL's
    /// `dot4I8Packed` is not available.
    pub fn check_int8_dot(&self, dot: Int8Dot) -> Result<()> {
        if dot == Int8Dot::Packed && !self.packed_dot_available {
            return Err(Error::invalid(
                "the packed int8 dot product (WGSL dot4I8Packed, language extension \
                 packed_4x8_integer_dot_product) is not available on this context",
            ));
        }
        Ok(())
    }

    /// The device.
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// The queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// What the adapter says about itself (name, backend, device type, driver).
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// The limits the device was created with.
    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }

    /// `true` when the device was created with [`wgpu::Features::TIMESTAMP_QUERY`] (requested
    /// by [`GpuContext::new`] whenever the adapter offers it; for an embedder's device, when
    /// the embedder requested it), so compute passes can carry GPU timestamp writes.
    pub fn has_timestamps(&self) -> bool {
        self.timestamps
    }

    /// `true` when the device was created with [`wgpu::Features::SUBGROUP`] (requested by
    /// [`GpuContext::new`] whenever the adapter offers it; for an embedder's device, when the
    /// embedder requested it, as `device.features()` reports), so shaders using WGSL's
    /// subgroup builtins can be compiled (e.g. the subgroup conv2d forward,
    /// [`crate::kernels::conv2d::ConvAlgorithm::Subgroup`]).
    pub fn has_subgroups(&self) -> bool {
        self.subgroups
    }

    /// The smallest and largest subgroup size the adapter reports
    /// ([`wgpu::AdapterInfo::subgroup_min_size`] / `subgroup_max_size`), when the device has
    /// [`wgpu::Features::SUBGROUP`]; `None` otherwise. Kernels never rely on a size beyond
    /// this range (and those that use subgroups stay correct for any size).
    pub fn subgroup_sizes(&self) -> Option<(u32, u32)> {
        self.subgroups
            .then_some((self.info.subgroup_min_size, self.info.subgroup_max_size))
    }

    /// `adapter name (backend)`, e.g. `llvmpipe (LLVM 15.0.6, 256 bits) (Vulkan)`.
    pub fn name(&self) -> String {
        format!("{} ({:?})", self.info.name, self.info.backend)
    }

    /// `Ok` unless the device was lost, in which case `Error::Gpu("device lost: ...")`.
    pub fn check_alive(&self) -> Result<()> {
        match lock(&self.lost).as_ref() {
            Some(msg) => Err(Error::Gpu(format!("device lost: {msg}"))),
            None => Ok(()),
        }
    }

    /// The last error wgpu reported outside an error scope (if any), clearing it. qfuse runs
    /// its own work inside error scopes, so this only catches errors from other users of the
    /// device.
    pub fn take_uncaptured_error(&self) -> Option<String> {
        lock(&self.uncaptured).take()
    }

    /// Runs `f` inside validation and out-of-memory error scopes and turns what they catch
    /// into [`Error::Gpu`] naming `what`.
    pub fn scoped<T>(&self, what: &str, f: impl FnOnce() -> T) -> Result<T> {
        self.check_alive()?;
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let value = f();
        let validation = pollster::block_on(validation.pop());
        let oom = pollster::block_on(oom.pop());
        if let Some(e) = validation.or(oom) {
            return Err(Error::Gpu(format!("{what}: {e}")));
        }
        self.check_alive()?;
        Ok(value)
    }

    /// Checks a buffer size against `max_buffer_size` and `max_storage_buffer_binding_size`,
    /// returning [`Error::BufferTooLarge`] naming the limit exceeded.
    pub fn check_buffer_size(&self, bytes: u64) -> Result<()> {
        let limits = [
            ("max_buffer_size", self.limits.max_buffer_size),
            (
                "max_storage_buffer_binding_size",
                self.limits.max_storage_buffer_binding_size,
            ),
        ];
        for (limit_name, limit) in limits {
            if bytes > limit {
                return Err(Error::BufferTooLarge {
                    size: bytes,
                    limit_name,
                    limit,
                });
            }
        }
        Ok(())
    }

    /// A uniform buffer holding `value` (a `#[repr(C)]` `Pod` struct laid out like the
    /// WGSL one; keep its size a multiple of 16 bytes).
    pub fn uniform<T: bytemuck::Pod>(&self, value: &T) -> Result<wgpu::Buffer> {
        self.scoped("creating a uniform buffer", || {
            self.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("qfuse uniform"),
                    contents: bytemuck::bytes_of(value),
                    usage: wgpu::BufferUsages::UNIFORM,
                })
        })
    }

    /// The compiled pipeline for `kernel` with these override constants, compiled on first
    /// use and cached for the life of the context. Compilation errors become
    /// [`Error::Gpu`].
    pub fn pipeline(&self, kernel: &Kernel, constants: &[(&str, f64)]) -> Result<Arc<Pipeline>> {
        let key = PipelineKey::new(kernel, constants);
        if let Some(p) = lock(&self.pipelines).get(&key) {
            return Ok(Arc::clone(p));
        }
        let module = self.module(kernel)?;
        let what = format!(
            "compiling `{}` of shaders/{}.wgsl",
            kernel.entry_point, kernel.shader.name
        );
        let pipeline = self.scoped(&what, || {
            let entries: Vec<wgpu::BindGroupLayoutEntry> = kernel
                .bindings
                .iter()
                .map(|b| wgpu::BindGroupLayoutEntry {
                    binding: b.index,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: match b.ty {
                            BindingType::Uniform => wgpu::BufferBindingType::Uniform,
                            BindingType::ReadOnlyStorage => {
                                wgpu::BufferBindingType::Storage { read_only: true }
                            }
                            BindingType::Storage => {
                                wgpu::BufferBindingType::Storage { read_only: false }
                            }
                        },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                })
                .collect();
            let label = format!("{}::{}", kernel.shader.name, kernel.entry_point);
            let bind_group_layout =
                self.device
                    .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                        label: Some(&label),
                        entries: &entries,
                    });
            let layout = self
                .device
                .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                    label: Some(&label),
                    bind_group_layouts: &[Some(&bind_group_layout)],
                    immediate_size: 0,
                });
            let pipeline = self
                .device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(&label),
                    layout: Some(&layout),
                    module: &module,
                    entry_point: Some(kernel.entry_point),
                    compilation_options: wgpu::PipelineCompilationOptions {
                        constants,
                        zero_initialize_workgroup_memory: true,
                    },
                    cache: None,
                });
            Pipeline {
                pipeline,
                bind_group_layout,
            }
        })?;
        let pipeline = Arc::new(pipeline);
        Ok(Arc::clone(
            lock(&self.pipelines).entry(key).or_insert(pipeline),
        ))
    }

    fn module(&self, kernel: &Kernel) -> Result<wgpu::ShaderModule> {
        let name = kernel.shader.name;
        if let Some(m) = lock(&self.modules).get(name) {
            return Ok(m.clone());
        }
        let module = self.scoped(&format!("compiling shaders/{name}.wgsl"), || {
            self.device
                .create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(name),
                    source: wgpu::ShaderSource::Wgsl(kernel.shader.source.into()),
                })
        })?;
        Ok(lock(&self.modules).entry(name).or_insert(module).clone())
    }

    /// Encodes `launches` in order into one compute pass and submits them as one command
    /// buffer (a later launch sees the writes of an earlier one). Does not wait for the GPU.
    pub fn run(&self, launches: &[Launch<'_>]) -> Result<wgpu::SubmissionIndex> {
        self.check_alive()?;
        let mut prepared = Vec::with_capacity(launches.len());
        for launch in launches {
            if launch.buffers.len() != launch.kernel.bindings.len() {
                return Err(Error::Gpu(format!(
                    "kernel `{}` of shaders/{}.wgsl takes {} buffers, got {}",
                    launch.kernel.entry_point,
                    launch.kernel.shader.name,
                    launch.kernel.bindings.len(),
                    launch.buffers.len()
                )));
            }
            let pipeline = self.pipeline(launch.kernel, launch.constants)?;
            prepared.push((launch, pipeline));
        }
        self.scoped("submitting kernels", || {
            let bind_groups: Vec<wgpu::BindGroup> = prepared
                .iter()
                .map(|(launch, pipeline)| {
                    let entries: Vec<wgpu::BindGroupEntry> = launch
                        .kernel
                        .bindings
                        .iter()
                        .zip(launch.buffers)
                        .map(|(b, buffer)| wgpu::BindGroupEntry {
                            binding: b.index,
                            resource: buffer.as_entire_binding(),
                        })
                        .collect();
                    self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                        label: Some(launch.kernel.entry_point),
                        layout: &pipeline.bind_group_layout,
                        entries: &entries,
                    })
                })
                .collect();
            let mut encoder = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("qfuse kernels"),
                });
            {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("qfuse kernels"),
                    timestamp_writes: None,
                });
                for ((launch, pipeline), bind_group) in prepared.iter().zip(&bind_groups) {
                    let [x, y, z] = launch.workgroups;
                    if x == 0 || y == 0 || z == 0 {
                        continue;
                    }
                    pass.set_pipeline(&pipeline.pipeline);
                    pass.set_bind_group(0, bind_group, &[]);
                    pass.dispatch_workgroups(x, y, z);
                }
            }
            self.queue.submit([encoder.finish()])
        })
    }

    /// Copies `size` bytes (a multiple of 4) from the start of `src` (which needs
    /// `COPY_SRC`) into a staging buffer and reads them back: the async core of every
    /// download. On native this blocks in `device.poll` until the copy is done; on the web
    /// the browser drives the mapping.
    pub async fn read_buffer_async(&self, src: &wgpu::Buffer, size: u64) -> Result<Vec<u8>> {
        if size == 0 {
            return Ok(Vec::new());
        }
        if !size.is_multiple_of(wgpu::COPY_BUFFER_ALIGNMENT) || size > src.size() {
            return Err(Error::Gpu(format!(
                "cannot read {size} bytes from a buffer of {} bytes (multiple of 4 needed)",
                src.size()
            )));
        }
        let staging = self.scoped("creating a staging buffer", || {
            let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("qfuse staging"),
                size,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let mut encoder = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("qfuse readback"),
                });
            encoder.copy_buffer_to_buffer(src, 0, &staging, 0, size);
            self.queue.submit([encoder.finish()]);
            staging
        })?;
        let (sender, receiver) = oneshot();
        staging
            .slice(..)
            .map_async(wgpu::MapMode::Read, move |r| sender.send(r));
        #[cfg(not(target_arch = "wasm32"))]
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(format!("waiting for the GPU: {e}")))?;
        let mapped = receiver.await;
        self.check_alive()?;
        mapped.map_err(|e| Error::Gpu(format!("mapping a readback buffer: {e}")))?;
        let bytes = {
            let view = staging
                .slice(..)
                .get_mapped_range()
                .map_err(|e| Error::Gpu(format!("reading a mapped buffer: {e}")))?;
            view.to_vec()
        };
        staging.unmap();
        Ok(bytes)
    }

    /// Blocking form of [`GpuContext::read_buffer_async`].
    pub fn read_buffer(&self, src: &wgpu::Buffer, size: u64) -> Result<Vec<u8>> {
        pollster::block_on(self.read_buffer_async(src, size))
    }

    /// Waits until all submitted work is done.
    pub fn wait(&self) -> Result<()> {
        self.check_alive()?;
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(format!("waiting for the GPU: {e}")))?;
        self.check_alive()
    }
}

/// Whether `instance` supports WGSL's `packed_4x8_integer_dot_product` language extension.
fn packed_dot_in(instance: &wgpu::Instance) -> bool {
    instance
        .wgsl_language_features()
        .contains(wgpu::WgslLanguageFeatures::Packed4x8IntegerDotProduct)
}

/// A minimal one-shot channel whose receiver is a future (for `map_async` callbacks).
struct Shared<T> {
    value: Option<T>,
    waker: Option<Waker>,
    closed: bool,
}

struct Sender<T>(Arc<Mutex<Shared<T>>>);
struct Receiver<T>(Arc<Mutex<Shared<T>>>);

fn oneshot<T>() -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Mutex::new(Shared {
        value: None,
        waker: None,
        closed: false,
    }));
    (Sender(Arc::clone(&shared)), Receiver(shared))
}

impl<T> Sender<T> {
    fn send(self, value: T) {
        let waker = {
            let mut s = lock(&self.0);
            s.value = Some(value);
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let waker = {
            let mut s = lock(&self.0);
            s.closed = true;
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl Future for Receiver<Result<(), wgpu::BufferAsyncError>> {
    type Output = Result<(), String>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let mut s = lock(&self.0);
        match s.value.take() {
            Some(r) => Poll::Ready(r.map_err(|e| e.to_string())),
            None if s.closed => Poll::Ready(Err("the map callback was dropped".to_string())),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}
