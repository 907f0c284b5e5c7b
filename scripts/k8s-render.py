#!/usr/bin/env python3
"""Writes the generated Kubernetes manifests of deploy/kubernetes/ (`make k8s-manifests`).

    scripts/k8s-render.py --cli target/release/llm-policy [--out deploy/kubernetes]

Four ConfigMap manifests, each wrapping files the repository already has or that
`llm-policy envoy-config` writes, so that nothing in them is copied by hand:

    base/policies.generated.yaml   ConfigMap llm-policy-policies: the policy files of policies/
                                   (the top level; the test suites under policies/tests/ stay out)
    base/models.generated.yaml     ConfigMap llm-policy-models: models/models.yaml
    central/envoy.generated.yaml   ConfigMap llm-policy-gateway-envoy: the gateway's Envoy
                                   (`--mode ext-authz`, in front of the engine Service)
    sidecar/envoy.generated.yaml   ConfigMap llm-app-envoy-template: the sidecar Envoy
                                   (`--mode filter+fallback` against the engine on 127.0.0.1)

The sidecar configuration is a template in two places, both said in the file:
  * the filter's usage token is the placeholder USAGE_TOKEN_PLACEHOLDER: Envoy cannot read the
    wasm filter's configuration from a file, so the token would otherwise sit in a committed
    ConfigMap; the pod's `envoy-init` container writes the real one (from a Secret) into an
    emptyDir before Envoy starts;
  * Envoy's admin listener is a unix socket in a volume only the Envoy container mounts, not
    127.0.0.1:9901, which every container of the pod (the application's too) could reach: the
    admin interface shows the configuration (the usage token) and can stop Envoy.

Standard library only. When PyYAML is importable (`make k8s-check` runs this with the SDK venv's
Python), every ConfigMap written is read back and must hold its files byte for byte.
"""
import argparse
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Where each shape runs. The gateway's Envoy names the engine Service by its DNS name, so the
# central kustomization's `namespace:` must be CENTRAL_NAMESPACE (k8s-check verifies it): to
# install elsewhere, change both and run `make k8s-manifests`.
CENTRAL_NAMESPACE = "llm-policy"
SIDECAR_NAMESPACE = "llm-app"
CLUSTER_DOMAIN = "cluster.local"
ENGINE_SERVICE = "llm-policy"
UPSTREAM = "https://api.openai.com"

# Mount paths the manifests and the rendered configurations share (k8s-check verifies that the
# Deployments mount what these paths name).
WASM_PATH = "/etc/envoy/wasm/llm_policy_filter.wasm"
PROVIDER_KEY_FILE = "/run/secrets/llm-provider/openai-api-key"
USAGE_TOKEN_PLACEHOLDER = "__LLM_POLICY_USAGE_TOKEN__"
SIDECAR_ADMIN_SOCKET = "/var/run/envoy/admin.sock"

LABELS = {"app.kubernetes.io/part-of": "llm-policy"}


def central_envoy_args():
    """`llm-policy envoy-config` for the central gateway: ext_authz against the engine replicas
    (one headless Service: every ready replica is an endpoint of Envoy's STRICT_DNS cluster)."""
    server = f"{ENGINE_SERVICE}.{CENTRAL_NAMESPACE}.svc.{CLUSTER_DOMAIN}:50051"
    return ["envoy-config", "--mode", "ext-authz", "--upstream", UPSTREAM,
            "--listen", "0.0.0.0:10000", "--server", server,
            "--identity", "api-keys", "--provider-key-file", PROVIDER_KEY_FILE]


def sidecar_envoy_args(policies, usage_token_file):
    """`llm-policy envoy-config` for the sidecar: the filter in Envoy, the engine beside it."""
    return ["envoy-config", "--mode", "filter+fallback", "--policies", policies,
            "--upstream", UPSTREAM, "--listen", "127.0.0.1:10000",
            "--server", "127.0.0.1:50051", "--sync-from", "127.0.0.1:8080",
            "--wasm", WASM_PATH, "--identity", "api-keys",
            "--provider-key-file", PROVIDER_KEY_FILE, "--usage-token-file", usage_token_file]


