//! Reading a pipeline file and reporting every problem in it at once, each with its line.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use super::locate::{Locations, Position};
use super::yaml::{self, Value};
use super::{DeadLetter, Delivery, OnError, Pipeline, Sink, Source, Step};

/// One problem in a file, with where it is.
#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub position: Option<Position>,
    /// Dotted path of the offending value, e.g. `steps[1].operator`; empty for the whole file.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(p) = self.position {
            write!(f, ":{}:{}", p.line, p.column)?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in a file. Displayed one per line.
#[derive(Debug, Clone, Default)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

/// A parsed pipeline with what is needed to point at its lines later (at plan time).
#[derive(Debug, Clone)]
pub struct LoadedPipeline {
    pub file: PathBuf,
    pub pipeline: Pipeline,
    pub locations: Locations,
}

impl LoadedPipeline {
    /// A diagnostic about the value at `path` in this file.
    pub fn diagnostic(&self, path: &str, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            file: self.file.clone(),
            position: self.locations.find(path),
            path: path.to_string(),
            message: message.into(),
        }
    }
}

/// Reads and checks `file`: YAML syntax, unknown or missing keys, wrong types, and the shape of
/// each step. Reports every problem found, not just the first.
pub fn load_pipeline(file: &Path) -> Result<LoadedPipeline, Diagnostics> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        Diagnostics(vec![Diagnostic {
            file: file.to_path_buf(),
            position: None,
            path: String::new(),
            message: format!("cannot read pipeline file: {e}"),
        }])
    })?;
    parse_pipeline(file, &text)
}

/// Like [`load_pipeline`] on text already read; `file` names it in messages, and its directory
/// is what relative paths in it are relative to.
pub fn parse_pipeline(file: &Path, text: &str) -> Result<LoadedPipeline, Diagnostics> {
    let (root, locations) = match yaml::parse(text) {
        Ok(parsed) => parsed,
        Err(e) => {
            return Err(Diagnostics(vec![Diagnostic {
                file: file.to_path_buf(),
                position: e.position,
                path: String::new(),
                message: format!("invalid YAML: {}", e.message),
            }]));
        }
    };
    let mut cx = Checker {
        file: file.to_path_buf(),
        locations,
        found: Vec::new(),
    };
    let Value::Map(map) = root else {
        cx.report(
            "",
            "a pipeline must be a mapping with keys name, source, steps and sink",
        );
        return Err(Diagnostics(cx.found));
    };

    let mut name = None;
    let mut description = None;
    let mut source = None;
    let mut steps = Vec::new();
    let mut sink = None;
    let mut on_error = None;
    let mut dead_letter = None;
    let mut delivery = None;
    for (key, value) in map {
        match key.as_str() {
            "name" => name = cx.typed::<String>("name", value),
            "description" => description = cx.typed::<String>("description", value),
            "source" => source = cx.typed::<Source>("source", value),
            "sink" => sink = cx.typed::<Sink>("sink", value),
            "on_error" => on_error = cx.typed::<OnError>("on_error", value),
            "dead_letter" => {
                dead_letter = cx.typed::<DeadLetter>("dead_letter", value)
            }
            "delivery" => delivery = cx.typed::<Delivery>("delivery", value),
            "steps" => match value {
                Value::Seq(items) => {
                    for (i, item) in items.into_iter().enumerate() {
                        let path = format!("steps[{i}]");
                        if let Some(step) = cx.typed::<Step>(&path, item) {
                            cx.check_step(&path, &step);
                            steps.push(step);
                        }
                    }
                }
                Value::Null => {}
                _ => cx.report("steps", "steps must be a list"),
            },
            other => cx.report(
                other,
                format!(
                    "unknown key `{other}`; a pipeline has name, description, source, steps, sink, on_error, dead_letter and delivery"
                ),
            ),
        }
    }
    for (key, present) in [
        ("name", name.is_some()),
        ("source", source.is_some()),
        ("sink", sink.is_some()),
    ] {
        if !present && !cx.found.iter().any(|d| d.path.starts_with(key)) {
            cx.report("", format!("missing required key `{key}`"));
        }
    }
    // Secrets come from the environment: `${NAME}` in a Kafka property value.
    if let Some(Source::Kafka(k)) = &mut source {
        cx.expand_env("source.kafka.properties", &mut k.properties);
    }
    if let Some(Sink::Kafka(k)) = &mut sink {
        cx.expand_env("sink.kafka.properties", &mut k.properties);
    }
    if let Some(DeadLetter::Kafka(k)) = &mut dead_letter {
        cx.expand_env("dead_letter.kafka.properties", &mut k.properties);
    }
    match (name, source, sink) {
        (Some(name), Some(source), Some(sink)) if cx.found.is_empty() => {
            let mut pipeline = Pipeline {
                name,
                description,
                source,
                steps,
                sink,
                on_error,
                dead_letter,
                delivery: delivery.unwrap_or_default(),
            };
            pipeline.resolve_paths(cx.file.parent().unwrap_or(Path::new("")));
            Ok(LoadedPipeline {
                file: cx.file,
                pipeline,
                locations: cx.locations,
            })
        }
        _ => Err(Diagnostics(cx.found)),
    }
}

