//! Portability without the hardware: every composed shader, in every variant the launchers
//! build (subgroup kernels or portable ones, `dot4I8Packed` or its portable replacement), for
//! every entry point and a sweep of the override constants the launchers pass, is translated
//! by naga — the translator wgpu itself runs — to SPIR-V (Vulkan), MSL (Metal) and HLSL (DX12),
//! the way wgpu's backends do it: override constants resolved first for the one entry point
//! (`process_overrides`), then the backend writer for that entry point, with the lowest
//! language version / shader model and capability set the variant needs on that API.
//!
//! Each variant is also checked against a small GPU's limits (WebGPU's defaults: 256
//! invocations and 16 KiB of workgroup memory per workgroup, 8 storage buffers per stage), as
//! naga sees its entry point use them.
//!
//! How far each backend's requirements are checked is naga's: the SPIR-V writer refuses an
//! instruction whose capability the set lacks (so the portable variants are shown to need
//! only core Vulkan 1.0 capabilities), while the HLSL and MSL writers do not gate wave / SIMD
//! group intrinsics on the shader model or language version. What no test here can show is
//! a Metal or DX12 driver's compiler accepting the output.

use std::collections::BTreeMap;

use crate::gpu::Shader;
use naga::back::{msl, spv};
use naga::valid::{Capabilities, ValidationFlags, Validator};

/// The roofline shader's launcher lives in `src/bench`; its source has no `// requires:`.
static ROOFLINE: Shader = Shader {
    name: "roofline",
    source: include_str!("../../shaders/roofline.wgsl"),
};

/// What a shader variant needs of the device.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Needs {
    /// Core WGSL only.
    Portable,
    /// `wgpu::Features::SUBGROUP`.
    Subgroups,
    /// WGSL's `packed_4x8_integer_dot_product` (`dot4I8Packed`), which naga lowers to the
    /// native instruction where the target has it and to a polyfill elsewhere.
    PackedDot,
}

