//! Merge plugins end to end: the workspace's plugin crates built by cargo, C plugins built with
//! the system C compiler, loaded by the real `xpm` binary.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use predicates::prelude::*;

/// The workspace's plugin cdylibs, built once per test run (cargo only builds a cdylib for
/// `cargo build`, not for `cargo test`).
fn rust_plugin(name: &str) -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args([
                "build",
                "-q",
                "-p",
                "xpm-plugin-median",
                "-p",
                "xpm-plugin-magmax",
            ])
            .args(["-p", "xpm-plugin-mean", "-p", "xpm-plugin-faulty"])
            .status()
            .expect("run cargo build");
        assert!(st.success(), "building the plugin crates failed");
    });
    let dir = assert_cmd::cargo::cargo_bin("xpm")
        .parent()
        .unwrap()
        .to_path_buf();
    let p = dir.join(format!(
        "{}xpm_plugin_{name}.{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_EXTENSION
    ));
    assert!(p.is_file(), "{} missing", p.display());
    p
}

/// plugins/examples/c/task_arithmetic.c compiled with `defines` into `out`.
fn c_plugin(ctx: &TestContext, out: &str, defines: &[&str]) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dest = ctx.path(out);
    let st = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(["-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-I"])
        .arg(root.join("plugins/xpm-plugin-api/include"))
        .args(defines)
        .arg(root.join("plugins/examples/c/task_arithmetic.c"))
        .arg("-o")
        .arg(&dest)
        .status()
        .expect("run the C compiler");
    assert!(st.success(), "cc failed");
    dest
}

/// Three sparse experts (`e1`…`e3`, density 0.4) of one random base, with overlapping masks.
fn experts(ctx: &TestContext) {
    experts_of(ctx, &[("a.weight", &[16, 24]), ("b.weight", &[8, 8])], 31);
}

/// A base of `specs` (random, from `seed`) and three experts `e1`–`e3` extracted from
/// perturbations of it (seeds `seed + 1` to `seed + 3`) at density 0.4.
fn experts_of(ctx: &TestContext, specs: &[(&str, &[usize])], seed: u64) {
    let base = random_tensors(specs, seed);
    write_st(
        &ctx.path("base.safetensors"),
        &base,
        safetensors::Dtype::F32,
    );
    for (k, n) in ["e1", "e2", "e3"].into_iter().enumerate() {
        write_st(
            &ctx.path(&format!("{n}.safetensors")),
            &perturb(&base, seed + 1 + k as u64, 0.1),
            safetensors::Dtype::F32,
        );
        extract(ctx, n, n, &["--density", "0.4"]);
    }
}

/// `xpm extract` of `{tuned}.safetensors` against the base into `{name}.xpm` (version 1.0.0).
fn extract(ctx: &TestContext, tuned: &str, name: &str, args: &[&str]) {
    ctx.xpm()
        .args(["extract", "--base", "base.safetensors", "--tuned"])
        .arg(format!("{tuned}.safetensors"))
        .args(args)
        .args(["--name", name, "--version", "1.0.0", "-o"])
        .arg(format!("{name}.xpm"))
        .assert()
        .success();
}

/// name → dense values of an artifact's tensors (via the library reader).
fn dense(path: &Path) -> BTreeMap<String, Vec<f32>> {
    let r = xpm::format::ArtifactReader::open(path).unwrap();
    let mut out = BTreeMap::new();
    for i in 0..r.manifest().tensors.len() {
        let t = r.read_tensor(i).unwrap();
        let n = t.numel() as usize;
        let mut d = vec![0f32; n];
        let mut mask = vec![false; n];
        match &t.content {
            xpm::format::Content::Sparse {
                indices, values, ..
            } => {
                for (i, v) in indices.iter().zip(t.dtype.to_f32(values)) {
                    d[*i as usize] = v;
                    mask[*i as usize] = true;
                }
            }
            xpm::format::Content::Dense { delta } => {
                d = t.dtype.to_f32(delta);
                mask.fill(true);
            }
            other => panic!("{}: unexpected content {other:?}", t.name),
        }
        out.insert(t.name.clone(), d);
        out.insert(
            format!("{}#mask", t.name),
            mask.iter().map(|&m| m as u8 as f32).collect(),
        );
    }
    out
}

