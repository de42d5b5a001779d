#!/usr/bin/env python3
"""Validates deploy/kubernetes/daemonset.yaml and the Helm chart offline.

Every manifest is checked against the Kubernetes JSON schemas that the kubernetes-validate package
ships (strict: unknown fields are errors), at the oldest and the newest Kubernetes version the
deployment supports. The chart is rendered with `helm template` under several value sets, and each
rendering is also checked for what those values must produce; values the agent would refuse must
make the rendering fail. Run by deploy/validate.sh, which installs helm and kubernetes-validate.

Prints one line per check and ends with "N passed, N failed"; exits 1 if any check failed.
"""

import argparse
import copy
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import yaml

# The raw manifest uses securityContext.appArmorProfile, which Kubernetes has since 1.30.
MANIFEST_VERSIONS = ("1.30.0", "1.37.0")
# The chart falls back to the AppArmor annotation before 1.30; Chart.yaml says >= 1.25. Renderings
# for the default (newest) Kubernetes are checked against the newest schema, the one for 1.29
# against 1.25 and 1.29.
CHART_VERSIONS = ("1.25.0", "1.37.0")
NEWEST = CHART_VERSIONS[-1]
CAPABILITIES = ["BPF", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH", "SYS_RESOURCE"]
APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/tracer"


class Checks:
    """Counts and prints check outcomes."""

    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, name, ok, detail=""):
        if ok:
            self.passed += 1
            print(f"ok: {name}")
        else:
            self.failed += 1
            print(f"FAIL: {name}{': ' + detail if detail else ''}")

    def equal(self, name, got, want):
        self.check(name, got == want, f"got {got!r}, want {want!r}")


def load_docs(text):
    return [d for d in yaml.safe_load_all(text) if d]


def schema_errors(docs, version):
    """Schema violations of `docs` at Kubernetes `version`, one string per failing object."""
    errors = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            errors.append(f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}: {where}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{doc.get('kind')}: no schema ({e})")
    return errors


def by_kind(docs, kind):
    return [d for d in docs if d.get("kind") == kind]


def one(docs, kind):
    found = by_kind(docs, kind)
    if len(found) != 1:
        raise AssertionError(f"expected one {kind}, found {len(found)}")
    return found[0]


def container(ds):
    return ds["spec"]["template"]["spec"]["containers"][0]


def env_value(ctr, name):
    return next((e.get("value") for e in ctr.get("env", []) if e["name"] == name), None)


class Helm:
    def __init__(self, binary, chart):
        self.binary = binary
        self.chart = chart

    def render(self, sets=(), kube_version=NEWEST, strings=()):
        """Renders the chart with `--set` and `--set-string` values for a cluster of `kube_version`;
        returns (exit code, documents or error text)."""
        cmd = [
            self.binary,
            "template",
            "tracer",
            str(self.chart),
            "--namespace",
            "tracer",
            "--kube-version",
            kube_version,
        ]
        for s in sets:
            cmd += ["--set", s]
        for s in strings:
            cmd += ["--set-string", s]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            return proc.returncode, proc.stderr.strip()
        return 0, load_docs(proc.stdout)


