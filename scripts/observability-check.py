#!/usr/bin/env python3
"""Checks the Grafana dashboard and the Prometheus rules of deploy/observability/ (`make
observability-check`) against the metrics the code exports.

    scripts/observability-check.py [--rules FILE] [--dashboard FILE]
    scripts/observability-check.py --self-test

Run it with the SDK venv's Python (tools/sdk-venv): it needs PyYAML and `promql-parser` (a real
PromQL parser, pinned in integration/requirements.txt). No Prometheus or Grafana is needed.

What the code exports, read from the sources (never listed here by hand):

  server   ext-authz/src/server/metrics.rs: every `"llm_policy_..."` (and `gen_ai_...`) name registered in
           `Metrics::new`, its type (counter, gauge, histogram: `_bucket` with `le`, `_sum`,
           `_count`) and its labels (the `&["..."]` next to the name).
  filter   filter/src/host.rs: every `Metric::X => "llm_policy.a.b"` stat and which are
           histograms. Envoy 1.40 exports a wasm filter's stats in /stats/prometheus under the
           stat name with dots as underscores, no `envoy_` prefix, no `_total`, no labels
           (`llm_policy.decisions.allow` -> `llm_policy_decisions_allow`).
  target   every series also has the labels Prometheus attaches: TARGET_LABELS.
  recorded the rule file's recording rules, with the labels their expressions keep.

What it checks:

  1. rules     the file as Prometheus loads it (rulefmt): only `groups`; each group a unique
               non-empty `name`, optional `interval`/`limit`/`query_offset`, `rules`; each rule
               exactly one of `alert`/`record`, an `expr`, no unknown keys; `for` and
               `keep_firing_for` valid durations (alerts only); `labels` and `annotations`
               maps of strings with valid label names (recording rules: no annotations);
               recording names valid metric names; alert names unique. And ours: every alert has
               `labels.severity` (critical, warning, info), `annotations.summary`, `description`
               and a `runbook_url` pointing at a heading of docs/observability.md.
  2. promql    every expression (rules, dashboard targets, annotations, variable queries) parsed
               with promql-parser; then every metric it names exists, every label it matches on,
               groups by or matches vectors on exists on what it applies to (labels are followed
               through sum by/without, on/ignoring, group_left/right, histogram_quantile,
               label_replace), one-to-one vector matches have the same labels on both sides,
               rate()/increase()/irate() only on counters, histogram_quantile() only on buckets,
               every `=`/`=~` value of a closed-set label of a server metric appears as a string
               in the server's or core's source (so `result="eror"` fails), every `$labels.X`
               of an alert's annotations is a label the alert has.
  3. dashboard JSON; schemaVersion; a `datasource` variable of type datasource (prometheus)
               that every panel, target, annotation and query variable uses as
               `${datasource}`; unique panel ids; gridPos inside 24 columns, no overlaps; each
               target a refId unique in its panel and an expr; every `$variable` defined;
               every server and filter metric shown by some panel.

Exit 0 when there is no problem, 1 otherwise (one line per problem). --self-test breaks copies of
the files in each way listed in SELF_TEST (an unknown metric, a wrong label, a PromQL syntax error,
a duplicate alert, a bad `for`, ...) and fails unless each is reported, and nothing on the
unbroken copies.
"""
import argparse
import copy
import json
import os
import re
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS_RS = os.path.join(REPO, "ext-authz", "src", "server", "metrics.rs")
HOST_RS = os.path.join(REPO, "filter", "src", "host.rs")
DEFAULT_RULES = os.path.join(REPO, "deploy", "observability", "prometheus-rules.yaml")
DEFAULT_DASHBOARD = os.path.join(REPO, "deploy", "observability", "grafana-dashboard.json")
DOCS = os.path.join(REPO, "docs", "observability.md")
# Where the label values the server emits are spelt (string literals).
VALUE_SOURCES = [os.path.join(REPO, "ext-authz", "src"), os.path.join(REPO, "shared-core", "src")]
RUNBOOK_PREFIX = "https://github.com/llm-policy/llm-policy/blob/main/docs/observability.md#"

# Labels Prometheus attaches to every scraped series (the scrape configurations in
# docs/observability.md attach no others).
TARGET_LABELS = frozenset({"job", "instance"})
# Labels of server metrics whose values are data (policy names, rule names, digests...), not a
# closed set spelt in the code: their values are not checked.
OPEN_LABELS = frozenset({"namespace", "rule", "plugin", "bundle", "version", "severity", "le"})
SEVERITIES = ("critical", "warning", "info")
# Grafana's built-in variables, and what stands for the interval ones when parsing.
GRAFANA_INTERVALS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}
GRAFANA_BUILTINS = set(GRAFANA_INTERVALS) | {"__interval_ms", "__range_s", "__range_ms", "__dashboard",
                                             "__from", "__to", "__name", "__org", "__user", "timeFilter"}
PANEL_TYPES = {"row", "timeseries", "stat", "table", "gauge", "bargauge", "text", "state-timeline",
               "status-history", "heatmap", "piechart", "barchart", "logs"}

DURATION = re.compile(r"^(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?$")
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
ALERT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
GROUP_KEYS = {"name", "interval", "rules", "limit", "query_offset", "labels"}
RULE_KEYS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
COUNTER_FUNCS = {"rate", "increase", "irate", "resets"}


def valid_duration(s):
    """Prometheus's model.ParseDuration: units y w d h m s ms, in that order, integers; or "0"."""
    return isinstance(s, str) and (s == "0" or (s != "" and DURATION.match(s) is not None))


# ------------------------------------------------------------------------------------------------
# What the code exports.

class Metric:
    """One exported series name: where it comes from, its type, its labels."""

    def __init__(self, name, kind, labels, source, base=None):
        self.name, self.kind, self.labels, self.source = name, kind, frozenset(labels), source
        self.base = base or name  # the registered name (a histogram's, for its _bucket/_sum/_count)

    def __repr__(self):
        return f"Metric({self.name}, {self.kind}, {sorted(self.labels)}, {self.source})"


