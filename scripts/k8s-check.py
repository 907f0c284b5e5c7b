#!/usr/bin/env python3
"""Checks the Kubernetes manifests of deploy/kubernetes/ (`make k8s-check`).

    scripts/k8s-check.py [--cli target/release/llm-policy] [DIR]
    scripts/k8s-check.py --self-test [--cli target/release/llm-policy]

No cluster, kubectl or kustomize is needed (when `kubectl` is on the PATH, `kubectl kustomize`
builds each shape as well and must agree). What it checks:

  1. schema       every manifest against the Kubernetes API schemas of K8S_VERSIONS with the
                  `kubernetes-validate` package, strict: an unknown or misspelt field fails.
  2. security     every container and init container: runAsNonRoot, a numeric non-root runAsUser,
                  readOnlyRootFilesystem, allowPrivilegeEscalation false, not privileged,
                  capabilities drop [ALL] and none added, seccompProfile RuntimeDefault (the pod's
                  or its own), CPU and memory requests and limits, an image with a pinned tag,
                  writable mounts only of emptyDir or persistent volumes; every pod:
                  automountServiceAccountToken false, no host namespaces or hostPath; every
                  Namespace: Pod Security `restricted` enforced; no Secret with data committed.
  3. kustomize    every kustomization.yaml: each resource exists (a file inside its root, or a
                  directory holding a kustomization), nothing remote, generators and patches
                  only from files inside its root, every *.yaml in its directory listed (or a
                  kustomization); every *.yaml of DIR in some kustomization; each shape built
                  (namespace applied) without duplicates; what pods, Services, PDBs, HPAs and
                  NetworkPolicies refer to exists; every Secret referred to documented in
                  docs/kubernetes.md (`kubectl create secret ... NAME`).
  4. engine       `llm-policy serve` requests and limits exactly ENGINE_RESOURCES per shape.
  5. generated    the files `make k8s-manifests` writes (scripts/k8s-render.py) are current.
  6. engine config  the policies ConfigMap the engine mounts, extracted, passes `llm-policy
                  validate` with the repository's bundle digest; every path in the engine's
                  server.yaml is one of its mounts; `llm-policy serve` starts with that
                  server.yaml (paths and Redis pointed at loopback stand-ins, listeners on
                  loopback) and answers /healthz; the Envoy configurations' files are mounted.
  7. envoy        with --envoy (and --wasm for the filter), `envoy --mode validate` accepts each
                  shape's Envoy configuration, its files replaced by local stand-ins.

Every problem is one line naming the file, the object (Kind/name) and the container. Exit 0 when
there is none, 1 otherwise. --self-test copies DIR, breaks the copy in each way listed in
SELF_TEST (a privileged container, a missing limit, an unknown field, a file the kustomization
does not list, ...) and fails unless the check reports each one, and nothing on the unbroken copy.
"""
import argparse
import copy
import difflib
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DIR = os.path.join(REPO, "deploy", "kubernetes")
DOCS = os.path.join(REPO, "docs", "kubernetes.md")

# The Kubernetes versions the manifests are validated against: the oldest they are meant for
# (native sidecar containers are on by default since 1.29, the preStop `sleep` action since 1.30;
# the schemas do not tell feature-gated fields apart) and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.30", "1.37")

# The kustomizations `kubectl apply -k` is documented for, and the engine's requests and limits in
# each (equal: the Guaranteed QoS class).
SHAPES = ("central", "sidecar")
ENGINE_RESOURCES = {"central": ("1", "1Gi"), "sidecar": ("500m", "256Mi")}

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
KUSTOMIZATION_KEYS = {
    "apiVersion", "kind", "metadata", "namespace", "namePrefix", "nameSuffix", "resources",
    "components", "labels", "commonLabels", "commonAnnotations", "configMapGenerator",
    "secretGenerator", "generatorOptions", "patches", "patchesStrategicMerge",
    "patchesJson6902", "images", "replicas", "replacements", "sortOptions", "buildMetadata",
}
CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
    "CustomResourceDefinition", "PriorityClass", "IngressClass", "RuntimeClass",
    "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration",
}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod",
             "ReplicationController"}


def rel(path):
    path = os.path.abspath(path)
    try:
        r = os.path.relpath(path, os.getcwd())
    except ValueError:
        return path
    return path if r.startswith("../..") else r


def inside(path, root):
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root + os.sep)


def is_kustomization(path):
    return os.path.basename(path) in KUSTOMIZATION_FILES


def kustomization_in(d):
    for name in KUSTOMIZATION_FILES:
        if os.path.isfile(os.path.join(d, name)):
            return os.path.join(d, name)
    return None


def ident(doc):
    meta = doc.get("metadata") or {}
    return f"{doc.get('kind', '?')}/{meta.get('name', '?')}"


# ---------------------------------------------------------------------------------------------
# Quantities

def cpu_millis(q):
    s = str(q).strip()
    if s.endswith("m"):
        return float(s[:-1])
    return float(s) * 1000


MEM_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
                "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}


def mem_bytes(q):
    s = str(q).strip()
    for suffix in sorted(MEM_SUFFIXES, key=len, reverse=True):
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * MEM_SUFFIXES[suffix]
    return float(s)


# ---------------------------------------------------------------------------------------------
# Pods

def pod_spec(doc):
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    if kind == "Pod":
        return spec
    if kind == "CronJob":
        spec = ((spec.get("jobTemplate") or {}).get("spec") or {})
    if kind in WORKLOADS:
        return (spec.get("template") or {}).get("spec")
    return None


def pod_labels(doc):
    if doc.get("kind") == "Pod":
        return (doc.get("metadata") or {}).get("labels") or {}
    spec = doc.get("spec") or {}
    if doc.get("kind") == "CronJob":
        spec = ((spec.get("jobTemplate") or {}).get("spec") or {})
    return ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}


def containers(ps):
    for field, what in (("initContainers", "init container"), ("containers", "container"),
                        ("ephemeralContainers", "ephemeral container")):
        for c in ps.get(field) or []:
            yield what, c


def selects(selector, labels):
    """A LabelSelector (matchLabels / matchExpressions) or a plain map (Service) against labels."""
    if selector is None:
        return False
    if "matchLabels" in selector or "matchExpressions" in selector:
        match = selector.get("matchLabels") or {}
        exprs = selector.get("matchExpressions") or []
    else:
        match, exprs = selector, []
    if any(labels.get(k) != v for k, v in match.items()):
        return False
    for e in exprs:
        key, op, values = e.get("key"), e.get("operator"), e.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def image_pinned(image):
    if "@sha256:" in image:
        return True
    last = image.rsplit("/", 1)[-1]
    return ":" in last and last.rsplit(":", 1)[1] not in ("", "latest")


def is_engine(c):
    image = c.get("image", "").split("@")[0].rsplit(":", 1)[0]
    return image.rsplit("/", 1)[-1] == "llm-policy" and (c.get("args") or [None])[0] == "serve"


def is_envoy(c):
    return c.get("image", "").split("@")[0].rsplit(":", 1)[0].endswith("envoyproxy/envoy")


# ---------------------------------------------------------------------------------------------
# The check

