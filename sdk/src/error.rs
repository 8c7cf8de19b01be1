//! How a handler fails, and turning other errors into that.

use std::fmt;

use crate::*;

/// How a handler failed.
///
/// `?` converts [`serde_json::Error`], the `rmp_serde` encode and decode
/// errors and (feature `anyhow`) `anyhow::Error` into [`HandlerError::Fatal`];
/// see [`ResultExt`] to mark any other error retriable or fatal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerError {
    /// Transient (a dependency is down): the runtime calls again later, with
    /// backoff, up to the handler's `max_attempts`; then the event is
    /// dead-lettered as `retries-exhausted`.
    Retriable(String),
    /// Permanent (the event is wrong): the event goes to the dead-letter
    /// topic with error kind `fatal`.
    Fatal(String),
}

impl HandlerError {
    /// A transient failure, with `error`'s text as the message.
    ///
    /// ```
    /// use weir_sdk::HandlerError;
    /// assert_eq!(HandlerError::retriable("inventory is down"),
    ///     HandlerError::Retriable("inventory is down".into()));
    /// let io = std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out");
    /// assert_eq!(HandlerError::retriable(io).message(), "timed out");
    /// ```
    pub fn retriable(error: impl fmt::Display) -> HandlerError {
        HandlerError::Retriable(error.to_string())
    }

    /// A permanent failure, with `error`'s text as the message.
    ///
    /// ```
    /// use weir_sdk::HandlerError;
    /// assert_eq!(HandlerError::fatal(format!("unknown country {}", "AQ")),
    ///     HandlerError::Fatal("unknown country AQ".into()));
    /// ```
    pub fn fatal(error: impl fmt::Display) -> HandlerError {
        HandlerError::Fatal(error.to_string())
    }

    /// Whether the runtime will call again with this event.
    pub fn is_retriable(&self) -> bool {
        matches!(self, HandlerError::Retriable(_))
    }

    /// The message, without the class.
    pub fn message(&self) -> &str {
        match self {
            HandlerError::Retriable(m) | HandlerError::Fatal(m) => m,
        }
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandlerError::Retriable(m) => write!(f, "retriable: {m}"),
            HandlerError::Fatal(m) => write!(f, "fatal: {m}"),
        }
    }
}

impl std::error::Error for HandlerError {}

/// Fatal: JSON that does not parse or fit the type will not on retry.
///
/// ```
/// use weir_sdk::{HandlerError, HandlerResult};
/// fn parse(bytes: &[u8]) -> HandlerResult {
///     let _: serde_json::Value = serde_json::from_slice(bytes)?;
///     Ok(vec![])
/// }
/// assert!(matches!(parse(b"{"), Err(HandlerError::Fatal(m)) if m.starts_with("JSON: ")));
/// ```
impl From<serde_json::Error> for HandlerError {
    fn from(e: serde_json::Error) -> Self {
        HandlerError::Fatal(format!("JSON: {e}"))
    }
}

/// Fatal: MessagePack that does not decode will not on retry.
impl From<rmp_serde::decode::Error> for HandlerError {
    fn from(e: rmp_serde::decode::Error) -> Self {
        HandlerError::Fatal(format!("MessagePack decode: {e}"))
    }
}

/// Fatal: a value that cannot be encoded as MessagePack will not be on retry.
impl From<rmp_serde::encode::Error> for HandlerError {
    fn from(e: rmp_serde::encode::Error) -> Self {
        HandlerError::Fatal(format!("MessagePack encode: {e}"))
    }
}

/// Fatal, with the error and its chain of causes (`outer: inner: root`).
/// To have an anyhow error retried, use [`ResultExt::retriable`].
/// Feature `anyhow` (on by default).
///
/// ```
/// use anyhow::Context;
/// use weir_sdk::{HandlerError, HandlerResult};
/// fn handle() -> HandlerResult {
///     "x".parse::<u32>().context("reading the amount")?;
///     Ok(vec![])
/// }
/// assert!(matches!(handle(), Err(HandlerError::Fatal(m)) if m.starts_with("reading the amount: ")));
/// ```
#[cfg(feature = "anyhow")]
impl From<anyhow::Error> for HandlerError {
    fn from(e: anyhow::Error) -> Self {
        HandlerError::Fatal(format!("{e:#}"))
    }
}

/// Marks the error of any `Result` whose error is `Display` as retriable or
/// fatal, for `?`.
///
/// ```
/// use weir_sdk::{Event, HandlerError, HandlerResult, ResultExt};
///
/// fn handle(event: Event) -> HandlerResult {
///     let n: u32 = std::str::from_utf8(&event.payload).fatal()?.parse().fatal()?;
///     if n > 10 {
///         Err(std::io::Error::other("backend busy")).retriable()?;
///     }
///     Ok(vec![])
/// }
/// assert!(handle(Event::raw("t", "3")).is_ok());
/// assert_eq!(handle(Event::raw("t", "x")), Err(HandlerError::Fatal("invalid digit found in string".into())));
/// assert_eq!(handle(Event::raw("t", "11")), Err(HandlerError::Retriable("backend busy".into())));
/// ```
///
/// On a `Result<_, HandlerError>` the message keeps its old class as a
/// prefix (`"fatal: …"`); match on the error to change its class instead.
pub trait ResultExt<T> {
    /// Turns the error into [`HandlerError::Retriable`] with its text.
    fn retriable(self) -> Result<T, HandlerError>;
    /// Turns the error into [`HandlerError::Fatal`] with its text.
    fn fatal(self) -> Result<T, HandlerError>;
}

impl<T, E: fmt::Display> ResultExt<T> for Result<T, E> {
    fn retriable(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::retriable)
    }
    fn fatal(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::fatal)
    }
}

/// What a handler returns.
pub type HandlerResult = Result<Vec<Output>, HandlerError>;
