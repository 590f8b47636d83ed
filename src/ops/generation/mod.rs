//! The generation core: decoder loops over ONNX Runtime sessions with their KV cache.
//!
//! - [`model`]: the model shapes (decoder-only and encoder-decoder Optimum exports, with a
//!   cache or without one), one batched step over sequences in flight;
//! - [`logits`]: logits processors as `transformers` applies them;
//! - [`search`]: greedy and beam search, identical to `transformers`' `generate`, with
//!   continuous batching;
//! - [`shared_cross`]: encoder-decoder exports rewritten to hold one cross-attention cache per
//!   source row, shared by its beams.
//!
//! The generation operators (`generate`, `summarize`, `translate`) build on this.

pub mod chat;
pub mod logits;
pub mod model;
pub mod search;
pub mod shared_cross;
pub mod task;

pub use logits::{Processors, Sampling};
pub use model::{Batch, DecoderOnly, Model, Seq2Seq};
pub use search::{
    EarlyStopping, Finish, Hypothesis, Limits, Search, StopStrings, generate, generate_within,
};