def server_metrics(text):
    """The metrics `Metrics::new` in metrics.rs registers: {registered name: (kind, [labels])}."""
    start = text.find("fn new(")
    if start < 0:
        raise ValueError("metrics.rs: no `fn new(` (Metrics::new) found")
    body = text[start:]
    # Not the tests.
    body = body[:body.find("#[cfg(test)]")] if "#[cfg(test)]" in body else body
    found = {}
    # The engine's own names, and the OpenTelemetry GenAI ones (a name opens its call: the
    # GenAI label names start with `gen_ai_` too).
    for m in re.finditer(r'"(llm_policy_[a-z0-9_]+)"|\(\s*"(gen_ai_[a-z0-9_]+)"', body):
        name = m.group(1) or m.group(2)
        # The statement: from the `let` before the name to the first `?;` after it.
        let = body.rfind("let ", 0, m.start())
        end = body.find("?;", m.end())
        if let < 0 or end < 0:
            raise ValueError(f"metrics.rs: cannot find the statement registering {name}")
        stmt = body[let:end]
        head = body[let:m.start()]
        if "counter_vec(" in head or "IntCounter" in head or re.search(r"\bCounter(Vec)?::new", head):
            kind = "counter"
        elif "seconds(" in head or "Histogram" in head:
            kind = "histogram"
        elif "Gauge" in head:
            kind = "gauge"
        else:
            raise ValueError(f"metrics.rs: cannot tell the type of {name} from `{head.strip()}`")
        labels = []
        lm = re.search(r"&\[([^\]]*)\]", stmt[m.end() - let:])
        if lm:
            labels = re.findall(r'"([^"]+)"', lm.group(1))
        if name in found:
            raise ValueError(f"metrics.rs: {name} registered twice")
        found[name] = (kind, labels)
    if not found:
        raise ValueError("metrics.rs: no llm_policy_ metric found")
    return found


def server_doc_labels(text):
    """The `name{a,b}` the struct's doc comments give (to catch docs and code drifting apart)."""
    head = text[:text.find("fn new(")] if "fn new(" in text else text
    return {m.group(1): [x.strip() for x in m.group(2).split(",")]
            for m in re.finditer(r"`((?:llm_policy|gen_ai)_[a-z0-9_]+)\{([^}]*)\}`", head)}


def filter_metrics(text):
    """The filter's stats in host.rs: {stat name: kind}."""
    names = dict(re.findall(r'Metric::(\w+)\s*=>\s*"(llm_policy\.[a-z0-9_.]+)"', text))
    if not names:
        raise ValueError("host.rs: no `Metric::X => \"llm_policy...\"` found")
    hm = re.search(r"fn is_histogram\(self\) -> bool \{\s*matches!\(self,([^)]*)\)", text)
    if not hm:
        raise ValueError("host.rs: no `fn is_histogram` with `matches!(self, ...)` found")
    histos = set(re.findall(r"Metric::(\w+)", hm.group(1)))
    unknown = histos - set(names)
    if unknown:
        raise ValueError(f"host.rs: is_histogram names variants without a stat name: {sorted(unknown)}")
    return {stat: ("histogram" if variant in histos else "counter") for variant, stat in names.items()}


