//! Static descriptions of shaders and kernels (entry points with their bind-group layouts),
//! and the compiled, cached form the context hands out.

/// A WGSL source file, embedded with `include_str!`.
#[derive(Debug)]
pub struct Shader {
    /// A unique name (the file stem, e.g. `fake_quant`); the cache key of the shader module.
    pub name: &'static str,
    /// The WGSL source.
    pub source: &'static str,
}

/// How a shader sees one buffer binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BindingType {
    /// `var<uniform>`.
    Uniform,
    /// `var<storage, read>`.
    ReadOnlyStorage,
    /// `var<storage, read_write>`.
    Storage,
}

/// One binding of group 0: its `@binding` index and type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Binding {
    /// The `@binding(N)` index.
    pub index: u32,
    /// How the shader sees it.
    pub ty: BindingType,
}

impl Binding {
    /// A `var<uniform>` at `@binding(index)`.
    pub const fn uniform(index: u32) -> Self {
        Self {
            index,
            ty: BindingType::Uniform,
        }
    }
    /// A `var<storage, read>` at `@binding(index)`.
    pub const fn read(index: u32) -> Self {
        Self {
            index,
            ty: BindingType::ReadOnlyStorage,
        }
    }
    /// A `var<storage, read_write>` at `@binding(index)`.
    pub const fn read_write(index: u32) -> Self {
        Self {
            index,
            ty: BindingType::Storage,
        }
    }
}

/// One compute entry point and the bindings (all in group 0) it uses, in the order the
/// buffers are passed to [`crate::gpu::Launch::buffers`].
#[derive(Debug)]
pub struct Kernel {
    /// The shader that holds the entry point.
    pub shader: &'static Shader,
    /// The `@compute` function's name.
    pub entry_point: &'static str,
    /// Group-0 bindings, in launch order. The explicit bind-group layout is built from this
    /// list (it may name bindings other entry points of the same shader do not use).
    pub bindings: &'static [Binding],
}

/// A compiled compute pipeline with its bind-group layout (group 0), as cached by the
/// context.
#[derive(Debug)]
pub struct Pipeline {
    /// The pipeline.
    pub pipeline: wgpu::ComputePipeline,
    /// The layout of bind group 0.
    pub bind_group_layout: wgpu::BindGroupLayout,
}

/// Cache key: shader name, entry point, bindings, override constants (name, value bits).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct PipelineKey {
    pub shader: &'static str,
    pub entry_point: &'static str,
    pub bindings: Vec<Binding>,
    pub constants: Vec<(String, u64)>,
}

impl PipelineKey {
    pub fn new(kernel: &Kernel, constants: &[(&str, f64)]) -> Self {
        Self {
            shader: kernel.shader.name,
            entry_point: kernel.entry_point,
            bindings: kernel.bindings.to_vec(),
            constants: constants
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_bits()))
                .collect(),
        }
    }
}
