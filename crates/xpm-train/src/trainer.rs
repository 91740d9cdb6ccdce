//! The second stage of `train`: the optimizer loop. A [`Trainer`] owns the run (the model with
//! its adapters and the optimizer state), the schedule, the JSON log and the best snapshot;
//! [`Trainer::fit`] runs every epoch and returns what the export needs.

use std::collections::VecDeque;
use std::io::Write;
use std::time::Instant;

use super::data;
use super::model::{self, Batch, Metrics, ce, make_batch};
use super::optim::AdamW;
use super::prepare::Prepared;
use super::{
    DEFAULT_HEAD_LR, MAX_AUTO_EPOCHS, MIN_STEPS, Method, Run, Schedule, Snapshot, TrainOptions,
    median, pct,
};
use xpm_core::error::{Error, IoResultExt, Result};
use xpm_core::printer::Printer;
use xpm_core::rng::SplitMix64;

/// What a finished run hands to the export.
pub(crate) struct Fit<'a> {
    pub run: Run<'a>,
    /// The saved state: the best evaluation, else the last step.
    pub snapshot: Snapshot,
    /// The saved state's metrics (with `--eval`).
    pub eval: Option<Metrics>,
    pub steps: usize,
    pub first_loss: Option<f64>,
    pub last_loss: f64,
    pub seconds_per_step: f64,
    pub lr: f64,
    pub head_lr: f64,
    /// Passes over the training data (`--epochs`, or the automatic number).
    pub epochs: usize,
}

/// The warning for a run of fewer than [`MIN_STEPS`] optimizer steps, naming the flag that
/// lengthens it.
fn short_run_warning(opts: &TrainOptions, examples: usize, epochs: usize, steps: usize) -> String {
    let hint = if opts.max_steps.is_some_and(|m| m == steps) {
        "raise --max-steps".to_string()
    } else if opts.epochs.is_some() {
        format!(
            "raise --epochs, or leave it out: by default xpm makes enough passes for {MIN_STEPS} steps"
        )
    } else {
        format!(
            "this is already {MAX_AUTO_EPOCHS} passes: add training examples, lower --batch-size, or raise --epochs"
        )
    };
    format!(
        "only {steps} optimizer step(s) ({epochs} epoch(s) over {examples} examples at batch {} × {}): \
         fewer than {MIN_STEPS}, likely too few to learn the task (the expert may predict the \
         majority class); {hint}",
        opts.batch_size, opts.grad_accum
    )
}

/// The training loop's state.
pub(crate) struct Trainer<'a> {
    opts: &'a TrainOptions,
    input: &'a Prepared,
    printer: &'a Printer,
    run: Run<'a>,
    opt: AdamW,
    lr: f64,
    head_lr: f64,
    epochs: usize,
    total_steps: usize,
    rng: SplitMix64,
    data_rng: SplitMix64,
    log: Option<std::io::BufWriter<std::fs::File>>,
    progress: indicatif::ProgressBar,
    /// Optimizer steps taken.
    step: usize,
    examples_seen: usize,
    first_loss: Option<f64>,
    last_loss: f64,
    step_times: Vec<f64>,
    best: Option<(f64, Snapshot, Metrics)>,
    /// The step of the last evaluation, if it still describes the current state.
    last_eval: Option<usize>,
    /// Whether the sparse mask is final (always, except during the periodic schedule's first
    /// epoch): only evaluations of a frozen mask can pick the saved state, since the saved mask
    /// must belong to the saved values and the dense start is no sparse expert.
    frozen: bool,
    next_reselect: usize,
    /// The most recent batches, scored by the periodic schedule's re-selections.
    recent: VecDeque<Batch>,
}