def envoy_prometheus_name(stat):
    """How Envoy 1.40 names a wasm filter's stat in /stats/prometheus (checked against a running
    Envoy: `wasmcustom.llm_policy.decisions.allow` -> `llm_policy_decisions_allow`)."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", stat)


def catalogue(metrics_rs_text, host_rs_text):
    """Every exported series name -> Metric, and problems with the sources themselves."""
    problems = []
    cat = {}
    registered = server_metrics(metrics_rs_text)
    for name, (kind, labels) in registered.items():
        if kind == "counter" and not name.endswith("_total"):
            problems.append(f"metrics.rs: counter {name} does not end in _total")
        if kind == "histogram":
            cat[name + "_bucket"] = Metric(name + "_bucket", "bucket", set(labels) | {"le"}, "server", name)
            cat[name + "_sum"] = Metric(name + "_sum", "counter", labels, "server", name)
            cat[name + "_count"] = Metric(name + "_count", "counter", labels, "server", name)
        else:
            cat[name] = Metric(name, kind, labels, "server")
    for name, labels in server_doc_labels(metrics_rs_text).items():
        if name in registered and sorted(labels) != sorted(registered[name][1]):
            problems.append(f"metrics.rs: the doc comment says {name}{{{','.join(labels)}}}, "
                            f"the code registers {{{','.join(registered[name][1])}}}")
    for stat, kind in filter_metrics(host_rs_text).items():
        name = envoy_prometheus_name(stat)
        names = [name + s for s in ("_bucket", "_sum", "_count")] if kind == "histogram" else [name]
        for n in names:
            if n in cat:
                problems.append(f"host.rs: the filter's {stat} is exported as {n}, a server metric too")
                continue
            if n.endswith("_bucket"):
                cat[n] = Metric(n, "bucket", {"le"}, "filter", name)
            else:
                cat[n] = Metric(n, "counter", (), "filter", name)
    return cat, problems, registered


def source_strings(dirs):
    """Every string literal in the Rust sources under dirs."""
    out = set()
    for d in dirs:
        for root, _, files in os.walk(d):
            for f in files:
                if f.endswith(".rs"):
                    with open(os.path.join(root, f), encoding="utf-8") as fh:
                        out.update(re.findall(r'"((?:[^"\\\n]|\\.)*)"', fh.read()))
    return out


# ------------------------------------------------------------------------------------------------
# PromQL: parse, then follow metrics and labels through the expression.

class Scalar:
    pass


SCALAR = Scalar()


class Analyzer:
    """Parses PromQL with promql-parser and checks what it names against the catalogue."""

    def __init__(self, cat, strings):
        import promql_parser
        self.pq = promql_parser
        self.cat = cat  # name -> Metric (recording rules added as they are analysed)
        self.strings = strings
        self.used = set()  # registered base names a checked expression used

    def check(self, text, where, problems):
        """Parses and checks `text`; returns the labels of its result (a frozenset), SCALAR, or
        None when the expression does not parse."""
        try:
            expr = self.pq.parse(text)
        except Exception as e:  # promql-parser raises ValueError with the parser's message
            problems.append(f"{where}: PromQL does not parse: {e}: {text!r}")
            return None
        try:
            return self.labels(expr, where, problems)
        except RecursionError:
            problems.append(f"{where}: expression too deep to follow")
            return frozenset()

    # -- the walk ------------------------------------------------------------------------------
    def labels(self, e, where, problems):
        pq = self.pq
        if isinstance(e, pq.NumberLiteral) or isinstance(e, pq.StringLiteral):
            return SCALAR
        if isinstance(e, pq.ParenExpr) or isinstance(e, pq.UnaryExpr):
            return self.labels(e.expr, where, problems)
        if isinstance(e, pq.SubqueryExpr):
            return self.labels(e.expr, where, problems)
        if isinstance(e, pq.MatrixSelector):
            return self.selector(e.vector_selector, where, problems)
        if isinstance(e, pq.VectorSelector):
            return self.selector(e, where, problems)
        if isinstance(e, pq.Call):
            return self.call(e, where, problems)
        if isinstance(e, pq.AggregateExpr):
            return self.aggregate(e, where, problems)
        if isinstance(e, pq.BinaryExpr):
            return self.binary(e, where, problems)
        problems.append(f"{where}: unexpected PromQL node {type(e).__name__}")
        return frozenset()

    def metric_of(self, vs):
        name = vs.name
        if not name:
            for m in vs.matchers.matchers:
                if m.name == "__name__" and m.op == self.pq.MatchOp.Equal:
                    name = m.value
        return name

    def selector(self, vs, where, problems):
        name = self.metric_of(vs)
        if not name:
            problems.append(f"{where}: a selector without a metric name: {vs}")
            return frozenset()
        if vs.matchers.or_matchers:
            problems.append(f"{where}: `or` inside a selector is not PromQL Prometheus accepts: {vs}")
        metric = self.cat.get(name)
        if metric is None:
            problems.append(f"{where}: unknown metric {name}")
            return None
        if metric.source in ("server", "filter"):
            self.used.add(metric.base)
        # A recorded series has the labels its expression kept; a scraped one, the target's too.
        have = metric.labels if metric.source == "recorded" else metric.labels | TARGET_LABELS
        for m in vs.matchers.matchers:
            if m.name == "__name__":
                continue
            if m.name not in have:
                problems.append(f"{where}: {name} has no label {m.name!r} (it has: "
                                f"{', '.join(sorted(have))})")
            elif metric.source == "server" and m.name not in TARGET_LABELS | OPEN_LABELS:
                self.check_values(name, m, where, problems)
        return have

    def check_values(self, name, m, where, problems):
        v = m.value
        if "$" in v or v == "":
            return
        if m.op in (self.pq.MatchOp.Equal, self.pq.MatchOp.NotEqual):
            values = [v]
        elif re.fullmatch(r"[A-Za-z0-9_]+(\|[A-Za-z0-9_]+)*", v):
            values = v.split("|")
        else:
            return  # a real regular expression: not checked
        for x in values:
            if x not in self.strings:
                problems.append(f"{where}: {name}{{{m.name}=...}}: the value {x!r} is never "
                                f"spelt in the server's source")

    def call(self, c, where, problems):
        f = c.func.name
        args = [self.labels(a, where, problems) if isinstance(a, self.pq.Expr) else SCALAR for a in c.args]
        if f in COUNTER_FUNCS and c.args:
            self.require_counter(c.args[0], f, where, problems)
        if f == "histogram_quantile":
            inner = args[1] if len(args) > 1 else None
            if isinstance(inner, frozenset):
                if "le" not in inner:
                    problems.append(f"{where}: histogram_quantile over something without `le` "
                                    f"(not a histogram's _bucket, or `le` aggregated away)")
                return inner - {"le"}
            return inner
        if f in ("label_replace", "label_join"):
            base = args[0]
            strs = [a.val for a in c.args[1:] if isinstance(a, self.pq.StringLiteral)]
            if isinstance(base, frozenset) and strs:
                # label_replace(v, dst, replacement, src, regex); label_join(v, dst, sep, src...)
                srcs = strs[2:3] if f == "label_replace" else strs[2:]
                for s in srcs:
                    if s and s not in base:
                        problems.append(f"{where}: {f} reads label {s!r}, which is not there")
                return base | {strs[0]}
            return base
        if f in ("absent", "absent_over_time"):
            vs = c.args[0]
            if isinstance(vs, self.pq.MatrixSelector):
                vs = vs.vector_selector
            if isinstance(vs, self.pq.VectorSelector):
                return frozenset(m.name for m in vs.matchers.matchers
                                 if m.op == self.pq.MatchOp.Equal and m.name != "__name__")
            return frozenset()
        if f in ("scalar", "time", "pi"):
            return SCALAR
        if f == "vector":
            return frozenset()
        for a in args:  # the others keep their vector argument's labels
            if isinstance(a, frozenset) or a is None:
                return a
        return frozenset()  # hour() and friends without an argument: one series, no labels

    def require_counter(self, arg, f, where, problems):
        pq = self.pq
        while isinstance(arg, pq.ParenExpr):
            arg = arg.expr
        vs = None
        if isinstance(arg, pq.MatrixSelector):
            vs = arg.vector_selector
        if vs is None:
            return  # a subquery: what it computes is not a raw series
        metric = self.cat.get(self.metric_of(vs) or "")
        if metric is not None and metric.kind not in ("counter", "bucket"):
            problems.append(f"{where}: {f}() over {metric.name}, a {metric.kind} (not a counter)")

    def aggregate(self, a, where, problems):
        inner = self.labels(a.expr, where, problems)
        op = str(a.op)
        mod = a.modifier
        grouping = list(mod.labels) if mod is not None else []
        if isinstance(inner, frozenset):
            for lab in grouping:
                if lab not in inner:
                    problems.append(f"{where}: `{op} {'by' if self.is_by(mod) else 'without'} "
                                    f"({', '.join(grouping)})`: {lab!r} is not a label of what it "
                                    f"aggregates (it has: {', '.join(sorted(inner)) or 'none'})")
        if inner is None:
            return None
        if op in ("topk", "bottomk", "limitk", "limit_ratio"):
            return inner
        if mod is None:
            out = frozenset()
        elif self.is_by(mod):
            out = frozenset(grouping)
        else:
            out = inner - set(grouping) if isinstance(inner, frozenset) else frozenset()
        if op == "count_values" and isinstance(a.param, self.pq.StringLiteral):
            out = out | {a.param.val}
        return out

    def is_by(self, mod):
        return str(mod.type).endswith("By")

    def binary(self, b, where, problems):
        lhs = self.labels(b.lhs, where, problems)
        rhs = self.labels(b.rhs, where, problems)
        if lhs is None or rhs is None:
            return None
        if lhs is SCALAR:
            return rhs
        if rhs is SCALAR:
            return lhs
        op = str(b.op)
        mod = b.modifier
        matching = mod.matching if mod is not None else None
        card = str(mod.card) if mod is not None else "OneToOne"
        group = list(mod.group_labels or []) if mod is not None else []
        on = matching is not None and str(matching.type).endswith("Include")
        match_labels = list(matching.labels) if matching is not None else []
        if on:
            for lab in match_labels:
                for side, ls in (("left", lhs), ("right", rhs)):
                    if lab not in ls:
                        problems.append(f"{where}: `{op} on ({', '.join(match_labels)})`: the {side} "
                                        f"side has no label {lab!r} (it has: {', '.join(sorted(ls)) or 'none'})")
        if op in ("or",):
            return lhs | rhs
        if "ManyToOne" in card:
            for lab in group:
                if lab not in rhs:
                    problems.append(f"{where}: group_left({lab}): the right side has no label {lab!r}")
            return lhs | set(group)
        if "OneToMany" in card:
            for lab in group:
                if lab not in lhs:
                    problems.append(f"{where}: group_right({lab}): the left side has no label {lab!r}")
            return rhs | set(group)
        # One-to-one (and and/unless): the series must agree on every label compared.
        if on:
            ls, rs = lhs & set(match_labels), rhs & set(match_labels)
        else:
            ls, rs = lhs - set(match_labels), rhs - set(match_labels)
        if ls != rs:
            problems.append(f"{where}: `{op}` matches series with different labels (left: "
                            f"{', '.join(sorted(lhs)) or 'none'}; right: {', '.join(sorted(rhs)) or 'none'}): "
                            f"nothing would match; use on(...)/ignoring(...) or aggregate")
        if op in ("and", "unless"):
            return lhs
        # Prometheus's resultMetric: one-to-one keeps only the on() labels, or drops ignoring()'s.
        return frozenset(match_labels) if on else lhs - set(match_labels)


# ------------------------------------------------------------------------------------------------
# The rule file.

def load_yaml(path, problems):
    import yaml
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        problems.append(f"{path}: cannot read: {e}")
        return None


def doc_anchors(path):
    """GitHub's anchors for the headings of a Markdown file."""
    anchors = set()
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return anchors
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        title = m.group(1).strip().lower()
        slug = re.sub(r"[^\w\- ]", "", title).replace(" ", "-")
        anchors.add(slug)
    return anchors


