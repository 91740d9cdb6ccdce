//! Test-only plugin that misbehaves on request: `{"mode": "ok" | "error" | "panic" |
//! "panic-create" | "nan"}`. Used by xpm's plugin fault tests.

use xpm_plugin_sdk::{Output, Strategy, Tensor, serde_json};

pub struct Faulty {
    mode: String,
}

impl Strategy for Faulty {
    const NAME: &'static str = "faulty";
    const VERSION: &'static str = "0.1.0";
    const PARAMS_SCHEMA: &'static str = r#"{
  "type": "object",
  "properties": { "mode": { "enum": ["ok", "error", "panic", "panic-create", "nan"] } },
  "required": ["mode"],
  "additionalProperties": false
}"#;

    fn create(params: serde_json::Value) -> Result<Self, String> {
        let mode = params["mode"].as_str().unwrap_or("ok").to_string();
        if mode == "panic-create" {
            panic!("faulty plugin panicked in create");
        }
        Ok(Faulty { mode })
    }

    fn merge(&mut self, t: &Tensor<'_>, out: &mut Output<'_>) -> Result<(), String> {
        match self.mode.as_str() {
            "error" => return Err(format!("faulty plugin refuses tensor `{}`", t.name)),
            "panic" => panic!("faulty plugin panicked on tensor `{}`", t.name),
            _ => {}
        }
        let first = t.dense_row(0);
        for (k, (o, v)) in out.values.iter_mut().zip(first).enumerate() {
            *o = if self.mode == "nan" && k == 0 {
                f32::NAN
            } else {
                v
            };
        }
        Ok(())
    }
}

xpm_plugin_sdk::export!(Faulty);
