//! The `.xpm` artifact: one file holding a manifest and a zstd-compressed safetensors payload.
//!
//! ```text
//! prelude   56 B   magic, format major/minor, flags, manifest length, manifest sha256
//! manifest  M B    JSON (uncompressed, so it reads without touching the payload)
//! payload   P B    zstd frames: the safetensors header, then one frame per tensor part;
//!                  decompressed back to back they form one safetensors file
//! trailer   40 B   sha256 of every byte before the trailer, end magic
//! ```
//!
//! Writing is bounded in memory: each tensor is encoded and compressed on its own into a spool
//! file next to the destination, then the file is assembled by temp-file-and-rename. Reading is
//! random access by frame, each frame checked against its sha256 before it is decompressed and
//! checked against its declared size before anything is allocated. The byte-level specification
//! is docs/format.md.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Metadata, TensorInfo};
use sha2::{Digest, Sha256};

use super::manifest::{
    Delta, FORMAT_MAJOR, FORMAT_MINOR, Frame, Manifest, PartRole, Payload, StoredPart, TensorEntry,
};
use super::mask::{self, MaskEncoding};
use super::tensor::{Content, TensorData};
use crate::digest::{self, HashingWriter};
use crate::error::{Error, IoResultExt, Result};

/// First eight bytes of every artifact (PNG-style: catches text-mode and 7-bit transfers).
pub const MAGIC: [u8; 8] = *b"\x89XPM\r\n\x1a\n";
/// Last eight bytes of every artifact.
pub const END_MAGIC: [u8; 8] = *b"XPM-END\n";
/// Length of the fixed prelude.
pub const PRELUDE_LEN: u64 = 56;
/// Length of the fixed trailer.
pub const TRAILER_LEN: u64 = 40;
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

/// One tensor, encoded and compressed, ready to be spooled.
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
    sha256: String,
}

impl EncodedTensor {
    /// The manifest entry (with the mask encoding chosen, without storage offsets).
    pub fn entry(&self) -> &TensorEntry {
        &self.entry
    }

    /// Compressed bytes of all parts.
    pub fn stored_bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.frame.len() as u64).sum()
    }
}

