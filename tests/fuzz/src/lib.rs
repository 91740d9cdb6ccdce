//! Helpers shared by the fuzz targets in `fuzz_targets/` (see README.md):
//!
//! - [`scratch_dir`]: one scratch directory per fuzzer process (under `/dev/shm` when it
//!   exists, so the library's fsyncs cost nothing), removed at exit;
//! - [`fix_digests`]: the artifact checksum fixer, so mutated artifacts get past the sha256
//!   checks (a hostile uploader computes them too) and reach the parsing behind them;
//! - [`CappedAlloc`]: the global allocator of every target; refuses single allocations above
//!   [`MALLOC_LIMIT`] (libFuzzer's `-malloc_limit_mb` needs a sanitizer runtime, which stable
//!   Rust cannot link), printing a backtrace, so a small input that asks for gigabytes is
//!   reported as a crash;
//! - [`seeds`]: the seed corpus, written when `XPM_FUZZ_WRITE_SEEDS=DIR` is set (see
//!   [`maybe_write_seeds`]).

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use sha2::{Digest, Sha256};

pub mod seeds;

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

/// Largest single allocation a target may make (the same figure as `-rss_limit_mb`).
pub const MALLOC_LIMIT: usize = 2048 << 20;

/// The system allocator, refusing (returning null for) any single allocation above
/// [`MALLOC_LIMIT`]. Code that uses `try_reserve` sees an error; everything else aborts with
/// "memory allocation of N bytes failed", which libFuzzer reports as a crash.
pub struct CappedAlloc;

static IN_REPORT: AtomicBool = AtomicBool::new(false);

fn refuse(size: usize) {
    // One report at a time; the backtrace itself allocates (small blocks, served normally).
    if !IN_REPORT.swap(true, Ordering::SeqCst) {
        eprintln!(
            "==xpm-fuzz== allocation of {size} bytes exceeds the {} MiB malloc limit\n{}",
            MALLOC_LIMIT >> 20,
            std::backtrace::Backtrace::force_capture()
        );
        IN_REPORT.store(false, Ordering::SeqCst);
    }
}

// SAFETY: defers to `System` for every allocation it does not refuse; a refused allocation
// returns null, which the `GlobalAlloc` contract allows.
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MALLOC_LIMIT {
            refuse(layout.size());
            return std::ptr::null_mut();
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MALLOC_LIMIT {
            refuse(layout.size());
            return std::ptr::null_mut();
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > MALLOC_LIMIT {
            refuse(new_size);
            return std::ptr::null_mut();
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

unsafe extern "C" {
    fn atexit(cb: extern "C" fn()) -> std::ffi::c_int;
}

static SCRATCH: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn remove_scratch() {
    if let Some(d) = SCRATCH.get() {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// This process's scratch directory (created on first use, removed when the process exits
/// normally; a crashing run leaves it behind under `/dev/shm/xpm-fuzz-PID`).
pub fn scratch_dir() -> &'static Path {
    SCRATCH.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let d = base.join(format!("xpm-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("create the scratch directory");
        // SAFETY: registers a plain function with no captured state.
        unsafe { atexit(remove_scratch) };
        d
    })
}

/// A fresh, empty directory `name` under the scratch directory.
pub fn fresh_dir(name: &str) -> PathBuf {
    let d = scratch_dir().join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create a scratch subdirectory");
    d
}

/// Write `bytes` to `name` in the scratch directory and return its path.
pub fn scratch_file(name: &str, bytes: &[u8]) -> PathBuf {
    let p = scratch_dir().join(name);
    std::fs::write(&p, bytes).expect("write a scratch file");
    p
}

const PRELUDE: usize = 16;
const TRAILER: usize = 80;

/// Make the checksums of a (possibly mutated) artifact consistent again: every frame's
/// digest in the manifest (`blake3`, or `sha256` where the frame names one) (header and stored parts, wherever offset and size point inside
/// the payload), the manifest length and sha256 in the trailer, the whole-file sha256 and the
/// end magic. Returns `None` when nothing had to change or the trailer cannot locate a
/// manifest at all.
///
/// The reader checks these digests before it parses anything behind them; they protect
/// against damage, not against an attacker (who recomputes them), so the fuzzer must get past
/// them to test the parsing that a hostile file reaches.
pub fn fix_digests(data: &[u8]) -> Option<Vec<u8>> {
    let len = data.len();
    if len < PRELUDE + TRAILER {
        return None;
    }
    let mlen = u64::from_le_bytes(data[len - TRAILER..len - TRAILER + 8].try_into().unwrap());
    if mlen > (len - PRELUDE - TRAILER) as u64 {
        return None;
    }
    let mstart = len - TRAILER - mlen as usize;
    let payload = &data[PRELUDE..mstart];
    let mut manifest = data[mstart..len - TRAILER].to_vec();
    if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&manifest) {
        let mut changed = false;
        let mut fix = |frame: &mut serde_json::Value| {
            let (Some(off), Some(size)) = (
                frame.get("offset").and_then(|x| x.as_u64()),
                frame.get("size").and_then(|x| x.as_u64()),
            ) else {
                return;
            };
            let Some(end) = off.checked_add(size).filter(|&e| e <= payload.len() as u64) else {
                return;
            };
            let bytes = &payload[off as usize..end as usize];
            let (key, want) = if frame.get("sha256").is_some() {
                ("sha256", xpm_core::digest::sha256(bytes))
            } else {
                let d = xpm_core::digest::FrameDigest::of(bytes);
                ("blake3", d.as_str().to_string())
            };
            if frame.get(key).and_then(|s| s.as_str()) != Some(want.as_str())
                && let Some(obj) = frame.as_object_mut()
            {
                obj.insert(key.into(), want.into());
                changed = true;
            }
        };
        if let Some(h) = v.pointer_mut("/payload/header") {
            fix(h);
        }
        if let Some(ts) = v.get_mut("tensors").and_then(|t| t.as_array_mut()) {
            for t in ts {
                if let Some(parts) = t.get_mut("stored").and_then(|s| s.as_array_mut()) {
                    parts.iter_mut().for_each(&mut fix);
                }
            }
        }
        if changed {
            manifest = serde_json::to_vec(&v).expect("a JSON value serializes");
        }
    }
    let mut out = Vec::with_capacity(mstart + manifest.len() + TRAILER);
    out.extend_from_slice(&data[..mstart]);
    out.extend_from_slice(&manifest);
    out.extend_from_slice(&(manifest.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&manifest));
    // Format 1.1 and later: the content digest; 1.0: the sha256 of every byte before it.
    let minor = data
        .get(10..12)
        .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]));
    let whole: [u8; 32] = if minor >= 1 && data.len() >= 16 {
        xpm_core::format::artifact::content_digest(&data[..16], &manifest)
    } else {
        Sha256::digest(&out).into()
    };
    out.extend_from_slice(&whole);
    out.extend_from_slice(&xpm_core::format::artifact::END_MAGIC);
    (out != data).then_some(out)
}

