#!/usr/bin/env python3
"""Checks of the deploy files that no off-the-shelf validator does; run by deploy/validate.sh.

    python3 deploy/checks.py metrics     every metric an alert, alert test, dashboard panel or
                                         KEDA query uses is defined in shared/src/metrics.rs
    python3 deploy/checks.py dashboard   the Grafana dashboard parses and is well formed
    python3 deploy/checks.py k8s [VER]   every kustomization's files exist and every manifest is
                                         listed; base and overlays rendered (a small subset of
                                         kustomize: resources, components, strategic-merge
                                         patches, images, namespace, labels) and validated with
                                         kubernetes-validate against Kubernetes VER (default
                                         1.31.0); CRD objects, which it has no schema for, get
                                         their references checked instead

Needs PyYAML and kubernetes-validate (pip install kubernetes-validate). Exits 1 on any problem.
"""

import copy
import json
import pathlib
import re
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
METRICS_RS = ROOT / "shared" / "src" / "metrics.rs"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "billing.json"
K8S = DEPLOY / "k8s"

# Kinds from CRDs (KEDA, Prometheus Operator): kubernetes-validate has no schema for them.
CRD_KINDS = {"ScaledObject", "ServiceMonitor", "PodMonitor"}
# Kinds that are not namespaced (kustomize's `namespace:` leaves them alone).
CLUSTER_KINDS = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}

problems = []


def problem(message):
    problems.append(message)
    print(f"ERROR {message}")


def rel(path):
    return pathlib.Path(path).resolve().relative_to(ROOT)


# --- metrics -------------------------------------------------------------------------------


def defined_metrics():
    """(all names, histogram names) defined in shared/src/metrics.rs."""
    source = METRICS_RS.read_text()
    consts = dict(re.findall(r'pub const (\w+): &str = "([^"]+)";', source))
    histograms = {consts[c] for c in re.findall(r"Matcher::Full\((\w+)\.into\(\)\)", source)}
    if not consts:
        problem(f"{rel(METRICS_RS)}: no metric constants found")
    return set(consts.values()), histograms


def names_in(expr):
    """Metric-looking names (billing_...) in a PromQL expression or series selector."""
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    return set(re.findall(r"\bbilling_[A-Za-z0-9_]*", without_strings))


def used_expressions():
    """(where, expression) for every PromQL expression of the deploy files."""
    found = []
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            found.append((f"{rel(ALERTS)} {rule.get('alert') or rule.get('record')}", rule["expr"]))
    for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for series in test.get("input_series", []):
            found.append((f"{rel(ALERTS_TEST)} '{test.get('name')}'", series["series"]))
        for case in test.get("promql_expr_test", []):
            found.append((f"{rel(ALERTS_TEST)} '{test.get('name')}'", case["expr"]))

    def walk(panels):
        for panel in panels:
            for target in panel.get("targets", []):
                if "expr" in target:
                    found.append((f"{rel(DASHBOARD)} panel '{panel.get('title')}'", target["expr"]))
            walk(panel.get("panels", []))

    dashboard = json.loads(DASHBOARD.read_text())
    walk(dashboard.get("panels", []))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable.get("query")
            query = query.get("query", "") if isinstance(query, dict) else query or ""
            found.append((f"{rel(DASHBOARD)} variable {variable.get('name')}", query))
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "ScaledObject":
                for trigger in doc["spec"].get("triggers", []):
                    if trigger.get("type") == "prometheus":
                        found.append((f"{rel(path)} trigger", trigger["metadata"]["query"]))
    return found


def check_metrics():
    defined, histograms = defined_metrics()
    allowed = (defined - histograms) | {
        h + suffix for h in histograms for suffix in ("_bucket", "_sum", "_count")
    }
    used = set()
    for where, expr in used_expressions():
        names = names_in(expr)
        if not names:
            problem(f"{where}: uses no billing_ metric: {expr}")
        for name in sorted(names):
            used.add(name)
            if name in histograms:
                problem(f"{where}: {name} is a histogram: use {name}_bucket, _sum or _count")
            elif name not in allowed:
                problem(f"{where}: {name} is not a metric of {rel(METRICS_RS)}")
    dashboard_names = {n for w, e in used_expressions() if str(rel(DASHBOARD)) in w for n in names_in(e)}
    for name in sorted(defined):
        variants = {name, name + "_bucket", name + "_sum", name + "_count"}
        if not variants & dashboard_names:
            print(f"NOTE {name} (shared/src/metrics.rs) is on no dashboard panel")
    print(f"metrics: {len(used)} names used, all defined in {rel(METRICS_RS)}"
          if not problems else "metrics: problems found")


