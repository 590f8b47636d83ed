//! The files in `schemas/`, generated from the config types so they cannot drift from the code.

use crate::ops::{Manifest, TASKS};
use crate::spec::Pipeline;

/// (file name, contents) of every generated schema file.
pub fn generate() -> Vec<(&'static str, String)> {
    let pretty =
        |v: serde_json::Value| serde_json::to_string_pretty(&v).expect("schema is JSON") + "\n";
    let tasks: Vec<serde_json::Value> = TASKS
        .iter()
        .map(|t| {
            serde_json::json!({
                "task": t.name,
                "transformers_pipeline": t.hf_task,
                "inputs": t.inputs,
                "output_arrow_type": t.output,
            })
        })
        .collect();
    vec![
        (
            "pipeline.schema.json",
            pretty(schemars::schema_for!(Pipeline).to_value()),
        ),
        (
            "operator.schema.json",
            pretty(schemars::schema_for!(Manifest).to_value()),
        ),
        ("tasks.json", pretty(serde_json::Value::Array(tasks))),
    ]
}

/// Writes the schema files into `dir`.
pub fn write(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, text) in generate() {
        std::fs::write(dir.join(name), text)?;
    }
    Ok(())
}