def check_common(c, name, docs):
    """What every rendering and the raw manifest must satisfy."""
    ds = one(docs, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    ctr = container(ds)
    c.equal(f"{name}: hostPID", pod.get("hostPID"), True)
    c.equal(f"{name}: args start with run", ctr.get("args", [])[:1], ["run"])
    selector = ds["spec"]["selector"]["matchLabels"]
    labels = ds["spec"]["template"]["metadata"]["labels"]
    c.check(
        f"{name}: selector matches pod labels", selector.items() <= labels.items(), f"{selector} vs {labels}"
    )
    mounts = {m["name"]: m for m in ctr.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for vol, path in [
        ("tracefs", "/sys/kernel/tracing"),
        ("bpffs", "/sys/fs/bpf"),
        ("btf", "/sys/kernel/btf"),
    ]:
        m = mounts.get(vol, {})
        c.check(
            f"{name}: {vol} mounted read-only at {path}",
            m.get("mountPath") == path and m.get("readOnly") is True,
            str(m),
        )
        c.check(f"{name}: {vol} is a hostPath", "hostPath" in volumes.get(vol, {}), str(volumes.get(vol)))
    config_maps = {d["metadata"]["name"] for d in by_kind(docs, "ConfigMap")}
    refs = [e["configMapRef"]["name"] for e in ctr.get("envFrom", []) if "configMapRef" in e]
    c.check(
        f"{name}: envFrom ConfigMap is part of the manifests",
        refs and set(refs) <= config_maps,
        f"{refs} vs {config_maps}",
    )
    accounts = {d["metadata"]["name"] for d in by_kind(docs, "ServiceAccount")}
    c.check(
        f"{name}: ServiceAccount is part of the manifests",
        pod.get("serviceAccountName") in accounts,
        f"{pod.get('serviceAccountName')} vs {accounts}",
    )
    c.equal(f"{name}: tolerates every taint", pod.get("tolerations"), [{"operator": "Exists"}])


def check_schema(c, name, docs, versions):
    for version in versions:
        errors = schema_errors(docs, version)
        c.check(
            f"{name}: {len(docs)} objects valid against the Kubernetes {version} schema (strict)",
            not errors,
            "; ".join(errors),
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--helm", required=True, help="helm binary")
    ap.add_argument("--chart", required=True, type=Path)
    ap.add_argument("--manifest", required=True, type=Path)
    args = ap.parse_args()
    c = Checks()
    helm = Helm(args.helm, args.chart)

    # The validator itself must reject a broken manifest, or its passes mean nothing.
    raw = load_docs(args.manifest.read_text())
    broken = copy.deepcopy(raw)
    pod = one(broken, "DaemonSet")["spec"]["template"]["spec"]
    pod["hostPid"] = pod.pop("hostPID")
    c.check("schema check rejects a misspelt field (hostPid)", schema_errors(broken, NEWEST))
    broken = copy.deepcopy(raw)
    container(one(broken, "DaemonSet"))["securityContext"]["privileged"] = "no"
    c.check('schema check rejects a wrongly typed field (privileged: "no")', schema_errors(broken, NEWEST))

    # The raw manifest.
    check_schema(c, "daemonset.yaml", raw, MANIFEST_VERSIONS)
    check_common(c, "daemonset.yaml", raw)
    ds = one(raw, "DaemonSet")
    sc = container(ds)["securityContext"]
    c.equal("daemonset.yaml: capabilities", sc.get("capabilities"), {"drop": ["ALL"], "add": CAPABILITIES})
    c.equal("daemonset.yaml: not privileged", sc.get("privileged"), False)
    ns = one(raw, "Namespace")
    c.equal(
        "daemonset.yaml: namespace admits privileged pods",
        ns["metadata"]["labels"].get("pod-security.kubernetes.io/enforce"),
        "privileged",
    )
    c.check(
        "daemonset.yaml: objects live in its namespace",
        all(
            d["metadata"].get("namespace") == ns["metadata"]["name"] for d in raw if d["kind"] != "Namespace"
        ),
    )

    # The chart with its defaults must be the raw manifest, apart from names and labels.
    code, default = helm.render()
    c.check("chart renders with default values", code == 0, str(default))
    if code != 0:
        return finish(c)
    check_schema(c, "chart defaults", default, [NEWEST])
    check_common(c, "chart defaults", default)
    chart_pod = one(default, "DaemonSet")["spec"]["template"]["spec"]
    raw_pod = ds["spec"]["template"]["spec"]
    for key in [
        "hostPID",
        "hostNetwork",
        "dnsPolicy",
        "terminationGracePeriodSeconds",
        "tolerations",
        "nodeSelector",
        "volumes",
    ]:
        c.equal(f"chart defaults = daemonset.yaml: pod {key}", chart_pod.get(key), raw_pod.get(key))
    for key in [
        "args",
        "securityContext",
        "resources",
        "ports",
        "readinessProbe",
        "livenessProbe",
        "volumeMounts",
        "env",
        "imagePullPolicy",
    ]:
        c.equal(
            f"chart defaults = daemonset.yaml: container {key}",
            chart_pod["containers"][0].get(key),
            raw_pod["containers"][0].get(key),
        )
    c.equal(
        "chart defaults = daemonset.yaml: update strategy",
        one(default, "DaemonSet")["spec"]["updateStrategy"],
        ds["spec"]["updateStrategy"],
    )
    raw_data = one(raw, "ConfigMap")["data"]
    chart_data = one(default, "ConfigMap")["data"]
    c.check(
        "chart defaults = daemonset.yaml: ConfigMap settings",
        raw_data.items() <= chart_data.items(),
        f"{raw_data} not within {chart_data}",
    )
    annotations = one(default, "DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    c.check(
        "chart defaults: AppArmor as a field, not the annotation, on >= 1.30",
        APPARMOR_ANNOTATION not in annotations
        and "appArmorProfile" in chart_pod["containers"][0]["securityContext"],
    )

    # Before 1.30 the field does not exist: the annotation takes its place.
    code, old = helm.render(kube_version="1.29.0")
    c.check("chart renders for Kubernetes 1.29", code == 0, str(old))
    if code == 0:
        check_schema(c, "chart on 1.29", old, [CHART_VERSIONS[0], "1.29.0"])
        ds_old = one(old, "DaemonSet")
        c.equal(
            "chart on 1.29: AppArmor annotation",
            ds_old["spec"]["template"]["metadata"]["annotations"].get(APPARMOR_ANNOTATION),
            "unconfined",
        )
        c.check(
            "chart on 1.29: no appArmorProfile field",
            "appArmorProfile" not in container(ds_old)["securityContext"],
        )

    code, _ = helm.render(kube_version="1.24.0")
    c.check("chart refuses Kubernetes 1.24 (kubeVersion >= 1.25)", code != 0)

    # Privileged: no capability list, and privilege escalation may not be forbidden.
    code, priv = helm.render(["privileged=true"])
    c.check("chart renders privileged=true", code == 0, str(priv))
    if code == 0:
        check_schema(c, "privileged", priv, [NEWEST])
        sc = container(one(priv, "DaemonSet"))["securityContext"]
        c.check(
            "privileged: privileged, no capabilities, escalation allowed",
            sc.get("privileged") is True
            and "capabilities" not in sc
            and sc.get("allowPrivilegeEscalation") is True,
            str(sc),
        )

    code, admin = helm.render(["capabilities={BPF,PERFMON,SYS_PTRACE,SYS_ADMIN}"])
    c.check("chart renders with SYS_ADMIN", code == 0, str(admin))
    if code == 0:
        sc = container(one(admin, "DaemonSet"))["securityContext"]
        c.check(
            "SYS_ADMIN: escalation allowed (Kubernetes refuses SYS_ADMIN without it)",
            sc.get("allowPrivilegeEscalation") is True and "SYS_ADMIN" in sc["capabilities"]["add"],
            str(sc),
        )

    # Filters, headers, an existing Secret and an IPv6 metrics address.
    sets = [
        "filters.ports={80,8080}",
        "filters.exes={nginx,java}",
        "otlp.headers.authorization=Bearer xyz",
        "otlp.headers.x-org=7",
        "otlp.existingSecret=my-otlp",
        "metrics.bindAddress=::",
        "otlp.protocol=grpc",
        "otlp.endpoint=http://collector:4317",
        "extraEnv[0].name=OTEL_BSP_MAX_QUEUE_SIZE",
    ]
    code, full = helm.render(sets, strings=["extraEnv[0].value=8192"])
    c.check("chart renders filters, headers and extras", code == 0, str(full))
    if code == 0:
        check_schema(c, "filters and headers", full, [NEWEST])
        ctr = container(one(full, "DaemonSet"))
        c.equal(
            "filters: args", ctr["args"], ["run", "--port=80", "--port=8080", "--exe=nginx", "--exe=java"]
        )
        secret = one(full, "Secret")
        c.equal(
            "headers: Secret holds OTEL_EXPORTER_OTLP_HEADERS, keys sorted",
            secret["stringData"],
            {"OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer xyz,x-org=7"},
        )
        secrets = [e["secretRef"]["name"] for e in ctr["envFrom"] if "secretRef" in e]
        c.equal(
            "headers: envFrom the chart's Secret and the existing one",
            secrets,
            [secret["metadata"]["name"], "my-otlp"],
        )
        c.equal("metrics: IPv6 address in brackets", env_value(ctr, "TRACER_METRICS_ADDR"), "[::]:9464")
        c.equal("extraEnv appended", env_value(ctr, "OTEL_BSP_MAX_QUEUE_SIZE"), "8192")
        data = one(full, "ConfigMap")["data"]
        c.equal(
            "otlp: endpoint and protocol in the ConfigMap",
            (data.get("OTEL_EXPORTER_OTLP_ENDPOINT"), data.get("OTEL_EXPORTER_OTLP_PROTOCOL")),
            ("http://collector:4317", "grpc"),
        )

    # No endpoint (stdout) and no metrics: nothing may refer to the port.
    code, bare = helm.render(["otlp.endpoint=", "metrics.enabled=false", "hostNetwork=false"])
    c.check("chart renders without endpoint, metrics and hostNetwork", code == 0, str(bare))
    if code == 0:
        check_schema(c, "bare", bare, [NEWEST])
        ds_bare = one(bare, "DaemonSet")
        ctr = container(ds_bare)
        c.check(
            "bare: no endpoint in the ConfigMap (spans to stdout)",
            "OTEL_EXPORTER_OTLP_ENDPOINT" not in one(bare, "ConfigMap")["data"],
        )
        c.check(
            "bare: no probes, ports or metrics address",
            not ({"readinessProbe", "livenessProbe", "ports"} & ctr.keys())
            and env_value(ctr, "TRACER_METRICS_ADDR") is None,
        )
        c.check(
            "bare: no scrape annotations",
            "prometheus.io/scrape" not in ds_bare["spec"]["template"]["metadata"]["annotations"],
        )
        pod = ds_bare["spec"]["template"]["spec"]
        c.check(
            "bare: no host network, default DNS policy",
            pod.get("hostNetwork") is False and "dnsPolicy" not in pod,
        )
        c.check("bare: no Secret", not by_kind(bare, "Secret"))

    # Values the agent would refuse at start-up fail the rendering instead.
    for bad, why in [
        ("otlp.endpoint=https://collector:4318", "https endpoint"),
        ("otlp.protocol=http", "unknown protocol"),
        ("capture.bytes=20000", "capture.bytes above 16384"),
        ("appArmorProfile.type=Localhost", "Localhost AppArmor profile without a name"),
    ]:
        kube = "1.29.0" if "appArmor" in bad else NEWEST
        code, _ = helm.render([bad], kube_version=kube)
        c.check(f"chart refuses {why}", code != 0, "rendered anyway")
    return finish(c)


def finish(c):
    print(f"{c.passed} passed, {c.failed} failed")
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