# --- dashboard -----------------------------------------------------------------------------


def check_dashboard():
    try:
        dashboard = json.loads(DASHBOARD.read_text())
    except json.JSONDecodeError as e:
        problem(f"{rel(DASHBOARD)}: not JSON: {e}")
        return
    for key in ("uid", "title", "panels", "schemaVersion"):
        if key not in dashboard:
            problem(f"{rel(DASHBOARD)}: no {key}")
    ids = set()
    count = 0
    for panel in dashboard.get("panels", []):
        count += 1
        where = f"{rel(DASHBOARD)} panel {panel.get('id')} '{panel.get('title')}'"
        if panel.get("id") in ids:
            problem(f"{where}: duplicate id")
        ids.add(panel.get("id"))
        grid = panel.get("gridPos", {})
        if not all(k in grid for k in ("h", "w", "x", "y")) or grid.get("x", 0) + grid.get("w", 0) > 24:
            problem(f"{where}: bad gridPos {grid}")
        if panel.get("type") == "row":
            continue
        if not panel.get("title"):
            problem(f"{where}: no title")
        targets = panel.get("targets", [])
        if not targets:
            problem(f"{where}: no targets")
        ref_ids = [t.get("refId") for t in targets]
        if len(set(ref_ids)) != len(ref_ids):
            problem(f"{where}: duplicate refId")
        for target in targets:
            if not target.get("expr"):
                problem(f"{where}: a target without expr")
            if target.get("expr", "").count("(") != target.get("expr", "").count(")"):
                problem(f"{where}: unbalanced parentheses: {target['expr']}")
        if panel.get("datasource", {}).get("uid") != "${datasource}":
            problem(f"{where}: datasource is not the dashboard's ${{datasource}} variable")
    print(f"dashboard: {count} panels checked")


# --- k8s -----------------------------------------------------------------------------------


def load_docs(path):
    try:
        return [d for d in yaml.safe_load_all(path.read_text()) if d]
    except (OSError, yaml.YAMLError) as e:
        problem(f"{rel(path)}: {e}")
        return []


def key(doc):
    return (doc.get("kind"), doc.get("metadata", {}).get("name"))


