//! Where the tests find the PyTorch golden conformance cases: `tests/golden` of this crate
//! (found through `CARGO_MANIFEST_DIR`, so the cases travel with the code), plus every folder
//! listed in `QFUSE_GOLDEN_DIR` (several separated like `PATH`: `:` on Unix, `;` on Windows).
//!
//! One policy, for the unit tests (`src/lib.rs` includes this file) and the integration tests
//! alike: a folder that is missing, unreadable or empty fails the test, and so does an op with
//! no case in any folder. Nothing is skipped.

use std::path::PathBuf;

/// The crate's own case folder, `tests/golden`.
pub fn repo_golden_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden"))
}

/// Every golden folder: `tests/golden`, then those of `QFUSE_GOLDEN_DIR`. Panics (failing the
/// test) when one of them is not a folder.
pub fn golden_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![repo_golden_dir()];
    if let Some(extra) = std::env::var_os("QFUSE_GOLDEN_DIR") {
        dirs.extend(std::env::split_paths(&extra).filter(|p| !p.as_os_str().is_empty()));
    }
    for d in &dirs {
        assert!(
            d.is_dir(),
            "golden folder {} not found (tests/golden ships with the crate; QFUSE_GOLDEN_DIR \
             lists extra folders)",
            d.display()
        );
    }
    dirs
}

/// Every `OP__*.safetensors` case of every golden folder (sorted within each folder). Panics
/// when a folder cannot be read or holds no case at all, and when no folder has a case for
/// `op` (a folder of other cases may lack this op: its cases are not all about one op).
pub fn golden_files(op: &str) -> Vec<PathBuf> {
    let prefix = format!("{op}__");
    let mut all = Vec::new();
    for dir in golden_dirs() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("golden folder {}: {e}", dir.display()))
            .map(|e| {
                e.unwrap_or_else(|e| panic!("golden folder {}: {e}", dir.display()))
                    .path()
            })
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with(".safetensors"))
            })
            .collect();
        assert!(
            !files.is_empty(),
            "golden folder {} holds no *.safetensors case",
            dir.display()
        );
        files.retain(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix))
        });
        files.sort();
        all.extend(files);
    }
    assert!(
        !all.is_empty(),
        "no {op} case in the golden folders {:?}",
        golden_dirs()
    );
    all
}
