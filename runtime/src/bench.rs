//! `weir bench`: throughput and handling latency against a real broker.
use anyhow::Result;

/// Options of `weir bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Bootstrap servers of a real broker.
    #[arg(long, default_value = "127.0.0.1:19092")]
    brokers: String,
}

/// Runs the benchmark.
pub async fn run(_args: BenchArgs) -> Result<()> {
    anyhow::bail!("not yet")
}