def merge(base, patch, where):
    """Strategic merge, as far as these manifests need: maps merge, lists of named maps merge
    by name, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if k.startswith("$"):
                problem(f"{where}: patch directive {k} is not supported by this check")
            out[k] = merge(base[k], v, where) if k in base else copy.deepcopy(v)
        return out
    if (isinstance(base, list) and isinstance(patch, list)
            and all(isinstance(i, dict) and "name" in i for i in base + patch)):
        out = [copy.deepcopy(i) for i in base]
        for item in patch:
            match = [n for n, b in enumerate(out) if b["name"] == item["name"]]
            if match:
                out[match[0]] = merge(out[match[0]], item, where)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def containers(doc):
    spec = doc.get("spec", {})
    pod = spec.get("template", {}).get("spec", {}) if "template" in spec else spec
    if doc.get("kind") == "CronJob":
        pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    return pod.get("containers", []) + pod.get("initContainers", [])


def render(directory, listed, kind_expected=("Kustomization",)):
    """Renders the kustomization in `directory`; records every file it names in `listed`."""
    kfile = directory / "kustomization.yaml"
    if not kfile.is_file():
        problem(f"{rel(directory)}: no kustomization.yaml")
        return []
    listed.add(kfile.resolve())
    k = yaml.safe_load(kfile.read_text()) or {}
    if k.get("kind", "Kustomization") not in kind_expected:
        problem(f"{rel(kfile)}: kind {k.get('kind')}, expected one of {kind_expected}")
    known = {"apiVersion", "kind", "resources", "components", "patches", "images", "namespace",
             "labels"}
    for field in set(k) - known:
        problem(f"{rel(kfile)}: field {field} is not handled by this check; extend deploy/checks.py")
    docs = []
    for entry in k.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            docs += render(path, listed)
        elif path.is_file():
            listed.add(path)
            docs += load_docs(path)
        else:
            problem(f"{rel(kfile)}: resource {entry} does not exist")
    components = []
    for entry in k.get("components", []):
        path = (directory / entry).resolve()
        if not (path / "kustomization.yaml").is_file():
            problem(f"{rel(kfile)}: component {entry} does not exist")
            continue
        components.append(path)
    for path in components:
        docs += render(path, listed, kind_expected=("Component",))
    for entry in k.get("patches", []):
        if set(entry) != {"path"}:
            problem(f"{rel(kfile)}: only `- path:` patches are handled by this check: {entry}")
            continue
        path = (directory / entry["path"]).resolve()
        if not path.is_file():
            problem(f"{rel(kfile)}: patch {entry['path']} does not exist")
            continue
        listed.add(path)
        for patch in load_docs(path):
            targets = [n for n, d in enumerate(docs) if key(d) == key(patch)]
            if not targets:
                problem(f"{rel(path)}: patches {key(patch)}, which the kustomization does not have")
                continue
            docs[targets[0]] = merge(docs[targets[0]], patch, rel(path))
    for image in k.get("images", []):
        hits = 0
        for doc in docs:
            for c in containers(doc):
                name, _, tag = c.get("image", "").partition(":")
                if name == image["name"]:
                    c["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
                    hits += 1
        if not hits:
            problem(f"{rel(kfile)}: image {image['name']} is used by no container")
    for label_set in k.get("labels", []):
        for doc in docs:
            doc.setdefault("metadata", {}).setdefault("labels", {}).update(label_set["pairs"])
    if "namespace" in k:
        for doc in docs:
            if doc.get("kind") not in CLUSTER_KINDS:
                doc.setdefault("metadata", {})["namespace"] = k["namespace"]
    return docs


def selects(selector, labels):
    match = selector.get("matchLabels", {})
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def check_references(name, docs, config_keys, secret_keys):
    """Cross-object references: the things a schema cannot see."""
    by_key = {key(d): d for d in docs}
    seen = set()
    for doc in docs:
        if key(doc) in seen:
            problem(f"{name}: {key(doc)} defined twice")
        seen.add(key(doc))
    workloads = [d for d in docs if d.get("kind") in ("Deployment", "StatefulSet", "Job")]
    pods = {key(d): d["spec"]["template"]["metadata"].get("labels", {}) for d in workloads}
    ports = {key(d): {p.get("name") for c in containers(d) for p in c.get("ports", [])} for d in workloads}
    services = [d for d in docs if d.get("kind") == "Service"]
    namespaces = {d.get("metadata", {}).get("namespace") for d in docs if d.get("kind") not in CLUSTER_KINDS}
    if len(namespaces) > 1:
        problem(f"{name}: objects in several namespaces: {namespaces}")
    for doc in docs:
        kind, obj = key(doc)
        where = f"{name}: {kind}/{obj}"
        spec = doc.get("spec", {})
        if kind == "Deployment":
            if not selects(spec["selector"], pods[key(doc)]):
                problem(f"{where}: selector does not match its pod template")
        if kind in ("Deployment", "Job"):
            for c in containers(doc):
                for source in c.get("envFrom", []):
                    ref = source.get("configMapRef") or source.get("secretRef")
                    ref_kind = "ConfigMap" if "configMapRef" in source else "Secret"
                    if ref_kind == "ConfigMap" and ("ConfigMap", ref["name"]) not in by_key:
                        problem(f"{where}: envFrom ConfigMap {ref['name']} is not in the render")
                for env in c.get("env", []):
                    value_from = env.get("valueFrom", {})
                    if "configMapKeyRef" in value_from:
                        ref = value_from["configMapKeyRef"]
                        if ref["key"] not in config_keys.get(ref["name"], set()):
                            problem(f"{where}: {env['name']} from ConfigMap {ref['name']} key {ref['key']}, which it lacks")
                    if "secretKeyRef" in value_from:
                        ref = value_from["secretKeyRef"]
                        if ref["key"] not in secret_keys.get(ref["name"], set()):
                            problem(f"{where}: {env['name']} from Secret {ref['name']} key {ref['key']}, which the template (secret.example.yaml) lacks")
                volumes = {v["name"] for v in spec["template"]["spec"].get("volumes", [])}
                for mount in c.get("volumeMounts", []):
                    if mount["name"] not in volumes:
                        problem(f"{where}: volumeMount {mount['name']} has no volume")
                for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                    port = c.get(probe, {}).get("httpGet", {}).get("port")
                    if isinstance(port, str) and port not in ports[key(doc)]:
                        problem(f"{where}: {probe} uses port {port}, which the container does not name")
        if kind == "Service":
            targets = [w for w in pods if selects({"matchLabels": spec.get("selector", {})}, pods[w])]
            if not targets:
                problem(f"{where}: selects no pod template")
            for port in spec.get("ports", []):
                target = port.get("targetPort")
                if isinstance(target, str) and not any(target in ports[w] for w in targets):
                    problem(f"{where}: targetPort {target} is named by no selected container")
        if kind == "PodDisruptionBudget":
            if not any(selects(spec["selector"], labels) for labels in pods.values()):
                problem(f"{where}: selects no pod template")
        if kind in ("HorizontalPodAutoscaler", "ScaledObject"):
            ref = spec["scaleTargetRef"]
            if (ref.get("kind", "Deployment"), ref["name"]) not in by_key:
                problem(f"{where}: scales {ref['name']}, which is not in the render")
        if kind == "ServiceMonitor":
            selected = [s for s in services if selects(spec["selector"], s["metadata"].get("labels", {}))]
            if not selected:
                problem(f"{where}: selects no Service")
            for endpoint in spec.get("endpoints", []):
                if not any(endpoint.get("port") in {p.get("name") for p in s["spec"]["ports"]} for s in selected):
                    problem(f"{where}: port {endpoint.get('port')} is named by no selected Service")
        if kind == "PodMonitor":
            selected = [w for w in pods if selects(spec["selector"], pods[w])]
            if not selected:
                problem(f"{where}: selects no pod template")
            for endpoint in spec.get("podMetricsEndpoints", []):
                if not any(endpoint.get("port") in ports[w] for w in selected):
                    problem(f"{where}: port {endpoint.get('port')} is named by no selected container")


def validate_docs(name, docs, version):
    import kubernetes_validate

    for doc in docs:
        where = f"{name}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            problem(f"{where}: against Kubernetes {version}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError:
            if doc.get("kind") not in CRD_KINDS:
                problem(f"{where}: no schema for {doc.get('apiVersion')} {doc.get('kind')} "
                        f"in Kubernetes {version} (a typo, or a CRD kind to add to CRD_KINDS)")


def check_k8s(version):
    listed = set()
    secret_keys = {}
    templates = sorted(K8S.rglob("*.example.yaml"))
    for path in templates:
        docs = load_docs(path)
        validate_docs(str(rel(path)), docs, version)
        for doc in docs:
            if doc.get("kind") == "Secret":
                secret_keys[doc["metadata"]["name"]] = set(doc.get("stringData", {})) | set(doc.get("data", {}))
    roots = [K8S / "base"] + sorted(p for p in (K8S / "overlays").iterdir() if p.is_dir())
    for root in roots:
        docs = render(root, listed)
        config_keys = {d["metadata"]["name"]: set(d.get("data", {})) for d in docs if d.get("kind") == "ConfigMap"}
        validate_docs(str(rel(root)), docs, version)
        check_references(str(rel(root)), docs, config_keys, secret_keys)
        print(f"k8s: {rel(root)}: {len(docs)} objects rendered: "
              + ", ".join(f"{k}/{n}" for k, n in map(key, docs)))
    # Components are rendered through the overlays that use them; render the others alone.
    for component in sorted(p for p in (K8S / "components").iterdir() if p.is_dir()):
        if (component / "kustomization.yaml").resolve() not in listed:
            docs = render(component, listed, kind_expected=("Component",))
            validate_docs(str(rel(component)), docs, version)
    for path in sorted(K8S.rglob("*.y*ml")):
        if path.resolve() not in listed and path not in templates:
            problem(f"{rel(path)}: listed in no kustomization (name templates *.example.yaml)")
    print(f"k8s: validated against Kubernetes {version}; CRD kinds {sorted(CRD_KINDS)} checked by references only")


def main(argv):
    if len(argv) < 2 or argv[1] not in ("metrics", "dashboard", "k8s"):
        print(__doc__)
        return 2
    if argv[1] == "metrics":
        check_metrics()
    elif argv[1] == "dashboard":
        check_dashboard()
    else:
        check_k8s(argv[2] if len(argv) > 2 else "1.31.0")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
