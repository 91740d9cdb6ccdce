//! `xpm experiment`: the CI-sized smoke version of the paper's experiment (issue 7) through the
//! real binary: two tasks and a held-out one, three methods, one seed, on a tiny random BERT and
//! synthetic CSV tables. It checks that the pipeline (import, train, publish to the local
//! registry, install, overlap, merge, eval) produces every table, the raw JSON and the PNG,
//! that a second run resumes without redoing a step, and that bad input gets a clear error. It
//! does not check which method merges best: that is the full experiment's finding.

mod common;

use std::path::Path;

use common::TestContext;
use common::train::write_tiny_bert;

const FILLER: &[&str] = &[
    "the", "a", "of", "and", "to", "in", "is", "it", "that", "was", "for", "on", "are", "with",
    "as", "at", "be", "this", "have", "from", "or", "one", "had", "by", "word", "but", "what",
    "all", "were", "when",
];

/// A CSV table of `n` rows of filler words; `label(i)` gives row i's label and the word that
/// marks it (inserted at a random position), if any.
fn write_table(
    path: &Path,
    n: usize,
    seed: u64,
    label: impl Fn(usize) -> (&'static str, Option<&'static str>),
) {
    let mut rng = common::Rng(seed);
    let mut out = String::from("text,label\n");
    for i in 0..n {
        let len = 4 + (rng.next() % 7) as usize;
        let mut words: Vec<&str> = (0..len)
            .map(|_| FILLER[(rng.next() as usize) % FILLER.len()])
            .collect();
        let (l, mark) = label(i);
        if let Some(m) = mark {
            let at = (rng.next() as usize) % (len + 1);
            words.insert(at, m);
        }
        out.push_str(&format!("{},{l}\n", words.join(" ")));
    }
    std::fs::write(path, out).unwrap();
}

fn setup(ctx: &TestContext) {
    write_tiny_bert(&ctx.path("tiny-bert"), 1);
    let kw = ["alpha", "beta", "gamma"];
    write_table(&ctx.path("kw.csv"), 160, 1, |i| {
        (kw[i % 3], Some(kw[i % 3]))
    });
    write_table(&ctx.path("neg.csv"), 160, 2, |i| {
        if i % 2 == 1 {
            ("neg", Some("not"))
        } else {
            ("pos", None)
        }
    });
    write_table(&ctx.path("we.csv"), 120, 3, |i| {
        if i % 2 == 1 {
            ("we", Some("we"))
        } else {
            ("they", None)
        }
    });
    std::fs::write(
        ctx.path("smoke.toml"),
        r#"
name = "smoke"
base = "tiny-bert"
out = "results"
seeds = [1]
max_seq_len = 16
batch_size = 16
epochs = 2
merge_counts = [2]
scaling_strategies = ["ties", "sparse-mean"]
tune_lambda = ["task-arithmetic"]
lambda_grid = [0.5, 1.0]
head_args = ["--lr", "0.03"]

[[task]]
name = "kw"
table = "kw.csv"
train = 96
eval = 32
test = 32

[[task]]
name = "neg"
table = "neg.csv"
train = 96
eval = 32
test = 32

[heldout]
name = "we"
table = "we.csv"
train = 64
eval = 24
test = 32

[[method]]
name = "sparse-5"
args = ["--method", "sparse", "--keep-ratio", "0.05", "--lr", "0.01"]
strategies = ["sparse-mean", "mean", "task-arithmetic", "ties"]

[[method]]
name = "lora-r4"
args = ["--method", "lora", "--lora-rank", "4", "--lora-alpha", "16", "--lr", "0.01"]
strategies = ["mean", "task-arithmetic", "ties"]

[[method]]
name = "full"
args = ["--method", "full", "--lr", "0.001"]
strategies = ["mean", "task-arithmetic", "ties"]
"#,
    )
    .unwrap();
}

