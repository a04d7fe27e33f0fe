//! The comparison as a table: aligned text for the terminal and the run's
//! `comparison.txt`, Markdown for README's "Verified on real hardware".

use crate::compare::{Comparison, Outcome, Row};

/// The text of the result column.
pub fn outcome_text(o: &Outcome) -> String {
    let with = |word: &str, why: &str| {
        if why.is_empty() {
            word.to_owned()
        } else {
            format!("{word} ({why})")
        }
    };
    match o {
        Outcome::Match(why) => with("match", why),
        Outcome::Mismatch(why) => with("MISMATCH", why),
        Outcome::NotComparable(why) => with("not comparable", why),
    }
}

const HEADER: [&str; 5] = ["gpu", "field", "ours", "nvidia-smi", "result"];

fn cells(r: &Row) -> [String; 5] {
    [
        r.gpu.clone(),
        r.field.clone(),
        r.ours.clone(),
        r.theirs.clone(),
        outcome_text(&r.outcome),
    ]
}

/// The rows as an aligned text table with a summary line.
pub fn render_text(c: &Comparison) -> String {
    let mut widths = HEADER.map(str::len);
    for r in &c.rows {
        for (w, cell) in widths.iter_mut().zip(cells(r)) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [String; 5]| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(HEADER.map(str::to_owned));
    for r in &c.rows {
        out.push_str(&line(cells(r)));
    }
    out.push_str(&summary(c));
    out.push('\n');
    out
}

/// The rows as a Markdown table (for README) with a summary line.
pub fn render_markdown(c: &Comparison) -> String {
    let esc = |s: &str| s.replace('|', "\\|");
    let mut out = format!(
        "| {} |\n|{}\n",
        HEADER.join(" | "),
        "---|".repeat(HEADER.len())
    );
    for r in &c.rows {
        let row: Vec<String> = cells(r).iter().map(|c| esc(c)).collect();
        out.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    out.push('\n');
    out.push_str(&summary(c));
    out.push('\n');
    out
}

/// "N rows: M match, X mismatch, K not comparable".
pub fn summary(c: &Comparison) -> String {
    let (m, x, n) = c.counts();
    format!(
        "{} rows: {m} match, {x} mismatch, {n} not comparable",
        c.rows.len()
    )
}
