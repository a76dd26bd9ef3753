//! Reading and writing tensors (safetensors state dicts, conformance case files), files
//! ([`mod@file`]: regular-file reads, all-or-nothing writes) and showing input text in messages
//! ([`text`]).

pub mod case;
pub mod file;
pub mod state_dict;
pub mod text;

pub use case::Case;
pub use state_dict::{load_state_dict, RawTensor, StateDict};
