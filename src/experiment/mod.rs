//! `xpm experiment run FILE.toml`: the paper's experiment, through xpm's own public commands.
//!
//! Every step runs the `xpm` binary itself as a user would (`data import`, `train`, `publish`,
//! `init`, `install`, `merge`, `overlap`, `eval`), in a private `XPM_HOME` under the work
//! directory whose local registry receives every expert. Each step's JSON answer is kept in
//! `WORK/state.json`, so an interrupted run resumes where it stopped; its stderr goes to
//! `WORK/logs/`. After every seed the results so far are written: `NAME.json` (raw records),
//! `NAME.md` (tables) and `NAME.png` (accuracy against the number of merged tasks).

pub mod config;
pub mod report;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use config::Config;
use config::{MethodConfig, TaskConfig, resolve};

use crate::error::{Error, IoResultExt, Result};
use crate::printer::Printer;

/// One measured accuracy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct Record {
    pub seed: u64,
    /// The task evaluated.
    pub task: String,
    /// Method name from the experiment file, or `head` for the base + head baseline.
    pub method: String,
    /// `head` (base + head only), `single` (the task's own expert), `merged` (a merge that
    /// includes the task) or `heldout` (a merge evaluated on the held-out task).
    pub setting: Setting,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
    /// Number of tasks merged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_tasks: Option<usize>,
    /// The merge's `lambda`, where it was chosen on the eval splits (`tune_lambda`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lambda: Option<f64>,
    pub accuracy: f64,
    pub macro_f1: f64,
    pub examples: usize,
}

/// Where an accuracy was measured (see [`Record::setting`]); serialized as the lowercase name,
/// the strings result files held when this was a `String`. The variants carry plain comments:
/// doc comments would turn the schema's string enum into a `oneOf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
#[schemars(inline)]
pub enum Setting {
    // Base + head only.
    Head,
    // The task's own expert.
    Single,
    // A merge that includes the task.
    Merged,
    // A merge evaluated on the held-out task.
    Heldout,
}

/// Mask overlap between the sparse experts of one (method, seed) merge of all tasks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct OverlapRecord {
    pub seed: u64,
    pub method: String,
    pub tasks: Vec<String>,
    /// Per task: mean Jaccard index of its mask with every other task's mask.
    pub mean_jaccard: Vec<f64>,
    /// Share of the union's positions held by two or more experts.
    pub shared_fraction: f64,
}

/// A task's data as imported.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct TaskInfo {
    pub name: String,
    pub description: Option<String>,
    pub heldout: bool,
    pub train: usize,
    pub eval: usize,
    pub test: usize,
    pub labels: Vec<String>,
}

/// Everything `report` needs: `NAME.json`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Results {
    pub schema_version: u32,
    pub experiment: String,
    pub xpm_version: String,
    pub config: Config,
    /// Seeds whose every step finished.
    pub seeds_done: Vec<u64>,
    pub tasks: Vec<TaskInfo>,
    pub records: Vec<Record>,
    pub overlap: Vec<OverlapRecord>,
    /// Wall seconds spent per command (`train`, `eval`, `merge`, …), summed.
    pub seconds: BTreeMap<String, f64>,
    /// Mean wall seconds of one `xpm train` per method (head included).
    pub train_seconds: BTreeMap<String, f64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    /// sha256 of the experiment file's meaning (its parsed config as JSON).
    config_digest: String,
    steps: BTreeMap<String, Step>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Step {
    seconds: f64,
    output: Value,
}

/// Options of `xpm experiment run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub file: PathBuf,
    /// Work directory [default: $XPM_HOME/experiments/NAME].
    pub work: Option<PathBuf>,
    /// Results directory [default: the file's `out`, else WORK/results].
    pub out: Option<PathBuf>,
    /// Overrides the file's `data_dir`.
    pub data_dir: Option<PathBuf>,
    /// Start over: delete the work directory's earlier steps.
    pub fresh: bool,
    /// The xpm binary to run [default: this one].
    pub exe: Option<PathBuf>,
}

struct Runner<'a> {
    exe: PathBuf,
    work: PathBuf,
    home: PathBuf,
    state: State,
    printer: &'a Printer,
    done: usize,
    total: usize,
}

