"""deploy/: the Kubernetes base, the Helm chart, the Dockerfile and the systemd unit, checked as far as
this machine can (issue 19 item 11).

What runs for real here: ``kubectl kustomize`` renders the base (kubectl from Debian's
kubernetes-client, or any kubectl on PATH); ``systemd-analyze verify`` and ``security --offline``
check the unit (systemd is not PID 1 here: both work offline); the ConfigMap's config and the
unit's command line go through the real CLI; the eBPF receiver runs under exactly the capability
sets the DaemonSet and the unit grant (``setpriv`` gives a process that bounding set, as the
container runtime and systemd do) and turns a real HTTP exchange into spans delivered to a real
OTLP/gRPC endpoint; the Dockerfile's build stage is rehearsed (the wheel it builds, from the files
it COPYs, carries the accelerators and the BPF object, and passes the Dockerfile's own import
check) and its HEALTHCHECK command runs against a real ``wirespan run`` of the image's command line.

What cannot run here, so is checked statically: ``docker build`` (no Docker engine: only the client
is installed) — the Dockerfile's stages, the paths it COPYs and the Debian packages it installs are
checked instead; the container runtime's own seccomp/AppArmor profiles and a real kubelet; ``helm
template`` (Helm is not packaged in Debian) — the chart's YAML files parse, and every value its
templates use is defined in values.yaml. No mocks: nothing here stands in for a real part that runs.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.cli import build_parser
from service.config import DEFAULT_HEALTH_ADDRESS, DEFAULT_METRICS_ADDRESS
from service.speedups import ACCELERATORS
from tests.support.capture import free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
UNIT = DEPLOY / "systemd" / "wirespan.service"
DOCKERFILE = DEPLOY / "Dockerfile"
CHART = DEPLOY / "helm" / "wirespan"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
GATEWAY = "otel-collector-gateway.observability.svc:4317"


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=ROOT, env=env or ENV,
                          capture_output=True, text=True, timeout=timeout)


def _tracked() -> set[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.splitlines())


# ---------------------------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------------------------
def _kubectl() -> str:
    k = shutil.which("kubectl")
    if k is None:
        pytest.fail("kubectl not found: tests/run.sh installs Debian's kubernetes-client when no kubectl is there")
    return k


@pytest.fixture(scope="module")
def rendered() -> dict[tuple[str, str], dict[str, Any]]:
    """The base as `kubectl kustomize` renders it, by (kind, name)."""
    r = subprocess.run([_kubectl(), "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def _one(rendered: dict, kind: str) -> dict[str, Any]:
    found = [v for (k, _), v in rendered.items() if k == kind]
    assert len(found) == 1, (kind, list(rendered))
    return found[0]


def _container(rendered: dict) -> dict[str, Any]:
    (c,) = _one(rendered, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    return c


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in K8S.glob("*.yaml")))
def test_every_manifest_parses(path: str) -> None:
    docs = [d for d in yaml.safe_load_all((ROOT / path).read_text()) if d is not None]
    assert docs, path
    for d in docs:
        if Path(path).name != "config.yaml":  # the pipeline file the ConfigMap is made of
            assert {"apiVersion", "kind"} <= set(d), (path, d)


def test_kustomize_renders_the_agent_and_its_permissions(rendered: dict) -> None:
    assert {k for k, _ in rendered} == {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                                        "ConfigMap", "DaemonSet"}
    ns = _one(rendered, "Namespace")
    # hostPID and added capabilities are beyond Pod Security "baseline"
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    ds, sa = _one(rendered, "DaemonSet"), _one(rendered, "ServiceAccount")
    assert ds["metadata"]["namespace"] == sa["metadata"]["namespace"] == ns["metadata"]["name"]
    assert ds["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    role, binding = _one(rendered, "ClusterRole"), _one(rendered, "ClusterRoleBinding")
    granted = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"]
               for r in rule["resources"]}
    assert granted == {("", "pods"): {"get", "list", "watch"}, ("", "nodes"): {"get", "list", "watch"},
                       ("apps", "replicasets"): {"get", "list", "watch"}}  # read only, nothing else
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}]


def test_daemonset_has_what_ebpf_needs_and_no_more(rendered: dict) -> None:
    pod = _one(rendered, "DaemonSet")["spec"]["template"]["spec"]
    c = _container(rendered)
    assert pod["hostPID"] is True            # /proc is the host's: the kernel reports host pids
    assert pod.get("hostNetwork", False) is False
    sc = c["securityContext"]
    assert sc.get("privileged", False) is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == {"BPF", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH", "NET_RAW"}
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in ("/sys/kernel/btf", "/sys/kernel/tracing"):
        assert mounts[path]["readOnly"] is True
        assert volumes[mounts[path]["name"]]["hostPath"]["path"] == path
    cm = _one(rendered, "ConfigMap")
    assert volumes[mounts["/etc/wirespan"]["name"]]["configMap"]["name"] == cm["metadata"]["name"]
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    res = c["resources"]
    assert {"cpu", "memory"} <= set(res["requests"]) and "memory" in res["limits"]


def _configmap_config(rendered: dict) -> str:
    data = _one(rendered, "ConfigMap")["data"]
    assert list(data) == ["config.yaml"]   # the file the image's ENTRYPOINT reads from /etc/wirespan
    return data["config.yaml"]


def test_configmap_config_is_valid_and_exports_to_the_gateway(rendered: dict, tmp_path: Path) -> None:
    text = _configmap_config(rendered)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(text)
    r = _cli("validate", "--config", str(cfg), env={**ENV, "NODE_NAME": "node-1"})
    assert r.returncode == 0, r.stdout + r.stderr
    raw = yaml.safe_load(text)
    assert raw["exporters"]["otlp"]["endpoint"] == "${env:OTLP_ENDPOINT:-" + GATEWAY + "}"
    # the gateway's OTLP ports are never traced (the agent on its node would trace every export)
    assert not {4317, 4318} & set(raw["receivers"]["ebpf"]["ports"])


def test_probes_and_ports_match_the_config(rendered: dict) -> None:
    c = _container(rendered)
    raw = yaml.safe_load(_configmap_config(rendered))
    tele = raw["service"]["telemetry"]
    host, _, port = tele["health"]["address"].rpartition(":")
    assert host == "0.0.0.0"  # the kubelet probes the pod's address, not its loopback
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["health"] == int(port)
    assert ports["metrics"] == int(tele["metrics"]["address"].rpartition(":")[2])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = c[probe]["httpGet"]
        assert get["port"] in ("health", int(port)) and get["path"] == tele["health"].get("path", "/")


def test_grace_period_outlasts_the_drain(rendered: dict) -> None:
    pod = _one(rendered, "DaemonSet")["spec"]["template"]["spec"]
    argv = _entrypoint() + _container(rendered)["args"]
    args = build_parser().parse_args(argv[1:])
    assert args.command == "run" and args.config == ["/etc/wirespan/config.yaml"]
    assert pod["terminationGracePeriodSeconds"] > args.drain_timeout


# ---------------------------------------------------------------------------------------------
# The eBPF receiver under exactly the granted capabilities (root; a real kernel)
# ---------------------------------------------------------------------------------------------
class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def _setpriv_caps(caps: list[str]) -> str:
    return ",".join(["-all", *("+" + c.lower().removeprefix("cap_") for c in caps)])


def _run_agent(tmp_path: Path, config: Path, setpriv: list[str], extra_sets: list[str],
               env: dict[str, str], port: int | None = None) -> tuple[int, list[dict], str, int]:
    """``wirespan run`` of ``config`` (an HTTP server's port traced, a file exporter added) under
    ``setpriv`` options; three GETs; SIGTERM. Returns (exit code, the file's span lines, stderr, health
    status seen while running). ``port``: a server already listening there, instead of one in
    this process."""
    srv = None
    if port is None:
        srv = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        port = srv.server_address[1]
    health, out = free_port(), tmp_path / "spans.jsonl"
    sets = [f"receivers.ebpf.ports=[{port}]", f"service.telemetry.health.address=127.0.0.1:{health}",
            "service.telemetry.metrics.address=", f"exporters.file.path={out}", *extra_sets]
    argv = ["setpriv", *setpriv, "--", sys.executable, "-m", "service.cli", "run", "--config", str(config)]
    for s in sets:
        argv += ["--set", s]
    err = tmp_path / "stderr"
    with err.open("w") as ef:
        p = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=ef)
    status = 0
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and p.poll() is None:
            try:
                status = urllib.request.urlopen(f"http://127.0.0.1:{health}/", timeout=2).status
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        if status == 200:
            for _ in range(3):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/hello", timeout=5).read()
            time.sleep(1.0)
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        if srv is not None:
            srv.shutdown()
            srv.server_close()
    lines = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    return rc, lines, err.read_text(), status


def _spans(lines: list[dict]) -> list[tuple[dict, dict]]:
    """(resource attributes, span) of every span in OTLP JSON lines."""
    out = []
    for doc in lines:
        for rs in doc["resourceSpans"]:
            res = {a["key"]: next(iter(a["value"].values())) for a in rs["resource"].get("attributes", [])}
            out += [(res, s) for ss in rs["scopeSpans"] for s in ss["spans"]]
    return out


@pytest.mark.root
@pytest.mark.slow
def test_configmap_pipeline_runs_under_the_daemonsets_capabilities(rendered: dict, tmp_path: Path) -> None:
    """The ConfigMap's pipeline, with the DaemonSet's capabilities only, turns three GETs into spans
    at a real OTLP/gRPC endpoint (standing in for the gateway), named by the node."""
    from tests.support.otlp_sink import GrpcSink
    c = _container(rendered)
    caps = c["securityContext"]["capabilities"]["add"]
    cfg = tmp_path / "config.yaml"
    cfg.write_text(_configmap_config(rendered))
    queue = tmp_path / "queue"
    with GrpcSink() as sink:
        rc, lines, err, status = _run_agent(
            tmp_path, cfg, ["--bounding-set", _setpriv_caps(caps), "--no-new-privs"],
            [f"exporters.otlp.sending_queue.storage={queue}",  # the DaemonSet's hostPath, here a temp dir
             "service.pipelines.traces.exporters=[otlp, file]"],
            {**ENV, "NODE_NAME": "node-7", "OTLP_ENDPOINT": sink.endpoint})
        assert status == 200 and rc == 0, err[-3000:]
        spans = _spans(lines)
        server = [s for _, s in spans if s["kind"] == 2 and s["name"].startswith("GET")]
        assert len(server) == 3, err[-3000:]
        assert {r.get("k8s.node.name") for r, _ in spans} == {"node-7"}
        assert {r.get("host.name") for r, _ in spans} == {"node-7"}
        assert sink.wait_spans(len(spans), timeout=10), (sink.span_count(), len(spans))


@pytest.mark.root
@pytest.mark.slow
def test_without_perfmon_the_receiver_refuses_to_start(rendered: dict, tmp_path: Path) -> None:
    """The control: one capability fewer and the BPF programs do not load (one line, exit 1)."""
    caps = [c for c in _container(rendered)["securityContext"]["capabilities"]["add"] if c != "PERFMON"]
    rc, lines, err, status = _run_agent(tmp_path, ROOT / "config" / "ebpf.yaml",
                                        ["--bounding-set", _setpriv_caps(caps), "--no-new-privs"],
                                        ["service.pipelines.traces.exporters=[file]"], ENV)
    assert rc == 1 and status == 0 and not lines
    assert "loading the BPF program into the kernel" in err and "Operation not permitted" in err


@pytest.mark.root
def test_sys_ptrace_and_dac_read_search_are_what_read_other_users_proc(rendered: dict) -> None:
    """Why SYS_PTRACE and DAC_READ_SEARCH are granted: the receiver follows /proc/PID/exe and
    /proc/PID/root (the TLS probes find libssl there), resource detection reads /proc/PID/environ
    (OTEL_SERVICE_NAME), of processes of any user. As uid 0 without SYS_PTRACE exe and root are refused
    (ptrace access); without DAC_READ_SEARCH environ is (mode 0400 of the process's owner)."""
    caps = _container(rendered)["securityContext"]["capabilities"]["add"]
    other = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sleep", "60"])

    def reads(granted: list[str]) -> dict[str, bool]:
        out = {}
        for what, cmd in (("environ", f"cat /proc/{other.pid}/environ"), ("exe", f"readlink /proc/{other.pid}/exe"),
                          ("root", f"ls /proc/{other.pid}/root/")):
            r = subprocess.run(["setpriv", "--bounding-set", _setpriv_caps(granted), "--", "sh", "-c", cmd],
                               capture_output=True, timeout=30)
            out[what] = r.returncode == 0
        return out

    try:
        time.sleep(0.3)
        assert reads(caps) == {"environ": True, "exe": True, "root": True}
        assert reads([c for c in caps if c != "SYS_PTRACE"]) == {"environ": True, "exe": False, "root": False}
        assert reads([c for c in caps if c != "DAC_READ_SEARCH"]) == {"environ": False, "exe": True, "root": True}
    finally:
        other.kill()
        other.wait()


#: An HTTP server run as nobody (uid 65534) with OTEL_SERVICE_NAME in its environment, as an
#: application in a container is: its /proc/PID files are owned by nobody (dumpable again after
#: setuid, as a process exec'd under that uid is). It binds first, then drops root.
_NOBODY_SERVER = """
import ctypes, os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "3"); self.end_headers(); self.wfile.write(b"ok\\n")
    def log_message(self, *a): pass
srv = HTTPServer(("127.0.0.1", int(sys.argv[1])), H)
os.setgroups([]); os.setgid(65534); os.setuid(65534)
ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE
srv.serve_forever()
"""


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize("without", [None, "DAC_READ_SEARCH"])
def test_service_name_of_another_users_process(rendered: dict, tmp_path: Path, without: str | None) -> None:
    """With the DaemonSet's capabilities, the spans of a server run by another user carry the
    service.name of its OTEL_SERVICE_NAME; without DAC_READ_SEARCH that is lost (the executable's
    name instead): the capability is needed, not decoration."""
    caps = [c for c in _container(rendered)["securityContext"]["capabilities"]["add"] if c != without]
    port = free_port()
    srv = subprocess.Popen([sys.executable, "-c", _NOBODY_SERVER, str(port)], cwd=ROOT,
                           env={**ENV, "OTEL_SERVICE_NAME": "checkout"})
    try:
        wait_port(port)
        rc, lines, err, status = _run_agent(tmp_path, ROOT / "config" / "ebpf.yaml",
                                            ["--bounding-set", _setpriv_caps(caps), "--no-new-privs"],
                                            ["service.pipelines.traces.exporters=[file]"], ENV, port=port)
    finally:
        srv.kill()
        srv.wait()
    assert status == 200 and rc == 0, err[-3000:]
    names = {r.get("service.name") for r, s in _spans(lines) if s["kind"] == 2}
    assert len([s for _, s in _spans(lines) if s["kind"] == 2]) == 3, err[-3000:]
    if without is None:
        assert names == {"checkout"}, err[-3000:]
    else:
        assert names and "checkout" not in names


# ---------------------------------------------------------------------------------------------
# Dockerfile (no Docker engine here: checked statically, its build stage rehearsed)
# ---------------------------------------------------------------------------------------------
def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out, cur = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if cur and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        cur += line.rstrip()
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        word, _, rest = cur.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        cur = ""
    assert not cur, "the Dockerfile ends inside a continued line"
    return out


def _stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    name = None
    for ins, args in _instructions():
        if ins == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", args, re.I)
            assert m, f"every stage is named: FROM {args}"
            name = m.group(2)
            stages[name] = [(ins, args)]
        elif name is not None:
            stages[name].append((ins, args))
    return stages


def _copies(stage: list[tuple[str, str]]) -> list[tuple[str | None, list[str], str]]:
    out = []
    for ins, args in stage:
        if ins != "COPY":
            continue
        words = shlex.split(args)
        flags = [w for w in words if w.startswith("--")]
        paths = [w for w in words if not w.startswith("--")]
        src_from = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
        out.append((src_from, paths[:-1], paths[-1]))
    return out


def _entrypoint() -> list[str]:
    (args,) = [a for i, a in _stages()["runtime"] if i == "ENTRYPOINT"]
    return json.loads(args)


def test_dockerfile_has_a_build_and_a_slim_runtime_stage() -> None:
    pre = [a for i, a in _instructions()[:2] if i == "ARG"]
    assert pre == ["PYTHON_IMAGE=python:3.11-slim-bookworm"]
    stages = _stages()
    assert list(stages) == ["build", "runtime"]
    assert all(s[0][1].startswith("${PYTHON_IMAGE} ") for s in stages.values())
    build_runs = " ".join(a for i, a in stages["build"] if i == "RUN")
    assert "bash receivers/ebpf/build.sh" in build_runs and "pip wheel" in build_runs
    for pkg in ("gcc", "clang", "llvm", "libbpf-dev", "bpftool"):
        assert re.search(rf"\b{re.escape(pkg)}\b", build_runs), pkg
    runtime_runs = " ".join(a for i, a in stages["runtime"] if i == "RUN")
    assert "gcc" not in runtime_runs and "clang" not in runtime_runs  # no compiler in the image
    # Kubernetes pod metadata (service/resource_detect.py) needs the client, which is no dependency
    assert "--wheel-dir /wheels . kubernetes" in build_runs and "wirespan kubernetes" in runtime_runs
    assert _entrypoint() == ["wirespan", "run", "--config", "/etc/wirespan/config.yaml"]


def test_dockerfile_copies_only_what_a_clone_has() -> None:
    tracked = _tracked()
    ignore = [p.strip() for p in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
              if p.strip() and not p.startswith("#")]
    stages = _stages()
    seen = 0
    for name, stage in stages.items():
        for src_from, sources, _dest in _copies(stage):
            if src_from is not None:
                assert src_from in list(stages)[: list(stages).index(name)], f"COPY --from={src_from} in {name}"
                continue
            for s in sources:
                rel = s.rstrip("/")
                assert rel in tracked or any(f.startswith(rel + "/") for f in tracked), f"COPY {s}: not in a clone"
                assert not any(fnmatch.fnmatch(rel, p) for p in ignore), f"COPY {s} is excluded by the .dockerignore"
                seen += 1
    assert seen >= 8


def test_runtime_libraries_are_debian_packages() -> None:
    (run,) = [a for i, a in _stages()["runtime"] if i == "RUN" and "apt-get install" in a]
    pkgs = [w for w in run.split("apt-get install", 1)[1].split("&&", 1)[0].split() if not w.startswith("-")]
    assert pkgs == ["libbpf1", "libpcap0.8"]
    for p in pkgs:
        r = subprocess.run(["apt-cache", "show", p], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and f"Package: {p}" in r.stdout, r.stderr


def test_exposed_ports_are_the_defaults_and_the_baked_config_is_valid() -> None:
    runtime = _stages()["runtime"]
    (expose,) = [a for i, a in runtime if i == "EXPOSE"]
    assert sorted(int(p) for p in expose.split()) == sorted(
        int(a.rpartition(":")[2]) for a in (DEFAULT_METRICS_ADDRESS, DEFAULT_HEALTH_ADDRESS))
    baked = [srcs[0] for frm, srcs, dest in _copies(runtime) if dest == "/etc/wirespan/config.yaml"]
    assert baked == ["config/ebpf.yaml"]
    r = _cli("validate", "--config", baked[0])
    assert r.returncode == 0, r.stdout + r.stderr
    assert ("STOPSIGNAL", "SIGTERM") in runtime


def _build_context(tmp_path: Path) -> Path:
    """What the build stage's COPYs put in /src (each path at its own place), without what the
    .dockerignore keeps out of the context."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.egg-info", "vmlinux.h")
    for _from, sources, dest in _copies(_stages()["build"]):
        for s in sources:
            rel = s.rstrip("/")
            assert dest in ("./", s), f"COPY {s} {dest}: the context's layout is kept"
            if (ROOT / rel).is_dir():
                shutil.copytree(ROOT / rel, src / rel, ignore=ignore)
            else:
                src.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / rel, src / rel)
    return src


@pytest.mark.slow
def test_build_stage_wheel_carries_accelerators_and_bpf_object(tmp_path: Path) -> None:
    """The build stage's `pip wheel` on what it COPYs (here --no-deps: the dependencies' wheels come
    from PyPI in the real build), then its own import check on the installed wheel, from /."""
    src = _build_context(tmp_path)
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "--wheel-dir", str(wheels), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    (whl,) = wheels.glob("wirespan-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    for mod in ACCELERATORS:
        assert any(n.startswith(mod.replace(".", "/") + ".cpython-") and n.endswith(".so") for n in names), mod
    assert "receivers/ebpf/bpf/wirespan.bpf.o" in names
    assert any(n.endswith("share/wirespan/config/ebpf.yaml") for n in names)
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                        str(site), str(whl)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (run,) = [a for i, a in _stages()["build"] if i == "RUN" and "speedups" in a]
    check = shlex.split(run.split("&& cd / &&", 1)[1])
    assert check[:2] == ["python", "-c"]
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("WIRESPAN_PURE_PYTHON", None)
    r = subprocess.run([sys.executable, "-c", "import service; print(service.__file__)"], cwd="/", env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip().startswith(str(site)), r.stdout + r.stderr   # the wheel's, not the checkout's
    r = subprocess.run([sys.executable, *check[1:]], cwd="/", env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


@pytest.mark.root
@pytest.mark.slow
def test_healthcheck_command_against_the_images_command_line(tmp_path: Path) -> None:
    """The image's ENTRYPOINT + CMD (its config: the file COPY puts at /etc/wirespan/config.yaml) run
    for real; the HEALTHCHECK command exits 0 while it runs and non-zero once it has stopped."""
    runtime = _stages()["runtime"]
    (hc,) = [a for i, a in runtime if i == "HEALTHCHECK"]
    cmd = json.loads(hc.split(" CMD ", 1)[1])
    assert cmd[:2] == ["python", "-c"]
    (cmdline,) = [a for i, a in runtime if i == "CMD"]
    env_line = " ".join(a for i, a in runtime if i == "ENV")
    assert "WIRESPAN_HEALTH_URL=http://127.0.0.1:13134/" in env_line
    argv = _entrypoint() + json.loads(cmdline)
    argv[argv.index("/etc/wirespan/config.yaml")] = str(ROOT / "config" / "ebpf.yaml")
    health = free_port()
    url = f"http://127.0.0.1:{health}/"
    p = subprocess.Popen([sys.executable, "-m", "service.cli", *argv[1:], "--set",
                          f"service.telemetry.health.address=127.0.0.1:{health}", "--set",
                          "service.telemetry.metrics.address="], cwd=ROOT, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    hc_env = {**ENV, "WIRESPAN_HEALTH_URL": url}
    try:
        deadline, rc = time.monotonic() + 60, 1
        while time.monotonic() < deadline and p.poll() is None:
            rc = subprocess.run([sys.executable, *cmd[1:]], env=hc_env, capture_output=True, timeout=30).returncode
            if rc == 0:
                break
            time.sleep(0.3)
        assert rc == 0 and p.poll() is None
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    stopped = subprocess.run([sys.executable, *cmd[1:]], env=hc_env, capture_output=True, timeout=30)
    assert stopped.returncode != 0


# ---------------------------------------------------------------------------------------------
# systemd
# ---------------------------------------------------------------------------------------------
def _unit() -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    cur: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        s = line.strip()
        if not s or s.startswith(("#", ";")):
            continue
        if s.startswith("["):
            cur = sections.setdefault(s.strip("[]"), {})
            continue
        k, _, v = s.partition("=")
        cur.setdefault(k, []).append(v)
    return sections


def _svc(key: str) -> str:
    (v,) = _unit()["Service"][key]
    return v


def _seconds(v: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|min|ms)?", v)
    assert m, v
    return float(m.group(1)) * {"s": 1, None: 1, "min": 60, "ms": 0.001}[m.group(2)]


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail("systemd-analyze not found: tests/run.sh installs Debian's systemd package")
    return exe


def _unit_with_installed_wirespan(tmp_path: Path) -> Path:
    """The unit, its ExecStart program pointed at the wirespan this checkout installed (the unit
    names /opt/wirespan/bin/wirespan, where deploy/README.md installs it; not on this machine)."""
    here = shutil.which("wirespan")
    assert here, "wirespan is not installed (pip install -e .)"
    text = UNIT.read_text()
    assert text.count("/opt/wirespan/bin/wirespan run ") == 1
    out = tmp_path / "wirespan.service"
    out.write_text(text.replace("/opt/wirespan/bin/wirespan run ", f"{here} run "))
    return out


def test_unit_verifies(tmp_path: Path) -> None:
    exe = _systemd_analyze()
    r = subprocess.run([exe, "verify", str(_unit_with_installed_wirespan(tmp_path))], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    # The unit as shipped: its only complaint here, if any, is the program not installed at /opt.
    r = subprocess.run([exe, "verify", str(UNIT)], capture_output=True, text=True, timeout=120)
    if not Path("/opt/wirespan/bin/wirespan").exists():
        assert r.stderr.strip().splitlines() == [
            "wirespan.service: Command /opt/wirespan/bin/wirespan is not executable: No such file or directory"]
    else:
        assert r.returncode == 0, r.stderr


def test_unit_hardening_exposure(tmp_path: Path) -> None:
    """`systemd-analyze security` scores the sandbox (0 best, 10 worst); here 3.1 ("OK") with eBPF
    still possible. The threshold (4.0) is the score times ten."""
    r = subprocess.run([_systemd_analyze(), "security", "--offline=yes", "--threshold=40",
                        str(_unit_with_installed_wirespan(tmp_path))], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    assert "Overall exposure level for wirespan.service" in r.stdout


def test_unit_command_line_is_a_valid_run() -> None:
    argv = shlex.split(_svc("ExecStart"))
    assert argv[0] == "/opt/wirespan/bin/wirespan"
    args = build_parser().parse_args(argv[1:])     # the real parser: unknown options fail here
    assert args.command == "run" and args.config == ["/etc/wirespan/config.yaml"]
    # the config deploy/README.md installs there (config/ebpf.yaml), through the real CLI
    r = _cli("validate", "--config", str(ROOT / "config" / "ebpf.yaml"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert _seconds(_svc("TimeoutStopSec")) > args.drain_timeout
    assert _svc("KillSignal") == "SIGTERM" and _svc("KillMode") == "mixed"
    assert _svc("Restart") == "on-failure"
    assert _svc("ExecReload") == "/bin/kill -HUP $MAINPID"   # cli.py: SIGHUP reloads


def test_unit_grants_the_daemonsets_capabilities(rendered: dict) -> None:
    caps = {"CAP_" + c for c in _container(rendered)["securityContext"]["capabilities"]["add"]}
    assert set(_svc("CapabilityBoundingSet").split()) == caps
    assert set(_svc("AmbientCapabilities").split()) == caps
    allowed = _svc("SystemCallFilter").split()
    assert allowed[0] == "@system-service" and {"bpf", "perf_event_open"} <= set(allowed)
    assert "ProtectProc" not in _unit()["Service"]   # "invisible" would hide the processes to trace


@pytest.mark.root
@pytest.mark.slow
def test_ebpf_runs_with_the_units_capabilities(tmp_path: Path) -> None:
    """What systemd gives the service, by setpriv: the bounding set, the ambient set, no_new_privs and
    SecureBits=noroot-locked (uid 0 gains no capability by being root). config/ebpf.yaml's pipeline
    turns three GETs into spans."""
    caps = _svc("AmbientCapabilities").split()
    assert _svc("SecureBits") == "noroot-locked" and _svc("NoNewPrivileges") == "yes"
    c = _setpriv_caps(caps)
    rc, lines, err, status = _run_agent(
        tmp_path, ROOT / "config" / "ebpf.yaml",
        ["--securebits", "+noroot,+noroot_locked", "--inh-caps", c, "--ambient-caps", c, "--bounding-set", c,
         "--no-new-privs"],
        ["service.pipelines.traces.exporters=[file]"], ENV)
    assert status == 200 and rc == 0, err[-3000:]
    server = [s for _, s in _spans(lines) if s["kind"] == 2 and s["name"].startswith("GET")]
    assert len(server) == 3, err[-3000:]


# ---------------------------------------------------------------------------------------------
# Helm chart: Helm is not packaged in Debian, so `helm template` cannot run here. Checked instead:
# the YAML files parse, the config in values.yaml is the Kustomize base's and valid, every action of
# the templates is balanced, names a defined value, a defined helper and a known function, and the
# templates with their actions blanked out parse as YAML and carry the base's DaemonSet fields.
# ---------------------------------------------------------------------------------------------
_ACTION = re.compile(r"{{-?\s*(.*?)\s*-?}}", re.S)
#: Helm's and Sprig's functions these templates may use (a misspelt one fails here, not at install).
_FUNCS = {"include", "toYaml", "nindent", "indent", "quote", "default", "trunc", "trimSuffix", "printf", "print",
          "contains", "splitList", "last", "int", "add", "sha256sum", "deepCopy", "set", "dict", "not", "and", "or",
          "eq", "ne"}
_KEYWORDS = {"if", "else", "end", "range", "with", "define", "template", "block", "nil", "true", "false"}


def _templates() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((CHART / "templates").iterdir()) if p.is_file()}


def _values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "wirespan" and chart["type"] == "application"
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert chart["appVersion"] == version
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kust["images"] == [{"name": "wirespan", "newTag": version}]


@pytest.mark.parametrize("tls", [False, True])
def test_chart_config_is_the_bases_and_valid(tmp_path: Path, tls: bool) -> None:
    values = _values()
    assert values["config"] == yaml.safe_load((K8S / "config.yaml").read_text())   # no drift between the two
    cfg = values["config"]
    if tls:   # what configmap.yaml makes of tls.enabled=true
        cfg["receivers"]["ebpf"]["tls"] = {"enabled": True}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = _cli("validate", "--config", str(path), env={**ENV, "NODE_NAME": "node-1"})
    assert r.returncode == 0, r.stdout + r.stderr


def _value_exists(values: dict[str, Any], dotted: str) -> bool:
    cur: Any = values
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return False
        cur = cur[part]
    return True


def test_chart_templates_actions_are_well_formed() -> None:
    helpers = _templates()["_helpers.tpl"]
    defined = set(re.findall(r'{{-?\s*define\s+"([^"]+)"', helpers))
    values = _values()
    for name, text in _templates().items():
        assert "{{" not in _ACTION.sub("", text), f"{name}: an unclosed action"   # "}}" may end a YAML flow map
        depth = 0
        for action in _ACTION.findall(text):
            if action.startswith("/*"):
                continue
            word = action.split()[0] if action.split() else ""
            if word in ("if", "range", "with", "define", "block"):
                depth += 1
            elif word == "end":
                depth -= 1
                assert depth >= 0, (name, action)
            for ref in re.findall(r"\.Values\.([\w.]+)", action):
                assert _value_exists(values, ref), f"{name}: .Values.{ref} is not in values.yaml"
            for inc in re.findall(r'(?:include|template)\s+"([^"]+)"', action):
                assert inc in defined, f"{name}: {inc} is not defined in _helpers.tpl"
            code = re.sub(r'"[^"]*"', "", action)   # drop string literals
            for ident in re.findall(r"(?<![.$\w])([a-zA-Z]\w*)", code):
                assert ident in _FUNCS | _KEYWORDS, f"{name}: unknown function {ident!r} in {{{{ {action} }}}}"
        assert depth == 0, f"{name}: unbalanced blocks"


def _blanked(text: str) -> str:
    """The template with lines that are only actions removed and other actions replaced by a word."""
    lines = []
    for line in text.splitlines():
        if line.strip() and not _ACTION.sub("", line).strip():
            continue
        lines.append(_ACTION.sub("X", line))
    return "\n".join(lines)


def test_chart_templates_parse_and_match_the_base(rendered: dict) -> None:
    docs = {}
    for name, text in _templates().items():
        if name.endswith(".yaml"):
            for d in yaml.safe_load_all(_blanked(text)):
                if d:
                    docs[d["kind"]] = d
    assert set(docs) == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"}
    assert docs["ClusterRole"]["rules"] == _one(rendered, "ClusterRole")["rules"]
    base = _one(rendered, "DaemonSet")["spec"]["template"]["spec"]
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    assert pod["hostPID"] is True and pod["hostNetwork"] is False
    (c,) = pod["containers"]
    (b,) = base["containers"]
    for key in ("volumeMounts", "startupProbe", "livenessProbe", "readinessProbe"):
        assert c[key] == b[key], key
    assert pod["volumes"][1:] == base["volumes"][1:]           # the config volume's name is the release's
    assert [e["name"] for e in c["env"]] == [e["name"] for e in b["env"]] + ["OTLP_ENDPOINT"]
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert _values()["capabilities"] == b["securityContext"]["capabilities"]["add"]
    assert _values()["resources"] == b["resources"] and _values()["tolerations"] == base["tolerations"]
    text = _templates()["daemonset.yaml"]
    # SYS_ADMIN only with TLS, and then without allowPrivilegeEscalation=false (Kubernetes refuses both)
    assert re.search(r"if \.Values\.tls\.enabled }}\s*- SYS_ADMIN", text)
    assert re.search(r"if not \.Values\.tls\.enabled }}\s*allowPrivilegeEscalation: false", text)
