"""Who is who (service/resource_detect.py, the protocols stage's resources, the ebpf receiver's hooks).

Real processes: Python http.servers started with and without ``OTEL_SERVICE_NAME`` /
``OTEL_RESOURCE_ATTRIBUTES``, one moved into a new cgroup made here under the cgroup v2 tree
(``/sys/fs/cgroup/unified`` on this hybrid host) in docker's systemd-driver format, traced by the
real ``ebpf`` receiver (root, this kernel) feeding a real protocols stage. The cgroup parser is
unit-tested with lines in the formats docker, containerd (CRI), cri-o and podman write, cgroup v1
and v2. Kubernetes: no cluster can run here, so the API server and the kubelet are a local HTTP
responder serving a v1 PodList in the shape ``GET /api/v1/pods`` and the kubelet's ``/pods``
return (written for this test after the API reference, not recorded from a cluster); the
``kubernetes`` client does the requests. Captures: the replay benchmark's generated capture
(server 10.2.0.1, not loopback) replayed through the CLI with and without a ``hosts:`` map.
"""

from __future__ import annotations

import http.server
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.resource_detect import (
    HostNames,
    KubernetesConfig,
    KubernetesMetadata,
    ProcessMetadata,
    ResourceDetectionConfig,
    index_pods,
    parse_cgroup,
    parse_resource_attributes,
    process_changed,
)
from tests.support.capture import free_port, wait_port, wait_until
from tests.support.wirespan_proc import ROOT, WirespanRun

CID = "3b8f7e1c2d4a5b6c7d8e9f0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e"
CID2 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
UID = "3f9a1c2e-4b5d-4e6f-8a9b-0c1d2e3f4a5b"
UID_ = UID.replace("-", "_")


# -- cgroup paths as the runtimes write them ------------------------------------------------
@pytest.mark.parametrize(("text", "cid", "runtime", "pod", "unit"), [
    # docker, systemd cgroup driver, cgroup v2
    (f"0::/system.slice/docker-{CID}.scope\n", CID, "docker", None, None),
    # docker, cgroupfs driver, cgroup v1 (a hybrid host: the v2 line says nothing)
    (f"12:pids:/docker/{CID}\n11:memory:/docker/{CID}\n1:name=systemd:/docker/{CID}\n0::/\n", CID, "docker", None,
     None),
    # Kubernetes + containerd, systemd driver, v2
    (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope\n",
     CID, "containerd", UID, None),
    # Kubernetes + containerd, cgroupfs driver, v1 (runtime not in the path)
    (f"11:cpuset:/kubepods/besteffort/pod{UID}/{CID}\n", CID, None, UID, None),
    # containerd's systemd-style v1 path (slice:prefix:id)
    (f"1:name=systemd:/system.slice/containerd.service/kubepods-besteffort-pod{UID_}.slice:cri-containerd:{CID}\n",
     CID, "containerd", UID, None),
    # cri-o, v2, the container and its conmon
    (f"0::/kubepods.slice/kubepods-pod{UID_}.slice/crio-{CID}.scope\n", CID, "cri-o", UID, None),
    (f"0::/kubepods.slice/kubepods-pod{UID_}.slice/crio-conmon-{CID}.scope\n", None, None, UID, None),
    # podman rootful (the container's own subgroup) and rootless
    (f"0::/machine.slice/libpod-{CID}.scope/container\n", CID, "podman", None, None),
    (f"0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope\n", CID, "podman", None, None),
    (f"0::/machine.slice/libpod-conmon-{CID}.scope\n", None, None, None, None),
    # systemd services, no container
    ("0::/system.slice/nginx.service\n", None, None, None, "nginx"),
    ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/backup.service\n", None, None, None, "backup"),
    ("0::/user.slice/user-1000.slice/user@1000.service/init.scope\n", None, None, None, None),
    ("0::/\n", None, None, None, None),
    ("garbage\n\n::\n", None, None, None, None),
])
def test_parse_cgroup(text: str, cid: str | None, runtime: str | None, pod: str | None, unit: str | None) -> None:
    got = parse_cgroup(text)
    assert (got.container_id, got.runtime, got.pod_uid, got.unit) == (cid, runtime, pod, unit)


def test_parse_resource_attributes() -> None:
    got = parse_resource_attributes("service.version=1.2 , deployment.environment.name=prod%20eu,bad,=x,k=a%2Cb")
    assert got == {"service.version": "1.2", "deployment.environment.name": "prod eu", "k": "a,b"}


