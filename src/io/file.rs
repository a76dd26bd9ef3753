//! Reading input files and writing output files, the one way every command does it.
//!
//! * [`read_input`] reads only regular files (through symbolic links): a directory, a FIFO
//!   (which would block forever), a device such as `/dev/zero` (which never ends) or a socket
//!   is refused with [`Error::NotRegularFile`] before it is opened; the size is known from the
//!   metadata before reading and capped ([`Error::TooLarge`] past the limit given, by default
//!   [`MAX_INPUT_FILE_BYTES`]).
//! * [`Outputs`] writes each output to a temporary file beside its destination, flushes it to
//!   disk, and renames it into place only when every output of the command has been written,
//!   so that a failure leaves no partial output and no half of a pair. A destination that is
//!   one of the command's inputs — the same path, a symbolic link to it or a hard link of it —
//!   is refused before anything is written. Errors name the destination the user gave, never
//!   the temporary. The temporary is `.NAME.qfuse-tmp-PID-N` in the destination's folder
//!   (for a name too long to take that suffix within 255 bytes, a prefix of it and a hash of
//!   the whole name stand for `NAME`, so any name the file system accepts can be written); a
//!   later write of the same destination removes such files left by a process that no longer
//!   runs (killed mid-write, for example by `ulimit -f`). An existing character device or FIFO
//!   (`/dev/null`, `/dev/stdout`) is written directly, after the renames.
//!
//! ```
//! use qfuse::io::file::{read_input, Outputs};
//! let dir = std::env::temp_dir().join(format!("qfuse-doc-file-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let (a, b) = (dir.join("a.txt"), dir.join("b.txt"));
//! let mut out = Outputs::new(&[]);
//! out.stage(&a, b"first")?;
//! out.stage(&b, b"second")?;
//! out.commit()?; // both appear, or neither
//! assert_eq!(read_input(&a, None)?, b"first");
//! // Writing over an input is refused:
//! assert!(Outputs::new(&[&a]).stage(&a, b"x").is_err());
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # Ok::<(), qfuse::Error>(())
//! ```

use std::ffi::{OsStr, OsString};
use std::fs::{File, Metadata, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::io::text::escape_path;
pub use crate::limits::MAX_INPUT_FILE_BYTES;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What a file that is not regular is, for messages.
fn kind(meta: &Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    "not a regular file"
}

fn not_regular(path: &Path, meta: &Metadata) -> Error {
    Error::NotRegularFile {
        path: path.display().to_string(),
        kind: kind(meta),
    }
}

/// Reads the regular file `path` (symbolic links are followed) whole, refusing anything else
/// and anything larger than `limit` bytes (`None`: [`MAX_INPUT_FILE_BYTES`]) before reading.
///
/// Errors: [`Error::Io`] (missing file, dangling link, link loop, permissions, a file that
/// changes size while read), [`Error::NotRegularFile`], [`Error::TooLarge`].
pub fn read_input(path: &Path, limit: Option<u64>) -> Result<Vec<u8>> {
    let limit = limit.unwrap_or(MAX_INPUT_FILE_BYTES);
    // Checked before opening: opening a FIFO for reading blocks until a writer comes.
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    if !meta.is_file() {
        return Err(not_regular(path, &meta));
    }
    let file = File::open(path).map_err(io_err(path))?;
    // The file opened may not be the one checked (replaced in between): check it again.
    let meta = file.metadata().map_err(io_err(path))?;
    if !meta.is_file() {
        return Err(not_regular(path, &meta));
    }
    let size = meta.len();
    if size > limit {
        return Err(Error::TooLarge {
            what: format!("input file {}", escape_path(path)),
            size,
            limit,
            unit: "bytes",
        });
    }
    let len = usize::try_from(size).map_err(|_| Error::TooLarge {
        what: format!("input file {}", escape_path(path)),
        size,
        limit: usize::MAX as u64,
        unit: "bytes",
    })?;
    let mut bytes = Vec::with_capacity(len);
    file.take(size.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io_err(path))?;
    if bytes.len() != len {
        return Err(Error::Io {
            path: path.display().to_string(),
            source: std::io::Error::other(format!(
                "the file changed while it was read ({} bytes, then {})",
                size,
                bytes.len()
            )),
        });
    }
    Ok(bytes)
}

/// The identity of an existing file: its canonical path and, on Unix, device and inode.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileId {
    canonical: PathBuf,
    #[cfg(unix)]
    dev_ino: (u64, u64),
}