class Check:
    def __init__(self, root, cli=None, docs=DOCS, kubectl=True, serve=True, quiet=False,
                 envoy=None, wasm=None):
        import yaml  # noqa: F401 (fail early, with the message main() gives)
        self.root = os.path.abspath(root)
        self.cli = cli
        self.docs = docs
        self.kubectl = kubectl
        self.serve = serve
        self.envoy = envoy
        self.wasm = wasm
        self.quiet = quiet
        self.errors = []
        self.notes = []
        self.files = {}  # path -> [doc]

    def error(self, where, message):
        self.errors.append(f"{where}: {message}")

    def note(self, message):
        self.notes.append(message)
        if not self.quiet:
            print(f"  {message}")

    # -- loading ----------------------------------------------------------------------------
    def load(self):
        import yaml
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if not name.endswith((".yaml", ".yml")) and name != "Kustomization":
                    continue
                path = os.path.join(dirpath, name)
                try:
                    with open(path, encoding="utf-8") as f:
                        docs = [d for d in yaml.safe_load_all(f) if d is not None]
                except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
                    self.error(rel(path), f"does not parse: {e}")
                    continue
                bad = [d for d in docs if not isinstance(d, dict)]
                if bad:
                    self.error(rel(path), "holds a YAML document that is not a mapping")
                    continue
                for d in docs:
                    if not is_kustomization(path) and not isinstance(d.get("metadata"), dict):
                        d["metadata"] = {}  # reported by the schema step; the others read it
                self.files[path] = docs

    def manifests(self):
        for path, docs in self.files.items():
            if not is_kustomization(path):
                for doc in docs:
                    yield path, doc

    # -- 1. schema --------------------------------------------------------------------------
    def schema(self):
        import kubernetes_validate
        from kubernetes_validate import utils
        # kubernetes-validate reads and parses the schema files on every call; cache them.
        if not getattr(utils.schema_contents, "cache_info", None):
            utils.schema_contents = functools.lru_cache(maxsize=None)(utils.schema_contents)
        n = 0
        for path, doc in self.manifests():
            where = f"{rel(path)}: {ident(doc)}"
            if not doc.get("apiVersion") or not doc.get("kind"):
                self.error(where, "has no apiVersion or kind")
                continue
            if not (doc.get("metadata") or {}).get("name"):
                self.error(where, "has no metadata.name")
            if doc.get("kind") == "ConfigMap":
                size = sum(len(str(v).encode()) for v in (doc.get("data") or {}).values())
                if size > 1024 * 1024:
                    self.error(where, f"holds {size} bytes; the API server refuses a ConfigMap over 1 MiB")
                elif size > 200 * 1024:
                    self.note(f"{where}: {size} bytes: past 256 KiB, client-side `kubectl apply` cannot "
                              "store its last-applied annotation (use `kubectl apply --server-side`)")
            for version in K8S_VERSIONS:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    at = ".".join(str(p) for p in e.path) or "(top level)"
                    self.error(where, f"does not validate against Kubernetes {version} (strict): {at}: {e.message}")
                    break
                except kubernetes_validate.SchemaNotFoundError as e:
                    self.error(where, f"no schema for {doc.get('apiVersion')} {doc.get('kind')} in Kubernetes {version}: {e.message}")
                    break
            n += 1
        self.note(f"schema: {n} manifests validated against Kubernetes {' and '.join(K8S_VERSIONS)} (strict)")

    # -- 2. security ------------------------------------------------------------------------
    def security(self):
        n = 0
        for path, doc in self.manifests():
            where = f"{rel(path)}: {ident(doc)}"
            kind = doc.get("kind")
            if kind == "Namespace":
                labels = (doc.get("metadata") or {}).get("labels") or {}
                if labels.get("pod-security.kubernetes.io/enforce") != "restricted":
                    self.error(where, "does not enforce the `restricted` Pod Security profile "
                               "(label pod-security.kubernetes.io/enforce: restricted)")
            if kind == "Secret" and (doc.get("data") or doc.get("stringData")):
                self.error(where, "is a Secret with data: Secrets are created by the operator "
                           "(docs/kubernetes.md), never committed")
            ps = pod_spec(doc)
            if ps is None:
                continue
            n += self.lint_pod(where, doc, ps)
        self.note(f"security: {n} containers and init containers linted")

    def lint_pod(self, where, doc, ps):
        if ps.get("automountServiceAccountToken") is not False:
            self.error(where, "automountServiceAccountToken is not false (nothing here needs the Kubernetes API)")
        for field in ("hostNetwork", "hostPID", "hostIPC"):
            if ps.get(field) is True:
                self.error(where, f"{field} is true")
        psc = ps.get("securityContext") or {}
        volumes = {v.get("name"): v for v in ps.get("volumes") or []}
        claims = {(t.get("metadata") or {}).get("name")
                  for t in (doc.get("spec") or {}).get("volumeClaimTemplates") or []}
        for name, v in volumes.items():
            if "hostPath" in v:
                self.error(where, f"volume {name} is a hostPath")
        count = 0
        for what, c in containers(ps):
            count += 1
            cw = f"{where}: {what} {c.get('name')}"
            sc = c.get("securityContext") or {}

            def eff(key):
                return sc[key] if key in sc else psc.get(key)
            if eff("runAsNonRoot") is not True:
                self.error(cw, "runAsNonRoot is not true")
            user = eff("runAsUser")
            if not isinstance(user, int) or isinstance(user, bool) or user <= 0:
                self.error(cw, f"runAsUser is not a numeric non-root user id (is {user!r})")
            group = eff("runAsGroup")
            if group is not None and (not isinstance(group, int) or group <= 0):
                self.error(cw, f"runAsGroup is root's group or not numeric (is {group!r})")
            if sc.get("readOnlyRootFilesystem") is not True:
                self.error(cw, "readOnlyRootFilesystem is not true")
            if sc.get("allowPrivilegeEscalation") is not False:
                self.error(cw, "allowPrivilegeEscalation is not false")
            if sc.get("privileged") is True:
                self.error(cw, "privileged is true")
            caps = sc.get("capabilities") or {}
            if "ALL" not in (caps.get("drop") or []):
                self.error(cw, "capabilities do not drop ALL")
            if caps.get("add"):
                self.error(cw, f"capabilities add {caps.get('add')}")
            seccomp = (eff("seccompProfile") or {}).get("type")
            if seccomp != "RuntimeDefault":
                self.error(cw, f"seccompProfile is not RuntimeDefault (is {seccomp!r})")
            res = c.get("resources") or {}
            for part in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if (res.get(part) or {}).get(r) in (None, ""):
                        self.error(cw, f"resources.{part}.{r} is not set")
            image = c.get("image") or ""
            if not image_pinned(image):
                self.error(cw, f"image {image!r} has no pinned tag (or digest)")
            for m in c.get("volumeMounts") or []:
                name = m.get("name")
                v = volumes.get(name)
                if v is None and name not in claims:
                    self.error(cw, f"mounts volume {name}, which the pod does not have")
                    continue
                writable_kind = name in claims or "emptyDir" in v or "persistentVolumeClaim" in v \
                    or "ephemeral" in v
                if m.get("readOnly") is not True and not writable_kind:
                    kind = next((k for k in v if k != "name"), "?")
                    self.error(cw, f"mounts the {kind} volume {name} at {m.get('mountPath')} without "
                               "readOnly: true (writable paths are emptyDir or persistent volumes)")
        return count

    # -- 3. kustomizations -----------------------------------------------------------------
    def kustomizations(self):
        kdirs = {}
        for path, docs in self.files.items():
            if is_kustomization(path):
                kdirs[os.path.dirname(path)] = (path, docs[0] if docs else {})
        self.kdirs = kdirs
        used = set()
        for d, (path, k) in sorted(kdirs.items()):
            where = rel(path)
            listed = set()
            if k.get("apiVersion") != "kustomize.config.k8s.io/v1beta1" or k.get("kind") != "Kustomization":
                self.error(where, "is not apiVersion kustomize.config.k8s.io/v1beta1, kind Kustomization")
            for key in sorted(set(k) - KUSTOMIZATION_KEYS):
                self.error(where, f"unknown or unsupported key `{key}`")
            resources = k.get("resources") or []
            if not isinstance(resources, list):
                self.error(where, "resources is not a list")
                resources = []
            seen = set()
            for r in resources:
                if not isinstance(r, str):
                    self.error(where, f"resource {r!r} is not a path")
                    continue
                if r in seen:
                    self.error(where, f"lists {r} twice")
                seen.add(r)
                if "://" in r or r.startswith(("github.com/", "git@", "git::")) or "?ref=" in r:
                    self.error(where, f"resource {r} is remote (only files in the repository)")
                    continue
                p = os.path.normpath(os.path.join(d, r))
                if not os.path.exists(p):
                    self.error(where, f"resource {r} does not exist")
                elif os.path.isdir(p):
                    if not kustomization_in(p):
                        self.error(where, f"resource {r} is a directory without a kustomization.yaml")
                    else:
                        used.add(os.path.realpath(p))
                else:
                    if not inside(p, d):
                        self.error(where, f"resource {r} is a file outside the kustomization's root "
                                   "(kustomize refuses it: list its directory's kustomization instead)")
                    elif is_kustomization(p):
                        self.error(where, f"resource {r} is a kustomization file (list its directory)")
                    listed.add(os.path.realpath(p))
            for gen in ("configMapGenerator", "secretGenerator"):
                for g in k.get(gen) or []:
                    sources = list(g.get("files") or []) + list(g.get("envs") or [])
                    if g.get("env"):
                        sources.append(g["env"])
                    for s in sources:
                        f = s.split("=", 1)[1] if "=" in s else s
                        p = os.path.normpath(os.path.join(d, f))
                        if not inside(p, d):
                            self.error(where, f"{gen} {g.get('name')} reads {f}, outside the kustomization's root")
                        elif not os.path.isfile(p):
                            self.error(where, f"{gen} {g.get('name')} reads {f}, which does not exist")
                        listed.add(os.path.realpath(p))
            patch_files = [p.get("path") for p in k.get("patches") or [] if isinstance(p, dict) and p.get("path")]
            patch_files += [p for p in k.get("patchesStrategicMerge") or [] if isinstance(p, str) and "\n" not in p]
            patch_files += [p.get("path") for p in k.get("patchesJson6902") or [] if isinstance(p, dict) and p.get("path")]
            for f in patch_files:
                p = os.path.normpath(os.path.join(d, f))
                if not inside(p, d):
                    self.error(where, f"patch {f} is outside the kustomization's root")
                elif not os.path.isfile(p):
                    self.error(where, f"patch {f} does not exist")
                listed.add(os.path.realpath(p))
            if patch_files or k.get("replacements") or k.get("replicas") or k.get("images"):
                self.note(f"{where}: patches, replacements, replicas and images are checked as files, "
                          "not applied by this check's build")
            # Every YAML file under the kustomization's directory (down to the next
            # kustomization) is listed.
            for path2 in self.files:
                if is_kustomization(path2) or not inside(path2, d):
                    continue
                owner = self.owner(path2)
                if owner == d and os.path.realpath(path2) not in listed:
                    self.error(rel(path2), f"is not listed in {rel(path)} (list it under resources, or move it out)")
        for path in self.files:
            if not is_kustomization(path) and self.owner(path) is None:
                self.error(rel(path), "is in no kustomization's directory")
        for d in kdirs:
            name = os.path.relpath(d, self.root)
            if name not in SHAPES and os.path.realpath(d) not in used:
                self.error(rel(kdirs[d][0]), "is used by no other kustomization and is not one of the "
                           f"shapes ({', '.join(SHAPES)})")
        for shape in SHAPES:
            if os.path.join(self.root, shape) not in kdirs:
                self.error(rel(os.path.join(self.root, shape)), "has no kustomization.yaml")
        self.note(f"kustomize: {len(kdirs)} kustomizations ({', '.join(sorted(os.path.relpath(d, self.root) for d in kdirs))})")

    def owner(self, path):
        """The nearest directory at or above `path` (within the root) holding a kustomization."""
        d = os.path.dirname(path)
        while inside(d, self.root):
            if d in self.kdirs:
                return d
            if d == self.root:
                break
            d = os.path.dirname(d)
        return None

    def build(self, d, stack=()):
        """[(source path, doc)] of the kustomization in `d`, as kustomize would emit them (the
        namespace applied; generators as stub objects; patches not applied)."""
        if d in stack:
            self.error(rel(d), "kustomizations include each other")
            return []
        path, k = self.kdirs.get(d, (None, {}))
        out = []
        for r in k.get("resources") or []:
            if not isinstance(r, str) or "://" in r:
                continue
            p = os.path.normpath(os.path.join(d, r))
            if os.path.isdir(p) and p in self.kdirs:
                out += self.build(p, stack + (d,))
            elif os.path.isfile(p) and p in self.files:
                out += [(p, copy.deepcopy(doc)) for doc in self.files[p]]
        for gen, kind in (("configMapGenerator", "ConfigMap"), ("secretGenerator", "Secret")):
            for g in k.get(gen) or []:
                out.append((path, {"apiVersion": "v1", "kind": kind, "metadata": {"name": g.get("name")},
                                   "data": {}, "generated": True}))
        ns = k.get("namespace")
        if ns:
            for p, doc in out:
                meta = doc.setdefault("metadata", {})
                if doc.get("kind") in CLUSTER_SCOPED:
                    continue
                if meta.get("namespace") not in (None, ns):
                    self.error(f"{rel(p)}: {ident(doc)}", f"names namespace {meta['namespace']}, "
                               f"which {rel(path)} replaces with {ns}")
                meta["namespace"] = ns
        return out

    def shapes(self):
        import yaml
        render = load_renderer()
        self.built = {}
        for shape in SHAPES:
            d = os.path.join(self.root, shape)
            if d not in self.kdirs:
                continue
            built = self.build(d)
            self.built[shape] = built
            kpath, k = self.kdirs[d]
            seen = {}
            for p, doc in built:
                key = (doc.get("kind"), (doc.get("metadata") or {}).get("namespace"), (doc.get("metadata") or {}).get("name"))
                if key in seen:
                    self.error(rel(p), f"{ident(doc)} is also in {rel(seen[key])} (kustomize refuses duplicates)")
                seen[key] = p
            want_ns = {"central": render.CENTRAL_NAMESPACE, "sidecar": render.SIDECAR_NAMESPACE}[shape]
            if k.get("namespace") != want_ns:
                self.error(rel(kpath), f"namespace is {k.get('namespace')!r}; the rendered Envoy configuration "
                           f"(scripts/k8s-render.py) expects {want_ns!r}")
            if not any(doc.get("kind") == "Namespace" and doc["metadata"].get("name") == want_ns for _, doc in built):
                self.error(rel(kpath), f"creates no Namespace {want_ns}")
            self.references(shape, built)
            if self.kubectl and shutil.which("kubectl"):
                done = subprocess.run(["kubectl", "kustomize", d], capture_output=True, text=True)
                if done.returncode != 0:
                    self.error(rel(kpath), f"kubectl kustomize fails: {done.stderr.strip()}")
                else:
                    theirs = {(x.get("kind"), (x.get("metadata") or {}).get("namespace"), x["metadata"]["name"])
                              for x in yaml.safe_load_all(done.stdout) if x}
                    if theirs != set(seen):
                        self.error(rel(kpath), f"kubectl kustomize builds {sorted(map(str, theirs ^ set(seen)))} "
                                   "differently from this check")
                    else:
                        self.note(f"kubectl kustomize {shape}: the same {len(theirs)} objects")
        if self.kubectl and not shutil.which("kubectl"):
            self.note("kubectl: not on the PATH; the kustomizations were checked by this script alone")

    def references(self, shape, built):
        by_kind = {}
        for p, doc in built:
            by_kind.setdefault(doc.get("kind"), {})[doc["metadata"].get("name")] = (p, doc)
        pods = [(p, doc, pod_spec(doc)) for p, doc in built if pod_spec(doc) is not None]
        configmaps = by_kind.get("ConfigMap", {})
        secrets = set()
        for p, doc, ps in pods:
            where = f"{rel(p)}: {ident(doc)}"
            for v in ps.get("volumes") or []:
                sources = [v] + [{k2: s[k2]} for s in (v.get("projected") or {}).get("sources") or [] for k2 in s]
                for s in sources:
                    if "configMap" in s:
                        cm = s["configMap"]
                        if cm.get("name") not in configmaps:
                            if not cm.get("optional"):
                                self.error(where, f"volume {v.get('name')}: no ConfigMap {cm.get('name')} in {shape}")
                            continue
                        data = configmaps[cm["name"]][1].get("data") or {}
                        for item in cm.get("items") or []:
                            if item.get("key") not in data and not configmaps[cm["name"]][1].get("generated"):
                                self.error(where, f"volume {v.get('name')}: ConfigMap {cm['name']} has no key {item.get('key')}")
                    if "secret" in s:
                        secrets.add((s["secret"].get("secretName") or s["secret"].get("name"), where))
            for _, c in containers(ps):
                for e in c.get("env") or []:
                    ref = (e.get("valueFrom") or {})
                    if "configMapKeyRef" in ref:
                        r = ref["configMapKeyRef"]
                        if r.get("name") not in configmaps and not r.get("optional"):
                            self.error(where, f"env {e.get('name')}: no ConfigMap {r.get('name')} in {shape}")
                    if "secretKeyRef" in ref:
                        secrets.add((ref["secretKeyRef"].get("name"), where))
                for e in c.get("envFrom") or []:
                    if "secretRef" in e:
                        secrets.add((e["secretRef"].get("name"), where))
                    if "configMapRef" in e and e["configMapRef"].get("name") not in configmaps \
                            and not e["configMapRef"].get("optional"):
                        self.error(where, f"envFrom: no ConfigMap {e['configMapRef'].get('name')} in {shape}")
        # Secrets: created by the operator, each one explained in the docs.
        docs = open(self.docs, encoding="utf-8").read() if os.path.isfile(self.docs) else ""
        for name, where in sorted(secrets):
            if name in by_kind.get("Secret", {}):
                continue
            if not re.search(r"create secret (generic|tls) " + re.escape(name) + r"\b", docs):
                self.error(where, f"Secret {name} is neither in {shape} nor created in {rel(self.docs)} "
                           f"(`kubectl create secret generic {name} ...`)")
        if secrets:
            self.note(f"{shape}: Secrets the operator creates: {', '.join(sorted({n for n, _ in secrets}))}")

        def pods_selected(selector):
            return [(p, doc, ps) for p, doc, ps in pods if selects(selector, pod_labels(doc))]

        def port_names(selected):
            names, numbers = set(), set()
            for _, _, ps in selected:
                for _, c in containers(ps):
                    for port in c.get("ports") or []:
                        names.add(port.get("name"))
                        numbers.add(port.get("containerPort"))
            return names, numbers

        for name, (p, svc) in by_kind.get("Service", {}).items():
            where = f"{rel(p)}: {ident(svc)}"
            selector = (svc.get("spec") or {}).get("selector")
            if not selector:
                continue
            selected = pods_selected(selector)
            if not selected:
                self.error(where, f"selects no pod in {shape}")
                continue
            names, numbers = port_names(selected)
            for port in (svc.get("spec") or {}).get("ports") or []:
                target = port.get("targetPort", port.get("port"))
                if target not in names and target not in numbers:
                    self.error(where, f"port {port.get('name')}: target {target} is no container port of the pods it selects")
        for kind in ("PodDisruptionBudget", "NetworkPolicy"):
            for name, (p, obj) in by_kind.get(kind, {}).items():
                where = f"{rel(p)}: {ident(obj)}"
                spec = obj.get("spec") or {}
                selector = spec.get("selector" if kind == "PodDisruptionBudget" else "podSelector")
                if selector == {}:
                    continue
                selected = pods_selected(selector)
                if not selected:
                    self.error(where, f"selects no pod in {shape}")
                    continue
                if kind == "NetworkPolicy":
                    names, numbers = port_names(selected)
                    for rule in spec.get("ingress") or []:
                        for port in rule.get("ports") or []:
                            if port.get("port") not in names and port.get("port") not in numbers:
                                self.error(where, f"allows port {port.get('port')}, which no pod it selects listens on")
                        for peer in rule.get("from") or []:
                            if "podSelector" in peer and "namespaceSelector" not in peer \
                                    and peer["podSelector"] and not pods_selected(peer["podSelector"]):
                                self.error(where, f"allows traffic from pods {peer['podSelector']}, and there are none in {shape}")
        for name, (p, hpa) in by_kind.get("HorizontalPodAutoscaler", {}).items():
            ref = (hpa.get("spec") or {}).get("scaleTargetRef") or {}
            if ref.get("name") not in by_kind.get(ref.get("kind"), {}):
                self.error(f"{rel(p)}: {ident(hpa)}", f"scales {ref.get('kind')}/{ref.get('name')}, which is not in {shape}")
        for name, (p, sts) in by_kind.get("StatefulSet", {}).items():
            svc = (sts.get("spec") or {}).get("serviceName")
            if svc and svc not in by_kind.get("Service", {}):
                self.error(f"{rel(p)}: {ident(sts)}", f"serviceName {svc} is no Service in {shape}")

    # -- 4. engine resources ----------------------------------------------------------------
    def engine_resources(self):
        for shape, built in getattr(self, "built", {}).items():
            cpu, mem = ENGINE_RESOURCES[shape]
            found = 0
            for p, doc in built:
                ps = pod_spec(doc)
                if ps is None:
                    continue
                for what, c in containers(ps):
                    if not is_engine(c):
                        continue
                    found += 1
                    res = c.get("resources") or {}
                    for part in ("requests", "limits"):
                        got = res.get(part) or {}
                        try:
                            ok = cpu_millis(got.get("cpu")) == cpu_millis(cpu) and mem_bytes(got.get("memory")) == mem_bytes(mem)
                        except (TypeError, ValueError):
                            ok = False
                        if not ok:
                            self.error(f"{rel(p)}: {ident(doc)}: {what} {c.get('name')}",
                                       f"the engine's resources.{part} are cpu {got.get('cpu')!r}, memory "
                                       f"{got.get('memory')!r}; the {shape} shape's engine gets exactly cpu {cpu}, memory {mem}")
            if not found:
                self.error(rel(os.path.join(self.root, shape)), "runs no `llm-policy serve` container")
            else:
                self.note(f"engine: {shape}: {found} `llm-policy serve` container(s) with cpu {cpu}, memory {mem}")

    # -- 5. generated files -----------------------------------------------------------------
    def generated(self):
        if not self.cli:
            self.error(rel(self.root), "the generated files need --cli (the llm-policy binary) to be checked")
            return
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "k8s-render.py"),
                                   "--cli", self.cli, "--out", tmp], capture_output=True, text=True)
            if done.returncode != 0:
                self.error("scripts/k8s-render.py", f"failed: {done.stderr.strip()}")
                return
            fresh = {}
            for dirpath, _, filenames in os.walk(tmp):
                for name in filenames:
                    path = os.path.join(dirpath, name)
                    fresh[os.path.relpath(path, tmp)] = open(path, encoding="utf-8").read()
        for r, text in sorted(fresh.items()):
            path = os.path.join(self.root, r)
            if not os.path.isfile(path):
                self.error(rel(path), "is missing: run `make k8s-manifests`")
                continue
            committed = open(path, encoding="utf-8").read()
            if committed != text:
                diff = list(difflib.unified_diff(committed.splitlines(), text.splitlines(), "committed", "rendered", lineterm="", n=1))
                shown = "\n    ".join(diff[:16]) + ("\n    ..." if len(diff) > 16 else "")
                self.error(rel(path), f"is not what `make k8s-manifests` writes now (run it):\n    {shown}")
        for path in self.files:
            r = os.path.relpath(path, self.root)
            if path.endswith(".generated.yaml") and r not in fresh:
                self.error(rel(path), "looks generated but scripts/k8s-render.py does not write it")
        self.note(f"generated: {len(fresh)} files current ({', '.join(sorted(fresh))})")

    # -- 6. what the engine and Envoy read --------------------------------------------------
    def engine_config(self):
        import yaml
        repo_digest = None
        for shape, built in getattr(self, "built", {}).items():
            configmaps = {doc["metadata"]["name"]: doc for _, doc in built if doc.get("kind") == "ConfigMap"}
            for p, doc in built:
                ps = pod_spec(doc)
                if ps is None:
                    continue
                volumes = {v.get("name"): v for v in ps.get("volumes") or []}
                for what, c in containers(ps):
                    cw = f"{rel(p)}: {ident(doc)}: {what} {c.get('name')}"
                    if is_envoy(c):
                        self.envoy_files(cw, c, ps, volumes, configmaps)
                    if not is_engine(c):
                        continue
                    args = c.get("args") or []
                    if "--config" not in args[:-1]:
                        self.error(cw, "runs `llm-policy serve` without --config")
                        continue
                    resolve = functools.partial(self.resolve, cw, c, volumes, configmaps)
                    got = resolve(args[args.index("--config") + 1], "--config")
                    if not got or got[0] != "configMap":
                        continue
                    try:
                        config = yaml.safe_load(got[1]) or {}
                    except yaml.YAMLError as e:
                        self.error(cw, f"its server.yaml does not parse: {e}")
                        continue
                    files = {}
                    for key in ("policies", "modelsFile", "adminTokenFile", "readTokenFile",
                                "usageTokenFile", "keysFile"):
                        if config.get(key):
                            files[key] = resolve(str(config[key]), f"server.yaml `{key}`", directory=key == "policies")
                    for key in ("certFile", "keyFile", "clientCaFile"):
                        if (config.get("tls") or {}).get(key):
                            resolve(config["tls"][key], f"server.yaml `tls.{key}`")
                    if not config.get("policies"):
                        self.error(cw, "its server.yaml names no `policies`")
                    repo_digest = self.run_engine(cw, shape, config, files, repo_digest)

    def resolve(self, cw, c, volumes, configmaps, path, what, directory=False):
        """What `path` is in container `c`: ("configMap", text or {key: text} for a directory),
        ("secret", name), ("emptyDir", None); None (with an error) when no mount holds it."""
        best = None
        for m in c.get("volumeMounts") or []:
            mp = m.get("mountPath", "").rstrip("/")
            if path == mp or path.startswith(mp + "/"):
                if best is None or len(mp) > len(best[0]):
                    best = (mp, m)
        if best is None:
            self.error(cw, f"{what} {path} is not mounted (no volumeMount holds it)")
            return None
        mp, m = best
        v = volumes.get(m.get("name")) or {}
        sub = path[len(mp):].lstrip("/")
        if m.get("subPath"):
            sub = os.path.join(m["subPath"], sub) if sub else m["subPath"]
        for kind in ("configMap", "secret"):
            if kind not in v:
                continue
            items = v[kind].get("items")
            if directory:
                if sub:
                    self.error(cw, f"{what} {path} is inside the {kind} volume {m.get('name')}, not the volume itself")
                    return None
                if kind == "configMap":
                    cm = configmaps.get(v[kind].get("name"))
                    return (kind, dict((cm or {}).get("data") or {}))
                return (kind, v[kind].get("secretName"))
            keys = {i.get("path"): i.get("key") for i in items} if items is not None else None
            if keys is not None and sub not in keys:
                self.error(cw, f"{what} {path}: the {kind} volume {m.get('name')} mounts no item at {sub!r} "
                           f"(items: {', '.join(sorted(keys))})")
                return None
            key = keys[sub] if keys is not None else sub
            if kind == "configMap":
                cm = configmaps.get(v[kind].get("name"))
                data = (cm or {}).get("data") or {}
                if cm is not None and key not in data:
                    self.error(cw, f"{what} {path}: ConfigMap {v[kind].get('name')} has no key {key!r}")
                    return None
                return (kind, data.get(key))
            return (kind, v[kind].get("secretName"))
        if "emptyDir" in v:
            return ("emptyDir", None)
        return ("other", None)

    def envoy_files(self, cw, c, ps, volumes, configmaps):
        """The files an Envoy configuration of the pod names are mounted in its Envoy container."""
        texts = []
        for v in volumes.values():
            cm = configmaps.get((v.get("configMap") or {}).get("name"))
            if cm and "envoy.yaml" in (cm.get("data") or {}):
                texts.append((cm["metadata"]["name"], cm["data"]["envoy.yaml"]))
        if not texts:
            self.error(cw, "is Envoy, but its pod mounts no ConfigMap with an envoy.yaml")
            return
        mounts = [m.get("mountPath", "").rstrip("/") + "/" for m in c.get("volumeMounts") or []]
        args = c.get("args") or []
        if "-c" in args[:-1] and not any(args[args.index("-c") + 1].startswith(m) for m in mounts):
            self.error(cw, f"its configuration {args[args.index('-c') + 1]} is not mounted")
        render = load_renderer()
        for name, text in texts:
            paths = re.findall(r'filename:\s*"?([^"\s,}]+)', text)
            paths += [os.path.dirname(x) + "/" for x in re.findall(r'pipe:\s*\{\s*path:\s*([^\s,}]+)', text)]
            for path in sorted(set(paths)):
                if path.startswith("/etc/ssl/certs/"):
                    continue  # the image's CA bundle
                if not any(path.startswith(m) for m in mounts):
                    self.error(cw, f"ConfigMap {name}'s Envoy configuration names {path}, which is not mounted in this container")
            if render.USAGE_TOKEN_PLACEHOLDER in text:
                # The placeholder is replaced (`sed "s|PLACEHOLDER|$token|"`) by an init container
                # that writes where this Envoy reads its configuration.
                sub = re.compile(r"\bs(.)" + re.escape(render.USAGE_TOKEN_PLACEHOLDER) + r"\1")
                conf = args[args.index("-c") + 1] if "-c" in args[:-1] else ""
                envoy_vol = next((m.get("name") for m in c.get("volumeMounts") or []
                                  if conf.startswith(m.get("mountPath", "").rstrip("/") + "/")), None)
                writers = [i for i in ps.get("initContainers") or []
                           if i.get("restartPolicy") != "Always"
                           and any(sub.search(str(x)) for x in (i.get("command") or []) + (i.get("args") or []))
                           and any(m.get("name") == envoy_vol and not m.get("readOnly") for m in i.get("volumeMounts") or [])]
                if not writers:
                    self.error(cw, f"ConfigMap {name} holds the usage token placeholder, and no init container replaces it "
                               f"(s|{render.USAGE_TOKEN_PLACEHOLDER}|...|) in the volume this Envoy reads {conf or 'its configuration'} from")

    def run_engine(self, cw, shape, config, files, repo_digest):
        """Validates the mounted policies with the CLI and starts the engine on the server.yaml."""
        if not self.cli:
            return repo_digest  # main() says what is not checked without the CLI
        pol = files.get("policies")
        if not pol or pol[0] != "configMap" or not isinstance(pol[1], dict):
            self.error(cw, "its `policies` is not a ConfigMap volume (the check validates that ConfigMap)")
            return repo_digest
        with tempfile.TemporaryDirectory() as tmp:
            pdir = os.path.join(tmp, "policies")
            os.makedirs(pdir)
            for key, text in pol[1].items():
                with open(os.path.join(pdir, key), "w", encoding="utf-8") as f:
                    f.write(text)
            done = subprocess.run([self.cli, "validate", pdir], capture_output=True, text=True)
            if done.returncode != 0:
                out = (done.stdout + done.stderr).strip().replace(pdir + "/", "")
                self.error(cw, f"the policies ConfigMap it mounts fails `llm-policy validate`:\n    " + out.replace("\n", "\n    "))
                return repo_digest
            digest = re.search(r"bundle ([0-9a-f]+)", done.stdout + done.stderr)
            if repo_digest is None:
                mine = subprocess.run([self.cli, "validate", os.path.join(REPO, "policies")], capture_output=True, text=True)
                m = re.search(r"bundle ([0-9a-f]+)", mine.stdout + mine.stderr)
                repo_digest = m.group(1) if m else ""
            if not digest or digest.group(1) != repo_digest:
                self.error(cw, f"the policies ConfigMap it mounts is not the bundle of policies/ "
                           f"(digest {digest.group(1) if digest else '?'} vs {repo_digest}): run `make k8s-manifests`")
            self.note(f"engine config: {shape}: the mounted policies pass `llm-policy validate` (bundle {repo_digest})")
            if self.serve:
                self.start_engine(cw, shape, config, files, tmp, pdir)
        return repo_digest

    def start_engine(self, cw, shape, config, files, tmp, pdir):
        import yaml
        cfg = os.path.join(tmp, "server.yaml")
        with open(cfg, "w") as f:
            yaml.safe_dump(config, f)
        ports = free_ports(3)
        argv = [self.cli, "serve", "--config", cfg, "--policies", pdir,
                "--grpc-listen", f"127.0.0.1:{ports[0]}", "--http-listen", f"127.0.0.1:{ports[1]}",
                "--metrics-listen", f"127.0.0.1:{ports[2]}"]
        flags = {"adminTokenFile": "--admin-token-file", "readTokenFile": "--read-token-file",
                 "usageTokenFile": "--usage-token-file"}
        for key, flag in flags.items():
            if key in files:
                path = os.path.join(tmp, key)
                with open(path, "w") as f:
                    f.write("k8s-check-" + key + "-0123456789abcdef\n")
                argv += [flag, path]
        if "modelsFile" in files and files["modelsFile"] and files["modelsFile"][0] == "configMap":
            path = os.path.join(tmp, "models.yaml")
            with open(path, "w", encoding="utf-8") as f:
                f.write(files["modelsFile"][1] or "")
            argv += ["--models-file", path]
        if "keysFile" in files:
            path = os.path.join(tmp, "keys.json")
            subprocess.run([self.cli, "keys", "create", "--file", path, "--id", "k8s-check"], capture_output=True)
            argv += ["--keys-file", path]
        if (config.get("redis") or {}).get("url"):
            argv += ["--redis-url", "redis://127.0.0.1:1"]  # nothing leaves loopback
        log = open(os.path.join(tmp, "serve.log"), "w+")
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, cwd=tmp)
        healthy = False
        try:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/healthz", timeout=1) as r:
                        healthy = r.status == 200
                except OSError:
                    pass
                if healthy:
                    break
                time.sleep(0.1)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.seek(0)
            text = log.read()
            log.close()
        if not healthy:
            lines = [ln for ln in text.splitlines() if "error" in ln.lower()][-5:] or text.splitlines()[-5:]
            self.error(cw, f"`llm-policy serve` does not start with its server.yaml (exit {proc.returncode}):\n    "
                       + "\n    ".join(lines))
        else:
            self.note(f"engine config: {shape}: `llm-policy serve` starts with its server.yaml (every path mounted)")

    # -- all --------------------------------------------------------------------------------
    def run(self):
        """Every step; without the CLI, the generated files are not compared and the engine's
        policies and server.yaml not run (their paths are still resolved)."""
        self.load()
        steps = [self.schema, self.security, self.kustomizations, self.shapes, self.engine_resources]
        if self.cli:
            steps.append(self.generated)
        steps += [self.engine_config, self.envoy_validate]
        for step in steps:
            try:
                step()
            except Exception as e:  # a manifest this check did not expect: a problem, not a traceback
                self.error(rel(self.root), f"the check's {step.__name__} step failed on these manifests: {e!r}")
                if step in (self.kustomizations, self.shapes):
                    break
        return self.errors

    # -- 7. Envoy ---------------------------------------------------------------------------
    def envoy_validate(self):
        """`envoy --mode validate` on each shape's Envoy configuration, its files (the provider
        key, the .wasm, the admin socket, the usage token) replaced by local stand-ins."""
        if not self.envoy:
            self.note("envoy: no --envoy binary given; the Envoy configurations were not validated by Envoy")
            return
        done = set()
        for shape, built in getattr(self, "built", {}).items():
            for p, doc in built:
                if doc.get("kind") != "ConfigMap" or "envoy.yaml" not in (doc.get("data") or {}):
                    continue
                name = doc["metadata"]["name"]
                if name in done:
                    continue
                done.add(name)
                where = f"{rel(p)}: {ident(doc)}"
                text = doc["data"]["envoy.yaml"]
                with tempfile.TemporaryDirectory() as tmp:
                    missing = []

                    def stand_in(m):
                        path = m.group(2)
                        if path.startswith("/etc/ssl/certs/"):
                            if not os.path.isfile(path):
                                missing.append(path)
                            return m.group(0)
                        if path.endswith(".wasm"):
                            if not self.wasm:
                                missing.append(path + " (--wasm)")
                            return m.group(1) + (self.wasm or path) + m.group(3)
                        local = os.path.join(tmp, re.sub(r"[^A-Za-z0-9.]", "_", path))
                        with open(local, "w") as f:
                            f.write("k8s-check-stand-in-0123456789\n")
                        return m.group(1) + local + m.group(3)
                    text = re.sub(r'(filename:\s*"?)([^"\s,}]+)("?)', stand_in, text)
                    text = re.sub(r"(pipe:\s*\{\s*path:\s*)([^\s,}]+)", lambda m: m.group(1) + os.path.join(tmp, "admin.sock"), text)
                    text = text.replace(load_renderer().USAGE_TOKEN_PLACEHOLDER, "k8s-check-usage-token-0123456789")
                    if missing:
                        self.note(f"envoy: {name} not validated: {', '.join(missing)} not here")
                        continue
                    cfg = os.path.join(tmp, "envoy.yaml")
                    with open(cfg, "w") as f:
                        f.write(text)
                    try:
                        run = subprocess.run([self.envoy, "--mode", "validate", "--disable-hot-restart",
                                              "--log-level", "error", "-c", cfg],
                                             capture_output=True, text=True, timeout=300)
                    except subprocess.TimeoutExpired:
                        self.error(where, "envoy --mode validate did not finish in 300 s")
                        continue
                    if run.returncode != 0:
                        lines = (run.stdout + run.stderr).strip().splitlines()[-3:]
                        self.error(where, "its envoy.yaml fails `envoy --mode validate`:\n    " + "\n    ".join(lines))
                    else:
                        self.note(f"envoy: {name}: `envoy --mode validate` OK")


