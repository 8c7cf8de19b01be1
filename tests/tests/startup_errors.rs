//! Bad configs and bad plugins fail at start-up with a message naming the
//! key or the file. No broker is contacted.

use weir_e2e::*;

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn unknown_config_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let text = config_toml(
        "g",
        &[HandlerSpec::new("echo", "echo", "t").extra("max_atempts = 5")],
    );
    let path = write(&dir, "weir.toml", &text);
    let (ok, stderr) = run_weir(&["run", "--config", &path]);
    assert!(!ok);
    assert!(stderr.contains("max_atempts"), "stderr: {stderr}");
    assert!(stderr.contains("weir.toml"), "stderr: {stderr}");
}

#[test]
fn a_core_module_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("module.wasm");
    // The smallest core module: magic and version 1.
    std::fs::write(&module, b"\0asm\x01\0\0\0").unwrap();
    let text = config_toml("g", &[HandlerSpec::new("echo", "echo", "t")]).replace(
        &plugin("echo").display().to_string(),
        &module.display().to_string(),
    );
    let path = write(&dir, "weir.toml", &text);
    let (ok, stderr) = run_weir(&["run", "--config", &path]);
    assert!(!ok);
    assert!(stderr.contains("module.wasm"), "stderr: {stderr}");
    assert!(stderr.contains("not a component"), "stderr: {stderr}");
}

#[test]
fn a_file_that_is_not_wasm_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"#!/bin/sh\necho hi\n").unwrap();
    let text = config_toml("g", &[HandlerSpec::new("echo", "echo", "t")]).replace(
        &plugin("echo").display().to_string(),
        &junk.display().to_string(),
    );
    let path = write(&dir, "weir.toml", &text);
    let (ok, stderr) = run_weir(&["check", "--config", &path]);
    assert!(!ok);
    assert!(
        stderr.contains("junk.wasm") && stderr.contains("not a WebAssembly file"),
        "stderr: {stderr}"
    );
}

#[test]
fn a_missing_plugin_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let text = config_toml("g", &[HandlerSpec::new("echo", "echo", "t")]).replace(
        &plugin("echo").display().to_string(),
        "/nonexistent/handler.wasm",
    );
    let path = write(&dir, "weir.toml", &text);
    let (ok, stderr) = run_weir(&["run", "--config", &path]);
    assert!(!ok);
    assert!(
        stderr.contains("/nonexistent/handler.wasm"),
        "stderr: {stderr}"
    );
}

#[test]
fn a_metrics_port_in_use_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let text = config_toml("g", &[HandlerSpec::new("echo", "echo", "t")])
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = {addr:?}"));
    let path = write(&dir, "weir.toml", &text);
    let (ok, stderr) = run_weir(&["run", "--config", &path]);
    assert!(!ok);
    assert!(
        stderr.contains("metrics.listen") && stderr.contains(&addr),
        "stderr: {stderr}"
    );
}

#[test]
fn a_bad_sample_ratio_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{}\n[tracing]\nsample_ratio = 2.0\n",
        config_toml("g", &[HandlerSpec::new("echo", "echo", "t")])
    );
    let path = write(&dir, "weir.toml", &text);
    let (ok, stderr) = run_weir(&["check", "--config", &path]);
    assert!(!ok);
    assert!(stderr.contains("tracing.sample_ratio"), "stderr: {stderr}");
}