def as_map(v):
    return v if isinstance(v, dict) else {}


def as_list(v):
    return v if isinstance(v, list) else []


def string_map(v, what, where, problems, allow_name=True):
    if v is None:
        return {}
    if not isinstance(v, dict):
        problems.append(f"{where}: {what} is not a map")
        return {}
    for k, x in v.items():
        if not isinstance(k, str) or not LABEL_NAME.match(k):
            problems.append(f"{where}: {what}: {k!r} is not a valid label name")
        elif k.startswith("__") and not allow_name:
            problems.append(f"{where}: {what}: {k!r} is reserved")
        if not isinstance(x, str):
            problems.append(f"{where}: {what}.{k} is not a string ({type(x).__name__}: {x!r})")
    return v


def check_rules(path, analyzer, problems, anchors):
    before = len(problems)
    data = load_yaml(path, problems)
    if data is None:
        if len(problems) == before:
            problems.append(f"{path}: empty")
        return
    if not isinstance(data, dict) or set(data) != {"groups"}:
        problems.append(f"{path}: the file must be a map with only `groups`")
        return
    groups = data["groups"]
    if not isinstance(groups, list) or not groups:
        problems.append(f"{path}: `groups` must be a non-empty list")
        return
    seen_groups, seen_alerts, seen_records = set(), {}, set()
    pending = []  # (where, rule) in file order
    for gi, g in enumerate(groups):
        gw = f"{path}: groups[{gi}]"
        if not isinstance(g, dict):
            problems.append(f"{gw}: not a map")
            continue
        for k in set(g) - GROUP_KEYS:
            problems.append(f"{gw}: unknown key {k!r}")
        name = g.get("name")
        if not isinstance(name, str) or not name:
            problems.append(f"{gw}: `name` missing or empty")
        elif name in seen_groups:
            problems.append(f"{gw}: duplicate group name {name!r}")
        else:
            seen_groups.add(name)
            gw = f"{path}: group {name}"
        for k in ("interval", "query_offset"):
            if k in g and not valid_duration(g[k]):
                problems.append(f"{gw}: `{k}` {g[k]!r} is not a valid duration")
        if "limit" in g and (not isinstance(g["limit"], int) or g["limit"] < 0):
            problems.append(f"{gw}: `limit` must be a non-negative integer")
        rules = g.get("rules")
        if not isinstance(rules, list) or not rules:
            problems.append(f"{gw}: `rules` must be a non-empty list")
            continue
        for ri, r in enumerate(rules):
            rw = f"{gw}: rules[{ri}]"
            if not isinstance(r, dict):
                problems.append(f"{rw}: not a map")
                continue
            is_alert, is_record = "alert" in r, "record" in r
            if is_alert != is_record and isinstance(r.get("alert", r.get("record")), str):
                named = f"{gw}: {'alert' if is_alert else 'record'} {r.get('alert', r.get('record'))}"
            else:
                named = rw
            for k in sorted(set(r) - RULE_KEYS):
                problems.append(f"{named}: unknown key {k!r}")
            if is_alert == is_record:
                problems.append(f"{rw}: must have exactly one of `alert` and `record`")
                continue
            if is_record:
                rec = r["record"]
                if not isinstance(rec, str) or not METRIC_NAME.match(rec):
                    problems.append(f"{rw}: `record` {rec!r} is not a valid metric name")
                    continue
                rw = f"{gw}: record {rec}"
                if rec in seen_records:
                    problems.append(f"{rw}: recorded twice")
                seen_records.add(rec)
                for k in ("for", "keep_firing_for", "annotations"):
                    if k in r:
                        problems.append(f"{rw}: a recording rule cannot have `{k}`")
            else:
                alert = r["alert"]
                if not isinstance(alert, str) or not ALERT_NAME.match(alert):
                    problems.append(f"{rw}: `alert` {alert!r} is not a valid alert name")
                    continue
                rw = f"{gw}: alert {alert}"
                if alert in seen_alerts:
                    problems.append(f"{rw}: duplicate alert name (also in {seen_alerts[alert]})")
                else:
                    seen_alerts[alert] = gw.split(": ", 1)[1]
                for k in ("for", "keep_firing_for"):
                    if k in r and not valid_duration(r[k]):
                        problems.append(f"{rw}: `{k}` {r[k]!r} is not a valid duration "
                                        f"(like 5m, 1h30m, 0s)")
            expr = r.get("expr")
            if not isinstance(expr, str) or not expr.strip():
                problems.append(f"{rw}: `expr` missing or empty")
                continue
            string_map(r.get("labels"), "labels", rw, problems, allow_name=False)
            if is_alert:
                ann = as_map(string_map(r.get("annotations"), "annotations", rw, problems))
                labels = as_map(r.get("labels"))
                if labels.get("severity") not in SEVERITIES:
                    problems.append(f"{rw}: labels.severity must be one of {', '.join(SEVERITIES)}")
                for k in ("summary", "description", "runbook_url"):
                    if not isinstance(ann.get(k), str) or not ann.get(k).strip():
                        problems.append(f"{rw}: annotations.{k} missing")
                url = ann.get("runbook_url")
                if isinstance(url, str) and url.strip():
                    if not url.startswith(RUNBOOK_PREFIX):
                        problems.append(f"{rw}: runbook_url must start with {RUNBOOK_PREFIX}")
                    elif url[len(RUNBOOK_PREFIX):] not in anchors:
                        problems.append(f"{rw}: runbook_url: docs/observability.md has no heading "
                                        f"#{url[len(RUNBOOK_PREFIX):]}")
            pending.append((rw, r))
    # Recording rules first, in dependency order (a rule may use one recorded later in the file).
    records = [(w, r) for w, r in pending if "record" in r]
    names = {r["record"] for _, r in records}
    done = set()
    for _ in range(len(records) + 1):
        progressed = False
        for w, r in records:
            if r["record"] in done:
                continue
            deps = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", r["expr"])) & names - done - {r["record"]}
            if deps:
                continue
            out = analyzer.check(r["expr"], w, problems)
            labs = out if isinstance(out, frozenset) else frozenset()
            labs = labs | set(as_map(r.get("labels")))
            analyzer.cat[r["record"]] = Metric(r["record"], "recorded", labs, "recorded")
            done.add(r["record"])
            progressed = True
        if not progressed:
            break
    for w, r in records:
        if r["record"] not in done:
            problems.append(f"{w}: depends on recording rules in a cycle")
    for w, r in pending:
        if "alert" not in r:
            continue
        out = analyzer.check(r["expr"], w, problems)
        if not isinstance(out, frozenset):
            if out is SCALAR:
                problems.append(f"{w}: the expression is a scalar; an alert needs a vector")
            continue
        have = out | set(as_map(r.get("labels")))
        for k, v in as_map(r.get("annotations")).items():
            for lab in re.findall(r"\$labels\.([a-zA-Z_][a-zA-Z0-9_]*)", str(v)):
                if lab not in have:
                    problems.append(f"{w}: annotations.{k} uses $labels.{lab}, which the alert does "
                                    f"not have (it has: {', '.join(sorted(have)) or 'none'})")


