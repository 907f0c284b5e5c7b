//! `llm-policy keys create|list|revoke`: virtual API keys in a key file (`--keys-file` of
//! `envoy-config`, `keysFile` of the server). A new key's secret is printed once; the file holds
//! only its SHA-256. A running server's keys are managed through its REST API (`/v1/keys`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use llm_policy_core::identity::{load_keys, KeyRecord};

use crate::keys::{self, NewKey};

/// `llm-policy keys` arguments.
#[derive(Debug, Clone, Args)]
pub struct KeysArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: KeysCommand,
    /// The key file (created by the first `create`).
    #[arg(long, global = true, default_value = "keys.json")]
    pub file: PathBuf,
}

/// The `keys` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum KeysCommand {
    /// Make a key: its secret is printed once (stdout), its record added to the file.
    Create {
        /// The key's public name (default: `key-` and 8 random hex digits).
        #[arg(long)]
        id: Option<String>,
        /// A principal attribute, `name=value` (repeat: `--principal id=alice --principal tier=pro`).
        #[arg(long, value_parser = attribute)]
        principal: Vec<(String, String)>,
        /// The policy namespace of the key's requests.
        #[arg(long)]
        namespace: Option<String>,
        /// The key stops working after this many seconds, or with a unit: `90d`, `12h`, `30m`.
        #[arg(long, value_parser = duration)]
        expires_in: Option<i64>,
    },
    /// List the keys (id, principal, namespace, expiry, revoked; never a secret).
    List,
    /// Revoke a key by id (its record stays, refused as revoked).
    Revoke {
        /// The key's id.
        id: String,
    },
}

fn attribute(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected name=value, got `{text}`"))
}

fn duration(text: &str) -> Result<i64, String> {
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, "s"),
    };
    let n: i64 = digits
        .parse()
        .map_err(|_| format!("expected a number of seconds or e.g. `90d`, got `{text}`"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("unknown unit in `{text}` (s, m, h, d)")),
    };
    n.checked_mul(scale)
        .filter(|s| *s > 0)
        .ok_or_else(|| format!("`{text}` is not a positive duration"))
}

fn read(path: &Path) -> Result<Vec<KeyRecord>, String> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let table = load_keys(path).map_err(|d| {
        d.0.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    let mut records: Vec<KeyRecord> = table.records().cloned().collect();
    records.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(records)
}

/// Runs a `keys` command: `Ok` text for stdout, or the error.
pub fn run(args: &KeysArgs) -> Result<String, String> {
    let mut records = read(&args.file)?;
    let shown = args.file.display();
    match &args.command {
        KeysCommand::Create {
            id,
            principal,
            namespace,
            expires_in,
        } => {
            let now = keys::unix_now();
            let spec = NewKey {
                id: id.clone(),
                principal: principal.iter().cloned().collect::<BTreeMap<_, _>>(),
                namespace: namespace.clone(),
                expires: expires_in.map(|s| now.saturating_add(s)),
            };
            let (record, secret) = keys::create(&spec, now).map_err(|e| e.to_string())?;
            if records.iter().any(|r| r.id == record.id) {
                return Err(format!("{shown}: a key `{}` exists", record.id));
            }
            records.push(record.clone());
            keys::write_file(&args.file, &records).map_err(|e| format!("{shown}: {e}"))?;
            Ok(format!("{secret}\n"))
        }
        KeysCommand::List => Ok(records
            .iter()
            .map(|r| {
                let attrs = r
                    .principal
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",");
                format!(
                    "{}\t{}\tnamespace={}\texpires={}\t{}\n",
                    r.id,
                    if attrs.is_empty() { "-" } else { &attrs },
                    r.namespace.as_deref().unwrap_or("default"),
                    r.expires
                        .map_or_else(|| String::from("never"), |e| e.to_string()),
                    if r.revoked { "revoked" } else { "active" }
                )
            })
            .collect()),
        KeysCommand::Revoke { id } => {
            let record = records
                .iter_mut()
                .find(|r| &r.id == id)
                .ok_or_else(|| format!("{shown}: no key `{id}`"))?;
            record.revoked = true;
            keys::write_file(&args.file, &records).map_err(|e| format!("{shown}: {e}"))?;
            Ok(format!("revoked {id}\n"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration("90d"), Ok(90 * 86_400));
        assert_eq!(duration("30"), Ok(30));
        assert!(duration("0s").is_err());
        assert!(duration("5w").is_err());
        assert!(duration("99999999999999999d").is_err());
    }

    #[test]
    fn create_list_revoke_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys.json");
        let run_cmd = |command| {
            run(&KeysArgs {
                command,
                file: file.clone(),
            })
        };
        let secret = run_cmd(KeysCommand::Create {
            id: Some("alice".into()),
            principal: vec![("tier".into(), "pro".into())],
            namespace: None,
            expires_in: Some(60),
        })
        .unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(!text.contains(secret.trim()));
        let listed = run_cmd(KeysCommand::List).unwrap();
        assert!(
            listed.starts_with("alice\ttier=pro\tnamespace=default"),
            "{listed}"
        );
        assert!(run_cmd(KeysCommand::Create {
            id: Some("alice".into()),
            principal: vec![],
            namespace: None,
            expires_in: None,
        })
        .is_err());
        run_cmd(KeysCommand::Revoke { id: "alice".into() }).unwrap();
        assert!(run_cmd(KeysCommand::List).unwrap().contains("revoked"));
        assert!(run_cmd(KeysCommand::Revoke { id: "bob".into() }).is_err());
    }
}
