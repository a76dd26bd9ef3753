//! GPU launchers, one module per shader family, mirroring [`crate::reference`]. Each takes a
//! [`GpuContext`] and [`GpuTensor`]s, validates its inputs with the same checks (and error
//! messages) as the CPU reference, records its dispatches and returns new tensors without
//! waiting for the GPU; data stays on the device until you download it. Every launcher that
//! returns tensors (or a struct of them) also has an `_into` form that writes into tensors the
//! caller owns, each checked by [`check_output`] before anything is launched; the allocating
//! form is a thin wrapper over the same body.
//!
//! - [`fake_quant`]: fake quantization per tensor / per channel, forward, mask, backward.
//! - [`observer`]: min/max reduction and qparams (scale, zero point, 1/scale) on the GPU.
//! - [`activation`]: ReLU / ReLU6 forward and backward.
//! - [`fold`]: BatchNorm folding into conv (any rank), transposed conv and linear weights.
//! - [`batch_norm`]: BatchNorm2d statistics, normalize (+ activation), backward.
//! - [`conv_bn`]: fused conv+BN+activation eval forward, ConvBn2d QAT forward / backward,
//!   and the unfused chains.
//! - [`graph_ops`]: the float ops of imported graphs: ONNX pooling (padded, overlapping,
//!   average), global average pooling, broadcasting add / mul, concat, QuantizeLinear →
//!   DequantizeLinear, bit-exact with their references.
//! - [`int8`]: integer (deployed int8) quantize / dequantize, conv2d, linear, max pooling and
//!   add on packed codes, bit-exact with [`crate::reference::int8`].
//! - [`int8_pool`]: integer max pooling with padding, global average pooling and
//!   elementwise code tables (HardSwish, ...), bit-exact with [`crate::reference::int8`].
//! - [`train`]: max pooling, linear and `log_softmax` backward, NLL loss (mean) and its
//!   backward, top-1 correct count, and the SGD step, mirroring [`crate::reference::train`].

pub mod activation;
pub mod batch_norm;
pub mod conv2d;
pub mod conv_bn;
pub mod fake_quant;
pub mod fold;
pub mod graph_ops;
pub mod int8;
pub mod int8_pool;
pub mod linear;
pub mod observer;
pub mod pool;
#[cfg(test)]
mod portability;
pub mod train;

pub use fake_quant::GpuQParams;
pub use fold::GpuBatchNorm;

use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor};

/// Workgroup size of the 1-D elementwise kernels (the `WG` override constant).
pub const WORKGROUP_SIZE: u32 = 256;

/// Override constants passed to every elementwise kernel.
pub(crate) const WG_CONSTANTS: &[(&str, f64)] = &[("WG", WORKGROUP_SIZE as f64)];

/// A workgroup size of the kernels that give each row (a channel block) its own workgroups,
/// with the `WG` override constants that build it: the size the grid is computed with and
/// the size the pipeline runs are one value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RowWorkgroup {
    /// Invocations per workgroup.
    pub size: u32,
    /// The `WG` override constants for `size`.
    pub constants: &'static [(&'static str, f64)],
}

/// Workgroups of 64 ([`row_workgroup`]).
pub(crate) const SMALL_ROW_WORKGROUP: RowWorkgroup = RowWorkgroup {
    size: 64,
    constants: &[("WG", 64.0)],
};

/// Workgroups of [`WORKGROUP_SIZE`] ([`row_workgroup`]).
pub(crate) const FULL_ROW_WORKGROUP: RowWorkgroup = RowWorkgroup {
    size: WORKGROUP_SIZE,
    constants: WG_CONSTANTS,
};

/// The workgroup for a row of `invocations` invocations in the kernels that give each row its
/// own workgroups (fake quant's and the BN fold's rows kernels): of [`SMALL_ROW_WORKGROUP`]
/// and [`FULL_ROW_WORKGROUP`], the one that leaves the fewest of the row's invocations idle,
/// the larger on a tie. A 3×3 weight row of 512 input channels is 288 invocations of the fake
/// quant's mask kernel: two workgroups of 256 leave 224 idle, five of 64 leave 32 (lavapipe,
/// 512×4,608 weights: 4.3 → 3.6 ms).
pub(crate) fn row_workgroup(invocations: usize) -> RowWorkgroup {
    let idle = |wg: RowWorkgroup| {
        let size = wg.size as usize;
        invocations.div_ceil(size) * size - invocations
    };
    if idle(SMALL_ROW_WORKGROUP) < idle(FULL_ROW_WORKGROUP) {
        SMALL_ROW_WORKGROUP
    } else {
        FULL_ROW_WORKGROUP
    }
}