/// Validate, encode (choosing the smallest mask encoding) and compress one tensor.
/// Pure and thread-safe: callers run it in parallel across tensors.
pub fn encode_tensor(t: &TensorData, level: i32) -> Result<EncodedTensor> {
    t.validate()?;
    let mut entry = t.entry();
    let vdt = t.dtype.to_safetensors();
    let to_usize = |s: &[u64]| s.iter().map(|&d| d as usize).collect::<Vec<_>>();
    let raw_parts: Vec<(PartRole, safetensors::Dtype, Vec<usize>, Vec<u8>)> = match &t.content {
        Content::Sparse {
            indices, values, ..
        } => {
            let (enc, bytes) = mask::encode_best(indices, &t.shape);
            if let Delta::Sparse { encoding, .. } = &mut entry.delta {
                *encoding = Some(enc);
            }
            vec![
                (
                    PartRole::Mask,
                    safetensors::Dtype::U8,
                    vec![bytes.len()],
                    bytes,
                ),
                (PartRole::Values, vdt, vec![indices.len()], values.clone()),
            ]
        }
        Content::Lora { rank, a, b, .. } => {
            let r = *rank as usize;
            let (out, inp) = (t.shape[0] as usize, t.shape[1] as usize);
            vec![
                (PartRole::LoraA, vdt, vec![r, inp], a.clone()),
                (PartRole::LoraB, vdt, vec![out, r], b.clone()),
            ]
        }
        Content::Dense { delta } => vec![(PartRole::Delta, vdt, to_usize(&t.shape), delta.clone())],
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
                sha256: digest::sha256(&frame),
                frame,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(EncodedTensor { entry, parts })
}

fn compress(raw: &[u8], level: i32) -> Result<Vec<u8>> {
    zstd::bulk::compress(raw, level)
        .map_err(|e| Error::input(format!("zstd compression failed: {e}"), None))
}

/// Writes an artifact: push encoded tensors, then [`ArtifactWriter::finish`].
///
/// Nothing appears at the destination until `finish` succeeds; dropping the writer removes
/// its temporary files.
pub struct ArtifactWriter {
    dest: PathBuf,
    dir: PathBuf,
    spool: tempfile::NamedTempFile,
    spool_len: u64,
    tensors: Vec<(TensorEntry, Vec<SpooledPart>)>,
    names: HashSet<String>,
    level: i32,
}

struct SpooledPart {
    role: PartRole,
    st_dtype: safetensors::Dtype,
    shape: Vec<usize>,
    raw_size: u64,
    spool_offset: u64,
    size: u64,
    sha256: String,
}

impl ArtifactWriter {
    /// Start an artifact that will be written to `dest` with zstd `level`.
    pub fn create(dest: &Path, level: i32) -> Result<Self> {
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let spool = tempfile::Builder::new()
            .prefix(".xpm-spool-")
            .tempfile_in(&dir)
            .at("create a temporary file in", &dir)?;
        Ok(ArtifactWriter {
            dest: dest.to_path_buf(),
            dir,
            spool,
            spool_len: 0,
            tensors: Vec::new(),
            names: HashSet::new(),
            level,
        })
    }

    /// The zstd level this writer was created with.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Append one encoded tensor.
    pub fn push(&mut self, t: EncodedTensor) -> Result<()> {
        if !self.names.insert(t.entry.name.clone()) {
            return Err(Error::input(
                format!("tensor `{}` is given twice", t.entry.name),
                Some("each tensor may appear once in an expert"),
            ));
        }
        let mut spooled = Vec::with_capacity(t.parts.len());
        let spool_path = self.spool.path().to_path_buf();
        for p in t.parts {
            self.spool
                .as_file_mut()
                .write_all(&p.frame)
                .at("write", &spool_path)?;
            spooled.push(SpooledPart {
                role: p.role,
                st_dtype: p.st_dtype,
                shape: p.shape,
                raw_size: p.raw_size,
                spool_offset: self.spool_len,
                size: p.frame.len() as u64,
                sha256: p.sha256,
            });
            self.spool_len += p.frame.len() as u64;
        }
        self.tensors.push((t.entry, spooled));
        Ok(())
    }

    /// Assemble the artifact at the destination. `manifest` supplies everything but `tensors`,
    /// `payload` and `format_version`, which the writer fills in. Returns the final manifest.
    pub fn finish(self, mut manifest: Manifest) -> Result<Manifest> {
        // Payload order: like the safetensors crate, by descending alignment, then by name, so
        // the decompressed image has every tensor aligned.
        let mut order: Vec<(String, usize, usize)> = Vec::new();
        for (ti, (entry, parts)) in self.tensors.iter().enumerate() {
            for (pi, p) in parts.iter().enumerate() {
                order.push((format!("{}.{}", entry.name, p.role.suffix()), ti, pi));
            }
        }
        let part = |&(_, ti, pi): &(String, usize, usize)| &self.tensors[ti].1[pi];
        order.sort_by(|a, b| part(b).st_dtype.cmp(&part(a).st_dtype).then(a.0.cmp(&b.0)));

        let mut infos = Vec::with_capacity(order.len());
        let mut data_off = 0usize;
        for o in &order {
            let p = part(o);
            let end = data_off + p.raw_size as usize;
            infos.push((
                o.0.clone(),
                TensorInfo {
                    dtype: p.st_dtype,
                    shape: p.shape.clone(),
                    data_offsets: (data_off, end),
                },
            ));
            data_off = end;
        }
        // The header also describes the expert tensors themselves (shape, kind, nnz, encoding),
        // so the payload is self-describing and a manifest that disagrees with it is caught.
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

        // Payload offsets, then the manifest.
        let mut offset = header_frame.len() as u64;
        let mut stored: Vec<Vec<Option<StoredPart>>> = self
            .tensors
            .iter()
            .map(|(_, parts)| vec![None; parts.len()])
            .collect();
        for &(_, ti, pi) in &order {
            let p = &self.tensors[ti].1[pi];
            stored[ti][pi] = Some(StoredPart {
                role: p.role,
                offset,
                size: p.size,
                raw_size: p.raw_size,
                sha256: p.sha256.clone(),
            });
            offset += p.size;
        }
        manifest.format_version = format!("{FORMAT_MAJOR}.{FORMAT_MINOR}");
        manifest.tensors = self
            .tensors
            .iter()
            .zip(stored)
            .map(|((entry, _), parts)| TensorEntry {
                stored: parts
                    .into_iter()
                    .map(|p| p.expect("every part placed"))
                    .collect(),
                ..entry.clone()
            })
            .collect();
        manifest.payload = Some(Payload {
            compression: "zstd".into(),
            size: offset,
            raw_size: header_raw.len() as u64 + data_off as u64,
            header: Frame {
                offset: 0,
                size: header_frame.len() as u64,
                raw_size: header_raw.len() as u64,
                sha256: digest::sha256(&header_frame),
            },
        });
        let manifest_json = serde_json::to_vec(&manifest).expect("manifest serializes");

        // Assemble: prelude, manifest, payload frames (copied from the spool), trailer.
        let tmp = tempfile::Builder::new()
            .prefix(".xpm-tmp-")
            .tempfile_in(&self.dir)
            .at("create a temporary file in", &self.dir)?;
        let tmp_path = tmp.path().to_path_buf();
        let mut w = HashingWriter::new(BufWriter::with_capacity(1 << 20, tmp.as_file()));
        let write_err = |e| Error::io("write", &tmp_path, e);
        w.write_all(&prelude(&manifest_json)).map_err(write_err)?;
        w.write_all(&manifest_json).map_err(write_err)?;
        w.write_all(&header_frame).map_err(write_err)?;
        let spool_path = self.spool.path().to_path_buf();
        let mut spool = self.spool.as_file();
        let mut buf = vec![0u8; 1 << 20];
        for o in &order {
            let p = part(o);
            spool
                .seek(SeekFrom::Start(p.spool_offset))
                .at("read", &spool_path)?;
            let mut left = p.size;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                spool.read_exact(&mut buf[..n]).at("read", &spool_path)?;
                w.write_all(&buf[..n]).map_err(write_err)?;
                left -= n as u64;
            }
        }
        let (file_digest, mut inner) = w.finish();
        inner.write_all(&file_digest).map_err(write_err)?;
        inner.write_all(&END_MAGIC).map_err(write_err)?;
        inner.flush().map_err(write_err)?;
        drop(inner);
        tmp.as_file().sync_all().map_err(write_err)?;
        tmp.persist(&self.dest)
            .map_err(|e| Error::io("write", &self.dest, e.error))?;
        Ok(manifest)
    }
}

