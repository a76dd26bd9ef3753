//! [`GpuTensor`]: a storage buffer with a shape and an element type.

use ndarray::{ArrayD, IxDyn};

use crate::error::{Error, Result};
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
/// (`STORAGE | COPY_SRC | COPY_DST`), with its shape and element type.
///
/// The buffer holds at least 4 bytes (an empty tensor still has a bindable buffer).
#[derive(Debug, Clone)]
pub struct GpuTensor {
    buffer: wgpu::Buffer,
    shape: Vec<usize>,
    dtype: DType,
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

impl GpuTensor {
    fn from_bytes(ctx: &GpuContext, bytes: &[u8], shape: &[usize], dtype: DType) -> Result<Self> {
        let size = byte_size(shape, dtype)?;
        ctx.check_buffer_size(size)?;
        debug_assert_eq!(size as usize, bytes.len());
        let buffer = ctx.scoped("uploading a tensor", || {
            let buffer = ctx.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some("qfuse tensor"),
                size: size.max(4),
                usage: USAGE,
                mapped_at_creation: false,
            });
            if !bytes.is_empty() {
                ctx.queue().write_buffer(&buffer, 0, bytes);
            }
            buffer
        })?;
        Ok(Self {
            buffer,
            shape: shape.to_vec(),
            dtype,
        })
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

    /// A zero-filled tensor (also the way to allocate kernel outputs). Sizes are checked
    /// against the device limits before anything is allocated.
    pub fn zeros(ctx: &GpuContext, shape: &[usize], dtype: DType) -> Result<Self> {
        let size = byte_size(shape, dtype)?;
        ctx.check_buffer_size(size)?;
        let buffer = ctx.scoped("allocating a tensor", || {
            ctx.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some("qfuse tensor"),
                size: size.max(4),
                usage: USAGE,
                mapped_at_creation: false,
            })
        })?;
        Ok(Self {
            buffer,
            shape: shape.to_vec(),
            dtype,
        })
    }

    /// Wraps an existing buffer (it needs `STORAGE`, and `COPY_SRC` to be downloaded) of at
    /// least `shape.product() * 4` bytes.
    pub fn from_buffer(buffer: wgpu::Buffer, shape: &[usize], dtype: DType) -> Result<Self> {
        let size = byte_size(shape, dtype)?;
        if buffer.size() < size {
            return Err(Error::invalid(format!(
                "buffer of {} bytes is too small for a tensor of shape {shape:?} ({size} bytes)",
                buffer.size()
            )));
        }
        Ok(Self {
            buffer,
            shape: shape.to_vec(),
            dtype,
        })
    }

    /// The same buffer seen with another shape of the same element count.
    pub fn reshape(&self, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != self.len() {
            return Err(Error::shape("GpuTensor::reshape", &self.shape, shape));
        }
        Ok(Self {
            buffer: self.buffer.clone(),
            shape: shape.to_vec(),
            dtype: self.dtype,
        })
    }

    /// The buffer.
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
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
        let bytes = ctx
            .read_buffer_async(&self.buffer, self.size_bytes())
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