/// When `XPM_FUZZ_WRITE_SEEDS=DIR` is set: write the seed corpus of every target under
/// `DIR/<target>/` and exit (`XPM_FUZZ_WRITE_CRAFTED=DIR`: the hand-made inputs of
/// [`seeds::write_crafted`]). Called from every target's `init`, so any built target can
/// (re)generate the seeds: `XPM_FUZZ_WRITE_SEEDS=tests/fuzz/seeds cargo fuzz run mask …`.
pub fn maybe_write_seeds() {
    if let Some(dir) = std::env::var_os("XPM_FUZZ_WRITE_SEEDS") {
        let dir = PathBuf::from(dir);
        let n = seeds::write_all(&dir).expect("write the seed corpus");
        eprintln!("xpm-fuzz: wrote {n} seed files under {}", dir.display());
        std::process::exit(0);
    }
    if let Some(dir) = std::env::var_os("XPM_FUZZ_WRITE_CRAFTED") {
        let dir = PathBuf::from(dir);
        let n = seeds::write_crafted(&dir).expect("write the crafted inputs");
        eprintln!("xpm-fuzz: wrote {n} crafted files under {}", dir.display());
        std::process::exit(0);
    }
}

/// One input of the `mask` target: encoding, shape, declared entry count and mask bytes.
#[derive(Debug, Clone)]
pub struct MaskCase {
    pub encoding: xpm_core::format::MaskEncoding,
    pub shape: Vec<u64>,
    pub nnz: u64,
    pub bytes: Vec<u8>,
}

/// Largest tensor the `mask` target decodes for.
pub const MASK_MAX_NUMEL: u64 = 1 << 20;

/// The four encodings, by the selector byte of a [`MaskCase`].
pub const ENCODINGS: [xpm_core::format::MaskEncoding; 4] = [
    xpm_core::format::MaskEncoding::DeltaRice,
    xpm_core::format::MaskEncoding::Bitmap,
    xpm_core::format::MaskEncoding::Block16,
    xpm_core::format::MaskEncoding::Full,
];

impl MaskCase {
    /// Layout: encoding selector (1 byte, low 2 bits), rank (1 byte, mod 4; rank 0 is a
    /// scalar), rank × u16 LE dims, nnz as u32 LE (taken mod numel + 2, so one past the
    /// largest valid count is reachable), then the mask bytes. `None` when the input is too
    /// short or the shape has more than [`MASK_MAX_NUMEL`] elements.
    pub fn parse(data: &[u8]) -> Option<MaskCase> {
        let (&sel, rest) = data.split_first()?;
        let (&rank, mut rest) = rest.split_first()?;
        let mut shape = Vec::new();
        for _ in 0..rank % 4 {
            let (d, r) = rest.split_first_chunk::<2>()?;
            shape.push(u16::from_le_bytes(*d) as u64);
            rest = r;
        }
        let numel = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= MASK_MAX_NUMEL)?;
        let (nnz, rest) = rest.split_first_chunk::<4>()?;
        let nnz = u32::from_le_bytes(*nnz) as u64 % (numel + 2);
        Some(MaskCase {
            encoding: ENCODINGS[(sel & 3) as usize],
            shape,
            nnz,
            bytes: rest.to_vec(),
        })
    }

    /// The input bytes that [`MaskCase::parse`] reads back as `self`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let sel = ENCODINGS.iter().position(|&e| e == self.encoding).unwrap() as u8;
        let mut out = vec![sel, self.shape.len() as u8];
        for &d in &self.shape {
            out.extend_from_slice(&(d as u16).to_le_bytes());
        }
        out.extend_from_slice(&(self.nnz as u32).to_le_bytes());
        out.extend_from_slice(&self.bytes);
        out
    }
}
