//! The `.xpm` artifact: one file holding a zstd-compressed safetensors payload and a manifest.
//!
//! ```text
//! prelude   16 B   magic, format major/minor, flags
//! payload   P B    zstd frames: one per tensor part, in manifest order, then the safetensors
//!                  header; header + parts decompressed back to back form one safetensors file
//! manifest  M B    JSON (uncompressed: it reads without touching the payload)
//! trailer   80 B   manifest length, manifest sha256, content digest (1.1; 1.0: the sha256 of
//!                  every byte before it), end magic
//! ```
//!
//! The content digest (format 1.1) is the sha256 of the prelude, the manifest, its length and
//! its sha256: the manifest names every frame's digest, and the frames tile the payload, so it
//! commits to every byte of the file while the writer hashes each payload byte once (for its
//! frame digest) instead of twice. Frame digests are BLAKE3 from format 1.2 (SHA-256 before):
//! every read of a frame hashes it, and BLAKE3 does so three to four times as fast.
//!
//! Like a Parquet footer, the manifest comes last so a writer streams every frame straight to
//! disk once, in one pass, hashing as it goes; a reader finds the manifest from the fixed-size
//! trailer. Writing is bounded in memory (one encoded tensor per worker in flight) and atomic
//! (temporary file, fsync, rename). Reading is random access by frame, each frame checked
//! against its digest before it is decompressed, and its declared size checked against the
//! zstd frame header before anything is allocated. The byte-level specification is
//! docs/format.md.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Metadata, TensorInfo};
use sha2::{Digest, Sha256};

use super::manifest::{
    BLAKE3_FRAMES_FROM, Delta, FORMAT_MAJOR, FORMAT_MINOR, Frame, FrameDigest, Manifest, PartRole,
    Payload, StoredPart, TensorEntry,
};
use super::mask::{self, MaskEncoding};
use super::tensor::{Content, ContentView, TensorData, TensorView};
use crate::digest;
use crate::error::{Error, IoResultExt, Result};

/// First eight bytes of every artifact (PNG-style: catches text-mode and 7-bit transfers).
pub const MAGIC: [u8; 8] = *b"\x89XPM\r\n\x1a\n";
/// Last eight bytes of every artifact.
pub const END_MAGIC: [u8; 8] = *b"XPM-END\n";
/// Length of the fixed prelude.
pub const PRELUDE_LEN: u64 = 16;
/// Length of the fixed trailer.
pub const TRAILER_LEN: u64 = 80;
/// The last bytes of the trailer: the file sha256 and the end magic.
const DIGEST_TAIL_LEN: u64 = 40;
/// Largest manifest a reader accepts.
pub const MAX_MANIFEST_LEN: u64 = 256 << 20;
/// Largest safetensors header a reader accepts (the safetensors crate's own limit).
pub const MAX_HEADER_LEN: u64 = 100_000_000;
/// Upper bound of zstd's compression ratio (an RLE block stores 128 KiB in 4 bytes); a frame
/// declaring more than this is refused before anything is allocated.
pub const MAX_FRAME_RATIO: u64 = 1 << 16;
/// `__metadata__` key of the payload's safetensors header holding the tensor entries (without
/// storage offsets) as JSON.
pub const HEADER_TENSORS_KEY: &str = "xpm.tensors";
/// Default zstd level.
pub const DEFAULT_LEVEL: i32 = 3;
/// Prelude flag of format 1.1 and later: the trailer holds the content digest
/// ([`content_digest`]). A 1.0 reader refuses a file with flags it does not know, so it says
/// the file needs a newer xpm instead of calling it damaged.
pub const FLAG_CONTENT_DIGEST: u32 = 1;

/// The content digest of format 1.1: sha256 of the prelude, the manifest's bytes, their
/// length (u64 LE) and their sha256, i.e. of the file with the payload left out. The manifest
/// holds every frame's offset, size and digest and the frames tile the payload, so this
/// commits to every byte; it is computed from what `open` reads anyway.
pub fn content_digest(prelude: &[u8], manifest: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prelude);
    h.update(manifest);
    h.update((manifest.len() as u64).to_le_bytes());
    h.update(Sha256::digest(manifest));
    h.finalize().into()
}

/// One tensor, encoded and compressed, ready to be written.
#[derive(Debug)]
pub struct EncodedTensor {
    entry: TensorEntry,
    parts: Vec<EncodedPart>,
}

#[derive(Debug)]
struct EncodedPart {
    role: PartRole,
    st_dtype: safetensors::Dtype,
    shape: Vec<usize>,
    raw_size: u64,
    frame: Vec<u8>,
    digest: FrameDigest,
}

impl EncodedTensor {
    /// The manifest entry (with the mask encoding chosen, without storage offsets).
    pub fn entry(&self) -> &TensorEntry {
        &self.entry
    }

    /// Mark a dense tensor as new: the base lacks it and it is stored whole (a task head).
    pub fn mark_new(mut self) -> Result<Self> {
        if self.entry.delta != Delta::Dense {
            return Err(Error::input(
                format!("only a dense tensor can be new, not `{}`", self.entry.name),
                None,
            ));
        }
        self.entry.new = true;
        Ok(self)
    }
}

/// One part before compression: role, safetensors dtype, shape, bytes.
type RawPart<'a> = (PartRole, safetensors::Dtype, Vec<usize>, Cow<'a, [u8]>);

/// Validate, encode (choosing the smallest mask encoding) and compress one tensor.
/// Pure and thread-safe: callers run it in parallel across tensors.
pub fn encode_tensor(t: &TensorData, level: i32) -> Result<EncodedTensor> {
    encode_view(t.view(), level)
}

/// [`encode_tensor`] of a borrowed tensor (an importer's factors, straight out of a mapped
/// source file).
pub fn encode_view(t: TensorView<'_>, level: i32) -> Result<EncodedTensor> {
    t.validate()?;
    if let Some((part, i, v)) = t.first_non_finite() {
        return Err(Error::input(
            format!(
                "tensor `{}` holds {v} (entry {i} of its {part}); xpm does not store non-finite deltas",
                t.name
            ),
            Some(
                "a NaN or ∞ usually means an overflow of the values dtype (for `xpm extract`, \
                 store the values in f32 with `--values-dtype f32`) or diverged training (lower \
                 the learning rate)",
            ),
        ));
    }
    encode_checked(t, level)
}