impl<'a> Trainer<'a> {
    /// Build the model and its adapters, the optimizer and the log; under the one-shot
    /// schedule, select the sparse masks.
    pub fn new(opts: &'a TrainOptions, input: &'a Prepared, printer: &'a Printer) -> Result<Self> {
        let mut rng = SplitMix64(opts.seed);
        let net = model::build_net(&input.md, &input.dev, input.labels.len(), None, &mut rng)?;
        let lr = opts.lr();
        let head_lr = opts.head_lr.unwrap_or(lr.max(DEFAULT_HEAD_LR));
        let run = Run::new(opts, net, input.dev.clone(), head_lr / lr, &mut rng)?;
        let steps_per_epoch = input
            .train_enc
            .len()
            .div_ceil(opts.batch_size)
            .div_ceil(opts.grad_accum);
        let epochs = opts.epochs_for(steps_per_epoch);
        let mut total_steps = steps_per_epoch * epochs;
        if let Some(m) = opts.max_steps {
            total_steps = total_steps.min(m);
        }
        if total_steps < MIN_STEPS {
            printer.warn(short_run_warning(
                opts,
                input.train_enc.len(),
                epochs,
                total_steps,
            ));
        }
        let opt = AdamW {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: opts.weight_decay(),
            clip: opts.clip,
            warmup_steps: ((total_steps as f64) * opts.warmup).round() as usize,
            total_steps,
        };
        let log = match &opts.json_log {
            Some(p) => Some(std::io::BufWriter::new(
                std::fs::File::create(p).at("create", p)?,
            )),
            None => None,
        };
        let mut t = Trainer {
            opts,
            input,
            printer,
            run,
            opt,
            lr,
            head_lr,
            epochs,
            total_steps,
            rng,
            data_rng: SplitMix64(opts.seed ^ 0x5eed_da7a),
            log,
            progress: indicatif::ProgressBar::hidden(),
            step: 0,
            examples_seen: 0,
            first_loss: None,
            last_loss: f64::NAN,
            step_times: Vec::new(),
            best: None,
            last_eval: None,
            frozen: !(opts.method == Method::Sparse && opts.schedule == Schedule::Periodic),
            next_reselect: opts.reselect_every,
            recent: VecDeque::new(),
        };
        if opts.method == Method::Sparse && opts.schedule == Schedule::OneShot {
            t.select_once()?;
        }
        Ok(t)
    }

    /// The one-shot schedule: score `--score-batches` batches and select every mask.
    fn select_once(&mut self) -> Result<()> {
        let (opts, input) = (self.opts, self.input);
        let t0 = Instant::now();
        let order = data::batches(
            input.train_enc.len(),
            opts.batch_size,
            Some(&mut self.data_rng.clone()),
        );
        let batches: Vec<Batch> = order
            .iter()
            .take(opts.score_batches.max(1))
            .map(|idx| self.batch(idx))
            .collect::<Result<_>>()?;
        self.run.reselect(&batches, &mut self.rng)?;
        self.printer.status(
            "Selected",
            format!(
                "{} of each target weight by `{}` over {} batch(es) in {:.1}s",
                pct(opts.keep_ratio),
                opts.score.as_str(),
                batches.len(),
                t0.elapsed().as_secs_f64()
            ),
        );
        Ok(())
    }

    fn batch(&self, idx: &[usize]) -> Result<Batch> {
        let input = self.input;
        make_batch(
            &input.train_enc,
            idx,
            input.task,
            input.md.pad_id(),
            &input.dev,
        )
        .map_err(ce("batch"))
    }

    /// One line of the JSON log (`--json-log`).
    fn log(&mut self, v: serde_json::Value) -> Result<()> {
        if let Some(w) = self.log.as_mut() {
            writeln!(w, "{v}")
                .and_then(|_| w.flush())
                .map_err(|e| Error::io("write", self.opts.json_log.as_ref().expect("set"), e))?;
        }
        Ok(())
    }

    /// Evaluate the current state on the eval split (if any); a `candidate` state that beats
    /// the best so far becomes the one to save.
    fn evaluate(&mut self, candidate: bool) -> Result<()> {
        let (opts, input) = (self.opts, self.input);
        let Some(enc) = &input.eval_enc else {
            return Ok(());
        };
        let m = model::evaluate(
            &self.run.net,
            enc,
            input.task,
            input.labels.len(),
            opts.batch_size.max(32),
            input.md.pad_id(),
            &input.dev,
        )?;
        let step = self.step;
        self.log(serde_json::json!({"event": "eval", "step": step, "metrics": m}))?;
        let line = format!(
            "step {step}: eval loss {:.4}{}",
            m.loss,
            m.accuracy
                .map(|a| format!(", accuracy {:.2} %", a * 100.0))
                .unwrap_or_default()
        );
        if self.printer.shows_progress() {
            self.progress.println(format!("{:>12} {line}", "Evaluated"));
        } else {
            self.printer.status("Evaluated", line);
        }
        if candidate && self.best.as_ref().is_none_or(|(l, _, _)| m.loss < *l) {
            self.best = Some((m.loss, self.run.snapshot(step)?, m));
        }
        self.last_eval = Some(step);
        Ok(())
    }

    /// A re-selection of the periodic schedule, on the most recent batches.
    fn reselect_recent(&mut self) -> Result<()> {
        let batches: Vec<Batch> = self.recent.iter().cloned().collect();
        self.run.reselect(&batches, &mut self.rng)
    }