fn prelude(manifest_json: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(PRELUDE_LEN as usize);
    p.extend_from_slice(&MAGIC);
    p.extend_from_slice(&FORMAT_MAJOR.to_le_bytes());
    p.extend_from_slice(&FORMAT_MINOR.to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes()); // flags, reserved
    p.extend_from_slice(&(manifest_json.len() as u64).to_le_bytes());
    p.extend_from_slice(&Sha256::digest(manifest_json));
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
        if major != FORMAT_MAJOR {
            return Err(Error::UnsupportedFormat {
                path,
                found: format!("{major}.{minor}"),
                supported: FORMAT_MAJOR,
            });
        }
        let manifest_len = u64::from_le_bytes(pre[16..24].try_into().expect("8 bytes"));
        if manifest_len > MAX_MANIFEST_LEN || manifest_len > len - PRELUDE_LEN - TRAILER_LEN {
            return Err(corrupt(format!(
                "the prelude declares a {manifest_len}-byte manifest but the file has {len} bytes; \
                 it is truncated or the prelude is damaged"
            )));
        }
        let mut manifest_bytes = vec![0u8; manifest_len as usize];
        file.read_exact(&mut manifest_bytes).at("read", &path)?;
        if Sha256::digest(&manifest_bytes)[..] != pre[24..56] {
            return Err(corrupt(
                "the manifest does not match its sha256 in the prelude (flipped bits?)".into(),
            ));
        }
        let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
            .map_err(|e| corrupt(format!("the manifest is not valid: {e}")))?;
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
        let payload_start = PRELUDE_LEN + manifest_len;
        let expected = payload_start
            .checked_add(payload.size)
            .and_then(|v| v.checked_add(TRAILER_LEN))
            .ok_or_else(|| corrupt("payload size overflows".into()))?;
        if len < expected {
            return Err(corrupt(format!(
                "the file is truncated: {len} bytes, the manifest describes {expected}"
            )));
        }
        if len > expected {
            return Err(corrupt(format!(
                "{} unexpected bytes after the payload ({len} bytes, the manifest describes {expected})",
                len - expected
            )));
        }
        let mut end = [0u8; 8];
        read_at(&file, &mut end, len - 8).at("read", &path)?;
        if end != END_MAGIC {
            return Err(corrupt(
                "wrong end magic; the file is truncated or damaged".into(),
            ));
        }
        check_manifest(&manifest, &payload).map_err(corrupt)?;
        let reader = ArtifactReader {
            path,
            file,
            len,
            manifest,
            payload_start,
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

    /// The file's length in bytes.
    pub fn file_len(&self) -> u64 {
        self.len
    }

    /// Hash the whole file and compare with the trailer. Returns the file's `sha256:<hex>` (the
    /// digest of the whole file, trailer included, as a registry would compute it).
    pub fn verify_file_digest(&self) -> Result<String> {
        let body = self.len - TRAILER_LEN;
        let mut f = &self.file;
        f.seek(SeekFrom::Start(0)).at("read", &self.path)?;
        let mut hasher = Sha256::new();
        let mut whole = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut left = body;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            f.read_exact(&mut buf[..n]).at("read", &self.path)?;
            hasher.update(&buf[..n]);
            whole.update(&buf[..n]);
            left -= n as u64;
        }
        let mut trailer = [0u8; TRAILER_LEN as usize];
        f.read_exact(&mut trailer).at("read", &self.path)?;
        whole.update(trailer);
        if hasher.finalize()[..] != trailer[..32] {
            let located = self.locate_damage();
            return Err(Error::corrupt(
                &self.path,
                format!("the file's sha256 does not match its trailer{located}"),
            ));
        }
        Ok(digest::format_digest(&whole.finalize()))
    }

    /// After a digest mismatch, name the first frame whose own digest fails.
    fn locate_damage(&self) -> String {
        let Some(payload) = &self.manifest.payload else {
            return String::new();
        };
        if self
            .frame_bytes(
                payload.header.offset,
                payload.header.size,
                &payload.header.sha256,
                "the safetensors header",
            )
            .is_err()
        {
            return " (the safetensors header frame is damaged)".into();
        }
        for t in &self.manifest.tensors {
            for p in &t.stored {
                if self.frame_bytes(p.offset, p.size, &p.sha256, "").is_err() {
                    return format!(
                        " (the `{}` part of tensor `{}` is damaged)",
                        p.role.suffix(),
                        t.name
                    );
                }
            }
        }
        " (the damage is outside the payload frames: prelude, manifest or trailer)".into()
    }

    /// Read the compressed bytes of a frame and verify them against their sha256.
    fn frame_bytes(&self, offset: u64, size: u64, sha: &str, what: &str) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; size as usize];
        read_at(&self.file, &mut buf, self.payload_start + offset).at("read", &self.path)?;
        if digest::sha256(&buf) != sha {
            return Err(Error::corrupt(
                &self.path,
                format!("{what}: frame sha256 mismatch (flipped bits in the payload?)"),
            ));
        }
        Ok(buf)
    }

    fn decompress(&self, frame: &[u8], raw_size: u64, what: &str) -> Result<Vec<u8>> {
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
        let out = zstd::bulk::decompress(frame, raw_size as usize)
            .map_err(|e| corrupt(format!("zstd: {e}")))?;
        if out.len() as u64 != raw_size {
            return Err(corrupt(format!(
                "decompressed to {} bytes, expected {raw_size}",
                out.len()
            )));
        }
        Ok(out)
    }

    fn check_safetensors_header(&self, payload: &Payload) -> Result<()> {
        let h = &payload.header;
        let what = "safetensors header";
        let frame = self.frame_bytes(h.offset, h.size, &h.sha256, what)?;
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

    /// Decompressed bytes of one part of tensor `index`.
    pub fn read_part(&self, index: usize, role: PartRole) -> Result<Vec<u8>> {
        let t = &self.manifest.tensors[index];
        let p = t.stored.iter().find(|p| p.role == role).ok_or_else(|| {
            Error::corrupt(
                &self.path,
                format!("tensor `{}` has no `{}` part", t.name, role.suffix()),
            )
        })?;
        let what = format!("tensor `{}` ({})", t.name, role.suffix());
        let frame = self.frame_bytes(p.offset, p.size, &p.sha256, &what)?;
        self.decompress(&frame, p.raw_size, &what)
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
                let indices = mask::decode(encoding, &mask_bytes, &t.shape, *nnz)
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
        Ok(data)
    }
}

