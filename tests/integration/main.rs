//! The integration tests: one binary (one link instead of one per file), run by the harness of
//! `tests/common/harness.rs`, where each test declares what it needs (a GPU adapter,
//! subgroups, the packed int8 dot product) and is reported as `ignored` when that is missing.
//!
//! Run one file's tests with `cargo test --release --test integration gpu_conv::`, one test
//! with its full name (`gpu_conv::conv2d_random_shapes`). A new test is a plain `fn` added to
//! the `qfuse_tests!` table at the end of its file (`#[test]` does not run here, and the
//! `harness::no_stray_test_attributes` check says so).

#[path = "../common/mod.rs"]
mod common;

mod bench_smoke;
mod cli;
mod cli_info;
mod cli_plot;
mod config;
mod conformance;
mod demo;
mod deploy;
mod deploy_gpu;
mod device_forward;
mod device_ptq;
mod digits;
mod errors;
mod fold_cli;
mod fusion;
mod gpu_conv;
mod gpu_conv_bn;
mod gpu_conv_reg;
mod gpu_conv_subgroup;
mod gpu_conv_tune;
mod gpu_elementwise;
mod gpu_graph_ops;
mod gpu_int8;
mod gpu_into;
mod gpu_observer_fold;
mod gpu_runtime;
mod gpu_train;
mod gpu_train_into;
mod hostile;
mod onnx;
mod onnx_device;
mod onnx_tract;
mod proptest_ops;
mod qat;
mod state_dict;
mod train;
mod train_cpu;

fn harness_self_check() {
    common::harness::no_stray_test_attributes(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/integration"
    ));
}

crate::qfuse_tests! {
    harness_self_check,
}

fn main() -> std::process::ExitCode {
    common::harness::main(&[
        TESTS,
        bench_smoke::TESTS,
        cli_info::TESTS,
        cli::TESTS,
        cli_plot::TESTS,
        config::TESTS,
        conformance::TESTS,
        demo::TESTS,
        deploy::TESTS,
        deploy_gpu::TESTS,
        device_forward::TESTS,
        device_ptq::TESTS,
        digits::TESTS,
        errors::TESTS,
        fold_cli::TESTS,
        fusion::TESTS,
        gpu_conv::TESTS,
        gpu_conv_bn::TESTS,
        gpu_conv_reg::TESTS,
        gpu_conv_subgroup::TESTS,
        gpu_conv_tune::TESTS,
        gpu_elementwise::TESTS,
        gpu_graph_ops::TESTS,
        gpu_int8::TESTS,
        gpu_into::TESTS,
        gpu_observer_fold::TESTS,
        gpu_runtime::TESTS,
        gpu_train::TESTS,
        gpu_train_into::TESTS,
        hostile::TESTS,
        onnx::TESTS,
        onnx_device::TESTS,
        onnx_tract::TESTS,
        proptest_ops::TESTS,
        qat::TESTS,
        state_dict::TESTS,
        train::TESTS,
        train_cpu::TESTS,
    ])
}
