//! Per-thread reuse of buffers and zstd contexts in streaming loops.
//!
//! `xpm merge` decodes every expert's part of one tensor, merges, encodes, and moves on to the
//! next tensor: per tensor and thread, some 20 buffers of about the same sizes each time. When
//! freed memory went back to the OS after 10 ms, every tensor faulted in and zeroed fresh
//! pages. Here the engine gives an expert's index and value buffers back when a tensor is done,
//! and the decoders take them again for the next one. The free lists are bounded (buffer size,
//! count and bytes) and belong to their thread, so they go away with it.
//!
//! Larger buffers (a merged tensor's output: 3–8 MiB each of indices, values and their bytes
//! on the merge benchmark; a dense expert's delta, 4 MiB per expert and tensor there) go to
//! separate per-thread lists bounded in bytes (`LARGE_BYTES`, or `LARGE_BYTES_OTHERWISE`
//! outside `xpm merge`) and count (`MAX_LARGE`),
//! while the process keeps freed memory or the command asked for them
//! ([`keep_large_buffers`]: `xpm merge`). While the process keeps freed memory
//! ([`crate::alloc::reuse`]) these lists are what bounds the merge's peak RSS: without them,
//! the allocator's free spans of these sizes did not fit the next tensor's slightly different
//! sizes, and the TIES merge on the merge benchmark peaked at 111–145 MB instead of 82–90 MB.
//! When it returns freed memory ([`crate::alloc::lean`], merges with dense inputs), each such
//! buffer was faulted in 4 KiB at a time and zeroed again for every tensor and expert: a merge
//! of the benchmark's densified experts spent 12 s of system time in an 11 s run
//! (docs/benchmarks.md, "Merge", seventh session). What a thread keeps is what its previous
//! tensor used, which is about what its next one needs.
//!
//! zstd contexts (tables of several hundred KiB, allocated by the C library on every one-shot
//! call) are kept per thread the same way.

use std::cell::RefCell;
use std::thread::LocalKey;

/// Buffers smaller than this are not worth keeping (the allocator serves them quickly).
const MIN_BYTES: usize = 32 << 10;
/// Larger buffers go to the large lists ([`LARGE_BYTES`]), not to the free lists.
const MAX_BUFFER: usize = 1 << 20;
/// The most a thread's large buffers hold, all types together, in a command that asked for
/// them ([`keep_large_buffers`]); beyond it they are freed. A merge of 20 dense experts of
/// 1024 × 1024 f32 tensors needs 80 MiB of them per tensor.
const LARGE_BYTES: usize = 128 << 20;
/// The same bound in the other processes that keep freed memory (training, serving, import,
/// export): threads that live as long as a server does keep no more than this.
const LARGE_BYTES_OTHERWISE: usize = 24 << 20;
/// At most this many large buffers per element type and thread.
const MAX_LARGE: usize = 32;
/// At most this many buffers per element type and thread …
const MAX_BUFFERS: usize = 48;
/// … and this many bytes per thread, all types together.
const MAX_BYTES: usize = 24 << 20;

/// Element types with a per-thread free list.
pub trait Recycle: Copy + 'static {
    #[doc(hidden)]
    fn free_list() -> &'static LocalKey<RefCell<Vec<Vec<Self>>>>;
    #[doc(hidden)]
    fn large_list() -> &'static LocalKey<RefCell<Vec<Vec<Self>>>>;
}

macro_rules! recycle {
    ($($t:ty => $list:ident, $large:ident),*) => {$(
        thread_local! {
            static $list: RefCell<Vec<Vec<$t>>> = const { RefCell::new(Vec::new()) };
            static $large: RefCell<Vec<Vec<$t>>> = const { RefCell::new(Vec::new()) };
        }
        impl Recycle for $t {
            fn free_list() -> &'static LocalKey<RefCell<Vec<Vec<Self>>>> {
                &$list
            }
            fn large_list() -> &'static LocalKey<RefCell<Vec<Vec<Self>>>> {
                &$large
            }
        }
    )*};
}
recycle!(
    u8 => FREE_U8, LARGE_U8,
    u64 => FREE_U64, LARGE_U64,
    f32 => FREE_F32, LARGE_F32,
    f64 => FREE_F64, LARGE_F64
);

