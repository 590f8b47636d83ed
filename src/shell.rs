//! `ferry query` with no SQL: an interactive SQL shell over the same tables and operators, as
//! `datafusion-cli` users know it. Statements end with `;` and may span lines; history is kept
//! between sessions; `\d` lists tables and operators, `\d NAME` describes one, `\q` quits.
//! With standard input not a terminal, statements are read from it (a script).

use std::path::PathBuf;
use std::time::Instant;

use datafusion::arrow::util::pretty::pretty_format_batches;
use rustyline::error::ReadlineError;

use crate::query::{QueryContext, QueryInputs};

const HELP: &str = "\
Statements end with `;` and may span lines. Operators are SQL functions: SELECT id, minilm(text) FROM t;
  \\d          list tables and operators
  \\d NAME     columns of table NAME, or what operator NAME takes
  \\q          quit (or Ctrl-D)
  \\?          this help
Ctrl-C clears the statement being typed.";

/// Where the shell keeps its history: `FERRY_HISTORY`, else `query_history` in ferry's data
/// directory.
fn history_file() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FERRY_HISTORY") {
        return Some(PathBuf::from(p));
    }
    dirs::data_local_dir().map(|d| d.join("ferry").join("query_history"))
}

/// Runs the shell until `\q` or end of input.
pub async fn run(inputs: &QueryInputs) -> anyhow::Result<()> {
    let mut query = QueryContext::open(inputs, |_| true).await?;
    let mut editor = rustyline::DefaultEditor::new()?;
    let history = history_file();
    if let Some(h) = &history {
        let _ = editor.load_history(h);
    }
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin());
    if interactive {
        println!("ferry SQL shell. \\? for help, \\q to quit.");
        println!("{}", tables_line(&query));
    }
    let mut buffer = String::new();
    loop {
        let prompt = if buffer.is_empty() {
            "ferry> "
        } else {
            "   ..> "
        };
        let line = match editor.readline(prompt) {
            Ok(line) => line,
            Err(ReadlineError::Interrupted) => {
                buffer.clear();
                continue;
            }
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        };
        let trimmed = line.trim();
        if buffer.is_empty() && trimmed.starts_with('\\') {
            let _ = editor.add_history_entry(trimmed);
            match command(&query, trimmed).await {
                Some(out) => println!("{out}"),
                None => break,
            }
            continue;
        }
        if buffer.is_empty() && trimmed.is_empty() {
            continue;
        }
        buffer.push_str(&line);
        buffer.push('\n');
        let (statements, rest) = split_statements(&buffer);
        if statements.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(buffer.trim_end());
        buffer = rest;
        for sql in statements {
            execute(&mut query, &sql).await;
        }
    }
    // A statement without its `;` at the end of a script still runs.
    if !buffer.trim().is_empty() {
        execute(&mut query, buffer.trim()).await;
    }
    if let Some(h) = &history {
        if let Some(dir) = h.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = editor.save_history(h) {
            tracing::debug!(error = %e, file = %h.display(), "history not saved");
        }
    }
    Ok(())
}

/// Runs one statement and prints its rows (or its error: the shell goes on).
async fn execute(query: &mut QueryContext, sql: &str) {
    let started = Instant::now();
    let result = async {
        query.register_operators_for(sql)?;
        let frame = query.sql(sql).await?;
        let batches = frame.collect().await?;
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        let table = pretty_format_batches(&batches)?.to_string();
        anyhow::Ok((table, rows))
    }
    .await;
    match result {
        Ok((table, rows)) => {
            if !table.is_empty() {
                println!("{table}");
            }
            println!(
                "{rows} row{} in {:.3} s.",
                if rows == 1 { "" } else { "s" },
                started.elapsed().as_secs_f64()
            );
        }
        Err(e) => eprintln!("error: {}", crate::cli::error_message(&e)),
    }
}

/// A backslash command's output; `None` to quit.
async fn command(query: &QueryContext, line: &str) -> Option<String> {
    let mut words = line.split_whitespace();
    let name = words.next().unwrap_or_default();
    let arg = words.next();
    Some(match (name, arg) {
        ("\\q" | "\\quit", _) => return None,
        ("\\?" | "\\h" | "\\help", _) => HELP.to_string(),
        ("\\d", None) => describe_all(query),
        ("\\d", Some(name)) => describe(query, name).await,
        _ => format!("unknown command {name}; \\? lists the commands"),
    })
}

