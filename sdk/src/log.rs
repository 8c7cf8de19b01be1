//! Log lines through the runtime (`weir_sdk::log`).

/// Log levels, from the most verbose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Very verbose.
    Trace,
    /// Diagnostic.
    Debug,
    /// Normal operation.
    Info,
    /// Something unexpected that was handled.
    Warn,
    /// Something failed.
    Error,
}

/// Logs `message` at `level`.
pub fn log(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    {
        use crate::__bindings::weir::plugin::host::{log, Level as L};
        let level = match level {
            Level::Trace => L::Trace,
            Level::Debug => L::Debug,
            Level::Info => L::Info,
            Level::Warn => L::Warn,
            Level::Error => L::Error,
        };
        log(level, message);
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        eprintln!("[{level:?}] {message}");
        crate::testing::LOGS.with(|l| {
            l.borrow_mut().push(crate::testing::LogLine {
                level,
                message: message.into(),
            })
        });
    }
}
/// Logs at trace level.
pub fn trace(message: &str) {
    log(Level::Trace, message)
}
/// Logs at debug level.
pub fn debug(message: &str) {
    log(Level::Debug, message)
}
/// Logs at info level.
pub fn info(message: &str) {
    log(Level::Info, message)
}
/// Logs at warn level.
pub fn warn(message: &str) {
    log(Level::Warn, message)
}
/// Logs at error level.
pub fn error(message: &str) {
    log(Level::Error, message)
}