# ------------------------------------------------------------------------------------------------
# The dashboard.

VAR_REF = re.compile(r"\$\{([A-Za-z0-9_]+)(?::[^}]*)?\}|\$([A-Za-z_][A-Za-z0-9_]*)|\[\[([A-Za-z0-9_]+)\]\]")


def grafana_expr(expr, defined, where, problems):
    """Grafana's variables in an expression: each must be defined; the interval ones are replaced
    by durations so the text parses as PromQL."""
    for m in VAR_REF.finditer(expr):
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in defined and name not in GRAFANA_BUILTINS:
            problems.append(f"{where}: unknown dashboard variable ${name}")
    for name, dur in GRAFANA_INTERVALS.items():
        expr = re.sub(r"\$\{" + name + r"\}|\$" + name + r"\b", dur, expr)
    return expr


def check_datasource(ds, where, problems):
    if not (isinstance(ds, dict) and ds.get("uid") == "${datasource}" and ds.get("type") == "prometheus"):
        problems.append(f"{where}: datasource must be {{\"type\": \"prometheus\", \"uid\": \"${{datasource}}\"}}, "
                        f"not {ds!r}")


def check_dashboard(path, analyzer, problems, must_show):
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        problems.append(f"{path}: cannot read as JSON: {e}")
        return
    if not isinstance(d, dict):
        problems.append(f"{path}: not a JSON object")
        return
    for k in ("title", "uid"):
        if not isinstance(d.get(k), str) or not d.get(k):
            problems.append(f"{path}: `{k}` missing")
    sv = d.get("schemaVersion")
    if not isinstance(sv, int) or sv < 36:
        problems.append(f"{path}: schemaVersion {sv!r}: must be an integer >= 36 (Grafana 9+)")
    variables = as_list(as_map(d.get("templating")).get("list"))
    defined = set()
    ds_var = False
    for vi, v in enumerate(variables):
        vw = f"{path}: templating.list[{vi}]"
        name = v.get("name") if isinstance(v, dict) else None
        if not isinstance(name, str) or not name:
            problems.append(f"{vw}: no name")
            continue
        vw = f"{path}: variable {name}"
        if name in defined:
            problems.append(f"{vw}: defined twice")
        defined.add(name)
        if name == "datasource":
            if v.get("type") != "datasource" or v.get("query") != "prometheus":
                problems.append(f"{vw}: must be of type datasource with query prometheus")
            else:
                ds_var = True
    if not ds_var:
        problems.append(f"{path}: no `datasource` variable (type datasource, query prometheus)")
    for v in variables:
        if not isinstance(v, dict) or v.get("type") != "query":
            continue
        vw = f"{path}: variable {v.get('name')}"
        check_datasource(v.get("datasource"), vw, problems)
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if not isinstance(q, str) or not q:
            problems.append(f"{vw}: no query")
            continue
        if v.get("definition") not in (None, q):
            problems.append(f"{vw}: `definition` and `query` differ")
        m = re.fullmatch(r"\s*label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*", q, re.S)
        if m:
            sel, label = m.group(1), m.group(2)
            out = analyzer.check(grafana_expr(sel, defined, vw, problems), vw, problems)
            if isinstance(out, frozenset) and label not in out:
                problems.append(f"{vw}: label_values: {label!r} is not a label of {sel.strip()}")
        elif re.match(r"\s*(label_names|metrics|query_result)\(", q):
            pass
        else:
            problems.append(f"{vw}: query {q!r} is not label_values(selector, label)")
    for ai, a in enumerate(as_list(as_map(d.get("annotations")).get("list"))):
        if not isinstance(a, dict) or a.get("builtIn"):
            continue
        aw = f"{path}: annotation {a.get('name', ai)!r}"
        check_datasource(a.get("datasource"), aw, problems)
        if not isinstance(a.get("expr"), str) or not a["expr"].strip():
            problems.append(f"{aw}: no expr")
        else:
            analyzer.check(grafana_expr(a["expr"], defined, aw, problems), aw, problems)
    # Panels: rows may hold their own (collapsed) panels.
    flat = []
    for p in as_list(d.get("panels")):
        flat.append(p)
        if isinstance(p, dict) and p.get("type") == "row":
            flat.extend(as_list(p.get("panels")))
    if not flat:
        problems.append(f"{path}: no panels")
    ids = {}
    boxes = []
    for pi, p in enumerate(flat):
        if not isinstance(p, dict):
            problems.append(f"{path}: panels[{pi}] is not an object")
            continue
        pw = f"{path}: panel {p.get('id')} {p.get('title', '')!r}"
        pid = p.get("id")
        if not isinstance(pid, int) or isinstance(pid, bool):
            problems.append(f"{pw}: `id` must be an integer")
        elif pid in ids:
            problems.append(f"{pw}: duplicate panel id {pid} (also {ids[pid]!r})")
        else:
            ids[pid] = p.get("title", "")
        if not isinstance(p.get("title"), str) or not p["title"].strip():
            problems.append(f"{pw}: no title")
        if p.get("type") not in PANEL_TYPES:
            problems.append(f"{pw}: unknown panel type {p.get('type')!r}")
        gp = p.get("gridPos")
        if not isinstance(gp, dict) or not all(isinstance(gp.get(k), int) and not isinstance(gp.get(k), bool)
                                               for k in ("h", "w", "x", "y")):
            problems.append(f"{pw}: gridPos must have integer h, w, x, y")
        elif gp["h"] < 1 or gp["w"] < 1 or gp["x"] < 0 or gp["y"] < 0 or gp["x"] + gp["w"] > 24:
            problems.append(f"{pw}: gridPos {gp} is outside the 24-column grid")
        else:
            for ow, o in boxes:
                if (gp["x"] < o["x"] + o["w"] and o["x"] < gp["x"] + gp["w"]
                        and gp["y"] < o["y"] + o["h"] and o["y"] < gp["y"] + gp["h"]):
                    problems.append(f"{pw}: gridPos overlaps {ow}")
            boxes.append((pw.split(": ", 1)[1], gp))
        if p.get("type") in ("row", "text"):
            if p.get("targets"):
                problems.append(f"{pw}: a {p['type']} has no targets")
            continue
        check_datasource(p.get("datasource"), pw, problems)
        targets = p.get("targets")
        if not isinstance(targets, list) or not targets:
            problems.append(f"{pw}: no targets")
            continue
        refs = set()
        for ti, t in enumerate(targets):
            tw = f"{pw} target {t.get('refId', ti) if isinstance(t, dict) else ti}"
            if not isinstance(t, dict):
                problems.append(f"{tw}: not an object")
                continue
            if "datasource" in t:
                check_datasource(t["datasource"], tw, problems)
            ref = t.get("refId")
            if not isinstance(ref, str) or not ref:
                problems.append(f"{tw}: no refId")
            elif ref in refs:
                problems.append(f"{tw}: duplicate refId {ref}")
            refs.add(ref)
            expr = t.get("expr")
            if not isinstance(expr, str) or not expr.strip():
                problems.append(f"{tw}: no expr")
                continue
            analyzer.check(grafana_expr(expr, defined, tw, problems), tw, problems)
    for base, source in sorted(must_show.items()):
        if base not in analyzer.used:
            problems.append(f"{path}: no panel shows {base} ({source}); add one")


