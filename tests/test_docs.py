"""The documentation points only at files a clone has (issue 19 item 12), and the example
configs it names are valid.

Checked in every README and the CHANGELOG: markdown links to local files, and paths in
backticks or code blocks that start at a top-level directory of the repository
(``config/live.yaml``, ``receivers/ebpf/build.sh``). "A clone has it" means git tracks it
(when git and the repository are there; else it must exist).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "CHANGELOG.md", "receivers/README.md", "exporters/README.md", "processors/README.md",
        "processors/protocols/README.md", "processors/protocols/kafka/README.md"]
TOP = ("service/", "receivers/", "processors/", "exporters/", "config/", "tests/", "bench/")
ROOT_FILES = ("README.md", "CHANGELOG.md", "LICENSE", "pyproject.toml", "setup.py")
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_PATHLIKE = re.compile(r"(?<![\w./-])((?:" + "|".join(re.escape(t) for t in TOP) + r")[\w./-]*[\w/])")


def _tracked() -> set[str] | None:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except OSError:
        return None
    return set(out.stdout.splitlines()) if out.returncode == 0 else None


TRACKED = _tracked()


def _in_clone(rel: str) -> bool:
    rel = rel.rstrip("/")
    if TRACKED is None:
        return (ROOT / rel).exists()
    return rel in TRACKED or any(f.startswith(rel + "/") for f in TRACKED)


def _referenced(doc: str) -> set[str]:
    text = (ROOT / doc).read_text()
    base = (ROOT / doc).parent
    refs = set()
    for target in _LINK.findall(text):
        if "://" in target or target.startswith(("#", "mailto:")):
            continue
        path = (base / target.split("#", 1)[0]).resolve()
        refs.add(str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path))
    code = "\n".join(re.findall(r"`([^`\n]+)`", text) + re.findall(r"```.*?\n(.*?)```", text, re.S))
    for m in _PATHLIKE.findall(code):
        if not any(c in m for c in "*<>{}"):
            refs.add(m)
    refs.update(f for f in ROOT_FILES if f"`{f}`" in text or f"]({f})" in text)
    return refs


@pytest.mark.parametrize("doc", DOCS)
def test_docs_point_only_at_files_a_clone_has(doc: str) -> None:
    assert _in_clone(doc), f"{doc} is not in the repository"
    missing = sorted(r for r in _referenced(doc) if not _in_clone(r))
    assert not missing, f"{doc} points at files a clone does not have: {missing}"


def test_license_is_apache_2_and_changelog_exists() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n                           Version 2.0, January 2004")
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply the Apache License" in text
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text()
    log = (ROOT / "CHANGELOG.md").read_text()
    assert log.startswith("# Changelog") and "## [Unreleased]" in log


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "config").glob("*.yaml")))
def test_example_configs_validate(config: str) -> None:
    r = subprocess.run([sys.executable, "-m", "service.cli", "validate", "--config", f"config/{config}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_every_receiver_has_an_example_config_and_a_readme_section() -> None:
    readme = (ROOT / "receivers/README.md").read_text()
    configs = {p.name: p.read_text() for p in (ROOT / "config").glob("*.yaml")}
    for rtype in ("pcap", "live", "ebpf"):
        assert f"\n## {rtype}\n" in readme, rtype
        assert any(re.search(rf"^receivers:\n  {rtype}:", t, re.M) for t in configs.values()), rtype
    # the pcap section documents every option of its config model
    from receivers.pcap import PcapConfig
    section = readme.split("\n## pcap\n", 1)[1].split("\n## ", 1)[0]
    for name in PcapConfig.model_fields:
        assert f"`{name}`" in section, name
