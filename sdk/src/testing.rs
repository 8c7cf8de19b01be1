//! Native unit tests of handlers (`weir_sdk::testing`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;

use crate::log::Level;

thread_local! {
    pub(crate) static STATE: RefCell<std::collections::BTreeMap<String, Vec<u8>>> =
        const { RefCell::new(std::collections::BTreeMap::new()) };
    pub(crate) static CONFIG: RefCell<HashMap<String, String>> = RefCell::new(HashMap::new());
    pub(crate) static LOGS: RefCell<Vec<LogLine>> = const { RefCell::new(Vec::new()) };
}

/// One line a handler logged with [`crate::log`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// The level it was logged at.
    pub level: Level,
    /// The message.
    pub message: String,
}

impl fmt::Display for LogLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:?}] {}", self.level, self.message)
    }
}

/// Sets a value that [`crate::config`] returns on this thread, until
/// the thread ends or [`clear_config`].
pub fn set_config(key: &str, value: &str) {
    CONFIG.with(|c| c.borrow_mut().insert(key.into(), value.into()));
}

/// Removes every value [`set_config`] set on this thread.
pub fn clear_config() {
    CONFIG.with(|c| c.borrow_mut().clear());
}

/// Runs `f` with exactly `config` as the handler's config on this
/// thread (keys not listed read as `None`), then restores the previous
/// config, also when `f` panics.
///
/// ```
/// use weir_sdk::testing::with_config;
/// let v = with_config(&[("limit", "5")], || weir_sdk::config("limit"));
/// assert_eq!(v.as_deref(), Some("5"));
/// assert_eq!(weir_sdk::config("limit"), None);
/// ```
pub fn with_config<R>(config: &[(&str, &str)], f: impl FnOnce() -> R) -> R {
    struct Restore(Option<HashMap<String, String>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(previous) = self.0.take() {
                CONFIG.with(|c| *c.borrow_mut() = previous);
            }
        }
    }
    let new = config
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let _restore = Restore(Some(CONFIG.with(|c| c.replace(new))));
    f()
}

/// Every line logged on this thread so far (since the thread started or
/// the last [`take_logs`]), oldest first.
pub fn logs() -> Vec<LogLine> {
    LOGS.with(|l| l.borrow().clone())
}

/// Like [`logs`], and forgets them: the next call sees only newer lines.
///
/// ```
/// use weir_sdk::testing::take_logs;
/// weir_sdk::log::warn("first");
/// assert_eq!(take_logs()[0].message, "first");
/// assert!(take_logs().is_empty());
/// ```
pub fn take_logs() -> Vec<LogLine> {
    LOGS.with(|l| std::mem::take(&mut *l.borrow_mut()))
}

/// Calls `handle` on `event` the way the runtime does with the handler's
/// state: its writes are kept only when it returns `Ok` (a failed call
/// leaves the state as it was).
///
/// ```
/// use weir_sdk::{state, testing, Event, HandlerError, HandlerResult};
///
/// fn handle(_: Event) -> HandlerResult {
///     state::set("k", &1)?;
///     Err(HandlerError::retriable("not now"))
/// }
/// assert!(testing::call(handle, Event::raw("t", "x")).is_err());
/// assert_eq!(state::get::<u32>("k").unwrap(), None);
/// ```
pub fn call(
    handle: impl FnOnce(crate::Event) -> crate::HandlerResult,
    event: crate::Event,
) -> crate::HandlerResult {
    let before = state();
    let result = handle(event);
    if result.is_err() {
        STATE.with(|s| *s.borrow_mut() = before);
    }
    result
}

/// The handler's state on this thread (key → bytes), for assertions.
pub fn state() -> std::collections::BTreeMap<String, Vec<u8>> {
    STATE.with(|s| s.borrow().clone())
}

/// Empties the handler's state on this thread.
pub fn clear_state() {
    STATE.with(|s| s.borrow_mut().clear());
}