# ------------------------------------------------------------------------------------------------

def run(rules, dashboard, metrics_rs=METRICS_RS, host_rs=HOST_RS, docs=DOCS):
    """Every problem found, as lines."""
    problems = []
    try:
        with open(metrics_rs, encoding="utf-8") as f:
            mtext = f.read()
        with open(host_rs, encoding="utf-8") as f:
            htext = f.read()
        cat, src_problems, registered = catalogue(mtext, htext)
    except (OSError, ValueError) as e:
        return [f"reading the metrics from the code: {e}"]
    problems.extend(src_problems)
    analyzer = Analyzer(cat, source_strings(VALUE_SOURCES))
    check_rules(rules, analyzer, problems, doc_anchors(docs))
    analyzer.used = set()  # what the dashboard shows, from here
    must_show = {m.base: m.source for m in cat.values() if m.source in ("server", "filter")}
    check_dashboard(dashboard, analyzer, problems, must_show)
    return problems


def edit_yaml(path, fn):
    import yaml
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    fn(data)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, sort_keys=False, allow_unicode=True)


def edit_json(path, fn):
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    fn(data)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)


def rule(d, name):
    for g in d["groups"]:
        for r in g["rules"]:
            if r.get("alert") == name or r.get("record") == name:
                return r
    raise KeyError(name)


def group(d, name):
    return next(g for g in d["groups"] if g["name"] == name)


def panel(d, title):
    for p in d["panels"]:
        if p.get("title") == title:
            return p
    raise KeyError(title)


