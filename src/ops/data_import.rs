//! `xpm data import`: turn a labelled table (Orange `.tab`, TSV, CSV) into training JSONL,
//! deterministically: rows in file order, an optional seeded shuffle, then `--limit` and the
//! eval split. The same inputs and seed always give the same bytes.

use std::path::{Path, PathBuf};

use crate::error::{Error, IoResultExt, Result};
use crate::rng::SplitMix64;

#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    pub input: PathBuf,
    pub out: PathBuf,
    /// Write this share of the rows (after shuffling) to `eval_out`.
    pub eval_out: Option<PathBuf>,
    pub eval_ratio: f64,
    /// Write this share of the rows (after shuffling, taken before the eval rows) to `test_out`.
    pub test_out: Option<PathBuf>,
    pub test_ratio: f64,
    /// Keep only rows with these labels (after `bins`); empty keeps every label.
    pub labels: Vec<String>,
    /// Text column [default: Orange's first `string` column; else `text`].
    pub text: Option<String>,
    /// Label column [default: Orange's `class` column; else `label`].
    pub label: Option<String>,
    /// Map numeric labels to names: `negative:1-4,neutral:5-6,positive:7-10`.
    pub bins: Option<String>,
    /// Keep at most this many rows (after shuffling).
    pub limit: Option<usize>,
    /// Shuffle with this seed (None keeps file order).
    pub seed: Option<u64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ImportReport {
    pub train: usize,
    pub eval: usize,
    pub test: usize,
    pub skipped: usize,
    /// Rows dropped because their label is not in `labels`.
    pub filtered: usize,
    pub labels: Vec<(String, usize)>,
    pub text_column: String,
    pub label_column: String,
}

struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
    /// Orange: the `class` column and the first string (meta/include) column.
    orange_class: Option<usize>,
    orange_text: Option<usize>,
}

fn read_table(path: &Path) -> Result<Table> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let (delim, orange, quoting) = match ext.as_str() {
        "tab" => (b'\t', true, false),
        "tsv" => (b'\t', false, true),
        "csv" => (b',', false, true),
        _ => {
            return Err(Error::input(
                format!("`{}`: unknown table type `.{ext}`", path.display()),
                Some("xpm imports Orange .tab, .tsv and .csv files"),
            ));
        }
    };
    let file = std::fs::File::open(path).at("open", path)?;
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(delim)
        .quoting(quoting)
        .has_headers(false)
        .flexible(true)
        .from_reader(std::io::BufReader::new(file));
    let mut records = Vec::new();
    for (i, r) in rdr.records().enumerate() {
        let r = r.map_err(|e| Error::input(format!("{}:{}: {e}", path.display(), i + 1), None))?;
        records.push(
            r.iter()
                .map(|s| s.trim_end_matches('\r').to_string())
                .collect::<Vec<_>>(),
        );
    }
    if records.is_empty() {
        return Err(Error::input(format!("`{}` is empty", path.display()), None));
    }
    let header = records.remove(0);
    let (mut orange_class, mut orange_text) = (None, None);
    if orange {
        if records.len() < 2 {
            return Err(Error::input(
                format!("`{}` lacks Orange's type and flag rows", path.display()),
                None,
            ));
        }
        let types = records.remove(0);
        let flags = records.remove(0);
        orange_class = flags
            .iter()
            .position(|f| f.split_whitespace().any(|w| w == "class"));
        let strings: Vec<usize> = (0..header.len())
            .filter(|&i| types.get(i).is_some_and(|t| t == "string" || t == "s"))
            .collect();
        orange_text = strings
            .iter()
            .copied()
            .find(|&i| flags.get(i).is_some_and(|f| f.contains("include=True")))
            .or_else(|| strings.first().copied());
    }
    Ok(Table {
        header,
        rows: records,
        orange_class,
        orange_text,
    })
}

fn parse_bins(spec: &str) -> Result<Vec<(String, f64, f64)>> {
    let bad = || {
        Error::input(
            format!("invalid --bins `{spec}`"),
            Some("write NAME:LOW-HIGH pairs, e.g. `negative:1-4,neutral:5-6,positive:7-10`"),
        )
    };
    spec.split(',')
        .map(|part| {
            let (name, range) = part.split_once(':').ok_or_else(bad)?;
            let (lo, hi) = range.split_once('-').ok_or_else(bad)?;
            let lo: f64 = lo.trim().parse().map_err(|_| bad())?;
            let hi: f64 = hi.trim().parse().map_err(|_| bad())?;
            if name.trim().is_empty() || lo > hi {
                return Err(bad());
            }
            Ok((name.trim().to_string(), lo, hi))
        })
        .collect()
}

