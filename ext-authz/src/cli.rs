//! The command line: validate, evaluate and test policies, and start the server.
//!
//! Exit codes: `validate` 0 valid, 2 invalid; `eval` 0 evaluated (whatever the decision), 2 invalid
//! input; `test` 0 all passed, 1 a case failed, 2 invalid suite or policy; `serve` 0 after a clean
//! shutdown, 2 on a configuration it cannot start with.

pub mod bundle;
pub mod envoy_config;
pub mod keys;
pub mod replay;
pub mod report;
pub mod suite;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::request::RequestFile;
use clap::{Args, Parser, Subcommand, ValueEnum};
use llm_policy_core::decision::ErrorBody;
use llm_policy_core::schema::FIELDS;
use llm_policy_core::source;
use llm_policy_core::{
    Code, ContextConfig, ContextError, Diagnostics, EvalOptions, LocalOnly, PolicySet,
};

/// `println!` that ignores a closed stdout: `llm-policy eval ... | head -1` must not panic.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($t)*);
    }};
}

/// `print!` that ignores a closed stdout.
macro_rules! outp {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout().lock(), $($t)*);
    }};
}

/// `eprintln!` that ignores a closed stderr.
macro_rules! err {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($t)*);
    }};
}

#[derive(Parser)]
#[command(
    name = "llm-policy",
    version,
    about = "Policy engine for LLM API traffic: validate, evaluate and test policies"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    config: ConfigArgs,
}

/// Options shared by the commands that compile policies.
#[derive(Args)]
struct ConfigArgs {
    /// Context configuration (YAML/JSON): namespaceHeader, principalHeaders, shieldPrefix, maxBodyBytes, maxBatchItems.
    #[arg(long, global = true)]
    context_config: Option<PathBuf>,
}

impl ConfigArgs {
    fn load(&self) -> Result<ContextConfig, Diagnostics> {
        let Some(path) = &self.context_config else {
            return Ok(ContextConfig::default());
        };
        let docs = source::load_file(path).map_err(|d| Diagnostics(vec![d]))?;
        let Some(doc) = docs.first() else {
            return Ok(ContextConfig::default());
        };
        let config: ContextConfig = doc.parse().map_err(|d| Diagnostics(vec![d]))?;
        if let Some((key, message)) = config.problem() {
            let d = llm_policy_core::Diagnostic::error(llm_policy_core::Code::InvalidType, message)
                .at(
                    &path.display().to_string(),
                    doc.position(&format!("/{key}")),
                );
            return Err(Diagnostics(vec![d]));
        }
        Ok(config)
    }
}

/// How a command prints its result.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    /// JSON.
    Json,
    /// Text for a person.
    Text,
}

