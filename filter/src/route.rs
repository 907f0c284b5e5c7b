//! Which requests the filter checks: LLM API calls, by path and host. The others pass untouched,
//! their bodies never buffered.

use llm_policy_core::context::{Api, Provider};
use llm_policy_core::reply;

use crate::config::RoutesConfig;

/// The configured route matcher.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    /// Exact paths.
    exact: Vec<String>,
    /// Path prefixes (patterns that ended in `*`).
    prefixes: Vec<String>,
    /// Hosts, lower case, without port; empty: any.
    hosts: Vec<String>,
}

impl Routes {
    /// Compiles the configuration.
    pub fn new(config: &RoutesConfig) -> Routes {
        let mut r = Routes::default();
        for p in &config.paths {
            // Patterns are compared in the form classification reads (lower case, ...).
            match p.strip_suffix('*') {
                Some(prefix) => {
                    let mut wide = reply::api_path(prefix).into_owned();
                    if prefix.ends_with('/') && !wide.ends_with('/') {
                        wide.push('/');
                    }
                    r.prefixes.push(wide);
                }
                None => r.exact.push(reply::api_path(p).into_owned()),
            }
        }
        r.hosts = config.hosts.iter().map(|h| host_name(h)).collect();
        r
    }

    /// The provider of the request if the filter checks it, `None` if it passes untouched.
    pub fn check(&self, path: &str, headers: &[(String, String)]) -> Option<Provider> {
        if !self.hosts.is_empty() {
            let authority = headers
                .iter()
                .find(|(k, _)| k == ":authority" || k.eq_ignore_ascii_case("host"))
                .map(|(_, v)| host_name(v))
                .unwrap_or_default();
            if !self.hosts.contains(&authority) {
                return None;
            }
        }
        let (provider, api, wide) = reply::classify(path, headers);
        if self.exact.is_empty() && self.prefixes.is_empty() {
            // The APIs the core knows, and every other endpoint of the providers' API trees
            // (threads, files, token counting, realtime sessions, ...).
            let provider_tree = ["/v1/", "/openai/", "/anthropic/"]
                .iter()
                .any(|p| wide.starts_with(p));
            return (api != Api::Other || provider_tree).then_some(provider);
        }
        let hit = self.exact.iter().any(|e| *e == *wide)
            || self.prefixes.iter().any(|p| wide.starts_with(p.as_str()));
        hit.then_some(provider)
    }
}

/// A host as compared: lower case, no port, no trailing dot.
fn host_name(authority: &str) -> String {
    strip_port(authority.trim())
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

fn strip_port(authority: &str) -> &str {
    // `[::1]:443` keeps its brackets; `host:443` loses the port.
    match authority.rsplit_once(':') {
        Some((host, port))
            if !host.is_empty()
                && !port.contains(']')
                && port.bytes().all(|b| b.is_ascii_digit()) =>
        {
            host
        }
        _ => authority,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_check_the_llm_apis_only_however_spelt() {
        let r = Routes::new(&RoutesConfig::default());
        assert_eq!(r.check("/v1/chat/completions", &[]), Some(Provider::Openai));
        assert_eq!(
            r.check("/v1//chat/./completions?x=1", &[]),
            Some(Provider::Openai)
        );
        assert_eq!(r.check("/v1/messages", &[]), Some(Provider::Anthropic));
        assert_eq!(
            r.check(
                "/openai/deployments/gpt/chat/completions?api-version=1",
                &[]
            ),
            Some(Provider::Openai)
        );
        // Spellings a lenient upstream may accept are checked too.
        for spelt in [
            "/v1/chat%2Fcompletions",
            "/v1/Chat/Completions",
            "/v1/chat/completions;x=1",
            "/v1\\chat\\completions",
            "/V1/CHAT/COMPLETIONS/",
        ] {
            assert_eq!(r.check(spelt, &[]), Some(Provider::Openai), "{spelt}");
        }
        // Every endpoint of the providers' API trees is checked, not only the known ones.
        for other in [
            "/v1/models",
            "/v1/threads/runs",
            "/v1/messages/count_tokens",
            "/v1/complete",
        ] {
            assert!(r.check(other, &[]).is_some(), "{other}");
        }
        assert_eq!(r.check("/healthz", &[]), None);
        assert_eq!(r.check("/", &[]), None);
    }

    #[test]
    fn configured_paths_and_hosts() {
        let r = Routes::new(&RoutesConfig {
            paths: vec!["/llm/*".into(), "/v1/chat/completions".into()],
            hosts: vec!["api.example.com".into()],
        });
        let host = h(&[(":authority", "API.example.com.:443")]);
        assert!(r.check("/llm/anything", &host).is_some());
        assert!(r.check("/v1/chat/completions", &host).is_some());
        assert!(r.check("/v1/chat/../chat/completions", &host).is_some());
        assert!(r.check("/V1/CHAT/COMPLETIONS", &host).is_some());
        assert!(r.check("/v1/messages", &host).is_none());
        assert!(r
            .check("/llm/x", &h(&[(":authority", "other.com")]))
            .is_none());
    }
}
