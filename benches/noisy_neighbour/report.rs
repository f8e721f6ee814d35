//! The noisy-neighbour tables: medians over repetitions, the victim's rows as ratios of
//! its speed with an aggressor to its speed alone (each repetition's ratio, then the
//! median), the aggressors' own rates, and the ceiling rows.

use super::load::{Kind, VICTIM_ROWS};
use super::{Results, Server};

/// The median of the successful values, or `None` if there are none.
pub fn median(mut values: Vec<f64>) -> Option<f64> {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    })
}

/// Pairs repetition `i` of `with` with repetition `i` of `alone`: the median ratio.
fn median_ratio(alone: &[Result<f64, String>], with: &[Result<f64, String>]) -> Option<f64> {
    median(
        alone
            .iter()
            .zip(with)
            .filter_map(|(a, w)| match (a, w) {
                (Ok(a), Ok(w)) if *a > 0.0 => Some(w / a),
                _ => None,
            })
            .collect(),
    )
}

fn cell(v: Option<f64>, fmt: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "failed".to_owned(), fmt)
}

fn ratio(v: Option<f64>) -> String {
    cell(v, |r| format!("{r:.2}×"))
}

fn number(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// Prints the victim table (with the MariaDB rows) and the aggressor table.
pub fn print(servers: &[Server], results: &[Results]) {
    let mut header = String::from("| victim on volume A |");
    let mut rule = String::from("|---|");
    for s in servers {
        header.push_str(&format!(
            " {0} alone | {0}, write flood | {0}, read flood |",
            s.name()
        ));
        rule.push_str("--:|--:|--:|");
    }
    println!("{header}\n{rule}");
    let victim_rows = results.iter().any(|r| !r.victim[0].is_empty());
    if victim_rows {
        for (row, label) in VICTIM_ROWS.iter().enumerate() {
            let mut line = format!("| {label} (calls/s alone) |");
            for r in results {
                let alone: Vec<_> = r.victim[0].iter().map(|s| pick(s, row)).collect();
                line.push_str(&format!(" {} |", cell(median(ok(&alone)), number)));
                for cond in 1..=2 {
                    let with: Vec<_> = r.victim[cond].iter().map(|s| pick(s, row)).collect();
                    line.push_str(&format!(" {} |", ratio(median_ratio(&alone, &with))));
                }
            }
            println!("{line}");
        }
    }
    if results.iter().any(|r| !r.db[0].is_empty()) {
        for (i, label) in [
            "MariaDB `oltp_write_only` TPS",
            "MariaDB `oltp_write_only` p95 ms (× alone: lower is better)",
        ]
        .iter()
        .enumerate()
        {
            let mut line = format!("| {label} |");
            for r in results {
                let get = |cond: usize| -> Vec<Result<f64, String>> {
                    r.db[cond]
                        .iter()
                        .map(|s| s.as_ref().map(|v| v[i]).map_err(Clone::clone))
                        .collect()
                };
                let alone = get(0);
                line.push_str(&format!(" {} |", cell(median(ok(&alone)), number)));
                for cond in 1..=2 {
                    line.push_str(&format!(" {} |", ratio(median_ratio(&alone, &get(cond)))));
                }
            }
            println!("{line}");
        }
    }

    println!();
    println!("| aggressor on volume B | server | alone | with the victim's rows | with MariaDB |");
    println!("|---|---|--:|--:|--:|");
    for (k, kind) in Kind::ALL.iter().enumerate() {
        for (s, r) in servers.iter().zip(results) {
            let alone = &r.flood_alone[k];
            if alone.is_empty() {
                continue;
            }
            let with = |v: &[Result<f64, String>]| {
                if v.is_empty() {
                    "—".to_owned()
                } else {
                    let m = median(ok(v));
                    format!("{} ({})", cell(m, number), ratio(median_ratio(alone, v)))
                }
            };
            println!(
                "| {} ({}) | {} | {} | {} | {} |",
                kind.label(),
                kind.unit(),
                s.name(),
                cell(median(ok(alone)), number),
                with(&r.flood_with_victim[k]),
                with(&r.flood_with_db[k]),
            );
        }
    }
}

/// A flood's rates on a volume with a ceiling.
pub struct CeilingRow {
    pub label: &'static str,
    /// In the flood's unit.
    pub ceiling: f64,
    /// One per repetition.
    pub measured: Vec<Result<f64, String>>,
}

/// Prints the ceiling rows: the flood's measured rate against the volume's ceiling.
pub fn print_ceilings(rows: &[CeilingRow]) {
    if rows.is_empty() {
        return;
    }
    println!();
    println!(
        "| ceiling (localnfs, a volume of its own) | ceiling | measured (median) | measured ÷ ceiling |"
    );
    println!("|---|--:|--:|--:|");
    for row in rows {
        let m = median(ok(&row.measured));
        println!(
            "| {} | {} | {} | {} |",
            row.label,
            number(row.ceiling),
            cell(m, number),
            cell(m, |m| format!("{:.3}", m / row.ceiling)),
        );
    }
}

fn pick(s: &Result<[f64; 4], String>, row: usize) -> Result<f64, String> {
    s.as_ref().map(|v| v[row]).map_err(Clone::clone)
}

fn ok(v: &[Result<f64, String>]) -> Vec<f64> {
    v.iter().filter_map(|r| r.as_ref().ok().copied()).collect()
}
