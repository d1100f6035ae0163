"""Who is who: resource attributes for the spans of a traced process, and names for a capture's hosts.

Contract. ``ProcessMetadata.get(pid, comm)`` gives a ``ProcessInfo`` for a process the eBPF
receiver saw (its pid is on each record), as OBI/Beyla give them:

- ``service.name`` from the process's ``OTEL_SERVICE_NAME``, else the ``service.name`` in its
  ``OTEL_RESOURCE_ATTRIBUTES`` (read from ``/proc/PID/environ``: only the two ``OTEL_*``
  variables are kept, never the rest of the environment), else Kubernetes (the pod's
  ``app.kubernetes.io/name`` label, its deployment, statefulset, daemonset or job, then the
  container's name), else the systemd unit (``nginx.service`` -> ``nginx``); ``None`` when none
  says, and the protocols stage falls back to the process's name (``ProcessInfo.name``).
- ``process.pid``, ``process.parent_pid``, ``process.executable.name`` (the process's name,
  ``/proc/PID/comm``: the main thread's ``comm``, what it was exec'd as, ``python3`` rather than
  the symlink's target ``python3.11``; a record's ``comm`` is its thread's, which a JVM or a Go
  runtime renames, ``http-nio-8080-e``), ``process.executable.path`` (``/proc/PID/exe``'s target),
  ``process.command_line`` (``/proc/PID/cmdline``, at most 4 KiB), ``process.owner`` (the real
  uid's user name), ``container.id`` and ``container.runtime`` from the cgroup path (docker,
  containerd, cri-o, podman, cgroup v1 and v2: ``parse_cgroup``), and every other attribute of
  ``OTEL_RESOURCE_ATTRIBUTES`` (``service.version``, ``deployment.environment.name`` ...).
- ``k8s.pod.name``, ``k8s.pod.uid``, ``k8s.namespace.name``, ``k8s.node.name``,
  ``k8s.container.name`` and the owner (``k8s.deployment.name``, ``k8s.replicaset.name``,
  ``k8s.statefulset.name``, ``k8s.daemonset.name``, ``k8s.job.name``) when running in a cluster
  (``KubernetesMetadata``: the node's pods from the API server, or from the kubelet's ``/pods``,
  with the ``kubernetes`` client; matched by container id, else by the pod uid of the cgroup path).

Cached per pid, bounded (``max_processes``, least recently used out), and invalidated on exec
and exit: the eBPF receiver calls ``process_changed(pid)`` on its EXEC records and for pids whose
connections it closes because the process is gone; without those, a cached entry is checked
against ``/proc/PID/stat``'s start time and ``/proc/PID/exe`` at most every ``revalidate``
seconds (a pid reused, a process that exec'd; a record's ``comm`` is no sign: threads rename
themselves). A record whose ``comm`` is neither ``/proc/PID/comm`` nor one of its threads' (the
process is gone and the pid another's, or the events are simulated) gets the pid and that comm
only (``comm_mismatch``), never another process's environment, and is looked at again later.
The pids are the kernel's (root pid namespace): a wirespan in a child pid namespace
(a container without ``hostPID``: ``NSpid`` in /proc/self/status has several entries) would read
other processes of those numbers, so it reads nothing and gives the pid and the record's comm
only, with one warning. Kubernetes metadata is fetched in a background thread (the
pipeline never waits on the network): a container the index does not know asks for a refresh,
at most every ``min_refresh`` seconds, and its first connections may go without ``k8s.*``.

``HostNames`` names a capture's hosts: for spans from captures (no pid), ``host.name`` is not the
replaying machine's but the server's, from a configured map (``hosts: {10.0.0.5: db-1}``,
addresses or CIDR networks), else the server's address (a loopback server is this machine).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import pwd
import re
import threading
import time
import urllib.parse
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["CgroupInfo", "HostNames", "KubernetesConfig", "KubernetesMetadata", "ProcessInfo", "ProcessMetadata",
           "ResourceDetectionConfig", "parse_cgroup", "parse_resource_attributes", "process_changed"]

log = logging.getLogger("wirespan.resource_detect")

#: Processes whose metadata is kept (LRU beyond): a busy node runs a few thousand.
MAX_PROCESSES = 4096
#: Seconds between checks that a cached pid is still the same process image.
REVALIDATE_S = 5.0
#: Bytes of /proc/PID/environ read (Linux caps an argument+environment block near 2 MiB; the
#: OTEL_* variables of a real service come early, and a runaway environment costs no more than this).
MAX_ENVIRON_BYTES = 256 << 10
#: process.command_line beyond this is cut (a JVM's class path runs to tens of KB).
MAX_COMMAND_LINE = 4096
#: OTEL_RESOURCE_ATTRIBUTES entries kept, and each value's length (a resource is sent with every batch).
MAX_ENV_ATTRIBUTES = 64
MAX_ENV_VALUE = 1024
#: Pods indexed from one list (a node runs at most ~110 by default; the API allows more).
MAX_PODS = 5000

_HEX64 = r"([0-9a-f]{64})"
# Container ids in cgroup paths, by runtime: systemd-driver scopes (docker-ID.scope,
# cri-containerd-ID.scope, crio-ID.scope, libpod-ID.scope), the cgroupfs driver's
# (/docker/ID, /kubepods/.../podUID/ID, containerd's ...:cri-containerd:ID) and podman's
# /libpod-ID.scope/container. conmon (cri-o's and podman's monitor) is not the container.
_RUNTIME_RES = (
    ("docker", re.compile(r"(?:^|/)docker[-/]" + _HEX64 + r"(?:\.scope)?(?:/|$)")),
    ("containerd", re.compile(r"cri-containerd[-:]" + _HEX64 + r"(?:\.scope)?(?:/|$)")),
    ("cri-o", re.compile(r"(?:^|/)crio-" + _HEX64 + r"(?:\.scope)?(?:/|$)")),
    ("podman", re.compile(r"(?:^|/)libpod-" + _HEX64 + r"(?:\.scope)?(?:/|$)")),
    ("containerd", re.compile(r"(?:^|/)containerd/" + _HEX64 + r"(?:/|$)")),
)
_BARE_ID = re.compile(r"/" + _HEX64 + r"(?:/|$)")  # /kubepods/burstable/pod<uid>/<id>: runtime unknown
_CONMON = re.compile(r"(?:crio|libpod)-conmon-[0-9a-f]{64}")
_POD_UID = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")
_UNIT = re.compile(r"^([^/]+)\.service$")


@dataclass(frozen=True)
class CgroupInfo:
    """What a process's cgroup path says about it."""

    container_id: str | None = None
    runtime: str | None = None
    pod_uid: str | None = None
    unit: str | None = None