/// Structural checks of an artifact manifest against itself; the error is the detail.
fn check_manifest(m: &Manifest, payload: &Payload) -> std::result::Result<(), String> {
    if payload.compression != "zstd" {
        return Err(format!(
            "unknown payload compression `{}`",
            payload.compression
        ));
    }
    let mut frames: Vec<(u64, u64, u64, String)> = vec![(
        payload.header.offset,
        payload.header.size,
        payload.header.raw_size,
        "the safetensors header".into(),
    )];
    if payload.header.offset != 0 {
        return Err("the safetensors header frame must come first".into());
    }
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
        let n = t
            .shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| n < 1 << 56)
            .ok_or_else(|| format!("tensor `{name}`: shape {:?} is too large", t.shape))?;
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
                let encoding = encoding
                    .ok_or_else(|| format!("tensor `{name}`: no mask encoding recorded"))?;
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
                if raw(0) != r * inp * es || raw(1) != out * r * es {
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
        for p in &t.stored {
            frames.push((
                p.offset,
                p.size,
                p.raw_size,
                format!("tensor `{name}` ({})", p.role.suffix()),
            ));
        }
    }
    frames.sort_by_key(|f| f.0);
    let mut at = 0u64;
    let mut raw_total = 0u64;
    for (offset, size, raw_size, what) in &frames {
        if *offset != at {
            return Err(format!(
                "{what}: frame at payload offset {offset}, expected {at} (frames must be contiguous)"
            ));
        }
        if *raw_size > (size + 1).saturating_mul(MAX_FRAME_RATIO) {
            return Err(format!(
                "{what}: {size} compressed bytes cannot hold the declared {raw_size} bytes \
                 (decompression bomb?); refusing to decompress"
            ));
        }
        at += size;
        raw_total += raw_size;
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

/// Positional read of exactly `buf.len()` bytes.
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
    }
    #[cfg(not(unix))]
    {
        let mut f = file;
        f.seek(SeekFrom::Start(offset))?;
        f.read_exact(buf)
    }
}
