//! `generate`: text generation with decoder-only models (GPT-2, Llama-family), as the
//! `text-generation` pipeline does it: the prompt tokenized with the tokenizer's special
//! tokens, a long prompt keeping its last tokens (`handle_long_generation="hole"`), the output
//! decoded with `clean_up_tokenization_spaces` and, by default, after the prompt
//! (`return_full_text`).
//!
//! Deviation: the pipeline samples by default (`do_sample=True, temperature=0.7`); ferry does
//! not sample yet and runs greedy search (or beam search with `num_beams`).

use super::OpError;
use super::generation::task::{GenerationOptions, GenerationTask, Pipeline};
use crate::runtime::{ModelDir, SessionPool};

pub fn resolve(
    options: &GenerationOptions,
    model: &ModelDir,
    pool: &SessionPool,
) -> Result<GenerationTask, OpError> {
    let pipeline = Pipeline::TextGeneration {
        return_full_text: options.return_full_text.unwrap_or(true),
    };
    GenerationTask::resolve(pipeline, options, model, pool)
}