def parse_cgroup(text: str) -> CgroupInfo:
    """The container id, runtime, pod uid and systemd unit in ``/proc/PID/cgroup``'s text.

    Lines are ``hierarchy-id:controllers:path``; the cgroup v2 line (``0::``) is read first,
    then the v1 ones (a hybrid host's v2 tree may be ``/`` while v1 names the container).
    """
    paths: list[str] = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            paths.insert(0, parts[2])
        else:
            paths.append(parts[2])
    cid = runtime = pod = unit = None
    for path in paths:
        if cid is None and not _CONMON.search(path):
            for name, rx in _RUNTIME_RES:
                m = rx.search(path)
                if m:
                    cid, runtime = m.group(1), name
                    break
            else:
                m = _BARE_ID.search(path)
                if m:
                    cid = m.group(1)
        if pod is None:
            m = _POD_UID.search(path)
            if m:
                pod = m.group(1).replace("_", "-")
        if unit is None:
            for comp in reversed(path.split("/")):
                m = _UNIT.match(comp)
                if m and not comp.startswith("user@"):  # user@0.service is a user's manager, not a service
                    unit = m.group(1)
                    break
    if cid is not None and unit in ("docker", "containerd", "crio", "podman"):
        unit = None  # the runtime's own unit holds the container (cgroupfs under a systemd host)
    return CgroupInfo(cid, runtime, pod, unit)


