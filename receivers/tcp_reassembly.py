"""Sans-IO TCP stream reassembly: decoded segments in, ordered ``TcpEvent``s out.

Contract: call ``TcpReassembler.segment(src, sport, dst, dport, seq, ack, flags, payload,
ts_ns)`` for each TCP segment in capture order (``payload`` a memoryview, handed on by
reference and never copied; ``src``/``dst`` packed 4/16-byte addresses or strings).
Events accumulate in ``self.events`` (the caller takes and replaces the list); call
``expire(now_ns)`` now and then from live sources (replays are swept by capture time
automatically) and ``finish()`` at end of input. No I/O, no clock, no metrics: the
counters (``drops``, ``gaps``, ``evictions``, ``stats``) are plain dicts the receiver
publishes. Shared by the ``pcap`` and AF_PACKET ``live`` receivers.

Per connection and direction it emits: OPEN at a SYN (or SYN-ACK when the SYN was
missed), DATA for in-order payload, GAP (``gap`` = bytes that will never come, so the
parser resyncs) when a hole is known to be lost, CLOSE when the FIN is reached in order,
RESET at an RST (one event, sent by the RST's sender, ending the connection).

Policies (named so they can be compared with Suricata's and Zeek's):
- Overlaps: **first-seen wins** (Suricata's ``first``/BSD policy for our purpose): bytes
  already delivered are never re-delivered, and an out-of-order segment overlapping
  buffered data only contributes the bytes not yet buffered.
- A hole is declared lost (GAP) when the peer ACKs beyond it ("ack above hole": the
  receiver got bytes the capture missed, they will not be retransmitted), when the
  buffered out-of-order bytes pass the per-connection or total limit, at RST, at idle
  expiry or eviction, and at ``finish()``.
- No SYN seen (capture started mid-connection): each direction starts at the first
  sequence number seen carrying payload; ``client_is_src`` stays None.
- Port reuse: a SYN with a new ISN on a known 4-tuple ends the old incarnation (CLOSE
  of its open directions, counted as eviction ``port_reuse``) and opens a new one with a
  new ``conn_id``. A connection whose two directions both closed is forgotten at once.
- Sequence numbers compare modulo 2^32 (RFC 9293 §3.4), so streams wrap.
- Across directions, **causality**: a segment whose ACK acknowledges peer bytes the capture
  has not shown yet is held (with what follows it in its direction) until those bytes come,
  so a request merged into a capture after its answer (two interfaces, a tap's two ports,
  a reordering mirror) is still handed on first. The hold ends when the peer's bytes
  arrive, or are known lost (a hole in the peer's stream: ``ack_above_hole``), or at
  ``HOLD_MAX_SEGMENTS``/``HOLD_MAX_BYTES``, a RST, expiry and the end of input
  (``reorder_hold``: the missing peer bytes become a GAP). Counted in ``stats``:
  ``reorder_held`` (segments held), ``reorder_fixed`` (holds ended by the peer's bytes).
- Idle expiry and eviction (LRU when ``max_connections`` is reached) flush what is
  buffered (GAP first), then CLOSE each open direction so the protocol stage frees its
  state; both are counted in ``evictions`` by reason.
"""

from __future__ import annotations

import itertools
import socket
from bisect import insort
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from service import speedups
from service.model import EventKind, TcpEvent

__all__ = ["ReassemblyLimits", "TcpReassembler", "DEFAULT_LIMITS"]

_MASK = 0xFFFFFFFF
_HALF = 0x80000000
_FIN, _SYN, _RST, _ACK = 0x01, 0x02, 0x04, 0x10
_DATA, _GAP, _CLOSE, _RESET, _OPEN = EventKind.DATA, EventKind.GAP, EventKind.CLOSE, EventKind.RESET, EventKind.OPEN

#: Largest forward jump accepted for an out-of-order segment: the largest TCP window
#: (65535 << 14, RFC 7323 §2.3). Beyond it the segment cannot belong to this stream.
MAX_WINDOW = 65535 << 14
#: A hold (module docstring) waits for at most this many segments or bytes of its
#: direction, and for acknowledged peer bytes at most ``HOLD_AHEAD`` beyond what was seen.
HOLD_MAX_SEGMENTS = 64
HOLD_MAX_BYTES = 256 << 10
HOLD_AHEAD = 1 << 20
#: Capture-time interval between idle sweeps.
SWEEP_INTERVAL_NS = 1_000_000_000

