//! The proxy-wasm binding: the only file that makes host calls. It maps Envoy's callbacks onto
//! [`crate::request::RequestFlow`] and implements [`Host`] with `proxy_wasm::hostcalls`.
//!
//! The SDK's convenience methods unwrap host results (and `get_map` panics on a header value that
//! is not UTF-8 — a client can send one); a panic traps the VM and fails every request on that
//! worker. So nothing here uses them: headers are read as bytes and converted lossily, and every
//! host call's error is handled. A panic hook logs through the host, should one happen anyway.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType, Status};

use crate::canary::CanaryRun;
use crate::host::{CallRefused, Host, Level, Metric, SharedWrite};
use crate::outbox::Outbox;
use crate::request::{Flow, RequestFlow};
use crate::sync::{BundleSync, Fetched, SyncReport};
use crate::vm::Vm;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    std::panic::set_hook(Box::new(|info| {
        let _ = hostcalls::log(LogLevel::Critical, &format!("llm-policy: panic: {info}"));
    }));
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root {
            vm: None,
            outbox: Rc::default(),
            sync: None,
            vm_id: format!("{:x}", WasmHost.now().as_nanos()),
            node: String::new(),
        })
    });
}}

thread_local! {
    /// Metric ids, defined once per VM.
    static METRICS: RefCell<HashMap<Metric, u32>> = RefCell::new(HashMap::new());
    /// Counter increments not yet handed to Envoy: a host call per increment costs more than
    /// the decision, so they are summed here and flushed on the root context's tick.
    static PENDING: RefCell<HashMap<Metric, u64>> = RefCell::new(HashMap::new());
}

/// Hands the summed counter increments to Envoy.
fn flush_metrics() {
    let pending: Vec<(Metric, u64)> = PENDING.with(|p| {
        p.try_borrow_mut()
            .map(|mut p| p.drain().collect())
            .unwrap_or_default()
    });
    for (metric, value) in pending {
        let id = METRICS.with(|m| m.try_borrow().ok().and_then(|m| m.get(&metric).copied()));
        if let Some(id) = id {
            let _ = hostcalls::increment_metric(id, i64::try_from(value).unwrap_or(i64::MAX));
        }
    }
}

fn define_metrics() {
    METRICS.with(|m| {
        let Ok(mut m) = m.try_borrow_mut() else {
            return;
        };
        if !m.is_empty() {
            return;
        }
        for metric in Metric::ALL {
            let kind = if metric.is_histogram() {
                MetricType::Histogram
            } else {
                MetricType::Counter
            };
            if let Ok(id) = hostcalls::define_metric(kind, metric.name()) {
                m.insert(metric, id);
            }
        }
    });
}

/// How often the root context sends queued usage reports.
const TICK: Duration = Duration::from_millis(200);

/// The root context of one VM: holds its configured state, the usage reports' queue and the
/// bundle sync.
struct Root {
    vm: Option<Rc<Vm>>,
    outbox: Rc<Outbox>,
    sync: Option<BundleSync>,
    /// This VM among its node's workers (the time it was made, in nanoseconds, as hex): names
    /// its canary counts.
    vm_id: String,
    /// Envoy's node id (`--service-node`, or the bootstrap's `node.id`; read when configured),
    /// else `vm-` and this VM's id: what the sync reports this filter as.
    node: String,
}