impl Runner<'_> {
    /// Run `xpm ARGS` (in `cwd`) unless `key` already ran; its stdout parsed as JSON (or the
    /// text as a string).
    fn xpm(&mut self, key: &str, what: &str, args: &[String], cwd: Option<&Path>) -> Result<Value> {
        self.done += 1;
        if let Some(s) = self.state.steps.get(key) {
            return Ok(s.output.clone());
        }
        self.printer
            .status("Running", format!("[{}/{}] {what}", self.done, self.total));
        let logs = self.work.join("logs");
        std::fs::create_dir_all(&logs).at("create directory", &logs)?;
        let log = logs.join(format!("{}.log", key.replace(['/', ' '], "_")));
        let err = std::fs::File::create(&log).at("create", &log)?;
        let t0 = Instant::now();
        let mut cmd = Command::new(&self.exe);
        cmd.arg("--home")
            .arg(&self.home)
            .args(args)
            .stdin(Stdio::null())
            .stderr(err);
        if let Some(d) = cwd {
            cmd.current_dir(d);
        }
        let out = cmd.output().map_err(|e| Error::io("run", &self.exe, e))?;
        let seconds = t0.elapsed().as_secs_f64();
        let mut line = format!("$ xpm {}\n", args.join(" "));
        line.push_str(&String::from_utf8_lossy(&out.stdout));
        let stderr_text = std::fs::read_to_string(&log).unwrap_or_default();
        crate::fsutil::write_atomic(&log, format!("{line}\n{stderr_text}").as_bytes())?;
        if !out.status.success() {
            let tail: Vec<&str> = stderr_text.lines().rev().take(8).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(Error::input(
                format!(
                    "step `{key}` failed ({}): xpm {}\n{}",
                    out.status,
                    args.join(" "),
                    tail.join("\n")
                ),
                Some(&format!(
                    "the full log is {}; fix the cause and run the same command again to resume",
                    log.display()
                )),
            ));
        }
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let output = serde_json::from_str(&text).unwrap_or(Value::String(text));
        self.state.steps.insert(
            key.to_string(),
            Step {
                seconds,
                output: output.clone(),
            },
        );
        self.save()?;
        Ok(output)
    }

    fn save(&self) -> Result<()> {
        let p = self.work.join("state.json");
        crate::fsutil::write_atomic(
            &p,
            serde_json::to_string_pretty(&self.state)
                .expect("serializes")
                .as_bytes(),
        )
    }
}

fn s<T: ToString>(v: T) -> String {
    v.to_string()
}

fn metric(v: &Value, key: &str, step: &str) -> Result<f64> {
    v.get(key).and_then(Value::as_f64).ok_or_else(|| {
        Error::input(
            format!("step `{step}` gave no `{key}` in its JSON answer"),
            Some("run with --fresh if the work directory comes from another xpm version"),
        )
    })
}

/// Run the experiment `opts.file` describes; the results. The steps run in order: split every
/// task's data, then per seed the base + head baselines and, per method, the task experts
/// (train, publish, evaluate), their installation into a project, their overlap and every
/// merge; results are written after each seed. A step done in an earlier run (same
/// configuration, same work directory) is not run again.
pub fn run(opts: &RunOptions, home: &crate::home::XpmHome, printer: &Printer) -> Result<Results> {
    let mut x = Experiment::open(opts, home, printer)?;
    x.import_data()?;
    for &seed in &x.cfg.seeds.clone() {
        let heads = x.heads(seed)?;
        for m in &x.cfg.methods.clone() {
            let files = x.experts(seed, m)?;
            let (project, names) = x.install(seed, m, &files)?;
            x.overlap(seed, m, &files, &names, &project)?;
            x.merges(seed, m, &files, &names, &project, &heads)?;
        }
        x.seeds_done.push(seed);
        report::write_all(&x.results(), &x.out_dir, printer)?;
    }
    let results = x.results();
    printer.status(
        "Finished",
        format!(
            "{} in {:.0} min of commands; results in {}",
            x.cfg.name,
            results.seconds.values().sum::<f64>() / 60.0,
            x.out_dir.display()
        ),
    );
    Ok(results)
}