impl FileId {
    fn of(path: &Path) -> Option<Self> {
        let canonical = std::fs::canonicalize(path).ok()?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(&canonical).ok()?;
            Some(Self {
                canonical,
                dev_ino: (m.dev(), m.ino()),
            })
        }
        #[cfg(not(unix))]
        Some(Self { canonical })
    }

    fn same(&self, other: &Self) -> bool {
        #[cfg(unix)]
        if self.dev_ino == other.dev_ino {
            return true;
        }
        self.canonical == other.canonical
    }
}

/// Whether `a` and `b` name the same existing file: the same path after resolving links,
/// or (on Unix) the same device and inode, as a hard link is.
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (FileId::of(a), FileId::of(b)) {
        (Some(x), Some(y)) => x.same(&y),
        _ => false,
    }
}

/// The marker in the name of a temporary output: `.NAME` + this + `PID-N`.
const TMP_MARK: &str = ".qfuse-tmp-";

/// The longest file name (in bytes) common file systems accept.
const NAME_MAX: usize = 255;

/// The most bytes a temporary's name takes after its stem: [`TMP_MARK`], a PID (at most 10
/// digits), `-` and a counter (at most 20 digits).
const TMP_SUFFIX_MAX: usize = TMP_MARK.len() + 10 + 1 + 20;