pub fn import(opts: &ImportOptions) -> Result<ImportReport> {
    let mut outputs = vec![("-o", opts.out.as_path())];
    outputs.extend(opts.eval_out.as_deref().map(|p| ("--eval-out", p)));
    outputs.extend(opts.test_out.as_deref().map(|p| ("--test-out", p)));
    crate::fsutil::check_outputs(&outputs, &[&opts.input])?;
    let t = read_table(&opts.input)?;
    let ti = find_column(&t, &opts.input, &opts.text, t.orange_text, "text", "text")?;
    let li = find_column(
        &t,
        &opts.input,
        &opts.label,
        t.orange_class,
        "label",
        "label",
    )?;
    let bins = opts.bins.as_deref().map(parse_bins).transpose()?;
    let Selected {
        mut rows,
        skipped,
        filtered,
    } = select_rows(&t, ti, li, bins.as_deref(), &opts.labels);
    if let Some(missing) = opts
        .labels
        .iter()
        .find(|l| !rows.iter().any(|(_, have)| have == *l))
    {
        return Err(Error::input(
            format!(
                "`{}` has no usable row with label `{missing}`",
                opts.input.display()
            ),
            Some("check the spelling in --labels (labels are case-sensitive)"),
        ));
    }
    if let Some(seed) = opts.seed {
        SplitMix64(seed).shuffle(&mut rows);
    }
    if let Some(n) = opts.limit {
        rows.truncate(n);
    }
    if rows.is_empty() {
        return Err(Error::input(
            format!("`{}` yields no usable rows", opts.input.display()),
            Some("check the --text and --label columns (and --labels)"),
        ));
    }
    let (n_test, n_eval) = split_sizes(opts, rows.len())?;
    let (test_rows, rest) = rows.split_at(n_test);
    let (eval_rows, train_rows) = rest.split_at(n_eval);
    write_jsonl(&opts.out, train_rows)?;
    if let Some(p) = &opts.eval_out {
        write_jsonl(p, eval_rows)?;
    }
    if let Some(p) = &opts.test_out {
        write_jsonl(p, test_rows)?;
    }
    let mut counts = std::collections::BTreeMap::new();
    for (_, l) in train_rows {
        *counts.entry(l.clone()).or_insert(0usize) += 1;
    }
    Ok(ImportReport {
        train: train_rows.len(),
        eval: eval_rows.len(),
        test: test_rows.len(),
        skipped,
        filtered,
        labels: counts.into_iter().collect(),
        text_column: t.header[ti].clone(),
        label_column: t.header[li].clone(),
    })
}

/// The index of the `what` column of `t` (read from `input`): the one named `want`, else
/// Orange's (`orange`), else the one named `default`.
fn find_column(
    t: &Table,
    input: &Path,
    want: &Option<String>,
    orange: Option<usize>,
    default: &str,
    what: &str,
) -> Result<usize> {
    let name = want.clone();
    match (name, orange) {
        (None, Some(i)) => Ok(i),
        (name, _) => {
            let n = name.unwrap_or_else(|| default.to_string());
            t.header.iter().position(|h| *h == n).ok_or_else(|| {
                Error::input(
                    format!(
                        "`{}` has no {what} column `{n}` (columns: {})",
                        input.display(),
                        t.header.join(", ")
                    ),
                    Some(&format!("choose it with --{what} COLUMN")),
                )
            })
        }
    }
}

/// The usable (text, label) rows of a table, in file order, and the counts of those left out.
struct Selected {
    rows: Vec<(String, String)>,
    /// Rows without text or label (or with Orange's `?`), or a label outside the bins.
    skipped: usize,
    /// Rows whose label is not one of the kept labels.
    filtered: usize,
}

/// The rows of `t` with their text (column `ti`) and label (column `li`, mapped through
/// `bins`), keeping only `labels` when it is not empty.
fn select_rows(
    t: &Table,
    ti: usize,
    li: usize,
    bins: Option<&[(String, f64, f64)]>,
    labels: &[String],
) -> Selected {
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut skipped = 0;
    let mut filtered = 0;
    for r in &t.rows {
        let text = r.get(ti).map(|s| s.trim()).unwrap_or("");
        let raw = r.get(li).map(|s| s.trim()).unwrap_or("");
        let label = match bins {
            None => Some(raw.to_string()),
            Some(b) => raw
                .parse::<f64>()
                .ok()
                .and_then(|v| b.iter().find(|(_, lo, hi)| v >= *lo && v <= *hi))
                .map(|(n, _, _)| n.clone()),
        };
        match label {
            Some(l) if !labels.is_empty() && !labels.contains(&l) => filtered += 1,
            Some(l) if !text.is_empty() && !l.is_empty() && l != "?" => {
                rows.push((text.to_string(), l))
            }
            _ => skipped += 1,
        }
    }
    Selected {
        rows,
        skipped,
        filtered,
    }
}