fn run(ctx: &TestContext, args: &[&str]) -> (bool, String, String) {
    let out = ctx.xpm().args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn smoke_experiment_produces_every_table_and_resumes() {
    let ctx = TestContext::new();
    setup(&ctx);
    let (ok, stdout, stderr) = run(&ctx, &["experiment", "run", "smoke.toml", "--work", "work"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("39 records over 1 seed"), "{stdout}");

    // Raw results: every setting of every task, with accuracies in [0, 1].
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ctx.path("results/smoke.json")).unwrap()).unwrap();
    let records = json["records"].as_array().unwrap();
    let count = |setting: &str| records.iter().filter(|r| r["setting"] == setting).count();
    // head: 3 tasks; single: 3 methods × 2 tasks; merged: 10 merges × 2 tasks; heldout: 10.
    assert_eq!(
        (
            count("head"),
            count("single"),
            count("merged"),
            count("heldout")
        ),
        (3, 6, 20, 10)
    );
    assert!(records.iter().all(|r| {
        let a = r["accuracy"].as_f64().unwrap();
        (0.0..=1.0).contains(&a) && r["examples"].as_u64() == Some(32)
    }));
    // task-arithmetic's λ was chosen from the grid on the eval splits; other merges have none.
    for r in records.iter().filter(|r| r["setting"] == "merged") {
        let l = r["lambda"].as_f64();
        if r["strategy"] == "task-arithmetic" {
            assert!(matches!(l, Some(x) if x == 0.5 || x == 1.0), "{r}");
        } else {
            assert_eq!(l, None, "{r}");
        }
    }
    let tune = std::fs::read_dir(ctx.path("work/logs"))
        .unwrap()
        .filter(|e| {
            let n = e.as_ref().unwrap().file_name();
            n.to_string_lossy().starts_with("tune_eval_")
        })
        .count();
    assert_eq!(
        tune,
        3 * 2 * 2,
        "3 methods × 2 λ × 2 tasks on their eval splits"
    );
    let tasks = json["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 3);
    assert_eq!(
        (
            tasks[0]["train"].as_u64(),
            tasks[0]["labels"].as_array().unwrap().len()
        ),
        (Some(96), 3)
    );
    let overlap = json["overlap"].as_array().unwrap();
    assert_eq!(overlap.len(), 1, "one sparse method, one seed");
    let j = overlap[0]["mean_jaccard"].as_array().unwrap();
    assert_eq!(j.len(), 2);
    assert!(j.iter().all(|x| (0.0..=1.0).contains(&x.as_f64().unwrap())));

    // The tables.
    let md = std::fs::read_to_string(ctx.path("results/smoke.md")).unwrap();
    for heading in [
        "#### Tasks",
        "#### Single experts",
        "#### Merged: all 2 tasks",
        "#### Held-out task `we`",
        "#### Mask overlap",
        "#### λ chosen on the eval splits (per seed)",
        "#### Cost",
    ] {
        assert!(md.contains(heading), "missing {heading}:\n{md}");
    }
    for row in [
        "| base + head only |",
        "| sparse-5 · sparse-mean |",
        "| lora-r4 · ties |",
        "| full · task-arithmetic |",
        "| sparse-5 · ties (all 2 tasks) |",
    ] {
        assert!(md.contains(row), "missing row {row}:\n{md}");
    }
    let lambdas = md.split("#### λ chosen on the eval splits").nth(1).unwrap();
    let row = lambdas
        .lines()
        .find(|l| l.starts_with("| lora-r4 · task-arithmetic |"))
        .unwrap_or_else(|| panic!("no λ row for lora-r4:\n{md}"));
    assert!(row.ends_with(" 0.5 |") || row.ends_with(" 1 |"), "{row}");
    let png = std::fs::read(ctx.path("results/smoke.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000);

    // Everything went through the public commands: the experts are in the work directory's
    // local registry and installed (locked) into one project per method.
    assert!(ctx.path("work/home/registry").is_dir());
    let lock = std::fs::read_to_string(ctx.path("work/projects/lora-r4-s1/xpm.lock")).unwrap();
    assert!(
        lock.contains("kw-lora-r4-s1") && lock.contains("neg-lora-r4-s1"),
        "{lock}"
    );

    // A second run resumes: no step runs again, the same results come out.
    let before = std::fs::read_to_string(ctx.path("work/state.json")).unwrap();
    let (ok, _, stderr) = run(&ctx, &["experiment", "run", "smoke.toml", "--work", "work"]);
    assert!(ok, "{stderr}");
    assert!(!stderr.contains("Running"), "a step ran again:\n{stderr}");
    assert_eq!(
        std::fs::read_to_string(ctx.path("work/state.json")).unwrap(),
        before
    );
    assert_eq!(
        std::fs::read_to_string(ctx.path("results/smoke.md")).unwrap(),
        md
    );

    // `report` regenerates the tables from the JSON alone.
    let (ok, _, stderr) = run(
        &ctx,
        &["experiment", "report", "results/smoke.json", "-o", "again"],
    );
    assert!(ok, "{stderr}");
    assert_eq!(
        std::fs::read_to_string(ctx.path("again/smoke.md")).unwrap(),
        md
    );
}

#[test]
fn bad_experiment_files_get_clear_errors() {
    let ctx = TestContext::new();
    setup(&ctx);
    let good = std::fs::read_to_string(ctx.path("smoke.toml")).unwrap();

    std::fs::write(
        ctx.path("typo.toml"),
        good.replace("epochs = 2", "epoch = 2"),
    )
    .unwrap();
    let (ok, _, stderr) = run(&ctx, &["experiment", "run", "typo.toml"]);
    assert!(!ok);
    assert!(
        stderr.contains("typo.toml") && stderr.contains("epoch"),
        "{stderr}"
    );

    std::fs::write(
        ctx.path("k.toml"),
        good.replace("merge_counts = [2]", "merge_counts = [5]"),
    )
    .unwrap();
    let (ok, _, stderr) = run(&ctx, &["experiment", "run", "k.toml"]);
    assert!(!ok);
    assert!(stderr.contains("merge_counts has 5"), "{stderr}");

    std::fs::write(
        ctx.path("nobase.toml"),
        good.replace("\"tiny-bert\"", "\"missing-model\""),
    )
    .unwrap();
    let (ok, _, stderr) = run(&ctx, &["experiment", "run", "nobase.toml"]);
    assert!(!ok);
    assert!(
        stderr.contains("missing-model") && stderr.contains("fetch-assets"),
        "{stderr}"
    );

    // A failing step names itself and its log; nothing after it ran.
    std::fs::write(
        ctx.path("notable.toml"),
        good.replace("\"neg.csv\"", "\"gone.csv\""),
    )
    .unwrap();
    let (ok, _, stderr) = run(&ctx, &["experiment", "run", "notable.toml", "--work", "w2"]);
    assert!(!ok);
    assert!(
        stderr.contains("step `import/neg` failed")
            && stderr.contains("gone.csv")
            && stderr.contains("logs"),
        "{stderr}"
    );
    assert!(
        !ctx.path("w2/experts").exists()
            || std::fs::read_dir(ctx.path("w2/experts")).unwrap().count() == 0
    );

    // A changed file does not silently reuse another run's steps.
    let (ok, _, stderr) = run(&ctx, &["experiment", "run", "smoke.toml", "--work", "w2"]);
    assert!(!ok);
    assert!(
        stderr.contains("different version") && stderr.contains("--fresh"),
        "{stderr}"
    );
}