# (what, which file, where every reported problem must be, what one of them must say, the breakage)
SELF_TEST = [
    ("an unknown metric in an alert", "rules", "alert LLMPolicyReloadFailed", "unknown metric llm_policy_reload_total",
     lambda d: rule(d, "LLMPolicyReloadFailed").update(expr='increase(llm_policy_reload_total{result="error"}[10m]) > 0')),
    ("a label the metric does not have", "rules", "alert LLMPolicyReloadFailed", "has no label 'reason'",
     lambda d: rule(d, "LLMPolicyReloadFailed").update(expr='increase(llm_policy_reloads_total{reason="error"}[10m]) > 0')),
    ("grouping by a label the metric does not have", "rules", "alert LLMPolicyRedisErrors", "'rul' is not a label",
     lambda d: rule(d, "LLMPolicyRedisErrors").update(expr="sum by (job, rul) (rate(llm_policy_redis_errors_total[5m])) > 0")),
    ("a label value the server never emits", "rules", "alert LLMPolicyReloadFailed", "the value 'faild' is never spelt",
     lambda d: rule(d, "LLMPolicyReloadFailed").update(expr='increase(llm_policy_reloads_total{result="faild"}[10m]) > 0')),
    ("a PromQL syntax error", "rules", "alert LLMPolicyAuditDropped", "PromQL does not parse",
     lambda d: rule(d, "LLMPolicyAuditDropped").update(expr="increase(llm_policy_audit_dropped_total[10m] > 0")),
    ("a duplicate alert", "rules", "alert LLMPolicyAuditDropped", "duplicate alert name",
     lambda d: group(d, "llm-policy-filter")["rules"].append(copy.deepcopy(rule(d, "LLMPolicyAuditDropped")))),
    ("a bad `for`", "rules", "alert LLMPolicyCheckLatencyHigh", "`for` '10 minutes' is not a valid duration",
     lambda d: rule(d, "LLMPolicyCheckLatencyHigh").update({"for": "10 minutes"})),
    ("a `for` without a unit", "rules", "alert LLMPolicyCheckLatencyHigh", "`for` 600 is not a valid duration",
     lambda d: rule(d, "LLMPolicyCheckLatencyHigh").update({"for": 600})),
    ("a rule that is both alert and record", "rules", "group llm-policy-server", "exactly one of `alert` and `record`",
     lambda d: rule(d, "LLMPolicyAuditDropped").update(record="job:x:rate5m")),
    ("a rule without expr", "rules", "alert LLMPolicyAuditDropped", "`expr` missing",
     lambda d: rule(d, "LLMPolicyAuditDropped").pop("expr")),
    ("an unknown rule key", "rules", "alert LLMPolicyAuditDropped", "unknown key 'severity'",
     lambda d: rule(d, "LLMPolicyAuditDropped").update(severity="warning")),
    ("a duplicate group", "rules", "groups[3]", "duplicate group name",
     lambda d: d["groups"].append(copy.deepcopy(group(d, "llm-policy-filter")) | {"rules": [
         {"record": "job:y:rate5m", "expr": "sum by (job) (rate(llm_policy_sync_ok[5m]))"}]})),
    ("an annotation label the alert does not have", "rules", "alert LLMPolicyAuditDropped", "uses $labels.rule",
     lambda d: rule(d, "LLMPolicyAuditDropped")["annotations"].update(summary="{{ $labels.rule }}")),
    ("a runbook without its heading", "rules", "alert LLMPolicyAuditDropped", "has no heading",
     lambda d: rule(d, "LLMPolicyAuditDropped")["annotations"].update(runbook_url=RUNBOOK_PREFIX + "nowhere")),
    ("a missing severity", "rules", "alert LLMPolicyAuditDropped", "labels.severity",
     lambda d: rule(d, "LLMPolicyAuditDropped").update(labels={})),
    ("rate() over a gauge", "rules", "alert LLMPolicyAuditQueueBacklog", "a gauge (not a counter)",
     lambda d: rule(d, "LLMPolicyAuditQueueBacklog").update(expr="rate(llm_policy_audit_queue_depth[5m]) > 1")),
    ("histogram_quantile over a _count", "rules", "record job:llm_policy_check_duration_seconds:p99_5m", "without `le`",
     lambda d: rule(d, "job:llm_policy_check_duration_seconds:p99_5m").update(
         expr="histogram_quantile(0.99, sum by (job) (rate(llm_policy_check_duration_seconds_count[5m])))")),
    ("vectors that cannot match", "rules", "alert LLMPolicyCheckErrors", "matches series with different labels",
     lambda d: rule(d, "LLMPolicyCheckErrors").update(
         expr="job_kind:llm_policy_check_errors:rate5m / job:llm_policy_checks:rate5m > 0.01")),
    ("a recorded series used with a label it lost", "rules", "alert LLMPolicyCheckLatencyHigh", "has no label 'instance'",
     lambda d: rule(d, "LLMPolicyCheckLatencyHigh").update(
         expr='job:llm_policy_check_duration_seconds:p99_5m{instance="x"} > 0.05')),
    ("an unknown metric in a panel", "dashboard", "panel 9 ", "unknown metric llm_policy_decision_total",
     lambda d: panel(d, "Decisions by verdict")["targets"][0].update(
         expr='sum by (decision) (rate(llm_policy_decision_total{job=~"$job"}[$__rate_interval]))')),
    ("a wrong label in a panel", "dashboard", "panel 9 ", "'verdict' is not a label",
     lambda d: panel(d, "Decisions by verdict")["targets"][0].update(
         expr='sum by (verdict) (rate(llm_policy_decisions_total{job=~"$job"}[$__rate_interval]))')),
    ("a filter stat named as Envoy does not name it", "dashboard", "'Filter decisions'",
     "unknown metric envoy_llm_policy_decisions_allow",
     lambda d: panel(d, "Filter decisions")["targets"][0].update(
         expr='sum(rate(envoy_llm_policy_decisions_allow{job=~"$envoy_job"}[$__rate_interval]))')),
    ("a PromQL syntax error in a panel", "dashboard", "'Audit queue depth'", "PromQL does not parse",
     lambda d: panel(d, "Audit queue depth")["targets"][0].update(expr='llm_policy_audit_queue_depth{job=~"$job"')),
    ("an undefined dashboard variable", "dashboard", "'Audit queue depth'", "unknown dashboard variable $cluster",
     lambda d: panel(d, "Audit queue depth")["targets"][0].update(expr='llm_policy_audit_queue_depth{job=~"$cluster"}')),
    ("a duplicate panel id", "dashboard", "panel 2 ", "duplicate panel id",
     lambda d: d["panels"][2].update(id=d["panels"][1]["id"])),
    ("a panel without the datasource variable", "dashboard", "'Audit queue depth'", "datasource must be",
     lambda d: panel(d, "Audit queue depth").update(datasource={"type": "prometheus", "uid": "prometheus"})),
    ("overlapping panels", "dashboard", "'Audit queue depth'", "overlaps",
     lambda d: panel(d, "Audit queue depth")["gridPos"].update(panel(d, "Check errors by kind")["gridPos"])),
    ("a panel outside the grid", "dashboard", "'Audit queue depth'", "outside the 24-column grid",
     lambda d: panel(d, "Audit queue depth")["gridPos"].update(x=20)),
    ("a metric no panel shows", "dashboard", "no panel shows", "no panel shows llm_policy_alerts_total",
     lambda d: d["panels"].remove(panel(d, "Alerts raised by rules"))),
    ("no datasource variable", "dashboard", "datasource", "no `datasource` variable",
     lambda d: d["templating"]["list"].pop(0)),
    ("a variable query over a wrong label", "dashboard", "variable namespace", "'namespaces' is not a label",
     lambda d: next(v for v in d["templating"]["list"] if v["name"] == "namespace").update(
         definition='label_values(llm_policy_decisions_total{job=~"$job"}, namespaces)',
         query={"qryType": 1, "query": 'label_values(llm_policy_decisions_total{job=~"$job"}, namespaces)',
                "refId": "PrometheusVariableQueryEditor-VariableQuery"})),
]

