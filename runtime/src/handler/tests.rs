use super::*;

/// A component whose one core module defines two linear memories.
const TWO_MEMORIES: &[u8] = &[
    0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00, // component header
    0x01, 0x0f, // core module section, 15 bytes:
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // module header
    0x05, 0x05, 0x02, 0x00, 0x01, 0x00, 0x01, // memory section: 2 memories, min 1 page
    0x02, 0x04, 0x01, 0x00, 0x00, 0x00, // core instance section: instantiate module 0
];

/// The echo handler as built against `weir:plugin@0.1.0` (before the
/// `state` interface): it still loads and runs.
#[test]
fn a_component_built_against_0_1_0_loads_and_runs() {
    let root = std::env::var("CARGO_MANIFEST_DIR").expect("run by cargo");
    let wasm = std::path::Path::new(&root).join("fixtures/echo-wit-0.1.0.wasm");
    let cfg: HandlerConfig = toml::from_str(&format!(
        "name = \"old\"\nwasm = {:?}\ntopics = [\"t\"]\n",
        wasm.display().to_string()
    ))
    .unwrap();
    let engine = PluginEngine::new().unwrap();
    let h = LoadedHandler::load(&engine, &cfg).unwrap();
    assert!(!h.stateful, "a 0.1.0 component has no state import");
    let record = Record {
        topic: "t".into(),
        partition: 0,
        offset: 0,
        timestamp_ms: 0,
        key: Some(b"k".to_vec()),
        value: b"hello".to_vec(),
        headers: Vec::new(),
    };
    let event = envelope::decode(&record).unwrap();
    let mut inst = h.instantiate().unwrap();
    let state = CallState::new(None, "is not available here");
    match inst.call(&event, &record, 1, "", state) {
        CallOutcome::Ok(outputs, writes) => {
            assert_eq!(outputs[0].payload, b"hello");
            assert_eq!(outputs[0].topic, "t.out");
            assert!(writes.is_empty());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_component_with_more_memories_than_allowed_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("two.wasm");
    std::fs::write(&path, TWO_MEMORIES).unwrap();
    let mut cfg: HandlerConfig = toml::from_str(&format!(
        "name = \"x\"\nwasm = {:?}\ntopics = [\"t\"]\n",
        path.display().to_string()
    ))
    .unwrap();
    let engine = PluginEngine::new().unwrap();
    let err = |cfg: &HandlerConfig| match LoadedHandler::load(&engine, cfg) {
        Ok(_) => panic!("loaded"),
        Err(e) => format!("{e:#}"),
    };
    let e = err(&cfg);
    assert!(
        e.starts_with("handler \"x\": the component needs more than 1 linear memory (2 in ")
            && e.ends_with("raise max_memories (at most 16)"),
        "{e}"
    );
    // Allowed two, it gets as far as the missing handler world.
    cfg.max_memories = 2;
    let e = err(&cfg);
    assert!(
        e.contains("does not implement the weir:plugin/handler world"),
        "{e}"
    );
}