/// One shader module as a launcher composes it, what it needs, and the override constant
/// sets its launchers pass (each translated separately; the empty set is the WGSL defaults).
struct Variant {
    shader: &'static Shader,
    needs: Needs,
    constants: Vec<Vec<(&'static str, f64)>>,
}

/// `name` over `values`, one constant set each.
fn sweep(name: &'static str, values: &[u32]) -> Vec<Vec<(&'static str, f64)>> {
    values.iter().map(|&v| vec![(name, f64::from(v))]).collect()
}

/// Every composed shader of the crate with its launchers' constant sets. The constant ranges
/// are those the launchers can choose (see the tile checks in `conv2d.rs`, `sg_workgroup` in
/// `train.rs`, the roofline sweep in `src/bench/roofline.rs`), sampled at their ends and at
/// every value the automatic choices produce.
fn variants() -> Vec<Variant> {
    let wg = |values: &[u32]| {
        let mut sets = vec![vec![]];
        sets.extend(sweep("WG", values));
        sets
    };
    let workgroups = [1u32, 8, 16, 32, 64, 128, 256];
    let mut reg = vec![vec![], vec![("WG", f64::from(super::WORKGROUP_SIZE))]];
    for o in [1u32, 2, 4, 8] {
        for k3 in [0u32, 1] {
            for w in workgroups {
                reg.push(vec![
                    ("RB_O", f64::from(o)),
                    ("RB_K3", f64::from(k3)),
                    ("RB_WG", f64::from(w)),
                ]);
            }
        }
    }
    let mut sg = vec![vec![]];
    for o in [8u32, 16] {
        for k3 in [0u32, 1] {
            for w in workgroups {
                sg.push(vec![
                    ("SG_O", f64::from(o)),
                    ("SG_K3", f64::from(k3)),
                    ("SG_WG", f64::from(w)),
                ]);
            }
        }
    }
    // Every variant `ConvAlgorithm::Auto` can choose, from `ConvVariant::all` (so a new
    // variant is covered without editing this list; most sets are in the sweeps above).
    for cv in super::conv2d::ConvVariant::all() {
        let set = cv.constants();
        let list = if matches!(cv, super::conv2d::ConvVariant::Subgroup { .. }) {
            &mut sg
        } else {
            &mut reg
        };
        if !list.contains(&set) {
            list.push(set);
        }
    }
    // Every `conv2d_f` variant of the int8 conv (`Int8ConvVariant::all`), per module.
    let (mut int8_f_sg, mut int8_f) = (vec![vec![]], vec![vec![]]);
    for v in super::int8::Int8ConvVariant::all() {
        if let super::int8::Int8ConvVariant::Float { subgroups, .. } = v {
            let list = if subgroups {
                &mut int8_f_sg
            } else {
                &mut int8_f
            };
            list.push(v.constants());
        }
    }
    let mut matmul = vec![vec![]];
    for inside in [0u32, 1] {
        for w in [8u32, 16, 24, 32, 40, 48, 56, 64] {
            matmul.push(vec![
                ("MM_WG", f64::from(w)),
                ("MM_INSIDE", f64::from(inside)),
            ]);
        }
    }
    let mut roofline = vec![vec![]];
    for w in [64u32, 128, 256] {
        for (name, values) in [("EPT", [1u32, 2, 4, 8]), ("CHAINS", [2, 4, 8, 16])] {
            for v in values {
                roofline.push(vec![("WG", f64::from(w)), (name, f64::from(v))]);
            }
        }
    }
    let v = |shader, needs, constants| Variant {
        shader,
        needs,
        constants,
    };
    vec![
        v(&super::activation::SHADER, Needs::Portable, wg(&[256])),
        v(&super::batch_norm::SHADER, Needs::Portable, vec![vec![]]),
        v(&super::conv2d::SHADER, Needs::Portable, reg),
        v(&super::conv2d::SUBGROUP_SHADER, Needs::Subgroups, sg),
        v(&super::conv_bn::SHADER, Needs::Portable, vec![vec![]]),
        v(&super::fake_quant::SHADER, Needs::Portable, wg(&[256])),
        v(&super::fold::SHADER, Needs::Portable, wg(&[64, 256])),
        v(&super::graph_ops::SHADER, Needs::Portable, wg(&[256])),
        v(&super::int8::ELEMENTWISE, Needs::Portable, wg(&[256])),
        v(&super::int8::CONV_PORTABLE, Needs::Portable, wg(&[64])),
        v(&super::int8::CONV_PACKED, Needs::PackedDot, wg(&[64])),
        v(&super::int8::CONV_F_PORTABLE, Needs::Portable, int8_f),
        v(&super::int8::CONV_F_SUBGROUP, Needs::Subgroups, int8_f_sg),
        v(&super::int8_pool::SHADER, Needs::Portable, wg(&[256])),
        v(&super::observer::SHADER, Needs::Portable, vec![vec![]]),
        v(&super::pool::SHADER, Needs::Portable, wg(&[256])),
        v(&super::train::SHADER, Needs::Portable, wg(&[256])),
        v(&super::train::SG_SHADER, Needs::Subgroups, matmul),
        v(&ROOFLINE, Needs::Portable, roofline),
    ]
}

/// One translation target: a backend with the language version / shader model (and, for
/// SPIR-V, capability set) a device offering exactly `needs` has.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// SPIR-V `version`; `dot_product`: the `VK_KHR_shader_integer_dot_product` capabilities
    /// (without them naga polyfills `dot4I8Packed`).
    Spirv {
        version: (u8, u8),
        dot_product: bool,
    },
    /// MSL `version` (2.1 and later have `packed_char4` dot products).
    Msl { version: (u8, u8) },
    /// HLSL shader model (6.0 for wave intrinsics, 6.4 for `dot4add_i8packed`).
    Hlsl(naga::back::hlsl::ShaderModel),
}