ADMIN_LOOPBACK = "admin:\n  address:\n    socket_address: { address: 127.0.0.1, port_value: 9901 }\n"
ADMIN_SOCKET = (
    "admin:\n"
    "  # scripts/k8s-render.py: a unix socket (mode 0600, Envoy's user only) in a volume only the\n"
    "  # Envoy container mounts, instead of 127.0.0.1:9901, which the application container\n"
    "  # shares in a pod.\n"
    "  address:\n"
    f"    pipe: {{ path: {SIDECAR_ADMIN_SOCKET}, mode: 384 }}\n"
)


def envoy_config(cli, args):
    done = subprocess.run([cli] + args, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"k8s-render: {cli} {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    for line in done.stderr.splitlines():
        # `--identity api-keys` is chosen on purpose; anything else envoy-config says is shown.
        print(f"k8s-render: envoy-config: {line}", file=sys.stderr)
    return done.stdout


def literal(text, indent, parent=2):
    """`text` as a YAML block scalar whose lines are at `indent` spaces under a key at `parent`
    spaces (a double-quoted string when a block cannot hold it exactly)."""
    printable = all(c == "\n" or c == "\t" or (" " <= c <= "~") or (c >= "\xa0" and c not in "\ufeff\u2028\u2029")
                    for c in text)
    if not text.strip("\n") or not printable:
        return quoted(text)
    chomp = "-" if not text.endswith("\n") else ("+" if text.endswith("\n\n") else "")
    body = text[:-1] if text.endswith("\n") else text
    lines = body.split("\n")
    # Without an indentation indicator the first non-empty line sets the indentation: one that
    # starts with a space (or a blank line before it holding spaces) needs the indicator.
    upto = next((i for i, line in enumerate(lines) if line.strip(" ")), len(lines) - 1)
    explicit = any(line.startswith(" ") for line in lines[: upto + 1])
    head = "|" + (str(indent - parent) if explicit else "") + chomp
    pad = " " * indent
    return head + "\n" + "\n".join(pad + line if line else "" for line in lines)


def quoted(text):
    """A YAML double-quoted scalar, every character YAML would not take as is escaped."""
    out = []
    for c in text:
        if c == '"' or c == "\\":
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif " " <= c <= "~":
            out.append(c)
        elif ord(c) <= 0xFF:
            out.append("\\x%02x" % ord(c))
        elif ord(c) <= 0xFFFF:
            out.append("\\u%04x" % ord(c))
        else:
            out.append("\\U%08x" % ord(c))
    return '"' + "".join(out) + '"'


def configmap(name, component, files, what):
    """A ConfigMap manifest holding `files`; `what` is a list of comment lines saying whence."""
    lines = ["# Generated by `make k8s-manifests` (scripts/k8s-render.py). Do not edit: `make k8s-check`",
             "# fails when this file is not what the renderer writes."]
    lines += ["# " + w for w in what]
    lines += [
        "apiVersion: v1",
        "kind: ConfigMap",
        "metadata:",
        f"  name: {name}",
        "  labels:",
        "    app.kubernetes.io/name: llm-policy",
        f"    app.kubernetes.io/component: {component}",
    ]
    lines += [f"    {k}: {v}" for k, v in LABELS.items()]
    lines.append("data:")
    for key in sorted(files):
        lines.append(f"  {key}: {literal(files[key], 4)}")
    return "\n".join(lines) + "\n"


def policy_files(policies):
    """The policy files a ConfigMap can carry: the top level of the directory (ConfigMap keys
    have no `/`; the server skips `kind: PolicyTest` suites anyway)."""
    out = {}
    for name in sorted(os.listdir(policies)):
        path = os.path.join(policies, name)
        if os.path.isfile(path) and name.endswith((".yaml", ".yml", ".json")) and not name.startswith("."):
            with open(path, encoding="utf-8") as f:
                out[name] = f.read()
    if not out:
        sys.exit(f"k8s-render: no policy files in {policies}")
    return out


def render(cli, policies="policies", models="models/models.yaml"):
    """{path under deploy/kubernetes: text} of every generated manifest."""
    out = {}
    out["base/policies.generated.yaml"] = configmap(
        "llm-policy-policies", "policies", policy_files(os.path.join(REPO, policies)),
        [f"The policy files of {policies}/ (mounted at /etc/llm-policy/policies)."])
    with open(os.path.join(REPO, models), encoding="utf-8") as f:
        out["base/models.generated.yaml"] = configmap(
            "llm-policy-models", "models", {"models.yaml": f.read()},
            [f"{models}, the model table (the server's `modelsFile`)."])

    central = envoy_config(cli, central_envoy_args())
    out["central/envoy.generated.yaml"] = configmap(
        "llm-policy-gateway-envoy", "gateway", {"envoy.yaml": central},
        ["The gateway's Envoy configuration:", "  llm-policy " + " ".join(central_envoy_args())])

    with tempfile.TemporaryDirectory() as tmp:
        token = os.path.join(tmp, "usage-token")
        with open(token, "w") as f:
            f.write(USAGE_TOKEN_PLACEHOLDER + "\n")
        sidecar = envoy_config(cli, sidecar_envoy_args(policies, token))
    shown = " ".join(sidecar_envoy_args(policies, "<the usage token placeholder>"))
    if sidecar.count(ADMIN_LOOPBACK) != 1 or sidecar.count(USAGE_TOKEN_PLACEHOLDER) != 1:
        sys.exit("k8s-render: the sidecar's Envoy configuration no longer has exactly one "
                 "loopback admin address and one usage token: update scripts/k8s-render.py")
    sidecar = sidecar.replace(ADMIN_LOOPBACK, ADMIN_SOCKET)
    out["sidecar/envoy.generated.yaml"] = configmap(
        "llm-app-envoy-template", "sidecar-envoy", {"envoy.yaml": sidecar},
        ["The sidecar Envoy's configuration, a template:", f"  llm-policy {shown}",
         "with the admin address made a unix socket; the pod's envoy-init container replaces",
         f"{USAGE_TOKEN_PLACEHOLDER} with the usage token from its Secret."])
    check_round_trip(out, {
        "base/policies.generated.yaml": policy_files(os.path.join(REPO, policies)),
        "base/models.generated.yaml": {"models.yaml": open(os.path.join(REPO, models), encoding="utf-8").read()},
        "central/envoy.generated.yaml": {"envoy.yaml": central},
        "sidecar/envoy.generated.yaml": {"envoy.yaml": sidecar},
    })
    return out


def check_round_trip(out, sources):
    try:
        import yaml
    except ImportError:
        return
    for path, text in out.items():
        data = yaml.safe_load(text)["data"]
        if data != sources[path]:
            sys.exit(f"k8s-render: {path} does not read back as the files it wraps")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cli", default=os.path.join(REPO, "target/release/llm-policy"),
                    help="the llm-policy binary (default: target/release/llm-policy)")
    ap.add_argument("--out", default=os.path.join(REPO, "deploy/kubernetes"),
                    help="directory the manifests are written under (default: deploy/kubernetes)")
    ap.add_argument("--policies", default="policies", help="policy directory, relative to the repository")
    ap.add_argument("--models", default="models/models.yaml", help="model table, relative to the repository")
    a = ap.parse_args()
    cli = os.path.abspath(a.cli)
    if not os.access(cli, os.X_OK):
        sys.exit(f"k8s-render: {a.cli} is not an executable (make build)")
    for rel, text in render(cli, a.policies, a.models).items():
        path = os.path.join(a.out, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"k8s-render: wrote {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