def free_ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@functools.lru_cache(maxsize=None)
def load_renderer():
    import importlib.util
    spec = importlib.util.spec_from_file_location("k8s_render", os.path.join(REPO, "scripts", "k8s-render.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# Self-test: broken copies of the tree, each of which must be caught.

def edit_docs(root, relpath, fn):
    import yaml
    path = os.path.join(root, relpath)
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    fn(docs)
    with open(path, "w") as f:
        yaml.safe_dump_all(docs, f, sort_keys=False)


def edit_text(root, relpath, old, new):
    path = os.path.join(root, relpath)
    text = open(path).read()
    if old not in text:
        raise AssertionError(f"self-test: {relpath} has no {old!r} to break")
    open(path, "w").write(text.replace(old, new, 1))


def first(docs, kind, name=None):
    return next(d for d in docs if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name))


def engine_container(docs):
    return first(docs, "Deployment", "llm-policy")["spec"]["template"]["spec"]["containers"][0]


def app_spec(docs):
    return first(docs, "Deployment", "llm-app")["spec"]["template"]["spec"]


def add_file(root, relpath, text):
    with open(os.path.join(root, relpath), "w") as f:
        f.write(text)


STRAY = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: stray}\ndata: {a: b}\n"

# (what, the file the message must name, a substring of the message, what it needs: None, "cli"
# (the llm-policy binary) or "envoy" (and Envoy), the break)
SELF_TEST = [
    ("a privileged container", "central/engine.yaml", "privileged is true", None,
     lambda r: edit_docs(r, "central/engine.yaml", lambda d: engine_container(d)["securityContext"].update(privileged=True))),
    ("a missing memory limit", "central/gateway.yaml", "resources.limits.memory is not set", None,
     lambda r: edit_docs(r, "central/gateway.yaml", lambda d: first(d, "Deployment")["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"].pop("memory"))),
    ("an unknown field", "central/engine.yaml", "Additional properties are not allowed", None,
     lambda r: edit_docs(r, "central/engine.yaml", lambda d: engine_container(d).update(imagePullPolicyy="Always"))),
    ("a misspelt field at the top of a spec", "central/redis.yaml", "does not validate", None,
     lambda r: edit_docs(r, "central/redis.yaml", lambda d: first(d, "StatefulSet")["spec"].update(replica=1))),
    ("a resource the kustomization does not list", "central/stray.yaml", "is not listed in", None,
     lambda r: add_file(r, "central/stray.yaml", STRAY)),
    ("a listed resource that does not exist", "central/kustomization.yaml", "resource missing.yaml does not exist", None,
     lambda r: edit_docs(r, "central/kustomization.yaml", lambda d: d[0]["resources"].append("missing.yaml"))),
    ("a generator reading a file outside the root", "sidecar/kustomization.yaml", "outside the kustomization's root", None,
     lambda r: edit_docs(r, "sidecar/kustomization.yaml", lambda d: d[0].update(configMapGenerator=[{"name": "x", "files": ["../../../README.md"]}]))),
    ("a resource file outside the root", "sidecar/kustomization.yaml", "outside the kustomization's root", None,
     lambda r: edit_docs(r, "sidecar/kustomization.yaml", lambda d: d[0]["resources"].append("../central/engine.yaml"))),
    ("a remote resource", "central/kustomization.yaml", "is remote", None,
     lambda r: edit_docs(r, "central/kustomization.yaml", lambda d: d[0]["resources"].append("https://example.com/x.yaml"))),
    ("a root user", "sidecar/app.yaml", "runAsUser is not a numeric non-root user", None,
     lambda r: edit_docs(r, "sidecar/app.yaml", lambda d: app_spec(d)["containers"][0]["securityContext"].update(runAsUser=0))),
    ("a writable root filesystem", "sidecar/app.yaml", "init container envoy-init: readOnlyRootFilesystem is not true", None,
     lambda r: edit_docs(r, "sidecar/app.yaml", lambda d: app_spec(d)["initContainers"][0]["securityContext"].pop("readOnlyRootFilesystem"))),
    ("privilege escalation", "central/redis.yaml", "allowPrivilegeEscalation is not false", None,
     lambda r: edit_docs(r, "central/redis.yaml", lambda d: first(d, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True))),
    ("an added capability", "central/gateway.yaml", "capabilities add", None,
     lambda r: edit_docs(r, "central/gateway.yaml", lambda d: first(d, "Deployment")["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"].update(add=["NET_ADMIN"]))),
    ("no seccomp profile", "sidecar/app.yaml", "container envoy: seccompProfile is not RuntimeDefault", None,
     lambda r: edit_docs(r, "sidecar/app.yaml", lambda d: [app_spec(d)["securityContext"].pop("seccompProfile"), app_spec(d)["initContainers"][2]["securityContext"].pop("seccompProfile")])),
    ("a service account token", "central/engine.yaml", "automountServiceAccountToken is not false", None,
     lambda r: edit_docs(r, "central/engine.yaml", lambda d: first(d, "Deployment")["spec"]["template"]["spec"].pop("automountServiceAccountToken"))),
    ("an unpinned image", "central/gateway.yaml", "has no pinned tag", None,
     lambda r: edit_docs(r, "central/gateway.yaml", lambda d: first(d, "Deployment")["spec"]["template"]["spec"]["containers"][0].update(image="envoyproxy/envoy:latest"))),
    ("a hostPath volume", "central/engine.yaml", "is a hostPath", None,
     lambda r: edit_docs(r, "central/engine.yaml", lambda d: first(d, "Deployment")["spec"]["template"]["spec"]["volumes"].append({"name": "host", "hostPath": {"path": "/"}}))),
    ("a writable ConfigMap mount", "central/engine.yaml", "without readOnly: true", None,
     lambda r: edit_docs(r, "central/engine.yaml", lambda d: engine_container(d)["volumeMounts"][0].pop("readOnly"))),
    ("the central engine with 2 CPUs", "central/engine.yaml", "the central shape's engine gets exactly cpu 1", None,
     lambda r: edit_docs(r, "central/engine.yaml", lambda d: engine_container(d)["resources"]["limits"].update(cpu="2"))),
    ("the sidecar engine with 512Mi", "sidecar/app.yaml", "the sidecar shape's engine gets exactly cpu 500m, memory 256Mi", None,
     lambda r: edit_docs(r, "sidecar/app.yaml", lambda d: app_spec(d)["initContainers"][1]["resources"]["requests"].update(memory="512Mi"))),
    ("a Service selecting nothing", "central/engine-service.yaml", "selects no pod", None,
     lambda r: edit_docs(r, "central/engine-service.yaml", lambda d: d[0]["spec"]["selector"].update({"app.kubernetes.io/component": "engien"}))),
    ("a NetworkPolicy port nothing listens on", "central/networkpolicy.yaml", "allows port 8081", None,
     lambda r: edit_text(r, "central/networkpolicy.yaml", "port: 8080,", "port: 8081,")),
    ("a ConfigMap that does not exist", "central/engine.yaml", "no ConfigMap llm-policy-polices", None,
     lambda r: edit_text(r, "central/engine.yaml", "configMap: { name: llm-policy-policies }", "configMap: { name: llm-policy-polices }")),
    ("a committed Secret", "central/secret.yaml", "is a Secret with data", None,
     lambda r: [add_file(r, "central/secret.yaml", "apiVersion: v1\nkind: Secret\nmetadata: {name: x}\nstringData: {token: abc}\n"),
                edit_docs(r, "central/kustomization.yaml", lambda d: d[0]["resources"].append("secret.yaml"))]),
    ("an undocumented Secret", "central/gateway.yaml", "Secret llm-provider-kee is neither", None,
     lambda r: edit_text(r, "central/gateway.yaml", "secretName: llm-provider-key", "secretName: llm-provider-kee")),
    ("a namespace the Envoy configuration does not name", "central/kustomization.yaml", "the rendered Envoy configuration", None,
     lambda r: edit_text(r, "central/kustomization.yaml", "namespace: llm-policy", "namespace: llm-gateway")),
    ("a namespace without Pod Security", "sidecar/namespace.yaml", "restricted", None,
     lambda r: edit_text(r, "sidecar/namespace.yaml", "pod-security.kubernetes.io/enforce: restricted", "pod-security.kubernetes.io/enforce: baseline")),
    ("a server.yaml path that is not mounted", "central/engine.yaml", "server.yaml `adminTokenFile` /run/secrets/llm-admin/admin-token is not mounted", None,
     lambda r: edit_text(r, "central/server-config.yaml", "adminTokenFile: /run/secrets/llm-policy/admin-token", "adminTokenFile: /run/secrets/llm-admin/admin-token")),
    ("a Secret item the server.yaml does not find", "sidecar/app.yaml", "mounts no item at 'keys.json'", None,
     lambda r: edit_text(r, "sidecar/app.yaml", "- { key: keys.json, path: keys.json }", "- { key: keys.json, path: keys }")),
    ("an Envoy file that is not mounted", "central/gateway.yaml", "/run/secrets/llm-provider/openai-api-key, which is not mounted", None,
     lambda r: edit_text(r, "central/gateway.yaml", "mountPath: /run/secrets/llm-provider,", "mountPath: /run/secrets/provider,")),
    ("a usage token placeholder nobody replaces", "sidecar/app.yaml", "no init container replaces it", None,
     lambda r: edit_text(r, "sidecar/app.yaml", 'sed "s|__LLM_POLICY_USAGE_TOKEN__|', 'sed "s|__LLM_POLICY_TOKEN__|')),
    ("a generated file edited by hand", "central/envoy.generated.yaml", "is not what `make k8s-manifests` writes", "cli",
     lambda r: edit_text(r, "central/envoy.generated.yaml", "timeout: 0.25s", "timeout: 2.5s")),
    ("a policy that does not validate in the ConfigMap", "sidecar/app.yaml", "fails `llm-policy validate`", "cli",
     lambda r: edit_text(r, "base/policies.generated.yaml", "decision: deny", "decision: denied")),
    ("a server.yaml the engine refuses", "central/engine.yaml", "does not start with its server.yaml", "cli",
     lambda r: edit_text(r, "central/server-config.yaml", "    check: {", "    chek: {")),
    ("an Envoy configuration Envoy refuses", "central/envoy.generated.yaml", "fails `envoy --mode validate`", "envoy",
     lambda r: edit_text(r, "central/envoy.generated.yaml", "timeout: 0.25s", "timeout: 0.25 seconds")),
]


