"""Trace assembly: which request a call was made for, without help from the application.

Spans from eBPF are per process (base.Perspective): the server process's SERVER span of a
request, and the CLIENT/PRODUCER/CONSUMER spans of the calls it made while serving it. This
module joins them into one trace per request, for every protocol the stage parses, by
watching when requests begin and end, not what they carry:

- **A request's context is decided when the request is parsed.** Every protocol keeps its
  requests awaiting an answer in a ``PendingQueue``/``PendingMap`` (base.py); adding one
  calls ``open`` here and removing it ``close``. So a SERVER span's trace and span ids exist
  from the moment its request was read, and the calls made while serving it take them as
  their parent at once: nothing is held back, no span waits for another.
- **Nesting in a process (eBPF).** A call (a request the traced process sends) whose thread
  (tid) has exactly one SERVER request open becomes that request's child: exact for
  thread-per-request servers (a thread serves one request at a time). A thread with several
  open (an event loop: asyncio, Node.js) is ambiguous, and so is a thread with none while
  other threads of the process serve requests (a worker pool, goroutines moving between
  threads): such calls stay roots and are counted in
  ``wirespan_trace_unattributed_spans{reason}`` (``concurrent_requests``,
  ``request_on_other_thread``). A wrong parent is worse than none. A call that outlives its
  request (a background task it started) keeps the request as its parent: it was made for it.
  Pooled connections nest per call, since the rule looks at the calling thread, not the
  connection.
- **Linking processes (eBPF).** When both ends of a TCP connection are traced, the callee's
  SERVER span becomes the child of the caller's CLIENT span: the caller's requests on the
  connection are queued by 4-tuple and direction, and the callee's requests take them in
  order (TCP delivers them in the order they were sent, so both sides parse the same
  sequence). A queued request that started after the callee's, or that was already answered
  before the callee read it, is not its match (one side missed a request): it is skipped and
  counted (``order_mismatch``). A gap in either direction ends linking on that 4-tuple.
- **Captures (``assemble: true``).** No processes or threads: a host's outbound calls that
  start while exactly one inbound request (HTTP, gRPC, FastCGI: the protocols whose spans
  are the server's) is open on that host, and end before it does, become its children
  (``ambiguous_host``, ``outlived_request`` otherwise).
- **The wire's context wins.** A valid ``traceparent`` the request carries decides its trace
  and parent, exactly as without assembly; an assembled parent that disagrees is dropped and
  counted (``wirespan_trace_context_conflicts``).

State is bounded: open requests live only as long as their pending entries (which the
stage's budget bounds), and the per-4-tuple queues are an LRU of ``max_links`` keys holding at
most ``MAX_QUEUED_PER_LINK`` requests each; every eviction is counted.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from service.model import new_span_id, new_trace_id, parse_traceparent
from service.telemetry import TRACE_CONFLICTS, TRACE_LINKS, TRACE_UNATTRIBUTED

if TYPE_CHECKING:
    from processors.protocols.base import Conn

__all__ = ["Ctx", "TraceAssembler", "SERVER_STYLE", "MAX_LINKS", "MAX_QUEUED_PER_LINK"]

#: Protocols whose passive span is the server's (design.md §3): their requests are a host's
#: inbound requests in capture assembly.
SERVER_STYLE = frozenset({"http", "http2", "fastcgi"})
#: 4-tuples whose callers' requests are queued for the callee at once (LRU beyond).
MAX_LINKS = 65_536
#: Requests queued per 4-tuple and direction (a caller whose callee is not traced queues
#: every request: the oldest go, counted).
MAX_QUEUED_PER_LINK = 256
#: Callee requests kept per 4-tuple while their caller's request is not seen yet.
MAX_WAITING_PER_LINK = 8
#: Spans built from one request share its context (Kafka: one span per topic); recently
#: closed contexts are kept this long for the span that follows their close.
_RECENT = 16

_SERVER, _CLIENT, _PASSIVE = 2, 1, 0  # base.Perspective values


class Ctx:
    """One request's trace context: decided when the request is parsed, read by its span and
    by the spans of the calls made for it."""

    __slots__ = ("closed", "conn", "entry", "flags", "key", "parent", "parent_id", "resolved", "span_id", "start",
                 "thread", "tp_fn", "trace_id", "uses")

    def __init__(self, conn: Conn, entry: Any, start: int, tp_fn: Callable[[Any], Any] | None) -> None:
        self.conn = conn
        self.entry = entry
        self.start = start
        self.tp_fn = tp_fn
        self.span_id = new_span_id()
        self.trace_id = b""
        self.parent_id = b""
        self.flags = 1
        self.parent: Ctx | None = None  #: the assembled parent (decided at open, or at the span for captures)
        self.resolved = False
        #: Its entry left its store. A caller's request closes when its answer is parsed, and the
        #: ring orders the callee's read of it before that (same thread: read, then answer): a
        #: closed caller request still queued was never seen by the callee.
        self.closed = False
        self.thread: tuple[int, int] | None = None  #: (pid, tid) of a SERVER request registered as serving
        self.key: Any = None  #: host (captures) this inbound request is registered under
        self.uses = 0

    def resolve(self, asm: TraceAssembler) -> Ctx:
        """Fix trace id and parent: the wire's traceparent, else the assembled parent, else new."""
        if self.resolved:
            return self
        self.resolved = True
        tp = self.tp_fn(self.entry) if self.tp_fn is not None else None
        wire = parse_traceparent(tp) if tp else None
        parent = self.parent
        if wire is not None:
            self.trace_id, self.parent_id, self.flags = wire
            if parent is not None:
                p = parent.resolve(asm)
                if p.trace_id != self.trace_id or p.span_id != self.parent_id:
                    asm.count_conflict()
                self.parent = None
        elif parent is not None:
            p = parent.resolve(asm)
            self.trace_id, self.parent_id, self.flags = p.trace_id, p.span_id, p.flags
        else:
            self.trace_id = new_trace_id()
        return self


