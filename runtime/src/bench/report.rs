//! The table of a benchmark's runs and the statistics it shows.

use super::{Run, Variant};

/// The table of runs: per variant the range of events/s over the rounds
/// and, for Weir, the range of its share of the same round's baseline.
pub(super) fn print_runs(variants: &[Variant], runs: &[(usize, Variant, Run)]) {
    if runs.is_empty() {
        return;
    }
    println!(
        "\n| run | rounds | events/s (min-max) | median | share of its baseline (each round) | CPU µs/event (this process) | handle p50 µs | handle p99 µs |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for v in variants {
        let mine: Vec<&(usize, Variant, Run)> = runs.iter().filter(|(_, w, _)| w == v).collect();
        let rates: Vec<f64> = mine.iter().map(|(_, _, r)| r.rate()).collect();
        let Some((lo, hi)) = range(&rates) else {
            continue;
        };
        let shares: Vec<f64> = mine
            .iter()
            .filter_map(|(round, _, r)| {
                let base = v.baseline()?;
                let b = runs.iter().find(|(r2, w, _)| r2 == round && *w == base)?;
                Some(100.0 * r.rate() / b.2.rate())
            })
            .collect();
        let share = range(&shares).map_or("-".into(), |(a, b)| {
            format!(
                "{a:.0}-{b:.0} % of {}",
                if matches!(v.baseline(), Some(Variant::Passthrough)) {
                    "passthrough"
                } else {
                    "consume-only"
                }
            )
        });
        let pct = |f: fn(&Run) -> Option<u64>| {
            let v: Vec<f64> = mine
                .iter()
                .filter_map(|(_, _, r)| f(r).map(|x| x as f64))
                .collect();
            if v.is_empty() {
                "-".to_string()
            } else {
                format!("{:.0}", median(&v))
            }
        };
        let cpu: Vec<f64> = mine.iter().map(|(_, _, r)| r.cpu_us_per_event()).collect();
        println!(
            "| {} | {} | {lo:.0}-{hi:.0} | {:.0} | {share} | {:.1} | {} | {} |",
            v.name(),
            mine.len(),
            median(&rates),
            median(&cpu),
            pct(|r| r.p50_us),
            pct(|r| r.p99_us),
        );
    }
}

pub(super) fn range(v: &[f64]) -> Option<(f64, f64)> {
    let lo = v.iter().copied().reduce(f64::min)?;
    let hi = v.iter().copied().reduce(f64::max)?;
    Some((lo, hi))
}

pub(super) fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}