/// The targets a variant is translated for: the lowest that offers what it needs, and for
/// the packed dot product both the native instruction's and the polyfill's.
fn targets(needs: Needs) -> Vec<Target> {
    use naga::back::hlsl::ShaderModel;
    match needs {
        Needs::Portable => vec![
            Target::Spirv {
                version: (1, 0),
                dot_product: false,
            },
            Target::Msl { version: (2, 0) },
            Target::Hlsl(ShaderModel::V5_1),
        ],
        Needs::Subgroups => vec![
            Target::Spirv {
                version: (1, 3),
                dot_product: false,
            },
            Target::Msl { version: (2, 1) },
            Target::Hlsl(ShaderModel::V6_0),
        ],
        Needs::PackedDot => vec![
            Target::Spirv {
                version: (1, 0),
                dot_product: false,
            },
            Target::Spirv {
                version: (1, 6),
                dot_product: true,
            },
            Target::Msl { version: (2, 0) },
            Target::Msl { version: (2, 1) },
            Target::Hlsl(ShaderModel::V5_1),
            Target::Hlsl(ShaderModel::V6_4),
        ],
    }
}

/// The SPIR-V capabilities wgpu's Vulkan backend declares on every device, plus the subgroup
/// ones when `subgroups` and the integer dot product ones when `dot_product`.
fn spirv_capabilities(subgroups: bool, dot_product: bool) -> Vec<spv::Capability> {
    use spv::Capability as C;
    let mut caps = vec![
        C::Shader,
        C::Matrix,
        C::Sampled1D,
        C::Image1D,
        C::ImageQuery,
        C::DerivativeControl,
        C::StorageImageExtendedFormats,
    ];
    if subgroups {
        caps.extend([
            C::GroupNonUniform,
            C::GroupNonUniformVote,
            C::GroupNonUniformArithmetic,
            C::GroupNonUniformBallot,
            C::GroupNonUniformShuffle,
            C::GroupNonUniformShuffleRelative,
            C::GroupNonUniformQuad,
        ]);
    }
    if dot_product {
        caps.extend([
            C::DotProductInputAll,
            C::DotProductInput4x8Bit,
            C::DotProductInput4x8BitPacked,
            C::DotProduct,
        ]);
    }
    caps
}

/// Metal buffer slots as wgpu assigns them: one per binding in binding order (read-write
/// storage mutable), then the buffer of runtime-array sizes.
fn msl_resources(module: &naga::Module) -> msl::EntryPointResources {
    let mut resources = msl::BindingMap::default();
    let mut bindings: Vec<_> = module
        .global_variables
        .iter()
        .filter_map(|(_, g)| g.binding.map(|b| (b, g.space)))
        .collect();
    bindings.sort_by_key(|(b, _)| (b.group, b.binding));
    for (slot, (binding, space)) in bindings.iter().enumerate() {
        let mutable = matches!(space, naga::AddressSpace::Storage { access }
            if access.contains(naga::StorageAccess::STORE));
        resources.insert(
            *binding,
            msl::BindTarget {
                buffer: Some(slot as msl::Slot),
                mutable,
                ..Default::default()
            },
        );
    }
    msl::EntryPointResources {
        resources,
        immediates_buffer: None,
        sizes_buffer: Some(bindings.len() as msl::Slot),
    }
}