/// [`encode_view`] after its checks (tests use it to write what a writer must refuse).
fn encode_checked(t: TensorView<'_>, level: i32) -> Result<EncodedTensor> {
    let mut entry = t.entry();
    let vdt = t.dtype.to_safetensors();
    let to_usize = |s: &[u64]| s.iter().map(|&d| d as usize).collect::<Vec<_>>();
    let raw_parts: Vec<RawPart> = match t.content {
        ContentView::Sparse {
            indices, values, ..
        } => {
            let (enc, bytes) = mask::encode_best(indices, t.shape);
            if let Delta::Sparse { encoding, .. } = &mut entry.delta {
                *encoding = Some(enc);
            }
            vec![
                (
                    PartRole::Mask,
                    safetensors::Dtype::U8,
                    vec![bytes.len()],
                    Cow::Owned(bytes),
                ),
                (
                    PartRole::Values,
                    vdt,
                    vec![indices.len()],
                    Cow::Borrowed(values),
                ),
            ]
        }
        ContentView::Lora { rank, a, b, .. } => {
            let r = rank as usize;
            let (out, inp) = (t.shape[0] as usize, t.shape[1] as usize);
            vec![
                (PartRole::LoraA, vdt, vec![r, inp], Cow::Borrowed(a)),
                (PartRole::LoraB, vdt, vec![out, r], Cow::Borrowed(b)),
            ]
        }
        ContentView::Dense { delta } => vec![(
            PartRole::Delta,
            vdt,
            to_usize(t.shape),
            Cow::Borrowed(delta),
        )],
    };
    let parts = raw_parts
        .into_iter()
        .map(|(role, st_dtype, shape, raw)| {
            let frame = compress(&raw, level)?;
            Ok(EncodedPart {
                role,
                st_dtype,
                shape,
                raw_size: raw.len() as u64,
                digest: FrameDigest::of(&frame),
                frame,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(EncodedTensor { entry, parts })
}

/// Parts at least this large are sampled before compression (below it, compressing is cheap).
const SAMPLE_FROM: usize = 256 << 10;
/// Bytes taken from each of the start, middle and end of a part for the sample.
const SAMPLE_CHUNK: usize = 16 << 10;
/// A sample that zstd shrinks by less than this fraction is not worth compressing.
const MIN_SAVING: f64 = 0.03;
/// A level above 1 whose sample is not at least this fraction of the sample smaller than at
/// level 1 is not worth its time: the part is compressed at level 1.
const MIN_LEVEL_GAIN: f64 = 0.01;

/// One zstd frame of `raw`: compressed at `level`, or, when a sample of the part shows that
/// zstd would save under 3 % (random factors and values, typically), a frame of raw blocks:
/// still a standard zstd frame that every decoder reads, written at memory speed instead of
/// spending the compressor's time for nothing. When the sample shows that `level` saves under
/// 1 % more than level 1 (floating-point noise such as LoRA factors: their random mantissas
/// leave zstd only the exponents), the part is compressed at level 1, about twice as fast.
fn compress(raw: &[u8], level: i32) -> Result<Vec<u8>> {
    let zstd_err = |e| Error::compute("zstd compression", e);
    let mut level = level;
    if raw.len() >= SAMPLE_FROM {
        let mid = raw.len() / 2 - SAMPLE_CHUNK / 2;
        let mut sample = Vec::with_capacity(3 * SAMPLE_CHUNK);
        sample.extend_from_slice(&raw[..SAMPLE_CHUNK]);
        sample.extend_from_slice(&raw[mid..mid + SAMPLE_CHUNK]);
        sample.extend_from_slice(&raw[raw.len() - SAMPLE_CHUNK..]);
        // The sample's frames go back to the pool they came from.
        let size = |f: Vec<u8>| {
            let n = f.len();
            crate::pool::give_frame(f);
            n
        };
        let packed = size(crate::pool::compress(&sample, level).map_err(zstd_err)?);
        if packed as f64 > sample.len() as f64 * (1.0 - MIN_SAVING) {
            return Ok(raw_frame(raw));
        }
        if level > 1 {
            let fast = size(crate::pool::compress(&sample, 1).map_err(zstd_err)?);
            if (fast as f64) < packed as f64 + sample.len() as f64 * MIN_LEVEL_GAIN {
                level = 1;
            }
        }
    }
    crate::pool::compress(raw, level).map_err(zstd_err)
}

/// A zstd frame (RFC 8878 §3.1.1) holding `raw` in raw blocks: the magic number, a frame
/// header declaring the content size (8 bytes, single segment, no checksum, no dictionary),
/// then blocks of at most 128 KiB, each a 3-byte header (last-block bit, type 0 = raw, size)
/// and the bytes themselves.
pub fn raw_frame(raw: &[u8]) -> Vec<u8> {
    const BLOCK: usize = 128 << 10;
    let mut out = crate::pool::take_frame(raw.len() + 13 + 3 * raw.len().div_ceil(BLOCK).max(1));
    out.extend_from_slice(&0xFD2F_B528u32.to_le_bytes());
    out.push(0b1110_0000); // FCS_flag 3 (8 bytes), Single_Segment 1, no checksum, no dictionary
    out.extend_from_slice(&(raw.len() as u64).to_le_bytes());
    let mut chunks = raw.chunks(BLOCK).peekable();
    if chunks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0]); // one empty last block
    }
    while let Some(c) = chunks.next() {
        let last = u32::from(chunks.peek().is_none());
        let header = last | ((c.len() as u32) << 3); // block type 0: raw
        out.extend_from_slice(&header.to_le_bytes()[..3]);
        out.extend_from_slice(c);
    }
    out
}

/// Writes an artifact: push encoded tensors, then [`ArtifactWriter::finish`].
///
/// Frames go straight into a temporary file next to the destination, in push order, hashed as
/// they are written; `finish` appends the safetensors header frame, the manifest and the
/// trailer, then renames the file into place. Nothing appears at the destination unless
/// `finish` succeeds; dropping the writer removes the temporary file.
pub struct ArtifactWriter {
    dest: PathBuf,
    tmp: tempfile::NamedTempFile,
    out: BufWriter<File>,
    payload_len: u64,
    tensors: Vec<(TensorEntry, Vec<WrittenPart>)>,
    names: HashSet<String>,
    level: i32,
}

struct WrittenPart {
    stored: StoredPart,
    st_dtype: safetensors::Dtype,
    shape: Vec<usize>,
}

impl ArtifactWriter {
    /// Start an artifact that will be written to `dest` with zstd `level`.
    pub fn create(dest: &Path, level: i32) -> Result<Self> {
        let (tmp, file) = crate::fsutil::temp_file_beside(dest)?;
        let mut out = file;
        out.write_all(&prelude()).at("write", tmp.path())?;
        Ok(ArtifactWriter {
            dest: dest.to_path_buf(),
            tmp,
            out,
            payload_len: 0,
            tensors: Vec::new(),
            names: HashSet::new(),
            level,
        })
    }

    /// Append one encoded tensor.
    pub fn push(&mut self, t: EncodedTensor) -> Result<()> {
        if !self.names.insert(t.entry.name.clone()) {
            return Err(Error::input(
                format!("tensor `{}` is given twice", t.entry.name),
                Some("each tensor may appear once in an expert"),
            ));
        }
        let mut written = Vec::with_capacity(t.parts.len());
        for p in t.parts {
            self.out.write_all(&p.frame).at("write", self.tmp.path())?;
            let size = p.frame.len() as u64;
            crate::pool::give_frame(p.frame);
            written.push(WrittenPart {
                stored: StoredPart {
                    role: p.role,
                    offset: self.payload_len,
                    size,
                    raw_size: p.raw_size,
                    digest: p.digest,
                },
                st_dtype: p.st_dtype,
                shape: p.shape,
            });
            self.payload_len += size;
        }
        self.tensors.push((t.entry, written));
        Ok(())
    }

    /// Finish the artifact at the destination. `manifest` supplies everything but `tensors`,
    /// `payload` and `format_version`, which the writer fills in. Returns the final manifest.
    pub fn finish(mut self, mut manifest: Manifest) -> Result<Manifest> {
        let tmp_path = self.tmp.path().to_path_buf();
        let werr = |e| Error::io("write", &tmp_path, e);

        // The safetensors header: parts in payload order, and the tensor entries themselves
        // (shape, kind, nnz, encoding) so the payload is self-describing and a manifest that
        // disagrees with it is caught.
        let mut infos = Vec::new();
        let mut data_off = 0usize;
        for (entry, parts) in &self.tensors {
            for p in parts {
                let end = data_off + p.stored.raw_size as usize;
                infos.push((
                    format!("{}.{}", entry.name, p.stored.role.suffix()),
                    TensorInfo {
                        dtype: p.st_dtype,
                        shape: p.shape.clone(),
                        data_offsets: (data_off, end),
                    },
                ));
                data_off = end;
            }
        }
        let described: Vec<&TensorEntry> = self.tensors.iter().map(|(e, _)| e).collect();
        let header_meta = std::collections::HashMap::from([(
            HEADER_TENSORS_KEY.to_string(),
            serde_json::to_string(&described).expect("entries serialize"),
        )]);
        let meta = Metadata::new(Some(header_meta), infos)
            .map_err(|e| Error::input(format!("cannot build the safetensors header: {e}"), None))?;
        let mut header_json = serde_json::to_vec(&meta).expect("metadata serializes");
        header_json.resize(header_json.len().next_multiple_of(8), b' ');
        let mut header_raw = (header_json.len() as u64).to_le_bytes().to_vec();
        header_raw.extend_from_slice(&header_json);
        let header_frame = compress(&header_raw, self.level)?;
        self.out.write_all(&header_frame).map_err(werr)?;

        manifest.format_version = format!("{FORMAT_MAJOR}.{FORMAT_MINOR}");
        manifest.payload = Some(Payload {
            compression: "zstd".into(),
            size: self.payload_len + header_frame.len() as u64,
            raw_size: header_raw.len() as u64 + data_off as u64,
            header: Frame {
                offset: self.payload_len,
                size: header_frame.len() as u64,
                raw_size: header_raw.len() as u64,
                digest: FrameDigest::of(&header_frame),
            },
        });
        manifest.tensors = std::mem::take(&mut self.tensors)
            .into_iter()
            .map(|(entry, parts)| TensorEntry {
                stored: parts.into_iter().map(|p| p.stored).collect(),
                ..entry
            })
            .collect();
        let manifest_json = serde_json::to_vec(&manifest).expect("manifest serializes");
        self.out.write_all(&manifest_json).map_err(werr)?;
        self.out
            .write_all(&(manifest_json.len() as u64).to_le_bytes())
            .map_err(werr)?;
        self.out
            .write_all(&Sha256::digest(&manifest_json))
            .map_err(werr)?;
        // Every payload byte was hashed once, for its frame's digest; the trailer's digest is
        // computed from the prelude and the manifest that names those digests.
        let mut inner = self.out;
        inner
            .write_all(&content_digest(&prelude(), &manifest_json))
            .map_err(werr)?;
        inner.write_all(&END_MAGIC).map_err(werr)?;
        let file = inner.into_inner().map_err(|e| werr(e.into_error()))?;
        file.sync_all().map_err(werr)?;
        self.tmp
            .persist(&self.dest)
            .map_err(|e| Error::io("write", &self.dest, e.error))?;
        Ok(manifest)
    }
}

fn prelude() -> Vec<u8> {
    let mut p = Vec::with_capacity(PRELUDE_LEN as usize);
    p.extend_from_slice(&MAGIC);
    p.extend_from_slice(&FORMAT_MAJOR.to_le_bytes());
    p.extend_from_slice(&FORMAT_MINOR.to_le_bytes());
    p.extend_from_slice(&FLAG_CONTENT_DIGEST.to_le_bytes());
    debug_assert_eq!(p.len() as u64, PRELUDE_LEN);
    p
}

/// Reads an artifact: the manifest on open, tensors on demand, the whole-file digest on request.
pub struct ArtifactReader {
    path: PathBuf,
    file: File,
    len: u64,
    manifest: Manifest,
    payload_start: u64,
    /// Format 1.1 and later: the content digest (§2.4 of docs/format.md), checked on open; the
    /// trailer holds it instead of 1.0's whole-file digest.
    content: Option<[u8; 32]>,
    /// Set by [`ArtifactReader::verify_file_digest`]: every frame was just checked, so frames
    /// are read without hashing them again; the file's state when it was hashed.
    whole: std::sync::OnceLock<FileStamp>,
}

/// What identifies a file's contents cheaply: a write in place changes its size or mtime.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
}

