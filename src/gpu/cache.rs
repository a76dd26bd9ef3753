//! The persistent caches of a [`GpuContext`](super::GpuContext), kept in a directory the caller
//! chooses ([`ContextOptions::cache_dir`](super::ContextOptions::cache_dir),
//! [`EmbedOptions::cache_dir`](super::EmbedOptions::cache_dir)):
//!
//! - **Tuning decisions** (`qfuse-tuning-<adapter hash>.json`): which kernel variant timing
//!   chose per shape class (the conv2d forward, see
//!   [`crate::kernels::conv2d::ConvAlgorithm::Auto`]). A small JSON file:
//!   `{"format": "qfuse-tuning", "version": 1, "qfuse": "<crate version>", "adapter": "<adapter
//!   key>", "entries": {"conv2d/<class>": "<variant>"}}`. Read once when the context opens,
//!   rewritten (temporary file, then rename) after each new decision.
//! - **wgpu's pipeline cache** (`qfuse-pipelines-<adapter hash>.bin`), where the device offers
//!   [`wgpu::Features::PIPELINE_CACHE`] (Vulkan): the bytes of
//!   [`wgpu::PipelineCache::get_data`] behind a header of qfuse's own (magic, the adapter
//!   key's hash, the payload's length and FNV-1a hash), so a truncated or altered file is
//!   refused before wgpu or the driver sees it. Written by
//!   [`GpuContext::persist_caches`](super::GpuContext::persist_caches) and when the context
//!   drops.
//!
//! A file that cannot be read, does not parse, has another format version or crate version,
//! or was written for another adapter is ignored — never a panic, never an error of the
//! context — and the reason is kept, typed, in
//! [`GpuContext::cache_status`](super::GpuContext::cache_status) ([`CacheRejection`]). The
//! file name carries a hash of the adapter key (adapter name, vendor and device ids, driver,
//! backend, device type), so several adapters share a directory; the key inside the file is
//! compared in full.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The tuning file's format version (bumped when its layout or the meaning of its entries
/// changes).
pub const TUNING_FORMAT_VERSION: u32 = 1;

/// The largest tuning file read (bytes); a larger one is refused as corrupt.
const MAX_TUNING_FILE_BYTES: u64 = 1 << 20;
/// The largest pipeline-cache file read (bytes).
const MAX_PIPELINE_FILE_BYTES: u64 = 512 << 20;
/// The pipeline-cache file's magic (8 bytes, the last two the header version).
const PIPELINE_MAGIC: &[u8; 8] = b"QFPCACH1";
/// Magic, adapter-key hash, payload length, payload hash.
const PIPELINE_HEADER_BYTES: usize = 8 + 8 + 8 + 8;

/// Why a cache file was ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheRejection {
    /// The file exists but could not be read (permissions, not a regular file, too large).
    Io(String),
    /// The file does not parse, or its checksum does not match its contents.
    Corrupt(String),
    /// The file was written by another format version or another qfuse version.
    Version {
        /// What the file says.
        found: String,
        /// What this build writes.
        expected: String,
    },
    /// The file was written for another adapter (or driver).
    ForeignAdapter {
        /// The adapter key in the file.
        found: String,
        /// This context's adapter key.
        expected: String,
    },
}

impl std::fmt::Display for CacheRejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let esc = crate::io::text::escape_message;
        match self {
            Self::Io(e) => write!(f, "unreadable: {}", esc(e)),
            Self::Corrupt(e) => write!(f, "corrupt: {}", esc(e)),
            Self::Version { found, expected } => write!(
                f,
                "written by another version ({}, this build writes {})",
                esc(found),
                esc(expected)
            ),
            Self::ForeignAdapter { found, expected } => write!(
                f,
                "written for another adapter ({}, this one is {})",
                esc(found),
                esc(expected)
            ),
        }
    }
}

/// What became of one cache when the context opened.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CacheLoad {
    /// No cache directory was given: the cache lives in memory only.
    #[default]
    Disabled,
    /// The device does not offer it (the pipeline cache off Vulkan, or without
    /// [`wgpu::Features::PIPELINE_CACHE`]).
    Unsupported,
    /// No file yet (it is written when there is something to keep).
    Missing,
    /// The file was read: `entries` tuning decisions, or `entries` bytes of pipeline cache.
    Loaded {
        /// Tuning decisions, or bytes of pipeline-cache data.
        entries: usize,
    },
    /// The file was ignored, for this reason.
    Rejected(CacheRejection),
}

/// Where a context keeps its caches and what it found there
/// ([`GpuContext::cache_status`](super::GpuContext::cache_status)).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CacheStatus {
    /// The cache directory, if one was given.
    pub dir: Option<PathBuf>,
    /// The tuning file.
    pub tuning: CacheLoad,
    /// wgpu's pipeline cache.
    pub pipelines: CacheLoad,
    /// The last failure to write a cache file (the caches stay in memory), if any.
    pub last_write_error: Option<String>,
}

