//! [`GpuTensor`]: a storage buffer with a shape and an element type.

use std::sync::Arc;

use ndarray::{ArrayD, IxDyn};

use crate::error::{Error, Result};
use crate::gpu::runtime::{ContextId, PoolKey, Runtime};
use crate::gpu::GpuContext;

/// Element type of a [`GpuTensor`] (all 4 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// `f32`.
    F32,
    /// `i32`.
    I32,
    /// `u32`.
    U32,
}

impl DType {
    /// Bytes per element (4 for every type).
    pub const fn size(self) -> usize {
        4
    }
}

/// A dense row-major tensor in a GPU storage buffer
/// (`STORAGE | COPY_SRC | COPY_DST`), with its shape and element type, made on one
/// [`GpuContext`] (it remembers which: see [`GpuTensor::context_id`]).
///
/// The buffer holds at least 4 bytes (an empty tensor still has a bindable buffer) and may
/// be larger than the data (pooled buffers come in size classes). Clones and reshapes share
/// the buffer; when the last of them is dropped the buffer goes back to its context's pool
/// (a buffer from [`GpuTensor::from_buffer`] stays the caller's). So do not keep a clone of
/// [`GpuTensor::buffer`] past the tensor's life: the pool may hand it to another tensor.
#[derive(Clone)]
pub struct GpuTensor {
    storage: Arc<Storage>,
    shape: Vec<usize>,
    dtype: DType,
}

impl std::fmt::Debug for GpuTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuTensor")
            .field("shape", &self.shape)
            .field("dtype", &self.dtype)
            .field("context", &self.storage.rt.id())
            .finish_non_exhaustive()
    }
}

/// A tensor's buffer and where it goes back to.
struct Storage {
    buffer: wgpu::Buffer,
    /// `Some` for a pooled buffer (returned to the pool on drop).
    key: Option<PoolKey>,
    rt: Arc<Runtime>,
}

impl Drop for Storage {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            self.rt.release(key, self.buffer.clone());
        }
    }
}

fn byte_size(shape: &[usize], dtype: DType) -> Result<u64> {
    shape
        .iter()
        .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64))
        .ok_or_else(|| Error::invalid(format!("tensor of shape {shape:?} is too large")))
}

const USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

/// `Ok` when `buffer` has `usage`, else [`Error::MissingBufferUsage`] naming it and what it
/// is `for_what`.
pub(crate) fn require_usage(
    buffer: &wgpu::Buffer,
    usage: wgpu::BufferUsages,
    purpose: &'static str,
) -> Result<()> {
    if buffer.usage().contains(usage) {
        return Ok(());
    }
    let missing = match usage {
        wgpu::BufferUsages::STORAGE => "STORAGE",
        wgpu::BufferUsages::COPY_SRC => "COPY_SRC",
        wgpu::BufferUsages::COPY_DST => "COPY_DST",
        _ => "a needed usage",
    };
    Err(Error::MissingBufferUsage {
        missing,
        has: format!("{:?}", buffer.usage()),
        purpose,
    })
}

impl GpuTensor {
    fn pooled(
        ctx: &GpuContext,
        key: PoolKey,
        buffer: wgpu::Buffer,
        shape: &[usize],
        dtype: DType,
    ) -> Self {
        Self {
            storage: Arc::new(Storage {
                buffer,
                key: Some(key),
                rt: Arc::clone(ctx.runtime()),
            }),
            shape: shape.to_vec(),
            dtype,
        }
    }

    fn from_bytes(ctx: &GpuContext, bytes: &[u8], shape: &[usize], dtype: DType) -> Result<Self> {
        let size = byte_size(shape, dtype)?;
        ctx.check_buffer_size(size)?;
        debug_assert_eq!(size as usize, bytes.len());
        let (key, buffer) = ctx.acquire(USAGE, size, false)?;
        if !bytes.is_empty() {
            ctx.scoped("uploading a tensor", || {
                ctx.queue().write_buffer(&buffer, 0, bytes)
            })?;
        }
        ctx.runtime().count_upload(bytes.len() as u64);
        Ok(Self::pooled(ctx, key, buffer, shape, dtype))
    }

