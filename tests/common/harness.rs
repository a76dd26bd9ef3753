//! The integration tests' harness (`harness = false`, built on `libtest-mimic`): every test
//! declares what it needs (nothing, a GPU adapter, subgroups, the packed int8 dot product,
//! storage bindings past 16 MiB), like wgpu's `#[gpu_test]`, instead of an `if` at the top of
//! its body. A test whose need is
//! not met is reported as `ignored` in the libtest summary (`N passed; 0 failed; M ignored`)
//! with one line saying why, so a run that skipped the GPU tests says so.
//!
//! `QFUSE_REQUIRE_GPU=1` (as in CI) turns a missing adapter into failures. A device without an
//! optional feature (subgroups, packed int8 dot, large bindings) still ignores the tests that
//! need it: those paths are then not the ones that run. `QFUSE_DEVICE_LIMITS=small` (read by
//! `GpuContext::new`, so by every context of the suite and every `qfuse` command it spawns)
//! runs the whole suite as on a small or mobile GPU: 16 MiB storage bindings, 16 KiB of
//! workgroup memory, WebGPU's default limits otherwise, no subgroups, no timestamp queries.
//! CI runs the GPU tests both ways. `--ignored` / `--include-ignored` run ignored tests
//! anyway; one whose need is not met then fails and says why.
//!
//! Tests are plain `fn name()` items registered at the end of their file with
//! [`crate::qfuse_tests!`]. `QFUSE_TEST_TIMES=1` prints each test's wall time on stderr.

use std::process::ExitCode;
use std::time::Instant;

use libtest_mimic::{Arguments, Failed, Trial};

/// What a test needs to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needs {
    /// Nothing beyond the CPU.
    Cpu,
    /// A GPU adapter (`common::gpu()`).
    Gpu,
    /// A GPU adapter whose device has `wgpu::Features::SUBGROUP`.
    Subgroups,
    /// A GPU adapter with the packed 4x8 integer dot product.
    PackedInt8Dot,
    /// A GPU adapter whose storage bindings and buffers reach [`LARGE_BUFFER_BYTES`] (WebGPU's
    /// default binding limit): tests of tensors past 16 MiB, which a context cut down to a
    /// small GPU's limits (`QFUSE_DEVICE_LIMITS=small`) refuses with `Error::BufferTooLarge`.
    LargeBuffers,
}

/// What [`Needs::LargeBuffers`] asks of `max_storage_buffer_binding_size` and
/// `max_buffer_size`: 128 MiB.
pub const LARGE_BUFFER_BYTES: u64 = 128 << 20;

impl Needs {
    /// The label shown before the test name (`test [gpu] ...`).
    fn kind(self) -> &'static str {
        match self {
            Needs::Cpu => "",
            Needs::Gpu => "gpu",
            Needs::Subgroups => "subgroups",
            Needs::PackedInt8Dot => "int8-dot",
            Needs::LargeBuffers => "large-buffers",
        }
    }

    /// Why the need is not met (`None`: met). `no_adapter` tells a missing adapter (a failure
    /// under `QFUSE_REQUIRE_GPU=1`) from a missing optional feature.
    fn unmet(self) -> Option<Unmet> {
        if self == Needs::Cpu {
            return None;
        }
        let ctx = match super::gpu_context() {
            Ok(ctx) => ctx,
            Err(reason) => {
                return Some(Unmet {
                    no_adapter: true,
                    why: if reason.starts_with("no GPU adapter") {
                        reason
                    } else {
                        format!("no GPU adapter ({reason})")
                    },
                })
            }
        };
        let missing = match self {
            Needs::Cpu | Needs::Gpu => return None,
            Needs::Subgroups => (!ctx.has_subgroups()).then_some("wgpu::Features::SUBGROUP"),
            Needs::PackedInt8Dot => {
                (!ctx.packed_int8_dot_available()).then_some("the packed 4x8 integer dot product")
            }
            Needs::LargeBuffers => {
                let l = ctx.limits();
                let binding = l.max_storage_buffer_binding_size.min(l.max_buffer_size);
                return (binding < LARGE_BUFFER_BYTES).then(|| Unmet {
                    no_adapter: false,
                    why: format!(
                        "{} binds storage buffers of at most {binding} bytes (< {} MiB)",
                        ctx.name(),
                        LARGE_BUFFER_BYTES >> 20
                    ),
                });
            }
        };
        missing.map(|m| Unmet {
            no_adapter: false,
            why: format!("{} has no {m}", ctx.name()),
        })
    }
}

struct Unmet {
    no_adapter: bool,
    why: String,
}

/// One registered test.
pub struct Test {
    /// The module path of the file that registered it (`integration::gpu_conv`).
    pub module: &'static str,
    /// The function's name.
    pub name: &'static str,
    /// What it needs.
    pub needs: Needs,
    /// Not a check (timings): runs only when asked for (`--ignored`).
    pub manual: bool,
    /// The test.
    pub run: fn(),
}