/// Translates entry point `ep` of the override-resolved `module` for `target`; the error as
/// one line.
fn translate(
    module: &naga::Module,
    info: &naga::valid::ModuleInfo,
    ep: &str,
    needs: Needs,
    target: Target,
) -> Result<(), String> {
    let stage = naga::ShaderStage::Compute;
    match target {
        Target::Spirv {
            version,
            dot_product,
        } => {
            let options = spv::Options {
                lang_version: version,
                capabilities: Some(
                    spirv_capabilities(needs == Needs::Subgroups, dot_product)
                        .into_iter()
                        .collect(),
                ),
                ..Default::default()
            };
            let pipeline = spv::PipelineOptions {
                entry_point: ep.to_string(),
                shader_stage: stage,
            };
            let words = spv::write_vec(module, info, &options, Some(&pipeline))
                .map_err(|e| format!("{e}"))?;
            if words.first() != Some(&0x0723_0203) {
                return Err("no SPIR-V magic number".into());
            }
        }
        Target::Msl { version } => {
            let options = msl::Options {
                lang_version: version,
                fake_missing_bindings: false,
                per_entry_point_map: BTreeMap::from([(ep.to_string(), msl_resources(module))]),
                ..Default::default()
            };
            let pipeline = msl::PipelineOptions {
                entry_point: Some((stage, ep.to_string())),
                ..Default::default()
            };
            let (source, info) = msl::write_string(module, info, &options, &pipeline)
                .map_err(|e| format!("{e:?}"))?;
            let name = info
                .entry_point_names
                .first()
                .cloned()
                .ok_or("no entry point")?;
            let name = name.map_err(|e| format!("{e}"))?;
            if !source.contains(&format!("kernel void {name}(")) {
                return Err(format!("no `kernel void {name}(` in the MSL"));
            }
        }
        Target::Hlsl(shader_model) => {
            let options = naga::back::hlsl::Options {
                shader_model,
                ..Default::default()
            };
            let pipeline = naga::back::hlsl::PipelineOptions {
                entry_point: Some((stage, ep.to_string())),
            };
            let mut source = String::new();
            let reflection = naga::back::hlsl::Writer::new(&mut source, &options, &pipeline)
                .write(module, info, None)
                .map_err(|e| format!("{e:?}"))?;
            let name = reflection
                .entry_point_names
                .first()
                .cloned()
                .ok_or("no entry point")?;
            let name = name.map_err(|e| format!("{e}"))?;
            if !source.contains(&format!("void {name}(")) {
                return Err(format!("no `void {name}(` in the HLSL"));
            }
        }
    }
    Ok(())
}

/// What entry point `ep` of the override-resolved `module` asks of the device against the limits
/// of a small GPU (WebGPU's defaults, `crate::gpu::ContextOptions::small_gpu_limits`): its
/// workgroup size, the workgroup memory it uses, and the storage buffers it uses; the first
/// excess as one line. (`QFUSE_DEVICE_LIMITS=small` runs the kernels on such a device; this
/// covers every variant and constant set, including those no test dispatches.)
fn check_small_gpu_limits(
    module: &naga::Module,
    info: &naga::valid::ModuleInfo,
    ep: &str,
) -> Result<(), String> {
    let limits = crate::gpu::ContextOptions::small_gpu_limits();
    let (index, entry) = module
        .entry_points
        .iter()
        .enumerate()
        .find(|(_, e)| e.name == ep)
        .ok_or("no such entry point")?;
    let [x, y, z] = entry.workgroup_size;
    let invocations = x * y * z;
    if x > limits.max_compute_workgroup_size_x
        || y > limits.max_compute_workgroup_size_y
        || z > limits.max_compute_workgroup_size_z
        || invocations > limits.max_compute_invocations_per_workgroup
    {
        return Err(format!(
            "workgroup size {x}x{y}x{z} past a small GPU's {} invocations",
            limits.max_compute_invocations_per_workgroup
        ));
    }
    let uses = info.get_entry_point(index);
    let (mut workgroup_bytes, mut storage) = (0u32, 0u32);
    for (handle, var) in module.global_variables.iter() {
        if uses[handle].is_empty() {
            continue;
        }
        match var.space {
            naga::AddressSpace::WorkGroup => {
                workgroup_bytes += module.types[var.ty].inner.size(module.to_ctx());
            }
            naga::AddressSpace::Storage { .. } => storage += 1,
            _ => {}
        }
    }
    if workgroup_bytes > limits.max_compute_workgroup_storage_size {
        return Err(format!(
            "{workgroup_bytes} bytes of workgroup memory, past a small GPU's {}",
            limits.max_compute_workgroup_storage_size
        ));
    }
    if storage > limits.max_storage_buffers_per_shader_stage {
        return Err(format!(
            "{storage} storage buffers, past a small GPU's {} per stage",
            limits.max_storage_buffers_per_shader_stage
        ));
    }
    Ok(())
}

