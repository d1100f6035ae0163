"""Where the shared peer corpus is (``../shared/corpus`` beside the checkout, or
``$WIRESPAN_SHARED_CORPUS``), for the tests that check detection stays strict on other
people's captures. Its files are third-party data, read in place and never copied here; a
checkout without it (a clone elsewhere) skips those tests with a printed reason."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest


def corpus_captures() -> list[Path]:
    """The corpus's capture files, or skip the calling test saying why."""
    env = os.environ.get("WIRESPAN_SHARED_CORPUS")
    root = Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "corpus"
    caps = root / "captures"
    files = sorted(p for p in caps.rglob("*") if p.suffix in (".pcap", ".pcapng")) if caps.is_dir() else []
    if not files:
        reason = f"the shared corpus is not here ({caps}): set WIRESPAN_SHARED_CORPUS to its folder"
        print(f"skipping: {reason}", file=sys.stderr)
        pytest.skip(reason)
    return files