#[test]
fn example_plugins_merge_as_documented() {
    let ctx = TestContext::new();
    experts(&ctx);
    let median = rust_plugin("median");
    ctx.xpm()
        .args([
            "merge",
            "e1.xpm",
            "e2.xpm",
            "e3.xpm",
            "--strategy",
            "median",
            "--plugin",
        ])
        .arg(&median)
        .args(["-o", "med.xpm"])
        .assert()
        .success();
    let ins: Vec<_> = ["e1.xpm", "e2.xpm", "e3.xpm"]
        .iter()
        .map(|f| dense(&ctx.path(f)))
        .collect();
    let got = dense(&ctx.path("med.xpm"));
    for name in ["a.weight", "b.weight"] {
        for k in 0..got[name].len() {
            let mut held: Vec<f32> = (0..3)
                .filter(|&e| ins[e][&format!("{name}#mask")][k] != 0.0)
                .map(|e| ins[e][name][k])
                .collect();
            held.sort_by(f32::total_cmp);
            let want = match held.len() {
                0 => 0.0,
                m if m % 2 == 1 => held[m / 2],
                m => ((held[m / 2 - 1] as f64 + held[m / 2] as f64) / 2.0) as f32,
            };
            assert_eq!(got[name][k], want, "{name}[{k}]");
        }
    }
    // Provenance names the plugin and its file digest.
    let out = ctx
        .xpm()
        .args(["inspect", "med.xpm", "--json"])
        .output()
        .unwrap();
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let plugin = &m["manifest"]["provenance"]["merge"]["plugin"];
    assert_eq!(plugin["name"], "median");
    assert_eq!(
        plugin["sha256"],
        xpm::digest::sha256(&std::fs::read(&median).unwrap()).as_str()
    );
    assert_eq!(
        m["manifest"]["provenance"]["recipe"]["plugin_sha256"],
        plugin["sha256"]
    );

    // magmax through $XPM_PLUGIN_PATH, with a parameter.
    let dir = ctx.path("plugdir");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        rust_plugin("magmax"),
        dir.join(rust_plugin("magmax").file_name().unwrap()),
    )
    .unwrap();
    ctx.xpm()
        .env("XPM_PLUGIN_PATH", &dir)
        .args([
            "merge",
            "e1.xpm",
            "e2.xpm",
            "--strategy",
            "magmax",
            "--param",
            "lambda=0.5",
            "--weights",
            "1,2",
            "-o",
            "mm.xpm",
        ])
        .assert()
        .success();
    let got = dense(&ctx.path("mm.xpm"));
    for k in 0..got["a.weight"].len() {
        let mut best = 0f64;
        for (e, w) in [(0usize, 1.0f64), (1, 2.0)] {
            if ins[e]["a.weight#mask"][k] != 0.0 {
                let v = w * ins[e]["a.weight"][k] as f64;
                if v.abs() > best.abs() {
                    best = v;
                }
            }
        }
        assert_eq!(got["a.weight"][k], (0.5 * best) as f32);
    }
}

#[test]
fn a_dense_input_among_sparse_ones_gives_the_plugin_the_full_support() {
    // A dense expert makes the support every position; the sparse experts' entries must land
    // on their own positions. plugin-mean then equals the built-in `mean`.
    let ctx = TestContext::new();
    experts(&ctx);
    extract(&ctx, "e3", "e3d", &["--kind", "dense"]);
    let inputs = ["e1.xpm", "e2.xpm", "e3d.xpm"];
    ctx.xpm()
        .arg("merge")
        .args(inputs)
        .args(["--strategy", "plugin-mean", "--plugin"])
        .arg(rust_plugin("mean"))
        .args(["--weights", "1,2,0.5", "-o", "p.xpm"])
        .assert()
        .success();
    ctx.xpm()
        .arg("merge")
        .args(inputs)
        .args(["--strategy", "mean", "--weights", "1,2,0.5", "-o", "b.xpm"])
        .assert()
        .success();
    let (got, want) = (dense(&ctx.path("p.xpm")), dense(&ctx.path("b.xpm")));
    for name in ["a.weight", "b.weight"] {
        assert!(want[name].iter().any(|v| *v != 0.0));
        assert_eq!(got[name], want[name], "{name}");
    }
}