/// 64-bit FNV-1a (stable across builds and platforms, unlike `std`'s hashers).
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The adapter key: what must match for cached decisions and pipelines to apply.
///
/// Besides the adapter, the key names what of the device decides which kernels may run (the
/// subgroup feature, workgroup memory and size, the storage binding size), so a device
/// opened with fewer features or lower limits on the same adapter
/// ([`crate::gpu::ContextOptions::small_gpu`]) keeps its decisions in a file of its own
/// instead of overwriting the full device's.
pub(crate) fn adapter_key(
    info: &wgpu::AdapterInfo,
    features: wgpu::Features,
    limits: &wgpu::Limits,
) -> String {
    format!(
        "{} | vendor {:#x} device {:#x} | driver {} {} | {:?} {:?} | subgroups {} | \
         workgroup storage {} invocations {} | storage binding {} buffers {}",
        info.name,
        info.vendor,
        info.device,
        info.driver,
        info.driver_info,
        info.backend,
        info.device_type,
        features.contains(wgpu::Features::SUBGROUP),
        limits.max_compute_workgroup_storage_size,
        limits.max_compute_invocations_per_workgroup,
        limits.max_storage_buffer_binding_size,
        limits.max_storage_buffers_per_shader_stage,
    )
}

fn tuning_version() -> String {
    format!(
        "format {TUNING_FORMAT_VERSION}, qfuse {}",
        env!("CARGO_PKG_VERSION")
    )
}

/// The tuning file of the adapter with key `key` in `dir`.
pub(crate) fn tuning_path(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("qfuse-tuning-{:016x}.json", fnv1a(key.as_bytes())))
}

/// The pipeline-cache file of the adapter with key `key` in `dir`.
pub(crate) fn pipeline_path(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!(
        "qfuse-pipelines-{:016x}.bin",
        fnv1a(key.as_bytes())
    ))
}

#[derive(Serialize, Deserialize)]
struct TuningFile {
    format: String,
    version: u32,
    qfuse: String,
    adapter: String,
    entries: BTreeMap<String, String>,
}

/// Reads a file of at most `limit` bytes: `Ok(None)` when it does not exist.
fn read_file(path: &Path, limit: u64) -> Result<Option<Vec<u8>>, CacheRejection> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        _ => {}
    }
    crate::io::file::read_input(path, Some(limit))
        .map(Some)
        .map_err(|e| CacheRejection::Io(e.to_string()))
}

/// Reads the tuning file at `path` for the adapter `key`: its entries, `Ok(None)` when there is
/// no file, or why it was ignored.
pub(crate) fn load_tuning(
    path: &Path,
    key: &str,
) -> Result<Option<BTreeMap<String, String>>, CacheRejection> {
    let Some(bytes) = read_file(path, MAX_TUNING_FILE_BYTES)? else {
        return Ok(None);
    };
    parse_tuning(&bytes, key).map(Some)
}

/// Parses the bytes of a tuning file for the adapter `key`.
pub(crate) fn parse_tuning(
    bytes: &[u8],
    key: &str,
) -> Result<BTreeMap<String, String>, CacheRejection> {
    let file: TuningFile =
        serde_json::from_slice(bytes).map_err(|e| CacheRejection::Corrupt(e.to_string()))?;
    if file.format != "qfuse-tuning" {
        return Err(CacheRejection::Corrupt(format!(
            "format {:?}, expected \"qfuse-tuning\"",
            file.format
        )));
    }
    let found = format!("format {}, qfuse {}", file.version, file.qfuse);
    if found != tuning_version() {
        return Err(CacheRejection::Version {
            found,
            expected: tuning_version(),
        });
    }
    if file.adapter != key {
        return Err(CacheRejection::ForeignAdapter {
            found: file.adapter,
            expected: key.to_string(),
        });
    }
    Ok(file.entries)
}

/// The bytes of the tuning file holding `entries` for the adapter `key`.
pub(crate) fn tuning_bytes(key: &str, entries: &BTreeMap<String, String>) -> Vec<u8> {
    let file = TuningFile {
        format: "qfuse-tuning".to_string(),
        version: TUNING_FORMAT_VERSION,
        qfuse: env!("CARGO_PKG_VERSION").to_string(),
        adapter: key.to_string(),
        entries: entries.clone(),
    };
    // Serializing strings into JSON cannot fail.
    let mut s = serde_json::to_string_pretty(&file).unwrap_or_default();
    s.push('\n');
    s.into_bytes()
}

/// Writes `bytes` to `path` (temporary file beside it, then rename), creating the directory.
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("creating {}: {e}", crate::io::text::escape_path(dir)))?;
    }
    crate::io::file::write_output(path, bytes, &[]).map_err(|e| e.to_string())
}

