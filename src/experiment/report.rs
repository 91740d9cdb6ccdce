//! Tables (Markdown) and the scaling plot (PNG) from an experiment's raw results.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use super::{OverlapRecord, Record, Results, Setting};
use crate::error::{Error, IoResultExt, Result};
use crate::printer::Printer;

/// Write `NAME.json`, `NAME.md` and `NAME.png` into `dir`; their paths.
pub fn write_all(results: &Results, dir: &Path, printer: &Printer) -> Result<[PathBuf; 3]> {
    std::fs::create_dir_all(dir).at("create directory", dir)?;
    let name = &results.experiment;
    let json = dir.join(format!("{name}.json"));
    let md = dir.join(format!("{name}.md"));
    let png = dir.join(format!("{name}.png"));
    crate::fsutil::write_atomic(
        &json,
        (serde_json::to_string_pretty(results).expect("serializes") + "\n").as_bytes(),
    )?;
    crate::fsutil::write_atomic(&md, markdown(results, &png).as_bytes())?;
    plot(results, &png)?;
    printer.status(
        "Wrote",
        format!(
            "{}, {} and {} ({} seed(s) done)",
            json.display(),
            md.display(),
            png.display(),
            results.seeds_done.len()
        ),
    );
    Ok([json, md, png])
}

/// Read `NAME.json` written by `run`.
pub fn load(path: &Path) -> Result<Results> {
    let bytes = std::fs::read(path).at("read", path)?;
    serde_json::from_slice(&bytes).map_err(|e| {
        Error::input(
            format!("`{}` is not an experiment result file: {e}", path.display()),
            Some("pass the NAME.json that `xpm experiment run` wrote"),
        )
    })
}

/// Mean and sample standard deviation.
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let m = v.iter().sum::<f64>() / n;
    let s = if v.len() > 1 {
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (m, s)
}

/// Pearson correlation (NaN with fewer than 3 points or no spread).
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    if x.len() < 3 || x.len() != y.len() {
        return f64::NAN;
    }
    let (mx, _) = mean_std(x);
    let (my, _) = mean_std(y);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx).powi(2);
        syy += (b - my).powi(2);
    }
    if sxx == 0.0 || syy == 0.0 {
        return f64::NAN;
    }
    sxy / (sxx * syy).sqrt()
}

/// `88.7 ± 1.2` (percent) over seeds; a single value without ±; `–` for none.
fn pct(v: &[f64]) -> String {
    match v.len() {
        0 => "–".into(),
        1 => format!("{:.1}", v[0] * 100.0),
        _ => {
            let (m, s) = mean_std(v);
            format!("{:.1} ± {:.1}", m * 100.0, s * 100.0)
        }
    }
}

/// Lookups over the records.
struct View<'a> {
    r: &'a Results,
    tasks: Vec<&'a str>,
}

impl<'a> View<'a> {
    fn new(r: &'a Results) -> Self {
        View {
            r,
            tasks: r
                .tasks
                .iter()
                .filter(|t| !t.heldout)
                .map(|t| t.name.as_str())
                .collect(),
        }
    }

    fn find(&self, f: impl Fn(&Record) -> bool) -> Vec<&'a Record> {
        self.r.records.iter().filter(|r| f(r)).collect()
    }

    /// Accuracy of `task` per seed in one setting.
    fn per_seed(
        &self,
        task: &str,
        method: &str,
        setting: Setting,
        strategy: Option<&str>,
        k: Option<usize>,
    ) -> BTreeMap<u64, f64> {
        self.find(|r| {
            r.task == task
                && r.method == method
                && r.setting == setting
                && r.strategy.as_deref() == strategy
                && r.merged_tasks == k
        })
        .into_iter()
        .map(|r| (r.seed, r.accuracy))
        .collect()
    }

    fn single(&self, task: &str, method: &str) -> BTreeMap<u64, f64> {
        if method == "head" {
            self.per_seed(task, "head", Setting::Head, None, None)
        } else {
            self.per_seed(task, method, Setting::Single, None, None)
        }
    }

    /// Per seed: mean accuracy over the first `k` tasks merged with `strategy`, and the mean of
    /// merged / single accuracy over the same tasks. Only seeds with every task present.
    fn merged_means(&self, method: &str, strategy: &str, k: usize) -> (Vec<f64>, Vec<f64>) {
        let (mut abs, mut norm) = (Vec::new(), Vec::new());
        for &seed in &self.r.seeds_done {
            let mut a = Vec::new();
            let mut n = Vec::new();
            for t in &self.tasks[..k.min(self.tasks.len())] {
                let m = self
                    .per_seed(t, method, Setting::Merged, Some(strategy), Some(k))
                    .get(&seed)
                    .copied();
                let s = self.single(t, method).get(&seed).copied();
                if let (Some(m), Some(s)) = (m, s) {
                    a.push(m);
                    n.push(if s > 0.0 { m / s } else { f64::NAN });
                }
            }
            if a.len() == k {
                abs.push(mean_std(&a).0);
                norm.push(mean_std(&n).0);
            }
        }
        (abs, norm)
    }
}

