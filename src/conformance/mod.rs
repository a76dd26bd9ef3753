//! The conformance runner: every `*.safetensors` case in a folder, run on a backend and
//! compared with what PyTorch computed, within the case's own tolerance.
//!
//! A case passes when every expected output (`out.*`) is produced and within tolerance. A case
//! whose op is unknown, whose file is malformed, or whose op returns an error fails; nothing is
//! skipped.

pub mod compare;
pub mod ops;

use std::path::{Path, PathBuf};

use crate::backend::HostOps;
use crate::error::{Error, Result};
use crate::io::case::{case_files, Case};
use crate::io::text::escape;

pub use compare::{compare, Comparison};

/// The result of one case on one backend.
#[derive(Debug, Clone)]
pub struct CaseReport {
    /// File name.
    pub file: String,
    /// Backend name.
    pub backend: String,
    /// Op (empty when the file could not be read).
    pub op: String,
    /// Per-output comparisons.
    pub comparisons: Vec<Comparison>,
    /// Why the case failed before or beside comparison (error, missing output).
    pub error: Option<String>,
    /// The case's tolerance.
    pub atol: f32,
    /// The case's tolerance.
    pub rtol: f32,
    /// Remarks from running the op (shown in the report line).
    pub notes: Vec<String>,
}

impl CaseReport {
    /// Whether the case passed.
    pub fn passed(&self) -> bool {
        self.error.is_none()
            && !self.comparisons.is_empty()
            && self.comparisons.iter().all(Comparison::passed)
    }

    /// One line for humans: file, backend, PASS/FAIL, worst error against the tolerance.
    /// Names from the case (file name, tensor names, and those inside error messages) are
    /// escaped ([`escape`]): the line is always one line.
    pub fn line(&self) -> String {
        let status = if self.passed() { "PASS" } else { "FAIL" };
        let mut s = format!("{status} {:<58} [{}]", escape(&self.file), self.backend);
        if let Some(worst) = self
            .comparisons
            .iter()
            .max_by(|a, b| a.worst_ratio.total_cmp(&b.worst_ratio))
        {
            s.push_str(&format!(
                "  worst `{}`: max|err| {:.3e} = {:.3} of tolerance (atol {:e}, rtol {:e})",
                escape(&worst.name),
                worst.max_abs_err,
                worst.worst_ratio,
                self.atol,
                self.rtol
            ));
        }
        for c in self.comparisons.iter().filter(|c| !c.passed()) {
            match &c.problem {
                Some(p) => s.push_str(&format!("; `{}`: {p}", escape(&c.name))),
                None => s.push_str(&format!(
                    "; `{}`: {} element(s) out of tolerance",
                    escape(&c.name),
                    c.mismatches
                )),
            }
        }
        if let Some(e) = &self.error {
            s.push_str(&format!("  error: {e}"));
        }
        for n in &self.notes {
            s.push_str(&format!("  note: {n}"));
        }
        // Names are escaped where messages are built; this catches any that were not.
        crate::io::text::escape_message(&s)
    }
}

/// Runs one case file on `backend`. Never fails: errors become a failing report.
pub fn run_case_file(path: &Path, backend: &dyn HostOps) -> CaseReport {
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    let mut report = CaseReport {
        file,
        backend: backend.name(),
        op: String::new(),
        comparisons: Vec::new(),
        error: None,
        atol: 0.0,
        rtol: 0.0,
        notes: Vec::new(),
    };
    match Case::load(path) {
        Ok(case) => run_case_into(&case, backend, &mut report),
        Err(e) => report.error = Some(e.to_string()),
    }
    report
}

/// Runs an already-loaded case on `backend`.
pub fn run_case(case: &Case, backend: &dyn HostOps) -> CaseReport {
    let mut report = CaseReport {
        file: case.path.clone(),
        backend: backend.name(),
        op: String::new(),
        comparisons: Vec::new(),
        error: None,
        atol: 0.0,
        rtol: 0.0,
        notes: Vec::new(),
    };
    run_case_into(case, backend, &mut report);
    report
}

fn run_case_into(case: &Case, backend: &dyn HostOps, report: &mut CaseReport) {
    report.op = case.op.clone();
    report.atol = case.atol;
    report.rtol = case.rtol;
    let outputs = match ops::run_op(case, backend) {
        Ok(r) => {
            report.notes = r.notes;
            r.outputs
        }
        Err(e) => {
            report.error = Some(e.to_string());
            return;
        }
    };
    let mut missing = Vec::new();
    for (name, want) in case.expected() {
        match outputs.iter().find(|(n, _)| n == name) {
            Some((_, got)) => report
                .comparisons
                .push(compare(name, got, want, case.atol, case.rtol)),
            None => missing.push(format!("out.{name}")),
        }
    }
    if !missing.is_empty() {
        report.error = Some(format!(
            "the runner produced no value for {}",
            missing.join(", ")
        ));
    }
}

/// Every case in `dir` on every backend. An unreadable or empty folder is an error.
pub fn run_dir(dir: &Path, backends: &[&dyn HostOps]) -> Result<Vec<CaseReport>> {
    let files = case_paths(&[dir])?;
    let mut reports = Vec::with_capacity(files.len() * backends.len());
    for f in &files {
        for b in backends {
            reports.push(run_case_file(f, *b));
        }
    }
    Ok(reports)
}

/// The case files `paths` name, in order: a folder stands for its `*.safetensors` files
/// (sorted by name), a file for itself. [`Error::Io`] for a path that cannot be read,
/// [`Error::InvalidArgument`] for a folder without any case or a path that is neither a
/// file nor a folder.
pub fn case_paths<P: AsRef<Path>>(paths: &[P]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        if meta.is_dir() {
            let found = case_files(path)?;
            if found.is_empty() {
                return Err(Error::invalid(format!(
                    "no conformance case (*.safetensors) in {}",
                    path.display()
                )));
            }
            files.extend(found);
        } else if meta.is_file() {
            files.push(path.to_path_buf());
        } else {
            return Err(Error::invalid(format!(
                "{} is neither a case file nor a folder of cases",
                path.display()
            )));
        }
    }
    Ok(files)
}

/// `N passed, M failed` for a list of reports.
pub fn summary(reports: &[CaseReport]) -> (usize, usize) {
    let passed = reports.iter().filter(|r| r.passed()).count();
    (passed, reports.len() - passed)
}