thread_local! {
    /// Bytes on this thread's free lists, all types together.
    static HELD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// Bytes on this thread's large lists, all types together.
    static HELD_LARGE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Set by [`keep_large_buffers`].
static KEEP_LARGE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Keep large buffers (over `MAX_BUFFER`) and frame buffers for reuse even while the
/// process returns freed memory ([`crate::alloc::lean`]): for commands that stream tensors of
/// one size through them (`xpm merge`, whose dense inputs keep it on `lean`). Other commands
/// get them only while the process keeps freed memory anyway: `xpm pack`, on `lean`, peaked
/// 30 MB higher with them (docs/benchmarks.md, "Merge", seventh session).
pub fn keep_large_buffers() {
    KEEP_LARGE.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// How many bytes of large buffers a thread keeps: `LARGE_BYTES` where the command asked
/// ([`keep_large_buffers`]), `LARGE_BYTES_OTHERWISE` where the process keeps freed memory
/// anyway, else none (`None`: frame buffers are not kept either).
fn large_bound() -> Option<usize> {
    if KEEP_LARGE.load(std::sync::atomic::Ordering::Relaxed) {
        Some(LARGE_BYTES)
    } else {
        crate::alloc::keeps_freed_memory().then_some(LARGE_BYTES_OTHERWISE)
    }
}

/// A per-thread list of buffers with the bytes it holds: the free lists (with [`HELD`]) and
/// the large lists (with [`HELD_LARGE`]).
type List<T> = &'static LocalKey<RefCell<Vec<Vec<T>>>>;
type Held = &'static LocalKey<std::cell::Cell<usize>>;

/// The smallest buffer on `list` that holds `cap` elements; if none does, the largest is freed
/// (it would have to be reallocated anyway) and `None` returned.
fn take_from<T>(list: List<T>, held: Held, cap: usize) -> Option<Vec<T>> {
    let (v, fits) = list.with_borrow_mut(|list| {
        let fits = (0..list.len())
            .filter(|&i| list[i].capacity() >= cap)
            .min_by_key(|&i| list[i].capacity());
        let i = fits.or_else(|| (0..list.len()).max_by_key(|&i| list[i].capacity()))?;
        Some((list.swap_remove(i), fits.is_some()))
    })?;
    held.set(held.get() - v.capacity() * size_of::<T>());
    fits.then_some(v)
}

/// Keep `v` (empty) on `list` if it stays within `max_count` buffers and, with the others
/// `held` counts, `max_bytes`; else free it.
fn give_to<T>(list: List<T>, held: Held, max_count: usize, max_bytes: usize, v: Vec<T>) {
    let size = v.capacity() * size_of::<T>();
    if held.get() + size > max_bytes {
        return;
    }
    list.with_borrow_mut(|list| {
        if list.len() < max_count {
            held.set(held.get() + size);
            list.push(v);
        }
    });
}

/// An empty vector with room for `cap` elements: the smallest buffer that fits on this
/// thread's list for its size (free list or large list), else a new one.
pub fn take<T: Recycle>(cap: usize) -> Vec<T> {
    let cap = size_class(cap);
    if cap * size_of::<T>() < MIN_BYTES {
        return Vec::with_capacity(cap);
    }
    take_kept(cap).unwrap_or_else(|| Vec::with_capacity(cap))
}

/// [`take`] for a size read from a file: `None` instead of aborting the process when a new
/// buffer of that size cannot be allocated (an artifact may declare terabytes).
pub fn try_take<T: Recycle>(cap: usize) -> Option<Vec<T>> {
    let cap = size_class(cap);
    if cap.saturating_mul(size_of::<T>()) >= MIN_BYTES
        && let Some(v) = take_kept(cap)
    {
        return Some(v);
    }
    let mut v = Vec::new();
    v.try_reserve_exact(cap).ok()?;
    Some(v)
}

/// A kept buffer of this thread's for `cap` (a size class, at least [`MIN_BYTES`]), if one fits.
fn take_kept<T: Recycle>(cap: usize) -> Option<Vec<T>> {
    if cap.saturating_mul(size_of::<T>()) > MAX_BUFFER {
        take_from(T::large_list(), &HELD_LARGE, cap)
    } else {
        take_from(T::free_list(), &HELD, cap)
    }
}

/// `n` rounded up to one of 8 steps per power of two (at most 12.5 % more), so that the
/// buffers of one loop, whose sizes vary a little from tensor to tensor, fit each other.
fn size_class(n: usize) -> usize {
    if n <= 8 {
        return n;
    }
    let step = 1 << (usize::BITS - 1 - n.leading_zeros() - 3);
    n.div_ceil(step).saturating_mul(step)
}

/// Give `v` back for a later [`take`] on this thread (dropped if small, or if the list is
/// full).
pub fn give<T: Recycle>(mut v: Vec<T>) {
    let size = v.capacity() * size_of::<T>();
    if size < MIN_BYTES {
        return;
    }
    v.clear();
    if size > MAX_BUFFER {
        if let Some(bound) = large_bound() {
            give_to(T::large_list(), &HELD_LARGE, MAX_LARGE, bound, v);
        }
    } else {
        give_to(T::free_list(), &HELD, MAX_BUFFERS, MAX_BYTES, v);
    }
}

thread_local! {
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
}

/// Run `f` with this thread's zstd decompression context.
pub fn with_decompressor<R>(
    f: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> std::io::Result<R>,
) -> std::io::Result<R> {
    DECOMPRESSOR.with_borrow_mut(|d| {
        let d = match d {
            Some(d) => d,
            None => d.insert(zstd::bulk::Decompressor::new()?),
        };
        f(d)
    })
}

/// Compress `raw` at `level` with this thread's zstd context: the same bytes as
/// `zstd::bulk::compress`, without allocating a context per call, into a buffer from
/// [`take_frame`].
pub fn compress(raw: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with_borrow_mut(|c| {
        let c = match c {
            Some((l, c)) if *l == level => c,
            // Another level (the writer samples at two): the same context, its tables kept.
            Some((l, c)) => {
                c.set_compression_level(level)?;
                *l = level;
                c
            }
            None => &mut c.insert((level, zstd::bulk::Compressor::new(level)?)).1,
        };
        let mut out = take_frame(zstd::zstd_safe::compress_bound(raw.len()));
        c.compress_to_buffer(raw, &mut out)?;
        Ok(out)
    })
}

/// Compressed frames, made on the workers and written, then dropped, by the writer's thread:
/// a free list shared by all threads, unlike the per-thread ones. Freed across threads, these
/// buffers (several MiB each for large tensors) were not reused, and every frame faulted in
/// and zeroed fresh pages: 7 % of `xpm import peft`'s time on the interop benchmark.
static FRAMES: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
/// At most this many frame buffers wait for reuse …
const FRAME_BUFFERS: usize = 8;
/// … holding at most this many bytes; larger buffers are freed.
const FRAME_BYTES: usize = 64 << 20;

/// An empty buffer with room for `cap` bytes for a compressed frame: the smallest waiting one
/// that fits, else a new one.
pub fn take_frame(cap: usize) -> Vec<u8> {
    if cap >= MIN_BYTES {
        let mut list = FRAMES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let fits = (0..list.len())
            .filter(|&i| list[i].capacity() >= cap)
            .min_by_key(|&i| list[i].capacity());
        if let Some(i) = fits {
            return list.swap_remove(i);
        }
    }
    Vec::with_capacity(cap)
}

/// A written frame's buffer, for a later [`take_frame`] on any thread (freed if small, or if
/// the list is full: then the smallest waiting buffer makes room for a larger one). Only
/// while large buffers are kept ([`keep_large_buffers`]).
pub fn give_frame(v: Vec<u8>) {
    if large_bound().is_some() {
        keep_frame(v);
    }
}

/// [`give_frame`]'s list, whatever the setting.
fn keep_frame(mut v: Vec<u8>) {
    let size = v.capacity();
    if !(MIN_BYTES..=FRAME_BYTES / 2).contains(&size) {
        return;
    }
    v.clear();
    let mut list = FRAMES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let held: usize = list.iter().map(Vec::capacity).sum();
    if list.len() < FRAME_BUFFERS && held + size <= FRAME_BYTES {
        list.push(v);
    } else if let Some(i) = (0..list.len()).min_by_key(|&i| list[i].capacity())
        && list[i].capacity() < size
        && held - list[i].capacity() + size <= FRAME_BYTES
    {
        list[i] = v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes_round_up_by_at_most_an_eighth() {
        for n in (0..5000).chain([1 << 20, (1 << 20) + 1, 52_437, usize::MAX / 4]) {
            let c = size_class(n);
            assert!(c >= n && (c - n) * 8 <= n, "{n} -> {c}");
            assert_eq!(size_class(c), c);
        }
        assert_eq!(size_class(52_437), 53_248);
    }

    /// Each case on its own thread: fresh free lists.
    fn on_a_thread(f: impl FnOnce() + Send + 'static) {
        std::thread::spawn(f).join().unwrap();
    }

    #[test]
    fn take_reuses_the_best_fitting_buffer() {
        on_a_thread(|| {
            let small: Vec<u64> = Vec::with_capacity(8 << 10);
            let big: Vec<u64> = Vec::with_capacity(64 << 10);
            let small_ptr = small.as_ptr();
            give(big);
            let mut used = small;
            used.extend([1, 2, 3]);
            give(used);
            // The smallest that fits, emptied.
            let a = take::<u64>(4 << 10);
            assert_eq!(a.as_ptr(), small_ptr);
            assert!(a.is_empty());
            assert_eq!(HELD.get(), 64 << 13);
            // Nothing fits: a new buffer, and the largest too small one is freed (the
            // allocator may place the new one at the freed one's address, so no pointer check).
            let b = take::<u64>(100 << 10);
            assert!(b.capacity() >= 100 << 10);
            assert_eq!((FREE_U64.with_borrow(Vec::len), HELD.get()), (0, 0));
            // Below MIN_BYTES: not pooled either way.
            give(Vec::<u8>::with_capacity(16));
            assert_eq!(FREE_U8.with_borrow(Vec::len), 0);
        });
    }

    #[test]
    fn the_free_lists_are_bounded() {
        on_a_thread(|| {
            for _ in 0..MAX_BUFFERS + 5 {
                give(Vec::<u8>::with_capacity(MIN_BYTES));
            }
            assert_eq!(FREE_U8.with_borrow(Vec::len), MAX_BUFFERS);
            give(Vec::<f32>::with_capacity(MAX_BUFFER / 4 + 1));
            assert_eq!(FREE_F32.with_borrow(Vec::len), 0, "over MAX_BUFFER");
        });
        on_a_thread(|| {
            // Over MAX_BUFFER: the large lists (once asked for), the smallest that fits taken
            // first, within LARGE_BYTES for all types together.
            keep_large_buffers();
            let a = Vec::<f32>::with_capacity(2 << 20);
            let b = Vec::<f32>::with_capacity(3 << 20);
            let (a_ptr, b_ptr) = (a.as_ptr(), b.as_ptr());
            give(a);
            give(b);
            assert_eq!(HELD_LARGE.get(), 20 << 20);
            give(Vec::<u64>::with_capacity(LARGE_BYTES / 8 - (2 << 20)));
            assert_eq!(
                HELD_LARGE.get(),
                20 << 20,
                "more would exceed LARGE_BYTES: freed"
            );
            assert!(LARGE_U64.with_borrow(Vec::is_empty));
            let c = take::<f32>(2 << 20);
            assert_eq!(c.as_ptr(), a_ptr, "the smallest that fits");
            let d = take::<f32>(2 << 20);
            assert_eq!(d.as_ptr(), b_ptr, "then the next");
            assert_eq!(HELD_LARGE.get(), 0);
            give(c);
            // Too small for the request: freed, and a new one comes.
            let e = take::<f32>(4 << 20);
            assert!(e.capacity() >= 4 << 20);
            assert!(LARGE_F32.with_borrow(Vec::is_empty));
            assert_eq!(HELD_LARGE.get(), 0);
            // At most MAX_LARGE per type.
            for _ in 0..MAX_LARGE + 3 {
                give(Vec::<u8>::with_capacity(MAX_BUFFER + 1));
            }
            assert_eq!(LARGE_U8.with_borrow(Vec::len), MAX_LARGE);
        });
        on_a_thread(|| {
            // MAX_BYTES across all types.
            for _ in 0..MAX_BYTES / MAX_BUFFER {
                give(Vec::<f32>::with_capacity(MAX_BUFFER / 8));
                give(Vec::<u64>::with_capacity(MAX_BUFFER / 16));
            }
            assert_eq!(HELD.get(), MAX_BYTES);
            give(Vec::<u8>::with_capacity(MIN_BYTES));
            assert_eq!(FREE_U8.with_borrow(Vec::len), 0);
        });
    }

    #[test]
    fn frame_buffers_are_shared_across_threads_and_bounded() {
        // The list is process-wide: these buffers are larger than any other test's.
        let v: Vec<u8> = Vec::with_capacity(FRAME_BYTES / 2 - 1);
        let ptr = v.as_ptr();
        std::thread::spawn(move || keep_frame(v)).join().unwrap();
        let again = take_frame(FRAME_BYTES / 2 - 10);
        assert_eq!(again.as_ptr(), ptr, "given on one thread, taken on another");
        assert!(again.is_empty());
        keep_frame(Vec::with_capacity(FRAME_BYTES / 2 + 1));
        assert!(
            FRAMES
                .lock()
                .unwrap()
                .iter()
                .all(|b| b.capacity() <= FRAME_BYTES / 2),
            "over the size bound: freed"
        );
    }

    #[test]
    fn the_shared_compressor_writes_what_a_fresh_one_writes() {
        let data: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        for level in [1, 3, 1] {
            let ours = compress(&data, level).unwrap();
            assert_eq!(ours, zstd::bulk::compress(&data, level).unwrap());
            let back = with_decompressor(|d| d.decompress(&ours, data.len())).unwrap();
            assert_eq!(back, data);
        }
    }
}
