//! Chat prompts: the model's own chat template (`chat_template` in `tokenizer_config.json`, a
//! Jinja template, rendered with minijinja as transformers' `apply_chat_template` does with
//! `add_generation_prompt=True`), else a plain `role: content` transcript.

use serde::Deserialize;

use super::ApiError;

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A model's chat template and the special tokens it refers to.
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// The template in `dir/tokenizer_config.json`, if the model has one. A template that does
    /// not compile is an error at start, not at the first request.
    pub fn load(dir: &std::path::Path) -> crate::Result<Option<ChatTemplate>> {
        let path = dir.join("tokenizer_config.json");
        let Ok(bytes) = std::fs::read(&path) else {
            return Ok(None);
        };
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| crate::Error::corrupt(&path, format!("not JSON: {e}")))?;
        let Some(source) = v.get("chat_template").and_then(|t| t.as_str()) else {
            return Ok(None);
        };
        let token = |k: &str| {
            match v.get(k) {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                // `{"content": "<s>", …}` (an AddedToken)
                Some(o) => o
                    .get("content")
                    .and_then(|c| c.as_str())
                    .map(str::to_string),
                None => None,
            }
            .unwrap_or_default()
        };
        let t = ChatTemplate {
            source: source.to_string(),
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
        };
        let mut env = minijinja::Environment::new();
        env.add_template("chat", &t.source).map_err(|e| {
            crate::Error::input(
                format!(
                    "the chat template in `{}` does not compile: {e}",
                    path.display()
                ),
                Some("fix `chat_template`, or remove it to use a plain transcript"),
            )
        })?;
        Ok(Some(t))
    }

    pub fn render(&self, messages: &[Message]) -> Result<String, ApiError> {
        let mut env = minijinja::Environment::new();
        // The template comes with the model (a hub repository is someone else's): bounded work.
        env.set_fuel(Some(1_000_000));
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", &self.source)
            .map_err(|e| ApiError::internal(format!("chat template: {e}")))?;
        let t = env.get_template("chat").expect("added");
        t.render(minijinja::context! {
            messages => messages,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
            add_generation_prompt => true,
        })
        .map_err(|e| {
            ApiError::bad_request(
                format!("the model's chat template refused the messages: {e}"),
                "check the roles and their order",
            )
        })
    }
}

/// `role: content` lines, then `assistant:` for the model to continue.
pub fn plain_prompt(messages: &[Message]) -> String {
    let mut s = String::new();
    for m in messages {
        s.push_str(&m.role);
        s.push_str(": ");
        s.push_str(&m.content);
        s.push('\n');
    }
    s.push_str("assistant:");
    s
}