# Process-wide, so connection ids from several reassemblers (two pcap receivers feeding
# one protocols stage) never collide.
_conn_ids = itertools.count(1)


@dataclass(frozen=True)
class ReassemblyLimits:
    """Bounds on reassembly state (defaults follow Zeek/Suricata practice)."""

    #: Tracked connections before the least recently used is evicted (Suricata's flow memcap
    #: default holds ~65k flows).
    max_connections: int = 65536
    #: Out-of-order bytes buffered per connection (both directions) before holes are declared lost.
    max_buffered_bytes_per_connection: int = 1 << 20
    #: Out-of-order bytes buffered in total (Suricata's stream.reassembly.memcap default is 256 MiB;
    #: we hold views into the capture, so this bounds pinned memory, not copies).
    max_buffered_bytes_total: int = 64 << 20
    #: Seconds without a packet before a connection is expired (Zeek tcp_inactivity_timeout = 5 min).
    idle_timeout: float = 300.0


DEFAULT_LIMITS = ReassemblyLimits()


def _addr_str(a: Any) -> str:
    if isinstance(a, str):
        return a
    return socket.inet_ntop(socket.AF_INET if len(a) == 4 else socket.AF_INET6, bytes(a))


class _Half:
    """One direction: the sender is ``src``."""

    __slots__ = ("buffered", "closed", "conn", "delivered", "dport", "dst", "fin_at", "held", "held_ack",
                 "is_client", "key", "next_seq", "peer", "segs", "sport", "src")

    def __init__(self, conn: _Conn, key: tuple, src: str, sport: int, dst: str, dport: int,
                 is_client: bool | None) -> None:
        self.conn = conn
        self.key = key
        self.src, self.sport, self.dst, self.dport = src, sport, dst, dport
        self.is_client = is_client
        self.next_seq: int | None = None  # next expected sequence number (mod 2^32)
        self.delivered = 0                # absolute stream offset of next_seq (no wrap)
        self.segs: list[tuple] | None = None  # sorted (start, end, view, ts) out-of-order pieces
        self.buffered = 0
        self.fin_at: int | None = None    # absolute offset of the FIN once seen
        self.closed = False
        self.peer: _Half = None  # type: ignore[assignment]
        #: Segments held for the peer's acknowledged bytes (seq, ack, flags, payload, ts), in order.
        self.held: list[tuple] | None = None
        self.held_ack = 0  # the highest ACK among them


#: The peer of a forgotten connection's halves: closed, nothing buffered, no FIN pending.
_GONE = _Half(None, (), "", 0, "", 0, None)  # type: ignore[arg-type]
_GONE.closed = True
_GONE.peer = _GONE


class _Conn:
    __slots__ = ("a", "b", "buffered", "id", "last_ts", "syn_isn")

    def __init__(self, cid: int, ts: int) -> None:
        self.id = cid
        self.last_ts = ts
        self.syn_isn: int | None = None
        self.buffered = 0
        self.a: _Half = None  # type: ignore[assignment]
        self.b: _Half = None  # type: ignore[assignment]