impl FileStamp {
    fn of(file: &File) -> std::io::Result<FileStamp> {
        let m = file.metadata()?;
        Ok(FileStamp {
            len: m.len(),
            modified: m.modified().ok(),
        })
    }
}

impl std::fmt::Debug for ArtifactReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArtifactReader")
            .field("path", &self.path)
            .finish()
    }
}

impl ArtifactReader {
    /// Open an artifact and check its prelude, manifest (digest and consistency), layout and
    /// safetensors header. Does not read the tensor frames.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut file = File::open(&path).at("open", &path)?;
        let len = file.metadata().at("read", &path)?.len();
        let corrupt = |d: String| Error::corrupt(&path, d);
        let mut pre = [0u8; PRELUDE_LEN as usize];
        let got = read_up_to(&mut file, &mut pre).at("read", &path)?;
        if got >= 8 && pre[..8] != MAGIC {
            return Err(corrupt(format!(
                "wrong magic bytes {} (expected {})",
                hex::encode(&pre[..8]),
                hex::encode(MAGIC)
            )));
        }
        if len < PRELUDE_LEN + TRAILER_LEN {
            return Err(corrupt(format!(
                "the file is {len} bytes, shorter than the smallest artifact ({} bytes); it is truncated",
                PRELUDE_LEN + TRAILER_LEN
            )));
        }
        let major = u16::from_le_bytes([pre[8], pre[9]]);
        let minor = u16::from_le_bytes([pre[10], pre[11]]);
        let flags = u32::from_le_bytes(pre[12..16].try_into().expect("4 bytes"));
        if major != FORMAT_MAJOR {
            return Err(Error::UnsupportedFormat {
                path,
                found: format!("{major}.{minor}"),
                supported: FORMAT_MAJOR,
            });
        }
        // 1.0 defines no flag; 1.1 and later set FLAG_CONTENT_DIGEST. A flag this build does
        // not know, in a minor it does not know, is a newer format; in one it knows, damage.
        let known = if minor >= 1 { FLAG_CONTENT_DIGEST } else { 0 };
        if flags & !known != 0 && minor > FORMAT_MINOR {
            return Err(Error::UnsupportedFormat {
                path,
                found: format!("{major}.{minor} (flags {flags:#x})"),
                supported: FORMAT_MAJOR,
            });
        }
        if flags != known {
            return Err(corrupt(format!(
                "flags {flags:#x} in the prelude, but format {major}.{minor} defines {known:#x}"
            )));
        }
        let mut trailer = [0u8; TRAILER_LEN as usize];
        crate::fsutil::read_exact_at(&file, &mut trailer, len - TRAILER_LEN).at("read", &path)?;
        if trailer[72..80] != END_MAGIC {
            return Err(corrupt(
                "the file does not end with the `XPM-END` marker: it is truncated or damaged"
                    .into(),
            ));
        }
        let manifest_len = u64::from_le_bytes(trailer[..8].try_into().expect("8 bytes"));
        let room = len - PRELUDE_LEN - TRAILER_LEN;
        if manifest_len > MAX_MANIFEST_LEN || manifest_len > room {
            return Err(corrupt(format!(
                "the trailer declares a {manifest_len}-byte manifest but the file has {len} bytes; \
                 it is truncated or the trailer is damaged"
            )));
        }
        let manifest_offset = len - TRAILER_LEN - manifest_len;
        let mut manifest_bytes = vec![0u8; manifest_len as usize];
        crate::fsutil::read_exact_at(&file, &mut manifest_bytes, manifest_offset)
            .at("read", &path)?;
        if Sha256::digest(&manifest_bytes)[..] != trailer[8..40] {
            return Err(corrupt(
                "the manifest does not match its sha256 in the trailer (flipped bits?)".into(),
            ));
        }
        let content = if minor >= 1 {
            let c = content_digest(&pre, &manifest_bytes);
            if c[..] != trailer[40..72] {
                return Err(corrupt(
                    "the trailer's content digest does not match the prelude and manifest \
                     (flipped bits?)"
                        .into(),
                ));
            }
            Some(c)
        } else {
            None
        };
        let manifest: Manifest = match serde_json::from_slice(&manifest_bytes) {
            Ok(m) => m,
            Err(e) if minor > FORMAT_MINOR => {
                return Err(Error::UnsupportedFormat {
                    path,
                    found: format!("{major}.{minor} ({e})"),
                    supported: FORMAT_MAJOR,
                });
            }
            Err(e) => return Err(corrupt(format!("the manifest is not valid: {e}"))),
        };
        if manifest.format() != Some((major, minor)) {
            return Err(corrupt(format!(
                "the manifest says format {} but the prelude says {major}.{minor}",
                manifest.format_version
            )));
        }
        let payload = manifest
            .payload
            .clone()
            .ok_or_else(|| corrupt("the manifest has no `payload` section".into()))?;
        if payload.size != manifest_offset - PRELUDE_LEN {
            return Err(corrupt(format!(
                "the manifest describes a {}-byte payload but the file holds {} bytes before the \
                 manifest; it is truncated or damaged",
                payload.size,
                manifest_offset - PRELUDE_LEN
            )));
        }
        check_manifest(&manifest, &payload, minor).map_err(corrupt)?;
        let reader = ArtifactReader {
            path,
            file,
            len,
            manifest,
            payload_start: PRELUDE_LEN,
            content,
            whole: std::sync::OnceLock::new(),
        };
        reader.check_safetensors_header(&payload)?;
        Ok(reader)
    }

    /// The artifact's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The manifest (with storage details).
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Format 1.1 and later: the content digest, `sha256:<hex>` (docs/format.md §2.4), checked
    /// when the file was opened. It names the file's bytes as surely as the whole-file digest
    /// once every frame read is checked against the manifest (which is how this reader reads
    /// them), and costs no pass over the payload. `None` for a format 1.0 file.
    pub fn content_digest(&self) -> Option<String> {
        self.content.map(|c| digest::format_digest(&c))
    }

    /// The file's length in bytes.
    pub fn file_len(&self) -> u64 {
        self.len
    }

    /// Check every byte of the file and return its `sha256:<hex>` (the digest of the whole
    /// file, trailer included, as a registry would compute it), in one sequential read that
    /// hashes the file whole and every frame on its own (against the manifest); a 1.0 file's
    /// whole-file digest is also compared with its trailer (a 1.1 trailer's content digest
    /// was checked on open). The first damaged frame is named.
    ///
    /// Afterwards this reader reads frames without hashing them again (they were just
    /// checked), so callers that decode every tensor hash each byte twice in all, not three
    /// times. Bytes are read twice, so whatever is made from them must be committed only after
    /// [`ArtifactReader::check_unchanged`] passes (a write in place between the two reads
    /// changes the file's size or mtime).
    pub fn verify_file_digest(&self) -> Result<String> {
        let stamp = FileStamp::of(&self.file).at("read", &self.path)?;
        // The frames in file order, with what to call each in an error.
        let mut frames: Vec<(u64, u64, &FrameDigest, String)> = Vec::new();
        if let Some(p) = &self.manifest.payload {
            frames.push((
                p.header.offset,
                p.header.size,
                &p.header.digest,
                "safetensors header".into(),
            ));
        }
        for t in &self.manifest.tensors {
            for p in &t.stored {
                frames.push((
                    p.offset,
                    p.size,
                    &p.digest,
                    format!("tensor `{}` ({})", t.name, p.role.suffix()),
                ));
            }
        }
        frames.sort_by_key(|f| f.0);
        let mut f = &self.file;
        f.seek(SeekFrom::Start(0)).at("read", &self.path)?;
        let mut whole = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut prelude = [0u8; PRELUDE_LEN as usize];
        f.read_exact(&mut prelude).at("read", &self.path)?;
        whole.update(prelude);
        // Frames tile the payload (checked on open): hash each as it streams past.
        for (_, size, want, what) in &frames {
            let mut frame = want.hasher();
            let mut left = *size;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                f.read_exact(&mut buf[..n]).at("read", &self.path)?;
                whole.update(&buf[..n]);
                frame.update(&buf[..n]);
                left -= n as u64;
            }
            if !frame.matches(want) {
                return Err(frame_mismatch(&self.path, what, want));
            }
        }
        // The manifest and trailer (the manifest's digest was checked on open).
        let mut rest = Vec::new();
        f.read_to_end(&mut rest).at("read", &self.path)?;
        if (rest.len() as u64) < DIGEST_TAIL_LEN {
            return Err(Error::corrupt(
                &self.path,
                "the file shrank while it was read",
            ));
        }
        let (body, tail) = rest.split_at(rest.len() - DIGEST_TAIL_LEN as usize);
        whole.update(body);
        if self.content.is_none() && whole.clone().finalize()[..] != tail[..32] {
            return Err(Error::corrupt(
                &self.path,
                "the file's sha256 does not match its trailer (the damage is outside the \
                 payload frames: prelude, manifest or trailer)",
            ));
        }
        whole.update(tail);
        let _ = self.whole.set(stamp);
        Ok(digest::format_digest(&whole.finalize()))
    }

    /// After [`ArtifactReader::verify_file_digest`]: an error if the file was written to
    /// since it was checked (its size or mtime changed), so what was read from it may not be
    /// what was verified. Without that check, frames were verified one by one: always fine.
    pub fn check_unchanged(&self) -> Result<()> {
        let Some(then) = self.whole.get() else {
            return Ok(());
        };
        let now = FileStamp::of(&self.file).at("read", &self.path)?;
        if &now != then {
            return Err(Error::input(
                format!(
                    "`{}` changed while it was being read (its size or modification time \
                     differs from when its digest was checked)",
                    self.path.display()
                ),
                Some("run the command again once nothing else writes to the file"),
            ));
        }
        Ok(())
    }

    /// Read the compressed bytes of a frame and verify them against their digest.
    fn frame_bytes(
        &self,
        offset: u64,
        size: u64,
        want: &FrameDigest,
        what: &str,
    ) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.frame_bytes_into(offset, size, want, what, &mut buf)?;
        Ok(buf)
    }

    /// Read the compressed bytes of a frame into `buf` and verify them against their digest.
    fn frame_bytes_into(
        &self,
        offset: u64,
        size: u64,
        want: &FrameDigest,
        what: &str,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        buf.clear();
        buf.resize(size as usize, 0);
        crate::fsutil::read_exact_at(&self.file, buf, self.payload_start + offset)
            .at("read", &self.path)?;
        if self.whole.get().is_none() && !want.matches(buf) {
            return Err(frame_mismatch(&self.path, what, want));
        }
        Ok(())
    }

    fn decompress(&self, frame: &[u8], raw_size: u64, what: &str) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.decompress_into(frame, raw_size, what, &mut out)?;
        Ok(out)
    }

    /// Decompress one frame into `out`, refusing before allocating if the zstd frame header
    /// disagrees with the size the manifest declares.
    fn decompress_into(
        &self,
        frame: &[u8],
        raw_size: u64,
        what: &str,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let corrupt = |d: String| Error::corrupt(&self.path, format!("{what}: {d}"));
        match zstd::zstd_safe::get_frame_content_size(frame) {
            Ok(Some(n)) if n == raw_size => {}
            Ok(Some(n)) => {
                return Err(corrupt(format!(
                    "the zstd frame declares {n} bytes, the manifest {raw_size}; refusing to decompress"
                )));
            }
            _ => return Err(corrupt("the zstd frame does not declare its size".into())),
        }
        out.clear();
        out.try_reserve(raw_size as usize)
            .map_err(|_| self.too_big(what, raw_size))?;
        crate::pool::with_decompressor(|d| d.decompress_to_buffer(frame, out))
            .map_err(|e| corrupt(format!("zstd: {e}")))?;
        if out.len() as u64 != raw_size {
            return Err(corrupt(format!(
                "decompressed to {} bytes, expected {raw_size}",
                out.len()
            )));
        }
        Ok(())
    }

    fn check_safetensors_header(&self, payload: &Payload) -> Result<()> {
        let h = &payload.header;
        let what = "safetensors header";
        let frame = self.frame_bytes(h.offset, h.size, &h.digest, what)?;
        let raw = self.decompress(&frame, h.raw_size, what)?;
        let corrupt = |d: String| Error::corrupt(&self.path, format!("{what}: {d}"));
        let n = u64::from_le_bytes(raw[..8].try_into().expect("raw_size >= 8 was checked"));
        if n != h.raw_size - 8 {
            return Err(corrupt(format!(
                "declares {n} bytes of JSON, holds {}",
                h.raw_size - 8
            )));
        }
        let meta: Metadata = serde_json::from_slice(&raw[8..])
            .map_err(|e| corrupt(format!("invalid header: {e}")))?;
        let described: Vec<TensorEntry> = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(HEADER_TENSORS_KEY))
            .and_then(|j| serde_json::from_str(j).ok())
            .ok_or_else(|| corrupt(format!("no valid `{HEADER_TENSORS_KEY}` metadata")))?;
        if described.len() != self.manifest.tensors.len() {
            return Err(corrupt(format!(
                "describes {} tensors, the manifest {}",
                described.len(),
                self.manifest.tensors.len()
            )));
        }
        for (d, t) in described.iter().zip(&self.manifest.tensors) {
            let t = TensorEntry {
                stored: Vec::new(),
                ..t.clone()
            };
            if *d != t {
                return Err(corrupt(format!(
                    "tensor `{}` is {} in the payload but {} in the manifest",
                    t.name,
                    serde_json::to_string(d).expect("serializes"),
                    serde_json::to_string(&t).expect("serializes")
                )));
            }
        }
        // Every stored part must appear with the same dtype, shape and size, at the offset its
        // frame position implies.
        let mut frames: Vec<(u64, u64, String, safetensors::Dtype, Vec<usize>)> = Vec::new();
        for t in &self.manifest.tensors {
            let vdt = t.dtype.to_safetensors();
            for (p, (role, shape)) in t.stored.iter().zip(super::tensor::part_shapes(t)) {
                let (dt, shape) = match role {
                    PartRole::Mask => (safetensors::Dtype::U8, vec![p.raw_size as usize]),
                    _ => (vdt, shape.iter().map(|&d| d as usize).collect()),
                };
                frames.push((
                    p.offset,
                    p.raw_size,
                    format!("{}.{}", t.name, role.suffix()),
                    dt,
                    shape,
                ));
            }
        }
        frames.sort_by_key(|f| f.0);
        if meta.tensors().len() != frames.len() {
            return Err(corrupt(format!(
                "holds {} tensors, the manifest describes {}",
                meta.tensors().len(),
                frames.len()
            )));
        }
        let mut data_off = 0usize;
        for (_, raw_size, name, dt, shape) in frames {
            let info = meta.info(&name).ok_or_else(|| {
                corrupt(format!("has no tensor `{name}`, which the manifest lists"))
            })?;
            if info.dtype != dt || info.shape != shape {
                return Err(corrupt(format!(
                    "tensor `{name}` is {:?} {:?}, the manifest says {:?} {:?}",
                    info.dtype, info.shape, dt, shape
                )));
            }
            if info.data_offsets != (data_off, data_off + raw_size as usize) {
                return Err(corrupt(format!(
                    "tensor `{name}` is at bytes {:?}, the manifest's frames put it at {:?}",
                    info.data_offsets,
                    (data_off, data_off + raw_size as usize)
                )));
            }
            data_off += raw_size as usize;
        }
        Ok(())
    }

    /// Decompressed bytes of one part of tensor `index`. Both buffers come from
    /// [`crate::pool`]: the compressed frame's goes back at once, the result's when its owner
    /// recycles it.
    pub fn read_part(&self, index: usize, role: PartRole) -> Result<Vec<u8>> {
        let (p, what) = self.stored_part(index, role)?;
        // Sizes from the manifest (checked against the file at open, a frame's raw size at
        // most MAX_FRAME_RATIO times its own): allocated without aborting on a huge one.
        let take = |n: u64| crate::pool::try_take(n as usize).ok_or_else(|| self.too_big(&what, n));
        let (mut scratch, mut out) = (take(p.size)?, take(p.raw_size)?);
        let read = self.read_stored_into(p, &what, &mut scratch, &mut out);
        crate::pool::give(scratch);
        read.map(|()| out)
    }

    /// Like [`ArtifactReader::read_part`], reusing `scratch` for the compressed frame and
    /// `out` for the result (no fresh allocation per part in streaming loops).
    pub fn read_part_into(
        &self,
        index: usize,
        role: PartRole,
        scratch: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let (p, what) = self.stored_part(index, role)?;
        self.read_stored_into(p, &what, scratch, out)
    }

    /// The error for a part whose declared size cannot be allocated (a hostile artifact may
    /// declare terabytes in a small file): an error, where the allocation would abort.
    fn too_big(&self, what: &str, bytes: u64) -> Error {
        Error::io(
            "read",
            &self.path,
            std::io::Error::new(
                std::io::ErrorKind::OutOfMemory,
                format!("{what} declares {bytes} bytes, more than this machine can allocate"),
            ),
        )
    }

    /// Tensor `index`'s stored part `role`, and how errors name it.
    fn stored_part(&self, index: usize, role: PartRole) -> Result<(&StoredPart, String)> {
        let t = &self.manifest.tensors[index];
        let p = t.stored.iter().find(|p| p.role == role).ok_or_else(|| {
            Error::corrupt(
                &self.path,
                format!("tensor `{}` has no `{}` part", t.name, role.suffix()),
            )
        })?;
        Ok((p, format!("tensor `{}` ({})", t.name, role.suffix())))
    }

    /// Read, check and decompress part `p`.
    fn read_stored_into(
        &self,
        p: &StoredPart,
        what: &str,
        scratch: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        self.frame_bytes_into(p.offset, p.size, &p.digest, what, scratch)?;
        self.decompress_into(scratch, p.raw_size, what, out)
    }

    /// The values of part `role` of tensor `index` (a LoRA factor, sparse values, a dense
    /// delta), checked finite as [`ArtifactReader::read_tensor`] checks them: for readers that
    /// stream a tensor part by part.
    pub fn read_values_part(&self, index: usize, role: PartRole) -> Result<Vec<u8>> {
        let t = &self.manifest.tensors[index];
        let bytes = self.read_part(index, role)?;
        match t.dtype.first_non_finite(&bytes) {
            Some((i, v)) => Err(self.non_finite(&t.name, role.suffix(), i, v)),
            None => Ok(bytes),
        }
    }

    /// The error for a stored non-finite value. The format requires finite values
    /// (docs/format.md): merging or applying a NaN or ∞ would spread it.
    fn non_finite(&self, name: &str, part: &str, i: usize, v: f32) -> Error {
        Error::corrupt(
            &self.path,
            format!("tensor `{name}` holds {v} (entry {i} of its {part}); deltas must be finite"),
        )
    }

    /// Decode tensor `index` completely (mask decoded to indices, all sizes checked).
    pub fn read_tensor(&self, index: usize) -> Result<TensorData> {
        let t = &self.manifest.tensors[index];
        let content = match &t.delta {
            Delta::Sparse {
                nnz,
                encoding,
                block_size,
                ..
            } => {
                let encoding = encoding.unwrap_or(MaskEncoding::DeltaRice);
                let mask_bytes = self.read_part(index, PartRole::Mask)?;
                let indices = mask::decode(encoding, &mask_bytes, &t.shape, *nnz);
                crate::pool::give(mask_bytes);
                let indices = indices
                    .map_err(|e| Error::corrupt(&self.path, format!("tensor `{}`: {e}", t.name)))?;
                Content::Sparse {
                    indices,
                    values: self.read_part(index, PartRole::Values)?,
                    block_size: *block_size,
                }
            }
            Delta::Lora { rank, alpha } => Content::Lora {
                rank: *rank,
                alpha: *alpha,
                a: self.read_part(index, PartRole::LoraA)?,
                b: self.read_part(index, PartRole::LoraB)?,
            },
            Delta::Dense => Content::Dense {
                delta: self.read_part(index, PartRole::Delta)?,
            },
        };
        let data = TensorData {
            name: t.name.clone(),
            shape: t.shape.clone(),
            dtype: t.dtype,
            content,
        };
        data.validate()
            .map_err(|e| Error::corrupt(&self.path, e.to_string()))?;
        if let Some((part, i, v)) = data.first_non_finite() {
            return Err(self.non_finite(&data.name, part, i, v));
        }
        Ok(data)
    }
}

