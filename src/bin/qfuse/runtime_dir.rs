//! A private `XDG_RUNTIME_DIR` for a process started without a valid one.
//!
//! Vulkan loaders and drivers built with Wayland support (Mesa's lavapipe among them) print
//! `error: XDG_RUNTIME_DIR is invalid or not set in the environment.` whenever an instance is
//! created while that variable is unset or not an absolute path (containers, CI, `ssh` without
//! a login session). The message is harmless but looks like a failure. The `qfuse` binary and
//! the integration-test harness (which includes this file) call [`ensure`] first thing in
//! `main`, before any thread or GPU instance exists: when the variable is unset, relative or
//! not a directory, it points it at a fresh directory of mode 0700 under the temporary folder,
//! removed again when the returned guard drops.
//!
//! The library itself never touches the environment (no global state): an embedder that sees
//! the message sets `XDG_RUNTIME_DIR` in its own process, as the README says.

use std::path::{Path, PathBuf};

/// Removes the directory [`ensure`] created (if any) when dropped.
#[must_use = "the directory is removed when this guard drops"]
pub struct RuntimeDir(Option<PathBuf>);

impl RuntimeDir {
    /// The directory created for this process, if one was.
    #[allow(dead_code)]
    pub fn created(&self) -> Option<&Path> {
        self.0.as_deref()
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Whether `XDG_RUNTIME_DIR` is set to an absolute path of an existing directory.
fn valid(value: Option<std::ffi::OsString>) -> bool {
    value.is_some_and(|v| {
        let p = Path::new(&v);
        p.is_absolute() && p.is_dir()
    })
}

/// Sets `XDG_RUNTIME_DIR` to a private new directory when it is unset or invalid. Call it
/// before any other thread starts (it changes the process environment). When no directory can
/// be made, nothing changes (the driver's message is then the only consequence).
pub fn ensure() -> RuntimeDir {
    if valid(std::env::var_os("XDG_RUNTIME_DIR")) {
        return RuntimeDir(None);
    }
    let base = std::env::temp_dir();
    for attempt in 0..16u32 {
        let dir = base.join(format!("qfuse-runtime-{}-{attempt}", std::process::id()));
        let mut builder = std::fs::DirBuilder::new();
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        match builder.create(&dir) {
            Ok(()) => {
                // Single-threaded here (see above), which is what set_var requires.
                std::env::set_var("XDG_RUNTIME_DIR", &dir);
                return RuntimeDir(Some(dir));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(_) => break,
        }
    }
    RuntimeDir(None)
}
