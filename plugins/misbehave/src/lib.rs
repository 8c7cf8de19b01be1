//! Misbehave: a handler that does what a sandbox must contain, chosen by
//! the event's payload (a JSON string) so one instance can be tested on
//! every limit. Used by the end-to-end tests of limits and isolation.
//!
//! - `"loop"`: spins forever (fuel).
//! - `"alloc"`: allocates without bound (memory cap).
//! - `"sleep"`: sleeps 3 s in a host call (deadline, noticed on return).
//! - `"spin"`: busy-waits 30 s of wall time (deadline).
//! - `"print:TEXT"`: writes TEXT to stdout and to stderr, then succeeds.
//! - `"panic"`: panics (trap).
//! - `"burn:N"`: does N rounds of arithmetic, then succeeds (fuel budgets).
//! - `"read:PATH"`, `"env:NAME"`, `"connect:ADDR"`: tries the access and
//!   publishes what happened, so a test sees what the handler saw.
//! - anything else: publishes `ok`.
//!
//! Outputs go to `output_topic` (default `<topic>.out`).

use weir_sdk::{Event, HandlerError, HandlerResult, Output};

fn burn(rounds: u64) -> u64 {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..rounds {
        x = x.rotate_left(5) ^ i.wrapping_mul(0x2545_f491_4f6c_dd1d);
    }
    x
}

/// Misbehaves as asked.
pub fn handle(event: Event) -> HandlerResult {
    let command: String = event.decode().unwrap_or_default();
    let topic = weir_sdk::config("output_topic").unwrap_or_else(|| format!("{}.out", event.topic));
    let say = |text: String| {
        Ok(vec![
            Output::raw(&topic, text).with_key(event.key.clone().unwrap_or_default())
        ])
    };
    let (verb, arg) = command.split_once(':').unwrap_or((command.as_str(), ""));
    match verb {
        "loop" => {
            let mut n = 0u64;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        "alloc" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        "sleep" => {
            std::thread::sleep(std::time::Duration::from_secs(3));
            say("woke up".into())
        }
        "spin" => {
            let start = std::time::Instant::now();
            while start.elapsed() < std::time::Duration::from_secs(30) {}
            say("spun".into())
        }
        "panic" => panic!("asked to panic"),
        "print" => {
            println!("{arg}");
            eprintln!("{arg} (stderr)");
            say("printed".into())
        }
        "burn" => {
            let rounds = arg
                .parse()
                .map_err(|_| HandlerError::fatal("burn needs a number"))?;
            say(format!("burnt {}", burn(rounds) & 1))
        }
        "read" => say(match std::fs::read_to_string(arg) {
            Ok(text) => format!("read ok: {text}"),
            Err(e) => format!("read denied: {e}"),
        }),
        "env" => say(match std::env::var(arg) {
            Ok(v) => format!("env ok: {v}"),
            Err(e) => format!("env denied: {e}"),
        }),
        "connect" => say(match std::net::TcpStream::connect(arg) {
            Ok(_) => "connect ok".into(),
            Err(e) => format!("connect denied: {e}"),
        }),
        _ => say("ok".into()),
    }
}

weir_sdk::handler!(handle);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burn_and_ok_succeed() {
        let e = Event::json("t", "x", &"burn:1000").unwrap();
        assert!(String::from_utf8(handle(e).unwrap()[0].payload.clone())
            .unwrap()
            .starts_with("burnt"));
        let e = Event::json("t", "x", &"hello").unwrap();
        assert_eq!(handle(e).unwrap()[0].payload, b"ok");
    }
}