/// The number of test and eval rows out of `n` (zero for a split not written); at least one
/// row must be left for training.
fn split_sizes(opts: &ImportOptions, n: usize) -> Result<(usize, usize)> {
    let share = |out: &Option<PathBuf>, ratio: f64, flag: &str| -> Result<usize> {
        if out.is_none() {
            return Ok(0);
        }
        if !(ratio > 0.0 && ratio < 1.0) {
            return Err(Error::input(
                format!("--{flag}-ratio {ratio} is outside (0, 1)"),
                Some(&format!("e.g. --{flag}-ratio 0.2")),
            ));
        }
        Ok(((n as f64) * ratio).round() as usize)
    };
    let n_test = share(&opts.test_out, opts.test_ratio, "test")?;
    let n_eval = share(&opts.eval_out, opts.eval_ratio, "eval")?;
    if n_test + n_eval >= n {
        return Err(Error::input(
            format!(
                "`{}`: --test-ratio and --eval-ratio leave no training rows ({} rows)",
                opts.input.display(),
                n
            ),
            Some("lower the ratios, or raise --limit"),
        ));
    }
    Ok((n_test, n_eval))
}

/// One JSON object `{"text", "label"}` per line.
fn write_jsonl(path: &Path, rows: &[(String, String)]) -> Result<()> {
    let mut buf = Vec::new();
    for (text, label) in rows {
        serde_json::to_writer(&mut buf, &serde_json::json!({"text": text, "label": label}))
            .expect("serializes");
        buf.push(b'\n');
    }
    crate::fsutil::write_atomic(path, &buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orange_tab_and_tsv_with_bins() {
        let d = tempfile::tempdir().unwrap();
        let tab = d.path().join("t.tab");
        std::fs::write(
            &tab,
            "Category\tText\r\nd\tstring\r\nclass\t\r\nearn\tprofit up\r\nacq\tbuys firm\r\n?\tno label\r\n",
        )
        .unwrap();
        let out = d.path().join("o.jsonl");
        let r = import(&ImportOptions {
            input: tab,
            out: out.clone(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!((r.train, r.skipped), (2, 1));
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "{\"label\":\"earn\",\"text\":\"profit up\"}\n{\"label\":\"acq\",\"text\":\"buys firm\"}\n"
        );
        let tsv = d.path().join("r.tsv");
        std::fs::write(
            &tsv,
            "\tdrugName\treview\trating\n1\tA\t\"\"\"Great, \"\"really\"\"\"\"\"\t9\n2\tB\tbad\t2\n3\tC\tmeh\t5\n",
        )
        .unwrap();
        let ev = d.path().join("e.jsonl");
        let r = import(&ImportOptions {
            input: tsv,
            out: out.clone(),
            eval_out: Some(ev.clone()),
            eval_ratio: 0.34,
            text: Some("review".into()),
            label: Some("rating".into()),
            bins: Some("negative:1-4,neutral:5-6,positive:7-10".into()),
            seed: Some(1),
            ..Default::default()
        })
        .unwrap();
        assert_eq!((r.train, r.eval), (2, 1));
        let all = std::fs::read_to_string(&out).unwrap() + &std::fs::read_to_string(&ev).unwrap();
        assert!(
            all.contains("\"label\":\"positive\",\"text\":\"\\\"Great, \\\"really\\\"\\\"\""),
            "{all}"
        );
        assert!(all.contains("negative") && all.contains("neutral"));
        let e = import(&ImportOptions {
            input: d.path().join("r.tsv"),
            out,
            text: Some("body".into()),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("no text column `body`"), "{e}");
    }

    #[test]
    fn test_split_and_label_filter() {
        let d = tempfile::tempdir().unwrap();
        let csv = d.path().join("t.csv");
        let mut body = String::from("text,label\n");
        for i in 0..30 {
            body.push_str(&format!("row {i},{}\n", ["a", "b", "c"][i % 3]));
        }
        std::fs::write(&csv, body).unwrap();
        let (tr, ev, te) = (
            d.path().join("tr.jsonl"),
            d.path().join("ev.jsonl"),
            d.path().join("te.jsonl"),
        );
        let opts = ImportOptions {
            input: csv.clone(),
            out: tr.clone(),
            eval_out: Some(ev.clone()),
            eval_ratio: 0.25,
            test_out: Some(te.clone()),
            test_ratio: 0.25,
            labels: vec!["a".into(), "c".into()],
            seed: Some(3),
            ..Default::default()
        };
        let r = import(&opts).unwrap();
        assert_eq!((r.train, r.eval, r.test, r.filtered), (10, 5, 5, 10));
        let lines = |p: &Path| -> Vec<String> {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(String::from)
                .collect()
        };
        let mut all: Vec<String> = [lines(&tr), lines(&ev), lines(&te)].concat();
        assert!(all.iter().all(|l| !l.contains("\"b\"")));
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 20, "the three splits are disjoint");
        let first = std::fs::read(&te).unwrap();
        import(&opts).unwrap();
        assert_eq!(std::fs::read(&te).unwrap(), first, "deterministic");
        let e = import(&ImportOptions {
            labels: vec!["A".into()],
            ..opts.clone()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("no usable row with label `A`"), "{e}");
        let e = import(&ImportOptions {
            eval_ratio: 0.6,
            test_ratio: 0.5,
            ..opts
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("leave no training rows"), "{e}");
    }
}
