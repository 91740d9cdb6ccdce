//! The one ordered parallel map: work items on a bounded number of threads, results consumed
//! in input order. Used for CPU-bound per-tensor work (`extract`, `pack`, `merge`, `overlap`:
//! one thread per rayon worker) and for I/O-bound fetches (`install`: `--jobs` threads).

/// [`map_ordered_on`] with one thread per rayon worker (CPU-bound work).
pub fn map_ordered<T: Sync, R: Send>(
    items: &[T],
    f: impl Fn(&T) -> crate::Result<R> + Sync,
    sink: impl FnMut(R) -> crate::Result<()>,
) -> crate::Result<()> {
    map_ordered_on(rayon::current_num_threads(), items, f, sink)
}

/// `f` over `items` on up to `threads` threads, the results in input order; the first error in
/// input order if any failed, and no item starts after a failure.
pub fn collect_ordered<T: Sync, R: Send>(
    threads: usize,
    items: &[T],
    f: impl Fn(&T) -> crate::Result<R> + Sync,
) -> crate::Result<Vec<R>> {
    let mut out = Vec::with_capacity(items.len());
    map_ordered_on(threads, items, f, |r| {
        out.push(r);
        Ok(())
    })?;
    Ok(out)
}

use std::sync::{Condvar, Mutex};

/// Run `f` over `items` on `threads` threads and hand the results to `sink` in input
/// order, on the calling thread. Items start in input order, and item `i` starts only once
/// `sink` has taken every item before `i - 2 × threads`: at most one item per thread is being
/// computed and a bounded number of finished ones wait for their turn, which is what keeps
/// `extract`, `pack`, `merge` and `overlap` bounded in memory. A worker that finishes starts
/// the next item at once, while `sink` writes, instead of waiting for the slowest item of a
/// batch. The first error in input order is returned, and no further item starts after it.
pub fn map_ordered_on<T: Sync, R: Send>(
    threads: usize,
    items: &[T],
    f: impl Fn(&T) -> crate::Result<R> + Sync,
    mut sink: impl FnMut(R) -> crate::Result<()>,
) -> crate::Result<()> {
    struct Gate {
        next: usize,
        sunk: usize,
        stop: bool,
    }
    let threads = threads.clamp(1, items.len().max(1));
    let window = 2 * threads;
    let gate = Mutex::new(Gate {
        next: 0,
        sunk: 0,
        stop: false,
    });
    let turn = Condvar::new();
    // A panic on any side (a worker's `f`, or `sink`) stops the other side instead of leaving
    // it waiting forever; `thread::scope` then re-raises the panic.
    struct StopOnPanic<'a>(&'a Mutex<Gate>, &'a Condvar);
    impl StopOnPanic<'_> {
        /// No item starts after this; waiting workers wake up and leave.
        fn stop(&self) {
            if let Ok(mut g) = self.0.lock() {
                g.stop = true;
            }
            self.1.notify_all();
        }
    }
    impl Drop for StopOnPanic<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                self.stop();
            }
        }
    }
    let (tx, rx) = std::sync::mpsc::channel::<(usize, crate::Result<R>)>();
    std::thread::scope(|s| {
        let guard = StopOnPanic(&gate, &turn);
        for _ in 0..threads {
            let tx = tx.clone();
            let (f, gate, turn) = (&f, &gate, &turn);
            s.spawn(move || {
                let _guard = StopOnPanic(gate, turn);
                loop {
                    let i = {
                        let mut g = gate.lock().expect("map_ordered gate");
                        loop {
                            if g.stop || g.next >= items.len() {
                                return;
                            }
                            if g.next < g.sunk + window {
                                g.next += 1;
                                break g.next - 1;
                            }
                            g = turn.wait(g).expect("map_ordered gate");
                        }
                    };
                    if tx.send((i, f(&items[i]))).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        let mut done: std::collections::BTreeMap<usize, crate::Result<R>> = Default::default();
        let mut want = 0;
        let mut run = || -> crate::Result<()> {
            for (i, r) in &rx {
                done.insert(i, r);
                while let Some(r) = done.remove(&want) {
                    sink(r?)?;
                    want += 1;
                    gate.lock().expect("map_ordered gate").sunk = want;
                    turn.notify_all();
                }
            }
            Ok(())
        };
        let result = run();
        if result.is_err() {
            guard.stop();
        }
        result
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn map_ordered_re_raises_a_panic_instead_of_hanging() {
        let items: Vec<usize> = (0..100).collect();
        for panic_in_sink in [false, true] {
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                super::map_ordered(
                    &items,
                    |&i| {
                        assert!(panic_in_sink || i != 5, "item 5 panicked");
                        Ok(i)
                    },
                    |i| {
                        assert!(!panic_in_sink || i != 5, "sink panicked at 5");
                        Ok(())
                    },
                )
            }));
            assert!(caught.is_err(), "panic_in_sink = {panic_in_sink}");
        }
    }

    #[test]
    fn map_ordered_keeps_input_order_and_bounds_what_is_in_flight() {
        let items: Vec<usize> = (0..64).collect();
        let window = 2 * rayon::current_num_threads().clamp(1, items.len());
        let (started, sunk) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let mut got = Vec::new();
        super::map_ordered(
            &items,
            |&i| {
                let n = started.fetch_add(1, Ordering::SeqCst) + 1;
                assert!(n <= sunk.load(Ordering::SeqCst) + window, "window overrun");
                // Early items take longest, so later ones finish first.
                std::thread::sleep(std::time::Duration::from_micros(((64 - i) * 40) as u64));
                Ok(i)
            },
            |r| {
                got.push(r);
                sunk.fetch_add(1, Ordering::SeqCst);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(got, items);
    }

    #[test]
    fn map_ordered_returns_the_first_error_in_input_order_and_starts_nothing_after_it() {
        let items: Vec<usize> = (0..200).collect();
        let window = 2 * rayon::current_num_threads().clamp(1, items.len());
        let highest = AtomicUsize::new(0);
        let mut got = Vec::new();
        let err = super::map_ordered(
            &items,
            |&i| {
                highest.fetch_max(i, Ordering::SeqCst);
                if i == 10 || i == 11 {
                    // The later failure finishes first.
                    std::thread::sleep(std::time::Duration::from_millis(if i == 10 {
                        20
                    } else {
                        0
                    }));
                    return Err(crate::Error::input(format!("item {i} failed"), None));
                }
                Ok(i)
            },
            |r| {
                got.push(r);
                Ok(())
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("item 10 failed"), "{err}");
        assert_eq!(got, (0..10).collect::<Vec<_>>());
        assert!(highest.load(Ordering::SeqCst) < 10 + window);
    }

    #[test]
    fn collect_ordered_keeps_order_on_more_threads_than_cores() {
        let items: Vec<usize> = (0..50).collect();
        let got = super::collect_ordered(8, &items, |&i| {
            std::thread::sleep(std::time::Duration::from_micros(((50 - i) * 20) as u64));
            Ok(i * 2)
        })
        .unwrap();
        assert_eq!(got, items.iter().map(|i| i * 2).collect::<Vec<_>>());
        let err = super::collect_ordered(8, &items, |&i| {
            if i >= 7 {
                return Err(crate::Error::input(format!("item {i} failed"), None));
            }
            Ok(i)
        })
        .unwrap_err();
        assert!(err.to_string().contains("item 7 failed"), "{err}");
    }
}
