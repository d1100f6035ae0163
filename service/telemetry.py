"""Self-metrics: every drop is counted with a reason.

Names follow the Collector's own metrics where they mean the same thing
(design.md §5). Components import the metric objects from here and label them
with their component id; nothing else defines metrics, so the list stays in one
place. Counters are incremented per batch, not per event, on hot paths.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

__all__ = [
    "REGISTRY",
    "RECEIVER_ACCEPTED",
    "RECEIVER_DROPPED",
    "PARSER_MESSAGES",
    "PARSER_DROPPED",
    "PROCESSOR_INCOMING",
    "PROCESSOR_OUTGOING",
    "PROCESSOR_DROPPED",
    "EXPORTER_SENT",
    "EXPORTER_SEND_FAILED",
    "EXPORTER_ENQUEUE_FAILED",
    "EXPORTER_RETRIES",
    "EXPORTER_QUEUE_SIZE",
    "EXPORTER_QUEUE_CAPACITY",
    "CONNECTIONS_EVICTED",
]

_registry: CollectorRegistry = REGISTRY

RECEIVER_ACCEPTED = Counter(
    "wirespan_receiver_accepted_events", "TCP events a receiver handed on.", ["receiver"], registry=_registry)
RECEIVER_DROPPED = Counter(
    "wirespan_receiver_dropped_events", "Packets or events a receiver dropped, by reason.",
    ["receiver", "reason"], registry=_registry)
PARSER_MESSAGES = Counter(
    "wirespan_parser_messages", "Protocol messages parsed (result=ok) or dropped (result=reason).",
    ["protocol", "result"], registry=_registry)
PARSER_DROPPED = PARSER_MESSAGES  # same metric: drops are results other than "ok"
PROCESSOR_INCOMING = Counter(
    "wirespan_processor_incoming_items", "Items (events or spans) a processor received.",
    ["processor"], registry=_registry)
PROCESSOR_OUTGOING = Counter(
    "wirespan_processor_outgoing_items", "Items a processor passed on.", ["processor"], registry=_registry)
PROCESSOR_DROPPED = Counter(
    "wirespan_processor_dropped_items", "Items a processor dropped, by reason.",
    ["processor", "reason"], registry=_registry)
EXPORTER_SENT = Counter(
    "wirespan_exporter_sent_spans", "Spans the backend accepted.", ["exporter"], registry=_registry)
EXPORTER_SEND_FAILED = Counter(
    "wirespan_exporter_send_failed_spans", "Spans that failed to send for good, by reason.",
    ["exporter", "reason"], registry=_registry)
EXPORTER_ENQUEUE_FAILED = Counter(
    "wirespan_exporter_enqueue_failed_spans", "Spans refused by a full sending queue.",
    ["exporter"], registry=_registry)
EXPORTER_RETRIES = Counter(
    "wirespan_exporter_retries", "Send attempts that were retried.", ["exporter"], registry=_registry)
EXPORTER_QUEUE_SIZE = Gauge(
    "wirespan_exporter_queue_size", "Spans waiting in the sending queue.", ["exporter"], registry=_registry)
EXPORTER_QUEUE_CAPACITY = Gauge(
    "wirespan_exporter_queue_capacity", "Sending queue capacity in spans.", ["exporter"], registry=_registry)
CONNECTIONS_EVICTED = Counter(
    "wirespan_connections_evicted", "Connection state dropped before the connection ended, by reason.",
    ["component", "reason"], registry=_registry)

# ---------------------------------------------------------------------------
# Added by the exporters work (issue 5): persistent sending queue integrity.
# ---------------------------------------------------------------------------
EXPORTER_QUEUE_CORRUPT = Counter(
    "wirespan_exporter_queue_corrupt_records",
    "Persistent-queue records skipped because they were corrupt or truncated on disk.",
    ["exporter"], registry=_registry)
__all__ += ["EXPORTER_QUEUE_CORRUPT"]

# ---------------------------------------------------------------------------
# eBPF receiver (receivers/ebpf, issue 9)
# ---------------------------------------------------------------------------
EBPF_KERNEL_COUNTERS = Counter(
    "wirespan_ebpf_kernel_events",
    "Counters kept by the BPF program, by counter: ringbuf_reserve_failures (records lost to a full "
    "ring), truncated_calls/truncated_bytes (beyond the per-syscall copy bound), records, "
    "user_read_failures, inflight_table_full.",
    ["receiver", "counter"], registry=_registry)
EBPF_TRUNCATED_BYTES = Counter(
    "wirespan_ebpf_truncated_bytes",
    "Payload bytes turned into gaps: where=message_cap (beyond max_message_bytes) or kernel (not copied).",
    ["receiver", "where"], registry=_registry)
__all__ += ["EBPF_KERNEL_COUNTERS", "EBPF_TRUNCATED_BYTES"]
