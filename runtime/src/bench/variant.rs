//! The variants a round of `weir bench` runs: the two librdkafka baselines
//! and `weir run` with the echo handler under different settings.

/// What one run of the benchmark consumes the topic with.
#[derive(Clone, Copy, PartialEq, Debug)]
pub(super) enum Variant {
    ConsumeOnly,
    Passthrough,
    /// `weir run` with the echo handler, from a config file.
    Weir {
        outputs: bool,
        dedup: bool,
        metrics: bool,
        spans: Option<f64>,
    },
}

/// `weir run`'s defaults: idempotency and metrics on, no span exporter.
pub(super) const ECHO: Variant = Variant::Weir {
    outputs: true,
    dedup: true,
    metrics: true,
    spans: None,
};

impl Variant {
    pub(super) fn all() -> Vec<Variant> {
        let weir = |outputs, dedup, metrics, spans| Variant::Weir {
            outputs,
            dedup,
            metrics,
            spans,
        };
        vec![
            Variant::ConsumeOnly,
            Variant::Passthrough,
            weir(false, true, true, None),
            weir(false, false, true, None),
            ECHO,
            weir(true, false, true, None),
            weir(true, true, false, None),
            weir(true, true, true, Some(0.1)),
            weir(true, true, true, Some(1.0)),
        ]
    }

    pub(super) fn name(&self) -> String {
        match *self {
            Variant::ConsumeOnly => "librdkafka consume only".into(),
            Variant::Passthrough => {
                "librdkafka passthrough (bytes unchanged, acks=all, idempotent, commits)".into()
            }
            Variant::Weir {
                outputs,
                dedup,
                metrics,
                spans,
            } => {
                let mut name = if outputs {
                    "weir, echo (one output per event)".to_string()
                } else {
                    "weir, trivial handler (no outputs)".to_string()
                };
                if !dedup {
                    name += ", idempotency off";
                }
                if !metrics {
                    name += ", metrics off";
                }
                if let Some(ratio) = spans {
                    name += &format!(", spans sampled at {ratio}");
                }
                name
            }
        }
    }

    /// The baseline a Weir run is a share of.
    pub(super) fn baseline(&self) -> Option<Variant> {
        match self {
            Variant::Weir { outputs: true, .. } => Some(Variant::Passthrough),
            Variant::Weir { outputs: false, .. } => Some(Variant::ConsumeOnly),
            _ => None,
        }
    }
}
