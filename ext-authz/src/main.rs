//! `llm-policy`: validate, evaluate and test llm-policy policies.
//!
//! Exit codes: `validate` 0 valid, 2 invalid; `eval` 0 evaluated (whatever the decision), 2 invalid
//! input; `test` 0 all passed, 1 a case failed, 2 invalid suite or policy.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use llm_policy_core::decision::ErrorBody;
use llm_policy_core::schema::FIELDS;
use llm_policy_core::{Diagnostics, EvalOptions, LocalOnly, PolicySet};
use llm_policy_server::request::RequestFile;
use llm_policy_server::{report, suite};

#[derive(Parser)]
#[command(
    name = "llm-policy",
    version,
    about = "Policy engine for LLM API traffic: validate, evaluate and test policies"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Json,
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
    /// Print the request-context schema (Markdown).
    Schema,
}

fn print_diagnostics(d: &Diagnostics) {
    for diag in &d.0 {
        eprintln!("{diag}");
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { paths } => validate(&paths),
        Command::Eval {
            policy,
            request,
            explain,
            tags,
            format,
        } => eval(&policy, &request, explain, &tags, format),
        Command::Test { paths } => test(&paths),
        Command::Schema => {
            println!("| field | type | when absent | meaning |\n|---|---|---|---|");
            for f in FIELDS {
                println!("| `{}` | {} | {} | {} |", f.path, f.ty, f.absent, f.doc);
            }
            ExitCode::SUCCESS
        }
    }
}

fn validate(paths: &[PathBuf]) -> ExitCode {
    match PolicySet::load(paths) {
        Ok(out) => {
            for w in &out.warnings {
                eprintln!("{w}");
            }
            let s = out.set.stats();
            println!(
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
            eprintln!("invalid: {errors} error(s)");
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
) -> ExitCode {
    let set = match PolicySet::load(policy) {
        Ok(out) => out.set,
        Err(d) => {
            print_diagnostics(&d);
            return ExitCode::from(2);
        }
    };
    let req: RequestFile = match std::fs::read_to_string(request)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{}: invalid request file: {e}", request.display());
            return ExitCode::from(2);
        }
    };
    let ctx = match req.context(&set) {
        Ok(c) => c,
        Err(e) => {
            // The same error body the proxy answers with.
            println!(
                "{}",
                serde_json::to_string_pretty(&ErrorBody::from(&e)).unwrap_or_default()
            );
            eprintln!("{}: request rejected: {e}", request.display());
            return ExitCode::from(2);
        }
    };
    let d = set.evaluate(&ctx, &EvalOptions { tags, explain }, &mut LocalOnly);
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&d).unwrap_or_default()),
        Format::Text => print!("{}", report::decision_text(&d)),
    }
    ExitCode::SUCCESS
}

fn test(paths: &[PathBuf]) -> ExitCode {
    let suites = match suite::find_suites(paths) {
        Ok(s) => s,
        Err(d) => {
            print_diagnostics(&d);
            return ExitCode::from(2);
        }
    };
    if suites.is_empty() {
        eprintln!("no test suites (kind: PolicyTest) found");
        return ExitCode::from(2);
    }
    let (mut passed, mut failed, mut invalid) = (0usize, 0usize, 0usize);
    for path in &suites {
        match suite::run_suite(path) {
            Ok(r) => {
                for c in &r.cases {
                    let at = c.line.map(|l| format!(":{l}")).unwrap_or_default();
                    if c.diffs.is_empty() {
                        passed += 1;
                        println!("PASS {}{at} {}", r.file, c.name);
                    } else {
                        failed += 1;
                        println!("FAIL {}{at} {}", r.file, c.name);
                        for d in &c.diffs {
                            println!("     {d}");
                        }
                    }
                }
            }
            Err(d) => {
                invalid += 1;
                eprintln!("ERROR {}:", path.display());
                print_diagnostics(&d);
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if invalid > 0 {
        ExitCode::from(2)
    } else if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