fn vals(m: &BTreeMap<u64, f64>) -> Vec<f64> {
    m.values().copied().collect()
}

/// The tables.
pub fn markdown(r: &Results, png: &Path) -> String {
    let v = View::new(r);
    let mut md = String::new();
    let w = &mut md;
    write_intro(w, r);
    write_tasks(w, r);
    write_single(w, &v);
    write_merged(w, &v);
    write_scaling(w, &v, png);
    write_lambdas(w, &v);
    write_heldout(w, &v);
    write_overlap(w, &v);
    write_cost(w, r);
    md
}

/// The generated-file comment and the run's settings.
fn write_intro(w: &mut String, r: &Results) {
    let c = &r.config;
    let seeds = r.seeds_done.len();
    let _ = writeln!(
        w,
        "<!-- Generated by `xpm experiment` from {}.json; regenerate with `xpm experiment report`. -->\n",
        r.experiment
    );
    let _ = writeln!(
        w,
        "Experiment `{}` (xpm {}): base `{}`; {} seed(s) done of {:?}; {} epoch(s), batch {}, \
         sequence length {}. Accuracy on each task's test split, in %, mean ± sample std over \
         seeds.\n",
        r.experiment, r.xpm_version, c.base, seeds, c.seeds, c.epochs, c.batch_size, c.max_seq_len
    );
}

/// One row per task: its sizes and role.
fn write_tasks(w: &mut String, r: &Results) {
    let _ = writeln!(w, "#### Tasks\n");
    let _ = writeln!(
        w,
        "| task | labels | train | eval | test | role |\n|---|---|---|---|---|---|"
    );
    for t in &r.tasks {
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} |",
            t.name,
            t.labels.len(),
            t.train,
            t.eval,
            t.test,
            if t.heldout {
                "held out of every merge"
            } else {
                "merged"
            }
        );
    }
}

/// The header of a table with one column per merged task and a mean column.
fn write_task_header(w: &mut String, v: &View<'_>, first: &str) {
    let _ = write!(w, "| {first} |");
    for t in &v.tasks {
        let _ = write!(w, " {t} |");
    }
    let _ = writeln!(w, " mean |");
    let _ = writeln!(w, "|{}", "---|".repeat(v.tasks.len() + 2));
}

/// A row of per-task cells (accuracies per seed) and, in bold, the mean over tasks per seed
/// (only seeds with every cell present).
fn write_task_row(w: &mut String, seeds: usize, label: &str, cells: Vec<Vec<f64>>) {
    let per_seed_mean: Vec<f64> = (0..seeds)
        .filter_map(|i| {
            let xs: Vec<f64> = cells.iter().filter_map(|c| c.get(i).copied()).collect();
            (xs.len() == cells.len() && !xs.is_empty()).then(|| mean_std(&xs).0)
        })
        .collect();
    let _ = write!(w, "| {label} |");
    for c in &cells {
        let _ = write!(w, " {} |", pct(c));
    }
    let _ = writeln!(w, " **{}** |", pct(&per_seed_mean));
}

