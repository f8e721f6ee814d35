//! The markdown table: one line per row, one column per server (median of the
//! repetitions, with the fastest and slowest in brackets), and localnfs's speed against
//! each other server.

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
    match (values.first(), values.last()) {
        (Some(&min), Some(&max)) => Ok((values[values.len() / 2], min, max)),
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