def parse_resource_attributes(value: str) -> dict[str, str]:
    """``OTEL_RESOURCE_ATTRIBUTES`` (``key1=value1,key2=value2``, values percent-encoded, as the
    OpenTelemetry SDK specification says); entries that are not ``key=value`` are skipped."""
    out: dict[str, str] = {}
    for item in value.split(","):
        k, sep, v = item.partition("=")
        k = k.strip()
        if not sep or not k:
            continue
        out[k] = urllib.parse.unquote(v.strip())[:MAX_ENV_VALUE]
        if len(out) >= MAX_ENV_ATTRIBUTES:
            break
    return out


class KubernetesConfig(BaseModel):
    """Pod metadata for the traced processes (``ProcessMetadata``)."""

    model_config = ConfigDict(extra="forbid")

    #: "auto": on when running in a cluster (``KUBERNETES_SERVICE_HOST`` set, as kubelet sets it in
    #: every pod); true: on (``url`` then needed outside a cluster); false: off.
    enabled: bool | Literal["auto"] = "auto"
    #: Where the node's pods come from: the API server (``GET /api/v1/pods?fieldSelector=spec.nodeName=N``)
    #: or the node's kubelet (``GET /pods``).
    source: Literal["api_server", "kubelet"] = "api_server"
    #: The API server's or kubelet's URL (default: in a cluster, the API server of
    #: ``KUBERNETES_SERVICE_HOST``/``_PORT``; for the kubelet ``https://$NODE_NAME:10250``).
    url: str | None = None
    #: This node's name (k8s.node.name; the pods listed); default: ``$NODE_NAME`` (the downward API).
    node_name: str | None = None
    #: A bearer token file (default: the pod's service account token).
    token_file: str | None = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    #: A CA bundle for the server's certificate (default: the service account's ``ca.crt``).
    ca_file: str | None = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    #: Skip verifying the server's certificate (a kubelet's self-signed one).
    insecure_skip_verify: bool = False
    #: Seconds between two lists of the node's pods.
    refresh: float = Field(30.0, gt=0)
    #: Seconds at least between two lists asked for by an unknown container.
    min_refresh: float = Field(5.0, ge=0)
    #: Seconds one list may take.
    timeout: float = Field(10.0, gt=0)

    def active(self) -> bool:
        if self.enabled == "auto":
            return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
        return bool(self.enabled)


