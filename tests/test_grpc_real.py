"""gRPC from real parts: a grpcio server (generic handlers, bytes in and out, no codegen)
driven by a grpcio client: unary, server-streaming, client-streaming, bidi, a failing
method, an unimplemented one and one past its deadline. Recorded with tcpdump on
loopback, replayed through the pcap receiver and protocols stage, spans asserted.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from service.model import SpanKind, StatusCode
from tests.support.capture import tcpdump
from tests.support.replay import replay_spans

SVC = "wirespan.test.Echo"
TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _unary(req: bytes, ctx: grpc.ServicerContext) -> bytes:
    return b"echo:" + req


def _server_stream(req: bytes, ctx: grpc.ServicerContext) -> Iterator[bytes]:
    for i in range(int(req)):
        yield b"item %d" % i


def _client_stream(reqs: Iterator[bytes], ctx: grpc.ServicerContext) -> bytes:
    return b"%d" % sum(1 for _ in reqs)


def _bidi(reqs: Iterator[bytes], ctx: grpc.ServicerContext) -> Iterator[bytes]:
    for r in reqs:
        yield r.upper()


def _fail(req: bytes, ctx: grpc.ServicerContext) -> bytes:
    ctx.abort(grpc.StatusCode.NOT_FOUND, "no such thing: " + req.decode())
    return b""


def _broken(req: bytes, ctx: grpc.ServicerContext) -> bytes:
    ctx.abort(grpc.StatusCode.INTERNAL, "kaboom")
    return b""


def _slow(req: bytes, ctx: grpc.ServicerContext) -> bytes:
    time.sleep(1.0)
    return b"late"


def _ident(b: bytes) -> bytes:
    return b


def _handlers() -> grpc.GenericRpcHandler:
    kw = {"request_deserializer": _ident, "response_serializer": _ident}
    return grpc.method_handlers_generic_handler(SVC, {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary, **kw),
        "ServerStream": grpc.unary_stream_rpc_method_handler(_server_stream, **kw),
        "ClientStream": grpc.stream_unary_rpc_method_handler(_client_stream, **kw),
        "Bidi": grpc.stream_stream_rpc_method_handler(_bidi, **kw),
        "Fail": grpc.unary_unary_rpc_method_handler(_fail, **kw),
        "Broken": grpc.unary_unary_rpc_method_handler(_broken, **kw),
        "Slow": grpc.unary_unary_rpc_method_handler(_slow, **kw),
    })


@pytest.fixture(scope="module")
def spans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((_handlers(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    pcap = tmp_path_factory.mktemp("grpc") / "grpc.pcap"
    try:
        with tcpdump(port, pcap), grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            kw = {"request_serializer": _ident, "response_deserializer": _ident}
            unary = ch.unary_unary(f"/{SVC}/Unary", **kw)
            assert unary(b"hi", metadata=(("traceparent", TP), ("authorization", "Bearer TOPSECRET"))) == b"echo:hi"
            assert len(list(ch.unary_stream(f"/{SVC}/ServerStream", **kw)(b"5"))) == 5
            assert ch.stream_unary(f"/{SVC}/ClientStream", **kw)(iter([b"a"] * 7)) == b"7"
            assert list(ch.stream_stream(f"/{SVC}/Bidi", **kw)(iter([b"x", b"y", b"z"]))) == [b"X", b"Y", b"Z"]
            with pytest.raises(grpc.RpcError) as e:
                ch.unary_unary(f"/{SVC}/Fail", **kw)(b"thing")
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as e:
                ch.unary_unary(f"/{SVC}/Broken", **kw)(b"")
            assert e.value.code() == grpc.StatusCode.INTERNAL
            with pytest.raises(grpc.RpcError) as e:
                ch.unary_unary(f"/{SVC}/Nope", **kw)(b"")
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
            with pytest.raises(grpc.RpcError) as e:
                ch.unary_unary(f"/{SVC}/Slow", **kw)(b"", timeout=0.2)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            time.sleep(1.0)  # let the slow handler finish before the capture stops
    finally:
        server.stop(0)
    got = replay_spans(pcap)
    by_name = {}
    for s in got:
        assert s.attributes.get("rpc.system.name") == "grpc", s
        assert s.name not in by_name, s.name
        by_name[s.name] = s
    return by_name


def _attrs(spans: dict[str, object], method: str) -> dict[str, object]:
    return spans[f"{SVC}/{method}"].attributes  # type: ignore[attr-defined]


def test_all_calls_have_spans(spans: dict[str, object]) -> None:
    assert set(spans) == {f"{SVC}/{m}" for m in
                          ("Unary", "ServerStream", "ClientStream", "Bidi", "Fail", "Broken", "Nope", "Slow")}
    for s in spans.values():
        assert s.kind == SpanKind.SERVER  # type: ignore[attr-defined]
        assert s.end_ns >= s.start_ns > 0  # type: ignore[attr-defined]
        assert "TOPSECRET" not in repr(s.attributes)  # type: ignore[attr-defined]


def test_unary(spans: dict[str, object]) -> None:
    s = spans[f"{SVC}/Unary"]
    a = s.attributes  # type: ignore[attr-defined]
    assert a["rpc.method"] == f"{SVC}/Unary" and a["rpc.response.status_code"] == "OK"
    assert a["wirespan.grpc.request.message_count"] == 1 and a["wirespan.grpc.response.message_count"] == 1
    assert a["server.address"] == "127.0.0.1" and a["client.address"] == "127.0.0.1"
    assert s.status_code == StatusCode.UNSET  # type: ignore[attr-defined]
    assert s.trace_id.hex() == "4bf92f3577b34da6a3ce929d0e0e4736"  # type: ignore[attr-defined]
    assert s.parent_span_id.hex() == "00f067aa0ba902b7"  # type: ignore[attr-defined]


def test_streaming_message_counts(spans: dict[str, object]) -> None:
    assert _attrs(spans, "ServerStream")["wirespan.grpc.response.message_count"] == 5
    assert _attrs(spans, "ServerStream")["wirespan.grpc.request.message_count"] == 1
    assert _attrs(spans, "ClientStream")["wirespan.grpc.request.message_count"] == 7
    assert _attrs(spans, "ClientStream")["wirespan.grpc.response.message_count"] == 1
    assert _attrs(spans, "Bidi")["wirespan.grpc.request.message_count"] == 3
    assert _attrs(spans, "Bidi")["wirespan.grpc.response.message_count"] == 3


def test_failures(spans: dict[str, object]) -> None:
    fail = spans[f"{SVC}/Fail"]
    assert fail.attributes["rpc.response.status_code"] == "NOT_FOUND"  # type: ignore[attr-defined]
    assert fail.status_code == StatusCode.UNSET  # type: ignore[attr-defined]  # the caller's fault
    broken = spans[f"{SVC}/Broken"]
    assert broken.attributes["rpc.response.status_code"] == "INTERNAL"  # type: ignore[attr-defined]
    assert broken.status_code == StatusCode.ERROR  # type: ignore[attr-defined]
    assert broken.status_message == "kaboom"  # type: ignore[attr-defined]
    nope = spans[f"{SVC}/Nope"]
    assert nope.attributes["rpc.response.status_code"] == "UNIMPLEMENTED"  # type: ignore[attr-defined]
    assert nope.status_code == StatusCode.ERROR  # type: ignore[attr-defined]


def test_deadline(spans: dict[str, object]) -> None:
    s = spans[f"{SVC}/Slow"]
    a = s.attributes  # type: ignore[attr-defined]
    assert a["rpc.response.status_code"] == "DEADLINE_EXCEEDED"
    assert s.status_code == StatusCode.ERROR  # type: ignore[attr-defined]
    timeout = a["rpc.grpc.request.metadata.grpc-timeout"]
    assert isinstance(timeout, list) and timeout[0][-1] in "HMSmun"
    assert 150_000_000 <= s.end_ns - s.start_ns < 1_000_000_000  # type: ignore[attr-defined]



def test_mid_stream_pickup_of_real_capture(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The stored grpcio capture without its first 26 packets (handshake, preface, the first
    two calls that filled the HPACK tables): later calls still become gRPC spans from what
    can be decoded; fields behind unknown table entries are counted, never invented."""
    import subprocess

    from tests.support.replay import replay

    src = Path(__file__).parent / "fixtures" / "http2" / "grpc_calls.pcap"
    cut = tmp_path_factory.mktemp("pickup") / "cut.pcap"
    subprocess.run(["editcap", "-r", str(src), str(cut), "27-1000"], check=True, capture_output=True)
    got, _, stats = replay(cut)
    names = sorted(s.name for s in got)
    assert names == [f"{SVC}/Bidi", f"{SVC}/ClientStream", f"{SVC}/Fail"], names
    by = {s.name: s for s in got}
    assert by[f"{SVC}/Fail"].attributes["rpc.response.status_code"] == "NOT_FOUND"
    # grpc-status 0 was a reference to a table entry made before the capture: not guessed
    assert "rpc.response.status_code" not in by[f"{SVC}/Bidi"].attributes
    assert by[f"{SVC}/Bidi"].status_code == StatusCode.UNSET
    assert stats["drops"].get("http2:hpack_unknown_index", 0) > 0
    for s in got:
        assert "*" not in repr(s.attributes)
