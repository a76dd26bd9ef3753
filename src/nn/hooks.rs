//! Forward hooks: closures run before (pre-hooks) and after (post-hooks) a module's forward,
//! as `torch.nn.Module.register_forward_pre_hook` / `register_forward_hook`.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ndarray::ArrayD;

use super::Module;

/// A forward pre-hook: called with the module's dotted path (relative to the module whose
/// `forward` was called; `""` for that module itself) and its input. Returning `Some(x)`
/// replaces the input (for the next pre-hook and the forward), as a non-`None` return does in
/// PyTorch.
pub type ForwardPreHook = Arc<dyn Fn(&str, &ArrayD<f32>) -> Option<ArrayD<f32>> + Send + Sync>;

/// A forward (post-)hook: called with the module's dotted path, its input (after the
/// pre-hooks) and its output. Returning `Some(y)` replaces the output (for the next hook and
/// the caller), as in PyTorch.
pub type ForwardHook =
    Arc<dyn Fn(&str, &ArrayD<f32>, &ArrayD<f32>) -> Option<ArrayD<f32>> + Send + Sync>;

/// Which list a hook lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HookKind {
    /// A forward pre-hook.
    Pre,
    /// A forward (post-)hook.
    Post,
}

/// Identifies one registered hook; [`HookHandle::remove`] removes it.
///
/// A hook keeps its handle for life: when fusion moves a hook to the fused module
/// (pre-hooks of the first module, post-hooks of the last), or a model is cloned (as
/// `fuse_modules` without `inplace` does), the same handle finds it there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HookHandle {
    id: u64,
    kind: HookKind,
}

static NEXT_HOOK_ID: AtomicU64 = AtomicU64::new(1);

impl HookHandle {
    pub(crate) fn fresh(kind: HookKind) -> Self {
        Self {
            id: NEXT_HOOK_ID.fetch_add(1, Ordering::Relaxed),
            kind,
        }
    }

    /// The hook's process-unique id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether this is a pre-hook or a post-hook.
    pub fn kind(&self) -> HookKind {
        self.kind
    }

    /// Removes the hook from whichever module of the tree under `root` holds it; returns
    /// whether it was found (PyTorch's `RemovableHandle.remove()`, which takes no argument
    /// because Python modules are shared references).
    pub fn remove(&self, root: &mut Module) -> bool {
        root.remove_hook(*self)
    }
}

/// The hooks of one module, in registration order.
#[derive(Clone, Default)]
pub(crate) struct Hooks {
    pub(crate) pre: Vec<(HookHandle, ForwardPreHook)>,
    pub(crate) post: Vec<(HookHandle, ForwardHook)>,
}

impl Hooks {
    /// Removes `h` from this module's lists; whether it was there.
    pub(crate) fn remove(&mut self, h: HookHandle) -> bool {
        match h.kind {
            HookKind::Pre => {
                let before = self.pre.len();
                self.pre.retain(|(k, _)| *k != h);
                self.pre.len() != before
            }
            HookKind::Post => {
                let before = self.post.len();
                self.post.retain(|(k, _)| *k != h);
                self.post.len() != before
            }
        }
    }

    /// Runs the pre-hooks on `x`; `None` when none replaced it.
    pub(crate) fn run_pre(&self, path: &str, x: &ArrayD<f32>) -> Option<ArrayD<f32>> {
        let mut cur: Option<ArrayD<f32>> = None;
        for (_, h) in &self.pre {
            let input = cur.as_ref().unwrap_or(x);
            if let Some(nx) = h(path, input) {
                cur = Some(nx);
            }
        }
        cur
    }

    /// Runs the post-hooks on `(x, y)`, returning the (possibly replaced) output.
    pub(crate) fn run_post(&self, path: &str, x: &ArrayD<f32>, y: ArrayD<f32>) -> ArrayD<f32> {
        let mut y = y;
        for (_, h) in &self.post {
            if let Some(ny) = h(path, x, &y) {
                y = ny;
            }
        }
        y
    }
}

impl fmt::Debug for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hooks")
            .field(
                "pre",
                &self.pre.iter().map(|(h, _)| h.id).collect::<Vec<_>>(),
            )
            .field(
                "post",
                &self.post.iter().map(|(h, _)| h.id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuBackend;
    use ndarray::IxDyn;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn modules_are_send_and_sync() {
        assert_send_sync::<Module>();
    }

    /// Pre-hooks chain in registration order (each sees the previous one's replacement);
    /// post-hooks likewise, and see the input after the pre-hooks.
    #[test]
    fn hooks_chain_in_order() {
        let mut m = Module::identity();
        m.register_forward_pre_hook(|_, x| Some(x + 1.0));
        m.register_forward_pre_hook(|_, _| None);
        m.register_forward_pre_hook(|_, x| Some(x * 10.0));
        m.register_forward_hook(|_, x, y| {
            assert_eq!(x, y);
            Some(y - 3.0)
        });
        let h = m.register_forward_hook(|_, _, y| Some(y * 2.0));
        let x = ArrayD::from_elem(IxDyn(&[1]), 1.0f32);
        // ((1 + 1) * 10 - 3) * 2
        assert_eq!(m.forward(&CpuBackend, &x).unwrap()[[0]], 34.0);
        assert_eq!(m.forward_pre_hooks().len(), 3);
        assert!(h.remove(&mut m));
        assert_eq!(m.forward(&CpuBackend, &x).unwrap()[[0]], 17.0);
        assert_eq!(h.kind(), HookKind::Post);
        assert!(m.forward_pre_hooks()[0].id() < m.forward_hooks()[0].id());
        m.clear_hooks();
        assert_eq!(m.forward(&CpuBackend, &x).unwrap()[[0]], 1.0);
    }
}