/// `value` with each `${NAME}` replaced by the environment variable NAME (`$${` is a literal
/// `${`), or the first variable that is not set.
pub fn expand_env(value: &str) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        if let Some(literal) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = literal;
        } else if let Some(name_on) = after.strip_prefix("${") {
            let end = name_on
                .find('}')
                .ok_or_else(|| "`${` without a closing `}`".to_string())?;
            let name = &name_on[..end];
            let v = std::env::var(name)
                .map_err(|_| format!("environment variable {name} is not set"))?;
            out.push_str(&v);
            rest = &name_on[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Deserializes `value`, found at the dotted path `prefix` of a file. On failure returns the
/// path of the offending value (for an unknown key, the key itself rather than its parent) and
/// serde's message, so that the caller can point at its line.
pub fn deserialize_at<T: DeserializeOwned>(
    prefix: &str,
    value: Value,
) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
        let inner = e.path().to_string();
        let mut path = prefix.to_string();
        if inner != "." && !inner.is_empty() {
            if !inner.starts_with('[') && !path.is_empty() {
                path.push('.');
            }
            path.push_str(&inner);
        }
        let message = e.into_inner().to_string();
        if let Some(field) = message
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split('`').next())
            && path != field
            && !path.ends_with(&format!(".{field}"))
        {
            path = if path.is_empty() {
                field.to_string()
            } else {
                format!("{path}.{field}")
            };
        }
        (path, message)
    })
}

struct Checker {
    file: PathBuf,
    locations: Locations,
    found: Vec<Diagnostic>,
}

impl Checker {
    /// Expands `${NAME}` in every value of a properties map (see [`expand_env`]); the message of
    /// a failure names the variable, never a value.
    fn expand_env(
        &mut self,
        path: &str,
        properties: &mut std::collections::BTreeMap<String, String>,
    ) {
        for (key, value) in properties.iter_mut() {
            match expand_env(value) {
                Ok(v) => *value = v,
                Err(e) => self.report(&format!("{path}.{key}"), e),
            }
        }
    }

    fn report(&mut self, path: &str, message: impl Into<String>) {
        self.found.push(Diagnostic {
            file: self.file.clone(),
            position: self.locations.find(path),
            path: path.to_string(),
            message: message.into(),
        });
    }

    /// Deserializes one section, turning a serde error into a located diagnostic.
    fn typed<T: DeserializeOwned>(&mut self, path: &str, value: Value) -> Option<T> {
        match deserialize_at(path, value) {
            Ok(v) => Some(v),
            Err((at, message)) => {
                self.report(&at, message);
                None
            }
        }
    }

    fn check_step(&mut self, path: &str, step: &Step) {
        match (&step.sql, &step.operator) {
            (Some(_), Some(_)) => self.report(
                path,
                "a step is either `sql` or `operator`, not both; split it into two steps",
            ),
            (None, None) => self.report(path, "a step needs `sql` or `operator`"),
            (Some(sql), None) => {
                if sql.trim().is_empty() {
                    self.report(&format!("{path}.sql"), "empty SQL");
                }
                if !step.inputs.is_empty() || step.output.is_some() {
                    self.report(
                        path,
                        "`inputs` and `output` belong to operator steps; a SQL step names its columns in SQL",
                    );
                }
            }
            (None, Some(_)) => {
                if step.inputs.is_empty() {
                    self.report(
                        &format!("{path}.operator"),
                        "an operator step needs `inputs`: the column(s) to run the operator over",
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Secrets stay out of pipeline files: `${NAME}` in a Kafka property is the environment's,
    /// and an unset one is reported by name and position, never with a value.
    #[test]
    fn kafka_properties_take_secrets_from_the_environment() {
        let home = std::env::var("HOME").unwrap();
        let text = "name: t\nsource:\n  kafka:\n    brokers: b:9092\n    topics: [t]\n    group_id: g\n    properties:\n      sasl.username: ${HOME}\n      sasl.password: x$${y}\nsink:\n  rolling_parquet:\n    dir: out\n";
        let p = parse_pipeline(Path::new("p.yaml"), text).unwrap();
        let Source::Kafka(k) = &p.pipeline.source else {
            panic!()
        };
        assert_eq!(k.properties["sasl.username"], home);
        assert_eq!(k.properties["sasl.password"], "x${y}");

        let text = text.replace("${HOME}", "${FERRY_SURELY_UNSET_SECRET_17}");
        let err = parse_pipeline(Path::new("p.yaml"), &text)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("p.yaml:8:7: source.kafka.properties.sasl.username: environment variable FERRY_SURELY_UNSET_SECRET_17 is not set"),
            "{err}"
        );
        assert!(expand_env("${OPEN").is_err());
        assert_eq!(expand_env("a$b").unwrap(), "a$b");
    }

    #[test]
    fn reports_every_problem_with_lines() {
        let text = "name: t\nsource:\n  parquet:\n    path: a.parquet\n    colour: red\nsteps:\n  - operator: x\n  - sql: SELECT 1\n    operator: y\nsink:\n  parquet:\n    path: 5\n    compression: lzma\nextra: 1\n";
        let err = parse_pipeline(Path::new("p.yaml"), text).unwrap_err();
        let lines: Vec<String> = err.0.iter().map(|d| d.to_string()).collect();
        let all = lines.join("\n");
        assert!(
            all.contains("p.yaml:5:5: source.parquet.colour: unknown field `colour`"),
            "{all}"
        );
        assert!(
            all.contains("p.yaml:7:5: steps[0].operator: an operator step needs `inputs`"),
            "{all}"
        );
        assert!(
            all.contains("p.yaml:8:5: steps[1]: a step is either `sql` or `operator`"),
            "{all}"
        );
        assert!(
            all.contains("p.yaml:12:5: sink.parquet.path: invalid type: integer `5`"),
            "{all}"
        );
        assert!(all.contains("p.yaml:14:1: extra: unknown key"), "{all}");
    }

    #[test]
    fn syntax_errors_have_a_position() {
        let err = parse_pipeline(Path::new("p.yaml"), "name: [unclosed\nsource: 1\n").unwrap_err();
        assert_eq!(err.0.len(), 1);
        assert!(err.0[0].position.is_some(), "{}", err);
        assert!(err.to_string().contains("invalid YAML"));
    }
}
