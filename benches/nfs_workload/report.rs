//! The result table: one markdown row per (workload row, server), median/min/max over
//! the repetitions that succeeded, failures named in the row, and server CPU time; and
//! the same medians and ranges as a chart.

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
            let failed: Vec<&String> = samples.iter().filter_map(|s| s.as_ref().err()).collect();
            if let Some(first) = failed.first() {
                label = format!(
                    "{label} — {}/{} failed: {first}",
                    failed.len(),
                    samples.len()
                );
            }
            let values = sorted_values(samples);
            let cell = |v: Option<&f64>| v.map_or("–".to_owned(), |v| number(*v));
            let cpu: Vec<(Duration, u64)> = ok
                .iter()
                .filter_map(|s| s.cpu.map(|c| (c, s.ops)))
                .collect();
            let (cpu_s, cpu_per_op) = if cpu.is_empty() {
                ("–".to_owned(), "–".to_owned())
            } else {
                let total: Duration = cpu.iter().map(|(c, _)| *c).sum();
                let ops = cpu.iter().map(|(_, n)| n).sum::<u64>().max(1) as f64;
                let per_op = if total.is_zero() {
                    // Below the clock tick: bound it by one tick per repetition.
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
            };
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