/// An experiment in progress: its configuration, where everything lives, the step runner and
/// the records so far.
struct Experiment<'a> {
    cfg: Config,
    r: Runner<'a>,
    /// The base model: a directory path or `hf:…`.
    base: String,
    data_dir: PathBuf,
    work: PathBuf,
    out_dir: PathBuf,
    tasks: Vec<TaskInfo>,
    records: Vec<Record>,
    overlap: Vec<OverlapRecord>,
    seeds_done: Vec<u64>,
}

/// One task expert of a method: (task, expert name, file).
type ExpertFile = (String, String, PathBuf);

impl<'a> Experiment<'a> {
    /// Resolve the paths, check the base, and open (or start) the work directory's state.
    fn open(opts: &RunOptions, home: &crate::home::XpmHome, printer: &'a Printer) -> Result<Self> {
        let cfg = Config::load(&opts.file)?;
        let file_dir = opts
            .file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        // Steps run in other directories (the install projects): every path is made absolute.
        let abs = |p: PathBuf| std::path::absolute(&p).at("resolve", &p);
        let file_dir = abs(if file_dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            file_dir
        })?;
        let data_dir = match (&opts.data_dir, &cfg.data_dir) {
            (Some(d), _) => abs(d.clone())?,
            (None, Some(d)) => resolve(&file_dir, d)?,
            (None, None) => file_dir.clone(),
        };
        let work = abs(opts
            .work
            .clone()
            .unwrap_or_else(|| home.root.join("experiments").join(&cfg.name)))?;
        let out_dir = match (&opts.out, &cfg.out) {
            (Some(o), _) => abs(o.clone())?,
            (None, Some(o)) => resolve(&file_dir, o)?,
            (None, None) => work.join("results"),
        };
        let base = if cfg.base.starts_with("hf:") {
            cfg.base.clone()
        } else {
            let p = resolve(&data_dir, &cfg.base)?;
            if !p.join("config.json").is_file() {
                return Err(Error::input(
                    format!("base model `{}` is not a model directory", p.display()),
                    Some(
                        "run scripts/fetch-assets.sh (it downloads MiniLM and the data sets), or set data_dir / --data-dir",
                    ),
                ));
            }
            p.display().to_string()
        };
        if opts.fresh && work.exists() {
            std::fs::remove_dir_all(&work).at("remove", &work)?;
        }
        std::fs::create_dir_all(&work).at("create directory", &work)?;
        let state = open_state(&cfg, &work, &opts.file)?;
        let exe = match &opts.exe {
            Some(e) => e.clone(),
            None => std::env::current_exe().map_err(|e| Error::io("locate", "xpm", e))?,
        };
        let r = Runner {
            exe,
            home: work.join("home"),
            work: work.clone(),
            state,
            printer,
            done: 0,
            total: step_count(&cfg),
        };
        printer.status(
            "Experiment",
            format!(
                "{}: {} tasks × {} methods × {} seeds ({} steps; work in {})",
                cfg.name,
                cfg.tasks.len(),
                cfg.methods.len(),
                cfg.seeds.len(),
                r.total,
                work.display()
            ),
        );
        for d in ["data", "experts", "merged"] {
            let d = work.join(d);
            std::fs::create_dir_all(&d).at("create directory", &d)?;
        }
        Ok(Experiment {
            cfg,
            r,
            base,
            data_dir,
            work,
            out_dir,
            tasks: Vec::new(),
            records: Vec::new(),
            overlap: Vec::new(),
            seeds_done: Vec::new(),
        })
    }

    /// Every task split once (the same split for every seed).
    fn import_data(&mut self) -> Result<()> {
        let data = self.work.join("data");
        let all: Vec<(TaskConfig, bool)> = self
            .cfg
            .tasks
            .iter()
            .map(|t| (t.clone(), false))
            .chain(self.cfg.heldout.iter().map(|t| (t.clone(), true)))
            .collect();
        for (t, heldout) in all {
            let info = import_task(&mut self.r, &self.cfg, &t, heldout, &self.data_dir, &data)?;
            self.tasks.push(info);
        }
        Ok(())
    }

    fn split(&self, task: &str, part: &str) -> PathBuf {
        self.work.join("data").join(format!("{task}.{part}.jsonl"))
    }

    /// `xpm train` for one (task, seed): the shared settings, then the method's arguments.
    fn train_args(
        &self,
        seed: u64,
        task: &str,
        name: &str,
        file: &Path,
        extra: &[String],
    ) -> Vec<String> {
        let cfg = &self.cfg;
        let mut a = vec![
            s("train"),
            s("--base"),
            self.base.clone(),
            s("--seed"),
            s(seed),
            s("--epochs"),
            s(cfg.epochs),
            s("--batch-size"),
            s(cfg.batch_size),
            s("--max-seq-len"),
            s(cfg.max_seq_len),
            s("--json"),
            s("--data"),
            self.split(task, "train").display().to_string(),
            s("--eval"),
            self.split(task, "eval").display().to_string(),
            s("--name"),
            name.to_string(),
            s("--version"),
            s("1.0.0"),
            s("-o"),
            file.display().to_string(),
        ];
        a.extend(extra.iter().cloned());
        a
    }

    /// `xpm eval` of an expert (and a merge) on a task's test split.
    fn eval_args(&self, expert: &Path, merged: Option<&Path>, task: &str) -> Vec<String> {
        self.eval_args_on(expert, merged, task, "test")
    }

    /// `xpm eval` of an expert (and a merge) on one split (`eval` or `test`) of a task.
    fn eval_args_on(
        &self,
        expert: &Path,
        merged: Option<&Path>,
        task: &str,
        part: &str,
    ) -> Vec<String> {
        let mut a = vec![
            s("eval"),
            s("--base"),
            self.base.clone(),
            s("--expert"),
            expert.display().to_string(),
            s("--data"),
            self.split(task, part).display().to_string(),
            s("--batch-size"),
            s(self.cfg.eval_batch_size),
            s("--json"),
        ];
        if let Some(m) = merged {
            a.extend([s("--merged"), m.display().to_string()]);
        }
        a
    }

    /// Run an evaluation step and keep its record.
    fn eval(&mut self, key: &str, what: &str, args: &[String], at: RecordAt<'_>) -> Result<()> {
        let v = self.r.xpm(key, what, args, None)?;
        self.records.push(Record {
            seed: at.seed,
            task: at.task.into(),
            method: at.method.into(),
            setting: at.setting,
            strategy: at.strategy.map(String::from),
            merged_tasks: at.k,
            lambda: at.lambda,
            accuracy: metric(&v, "accuracy", key)?,
            macro_f1: metric(&v, "macro_f1", key)?,
            examples: metric(&v, "examples", key)? as usize,
        });
        Ok(())
    }

    /// Base + head only, on every task (the held-out task's head is the one merges use).
    fn heads(&mut self, seed: u64) -> Result<BTreeMap<String, PathBuf>> {
        let mut heads = BTreeMap::new();
        let tasks: Vec<String> = self.tasks.iter().map(|t| t.name.clone()).collect();
        for task in tasks {
            let name = format!("{task}-head-s{seed}");
            let file = self.work.join("experts").join(format!("{name}-1.0.0.xpm"));
            let mut extra = vec![s("--method"), s("head")];
            extra.extend(self.cfg.head_args.iter().cloned());
            let a = self.train_args(seed, &task, &name, &file, &extra);
            self.r.xpm(
                &format!("train/{name}"),
                &format!("train a head on the base for {task} (seed {seed})"),
                &a,
                None,
            )?;
            let a = self.eval_args(&file, None, &task);
            let at = RecordAt::new(seed, &task, "head", Setting::Head);
            self.eval(
                &format!("eval/{name}"),
                &format!("evaluate base + head on {task}"),
                &a,
                at,
            )?;
            heads.insert(task, file);
        }
        Ok(heads)
    }

    /// Train, publish and evaluate every task's expert of method `m`.
    fn experts(&mut self, seed: u64, m: &MethodConfig) -> Result<Vec<ExpertFile>> {
        let mut files = Vec::new();
        let tasks: Vec<String> = self.cfg.tasks.iter().map(|t| t.name.clone()).collect();
        for task in tasks {
            let name = format!("{task}-{}-s{seed}", m.name);
            let file = self.work.join("experts").join(format!("{name}-1.0.0.xpm"));
            let a = self.train_args(seed, &task, &name, &file, &m.args);
            self.r.xpm(
                &format!("train/{name}"),
                &format!("train {} on {task} (seed {seed})", m.name),
                &a,
                None,
            )?;
            self.r.xpm(
                &format!("publish/{name}"),
                &format!("publish {name}@1.0.0"),
                &[s("publish"), file.display().to_string()],
                None,
            )?;
            let a = self.eval_args(&file, None, &task);
            let at = RecordAt::new(seed, &task, &m.name, Setting::Single);
            self.eval(
                &format!("eval/{name}"),
                &format!("evaluate {name} on {task}"),
                &a,
                at,
            )?;
            files.push((task, name, file));
        }
        Ok(files)
    }

    /// Install the set into a project, from the registry, as a team member would. Returns the
    /// project directory and the experts' names.
    fn install(
        &mut self,
        seed: u64,
        m: &MethodConfig,
        files: &[ExpertFile],
    ) -> Result<(PathBuf, Vec<String>)> {
        let project = self
            .work
            .join("projects")
            .join(format!("{}-s{seed}", m.name));
        std::fs::create_dir_all(&project).at("create directory", &project)?;
        let tag = format!("{}-s{seed}", m.name);
        if !project.join("xpm.toml").exists() {
            self.r.state.steps.remove(&format!("init/{tag}"));
        }
        self.r.xpm(
            &format!("init/{tag}"),
            &format!("init a project for {tag}"),
            &[s("init")],
            Some(&project),
        )?;
        let mut a = vec![s("install"), s("--json")];
        a.extend(files.iter().map(|(_, n, _)| format!("{n}@=1.0.0")));
        self.r.xpm(
            &format!("install/{tag}"),
            &format!("install the {} {} experts", files.len(), m.name),
            &a,
            Some(&project),
        )?;
        Ok((project, files.iter().map(|(_, n, _)| n.clone()).collect()))
    }

    /// Mask overlap of the installed experts (sparse methods: the others overlap fully).
    fn overlap(
        &mut self,
        seed: u64,
        m: &MethodConfig,
        files: &[ExpertFile],
        names: &[String],
        project: &Path,
    ) -> Result<()> {
        if !m
            .args
            .windows(2)
            .any(|w| w[0] == "--method" && w[1] == "sparse")
        {
            self.r.done += 1;
            return Ok(());
        }
        let tag = format!("{}-s{seed}", m.name);
        let mut a = vec![s("overlap"), s("--json")];
        a.extend(names.iter().cloned());
        let key = format!("overlap/{tag}");
        let v = self.r.xpm(
            &key,
            &format!("overlap of the {tag} experts"),
            &a,
            Some(project),
        )?;
        self.overlap
            .push(overlap_record(seed, &m.name, files, &v, &key)?);
        Ok(())
    }

    /// Every merge of method `m`'s experts (each strategy, each count k), evaluated on the
    /// merged tasks and, for the merge of all of them, on the held-out task.
    fn merges(
        &mut self,
        seed: u64,
        m: &MethodConfig,
        files: &[ExpertFile],
        names: &[String],
        project: &Path,
        heads: &BTreeMap<String, PathBuf>,
    ) -> Result<()> {
        let n_tasks = self.cfg.tasks.len();
        for st in &m.strategies {
            for k in self.cfg.counts_for(st) {
                let mname = format!("{}-{st}-k{k}-s{seed}", m.name);
                let mfile = self.work.join("merged").join(format!("{mname}.xpm"));
                let mut a = vec![s("merge"), s("--strategy"), st.clone()];
                a.extend(m.merge_args.get(st).into_iter().flatten().cloned());
                let lambda = if self.cfg.tune_lambda.contains(st) {
                    let l = self.tune_lambda(seed, m, st, k, files, names, project)?;
                    a.extend([s("--param"), format!("lambda={l}")]);
                    Some(l)
                } else {
                    None
                };
                a.extend([
                    s("--name"),
                    mname.clone(),
                    s("--version"),
                    s("1.0.0"),
                    s("-o"),
                    mfile.display().to_string(),
                ]);
                a.extend(names[..k].iter().cloned());
                if !mfile.exists() {
                    self.r.state.steps.remove(&format!("merge/{mname}"));
                }
                self.r.xpm(
                    &format!("merge/{mname}"),
                    &format!("merge {k} {} experts with {st}", m.name),
                    &a,
                    Some(project),
                )?;
                for (task, _, file) in &files[..k] {
                    let a = self.eval_args(file, Some(&mfile), task);
                    let mut at = RecordAt::new(seed, task, &m.name, Setting::Merged).merge(st, k);
                    at.lambda = lambda;
                    self.eval(
                        &format!("eval/{mname}/{task}"),
                        &format!("evaluate {mname} on {task}"),
                        &a,
                        at,
                    )?;
                }
                if let (true, Some(h)) = (k == n_tasks, self.cfg.heldout.clone()) {
                    let a = self.eval_args(&heads[&h.name], Some(&mfile), &h.name);
                    let mut at =
                        RecordAt::new(seed, &h.name, &m.name, Setting::Heldout).merge(st, k);
                    at.lambda = lambda;
                    self.eval(
                        &format!("eval/{mname}/{}", h.name),
                        &format!("evaluate {mname} on held-out {}", h.name),
                        &a,
                        at,
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Choose `lambda` for the merge of the first `k` experts of `m` with `st`: merge with every
    /// value of `lambda_grid`, evaluate on the merged tasks' eval splits, and return the value
    /// with the highest mean eval accuracy (ties: the first, i.e. the grid's order). The
    /// trial merges are deleted once evaluated.
    #[allow(clippy::too_many_arguments)]
    fn tune_lambda(
        &mut self,
        seed: u64,
        m: &MethodConfig,
        st: &str,
        k: usize,
        files: &[ExpertFile],
        names: &[String],
        project: &Path,
    ) -> Result<f64> {
        let dir = self.work.join("merged").join("tune");
        std::fs::create_dir_all(&dir).at("create directory", &dir)?;
        let mut best: Option<(f64, f64)> = None;
        for &l in &self.cfg.lambda_grid.clone() {
            // Expert names hold no `.`: λ = 0.25 is written `l0_25`.
            let tname = format!(
                "{}-{st}-k{k}-l{}-s{seed}",
                m.name,
                l.to_string().replace('.', "_")
            );
            let tfile = dir.join(format!("{tname}.xpm"));
            let eval_key = |task: &str| format!("tune/eval/{tname}/{task}");
            let evaluated = files[..k]
                .iter()
                .all(|(task, _, _)| self.r.state.steps.contains_key(&eval_key(task)));
            if !evaluated && !tfile.exists() {
                self.r.state.steps.remove(&format!("tune/merge/{tname}"));
            }
            let mut a = vec![s("merge"), s("--strategy"), s(st)];
            a.extend(m.merge_args.get(st).into_iter().flatten().cloned());
            a.extend([s("--param"), format!("lambda={l}")]);
            a.extend([
                s("--name"),
                tname.clone(),
                s("--version"),
                s("1.0.0"),
                s("-o"),
                tfile.display().to_string(),
            ]);
            a.extend(names[..k].iter().cloned());
            self.r.xpm(
                &format!("tune/merge/{tname}"),
                &format!("merge {k} {} experts with {st}, λ = {l} (tuning)", m.name),
                &a,
                Some(project),
            )?;
            let mut sum = 0.0;
            for (task, _, file) in &files[..k] {
                let a = self.eval_args_on(file, Some(&tfile), task, "eval");
                let key = eval_key(task);
                let v = self.r.xpm(
                    &key,
                    &format!("evaluate {tname} on {task}'s eval split"),
                    &a,
                    None,
                )?;
                sum += metric(&v, "accuracy", &key)?;
            }
            let _ = std::fs::remove_file(&tfile);
            let mean = sum / k as f64;
            if best.is_none_or(|(b, _)| mean > b) {
                best = Some((mean, l));
            }
        }
        let (acc, l) = best.expect("lambda_grid is not empty");
        self.r.printer.status(
            "Chose",
            format!(
                "λ = {l} for {} {st} k = {k} (seed {seed}): mean eval accuracy {:.1} %",
                m.name,
                acc * 100.0
            ),
        );
        Ok(l)
    }

    fn results(&self) -> Results {
        collect(
            &self.cfg,
            &self.r,
            &self.tasks,
            &self.records,
            &self.overlap,
            &self.seeds_done,
        )
    }
}

/// Where an evaluation's record belongs.
struct RecordAt<'s> {
    seed: u64,
    task: &'s str,
    method: &'s str,
    setting: Setting,
    strategy: Option<&'s str>,
    k: Option<usize>,
    lambda: Option<f64>,
}

impl<'s> RecordAt<'s> {
    fn new(seed: u64, task: &'s str, method: &'s str, setting: Setting) -> Self {
        RecordAt {
            seed,
            task,
            method,
            setting,
            strategy: None,
            k: None,
            lambda: None,
        }
    }

    fn merge(self, strategy: &'s str, k: usize) -> Self {
        RecordAt {
            strategy: Some(strategy),
            k: Some(k),
            ..self
        }
    }
}

/// The work directory's state: resumed when it belongs to this configuration.
fn open_state(cfg: &Config, work: &Path, file: &Path) -> Result<State> {
    let digest = crate::digest::sha256(&serde_json::to_vec(cfg).expect("serializes"));
    let state_path = work.join("state.json");
    if !state_path.exists() {
        return Ok(State {
            config_digest: digest,
            steps: BTreeMap::new(),
        });
    }
    let st: State = serde_json::from_slice(&std::fs::read(&state_path).at("read", &state_path)?)
        .map_err(|e| {
            Error::input(
                format!("`{}` is damaged: {e}", state_path.display()),
                Some("run with --fresh to start over"),
            )
        })?;
    if st.config_digest != digest {
        return Err(Error::input(
            format!(
                "`{}` holds a run of a different version of `{}`",
                work.display(),
                file.display()
            ),
            Some("pass --fresh to start over, or --work DIR for a new work directory"),
        ));
    }
    Ok(st)
}

/// How many steps the whole experiment has (for the progress count).
fn step_count(cfg: &Config) -> usize {
    let n_tasks = cfg.tasks.len();
    let merges_per_seed: usize = cfg
        .methods
        .iter()
        .map(|m| {
            m.strategies
                .iter()
                .map(|st| {
                    cfg.counts_for(st)
                        .iter()
                        .map(|&k| {
                            let tune = if cfg.tune_lambda.iter().any(|t| t == st) {
                                cfg.lambda_grid.len() * (1 + k)
                            } else {
                                0
                            };
                            tune + 1 + k + usize::from(k == n_tasks && cfg.heldout.is_some())
                        })
                        .sum::<usize>()
                })
                .sum::<usize>()
                + 3
        })
        .sum();
    let all_tasks = n_tasks + usize::from(cfg.heldout.is_some());
    let per_seed = all_tasks * 2 + cfg.methods.len() * n_tasks * 3 + merges_per_seed;
    all_tasks * 2 + per_seed * cfg.seeds.len()
}

fn collect(
    cfg: &Config,
    r: &Runner,
    tasks: &[TaskInfo],
    records: &[Record],
    overlap: &[OverlapRecord],
    seeds_done: &[u64],
) -> Results {
    let mut seconds = BTreeMap::new();
    let mut train: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for (k, st) in &r.state.steps {
        let cmd = k.split('/').next().unwrap_or(k).to_string();
        *seconds.entry(cmd.clone()).or_insert(0.0) += st.seconds;
        if cmd == "train" {
            // train/TASK-METHOD-sSEED
            let rest = &k["train/".len()..];
            let method = cfg
                .methods
                .iter()
                .map(|m| m.name.as_str())
                .chain(["head"])
                .find(|m| rest.contains(&format!("-{m}-s")))
                .unwrap_or("?")
                .to_string();
            let e = train.entry(method).or_insert((0.0, 0));
            e.0 += st.seconds;
            e.1 += 1;
        }
    }
    Results {
        schema_version: 1,
        experiment: cfg.name.clone(),
        xpm_version: env!("CARGO_PKG_VERSION").into(),
        config: cfg.clone(),
        seeds_done: seeds_done.to_vec(),
        tasks: tasks.to_vec(),
        records: records.to_vec(),
        overlap: overlap.to_vec(),
        seconds,
        train_seconds: train
            .into_iter()
            .map(|(m, (s, n))| (m, s / n as f64))
            .collect(),
    }
}

fn import_task(
    r: &mut Runner,
    cfg: &Config,
    t: &TaskConfig,
    heldout: bool,
    data_dir: &Path,
    data: &Path,
) -> Result<TaskInfo> {
    let out = |s: &str| data.join(format!("{}.{s}.jsonl", t.name));
    let table = resolve(data_dir, &t.table)?;
    let mut common = Vec::new();
    for (flag, v) in [
        ("--text", &t.text),
        ("--label", &t.label),
        ("--bins", &t.bins),
    ] {
        if let Some(v) = v {
            common.extend([s(flag), v.clone()]);
        }
    }
    if !t.labels.is_empty() {
        common.extend([s("--labels"), t.labels.join(",")]);
    }
    common.extend([s("--seed"), s(cfg.data_seed), s("--json")]);
    let missing = ["train", "eval", "test"]
        .iter()
        .any(|s| !out(s).exists() && (*s != "eval" || t.eval > 0));
    let keys = [
        format!("import/{}", t.name),
        format!("import/{}.test", t.name),
    ];
    if missing {
        for k in &keys {
            r.state.steps.remove(k);
        }
    }
    let mut a = vec![
        s("data"),
        s("import"),
        table.display().to_string(),
        s("-o"),
        out("train").display().to_string(),
    ];
    let rows = t.train + t.eval + if t.test_table.is_none() { t.test } else { 0 };
    a.extend([s("--limit"), s(rows)]);
    if t.eval > 0 {
        a.extend([
            s("--eval-out"),
            out("eval").display().to_string(),
            s("--eval-ratio"),
            s(t.eval as f64 / rows as f64),
        ]);
    }
    if t.test_table.is_none() {
        a.extend([
            s("--test-out"),
            out("test").display().to_string(),
            s("--test-ratio"),
            s(t.test as f64 / rows as f64),
        ]);
    }
    a.extend(common.iter().cloned());
    let v = r.xpm(&keys[0], &format!("import {}", t.name), &a, None)?;
    let count = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0) as usize;
    let mut info = TaskInfo {
        name: t.name.clone(),
        description: t.description.clone(),
        heldout,
        train: count(&v, "train"),
        eval: count(&v, "eval"),
        test: count(&v, "test"),
        labels: v
            .get("labels")
            .and_then(Value::as_array)
            .map(|l| {
                l.iter()
                    .filter_map(|p| p.get(0).and_then(Value::as_str).map(String::from))
                    .collect()
            })
            .unwrap_or_default(),
    };
    if let Some(tt) = &t.test_table {
        let mut a = vec![
            s("data"),
            s("import"),
            resolve(data_dir, tt)?.display().to_string(),
            s("-o"),
            out("test").display().to_string(),
            s("--limit"),
            s(t.test),
        ];
        a.extend(common);
        let v = r.xpm(&keys[1], &format!("import {} (test)", t.name), &a, None)?;
        info.test = count(&v, "train");
    } else {
        r.done += 1;
    }
    Ok(info)
}

fn overlap_record(
    seed: u64,
    method: &str,
    files: &[(String, String, PathBuf)],
    v: &Value,
    key: &str,
) -> Result<OverlapRecord> {
    let overall = v.get("overall").ok_or_else(|| {
        Error::input(
            format!("step `{key}` gave no `overall` overlap"),
            Some("run with --fresh"),
        )
    })?;
    let n = files.len();
    let (mut sum, mut cnt) = (vec![0.0; n], vec![0usize; n]);
    for p in overall
        .get("pairs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let (a, b) = (
            p.get("a").and_then(Value::as_u64).unwrap_or(0) as usize,
            p.get("b").and_then(Value::as_u64).unwrap_or(0) as usize,
        );
        let j = p.get("jaccard").and_then(Value::as_f64).unwrap_or(0.0);
        for i in [a, b] {
            if i < n {
                sum[i] += j;
                cnt[i] += 1;
            }
        }
    }
    let union = metric(overall, "union", key)?;
    let shared = metric(overall, "shared", key)?;
    Ok(OverlapRecord {
        seed,
        method: method.into(),
        tasks: files.iter().map(|(t, _, _)| t.clone()).collect(),
        mean_jaccard: sum
            .iter()
            .zip(&cnt)
            .map(|(s, &c)| if c > 0 { s / c as f64 } else { 0.0 })
            .collect(),
        shared_fraction: if union > 0.0 { shared / union } else { 0.0 },
    })
}
