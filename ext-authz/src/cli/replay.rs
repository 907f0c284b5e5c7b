//! `llm-policy replay --audit FILE --policy DIR`: re-decides recorded requests with other
//! policies and prints the difference by rule — impact analysis before a change.
//!
//! It reads `decision` records that carry their context (the server's `audit.context: true`).
//! What a replay cannot see, it says, per change:
//! - **text**: a record holds the request's text only as `audit.prompts` says (off: none; hash;
//!   redact), so a namespace whose rules read `request.prompt`, `request.prompt_folded` or
//!   `request.messages` is replayed against that form; the scanners' findings
//!   (`prompt_entities`, `prompt_injection`) and the token estimate are recorded as they were;
//! - **counters**: their state is not in the record; a counter whose rule decided the recorded
//!   request (it was over) is answered over again, every other one under;
//! - **plugins** do not run: their rules answer per their `onError`.

use std::collections::BTreeMap;
use std::io::BufRead as _;
use std::path::PathBuf;

use clap::Args;
use llm_policy_core::decision::Charge;
use llm_policy_core::model::PluginRef;
use llm_policy_core::schema::FieldRef;
use llm_policy_core::{
    ContextConfig, CounterCheck, EvalOptions, Hooks, PluginCheck, PolicySet, RequestContext,
};
use serde::Serialize;

/// `llm-policy replay` arguments.
#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// Audit log files (JSON lines, as the server writes them; repeat).
    #[arg(long, required = true)]
    pub audit: Vec<PathBuf>,
    /// The policies to replay against (file or directory; repeat).
    #[arg(long, required = true)]
    pub policy: Vec<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: super::Format,
    /// List at most this many changed records (text; JSON lists them all).
    #[arg(long, default_value_t = 20)]
    pub show: usize,
    /// Exit 1 when a decision changed (a CI gate on a policy change); exit 2 when nothing could
    /// be replayed or a line is not a record (a gate that saw nothing must not pass).
    #[arg(long)]
    pub fail_on_change: bool,
}

/// One recorded decision, as replay reads it.
#[derive(Debug, serde::Deserialize)]
struct Recorded {
    kind: String,
    #[serde(default)]
    id: String,
    #[serde(default)]
    decision: String,
    #[serde(default)]
    matched_rules: Vec<String>,
    #[serde(default)]
    deciding_rule: Option<String>,
    #[serde(default)]
    context: Option<RequestContext>,
}

/// What replay reports.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// The bundle replayed against.
    pub bundle: String,
    /// Decision records read.
    pub records: usize,
    /// Records replayed (those with a context).
    pub replayed: usize,
    /// Records without a context (written without `audit.context`): not replayed.
    pub without_context: usize,
    /// Lines that are not records.
    pub unreadable: usize,
    /// Replayed with the same verdict and deciding rule.
    pub unchanged: usize,
    /// Of them, how many the replay could not see whole (text, counters, plugins): a rule
    /// reading what the record does not hold may have decided otherwise.
    pub unchanged_approximate: usize,
    /// Replayed with another verdict or deciding rule.
    pub changed: usize,
    /// The changes by (from, to, rule), most first.
    pub by_rule: Vec<RuleChange>,
    /// Every changed record.
    pub changes: Vec<Change>,
}

/// Changes with one (from, to, rule).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleChange {
    /// The recorded verdict.
    pub from: String,
    /// The replayed verdict.
    pub to: String,
    /// The rule deciding the replay (`default` when none did), and where it is written.
    pub rule: String,
    /// How many.
    pub count: usize,
    /// Of them, how many the replay could not see whole (text, counters, plugins).
    pub approximate: usize,
}

/// One changed record.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Change {
    /// The record's id.
    pub id: String,
    /// Its namespace.
    pub namespace: String,
    /// The recorded verdict and matched rules.
    pub from: String,
    /// The rules recorded as matched.
    pub from_rules: Vec<String>,
    /// The replayed verdict.
    pub to: String,
    /// The rule deciding the replay.
    pub rule: String,
    /// What the replay could not see: `text`, `counters`, `plugins`.
    pub unseen: Vec<&'static str>,
}

/// Answers counters and plugins as well as a record allows ([`super::replay`]'s doc).
struct ReplayHooks<'a> {
    recorded: &'a Recorded,
    counters: bool,
    plugins: bool,
}

impl Hooks for ReplayHooks<'_> {
    fn plugin(&mut self, _: &str, _: &PluginRef, _: &RequestContext) -> PluginCheck {
        self.plugins = true;
        PluginCheck::Error(String::from("plugins do not run in a replay"))
    }

    fn counter(&mut self, charge: &Charge) -> CounterCheck {
        self.counters = true;
        let decided =
            self.recorded.decision != "allow" && self.recorded.matched_rules.contains(&charge.rule);
        if decided {
            CounterCheck::Over
        } else {
            CounterCheck::Under
        }
    }
}

/// Whether a namespace's rules read the request's text.
fn reads_text(reads: &[FieldRef]) -> bool {
    reads.iter().any(|f| {
        matches!(
            f,
            FieldRef::Prompt | FieldRef::PromptFolded | FieldRef::Messages | FieldRef::Elem(_)
        )
    })
}

