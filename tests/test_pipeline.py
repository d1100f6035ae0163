"""Pipeline graph and lifecycle, in-process with the runtime fakes.

Fakes (tests/support/pipeline_fakes.py) stand in for receivers, the protocols
stage and a recording exporter because these tests are about ordering,
draining, sharing and failure handling; the real pcap receiver and parsers run
end to end in tests/test_cli.py.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from service import config as c
from service import telemetry as tm
from service.component import ComponentConfig, SpanProcessor
from service.pipeline import BuildError, DataRefused, Runner, Service, StartError, should_block
from service.registry import Registry
from tests.support import pipeline_fakes as fk


@pytest.fixture(autouse=True)
def _clean() -> None:
    fk.LOG.clear()
    fk.RECEIVED.clear()


@pytest.fixture
def reg() -> Registry:
    r = Registry(entry_points=False)
    r.register("receiver", "fake_finite", fk.FakeFiniteReceiver)
    r.register("receiver", "fake_live", fk.FakeLiveReceiver)
    r.register("processor", "fake_events", fk.FakeEventProcessor)
    r.register("processor", "fake_spans", fk.FakeSpanProcessor)
    r.register("exporter", "recording", fk.RecordingExporter)
    return r


def cfg_of(reg: Registry, receivers: dict, processors: dict, exporters: dict, pipelines: dict) -> c.Config:
    raw = {"receivers": receivers, "processors": processors, "exporters": exporters,
           "service": {"pipelines": pipelines, "telemetry": {"metrics": {"address": ""}, "health": {"address": ""}}}}
    return c.validate(raw, reg)


def simple(reg: Registry, **kw: Any) -> c.Config:
    return cfg_of(reg, {"fake_finite": kw.get("recv", {"events": 20})},
                  {"fake_events": kw.get("ev", {}), "fake_spans": kw.get("sp", {})},
                  {"recording": kw.get("exp", {})},
                  {"traces": {"receivers": ["fake_finite"], "processors": ["fake_events", "fake_spans"],
                              "exporters": ["recording"]}})


def run_to_end(svc: Service, timeout: float = 10) -> list[str]:
    svc.start()
    assert svc.wait_receivers(timeout)
    return svc.shutdown()


def test_start_and_stop_order(reg: Registry) -> None:
    svc = Service(simple(reg))
    assert run_to_end(svc) == []
    assert fk.LOG == [
        "start recording", "start fake_spans", "start fake_events", "start fake_finite",
        "shutdown fake_finite", "flush fake_finite",
        "flush fake_events", "shutdown fake_events", "flush fake_spans", "shutdown fake_spans",
        "flush recording", "shutdown recording",
    ]
    assert len(fk.RECEIVED["recording"]) == 20
    assert svc.state == "stopped" and svc.undelivered() == []


def test_draining_loses_nothing_in_flight(reg: Registry) -> None:
    """The events processor holds every span until flush, and batch holds them for 1h: shutdown delivers all."""
    cfg = cfg_of(reg, {"fake_finite": {"events": 1000, "per_batch": 7}},
                 {"fake_events": {"hold": True}, "batch": {"timeout": "1h", "send_batch_size": 100000}},
                 {"recording": {}},
                 {"traces": {"receivers": ["fake_finite"], "processors": ["fake_events", "batch"],
                             "exporters": ["recording"]}})
    svc = Service(cfg)
    svc.start()
    assert svc.wait_receivers(10)
    assert "recording" not in fk.RECEIVED            # everything is still held upstream
    assert svc.shutdown() == []
    assert len(fk.RECEIVED["recording"]) == 1000
    assert svc.stats()["spans"] == {"traces": 1000}
    assert svc.undelivered() == []


def test_shared_receiver_and_exporter_fan_out(reg: Registry) -> None:
    cfg = cfg_of(reg, {"fake_finite": {"events": 10}},
                 {"fake_events": {}, "fake_spans": {}},
                 {"recording": {}, "recording/b": {}},
                 {"traces/a": {"receivers": ["fake_finite"], "processors": ["fake_events"],
                               "exporters": ["recording", "recording/b"]},
                  "traces/b": {"receivers": ["fake_finite"], "processors": ["fake_events", "fake_spans"],
                               "exporters": ["recording"]}})
    svc = Service(cfg)
    assert list(svc.receivers) == ["fake_finite"] and sorted(svc.exporters) == ["recording", "recording/b"]
    # processors are per pipeline: two fake_events instances
    assert svc.pipelines["traces/a"][0] is not svc.pipelines["traces/b"][0]
    assert run_to_end(svc) == []
    assert fk.LOG.count("start fake_finite") == 1 and fk.LOG.count("start recording") == 1
    assert fk.LOG.count("start fake_events") == 2
    assert len(fk.RECEIVED["recording"]) == 20      # from both pipelines
    assert len(fk.RECEIVED["recording/b"]) == 10    # fan-out of traces/a


@pytest.mark.parametrize("failing", ["recording", "fake_spans", "fake_events", "fake_finite"])
def test_start_failure_stops_everything_started(reg: Registry, failing: str) -> None:
    kw = {{"recording": "exp", "fake_spans": "sp", "fake_events": "ev", "fake_finite": "recv"}[failing]:
          {"fail_start": True}}
    svc = Service(simple(reg, **kw))
    want = f"{failing}( \\(pipeline traces\\))?: failed to start: {failing} refuses"
    with pytest.raises(StartError, match=want):
        svc.start()
    started = [e.split()[1] for e in fk.LOG if e.startswith("start")]
    assert started[-1] == failing
    stopped = [e.split()[1] for e in fk.LOG if e.startswith("shutdown")]
    assert stopped == list(reversed(started))       # everything started (and the failed one) is shut down
    assert svc.state == "failed"
    # a receiver thread never ran: nothing reached the exporter
    assert "recording" not in fk.RECEIVED


def test_constructor_failure_is_a_build_error(reg: Registry) -> None:
    class Bad(SpanProcessor):
        type = "bad"
        Config = ComponentConfig

        def __init__(self, *a: Any) -> None:
            raise OSError("no such device")
    reg.register("processor", "bad", Bad)
    cfg = cfg_of(reg, {"fake_finite": {}}, {"fake_events": {}, "bad": {}}, {"recording": {}},
                 {"traces": {"receivers": ["fake_finite"], "processors": ["fake_events", "bad"],
                             "exporters": ["recording"]}})
    with pytest.raises(BuildError, match="processors::bad: cannot be created: no such device") as ei:
        Service(cfg)
    assert "OSError" not in str(ei.value)           # users read messages, not Python class names


def test_component_exception_is_contained_and_counted(reg: Registry) -> None:
    before = tm.counter_value(tm.PROCESSOR_DROPPED, processor="fake_events", reason="error")
    svc = Service(simple(reg, ev={"explode": True}, recv={"events": 30, "per_batch": 10}))
    assert run_to_end(svc) == []
    assert tm.counter_value(tm.PROCESSOR_DROPPED, processor="fake_events", reason="error") - before == 30
    assert fk.LOG[-1] == "shutdown recording"       # the receiver thread survived and finished


class Refuser(SpanProcessor):
    """Refuses the first ``n`` calls (a memory limiter under pressure)."""

    type = "refuser"

    class Config(ComponentConfig):
        n: int = 3

    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        self.calls = 0
        self.modes: list[bool] = []

    def consume_spans(self, spans: list) -> None:
        self.calls += 1
        self.modes.append(should_block())
        if self.calls <= self.config.n:
            raise DataRefused()
        self.next.consume_spans(spans)


def test_refused_data_waits_for_a_finite_receiver(reg: Registry) -> None:
    reg.register("processor", "refuser", Refuser)
    cfg = cfg_of(reg, {"fake_finite": {"events": 5, "per_batch": 5}}, {"fake_events": {}, "refuser": {}},
                 {"recording": {}}, {"traces": {"receivers": ["fake_finite"], "processors": ["fake_events", "refuser"],
                                                "exporters": ["recording"]}})
    svc = Service(cfg)
    assert run_to_end(svc) == []
    ref = svc.pipelines["traces"][1]
    assert ref.calls == 4 and all(ref.modes)        # retried until accepted, in blocking mode
    assert len(fk.RECEIVED["recording"]) == 5


def test_refused_data_is_a_counted_drop_for_a_live_receiver(reg: Registry) -> None:
    reg.register("processor", "refuser", Refuser)
    before = tm.counter_value(tm.PROCESSOR_DROPPED, processor="refuser", reason="refused")
    cfg = cfg_of(reg, {"fake_live": {"interval": 0.005}}, {"fake_events": {}, "refuser": {"n": 3}},
                 {"recording": {}}, {"traces": {"receivers": ["fake_live"], "processors": ["fake_events", "refuser"],
                                                "exporters": ["recording"]}})
    svc = Service(cfg)
    svc.start()
    deadline = time.monotonic() + 10
    while len(fk.RECEIVED.get("recording", [])) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    svc.shutdown()
    ref = svc.pipelines["traces"][1]
    assert not any(ref.modes)
    assert tm.counter_value(tm.PROCESSOR_DROPPED, processor="refuser", reason="refused") - before == 3
    assert len(fk.RECEIVED["recording"]) == ref.calls - 3


def test_metrics_count_items_in_and_out(reg: Registry) -> None:
    def val(m: Any, **kw: str) -> float:
        return tm.counter_value(m, **kw)
    before = (val(tm.RECEIVER_ACCEPTED, receiver="src9"), val(tm.PROCESSOR_INCOMING, processor="fake_events"),
              val(tm.PROCESSOR_OUTGOING, processor="fake_events"), val(tm.PROCESSOR_INCOMING, processor="fake_spans"),
              val(tm.EXPORTER_SENT, exporter="recording"))
    cfg = cfg_of(reg, {"src9": {"class": "tests.support.pipeline_fakes:FakeFiniteReceiver", "events": 12}},
                 {"fake_events": {}, "fake_spans": {}}, {"recording": {}},
                 {"traces": {"receivers": ["src9"], "processors": ["fake_events", "fake_spans"],
                             "exporters": ["recording"]}})
    assert run_to_end(Service(cfg)) == []
    after = (val(tm.RECEIVER_ACCEPTED, receiver="src9"), val(tm.PROCESSOR_INCOMING, processor="fake_events"),
             val(tm.PROCESSOR_OUTGOING, processor="fake_events"), val(tm.PROCESSOR_INCOMING, processor="fake_spans"),
             val(tm.EXPORTER_SENT, exporter="recording"))
    assert [a - b for a, b in zip(after, before, strict=True)] == [12, 12, 12, 12, 12]


def test_undelivered_is_reported(reg: Registry) -> None:
    svc = Service(simple(reg, exp={"lose": True}, recv={"events": 9}))
    assert run_to_end(svc) == []
    assert svc.undelivered() == ["exporters::recording: 9 of 9 spans not delivered "
                                 "(0 failed, 0 refused by a full queue, 9 still pending)"]


def test_blocking_mode_follows_the_producer(reg: Registry) -> None:
    """Finite producers mark their thread blocking; the batch timer carries that mode along."""
    seen: list[bool] = []

    class Probe(fk.RecordingExporter):
        type = "probe"

        def consume_spans(self, spans: list) -> None:
            seen.append(should_block())
            super().consume_spans(spans)
    reg.register("exporter", "probe", Probe)
    cfg = cfg_of(reg, {"fake_finite": {"events": 3}}, {"fake_events": {}, "batch": {"timeout": "20ms"}},
                 {"probe": {}}, {"traces": {"receivers": ["fake_finite"], "processors": ["fake_events", "batch"],
                                            "exporters": ["probe"]}})
    svc = Service(cfg)
    svc.start()
    assert svc.wait_receivers(5)
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    svc.shutdown()
    assert seen == [True]                          # sent by the timer thread, still in blocking mode
    assert should_block() is False                 # this thread was never marked


def test_runner_reload_good_and_bad(reg: Registry) -> None:
    state = {"cfg": {"fake_live": {"interval": 0.01}}, "bad": False}

    def load() -> c.Config:
        if state["bad"]:
            raise c.ConfigError(["exporters::recording: unknown option 'nope'"])
        return cfg_of(reg, state["cfg"], {"fake_events": {}}, {"recording": {}},
                      {"traces": {"receivers": list(state["cfg"]), "processors": ["fake_events"],
                                  "exporters": ["recording"]}})
    r = Runner(load)
    r.start()
    first = r.service
    assert r.ready() == (True, "running")
    state["cfg"] = {"fake_live/2": {"interval": 0.01}}
    assert r.reload() is True
    assert r.service is not first and first.state == "stopped" and list(r.service.receivers) == ["fake_live/2"]
    second = r.service
    state["bad"] = True
    assert r.reload() is False                       # refused: the running pipelines keep going
    assert r.service is second and second.state == "running" and r.ready()[0]
    n = len(fk.RECEIVED.get("recording", []))
    time.sleep(0.1)
    assert len(fk.RECEIVED["recording"]) > n
    assert r.stop() == []
    assert r.ready() == (False, "stopped")


def test_runner_reload_start_failure_restores_previous(reg: Registry) -> None:
    state = {"fail": False}

    def load() -> c.Config:
        return cfg_of(reg, {"fake_live": {"interval": 0.01}}, {"fake_events": {}},
                      {"recording": {"fail_start": state["fail"]}},
                      {"traces": {"receivers": ["fake_live"], "processors": ["fake_events"],
                                  "exporters": ["recording"]}})
    r = Runner(load)
    r.start()
    state["fail"] = True
    assert r.reload() is False
    assert r.service is not None and r.service.state == "running" and r.ready()[0]
    assert not r.service.cfg.exporters["recording"].config.fail_start
    r.stop()


def test_concurrent_receivers_all_delivered(reg: Registry) -> None:
    """Four finite receivers on their own threads into one batch processor: exact count."""
    recv = {f"fake_finite/{i}": {"events": 2000, "per_batch": 13} for i in range(4)}
    cfg = cfg_of(reg, recv, {"fake_events": {}, "batch": {"send_batch_size": 500, "timeout": "10ms"}},
                 {"recording": {}}, {"traces": {"receivers": list(recv), "processors": ["fake_events", "batch"],
                                                "exporters": ["recording"]}})
    svc = Service(cfg)
    assert run_to_end(svc, 30) == []
    assert len(fk.RECEIVED["recording"]) == 8000 and svc.undelivered() == []
    assert threading.active_count() < 50


def test_failed_sends_are_not_delivered(reg: Registry) -> None:
    """An exporter that raises: its spans count as failed (reason=error), and the check says so."""
    class Broken(fk.RecordingExporter):
        type = "broken"

        def consume_spans(self, spans: list) -> None:
            raise ConnectionError("backend gone")
    reg.register("exporter", "broken", Broken)
    cfg = cfg_of(reg, {"fake_finite": {"events": 6}}, {"fake_events": {}}, {"broken": {}},
                 {"traces": {"receivers": ["fake_finite"], "processors": ["fake_events"], "exporters": ["broken"]}})
    svc = Service(cfg)
    assert run_to_end(svc) == []
    assert svc.undelivered() == ["exporters::broken: 6 of 6 spans not delivered "
                                 "(6 failed, 0 refused by a full queue, 0 still pending)"]
    assert svc.stats()["exporters"]["broken"] == {"offered": 6, "sent": 0, "failed": 6, "refused": 0}


def test_running_pipelines_tune_the_gc_once(reg: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """Start-up objects are frozen and the young generation collected less often, once per
    process: a second start (a reload) must not freeze again, which would keep its garbage."""
    import gc

    from service import pipeline

    monkeypatch.setattr(pipeline, "_gc_tuned", False)
    old = gc.get_threshold()
    freezes: list[int] = []
    monkeypatch.setattr(gc, "freeze", lambda: freezes.append(1))
    try:
        gc.set_threshold(700, old[1], old[2])
        assert run_to_end(Service(simple(reg))) == []
        assert gc.get_threshold()[0] == pipeline.GC_GEN0_THRESHOLD and freezes == [1]
        assert run_to_end(Service(simple(reg))) == []
        assert freezes == [1]
    finally:
        gc.set_threshold(*old)


def test_malloc_is_tuned_once_pipelines_run_unless_the_user_tuned_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """glibc keeps a batch's megabytes of OTLP text in its heap (service/pipeline.py): mallopt
    takes both thresholds here; a user's own GLIBC_TUNABLES or MALLOC_* settings are left alone."""
    import ctypes
    import os

    from service import pipeline

    try:
        ctypes.CDLL(None).mallopt  # noqa: B018
    except (OSError, AttributeError):
        print("skipped: no glibc mallopt here")
        pytest.skip("no glibc mallopt here")
    for k in [k for k in os.environ if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"]:
        monkeypatch.delenv(k)
    assert pipeline.tune_malloc() is True
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1048576")
    assert pipeline.tune_malloc() is False
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert pipeline.tune_malloc() is False


# -- reload keeps what did not change (issue 19 item 5) ----------------------------------------
def live_runner(reg: Registry, state: dict) -> Runner:
    def load() -> c.Config:
        return cfg_of(reg, {"fake_live": {"interval": 0.002}},
                      {"fake_events": state.get("ev", {}), "fake_spans": state.get("sp", {}),
                       "batch": {"timeout": state.get("timeout", "10ms")}},
                      {"recording": state.get("exp", {})},
                      {"traces": {"receivers": ["fake_live"], "processors": ["fake_events", "fake_spans", "batch"],
                                  "exporters": ["recording"]}})
    return Runner(load)


def test_reload_with_the_same_config_keeps_every_component(reg: Registry) -> None:
    r = live_runner(reg, {})
    r.start()
    try:
        first = r.service
        rx, exp, chain = first.receivers["fake_live"], first.exporters["recording"], list(first.pipelines["traces"])
        time.sleep(0.05)
        fk.LOG.clear()
        assert r.reload() is True
        svc = r.service
        assert svc is not first and first.state == "stopped" and svc.state == "running"
        assert svc.receivers["fake_live"] is rx and svc.exporters["recording"] is exp
        assert svc.pipelines["traces"] == chain
        assert fk.LOG == []                           # nothing was stopped, flushed or started again
        n = len(fk.RECEIVED["recording"])
        time.sleep(0.1)
        assert len(fk.RECEIVED["recording"]) > n      # still flowing, into the kept exporter
    finally:
        assert r.stop() == []
    assert rx.sent == len(fk.RECEIVED["recording"])   # not one event lost across the reload


def test_reload_rebuilds_what_changed_and_what_feeds_it(reg: Registry) -> None:
    state: dict = {}
    r = live_runner(reg, state)
    r.start()
    try:
        first = r.service
        rx, exp = first.receivers["fake_live"], first.exporters["recording"]
        ev, sp, batch = first.pipelines["traces"]
        time.sleep(0.05)
        # the first processor changes: rebuilt; what is behind it, the exporter and receiver kept
        state["ev"] = {"hold": True}
        fk.LOG.clear()
        assert r.reload() is True
        ev2, sp2, batch2 = r.service.pipelines["traces"]
        assert ev2 is not ev and sp2 is sp and batch2 is batch
        assert r.service.receivers["fake_live"] is rx and r.service.exporters["recording"] is exp
        assert fk.LOG == ["flush fake_events", "shutdown fake_events", "start fake_events"]
        # the last processor changes: it and every processor in front of it are rebuilt (their
        # output would go to a stage that is replaced), the exporter and receiver are kept
        state["timeout"] = "20ms"
        fk.LOG.clear()
        assert r.reload() is True
        ev3, sp3, batch3 = r.service.pipelines["traces"]
        assert ev3 is not ev2 and sp3 is not sp2 and batch3 is not batch2
        assert r.service.receivers["fake_live"] is rx and r.service.exporters["recording"] is exp
        assert "shutdown fake_live" not in fk.LOG and "shutdown recording" not in fk.LOG
        # the exporter changes: rebuilt, and so is every processor; the receiver is kept
        state["exp"] = {"slow_shutdown": 0.01}
        assert r.reload() is True
        assert r.service.receivers["fake_live"] is rx and r.service.exporters["recording"] is not exp
        assert all(a is not b for a, b in zip(r.service.pipelines["traces"], (ev3, sp3, batch3), strict=True))
        time.sleep(0.05)
    finally:
        assert r.stop() == []
    assert rx.sent == len(fk.RECEIVED["recording"])   # every event of the kept receiver was delivered


def test_reload_whose_start_fails_gives_the_kept_components_back(reg: Registry) -> None:
    state: dict = {}
    r = live_runner(reg, state)
    r.start()
    try:
        rx, exp = r.service.receivers["fake_live"], r.service.exporters["recording"]
        state["sp"] = {"fail_start": True}
        assert r.reload() is False
        svc = r.service
        assert svc.state == "running" and r.ready()[0]
        assert svc.receivers["fake_live"] is rx and svc.exporters["recording"] is exp
        assert not svc.cfg.processors["fake_spans"].config.fail_start
        n = len(fk.RECEIVED.get("recording", []))
        time.sleep(0.1)
        assert len(fk.RECEIVED["recording"]) > n
    finally:
        assert r.stop() == []
    assert rx.sent == len(fk.RECEIVED["recording"])
