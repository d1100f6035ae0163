"""The benchmark runner itself (``python -m bench``): not the figures, only that it runs as documented.

A real bench run takes tens of seconds per benchmark, so the pcap one runs here on a small
generated capture (its generator is wrapped to make 2 x 3 exchanges) with one repeat.
"""

from __future__ import annotations

import functools
import sys

import pytest

import bench.__main__ as runner
import bench.bench_pcap as bench_pcap
import bench.gen_http_capture as gen


def test_bench_pcap_by_name_does_not_read_the_runners_argv(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """``python -m bench pcap`` used to take its own argv ("pcap") for a capture path."""
    monkeypatch.setattr(sys, "argv", ["bench", "pcap"])
    monkeypatch.setattr(gen, "generate", functools.partial(gen.generate, connections=2, requests=3))
    monkeypatch.setattr(bench_pcap, "REPEATS", 1)
    monkeypatch.setattr(bench_pcap, "PEER_REPEATS", 1)
    assert runner.main(["pcap"]) == 0
    out = capsys.readouterr()
    assert "wirespan read+decode" in out.out and "failed" not in out.err


def test_a_failing_benchmark_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def boom() -> None:
        raise FileNotFoundError(2, "No such file or directory", "tshark")
    monkeypatch.setattr(bench_pcap, "main", boom)
    assert runner.main(["pcap"]) == 1
    err = capsys.readouterr().err
    assert "bench_pcap failed: tshark: No such file or directory" in err and "Traceback" not in err


def test_unknown_benchmark_is_a_usage_error(capsys) -> None:
    assert runner.main(["nosuch"]) == 2
    assert "unknown benchmark(s): nosuch" in capsys.readouterr().err