/// Replays the records of `args.audit` against `args.policy`.
pub fn replay(args: &ReplayArgs, config: &ContextConfig) -> Result<Report, String> {
    let set = PolicySet::load_with(&args.policy, config)
        .map_err(|d| {
            d.0.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        })?
        .set;
    let mut report = Report {
        bundle: set.bundle().to_string(),
        ..Report::default()
    };
    let mut by_rule: BTreeMap<(String, String, String), (usize, usize)> = BTreeMap::new();
    for path in &args.audit {
        let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        for line in std::io::BufReader::new(file).lines() {
            let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
            if line.trim().is_empty() {
                continue;
            }
            let Ok(recorded) = serde_json::from_str::<Recorded>(&line) else {
                report.unreadable += 1;
                continue;
            };
            if recorded.kind != "decision" {
                continue;
            }
            report.records += 1;
            let Some(ctx) = recorded.context.as_ref() else {
                report.without_context += 1;
                continue;
            };
            report.replayed += 1;
            let mut hooks = ReplayHooks {
                recorded: &recorded,
                counters: false,
                plugins: false,
            };
            let d = set.evaluate(ctx, &EvalOptions::default(), &mut hooks);
            let to = d.decision.as_str().to_string();
            let rule = d
                .metadata
                .deciding_rule
                .clone()
                .unwrap_or_else(|| String::from("default"));
            // Records name their deciding rule; older ones only the rules that matched.
            let was = recorded
                .deciding_rule
                .as_ref()
                .or(recorded.matched_rules.first());
            let same_rule = was == d.metadata.deciding_rule.as_ref();
            let mut unseen = Vec::new();
            if reads_text(set.reads(&ctx.namespace)) {
                unseen.push("text");
            }
            if hooks.counters {
                unseen.push("counters");
            }
            if hooks.plugins {
                unseen.push("plugins");
            }
            if to == recorded.decision && same_rule {
                report.unchanged += 1;
                if !unseen.is_empty() {
                    report.unchanged_approximate += 1;
                }
                continue;
            }
            report.changed += 1;
            let located = match set.rule(&ctx.namespace, &rule) {
                Some(info) => format!(
                    "{rule} ({}{})",
                    info.origin.file,
                    info.origin
                        .position
                        .map(|p| format!(":{}", p.line))
                        .unwrap_or_default()
                ),
                None => rule.clone(),
            };
            let entry = by_rule
                .entry((recorded.decision.clone(), to.clone(), located))
                .or_default();
            entry.0 += 1;
            if !unseen.is_empty() {
                entry.1 += 1;
            }
            report.changes.push(Change {
                id: recorded.id.clone(),
                namespace: ctx.namespace.clone(),
                from: recorded.decision.clone(),
                from_rules: recorded.matched_rules.clone(),
                to,
                rule,
                unseen,
            });
        }
    }
    report.by_rule = by_rule
        .into_iter()
        .map(|((from, to, rule), (count, approximate))| RuleChange {
            from,
            to,
            rule,
            count,
            approximate,
        })
        .collect();
    report.by_rule.sort_by_key(|c| std::cmp::Reverse(c.count));
    Ok(report)
}

/// The report as text.
pub fn text(report: &Report, show: usize) -> String {
    let mut out = format!(
        "replayed {} of {} decision records against bundle {}: {} unchanged, {} changed",
        report.replayed, report.records, report.bundle, report.unchanged, report.changed
    );
    if report.without_context > 0 {
        out.push_str(&format!(
            "; {} without a context (recorded without audit.context) not replayed",
            report.without_context
        ));
    }
    if report.unreadable > 0 {
        out.push_str(&format!("; {} unreadable lines", report.unreadable));
    }
    out.push('\n');
    if report.unchanged_approximate > 0 {
        out.push_str(&format!(
            "{} of the unchanged are approximate: the namespace's rules read what the records do not hold (text, counters, plugins)\n",
            report.unchanged_approximate
        ));
    }
    if !report.by_rule.is_empty() {
        out.push_str("\nchanges by rule:\n");
        for c in &report.by_rule {
            out.push_str(&format!(
                "  {:>8} → {:<8} {:>6}  {}{}\n",
                c.from,
                c.to,
                c.count,
                c.rule,
                if c.approximate > 0 {
                    format!("  ({} approximate)", c.approximate)
                } else {
                    String::new()
                }
            ));
        }
        out.push_str("\nchanged records:\n");
        for c in report.changes.iter().take(show) {
            out.push_str(&format!(
                "  {} [{}] {} ({}) → {} ({}){}\n",
                c.id,
                c.namespace,
                c.from,
                if c.from_rules.is_empty() {
                    String::from("default")
                } else {
                    c.from_rules.join(", ")
                },
                c.to,
                c.rule,
                if c.unseen.is_empty() {
                    String::new()
                } else {
                    format!("  unseen: {}", c.unseen.join(", "))
                }
            ));
        }
        if report.changes.len() > show {
            out.push_str(&format!(
                "  … {} more (--show, or --format json)\n",
                report.changes.len() - show
            ));
        }
        if report.by_rule.iter().any(|c| c.approximate > 0) {
            out.push_str("\napproximate: the replay could not see all the decision read — text (records hold it only as audit.prompts says), counters (their state then is not recorded; a counter that decided the recorded request stays over, others are under) or plugins (not run: their onError applies)\n");
        }
    }
    out
}
