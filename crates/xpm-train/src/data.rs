//! Training data: JSONL files of `{"text", "label"}` (classification) or
//! `{"prompt", "completion"}` (causal language modelling), tokenised once, batched with padding
//! to the longest sequence of each batch.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use xpm_core::error::{Error, IoResultExt, Result};
use xpm_core::rng::SplitMix64;

/// What a data file trains.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    Classification,
    CausalLm,
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Task {
    pub fn as_str(self) -> &'static str {
        match self {
            Task::Classification => "classification",
            Task::CausalLm => "causal-lm",
        }
    }
}

/// One example as read from the file.
#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    Class { text: String, label: String },
    Causal { prompt: String, completion: String },
}

/// A parsed JSONL file.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub path: PathBuf,
    pub task: Task,
    pub examples: Vec<Example>,
    /// `sha256:<hex>` of the file's bytes.
    pub digest: String,
}

impl Dataset {
    /// Read and check a JSONL file. Errors name the file and line.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).at("read", path)?;
        let text = std::str::from_utf8(&bytes).map_err(|e| {
            Error::input(
                format!("`{}` is not UTF-8 text: {e}", path.display()),
                Some("data files are JSONL: one JSON object per line, UTF-8"),
            )
        })?;
        let mut task = None;
        let mut examples = Vec::new();
        for (no, line) in text.lines().enumerate() {
            let line_no = no + 1;
            if line.trim().is_empty() {
                continue;
            }
            let bad = |msg: String| line_error(path, line_no, msg);
            let (t, ex) = parse_line(path, line_no, line)?;
            match task {
                None => task = Some(t),
                Some(prev) if prev != t => {
                    return Err(bad(format!(
                        "is a {} example, but the lines before are {}",
                        t.as_str(),
                        prev.as_str()
                    )));
                }
                _ => {}
            }
            examples.push(ex);
        }
        let Some(task) = task else {
            return Err(Error::input(
                format!("`{}` has no examples", path.display()),
                Some("data files are JSONL: one JSON object per line"),
            ));
        };
        Ok(Dataset {
            path: path.to_path_buf(),
            task,
            examples,
            digest: xpm_core::digest::sha256(&bytes),
        })
    }

    /// The sorted label set: numerically when every label is an integer, else by string.
    pub fn labels(&self) -> Vec<String> {
        let set: BTreeSet<&str> = self
            .examples
            .iter()
            .filter_map(|e| match e {
                Example::Class { label, .. } => Some(label.as_str()),
                _ => None,
            })
            .collect();
        let mut out: Vec<String> = set.into_iter().map(str::to_string).collect();
        if out.iter().all(|l| l.parse::<i64>().is_ok()) {
            out.sort_by_key(|l| l.parse::<i64>().expect("checked"));
        }
        out
    }

    /// Refuse training data a classifier cannot learn from.
    pub fn check_trainable(&self) -> Result<()> {
        if self.task == Task::Classification {
            let labels = self.labels();
            if labels.len() < 2 {
                return Err(Error::input(
                    format!(
                        "`{}` has a single class ({}): there is nothing to learn",
                        self.path.display(),
                        labels.join(", ")
                    ),
                    Some("classification data needs at least two distinct labels"),
                ));
            }
        }
        Ok(())
    }
}

/// An error at line `line_no` of the data file `path`.
fn line_error(path: &Path, line_no: usize, msg: String) -> Error {
    Error::input(
        format!("{}:{line_no}: {msg}", path.display()),
        Some(
            "each line must be {\"text\": …, \"label\": …} or \
             {\"prompt\": …, \"completion\": …}",
        ),
    )
}

/// Line `line_no` (not empty) of the data file `path`: its task and example.
fn parse_line(path: &Path, line_no: usize, line: &str) -> Result<(Task, Example)> {
    let bad = |msg: String| line_error(path, line_no, msg);
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| bad("expected a JSON object".into()))?;
    let string = |key: &str| -> Result<String> {
        match obj.get(key) {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(bad(format!("`{key}` must be a string, not {other}"))),
            None => Err(bad(format!("missing `{key}`"))),
        }
    };
    if obj.contains_key("text") || obj.contains_key("label") {
        let label = match obj.get("label") {
            Some(serde_json::Value::String(s)) if !s.is_empty() => s.clone(),
            Some(serde_json::Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
            Some(other) => {
                return Err(bad(format!(
                    "`label` must be a non-empty string or an integer, not {other}"
                )));
            }
            None => return Err(bad("missing `label`".into())),
        };
        Ok((
            Task::Classification,
            Example::Class {
                text: string("text")?,
                label,
            },
        ))
    } else if obj.contains_key("prompt") || obj.contains_key("completion") {
        Ok((
            Task::CausalLm,
            Example::Causal {
                prompt: string("prompt")?,
                completion: string("completion")?,
            },
        ))
    } else {
        Err(bad(
            "has neither `text`/`label` nor `prompt`/`completion`".into()
        ))
    }
}

/// A tokenised example.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub ids: Vec<u32>,
    /// Classification: the label's index. Causal LM: the number of prompt tokens (the loss
    /// covers the tokens after them).
    pub target: u32,
}

/// Batches of example indices for one epoch: shuffled with the seeded generator when `shuffle`.
pub fn batches(n: usize, batch: usize, shuffle: Option<&mut SplitMix64>) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..n).collect();
    if let Some(rng) = shuffle {
        rng.shuffle(&mut order);
    }
    order.chunks(batch.max(1)).map(<[usize]>::to_vec).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("d.jsonl");
        std::fs::write(&p, text).unwrap();
        (d, p)
    }

    #[test]
    fn reads_labels_as_strings_or_integers() {
        let (_d, p) = write(
            "{\"text\": \"a\", \"label\": 10}\n\n{\"text\": \"b\", \"label\": 2}\n{\"text\": \"c\", \"label\": 10}\n",
        );
        let d = Dataset::load(&p).unwrap();
        assert_eq!(d.task, Task::Classification);
        assert_eq!(d.examples.len(), 3);
        assert_eq!(d.labels(), vec!["2", "10"]);
        d.check_trainable().unwrap();
    }

    #[test]
    fn bad_lines_name_the_line() {
        let (_d, p) = write("{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": \"b\"}\n");
        let e = Dataset::load(&p).unwrap_err().to_string();
        assert!(e.ends_with(":2: missing `label`"), "{e}");
        let (_d, p) = write(
            "{\"text\": \"a\", \"label\": \"x\"}\n{\"prompt\": \"b\", \"completion\": \"c\"}\n",
        );
        let e = Dataset::load(&p).unwrap_err().to_string();
        assert!(e.contains(":2: is a causal-lm example"), "{e}");
        let (_d, p) = write("not json\n");
        assert!(
            Dataset::load(&p)
                .unwrap_err()
                .to_string()
                .contains(":1: not valid JSON")
        );
        let (_d, p) = write("\n\n");
        assert!(
            Dataset::load(&p)
                .unwrap_err()
                .to_string()
                .contains("has no examples")
        );
        let (_d, p) =
            write("{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": \"b\", \"label\": \"x\"}\n");
        let e = Dataset::load(&p)
            .unwrap()
            .check_trainable()
            .unwrap_err()
            .to_string();
        assert!(e.contains("single class (x)"), "{e}");
    }

    #[test]
    fn batches_cover_every_example_once() {
        let mut r = SplitMix64(3);
        let b = batches(10, 4, Some(&mut r));
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), vec![4, 4, 2]);
        let mut all: Vec<usize> = b.concat();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
    }
}
