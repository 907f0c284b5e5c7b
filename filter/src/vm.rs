//! The configured state of one worker VM (what Envoy calls a plugin instance: the filter's
//! configuration, compiled): the bundle, the route matcher, the local counter table and the
//! decision cache. Requests share it (`Rc`); a new configuration or bundle makes a new one, and
//! requests in flight keep the one they started with.

use std::cell::RefCell;

use llm_policy_core::identity::KeyTable;
use llm_policy_core::{Diagnostics, PolicySet};

use crate::cache::DecisionCache;
use crate::config::FilterConfig;
use crate::counters::Counters;
use crate::route::Routes;

/// One VM's configured state.
#[derive(Debug)]
pub struct Vm {
    /// The bundle serving (`None` until the first sync when the configuration has none).
    pub set: Option<PolicySet>,
    /// The configuration it came with.
    pub config: FilterConfig,
    /// The virtual API keys (from the configuration, or the last sync that brought keys).
    pub keys: KeyTable,
    /// Which requests are checked.
    pub routes: Routes,
    /// Local rate-limit counters (shared data).
    pub counters: Counters,
    /// Cacheable decisions of this VM.
    pub cache: RefCell<DecisionCache>,
    /// Whether "a rule needs the server, none is configured" was logged (once per VM state).
    pub warned_no_server: std::cell::Cell<bool>,
    /// Failed calls to the server (their log lines are thinned out).
    pub server_failures: std::cell::Cell<u64>,
    /// Decisions made (every 16th is timed).
    pub decisions: std::cell::Cell<u64>,
    /// A canary's candidate, decided beside the bundle (from the sync; shared by the VM states
    /// of one candidate so its counts carry on).
    pub canary: Option<std::rc::Rc<crate::canary::CanaryRun>>,
}

impl Vm {
    /// Parses the filter configuration and compiles its bundle. Errors are located (file, line,
    /// column) in the configuration or in the inline policies.
    pub fn configure(text: &str) -> Result<Vm, Diagnostics> {
        let config = FilterConfig::parse(text)?;
        let set = config.compile_policies()?;
        if set.is_none() && config.sync.is_none() {
            return Err(Diagnostics(vec![llm_policy_core::Diagnostic::error(
                llm_policy_core::Code::MissingField,
                "no policies: set `policies` to the bundle (YAML or JSON text), or `sync` to fetch it from the server",
            )
            .at(crate::config::CONFIG_FILE, None)]));
        }
        let keys = config.keys();
        Ok(Vm::new(config, set, keys))
    }

    /// The state serving `set` and `keys` under `config`.
    pub fn new(config: FilterConfig, set: Option<PolicySet>, keys: KeyTable) -> Vm {
        Vm {
            routes: Routes::new(&config.routes),
            counters: Counters::new(
                config.local_counter_slots,
                config.failure_mode == crate::config::FailureMode::Closed,
            ),
            cache: RefCell::new(DecisionCache::new(config.cache_entries)),
            warned_no_server: std::cell::Cell::new(false),
            decisions: std::cell::Cell::new(0),
            server_failures: std::cell::Cell::new(0),
            canary: None,
            set,
            keys,
            config,
        }
    }
}