/// FNV-1a, 64 bits: a hash of a long output name that is the same in every build.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The start of the names of `name`'s temporaries: `.NAME`; when that and the suffix
/// ([`TMP_SUFFIX_MAX`]) would pass [`NAME_MAX`] bytes, `.PREFIX~HASH` instead: the longest
/// prefix of the name (whole characters) that leaves room, and the name's [`fnv1a`] hash (16
/// hex digits), so that an output with a name of up to [`NAME_MAX`] bytes can be written and
/// two long names sharing a prefix never take each other's temporaries for their own.
fn tmp_stem(name: &OsStr) -> OsString {
    let mut stem = OsString::from(".");
    if 1 + name.len() + TMP_SUFFIX_MAX <= NAME_MAX {
        stem.push(name);
        return stem;
    }
    let hash = format!("~{:016x}", fnv1a(name.as_encoded_bytes()));
    let room = NAME_MAX - 1 - TMP_SUFFIX_MAX - hash.len();
    // A name that is not UTF-8 keeps no prefix (the hash still tells it apart).
    if let Some(s) = name.to_str() {
        let mut end = room.min(s.len());
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        stem.push(&s[..end]);
    }
    stem.push(hash);
    stem
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Whether the process `pid` is running (`None`: unknown on this system).
fn process_alive(pid: u32) -> Option<bool> {
    let proc = Path::new("/proc");
    if !proc.join("self").exists() {
        return None;
    }
    Some(proc.join(pid.to_string()).exists())
}

/// Removes the temporaries `.NAME.qfuse-tmp-PID-N` of `dest` (in its folder) left by
/// processes that no longer run. Best effort: what cannot be listed or removed stays.
fn remove_stale_temporaries(dest: &Path) {
    let (Some(dir), Some(name)) = (dest.parent(), dest.file_name()) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let mut prefix = tmp_stem(name);
    prefix.push(TMP_MARK);
    let Some(prefix) = prefix.to_str().map(str::to_owned) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let me = std::process::id();
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(rest) = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        // `PID-N`, or `PID` as older versions named it.
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        let Some(pid) = pid else { continue };
        if pid == me || process_alive(pid) != Some(false) {
            continue;
        }
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// One staged output; `dest` as the user gave it.
#[derive(Debug)]
struct Staged {
    dest: PathBuf,
    target: PathBuf,
    kind: StagedKind,
}

#[derive(Debug)]
enum StagedKind {
    /// Written to `tmp`, to be renamed to `target` (the destination, or the file an
    /// existing symbolic link there points to).
    Renamed { tmp: PathBuf },
    /// An existing character device or FIFO (`/dev/null`, `/dev/stdout`): written directly
    /// at commit, since a device cannot be replaced by a rename.
    Direct { bytes: Vec<u8> },
}

/// Where an output goes.
enum Target {
    File(PathBuf),
    Device,
}

/// The outputs of one command, written all or nothing (see the [module docs](self)).
/// Dropping it without [`Outputs::commit`] removes every temporary.
#[derive(Debug)]
pub struct Outputs {
    inputs: Vec<(PathBuf, Option<FileId>)>,
    staged: Vec<Staged>,
}

impl Outputs {
    /// The outputs of a command that reads `inputs` (which outputs must not replace).
    pub fn new(inputs: &[&Path]) -> Self {
        Self {
            inputs: inputs
                .iter()
                .map(|p| (p.to_path_buf(), FileId::of(p)))
                .collect(),
            staged: Vec::new(),
        }
    }

    /// Refuses `dest` before anything is computed: a destination that is one of the inputs
    /// (through links too), one already staged, an existing directory (or block device,
    /// socket), or a path without a file name. An existing character device or FIFO
    /// (`/dev/null`, `/dev/stdout`) is accepted and written directly at commit.
    ///
    /// Errors: [`Error::InvalidArgument`], [`Error::NotRegularFile`].
    pub fn check(&self, dest: &Path) -> Result<()> {
        self.resolve(dest).map(|_| ())
    }

    /// [`Outputs::check`] of every output of a command at once, before anything is computed,
    /// also refusing two of them that name the same file (through links too).
    ///
    /// Errors: those of [`Outputs::check`]; [`Error::InvalidArgument`] for a repeated output.
    pub fn check_all(&self, dests: &[&Path]) -> Result<()> {
        let mut seen: Vec<(PathBuf, &Path)> = Vec::with_capacity(dests.len());
        for &dest in dests {
            let key = match self.resolve(dest)? {
                Target::File(t) => t,
                Target::Device => dest.to_path_buf(),
            };
            if seen.iter().any(|(k, d)| *k == key || *d == dest) {
                return Err(Error::invalid(format!(
                    "output {} is given twice; every output needs its own path",
                    escape_path(dest)
                )));
            }
            seen.push((key, dest));
        }
        Ok(())
    }

    fn is_staged(&self, dest: &Path, target: &Path) -> bool {
        self.staged
            .iter()
            .any(|s| s.target == target || s.dest == dest)
    }

    /// Where `dest` is written (the target of a symbolic link there), after the checks of
    /// [`Outputs::check`].
    fn resolve(&self, dest: &Path) -> Result<Target> {
        let shown = escape_path(dest);
        if dest.file_name().is_none() {
            return Err(Error::invalid(format!(
                "output {shown} does not name a file"
            )));
        }
        let id = FileId::of(dest);
        for (input, input_id) in &self.inputs {
            let same = match (&id, input_id) {
                (Some(a), Some(b)) => a.same(b),
                _ => dest == input,
            };
            if same {
                return Err(Error::invalid(format!(
                    "output {shown} is the input file {}; qfuse never modifies its inputs, \
                     write to another path",
                    escape_path(input)
                )));
            }
        }
        let target = match std::fs::metadata(dest) {
            Ok(meta) if meta.is_file() => {
                Target::File(id.map_or_else(|| dest.to_path_buf(), |id| id.canonical))
            }
            Ok(meta) if is_device_or_fifo(&meta) => Target::Device,
            Ok(meta) => return Err(not_regular(dest, &meta)),
            Err(_) => Target::File(dest.to_path_buf()),
        };
        let key = match &target {
            Target::File(t) => t.as_path(),
            Target::Device => dest,
        };
        if self.is_staged(dest, key) {
            return Err(Error::invalid(format!(
                "output {shown} is given twice; every output needs its own path"
            )));
        }
        Ok(target)
    }

    /// Writes `bytes` to a temporary beside `dest` and flushes it to disk; `dest` itself
    /// appears only at [`Outputs::commit`]. Removes stale temporaries of `dest` first.
    ///
    /// Errors: those of [`Outputs::check`], and [`Error::Io`] naming `dest` (the temporary is
    /// removed).
    pub fn stage(&mut self, dest: &Path, bytes: &[u8]) -> Result<()> {
        let target = match self.resolve(dest)? {
            Target::File(t) => t,
            Target::Device => {
                self.staged.push(Staged {
                    dest: dest.to_path_buf(),
                    target: dest.to_path_buf(),
                    kind: StagedKind::Direct {
                        bytes: bytes.to_vec(),
                    },
                });
                return Ok(());
            }
        };
        remove_stale_temporaries(&target);
        let Some(name) = target.file_name() else {
            return Err(Error::invalid(format!(
                "output {} does not name a file",
                escape_path(dest)
            )));
        };
        let mut tmp_name = tmp_stem(name);
        tmp_name.push(format!(
            "{TMP_MARK}{}-{}",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let tmp = target.with_file_name(tmp_name);
        let written = (|| {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()
        })();
        if let Err(source) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::Io {
                path: dest.display().to_string(),
                source,
            });
        }
        self.staged.push(Staged {
            dest: dest.to_path_buf(),
            target,
            kind: StagedKind::Renamed { tmp },
        });
        Ok(())
    }

    /// Renames every staged temporary into place. When a rename fails, the temporaries not
    /// yet renamed are removed and the outputs already renamed stay (a rename cannot be
    /// undone); renames within one folder fail only when the folder does.
    ///
    /// Errors: [`Error::Io`] naming the destination.
    pub fn commit(mut self) -> Result<()> {
        let staged = std::mem::take(&mut self.staged);
        let mut result = Ok(());
        // Renames first (they fail only when the folder does), devices last.
        let (renamed, direct): (Vec<_>, Vec<_>) = staged
            .iter()
            .partition(|s| matches!(s.kind, StagedKind::Renamed { .. }));
        for s in renamed.into_iter().chain(direct) {
            match &s.kind {
                StagedKind::Renamed { tmp } => {
                    if result.is_ok() {
                        match std::fs::rename(tmp, &s.target) {
                            Ok(()) => {
                                sync_parent(&s.target);
                                continue;
                            }
                            Err(source) => {
                                result = Err(Error::Io {
                                    path: s.dest.display().to_string(),
                                    source,
                                })
                            }
                        }
                    }
                    let _ = std::fs::remove_file(tmp);
                }
                StagedKind::Direct { bytes } => {
                    if result.is_ok() {
                        result = OpenOptions::new()
                            .write(true)
                            .open(&s.dest)
                            .and_then(|mut f| f.write_all(bytes))
                            .map_err(|source| Error::Io {
                                path: s.dest.display().to_string(),
                                source,
                            });
                    }
                }
            }
        }
        result
    }
}

impl Drop for Outputs {
    fn drop(&mut self) {
        for s in &self.staged {
            if let StagedKind::Renamed { tmp } = &s.kind {
                let _ = std::fs::remove_file(tmp);
            }
        }
    }
}

/// A character device (`/dev/null`, a terminal) or a FIFO: an output that is written, not
/// replaced.
fn is_device_or_fifo(meta: &Metadata) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        t.is_char_device() || t.is_fifo()
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        false
    }
}