/// Each task's own expert per method, after the base + head baseline.
fn write_single(w: &mut String, v: &View<'_>) {
    let seeds = v.r.seeds_done.len();
    let methods: Vec<&str> = v.r.config.methods.iter().map(|m| m.name.as_str()).collect();
    let _ = writeln!(w, "\n#### Single experts (each task's own expert)\n");
    write_task_header(w, v, "method");
    for m in std::iter::once("head").chain(methods.iter().copied()) {
        let cells: Vec<Vec<f64>> = v.tasks.iter().map(|t| vals(&v.single(t, m))).collect();
        let label = if m == "head" {
            "base + head only".to_string()
        } else {
            m.to_string()
        };
        write_task_row(w, seeds, &label, cells);
    }
}

/// Every (method, strategy) merge of all tasks.
fn write_merged(w: &mut String, v: &View<'_>) {
    let n = v.tasks.len();
    let _ = writeln!(
        w,
        "\n#### Merged: all {n} tasks, one encoder, each task with its own head\n"
    );
    let _ = write!(w, "| method · strategy |");
    for t in &v.tasks {
        let _ = write!(w, " {t} |");
    }
    let _ = writeln!(w, " mean | merged / single |");
    let _ = writeln!(w, "|{}", "---|".repeat(n + 3));
    for m in &v.r.config.methods {
        for st in &m.strategies {
            let _ = write!(w, "| {} · {st} |", m.name);
            for t in &v.tasks {
                let _ = write!(
                    w,
                    " {} |",
                    pct(&vals(&v.per_seed(
                        t,
                        &m.name,
                        Setting::Merged,
                        Some(st),
                        Some(n)
                    )))
                );
            }
            let (abs, norm) = v.merged_means(&m.name, st, n);
            let _ = writeln!(w, " **{}** | {} |", pct(&abs), pct(&norm));
        }
    }
}

/// Merges of the first k tasks, with a link to the plot; nothing with a single count.
fn write_scaling(w: &mut String, v: &View<'_>, png: &Path) {
    let counts = v.r.config.counts();
    if counts.len() <= 1 {
        return;
    }
    let _ = writeln!(
        w,
        "\n#### Scaling: merging the first k tasks (mean accuracy over those k tasks; merged / single in parentheses)\n"
    );
    let _ = write!(w, "| method · strategy |");
    for k in &counts {
        let _ = write!(w, " k = {k} |");
    }
    let _ = writeln!(w, "\n|---|{}", "---|".repeat(counts.len()));
    for (m, st) in scaling_series(v.r) {
        let _ = write!(w, "| {m} · {st} |");
        for &k in &counts {
            let (abs, norm) = v.merged_means(&m, &st, k);
            let _ = write!(w, " {} ({}) |", pct(&abs), pct(&norm));
        }
        let _ = writeln!(w);
    }
    let _ = writeln!(
        w,
        "\n![accuracy against the number of merged tasks]({})",
        png.file_name()
            .map(|f| f.to_string_lossy().to_string())
            .unwrap_or_default()
    );
}

/// The λ chosen on the eval splits (`tune_lambda`), per method, strategy and k: one value per
/// seed, in seed order. Absent when no merge was tuned.
fn write_lambdas(w: &mut String, v: &View<'_>) {
    let tuned = v.find(|r| r.setting == Setting::Merged && r.lambda.is_some());
    if tuned.is_empty() {
        return;
    }
    let counts = v.r.config.counts();
    let _ = writeln!(w, "\n#### λ chosen on the eval splits (per seed)\n");
    let _ = write!(w, "| method · strategy |");
    for k in &counts {
        let _ = write!(w, " k = {k} |");
    }
    let _ = writeln!(w, "\n|---|{}", "---|".repeat(counts.len()));
    let mut rows: Vec<(&str, &str)> = tuned
        .iter()
        .map(|r| (r.method.as_str(), r.strategy.as_deref().unwrap_or("")))
        .collect();
    rows.dedup();
    rows.sort_by_key(|&(m, st)| {
        let i = v.r.config.methods.iter().position(|c| c.name == m);
        (i, st.to_string())
    });
    rows.dedup();
    for (m, st) in rows {
        let _ = write!(w, "| {m} · {st} |");
        for &k in &counts {
            let per_seed: BTreeMap<u64, f64> = tuned
                .iter()
                .filter(|r| {
                    r.method == m && r.strategy.as_deref() == Some(st) && r.merged_tasks == Some(k)
                })
                .map(|r| (r.seed, r.lambda.expect("tuned")))
                .collect();
            let cell: Vec<String> = per_seed.values().map(|l| l.to_string()).collect();
            let _ = write!(w, " {} |", cell.join(", "));
        }
        let _ = writeln!(w);
    }
}

