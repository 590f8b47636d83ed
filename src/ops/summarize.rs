//! `summarize`: summarization with encoder-decoder models (BART, T5, ...), as the
//! `summarization` pipeline does it: 4-beam search and `max_new_tokens` 256 unless the model
//! says otherwise, `task_specific_params["summarization"]` (T5: the "summarize: " prefix,
//! `no_repeat_ngram_size`, `length_penalty`, `min_length`, `early_stopping`), the output decoded
//! without special tokens. Sources longer than the model's positions keep their first tokens
//! (the pipeline called with `truncation=True`).

use super::OpError;
use super::generation::task::{GenerationOptions, GenerationTask, Pipeline};
use crate::runtime::{ModelDir, SessionPool};

pub fn resolve(
    options: &GenerationOptions,
    model: &ModelDir,
    pool: &SessionPool,
) -> Result<GenerationTask, OpError> {
    GenerationTask::resolve(Pipeline::Summarization, options, model, pool)
}