/// An element count as the `u32` the shaders index with.
pub(crate) fn to_u32(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n).map_err(|_| {
        Error::invalid(format!(
            "{what} = {n} exceeds what a GPU kernel can index (u32)"
        ))
    })
}

/// Grid for `n` elements with [`WORKGROUP_SIZE`] threads per workgroup.
pub(crate) fn grid(ctx: &GpuContext, n: usize) -> Result<[u32; 3]> {
    ctx.grid_1d(n, WORKGROUP_SIZE)
}

/// `Err(ShapeMismatch)` unless `t` has shape `expected`.
pub(crate) fn expect_shape(context: &str, expected: &[usize], t: &GpuTensor) -> Result<()> {
    if t.shape() != expected {
        return Err(Error::shape(context, expected, t.shape()));
    }
    Ok(())
}

/// The output of a launcher: the caller's `given` tensor (its `_into` form) after
/// [`check_output`], else a new one from the pool whose contents the kernel overwrites in
/// full ([`GpuTensor::uninit`]).
pub(crate) fn output(
    ctx: &GpuContext,
    what: &str,
    given: Option<&GpuTensor>,
    shape: &[usize],
    dtype: crate::gpu::DType,
    inputs: &[&GpuTensor],
) -> Result<GpuTensor> {
    match given {
        Some(out) => {
            check_output(ctx, what, out, shape, dtype, inputs)?;
            Ok(out.clone())
        }
        None => GpuTensor::uninit(ctx, shape, dtype),
    }
}

/// The one check of a caller-owned output tensor (every launcher's `_into` form): made on
/// `ctx`, of shape `shape` and type `dtype`, with a buffer of its own (not one of `inputs`':
/// the kernel reads those while it writes this one).
///
/// Errors: [`Error::ContextMismatch`], [`Error::ShapeMismatch`], [`Error::InvalidArgument`]
/// (wrong dtype, shared buffer), each naming `what`.
pub fn check_output(
    ctx: &GpuContext,
    what: &str,
    out: &GpuTensor,
    shape: &[usize],
    dtype: crate::gpu::DType,
    inputs: &[&GpuTensor],
) -> Result<()> {
    ctx.check_tensor(what, out)?;
    expect_shape(what, shape, out)?;
    if out.dtype() != dtype {
        return Err(Error::invalid(format!(
            "{what} must be a {dtype:?} tensor, got {:?}",
            out.dtype()
        )));
    }
    if inputs.iter().any(|t| t.buffer() == out.buffer()) {
        return Err(Error::invalid(format!(
            "{what} must not share its buffer with an input or another output"
        )));
    }
    Ok(())
}