#[derive(Subcommand)]
enum Command {
    /// Validate policy files or directories (exit 0 valid, 2 invalid).
    Validate {
        /// Policy files or directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Evaluate one request against a policy (exit 0 evaluated, 2 invalid input).
    Eval {
        /// Policy file or directory (repeatable).
        #[arg(long, short, required = true)]
        policy: Vec<PathBuf>,
        /// Request file: {"method", "path", "headers", "body", "time"?}.
        #[arg(long, short)]
        request: PathBuf,
        /// Report every rule's outcome.
        #[arg(long)]
        explain: bool,
        /// Only rules with one of these tags (comma-separated).
        #[arg(long, value_delimiter = ',')]
        tags: Vec<String>,
        /// Output format.
        #[arg(long, value_enum, default_value = "json")]
        format: Format,
    },
    /// Run policy test suites (kind: PolicyTest) (exit 0 pass, 1 failure, 2 invalid).
    Test {
        /// Suite files or directories to search for suites.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Print the request context a request file gives: what conditions see (exit 2 on invalid input).
    Context {
        /// Request file.
        #[arg(long, short)]
        request: PathBuf,
    },
    /// Print the request-context schema (Markdown).
    Schema,
    /// Print the table of validation codes (Markdown).
    Codes,
    /// Run the policy server: Envoy ext_authz (gRPC), REST API, Prometheus metrics, hot reload.
    Serve(crate::server::config::ServeArgs),
    /// Print a complete Envoy 1.40 configuration: listener, the filter and/or ext_authz, clusters.
    EnvoyConfig(envoy_config::EnvoyConfigArgs),
    /// Virtual API keys in a key file: create (the secret printed once), list, revoke.
    Keys(keys::KeysArgs),
    /// Signed policy bundles: keygen, build, sign, verify, push to object storage, history, activate.
    Bundle(bundle::BundleArgs),
    /// Re-decide recorded requests (audit records with `audit.context`) with other policies: the
    /// difference by rule (exit 0; with --fail-on-change, 1 when a decision changed; 2 invalid).
    Replay(replay::ReplayArgs),
}

/// A command's text on stdout (exit 0), or its error on stderr (exit 2).
fn print_or_fail(result: Result<String, impl std::fmt::Display>) -> ExitCode {
    match result {
        Ok(text) => {
            outp!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            err!("{e}");
            ExitCode::from(2)
        }
    }
}

fn print_diagnostics(d: &Diagnostics) {
    for diag in &d.0 {
        err!("{diag}");
    }
}

/// Runs the command line.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Serve(args) = &cli.command {
        return crate::server::main(args);
    }
    let config = match cli.config.load() {
        Ok(c) => c,
        Err(d) => {
            print_diagnostics(&d);
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Validate { paths } => validate(&paths, &config),
        Command::Eval {
            policy,
            request,
            explain,
            tags,
            format,
        } => eval(&policy, &request, explain, &tags, format, &config),
        Command::Test { paths } => test(&paths, &config),
        Command::Context { request } => context(&request, &config),
        Command::Schema => {
            out!("# Request context schema\n");
            out!("Generated by `llm-policy schema` from `shared-core/src/schema.rs`; a test keeps this file in sync.");
            out!("Every field is present in every context: conditions never see an undefined field, only the");
            out!("documented absent value. In the DSL a comparison against null is false (use `op: exists`); in");
            out!("CEL, ordering a null (`request.max_tokens > 5` without max_tokens) is an error that follows the");
            out!("rule's `onError`, so write `request.max_tokens != null && request.max_tokens > 5`.\n");
            out!("| field | type | when absent | meaning |\n|---|---|---|---|");
            for f in FIELDS {
                out!("| `{}` | {} | {} | {} |", f.path, f.ty_doc, f.absent, f.doc);
            }
            ExitCode::SUCCESS
        }
        Command::Codes => {
            out!("| code | what |\n|---|---|");
            for c in Code::ALL {
                out!("| `{}` | {} |", c.as_str(), c.summary());
            }
            ExitCode::SUCCESS
        }
        Command::EnvoyConfig(args) => {
            let given = cli.config.context_config.is_some().then_some(&config);
            print_or_fail(envoy_config::generate(&args, given))
        }
        Command::Keys(args) => print_or_fail(keys::run(&args)),
        Command::Bundle(args) => print_or_fail(bundle::run(&args, &config)),
        Command::Replay(args) => match replay::replay(&args, &config) {
            Ok(report) => {
                match args.format {
                    Format::Json => out!(
                        "{}",
                        serde_json::to_string_pretty(&report).unwrap_or_default()
                    ),
                    Format::Text => outp!("{}", replay::text(&report, args.show)),
                }
                if args.fail_on_change && (report.replayed == 0 || report.unreadable > 0) {
                    err!("nothing to judge the change by: {} records replayed, {} unreadable lines (records need audit.context: true)", report.replayed, report.unreadable);
                    ExitCode::from(2)
                } else if args.fail_on_change && report.changed > 0 {
                    ExitCode::from(1)
                } else {
                    ExitCode::SUCCESS
                }
            }
            Err(e) => {
                err!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Serve(_) => ExitCode::from(2),
    }
}

fn validate(paths: &[PathBuf], config: &ContextConfig) -> ExitCode {
    match PolicySet::load_with(paths, config) {
        Ok(out) => {
            for w in &out.warnings {
                err!("{w}");
            }
            let s = out.set.stats();
            out!(
                "valid: {} policies, {} rules ({} native, {} interpreted CEL, {} disabled, {} finished by filter/server) in {} namespaces; bundle {}",
                s.policies,
                s.rules,
                s.rules - s.interpreted,
                s.interpreted,
                s.disabled,
                s.remote,
                s.namespaces,
                out.set.bundle()
            );
            ExitCode::SUCCESS
        }
        Err(d) => {
            print_diagnostics(&d);
            let errors =
                d.0.iter()
                    .filter(|x| x.severity == llm_policy_core::Severity::Error)
                    .count();
            err!("invalid: {errors} error(s)");
            ExitCode::from(2)
        }
    }
}

fn eval(
    policy: &[PathBuf],
    request: &PathBuf,
    explain: bool,
    tags: &[String],
    format: Format,
    config: &ContextConfig,
) -> ExitCode {
    let set = match PolicySet::load_with(policy, config) {
        Ok(out) => out.set,
        Err(d) => {
            print_diagnostics(&d);
            return ExitCode::from(2);
        }
    };
    let Some(req) = read_request(request) else {
        return ExitCode::from(2);
    };
    let ctx = match req.context(&set) {
        Ok(c) => c,
        Err(e) => return rejected(request, &e),
    };
    let mut d = set.evaluate(
        &ctx,
        &EvalOptions {
            tags,
            explain,
            ..EvalOptions::default()
        },
        &mut LocalOnly,
    );
    req.redact(&mut d, set.config());
    match format {
        Format::Json => out!("{}", serde_json::to_string_pretty(&d).unwrap_or_default()),
        Format::Text => outp!("{}", report::decision_text(&d)),
    }
    ExitCode::SUCCESS
}

fn read_request(path: &PathBuf) -> Option<RequestFile> {
    match std::fs::read_to_string(path)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
    {
        Ok(r) => Some(r),
        Err(e) => {
            err!("{}: invalid request file: {e}", path.display());
            None
        }
    }
}

fn context(request: &PathBuf, config: &ContextConfig) -> ExitCode {
    let Some(req) = read_request(request) else {
        return ExitCode::from(2);
    };
    match req.context_with(config, llm_policy_core::context::Needs::ALL) {
        Ok(ctx) => {
            out!("{}", serde_json::to_string_pretty(&ctx).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => rejected(request, &e),
    }
}

/// A request that cannot be evaluated: the error body the proxy answers with, exit 2.
fn rejected(request: &Path, e: &ContextError) -> ExitCode {
    out!(
        "{}",
        serde_json::to_string_pretty(&ErrorBody::from(e)).unwrap_or_default()
    );
    err!("{}: request rejected: {e}", request.display());
    ExitCode::from(2)
}

fn test(paths: &[PathBuf], config: &ContextConfig) -> ExitCode {
    let suites = match suite::find_suites(paths) {
        Ok(s) => s,
        Err(d) => {
            print_diagnostics(&d);
            return ExitCode::from(2);
        }
    };
    if suites.is_empty() {
        err!("no test suites (kind: PolicyTest) found");
        return ExitCode::from(2);
    }
    let (mut passed, mut failed, mut invalid) = (0usize, 0usize, 0usize);
    for doc in &suites {
        match suite::run_suite(doc, config) {
            Ok(r) => {
                for c in &r.cases {
                    let at = c.line.map(|l| format!(":{l}")).unwrap_or_default();
                    if c.diffs.is_empty() {
                        passed += 1;
                        out!("PASS {}{at} {}", r.file, c.name);
                    } else {
                        failed += 1;
                        out!("FAIL {}{at} {}", r.file, c.name);
                        for d in &c.diffs {
                            out!("     {d}");
                        }
                    }
                }
            }
            Err(d) => {
                invalid += 1;
                err!("ERROR {}:", doc.file);
                print_diagnostics(&d);
            }
        }
    }
    out!("{passed} passed, {failed} failed");
    if invalid > 0 {
        ExitCode::from(2)
    } else if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