# The extraction from the code, on small sources of known shape.
EXTRACT_METRICS_RS = '''
pub fn new() -> Result<Metrics, prometheus::Error> {
    let a = counter_vec("llm_policy_a_total", "A.", &["x", "y"])?;
    let b = seconds("llm_policy_b_seconds", "B.")?;
    let c = IntGauge::new("llm_policy_c", "C.")?;
    let d = HistogramVec::new(HistogramOpts::new("llm_policy_d_ratio", "D.").buckets(vec![0.5]), &["k"])?;
    let e = IntGaugeVec::new(Opts::new("llm_policy_e_info", "E."), &["v"])?;
    let f = Counter::new("llm_policy_f_total", "F.")?;
}
'''
EXTRACT_HOST_RS = '''
    pub fn name(self) -> &'static str {
        match self {
            Metric::Allowed => "llm_policy.decisions.allow",
            Metric::EvaluationMicros => "llm_policy.evaluation_us",
        }
    }
    pub fn is_histogram(self) -> bool {
        matches!(self, Metric::EvaluationMicros)
    }
'''


def self_test():
    import yaml  # noqa: F401  (the venv has it; fail early otherwise)
    ok = True
    caught = 0
    got = server_metrics(EXTRACT_METRICS_RS)
    want = {"llm_policy_a_total": ("counter", ["x", "y"]), "llm_policy_b_seconds": ("histogram", []),
            "llm_policy_c": ("gauge", []), "llm_policy_d_ratio": ("histogram", ["k"]),
            "llm_policy_e_info": ("gauge", ["v"]), "llm_policy_f_total": ("counter", [])}
    if got != want:
        print(f"  NOT OK: metrics.rs extraction: got {got}, want {want}")
        ok = False
    got = filter_metrics(EXTRACT_HOST_RS)
    if got != {"llm_policy.decisions.allow": "counter", "llm_policy.evaluation_us": "histogram"}:
        print(f"  NOT OK: host.rs extraction: got {got}")
        ok = False
    if envoy_prometheus_name("llm_policy.decisions.allow") != "llm_policy_decisions_allow":
        print("  NOT OK: the Envoy name of llm_policy.decisions.allow")
        ok = False
    with tempfile.TemporaryDirectory() as tmp:
        base_rules = os.path.join(tmp, "rules.yaml")
        base_dash = os.path.join(tmp, "dashboard.json")
        # The unbroken copies, through the same YAML/JSON round trip as the broken ones.
        with open(DEFAULT_RULES, encoding="utf-8") as f:
            rules_text = f.read()
        with open(DEFAULT_DASHBOARD, encoding="utf-8") as f:
            dash_text = f.read()
        for p, t in ((base_rules, rules_text), (base_dash, dash_text)):
            with open(p, "w", encoding="utf-8") as f:
                f.write(t)
        edit_yaml(base_rules, lambda d: None)
        edit_json(base_dash, lambda d: None)
        unbroken = run(base_rules, base_dash)
        if unbroken:
            print("  NOT OK: the unbroken files are reported:")
            for p in unbroken:
                print(f"    {p}")
            ok = False
        for i, (what, which, where, expect, brk) in enumerate(SELF_TEST):
            rp = os.path.join(tmp, f"case{i}.yaml")
            dp = os.path.join(tmp, f"case{i}.json")
            with open(rp, "w", encoding="utf-8") as f:
                f.write(rules_text)
            with open(dp, "w", encoding="utf-8") as f:
                f.write(dash_text)
            try:
                if which == "rules":
                    edit_yaml(rp, brk)
                else:
                    edit_json(dp, brk)
            except (KeyError, IndexError, StopIteration) as e:
                print(f"  NOT OK: {what}: cannot break the file ({e!r}): update SELF_TEST")
                ok = False
                continue
            found = run(rp, dp)
            hit = [p for p in found if expect in p]
            elsewhere = [p for p in found if where not in p]
            if not hit or elsewhere:
                ok = False
                print(f"  NOT OK: {what}: expected {expect!r}, and every problem in {where!r}; got:")
                for p in found or ["(nothing)"]:
                    print(f"    {p}")
            else:
                caught += 1
                print(f"  caught: {what}: {hit[0].split(': ', 1)[1]}")
    print(f"observability-check self-test: {caught} of {len(SELF_TEST)} broken files caught"
          + ("" if ok else "; FAILED"))
    return 0 if ok else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rules", default=DEFAULT_RULES)
    ap.add_argument("--dashboard", default=DEFAULT_DASHBOARD)
    ap.add_argument("--self-test", action="store_true", help="break copies of the files, expect each caught")
    args = ap.parse_args()
    try:
        import promql_parser  # noqa: F401
        import yaml  # noqa: F401
    except ImportError as e:
        print(f"observability-check: {e}: run it with the SDK venv's Python (make observability-check)",
              file=sys.stderr)
        return 2
    if args.self_test:
        return self_test()
    problems = run(args.rules, args.dashboard)
    for p in problems:
        print(p)
    rel = lambda p: os.path.relpath(p, REPO)  # noqa: E731
    if problems:
        print(f"observability-check: {len(problems)} problem(s)")
        return 1
    print(f"observability-check: {rel(args.rules)} and {rel(args.dashboard)} agree with "
          f"{rel(METRICS_RS)} and {rel(HOST_RS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
