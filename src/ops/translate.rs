//! `translate`: translation with encoder-decoder models (Marian, T5, multilingual models), as
//! the `translation` pipeline does it: 4-beam search unless the model says otherwise, the
//! first `task_specific_params["translation_*"]` (T5: "translate English to German: "), and
//! for multilingual models the target language forced as the first token (`tgt_lang`).

use super::OpError;
use super::generation::task::{GenerationOptions, GenerationTask, Pipeline};
use crate::runtime::{ModelDir, SessionPool};

pub fn resolve(
    options: &GenerationOptions,
    model: &ModelDir,
    pool: &SessionPool,
) -> Result<GenerationTask, OpError> {
    GenerationTask::resolve(Pipeline::Translation, options, model, pool)
}
