//! Data sets for training and evaluating models end to end.
//!
//! - [`digits`]: the UCI handwritten digits (8×8, 1,437 train / 360 test images, CC BY 4.0),
//!   shipped in the repository and embedded in the library, scaled and resized to the 1×28×28
//!   inputs of NNI's Mnist network, with seeded shuffled batches.

pub mod digits;