impl Test {
    /// `file::name`, the name filters match.
    pub fn full_name(&self) -> String {
        let module = self.module.split_once("::").map_or(self.module, |(_, m)| m);
        format!("{module}::{}", self.name)
    }
}

/// Registers the plain `fn name()` tests of a file as `TESTS`, each with what it needs:
///
/// ```ignore
/// crate::qfuse_tests! {
///     cpu_only_test,
///     gpu_test: gpu,
///     subgroup_test: subgroups,
///     packed_dot_test: packed_int8_dot,
///     big_tensor_test: large_buffers,
///     timing: gpu + manual,
/// }
/// ```
#[macro_export]
macro_rules! qfuse_tests {
    (@needs) => { $crate::common::harness::Needs::Cpu };
    (@needs cpu) => { $crate::common::harness::Needs::Cpu };
    (@needs gpu) => { $crate::common::harness::Needs::Gpu };
    (@needs subgroups) => { $crate::common::harness::Needs::Subgroups };
    (@needs packed_int8_dot) => { $crate::common::harness::Needs::PackedInt8Dot };
    (@needs large_buffers) => { $crate::common::harness::Needs::LargeBuffers };
    (@manual) => { false };
    (@manual manual) => { true };
    ($($name:ident $(: $needs:ident $(+ $manual:ident)?)?),* $(,)?) => {
        /// This file's tests, for the harness.
        pub const TESTS: &[$crate::common::harness::Test] = &[$(
            $crate::common::harness::Test {
                module: module_path!(),
                name: stringify!($name),
                needs: $crate::qfuse_tests!(@needs $($needs)?),
                manual: $crate::qfuse_tests!(@manual $($($manual)?)?),
                run: $name,
            },
        )*];
    };
}

fn require_gpu() -> bool {
    std::env::var("QFUSE_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// Runs the tests of `files` (each a file's `TESTS`) with the command line's arguments and
/// returns the exit code (failure when a test failed).
pub fn main(files: &[&[Test]]) -> ExitCode {
    let _runtime_dir = super::runtime_dir::ensure();
    let args = Arguments::from_args();
    let times = std::env::var("QFUSE_TEST_TIMES").is_ok_and(|v| v == "1");
    let mut trials = Vec::new();
    let mut skipped: Vec<(Unmet, usize)> = Vec::new();
    for test in files.iter().flat_map(|f| f.iter()) {
        let name = test.full_name();
        let unmet = test.needs.unmet();
        let ignored = test.manual
            || unmet
                .as_ref()
                .is_some_and(|u| !(u.no_adapter && require_gpu()));
        if !test.manual {
            if let Some(u) = unmet.filter(|_| ignored) {
                match skipped.iter_mut().find(|(w, _)| w.why == u.why) {
                    Some((_, n)) => *n += 1,
                    None => skipped.push((u, 1)),
                }
            }
        }
        let (needs, run) = (test.needs, test.run);
        let label = name.clone();
        let trial = Trial::test(name, move || {
            if let Some(u) = needs.unmet() {
                return Err(Failed::from(if u.no_adapter && require_gpu() {
                    format!(
                        "QFUSE_REQUIRE_GPU=1 but {} (on Linux without a GPU: install \
                         mesa-vulkan-drivers and set WGPU_BACKEND=vulkan)",
                        u.why
                    )
                } else {
                    format!("needs {}: {}", needs.kind(), u.why)
                }));
            }
            let start = Instant::now();
            run();
            if times {
                eprintln!("time {:8.2} s  {label}", start.elapsed().as_secs_f64());
            }
            Ok(())
        })
        .with_kind(test.needs.kind())
        .with_ignored_flag(ignored);
        trials.push(trial);
    }
    if !args.list {
        for (u, n) in &skipped {
            println!(
                "note: {n} test(s) ignored: {}{}",
                u.why,
                if u.no_adapter {
                    "; QFUSE_REQUIRE_GPU=1 makes that a failure"
                } else {
                    ""
                }
            );
        }
    }
    libtest_mimic::run(&args, trials).exit_code()
}

/// Fails when a file of this harness still has a `#[test]` attribute: with `harness = false`
/// such a function is compiled out silently, so it would never run. Register it with
/// [`crate::qfuse_tests!`] instead.
pub fn no_stray_test_attributes(dir: &str) {
    let mut stray = Vec::new();
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{dir}: {e}"));
    for entry in entries {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for (i, line) in text.lines().enumerate() {
            let t = line.trim();
            if t == "#[test]" || t.starts_with("#[ignore") {
                stray.push(format!("{}:{}: {t}", path.display(), i + 1));
            }
        }
    }
    assert!(
        stray.is_empty(),
        "these files run under the qfuse harness (harness = false), where #[test] functions \
         never run; register them with qfuse_tests! at the end of the file instead:\n{}",
        stray.join("\n")
    );
}
