//! `ConvAlgorithm::Auto`'s tuner and the context's caches: every variant of the bounded set
//! against the CPU reference; the tuner's choice (one of the class's candidates, made once per
//! class, reused by another shape of the class without compiling a pipeline); the tuning file
//! (written, read back by a new context, a hand-edited choice honoured, an inapplicable or
//! unknown one re-tuned); corrupt and foreign cache files ignored with a typed reason. No
//! timing is asserted: which candidate wins depends on the adapter and the host's load.

use std::path::{Path, PathBuf};

use crate::common;

use qfuse::gpu::{CacheLoad, CacheRejection, ContextOptions, GpuContext};
use qfuse::kernels::conv2d::{
    candidates, dw_ok, shape_class, tuned_variant, untuned_variant, ConvAlgorithm, ConvVariant,
    TUNE_MIN_MACS,
};
use qfuse::ops::Conv2dParams;

use common::conv::{check, p, Case, Rng};

/// A 5x5 conv above the tuning threshold: 4 x 16 x 20 x 20 -> 16 channels, 16 x 16 output.
fn tuned_case() -> Case {
    (
        [4, 16, 20, 20],
        [16, 16, 5, 5],
        p([1, 1], [0, 0], [1, 1], 1),
        "5x5 above the threshold",
    )
}

/// Another shape of the same class (17 x 17 output).
fn same_class_case() -> Case {
    (
        [4, 16, 21, 21],
        [16, 16, 5, 5],
        p([1, 1], [0, 0], [1, 1], 1),
        "5x5, same class",
    )
}

fn macs(case: &Case) -> u64 {
    let (x, w, params, _) = case;
    let out = params.output_shape(x, w).unwrap();
    (out.iter().product::<usize>() * w[1] * w[2] * w[3]) as u64
}

/// A fresh, empty directory under the temporary folder.
fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qfuse-tune-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn context(dir: Option<&Path>) -> GpuContext {
    GpuContext::new_with(ContextOptions {
        cache_dir: dir.map(Path::to_path_buf),
        ..ContextOptions::from_env().unwrap()
    })
    .unwrap()
}

/// The one `qfuse-tuning-*.json` file in `dir`.
fn tuning_file(dir: &Path) -> PathBuf {
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("qfuse-tuning-")
        })
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files[0].clone()
}

fn every_variant_matches_reference() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(61);
    let cases: Vec<Case> = vec![
        (
            [2, 8, 9, 11],
            [16, 8, 3, 3],
            p([1, 1], [1, 1], [1, 1], 1),
            "3x3",
        ),
        (
            [1, 6, 10, 9],
            [12, 3, 3, 3],
            p([1, 1], [1, 0], [1, 1], 2),
            "grouped",
        ),
        (
            [1, 4, 13, 13],
            [8, 4, 5, 3],
            p([2, 1], [2, 1], [1, 1], 1),
            "5x3 s2",
        ),
        (
            [1, 4, 9, 17],
            [6, 4, 3, 5],
            p([1, 2], [1, 2], [1, 2], 1),
            "3x5, stride = dilation = 2 in width (the generic loops' sliding window)",
        ),
        (
            [2, 6, 7, 12],
            [6, 1, 3, 3],
            p([1, 1], [1, 1], [1, 1], 6),
            "depthwise 3x3, 7 rows (a partial 4-row block), width 12",
        ),
        (
            [1, 5, 9, 8],
            [5, 1, 3, 3],
            p([1, 1], [0, 1], [1, 1], 5),
            "depthwise 3x3, no top / bottom padding, width 8",
        ),
    ];
    for v in ConvVariant::all() {
        assert_eq!(ConvVariant::parse(&v.id()), Some(v));
        let mut ran = 0;
        for case in &cases {
            let out = case.2.output_shape(&case.0, &case.1).unwrap();
            if v.applies(&ctx, &case.1, &case.2, out) {
                check(&ctx, &mut rng, case, ConvAlgorithm::Variant(v));
                ran += 1;
            }
        }
        // Every variant the device can run meets some case.
        let subgroup = matches!(v, ConvVariant::Subgroup { .. });
        assert!(
            ran > 0 || (subgroup && !ctx.has_subgroups()),
            "{v:?} ran on no case"
        );
    }
    assert_eq!(ConvVariant::parse("bogus"), None);
}