def test_host_names() -> None:
    h = HostNames({"10.0.0.5": "db-1", "10.1.0.0/16": "web", "2001:db8::1": "v6"})
    assert h.name_of("10.0.0.5") == "db-1" and h.name_of("10.1.7.9") == "web" and h.name_of("2001:db8::1") == "v6"
    assert h.name_of("10.2.0.1") is None and h.name_of("not-an-ip") is None
    assert HostNames.is_local("127.0.0.1") and HostNames.is_local("::1") and not HostNames.is_local("10.0.0.5")
    with pytest.raises(ValueError):
        HostNames({"10.0.0.300": "x"})


def test_protocols_config_refuses_a_bad_host() -> None:
    from service.config import ConfigError, validate
    raw = {"receivers": {"pcap": {"path": str(ROOT / "config/samples/http-sample.pcap")}},
           "processors": {"protocols": {"hosts": {"10.0.0.300": "db"}}}, "exporters": {"debug": {}},
           "service": {"pipelines": {"traces": {"receivers": ["pcap"], "processors": ["protocols"],
                                                "exporters": ["debug"]}}}}
    with pytest.raises(ConfigError, match="processors::protocols"):
        validate(raw)


# -- real processes --------------------------------------------------------------------------
_SERVER = r'''
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def do_GET(self):
        body = b"ok " + self.path.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
'''


#: What the servers below run as in /proc/PID/comm: the interpreter's file name (python3 in a venv,
#: python3.11 under pyenv), at most 15 bytes.
COMM = os.path.basename(sys.executable)[:15]


class Server:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        e = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        e.update(env or {})
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(self.port)], env=e,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Cgroup:
    """A cgroup made here, named as docker's systemd driver names a container's scope."""

    ROOT = Path("/sys/fs/cgroup/unified") if Path("/sys/fs/cgroup/unified/cgroup.procs").exists() \
        else Path("/sys/fs/cgroup")

    def __init__(self, cid: str) -> None:
        self.slice = self.ROOT / f"wirespan-test-{os.getpid()}-{secrets.token_hex(3)}.slice"
        self.path = self.slice / f"docker-{cid}.scope"
        self.path.mkdir(parents=True)

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        for _ in range(50):  # rmdir is refused while an exiting member is still counted
            try:
                self.path.rmdir()
                self.slice.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def _can_make_cgroup() -> bool:
    try:
        c = Cgroup(CID2)
    except OSError:
        return False
    c.remove()
    return True


def test_process_metadata_of_real_processes() -> None:
    attrs = "service.name=ignored,service.version=2.1,deployment.environment.name=test"
    a = Server({"OTEL_SERVICE_NAME": "checkout", "OTEL_RESOURCE_ATTRIBUTES": attrs})
    b = Server({"OTEL_RESOURCE_ATTRIBUTES": "service.name=billing"})
    c = Server()
    try:
        m = ProcessMetadata()
        ia = m.get(a.pid, COMM)
        assert ia.service_name == "checkout"  # OTEL_SERVICE_NAME wins over the attribute
        at = ia.attributes
        assert at["process.pid"] == a.pid and at["process.parent_pid"] == os.getpid()
        assert at["process.executable.path"] == os.path.realpath(sys.executable)
        assert at["process.executable.name"] == COMM  # /proc/PID/comm: what it was exec'd as
        assert m.get(c.pid).attributes["process.executable.name"] == COMM  # /proc/PID/comm without a record's
        assert at["process.command_line"] == f"{sys.executable} -c {_SERVER} {a.port}"
        assert at["process.owner"] == "root"
        assert at["service.version"] == "2.1" and at["deployment.environment.name"] == "test"
        assert "service.name" not in at and not any(k.startswith("OTEL") for k in at)
        assert m.get(b.pid).service_name == "billing"
        assert m.get(c.pid).service_name is None  # the stage falls back to the executable (comm)
        assert "container.id" not in m.get(c.pid).attributes
        # a record's comm is its thread's (a JVM names them, prctl(PR_SET_NAME)): the process's name is /proc's
        code = ("import ctypes, threading, time\n"
                "def f():\n    ctypes.CDLL(None).prctl(15, b'http-nio-8080-e'); time.sleep(30)\n"
                "threading.Thread(target=f, daemon=True).start(); time.sleep(30)")
        jvm_like = subprocess.Popen([sys.executable, "-c", code])
        try:
            assert wait_until(lambda: any(
                Path(f"/proc/{jvm_like.pid}/task/{t}/comm").read_text().strip() == "http-nio-8080-e"
                for t in os.listdir(f"/proc/{jvm_like.pid}/task")))
            named = ProcessMetadata().get(jvm_like.pid, "http-nio-8080-e")
            assert named.attributes["process.executable.name"] == COMM and named.name == COMM
            assert named.attributes["process.command_line"].startswith(f"{sys.executable} -c import ctypes")
            assert not named.partial
        finally:
            jvm_like.kill()
            jvm_like.wait()
        # a pid whose process is not the record's (pid 1 is no curl): the pid and the comm only
        other = ProcessMetadata().get(1, "curl")
        assert other.attributes == {"process.pid": 1, "process.executable.name": "curl"} and other.partial
        # cached: a second lookup reads nothing
        reads = m.stats["reads"]
        assert m.get(a.pid, COMM) is ia and m.stats["reads"] == reads
        # exit: the receiver's hook forgets it; a later get re-reads
        process_changed(a.pid)
        assert m.stats["invalidated"] == 1 and m.get(a.pid, COMM) is not ia
    finally:
        for s in (a, b, c):
            s.stop()