fn table_names(query: &QueryContext) -> Vec<String> {
    let mut names = Vec::new();
    for catalog in query.ctx.catalog_names() {
        let Some(c) = query.ctx.catalog(&catalog) else {
            continue;
        };
        for schema in c.schema_names() {
            if let Some(s) = c.schema(&schema) {
                names.extend(s.table_names());
            }
        }
    }
    names.sort();
    names
}

fn tables_line(query: &QueryContext) -> String {
    let tables = table_names(query);
    let mut out = format!(
        "tables: {}",
        if tables.is_empty() {
            "none (`ferry run` a pipeline, or pass --table NAME=PATH)".to_string()
        } else {
            tables.join(", ")
        }
    );
    let operators = query.operators.names();
    if !operators.is_empty() {
        out.push_str(&format!("\noperators: {}", operators.join(", ")));
    }
    out
}

fn describe_all(query: &QueryContext) -> String {
    let mut out = String::from("tables:\n");
    let tables = table_names(query);
    if tables.is_empty() {
        out.push_str("  (none)\n");
    }
    for t in tables {
        out.push_str(&format!("  {t}\n"));
    }
    if let Some(p) = &query.pipelines {
        for (file, why) in &p.skipped {
            out.push_str(&format!("  (skipped {}: {why})\n", file.display()));
        }
    }
    out.push_str("operators:\n");
    let manifests = query.operators.manifests();
    if manifests.is_empty() {
        out.push_str("  (none)\n");
    }
    for m in manifests {
        out.push_str(&format!(
            "  {}  {}  {}\n",
            m.manifest.name,
            m.manifest.task.info().name,
            m.manifest.model.display()
        ));
    }
    out.trim_end().to_string()
}

async fn describe(query: &QueryContext, name: &str) -> String {
    if let Ok(provider) = query.ctx.table_provider(name).await {
        let schema = provider.schema();
        let width = schema
            .fields()
            .iter()
            .map(|f| f.name().len())
            .max()
            .unwrap_or(0);
        return schema
            .fields()
            .iter()
            .map(|f| {
                format!(
                    "  {:width$}  {}{}",
                    f.name(),
                    f.data_type(),
                    if f.is_nullable() { "" } else { " not null" }
                )
            })
            .collect::<Vec<_>>()
            .join("\n");
    }
    if let Some(m) = query
        .operators
        .manifests()
        .iter()
        .find(|m| m.manifest.name == name)
    {
        let task = m.manifest.task.info();
        return format!(
            "  operator {}: {} ({}), model {}\n  takes {}\n  returns {}",
            m.manifest.name,
            task.name,
            task.hf_task,
            m.manifest.model.display(),
            task.inputs,
            task.output
        );
    }
    format!("no table or operator named '{name}'; \\d lists them")
}

/// Splits complete statements (ended by `;` outside quotes and comments) off `text`; returns
/// them and what follows the last one.
pub fn split_statements(text: &str) -> (Vec<String>, String) {
    let mut statements = Vec::new();
    let mut start = 0;
    let mut quote: Option<char> = None;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None => match c {
                '\'' | '"' => quote = Some(c),
                '-' if chars.peek().is_some_and(|(_, n)| *n == '-') => {
                    // A comment runs to the end of the line.
                    for (_, n) in chars.by_ref() {
                        if n == '\n' {
                            break;
                        }
                    }
                }
                ';' => {
                    let s = text[start..i].trim();
                    if !s.is_empty() {
                        statements.push(s.to_string());
                    }
                    start = i + 1;
                }
                _ => {}
            },
        }
    }
    let rest = text[start..].trim_start();
    (statements, rest.to_string())
}

#[cfg(test)]
mod tests {
    use super::split_statements;

    #[test]
    fn statements_end_at_semicolons_outside_quotes_and_comments() {
        let (s, rest) = split_statements("SELECT 'a;b', \"c;\" -- d;\n FROM t; SELECT 2;\nSELECT");
        assert_eq!(s, ["SELECT 'a;b', \"c;\" -- d;\n FROM t", "SELECT 2"]);
        assert_eq!(rest, "SELECT");
        let (s, rest) = split_statements("SELECT 1\n");
        assert!(s.is_empty());
        assert_eq!(rest, "SELECT 1\n");
    }
}
