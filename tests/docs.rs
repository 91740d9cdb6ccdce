//! Executable documentation: the shell examples of README.md and docs/*.md run against the real
//! binaries, and their output is compared with what the page shows.
//!
//! # Conventions (also in docs/README.md, "Writing examples")
//!
//! - A fenced block with the info string `console` is a **test**. A line `$ CMD` is a command
//!   (a line ending in `\` continues on the next one); the lines after it, up to the next `$`
//!   line, are its expected output: stdout and stderr together, as a terminal shows them
//!   (`NO_COLOR=1`, no progress bars). No lines after a command: its output is not checked.
//!   - `...` on a line of its own matches any number of lines (zero included);
//!   - `[..]` inside a line matches any text on that line;
//!   - `[CWD]` is the page's working directory, `[HOME]` the home directory of the run.
//!   - A command must exit with status 0, unless one of its expected lines starts with
//!     `error:`; then it must fail.
//!   - `cd DIR` changes the working directory of the following commands.
//!   - A command ending in `&` starts a server in the background (`xpm registry serve …`). Its
//!     `--addr HOST:8417` is replaced by port 0, the harness waits for the `http://…` address the
//!     server prints, and in every later command of the page `:8417` becomes the real port (and
//!     back again in output). The server is stopped when the page ends.
//! - Hidden setup: an HTML comment `<!-- doc-test setup: … -->` holds commands (one a line,
//!   `#` lines are comments) that run, unseen, before the next `console` block. Their output is
//!   not checked; they must succeed. `$XPM_DOCS_BIN` is the directory of the binaries under test
//!   (and of the example plugins, built on demand when a page mentions `libxpm_plugin_`).
//! - `<!-- doc-test file: PATH -->` right before a fenced block (of any language) writes the
//!   block's text to PATH in the working directory, so that later commands use the file the page
//!   shows (a C plugin's source, a recipe).
//! - `$XPM_DOCS_SRC` is the repository's root, for setup that needs a file of the clone.
//! - A fenced block `sh` (or `bash`, `shell`) is **not run**. Its first line must say so and why:
//!   `# Not run by the docs test: REASON`. `text` blocks (synopses, formats) are not commands.
//!
//! Each page runs in its own fresh temporary directory: `HOME` is `ROOT/home` (so `~/.xpm` is
//! the default `XPM_HOME`, empty at the start), the working directory is `ROOT/work`, `PATH`
//! starts with the directory of the `xpm` binary under test (with `xpm-registry` beside it), and
//! the `XPM_*` variables of the caller are removed. Commands run with `bash -c`, one at a time.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The pages that hold runnable examples; `every_page_is_listed` keeps this in sync.
const PAGES: &[&str] = &[
    "README.md",
    "docs/training.md",
    "docs/registry-protocol.md",
    "docs/merging.md",
    "docs/plugins.md",
    "docs/format.md",
];

/// Longest a single command may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every Markdown page a user reads: README.md and docs/*.md.
fn all_pages() -> Vec<String> {
    let mut out = vec!["README.md".to_string()];
    let mut docs: Vec<String> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".md"))
        .map(|n| format!("docs/{n}"))
        .collect();
    docs.sort();
    out.extend(docs);
    out
}

#[derive(Debug)]
enum Item {
    /// Hidden setup commands, with the line of the comment.
    Setup(usize, Vec<String>),
    /// A `console` block: its commands.
    Block(Vec<Step>),
    /// A shell block that is not run: its line and first line.
    Unrun(usize, String),
    /// A block written to a file: (path, text).
    File(String, String),
}

#[derive(Debug)]
struct Step {
    line: usize,
    cmd: String,
    expected: Vec<String>,
}