def self_test(root, cli, envoy=None, wasm=None):
    import yaml  # noqa: F401
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "unbroken")
        shutil.copytree(root, base)
        errors = Check(base, cli, kubectl=False, quiet=True, envoy=envoy, wasm=wasm).run()
        if errors:
            print("k8s-check self-test: the unbroken copy has problems:\n  " + "\n  ".join(errors))
            return 1
        caught = 0
        for i, (what, file, expect, needs, brk) in enumerate(SELF_TEST):
            if (needs and not cli) or (needs == "envoy" and not envoy):
                print(f"  skipped (no {'--envoy' if cli else '--cli'}): {what}")
                continue
            case = os.path.join(tmp, f"case{i}")
            shutil.copytree(root, case)
            brk(case)
            # Without the CLI where the case does not need it, and the engine started only where
            # the case is about starting it: the same checks, faster.
            errors = Check(case, cli if needs else None, kubectl=False, quiet=True,
                           serve="does not start" in expect, envoy=envoy if needs == "envoy" else None,
                           wasm=wasm).run()
            want = os.path.join(case, file)
            hits = [e for e in errors if expect in e and rel(want) in e]
            if hits:
                caught += 1
                print(f"  caught: {what}\n      {hits[0].replace(case + '/', '').replace(rel(case) + '/', '').splitlines()[0]}")
            else:
                ok = False
                print(f"  NOT CAUGHT: {what} (expected {expect!r} naming {file}); the check said:\n    "
                      + ("\n    ".join(errors) or "nothing"))
            shutil.rmtree(case)
    print(f"k8s-check self-test: {caught} of {len(SELF_TEST)} broken trees caught" + ("" if ok else "; FAILED"))
    return 0 if ok else 1


