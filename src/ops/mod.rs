//! One operation per verb. Each takes validated options and a [`Printer`](crate::printer::Printer)
//! and returns a typed result; the CLI layer only parses flags and renders results.

pub mod apply;
pub mod data_import;
pub mod demo;
pub mod extract;
pub mod init;
pub mod inspect;
pub mod install;
pub mod list;
pub mod merge;
pub mod overlap;
pub mod pack;
pub mod publish;
pub mod search;
pub mod unpack;
pub mod verify;
pub mod yank;

use rayon::prelude::*;

/// Run `f` over `items` in parallel, one window of one item per worker thread at a time, and
/// hand the results to `sink` in input order. Only one window of results is in flight, which is
/// what keeps `extract`, `pack` and `merge` bounded in memory.
pub(crate) fn map_ordered<T: Sync, R: Send>(
    items: &[T],
    f: impl Fn(&T) -> crate::Result<R> + Sync,
    mut sink: impl FnMut(R) -> crate::Result<()>,
) -> crate::Result<()> {
    let window = rayon::current_num_threads().max(1);
    for chunk in items.chunks(window) {
        let results: Vec<crate::Result<R>> = chunk.par_iter().map(&f).collect();
        for r in results {
            sink(r?)?;
        }
    }
    Ok(())
}