class ResourceDetectionConfig(BaseModel):
    """The protocols stage's ``resource_detection`` block (eBPF spans' process resource)."""

    model_config = ConfigDict(extra="forbid")

    #: Read each traced process's environment, command line, owner and cgroup.
    process: bool = True
    #: Processes whose metadata is cached (least recently used out).
    max_processes: int = Field(MAX_PROCESSES, ge=1)
    #: Seconds between checks that a cached pid is still the same process (start time, executable).
    revalidate: float = Field(REVALIDATE_S, gt=0)
    #: Kubernetes pod metadata (off outside a cluster unless configured).
    kubernetes: KubernetesConfig = KubernetesConfig()

    @field_validator("revalidate", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        from processors.protocols.processor import parse_duration
        return parse_duration(v)


# --------------------------------------------------------------------------------- Kubernetes
def _owner_attrs(pod: dict[str, Any]) -> dict[str, str]:
    """The pod's controller as k8s.<kind>.name; a ReplicaSet made by a Deployment (its name is the
    deployment's plus ``-<pod-template-hash>``) names the deployment too, without asking for it."""
    meta = pod.get("metadata") or {}
    out: dict[str, str] = {}
    for ref in meta.get("ownerReferences") or ():
        kind, name = ref.get("kind"), ref.get("name")
        if not name or not ref.get("controller", True):
            continue
        if kind == "ReplicaSet":
            out["k8s.replicaset.name"] = name
            h = (meta.get("labels") or {}).get("pod-template-hash")
            if h and name.endswith("-" + h):
                out["k8s.deployment.name"] = name[: -len(h) - 1]
        elif kind in ("StatefulSet", "DaemonSet", "Job"):
            out[f"k8s.{kind.lower()}.name"] = name
    return out


def _service_from_pod(attrs: dict[str, str], labels: dict[str, str]) -> str | None:
    """As the OpenTelemetry Operator and Beyla name a pod's service: its app.kubernetes.io/name
    label, else its controller, else its container."""
    for v in (labels.get("app.kubernetes.io/name"), attrs.get("k8s.deployment.name"),
              attrs.get("k8s.statefulset.name"), attrs.get("k8s.daemonset.name"), attrs.get("k8s.job.name"),
              attrs.get("k8s.container.name")):
        if v:
            return v
    return None


def index_pods(pod_list: dict[str, Any], node_name: str | None = None) -> tuple[dict, dict]:
    """``{container id: (attrs, service)}`` and ``{pod uid: (attrs, service)}`` of a PodList."""
    by_cid: dict[str, tuple[dict[str, str], str | None]] = {}
    by_uid: dict[str, tuple[dict[str, str], str | None]] = {}
    for pod in (pod_list.get("items") or ())[:MAX_PODS]:
        meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
        base = {"k8s.pod.name": meta.get("name", ""), "k8s.namespace.name": meta.get("namespace", ""),
                "k8s.pod.uid": meta.get("uid", "")}
        node = spec.get("nodeName") or node_name
        if node:
            base["k8s.node.name"] = node
        base.update(_owner_attrs(pod))
        base = {k: v for k, v in base.items() if v}
        labels = meta.get("labels") or {}
        if meta.get("uid"):
            by_uid[meta["uid"]] = (base, _service_from_pod(base, labels))
        for key in ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses"):
            for cs in status.get(key) or ():
                cid = (cs.get("containerID") or "").rpartition("://")[2]
                if cid:
                    a = {**base, "k8s.container.name": cs.get("name", "")}
                    by_cid[cid] = (a, _service_from_pod(a, labels))
    return by_cid, by_uid


class KubernetesMetadata:
    """The node's pods, listed with the ``kubernetes`` client in a background thread."""

    def __init__(self, config: KubernetesConfig) -> None:
        self.config = config
        self.node_name = config.node_name or os.environ.get("NODE_NAME") or None
        self._by_cid: dict[str, tuple[dict[str, str], str | None]] = {}
        self._by_uid: dict[str, tuple[dict[str, str], str | None]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._last = 0.0
        self.lists = 0      # successful lists (tests, debugging)
        self.errors = 0
        self.last_error = ""
        self._api: Any = None
        self._thread: threading.Thread | None = None

    def _client(self) -> Any:
        from kubernetes import client  # imported only when on: the client costs ~0.5 s to import
        c = self.config
        url = c.url
        if url is None:
            if c.source == "kubelet":
                url = f"https://{self.node_name or 'localhost'}:10250"
            else:
                host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
                if not host:
                    raise ValueError("kubernetes: no url configured and not in a cluster (KUBERNETES_SERVICE_HOST)")
                url = f"https://{host}:{port}" if ":" not in host else f"https://[{host}]:{port}"
        cfg = client.Configuration(host=url.rstrip("/"))
        if c.token_file and os.path.exists(c.token_file):
            with open(c.token_file) as f:
                cfg.api_key = {"BearerToken": f.read().strip()}
            cfg.api_key_prefix = {"BearerToken": "Bearer"}
        if c.ca_file and os.path.exists(c.ca_file):
            cfg.ssl_ca_cert = c.ca_file
        cfg.verify_ssl = not c.insecure_skip_verify
        return client.ApiClient(cfg)

    def list_now(self) -> None:
        """List the node's pods once, in the calling thread (the background thread's step)."""
        from kubernetes import client
        if self._api is None:
            self._api = self._client()
        api = self._api
        if self.config.source == "kubelet":
            headers = {"Accept": "application/json"}
            auth = api.configuration.auth_settings().get("BearerToken")
            if auth:
                headers["Authorization"] = auth["value"]
            resp = api.call_api("GET", api.configuration.host + "/pods", header_params=headers,
                                _request_timeout=self.config.timeout)
            data = resp.read()
            if resp.status != 200:
                raise OSError(f"kubelet /pods: HTTP {resp.status}")
        else:
            sel = f"spec.nodeName={self.node_name}" if self.node_name else None
            resp = client.CoreV1Api(api).list_pod_for_all_namespaces_without_preload_content(
                field_selector=sel, _request_timeout=self.config.timeout) \
                if hasattr(client.CoreV1Api, "list_pod_for_all_namespaces_without_preload_content") else \
                client.CoreV1Api(api).list_pod_for_all_namespaces(field_selector=sel, _preload_content=False,
                                                                   _request_timeout=self.config.timeout)
            data = resp.read() if hasattr(resp, "read") else resp.data
            if getattr(resp, "status", 200) != 200:
                raise OSError(f"API server pods list: HTTP {resp.status}")
        by_cid, by_uid = index_pods(json.loads(data), self.node_name)
        self._by_cid, self._by_uid = by_cid, by_uid  # swapped whole: readers never see half an index
        self.lists += 1

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="wirespan-k8s-metadata", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._last = time.monotonic()
            try:
                self.list_now()
            except Exception as e:  # a network or auth problem: logged once per kind, retried
                self.errors += 1
                msg = f"{e.__class__.__name__}: {e}"[:300]
                if msg != self.last_error:
                    log.warning("kubernetes metadata: listing the node's pods failed: %s", msg)
                self.last_error = msg
            self._wake.wait(self.config.refresh)
            self._wake.clear()
            wait = self.config.min_refresh - (time.monotonic() - self._last)
            if wait > 0 and not self._stop.is_set():
                self._stop.wait(wait)

    def lookup(self, container_id: str | None, pod_uid: str | None) -> tuple[dict[str, str], str | None] | None:
        """Pod attributes and service name of a container (or pod); None (and a refresh asked
        for) when the index does not know it yet."""
        if container_id:
            hit = self._by_cid.get(container_id)
            if hit is not None:
                return hit
        if pod_uid:
            hit = self._by_uid.get(pod_uid)
            if hit is not None:
                return hit
        if container_id or pod_uid:
            self._wake.set()
        return None


# ------------------------------------------------------------------------------------ processes
@dataclass
class ProcessInfo:
    """One process's resource attributes (``attributes``) and the service name they give."""

    pid: int
    #: The record's comm (its thread's) at the first lookup; ``name`` is the process's (/proc/PID/comm).
    comm: str | None
    start_time: int | None
    exe: str | None
    attributes: dict[str, Any] = field(default_factory=dict)
    service_name: str | None = None
    cgroup: CgroupInfo = CgroupInfo()
    #: Bumped at each refresh: the protocols stage keys its resources by it.
    generation: int = 0
    checked: float = 0.0
    env_service: str | None = None
    k8s: tuple[dict[str, str], str | None] | None = None
    name: str | None = None
    #: Only the pid and the record's comm: /proc did not show the record's process (re-read later).
    partial: bool = False


def _read(path: str, limit: int = 1 << 16) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError:
        return None


def _start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks after boot): a reused pid has another."""
    b = _read(f"/proc/{pid}/stat", 4096)
    if not b:
        return None
    rest = b[b.rfind(b")") + 2:].split()  # comm may hold spaces and parentheses
    try:
        return int(rest[19])
    except (IndexError, ValueError):
        return None


#: Threads looked at for a record's comm (a JVM runs hundreds; the scan is once a process).
MAX_THREADS_SCANNED = 4096


def _has_thread(pid: int, comm: str) -> bool:
    """A thread of ``pid`` named ``comm`` (a record's comm is its thread's, which may be renamed)."""
    want = comm.encode()
    try:
        with os.scandir(f"/proc/{pid}/task") as it:
            for k, t in enumerate(it):
                if k >= MAX_THREADS_SCANNED:
                    break
                if (_read(f"/proc/{pid}/task/{t.name}/comm", 64) or b"").rstrip(b"\n") == want:
                    return True
    except OSError:
        pass
    return False


def _in_root_pid_namespace() -> bool:
    """True unless /proc/self/status's NSpid lists this process in nested pid namespaces."""
    b = _read("/proc/self/status", 8192) or b""
    for line in b.split(b"\n"):
        if line.startswith(b"NSpid:"):
            return len(line.split()) <= 2
    return True  # kernels before 4.1 have no NSpid line: assume the host's /proc


def _exe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


_users: dict[int, str] = {}


def _user(uid: int) -> str:
    """A uid's user name, remembered (getpwuid reads /etc/passwd each time: most of a cold lookup)."""
    name = _users.get(uid)
    if name is None:
        name = pwd.getpwuid(uid).pw_name  # KeyError without a passwd entry: the caller keeps the number
        if len(_users) < 1024:
            _users[uid] = name
    return name


_live: weakref.WeakSet[ProcessMetadata] = weakref.WeakSet()


def process_changed(pid: int) -> None:
    """A process exec'd or exited (the eBPF receiver's hook): every cache forgets it."""
    for m in list(_live):
        m.forget(pid)


class ProcessMetadata:
    """``get(pid, comm)`` -> ``ProcessInfo``, cached (see the module docstring)."""

    def __init__(self, config: ResourceDetectionConfig | None = None, proc_root: str = "/proc") -> None:
        self.config = config or ResourceDetectionConfig()
        self._cache: OrderedDict[int, ProcessInfo] = OrderedDict()
        self._lock = threading.Lock()
        self._gen = 0
        self.k8s: KubernetesMetadata | None = None
        self.stats = {"lookups": 0, "reads": 0, "invalidated": 0, "evicted": 0, "comm_mismatch": 0}
        self.root_pid_namespace = _in_root_pid_namespace()
        if not self.root_pid_namespace:
            log.warning("resource detection: this process is in a child pid namespace (a container without "
                        "hostPID?): the eBPF pids are the host's, so /proc is not read for them")
        if self.config.kubernetes.active():
            self.k8s = KubernetesMetadata(self.config.kubernetes)  # started at the first traced process
        _live.add(self)

    def close(self) -> None:
        if self.k8s is not None:
            self.k8s.stop()

    def forget(self, pid: int) -> None:
        with self._lock:
            if self._cache.pop(pid, None) is not None:
                self.stats["invalidated"] += 1

    def __len__(self) -> int:
        return len(self._cache)

    def get(self, pid: int, comm: str | None = None) -> ProcessInfo:
        """The process's info (read from /proc on first sight, after an exec/exit, or when stale)."""
        now = time.monotonic()
        with self._lock:
            self.stats["lookups"] += 1
            info = self._cache.get(pid)
            if info is not None:
                fresh = True
                if now - info.checked >= self.config.revalidate:
                    fresh = not info.partial and _start_time(pid) == info.start_time and _exe(pid) == info.exe
                    info.checked = now
                if fresh:
                    self._cache.move_to_end(pid)
                    self._k8s_update(info)
                    return info
                self.stats["invalidated"] += 1
            info = self._read(pid, comm, now)
            self._cache[pid] = info
            self._cache.move_to_end(pid)
            while len(self._cache) > self.config.max_processes:
                self._cache.popitem(last=False)
                self.stats["evicted"] += 1
            return info

    def _k8s_update(self, info: ProcessInfo) -> None:
        """Pod metadata that arrived after the process was first seen joins it (a new generation)."""
        cg = info.cgroup
        if self.k8s is None or info.k8s is not None or (cg.container_id is None and cg.pod_uid is None):
            return
        hit = self.k8s.lookup(info.cgroup.container_id, info.cgroup.pod_uid)
        if hit is not None:
            self._apply_k8s(info, hit)
            self._gen += 1
            info.generation = self._gen

    def _apply_k8s(self, info: ProcessInfo, hit: tuple[dict[str, str], str | None]) -> None:
        info.k8s = hit
        for k, v in hit[0].items():
            info.attributes.setdefault(k, v)
        if info.env_service is None and hit[1]:
            info.service_name = hit[1]

    def _read(self, pid: int, comm: str | None, now: float) -> ProcessInfo:
        self.stats["reads"] += 1
        self._gen += 1
        info = ProcessInfo(pid, comm, _start_time(pid), _exe(pid), generation=self._gen, checked=now)
        a: dict[str, Any] = {"process.pid": pid}
        if comm:
            a["process.executable.name"] = comm
        if not self.config.process or not self.root_pid_namespace:
            info.attributes = a
            return info
        name = (_read(f"/proc/{pid}/comm", 64) or b"").rstrip(b"\n").decode(errors="replace")
        if comm and name != comm[:15] and not _has_thread(pid, comm[:15]):
            # Not the process that made the record: it exited and the pid is another's, this /proc
            # is another pid namespace's, or the events are not the kernel's (a simulator). Its
            # environment is no one's business here; asked again after ``revalidate``.
            self.stats["comm_mismatch"] += 1
            info.partial = True
            info.attributes = a
            return info
        if name:
            info.name = name
        status = _read(f"/proc/{pid}/status", 8192) or b""
        for line in status.split(b"\n"):
            if line.startswith(b"PPid:"):
                try:
                    a["process.parent_pid"] = int(line.split()[1])
                except (IndexError, ValueError):
                    pass
            elif line.startswith(b"Uid:"):
                try:
                    a["process.owner"] = _user(int(line.split()[1]))
                except (IndexError, ValueError, KeyError):  # KeyError: a uid without a passwd entry
                    if len(line.split()) > 1:
                        a["process.owner"] = line.split()[1].decode(errors="replace")
        if info.exe:
            exe = info.exe.removesuffix(" (deleted)")
            a["process.executable.path"] = exe
            a.setdefault("process.executable.name", os.path.basename(exe))
        if info.name:
            a["process.executable.name"] = info.name
        cmd = _read(f"/proc/{pid}/cmdline", MAX_COMMAND_LINE + 1)
        if cmd:
            a["process.command_line"] = cmd.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")[
                :MAX_COMMAND_LINE]
        env_service = None
        env = _read(f"/proc/{pid}/environ", MAX_ENVIRON_BYTES) or b""
        res_attrs: dict[str, str] = {}
        for var in env.split(b"\0"):
            if var.startswith(b"OTEL_SERVICE_NAME="):
                env_service = var[18:].decode(errors="replace").strip()[:MAX_ENV_VALUE] or None
            elif var.startswith(b"OTEL_RESOURCE_ATTRIBUTES="):
                res_attrs = parse_resource_attributes(var[25:].decode(errors="replace"))
        if env_service is None:
            env_service = res_attrs.get("service.name") or None
        res_attrs.pop("service.name", None)
        for k, v in res_attrs.items():
            a.setdefault(k, v)
        cg = parse_cgroup((_read(f"/proc/{pid}/cgroup") or b"").decode(errors="replace"))
        info.cgroup = cg
        if cg.container_id:
            a["container.id"] = cg.container_id
            if cg.runtime:
                a["container.runtime"] = cg.runtime
        info.attributes = a
        info.env_service = env_service
        info.service_name = env_service
        if self.k8s is not None and (cg.container_id or cg.pod_uid):
            self.k8s.start()  # a replay in a cluster never lists pods: it has no pids
            hit = self.k8s.lookup(cg.container_id, cg.pod_uid)
            if hit is not None:
                self._apply_k8s(info, hit)
        if info.service_name is None and cg.unit:
            info.service_name = cg.unit
        return info


