//! [`GpuContext`]: the device, queue, limits, pipeline cache and error capture.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll, Waker};

use wgpu::util::DeviceExt;

use crate::error::{Error, Result};
use crate::gpu::cache::{self, CacheLoad, CacheStatus};
use crate::gpu::pipeline::{BindingType, Kernel, Pipeline, PipelineKey};
use crate::gpu::runtime::{
    lock, size_class, ContextId, PoolKey, PoolStats, PopFuture, Recording, Runtime, TransferStats,
};
use crate::gpu::GpuTensor;

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

/// What [`GpuContext::from_device_with`] does with the device's uncaptured-error handler.
/// wgpu keeps one handler per device (setting one replaces the previous), so the embedder
/// chooses.
#[derive(Clone, Default)]
pub enum UncapturedErrors {
    /// Leave the device's handler as it is (the default of [`GpuContext::from_device`]).
    /// qfuse runs its own work inside error scopes, so its errors never reach the handler;
    /// [`GpuContext::take_uncaptured_error`] then always says `None`. (A device with no
    /// handler at all panics on an uncaptured error: that is wgpu's default.)
    #[default]
    Keep,
    /// Install qfuse's handler, which records the last error for
    /// [`GpuContext::take_uncaptured_error`] (what [`GpuContext::new`] does).
    Install,
    /// Install a handler that records the error as `Install` does, then calls this one (the
    /// engine's own handler, so both see every uncaptured error).
    Chain(Arc<dyn wgpu::UncapturedErrorHandler>),
}

impl std::fmt::Debug for UncapturedErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Keep => "Keep",
            Self::Install => "Install",
            Self::Chain(_) => "Chain(..)",
        })
    }
}

/// The engine's device-lost callback, for [`DeviceLost::Chain`].
pub type DeviceLostFn = Arc<dyn Fn(wgpu::DeviceLostReason, String) + Send + Sync + 'static>;

/// What [`GpuContext::from_device_with`] does with the device-lost callback (wgpu keeps one
/// per device).
#[derive(Default)]
pub enum DeviceLost {
    /// Leave it as it is (the default of [`GpuContext::from_device`]). qfuse then learns of a
    /// lost device only from a failed readback (an `Error::Gpu` naming the failed mapping),
    /// not from [`GpuContext::check_alive`].
    #[default]
    Keep,
    /// Install qfuse's callback: after a loss, every call returns
    /// `Error::Gpu("device lost: ...")` (what [`GpuContext::new`] does).
    Install,
    /// Install qfuse's callback, which records the loss as `Install` does, then calls this
    /// one.
    Chain(DeviceLostFn),
}

impl std::fmt::Debug for DeviceLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Keep => "Keep",
            Self::Install => "Install",
            Self::Chain(_) => "Chain(..)",
        })
    }
}

/// How [`GpuContext::from_device_with`] treats an embedder's device: which of the device's
/// two callbacks qfuse may set, and where it keeps its caches. The default takes over neither
/// callback and keeps its caches in memory only.
#[derive(Debug, Default)]
pub struct EmbedOptions {
    /// The uncaptured-error handler.
    pub uncaptured_errors: UncapturedErrors,
    /// The device-lost callback.
    pub device_lost: DeviceLost,
    /// The directory of the persistent caches, as [`ContextOptions::cache_dir`] (wgpu's
    /// pipeline cache only where the embedder created the device with
    /// [`wgpu::Features::PIPELINE_CACHE`]).
    pub cache_dir: Option<PathBuf>,
}

/// Options of [`GpuContext::new_with`]. The default: no cache directory, the adapter's own
/// limits, every optional feature qfuse uses that the adapter offers.
#[derive(Debug, Clone)]
pub struct ContextOptions {
    /// A directory for the context's persistent caches (created when first written): the
    /// kernel variants timing chose per shape class, and wgpu's pipeline cache where the
    /// device offers [`wgpu::Features::PIPELINE_CACHE`] (Vulkan). `None` (the default): both
    /// live in memory, for the life of the context. A file that is unreadable, corrupt, of
    /// another version or written for another adapter is ignored and the reason kept in
    /// [`GpuContext::cache_status`]. See `src/gpu/cache.rs` for the files.
    pub cache_dir: Option<PathBuf>,
    /// Caps on the limits the device is requested with: each limit is the adapter's, or the
    /// cap's where that is worse ([`wgpu::Limits::or_worse_values_from`]), so the device
    /// behaves like a smaller GPU. `None` (the default): the adapter's own limits.
    pub limit_caps: Option<wgpu::Limits>,
    /// The optional features qfuse may request, each only where the adapter offers it
    /// (default [`ContextOptions::OPTIONAL_FEATURES`]; [`wgpu::Features::PIPELINE_CACHE`]
    /// only with a cache directory). Leaving one out makes the kernels that use it step
    /// aside as on an adapter without it ([`GpuContext::has_subgroups`],
    /// [`GpuContext::has_timestamps`]).
    pub optional_features: wgpu::Features,
}

impl Default for ContextOptions {
    fn default() -> Self {
        Self {
            cache_dir: None,
            limit_caps: None,
            optional_features: Self::OPTIONAL_FEATURES,
        }
    }
}

/// The environment variable [`ContextOptions::from_env`] reads.
pub const DEVICE_LIMITS_VAR: &str = "QFUSE_DEVICE_LIMITS";

impl ContextOptions {
    /// Every optional feature qfuse uses: GPU timestamps (benchmark timing), subgroups (the
    /// subgroup kernels) and wgpu's pipeline cache.
    pub const OPTIONAL_FEATURES: wgpu::Features = wgpu::Features::TIMESTAMP_QUERY
        .union(wgpu::Features::SUBGROUP)
        .union(wgpu::Features::PIPELINE_CACHE);

    /// The limits of a small or mobile GPU, as caps for [`ContextOptions::limit_caps`]:
    /// WebGPU's default limits ([`wgpu::Limits::defaults`]: 16 KiB of workgroup storage, 256
    /// invocations per workgroup, 8 storage buffers per stage, 256 MiB buffers, ...) with
    /// `max_storage_buffer_binding_size` cut to 16 MiB.
    pub fn small_gpu_limits() -> wgpu::Limits {
        wgpu::Limits {
            max_storage_buffer_binding_size: 16 << 20,
            max_compute_workgroup_storage_size: 16 << 10,
            ..wgpu::Limits::defaults()
        }
    }

