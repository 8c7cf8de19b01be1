//! A handler developer's first minutes: `weir new` in each language makes a
//! project outside the repository that builds, passes its own tests and
//! runs under `weir try` on its sample events, as its README says.
//!
//! The Python and JavaScript toolchains are the pinned ones `./dev plugins`
//! installs (`WEIR_COMPONENTIZE_PY`, `WEIR_NODE_BIN`, set by `./dev test`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use weir_e2e::weir_bin;

/// Runs a command in `dir`; its output on failure.
fn run(dir: &Path, cmd: &mut Command) -> Result<String> {
    let out = cmd
        .current_dir(dir)
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("{cmd:?} failed ({}):\n{text}", out.status);
    }
    Ok(text)
}

/// `weir new NAME --lang LANG` in a fresh folder outside the repository.
fn new_project(name: &str, lang: &str) -> Result<(tempfile::TempDir, PathBuf)> {
    let tmp = tempfile::tempdir()?;
    run(
        tmp.path(),
        Command::new(weir_bin()).args(["new", name, "--lang", lang]),
    )?;
    let dir = tmp.path().join(name);
    Ok((tmp, dir))
}

/// `weir try` on the project's sample events with its own config.
fn try_samples(dir: &Path, wasm: &str) -> Result<String> {
    run(
        dir,
        Command::new(weir_bin()).args([
            "try",
            wasm,
            "--events",
            "events.jsonl",
            "--config",
            "weir.toml",
        ]),
    )
}

/// Where nested cargo builds keep their artefacts: not the target folder of
/// the running test (cargo holds its lock), but one beside it, kept between
/// runs.
fn nested_target() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    // <target>/<profile>/deps/<test> → <target>/weir-new-projects
    exe.ancestors()
        .nth(3)
        .expect("target layout")
        .join("weir-new-projects")
}

#[test]
fn a_new_rust_project_tests_builds_and_runs() -> Result<()> {
    let (_tmp, dir) = new_project("greeter", "rust")?;
    let cargo = || {
        let mut c = Command::new("cargo");
        c.env("CARGO_TARGET_DIR", nested_target())
            .env_remove("RUSTFLAGS");
        c
    };
    // The versions this repository is built and tested with.
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock"),
        dir.join("Cargo.lock"),
    )?;
    let tested = run(&dir, cargo().args(["test", "--quiet"]))?;
    assert!(tested.contains("2 passed"), "{tested}");
    run(
        &dir,
        cargo().args(["build", "--release", "--target", "wasm32-wasip2"]),
    )?;
    // Built into the shared target folder, not the project's `target/` that
    // weir.toml names: `weir try` takes the handler's settings all the same.
    let wasm = nested_target().join("wasm32-wasip2/release/greeter.wasm");
    let out = try_samples(&dir, &wasm.display().to_string())?;
    println!("{out}");
    assert!(out.contains("2 events: 2 ok, 0 failed"), "{out}");
    assert!(out.contains("→ greetings.answered"), "{out}");
    assert!(out.contains("Hello, Ada!"), "{out}");
    Ok(())
}

#[test]
fn a_new_python_project_builds_and_runs() -> Result<()> {
    let componentize = std::env::var("WEIR_COMPONENTIZE_PY")
        .context("WEIR_COMPONENTIZE_PY is not set: run the tests with ./dev test")?;
    let (_tmp, dir) = new_project("py-greeter", "python")?;
    // Its native test: plain Python, no build.
    let tested = run(&dir, Command::new("python3").args(["-m", "unittest"]))?;
    assert!(tested.contains("Ran 3 tests"), "{tested}");
    assert!(tested.contains("OK"), "{tested}");
    // The build line of the project's README.
    run(
        &dir,
        Command::new(&componentize).args([
            "-d",
            "wit",
            "-w",
            "handler",
            "componentize",
            "app",
            "-o",
            "py_greeter.wasm",
        ]),
    )?;
    let out = try_samples(&dir, "py_greeter.wasm")?;
    println!("{out}");
    assert!(out.contains("2 events: 2 ok, 0 failed"), "{out}");
    assert!(out.contains("→ greetings.answered"), "{out}");
    Ok(())
}

#[test]
fn a_new_javascript_project_builds_and_runs() -> Result<()> {
    let bin = std::env::var("WEIR_NODE_BIN")
        .context("WEIR_NODE_BIN is not set: run the tests with ./dev test")?;
    let (_tmp, dir) = new_project("js-greeter", "js")?;
    let path = format!("{bin}:{}", std::env::var("PATH").unwrap_or_default());
    // Its native test: node's test runner, no build.
    let tested = run(&dir, Command::new("npm").arg("test").env("PATH", &path))?;
    assert!(tested.contains("# pass 3"), "{tested}");
    assert!(tested.contains("# fail 0"), "{tested}");
    // `npm run build` with the pinned componentize-js already installed.
    run(
        &dir,
        Command::new("npm").args(["run", "build"]).env("PATH", path),
    )?;
    let out = try_samples(&dir, "js_greeter.wasm")?;
    println!("{out}");
    assert!(out.contains("2 events: 2 ok, 0 failed"), "{out}");
    assert!(out.contains("→ greetings.answered"), "{out}");
    Ok(())
}
