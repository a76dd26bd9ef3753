//! The state a [`GpuContext`](crate::gpu::GpuContext) shares with its tensors: the buffer
//! pool, the open recording (a pending command encoder), transfer counters and error scopes
//! that have not answered yet.
//!
//! # Why reusing a pooled buffer is safe
//! WebGPU executes the commands of one queue as if one after the other: a later submission
//! (and a later pass of one command encoder) sees the writes of earlier ones, and wgpu puts
//! the barriers in. A buffer whose last tensor is dropped has only been used by commands
//! already recorded; a command that reuses it for another tensor comes after them, so
//! overwriting its old contents is correct ordering — with one exception:
//! `Queue::write_buffer` (uploads, kernel parameters, zero-filling outside a recording) is
//! staged and lands at the start of the *next* submission, ahead of any command encoder
//! still open. So a buffer freed while an encoder is open (a recording, or a caller's encoder
//! in [`GpuContext::encode_into`](crate::gpu::GpuContext::encode_into)) waits in quarantine
//! and returns to the pool only when that encoder is submitted (our own) or has finished on
//! the GPU (a caller's, via `CommandEncoder::on_submitted_work_done`); outside a recording a
//! freed buffer is reusable at once, since everything that used it is already submitted.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};
use std::thread::ThreadId;

/// Locks a mutex, ignoring poisoning (the data it guards stays consistent: caches, lists,
/// counters).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The identity of a [`GpuContext`](crate::gpu::GpuContext): unique among the contexts
/// alive in the process (a tensor keeps its context's runtime alive, so two live ids never
/// collide). Shown as `#` and a hexadecimal number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ContextId(pub(crate) usize);

impl std::fmt::Display for ContextId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{:x}", self.0)
    }
}

/// Host↔device transfers of one context, counted since it was made (or since
/// [`GpuContext::reset_transfer_stats`](crate::gpu::GpuContext::reset_transfer_stats)).
///
/// Uploads are tensor data written from the host ([`crate::gpu::GpuTensor::upload_f32`] and
/// the other `upload_*` / `from_slice_*` constructors); downloads are readbacks
/// ([`crate::gpu::GpuContext::read_buffer`] and every `download_*`). Kernel parameters (the
/// small uniform structs each launch writes) are counted apart, in `param_writes`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransferStats {
    /// Tensor uploads (host → device).
    pub uploads: u64,
    /// Bytes uploaded.
    pub upload_bytes: u64,
    /// Readbacks (device → host).
    pub downloads: u64,
    /// Bytes read back.
    pub download_bytes: u64,
    /// Kernel-parameter (uniform) writes.
    pub param_writes: u64,
    /// Bytes of kernel parameters written.
    pub param_bytes: u64,
}

impl TransferStats {
    /// What happened between `earlier` (a snapshot taken before) and `self`.
    pub fn since(&self, earlier: &TransferStats) -> TransferStats {
        TransferStats {
            uploads: self.uploads.saturating_sub(earlier.uploads),
            upload_bytes: self.upload_bytes.saturating_sub(earlier.upload_bytes),
            downloads: self.downloads.saturating_sub(earlier.downloads),
            download_bytes: self.download_bytes.saturating_sub(earlier.download_bytes),
            param_writes: self.param_writes.saturating_sub(earlier.param_writes),
            param_bytes: self.param_bytes.saturating_sub(earlier.param_bytes),
        }
    }

    /// Uploads plus downloads (tensor data both ways, parameters not included).
    pub fn transfers(&self) -> u64 {
        self.uploads + self.downloads
    }
}

/// What the buffer pool of a context did and holds (see
/// [`GpuContext::pool_stats`](crate::gpu::GpuContext::pool_stats)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Buffers created because the pool had none of the size class (and usage) asked for.
    pub allocations: u64,
    /// Bytes of the buffers created.
    pub allocated_bytes: u64,
    /// Requests served by a pooled buffer.
    pub reuses: u64,
    /// Buffers idle in the pool, ready for reuse.
    pub idle_buffers: usize,
    /// Bytes of the idle buffers.
    pub idle_bytes: u64,
    /// Buffers freed while a command encoder that may use them is still open (reusable once
    /// it is submitted).
    pub quarantined_buffers: usize,
    /// Command buffers submitted by this context (one per launch outside a recording, one
    /// per recording, plus readbacks).
    pub submissions: u64,
}

/// Pool key: the size class in bytes and the buffer's usages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct PoolKey {
    pub size: u64,
    pub usage: wgpu::BufferUsages,
}

/// The size class of a request of `bytes`: powers of two up to 4 KiB (at least 16 bytes),
/// then multiples of an eighth of the power of two below (at most 12.5% unused); never above
/// `max` (a request above the class ceiling gets its own size, rounded to 4 bytes).
pub(crate) fn size_class(bytes: u64, max: u64) -> u64 {
    let bytes = bytes.max(16);
    let class = if bytes <= 4096 {
        bytes.next_power_of_two()
    } else {
        let step = 1u64 << (63 - bytes.leading_zeros() - 3);
        bytes.div_ceil(step).saturating_mul(step)
    };
    if class <= max {
        class
    } else {
        bytes.div_ceil(4).saturating_mul(4)
    }
}

#[derive(Default)]
pub(crate) struct Pool {
    free: HashMap<PoolKey, Vec<wgpu::Buffer>>,
    /// Freed while an encoder was open; reusable once it is submitted.
    pub quarantine: Vec<(PoolKey, wgpu::Buffer)>,
    stats: PoolStats,
}