fn parse(page: &str, text: &str) -> Vec<Item> {
    let lines: Vec<&str> = text.lines().collect();
    let mut items = Vec::new();
    let mut file_next: Option<String> = None;
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i];
        let t = l.trim_start();
        if let Some(rest) = t.strip_prefix("<!-- doc-test setup:") {
            let start = i + 1;
            let mut body = Vec::new();
            let mut rest = rest.to_string();
            loop {
                if let Some(before) = rest.strip_suffix("-->") {
                    body.push(before.to_string());
                    break;
                }
                body.push(rest.clone());
                i += 1;
                assert!(
                    i < lines.len(),
                    "{page}:{start}: unterminated setup comment"
                );
                rest = lines[i].to_string();
            }
            let cmds = body
                .iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty() && !s.starts_with('#'))
                .collect();
            items.push(Item::Setup(start, cmds));
            i += 1;
            continue;
        }
        if let Some(rest) = t.strip_prefix("<!-- doc-test file:") {
            let path = rest
                .trim()
                .strip_suffix("-->")
                .expect("one-line comment")
                .trim();
            file_next = Some(path.to_string());
            i += 1;
            continue;
        }
        if let Some(info) = t.strip_prefix("```") {
            let indent = l.len() - t.len();
            let info = info.trim().to_string();
            let open = i + 1;
            let mut body = Vec::new();
            i += 1;
            while i < lines.len() && !lines[i].trim_start().starts_with("```") {
                body.push(lines[i].get(indent..).unwrap_or(lines[i].trim_start()));
                i += 1;
            }
            i += 1;
            if let Some(path) = file_next.take() {
                let mut text = body.join("\n");
                text.push('\n');
                items.push(Item::File(path, text));
                continue;
            }
            match info.as_str() {
                "console" => items.push(Item::Block(parse_console(page, open, &body))),
                "sh" | "bash" | "shell" | "zsh" => items.push(Item::Unrun(
                    open,
                    body.first().map(|s| s.to_string()).unwrap_or_default(),
                )),
                _ => {}
            }
            continue;
        }
        i += 1;
    }
    items
}

fn parse_console(page: &str, open: usize, body: &[&str]) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let mut j = 0;
    while j < body.len() {
        let l = body[j];
        if let Some(cmd) = l.strip_prefix("$ ") {
            let line = open + 1 + j;
            let mut cmd = cmd.to_string();
            while cmd.ends_with('\\') && j + 1 < body.len() {
                j += 1;
                cmd.push('\n');
                cmd.push_str(body[j]);
            }
            steps.push(Step {
                line,
                cmd,
                expected: Vec::new(),
            });
        } else {
            match steps.last_mut() {
                Some(s) => s.expected.push(l.trim_end().to_string()),
                None => panic!(
                    "{page}:{}: a `console` block must start with a `$ ` command line",
                    open + 1 + j
                ),
            }
        }
        j += 1;
    }
    for s in &mut steps {
        while s.expected.last().is_some_and(|l| l.is_empty()) {
            s.expected.pop();
        }
    }
    steps
}

/// The directory of the binaries under test, with `xpm-registry` built beside `xpm`.
fn bin_dir() -> PathBuf {
    let server = common::registry::server_bin();
    server.parent().unwrap().to_path_buf()
}

/// The example plugins, built once (cargo builds cdylibs only for `cargo build`).
fn build_plugins() {
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
            .status()
            .expect("run cargo build");
        assert!(st.success(), "building the example plugins failed");
    });
}

/// One page's run: its directories, environment, servers and port mappings.
struct Run {
    page: String,
    _tmp: tempfile::TempDir,
    home: PathBuf,
    work: PathBuf,
    cwd: PathBuf,
    env: BTreeMap<String, String>,
    servers: Vec<Child>,
    /// (documented port, real port)
    ports: Vec<(String, String)>,
    failures: Vec<String>,
}

