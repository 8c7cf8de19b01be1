//! `weir new NAME [--lang rust|python|js]`: writes a standalone handler
//! project (the handler, a native test in the language's own test runner,
//! sample events, a `weir.toml` that runs it, a short README) that builds,
//! tests and runs as it is.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The handler languages `weir new` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    Rust,
    Python,
    Js,
}

/// Options of `weir new`.
#[derive(Debug, clap::Args)]
pub struct NewArgs {
    /// The project's name (a folder of that name is created): lowercase
    /// letters, digits and dashes.
    pub name: String,
    /// The handler's language.
    #[arg(long, value_enum, default_value = "rust")]
    pub lang: Lang,
    /// Where to create the project folder.
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
    /// The `weir-sdk` crate folder a Rust project depends on (default: the
    /// `sdk/` folder of the Weir checkout this binary was built from).
    #[arg(long)]
    pub sdk: Option<PathBuf>,
}

/// The pinned toolchain versions the generated projects use (the ones the
/// example plugins are built and tested with).
pub const COMPONENTIZE_PY: &str = "0.25.1";
pub const COMPONENTIZE_JS: &str = "0.23.0";

const WIT: &str = include_str!("../../wit/plugin.wit");

/// Writes the project; returns its folder.
pub fn run(args: &NewArgs) -> Result<PathBuf> {
    let name = &args.name;
    let legal = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    if name.is_empty()
        || !name.chars().all(legal)
        || name.starts_with(|c: char| !c.is_ascii_lowercase())
    {
        bail!("name {name:?}: use lowercase letters, digits and dashes, starting with a letter");
    }
    // Cargo refuses packages named like these.
    const RESERVED: &[&str] = &[
        "as", "async", "await", "break", "const", "continue", "crate", "dyn", "else", "enum",
        "extern", "false", "fn", "for", "if", "impl", "in", "let", "loop", "match", "mod", "move",
        "mut", "pub", "ref", "return", "self", "static", "struct", "super", "trait", "true",
        "type", "unsafe", "use", "where", "while", "test", "core", "std", "alloc",
    ];
    if RESERVED.contains(&name.as_str()) {
        bail!("name {name:?} is reserved in Rust; choose another");
    }
    let dir = args.dir.join(name);
    if dir.exists() {
        bail!("{} already exists", dir.display());
    }
    let crate_name = name.replace('-', "_");
    let wasm = match args.lang {
        Lang::Rust => format!("target/wasm32-wasip2/release/{crate_name}.wasm"),
        Lang::Python | Lang::Js => format!("{crate_name}.wasm"),
    };
    let sdk = match args.lang {
        // A TOML string (escaped as Rust's debug format escapes it).
        Lang::Rust => format!("{:?}", sdk_path(args.sdk.as_deref())?.display().to_string()),
        _ => String::new(),
    };
    let fill = |template: &str| {
        template
            .replace("{{name}}", name)
            .replace("{{wasm}}", &wasm)
            .replace("{{sdk}}", &sdk)
            .replace("{{componentize_py}}", COMPONENTIZE_PY)
            .replace("{{componentize_js}}", COMPONENTIZE_JS)
    };
    let mut files: Vec<(&str, String)> = vec![
        (
            "events.jsonl",
            fill(include_str!("../templates/common/events.jsonl.tmpl")),
        ),
        (
            "weir.toml",
            fill(include_str!("../templates/common/weir.toml.tmpl")),
        ),
    ];
    match args.lang {
        Lang::Rust => files.extend([
            (
                "Cargo.toml",
                fill(include_str!("../templates/rust/Cargo.toml.tmpl")),
            ),
            (
                "src/lib.rs",
                fill(include_str!("../templates/rust/src/lib.rs.tmpl")),
            ),
            (
                "README.md",
                fill(include_str!("../templates/rust/README.md.tmpl")),
            ),
            (
                ".gitignore",
                fill(include_str!("../templates/rust/gitignore.tmpl")),
            ),
        ]),
        Lang::Python => files.extend([
            (
                "app.py",
                include_str!("../../plugins/python-echo/app.py").to_owned(),
            ),
            // `python3 -m unittest`: the handler tested without a build,
            // the generated modules replaced by stand-ins.
            (
                "test_app.py",
                include_str!("../templates/python/test_app.py").to_owned(),
            ),
            (
                "weir_testing.py",
                include_str!("../templates/python/weir_testing.py").to_owned(),
            ),
            ("wit/plugin.wit", WIT.to_owned()),
            (
                "README.md",
                fill(include_str!("../templates/python/README.md.tmpl")),
            ),
            (
                ".gitignore",
                "/.venv\n/*.wasm\n/weir-state\n__pycache__/\n".to_owned(),
            ),
        ]),
        Lang::Js => files.extend([
            (
                "handler.js",
                include_str!("../../plugins/js-echo/handler.js").to_owned(),
            ),
            // `npm test`: node's own test runner, the host import resolved
            // to a stand-in by a module hook.
            (
                "test/handler.test.mjs",
                include_str!("../templates/js/test/handler.test.mjs").to_owned(),
            ),
            (
                "test/register.mjs",
                include_str!("../templates/js/test/register.mjs").to_owned(),
            ),
            (
                "test/host.mjs",
                include_str!("../templates/js/test/host.mjs").to_owned(),
            ),
            ("wit/plugin.wit", WIT.to_owned()),
            (
                "package.json",
                fill(include_str!("../templates/js/package.json.tmpl")),
            ),
            (
                "README.md",
                fill(include_str!("../templates/js/README.md.tmpl")),
            ),
            (
                ".gitignore",
                "/node_modules\n/*.wasm\n/weir-state\n".to_owned(),
            ),
        ]),
    }
    for (path, text) in files {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(dir)
}

/// The SDK folder a Rust project depends on, absolute.
fn sdk_path(given: Option<&Path>) -> Result<PathBuf> {
    let candidate = match given {
        Some(p) => p.to_path_buf(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk"),
    };
    let manifest = candidate.join("Cargo.toml");
    if !manifest.is_file() {
        bail!(
            "no weir-sdk crate at {} (pass --sdk PATH to the sdk/ folder of a Weir checkout)",
            candidate.display()
        );
    }
    std::fs::canonicalize(&candidate)
        .with_context(|| format!("cannot resolve {}", candidate.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rust_project_has_everything_it_needs() {
        let tmp = tempfile::tempdir().unwrap();
        let args = NewArgs {
            name: "greeter".into(),
            lang: Lang::Rust,
            dir: tmp.path().to_path_buf(),
            sdk: None,
        };
        let dir = run(&args).unwrap();
        for f in [
            "Cargo.toml",
            "src/lib.rs",
            "events.jsonl",
            "weir.toml",
            "README.md",
        ] {
            assert!(dir.join(f).is_file(), "{f}");
        }
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        assert!(manifest.contains("name = \"greeter\""));
        assert!(!manifest.contains("{{"), "{manifest}");
        let config = std::fs::read_to_string(dir.join("weir.toml")).unwrap();
        assert!(config.contains("target/wasm32-wasip2/release/greeter.wasm"));
        assert!(run(&args).is_err(), "an existing folder is not overwritten");
    }

    #[test]
    fn python_and_js_projects_have_their_tests() {
        let tmp = tempfile::tempdir().unwrap();
        for (lang, files) in [
            (
                Lang::Python,
                &["app.py", "test_app.py", "weir_testing.py"][..],
            ),
            (
                Lang::Js,
                &[
                    "handler.js",
                    "test/handler.test.mjs",
                    "test/register.mjs",
                    "test/host.mjs",
                ][..],
            ),
        ] {
            let args = NewArgs {
                name: format!("{lang:?}").to_lowercase(),
                lang,
                dir: tmp.path().to_path_buf(),
                sdk: None,
            };
            let dir = run(&args).unwrap();
            for f in files {
                assert!(dir.join(f).is_file(), "{lang:?}: {f}");
            }
        }
        let package = std::fs::read_to_string(tmp.path().join("js/package.json")).unwrap();
        assert!(package.contains("\"test\": \"node --import ./test/register.mjs"));
    }

    #[test]
    fn the_pinned_toolchains_are_the_ones_the_examples_are_built_with() {
        let dev = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../dev"))
            .expect("the repository's dev script");
        assert!(dev.contains(&format!("COMPONENTIZE_PY_VERSION={COMPONENTIZE_PY}")));
        assert!(dev.contains(&format!("COMPONENTIZE_JS_VERSION={COMPONENTIZE_JS}")));
    }

    #[test]
    fn bad_names_are_refused() {
        for name in ["", "Greeter", "1st", "a b", "../x", "type", "test"] {
            let args = NewArgs {
                name: name.into(),
                lang: Lang::Rust,
                dir: ".".into(),
                sdk: None,
            };
            assert!(run(&args).is_err(), "{name:?}");
        }
    }
}