class _Link:
    """One 4-tuple, shared by the caller's and the callee's view of it (cached on their Conns):
    the caller's requests not yet taken, the callee's requests read before their caller's write
    was seen, and whether a gap made its request order untrustworthy."""

    __slots__ = ("broken", "callers", "key", "users", "waiting")

    def __init__(self, key: Any) -> None:
        self.key = key
        self.callers: deque[Ctx] = deque()
        self.waiting: deque[Ctx] = deque(maxlen=MAX_WAITING_PER_LINK)
        self.broken = False
        self.users = 0  #: Conns holding it: when none is left, a new connection on the 4-tuple starts afresh


class TraceAssembler:
    """The stage's trace assembly state (one per ``protocols`` stage)."""

    def __init__(self, component: str, passive: bool = False, max_links: int = MAX_LINKS) -> None:
        self.component = component
        self.passive = passive
        self.max_links = max_links
        self._threads: dict[tuple[int, int], list[Ctx]] = {}   # (pid, tid) -> open SERVER requests
        self._procs: dict[int, int] = {}                        # pid -> how many are open
        self._hosts: dict[str, list[Ctx]] = {}                  # capture: host -> open inbound requests
        #: 4-tuple -> its _Link (LRU of max_links; both views' Conns hold theirs).
        self._links: OrderedDict[Any, _Link] = OrderedDict()
        #: ``stats`` for the replay summary: linked:<how>, unattributed:<reason>, conflicts.
        self.stats: dict[str, int] = {}
        self._unattr = {}
        self._linked = {}

    # -- counting --------------------------------------------------------------------------
    def _count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    def unattributed(self, reason: str) -> None:
        self._count(f"unattributed:{reason}")
        c = self._unattr.get(reason)
        if c is None:
            c = self._unattr[reason] = TRACE_UNATTRIBUTED.labels(processor=self.component, reason=reason)
        c.inc()

    def linked(self, how: str) -> None:
        self._count(f"linked:{how}")
        c = self._linked.get(how)
        if c is None:
            c = self._linked[how] = TRACE_LINKS.labels(processor=self.component, how=how)
        c.inc()

    def count_conflict(self) -> None:
        self._count("conflicts")
        TRACE_CONFLICTS.labels(processor=self.component).inc()

    # -- requests begin and end --------------------------------------------------------------
    def open(self, conn: Conn, entry: Any, start: int, tp_fn: Callable[[Any], Any] | None) -> Ctx:
        """A request was parsed on ``conn`` (a store took its entry): decide its place."""
        ctx = Ctx(conn, entry, start, tp_fn)
        conn.ctxs[id(entry)] = ctx
        p = conn.perspective
        from_client = conn.req_from_client
        if p == _PASSIVE:
            if self.passive:
                self._open_passive(conn, ctx)
        elif not from_client:
            pass  # a request the server side sends (MQTT delivery, server push): not nested here
        elif p == _SERVER:
            self._open_server(conn, ctx)
        else:
            self._open_client(conn, ctx)
        return ctx

    def _link(self, conn: Conn) -> _Link:
        link = conn.link
        if link is None:
            key = (conn.client_addr, conn.client_port, conn.server_addr, conn.server_port)
            link = self._links.get(key)
            if link is None:
                link = self._links[key] = _Link(key)
                if len(self._links) > self.max_links:
                    _, old = self._links.popitem(last=False)
                    if old.callers:
                        self.unattributed("link_evicted")
            link.users += 1
            conn.link = link
        return link

    def _open_server(self, conn: Conn, ctx: Ctx) -> None:
        tid = conn.tid
        pid = conn.pid
        if tid is not None and pid is not None:
            th = ctx.thread = (pid, tid)
            lst = self._threads.get(th)
            if lst is None:
                self._threads[th] = [ctx]
            else:
                lst.append(ctx)
            self._procs[pid] = self._procs.get(pid, 0) + 1
        link = conn.link or self._link(conn)
        if link.broken:
            return
        q = link.callers
        while q:
            c = q.popleft()
            if c.closed or c.start > ctx.start:
                # The caller's request began after this one was read, or was answered before:
                # not this request's (one side missed one). Skip it, never guess.
                self.unattributed("order_mismatch")
                continue
            ctx.parent = c
            self.linked("process")
            return
        # The ring orders records by when each syscall ended: a caller preempted before its
        # write returned shows up after the callee's read. Wait for it (bounded).
        link.waiting.append(ctx)

    def _open_client(self, conn: Conn, ctx: Ctx) -> None:
        if self._threads or self._procs:  # some process is serving requests: is this call for one?
            pid, tid = conn.pid, conn.tid
            if pid is not None and tid is not None:
                open_ = self._threads.get((pid, tid))
                if open_:
                    if len(open_) == 1:
                        ctx.parent = open_[0]
                        self.linked("thread")
                    else:
                        self.unattributed("concurrent_requests")
                elif self._procs.get(pid):
                    self.unattributed("request_on_other_thread")
        link = conn.link or self._link(conn)
        if link.broken:
            return
        w = link.waiting
        while w:
            s = w.popleft()
            if s.closed or s.start < ctx.start:
                continue  # answered already, or read before this request was sent: not its callee
            if s.resolved:
                self.unattributed("raced")  # its context was given out before the caller was seen
            else:
                s.parent = ctx
                self.linked("process")
            return
        q = link.callers
        q.append(ctx)
        if len(q) > MAX_QUEUED_PER_LINK:
            q.popleft()  # the callee is not traced (or far behind): nobody will take it

    def _open_passive(self, conn: Conn, ctx: Ctx) -> None:
        # As an outbound call of its client host: the one inbound request open there, if one.
        inbound = self._hosts.get(conn.client_addr)
        if inbound:
            cands = [c for c in inbound if c.conn is not conn]
            if len(cands) == 1:
                ctx.parent = cands[0]  # confirmed at the span: it must end inside its parent
            elif cands:
                self.unattributed("ambiguous_host")
        # As an inbound request of its server host.
        if conn.protocol in SERVER_STYLE:
            ctx.key = conn.server_addr
            self._hosts.setdefault(ctx.key, []).append(ctx)

    def close(self, conn: Conn, entry: Any) -> None:
        """The request's entry left its store (answered, evicted, or the session ended)."""
        ctx = conn.ctxs.pop(id(entry), None)
        if ctx is None:
            return
        ctx.closed = True
        self._unregister(ctx)
        conn.recent.append(ctx)

    def _unregister(self, ctx: Ctx) -> None:
        if ctx.thread is not None:
            if _remove(self._threads, ctx.thread, ctx):
                pid = ctx.thread[0]
                n = self._procs.get(pid, 0) - 1
                if n > 0:
                    self._procs[pid] = n
                else:
                    self._procs.pop(pid, None)
            ctx.thread = None
        if ctx.key is not None:
            _remove(self._hosts, ctx.key, ctx)
            ctx.key = None

    def forget(self, conn: Conn) -> None:
        """The connection's session is gone: its open requests close with it."""
        for ctx in list(conn.ctxs.values()):
            ctx.closed = True
            self._unregister(ctx)
        conn.ctxs.clear()
        conn.recent.clear()
        link = conn.link
        if link is not None:
            conn.link = None
            link.users -= 1
            if link.users <= 0 and self._links.get(link.key) is link:
                del self._links[link.key]

    def broken(self, conn: Conn) -> None:
        """Bytes were lost on ``conn``: the request order of its 4-tuple can no longer be trusted."""
        link = conn.link or self._link(conn)
        if not link.broken:
            link.broken = True
            if link.callers or link.waiting:
                self.unattributed("gap")
            link.callers.clear()
            link.waiting.clear()

    # -- spans --------------------------------------------------------------------------------
    def for_span(self, conn: Conn, start_ns: int, end_ns: int) -> tuple[bytes, bytes, bytes, int] | None:
        """(trace id, span id, parent span id, flags) for the span of the request that began at
        ``start_ns`` on ``conn``, or None when no context matches (the span is built as usual)."""
        recent = conn.recent
        ctx = recent[-1] if recent else None  # the usual order: the request's entry left, then its span
        if ctx is None or ctx.start != start_ns:
            ctx = None
            for c in conn.ctxs.values():
                if c.start == start_ns:
                    ctx = c
                    break
            else:
                for c in reversed(recent):
                    if c.start == start_ns:
                        ctx = c
                        break
            if ctx is None:
                return None
        if self.passive and not ctx.resolved and ctx.parent is not None:
            par = ctx.parent
            if par.closed:  # its answer came before this call ended
                ctx.parent = None  # it did not end inside its candidate parent
                self.unattributed("outlived_request")
            else:
                self.linked("host")
        ctx.resolve(self)
        ctx.uses += 1
        if ctx.uses > 1:  # a second span of one request (Kafka topics): a sibling under its parent
            return ctx.trace_id, new_span_id(), ctx.parent_id, ctx.flags
        return ctx.trace_id, ctx.span_id, ctx.parent_id, ctx.flags


def _remove(table: dict[Any, list[Ctx]], key: Any, ctx: Ctx) -> bool:
    """Take ``ctx`` out of ``table[key]`` (dropping an emptied list); whether it was there."""
    lst = table.get(key)
    if lst is None or ctx not in lst:
        return False
    lst.remove(ctx)
    if not lst:
        del table[key]
    return True


def recent_deque() -> deque[Ctx]:
    return deque(maxlen=_RECENT)