impl Drop for Run {
    fn drop(&mut self) {
        for c in &mut self.servers {
            // The process group: `bash -c` and what it started.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", c.id())])
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Run {
    fn new(page: &str) -> Run {
        let tmp = tempfile::tempdir().unwrap();
        // Canonical, so that paths the binary prints match the placeholders.
        let base = tmp.path().canonicalize().unwrap();
        let (home, work) = (base.join("home"), base.join("work"));
        std::fs::create_dir_all(&home).unwrap();
        std::fs::create_dir_all(&work).unwrap();
        let bin = bin_dir();
        let mut env = BTreeMap::new();
        let path = std::env::var("PATH").unwrap_or_default();
        env.insert("PATH".into(), format!("{}:{path}", bin.display()));
        env.insert("HOME".into(), home.display().to_string());
        env.insert("NO_COLOR".into(), "1".into());
        env.insert("XPM_DOCS_BIN".into(), bin.display().to_string());
        env.insert("XPM_DOCS_SRC".into(), root().display().to_string());
        Run {
            page: page.to_string(),
            _tmp: tmp,
            home,
            cwd: work.clone(),
            work,
            env,
            servers: Vec::new(),
            ports: Vec::new(),
            failures: Vec::new(),
        }
    }

    fn command(&self, script: &str) -> Command {
        let mut c = Command::new("bash");
        c.arg("-c").arg(script).current_dir(&self.cwd).env_clear();
        // Keep what a shell needs; drop everything xpm reads (XPM_*, HF_*).
        for (k, v) in std::env::vars() {
            if ["LANG", "LC_ALL", "TMPDIR", "USER", "CC", "CARGO_TARGET_DIR"].contains(&k.as_str())
            {
                c.env(k, v);
            }
        }
        c.envs(&self.env);
        c
    }

    fn map_ports(&self, cmd: &str) -> String {
        let mut s = cmd.to_string();
        for (doc, real) in &self.ports {
            s = s.replace(&format!(":{doc}"), &format!(":{real}"));
        }
        s
    }

    /// What the page would show for this output: placeholders for the run's paths and ports.
    fn normalize(&self, out: &str) -> Vec<String> {
        let mut s = out.to_string();
        for (doc, real) in &self.ports {
            s = s.replace(&format!(":{real}"), &format!(":{doc}"));
        }
        s = s.replace(&self.work.display().to_string(), "[CWD]");
        s = s.replace(&self.home.display().to_string(), "[HOME]");
        let mut lines: Vec<String> = s.lines().map(|l| l.trim_end().to_string()).collect();
        while lines.last().is_some_and(|l| l.is_empty()) {
            lines.pop();
        }
        lines
    }

    fn fail(&mut self, line: usize, msg: String) {
        self.failures.push(format!("{}:{line}: {msg}", self.page));
    }

    /// Run one command; `None` when it could not be run at all.
    fn exec(&mut self, line: usize, cmd: &str) -> Option<(bool, String)> {
        let script = format!("exec 2>&1\n{}", self.map_ports(cmd));
        let mut child = self
            .command(&script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("start bash");
        let mut stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = stdout.read_to_end(&mut buf);
            buf
        });
        let start = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break Some(st);
            }
            if start.elapsed() > COMMAND_TIMEOUT {
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{}", child.id())])
                    .status();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = String::from_utf8_lossy(&reader.join().unwrap()).to_string();
        match status {
            Some(st) => Some((st.success(), out)),
            None => {
                self.fail(
                    line,
                    format!("`{cmd}` ran longer than {COMMAND_TIMEOUT:?}\noutput:\n{out}"),
                );
                None
            }
        }
    }

    /// Start a server in the background and learn its address.
    fn start_server(&mut self, line: usize, cmd: &str) {
        let documented: Vec<String> = cmd
            .split_whitespace()
            .filter_map(|w| w.rsplit_once(':').map(|(_, p)| p.to_string()))
            .filter(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()) && p != "0")
            .collect();
        let mut script = self.map_ports(cmd);
        for p in &documented {
            script = script.replace(&format!(":{p}"), ":0");
        }
        let mut child = self
            .command(&format!("exec 2>&1\n{script}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("start bash");
        let mut r = BufReader::new(child.stdout.take().unwrap());
        let mut seen = String::new();
        let mut url = None;
        for _ in 0..20 {
            let mut l = String::new();
            if r.read_line(&mut l).unwrap_or(0) == 0 {
                break;
            }
            seen.push_str(&l);
            if let Some(u) = l.split_whitespace().find(|w| w.starts_with("http://")) {
                url = Some(u.to_string());
                break;
            }
        }
        // Keep draining the server's output so that it never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = r.read_to_end(&mut sink);
        });
        self.servers.push(child);
        match url {
            Some(u) => {
                let real = u
                    .rsplit_once(':')
                    .unwrap()
                    .1
                    .trim_end_matches('/')
                    .to_string();
                for p in documented {
                    self.ports.push((p, real.clone()));
                }
            }
            None => self.fail(
                line,
                format!("`{cmd}` did not print the address it listens on:\n{seen}"),
            ),
        }
    }

    fn step(&mut self, s: &Step) {
        let cmd = s.cmd.trim();
        if let Some(dir) = cmd.strip_prefix("cd ") {
            let dir = dir.trim().replace('~', &self.home.display().to_string());
            let next = self.cwd.join(dir);
            if next.is_dir() {
                self.cwd = next.canonicalize().unwrap();
            } else {
                self.fail(s.line, format!("`{cmd}`: no such directory"));
            }
            return;
        }
        if let Some(bg) = cmd.strip_suffix('&') {
            self.start_server(s.line, bg.trim());
            return;
        }
        let Some((ok, out)) = self.exec(s.line, cmd) else {
            return;
        };
        let actual = self.normalize(&out);
        let want_failure = s.expected.iter().any(|l| l.starts_with("error:"));
        if ok == want_failure {
            let what = if ok { "succeeded" } else { "failed" };
            self.fail(
                s.line,
                format!(
                    "`{cmd}` {what}, unlike the page shows\noutput:\n{}",
                    actual.join("\n")
                ),
            );
            return;
        }
        if !s.expected.is_empty() && !matches(&s.expected, &actual) {
            self.fail(
                s.line,
                format!("`{cmd}`: output differs\n{}", diff(&s.expected, &actual)),
            );
        }
    }

    fn setup(&mut self, line: usize, cmds: &[String]) {
        for c in cmds {
            if c.contains("libxpm_plugin_") {
                build_plugins();
            }
            match self.exec(line, c) {
                Some((true, _)) | None => {}
                Some((false, out)) => {
                    self.fail(line, format!("hidden setup `{c}` failed:\n{out}"));
                }
            }
        }
    }
}

/// `expected` (with `...` lines and `[..]` in-line wildcards) against `actual`.
fn matches(expected: &[String], actual: &[String]) -> bool {
    match expected.split_first() {
        None => actual.is_empty(),
        Some((e, rest)) if e.trim() == "..." => {
            (0..=actual.len()).any(|k| matches(rest, &actual[k..]))
        }
        Some((e, rest)) => match actual.split_first() {
            Some((a, arest)) => line_matches(e, a) && matches(rest, arest),
            None => false,
        },
    }
}

fn line_matches(expected: &str, actual: &str) -> bool {
    let parts: Vec<&str> = expected.split("[..]").collect();
    if parts.len() == 1 {
        return expected == actual;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !actual.starts_with(first) || actual.len() < first.len() + last.len() {
        return false;
    }
    let mut pos = first.len();
    for p in &parts[1..parts.len() - 1] {
        match actual[pos..].find(p) {
            Some(k) => pos += k + p.len(),
            None => return false,
        }
    }
    actual.len() - last.len() >= pos && actual.ends_with(last)
}

fn diff(expected: &[String], actual: &[String]) -> String {
    let mut s = String::from("--- the page shows\n");
    for l in expected {
        s.push_str(&format!("  {l}\n"));
    }
    s.push_str("+++ the binary printed\n");
    for l in actual {
        s.push_str(&format!("  {l}\n"));
    }
    s
}

fn run_page(page: &str) {
    let text = std::fs::read_to_string(root().join(page)).unwrap();
    let items = parse(page, &text);
    let mut run = Run::new(page);
    let mut blocks = 0;
    for item in &items {
        match item {
            Item::Setup(line, cmds) => run.setup(*line, cmds),
            Item::Block(steps) => {
                blocks += 1;
                for s in steps {
                    if s.cmd.contains("libxpm_plugin_") {
                        build_plugins();
                    }
                    run.step(s);
                }
            }
            Item::File(path, text) => {
                let p = run.cwd.join(path);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(p, text).unwrap();
            }
            Item::Unrun(..) => {}
        }
    }
    assert!(
        blocks > 0,
        "{page} has no `console` block; remove it from PAGES"
    );
    let failures = std::mem::take(&mut run.failures);
    assert!(
        failures.is_empty(),
        "{} documentation example(s) failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn readme() {
    run_page("README.md");
}

#[test]
fn training() {
    run_page("docs/training.md");
}

#[test]
fn registry_protocol() {
    run_page("docs/registry-protocol.md");
}

#[test]
fn merging() {
    run_page("docs/merging.md");
}

#[test]
fn plugins() {
    run_page("docs/plugins.md");
}

#[test]
fn format() {
    run_page("docs/format.md");
}

/// Every page with a `console` block is run by a test above, and every shell block that is not
/// run says why.
#[test]
fn every_page_is_listed_and_every_unrun_block_says_why() {
    let mut problems = Vec::new();
    for page in all_pages() {
        let text = std::fs::read_to_string(root().join(&page)).unwrap();
        for item in parse(&page, &text) {
            match item {
                Item::Block(_) if !PAGES.contains(&page.as_str()) => {
                    problems.push(format!("{page} has `console` blocks but is not in PAGES"))
                }
                Item::Unrun(line, first) if !first.starts_with("# Not run by the docs test: ") => {
                    problems.push(format!(
                        "{page}:{line}: a shell block that is not run must start with \
                         `# Not run by the docs test: REASON` (or be a `console` block)"
                    ))
                }
                _ => {}
            }
        }
    }
    problems.dedup();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Issue 27, defect 1: `xpm` on crates.io is another project. No page may tell users to
/// `cargo install` anything but a path or the repository, and every install is `--locked`.
#[test]
fn install_commands_never_name_a_crates_io_package_and_are_locked() {
    let mut problems = Vec::new();
    for page in all_pages() {
        let text = std::fs::read_to_string(root().join(&page)).unwrap();
        for (n, l) in text.lines().enumerate() {
            let mut rest = l;
            while let Some(k) = rest.find("cargo install") {
                let cmd: String = rest[k..].split('`').next().unwrap().to_string();
                let from_source = cmd.contains("--path") || cmd.contains("--git");
                if !from_source || !cmd.contains("--locked") {
                    problems.push(format!("{page}:{}: `{cmd}`", n + 1));
                }
                rest = &rest[k + "cargo install".len()..];
            }
        }
    }
    assert!(
        problems.is_empty(),
        "install commands must build from the repository (`--path` or `--git`) with \
         `--locked`:\n{}",
        problems.join("\n")
    );
}

/// Defect 1 in the binary: the hint for an artifact of a newer format major.
#[test]
fn the_upgrade_hint_names_no_crates_io_package() {
    let ctx = common::TestContext::new();
    common::registry::make_expert(&ctx.path("a.xpm"), "a", "1.0.0", "base", 200, 1);
    let mut bytes = std::fs::read(ctx.path("a.xpm")).unwrap();
    bytes[8] = 2; // the prelude's format major
    std::fs::write(ctx.path("a.xpm"), bytes).unwrap();
    let out = ctx.xpm().args(["verify", "a.xpm"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("uses xpm format 2.2"), "{err}");
    assert!(err.contains("cargo install --locked --path ."), "{err}");
    assert!(!err.contains("cargo install --locked xpm"), "{err}");
    assert!(!err.contains("cargo install xpm"), "{err}");
}

/// Defect 3: `xpm registry serve` runs the `xpm-registry` found beside `xpm`, with no help from
/// `PATH`.
#[test]
fn registry_serve_finds_the_server_beside_xpm() {
    let _ = bin_dir(); // builds xpm-registry beside xpm when it is missing
    let ctx = common::TestContext::new();
    let out = ctx
        .xpm()
        .env("PATH", "/usr/bin:/bin")
        .args(["registry", "serve", "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("Usage: xpm-registry serve"), "{text}");
    assert!(text.contains("--token-file"), "{text}");
}

#[test]
fn the_matcher_understands_wildcards() {
    let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert!(matches(&v(&["a", "...", "z"]), &v(&["a", "b", "c", "z"])));
    assert!(matches(&v(&["a", "...", "z"]), &v(&["a", "z"])));
    assert!(!matches(&v(&["a", "z"]), &v(&["a", "b", "z"])));
    assert!(matches(&v(&["wrote [..] rows"]), &v(&["wrote 12 rows"])));
    assert!(matches(&v(&["[..]x[..]"]), &v(&["axb"])));
    assert!(!matches(&v(&["ab[..]ba"]), &v(&["aba"])));
    assert!(matches(&v(&["..."]), &v(&[])));
}