fn tuner_choice_is_a_candidate_made_once_per_class() {
    let Some(_) = common::gpu() else { return };
    let ctx = context(None);
    let case = tuned_case();
    let other = same_class_case();
    assert!(macs(&case) >= TUNE_MIN_MACS && macs(&other) >= TUNE_MIN_MACS);
    let class = shape_class(&case.0, &case.1, &case.2).unwrap();
    assert_eq!(class, shape_class(&other.0, &other.1, &other.2).unwrap());
    assert_eq!(
        tuned_variant(&ctx, &case.0, &case.1, &case.2).unwrap(),
        None
    );

    let mut rng = Rng(62);
    check(&ctx, &mut rng, &case, ConvAlgorithm::Auto);
    let chosen = tuned_variant(&ctx, &case.0, &case.1, &case.2)
        .unwrap()
        .expect("tuned after the first conv of the class");
    let out = case.2.output_shape(&case.0, &case.1).unwrap();
    let cands = candidates(&ctx, &case.1, &case.2, out);
    assert!(cands.contains(&chosen), "{chosen:?} not in {cands:?}");
    let entries = ctx.tuning_entries();
    assert_eq!(
        entries,
        vec![(format!("conv2d/{class}"), chosen.id())],
        "one decision"
    );

    // Another shape of the class: no new decision, no new pipeline.
    let pipelines = ctx.pipeline_count();
    check(&ctx, &mut rng, &other, ConvAlgorithm::Auto);
    assert_eq!(ctx.tuning_entries(), entries);
    assert_eq!(ctx.pipeline_count(), pipelines);

    // Below the threshold: the register-blocked kernel, untimed, nothing recorded.
    let small = (
        [1, 4, 8, 8],
        [8, 4, 3, 3],
        p([1, 1], [1, 1], [1, 1], 1),
        "small",
    );
    assert!(macs(&small) < TUNE_MIN_MACS);
    check(&ctx, &mut rng, &small, ConvAlgorithm::Auto);
    assert_eq!(
        tuned_variant(&ctx, &small.0, &small.1, &small.2).unwrap(),
        Some(ConvVariant::Reg {
            channels: 8,
            k3: true
        })
    );
    assert_eq!(ctx.tuning_entries(), entries);

    // Inside a recording the tuning runs detached and the recorded conv is still right.
    let ctx2 = context(None);
    ctx2.record(|| {
        check(&ctx2, &mut rng, &case, ConvAlgorithm::Auto);
        Ok(())
    })
    .unwrap();
    assert_eq!(ctx2.tuning_entries().len(), 1);
}

