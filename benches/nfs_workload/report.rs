//! The result tables: one markdown row per (workload row, server), median/min/max over
//! the repetitions that succeeded, failures named in the row, and server CPU time; the
//! same medians and ranges as a chart; and the depth-1 latency table.

use std::path::Path;
use std::time::Duration;

use super::charts::{Bar, Panel, bar_panels};
use super::{Config, MIB, ticks_per_second};

/// What a row reports per repetition.
pub struct Sample {
    pub value: f64,
    /// Operations the row performed, for CPU µs per operation.
    pub ops: u64,
    /// Server CPU time over the row, when the PID was given and readable.
    pub cpu: Option<Duration>,
    pub note: Option<String>,
}

pub struct RowSpec {
    pub label: &'static str,
    pub unit: &'static str,
}

pub const ROWS: [RowSpec; 8] = [
    RowSpec {
        label: "seq write (1 MiB UNSTABLE ×8, + COMMIT)",
        unit: "MB/s",
    },
    RowSpec {
        label: "seq read warm (1 MiB ×8)",
        unit: "MB/s",
    },
    RowSpec {
        label: "seq read cold (1 MiB ×8)",
        unit: "MB/s",
    },
    RowSpec {
        label: "random read 4 KiB ×16",
        unit: "IOPS",
    },
    RowSpec {
        label: "create + write 4 KiB + commit ×16",
        unit: "files/s",
    },
    RowSpec {
        label: "GETATTR ×16",
        unit: "ops/s",
    },
    RowSpec {
        label: "list dir (READDIRPLUS 32 KiB)",
        unit: "s",
    },
    RowSpec {
        label: "REMOVE ×16",
        unit: "ops/s",
    },
];

/// The values of the repetitions of one row that succeeded, sorted.
fn sorted_values(samples: &[Result<Sample, String>]) -> Vec<f64> {
    let mut values: Vec<f64> = samples
        .iter()
        .filter_map(|s| s.as_ref().ok().map(|s| s.value))
        .collect();
    values.sort_by(f64::total_cmp);
    values
}

/// One panel per row, one bar per server: median, min–max.
pub fn draw_chart(
    config: &Config,
    results: &[Vec<Vec<Result<Sample, String>>>],
    path: &Path,
) -> Result<(), String> {
    let panels: Vec<Panel> = ROWS
        .iter()
        .enumerate()
        .map(|(r, spec)| Panel {
            title: spec.label.to_owned(),
            unit: spec.unit.to_owned(),
            lower_is_better: spec.unit == "s",
            bars: config
                .servers
                .iter()
                .zip(results)
                .map(|(target, rows)| {
                    let values = sorted_values(&rows[r]);
                    let median = values.get(values.len() / 2).copied();
                    Bar {
                        name: target.name.clone(),
                        median,
                        min: values.first().copied().unwrap_or(0.0),
                        max: values.last().copied().unwrap_or(0.0),
                        label: median.map_or_else(String::new, number),
                    }
                })
                .collect(),
        })
        .collect();
    let names: Vec<&str> = config.servers.iter().map(|t| t.name.as_str()).collect();
    let title = format!(
        "NFSv3, same client and run: {} (median of {}, whisker min–max)",
        names.join(" vs "),
        config.reps
    );
    bar_panels(path, &title, &panels)
}

pub fn print_table(config: &Config, results: &[Vec<Vec<Result<Sample, String>>>]) {
    println!(
        "\nNFSv3 over TCP, same client and run; {} repetitions (median, min, max); \
         file {} MiB, {} small files, random reads for {} s\n",
        config.reps,
        config.file_bytes / MIB,
        config.files,
        config.random_for.as_secs()
    );
    let tick = Duration::from_secs(1) / ticks_per_second().unwrap_or(100);
    println!("| row | server | median | min | max | unit | server CPU s | CPU µs/op |");
    println!("|---|---|--:|--:|--:|---|--:|--:|");
    for (r, spec) in ROWS.iter().enumerate() {
        for (target, rows) in config.servers.iter().zip(results) {
            let samples = &rows[r];
            let ok: Vec<&Sample> = samples.iter().filter_map(|s| s.as_ref().ok()).collect();
            let mut label = spec.label.to_owned();
            if let Some(note) = ok.iter().find_map(|s| s.note.as_deref()) {
                label = format!("{label} ({note})");
            }
            let label = with_failures(label, samples);
            let values = sorted_values(samples);
            let cell = |v: Option<&f64>| v.map_or("–".to_owned(), |v| number(*v));
            let cpu: Vec<(Duration, u64)> = ok
                .iter()
                .filter_map(|s| s.cpu.map(|c| (c, s.ops)))
                .collect();
            let (cpu_s, cpu_per_op) = cpu_cells(&cpu, tick);
            println!(
                "| {label} | {} | {} | {} | {} | {} | {cpu_s} | {cpu_per_op} |",
                target.name,
                cell(values.get(values.len() / 2)),
                cell(values.first()),
                cell(values.last()),
                spec.unit,
            );
        }
    }
    println!(
        "\nserver CPU s: utime+stime of the server process over the row, mean per \
         repetition ({} ms ticks). CPU µs/op: total CPU / total ops; an op is one WRITE or \
         READ (seq, random), one file (create), one GETATTR, one listed entry, one REMOVE.",
        tick.as_millis()
    );
}

/// A row's label with how many repetitions failed and the first reason, if any did.
fn with_failures<T>(label: String, samples: &[Result<T, String>]) -> String {
    let failed: Vec<&String> = samples.iter().filter_map(|s| s.as_ref().err()).collect();
    match failed.first() {
        Some(first) => format!(
            "{label} — {}/{} failed: {first}",
            failed.len(),
            samples.len()
        ),
        None => label,
    }
}

