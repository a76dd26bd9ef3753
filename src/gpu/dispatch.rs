//! Workgroup grids for 1-D work, tiled over x and y past the per-dimension limit.

use crate::error::{Error, Result};
use crate::gpu::GpuContext;

/// The largest number of work items a 1-D grid may cover: flat indices are `u32` in the
/// shaders, and this bound keeps `gid.x + gid.y * (num_workgroups.x * WG)` from wrapping.
pub const MAX_ITEMS_1D: u64 = 1 << 31;

/// Workgroup counts `[x, y, z]` covering `items` work items with `workgroup_size` threads per
/// workgroup, where no dimension may exceed `max_per_dimension`
/// (`max_compute_workgroups_per_dimension`, 65,535 on WebGPU).
///
/// Up to `max_per_dimension` workgroups the grid is `[groups, 1, 1]`; beyond, it is a
/// near-square `[x, y, 1]` with `x * y >= groups` (wasting fewer than `x` workgroups).
/// Shaders recover the flat index as `gid.x + gid.y * (num_workgroups.x * WG)` and must
/// bounds-check it. `items == 0` gives `[0, 0, 0]` (nothing to dispatch).
pub fn grid_1d(items: u64, workgroup_size: u32, max_per_dimension: u32) -> Result<[u32; 3]> {
    if workgroup_size == 0 || max_per_dimension == 0 {
        return Err(Error::invalid(format!(
            "grid_1d: workgroup size ({workgroup_size}) and max workgroups per dimension \
             ({max_per_dimension}) must be positive"
        )));
    }
    if items == 0 {
        return Ok([0, 0, 0]);
    }
    if items > MAX_ITEMS_1D {
        return Err(Error::invalid(format!(
            "grid_1d: {items} work items exceed the 1-D dispatch maximum of {MAX_ITEMS_1D}"
        )));
    }
    let groups = items.div_ceil(u64::from(workgroup_size));
    let max = u64::from(max_per_dimension);
    if groups <= max {
        return Ok([groups as u32, 1, 1]);
    }
    let mut x = groups.isqrt();
    if x * x < groups {
        x += 1;
    }
    let x = x.min(max);
    let y = groups.div_ceil(x);
    if y > max {
        return Err(Error::invalid(format!(
            "grid_1d: {items} work items need {groups} workgroups of {workgroup_size}, more \
             than {max} x {max}"
        )));
    }
    Ok([x as u32, y as u32, 1])
}

impl GpuContext {
    /// [`grid_1d`] with this device's `max_compute_workgroups_per_dimension`.
    pub fn grid_1d(&self, items: usize, workgroup_size: u32) -> Result<[u32; 3]> {
        grid_1d(
            items as u64,
            workgroup_size,
            self.limits().max_compute_workgroups_per_dimension,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_grids_are_one_row() {
        assert_eq!(grid_1d(0, 256, 65535).unwrap(), [0, 0, 0]);
        assert_eq!(grid_1d(1, 256, 65535).unwrap(), [1, 1, 1]);
        assert_eq!(grid_1d(256, 256, 65535).unwrap(), [1, 1, 1]);
        assert_eq!(grid_1d(257, 256, 65535).unwrap(), [2, 1, 1]);
        assert_eq!(grid_1d(65535 * 256, 256, 65535).unwrap(), [65535, 1, 1]);
    }

    #[test]
    fn large_grids_tile_over_y() {
        for items in [65535 * 256 + 1, 17_000_000, 1 << 31, 123_456_789] {
            let [x, y, z] = grid_1d(items, 256, 65535).unwrap();
            assert_eq!(z, 1);
            assert!(x <= 65535 && y <= 65535 && y > 1);
            let groups = items.div_ceil(256);
            assert!(u64::from(x) * u64::from(y) >= groups);
            assert!(u64::from(x) * u64::from(y) - groups < u64::from(x));
        }
        assert!(grid_1d((1 << 31) + 1, 256, 65535).is_err());
        assert!(grid_1d(100, 1, 5).is_err());
        assert!(grid_1d(100, 0, 5).is_err());
    }
}
