//! `llm-policy`: the policy CLI (`validate`, `eval`, `test`, ...) and the policy server (`serve`),
//! one binary. See [`llm_policy_server::cli`].

fn main() -> std::process::ExitCode {
    llm_policy_server::install_crypto_provider();
    llm_policy_server::cli::main()
}
