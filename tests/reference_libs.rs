//! `xpm merge --preset mergekit|peft` against the real libraries (mergekit 0.1.5, peft 0.21.2,
//! torch; tests/python/requirements.txt, installed by scripts/python-env.sh).
//!
//! The comparison itself is tests/python/reference_merges.py: it builds a tiny Llama and three
//! fine-tuned copies with transformers, turns them into experts with this binary, merges them
//! with xpm and with the library (mergekit's `run_merge` on the model directories, peft's
//! `merge_utils` on the task vectors), and compares every tensor to f32 rounding. It also runs a
//! control that must disagree (xpm's TIES without the preset against mergekit's), so the check
//! cannot pass by comparing a thing with itself.

mod common;

use std::path::Path;

#[test]
fn presets_match_mergekit_and_peft() {
    let Some(python) = common::python("torch, transformers, peft, mergekit, safetensors") else {
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/reference_merges.py");
    let out = std::process::Command::new(python)
        .arg(script)
        .arg("--xpm")
        .arg(env!("CARGO_BIN_EXE_xpm"))
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_VERBOSITY", "error")
        .env("TQDM_DISABLE", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "xpm's presets disagree with the real libraries:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every case ran: 11 mergekit cases, 4 peft cases and the control.
    assert!(stdout.contains("16/16 cases pass"), "{stdout}");
}