def main():
    ap = argparse.ArgumentParser(
        description="Checks the Kubernetes manifests of deploy/kubernetes/ (make k8s-check): schemas "
        f"(kubernetes-validate, Kubernetes {', '.join(K8S_VERSIONS)}, strict), container security, "
        "kustomizations, the engine's resources, generated files current, the engine's policies and "
        "server.yaml. See the top of this file.")
    ap.add_argument("dir", nargs="?", default=DEFAULT_DIR, help="the manifests (default: deploy/kubernetes)")
    ap.add_argument("--cli", help="the llm-policy binary (target/release/llm-policy): needed for the "
                    "generated-file, policy and server.yaml checks")
    ap.add_argument("--docs", default=DOCS, help="where the Secrets are documented (default: docs/kubernetes.md)")
    ap.add_argument("--self-test", action="store_true", help="break copies of DIR in known ways; fail unless each is caught")
    ap.add_argument("--envoy", help="an Envoy 1.40 binary: validate the Envoy configurations with it "
                    "(tools/envoy/_bin/envoy; skipped without)")
    ap.add_argument("--wasm", help="the filter's .wasm, for validating the sidecar's Envoy configuration "
                    "(target/wasm32-wasip1/wasm/llm_policy_filter.wasm)")
    ap.add_argument("--no-kubectl", action="store_true", help="do not cross-check with `kubectl kustomize` even when it is on the PATH")
    a = ap.parse_args()
    try:
        import yaml  # noqa: F401
        import kubernetes_validate  # noqa: F401
    except ImportError as e:
        sys.exit(f"k8s-check: {e.name} is missing: run it with the SDK venv's Python "
                 "(tools/sdk-venv/bin/python; integration/requirements.txt pins kubernetes-validate)")
    cli = os.path.abspath(a.cli) if a.cli else None
    if cli and not os.access(cli, os.X_OK):
        sys.exit(f"k8s-check: {a.cli} is not an executable (make build)")
    envoy = os.path.abspath(a.envoy) if a.envoy else None
    wasm = os.path.abspath(a.wasm) if a.wasm else None
    for flag, path in (("--envoy", envoy), ("--wasm", wasm)):
        if path and not os.path.isfile(path):
            sys.exit(f"k8s-check: {flag} {path}: no such file")
    if a.self_test:
        print(f"== k8s-check --self-test ({rel(a.dir)})")
        return self_test(os.path.abspath(a.dir), cli, envoy, wasm)
    print(f"== k8s-check {rel(a.dir)}")
    check = Check(a.dir, cli, docs=a.docs, kubectl=not a.no_kubectl, envoy=envoy, wasm=wasm)
    if not cli:
        check.note("no --cli: the generated files are not compared, and the policies ConfigMap and "
                   "server.yaml not run (make k8s-check passes it)")
    errors = check.run()
    if errors:
        print(f"k8s-check: {len(errors)} problem(s):")
        for e in errors:
            print(f"  {e}")
        return 1
    print(f"k8s-check: OK ({', '.join(SHAPES)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