    /// Uploads an `f32` array (any memory layout; stored row-major).
    pub fn upload_f32(ctx: &GpuContext, x: &ArrayD<f32>) -> Result<Self> {
        let data = x.as_standard_layout();
        let slice = data.as_slice().unwrap_or(&[]);
        Self::from_bytes(ctx, bytemuck::cast_slice(slice), x.shape(), DType::F32)
    }

    /// Uploads an `i32` array (any memory layout; stored row-major).
    pub fn upload_i32(ctx: &GpuContext, x: &ArrayD<i32>) -> Result<Self> {
        let data = x.as_standard_layout();
        let slice = data.as_slice().unwrap_or(&[]);
        Self::from_bytes(ctx, bytemuck::cast_slice(slice), x.shape(), DType::I32)
    }

    /// Uploads `f32` values with a shape (their count must equal the shape's product).
    pub fn from_slice_f32(ctx: &GpuContext, data: &[f32], shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::shape(
                "GpuTensor::from_slice_f32",
                &[n],
                &[data.len()],
            ));
        }
        Self::from_bytes(ctx, bytemuck::cast_slice(data), shape, DType::F32)
    }

    /// Uploads `u32` values with a shape (their count must equal the shape's product).
    pub fn from_slice_u32(ctx: &GpuContext, data: &[u32], shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::shape(
                "GpuTensor::from_slice_u32",
                &[n],
                &[data.len()],
            ));
        }
        Self::from_bytes(ctx, bytemuck::cast_slice(data), shape, DType::U32)
    }

    /// A zero-filled tensor. Sizes are checked against the device limits before anything is
    /// allocated. The buffer comes from the context's pool when one of the size class is
    /// idle (then it is cleared: in the open recording if there is one, else by a staged
    /// write that lands before the next submission).
    pub fn zeros(ctx: &GpuContext, shape: &[usize], dtype: DType) -> Result<Self> {
        let size = byte_size(shape, dtype)?;
        ctx.check_buffer_size(size)?;
        let (key, buffer) = ctx.acquire(USAGE, size, true)?;
        Ok(Self::pooled(ctx, key, buffer, shape, dtype))
    }

    /// A tensor whose contents are unspecified (a pooled buffer keeps what its last user
    /// left; a new one is zero): for kernel outputs that the kernel writes in full. Sizes are
    /// checked as in [`GpuTensor::zeros`].
    pub fn uninit(ctx: &GpuContext, shape: &[usize], dtype: DType) -> Result<Self> {
        let size = byte_size(shape, dtype)?;
        ctx.check_buffer_size(size)?;
        let (key, buffer) = ctx.acquire(USAGE, size, false)?;
        Ok(Self::pooled(ctx, key, buffer, shape, dtype))
    }

    /// Wraps a caller's buffer, made on `ctx`'s device, of at least `shape.product() * 4`
    /// bytes. It needs `STORAGE` (kernels bind it); `COPY_SRC` to be downloaded and
    /// `COPY_DST` to be zero-filled are checked when they are used. The buffer stays the
    /// caller's: it never enters the pool.
    ///
    /// Errors: [`Error::MissingBufferUsage`] without `STORAGE`; [`Error::InvalidArgument`]
    /// for a buffer too small for the shape; [`Error::BufferTooLarge`] for one larger than the
    /// device can bind.
    pub fn from_buffer(
        ctx: &GpuContext,
        buffer: wgpu::Buffer,
        shape: &[usize],
        dtype: DType,
    ) -> Result<Self> {
        require_usage(&buffer, wgpu::BufferUsages::STORAGE, "bind it to a kernel")?;
        let size = byte_size(shape, dtype)?;
        if buffer.size() < size {
            return Err(Error::invalid(format!(
                "buffer of {} bytes is too small for a tensor of shape {shape:?} ({size} bytes)",
                buffer.size()
            )));
        }
        ctx.check_buffer_size(buffer.size())?;
        Ok(Self {
            storage: Arc::new(Storage {
                buffer,
                key: None,
                rt: Arc::clone(ctx.runtime()),
            }),
            shape: shape.to_vec(),
            dtype,
        })
    }

    /// The identity of the context the tensor was made on.
    pub fn context_id(&self) -> ContextId {
        self.storage.rt.id()
    }

    /// `GpuContext #id on ADAPTER` of the tensor's context, for messages.
    pub(crate) fn context_description(&self) -> String {
        self.storage.rt.describe()
    }

    /// The same buffer seen with another shape of the same element count.
    pub fn reshape(&self, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != self.len() {
            return Err(Error::shape("GpuTensor::reshape", &self.shape, shape));
        }
        Ok(Self {
            storage: Arc::clone(&self.storage),
            shape: shape.to_vec(),
            dtype: self.dtype,
        })
    }

    /// The buffer (bind it whole: it may be larger than [`GpuTensor::size_bytes`]). It
    /// belongs to the tensor: a clone kept after the tensor is dropped may be reused by the
    /// pool for another tensor.
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.storage.buffer
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// `true` when the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Size of the data in bytes (`len() * 4`).
    pub fn size_bytes(&self) -> u64 {
        (self.len() * self.dtype.size()) as u64
    }

    fn expect_dtype(&self, dtype: DType) -> Result<()> {
        if self.dtype != dtype {
            return Err(Error::invalid(format!(
                "tensor has dtype {:?}, expected {dtype:?}",
                self.dtype
            )));
        }
        Ok(())
    }

    async fn download_words_async(&self, ctx: &GpuContext) -> Result<Vec<u32>> {
        ctx.check_tensor("downloaded tensor", self)?;
        let bytes = ctx
            .read_buffer_async(self.buffer(), self.size_bytes())
            .await?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    fn to_array<T>(&self, data: Vec<T>) -> Result<ArrayD<T>> {
        ArrayD::from_shape_vec(IxDyn(&self.shape), data)
            .map_err(|e| Error::Gpu(format!("downloaded data does not fit the shape: {e}")))
    }

    /// Reads an `f32` tensor back (async core of [`GpuTensor::download_f32`]).
    pub async fn download_f32_async(&self, ctx: &GpuContext) -> Result<ArrayD<f32>> {
        self.expect_dtype(DType::F32)?;
        let words = self.download_words_async(ctx).await?;
        self.to_array(words.into_iter().map(f32::from_bits).collect())
    }

    /// Reads an `f32` tensor back, blocking until the GPU is done.
    pub fn download_f32(&self, ctx: &GpuContext) -> Result<ArrayD<f32>> {
        pollster::block_on(self.download_f32_async(ctx))
    }

    /// Reads an `i32` tensor back (async).
    pub async fn download_i32_async(&self, ctx: &GpuContext) -> Result<ArrayD<i32>> {
        self.expect_dtype(DType::I32)?;
        let words = self.download_words_async(ctx).await?;
        self.to_array(words.into_iter().map(|w| w as i32).collect())
    }

    /// Reads an `i32` tensor back, blocking until the GPU is done.
    pub fn download_i32(&self, ctx: &GpuContext) -> Result<ArrayD<i32>> {
        pollster::block_on(self.download_i32_async(ctx))
    }

    /// Reads a `u32` tensor back, blocking until the GPU is done.
    pub fn download_u32(&self, ctx: &GpuContext) -> Result<ArrayD<u32>> {
        self.expect_dtype(DType::U32)?;
        let words = pollster::block_on(self.download_words_async(ctx))?;
        self.to_array(words)
    }
}
