//! One rule: its condition (CEL, DSL or plugin) and its action.

#[cfg(not(feature = "cel"))]
use alloc::string::String;
use alloc::vec::Vec;

use super::{Compiler, Pending, RuleSite};
use crate::condition::Cond;
use crate::diagnostic::Code;
use crate::document::Document;
use crate::dsl;
use crate::model::{Mode, Phase};
use crate::set::{CompiledRule, Origin};

impl Compiler {
    pub(super) fn compile_rule(
        &mut self,
        p: &Pending,
        doc: &Document,
        policy: usize,
        origin: Origin,
    ) -> Option<CompiledRule> {
        let rule = &p.rule;
        let site = RuleSite {
            doc,
            file: &p.file,
            pointer: &p.pointer,
            id: &rule.id,
        };
        let before = self.errors.len();
        let w = &rule.when;
        let set = [w.cel.is_some(), w.matcher.is_some(), w.plugin.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if set != 1 {
            self.errors.push(site.error(
                Code::InvalidCondition,
                "/when",
                "`when` needs exactly one of `cel`, `match`, `plugin`",
            ));
            return None;
        }
        let (mut cond, mut index_hint, plugin) = (Cond::Const(false), None, w.plugin.clone());
        if let Some(src) = &w.cel {
            match self.compile_cel(src) {
                Ok(c) => {
                    cond = c.cond;
                    index_hint = c.index_hint;
                    for warning in c.warnings {
                        self.warnings.push(
                            site.warning(warning.code, "/when/cel", warning.message)
                                .help(warning.help),
                        );
                    }
                }
                Err(e) => self
                    .errors
                    .push(site.error(e.code, "/when/cel", e.message).help(e.help)),
            }
        } else if let Some(m) = &w.matcher {
            let mut errs = Vec::new();
            match dsl::compile(m, &self.attrs, "", &mut errs) {
                Some(c) if errs.is_empty() => cond = c,
                _ => {
                    for e in errs {
                        self.errors.push(
                            site.error(
                                e.code,
                                &alloc::format!("/when/match{}", e.pointer),
                                e.message,
                            )
                            .help(e.help),
                        );
                    }
                }
            }
        } else if let Some(pl) = &plugin {
            if pl.name.trim().is_empty() {
                self.errors.push(site.error(
                    Code::InvalidPlugin,
                    "/when/plugin/name",
                    "plugin name must not be empty",
                ));
            }
        }
        let action = self.compile_action(&rule.action, rule.when.plugin.is_some(), &site);
        self.check_phase(rule, &cond, &site);
        if self.errors.len() > before {
            return None;
        }
        let action = action?;
        let mut volatile = plugin.is_some();
        cond.visit_fields(&mut |f| volatile |= f.is_time());
        Some(CompiledRule {
            id: rule.id.clone(),
            origin,
            policy,
            priority: rule.priority,
            shadow: rule.mode == Mode::Shadow,
            on_error: rule.on_error,
            tags: rule.tags.clone(),
            cond,
            index_hint,
            plugin,
            action,
            volatile,
        })
    }

    /// A rule may read only what its phase knows, and a `phase: response` rule may only allow
    /// or deny what is answered (nothing there can be counted, rewritten or asked of a plugin).
    fn check_phase(&mut self, rule: &crate::model::Rule, cond: &Cond, site: &RuleSite<'_>) {
        let mut misread: Option<alloc::string::String> = None;
        let response = rule.phase == Phase::Response;
        cond.visit_fields(&mut |f| {
            let wrong = if response {
                f.dropped_for_answer()
            } else {
                f.is_response()
            };
            if misread.is_none() && wrong {
                misread = Some(f.path());
            }
        });
        let at = if rule.when.cel.is_some() {
            "/when/cel"
        } else {
            "/when/match"
        };
        if let Some(path) = misread {
            let (message, help) = if response {
                (
                    alloc::format!("a `phase: response` rule cannot read `{path}`: it is not kept while the answer is checked"),
                    "response rules read `response.*` and the request's small fields (model, api, principal, a header by name); test the request's text in a request rule",
                )
            } else {
                (
                    alloc::format!("`{path}` is known only once the model answers"),
                    "add `phase: response` to the rule",
                )
            };
            self.errors.push(
                site.error(Code::InvalidPhase, at, message)
                    .help(Some(alloc::string::String::from(help))),
            );
        }
        if !response {
            return;
        }
        let a = &rule.action;
        let refused = [
            (rule.when.plugin.is_some(), "/when/plugin", "a plugin"),
            (a.rate_limit.is_some(), "/action/rateLimit", "a rate limit"),
            (a.budget.is_some(), "/action/budget", "a budget"),
            (a.transform.is_some(), "/action/transform", "a transform"),
            (
                a.decision == crate::model::ActionDecision::Throttle,
                "/action/decision",
                "`throttle`",
            ),
        ];
        for (bad, ptr, what) in refused {
            if bad {
                self.errors.push(site.error(
                    Code::InvalidPhase,
                    ptr,
                    alloc::format!("a `phase: response` rule cannot have {what}: it allows or denies the answer as it passes"),
                ));
            }
        }
    }

    #[cfg(feature = "cel")]
    fn compile_cel(
        &self,
        src: &str,
    ) -> Result<crate::cel_lang::CelCompiled, crate::cel_lang::CelIssue> {
        crate::cel_lang::compile(src, &self.attrs)
    }

    #[cfg(not(feature = "cel"))]
    fn compile_cel(&self, _src: &str) -> Result<NoCel, NoCelIssue> {
        Err(NoCelIssue {
            code: Code::CelUnavailable,
            message: String::from("CEL conditions need the `cel` feature of llm-policy-core"),
            help: Some(String::from(
                "use a `match` condition, or build with `--features cel`",
            )),
        })
    }
}

/// Without the `cel` feature a CEL condition never compiles.
#[cfg(not(feature = "cel"))]
struct NoCel {
    cond: Cond,
    index_hint: Option<Cond>,
    warnings: Vec<NoCelIssue>,
}

#[cfg(not(feature = "cel"))]
struct NoCelIssue {
    code: Code,
    message: String,
    help: Option<String>,
}