    /// These options cut down to a small or mobile GPU: [`ContextOptions::small_gpu_limits`]
    /// as the limit caps, and neither subgroups nor timestamp queries (the pipeline cache
    /// stays allowed). Tensors past 16 MiB are then refused with
    /// [`Error::BufferTooLarge`], and the portable kernels run instead of the subgroup ones.
    pub fn small_gpu(self) -> Self {
        Self {
            limit_caps: Some(Self::small_gpu_limits()),
            optional_features: self.optional_features
                - wgpu::Features::SUBGROUP
                - wgpu::Features::TIMESTAMP_QUERY,
            ..self
        }
    }

    /// The default options, cut down as `QFUSE_DEVICE_LIMITS` says ([`DEVICE_LIMITS_VAR`]):
    /// unset, empty or `adapter`: the adapter's own limits and features; `small`:
    /// [`ContextOptions::small_gpu`]. [`GpuContext::new`] uses these, so a test suite or a
    /// command can be run as on a small GPU without a rebuild.
    ///
    /// Errors: [`Error::InvalidArgument`] for any other value, quoting it.
    pub fn from_env() -> Result<Self> {
        match std::env::var(DEVICE_LIMITS_VAR) {
            Err(std::env::VarError::NotPresent) => Ok(Self::default()),
            Ok(v) if v.trim().is_empty() || v.trim().eq_ignore_ascii_case("adapter") => {
                Ok(Self::default())
            }
            Ok(v) if v.trim().eq_ignore_ascii_case("small") => Ok(Self::default().small_gpu()),
            Ok(v) => Err(Error::invalid(format!(
                "{DEVICE_LIMITS_VAR}={v:?} is not a limits profile (expected adapter or small)"
            ))),
            Err(std::env::VarError::NotUnicode(v)) => Err(Error::invalid(format!(
                "{DEVICE_LIMITS_VAR}={v:?} is not a limits profile (not valid UTF-8; \
                 expected adapter or small)"
            ))),
        }
    }
}

impl EmbedOptions {
    /// qfuse installs both of its callbacks (what [`GpuContext::new`] does with its own
    /// device).
    pub fn install() -> Self {
        Self {
            uncaptured_errors: UncapturedErrors::Install,
            device_lost: DeviceLost::Install,
            cache_dir: None,
        }
    }
}

/// A GPU device and everything qfuse keeps about it: queue, adapter info, limits, compiled
/// pipelines, what the device reported asynchronously (loss, uncaptured errors), and the
/// runtime shared with its tensors: the buffer pool, the open recording, transfer counters.
///
/// `GpuContext` is `Send + Sync`; share it with an `Arc`. Construct it from the system with
/// [`GpuContext::new`] / [`GpuContext::new_async`], or from an embedder's device with
/// [`GpuContext::from_device`] / [`GpuContext::from_device_with`].
///
/// # Recording and submission
/// Outside a recording every launch ([`GpuContext::run`], so every kernel launcher) is one
/// submission. [`GpuContext::record`] gathers every launch made inside it into one command
/// encoder submitted once at its end; [`GpuContext::encode_into`] puts them into a caller's
/// encoder and submits nothing. A readback inside a recording first submits what is
/// pending. Validation and out-of-memory errors are caught by error scopes per submission
/// (one pair per launch outside a recording, one per recording), never per allocation, and
/// the scopes' answers are read without waiting (wgpu native answers at once; an answer
/// that is not ready is checked at the next readback or [`GpuContext::wait`]).
///
/// # Buffer pool
/// Tensors ([`GpuTensor::zeros`], uploads, launcher outputs), kernel parameters
/// ([`GpuContext::params`]) and readback staging buffers come from a pool keyed by size
/// class and usage; a dropped tensor returns its buffer, so a repeated forward or training
/// step allocates nothing after the first (see [`GpuContext::pool_stats`],
/// [`GpuContext::trim_pool`]; why reuse is safe is explained in `src/gpu/runtime.rs`).
pub struct GpuContext {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    timestamps: bool,
    subgroups: bool,
    modules: Mutex<HashMap<&'static str, wgpu::ShaderModule>>,
    pipelines: Mutex<HashMap<PipelineKey, Arc<Pipeline>>>,
    /// What [`cache::adapter_key`] says of this adapter.
    adapter_key: String,
    /// wgpu's pipeline cache (where the device has `PIPELINE_CACHE` and a cache directory was
    /// given), with the length of the data last read or written.
    pipeline_cache: Option<(wgpu::PipelineCache, Mutex<usize>)>,
    /// Tuning decisions: `family/class` -> variant.
    tuning: Mutex<BTreeMap<String, String>>,
    cache_status: Mutex<CacheStatus>,
    lost: Arc<Mutex<Option<String>>>,
    uncaptured: Arc<Mutex<Option<String>>>,
    packed_dot_available: bool,
    int8_dot_packed: AtomicBool,
    rt: Arc<Runtime>,
    pub(crate) profiler: Mutex<Option<crate::gpu::profile::Profiler>>,
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
    /// - `QFUSE_DEVICE_LIMITS=small` cuts the limits and features down to a small or mobile
    ///   GPU's ([`ContextOptions::from_env`], [`ContextOptions::small_gpu`]).
    ///
    /// Errors: [`Error::InvalidArgument`] for a `WGPU_BACKEND` that names no backend or a
    /// `QFUSE_DEVICE_LIMITS` that names no profile,
    /// [`Error::NoAdapter`] when no adapter matches, [`Error::Gpu`] when the device cannot be
    /// opened.
    pub async fn new_async() -> Result<Self> {
        Self::new_with_async(ContextOptions::from_env()?).await
    }

    /// [`GpuContext::new_async`] with options (a cache directory, caps on the limits, the
    /// optional features allowed; `QFUSE_DEVICE_LIMITS` is not read here, see
    /// [`ContextOptions::from_env`]). Where the adapter offers
    /// [`wgpu::Features::PIPELINE_CACHE`] and a cache directory is given, the device is also
    /// requested with that feature.
    ///
    /// Errors: those of [`GpuContext::new_async`]; an unusable cache directory is not an
    /// error (see [`GpuContext::cache_status`]).
    pub async fn new_with_async(options: ContextOptions) -> Result<Self> {
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
        let mut wanted = options.optional_features & ContextOptions::OPTIONAL_FEATURES;
        if options.cache_dir.is_none() {
            wanted = wanted - wgpu::Features::PIPELINE_CACHE;
        }
        let optional = adapter.features() & wanted;
        let limits = match &options.limit_caps {
            Some(caps) => adapter.limits().or_worse_values_from(caps),
            None => adapter.limits(),
        };
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("qfuse"),
                required_features: optional,
                required_limits: limits,
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
        Ok(Self::build(
            device,
            queue,
            info,
            packed,
            EmbedOptions {
                cache_dir: options.cache_dir,
                ..EmbedOptions::install()
            },
        ))
    }

    /// Blocking form of [`GpuContext::new_async`] (via `pollster`).
    pub fn new() -> Result<Self> {
        pollster::block_on(Self::new_async())
    }