/// One compressed frame of the payload: (offset, size, raw size, what it holds).
type FrameSpan = (u64, u64, u64, String);

/// Structural checks of an artifact manifest against itself; the error is the detail.
fn check_manifest(m: &Manifest, payload: &Payload, minor: u16) -> std::result::Result<(), String> {
    // Every frame digest well formed, of the algorithm the format's minor uses.
    let want = if minor >= BLAKE3_FRAMES_FROM {
        "blake3"
    } else {
        "sha256"
    };
    let check_digest = |d: &FrameDigest, what: &dyn std::fmt::Display| {
        if d.algorithm() != want {
            return Err(format!(
                "{what}: a {} frame digest, but format 1.{minor} names frames by {want}",
                d.algorithm()
            ));
        }
        if !d.is_well_formed() {
            return Err(format!(
                "{what}: frame digest {} is not `{want}:` and 64 lowercase hex digits",
                digest::quoted(d.as_str())
            ));
        }
        Ok(())
    };
    check_digest(&payload.header.digest, &"the safetensors header")?;
    if payload.compression != "zstd" {
        return Err(format!(
            "unknown payload compression `{}`",
            payload.compression
        ));
    }
    let mut frames: Vec<FrameSpan> = vec![(
        payload.header.offset,
        payload.header.size,
        payload.header.raw_size,
        "the safetensors header".into(),
    )];
    if !(8..=MAX_HEADER_LEN).contains(&payload.header.raw_size) {
        return Err(format!(
            "the safetensors header declares {} bytes (allowed: 8 to {MAX_HEADER_LEN})",
            payload.header.raw_size
        ));
    }
    let mut names = HashSet::new();
    for t in &m.tensors {
        let name = &t.name;
        if name.is_empty() || !names.insert(name.as_str()) {
            return Err(format!("tensor name `{name}` is empty or repeated"));
        }
        check_tensor_entry(t)?;
        for p in &t.stored {
            check_digest(
                &p.digest,
                &format_args!("tensor `{name}` ({})", p.role.suffix()),
            )?;
            frames.push((
                p.offset,
                p.size,
                p.raw_size,
                format!("tensor `{name}` ({})", p.role.suffix()),
            ));
        }
    }
    check_frames(frames, payload)
}