impl Context for Root {
    fn on_grpc_call_response(&mut self, _token_id: u32, status_code: u32, _response_size: usize) {
        if status_code != 0 {
            WasmHost.metric(Metric::UsageReportFailures, 1);
        }
    }

    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let (Some(sync), Some(vm)) = (&mut self.sync, &self.vm) else {
            return;
        };
        let headers = if num_headers > 0 {
            hostcalls::get_map_bytes(MapType::HttpCallResponseHeaders).unwrap_or_default()
        } else {
            Vec::new()
        };
        let value = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        let status = value(":status").and_then(|s| s.parse::<u16>().ok());
        let body = if body_size > 0 && body_size <= crate::sync::MAX_BUNDLE_BYTES {
            hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
                .ok()
                .flatten()
        } else {
            None
        };
        let fetched = sync.on_answer(
            &mut WasmHost,
            token_id,
            status,
            value("etag"),
            body,
            &vm.config.context,
        );
        match fetched {
            Fetched::New(set, keys, candidate) => {
                let keys = keys.unwrap_or_else(|| vm.keys.clone());
                // The same candidate keeps its run (and its counts); a new one starts afresh.
                let canary = candidate.map(|c| match &vm.canary {
                    Some(run) if run.runs(&c) => Rc::clone(run),
                    _ => Rc::new(CanaryRun::new(c, self.vm_id.clone())),
                });
                let mut next = Vm::new(vm.config.clone(), Some(set), keys);
                next.canary = canary;
                self.vm = Some(Rc::new(next));
            }
            Fetched::Keys(keys) => {
                let mut next = Vm::new(vm.config.clone(), vm.set.clone(), keys);
                next.canary = vm.canary.clone();
                self.vm = Some(Rc::new(next));
            }
            Fetched::Nothing => {}
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        define_metrics();
        // Envoy 1.40 answers `xds.node` (the attribute `node` of older versions is gone).
        self.node = [vec!["xds", "node", "id"], vec!["node", "id"]]
            .into_iter()
            .find_map(|path| {
                hostcalls::get_property(path)
                    .ok()
                    .flatten()
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .filter(|id| !id.is_empty())
            })
            .unwrap_or_else(|| format!("vm-{}", self.vm_id));
        let text = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(Some(bytes)) => match String::from_utf8(bytes) {
                Ok(t) => t,
                Err(_) => {
                    log(
                        Level::Error,
                        "llm-policy: invalid configuration: not UTF-8 text",
                    );
                    return false;
                }
            },
            _ => String::new(),
        };
        match Vm::configure(&text) {
            Ok(vm) => {
                match &vm.set {
                    Some(set) => {
                        let stats = set.stats();
                        log(
                            Level::Info,
                            &format!(
                                "llm-policy: bundle {} loaded: {} policies, {} rules, {} namespaces",
                                set.bundle(),
                                stats.policies,
                                stats.rules,
                                stats.namespaces
                            ),
                        );
                    }
                    None => log(
                        Level::Info,
                        "llm-policy: waiting for the bundle from the server",
                    ),
                }
                self.sync = vm.config.sync.clone().map(BundleSync::new);
                self.vm = Some(Rc::new(vm));
                let _ = hostcalls::set_tick_period(TICK);
                true
            }
            Err(diagnostics) => {
                let all: Vec<String> = diagnostics.0.iter().map(ToString::to_string).collect();
                log(
                    Level::Error,
                    &format!("llm-policy: invalid configuration: {}", all.join("; ")),
                );
                false
            }
        }
    }

    fn on_tick(&mut self) {
        flush_metrics();
        if let Some(sync) = &mut self.sync {
            let vm = self.vm.as_deref();
            let report = SyncReport {
                node: Some(self.node.clone()),
                running: vm
                    .and_then(|v| v.set.as_ref())
                    .map(|s| s.bundle().to_string()),
                canary: vm.and_then(|v| v.canary.as_ref()).map(|c| c.report()),
            };
            sync.tick(&mut WasmHost, &report);
        }
        if self.outbox.is_empty() {
            return;
        }
        if let Some(server) = self.vm.as_ref().and_then(|p| p.config.server.as_ref()) {
            self.outbox.flush(&mut WasmHost, server);
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            flow: self
                .vm
                .as_ref()
                .map(|p| RequestFlow::new(Rc::clone(p), Rc::clone(&self.outbox))),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One request.
struct Http {
    flow: Option<RequestFlow>,
}

fn action(flow: Flow) -> Action {
    match flow {
        Flow::Continue => Action::Continue,
        Flow::Pause => Action::Pause,
    }
}

impl Context for Http {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        let body = if response_size > 0 {
            hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, response_size)
                .ok()
                .flatten()
        } else {
            None
        };
        if let Some(flow) = &mut self.flow {
            flow.on_server_answer(&mut WasmHost, token_id, status_code, body);
        }
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        match &mut self.flow {
            Some(flow) => action(flow.on_request_headers(&mut WasmHost, end_of_stream)),
            None => Action::Continue,
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        match &mut self.flow {
            Some(flow) => action(flow.on_request_body(&mut WasmHost, body_size, end_of_stream)),
            None => Action::Continue,
        }
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        match &mut self.flow {
            Some(flow) => action(flow.on_request_trailers(&mut WasmHost)),
            None => Action::Continue,
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        match &mut self.flow {
            Some(flow) => action(flow.on_response_headers(&mut WasmHost, end_of_stream)),
            None => Action::Continue,
        }
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        match &mut self.flow {
            Some(flow) => action(flow.on_response_body(&mut WasmHost, body_size, end_of_stream)),
            None => Action::Continue,
        }
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        match &mut self.flow {
            Some(flow) => action(flow.on_response_trailers(&mut WasmHost)),
            None => Action::Continue,
        }
    }

    fn on_log(&mut self) {
        if let Some(flow) = &mut self.flow {
            flow.on_done(&mut WasmHost);
        }
    }
}

fn log(level: Level, message: &str) {
    let level = match level {
        Level::Debug => LogLevel::Debug,
        Level::Info => LogLevel::Info,
        Level::Warn => LogLevel::Warn,
        Level::Error => LogLevel::Error,
    };
    let _ = hostcalls::log(level, message);
}

/// A host status that refused a call, named.
fn refused(status: Status) -> CallRefused {
    CallRefused(match status {
        Status::NotFound => "not found (is the cluster defined?)",
        Status::BadArgument => "bad argument (is the cluster defined?)",
        Status::ParseFailure => "parse failure",
        Status::Empty => "empty",
        Status::CasMismatch => "compare-and-swap mismatch",
        Status::InternalFailure => "internal failure",
        Status::SerializationFailure => "serialization failure",
        _ => "unknown status",
    })
}

/// A header value as text: the bytes themselves when they are UTF-8 (no copy), else with each
/// invalid sequence replaced (a client can send any bytes).
fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// [`Host`] over proxy-wasm host calls, for the request whose callback is running.
struct WasmHost;

impl Host for WasmHost {
    fn request_headers(&mut self) -> Vec<(String, String)> {
        hostcalls::get_map_bytes(MapType::HttpRequestHeaders)
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, text(v)))
            .collect()
    }

    fn request_body(&mut self, len: usize) -> Option<Vec<u8>> {
        hostcalls::get_buffer(BufferType::HttpRequestBody, 0, len)
            .ok()
            .flatten()
    }

    fn set_request_header(&mut self, name: &str, value: Option<&str>) {
        let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, value);
    }

    fn send_reply(&mut self, status: u16, headers: &[(String, String)], body: &[u8]) {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let _ = hostcalls::send_http_response(u32::from(status), headers, Some(body));
    }

    fn response_header(&mut self, name: &str) -> Option<String> {
        hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, name)
            .ok()
            .flatten()
            .map(text)
    }

    fn response_body(&mut self, len: usize) -> Option<Vec<u8>> {
        hostcalls::get_buffer(BufferType::HttpResponseBody, 0, len)
            .ok()
            .flatten()
    }

    fn set_response_body(&mut self, len: usize, bytes: &[u8]) {
        let _ = hostcalls::set_buffer(BufferType::HttpResponseBody, 0, len, bytes);
    }

    fn set_response_header(&mut self, name: &str, value: Option<&str>) {
        let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, value);
    }

    fn set_request_body(&mut self, len: usize, body: &[u8]) {
        let _ = hostcalls::set_buffer(BufferType::HttpRequestBody, 0, len, body);
    }

    fn resume_request(&mut self) {
        let _ = hostcalls::resume_http_request();
    }

    fn now(&self) -> Duration {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .unwrap_or_default()
    }

    fn shared_get(&mut self, key: &str) -> Option<(Vec<u8>, u32)> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(value), Some(cas))) => Some((value, cas)),
            _ => None,
        }
    }

    fn shared_set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> SharedWrite {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => SharedWrite::Ok,
            Err(Status::CasMismatch) => SharedWrite::CasMismatch,
            Err(_) => SharedWrite::Failed,
        }
    }

    fn grpc_call(
        &mut self,
        cluster: &str,
        service: &str,
        method: &str,
        metadata: &[(&str, &str)],
        message: &[u8],
        timeout: Duration,
    ) -> Result<u32, CallRefused> {
        let metadata: Vec<(&str, &[u8])> =
            metadata.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
        hostcalls::dispatch_grpc_call(cluster, service, method, metadata, Some(message), timeout)
            .map_err(refused)
    }

    fn http_call(
        &mut self,
        cluster: &str,
        headers: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<u32, CallRefused> {
        hostcalls::dispatch_http_call(cluster, headers.to_vec(), None, Vec::new(), timeout)
            .map_err(refused)
    }

    fn log(&mut self, level: Level, message: &str) {
        log(level, message);
    }

    fn metric(&mut self, metric: Metric, value: u64) {
        if metric.is_histogram() {
            let id = METRICS.with(|m| m.try_borrow().ok().and_then(|m| m.get(&metric).copied()));
            if let Some(id) = id {
                let _ = hostcalls::record_metric(id, value);
            }
            return;
        }
        PENDING.with(|p| {
            if let Ok(mut p) = p.try_borrow_mut() {
                *p.entry(metric).or_default() += value;
            }
        });
    }
}