/// The held-out task under each merged encoder, against the base + head baseline.
fn write_heldout(w: &mut String, v: &View<'_>) {
    let Some(h) = v.r.tasks.iter().find(|t| t.heldout) else {
        return;
    };
    let n = v.tasks.len();
    let base = vals(&v.single(&h.name, "head"));
    let _ = writeln!(
        w,
        "\n#### Held-out task `{}` (not in any merge; its head was trained on the base)\n",
        h.name
    );
    let _ = writeln!(
        w,
        "| encoder | accuracy | Δ vs base + head (points) |\n|---|---|---|"
    );
    let _ = writeln!(w, "| base + head only | {} | – |", pct(&base));
    for m in &v.r.config.methods {
        for st in &m.strategies {
            let acc = v.per_seed(&h.name, &m.name, Setting::Heldout, Some(st), Some(n));
            let delta: Vec<f64> = acc
                .iter()
                .filter_map(|(s, a)| v.single(&h.name, "head").get(s).map(|b| a - b))
                .collect();
            let _ = writeln!(
                w,
                "| {} · {st} (all {n} tasks) | {} | {} |",
                m.name,
                pct(&vals(&acc)),
                signed(&delta)
            );
        }
    }
}

/// Mask overlap per sparse method against the accuracy lost by merging; nothing without
/// overlap records.
fn write_overlap(w: &mut String, v: &View<'_>) {
    let r = v.r;
    if r.overlap.is_empty() {
        return;
    }
    let n = v.tasks.len();
    let _ = writeln!(
        w,
        "\n#### Mask overlap (`xpm overlap`) against the accuracy lost by merging all {n} tasks\n"
    );
    let _ = writeln!(
        w,
        "Per sparse method: mean pairwise Jaccard index of the task masks, the share of the masks' union held by two or more experts, and across tasks × seeds the Pearson correlation between a task's mean Jaccard with the others and its drop (single − merged accuracy).\n"
    );
    let _ = writeln!(
        w,
        "| method | mean Jaccard | shared positions | strategy | mean drop (points) | r(Jaccard, drop) |\n|---|---|---|---|---|---|"
    );
    for m in &r.config.methods {
        let recs: Vec<_> = r.overlap.iter().filter(|o| o.method == m.name).collect();
        if recs.is_empty() {
            continue;
        }
        let jac: Vec<f64> = recs.iter().map(|o| mean_std(&o.mean_jaccard).0).collect();
        let shared: Vec<f64> = recs.iter().map(|o| o.shared_fraction).collect();
        for st in &m.strategies {
            let (xs, ys) = jaccard_and_drop(v, &recs, &m.name, st);
            let _ = writeln!(
                w,
                "| {} | {:.4} | {:.1} % | {st} | {} | {} |",
                m.name,
                mean_std(&jac).0,
                mean_std(&shared).0 * 100.0,
                signed(&ys),
                fmt_r(pearson(&xs, &ys), xs.len())
            );
        }
    }
}

/// Across the overlap records' tasks × seeds: each task's mean Jaccard with the others, and its
/// drop (single − merged accuracy with `strategy`), where both accuracies are known.
fn jaccard_and_drop(
    v: &View<'_>,
    recs: &[&OverlapRecord],
    method: &str,
    strategy: &str,
) -> (Vec<f64>, Vec<f64>) {
    let n = v.tasks.len();
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for o in recs {
        for (t, j) in o.tasks.iter().zip(&o.mean_jaccard) {
            let single = v.single(t, method).get(&o.seed).copied();
            let merged = v
                .per_seed(t, method, Setting::Merged, Some(strategy), Some(n))
                .get(&o.seed)
                .copied();
            if let (Some(s), Some(mg)) = (single, merged) {
                xs.push(*j);
                ys.push(s - mg);
            }
        }
    }
    (xs, ys)
}

