"""The C accelerators: which are in use, and that CI really runs them.

Each accelerator's own tests (test_model.py, test_http1_speedup.py, test_kafka_fast.py)
hold it to its Python twin; this file checks the wiring around them.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys

from service import speedups


def test_every_accelerator_is_in_use_when_required() -> None:
    """tests/run.sh sets WIRESPAN_REQUIRE_SPEEDUPS: there a missing build fails here, loudly."""
    if not speedups.REQUIRED or speedups.PURE:
        return
    for name in speedups.ACCELERATORS:
        assert importlib.import_module(name) is not None
    assert all(speedups.status().values())


def test_every_registered_source_exists_beside_its_python_twin() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name, src in speedups.ACCELERATORS.items():
        assert os.path.isfile(os.path.join(root, src)), src
        assert src.replace("/", ".").removesuffix(".c") == name


def test_pure_python_switch_turns_every_accelerator_off() -> None:
    code = ("import json; from service import speedups; "
            "print(json.dumps([speedups.status(), speedups.why_not('service._otlp')]))")
    env = {**os.environ, "WIRESPAN_PURE_PYTHON": "1"}
    env.pop("WIRESPAN_REQUIRE_SPEEDUPS", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    status, why = json.loads(out.stdout)
    assert status and not any(status.values())
    assert "WIRESPAN_PURE_PYTHON" in why


def test_components_lists_the_accelerators() -> None:
    out = subprocess.run([sys.executable, "-m", "service.cli", "components", "--format", "json"],
                         capture_output=True, text=True, check=True)
    rows = [r for r in json.loads(out.stdout) if r["kind"] == "accelerator"]
    assert {r["type"] for r in rows} == set(speedups.ACCELERATORS)
    for r in rows:
        assert r["available"] == (importlib.util.find_spec(r["type"]) is not None and not speedups.PURE)