/// Reads the pipeline-cache file at `path` for the adapter `key`: the payload for wgpu,
/// `Ok(None)` when there is no file, or why it was ignored.
pub(crate) fn load_pipelines(path: &Path, key: &str) -> Result<Option<Vec<u8>>, CacheRejection> {
    let Some(bytes) = read_file(path, MAX_PIPELINE_FILE_BYTES)? else {
        return Ok(None);
    };
    parse_pipelines(&bytes, key).map(Some)
}

/// Checks the header of a pipeline-cache file and returns its payload.
pub(crate) fn parse_pipelines(bytes: &[u8], key: &str) -> Result<Vec<u8>, CacheRejection> {
    if bytes.len() < PIPELINE_HEADER_BYTES {
        return Err(CacheRejection::Corrupt(format!(
            "{} bytes, shorter than the {PIPELINE_HEADER_BYTES}-byte header",
            bytes.len()
        )));
    }
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[i..i + 8]);
        u64::from_le_bytes(b)
    };
    if bytes[..6] != PIPELINE_MAGIC[..6] {
        return Err(CacheRejection::Corrupt("not a qfuse pipeline cache".into()));
    }
    if &bytes[..8] != PIPELINE_MAGIC {
        return Err(CacheRejection::Version {
            found: String::from_utf8_lossy(&bytes[..8]).into_owned(),
            expected: String::from_utf8_lossy(PIPELINE_MAGIC).into_owned(),
        });
    }
    let key_hash = fnv1a(key.as_bytes());
    if word(8) != key_hash {
        return Err(CacheRejection::ForeignAdapter {
            found: format!("adapter hash {:016x}", word(8)),
            expected: format!("adapter hash {key_hash:016x} ({key})"),
        });
    }
    let payload = &bytes[PIPELINE_HEADER_BYTES..];
    if word(16) != payload.len() as u64 {
        return Err(CacheRejection::Corrupt(format!(
            "payload of {} bytes, the header says {}",
            payload.len(),
            word(16)
        )));
    }
    if word(24) != fnv1a(payload) {
        return Err(CacheRejection::Corrupt("checksum mismatch".into()));
    }
    Ok(payload.to_vec())
}

/// The bytes of a pipeline-cache file holding `payload` for the adapter `key`.
pub(crate) fn pipeline_bytes(key: &str, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(PIPELINE_HEADER_BYTES + payload.len());
    v.extend_from_slice(PIPELINE_MAGIC);
    v.extend_from_slice(&fnv1a(key.as_bytes()).to_le_bytes());
    v.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    v.extend_from_slice(&fnv1a(payload).to_le_bytes());
    v.extend_from_slice(payload);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuning_round_trip_and_rejections() {
        let mut entries = BTreeMap::new();
        entries.insert("conv2d/a".to_string(), "direct".to_string());
        let bytes = tuning_bytes("adapter A", &entries);
        assert_eq!(parse_tuning(&bytes, "adapter A").unwrap(), entries);
        assert!(matches!(
            parse_tuning(&bytes, "adapter B"),
            Err(CacheRejection::ForeignAdapter { .. })
        ));
        assert!(matches!(
            parse_tuning(&bytes[..bytes.len() / 2], "adapter A"),
            Err(CacheRejection::Corrupt(_))
        ));
        let other = String::from_utf8(bytes.clone())
            .unwrap()
            .replace("\"version\": 1", "\"version\": 99");
        assert!(matches!(
            parse_tuning(other.as_bytes(), "adapter A"),
            Err(CacheRejection::Version { .. })
        ));
        assert!(matches!(
            parse_tuning(b"\xff\x00garbage", "adapter A"),
            Err(CacheRejection::Corrupt(_))
        ));
    }

    #[test]
    fn pipeline_round_trip_and_rejections() {
        let payload = b"some driver bytes".to_vec();
        let bytes = pipeline_bytes("k", &payload);
        assert_eq!(parse_pipelines(&bytes, "k").unwrap(), payload);
        assert!(matches!(
            parse_pipelines(&bytes, "other"),
            Err(CacheRejection::ForeignAdapter { .. })
        ));
        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(
            parse_pipelines(&flipped, "k"),
            Err(CacheRejection::Corrupt(_))
        ));
        assert!(matches!(
            parse_pipelines(&bytes[..bytes.len() - 1], "k"),
            Err(CacheRejection::Corrupt(_))
        ));
        assert!(matches!(
            parse_pipelines(&bytes[..5], "k"),
            Err(CacheRejection::Corrupt(_))
        ));
        let mut old = bytes;
        old[7] = b'0';
        assert!(matches!(
            parse_pipelines(&old, "k"),
            Err(CacheRejection::Version { .. })
        ));
    }

    #[test]
    fn missing_file_is_none() {
        let p = std::env::temp_dir().join(format!("qfuse-no-such-cache-{}", std::process::id()));
        assert_eq!(load_tuning(&p, "k"), Ok(None));
        assert_eq!(load_pipelines(&p, "k"), Ok(None));
    }
}