def test_exec_and_pid_checks_refresh_the_cache() -> None:
    script = "read x; exec " + sys.executable + " -c 'import time; time.sleep(30)'"
    p = subprocess.Popen(["sh", "-c", script], stdin=subprocess.PIPE)
    try:
        m = ProcessMetadata(ResourceDetectionConfig(revalidate=0.05))
        first = m.get(p.pid, "sh")
        assert first.attributes["process.executable.name"] in ("dash", "sh", "bash")
        assert p.stdin is not None
        p.stdin.write(b"go\n")
        p.stdin.flush()
        assert wait_until(lambda: os.readlink(f"/proc/{p.pid}/exe") == os.path.realpath(sys.executable))
        # no EXEC record here (that program is attached with tls): the exe check sees it
        time.sleep(0.1)
        second = m.get(p.pid)
        assert second is not first and second.generation > first.generation
        assert second.attributes["process.executable.path"] == os.path.realpath(sys.executable)
        # a thread's comm on a later record is no exec: the entry stays
        m2 = ProcessMetadata()
        x = m2.get(p.pid, "python3")
        assert m2.get(p.pid, "worker-3") is x
    finally:
        p.kill()
        p.wait()


def test_cache_is_bounded() -> None:
    m = ProcessMetadata(ResourceDetectionConfig(max_processes=3))
    for pid in (1, os.getpid(), os.getppid(), 1, 2):
        m.get(pid)
    assert len(m) == 3 and m.stats["evicted"] == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="cgroups are made as root")
def test_container_id_from_a_real_cgroup() -> None:
    if not _can_make_cgroup():
        pytest.fail("cannot make a cgroup under " + str(Cgroup.ROOT))
    cg = Cgroup(CID)
    s = Server()
    try:
        cg.add(s.pid)
        info = ProcessMetadata().get(s.pid)
        assert info.attributes["container.id"] == CID and info.attributes["container.runtime"] == "docker"
    finally:
        s.stop()
        cg.remove()


# -- Kubernetes: a local responder in the API's shapes ---------------------------------------
def _pod_list(node: str) -> dict[str, Any]:
    return {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "48213"}, "items": [
        {"metadata": {"name": "checkout-7d9c5b6f4-x2lqp", "generateName": "checkout-7d9c5b6f4-", "namespace": "shop",
                      "uid": UID, "resourceVersion": "48102",
                      "labels": {"app.kubernetes.io/name": "checkout", "pod-template-hash": "7d9c5b6f4"},
                      "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                           "name": "checkout-7d9c5b6f4", "uid": "b1e2", "controller": True,
                                           "blockOwnerDeletion": True}]},
         "spec": {"nodeName": node, "containers": [{"name": "app", "image": "shop/checkout:2.1"},
                                                   {"name": "envoy", "image": "envoyproxy/envoy:v1.31"}]},
         "status": {"phase": "Running", "podIP": "10.244.1.17",
                    "containerStatuses": [
                        {"name": "app", "ready": True, "restartCount": 0, "image": "shop/checkout:2.1",
                         "containerID": f"containerd://{CID}", "started": True},
                        {"name": "envoy", "ready": True, "restartCount": 0, "image": "envoyproxy/envoy:v1.31",
                         "containerID": f"containerd://{CID2}", "started": True}]}},
        {"metadata": {"name": "db-0", "namespace": "shop", "uid": "0b1c2d3e-0000-4000-8000-000000000001",
                      "labels": {"app": "db"},
                      "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db",
                                           "uid": "c3", "controller": True}]},
         "spec": {"nodeName": node, "containers": [{"name": "postgres", "image": "postgres:17"}]},
         "status": {"phase": "Running", "containerStatuses": [
             {"name": "postgres", "containerID": "cri-o://" + "a" * 64, "ready": True, "restartCount": 1}]}},
    ]}