#[test]
fn plugin_mean_equals_the_builtin_over_a_support_of_several_blocks() {
    // plugin-mean accumulates 8192 support positions at a time, each expert walking on from
    // where the last block stopped: a support of about 25 000 positions spans three blocks, and
    // every position must still equal the built-in `mean` bit for bit.
    let ctx = TestContext::new();
    experts_of(&ctx, &[("big.weight", &[200, 160])], 41);
    let inputs = ["e1.xpm", "e2.xpm", "e3.xpm"];
    let merge = |strategy: &str, plugin: bool, out: &str| {
        let mut cmd = ctx.xpm();
        cmd.arg("merge").args(inputs).args(["--strategy", strategy]);
        if plugin {
            cmd.arg("--plugin").arg(rust_plugin("mean"));
        }
        cmd.args(["--weights", "1,2,0.5", "-o", out])
            .assert()
            .success();
        dense(&ctx.path(out))
    };
    let (got, want) = (
        merge("plugin-mean", true, "p.xpm"),
        merge("mean", false, "b.xpm"),
    );
    let nonzero = want["big.weight"].iter().filter(|v| **v != 0.0).count();
    assert!(nonzero > 2 * 8192, "the support spans blocks ({nonzero})");
    assert_eq!(got["big.weight"], want["big.weight"]);
}

#[test]
fn a_c_plugin_equals_the_builtin_it_implements() {
    let ctx = TestContext::new();
    experts(&ctx);
    let lib = c_plugin(&ctx, "libc_ta.so", &[]);
    ctx.xpm()
        .args([
            "merge",
            "e1.xpm",
            "e2.xpm",
            "--weights",
            "1,0.5",
            "--strategy",
            "c-task-arithmetic",
            "--param",
            "lambda=2",
        ])
        .arg("--plugin")
        .arg(&lib)
        .args(["-o", "c.xpm"])
        .assert()
        .success();
    ctx.xpm()
        .args([
            "merge",
            "e1.xpm",
            "e2.xpm",
            "--weights",
            "1,0.5",
            "--strategy",
            "task-arithmetic",
            "--param",
            "lambda=2",
            "-o",
            "b.xpm",
        ])
        .assert()
        .success();
    assert_eq!(dense(&ctx.path("c.xpm")), dense(&ctx.path("b.xpm")));
    // The same plugin reading each expert's values where xpm holds them (ABI 1.1's
    // XPM_CAP_EXPERT_VALUES: `entry_value` is then NULL, so any read of it would crash).
    let per_expert = c_plugin(
        &ctx,
        "libc_ta_ev.so",
        &["-DXPM_EXPERT_VALUES", "-DXPM_TEST_NO_COPY"],
    );
    ctx.xpm()
        .args(["merge", "e1.xpm", "e2.xpm", "--weights", "1,0.5"])
        .args(["--strategy", "c-task-arithmetic", "--param", "lambda=2"])
        .arg("--plugin")
        .arg(&per_expert)
        .args(["-o", "ev.xpm"])
        .assert()
        .success();
    assert_eq!(dense(&ctx.path("ev.xpm")), dense(&ctx.path("b.xpm")));
    ctx.xpm()
        .args(["plugin", "check"])
        .arg(&lib)
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "ok c-task-arithmetic 1.0.0 (ABI 1.1)",
        ));
}

/// The host reuses its arrays from tensor to tensor on a thread: a plugin that drops entries
/// in one tensor must still find every keep flag set (and every value zero) in the next.
#[test]
fn a_plugin_that_drops_entries_keeps_the_rest_and_each_call_starts_fresh() {
    let ctx = TestContext::new();
    experts(&ctx);
    let lib = c_plugin(&ctx, "libc_drop.so", &["-DXPM_TEST_DROP_ODD"]);
    ctx.xpm()
        .env("RAYON_NUM_THREADS", "1")
        .args(["merge", "e1.xpm", "e2.xpm", "e3.xpm"])
        .args(["--strategy", "c-task-arithmetic", "--plugin"])
        .arg(&lib)
        .args(["-o", "c.xpm"])
        .assert()
        .success();
    ctx.xpm()
        .args(["merge", "e1.xpm", "e2.xpm", "e3.xpm"])
        .args(["--strategy", "task-arithmetic", "-o", "b.xpm"])
        .assert()
        .success();
    let (c, b) = (dense(&ctx.path("c.xpm")), dense(&ctx.path("b.xpm")));
    for name in ["a.weight", "b.weight"] {
        let mask = |m: &BTreeMap<String, Vec<f32>>| m[&format!("{name}#mask")].clone();
        // The built-in's support, in order; the plugin kept its even-numbered entries.
        let support: Vec<usize> = (mask(&b).iter().enumerate())
            .filter_map(|(i, &m)| (m == 1.0).then_some(i))
            .collect();
        assert!(support.len() > 4, "{name}: support too small to test");
        let kept: Vec<usize> = (mask(&c).iter().enumerate())
            .filter_map(|(i, &m)| (m == 1.0).then_some(i))
            .collect();
        let even: Vec<usize> = support.iter().copied().step_by(2).collect();
        assert_eq!(kept, even, "{name}");
        for &i in &kept {
            assert_eq!(c[name][i], b[name][i], "{name}[{i}]");
        }
    }
}

