//! The sizes qfuse refuses to go beyond, so that hostile or mistaken input gets a clear
//! [`Error::TooLarge`] instead of an allocation that aborts the
//! process. Every size computed from input is computed with checked arithmetic and compared
//! with these before anything is allocated.

/// The largest file qfuse reads (state dicts, case files, integer models): 4 GiB. The size
/// is known from the file's metadata before reading.
pub const MAX_INPUT_FILE_BYTES: u64 = 4 << 30;

/// The most elements of one tensor an operation computes or allocates (an output, an im2col
/// buffer): 2^28 (1 GiB of f32).
pub const MAX_TENSOR_ELEMENTS: usize = 1 << 28;

/// The largest conv / conv-transpose setting (stride, padding, dilation, output padding):
/// 2^24. With inputs of at most [`MAX_TENSOR_ELEMENTS`] elements, every coordinate a GPU
/// kernel forms (padded extent, the reach of the last tap, the int8 kernels' overhang) then
/// fits its 32-bit signed arithmetic: the shared geometry check refuses first, so both
/// backends refuse the same settings with the same message. The GPU launchers also run
/// [`Conv2dParams::check_kernel_coordinates`](crate::ops::Conv2dParams::check_kernel_coordinates),
/// which cannot fail within these limits (its unit test shows it) and keeps a raised limit
/// from silently overflowing a kernel's coordinates.
pub const MAX_CONV_SETTING: usize = 1 << 24;

/// `qfuse demo --batch`: at most this many images per batch.
pub const MAX_DEMO_BATCH: usize = 4096;

/// `qfuse demo --calibration-batches`: at most this many calibration batches.
pub const MAX_DEMO_CALIBRATION_BATCHES: usize = 256;

/// `qfuse demo --runs`: at most this many timed runs per model.
pub const MAX_DEMO_RUNS: usize = 1000;

/// `qfuse demo --epochs` and `--qat-epochs`: at most this many epochs.
pub const MAX_DEMO_EPOCHS: usize = 1000;

use crate::error::{Error, Result};

/// The element count of `shape`, computed with checked arithmetic; [`Error::TooLarge`]
/// (naming `what`) when it overflows or exceeds [`MAX_TENSOR_ELEMENTS`]. Every op calls this
/// (through its geometry function) for what it allocates, before allocating.
pub fn check_elements(what: &str, shape: &[usize]) -> Result<usize> {
    let n = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    match n {
        Some(n) if n <= MAX_TENSOR_ELEMENTS => Ok(n),
        _ => Err(Error::TooLarge {
            what: format!("{what} {shape:?}"),
            size: n.map_or(u64::MAX, |n| n as u64),
            limit: MAX_TENSOR_ELEMENTS as u64,
            unit: "elements",
        }),
    }
}
