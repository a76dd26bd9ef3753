//! `qfuse conformance DIR --backend cpu|gpu|all`.

use std::path::Path;
use std::process::ExitCode;

use qfuse::backend::{CpuBackend, GpuBackend, HostOps};
use qfuse::conformance::{run_dir, summary};

use crate::BackendChoice;

/// Runs the folder, prints one line per case and the `N passed, M failed` line.
pub fn run(dir: &Path, choice: BackendChoice) -> qfuse::Result<ExitCode> {
    let cpu = CpuBackend;
    let gpu = match choice {
        BackendChoice::Cpu => None,
        BackendChoice::Gpu | BackendChoice::All => match GpuBackend::from_system() {
            Ok(g) => Some(g),
            Err(e) => {
                eprintln!("gpu backend not available: {e}");
                return Ok(ExitCode::FAILURE);
            }
        },
    };
    let mut backends: Vec<&dyn HostOps> = Vec::new();
    if choice != BackendChoice::Gpu {
        backends.push(&cpu);
    }
    if let Some(g) = &gpu {
        eprintln!("gpu backend: {}", g.name());
        backends.push(g);
    }
    let reports = run_dir(dir, &backends)?;
    for r in &reports {
        println!("{}", r.line());
    }
    let (passed, failed) = summary(&reports);
    println!("{passed} passed, {failed} failed");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