#[test]
fn discovery_listing_and_builtin_clash() {
    let ctx = TestContext::new();
    experts(&ctx);
    let plugdir = ctx.path("home/plugins");
    std::fs::create_dir_all(&plugdir).unwrap();
    c_plugin(
        &ctx,
        "home/plugins/libties.so",
        &["-DXPM_TEST_NAME=\"ties\""],
    );
    // Named as `xpm merge --strategy median` looks for it; a copy under another name is listed
    // but never loaded by a merge.
    std::fs::copy(
        rust_plugin("median"),
        plugdir.join("libxpm_plugin_median.so"),
    )
    .unwrap();
    ctx.xpm()
        .args(["plugin", "list"])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("median 1.0.0  ABI 1.1")
                .and(predicate::str::contains("sha256:"))
                .and(predicate::str::contains("clashes with a built-in")),
        );
    // The built-in wins: the merge records no plugin.
    ctx.xpm()
        .args([
            "merge",
            "e1.xpm",
            "e2.xpm",
            "--strategy",
            "ties",
            "-o",
            "t.xpm",
        ])
        .assert()
        .success();
    let out = ctx
        .xpm()
        .args(["inspect", "t.xpm", "--json"])
        .output()
        .unwrap();
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(m["manifest"]["provenance"]["merge"]["plugin"].is_null());
    // Found in $XPM_HOME/plugins without --plugin.
    ctx.xpm()
        .args([
            "merge",
            "e1.xpm",
            "e2.xpm",
            "--strategy",
            "median",
            "-o",
            "m.xpm",
        ])
        .assert()
        .success();
    // Only the file named for the strategy is loaded: `magmax` under another name is not.
    std::fs::copy(rust_plugin("magmax"), plugdir.join("libsomething.so")).unwrap();
    ctx.xpm()
        .args([
            "merge",
            "e1.xpm",
            "e2.xpm",
            "--strategy",
            "magmax",
            "-o",
            "x.xpm",
        ])
        .assert()
        .failure()
        .stderr(predicate::str::contains("libxpm_plugin_magmax.so"));
    // A file named for one strategy that provides another is refused, naming both.
    std::fs::copy(
        rust_plugin("median"),
        plugdir.join("libxpm_plugin_magmax.so"),
    )
    .unwrap();
    ctx.xpm()
        .args([
            "merge",
            "e1.xpm",
            "e2.xpm",
            "--strategy",
            "magmax",
            "-o",
            "x.xpm",
        ])
        .assert()
        .failure()
        .stderr(predicate::str::contains(
            "provides strategy `median`, not `magmax`",
        ));
    // Unknown strategy: says where it looked.
    ctx.xpm()
        .args(["merge", "e1.xpm", "--strategy", "nope", "-o", "x.xpm"])
        .assert()
        .failure()
        .stderr(
            predicate::str::contains("no plugin provides it")
                .and(predicate::str::contains("xpm plugin list")),
        );
    // A recipe pinning another plugin build is refused.
    std::fs::write(
        ctx.path("r.toml"),
        format!(
            "strategy = \"median\"\nplugin_sha256 = \"sha256:{}\"\n[[experts]]\nexpert = \"e1.xpm\"\n[[experts]]\nexpert = \"e2.xpm\"\n",
            "0".repeat(64)
        ),
    )
    .unwrap();
    ctx.xpm()
        .args(["merge", "--recipe", "r.toml", "-o", "r.xpm"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("pins plugin `median`"));
    assert!(!ctx.path("r.xpm").exists());
}

/// A descriptor from a later minor version (larger, fields appended past 1.0) loads in this
/// host, which reads only the 1.0 fields; the minor-version rule of the ABI.
#[test]
fn a_descriptor_with_appended_fields_loads_under_a_1_0_host() {
    let ctx = TestContext::new();
    experts(&ctx);
    let lib = c_plugin(&ctx, "libbig.so", &["-DXPM_TEST_BIG_DESCRIPTOR"]);
    ctx.xpm()
        .args([
            "merge",
            "e1.xpm",
            "e2.xpm",
            "--strategy",
            "c-task-arithmetic",
            "--plugin",
        ])
        .arg(&lib)
        .args(["-o", "out.xpm"])
        .assert()
        .success();
}