/// Flushes a folder's entries after a rename (best effort; not possible everywhere).
fn sync_parent(path: &Path) {
    #[cfg(unix)]
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// Writes one output: [`Outputs::stage`] then [`Outputs::commit`], refusing a `dest` that
/// is one of `inputs`.
pub fn write_output(dest: &Path, bytes: &[u8], inputs: &[&Path]) -> Result<()> {
    let mut out = Outputs::new(inputs);
    out.stage(dest, bytes)?;
    out.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("qfuse-file-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn listing(d: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn reads_regular_files_only() {
        let d = dir("read");
        let f = d.join("a.bin");
        std::fs::write(&f, b"abc").unwrap();
        assert_eq!(read_input(&f, None).unwrap(), b"abc");
        let e = read_input(&d, None).unwrap_err();
        assert!(
            matches!(
                e,
                Error::NotRegularFile {
                    kind: "a directory",
                    ..
                }
            ),
            "{e}"
        );
        let e = read_input(Path::new("/dev/zero"), None).unwrap_err();
        assert!(
            e.to_string()
                .contains("/dev/zero is not a regular file but a character device"),
            "{e}"
        );
        let e = read_input(&f, Some(2)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "input file {}: 3 bytes exceeds the limit of 2 bytes",
                f.display()
            )
        );
        #[cfg(unix)]
        {
            let link = d.join("dangling.bin");
            std::os::unix::fs::symlink(d.join("nothing"), &link).unwrap();
            assert!(matches!(read_input(&link, None), Err(Error::Io { .. })));
            let l2 = d.join("ok-link.bin");
            std::os::unix::fs::symlink(&f, &l2).unwrap();
            assert_eq!(read_input(&l2, None).unwrap(), b"abc");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn outputs_are_all_or_nothing_and_never_an_input() {
        let d = dir("out");
        let input = d.join("in.bin");
        std::fs::write(&input, b"input").unwrap();
        let mut out = Outputs::new(&[&input]);
        out.stage(&d.join("x"), b"1").unwrap();
        assert_eq!(listing(&d).len(), 2, "{:?}", listing(&d)); // in.bin and a temporary
        drop(out);
        assert_eq!(listing(&d), ["in.bin"]);
        // The input, directly, through a symlink, through a hard link.
        let out = Outputs::new(&[&input]);
        assert!(out.check(&input).is_err());
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(&input, d.join("sym")).unwrap();
            std::fs::hard_link(&input, d.join("hard")).unwrap();
            for p in ["sym", "hard"] {
                let e = out.check(&d.join(p)).unwrap_err().to_string();
                assert!(e.contains("is the input file"), "{e}");
            }
        }
        assert!(matches!(out.check(&d), Err(Error::NotRegularFile { .. })));
        #[cfg(unix)]
        write_output(Path::new("/dev/null"), b"discarded", &[]).unwrap();
        assert_eq!(std::fs::read(&input).unwrap(), b"input");
        // A stale temporary of a process that no longer runs is removed; others stay.
        let dead = d.join(format!(".y{TMP_MARK}{}-0", u32::MAX - 1));
        let other = d.join(format!(".z{TMP_MARK}{}-0", u32::MAX - 1));
        std::fs::write(&dead, b"stale").unwrap();
        std::fs::write(&other, b"stale").unwrap();
        write_output(&d.join("y"), b"y", &[]).unwrap();
        assert!(!dead.exists());
        assert!(other.exists());
        assert_eq!(std::fs::read(d.join("y")).unwrap(), b"y");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn names_up_to_255_bytes_can_be_written() {
        let d = dir("long");
        // 255 bytes, with multi-byte characters across the cut; two names sharing a prefix.
        let a = format!("{}é{}", "a".repeat(200), "x".repeat(53));
        let b = format!("{}é{}", "a".repeat(200), "y".repeat(53));
        assert_eq!((a.len(), b.len()), (255, 255));
        let (sa, sb) = (tmp_stem(OsStr::new(&a)), tmp_stem(OsStr::new(&b)));
        assert_ne!(sa, sb);
        assert!(sa.len() + TMP_SUFFIX_MAX <= NAME_MAX, "{}", sa.len());
        assert!(sa.to_str().unwrap().starts_with(".aaaa"));
        // A short name keeps its plain stem.
        assert_eq!(tmp_stem(OsStr::new("y.bin")), ".y.bin");
        let mut out = Outputs::new(&[]);
        out.stage(&d.join(&a), b"A").unwrap();
        out.stage(&d.join(&b), b"B").unwrap();
        out.commit().unwrap();
        assert_eq!(std::fs::read(d.join(&a)).unwrap(), b"A");
        assert_eq!(std::fs::read(d.join(&b)).unwrap(), b"B");
        // A stale temporary of the long name (dead process) is removed by the next write,
        // one of the other long name is not.
        let stale = |s: &OsStr| {
            let mut n = s.to_os_string();
            n.push(format!("{TMP_MARK}{}-0", u32::MAX - 1));
            d.join(n)
        };
        let (dead, other) = (stale(&sa), stale(&sb));
        std::fs::write(&dead, b"stale").unwrap();
        std::fs::write(&other, b"stale").unwrap();
        write_output(&d.join(&a), b"A2", &[]).unwrap();
        assert!(!dead.exists());
        assert!(other.exists());
        assert_eq!(listing(&d).len(), 3, "{:?}", listing(&d));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