/// Minutes per command, and seconds per training run.
fn write_cost(w: &mut String, r: &Results) {
    let _ = writeln!(w, "\n#### Cost\n");
    let _ = writeln!(w, "| command | total minutes |\n|---|---|");
    for (cmd, s) in &r.seconds {
        let _ = writeln!(w, "| xpm {cmd} | {:.1} |", s / 60.0);
    }
    let _ = writeln!(
        w,
        "| **all** | **{:.1}** |",
        r.seconds.values().sum::<f64>() / 60.0
    );
    let _ = writeln!(w, "\nMean seconds per `xpm train` run: {}.", {
        let parts: Vec<String> = r
            .train_seconds
            .iter()
            .map(|(m, s)| format!("{m} {s:.1}"))
            .collect();
        parts.join(", ")
    });
}

fn signed(v: &[f64]) -> String {
    if v.is_empty() {
        return "–".into();
    }
    let (m, s) = mean_std(v);
    if v.len() == 1 {
        format!("{:+.1}", m * 100.0)
    } else {
        format!("{:+.1} ± {:.1}", m * 100.0, s * 100.0)
    }
}

fn fmt_r(r: f64, n: usize) -> String {
    if r.is_nan() {
        format!("– (n = {n})")
    } else {
        format!("{r:+.2} (n = {n})")
    }
}

/// (method, strategy) pairs merged at every k.
fn scaling_series(r: &Results) -> Vec<(String, String)> {
    let c = &r.config;
    let mut out = Vec::new();
    for m in &c.methods {
        for st in &m.strategies {
            if c.scaling_strategies.contains(st) {
                out.push((m.name.clone(), st.clone()));
            }
        }
    }
    out
}

fn plot_err<E: std::fmt::Display>(png: &Path) -> impl Fn(E) -> Error + '_ {
    move |e| Error::input(format!("cannot draw `{}`: {e}", png.display()), None)
}

/// One plotted line: its label and, per k, (k, abs mean, abs std, norm mean, norm std).
type Series = (String, Vec<(f64, f64, f64, f64, f64)>);

