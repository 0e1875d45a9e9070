//! Text for a person of `worker reconcile now|history` and `worker backfill` (`--json` prints
//! the same data as JSON).

use std::fmt::Write;

use shared::db::reconciliation_runs::{Counts, Run};

use super::RunReport;
use super::backfill::BackfillReport;

/// A run's summary, its drift per organization and its findings.
pub fn report_text(report: &RunReport) -> String {
    let mut out = format!(
        "run {} ({}{}): {}\n  {}\n",
        report.run_id,
        report.trigger,
        if report.dry_run { ", dry run" } else { "" },
        report.status,
        counts_text(&report.counts)
    );
    if let Some(from) = report.resumed_from {
        let _ = writeln!(out, "  resumed from run {from}'s cursor");
    }
    if let Some(error) = &report.error {
        let _ = writeln!(out, "  error: {error}");
    }
    for drift in &report.drift {
        let state = match (report.dry_run, drift.healed, &drift.note) {
            (true, _, _) => "would heal".to_owned(),
            (_, true, _) => "healed".to_owned(),
            (_, false, Some(note)) => format!("left: {note}"),
            (_, false, None) => "not healed".to_owned(),
        };
        let _ = writeln!(
            out,
            "  {} {}: {state}",
            drift.organization_id, drift.subscription_id
        );
        for change in &drift.changes {
            let _ = writeln!(
                out,
                "      {}: {} -> {}",
                change.field, change.stored, change.stripe
            );
        }
    }
    let findings = [
        ("orphan", &report.orphan_subscriptions),
        ("unlinked", &report.unlinked_subscriptions),
        ("lifetime", &report.lifetime),
        ("several", &report.several_subscriptions),
        ("error", &report.error_details),
    ];
    for (kind, list) in findings {
        for finding in list.iter() {
            let _ = writeln!(
                out,
                "  {kind}: {} {}: {}",
                finding.organization_id.as_deref().unwrap_or("-"),
                finding.subscription_ids.join(","),
                finding.note
            );
        }
    }
    out
}

/// A run's counts, in words.
fn counts_text(c: &Counts) -> String {
    format!(
        "subscriptions listed {}, organizations checked {}, drifted {}, healed {}, orphans {}, \
         unlinked {}, errors {}, events backfilled {}",
        c.subscriptions_listed,
        c.organizations_checked,
        c.drifted,
        c.healed,
        c.orphans,
        c.unlinked,
        c.errors,
        c.events_backfilled
    )
}

/// Recent runs, one line each.
pub fn history_text(runs: &[Run]) -> String {
    if runs.is_empty() {
        return "no reconciliation has run yet\n".to_owned();
    }
    let mut out = String::new();
    for run in runs {
        let _ = writeln!(
            out,
            "{:>6}  {}  {:<8} {:<9}{}  {}{}",
            run.id,
            run.started_at.format("%Y-%m-%d %H:%M:%S"),
            run.trigger,
            run.status,
            if run.dry_run { " dry-run" } else { "" },
            counts_text(&run.counts),
            run.error
                .as_deref()
                .map(|e| format!("  ({e})"))
                .unwrap_or_default()
        );
    }
    out
}

/// A backfill's counts.
pub fn backfill_text(report: &BackfillReport) -> String {
    format!(
        "{}listed {}, already stored {}, {} {}, unreadable {}\n",
        if report.dry_run { "dry run: " } else { "" },
        report.listed,
        report.already_stored,
        if report.dry_run {
            "would insert"
        } else {
            "inserted"
        },
        report.inserted,
        report.unreadable
    )
}
