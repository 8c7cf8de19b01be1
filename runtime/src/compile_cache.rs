//! Precompiled components on disk, so that a restart or a re-deploy of a
//! version already seen skips compilation.
//!
//! An entry is named by the component's SHA-256 and the engine's
//! compatibility hash (wasmtime version and every setting that changes
//! the machine code), and holds a checksum of what follows it. An entry
//! that is unreadable, fails its checksum or is refused by the engine is
//! compiled again and rewritten; entries are written to a temporary file
//! and renamed into place, so a reader never sees half of one.

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use tracing::{debug, warn};
use wasmtime::component::Component;
use wasmtime::Engine;

const MAGIC: &[u8; 8] = b"WEIRCC1\n";

/// Where precompiled components are kept.
#[derive(Debug, Clone)]
pub struct CompileCache {
    dir: PathBuf,
}

/// How a component was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compiled {
    /// Read from the cache.
    Cached,
    /// Compiled now (and written to the cache, when there is one).
    Fresh,
}

impl CompileCache {
    /// A cache in `dir` (created when missing).
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "plugins.cache_dir: cannot create the compile cache {}",
                dir.display()
            )
        })?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// The entry of a component of digest `sha256_hex` for `engine`.
    pub fn entry(&self, engine: &Engine, sha256_hex: &str) -> PathBuf {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        self.dir
            .join(format!("{sha256_hex}-{:016x}.cwasm", h.finish()))
    }

    /// The component of `bytes` (digest `sha256_hex`): from the cache when
    /// a sound entry is there, else compiled and stored.
    pub fn component(
        &self,
        engine: &Engine,
        bytes: &[u8],
        sha256_hex: &str,
    ) -> Result<(Component, Compiled)> {
        let path = self.entry(engine, sha256_hex);
        match read_entry(&path) {
            Ok(Some(code)) => {
                // SAFETY: the bytes are what `precompile_component` wrote
                // for this engine's compatibility hash (the file name), and
                // their checksum matches: not a file altered since.
                match unsafe { Component::deserialize(engine, &code) } {
                    Ok(c) => return Ok((c, Compiled::Cached)),
                    Err(e) => warn!(entry = %path.display(), error = %e,
                        "compile cache entry refused by the engine; compiling again"),
                }
            }
            Ok(None) => debug!(entry = %path.display(), "not in the compile cache"),
            Err(e) => warn!(entry = %path.display(), error = %format!("{e:#}"),
                "compile cache entry is damaged; compiling again"),
        }
        let code = engine
            .precompile_component(bytes)
            .map_err(anyhow::Error::from)?;
        if let Err(e) = write_entry(&path, &code) {
            warn!(entry = %path.display(), error = %format!("{e:#}"),
                "cannot write the compile cache; going on without it");
        }
        // SAFETY: produced just now by this engine.
        let component = unsafe { Component::deserialize(engine, &code) }?;
        Ok((component, Compiled::Fresh))
    }
}

/// The code in an entry; None when there is no entry, an error when it is
/// there but damaged.
fn read_entry(path: &Path) -> Result<Option<Vec<u8>>> {
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).context("cannot read it"),
    };
    let header = MAGIC.len() + 32;
    anyhow::ensure!(
        data.len() > header && &data[..MAGIC.len()] == MAGIC,
        "not a compile cache entry"
    );
    let (sum, code) = data[MAGIC.len()..].split_at(32);
    anyhow::ensure!(Sha256::digest(code)[..] == *sum, "checksum mismatch");
    Ok(Some(code.to_vec()))
}

fn write_entry(path: &Path, code: &[u8]) -> Result<()> {
    let dir = path.parent().context("an entry has a folder")?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(MAGIC)?;
    tmp.write_all(&Sha256::digest(code))?;
    tmp.write_all(code)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_damaged_entry_is_compiled_again_and_rewritten() {
        let engine = Engine::default();
        let dir = tempfile::tempdir().unwrap();
        let cache = CompileCache::open(dir.path()).unwrap();
        // The empty component.
        let bytes = [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];
        let digest = "00ff";
        let (_, how) = cache.component(&engine, &bytes, digest).unwrap();
        assert_eq!(how, Compiled::Fresh);
        let (_, how) = cache.component(&engine, &bytes, digest).unwrap();
        assert_eq!(how, Compiled::Cached);
        // Flip one byte of the code: the checksum catches it.
        let entry = cache.entry(&engine, digest);
        let mut data = std::fs::read(&entry).unwrap();
        let last = data.len() - 1;
        data[last] ^= 0xff;
        std::fs::write(&entry, &data).unwrap();
        let (_, how) = cache.component(&engine, &bytes, digest).unwrap();
        assert_eq!(how, Compiled::Fresh);
        let (_, how) = cache.component(&engine, &bytes, digest).unwrap();
        assert_eq!(how, Compiled::Cached);
        // A truncated entry too.
        std::fs::write(&entry, b"WEIRCC1\n").unwrap();
        let (_, how) = cache.component(&engine, &bytes, digest).unwrap();
        assert_eq!(how, Compiled::Fresh);
    }
}