/// A tensor entry's shape, and its stored parts against its delta: the parts its kind needs, in
/// order, with the raw sizes its shape, dtype and entry count (or rank) imply.
fn check_tensor_entry(t: &TensorEntry) -> std::result::Result<(), String> {
    let name = &t.name;
    let n = super::mask::checked_numel(&t.shape).ok_or_else(|| {
        format!(
            "tensor `{name}`: shape {:?} has more than {} elements",
            t.shape,
            super::mask::MAX_NUMEL
        )
    })?;
    let es = t.dtype.size() as u64;
    let roles: Vec<PartRole> = t.stored.iter().map(|p| p.role).collect();
    let expect = |want: &[PartRole]| {
        if roles == want {
            Ok(())
        } else {
            Err(format!(
                "tensor `{name}`: stored parts {roles:?}, expected {want:?}"
            ))
        }
    };
    let raw = |i: usize| t.stored[i].raw_size;
    match &t.delta {
        Delta::Sparse {
            nnz,
            density,
            encoding,
            ..
        } => {
            expect(&[PartRole::Mask, PartRole::Values])?;
            if *nnz > n {
                return Err(format!("tensor `{name}`: {nnz} entries in {n} elements"));
            }
            if (density - super::tensor::density(*nnz, n)).abs() > 1e-9 {
                return Err(format!(
                    "tensor `{name}`: density {density} does not match nnz {nnz} of {n}"
                ));
            }
            let encoding =
                encoding.ok_or_else(|| format!("tensor `{name}`: no mask encoding recorded"))?;
            let mask_max = match encoding {
                MaskEncoding::Full => 0,
                _ => n.div_ceil(8) + 16,
            };
            if raw(0) > mask_max {
                return Err(format!(
                    "tensor `{name}`: mask declares {} bytes, at most {mask_max} possible",
                    raw(0)
                ));
            }
            if raw(1) != nnz * es {
                return Err(format!(
                    "tensor `{name}`: values declare {} bytes, {nnz} {} values are {}",
                    raw(1),
                    t.dtype,
                    nnz * es
                ));
            }
        }
        Delta::Lora { rank, .. } => {
            expect(&[PartRole::LoraA, PartRole::LoraB])?;
            let [out, inp] = t.shape[..] else {
                return Err(format!("tensor `{name}`: LoRA needs a 2-D shape"));
            };
            let r = *rank as u64;
            let size = |a: u64, b: u64| a.checked_mul(b).and_then(|v| v.checked_mul(es));
            if Some(raw(0)) != size(r, inp) || Some(raw(1)) != size(out, r) {
                return Err(format!(
                    "tensor `{name}`: LoRA factor sizes do not match rank {r}"
                ));
            }
        }
        Delta::Dense => {
            expect(&[PartRole::Delta])?;
            if raw(0) != n * es {
                return Err(format!(
                    "tensor `{name}`: delta declares {} bytes, shape {:?} of {} is {}",
                    raw(0),
                    t.shape,
                    t.dtype,
                    n * es
                ));
            }
        }
    }
    Ok(())
}