class Responder:
    """The API server's ``/api/v1/pods`` and the kubelet's ``/pods`` (a mock: no cluster here)."""

    def __init__(self, node: str = "node-1") -> None:
        self.requests: list[tuple[str, str]] = []
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_GET(self) -> None:
                outer.requests.append((self.path, self.headers.get("Authorization", "")))
                if self.path.startswith("/api/v1/pods") or self.path == "/pods":
                    body = json.dumps(_pod_list(node)).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                else:
                    body = b'{"kind":"Status","status":"Failure","code":404}'
                    self.send_response(404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def responder(tmp_path: Path) -> Iterator[tuple[Responder, str]]:
    r = Responder()
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    yield r, str(token)
    r.close()


def test_index_pods() -> None:
    by_cid, by_uid = index_pods(_pod_list("node-1"))
    attrs, service = by_cid[CID]
    assert attrs == {"k8s.pod.name": "checkout-7d9c5b6f4-x2lqp", "k8s.namespace.name": "shop", "k8s.pod.uid": UID,
                     "k8s.node.name": "node-1", "k8s.replicaset.name": "checkout-7d9c5b6f4",
                     "k8s.deployment.name": "checkout", "k8s.container.name": "app"}
    assert service == "checkout"
    assert by_cid[CID2][0]["k8s.container.name"] == "envoy"
    db, db_service = by_cid["a" * 64]
    assert db["k8s.statefulset.name"] == "db" and "k8s.deployment.name" not in db and db_service == "db"
    assert by_uid[UID][0]["k8s.pod.name"] == "checkout-7d9c5b6f4-x2lqp" and "k8s.container.name" not in by_uid[UID][0]
    assert index_pods({"items": [{}]}) == ({}, {})  # an empty pod: nothing, no exception


@pytest.mark.parametrize("source", ["api_server", "kubelet"])
def test_kubernetes_client_lists_the_nodes_pods(source: str, responder: tuple[Responder, str]) -> None:
    r, token = responder
    k = KubernetesMetadata(KubernetesConfig(enabled=True, source=source, url=r.url, node_name="node-1",
                                            token_file=token, ca_file=None))
    k.list_now()
    path, auth = r.requests[-1]
    if source == "api_server":
        assert path.startswith("/api/v1/pods?") and "fieldSelector=spec.nodeName%3Dnode-1" in path
    else:
        assert path == "/pods"
    assert auth == "Bearer s3cret-token"
    hit = k.lookup(CID, None)
    assert hit is not None and hit[0]["k8s.pod.name"] == "checkout-7d9c5b6f4-x2lqp"
    assert k.lookup(None, UID) is not None and k.lookup("f" * 64, None) is None


def test_kubernetes_off_outside_a_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert ProcessMetadata().k8s is None
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    assert KubernetesConfig().active() and not KubernetesConfig(enabled=False).active()


@pytest.mark.skipif(os.geteuid() != 0, reason="cgroups are made as root")
def test_pod_metadata_joins_a_process_in_its_container(responder: tuple[Responder, str]) -> None:
    r, token = responder
    cfg = ResourceDetectionConfig(kubernetes=KubernetesConfig(enabled=True, url=r.url, node_name="node-1",
                                                              token_file=token, ca_file=None))
    cg = Cgroup(CID)
    s = Server()
    m = ProcessMetadata(cfg)
    try:
        cg.add(s.pid)
        first = m.get(s.pid)  # the background list starts now; the pipeline does not wait for it
        assert first.attributes["container.id"] == CID
        assert wait_until(lambda: m.k8s is not None and m.k8s.lists > 0, timeout=10)
        info = m.get(s.pid)
        a = info.attributes
        assert a["k8s.pod.name"] == "checkout-7d9c5b6f4-x2lqp" and a["k8s.namespace.name"] == "shop"
        assert a["k8s.deployment.name"] == "checkout" and a["k8s.node.name"] == "node-1"
        assert a["k8s.container.name"] == "app" and info.service_name == "checkout"
        assert info.generation > 0
    finally:
        m.close()
        s.stop()
        cg.remove()


# -- the ebpf receiver: spans of real processes ----------------------------------------------
def test_ebpf_spans_carry_who_is_who() -> None:
    from processors.protocols.processor import ProtocolsProcessor
    from receivers.ebpf import EbpfConfig, EbpfReceiver
    from receivers.ebpf.libbpf import check_environment
    check_environment()  # raises (the test fails, saying why) where the receiver cannot run
    from tests.support.live_http import SpanSink

    checkout = Server({"OTEL_SERVICE_NAME": "checkout", "OTEL_RESOURCE_ATTRIBUTES": "service.version=2.1"})
    plain = Server()
    cg = Cgroup(CID)
    sink = SpanSink()
    stage = ProtocolsProcessor("protocols", {"enabled": ["http"]}, sink)
    rx = EbpfReceiver("ebpf", EbpfConfig(ports=[checkout.port, plain.port]), stage)
    try:
        cg.add(plain.pid)
        rx.start()
        curl = shutil.which("curl") or "curl"
        subprocess.run([curl, "-s", f"http://127.0.0.1:{checkout.port}/pay", f"http://127.0.0.1:{plain.port}/x"],
                       check=True, capture_output=True, timeout=30)
        assert wait_until(lambda: len(sink.spans) >= 4, timeout=20), [s.name for s in sink.spans]
    finally:
        rx.shutdown()
        stage.shutdown()
        checkout.stop()
        plain.stop()
        cg.remove()
    by_pid: dict[Any, list[Any]] = {}
    for s in sink.spans:
        by_pid.setdefault(s.resource.attributes.get("process.pid"), []).append(s)
    srv = by_pid[checkout.pid][0].resource.attributes
    assert srv["service.name"] == "checkout" and srv["service.version"] == "2.1"
    assert srv["process.command_line"].endswith(f" {checkout.port}") and srv["process.owner"] == "root"
    assert srv["process.executable.path"] == os.path.realpath(sys.executable) and "container.id" not in srv
    other = by_pid[plain.pid][0].resource.attributes
    assert other["service.name"] == os.path.basename(sys.executable)[:15]  # the comm: no env, no unit
    assert other["container.id"] == CID and other["container.runtime"] == "docker"
    clients = [s for s in sink.spans if s.resource.attributes.get("process.executable.name") == "curl"]
    assert len(clients) == 2 and all(s.resource.attributes["service.name"] == "curl" for s in clients)
    assert {s.resource.attributes["host.name"] for s in sink.spans} == {os.uname().nodename}


# -- captures: the server names the host --------------------------------------------------------
@pytest.fixture(scope="module")
def remote_capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bench.gen_http_capture import generate
    p = tmp_path_factory.mktemp("cap") / "remote.pcap"
    generate(str(p), connections=3, requests=5)
    return p


@pytest.mark.parametrize("hosts", [None, {"10.2.0.0/24": "shop-web"}, {"10.2.0.1": "web-1"}])
def test_capture_host_name_is_the_servers(remote_capture: Path, tmp_path: Path, hosts: dict | None) -> None:
    out = tmp_path / "o.jsonl"
    cmd = [sys.executable, "-m", "service.cli", "replay", str(remote_capture), "--output", str(out)]
    if hosts:
        cmd += ["--set", "processors.protocols.hosts=" + json.dumps(hosts)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    spans = WirespanRun(None, out, out).read_spans()  # type: ignore[arg-type]
    assert len(spans) == 15
    want = next(iter(hosts.values())) if hosts else "10.2.0.1"
    assert {s["resource"]["host.name"] for s in spans} == {want}
    assert {s["resource"]["service.name"] for s in spans} == {want if hosts else "unknown_service"}


def test_loopback_capture_keeps_the_local_host_name(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    r = subprocess.run([sys.executable, "-m", "service.cli", "replay", str(ROOT / "config/samples/http-sample.pcap"),
                        "--output", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    spans = WirespanRun(None, out, out).read_spans()  # type: ignore[arg-type]
    assert spans and {s["resource"]["host.name"] for s in spans} == {os.uname().nodename}
