//! The floors of the filter benchmark (`make bench-filter`): proxy-wasm filters that decide
//! nothing, to tell what a body-inspecting filter pays from what llm-policy's filter adds.
//!
//! The plugin's `root_id` chooses what the module does for each request:
//!
//! - anything but the names below (the benchmark's **floor**): holds the request until its body
//!   has arrived, then lets it go — what any body-inspecting filter pays, with no decision at all;
//! - `boundary`: the floor plus the **host calls llm-policy's filter makes** for an allowed
//!   request (counted with `make bench-vm`'s census): the request header map read whole, Envoy's
//!   clock, the body read, and the verdict header set — each through the SDK as the filter calls
//!   it, and the results dropped. What the filter costs over it is its own work in the VM;
//! - `boundary-by-name`: as `boundary`, with the header map read as [`BY_NAME`]'s headers one
//!   call each, in place of the whole map: what reading headers by name would cost.

#[cfg(target_arch = "wasm32")]
mod wasm {
    use proxy_wasm::hostcalls;
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, BufferType, ContextType, MapType};

    proxy_wasm::main! {{
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root(Mode::Floor)) });
    }}

    /// What the module does per request (the module docs).
    #[derive(Clone, Copy)]
    enum Mode {
        Floor,
        Boundary,
        BoundaryByName,
    }

    struct Root(Mode);

    impl Context for Root {}

    impl RootContext for Root {
        fn on_configure(&mut self, _: usize) -> bool {
            let root_id = hostcalls::get_property(vec!["plugin_root_id"])
                .ok()
                .flatten();
            self.0 = match root_id.as_deref() {
                Some(b"boundary") => Mode::Boundary,
                Some(b"boundary-by-name") => Mode::BoundaryByName,
                _ => Mode::Floor,
            };
            true
        }

        fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Buffer(self.0)))
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    struct Buffer(Mode);

    impl Context for Buffer {}

    impl HttpContext for Buffer {
        fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
            match self.0 {
                Mode::Floor => {}
                Mode::Boundary => {
                    let map = hostcalls::get_map_bytes(MapType::HttpRequestHeaders);
                    core::hint::black_box(map.ok());
                }
                Mode::BoundaryByName => {
                    for name in super::BY_NAME {
                        let value =
                            hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name);
                        core::hint::black_box(value.ok());
                    }
                }
            }
            if end_of_stream {
                Action::Continue
            } else {
                Action::Pause
            }
        }

        fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
            if !end_of_stream {
                return Action::Pause;
            }
            if !matches!(self.0, Mode::Floor) {
                core::hint::black_box(hostcalls::get_current_time().ok());
                let body = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size);
                core::hint::black_box(body.ok());
                let _ = hostcalls::set_map_value(
                    MapType::HttpRequestHeaders,
                    "x-llm-policy-decision",
                    Some("allow"),
                );
            }
            Action::Continue
        }
    }
}

/// The headers `boundary-by-name` reads one by one: those llm-policy's filter would read for the
/// benchmark's 100 rules without the map — routing, the body's declared size, the namespace and
/// the principal's default headers (`ContextConfig`), the header the rules test, and the
/// server-only headers it removes. (The shield scores, read by prefix, would still need the map.)
pub const BY_NAME: &[&str] = &[
    ":path",
    ":method",
    ":authority",
    "content-length",
    "content-type",
    "x-llm-policy-namespace",
    "x-user-id",
    "x-user-tier",
    "x-team-id",
    "x-org-id",
    "x-team",
    "x-llm-policy-decision",
    "x-llm-policy-reservation",
    "x-llm-policy-rewrite",
];
