//! Caller-registered fusers (`additional_fuser_method_mapping`).

use std::fmt;
use std::sync::Arc;

use crate::error::Result;
use crate::nn::Module;

/// What a fuser is told besides the modules.
#[derive(Debug, Clone, Copy)]
pub struct FuseContext<'a> {
    /// `true` under [`super::fuse_modules_qat`], `false` under [`super::fuse_modules`]
    /// (PyTorch's `is_qat` argument of a fuser method).
    pub is_qat: bool,
    /// The dotted paths of the group, in order.
    pub names: &'a [String],
}

/// A fuser: builds the fused module from the group's modules (deep copies, in group order,
/// with their hooks removed: fusion moves the hooks itself). PyTorch's fuser method
/// `fn(is_qat, *mods)`.
pub type FuserFn = Arc<dyn Fn(&FuseContext<'_>, &[Module]) -> Result<Module> + Send + Sync>;

/// Fusers for patterns beyond (or instead of) the built-in table, keyed by the tuple of
/// module type names ([`Module::kind_name`]). PyTorch's
/// `fuse_custom_config_dict["additional_fuser_method_mapping"]`: its entries are looked up
/// before the built-in table, so an entry for a built-in pattern replaces it.
///
/// ```
/// use qfuse::fuse::{fuse_modules, FuseOptions, FuserRegistry};
/// use qfuse::nn::Module;
///
/// // MaxPool2d + ReLU commute: fuse them into the pool (a toy fuser).
/// let fusers = FuserRegistry::new().with(&["MaxPool2d", "ReLU"], |_ctx, mods| {
///     Ok(Module::sequential([mods[1].clone(), mods[0].clone()]))
/// });
/// let mut model = Module::sequential([Module::max_pool2d(2, 2)?, Module::relu()]);
/// let opts = FuseOptions { inplace: true, additional_fuser_method_mapping: fusers };
/// fuse_modules(&mut model, ["0", "1"], opts)?;
/// assert_eq!(model.get("0")?.kind_name(), "Sequential");
/// assert_eq!(model.get("1")?.kind_name(), "Identity");
/// # Ok::<(), qfuse::Error>(())
/// ```
#[derive(Clone, Default)]
pub struct FuserRegistry {
    entries: Vec<(Vec<String>, FuserFn)>,
}

impl FuserRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `fuser` for the module types `types` (replacing an earlier entry for the
    /// same types).
    pub fn register(
        &mut self,
        types: &[&str],
        fuser: impl Fn(&FuseContext<'_>, &[Module]) -> Result<Module> + Send + Sync + 'static,
    ) -> &mut Self {
        let key: Vec<String> = types.iter().map(|t| t.to_string()).collect();
        let f: FuserFn = Arc::new(fuser);
        match self.entries.iter_mut().find(|(k, _)| *k == key) {
            Some(e) => e.1 = f,
            None => self.entries.push((key, f)),
        }
        self
    }

    /// Builder form of [`FuserRegistry::register`].
    pub fn with(
        mut self,
        types: &[&str],
        fuser: impl Fn(&FuseContext<'_>, &[Module]) -> Result<Module> + Send + Sync + 'static,
    ) -> Self {
        self.register(types, fuser);
        self
    }

    /// The fuser registered for `types`.
    pub fn get<S: AsRef<str>>(&self, types: &[S]) -> Option<&FuserFn> {
        self.entries
            .iter()
            .find(|(k, _)| {
                k.len() == types.len() && k.iter().zip(types).all(|(a, b)| a == b.as_ref())
            })
            .map(|(_, f)| f)
    }

    /// The registered patterns, in registration order.
    pub fn patterns(&self) -> Vec<Vec<String>> {
        self.entries.iter().map(|(k, _)| k.clone()).collect()
    }

    /// Whether nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The longest registered pattern (0 when empty).
    pub(crate) fn max_len(&self) -> usize {
        self.entries.iter().map(|(k, _)| k.len()).max().unwrap_or(0)
    }
}

impl fmt::Debug for FuserRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FuserRegistry")
            .field("patterns", &self.patterns())
            .finish()
    }
}
