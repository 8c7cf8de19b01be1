use super::*;

#[test]
fn handler_metrics_render_with_bounded_labels() {
    let m = Arc::new(Metrics::new());
    let h = m.handler("enrich", "1.2.0");
    h.handled(Duration::from_micros(30));
    h.failed(FailureKind::Fatal, Some(Duration::from_micros(10)));
    h.duplicate();
    h.output_counter().unwrap().inc();
    let text = m.render();
    for line in [
        "weir_events_handled_total{handler=\"enrich\"} 1",
        "weir_events_failed_total{class=\"fatal\",handler=\"enrich\"} 1",
        "weir_duplicates_skipped_total{handler=\"enrich\"} 1",
        "weir_outputs_published_total{handler=\"enrich\"} 1",
        "weir_handler_info{handler=\"enrich\",version=\"1.2.0\"} 1",
        "weir_handling_duration_seconds_count{handler=\"enrich\",outcome=\"ok\"} 1",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
}

#[test]
fn unrouted_dead_letters_have_their_own_label_and_no_other_series() {
    let m = Metrics::new();
    m.unrouted().inc();
    let text = m.render();
    assert!(
        text.contains("weir_events_failed_total{class=\"undecodable\",handler=\"(unrouted)\"} 1")
    );
    assert!(text.contains("weir_events_dead_lettered_total{handler=\"(unrouted)\"} 1"));
    assert!(!text.contains("weir_events_handled_total{handler=\"(unrouted)\"}"));
}

#[test]
fn the_dashboard_queries_only_metrics_that_exist() {
    let m = Arc::new(Metrics::new());
    let h = m.handler("h", "v");
    h.handled(Duration::from_micros(1));
    h.failed(FailureKind::Trap, None);
    m.consumer_lag.with_label_values(&["t", "0"]).set(0);
    let text = m.render();
    let dashboard = include_str!("../../../docs/grafana/weir.json");
    let mut names: Vec<&str> = dashboard
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("weir_"))
        .collect();
    names.sort_unstable();
    names.dedup();
    assert!(names.len() >= 10, "{names:?}");
    for name in names {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} "))),
            "the dashboard uses {name}, which Weir does not export"
        );
    }
}

#[test]
fn readiness_needs_handlers_and_a_group() {
    let h = Health::default();
    assert_eq!(h.not_ready(), Some("loading handlers".to_string()));
    h.handlers_loaded.store(true, Ordering::Relaxed);
    assert_eq!(
        h.not_ready(),
        Some("joining the consumer group".to_string())
    );
    h.joined.store(true, Ordering::Relaxed);
    assert_eq!(h.not_ready(), None);
    h.stopping.store(true, Ordering::Relaxed);
    assert_eq!(h.not_ready(), Some("shutting down".to_string()));
}
