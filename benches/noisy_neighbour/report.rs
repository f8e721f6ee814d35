//! The noisy-neighbour tables: medians over repetitions, the victim's rows as ratios of
//! its speed with an aggressor to its speed alone (each repetition's ratio, then the
//! median), the aggressors' own rates, and the ceiling rows.

use super::load::{Kind, RowSample, VICTIM_ROWS, VictimSample};
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
            if alone.is_empty() && r.flood_with_db[k].is_empty() {
                continue;
            }
            // Without the victim's rows (`--only mariadb`) no flood ran alone.
            let with = |v: &[Result<f64, String>]| {
                let m = cell(median(ok(v)), number);
                match (v.is_empty(), alone.is_empty()) {
                    (true, _) => "—".to_owned(),
                    (false, true) => m,
                    (false, false) => format!("{m} ({})", ratio(median_ratio(alone, v))),
                }
            };
            println!(
                "| {} ({}) | {} | {} | {} | {} |",
                kind.label(),
                kind.unit(),
                s.name(),
                if alone.is_empty() {
                    "—".to_owned()
                } else {
                    cell(median(ok(alone)), number)
                },
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

fn pick(s: &Result<VictimSample, String>, row: usize) -> Result<f64, String> {
    s.as_ref().map(|v| v[row].rate).map_err(Clone::clone)
}

/// Prints where a victim call's time went, per server, row and condition (medians over
/// repetitions): the client's round trip, the agent's window (received → reply ready,
/// of which queued for a pool worker), the rest (outside the agent: sockets, the
/// client, waiting for a core), and the CPU the server, the victim's process and the
/// flood's process used during the row.
pub fn print_breakdown(servers: &[Server], results: &[Results]) {
    if results.iter().all(|r| r.victim[0].is_empty()) {
        return;
    }
    println!();
    println!(
        "| server | victim row | beside | round trip µs/call | agent µs/call (queued) | outside the agent µs/call | server cores | victim client cores | flood client cores |"
    );
    println!("|---|---|---|--:|--:|--:|--:|--:|--:|");
    let conds = ["alone", "write flood", "read flood"];
    for (s, r) in servers.iter().zip(results) {
        for (row, label) in VICTIM_ROWS.iter().enumerate() {
            for (cond, beside) in conds.iter().enumerate() {
                let field = |f: fn(&RowSample) -> f64| {
                    median(
                        r.victim[cond]
                            .iter()
                            .filter_map(|v| v.as_ref().ok().map(|v| f(&v[row])))
                            .collect(),
                    )
                };
                let us = |v: Option<f64>| cell(v, |v| format!("{v:.1}"));
                let cores = |v: Option<f64>| cell(v, |v| format!("{v:.2}"));
                let agent = match field(|x| x.agent_us) {
                    Some(a) => format!("{a:.1} ({})", us(field(|x| x.queued_us))),
                    None => "—".to_owned(),
                };
                let outside = field(|x| x.round_trip_us - x.agent_us);
                println!(
                    "| {} | {label} | {beside} | {} | {agent} | {} | {} | {} | {} |",
                    s.name(),
                    us(field(|x| x.round_trip_us)),
                    outside.map_or("—".to_owned(), |v| format!("{v:.1}")),
                    cores(field(|x| x.server_cores)),
                    cores(field(|x| x.victim_cores)),
                    cores(field(|x| x.flood_cores)),
                );
            }
        }
    }
}

fn ok(v: &[Result<f64, String>]) -> Vec<f64> {
    v.iter().filter_map(|r| r.as_ref().ok().copied()).collect()
}
