//! Human-readable output of the CLI.

use std::fmt::Write as _;

use llm_policy_core::decision::Decision;

/// A short, readable rendering of a decision (with the per-rule trace when it has one).
pub fn decision_text(d: &Decision) -> String {
    let mut s = String::new();
    let status = d
        .actions
        .status
        .map(|s| format!(" ({s})"))
        .unwrap_or_default();
    let _ = writeln!(
        s,
        "decision: {}{status}",
        d.decision.as_str().to_uppercase()
    );
    let _ = writeln!(s, "reason:   {}", d.reason);
    if !d.matched_rules.is_empty() {
        let _ = writeln!(s, "matched:  {}", d.matched_rules.join(", "));
    }
    if !d.metadata.shadow_matches.is_empty() {
        let _ = writeln!(s, "shadow:   {}", d.metadata.shadow_matches.join(", "));
    }
    for e in &d.metadata.errors {
        let _ = writeln!(s, "error:    rule `{}`: {}", e.rule, e.message);
    }
    if !d.actions.headers.is_empty() {
        let h: Vec<String> = d
            .actions
            .headers
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        let _ = writeln!(s, "headers:  {}", h.join("; "));
    }
    if d.actions.audit || d.actions.alert.is_some() {
        let alert = d
            .actions
            .alert
            .map(|a| format!("{a:?}").to_lowercase())
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(s, "audit:    {}   alert: {alert}", d.actions.audit);
    }
    for c in &d.actions.counters {
        let kind = format!("{:?}", c.kind).to_lowercase();
        let scope = format!("{:?}", c.scope).to_lowercase();
        let _ = writeln!(
            s,
            "counter:  {} +{} {kind} (limit {} per {}s, {scope}, rule `{}`)",
            c.key, c.amount, c.limit, c.window_secs, c.rule
        );
    }
    if d.metadata.needs_remote {
        let _ = writeln!(
            s,
            "remote:   the server must finish rules {}",
            d.metadata.remote_rules.join(", ")
        );
    }
    let _ = writeln!(
        s,
        "cache:    {} key {}…   time: {} µs",
        if d.metadata.cacheable {
            "cacheable,"
        } else {
            "not cacheable,"
        },
        d.metadata.cache_key.get(..12).unwrap_or_default(),
        d.evaluation_time_us
    );
    if let Some(trace) = &d.explain {
        let _ = writeln!(s, "rules:");
        for t in trace {
            let shadow = if t.shadow { " (shadow)" } else { "" };
            let detail = t
                .detail
                .as_ref()
                .map(|d| format!(": {d}"))
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "  {:>5}  {:<34} {}{shadow}{detail}",
                t.priority, t.rule, t.outcome
            );
        }
    }
    s
}
