//! The markdown table: one line per row, one column per server (median of the
//! repetitions, with the fastest and slowest in brackets), and localnfs's speed against
//! each other server; then, for the file rows, the NFS calls they cost and the time
//! per call.

use super::files::Measured;

/// What a row's numbers are, and so which way is better.
#[derive(Clone, Copy, Debug)]
pub enum Unit {
    Seconds,
    PerSecond,
    Millis,
}

impl Unit {
    fn label(self) -> &'static str {
        match self {
            Unit::Seconds => "s",
            Unit::PerSecond => "TPS",
            Unit::Millis => "ms",
        }
    }

    /// `a`'s speed relative to `b`'s: above 1 means `a` did better.
    fn speed_ratio(self, a: f64, b: f64) -> f64 {
        match self {
            Unit::PerSecond => a / b,
            Unit::Seconds | Unit::Millis => b / a,
        }
    }
}

/// Median, fastest and slowest of a row's repetitions, or the first failure.
fn summary(samples: &[Result<f64, String>]) -> Result<(f64, f64, f64), String> {
    let mut values = Vec::with_capacity(samples.len());
    for s in samples {
        values.push(s.clone()?);
    }
    values.sort_by(f64::total_cmp);
    match (values.first(), values.last(), median(values.clone())) {
        (Some(&min), Some(&max), Some(med)) => Ok((med, min, max)),
        _ => Err("no repetitions".to_owned()),
    }
}

/// Three significant digits or so, never in exponent form.
fn number(v: f64) -> String {
    match v.abs() {
        a if a >= 100.0 => format!("{v:.0}"),
        a if a >= 10.0 => format!("{v:.1}"),
        a if a >= 1.0 => format!("{v:.2}"),
        _ => format!("{v:.3}"),
    }
}

/// A failure, short enough for a table cell (the whole text was printed when it
/// happened).
fn short(e: &str) -> String {
    let line = e.lines().next().unwrap_or_default().replace('|', "/");
    let cut: String = line.chars().take(80).collect();
    format!("FAILED: {cut}")
}

/// Prints the table. `results[server][row]` holds the row's repetitions.
pub fn print_table(
    servers: &[&str],
    rows: &[(String, Unit)],
    results: &[Vec<Vec<Result<f64, String>>>],
    reps: usize,
) {
    let base = servers.iter().position(|s| *s == "localnfs");
    let others: Vec<usize> = match base {
        Some(b) => (0..servers.len()).filter(|&i| i != b).collect(),
        None => Vec::new(),
    };
    let mut header = format!("| row (median of {reps}, [min–max]) | unit |");
    let mut rule = "|---|---|".to_owned();
    for s in servers {
        header.push_str(&format!(" {s} |"));
        rule.push_str("--:|");
    }
    for &o in &others {
        header.push_str(&format!(" localnfs ÷ {} |", servers[o]));
        rule.push_str("--:|");
    }
    println!("{header}\n{rule}");
    for (r, (name, unit)) in rows.iter().enumerate() {
        let sums: Vec<_> = results.iter().map(|per| summary(&per[r])).collect();
        let mut line = format!("| {name} | {} |", unit.label());
        for s in &sums {
            let cell = match s {
                Ok((med, min, max)) => {
                    format!("{} [{}–{}]", number(*med), number(*min), number(*max))
                }
                Err(e) => short(e),
            };
            line.push_str(&format!(" {cell} |"));
        }
        for &o in &others {
            let cell = match (base.map(|b| &sums[b]), &sums[o]) {
                (Some(Ok((ours, ..))), Ok((theirs, ..))) => {
                    format!("{:.2}×", unit.speed_ratio(*ours, *theirs))
                }
                _ => "-".to_owned(),
            };
            line.push_str(&format!(" {cell} |"));
        }
        println!("{line}");
    }
}

/// Median of `values` (none if empty).
fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
}

/// Prints where the file rows' time goes on the NFS servers: the client's calls, the
/// wall time per call and, where the server reports it, the server's time per call
/// (medians over the repetitions that succeeded). `measured[server][row]`.
pub fn print_time_per_call(
    servers: &[&str],
    rows: &[(&str, Unit)],
    measured: &[Vec<Vec<Measured>>],
) {
    let nfs: Vec<usize> = (0..servers.len())
        .filter(|&s| measured[s].iter().flatten().any(|m| m.calls > 0))
        .collect();
    if nfs.is_empty() {
        return;
    }
    let mut header = "| row | NFS calls |".to_owned();
    let mut rule = "|---|--:|".to_owned();
    for &s in &nfs {
        header.push_str(&format!(" {} µs/call |", servers[s]));
        rule.push_str("--:|");
        if measured[s]
            .iter()
            .flatten()
            .any(|m| m.server_seconds.is_some())
        {
            header.push_str(&format!(" of which in {} |", servers[s]));
            rule.push_str("--:|");
        }
    }
    println!("{header}\n{rule}");
    for (r, (name, _)) in rows.iter().enumerate() {
        let calls = median(
            nfs.iter()
                .flat_map(|&s| measured[s][r].iter().map(|m| m.calls as f64))
                .collect(),
        );
        let calls = calls.map_or("-".to_owned(), |c| format!("{c:.0}"));
        let mut line = format!("| {name} | {calls} |");
        for &s in &nfs {
            let per_call = |value: &dyn Fn(&Measured) -> Option<f64>| -> String {
                let v: Vec<f64> = measured[s][r]
                    .iter()
                    .filter(|m| m.calls > 0)
                    .filter_map(|m| Some(value(m)? * 1e6 / m.calls as f64))
                    .collect();
                median(v).map_or("-".to_owned(), number)
            };
            line.push_str(&format!(" {} |", per_call(&|m| Some(m.seconds))));
            if measured[s]
                .iter()
                .flatten()
                .any(|m| m.server_seconds.is_some())
            {
                line.push_str(&format!(" {} |", per_call(&|m| m.server_seconds)));
            }
        }
        println!("{line}");
    }
}
