//! `qfuse conformance PATH... --backend cpu|gpu|all|auto`: case files and folders of cases,
//! run and compared with PyTorch's outputs. The backends (the GPU adapter by name) are named
//! once at the top; every line stays under 120 columns (details of a failure wrap onto
//! indented lines).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use qfuse::backend::{CpuBackend, GpuBackend, HostOps};
use qfuse::conformance::{case_paths, run_case_file, summary, CaseReport};

use crate::BackendChoice;

/// The widest line printed (columns), so that every line stays under 120.
const WIDTH: usize = 119;

/// Arguments of `qfuse conformance`.
#[derive(Args, Debug)]
pub struct ConformanceArgs {
    /// Case files (*.safetensors) and folders of cases (every *.safetensors file in them),
    /// in the format of tests/golden/README.md.
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
    /// Backend(s) to run the cases on (auto: the GPU when an adapter can be opened, else the
    /// CPU reference, said on stderr).
    #[arg(long, value_enum, default_value_t = BackendChoice::Cpu)]
    backend: BackendChoice,
    /// Keep the GPU caches (conv2d tuning, compiled pipelines) in memory only, instead of the
    /// platform cache directory (`QFUSE_CACHE_DIR` overrides it).
    #[arg(long)]
    no_cache: bool,
}

/// Runs the cases, prints the backends, one line per case and backend (grouped by folder) and
/// the `N passed, M failed` line; fails when a case failed.
pub fn run(args: &ConformanceArgs) -> qfuse::Result<ExitCode> {
    // Every path is checked before a GPU is opened.
    let files = case_paths(&args.paths)?;
    let cpu = CpuBackend;
    let open = || {
        crate::cache_dir::open(args.no_cache).map(|ctx| GpuBackend::new(std::sync::Arc::new(ctx)))
    };
    let gpu = match args.backend {
        BackendChoice::Cpu => None,
        BackendChoice::Gpu | BackendChoice::All => Some(open()?),
        BackendChoice::Auto => match open() {
            Ok(g) => Some(g),
            Err(e) => {
                eprintln!("{e}; running on the CPU reference");
                None
            }
        },
    };
    let mut backends: Vec<(&str, &dyn HostOps)> = Vec::new();
    if args.backend == BackendChoice::Cpu || args.backend == BackendChoice::All || gpu.is_none() {
        backends.push(("cpu", &cpu));
    }
    if let Some(g) = &gpu {
        backends.push(("gpu", g));
    }
    let labels: Vec<&str> = backends.iter().map(|(label, _)| *label).collect();
    emit(
        &format!("cases:    {} on {}", files.len(), labels.join(" and ")),
        "",
    );
    if let Some(g) = &gpu {
        // The adapter, once: `gpu (NAME)` is the backend's name.
        let name = g.name();
        let adapter = name
            .strip_prefix("gpu (")
            .and_then(|n| n.strip_suffix(')'))
            .unwrap_or(&name);
        emit(&format!("gpu:      {}", escape(adapter)), "");
    }
    let name_width = files
        .iter()
        .map(|f| display_name(f).chars().count())
        .max()
        .unwrap_or(0)
        .min(56);
    let mut reports = Vec::new();
    let mut folder: Option<&Path> = None;
    for f in &files {
        let parent = f
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if folder != Some(parent) {
            emit(&format!("{}:", qfuse::io::text::escape_path(parent)), "");
            folder = Some(parent);
        }
        for (label, b) in &backends {
            let r = run_case_file(f, *b);
            print_report(&r, label, &display_name(f), name_width);
            reports.push(r);
        }
    }
    let (passed, failed) = summary(&reports);
    println!("{passed} passed, {failed} failed");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A case's file name without `.safetensors`, escaped.
fn display_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    escape(name.strip_suffix(".safetensors").unwrap_or(&name))
}

/// Names from input as they may be printed: the library's one escaping helper (controls
/// shown as escapes, shortened past 120 characters).
fn escape(s: &str) -> String {
    qfuse::io::text::escape(s)
}

/// `PASS cpu NAME  max|err| ... of the tolerance (`out`)`, and for a failing case each problem
/// on its own indented line.
fn print_report(r: &CaseReport, label: &str, name: &str, width: usize) {
    let status = if r.passed() { "PASS" } else { "FAIL" };
    let head = format!("  {status} {label} {name:<width$}");
    let worst = r
        .comparisons
        .iter()
        .max_by(|a, b| a.worst_ratio.total_cmp(&b.worst_ratio));
    let summary = match worst {
        Some(w) => format!(
            "worst `{}`: {:.2e} = {:.3} of tol",
            escape(&w.name),
            w.max_abs_err,
            w.worst_ratio
        ),
        None => String::new(),
    };
    emit(&head, &summary);
    let mut details = Vec::new();
    for c in r.comparisons.iter().filter(|c| !c.passed()) {
        match &c.problem {
            Some(p) => details.push(format!("`{}`: {p}", escape(&c.name))),
            None => details.push(format!(
                "`{}`: {} element(s) out of tolerance (atol {:e}, rtol {:e})",
                escape(&c.name),
                c.mismatches,
                r.atol,
                r.rtol
            )),
        }
    }
    if let Some(e) = &r.error {
        details.push(format!("error: {}", qfuse::io::text::escape_message(e)));
    }
    for n in &r.notes {
        details.push(format!("note: {}", qfuse::io::text::escape_message(n)));
    }
    for d in details {
        for line in wrap(&d, WIDTH - 8) {
            println!("        {line}");
        }
    }
}

/// Prints `head  tail` on one line when it fits in [`WIDTH`], else `head` and then `tail`
/// wrapped on indented lines.
fn emit(head: &str, tail: &str) {
    let one = if tail.is_empty() {
        head.trim_end().to_string()
    } else {
        format!("{head}  {tail}")
    };
    if one.chars().count() <= WIDTH {
        println!("{one}");
        return;
    }
    for line in wrap(head.trim_end(), WIDTH) {
        println!("{line}");
    }
    for line in wrap(tail, WIDTH - 8) {
        println!("        {line}");
    }
}

/// Splits `text` into lines of at most `width` characters, at spaces where it can (a word
/// longer than a line is cut).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split(' ') {
        let mut word: Vec<char> = word.chars().collect();
        loop {
            let used = line.chars().count();
            let gap = usize::from(used > 0);
            if used + gap + word.len() <= width {
                if gap == 1 {
                    line.push(' ');
                }
                line.extend(word.iter());
                break;
            }
            if used > 0 {
                lines.push(std::mem::take(&mut line));
                continue;
            }
            // A word longer than a whole line: cut it.
            let rest = word.split_off(width);
            lines.push(word.iter().collect());
            word = rest;
        }
    }
    if !line.is_empty() || lines.is_empty() {
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::wrap;

    #[test]
    fn wrap_keeps_every_line_within_the_width() {
        let text = format!("a bb {} ccc dddd {}", "x".repeat(25), "y".repeat(7));
        for width in [1, 3, 8, 10, 40] {
            let lines = wrap(&text, width);
            assert!(
                lines.iter().all(|l| l.chars().count() <= width),
                "{lines:?}"
            );
            let joined: String = lines.concat().chars().filter(|c| *c != ' ').collect();
            let want: String = text.chars().filter(|c| *c != ' ').collect();
            assert_eq!(joined, want, "width {width}");
        }
        assert_eq!(wrap("one two three", 7), ["one two", "three"]);
        assert_eq!(wrap("", 5), [""]);
    }
}