fn tuning_file_round_trip() {
    let Some(_) = common::gpu() else { return };
    let dir = temp_dir("round-trip");
    let case = tuned_case();
    let class = shape_class(&case.0, &case.1, &case.2).unwrap();
    let key = format!("conv2d/{class}");
    let mut rng = Rng(63);

    let first = context(Some(&dir));
    let status = first.cache_status();
    assert_eq!(status.dir.as_deref(), Some(dir.as_path()));
    assert_eq!(status.tuning, CacheLoad::Missing);
    check(&first, &mut rng, &case, ConvAlgorithm::Auto);
    let chosen = tuned_variant(&first, &case.0, &case.1, &case.2)
        .unwrap()
        .unwrap();
    assert_eq!(first.cache_status().last_write_error, None);
    let file = tuning_file(&dir);
    first.persist_caches().unwrap();
    drop(first);

    // A new context starts with the decision.
    let second = context(Some(&dir));
    assert_eq!(
        second.cache_status().tuning,
        CacheLoad::Loaded { entries: 1 }
    );
    assert_eq!(
        tuned_variant(&second, &case.0, &case.1, &case.2).unwrap(),
        Some(chosen)
    );
    drop(second);

    // A hand-edited choice is what Auto runs (forward_direct, not a candidate of this class,
    // but a variant that applies), with the same results.
    let text = std::fs::read_to_string(&file).unwrap();
    let edited = text.replace(&format!("\"{}\"", chosen.id()), "\"direct\"");
    assert_ne!(text, edited);
    std::fs::write(&file, &edited).unwrap();
    let third = context(Some(&dir));
    assert_eq!(
        tuned_variant(&third, &case.0, &case.1, &case.2).unwrap(),
        Some(ConvVariant::Direct)
    );
    check(&third, &mut rng, &case, ConvAlgorithm::Auto);
    drop(third);

    // A variant that does not apply to the class (four rows on a 5x5 kernel), or a name that
    // is no variant, is ignored: the class is tuned again.
    for bad in ["sg_c16_r4", "bogus"] {
        std::fs::write(
            &file,
            text.replace(&format!("\"{}\"", chosen.id()), &format!("\"{bad}\"")),
        )
        .unwrap();
        let ctx = context(Some(&dir));
        assert_eq!(ctx.cache_status().tuning, CacheLoad::Loaded { entries: 1 });
        assert_eq!(
            tuned_variant(&ctx, &case.0, &case.1, &case.2).unwrap(),
            None
        );
        check(&ctx, &mut rng, &case, ConvAlgorithm::Auto);
        let again = ctx.tuning_entries();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].0, key);
        assert!(ConvVariant::parse(&again[0].1).is_some(), "{again:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn corrupt_or_foreign_cache_files_are_ignored() {
    let Some(_) = common::gpu() else { return };
    let dir = temp_dir("corrupt");
    let case = tuned_case();
    let mut rng = Rng(64);
    let first = context(Some(&dir));
    check(&first, &mut rng, &case, ConvAlgorithm::Auto);
    first.persist_caches().unwrap();
    let pipelines_supported = first.cache_status().pipelines != CacheLoad::Unsupported;
    drop(first);
    let file = tuning_file(&dir);
    let text = std::fs::read_to_string(&file).unwrap();

    // Garbage in both files.
    std::fs::write(&file, b"{\"format\": \"qfuse-tuning\", \"vers").unwrap();
    let pipeline_files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("qfuse-pipelines-"))
        .collect();
    for f in &pipeline_files {
        let mut bytes = std::fs::read(f).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x5a;
        std::fs::write(f, &bytes).unwrap();
    }
    let ctx = context(Some(&dir));
    let status = ctx.cache_status();
    assert!(
        matches!(
            status.tuning,
            CacheLoad::Rejected(CacheRejection::Corrupt(_))
        ),
        "{status:?}"
    );
    if !pipeline_files.is_empty() {
        assert!(
            matches!(
                status.pipelines,
                CacheLoad::Rejected(CacheRejection::Corrupt(_))
            ),
            "{status:?}"
        );
    } else if pipelines_supported {
        assert_eq!(status.pipelines, CacheLoad::Missing, "{status:?}");
    }
    // The context works, tunes again and rewrites the file.
    check(&ctx, &mut rng, &case, ConvAlgorithm::Auto);
    assert_eq!(ctx.tuning_entries().len(), 1);
    drop(ctx);
    let rewritten = std::fs::read_to_string(&file).unwrap();
    assert!(rewritten.contains("qfuse-tuning"), "{rewritten}");

    // Another adapter's file (same name, another adapter key inside) and another version.
    let adapter_line = text
        .lines()
        .find(|l| l.contains("\"adapter\""))
        .expect("an adapter line")
        .to_string();
    std::fs::write(
        &file,
        text.replace(&adapter_line, "  \"adapter\": \"some other GPU\","),
    )
    .unwrap();
    let ctx = context(Some(&dir));
    assert!(
        matches!(
            ctx.cache_status().tuning,
            CacheLoad::Rejected(CacheRejection::ForeignAdapter { .. })
        ),
        "{:?}",
        ctx.cache_status()
    );
    assert!(ctx.tuning_entries().is_empty());
    drop(ctx);
    std::fs::write(&file, text.replace("\"version\": 1", "\"version\": 999")).unwrap();
    let ctx = context(Some(&dir));
    assert!(
        matches!(
            ctx.cache_status().tuning,
            CacheLoad::Rejected(CacheRejection::Version { .. })
        ),
        "{:?}",
        ctx.cache_status()
    );
    // A reason prints on one line.
    if let CacheLoad::Rejected(why) = ctx.cache_status().tuning {
        assert!(!why.to_string().contains('\n'));
    }
    drop(ctx);

    // A directory where the file should be: unreadable, ignored.
    std::fs::remove_file(&file).unwrap();
    std::fs::create_dir(&file).unwrap();
    let ctx = context(Some(&dir));
    assert!(
        matches!(
            ctx.cache_status().tuning,
            CacheLoad::Rejected(CacheRejection::Io(_))
        ),
        "{:?}",
        ctx.cache_status()
    );
    drop(ctx);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A context cut down to a small GPU's limits and features (`ContextOptions::small_gpu`) on the