class TcpReassembler:
    """Per-connection, per-direction ordered byte streams from TCP segments."""

    def __init__(self, limits: ReassemblyLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self.events: list[TcpEvent] = []
        self._halves: dict[tuple, _Half] = {}
        self._lru: OrderedDict[int, _Conn] = OrderedDict()
        self._touch = self._lru.move_to_end  # LRU order = last packet order (idle sweep relies on it)
        self._addr_cache: dict[Any, str] = {}
        self._idle_ns = int(limits.idle_timeout * 1e9)
        self._next_sweep = 0
        self.buffered_total = 0
        #: Segments not handed on, by reason (payload-carrying ones; bare ACKs are not drops).
        self.drops: dict[str, int] = {}
        #: Bytes declared lost (sum of GAP events), by why the hole was given up.
        self.gaps: dict[str, int] = {}
        #: Connections ended before their FIN/RST, by reason.
        self.evictions: dict[str, int] = {}
        #: Connections seen; bare ACK/FIN/RST segments of untracked connections (not drops).
        self.stats = {"connections": 0, "ignored": 0}

    # ------------------------------------------------------------------ helpers
    def _count(self, d: dict[str, int], reason: str, n: int = 1) -> None:
        d[reason] = d.get(reason, 0) + n

    def _str(self, a: Any) -> str:
        s = self._addr_cache.get(a)
        if s is None:
            if len(self._addr_cache) > 65536:  # bounded: a scan must not grow it forever
                self._addr_cache.clear()
            s = self._addr_cache[a] = _addr_str(a)
        return s

    def _new_conn(self, src: Any, sport: int, dst: Any, dport: int, ts: int,
                  client_is_src: bool | None) -> _Half:
        lim = self.limits.max_connections
        while len(self._lru) >= lim and self._lru:
            _, old = self._lru.popitem(last=False)
            self._end(old, "max_connections", ts)
        conn = _Conn(next(_conn_ids), ts)
        s, d = self._str(src), self._str(dst)
        k1, k2 = (src, sport, dst, dport), (dst, dport, src, sport)
        rev = None if client_is_src is None else not client_is_src
        h = _Half(conn, k1, s, sport, d, dport, client_is_src)
        p = _Half(conn, k2, d, dport, s, sport, rev)
        h.peer, p.peer = p, h
        conn.a, conn.b = h, p
        self._halves[k1] = h
        self._halves[k2] = p
        self._lru[conn.id] = conn
        self.stats["connections"] += 1
        return h

    def _emit(self, h: _Half, kind: EventKind, ts: int, payload: memoryview | None = None, gap: int = 0) -> None:
        self.events.append(TcpEvent(kind, h.conn.id, h.src, h.sport, h.dst, h.dport, ts, payload, gap,
                                    h.is_client))

    def _forget(self, conn: _Conn) -> None:
        a, b = conn.a, conn.b
        if a is None:  # forgotten already (a drain that closed both directions, then its caller)
            return
        self._lru.pop(conn.id, None)
        for h in (a, b):
            if self._halves.get(h.key) is h:
                del self._halves[h.key]
            self.buffered_total -= h.buffered
            h.buffered = 0
            h.segs = None
            h.held = None
            # Break the conn <-> halves and half <-> peer cycles, so a connection is freed by its
            # last reference, not by the cyclic GC (which then scans every live connection: with
            # thousands interleaved, that is most of a replay's collector time). A caller still
            # holding a half sees a closed, empty peer.
            h.peer = _GONE
        conn.a = conn.b = None  # type: ignore[assignment]
        conn.buffered = 0

    def _end(self, conn: _Conn, reason: str, ts: int) -> None:
        """End a connection early: flush holes as GAPs, CLOSE open directions, forget it."""
        self._count(self.evictions, reason)
        for h in (conn.a, conn.b):
            if h.held is not None:
                self._release(h, ts, give_up=True)
        if conn.a is None:
            return
        for h in (conn.a, conn.b):
            self._drain(h, reason, ts)
            if not h.closed:
                h.closed = True
                self._emit(h, _CLOSE, ts)
        self._forget(conn)

    # ------------------------------------------------------------------ stream core
    def _deliver_buffered(self, h: _Half) -> None:
        """Hand on buffered pieces that became contiguous, then CLOSE if the FIN is reached."""
        segs = h.segs
        conn = h.conn
        while segs and segs[0][0] <= h.delivered:
            start, end, view, ts = segs.pop(0)
            n = end - start
            h.buffered -= n
            conn.buffered -= n
            self.buffered_total -= n
            if end > h.delivered:
                cut = h.delivered - start
                self._emit(h, _DATA, ts, view[cut:] if cut else view)
                h.next_seq = (h.next_seq + (end - h.delivered)) & _MASK
                h.delivered = end
        if not segs:
            h.segs = None
        self._check_fin(h, conn.last_ts)

    def _check_fin(self, h: _Half, ts: int) -> None:
        if h.fin_at is not None and h.delivered >= h.fin_at and not h.closed:
            h.closed = True
            self._emit(h, _CLOSE, ts)
            if h.peer.closed:
                self._forget(h.conn)

    def _skip_to(self, h: _Half, target: int, reason: str, ts: int) -> None:
        """Declare [delivered, target) lost: one GAP, then deliver what became contiguous."""
        n = target - h.delivered
        if n > 0:
            self._emit(h, _GAP, ts, None, n)
            self._count(self.gaps, reason, n)
            h.next_seq = (h.next_seq + n) & _MASK
            h.delivered = target
        self._deliver_buffered(h)

    def _drain(self, h: _Half, reason: str, ts: int) -> None:
        """Give up every hole of this direction (end of input, RST, expiry)."""
        while h.segs:
            self._skip_to(h, h.segs[0][0], reason, ts)
        if h.fin_at is not None and not h.closed and h.next_seq is not None:
            self._skip_to(h, h.fin_at, reason, ts)

    def _data(self, h: _Half, seq: int, payload: memoryview, ts: int, fin: bool) -> None:
        """The general path: retransmissions, overlaps, out-of-order, FIN."""
        if h.closed:
            if payload:
                self._count(self.drops, "after_close")
            return
        if h.next_seq is None:
            h.next_seq = seq
        d = (seq - h.next_seq) & _MASK
        if d >= _HALF:
            d -= 1 << 32
        n = len(payload)
        if d < 0:
            if d + n <= 0:
                if n:
                    self._count(self.drops, "retransmission")
                if fin and d + n == 0:
                    h.fin_at = h.delivered
                    self._check_fin(h, ts)
                return
            payload = payload[-d:]
            n += d
            d = 0
        if d > MAX_WINDOW:
            self._count(self.drops, "out_of_window")
            return
        start = h.delivered + d
        if fin and h.fin_at is None:
            h.fin_at = start + n
        if d == 0:
            if n:
                self._emit(h, _DATA, ts, payload)
                h.next_seq = (h.next_seq + n) & _MASK
                h.delivered += n
            if h.segs:
                self._deliver_buffered(h)
            else:
                self._check_fin(h, ts)
            return
        if n:
            self._buffer(h, start, payload, ts)
        elif fin:
            pass  # a FIN beyond a hole: waits for the hole (or its loss) like data would

    def _buffer(self, h: _Half, start: int, payload: memoryview, ts: int) -> None:
        end = start + len(payload)
        # First-seen: keep only the parts of the new segment no buffered piece covers.
        pieces = [(start, end)]
        if h.segs:
            for s, e, _v, _t in h.segs:
                if e <= start or s >= end:
                    continue
                nxt = []
                for ps, pe in pieces:
                    if pe <= s or ps >= e:
                        nxt.append((ps, pe))
                        continue
                    if ps < s:
                        nxt.append((ps, s))
                    if pe > e:
                        nxt.append((e, pe))
                pieces = nxt
        if not pieces:
            self._count(self.drops, "retransmission")
            return
        if h.segs is None:
            h.segs = []
        conn = h.conn
        for ps, pe in pieces:
            insort(h.segs, (ps, pe, payload[ps - start:pe - start], ts), key=_seg_start)
            n = pe - ps
            h.buffered += n
            conn.buffered += n
            self.buffered_total += n
        lim = self.limits
        if conn.buffered > lim.max_buffered_bytes_per_connection:
            reason = "buffer_limit_connection"
        elif self.buffered_total > lim.max_buffered_bytes_total:
            reason = "buffer_limit_total"
        else:
            return
        # Give up holes oldest-first until back under the limit (or nothing is buffered).
        while h.segs and (conn.buffered > lim.max_buffered_bytes_per_connection
                          or self.buffered_total > lim.max_buffered_bytes_total):
            self._skip_to(h, h.segs[0][0], reason, ts)
        other = h.peer
        while other.segs and conn.buffered > lim.max_buffered_bytes_per_connection:
            self._skip_to(other, other.segs[0][0], reason, ts)

    def _ack_gap(self, h: _Half, ack: int, ts: int) -> None:
        """``ack`` (sent by h's peer) acknowledges h's bytes: holes below it are lost for good."""
        if h.next_seq is None:
            return
        d = (ack - h.next_seq) & _MASK
        if d == 0 or d >= _HALF:
            return
        acked = h.delivered + d
        while h.segs and h.segs[0][0] <= acked:
            self._skip_to(h, h.segs[0][0], "ack_above_hole", ts)
        if h.fin_at is not None and not h.closed and h.fin_at <= acked:
            self._skip_to(h, h.fin_at, "ack_above_hole", ts)  # a FIN beyond a hole, acknowledged

    # ------------------------------------------------------------------ API
    def segment(self, src: Any, sport: int, dst: Any, dport: int, seq: int, ack: int, flags: int,
                payload: memoryview, ts: int) -> None:
        """Feed one TCP segment (capture order). Never raises on odd input."""
        if ts >= self._next_sweep:
            self._sweep(ts)
        h = self._halves.get((src, sport, dst, dport))
        if h is None or flags & 0x07:
            self._slow(h, src, sport, dst, dport, seq, ack, flags, payload, ts)
            return
        # Fast path: established connection, no SYN/FIN/RST.
        conn = h.conn
        conn.last_ts = ts
        self._touch(conn.id)
        if payload:
            p = h.peer
            if h.held is not None or (flags & _ACK and p.next_seq is not None and self._ahead(p, ack)):
                self._hold(h, seq, ack, flags, payload, ts)
                return
            if seq == h.next_seq and h.segs is None and not h.closed:
                n = len(payload)
                self.events.append(TcpEvent(_DATA, conn.id, h.src, h.sport, h.dst, h.dport, ts, payload, 0,
                                            h.is_client))
                h.next_seq = (seq + n) & _MASK
                h.delivered += n
            else:
                self._data(h, seq, payload, ts, False)
        if flags & _ACK:
            p = h.peer
            if p.segs or (p.fin_at is not None and not p.closed):
                self._ack_gap(p, ack, ts)
        if h.peer.held is not None:
            self._release(h.peer, ts)

    # ------------------------------------------------------------------ holds (causality)
    @staticmethod
    def _ahead(p: _Half, ack: int) -> bool:
        """``ack`` acknowledges bytes of ``p`` not seen yet, and nothing of ``p`` after them
        (a known hole is the ack-above-hole rule's)."""
        d = (ack - p.next_seq) & _MASK  # type: ignore[operator]
        # p's own held segments are bytes the capture did show: no waiting on them (two holds
        # would wait on each other).
        return 0 < d <= HOLD_AHEAD and not p.closed and p.fin_at is None and p.segs is None and p.held is None

    def _hold(self, h: _Half, seq: int, ack: int, flags: int, payload: memoryview, ts: int) -> None:
        held = h.held
        if held is None:
            held = h.held = []
            h.held_ack = ack
        elif ((ack - h.held_ack) & _MASK) < _HALF:
            h.held_ack = ack
        held.append((seq, ack, flags, payload, ts))
        self.stats["reorder_held"] = self.stats.get("reorder_held", 0) + 1
        if len(held) > HOLD_MAX_SEGMENTS or sum(len(x[3]) for x in held) > HOLD_MAX_BYTES:
            self._release(h, ts, give_up=True)

    def _release(self, h: _Half, ts: int, give_up: bool = False) -> None:
        """End ``h``'s hold if its peer caught up (or ``give_up``: the peer's missing bytes
        become a GAP), then hand the held segments on in their order."""
        p = h.peer
        held = h.held
        if held is None:
            return
        if p.next_seq is not None and not p.closed and h.conn.a is not None:
            d = (h.held_ack - p.next_seq) & _MASK
            if 0 < d < _HALF:
                if p.segs:
                    # The peer's stream has a hole below the ACK: those bytes were received
                    # (acknowledged), the capture missed them: lost for good (ack above hole).
                    self._ack_gap(p, h.held_ack, ts)
                    d = (h.held_ack - p.next_seq) & _MASK if p.next_seq is not None else 0
                if 0 < d < _HALF and not p.closed:
                    if not give_up:
                        return  # still waiting for them
                    self._skip_to(p, p.delivered + d, "reorder_hold", ts)
            else:
                self.stats["reorder_fixed"] = self.stats.get("reorder_fixed", 0) + 1
        h.held = None
        for seq, ack, flags, payload, t in held:
            if h.conn.a is None:  # the connection ended while handing on
                break
            if h.closed:
                if payload:
                    self._count(self.drops, "after_close")
                continue
            self._data(h, seq, payload, t, bool(flags & _FIN))
            if flags & _ACK:
                q = h.peer
                if q.segs or (q.fin_at is not None and not q.closed):
                    self._ack_gap(q, ack, t)

    def _slow(self, h: _Half | None, src: Any, sport: int, dst: Any, dport: int, seq: int, ack: int,
              flags: int, payload: memoryview, ts: int) -> None:
        if flags & _RST:
            if h is None:
                self.stats["ignored"] += 1
                return
            for x in (h, h.peer):
                if x.held is not None:
                    self._release(x, ts, give_up=True)
            if h.conn.a is None:
                return
            conn = h.conn
            conn.last_ts = ts
            for x in (conn.a, conn.b):
                self._drain(x, "reset", ts)
            if conn.a is None:
                # Giving up the holes delivered the last FIN: the connection ended (both CLOSEs)
                # before its RST, which then ends nothing (as an RST of a connection not tracked).
                return
            self._emit(h, _RESET, ts)
            for x in (conn.a, conn.b):
                x.closed = True
            self._forget(conn)
            return
        if flags & _SYN:
            if flags & _ACK:  # SYN-ACK: the sender is the server
                if h is None:
                    h = self._new_conn(src, sport, dst, dport, ts, False)
                    self._emit(h.peer, _OPEN, ts)
                if h.next_seq is None:
                    h.next_seq = (seq + 1) & _MASK
                if h.peer.next_seq is None and ack:
                    h.peer.next_seq = ack  # the client's ISN+1, when its SYN was missed
            else:
                if h is not None:
                    conn = h.conn
                    if conn.syn_isn == seq and h is conn.a:
                        conn.last_ts = ts  # retransmitted SYN
                        return
                    self._end(conn, "port_reuse", ts)
                h = self._new_conn(src, sport, dst, dport, ts, True)
                h.conn.syn_isn = seq
                h.next_seq = (seq + 1) & _MASK
                self._emit(h, _OPEN, ts)
            h.conn.last_ts = ts
            self._touch(h.conn.id)
            if payload or flags & _FIN:  # TCP Fast Open data rides on the SYN
                self._data(h, (seq + 1) & _MASK, payload, ts, bool(flags & _FIN))
            return
        if h is None:
            if not payload:
                self.stats["ignored"] += 1  # bare ACK/FIN of a connection we do not track
                return
            h = self._new_conn(src, sport, dst, dport, ts, None)
        conn = h.conn
        conn.last_ts = ts
        self._touch(conn.id)
        if h.held is not None or (payload and flags & _ACK and h.peer.next_seq is not None
                                  and self._ahead(h.peer, ack)):
            self._hold(h, seq, ack, flags, payload, ts)  # its FIN waits behind the held data
            return
        self._data(h, seq, payload, ts, bool(flags & _FIN))
        if flags & _ACK and h.conn.id in self._lru:
            p = h.peer
            if p.segs or (p.fin_at is not None and not p.closed):
                self._ack_gap(p, ack, ts)
        if h.peer.held is not None:
            self._release(h.peer, ts)

    def _sweep(self, now: int) -> None:
        self._next_sweep = now + SWEEP_INTERVAL_NS
        cutoff = now - self._idle_ns
        stale = []
        for conn in self._lru.values():
            if conn.last_ts >= cutoff:
                break
            stale.append(conn)
        for conn in stale:
            self._end(conn, "idle_timeout", conn.last_ts)

    def expire(self, now_ns: int) -> None:
        """Expire idle connections as of ``now_ns`` (for live sources between packets)."""
        self._sweep(now_ns)

    def finish(self) -> None:
        """End of input: give up holes, CLOSE every open direction, forget all connections."""
        for conn in list(self._lru.values()):
            for h in (conn.a, conn.b):
                if h.held is not None:
                    self._release(h, conn.last_ts, give_up=True)
            if conn.a is None:
                continue
            for h in (conn.a, conn.b):
                self._drain(h, "end_of_capture", conn.last_ts)
                if not h.closed:
                    h.closed = True
                    self._emit(h, _CLOSE, conn.last_ts)
            self._forget(conn)

    @property
    def connections(self) -> int:
        return len(self._lru)


def _seg_start(seg: tuple) -> int:
    return seg[0]


#: The C twin of ``segment``'s fast path and of ``_slow``'s common handshake and close, run
#: inside the pcap replay's record loop (receivers/_fastpath.c; pcap.py decides when): it
#: reads and writes ``_Half``/``_Conn`` slots, makes both (every slot, as their ``__init__``
#: does: a slot added here must be added there, setup() checks the count) and builds
#: ``TcpEvent``s in place, so it is handed the classes, the event kinds, ``_GONE`` and the
#: id counter once here. None when the accelerator is absent or switched off
#: (WIRESPAN_PURE_PYTHON).
_c_fast = speedups.load("receivers._fastpath")
if _c_fast is not None:
    _c_fast.setup(_Half, _Conn, TcpEvent, _DATA, _OPEN, _CLOSE, _RESET, _GONE, _conn_ids)
c_scan = _c_fast.scan if _c_fast is not None else None
