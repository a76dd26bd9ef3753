//! The sizes qfuse refuses to go beyond, so that hostile or mistaken input gets a clear
//! [`Error::TooLarge`](crate::Error::TooLarge) instead of an allocation that aborts the
//! process. Every size computed from input is computed with checked arithmetic and compared
//! with these before anything is allocated.

/// The largest file qfuse reads (state dicts, case files, integer models): 4 GiB. The size
/// is known from the file's metadata before reading.
pub const MAX_INPUT_FILE_BYTES: u64 = 4 << 30;

/// The most elements of one tensor an operation computes or allocates (an output, an im2col
/// buffer): 2^28 (1 GiB of f32).
pub const MAX_TENSOR_ELEMENTS: usize = 1 << 28;

/// `qfuse demo --batch`: at most this many images per batch.
pub const MAX_DEMO_BATCH: usize = 4096;

/// `qfuse demo --calibration-batches`: at most this many calibration batches.
pub const MAX_DEMO_CALIBRATION_BATCHES: usize = 256;

/// `qfuse demo --runs`: at most this many timed runs per model.
pub const MAX_DEMO_RUNS: usize = 1000;