/// same adapter and cache directory keeps its decisions in a tuning file of its own: it never
/// reads the full device's choices (a subgroup variant it cannot run) nor overwrites them.
fn small_gpu_context_keeps_its_own_tuning_file() {
    let Some(_) = common::gpu() else { return };
    let dir = temp_dir("small");
    let full = ContextOptions {
        cache_dir: Some(dir.clone()),
        ..ContextOptions::default()
    };
    let small = ContextOptions {
        cache_dir: Some(dir.clone()),
        ..ContextOptions::default().small_gpu()
    };
    let case = tuned_case();
    let mut rng = Rng(63);
    let big = GpuContext::new_with(full.clone()).unwrap();
    check(&big, &mut rng, &case, ConvAlgorithm::Auto);
    let big_choice = tuned_variant(&big, &case.0, &case.1, &case.2)
        .unwrap()
        .unwrap();
    drop(big);
    let ctx = GpuContext::new_with(small).unwrap();
    assert!(!ctx.has_subgroups() && !ctx.has_timestamps());
    assert_eq!(ctx.limits().max_storage_buffer_binding_size, 16 << 20);
    assert_eq!(ctx.limits().max_compute_workgroup_storage_size, 16 << 10);
    assert_eq!(ctx.cache_status().tuning, CacheLoad::Missing);
    check(&ctx, &mut rng, &case, ConvAlgorithm::Auto);
    let chosen = tuned_variant(&ctx, &case.0, &case.1, &case.2)
        .unwrap()
        .unwrap();
    assert!(
        !matches!(chosen, ConvVariant::Subgroup { .. }),
        "{chosen:?}"
    );
    drop(ctx);
    let files = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("qfuse-tuning-")
        })
        .count();
    assert_eq!(files, 2, "one tuning file per device profile");
    // The full device still reads its own choice.
    let big = GpuContext::new_with(full).unwrap();
    assert_eq!(
        tuned_variant(&big, &case.0, &case.1, &case.2).unwrap(),
        Some(big_choice)
    );
    drop(big);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `forward_dw` is the first candidate (and the untuned choice) exactly for depthwise 3×3
/// convs at stride 1, dilation 1, padding 1 in width and an output width that is a multiple of
/// 4; asked for elsewhere it is a typed error, not a wrong answer.
fn depthwise_variant_applies_where_it_should() {
    let Some(ctx) = common::gpu() else { return };
    let dw = |c: usize, w: usize, padding: [usize; 2]| -> Case {
        (
            [1, c, 9, w],
            [c, 1, 3, 3],
            p([1, 1], padding, [1, 1], c),
            "depthwise",
        )
    };
    let applies = |case: &Case| {
        let out = case.2.output_shape(&case.0, &case.1).unwrap();
        let yes = ConvVariant::Depthwise.applies(&ctx, &case.1, &case.2, out);
        assert_eq!(yes, dw_ok(&case.1, &case.2, out));
        assert_eq!(
            yes,
            candidates(&ctx, &case.1, &case.2, out).first() == Some(&ConvVariant::Depthwise)
        );
        assert_eq!(
            yes,
            untuned_variant(&case.1, &case.2, out) == ConvVariant::Depthwise
        );
        yes
    };
    assert!(applies(&dw(8, 16, [1, 1])));
    assert!(applies(&dw(8, 16, [0, 1])));
    assert!(!applies(&dw(8, 14, [1, 1])), "width not a multiple of 4");
    assert!(!applies(&dw(8, 16, [1, 0])), "no padding in width");
    let mut strided = dw(8, 16, [1, 1]);
    strided.2.stride = [2, 2];
    assert!(!applies(&strided));
    // Two channels per group, and a depth multiplier of 2: not depthwise in forward_dw's sense.
    assert!(!applies(&(
        [1, 8, 9, 16],
        [4, 2, 3, 3],
        p([1, 1], [1, 1], [1, 1], 4),
        ""
    )));
    assert!(!applies(&(
        [1, 4, 9, 16],
        [8, 1, 3, 3],
        p([1, 1], [1, 1], [1, 1], 4),
        ""
    )));
    let same = (
        [1, 4, 9, 16],
        [4, 1, 3, 3],
        Conv2dParams::same([1, 1], 4),
        "same",
    );
    assert!(applies(&same));
    let mut rng = Rng(64);
    check(
        &ctx,
        &mut rng,
        &same,
        ConvAlgorithm::Variant(ConvVariant::Depthwise),
    );
    let bad = dw(8, 14, [1, 1]);
    let x = qfuse::gpu::GpuTensor::zeros(&ctx, &bad.0, qfuse::gpu::DType::F32).unwrap();
    let w = qfuse::gpu::GpuTensor::zeros(&ctx, &bad.1, qfuse::gpu::DType::F32).unwrap();
    let e = qfuse::kernels::conv2d::conv2d_with_algorithm(
        &ctx,
        &x,
        &w,
        &bad.2,
        &qfuse::kernels::conv2d::ConvEpilogue::none(),
        ConvAlgorithm::Variant(ConvVariant::Depthwise),
    )
    .unwrap_err();
    assert!(
        matches!(e, qfuse::Error::InvalidArgument(_)) && e.to_string().contains("forward_dw"),
        "{e}"
    );
}

crate::qfuse_tests! {
    depthwise_variant_applies_where_it_should: gpu,
    small_gpu_context_keeps_its_own_tuning_file: gpu,
    every_variant_matches_reference: gpu,
    tuner_choice_is_a_candidate_made_once_per_class: gpu,
    tuning_file_round_trip: gpu,
    corrupt_or_foreign_cache_files_are_ignored: gpu,
}
