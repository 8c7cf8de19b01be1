//! Why an event could not be handled. Each class has a stable name used in
//! dead-letter headers and logs (and metrics labels).

/// The failure classes of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The handler returned `fatal`.
    Fatal,
    /// The handler returned `retriable` on every one of `max_attempts`.
    RetriesExhausted,
    /// The record's envelope could not be decoded.
    Undecodable,
    /// The handler returned an output the runtime cannot publish.
    InvalidOutput,
    /// The handler trapped (a panic, an unreachable, a bad memory access).
    Trap,
    /// The call used up its fuel (CPU) budget.
    FuelExhausted,
    /// The instance tried to grow past its memory cap.
    MemoryLimit,
    /// The call ran past its wall-clock deadline.
    DeadlineExceeded,
    /// The broker refused an output (or retry record) for good: too large,
    /// no such topic, not allowed to write it.
    ProduceFailed,
    /// The call's state writes went past the handler's value or total size
    /// limit (`state.max_value_bytes`, `state.max_total_bytes`).
    StateLimit,
    /// The handler used its state where there is none: no idempotency
    /// store, or an event of a retry topic (state needs partition order).
    StateUnavailable,
}

impl FailureKind {
    /// The stable name.
    pub const fn name(self) -> &'static str {
        match self {
            FailureKind::Fatal => "fatal",
            FailureKind::RetriesExhausted => "retries-exhausted",
            FailureKind::Undecodable => "undecodable",
            FailureKind::InvalidOutput => "invalid-output",
            FailureKind::Trap => "trap",
            FailureKind::FuelExhausted => "fuel-exhausted",
            FailureKind::MemoryLimit => "memory-limit",
            FailureKind::DeadlineExceeded => "deadline-exceeded",
            FailureKind::ProduceFailed => "produce-failed",
            FailureKind::StateLimit => "state-limit",
            FailureKind::StateUnavailable => "state-unavailable",
        }
    }

    /// Every class, for documentation and metrics.
    pub const ALL: [FailureKind; 11] = [
        FailureKind::Fatal,
        FailureKind::RetriesExhausted,
        FailureKind::Undecodable,
        FailureKind::InvalidOutput,
        FailureKind::Trap,
        FailureKind::FuelExhausted,
        FailureKind::MemoryLimit,
        FailureKind::DeadlineExceeded,
        FailureKind::ProduceFailed,
        FailureKind::StateLimit,
        FailureKind::StateUnavailable,
    ];
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_kebab_case() {
        let mut names: Vec<_> = FailureKind::ALL.iter().map(|k| k.name()).collect();
        assert!(names
            .iter()
            .all(|n| n.chars().all(|c| c.is_ascii_lowercase() || c == '-')));
        names.sort();
        names.dedup();
        assert_eq!(names.len(), FailureKind::ALL.len());
    }
}