/// A frame whose bytes do not have the manifest's digest.
fn frame_mismatch(path: &Path, what: &str, want: &FrameDigest) -> Error {
    Error::corrupt(
        path,
        format!(
            "{what}: frame {} mismatch (flipped bits in the payload?)",
            want.algorithm()
        ),
    )
}

/// The frames, in offset order, tile the payload exactly, none can be a decompression bomb, and
/// their raw sizes add up to the payload's.
fn check_frames(mut frames: Vec<FrameSpan>, payload: &Payload) -> std::result::Result<(), String> {
    frames.sort_by_key(|f| f.0);
    let mut at = 0u64;
    let mut raw_total = 0u64;
    for (offset, size, raw_size, what) in &frames {
        if *offset != at {
            return Err(format!(
                "{what}: frame at payload offset {offset}, expected {at} (frames must be contiguous)"
            ));
        }
        if *raw_size > size.saturating_add(1).saturating_mul(MAX_FRAME_RATIO) {
            return Err(format!(
                "{what}: {size} compressed bytes cannot hold the declared {raw_size} bytes \
                 (decompression bomb?); refusing to decompress"
            ));
        }
        at = at
            .checked_add(*size)
            .filter(|&end| end <= payload.size)
            .ok_or_else(|| format!("{what}: frame runs past the end of the payload"))?;
        raw_total = raw_total
            .checked_add(*raw_size)
            .ok_or_else(|| format!("{what}: sizes overflow"))?;
    }
    if at != payload.size {
        return Err(format!(
            "frames cover {at} bytes, the payload is {}",
            payload.size
        ));
    }
    if raw_total != payload.raw_size {
        return Err(format!(
            "frames decompress to {raw_total} bytes, the payload declares {}",
            payload.raw_size
        ));
    }
    Ok(())
}

