//! A handler's stdout and stderr: each line goes to the runtime log, tagged
//! with the handler and the stream, rate limited so a chatty or hostile
//! handler cannot flood the log.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Lines per second a handler may log through stdout/stderr, and the burst.
const LINES_PER_SEC: f64 = 20.0;
const BURST: f64 = 100.0;
/// Longer lines are cut.
const MAX_LINE: usize = 4096;

/// A sink for one stream of one handler instance.
#[derive(Clone)]
pub struct GuestOutput {
    state: Arc<Mutex<State>>,
}

struct State {
    handler: String,
    stream: &'static str,
    line: Vec<u8>,
    tokens: f64,
    refilled: Instant,
    dropped: u64,
}

impl GuestOutput {
    pub fn new(handler: &str, stream: &'static str) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                handler: handler.to_owned(),
                stream,
                line: Vec::new(),
                tokens: BURST,
                refilled: Instant::now(),
                dropped: 0,
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
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * LINES_PER_SEC).min(BURST);
        self.refilled = now;
        let line = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        if self.tokens < 1.0 {
            self.dropped += 1;
            return;
        }
        self.tokens -= 1.0;
        if self.dropped > 0 {
            tracing::warn!(target: "weir::handler", handler = %self.handler, stream = self.stream,
                dropped = self.dropped, "handler output lines dropped (rate limit)");
            self.dropped = 0;
        }
        tracing::info!(target: "weir::handler", handler = %self.handler, stream = self.stream, "{line}");
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
