//! The limits of one instance's store: linear memories and their total size.

use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder};

/// The limits of one instance's store: at most `max_memories` linear
/// memories, and at most `limit` bytes of them all together (counted as they
/// are created and grow; a store's memories never shrink or go away before
/// the store). Remembers when the cap was hit, so the failure is classified
/// as such rather than as a generic trap.
pub(crate) struct MemoryLimiter {
    /// Instance, table and memory counts and table growth.
    inner: StoreLimits,
    limit: usize,
    /// Bytes of all linear memories together. A growth allowed here that
    /// then fails (the OS refused) stays counted: errs on the safe side.
    used: usize,
    pub(super) hit: bool,
}

impl MemoryLimiter {
    pub(crate) fn new(limit: usize, max_memories: usize) -> Self {
        Self {
            inner: StoreLimitsBuilder::new()
                .instances(64)
                .tables(64)
                .memories(max_memories)
                .build(),
            limit,
            used: 0,
            hit: false,
        }
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Past the memory's own declared maximum: `memory.grow` returns -1,
        // as the spec says; nothing is counted.
        if maximum.is_some_and(|m| desired > m) {
            return Ok(false);
        }
        let total = self.used.saturating_add(desired.saturating_sub(current));
        if total > self.limit {
            self.hit = true;
            wasmtime::bail!(
                "memory limit: growing a linear memory from {current} to {desired} bytes \
                 takes the instance's memories to {total} bytes, above the cap of {} bytes",
                self.limit
            );
        }
        self.used = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.inner.table_growing(current, desired, maximum)
    }

    // Without these the store would apply wasmtime's defaults (10,000 each),
    // not the limits in `inner`.
    fn instances(&self) -> usize {
        self.inner.instances()
    }

    fn tables(&self) -> usize {
        self.inner.tables()
    }

    fn memories(&self) -> usize {
        self.inner.memories()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn the_memory_cap_is_on_all_memories_together() {
        let mut l = MemoryLimiter::new(10 * MIB, 2);
        assert_eq!(l.memories(), 2);
        // Two memories created at 4 MiB each: 8 MiB in all.
        assert!(l.memory_growing(0, 4 * MIB, None).unwrap());
        assert!(l.memory_growing(0, 4 * MIB, None).unwrap());
        // One grows by 2 MiB: 10 MiB, exactly the cap.
        assert!(l.memory_growing(4 * MIB, 6 * MIB, None).unwrap());
        assert!(!l.hit);
        // Any more, in either memory, is refused (a trap) and remembered,
        // although each alone is far below the cap.
        let err = l
            .memory_growing(4 * MIB, 4 * MIB + 65536, None)
            .unwrap_err();
        assert!(err.to_string().contains("memory limit"), "{err}");
        assert!(l.hit);
        assert_eq!(l.used, 10 * MIB);
    }

    #[test]
    fn a_memorys_own_maximum_fails_the_growth_without_counting_it() {
        let mut l = MemoryLimiter::new(10 * MIB, 1);
        assert!(l.memory_growing(0, MIB, Some(2 * MIB)).unwrap());
        assert!(!l.memory_growing(MIB, 3 * MIB, Some(2 * MIB)).unwrap());
        assert!(!l.hit);
        assert_eq!(l.used, MIB);
    }
}