    /// Blocking form of [`GpuContext::new_with_async`] (via `pollster`).
    ///
    /// ```no_run
    /// use qfuse::gpu::{ContextOptions, GpuContext};
    /// let ctx = GpuContext::new_with(ContextOptions {
    ///     cache_dir: Some(std::env::temp_dir().join("my-engine-qfuse-cache")),
    ///     ..ContextOptions::default()
    /// })?;
    /// println!("{:?}", ctx.cache_status());
    /// // The same adapter, as a small GPU would be: 16 MiB storage bindings, no subgroups.
    /// let small = GpuContext::new_with(ContextOptions::default().small_gpu())?;
    /// assert!(!small.has_subgroups());
    /// # Ok::<(), qfuse::Error>(())
    /// ```
    pub fn new_with(options: ContextOptions) -> Result<Self> {
        pollster::block_on(Self::new_with_async(options))
    }

    /// Wraps a device an embedder already opened, leaving the device's uncaptured-error
    /// handler and device-lost callback as they are ([`EmbedOptions::default`]; see
    /// [`GpuContext::from_device_with`] to have qfuse install or chain them). qfuse's own
    /// work runs inside error scopes, so its errors are `Error::Gpu` values whatever the
    /// handler.
    ///
    /// Limits come from `device.limits()` (what the device was created with, so request
    /// generous limits when you create it) and the adapter info from
    /// `device.adapter_info()`. Optional features are those `device.features()` reports: the
    /// subgroup kernels run only on a device created with [`wgpu::Features::SUBGROUP`]
    /// ([`GpuContext::has_subgroups`]). The device must come from the wgpu qfuse is built
    /// with: [`crate::wgpu`] (version 30).
    ///
    /// The WGSL language features (for [`GpuContext::int8_dot`]) are those of a native
    /// instance with no backends enabled (they depend on the wgpu / naga build, not on the
    /// device): on native builds that includes `dot4I8Packed`. On the web, where a device
    /// says nothing about its instance, the portable path is chosen; use
    /// [`GpuContext::set_int8_dot`] to change it.
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue) -> Result<Self> {
        Self::from_device_with(device, queue, EmbedOptions::default())
    }

    /// [`GpuContext::from_device`] with a choice of what qfuse does with the device's
    /// uncaptured-error handler and device-lost callback. wgpu keeps one of each per device:
    /// installing one replaces the engine's, which is why [`UncapturedErrors::Chain`] and
    /// [`DeviceLost::Chain`] take the engine's own and call it after qfuse's.
    ///
    /// ```no_run
    /// use std::sync::Arc;
    /// use qfuse::gpu::{EmbedOptions, GpuContext, UncapturedErrors};
    /// # fn f(device: qfuse::wgpu::Device, queue: qfuse::wgpu::Queue) -> qfuse::Result<()> {
    /// let engine_handler = Arc::new(|e: qfuse::wgpu::Error| eprintln!("engine: {e}"));
    /// let ctx = GpuContext::from_device_with(device, queue, EmbedOptions {
    ///     uncaptured_errors: UncapturedErrors::Chain(engine_handler),
    ///     ..Default::default()
    /// })?;
    /// # Ok(()) }
    /// ```
    pub fn from_device_with(
        device: wgpu::Device,
        queue: wgpu::Queue,
        options: EmbedOptions,
    ) -> Result<Self> {
        let info = device.adapter_info();
        let packed = if cfg!(target_arch = "wasm32") {
            false
        } else {
            let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
            desc.backends = wgpu::Backends::empty();
            packed_dot_in(&wgpu::Instance::new(desc))
        };
        Ok(Self::build(device, queue, info, packed, options))
    }

    fn build(
        device: wgpu::Device,
        queue: wgpu::Queue,
        info: wgpu::AdapterInfo,
        packed_dot_available: bool,
        options: EmbedOptions,
    ) -> Self {
        let lost = Arc::new(Mutex::new(None));
        let uncaptured = Arc::new(Mutex::new(None));
        let record_loss = {
            let lost = Arc::clone(&lost);
            move |reason: wgpu::DeviceLostReason, message: &str| {
                *lock(&lost) = Some(format!("{reason:?}: {message}"));
            }
        };
        match options.device_lost {
            DeviceLost::Keep => {}
            DeviceLost::Install => {
                device
                    .set_device_lost_callback(move |reason, message| record_loss(reason, &message));
            }
            DeviceLost::Chain(theirs) => {
                device.set_device_lost_callback(move |reason, message| {
                    record_loss(reason, &message);
                    theirs(reason, message);
                });
            }
        }
        let record_error = {
            let uncaptured = Arc::clone(&uncaptured);
            move |error: &wgpu::Error| *lock(&uncaptured) = Some(error.to_string())
        };
        match options.uncaptured_errors {
            UncapturedErrors::Keep => {}
            UncapturedErrors::Install => {
                device
                    .on_uncaptured_error(Arc::new(move |error: wgpu::Error| record_error(&error)));
            }
            UncapturedErrors::Chain(theirs) => {
                device.on_uncaptured_error(Arc::new(move |error: wgpu::Error| {
                    record_error(&error);
                    theirs(error);
                }));
            }
        }
        let limits = device.limits();
        let timestamps = device.features().contains(wgpu::Features::TIMESTAMP_QUERY);
        let subgroups = device.features().contains(wgpu::Features::SUBGROUP);
        let max_buffer = limits
            .max_buffer_size
            .min(limits.max_storage_buffer_binding_size);
        let rt = Arc::new(Runtime::new(
            format!("{} ({:?})", info.name, info.backend),
            max_buffer,
        ));
        let adapter_key = cache::adapter_key(&info, device.features(), &limits);
        let mut status = CacheStatus {
            dir: options.cache_dir.clone(),
            ..CacheStatus::default()
        };
        let mut tuning = BTreeMap::new();
        let mut pipeline_cache = None;
        if let Some(dir) = &options.cache_dir {
            status.tuning =
                match cache::load_tuning(&cache::tuning_path(dir, &adapter_key), &adapter_key) {
                    Ok(None) => CacheLoad::Missing,
                    Ok(Some(entries)) => {
                        tuning = entries;
                        CacheLoad::Loaded {
                            entries: tuning.len(),
                        }
                    }
                    Err(why) => CacheLoad::Rejected(why),
                };
            let supported = device.features().contains(wgpu::Features::PIPELINE_CACHE)
                && wgpu::util::pipeline_cache_key(&info).is_some();
            status.pipelines = if supported {
                let (data, load) = match cache::load_pipelines(
                    &cache::pipeline_path(dir, &adapter_key),
                    &adapter_key,
                ) {
                    Ok(None) => (None, CacheLoad::Missing),
                    Ok(Some(data)) => {
                        let entries = data.len();
                        (Some(data), CacheLoad::Loaded { entries })
                    }
                    Err(why) => (None, CacheLoad::Rejected(why)),
                };
                // SAFETY: `data` is what `PipelineCache::get_data` returned on an adapter with
                // the same key (name, ids, driver), as the file's header and checksum attest
                // (a file that fails them is never passed on); wgpu checks its own header
                // (version, device) again, and `fallback` makes it start empty instead of
                // failing when the data is not usable.
                let made = unsafe {
                    device.create_pipeline_cache(&wgpu::PipelineCacheDescriptor {
                        label: Some("qfuse pipelines"),
                        data: data.as_deref(),
                        fallback: true,
                    })
                };
                pipeline_cache = Some((made, Mutex::new(data.map_or(0, |d| d.len()))));
                load
            } else {
                CacheLoad::Unsupported
            };
        }
        Self {
            device,
            queue,
            info,
            limits,
            timestamps,
            subgroups,
            modules: Mutex::new(HashMap::new()),
            pipelines: Mutex::new(HashMap::new()),
            adapter_key,
            pipeline_cache,
            tuning: Mutex::new(tuning),
            cache_status: Mutex::new(status),
            lost,
            uncaptured,
            packed_dot_available,
            int8_dot_packed: AtomicBool::new(packed_dot_available),
            rt,
            profiler: Mutex::new(None),
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
    /// into [`Error::Gpu`] naming `what`. The scopes' answers are read without waiting: wgpu
    /// native answers at once; an answer that is not ready yet (the web) is checked at the
    /// next readback or [`GpuContext::wait`].
    pub fn scoped<T>(&self, what: &str, f: impl FnOnce() -> T) -> Result<T> {
        self.check_alive()?;
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let value = f();
        let validation = self.answer(what, Box::pin(validation.pop()));
        let oom = self.answer(what, Box::pin(oom.pop()));
        if let Some(e) = validation.or(oom) {
            return Err(Error::Gpu(format!("{what}: {e}")));
        }
        self.check_alive()?;
        Ok(value)
    }

    /// Polls a popped scope once: its error if it answered, else kept for the next sync
    /// point.
    fn answer(&self, what: &str, mut popped: PopFuture) -> Option<wgpu::Error> {
        let mut cx = TaskContext::from_waker(Waker::noop());
        match popped.as_mut().poll(&mut cx) {
            Poll::Ready(e) => e,
            Poll::Pending => {
                lock(&self.rt.unanswered).push((what.to_string(), popped));
                None
            }
        }
    }

    /// Waits for the error scopes that had not answered when popped (none on native).
    fn settle_scopes(&self) -> Result<()> {
        let pending = std::mem::take(&mut *lock(&self.rt.unanswered));
        let mut first = None;
        for (what, popped) in pending {
            if let Some(e) = pollster::block_on(popped) {
                first.get_or_insert_with(|| Error::Gpu(format!("{what}: {e}")));
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// `true` when the calling thread opened the recording now open: its error scopes
    /// cover what it does.
    fn in_own_recording(&self) -> bool {
        let rec = lock(&self.rt.rec);
        rec.depth > 0 && rec.owner == Some(std::thread::current().id())
    }

    /// `f` inside error scopes: the recording's when the calling thread has one open, else
    /// a pair of its own ([`GpuContext::scoped`]).
    fn guarded<T>(&self, what: &str, f: impl FnOnce() -> T) -> Result<T> {
        if self.in_own_recording() {
            self.check_alive()?;
            Ok(f())
        } else {
            self.scoped(what, f)
        }
    }

    /// A buffer of at least `size` bytes with `usage`, from the pool or newly created
    /// (`size` already checked against the limits). A pooled one keeps its old contents
    /// unless `zero`: then it is cleared, in the open encoder when there is one (ordered
    /// after the commands that used it before), else with a staged write (which lands before
    /// the next submission, whoever makes it).
    pub(crate) fn acquire(
        &self,
        usage: wgpu::BufferUsages,
        size: u64,
        zero: bool,
    ) -> Result<(PoolKey, wgpu::Buffer)> {
        let key = PoolKey {
            size: size_class(size, self.rt.max_buffer),
            usage,
        };
        if let Some(buffer) = self.rt.take(key) {
            if zero {
                let mut rec = lock(&self.rt.rec);
                if rec.depth > 0 && rec.owner == Some(std::thread::current().id()) {
                    let encoder = rec
                        .encoder
                        .get_or_insert_with(|| self.new_encoder("qfuse recording"));
                    encoder.clear_buffer(&buffer, 0, None);
                } else {
                    drop(rec);
                    let zeros = vec![0u8; key.size as usize];
                    self.guarded("clearing a pooled buffer", || {
                        self.queue.write_buffer(&buffer, 0, &zeros)
                    })?;
                }
            }
            return Ok((key, buffer));
        }
        let buffer = self.guarded("allocating a buffer", || {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("qfuse"),
                size: key.size,
                usage,
                mapped_at_creation: false,
            })
        })?;
        lock(&self.rt.pool).allocated(key);
        Ok((key, buffer))
    }

    /// Writes `bytes` at the start of `buffer` (`COPY_DST`) just before the next launch, as
    /// kernel parameters are (counted with them): for small per-launch state such as a
    /// status word reset.
    pub(crate) fn write_before_next_launch(&self, buffer: &wgpu::Buffer, bytes: &[u8]) {
        self.rt.count_param(bytes.len() as u64);
        lock(&self.rt.rec)
            .writes
            .push((buffer.clone(), bytes.to_vec()));
    }

    /// The runtime shared with this context's tensors.
    pub(crate) fn runtime(&self) -> &Arc<Runtime> {
        &self.rt
    }

    fn new_encoder(&self, label: &str) -> wgpu::CommandEncoder {
        self.device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) })
    }

    /// This context's identity (what a [`GpuTensor`] remembers of the context it was made
    /// on).
    pub fn id(&self) -> ContextId {
        self.rt.id()
    }

    /// `Ok` when `t` was made on this context.
    ///
    /// Errors: [`Error::ContextMismatch`] naming `what` (the argument) and both contexts.
    pub fn check_tensor(&self, what: &str, t: &GpuTensor) -> Result<()> {
        if t.context_id() == self.id() {
            return Ok(());
        }
        Err(Error::ContextMismatch {
            what: what.to_string(),
            tensor_context: t.context_description(),
            context: self.rt.describe(),
        })
    }

    /// [`GpuContext::check_tensor`] for each `(argument name, tensor)`.
    ///
    /// Errors: [`Error::ContextMismatch`] for the first tensor of another context.
    pub fn check_tensors(&self, tensors: &[(&str, &GpuTensor)]) -> Result<()> {
        tensors
            .iter()
            .try_for_each(|(what, t)| self.check_tensor(what, t))
    }

    /// Host↔device transfers so far (see [`TransferStats`]; take two snapshots and
    /// [`TransferStats::since`] for the transfers of a stretch of work).
    pub fn transfer_stats(&self) -> TransferStats {
        *lock(&self.rt.transfers)
    }

    /// Sets the transfer counters back to zero.
    pub fn reset_transfer_stats(&self) {
        *lock(&self.rt.transfers) = TransferStats::default();
    }

    /// What the buffer pool did and holds (see [`PoolStats`]).
    pub fn pool_stats(&self) -> PoolStats {
        lock(&self.rt.pool).stats()
    }

    /// Drops every idle pooled buffer (buffers in use and those waiting for an open encoder
    /// stay) and returns how many bytes that freed. The pool only grows to the largest
    /// working set seen; trim it after a one-off peak.
    pub fn trim_pool(&self) -> u64 {
        lock(&self.rt.pool).trim()
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

    /// A new uniform buffer holding `value` (a `#[repr(C)]` `Pod` struct laid out like the
    /// WGSL one; keep its size a multiple of 16 bytes). It is not pooled:
    /// [`GpuContext::params`] is the pooled form launchers use.
    pub fn uniform<T: bytemuck::Pod>(&self, value: &T) -> Result<wgpu::Buffer> {
        self.rt.count_param(std::mem::size_of::<T>() as u64);
        self.guarded("creating a uniform buffer", || {
            self.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("qfuse uniform"),
                    contents: bytemuck::bytes_of(value),
                    usage: wgpu::BufferUsages::UNIFORM,
                })
        })
    }

    /// Kernel parameters: a pooled uniform buffer holding `value` (a `#[repr(C)]` `Pod`
    /// struct laid out like the WGSL one; keep its size a multiple of 16 bytes), which goes
    /// back to the pool when the returned [`ParamsBuffer`] is dropped. Its contents are written
    /// just before the next launch (no device call here once the pool is warm).
    pub fn params<T: bytemuck::Pod>(&self, value: &T) -> Result<ParamsBuffer> {
        let bytes = bytemuck::bytes_of(value).to_vec();
        let size = (bytes.len() as u64).max(4);
        self.check_buffer_size(size)?;
        let (key, buffer) = self.acquire(
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            size,
            false,
        )?;
        self.rt.count_param(bytes.len() as u64);
        if !bytes.is_empty() {
            lock(&self.rt.rec).writes.push((buffer.clone(), bytes));
        }
        Ok(ParamsBuffer {
            buffer,
            key,
            rt: Arc::clone(&self.rt),
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
                    cache: self.pipeline_cache.as_ref().map(|(c, _)| c),
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

    /// How many distinct pipelines (entry point, bindings, override constants) this context
    /// has compiled: each launcher compiles a small, fixed set of variants whatever the
    /// shapes (see `ConvAlgorithm::Auto` for the conv2d forward), so this stops growing once
    /// a workload's ops have all run.
    pub fn pipeline_count(&self) -> usize {
        lock(&self.pipelines).len()
    }

    /// Where the context keeps its caches and what it found there when it opened (see
    /// [`ContextOptions::cache_dir`]).
    pub fn cache_status(&self) -> CacheStatus {
        lock(&self.cache_status).clone()
    }

    /// Every tuning decision of this context (`family/class` -> variant), those read from the
    /// cache directory included.
    pub fn tuning_entries(&self) -> Vec<(String, String)> {
        lock(&self.tuning)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The tuning decision for `key` (`family/class`), if any.
    pub(crate) fn tuned(&self, key: &str) -> Option<String> {
        lock(&self.tuning).get(key).cloned()
    }

    /// Records a tuning decision and, with a cache directory, rewrites the tuning file
    /// (a write failure is kept in [`CacheStatus::last_write_error`], not returned).
    pub(crate) fn set_tuned(&self, key: &str, value: &str) {
        let bytes = {
            let mut t = lock(&self.tuning);
            t.insert(key.to_string(), value.to_string());
            cache::tuning_bytes(&self.adapter_key, &t)
        };
        let dir = lock(&self.cache_status).dir.clone();
        if let Some(dir) = dir {
            let written = cache::write_file(&cache::tuning_path(&dir, &self.adapter_key), &bytes);
            if let Err(e) = written {
                lock(&self.cache_status).last_write_error = Some(e);
            }
        }
    }

    /// Writes wgpu's pipeline cache to the cache directory (when there is one, the device
    /// offers the cache, and it holds more than what was read or last written); the tuning
    /// file is written as decisions are made. Also done, ignoring failures, when the context
    /// drops.
    ///
    /// Errors: [`Error::Io`]-like failures to write, as [`Error::InvalidArgument`] naming the
    /// file.
    pub fn persist_caches(&self) -> Result<()> {
        let (Some((pc, written)), Some(dir)) =
            (&self.pipeline_cache, lock(&self.cache_status).dir.clone())
        else {
            return Ok(());
        };
        let Some(data) = pc.get_data() else {
            return Ok(());
        };
        let mut written = lock(written);
        if data.is_empty() || data.len() == *written {
            return Ok(());
        }
        let path = cache::pipeline_path(&dir, &self.adapter_key);
        match cache::write_file(&path, &cache::pipeline_bytes(&self.adapter_key, &data)) {
            Ok(()) => {
                *written = data.len();
                Ok(())
            }
            Err(e) => {
                lock(&self.cache_status).last_write_error = Some(e.clone());
                Err(Error::invalid(format!("writing the pipeline cache: {e}")))
            }
        }
    }

    /// Encodes `launches` into a command buffer of their own, after clearing `clear` to
    /// zeros, submits it at once — outside any open recording (the caller's or this
    /// thread's: its work runs ahead of what they hold, so it must not depend on it) and
    /// without kernel timing — and waits until the device is idle. For measurements on
    /// scratch tensors (the conv2d tuner).
    ///
    /// Errors: [`Error::Gpu`] for what the GPU reports; [`Error::InvalidArgument`] on the web
    /// (where nothing can wait).
    pub(crate) fn run_detached(
        &self,
        clear: &[&wgpu::Buffer],
        launches: &[Launch<'_>],
    ) -> Result<()> {
        if cfg!(target_arch = "wasm32") {
            return Err(Error::invalid(
                "detached launches need a blocking wait (not on the web)",
            ));
        }
        self.check_alive()?;
        let mut prepared = Vec::with_capacity(launches.len());
        for launch in launches {
            prepared.push((launch, self.pipeline(launch.kernel, launch.constants)?));
        }
        self.scoped("running detached kernels", || {
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
            let mut encoder = self.new_encoder("qfuse detached");
            for b in clear {
                encoder.clear_buffer(b, 0, None);
            }
            {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("qfuse detached"),
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
            // The parameters of these launches (and any pending ones, which land early but
            // unchanged) are written before this submission.
            let mut rec = lock(&self.rt.rec);
            self.issue_writes(&mut rec);
            self.queue.submit([encoder.finish()]);
            drop(rec);
        })?;
        #[cfg(not(target_arch = "wasm32"))]
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(format!("waiting for the GPU: {e}")))?;
        self.check_alive()
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

    /// Encodes `launches` in order into one compute pass (a later launch sees the writes of
    /// an earlier one). Outside a recording the pass is submitted at once as one command
    /// buffer; inside [`GpuContext::record`] / [`GpuContext::encode_into`] it is appended to
    /// the open encoder. Never waits for the GPU.
    pub fn run(&self, launches: &[Launch<'_>]) -> Result<()> {
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
        self.guarded("submitting kernels", || {
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
            // Kernel timing (GpuContext::begin_kernel_timing): timestamps around the pass.
            let mut profiler = lock(&self.profiler);
            let writes = profiler.as_mut().and_then(|p| {
                p.next_writes(|| {
                    let names: Vec<String> = prepared
                        .iter()
                        .map(|(l, _)| format!("{}::{}", l.kernel.shader.name, l.kernel.entry_point))
                        .collect();
                    names.join("+")
                })
            });
            let encode = |encoder: &mut wgpu::CommandEncoder| {
                let timestamp_writes = match (profiler.as_ref(), writes) {
                    (Some(p), Some((begin, end))) => Some(wgpu::ComputePassTimestampWrites {
                        query_set: &p.query_set,
                        beginning_of_pass_write_index: Some(begin),
                        end_of_pass_write_index: Some(end),
                    }),
                    _ => None,
                };
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("qfuse kernels"),
                    timestamp_writes,
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
            };
            let me = std::thread::current().id();
            // Parameter writes, encoding and submission happen under the recording lock, so
            // no thread submits work whose parameters another thread has taken but not yet
            // written, nor overtakes a submission of encoders it depends on.
            let mut rec = lock(&self.rt.rec);
            self.issue_writes(&mut rec);
            if rec.depth > 0 && rec.owner == Some(me) {
                let encoder = rec
                    .encoder
                    .get_or_insert_with(|| self.new_encoder("qfuse recording"));
                encode(encoder);
            } else {
                // Another thread's recording goes first (its launches come before ours),
                // unless it is a caller's encoder, which only the caller submits.
                let pending = if rec.external {
                    None
                } else {
                    rec.encoder.take()
                };
                let mut encoder = self.new_encoder("qfuse kernels");
                encode(&mut encoder);
                let buffers = pending.into_iter().chain([encoder]).map(|e| e.finish());
                self.queue.submit(buffers);
                self.submitted(&rec);
            }
        })
    }

    /// Device-to-device copies `(src, src_offset, dst, dst_offset, bytes)`, in order, encoded
    /// as [`GpuContext::run`] encodes kernels: appended to the open encoder inside
    /// [`GpuContext::record`] / [`GpuContext::encode_into`] (ordered with the launches around
    /// them), else submitted at once as one command buffer. Never waits for the GPU.
    ///
    /// Errors: [`Error::MissingBufferUsage`] for a source without `COPY_SRC` or a
    /// destination without `COPY_DST`; [`Error::Gpu`] naming `what` for a region that is not
    /// 4-byte aligned or runs past a buffer's end, and for what the GPU reports.
    pub(crate) fn copy_regions(
        &self,
        what: &str,
        copies: &[(&wgpu::Buffer, u64, &wgpu::Buffer, u64, u64)],
    ) -> Result<()> {
        self.check_alive()?;
        for &(src, so, dst, d_o, bytes) in copies {
            crate::gpu::tensor::require_usage(src, wgpu::BufferUsages::COPY_SRC, "copy from it")?;
            crate::gpu::tensor::require_usage(dst, wgpu::BufferUsages::COPY_DST, "copy into it")?;
            let fits =
                |off: u64, b: &wgpu::Buffer| off.checked_add(bytes).is_some_and(|e| e <= b.size());
            let aligned = [so, d_o, bytes]
                .iter()
                .all(|v| v.is_multiple_of(wgpu::COPY_BUFFER_ALIGNMENT));
            if !aligned || !fits(so, src) || !fits(d_o, dst) {
                return Err(Error::Gpu(format!(
                    "{what}: cannot copy {bytes} bytes from offset {so} of a {}-byte buffer to \
                     offset {d_o} of a {}-byte buffer",
                    src.size(),
                    dst.size()
                )));
            }
        }
        let copies: Vec<_> = copies.iter().filter(|c| c.4 > 0).collect();
        if copies.is_empty() {
            return Ok(());
        }
        self.encode_commands(what, |encoder| {
            for &&(src, so, dst, d_o, bytes) in &copies {
                encoder.copy_buffer_to_buffer(src, so, dst, d_o, bytes);
            }
        })
    }

    /// Zero-fills the first `bytes` of `buffer` (a caller's output that a kernel writes only
    /// in part), encoded as [`GpuContext::copy_regions`] encodes copies: in order with the
    /// launches around it. Never waits for the GPU.
    ///
    /// Errors: [`Error::MissingBufferUsage`] for a buffer without `COPY_DST`; [`Error::Gpu`]
    /// naming `what` for a size that is not 4-byte aligned or runs past the buffer's end.
    pub(crate) fn clear_buffer(&self, what: &str, buffer: &wgpu::Buffer, bytes: u64) -> Result<()> {
        self.check_alive()?;
        crate::gpu::tensor::require_usage(buffer, wgpu::BufferUsages::COPY_DST, "zero-fill it")?;
        if !bytes.is_multiple_of(wgpu::COPY_BUFFER_ALIGNMENT) || bytes > buffer.size() {
            return Err(Error::Gpu(format!(
                "{what}: cannot clear {bytes} bytes of a {}-byte buffer",
                buffer.size()
            )));
        }
        if bytes == 0 {
            return Ok(());
        }
        self.encode_commands(what, |encoder| encoder.clear_buffer(buffer, 0, Some(bytes)))
    }

    /// Encodes non-compute commands (copies, clears) as [`GpuContext::run`] encodes kernels:
    /// appended to the open encoder inside a recording, else submitted at once.
    fn encode_commands(
        &self,
        what: &str,
        encode: impl FnOnce(&mut wgpu::CommandEncoder),
    ) -> Result<()> {
        self.guarded(what, || {
            let me = std::thread::current().id();
            let mut rec = lock(&self.rt.rec);
            self.issue_writes(&mut rec);
            if rec.depth > 0 && rec.owner == Some(me) {
                let encoder = rec
                    .encoder
                    .get_or_insert_with(|| self.new_encoder("qfuse recording"));
                encode(encoder);
            } else {
                let pending = if rec.external {
                    None
                } else {
                    rec.encoder.take()
                };
                let mut encoder = self.new_encoder("qfuse copies");
                encode(&mut encoder);
                let buffers = pending.into_iter().chain([encoder]).map(|e| e.finish());
                self.queue.submit(buffers);
                self.submitted(&rec);
            }
        })
    }

    /// Issues the pending parameter writes (under the recording lock, held by the caller).
    fn issue_writes(&self, rec: &mut Recording) {
        for (buffer, bytes) in rec.writes.drain(..) {
            self.queue.write_buffer(&buffer, 0, &bytes);
        }
    }

    /// After a submission that holds every encoder open so far (called under the recording
    /// lock): counts it and returns the quarantined buffers to the pool, unless a caller's
    /// encoder is open (its buffers wait for its own callback).
    fn submitted(&self, rec: &Recording) {
        let mut pool = lock(&self.rt.pool);
        pool.count_submission();
        if !rec.external && rec.encoder.is_none() {
            let freed = std::mem::take(&mut pool.quarantine);
            pool.put_all(freed);
        }
    }

    /// Runs `f` as one recording: every launch the calling thread makes inside it (by any
    /// launcher) is encoded into one command encoder, submitted once when `f` returns — also
    /// when it returns an error (the work recorded until then runs, as it would have outside
    /// a recording). Nested recordings join the outer one. One thread records at a time:
    /// meanwhile other threads launch as outside a recording (each of their submissions
    /// first submits what is recorded so far, so launch order is kept), and a `record` on
    /// another thread runs its closure unbatched, each launch under its own error scopes as
    /// outside a recording (a caller's own `wgpu` calls inside that closure are then under no
    /// qfuse error scope).
    ///
    /// One pair of error scopes covers the recording; what they catch is returned as
    /// [`Error::Gpu`] after the submission, unless `f` itself failed. A readback inside the
    /// recording submits what is recorded so far first, so it sees the results of earlier
    /// launches; the recording then goes on in a new encoder. Tensors dropped inside the
    /// recording return their buffers to the pool only once it is submitted.
    ///
    /// ```no_run
    /// # use qfuse::gpu::{GpuContext, GpuTensor};
    /// # use qfuse::{kernels, ops::Activation};
    /// # fn f(ctx: &GpuContext, x: &GpuTensor) -> qfuse::Result<()> {
    /// let y = ctx.record(|| {
    ///     let a = kernels::activation::activation(ctx, x, Activation::Relu)?;
    ///     kernels::activation::activation(ctx, &a, Activation::Relu6) // `a` is freed here
    /// })?; // one submission for both launches
    /// # Ok(()) }
    /// ```
    pub fn record<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.check_alive()?;
        let me = std::thread::current().id();
        let outermost = {
            let mut rec = lock(&self.rt.rec);
            if rec.depth > 0 && rec.owner != Some(me) {
                drop(rec);
                return f();
            }
            rec.depth += 1;
            if rec.depth == 1 {
                rec.owner = Some(me);
                true
            } else {
                false
            }
        };
        let depth = DepthGuard { ctx: self };
        if !outermost {
            return f();
        }
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let value = f();
        self.submit_pending();
        drop(depth);
        let validation = self.answer("a recording", Box::pin(validation.pop()));
        let oom = self.answer("a recording", Box::pin(oom.pop()));
        let value = value?;
        if let Some(e) = validation.or(oom) {
            return Err(Error::Gpu(format!("submitting a recording: {e}")));
        }
        self.check_alive()?;
        Ok(value)
    }

    /// Runs `f` with every launch encoded into `encoder`, the caller's, and submits
    /// nothing: for engines that interleave their own passes with qfuse's. The caller
    /// submits `encoder` (on this context's queue) when it likes; the kernel parameters and
    /// zero-fills qfuse writes with `Queue::write_buffer` land before that submission.
    /// Buffers of tensors dropped inside `f` go back to the pool when the caller's command
    /// buffer has finished on the GPU.
    ///
    /// A readback inside `f` is refused (what it would read is not submitted yet), and so is
    /// an `encode_into` inside [`GpuContext::record`] or another `encode_into`.
    ///
    /// ```no_run
    /// # use qfuse::gpu::{GpuContext, GpuTensor};
    /// # use qfuse::{kernels, ops::Activation};
    /// # fn f(ctx: &GpuContext, x: &GpuTensor) -> qfuse::Result<()> {
    /// let mut encoder = ctx.device().create_command_encoder(&Default::default());
    /// // ... the engine's own passes ...
    /// let y = ctx.encode_into(&mut encoder, || {
    ///     kernels::activation::activation(ctx, x, Activation::Relu)
    /// })?;
    /// // ... more of the engine's passes, reading `y.buffer()` ...
    /// ctx.queue().submit([encoder.finish()]);
    /// # Ok(()) }
    /// ```
    ///
    /// Errors: [`Error::InvalidArgument`] inside a recording; `f`'s errors; [`Error::Gpu`]
    /// for what the error scopes around `f` caught.
    pub fn encode_into<T>(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        self.check_alive()?;
        {
            let mut rec = lock(&self.rt.rec);
            if rec.depth > 0 {
                return Err(Error::invalid(
                    "GpuContext::encode_into cannot be nested in a recording (record or \
                     encode_into)",
                ));
            }
            let theirs = std::mem::replace(encoder, self.new_encoder("qfuse placeholder"));
            rec.encoder = Some(theirs);
            rec.external = true;
            rec.depth = 1;
            rec.owner = Some(std::thread::current().id());
        }
        let guard = ExternalGuard { ctx: self, encoder };
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let value = f();
        self.issue_writes(&mut lock(&self.rt.rec));
        drop(guard);
        let validation = self.answer("encode_into", Box::pin(validation.pop()));
        let oom = self.answer("encode_into", Box::pin(oom.pop()));
        let value = value?;
        if let Some(e) = validation.or(oom) {
            return Err(Error::Gpu(format!(
                "encoding into the caller's encoder: {e}"
            )));
        }
        Ok(value)
    }

    /// Inside a recording opened by [`GpuContext::record`]: submits what is recorded so far
    /// (the recording goes on). Elsewhere nothing is pending and this does nothing. Call it
    /// before submitting work of your own that reads qfuse tensors written inside the
    /// recording.
    pub fn flush(&self) -> Result<()> {
        self.scoped("submitting a recording", || self.submit_pending())
    }

    /// Submits the open encoder (unless it is a caller's) with the parameter writes before
    /// it, and returns the buffers freed while it was open to the pool.
    fn submit_pending(&self) {
        let mut rec = lock(&self.rt.rec);
        if rec.external {
            return;
        }
        self.issue_writes(&mut rec);
        if let Some(encoder) = rec.encoder.take() {
            self.queue.submit([encoder.finish()]);
            self.submitted(&rec);
        }
    }

    /// Copies `size` bytes (a multiple of 4) from the start of `src` (which needs
    /// `COPY_SRC`) into a pooled staging buffer and reads them back: the async core of every
    /// download. Inside a recording, what is recorded is submitted first (with the copy).
    /// On native this blocks in `device.poll` until the copy is done; on the web the
    /// browser drives the mapping.
    ///
    /// Errors: [`Error::InvalidArgument`] inside [`GpuContext::encode_into`];
    /// [`Error::MissingBufferUsage`] without `COPY_SRC`; [`Error::Gpu`] for a bad size or
    /// what the GPU reports (including a lost device, and errors caught earlier by scopes
    /// that had not answered).
    pub async fn read_buffer_async(&self, src: &wgpu::Buffer, size: u64) -> Result<Vec<u8>> {
        self.check_alive()?;
        if size == 0 {
            return Ok(Vec::new());
        }
        if !size.is_multiple_of(wgpu::COPY_BUFFER_ALIGNMENT) || size > src.size() {
            return Err(Error::Gpu(format!(
                "cannot read {size} bytes from a buffer of {} bytes (multiple of 4 needed)",
                src.size()
            )));
        }
        crate::gpu::tensor::require_usage(src, wgpu::BufferUsages::COPY_SRC, "download it")?;
        {
            let rec = lock(&self.rt.rec);
            if rec.external && rec.owner == Some(std::thread::current().id()) {
                return Err(Error::invalid(
                    "cannot read back inside GpuContext::encode_into: the caller's encoder \
                     is not submitted yet",
                ));
            }
        }
        let (key, staging) = self.acquire(
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            size,
            false,
        )?;
        // Its own scopes even inside a recording: an error in what is flushed here must fail
        // this readback, not return what an invalid submission left in the buffer.
        self.scoped("reading back a buffer", || {
            let mut rec = lock(&self.rt.rec);
            self.issue_writes(&mut rec);
            let pending = if rec.external {
                None
            } else {
                rec.encoder.take()
            };
            let mut encoder = pending.unwrap_or_else(|| self.new_encoder("qfuse readback"));
            encoder.copy_buffer_to_buffer(src, 0, &staging, 0, size);
            self.queue.submit([encoder.finish()]);
            self.submitted(&rec);
        })?;
        self.rt.count_download(size);
        let (sender, receiver) = oneshot();
        staging
            .slice(..size)
            .map_async(wgpu::MapMode::Read, move |r| sender.send(r));
        #[cfg(not(target_arch = "wasm32"))]
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(format!("waiting for the GPU: {e}")))?;
        let mapped = receiver.await;
        self.check_alive()?;
        self.settle_scopes()?;
        mapped.map_err(|e| Error::Gpu(format!("mapping a readback buffer: {e}")))?;
        let bytes = {
            let view = staging
                .slice(..size)
                .get_mapped_range()
                .map_err(|e| Error::Gpu(format!("reading a mapped buffer: {e}")))?;
            view.to_vec()
        };
        staging.unmap();
        self.rt.release(key, staging);
        Ok(bytes)
    }

    /// Blocking form of [`GpuContext::read_buffer_async`].
    pub fn read_buffer(&self, src: &wgpu::Buffer, size: u64) -> Result<Vec<u8>> {
        pollster::block_on(self.read_buffer_async(src, size))
    }

    /// Submits what a recording holds (as [`GpuContext::flush`]) and waits until all
    /// submitted work is done.
    pub fn wait(&self) -> Result<()> {
        self.check_alive()?;
        self.flush()?;
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(format!("waiting for the GPU: {e}")))?;
        self.settle_scopes()?;
        self.check_alive()
    }
}

impl Drop for GpuContext {
    fn drop(&mut self) {
        // Best effort: a failure is what `persist_caches` would have returned.
        let _ = self.persist_caches();
    }
}

/// Pooled kernel parameters (a uniform buffer) from [`GpuContext::params`]; dereferences to
/// the `wgpu::Buffer` a [`Launch`] binds, and returns it to the pool when dropped.
pub struct ParamsBuffer {
    buffer: wgpu::Buffer,
    key: PoolKey,
    rt: Arc<Runtime>,
}

impl std::fmt::Debug for ParamsBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParamsBuffer")
            .field("bytes", &self.key.size)
            .finish_non_exhaustive()
    }
}

impl std::ops::Deref for ParamsBuffer {
    type Target = wgpu::Buffer;
    fn deref(&self) -> &wgpu::Buffer {
        &self.buffer
    }
}

impl Drop for ParamsBuffer {
    fn drop(&mut self) {
        self.rt.release(self.key, self.buffer.clone());
    }
}

/// Closes a recording level when dropped (also on a panic in the recorded closure: the
/// outermost level then drops what was recorded without submitting it).
struct DepthGuard<'a> {
    ctx: &'a GpuContext,
}

