//! `--plot`: `qfuse demo --plot` and `qfuse bench --plot` write valid SVG pictures with the
//! expected series, through a temporary file (no partial picture), and refuse to draw over an
//! input of the run.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qfuse::bench::{run_suite, BenchConfig};

fn qfuse(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qfuse"))
        .args(args)
        .output()
        .expect("qfuse runs")
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qfuse-plot-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The file is one well-formed SVG document: an `<svg>` root closed at the end, balanced
/// `<text>` elements, and no temporary file left beside it.
fn read_svg(path: &Path) -> String {
    let svg = std::fs::read_to_string(path).unwrap();
    assert!(
        svg.trim_start().starts_with("<svg"),
        "{}",
        &svg[..200.min(svg.len())]
    );
    assert!(svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<svg").count(), 1);
    assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
    let dir = path.parent().unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("qfuse-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    svg
}

fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn demo_plot_has_stages_and_layers() {
    let dir = tmpdir("demo");
    let svg_path = dir.join("demo.svg");
    let svg_arg = svg_path.display().to_string();
    let out = qfuse(&[
        "demo",
        "--backend",
        "cpu",
        "--batch",
        "8",
        "--runs",
        "1",
        "--calibration-batches",
        "1",
        "--epochs",
        "0",
        "--qat-epochs",
        "0",
        "--test-images",
        "16",
        "--plot",
        &svg_arg,
    ]);
    ok(&out, "qfuse demo --plot");
    let svg = read_svg(&svg_path);
    for want in [
        "test accuracy",
        "float",
        "PTQ fused simulation",
        "PTQ unfused simulation",
        "PTQ int8 deployed",
        "fused simulation",
        "unfused simulation",
        "conv1",
        "conv2",
        "fc1",
        "fc2",
    ] {
        assert!(svg.contains(want), "demo plot lacks `{want}`");
    }
    // One path per output: --plot naming the --json output is refused, nothing written.
    let json = dir.join("demo.json").display().to_string();
    let out = qfuse(&[
        "demo",
        "--backend",
        "cpu",
        "--batch",
        "4",
        "--runs",
        "1",
        "--json",
        &json,
        "--plot",
        &json,
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is given twice"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn bench_plot_draws_roofs_and_fused_pairs() {
    let Some(ctx) = common::gpu() else { return };
    let dir = tmpdir("bench");
    // A real (tiny) run of the suite, saved as `qfuse bench --json` saves it, then drawn by
    // the binary.
    let report = run_suite(&ctx, &BenchConfig::tiny(), &mut |_| {}).unwrap();
    let json = dir.join("bench.json");
    report.write_json(&json).unwrap();
    let svg_path = dir.join("roofline.svg");
    let out = qfuse(&[
        "bench",
        "--from-json",
        &json.display().to_string(),
        "--plot",
        &svg_path.display().to_string(),
    ]);
    ok(&out, "qfuse bench --from-json --plot");
    let svg = read_svg(&svg_path);
    for want in [
        "copy roof",
        "FMA roof",
        "arithmetic intensity",
        "fused (conv_bn_relu_eval)",
        "unfused (conv_bn_relu_eval)",
        "fused (conv_bn_relu_qat_forward)",
        "unfused (conv_bn_relu_qat_forward)",
    ] {
        assert!(svg.contains(want), "roofline plot lacks `{want}`");
    }
    assert!(svg.contains(&format!("{:.1} GB/s", report.copy_gbps)));
    // One joining line per fused/unfused pair: a label with the pair's speedup.
    let pairs = report
        .kernels
        .iter()
        .filter(|k| k.name.ends_with("/fused"))
        .count();
    assert!(pairs >= 2);
    assert!(svg.matches(" x").count() >= pairs, "pair labels");
    // A file that is not a report is refused with its name.
    let out = qfuse(&[
        "bench",
        "--from-json",
        &svg_path.display().to_string(),
        "--plot",
        &dir.join("x.svg").display().to_string(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a bench report"));
    let _ = std::fs::remove_dir_all(&dir);
}

crate::qfuse_tests! {
    demo_plot_has_stages_and_layers,
    bench_plot_draws_roofs_and_fused_pairs: gpu,
}