/// Two panels against the number of merged tasks: mean accuracy over the merged tasks, and
/// merged / single accuracy (1 at k = 1 by definition). Error bars: std over seeds.
pub fn plot(r: &Results, png: &Path) -> Result<()> {
    static FONT: std::sync::Once = std::sync::Once::new();
    FONT.call_once(|| {
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
    let mut counts = vec![1];
    counts.extend(r.config.counts());
    let kmax = *counts.last().expect("non-empty") as f64;
    let (series, lo) = plot_series(r, &counts);
    let lo = ((lo * 10.0).floor() / 10.0).clamp(0.0, 0.9);
    let tmp = png.with_file_name(format!(
        ".{}.tmp.png",
        png.file_stem().unwrap_or_default().to_string_lossy()
    ));
    {
        let root = BitMapBackend::new(&tmp, (1280, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err(png))?;
        let (left, right) = root.split_horizontally(640);
        for (area, normalized) in [(left, false), (right, true)] {
            draw_panel(&area, normalized, &series, kmax, lo, png)?;
        }
        root.present().map_err(plot_err(png))?;
    }
    std::fs::rename(&tmp, png).at("rename", png)?;
    Ok(())
}

/// The points of every scaling series at each k of `counts` (k = 1: the single experts), and
/// the lowest mean − std of any point (at most 1).
fn plot_series(r: &Results, counts: &[usize]) -> (Vec<Series>, f64) {
    let v = View::new(r);
    let mut series = Vec::new();
    let mut lo: f64 = 1.0;
    for (m, st) in scaling_series(r) {
        let mut pts = Vec::new();
        for &k in counts {
            let (abs, norm) = if k == 1 {
                single_means(&v, &m)
            } else {
                v.merged_means(&m, &st, k)
            };
            if abs.is_empty() {
                continue;
            }
            let (am, as_) = mean_std(&abs);
            let (nm, ns) = mean_std(&norm);
            lo = lo.min(am - as_).min(nm - ns);
            pts.push((k as f64, am, as_, nm, ns));
        }
        series.push((format!("{m} · {st}"), pts));
    }
    (series, lo)
}

/// The single experts over all tasks, per seed with every task present; merged / single is 1.
fn single_means(v: &View<'_>, method: &str) -> (Vec<f64>, Vec<f64>) {
    let per_seed: Vec<f64> =
        v.r.seeds_done
            .iter()
            .filter_map(|s| {
                let xs: Vec<f64> = v
                    .tasks
                    .iter()
                    .filter_map(|t| v.single(t, method).get(s).copied())
                    .collect();
                (xs.len() == v.tasks.len()).then(|| mean_std(&xs).0)
            })
            .collect();
    let ones = vec![1.0; per_seed.len()];
    (per_seed, ones)
}

/// One panel: absolute accuracy, or merged / single when `normalized`.
fn draw_panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    normalized: bool,
    series: &[Series],
    kmax: f64,
    lo: f64,
    png: &Path,
) -> Result<()> {
    let (title, ydesc) = if normalized {
        (
            "merged / single-expert accuracy",
            "accuracy relative to each task's own expert",
        )
    } else {
        (
            "accuracy on the merged tasks",
            "test accuracy (mean over merged tasks)",
        )
    };
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(0.6f64..kmax + 0.4, lo..1.02f64)
        .map_err(plot_err(png))?;
    chart
        .configure_mesh()
        .x_desc("number of tasks merged (1 = single experts)")
        .y_desc(ydesc)
        .x_labels(kmax as usize + 1)
        .x_label_formatter(&|x| {
            if (x - x.round()).abs() < 1e-6 {
                format!("{x:.0}")
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| format!("{:.0} %", y * 100.0))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(plot_err(png))?;
    for (i, (label, pts)) in series.iter().enumerate() {
        draw_series(&mut chart, i, label, pts, normalized, png)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::LowerLeft)
        .draw()
        .map_err(plot_err(png))?;
    Ok(())
}

/// Series `i` of a panel: a line with its legend entry, points and error bars.
fn draw_series(
    chart: &mut ChartContext<'_, BitMapBackend<'_>, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    i: usize,
    label: &str,
    pts: &[(f64, f64, f64, f64, f64)],
    normalized: bool,
    png: &Path,
) -> Result<()> {
    let color = Palette99::pick(i).to_rgba();
    let xy: Vec<(f64, f64, f64)> = pts
        .iter()
        .map(|&(k, am, as_, nm, ns)| {
            if normalized {
                (k, nm, ns)
            } else {
                (k, am, as_)
            }
        })
        .collect();
    chart
        .draw_series(LineSeries::new(
            xy.iter().map(|&(x, y, _)| (x, y)),
            color.stroke_width(2),
        ))
        .map_err(plot_err(png))?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    chart
        .draw_series(
            xy.iter()
                .map(|&(x, y, _)| Circle::new((x, y), 4, color.filled())),
        )
        .map_err(plot_err(png))?;
    chart
        .draw_series(
            xy.iter().filter(|p| p.2 > 0.0).map(|&(x, y, s)| {
                ErrorBar::new_vertical(x, y - s, y, y + s, color.stroke_width(1), 8)
            }),
        )
        .map_err(plot_err(png))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics() {
        let (m, s) = mean_std(&[1.0, 2.0, 3.0]);
        assert!((m - 2.0).abs() < 1e-12 && (s - 1.0).abs() < 1e-12);
        assert_eq!(mean_std(&[4.0]), (4.0, 0.0));
        assert!((pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.5]) - 0.9986).abs() < 1e-3);
        assert!(pearson(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]).is_nan());
        assert_eq!(pct(&[0.5]), "50.0");
        assert_eq!(pct(&[0.5, 0.7]), "60.0 ± 14.1");
    }

    #[test]
    fn settings_keep_their_strings() {
        // Result files written when `setting` was a string must read back the same.
        for (s, text) in [
            (Setting::Head, "head"),
            (Setting::Single, "single"),
            (Setting::Merged, "merged"),
            (Setting::Heldout, "heldout"),
        ] {
            let json = format!("\"{text}\"");
            assert_eq!(serde_json::to_string(&s).unwrap(), json);
            assert_eq!(serde_json::from_str::<Setting>(&json).unwrap(), s);
        }
        assert!(serde_json::from_str::<Setting>("\"held-out\"").is_err());
    }
}