#[test]
fn faulty_plugins_are_reported_and_nothing_is_written() {
    let ctx = TestContext::new();
    experts(&ctx);
    let faulty = rust_plugin("faulty");
    let cases: Vec<(PathBuf, &str, Vec<&str>, &str)> = vec![
        (
            c_plugin(&ctx, "libmajor.so", &["-DXPM_TEST_ABI_MAJOR=2"]),
            "c-task-arithmetic",
            vec![],
            "built for plugin ABI 2.1",
        ),
        (
            c_plugin(&ctx, "libnosym.so", &["-DXPM_TEST_NO_SYMBOL"]),
            "c-task-arithmetic",
            vec![],
            "does not export `xpm_merge_plugin_v1`",
        ),
        (
            c_plugin(&ctx, "libsmall.so", &["-DXPM_TEST_SMALL_DESCRIPTOR"]),
            "c-task-arithmetic",
            vec![],
            "descriptor is 24 bytes, smaller than",
        ),
        (
            c_plugin(&ctx, "libshort.so", &["-DXPM_TEST_SHORT_OUTPUT"]),
            "c-task-arithmetic",
            vec![],
            "returned",
        ),
        (
            faulty.clone(),
            "faulty",
            vec!["--param", "mode=error"],
            "failed in tensor",
        ),
        (
            faulty.clone(),
            "faulty",
            vec!["--param", "mode=panic"],
            "panicked in tensor",
        ),
        (
            faulty.clone(),
            "faulty",
            vec!["--param", "mode=panic-create"],
            "panicked in create",
        ),
        (
            faulty.clone(),
            "faulty",
            vec!["--param", "mode=nan"],
            "produced NaN",
        ),
        (
            faulty.clone(),
            "faulty",
            vec!["--param", "mode=sideways"],
            "invalid parameters for `faulty`",
        ),
        (
            c_plugin(&ctx, "libc.so", &[]),
            "c-task-arithmetic",
            vec!["--param", "lambda=fast"],
            "invalid parameters",
        ),
        // The ABI's rules, each refused with the plugin and the rule named.
        (
            c_plugin(&ctx, "libnull.so", &["-DXPM_TEST_NULL_MERGE"]),
            "c-task-arithmetic",
            vec![],
            "descriptor's `merge` entry point is NULL",
        ),
        (
            c_plugin(
                &ctx,
                "libundeclared.so",
                &["-DXPM_TEST_DROP_ODD", "-DXPM_TEST_UNDECLARED_DROP"],
            ),
            "c-task-arithmetic",
            vec![],
            "without declaring the XPM_CAP_DROPS_ENTRIES capability",
        ),
        (
            c_plugin(&ctx, "libkeep2.so", &["-DXPM_TEST_BAD_KEEP"]),
            "c-task-arithmetic",
            vec![],
            "set keep flag 2",
        ),
        (
            c_plugin(&ctx, "libnosemver.so", &["-DXPM_TEST_VERSION=\"banana\""]),
            "c-task-arithmetic",
            vec![],
            "version `banana` is not a semantic version",
        ),
        (
            c_plugin(&ctx, "librequired.so", &["-DXPM_TEST_REQUIRED_CAP"]),
            "c-task-arithmetic",
            vec![],
            "requires capabilities this xpm does not implement",
        ),
    ];
    for (lib, strategy, extra, want) in cases {
        ctx.xpm()
            .args([
                "merge",
                "e1.xpm",
                "e2.xpm",
                "--strategy",
                strategy,
                "--plugin",
            ])
            .arg(&lib)
            .args(&extra)
            .args(["-o", "out.xpm"])
            .assert()
            .code(1)
            .stderr(
                predicate::str::contains(want)
                    .and(predicate::str::contains(lib.display().to_string())),
            );
        assert!(!ctx.path("out.xpm").exists(), "{want}: output written");
        assert!(
            ctx.temp_leftovers().is_empty(),
            "{want}: {:?}",
            ctx.temp_leftovers()
        );
    }
}

/// `--plugin libx.so` names the file in the working directory, not a library on the dynamic
/// loader's search path (the README's example failed this way).
#[test]
fn a_bare_plugin_file_name_loads_from_the_working_directory() {
    let ctx = TestContext::new();
    experts(&ctx);
    c_plugin(&ctx, "libbare.so", &[]);
    ctx.xpm()
        .args([
            "merge",
            "e1.xpm",
            "e2.xpm",
            "--strategy",
            "c-task-arithmetic",
        ])
        .args(["--plugin", "libbare.so", "-o", "out.xpm"])
        .assert()
        .success();
}
