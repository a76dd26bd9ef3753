//! Where the `qfuse` command keeps the GPU context's caches (the conv2d tuning decisions and
//! wgpu's pipeline cache, see `qfuse::gpu::ContextOptions::cache_dir`): `QFUSE_CACHE_DIR` when
//! set, else the platform's cache directory (`$XDG_CACHE_HOME/qfuse` or `~/.cache/qfuse` on
//! Linux and other Unix systems, `~/Library/Caches/qfuse` on macOS, `%LOCALAPPDATA%\qfuse` on
//! Windows). `--no-cache` keeps them in memory only.

use std::path::PathBuf;

use qfuse::gpu::{CacheLoad, ContextOptions, GpuContext};

/// An absolute path from the environment variable `name`, if set to one.
fn env_dir(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
}

/// The cache directory of the command (see the module doc), if one can be found.
pub fn platform_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = env_dir("QFUSE_CACHE_DIR") {
        return Some(dir);
    }
    let base = if cfg!(target_os = "windows") {
        env_dir("LOCALAPPDATA")
    } else if cfg!(target_os = "macos") {
        env_dir("HOME").map(|h| h.join("Library").join("Caches"))
    } else {
        env_dir("XDG_CACHE_HOME").or_else(|| env_dir("HOME").map(|h| h.join(".cache")))
    };
    base.map(|b| b.join("qfuse"))
}

/// The context options of a command run with or without `--no-cache` (the limits as
/// `QFUSE_DEVICE_LIMITS` says, see `ContextOptions::from_env`).
pub fn options(no_cache: bool) -> qfuse::Result<ContextOptions> {
    Ok(ContextOptions {
        cache_dir: if no_cache { None } else { platform_cache_dir() },
        ..ContextOptions::from_env()?
    })
}

/// Opens the system's GPU context with the command's cache directory, saying on stderr which
/// cache files were ignored and why.
pub fn open(no_cache: bool) -> qfuse::Result<GpuContext> {
    let ctx = GpuContext::new_with(options(no_cache)?)?;
    let status = ctx.cache_status();
    for (what, load) in [("tuning", &status.tuning), ("pipeline", &status.pipelines)] {
        if let CacheLoad::Rejected(why) = load {
            eprintln!("note: ignoring the {what} cache file: {why}");
        }
    }
    Ok(ctx)
}
