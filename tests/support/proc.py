"""Stopping a test server the way every fixture here must: by the PID we started."""

from __future__ import annotations

import subprocess

__all__ = ["stop"]


def stop(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM, wait, then SIGKILL: never leaves a server behind a finished test."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