/// Every shader file in `shaders/` (and `shaders/lib/`) is part of some variant, so a new
/// shader cannot escape the translation test.
#[test]
fn every_shader_file_is_in_a_variant() {
    let variants = variants();
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("shaders");
    for dir in [root.clone(), root.join("lib")] {
        for entry in std::fs::read_dir(&dir).expect("shaders/ exists") {
            let path = entry.expect("readable entry").path();
            if path.extension().is_none_or(|e| e != "wgsl") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("readable shader");
            assert!(
                variants.iter().any(|v| v.shader.source.contains(&text)),
                "{} is in no variant of the translation test",
                path.display()
            );
        }
    }
}

/// Every variant of every shader translates to SPIR-V, MSL and HLSL (see the module docs) and
/// fits a small GPU's limits (`check_small_gpu_limits`); portable variants validate without
/// the subgroup capability, every override constant the
/// test sets exists in its shader (a renamed constant cannot silently fall back to the WGSL
/// default) and every one the shader declares is set by some constant set.
#[test]
fn every_shader_variant_translates_to_spirv_msl_and_hlsl() {
    let mut failures = Vec::new();
    let mut translations = 0usize;
    let mut counts = [0usize; 3];
    for variant in variants() {
        let Variant {
            shader,
            needs,
            constants,
        } = variant;
        let src = shader.source;
        let module = naga::front::wgsl::parse_str(src)
            .unwrap_or_else(|e| panic!("{}: {}", shader.name, e.emit_to_string(src)));
        let caps = match needs {
            Needs::Subgroups => Capabilities::SUBGROUP,
            Needs::Portable | Needs::PackedDot => Capabilities::empty(),
        };
        let info = Validator::new(ValidationFlags::all(), caps)
            .validate(&module)
            .unwrap_or_else(|e| {
                panic!(
                    "{} ({needs:?}, capabilities {caps:?}): {}",
                    shader.name,
                    e.emit_to_string(src)
                )
            });
        for (_, o) in module.overrides.iter() {
            let name = o.name.as_deref().unwrap_or("(unnamed)");
            assert!(
                constants.iter().flatten().any(|(n, _)| *n == name),
                "{}: override constant {name} is never set by the test (add its launchers' \
                 values)",
                shader.name
            );
        }
        for set in &constants {
            for (name, _) in set {
                assert!(
                    module
                        .overrides
                        .iter()
                        .any(|(_, o)| o.name.as_deref() == Some(*name)),
                    "{}: no override constant {name}",
                    shader.name
                );
            }
        }
        let entry_points: Vec<String> = module
            .entry_points
            .iter()
            .filter(|ep| ep.stage == naga::ShaderStage::Compute)
            .map(|ep| ep.name.clone())
            .collect();
        assert!(!entry_points.is_empty(), "{}: no entry point", shader.name);
        for set in &constants {
            let mut pipeline_constants = naga::back::PipelineConstants::default();
            for &(name, value) in set {
                pipeline_constants.insert(name.to_string(), value);
            }
            for ep in &entry_points {
                let what = format!("{} {ep} {set:?}", shader.name);
                let resolved = naga::back::pipeline_constants::process_overrides(
                    &module,
                    &info,
                    Some((naga::ShaderStage::Compute, ep)),
                    &pipeline_constants,
                );
                let (m, i) = match resolved {
                    Ok(r) => r,
                    Err(e) => {
                        failures.push(format!("{what}: override constants: {e}"));
                        continue;
                    }
                };
                if let Err(e) = check_small_gpu_limits(&m, &i, ep) {
                    failures.push(format!("{what}: {e}"));
                }
                for target in targets(needs) {
                    translations += 1;
                    counts[match target {
                        Target::Spirv { .. } => 0,
                        Target::Msl { .. } => 1,
                        Target::Hlsl(_) => 2,
                    }] += 1;
                    if let Err(e) = translate(&m, &i, ep, needs, target) {
                        failures.push(format!("{what} -> {target:?}: {e}"));
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {translations} translations failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // Each backend is reached for every variant (a target list cannot silently lose one).
    assert!(counts.iter().all(|&c| c > 0), "{counts:?}");
    assert_eq!(counts[0], counts[1], "SPIR-V and MSL translations");
    assert_eq!(counts[1], counts[2], "MSL and HLSL translations");
}