# ---------------------------------------------------------------------------------- captures
class HostNames:
    """A capture's server addresses to host names: exact addresses first, then networks in order."""

    def __init__(self, hosts: dict[str, str]) -> None:
        self.exact: dict[str, str] = {}
        self.nets: list[tuple[Any, str]] = []
        for k, v in hosts.items():
            if "/" in k:
                self.nets.append((ipaddress.ip_network(k, strict=False), v))
            else:
                self.exact[str(ipaddress.ip_address(k))] = v

    def name_of(self, addr: str) -> str | None:
        """The configured name of ``addr``, or None."""
        hit = self.exact.get(addr)
        if hit is not None or not self.nets:
            return hit
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return None
        for net, name in self.nets:
            if ip.version == net.version and ip in net:
                return name
        return None

    @staticmethod
    def is_local(addr: str) -> bool:
        """A loopback server is this machine: its host.name stays the local one.

        Asked once a connection: the answers are kept (bounded), since parsing the address
        costs more than the rest of a small connection's setup (issue 21)."""
        hit = _LOCAL.get(addr)
        if hit is None:
            try:
                hit = ipaddress.ip_address(addr).is_loopback
            except ValueError:
                hit = False
            if len(_LOCAL) >= 4096:
                _LOCAL.clear()
            _LOCAL[addr] = hit
        return hit


#: ``HostNames.is_local``'s answers by address.
_LOCAL: dict[str, bool] = {}