impl Pool {
    pub fn take(&mut self, key: PoolKey) -> Option<wgpu::Buffer> {
        let buffer = self.free.get_mut(&key).and_then(Vec::pop)?;
        self.stats.reuses += 1;
        self.stats.idle_buffers -= 1;
        self.stats.idle_bytes -= key.size;
        Some(buffer)
    }

    pub fn put(&mut self, key: PoolKey, buffer: wgpu::Buffer) {
        self.stats.idle_buffers += 1;
        self.stats.idle_bytes += key.size;
        self.free.entry(key).or_default().push(buffer);
    }

    pub fn put_all(&mut self, buffers: Vec<(PoolKey, wgpu::Buffer)>) {
        for (key, buffer) in buffers {
            self.put(key, buffer);
        }
    }

    pub fn count_submission(&mut self) {
        self.stats.submissions += 1;
    }

    pub fn allocated(&mut self, key: PoolKey) {
        self.stats.allocations += 1;
        self.stats.allocated_bytes += key.size;
    }

    pub fn trim(&mut self) -> u64 {
        let bytes = self.stats.idle_bytes;
        self.free.clear();
        self.stats.idle_buffers = 0;
        self.stats.idle_bytes = 0;
        bytes
    }

    pub fn stats(&self) -> PoolStats {
        PoolStats {
            quarantined_buffers: self.quarantine.len(),
            ..self.stats
        }
    }
}

/// The open recording: the pending encoder and who opened it.
#[derive(Default)]
pub(crate) struct Recording {
    /// Launches of the open recording go here (created at the first one).
    pub encoder: Option<wgpu::CommandEncoder>,
    /// The encoder is a caller's ([`GpuContext::encode_into`]): never submitted by qfuse.
    pub external: bool,
    /// Nesting depth of `record` / `encode_into` (0: no recording).
    pub depth: usize,
    /// The thread that opened the recording (its error scopes cover the recording).
    pub owner: Option<ThreadId>,
    /// Kernel-parameter writes not yet issued (`Queue::write_buffer` lands at the next
    /// submission, so issuing them just before the launch that reads them is equivalent).
    pub writes: Vec<(wgpu::Buffer, Vec<u8>)>,
}

#[cfg(not(target_arch = "wasm32"))]
pub(crate) type PopFuture = Pin<Box<dyn Future<Output = Option<wgpu::Error>> + Send>>;
#[cfg(target_arch = "wasm32")]
pub(crate) type PopFuture = Pin<Box<dyn Future<Output = Option<wgpu::Error>>>>;

/// Shared by a context and its tensors (which return their buffers here when dropped).
pub(crate) struct Runtime {
    /// Adapter name and backend, for messages.
    pub name: String,
    pub rec: Mutex<Recording>,
    pub pool: Mutex<Pool>,
    pub transfers: Mutex<TransferStats>,
    /// Error scopes popped but not answered yet (never on native, where wgpu answers at
    /// once; on the web the answer comes later): checked at the next sync point.
    pub unanswered: Mutex<Vec<(String, PopFuture)>>,
    /// Largest buffer size (`max_buffer_size` and `max_storage_buffer_binding_size`).
    pub max_buffer: u64,
}

impl Runtime {
    pub fn new(name: String, max_buffer: u64) -> Self {
        Self {
            name,
            rec: Mutex::new(Recording::default()),
            pool: Mutex::new(Pool::default()),
            transfers: Mutex::new(TransferStats::default()),
            unanswered: Mutex::new(Vec::new()),
            max_buffer,
        }
    }

    /// The identity of this runtime (and of its context).
    pub fn id(&self) -> ContextId {
        ContextId(self as *const Runtime as usize)
    }

    /// `#id on ADAPTER`, for messages.
    pub fn describe(&self) -> String {
        format!("GpuContext {} on {}", self.id(), self.name)
    }

    /// Takes a pooled buffer of `key`, if one is idle.
    pub fn take(&self, key: PoolKey) -> Option<wgpu::Buffer> {
        lock(&self.pool).take(key)
    }

    /// Returns a buffer whose last user is gone: to quarantine while an encoder is open,
    /// else to the pool.
    pub fn release(&self, key: PoolKey, buffer: wgpu::Buffer) {
        let rec = lock(&self.rec);
        let mut pool = lock(&self.pool);
        if rec.depth > 0 {
            pool.quarantine.push((key, buffer));
        } else {
            pool.put(key, buffer);
        }
    }

    pub fn count_upload(&self, bytes: u64) {
        let mut t = lock(&self.transfers);
        t.uploads += 1;
        t.upload_bytes += bytes;
    }

    pub fn count_download(&self, bytes: u64) {
        let mut t = lock(&self.transfers);
        t.downloads += 1;
        t.download_bytes += bytes;
    }

    pub fn count_param(&self, bytes: u64) {
        let mut t = lock(&self.transfers);
        t.param_writes += 1;
        t.param_bytes += bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_round_up_by_at_most_an_eighth() {
        assert_eq!(size_class(0, u64::MAX), 16);
        assert_eq!(size_class(4, u64::MAX), 16);
        assert_eq!(size_class(17, u64::MAX), 32);
        assert_eq!(size_class(4096, u64::MAX), 4096);
        assert_eq!(size_class(4097, u64::MAX), 4608);
        for bytes in [
            5000u64,
            65_537,
            1 << 20,
            (1 << 20) + 4,
            123_456_788,
            3 << 30,
        ] {
            let c = size_class(bytes, u64::MAX);
            assert!(c >= bytes && c - bytes <= bytes / 8, "{bytes} -> {c}");
        }
        // Never above the device limit: then the exact size (rounded to 4 bytes).
        assert_eq!(size_class(4097, 4100), 4100);
        assert_eq!(size_class(4098, 4098), 4100);
    }
}
