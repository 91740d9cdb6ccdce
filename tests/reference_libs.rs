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

#[test]
fn presets_match_mergekit_and_peft() {
    let Some(python) = common::python("torch, transformers, peft, mergekit, safetensors") else {
        return;
    };
    let stdout = common::run_python_check(&python, "reference_merges.py");
    // Every case ran: 11 mergekit cases, 4 peft cases and the control.
    assert!(stdout.contains("16/16 cases pass"), "{stdout}");
}
