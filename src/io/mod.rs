//! Reading and writing tensors: safetensors state dicts and conformance case files.

pub mod case;
pub mod state_dict;

pub use case::Case;
pub use state_dict::{load_state_dict, RawTensor, StateDict};