/// Read as many bytes as are available, up to `buf.len()`.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Dtype;
    use crate::format::manifest::{BaseModel, ExpertKind};

    fn tensor(name: &str, values: &[f32]) -> TensorData {
        TensorData {
            name: name.into(),
            shape: vec![values.len() as u64 * 2],
            dtype: Dtype::F32,
            content: Content::Sparse {
                indices: (0..values.len() as u64).map(|i| i * 2).collect(),
                values: Dtype::F32.from_f32(values),
                block_size: None,
            },
        }
    }

    fn manifest() -> Manifest {
        let base = BaseModel {
            id: "b".into(),
            digest: crate::digest::sha256(b"b"),
        };
        Manifest::new("t", "1.0.0".parse().unwrap(), base, ExpertKind::Sparse)
    }

    #[test]
    fn what_is_written_reads_back_and_the_file_digest_matches_its_bytes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.xpm");
        let mut w = ArtifactWriter::create(&p, DEFAULT_LEVEL).unwrap();
        for (name, v) in [("a", vec![1.0, -2.0]), ("b", vec![0.5])] {
            w.push(encode_tensor(&tensor(name, &v), DEFAULT_LEVEL).unwrap())
                .unwrap();
        }
        w.finish(manifest()).unwrap();
        let r = ArtifactReader::open(&p).unwrap();
        assert_eq!(r.manifest().tensors.len(), 2);
        let t = r.read_tensor(0).unwrap();
        assert_eq!(t, tensor("a", &[1.0, -2.0]));
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(
            r.verify_file_digest().unwrap(),
            crate::digest::sha256(&bytes)
        );
    }

    #[test]
    fn incompressible_parts_are_stored_in_raw_zstd_frames_that_zstd_reads_back() {
        let mut g = crate::rng::SplitMix64(7);
        for n in [
            0usize,
            1,
            5,
            (128 << 10) - 1,
            128 << 10,
            (128 << 10) + 1,
            300_000,
        ] {
            let raw: Vec<u8> = (0..n).map(|_| g.next_u64() as u8).collect();
            let frame = raw_frame(&raw);
            assert_eq!(
                zstd::zstd_safe::get_frame_content_size(&frame).unwrap(),
                Some(n as u64)
            );
            assert_eq!(zstd::stream::decode_all(&frame[..]).unwrap(), raw, "{n}");
        }
        // Random bytes: stored raw (a little larger than the input); zeros: compressed.
        let random: Vec<u8> = (0..1 << 20).map(|_| g.next_u64() as u8).collect();
        let f = compress(&random, DEFAULT_LEVEL).unwrap();
        assert_eq!(f, raw_frame(&random));
        let zeros = vec![0u8; 1 << 20];
        assert!(compress(&zeros, DEFAULT_LEVEL).unwrap().len() < 1000);
        // Float noise (zstd saves on the exponents only, as much at level 1 as at 3): level 1.
        let noise: Vec<u8> = (0..1 << 18)
            .flat_map(|_| ((g.uniform() * 2.0 - 1.0) * 0.01).to_le_bytes())
            .collect();
        let f = compress(&noise, DEFAULT_LEVEL).unwrap();
        assert_eq!(f, zstd::bulk::compress(&noise, 1).unwrap());
        assert!(
            f.len() < noise.len() * 97 / 100,
            "{} of {}",
            f.len(),
            noise.len()
        );
        // Text-like bytes, where level 3 finds more than level 1: the level asked for.
        let words = [
            "alpha ", "beta ", "gamma ", "delta ", "epsilon ", "zeta ", "eta ",
        ];
        let text: Vec<u8> = (0..200_000)
            .flat_map(|_| words[(g.next_u64() % 7) as usize].bytes())
            .collect();
        assert_eq!(
            compress(&text, DEFAULT_LEVEL).unwrap(),
            zstd::bulk::compress(&text, DEFAULT_LEVEL).unwrap()
        );
        // Float noise asked at level 19 too: level 1 (level 19 saves no more on it).
        assert_eq!(
            compress(&noise, 19).unwrap(),
            zstd::bulk::compress(&noise, 1).unwrap()
        );
        // Sorted u32 indices: level 1 saves about 28 %, level 19 far more (it finds the small
        // deltas' repeats): the level asked for.
        let mut at = 0u32;
        let indices: Vec<u8> = (0..100_000)
            .flat_map(|_| {
                at += (g.next_u64() % 40) as u32 + 1;
                at.to_le_bytes()
            })
            .collect();
        let l19 = compress(&indices, 19).unwrap();
        assert_eq!(l19, zstd::bulk::compress(&indices, 19).unwrap());
        assert!(l19.len() * 10 < zstd::bulk::compress(&indices, 1).unwrap().len() * 7);
        // Small parts are always compressed (the sample would cost as much).
        let small: Vec<u8> = random[..1000].to_vec();
        assert_eq!(
            compress(&small, DEFAULT_LEVEL).unwrap(),
            zstd::bulk::compress(&small, DEFAULT_LEVEL).unwrap()
        );
    }

    #[test]
    fn after_the_whole_file_is_verified_frames_read_unhashed_until_the_file_changes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.xpm");
        let mut w = ArtifactWriter::create(&p, DEFAULT_LEVEL).unwrap();
        w.push(encode_tensor(&tensor("a", &[1.0, -2.0, 3.0]), DEFAULT_LEVEL).unwrap())
            .unwrap();
        w.finish(manifest()).unwrap();
        let bytes = std::fs::read(&p).unwrap();

        // Without verify_file_digest there is nothing to compare against: always unchanged.
        let plain = ArtifactReader::open(&p).unwrap();
        plain.check_unchanged().unwrap();

        let r = ArtifactReader::open(&p).unwrap();
        assert_eq!(
            r.verify_file_digest().unwrap(),
            crate::digest::sha256(&bytes)
        );
        assert_eq!(r.read_tensor(0).unwrap(), tensor("a", &[1.0, -2.0, 3.0]));
        r.check_unchanged().unwrap();

        // A write in place after the digest was checked: a value frame's byte flipped (and
        // the mtime moved). The frame is no longer hashed, so the reader cannot see it; the
        // stamp check does, and a frame-checking reader still names the frame.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let frame = &r.manifest().tensors[0].stored[1];
        let pos = (PRELUDE_LEN + frame.offset + frame.size / 2) as usize;
        let mut changed = bytes.clone();
        changed[pos] ^= 0x01;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .write_all(&changed)
            .unwrap();
        let e = r.check_unchanged().unwrap_err().to_string();
        assert!(e.contains("changed while it was being read"), "{e}");
        let e = plain.read_tensor(0).unwrap_err().to_string();
        assert!(e.contains("frame blake3 mismatch"), "{e}");
        // And a fresh whole-file check refuses it outright.
        let again = ArtifactReader::open(&p).unwrap();
        assert!(again.verify_file_digest().is_err());
    }

    #[test]
    fn a_repeated_tensor_name_and_non_finite_values_are_refused_by_the_writer() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.xpm");
        let mut w = ArtifactWriter::create(&p, DEFAULT_LEVEL).unwrap();
        w.push(encode_tensor(&tensor("a", &[1.0]), DEFAULT_LEVEL).unwrap())
            .unwrap();
        assert!(
            w.push(encode_tensor(&tensor("a", &[2.0]), DEFAULT_LEVEL).unwrap())
                .is_err()
        );
        let e = encode_tensor(&tensor("n", &[f32::NAN]), DEFAULT_LEVEL).unwrap_err();
        assert!(e.to_string().contains("holds NaN"), "{e}");
        drop(w);
        assert!(!p.exists(), "an unfinished writer leaves nothing");
    }

    /// A frame may declare any size in a few bytes of header: one that cannot be allocated is
    /// an error naming the part, not an aborted process (the manifest's sizes are bounded
    /// against the file at open, but a large file can still declare more than the machine has).
    #[test]
    fn a_size_that_cannot_be_allocated_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.xpm");
        let mut w = ArtifactWriter::create(&p, DEFAULT_LEVEL).unwrap();
        w.push(encode_tensor(&tensor("n", &[1.0, 2.0]), DEFAULT_LEVEL).unwrap())
            .unwrap();
        w.finish(manifest()).unwrap();
        let r = ArtifactReader::open(&p).unwrap();
        let huge: u64 = 1 << 62;
        // A zstd frame header declaring `huge` bytes: magic, single segment with an 8-byte size.
        let mut frame = 0xFD2F_B528u32.to_le_bytes().to_vec();
        frame.push(0b1110_0000);
        frame.extend_from_slice(&huge.to_le_bytes());
        let e = r
            .decompress_into(&frame, huge, "tensor `n` (values)", &mut Vec::new())
            .unwrap_err();
        let e = crate::error::chain(&e);
        assert!(e.contains("cannot read"), "{e}");
        assert!(
            e.contains("tensor `n` (values) declares 4611686018427387904 bytes, more than"),
            "{e}"
        );
        assert!(crate::pool::try_take::<u8>(huge as usize).is_none());
    }

    /// An artifact that holds a NaN (written by another tool, or an older xpm) is refused by
    /// every read (`verify`, `merge`, `apply` and `eval` read through `read_tensor`, `export`
    /// through `read_values_part` too).
    #[test]
    fn a_stored_non_finite_value_is_refused_on_read() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.xpm");
        let mut w = ArtifactWriter::create(&p, DEFAULT_LEVEL).unwrap();
        w.push(encode_checked(tensor("n", &[1.0, f32::INFINITY]).view(), DEFAULT_LEVEL).unwrap())
            .unwrap();
        w.finish(manifest()).unwrap();
        let r = ArtifactReader::open(&p).unwrap();
        let e = r.read_tensor(0).unwrap_err().to_string();
        assert!(e.contains("holds inf (entry 1 of its values)"), "{e}");
        // And by the part-by-part read of streaming readers (`xpm export`).
        let e = r
            .read_values_part(0, PartRole::Values)
            .unwrap_err()
            .to_string();
        assert!(e.contains("holds inf (entry 1 of its values)"), "{e}");
        let e = crate::format::verify::verify(&p, &crate::printer::Printer::silent()).unwrap_err();
        assert!(e.to_string().contains("deltas must be finite"), "{e}");
    }

    #[test]
    fn a_flipped_byte_anywhere_is_caught() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.xpm");
        let mut w = ArtifactWriter::create(&p, DEFAULT_LEVEL).unwrap();
        w.push(encode_tensor(&tensor("a", &[1.0, 3.0, -4.0]), DEFAULT_LEVEL).unwrap())
            .unwrap();
        w.finish(manifest()).unwrap();
        let good = std::fs::read(&p).unwrap();
        for i in (0..good.len()).step_by(7) {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            std::fs::write(&p, &bad).unwrap();
            let caught = ArtifactReader::open(&p).and_then(|r| {
                r.verify_file_digest()?;
                r.read_tensor(0)
            });
            assert!(
                caught.is_err(),
                "byte {i} of {} changed unnoticed",
                good.len()
            );
        }
    }
}
