//! Chat templates: the Jinja template of an instruct model (`chat_template.jinja`, or
//! `chat_template` in `tokenizer_config.json`), rendered as `apply_chat_template` does with
//! `messages`, `add_generation_prompt`, the tokenizer's `bos_token` / `eos_token` and
//! `raise_exception`, by minijinja with Python's string methods (`minijinja-contrib` pycompat).

use std::path::Path;

use minijinja::{Environment, Error, ErrorKind, context};

/// A model's chat template, compiled.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

/// A special token of tokenizer_config.json: a string or `{"content": ...}`.
fn token(v: &serde_json::Value) -> String {
    v.as_str()
        .or_else(|| v["content"].as_str())
        .unwrap_or_default()
        .to_string()
}

impl ChatTemplate {
    /// The model directory's chat template; None when it has none.
    pub fn from_dir(dir: &Path) -> Result<Option<ChatTemplate>, String> {
        let config: serde_json::Value =
            crate::runtime::model_dir::read_json(&dir.join("tokenizer_config.json"))
                .map_err(|e| e.to_string())?
                .unwrap_or_default();
        let source = match std::fs::read_to_string(dir.join("chat_template.jinja")) {
            Ok(s) => Some(s),
            Err(_) => match &config["chat_template"] {
                serde_json::Value::String(s) => Some(s.clone()),
                // A list of named templates: the "default" one.
                serde_json::Value::Array(named) => named
                    .iter()
                    .find(|t| t["name"] == "default")
                    .and_then(|t| t["template"].as_str())
                    .map(str::to_string),
                _ => None,
            },
        };
        let Some(source) = source else {
            return Ok(None);
        };
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned("chat", source)
            .map_err(|e| format!("{}: the chat template does not parse: {e}", dir.display()))?;
        Ok(Some(ChatTemplate {
            env,
            bos_token: token(&config["bos_token"]),
            eos_token: token(&config["eos_token"]),
        }))
    }

    /// The prompt for `messages` ((role, content) pairs), ending with the assistant's turn
    /// opened when `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &[(&str, &str)],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        let messages: Vec<_> = messages
            .iter()
            .map(|(role, content)| context! { role => role, content => content })
            .collect();
        let template = self.env.get_template("chat").map_err(|e| e.to_string())?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(|e| format!("rendering the chat template: {e}"))
    }
}