impl Drop for DepthGuard<'_> {
    fn drop(&mut self) {
        let mut rec = lock(&self.ctx.rt.rec);
        rec.depth = rec.depth.saturating_sub(1);
        if rec.depth == 0 {
            rec.owner = None;
            let dropped = rec.encoder.take();
            let freed = std::mem::take(&mut lock(&self.ctx.rt.pool).quarantine);
            drop(rec);
            drop(dropped);
            lock(&self.ctx.rt.pool).put_all(freed);
        }
    }
}

/// Ends [`GpuContext::encode_into`] (also on a panic): gives the caller's encoder back, with
/// the buffers freed meanwhile returning to the pool once its work has finished on the GPU.
struct ExternalGuard<'a> {
    ctx: &'a GpuContext,
    encoder: &'a mut wgpu::CommandEncoder,
}

impl Drop for ExternalGuard<'_> {
    fn drop(&mut self) {
        let rt = &self.ctx.rt;
        let mut rec = lock(&rt.rec);
        let freed = std::mem::take(&mut lock(&rt.pool).quarantine);
        if let Some(theirs) = rec.encoder.take() {
            *self.encoder = theirs;
        }
        rec.external = false;
        rec.depth = 0;
        rec.owner = None;
        drop(rec);
        if !freed.is_empty() {
            let rt = Arc::clone(rt);
            self.encoder
                .on_submitted_work_done(move || lock(&rt.pool).put_all(freed));
        }
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