/// `Err` unless `t` holds `f32`.
pub(crate) fn expect_f32(what: &str, t: &GpuTensor) -> Result<()> {
    if t.dtype() != crate::gpu::DType::F32 {
        return Err(Error::invalid(format!(
            "{what} must be an f32 tensor, got {:?}",
            t.dtype()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn row_workgroup_leaves_the_fewest_idle() {
        // A 3x3 weight row of 512 channels in the fake quant mask kernel: 288 invocations.
        assert_eq!(row_workgroup(288), SMALL_ROW_WORKGROUP);
        assert_eq!(row_workgroup(36), SMALL_ROW_WORKGROUP);
        assert_eq!(row_workgroup(1), SMALL_ROW_WORKGROUP);
        // Ties (whole workgroups of both, or the same idle count) take the larger.
        assert_eq!(row_workgroup(256), FULL_ROW_WORKGROUP);
        assert_eq!(row_workgroup(1024), FULL_ROW_WORKGROUP);
        assert_eq!(row_workgroup(250), FULL_ROW_WORKGROUP);
        for wg in [SMALL_ROW_WORKGROUP, FULL_ROW_WORKGROUP] {
            assert_eq!(wg.constants, &[("WG", f64::from(wg.size))]);
        }
    }

    fn shader_files() -> Vec<PathBuf> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("shaders");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .expect("shaders/ exists")
            .map(|e| e.expect("readable entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "wgsl"))
            .collect();
        files.sort();
        files
    }

    /// A shader's source as its launcher composes it: the `shaders/` files named by its
    /// `// requires: FILE` lines, in order, then the shader itself.
    fn composed_source(path: &std::path::Path) -> String {
        let src = std::fs::read_to_string(path).expect("readable shader");
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("shaders");
        let mut out = String::new();
        for line in src.lines() {
            if let Some(rest) = line.trim_start().strip_prefix("// requires:") {
                let file = rest
                    .split_whitespace()
                    .next()
                    .expect("a file after requires:");
                out.push_str(
                    &std::fs::read_to_string(dir.join(file))
                        .unwrap_or_else(|e| panic!("{}: requires {file}: {e}", path.display())),
                );
            }
        }
        out.push_str(&src);
        out
    }

    /// The shared WGSL library files validate on their own (functions only).
    #[test]
    fn shader_library_validates_with_naga() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("shaders/lib");
        for entry in std::fs::read_dir(dir).expect("shaders/lib exists") {
            let path = entry.expect("readable entry").path();
            let src = composed_source(&path);
            let module = naga::front::wgsl::parse_str(&src)
                .unwrap_or_else(|e| panic!("{}: {}", path.display(), e.emit_to_string(&src)));
            naga::valid::Validator::new(
                naga::valid::ValidationFlags::all(),
                naga::valid::Capabilities::all(),
            )
            .validate(&module)
            .unwrap_or_else(|e| panic!("{}: {}", path.display(), e.emit_to_string(&src)));
        }
    }

    /// Every shader (with the library files it requires) parses and validates with naga,
    /// with no adapter needed.
    #[test]
    fn every_shader_validates_with_naga() {
        let files = shader_files();
        assert!(files.len() >= 4, "expected the shaders, found {files:?}");
        for path in files {
            let src = composed_source(&path);
            let module = naga::front::wgsl::parse_str(&src).unwrap_or_else(|e| {
                panic!("{}: {}", path.display(), e.emit_to_string(&src));
            });
            naga::valid::Validator::new(
                naga::valid::ValidationFlags::all(),
                naga::valid::Capabilities::all(),
            )
            .validate(&module)
            .unwrap_or_else(|e| {
                panic!("{}: {}", path.display(), e.emit_to_string(&src));
            });
            assert!(
                module
                    .entry_points
                    .iter()
                    .any(|ep| ep.stage == naga::ShaderStage::Compute),
                "{}: no compute entry point",
                path.display()
            );
        }
    }

    /// Every shader opens with a header comment that names each binding it declares as
    /// `@group(G) @binding(B)` and states its dispatch shape.
    #[test]
    fn every_shader_documents_its_bindings() {
        for path in shader_files() {
            let src = std::fs::read_to_string(&path).expect("readable shader");
            let header: String = src
                .lines()
                .take_while(|l| l.trim_start().starts_with("//") || l.trim().is_empty())
                .collect::<Vec<_>>()
                .join("\n");
            assert!(
                header.lines().count() >= 3,
                "{}: missing header comment",
                path.display()
            );
            assert!(
                header.contains("Bindings") || header.contains("bindings"),
                "{}: the header must list the bindings",
                path.display()
            );
            assert!(
                header.contains("Dispatch") || header.contains("dispatch"),
                "{}: the header must state the dispatch shape",
                path.display()
            );
            let code: String = src
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            let mut declared = 0;
            for (pos, _) in code.match_indices("@group(") {
                let rest = &code[pos..];
                let end = rest.find(" var").unwrap_or(rest.len());
                let decl = rest[..end].trim();
                assert!(
                    header.contains(decl),
                    "{}: binding `{decl}` is not described in the header",
                    path.display()
                );
                declared += 1;
            }
            assert!(declared > 0, "{}: no bindings", path.display());
        }
    }
}
