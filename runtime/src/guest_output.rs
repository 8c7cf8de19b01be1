//! A handler's stdout and stderr: each line goes to the runtime log, tagged
//! with the handler and the stream, rate limited so a chatty or hostile
//! handler cannot flood the log. `LineLimiter` is that rate limit; the
//! host `log` import uses it too.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Lines per second a handler instance may log through each of stdout,
/// stderr and the host `log` import, and the burst.
const LINES_PER_SEC: f64 = 20.0;
const BURST: f64 = 100.0;
/// Longer lines are cut.
const MAX_LINE: usize = 4096;

/// The rate limit of one stream of log lines of one handler instance: a
/// token bucket of `LINES_PER_SEC` lines a second, `BURST` at most. Lines
/// past it are dropped and counted; the count is reported in a warning
/// before the next line that gets through.
pub(crate) struct LineLimiter {
    tokens: f64,
    refilled: Instant,
    dropped: u64,
}

impl LineLimiter {
    pub(crate) fn new() -> Self {
        Self::new_at(Instant::now())
    }

    fn new_at(now: Instant) -> Self {
        Self {
            tokens: BURST,
            refilled: now,
            dropped: 0,
        }
    }

    /// Whether a line of `handler`'s `stream` may be logged now. When lines
    /// were dropped before it, a warning says how many.
    pub(crate) fn admit(&mut self, handler: &str, stream: &str) -> bool {
        match self.take(Instant::now()) {
            None => false,
            Some(0) => true,
            Some(dropped) => {
                tracing::warn!(target: "weir::handler", handler, stream, dropped,
                    "handler output lines dropped (rate limit)");
                true
            }
        }
    }

    /// Takes a token for one line at `now`: `None` when the line is to be
    /// dropped (and is counted), else how many were dropped since the last
    /// line that got through.
    fn take(&mut self, now: Instant) -> Option<u64> {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * LINES_PER_SEC).min(BURST);
        self.refilled = now;
        if self.tokens < 1.0 {
            self.dropped += 1;
            return None;
        }
        self.tokens -= 1.0;
        Some(std::mem::take(&mut self.dropped))
    }
}

/// `line` cut to at most `MAX_LINE` bytes, at a character boundary.
pub(crate) fn cut(line: &str) -> &str {
    if line.len() <= MAX_LINE {
        return line;
    }
    let mut end = MAX_LINE;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    &line[..end]
}

/// A sink for one stream of one handler instance.
#[derive(Clone)]
pub struct GuestOutput {
    state: Arc<Mutex<State>>,
}

struct State {
    handler: String,
    stream: &'static str,
    line: Vec<u8>,
    limit: LineLimiter,
}

impl GuestOutput {
    pub fn new(handler: &str, stream: &'static str) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                handler: handler.to_owned(),
                stream,
                line: Vec::new(),
                limit: LineLimiter::new(),
            })),
        }
    }

    fn write_bytes(&self, bytes: &[u8]) {
        let mut s = self.state.lock().unwrap();
        for &b in bytes {
            if b == b'\n' {
                s.emit();
            } else if s.line.len() < MAX_LINE {
                s.line.push(b);
            }
        }
    }
}

impl State {
    fn emit(&mut self) {
        let admitted = self.limit.admit(&self.handler, self.stream);
        if admitted {
            let line = String::from_utf8_lossy(&self.line);
            tracing::info!(target: "weir::handler", handler = %self.handler, stream = self.stream, "{line}");
        }
        self.line.clear();
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.write_bytes(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for GuestOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.write_bytes(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_line_limiter_allows_a_burst_then_the_rate_and_counts_drops() {
        let start = Instant::now();
        let mut limit = LineLimiter::new_at(start);
        for _ in 0..BURST as usize {
            assert_eq!(limit.take(start), Some(0));
        }
        assert_eq!(limit.take(start), None);
        assert_eq!(limit.take(start), None);
        // One and a half lines' worth of time later one line gets through,
        // reporting the two dropped before it; the next is dropped again.
        let later = start + Duration::from_secs_f64(1.5 / LINES_PER_SEC);
        assert_eq!(limit.take(later), Some(2));
        assert_eq!(limit.take(later), None);
        // Idle time refills up to the burst, not beyond.
        let much_later = later + Duration::from_secs(3600);
        for _ in 0..BURST as usize {
            assert!(limit.take(much_later).is_some());
        }
        assert_eq!(limit.take(much_later), None);
    }

    #[test]
    fn long_lines_are_cut_at_a_character_boundary() {
        assert_eq!(cut("short"), "short");
        let long = "é".repeat(MAX_LINE);
        let c = cut(&long);
        assert!(c.len() <= MAX_LINE && c.len() > MAX_LINE - 2);
        assert!(long.starts_with(c));
    }
}