/// The server-CPU cells of a row from its repetitions' (CPU time, operations): mean
/// CPU seconds per repetition and total CPU µs / total operations ("–" without
/// samples; a bound of one tick per repetition when no tick was seen at all).
fn cpu_cells(cpu: &[(Duration, u64)], tick: Duration) -> (String, String) {
    if cpu.is_empty() {
        return ("–".to_owned(), "–".to_owned());
    }
    let total: Duration = cpu.iter().map(|(c, _)| *c).sum();
    let ops = cpu.iter().map(|(_, n)| n).sum::<u64>().max(1) as f64;
    let per_op = if total.is_zero() {
        format!(
            "< {}",
            number(tick.as_secs_f64() * 1e6 * cpu.len() as f64 / ops)
        )
    } else {
        number(total.as_secs_f64() * 1e6 / ops)
    };
    (
        format!("{:.2}", total.as_secs_f64() / cpu.len() as f64),
        per_op,
    )
}

/// One repetition of a depth-1 row.
pub struct LatencySample {
    /// Calls over the row's wall time.
    pub ops_per_s: f64,
    pub p50: Duration,
    pub p99: Duration,
    pub ops: u64,
    pub cpu: Option<Duration>,
    pub note: Option<String>,
}

/// Median of some values (the upper one of an even count, as the other table does).
fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
}

/// The depth-1 table: per row and server the medians over repetitions of p50, p99 and
/// ops/s, the ops/s range, CPU per call, and each server's ops/s over the reference
/// server's (the one named `ganesha`, else the last), so the goal reads off one column.
pub fn print_depth1_table(
    config: &Config,
    labels: &[&str],
    results: &[Vec<Vec<Result<LatencySample, String>>>],
) {
    let reference = config
        .servers
        .iter()
        .position(|t| t.name == "ganesha")
        .unwrap_or(config.servers.len().saturating_sub(1));
    let ref_name = config
        .servers
        .get(reference)
        .map_or("", |t| t.name.as_str());
    println!(
        "\nNFSv3 over TCP at depth 1 (one connection, one call at a time), same client and \
         run; {} repetitions (median); {} calls per row ({} for LOOKUP, GETATTR, ACCESS), \
         {} files in the listed directory\n",
        config.reps,
        config.ops,
        10 * config.ops,
        config.entries
    );
    let tick = Duration::from_secs(1) / ticks_per_second().unwrap_or(100);
    println!(
        "| procedure | server | p50 µs | p99 µs | ops/s | ops/s min–max | server CPU µs/op \
         | ops/s ÷ {ref_name} |"
    );
    println!("|---|---|--:|--:|--:|--:|--:|--:|");
    let mut goal = Vec::new();
    for (r, label) in labels.iter().enumerate() {
        let medians: Vec<Option<f64>> = results
            .iter()
            .map(|rows| median(ok(&rows[r]).map(|s| s.ops_per_s).collect()))
            .collect();
        for (i, (target, rows)) in config.servers.iter().zip(results).enumerate() {
            let samples = &rows[r];
            let mut label = (*label).to_owned();
            if let Some(note) = ok(samples).find_map(|s| s.note.as_deref()) {
                label = format!("{label} ({note})");
            }
            let label = with_failures(label, samples);
            let micros = |f: fn(&LatencySample) -> Duration| {
                median(ok(samples).map(|s| f(s).as_secs_f64() * 1e6).collect())
                    .map_or("–".to_owned(), number)
            };
            let ops: Vec<f64> = ok(samples).map(|s| s.ops_per_s).collect();
            let range = match (
                ops.iter().copied().reduce(f64::min),
                ops.iter().copied().reduce(f64::max),
            ) {
                (Some(lo), Some(hi)) => format!("{}–{}", number(lo), number(hi)),
                _ => "–".to_owned(),
            };
            let cpu: Vec<(Duration, u64)> = ok(samples)
                .filter_map(|s| s.cpu.map(|c| (c, s.ops)))
                .collect();
            let ratio = match (medians[i], medians[reference]) {
                _ if i == reference => "–".to_owned(),
                (Some(a), Some(b)) if b > 0.0 => {
                    goal.push((target.name.clone(), a / b));
                    format!("{:.2}×", a / b)
                }
                _ => "–".to_owned(),
            };
            println!(
                "| {label} | {} | {} | {} | {} | {range} | {} | {ratio} |",
                target.name,
                micros(|s| s.p50),
                micros(|s| s.p99),
                medians[i].map_or("–".to_owned(), number),
                cpu_cells(&cpu, tick).1,
            );
        }
    }
    println!(
        "\np50/p99: per-call round trip seen by the client, median over repetitions \
         (COMMIT: the COMMIT call alone). ops/s: calls over the row's wall time (COMMIT: \
         WRITE + COMMIT pairs). Server CPU µs/op: the server's utime+stime over the rows \
         ({} ms ticks) / calls (COMMIT: per pair).",
        tick.as_millis()
    );
    for name in config.servers.iter().map(|t| &t.name) {
        if *name == ref_name {
            continue;
        }
        let mine: Vec<f64> = goal.iter().filter(|g| g.0 == *name).map(|g| g.1).collect();
        let met = mine.iter().filter(|r| **r >= 1.5).count();
        println!(
            "{name}: ops/s ≥ 1.5× {ref_name}'s on {met} of {} rows",
            mine.len()
        );
    }
}

/// The repetitions of a row that succeeded.
fn ok(samples: &[Result<LatencySample, String>]) -> impl Iterator<Item = &LatencySample> {
    samples.iter().filter_map(|s| s.as_ref().ok())
}

/// Three significant-ish digits without drowning large numbers in decimals.
fn number(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}
