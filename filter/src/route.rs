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
            match p.strip_suffix('*') {
                Some(prefix) => r.prefixes.push(prefix.to_string()),
                None => r.exact.push(p.clone()),
            }
        }
        r.hosts = config
            .hosts
            .iter()
            .map(|h| strip_port(h).to_ascii_lowercase())
            .collect();
        r
    }

    /// The provider of the request if the filter checks it, `None` if it passes untouched.
    pub fn check(&self, path: &str, headers: &[(String, String)]) -> Option<Provider> {
        if !self.hosts.is_empty() {
            let authority = headers
                .iter()
                .find(|(k, _)| k == ":authority" || k.eq_ignore_ascii_case("host"))
                .map(|(_, v)| strip_port(v).to_ascii_lowercase())
                .unwrap_or_default();
            if !self.hosts.contains(&authority) {
                return None;
            }
        }
        let (provider, api) = reply::classify(path, headers);
        if self.exact.is_empty() && self.prefixes.is_empty() {
            return (api != Api::Other).then_some(provider);
        }
        let normalized = reply::normalize_path(path);
        let hit = self.exact.contains(&normalized)
            || self
                .prefixes
                .iter()
                .any(|p| normalized.starts_with(p.as_str()));
        hit.then_some(provider)
    }
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
        assert_eq!(r.check("/v1/models", &[]), None);
        assert_eq!(r.check("/healthz", &[]), None);
    }

    #[test]
    fn configured_paths_and_hosts() {
        let r = Routes::new(&RoutesConfig {
            paths: vec!["/llm/*".into(), "/v1/chat/completions".into()],
            hosts: vec!["api.example.com".into()],
        });
        let host = h(&[(":authority", "API.example.com:443")]);
        assert!(r.check("/llm/anything", &host).is_some());
        assert!(r.check("/v1/chat/completions", &host).is_some());
        assert!(r.check("/v1/chat/../chat/completions", &host).is_some());
        assert!(r.check("/v1/messages", &host).is_none());
        assert!(r
            .check("/llm/x", &h(&[(":authority", "other.com")]))
            .is_none());
    }
}