    /// The periodic schedule's last selection: from here on the mask stays.
    fn freeze(&mut self) -> Result<()> {
        self.reselect_recent()?;
        self.frozen = true;
        self.recent.clear();
        self.last_eval = None;
        Ok(())
    }

    /// One optimizer step over the micro-batches `chunk` (indices into the training data).
    fn step(&mut self, epoch: usize, chunk: &[Vec<usize>]) -> Result<()> {
        let opts = self.opts;
        let t0 = Instant::now();
        let micro: Vec<Batch> = chunk
            .iter()
            .map(|idx| self.batch(idx))
            .collect::<Result<_>>()?;
        let (loss, norm) = self
            .run
            .train_step(&micro, &self.opt, self.step, &mut self.rng)?;
        if !loss.is_finite() {
            return Err(Error::input(
                format!("the training loss became {loss} at step {}", self.step),
                Some(
                    "lower --lr, or clip gradients harder (a smaller --clip) and warm up longer (--warmup)",
                ),
            ));
        }
        self.examples_seen += micro.iter().map(|b| b.size).sum::<usize>();
        if !self.frozen {
            for b in &micro {
                self.recent.push_back(b.clone());
                if self.recent.len() > opts.score_batches.max(1) {
                    self.recent.pop_front();
                }
            }
        }
        let mut reselected = false;
        if !self.frozen && epoch == 0 && self.examples_seen >= self.next_reselect {
            self.reselect_recent()?;
            self.next_reselect += opts.reselect_every;
            reselected = true;
        }
        let dt = t0.elapsed().as_secs_f64();
        self.step_times.push(dt);
        self.first_loss.get_or_insert(loss);
        self.last_loss = loss;
        self.log(serde_json::json!({
            "step": self.step + 1, "epoch": epoch + 1, "loss": loss,
            "lr": self.opt.lr_at(self.step), "grad_norm": norm, "step_time_s": dt,
            "examples": self.examples_seen, "reselected": reselected,
        }))?;
        self.step += 1;
        self.progress.inc(1);
        self.progress.set_message(format!(
            "epoch {} · loss {loss:.4} · {dt:.2} s/step",
            epoch + 1
        ));
        if let Some(every) = opts.eval_every
            && self.step.is_multiple_of(every)
        {
            self.evaluate(self.frozen)?;
        }
        Ok(())
    }

    /// Train every epoch (or up to `--max-steps`), evaluating as configured, and return the
    /// state to save.
    pub fn fit(mut self) -> Result<Fit<'a>> {
        let (opts, input) = (self.opts, self.input);
        let (trainable, _) = self.run.trainable();
        self.printer.status(
            "Training",
            format!(
                "{} on `{}` ({} layers, {} trainable parameters): {} examples, {} step(s)",
                opts.method.as_str(),
                input.base_id,
                self.run.targets.len(),
                trainable,
                input.train_enc.len(),
                self.total_steps
            ),
        );
        self.progress = self.printer.progress(self.total_steps as u64, "Training");
        // The starting point: eval loss before any update (the saved state if nothing
        // improves).
        self.evaluate(self.frozen)?;
        'epochs: for epoch in 0..self.epochs {
            let order = data::batches(
                input.train_enc.len(),
                opts.batch_size,
                Some(&mut self.data_rng),
            );
            for chunk in order.chunks(opts.grad_accum) {
                if self.step >= self.total_steps {
                    break 'epochs;
                }
                self.step(epoch, chunk)?;
            }
            if !self.frozen {
                // End of the first epoch: the last selection, then the mask stays.
                self.freeze()?;
            }
            if self.last_eval != Some(self.step) {
                self.evaluate(self.frozen)?;
            }
        }
        if !self.frozen {
            // Stopped by --max-steps inside the first epoch.
            self.freeze()?;
        }
        if self.last_eval != Some(self.step) {
            self.evaluate(true)?;
        }
        self.progress.finish_and_clear();
        let (snapshot, eval) = match self.best.take() {
            Some((_, s, m)) => (s, Some(m)),
            None => (self.run.snapshot(self.step)?, None),
        };
        if eval.is_some() && snapshot.step == 0 {
            self.printer.warn(
                "training did not lower the eval loss: the saved expert is the starting point \
                 (untrained values and head); try another --lr, more data or more epochs",
            );
        }
        Ok(Fit {
            seconds_per_step: median(&mut self.step_times),
            run: self.run,
            snapshot,
            eval,
            steps: self.step,
            first_loss: self.first_loss,
            last_loss: self.last_loss,
            lr: self.lr,
            head_lr: self.head_lr,
            epochs: self.epochs,
        })
    }
}
