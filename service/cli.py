"""The ``wirespan`` command: run, validate, components, replay.

``run`` is the long-lived service: SIGTERM/SIGINT drain and stop (a second one
forces the exit), SIGHUP re-reads the same ``--config`` files and ``--set``
overrides and swaps the pipelines (a bad config is refused and logged; the
running ones keep going). When every receiver is finite (capture files) and
all are done, ``run`` drains and exits by itself. ``replay`` is one-shot: the
pipeline of ``--config`` (or the default) with its receivers replaced by one
``pcap`` receiver on FILE, and with ``--output`` its exporters by one ``file``
exporter; it exits 0 once everything is delivered, non-zero naming what was
not. Exit codes: 0 ok, 1 config/start error or undelivered spans, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from service import config as wconfig
from service.config import ConfigError
from service.log import describe

__all__ = ["main", "default_config_path"]

log = logging.getLogger("wirespan.cli")

#: Longest ``replay`` (and ``run`` at shutdown) waits for queues to drain (default of --drain-timeout).
DEFAULT_DRAIN_TIMEOUT = 30.0

# Exit codes (README "Commands"). 2 is argparse's usage error, so a capture cut short gets 3
# (tshark says 2 for both a usage error and a cut-short file; scripts need to tell them apart).
EXIT_OK = 0
EXIT_ERROR = 1          #: configuration/start error, unreadable capture, spans not delivered
EXIT_USAGE = 2
EXIT_TRUNCATED = 3      #: a capture was cut short or damaged; what came before it was delivered
EXIT_INTERRUPTED = 130  #: SIGINT/SIGTERM during a replay (what was read was drained)
EXIT_BROKEN_PIPE = 141  #: stdout's reader went away (128 + SIGPIPE, as Unix tools)


def default_config_path() -> Path:
    """config/default.yaml: beside the packages in a checkout or an editable
    install, else where the installed distribution put its data files
    (``share/wirespan/config/``, found through the distribution's file list so
    venvs, ``--user`` and ``--target`` installs all work)."""
    here = Path(__file__).resolve().parent.parent
    candidates = [here / "config" / "default.yaml"]
    try:
        from importlib import metadata
        dist = metadata.distribution("wirespan")
        for f in dist.files or ():
            if f.as_posix().endswith("share/wirespan/config/default.yaml"):
                candidates.append(Path(dist.locate_file(f)).resolve())
        # pip --target moves data files beside the packages (its RECORD paths do not follow)
        candidates.append(Path(dist.locate_file("")) / "share" / "wirespan" / "config" / "default.yaml")
    except Exception:  # not installed, or broken metadata: the checkout path is all there is
        pass
    candidates.append(Path(sys.prefix) / "share" / "wirespan" / "config" / "default.yaml")
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError("the built-in default config was not found (looked in: "
                      + ", ".join(str(c) for c in candidates) + "); pass --config")


def _config_files(args: argparse.Namespace) -> list[str]:
    return list(args.config) if args.config else [str(default_config_path())]


def _flush_stdout() -> None:
    """Flush stdout; if the reader went away (``wirespan run | head``), point it at /dev/null
    so the interpreter's own flush at exit does not complain."""
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError, OSError):
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass


def _print_errors(errors: list[str]) -> None:
    for e in errors:
        print(f"error: {e}", file=sys.stderr)


# ---------------------------------------------------------------------------
# validate / components
# ---------------------------------------------------------------------------
def cmd_validate(args: argparse.Namespace) -> int:
    try:
        wconfig.load(_config_files(args), args.set)
    except ConfigError as e:
        _print_errors(e.errors)
        return 1
    print("config is valid")
    return 0


def cmd_components(args: argparse.Namespace) -> int:
    from service.registry import default_registry
    rows = []
    for e in default_registry().entries():
        ok, why = e.status()
        rows.append({"kind": e.kind, "type": e.type, "source": e.source, "available": ok,
                     "target": e.target if isinstance(e.target, str) else repr(e.target),
                     **({} if ok else {"reason": why})})
    from service import speedups
    for name, built in speedups.status().items():
        rows.append({"kind": "accelerator", "type": name, "source": "C", "available": built,
                     "target": speedups.ACCELERATORS[name],
                     **({} if built else {"reason": speedups.why_not(name)})})
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    w_type = max([len(r["type"]) for r in rows] + [4])
    w_src = max([len(r["source"]) for r in rows] + [6])
    print(f"{'KIND':<11} {'TYPE':<{w_type}} {'SOURCE':<{w_src}} STATUS")
    for r in rows:
        status = ("available" if r["available"] else f"unavailable ({r['reason']})") if r["kind"] != "accelerator" \
            else ("in use" if r["available"] else f"not in use: {r['reason']}")
        print(f"{r['kind']:<11} {r['type']:<{w_type}} {r['source']:<{w_src}} {status}")
    return 0


# ---------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------
def _install_signals(q: queue.SimpleQueue, which: tuple[int, ...]) -> None:
    # SimpleQueue.put is reentrant, so it is safe in a signal handler.
    for s in which:
        signal.signal(s, lambda signum, _frame: q.put(signum))


def _stop_with_timeout(stop: Any, timeout: float, sigq: queue.SimpleQueue, what: Any) -> tuple[bool, list[str]]:
    """Run ``stop()`` in a thread; (finished, problems). A second SIGINT/SIGTERM forces the exit."""
    result: list[list[str]] = []

    def drain() -> None:
        try:
            result.append(stop())
        finally:
            sigq.put(None)  # wake the wait below at once, rather than at its next poll

    t = threading.Thread(target=drain, name="wirespan-drain", daemon=True)
    t.start()
    deadline = time.monotonic() + timeout
    while t.is_alive() and time.monotonic() < deadline:
        try:
            sig = sigq.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
        except queue.Empty:
            continue
        if sig is None:
            t.join()
            break
        if sig in (signal.SIGINT, signal.SIGTERM):
            print("wirespan: forced exit while draining", file=sys.stderr)
            sys.stderr.flush()
            _flush_stdout()
            os._exit(1)
    if t.is_alive():
        step = what() if callable(what) else ""
        return False, [f"drain timed out after {timeout:g}s" + (f" while at: {step}" if step else "")]
    return True, result[0] if result else []


def cmd_run(args: argparse.Namespace) -> int:
    from service import log as slog
    from service.pipeline import BuildError, Runner, StartError

    files = _config_files(args)
    sets = list(args.set or [])
    slog.setup("info")

    stats = bool(args.stats or args.stats_json)

    def load():
        if not stats:
            return wconfig.load(files, sets)
        return wconfig.validate(with_summary(wconfig.load_raw(files, sets)))

    runner = Runner(load, configure_logs=True)
    sigq: queue.SimpleQueue = queue.SimpleQueue()
    _install_signals(sigq, (signal.SIGTERM, signal.SIGINT, signal.SIGHUP) + ((signal.SIGUSR1,) if stats else ()))
    try:
        runner.start()
    except ConfigError as e:
        _print_errors(e.errors)
        return 1
    except (BuildError, StartError) as e:
        _print_errors([str(e)])
        return 1
    log.info("wirespan running (config: %s)", ", ".join(files))
    reason = "signal"
    while True:
        try:
            sig = sigq.get(timeout=0.2)
        except queue.Empty:
            sig = None
        if sig in (signal.SIGTERM, signal.SIGINT):
            log.info("received %s, shutting down", signal.Signals(sig).name)
            break
        if sig == signal.SIGHUP:
            log.info("received SIGHUP, reloading configuration")
            runner.reload()
        if stats and sig == signal.SIGUSR1:  # the summary so far, on demand (logs and stdout stay clean)
            _report_summary(args, sys.stderr)
        if runner.finished():
            reason = "done"
            log.info("all receivers finished; draining")
            break
    finished, problems = _stop_with_timeout(runner.stop, args.drain_timeout, sigq,
                                            lambda: runner.service.current_step if runner.service else "")
    if stats:
        _report_summary(args, sys.stderr)
    # capture files that could not be read to their end (pcap receivers) decide the code too
    inputs = _summary(runner.service) if runner.service is not None else {}
    code = _verdict(inputs, problems, False, args.allow_truncated)
    if reason == "done":
        log.info("exiting")
    _flush_stdout()
    if not finished:
        sys.stderr.flush()
        os._exit(code)
    return code


# ---------------------------------------------------------------------------
# replay
# ---------------------------------------------------------------------------
def _connector_ids(raw: dict[str, Any]) -> set[str]:
    conns = raw.get("connectors") or {}
    return set(conns) if isinstance(conns, dict) else set()


def replay_config(raw: dict[str, Any], capture: str, output: str | None) -> dict[str, Any]:
    """The pipelines of ``raw`` reading ``capture`` (and writing ``output``).

    Traces pipelines read ``capture``; metrics pipelines keep their connectors as receivers.
    With ``output``, every pipeline writes to the one ``file`` exporter (spans and metrics
    lines in one file, as the Collector's file exporter of both signals) and traces pipelines
    keep feeding their connectors."""
    raw = dict(raw)
    conns = _connector_ids(raw)
    raw["receivers"] = {"pcap": {"path": capture}}
    if output is not None:
        raw["exporters"] = {"file": {"path": output}}
    svc = dict(raw.get("service") or {})
    pipes = {}
    for pid, p in (svc.get("pipelines") or {}).items():
        p = dict(p or {})
        traces = not str(pid).startswith("metrics")
        if traces:
            p["receivers"] = ["pcap"]
        if output is not None:
            kept = [e for e in (p.get("exporters") or []) if e in conns] if traces else []
            p["exporters"] = ["file", *kept]
        pipes[pid] = p
    svc["pipelines"] = pipes
    # One-shot: never take the ports of a wirespan service running on this node.
    tel = dict(svc.get("telemetry") or {})
    tel["metrics"] = {**(tel.get("metrics") or {}), "address": ""}
    tel["health"] = {**(tel.get("health") or {}), "address": ""}
    svc["telemetry"] = tel
    raw["service"] = svc
    return raw


def _with_tree(raw: dict[str, Any], keep_file: bool) -> dict[str, Any]:
    """Every pipeline exports to one ``debug`` exporter printing trees (and to ``file``, if kept)."""
    raw = dict(raw)
    raw["exporters"] = {**({"file": raw["exporters"]["file"]} if keep_file else {}),
                        "debug/tree": {"verbosity": "tree"}}
    svc = dict(raw.get("service") or {})
    # Traces pipelines print trees; metrics pipelines (and the connectors feeding them) are kept
    # only beside the file, which takes their metrics lines.
    conns = _connector_ids(raw) if keep_file else set()
    pipes = {}
    for pid, p in (svc.get("pipelines") or {}).items():
        p = dict(p or {})
        if str(pid).startswith("metrics"):
            if keep_file:
                pipes[pid] = p
            continue
        kept = [e for e in (p.get("exporters") or []) if e in conns]
        p["exporters"] = (["file"] if keep_file else []) + ["debug/tree"] + kept
        pipes[pid] = p
    svc["pipelines"] = pipes
    if not keep_file:
        raw.pop("connectors", None)
    raw["service"] = svc
    return raw


#: The id of the exporter ``--stats`` adds to every traces pipeline (service/summary.py).
SUMMARY_EXPORTER = "wirespan_summary"


def with_summary(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with every traces pipeline also exporting to the span summary (``--stats``)."""
    raw = dict(raw)
    raw["exporters"] = {**(raw.get("exporters") or {}),
                        SUMMARY_EXPORTER: {"class": "service.summary:SummaryExporter"}}
    svc = dict(raw.get("service") or {})
    pipes = {}
    for pid, p in (svc.get("pipelines") or {}).items():
        p = dict(p or {})
        if not str(pid).startswith("metrics"):
            p["exporters"] = [*(p.get("exporters") or []), SUMMARY_EXPORTER]
        pipes[pid] = p
    svc["pipelines"] = pipes
    raw["service"] = svc
    return raw


def _report_summary(args: argparse.Namespace, out: Any, extra: dict[str, Any] | None = None) -> None:
    """Print the span summary table (``--stats``) on ``out`` and write it as JSON (``--stats-json``)."""
    from service.summary import summary_for
    s = summary_for()
    if args.stats:
        rate = ""
        if extra and extra.get("elapsed_s"):
            rate = f" in {extra['elapsed_s']:.2f}s ({len(s) / max(1e-9, extra['elapsed_s']):,.0f} spans/s)"
        print(s.table(f"spans by protocol and endpoint{rate}:"), file=out, end="")
        out.flush()
    if args.stats_json:
        rep = s.report()
        rep["totals"].update(extra or {})
        tmp = f"{args.stats_json}.tmp"
        with open(tmp, "w") as f:
            json.dump(rep, f, indent=1)
            f.write("\n")
        os.replace(tmp, args.stats_json)  # a reader never sees half a file (run rewrites it at each SIGUSR1)


def _replay_sets(sets: list[str], output: bool) -> tuple[list[str], list[str]]:
    """Split ``replay``'s ``--set``s into those applied to the config before its receivers (and,
    with ``--output``, exporters) are replaced and those applied to the replacements; refuse,
    naming the path, any that the replacement would silently drop.

    Raises:
        ConfigError: every refused ``--set``, each with the reason.
    """
    before: list[str] = []
    after: list[str] = []
    errors: list[str] = []
    for s in sets:
        key = s.partition("=")[0].strip()
        parts = key.split("::") if "::" in key else key.split(".")
        section, comp = parts[0], (parts[1] if len(parts) > 1 else "")
        opt = parts[2] if len(parts) > 2 else ""
        why = ""
        if section == "receivers":
            if comp != "pcap":
                why = "replay reads FILE with one pcap receiver; only receivers.pcap.* applies"
            elif opt == "path" or len(parts) == 2:
                why = "replay reads FILE (give the capture as FILE); set receivers.pcap.<option> instead"
        elif section == "exporters" and output:
            if comp != "file":
                why = "with --output, replay writes one file exporter; only exporters.file.* applies"
            elif opt == "path" or len(parts) == 2:
                why = "--output gives the file exporter's path; set exporters.file.<option> instead"
        elif section == "service" and comp == "pipelines" and len(parts) > 2:
            if len(parts) == 3 or parts[3] == "receivers" or (output and parts[3] == "exporters"):
                why = "replay sets the pipelines' receivers" + (" and exporters" if output else "") + \
                      "; set their processors (service.pipelines.<id>.processors) instead"
        elif section == "service" and comp == "telemetry" and opt in ("metrics", "health"):
            why = "replay serves no telemetry endpoints (wirespan run does)"
        if why:
            errors.append(f"--set {s}: {why}")
        elif section == "receivers" or (section == "exporters" and output):
            after.append(s)
        else:
            before.append(s)
    if errors:
        raise ConfigError(errors)
    return before, after


def _summary(svc: Any) -> dict[str, Any]:
    from service import telemetry as tm
    out: dict[str, Any] = {"packets": 0, "connections": 0, "events": 0, "spans": 0, "exported": 0, "drops": {}}
    drops: dict[str, int] = out["drops"]

    def add_drops(d: Any, prefix: str = "") -> None:
        if isinstance(d, dict):
            for k, v in d.items():
                if isinstance(v, (int, float)) and v:
                    drops[prefix + str(k)] = drops.get(prefix + str(k), 0) + int(v)

    out["errors"] = []
    out["truncated"] = []
    for rid, r in svc.receivers.items():
        st = getattr(r, "stats", None) or {}
        cut = list(st.get("truncated") or ())
        out["truncated"] += cut  # each names its file and where it stopped
        out["errors"] += [f"receivers::{rid}: {e}" for e in st.get("errors") or () if e not in cut]
        out["packets"] += int(st.get("packets", 0) or 0)
        out["connections"] += int(st.get("connections", 0) or 0)
        add_drops(st.get("drops"))
        for reason in ("refused", "queue_full"):
            n = tm.counter_value(tm.RECEIVER_DROPPED, receiver=rid, reason=reason)
            if n and reason not in (st.get("drops") or {}):
                drops[reason] = drops.get(reason, 0) + int(n)
    for chain in svc.pipelines.values():
        for p in chain:
            st = getattr(p, "stats", None)
            if isinstance(st, dict) and p is chain[0]:
                protos = st.get("protocols")
                if isinstance(protos, dict):
                    for k, v in protos.items():
                        if isinstance(v, (int, float)):
                            out.setdefault("protocols", {})[k] = out.get("protocols", {}).get(k, 0) + int(v)
                add_drops(st.get("drops"))
    s = svc.stats()
    out["events"] = sum(s["events"].values())
    out["spans"] = sum(s["spans"].values())
    out["exported"] = {eid: e["offered"] for eid, e in s["exporters"].items()}
    out["exported_points"] = {eid: e["points_offered"] for eid, e in s["exporters"].items() if e.get("points_offered")}
    return out


def _print_summary(summary: dict[str, Any], elapsed: float) -> None:
    p = sys.stderr
    drops = summary["drops"]
    print(f"replay: {summary['packets']} packets, {summary['connections']} connections, "
          f"{summary['events']} events, {summary['spans']} spans in {elapsed:.2f}s", file=p)
    if summary.get("protocols"):
        print("replay: protocols: " + ", ".join(f"{k}={v}" for k, v in sorted(summary["protocols"].items())), file=p)
    points = summary.get("exported_points") or {}
    for eid, n in summary["exported"].items():
        more = f", {points[eid]} metric points" if points.get(eid) else ""
        print(f"replay: exporters::{eid}: {n} spans{more}", file=p)
    if drops:
        print("replay: drops: " + ", ".join(f"{k}={v}" for k, v in sorted(drops.items())), file=p)
    else:
        print("replay: drops: none", file=p)


def _merge_summaries(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Workers each read the whole file (packets: the same count) and follow their own connections."""
    out: dict[str, Any] = {"packets": 0, "connections": 0, "events": 0, "spans": 0, "exported": {}, "drops": {},
                           "errors": [], "truncated": []}
    for p in parts:
        out["packets"] = max(out["packets"], p.get("packets", 0))
        for k in ("connections", "events", "spans"):
            out[k] += p.get(k, 0)
        for eid, n in (p.get("exported") or {}).items():
            out["exported"][eid] = out["exported"].get(eid, 0) + n
        for k, n in (p.get("drops") or {}).items():
            out["drops"][k] = out["drops"].get(k, 0) + n
        for k, n in (p.get("protocols") or {}).items():
            out.setdefault("protocols", {})[k] = out.get("protocols", {}).get(k, 0) + n
        out["errors"] += [e for e in p.get("errors") or () if e not in out["errors"]]
        out["truncated"] += [e for e in p.get("truncated") or () if e not in out["truncated"]]
    return out


def _verdict(summary: dict[str, Any], problems: list[str], interrupted: bool, allow_truncated: bool) -> int:
    """Print what went wrong and return the exit code: undelivered spans and input errors 1,
    then an interruption 130, then a capture cut short 3 (unless ``--allow-truncated``)."""
    problems = problems + [e for e in summary.get("errors") or () if e not in problems]
    _print_errors(problems)
    cut = summary.get("truncated") or []
    for m in cut:
        if allow_truncated:
            print(f"warning: {m} (accepted: --allow-truncated)", file=sys.stderr)
        else:
            print(f"error: {m} (exit {EXIT_TRUNCATED}; --allow-truncated accepts a cut-short capture)",
                  file=sys.stderr)
    if problems:
        return EXIT_ERROR
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_TRUNCATED if cut and not allow_truncated else EXIT_OK


def _unreadable_input(path: str) -> str | None:
    """One line on why ``replay`` cannot read ``path`` at all, or None: checked before anything
    starts, so ``--output`` is not emptied and no worker is forked for a file that is no capture."""
    from receivers.pcap import CaptureError, capture_files, check_capture
    files = capture_files(path)
    if not files:
        if os.path.isdir(path):
            return f"{path}: no capture files in this directory (.pcap, .pcapng, .cap, .dmp)"
        return f"{path}: no such file" if not any(c in path for c in "*?[") else f"{path}: no file matches"
    for f in files:
        try:
            check_capture(f)
        except CaptureError as e:
            return f"{f}: {e}"
    return None


def _concatenate(parts: list[str], output: str) -> None:
    """``output`` = the parts in order. The first part becomes the output (a rename: the parts
    are written beside it), the others are appended in the kernel (copy_file_range), so
    the workers' output is not read back through Python."""
    import shutil
    first, rest = (parts[0], parts[1:]) if parts and os.path.exists(parts[0]) else (None, parts)
    if first is not None:
        os.replace(first, output)
    with open(output, "ab" if first is not None else "wb") as out:
        for part in rest:
            if not os.path.exists(part):
                continue
            with open(part, "rb") as f:
                left = os.fstat(f.fileno()).st_size
                try:
                    while left > 0:
                        n = os.copy_file_range(f.fileno(), out.fileno(), left)
                        if n <= 0:
                            break
                        left -= n
                except (AttributeError, OSError):   # not Linux, or a filesystem without it
                    f.seek(os.fstat(f.fileno()).st_size - left)
                    shutil.copyfileobj(f, out, 1 << 20)


def _replay_parallel(args: argparse.Namespace) -> int:
    """``replay --workers N``: N forked workers, each following the connections of one shard.

    Python runs one core per process, so a capture is replayed up to N times faster on
    N cores. The parent imports the pipeline's modules first and forks (no thread runs
    yet), so workers start warm. Each writes its own part; the parts are concatenated
    into ``--output`` and the summaries merged.
    """
    import copy
    import shutil
    import tempfile
    import traceback

    if not args.output:
        print("wirespan replay: --workers needs --output (workers must not share exporters)", file=sys.stderr)
        return 2
    _warm_up()  # what every worker needs, once, before forking (done already when auto chose)
    n = args.workers
    output = os.path.abspath(args.output)
    tmp = tempfile.mkdtemp(prefix=".wirespan-replay-", dir=os.path.dirname(output) or ".")
    t0 = time.monotonic()
    workers: list[tuple[int, str, str]] = []
    codes: list[int] = []
    parts: list[dict[str, Any]] = []
    problems: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        for k in range(n):
            part, summ = os.path.join(tmp, f"part{k}.jsonl"), os.path.join(tmp, f"summary{k}.json")
            pid = os.fork()
            if pid == 0:  # the worker
                code = 1
                try:
                    sub = copy.copy(args)
                    sub.output, sub.shard, sub.summary_json, sub.workers = part, f"{k}/{n}", summ, 1
                    code = cmd_replay(sub)
                except BaseException as e:  # the parent reports "left no summary"; say why once
                    if os.environ.get("WIRESPAN_DEBUG"):
                        traceback.print_exc()
                    print(f"wirespan replay: worker {k}: {describe(e)}", file=sys.stderr)
                finally:
                    _flush_stdout()
                    sys.stderr.flush()
                    os._exit(code)
            workers.append((pid, part, summ))
        sigq: queue.SimpleQueue = queue.SimpleQueue()
        _install_signals(sigq, (signal.SIGTERM, signal.SIGINT))
        pending = {pid: i for i, (pid, _, _) in enumerate(workers)}
        codes = [1] * n
        while pending:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid in pending:
                codes[pending.pop(pid)] = os.waitstatus_to_exitcode(status)
                continue
            try:
                sig = sigq.get(timeout=0.02)
            except queue.Empty:
                continue
            for wpid in pending:  # the workers drain what they read, as a single replay does
                os.kill(wpid, sig)
        interrupted = False
        for k, (_, _part, summ) in enumerate(workers):
            try:
                with open(summ) as f:
                    got = json.load(f)
                parts.append(got["summary"])
                problems += [f"worker {k}: {e}" for e in got["problems"]]
                interrupted = interrupted or bool(got.get("interrupted"))
            except (OSError, ValueError, KeyError):
                problems.append(f"worker {k} exited with {codes[k]} and left no summary")
        _concatenate([part for _, part, _ in workers], output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    merged = _merge_summaries(parts)
    _print_summary(merged, time.monotonic() - t0)
    code = _verdict(merged, problems, interrupted, args.allow_truncated)
    if code in (EXIT_OK, EXIT_TRUNCATED):
        print(f"replay: spans written to {output} ({n} workers)", file=sys.stderr)
    return code


#: ``replay --workers auto``: fork workers only for captures this large (smaller ones are
#: done before the workers would have paid for themselves) and at most this many. Measured
#: here on two free cores, 2 workers vs one process (wall, medians of 3): 0.93x at 6.5 MB,
#: 1.19x at 13 MB, 1.05-1.22x at 18-26 MB, 1.54x at 104 MB.
AUTO_WORKERS_MIN_MB = 16
AUTO_MAX_WORKERS = 4
#: ... and only as many as there are cores free of other work, sampled this long from
#: /proc/stat before forking (niced work too: see _free_cores). Every
#: worker reads and decodes the whole file and the parts are concatenated, so a worker on a
#: core that is busy elsewhere makes the replay slower than one process: measured 0.68-0.93x
#: on this 2-core machine with 1.2-1.5 cores busy, 0.81x at 249 MB (issue 19 item 13).
AUTO_IDLE_SAMPLE_S = 0.15
#: A worker needs this much of a free core.
AUTO_CORE_PER_WORKER = 0.75
#: ... and only where the model below predicts at least this wall speed-up over one process
#: (issue 21: on 2 cores 2 workers must beat one by 1.6x, or auto must not use them).
AUTO_MIN_SPEEDUP = 1.6
#: The model: every worker reads and decodes the whole file to find its connections, a share
#: of one process's CPU that N workers do not split (measured here: a shard of two costs 0.59
#: of one process in-process on 100k packets of small HTTP/1 exchanges, so 0.18 is repeated);
#: the rest splits as the traffic does over the shards, the largest one deciding; forking and
#: concatenating the parts cost the rest (measured 1.54x wall on two free cores where the
#: model's bound was 1.69x). Two workers: 0.91 / (0.18 + 0.82 / 2) = 1.54x, below 1.6x: on 2
#: cores auto replays in one process; 3 free cores predict 2.0x, 4 predict 2.4x.
AUTO_SHARED_SHARE = 0.18
AUTO_EFFICIENCY = 0.91
#: Packets read from the capture's start to see how its traffic spreads over the shards (one
#: big connection does not split: its shard does all the work).
AUTO_SAMPLE_PACKETS = 20_000


def predicted_speedup(largest_share: float) -> float:
    """Wall speed-up of sharded workers over one process when the busiest shard carries
    ``largest_share`` of the traffic (1/N when it spreads evenly over N): the model above."""
    return AUTO_EFFICIENCY / (AUTO_SHARED_SHARE + (1 - AUTO_SHARED_SHARE) * max(0.0, min(1.0, largest_share)))


def _largest_shard_share(path: str, n: int, packets: int = AUTO_SAMPLE_PACKETS) -> float:
    """The busiest of ``n`` shards' share of the first ``packets`` TCP packets of ``path``
    (each weighed by its frame bytes plus a fixed per-packet cost); 1/n when it cannot tell
    (a compressed or unreadable input, no TCP)."""
    from receivers.capture_stream import NEW_VIEW
    from receivers.packet import link_decoder
    from receivers.pcap import open_capture, shard_of
    try:
        reader = open_capture(path)
        if getattr(reader, "streaming", False):
            return 1 / n
        view = reader.view
        loads = [0] * n
        seen = 0
        decoders: dict[int, Any] = {}
        for lt, _ts, off, end in reader:
            if lt == NEW_VIEW:
                continue
            dec = decoders.get(lt)
            if dec is None:
                dec = decoders[lt] = link_decoder(lt)
            res = dec(view, off, end)
            if res.__class__ is str:
                continue
            src, dst, sport, dport = res[0], res[1], res[2], res[3]
            loads[shard_of(src, dst, sport, dport, n)] += end - off + 200
            seen += 1
            if seen >= packets:
                break
    except Exception:  # a sample only: the replay itself reports what is wrong with the file
        return 1 / n
    total = sum(loads)
    return max(loads) / total if total else 1 / n


def _warm_up() -> None:
    """Import what a replay runs (every protocol parser included): before forking, so workers
    start warm, and while ``--workers auto`` samples the cores, so the sample costs no time."""
    import exporters.file  # noqa: F401
    import processors.batch  # noqa: F401
    import processors.protocols as protocols
    import receivers.pcap  # noqa: F401
    from service.pipeline import Service  # noqa: F401
    for name in protocols.PROTOCOLS:
        protocols.load(name)


def _free_cores(cores: int, sample_s: float = AUTO_IDLE_SAMPLE_S, during: Any = None) -> float:
    """Cores (of ``cores``) not busy with other work over ``sample_s``, while ``during()`` runs
    (this process's own CPU time is taken out of the sample, so it may do useful work).

    Niced work counts as busy: with the kernel's autogroup scheduling (on here, and by
    default on desktop and server distributions) another session's niced processes get
    their share of the CPU next to a replay at nice 0, they do not yield to it.
    """
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        v += [0] * (8 - len(v))
        user, nice, system, _idle, _iowait, irq, softirq, steal = v
        return user + nice + system + irq + softirq + steal, sum(v)
    try:
        t0, own0 = time.monotonic(), os.times()
        busy0, total0 = read()
        if during is not None:
            during()
        time.sleep(max(0.0, sample_s - (time.monotonic() - t0)))
        busy1, total1 = read()
        own1 = os.times()
    except (OSError, ValueError):
        return float(cores)  # no /proc: assume the cores are ours
    if total1 <= total0:
        return float(cores)
    own = (own1.user - own0.user + own1.system - own0.system) * hz
    ncpu = os.cpu_count() or cores
    busy = max(0.0, busy1 - busy0 - own) / (total1 - total0) * ncpu
    return max(0.0, min(float(cores), ncpu - busy))


def _workers(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of workers: {text!r} (N or auto)") from None
    if n < 1:
        raise argparse.ArgumentTypeError("--workers must be at least 1")
    return n


def _has_connectors(args: argparse.Namespace) -> bool:
    try:
        return bool(_connector_ids(wconfig.load_raw(_config_files(args), [])))
    except ConfigError:
        return False  # reported when the config is read for real


def _auto_workers(args: argparse.Namespace, free_cores: Any = None, balance: Any = None) -> int:
    """How many processes ``--workers auto`` replays with: for a capture of AUTO_WORKERS_MIN_MB
    or more written to a file, the most workers (one per free core, at most AUTO_MAX_WORKERS)
    for which ``predicted_speedup`` of the sampled traffic is at least AUTO_MIN_SPEEDUP; else 1.
    ``free_cores(cores)`` and ``balance(n)`` (the busiest shard's share) replace the samples."""
    if not args.output or args.shard:
        return 1
    from receivers.pcap import capture_files
    try:
        size = sum(os.path.getsize(f) for f in capture_files(args.file))
    except OSError:
        size = 0
    if size < AUTO_WORKERS_MIN_MB * 1_000_000:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    n = min(cores, AUTO_MAX_WORKERS)
    # The model's best case is the traffic spread evenly (1/n a shard), and its gain grows with
    # n: where even that is below AUTO_MIN_SPEEDUP (2 cores: 1.54x) the answer is one process,
    # and neither the cores nor the traffic are sampled (that cost a third of a 26 MB
    # replay's CPU here, for an answer known already).
    if n < 2 or predicted_speedup(1 / n) < AUTO_MIN_SPEEDUP:
        return 1
    free = free_cores(cores) if free_cores is not None else _free_cores(cores, during=_warm_up)
    n = min(n, int(free / AUTO_CORE_PER_WORKER))
    if n < 2:
        log.info("replay: --workers auto: %.1f of %d cores free, one process", free, cores)
        return 1
    files = capture_files(args.file)
    while n >= 2 and predicted_speedup(1 / n) >= AUTO_MIN_SPEEDUP:  # (below it no spread helps)
        share = balance(n) if balance is not None else _largest_shard_share(files[0], n)
        gain = predicted_speedup(share)
        if gain >= AUTO_MIN_SPEEDUP:
            return n
        log.info("replay: --workers auto: %d workers would gain %.2fx (busiest shard %.0f%%), below %.1fx",
                 n, gain, 100 * share, AUTO_MIN_SPEEDUP)
        n -= 1
    return 1


def cmd_replay(args: argparse.Namespace) -> int:
    from service import log as slog
    from service.pipeline import BuildError, Service, StartError

    slog.setup("warning" if not args.verbose else "info")
    if not args.shard:  # checked once, by the parent: a worker's input was checked before the fork
        bad = _unreadable_input(args.file)
        if bad:
            print(f"error: {bad}", file=sys.stderr)
            return EXIT_ERROR
    if args.file == "-" and args.workers != 1:
        if args.workers != "auto":
            print("replay: standard input is read by one process (--workers 1)", file=sys.stderr)
        args.workers = 1
    if args.tree or args.stats or args.stats_json:
        args.workers = 1  # the trees and the summary need every span in one process
    elif args.workers == "auto" and not args.shard and _has_connectors(args):
        args.workers = 1  # a connector's metrics need every span in one process
    if args.workers == "auto":
        args.workers = _auto_workers(args)
    if args.workers > 1 and not args.shard:
        return _replay_parallel(args)
    capture = args.file if args.file == "-" else os.path.abspath(args.file)
    output = os.path.abspath(args.output) if args.output else None
    try:
        before, after = _replay_sets(args.set, output is not None)
        raw = replay_config(wconfig.load_raw(_config_files(args), before), capture, output)
        for s in after:  # receivers.pcap.* and (with --output) exporters.file.*: onto what replay built
            raw = wconfig.apply_set(raw, s)
        if args.bpf_filter is not None:
            raw["receivers"]["pcap"]["bpf_filter"] = args.bpf_filter
        if args.keylog is not None:
            raw["receivers"]["pcap"]["keylog_file"] = os.path.abspath(args.keylog)
        if args.tree:
            raw = _with_tree(raw, output is not None)
        if args.stats or args.stats_json:
            raw = with_summary(raw)
            from service.summary import summary_for
            summary_for().clear()  # one replay's spans: a second replay in this process starts from none
        if args.shard:
            k, _, n = args.shard.partition("/")
            raw["receivers"]["pcap"]["shard"] = {"index": int(k), "count": int(n)}
        cfg = wconfig.validate(raw)
        slog.setup("info" if args.verbose else "warning", cfg.telemetry.logs.encoding)
        svc = Service(cfg)
    except ConfigError as e:
        _print_errors(e.errors)
        return 1
    except BuildError as e:
        _print_errors([str(e)])
        return 1
    sigq: queue.SimpleQueue = queue.SimpleQueue()
    _install_signals(sigq, (signal.SIGTERM, signal.SIGINT))
    t0 = time.monotonic()
    try:
        svc.start()
    except StartError as e:
        _print_errors([str(e)])
        return 1
    interrupted = False
    while not svc.wait_receivers(0.2):
        try:
            sig = sigq.get_nowait()
        except queue.Empty:
            continue
        print(f"replay: interrupted by {signal.Signals(sig).name}; draining what was read", file=sys.stderr)
        interrupted = True
        break
    finished, problems = _stop_with_timeout(lambda: svc.shutdown() + svc.undelivered(), args.drain_timeout, sigq,
                                            lambda: svc.current_step)
    if not finished:
        problems += svc.undelivered()
    _flush_stdout()
    summary = _summary(svc)
    if args.summary_json:  # a worker: the parent prints one merged summary and decides the exit code
        with open(args.summary_json, "w") as f:
            json.dump({"summary": summary, "problems": problems, "interrupted": interrupted}, f)
        code = EXIT_ERROR if problems else EXIT_OK
        if not finished:
            os._exit(code)
        return code
    _print_summary(summary, time.monotonic() - t0)
    if args.stats or args.stats_json:
        _report_summary(args, sys.stdout, {"elapsed_s": round(time.monotonic() - t0, 3),
                                           "packets": summary["packets"], "connections": summary["connections"]})
    code = _verdict(summary, problems, interrupted, args.allow_truncated)
    if output and code in (EXIT_OK, EXIT_TRUNCATED):
        print(f"replay: spans written to {output}", file=sys.stderr)
    if not finished:
        sys.stderr.flush()
        os._exit(code)
    return code


# ---------------------------------------------------------------------------
def _duration(text: str) -> float:
    try:
        return wconfig.parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="wirespan", description="Raw TCP traffic to OpenTelemetry traces.")
    ap.add_argument("--version", action="version", version="wirespan 0.1.0")
    sub = ap.add_subparsers(dest="command", required=True)

    def config_opts(p: argparse.ArgumentParser, help_config: str) -> None:
        p.add_argument("--config", action="append", metavar="FILE", help=help_config)
        p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", default=[],
                       help="override one value, e.g. processors.batch.timeout=1s (repeatable)")

    p = sub.add_parser("run", help="run the pipelines until stopped (SIGHUP reloads)")
    config_opts(p, "pipeline YAML (repeatable, merged in order); default: the built-in default pipeline")
    p.add_argument("--drain-timeout", type=_duration, default=DEFAULT_DRAIN_TIMEOUT,
                   help="longest wait for queues to drain at shutdown (default 30s)")
    p.add_argument("--allow-truncated", action="store_true",
                   help=f"a capture file (pcap receiver) cut short or damaged is not an error (else exit "
                        f"{EXIT_TRUNCATED})")
    p.add_argument("--stats", action="store_true",
                   help="count the spans per protocol and endpoint; SIGUSR1 prints the table on stderr (and at exit)")
    p.add_argument("--stats-json", metavar="PATH",
                   help="with the counting of --stats, write the summary as JSON to PATH at each SIGUSR1 and at exit")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check a config and exit 0, or print its errors and exit 1")
    config_opts(p, "pipeline YAML (repeatable, merged in order)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("components", help="list every component type, its kind and where it comes from")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=cmd_components)

    p = sub.add_parser("replay", help="replay a capture file through the pipeline once, then exit")
    p.add_argument("file", metavar="FILE",
                   help="pcap or pcapng capture, also compressed (.gz, .zst, .xz, .bz2: streamed), a directory, "
                        "a glob, or - for standard input (tcpdump -w - | wirespan replay -)")
    config_opts(p, "pipeline YAML whose receivers are replaced by the capture (default: the built-in one)")
    p.add_argument("--output", metavar="OUT.jsonl", help="write spans as OTLP JSON lines instead of the "
                                                         "config's exporters")
    p.add_argument("--drain-timeout", type=_duration, default=DEFAULT_DRAIN_TIMEOUT,
                   help="longest wait for everything to be delivered after the file ends (default 30s)")
    p.add_argument("--workers", type=_workers, default="auto", metavar="N|auto",
                   help="with --output: split the connections over N processes; spans of one connection "
                        "stay in order, the file is their concatenation. auto (the default): one per free core, "
                        f"at most {AUTO_MAX_WORKERS}, for a capture of {AUTO_WORKERS_MIN_MB} MB or more "
                        f"written with --output, where they are predicted to gain {AUTO_MIN_SPEEDUP}x (3 or "
                        "more free cores, traffic spread over many connections); else 1")
    p.add_argument("--allow-truncated", action="store_true",
                   help=f"a capture cut short (or damaged) exits 0 after replaying what it holds, not "
                        f"{EXIT_TRUNCATED}")
    p.add_argument("-f", "--bpf-filter", metavar="EXPR",
                   help="keep only the packets this BPF filter expression matches (tcpdump's language, compiled by "
                        "libpcap: \"tcp port 8080 and host 10.0.0.5\"); the pcap receiver's bpf_filter option")
    p.add_argument("--keylog", metavar="FILE",
                   help="decrypt TLS with this NSS key log (SSLKEYLOGFILE: TLS 1.2 CLIENT_RANDOM lines, TLS 1.3 "
                        "*_TRAFFIC_SECRET lines), as tshark's tls.keylog_file; the pcap receiver's keylog_file "
                        "option. Secrets in the capture's pcapng Decryption Secrets Blocks are used without it")
    p.add_argument("--tree", action="store_true",
                   help="print every trace as an indented tree on stdout when done (instead of the config's "
                        "exporters; beside --output's file); one process. A capture's calls nest under their "
                        "host's requests with --set processors.protocols.assemble=true")
    p.add_argument("--stats", action="store_true",
                   help="print a table of the spans per protocol and endpoint (service, operation: count, errors, "
                        "p50/p95/p99 latency, bytes) on stdout at the end, as tshark -z http,tree; one process")
    p.add_argument("--stats-json", metavar="PATH", help="write that summary as JSON to PATH; one process")
    p.add_argument("--shard", help=argparse.SUPPRESS)          # K/N: one worker of --workers
    p.add_argument("--summary-json", help=argparse.SUPPRESS)   # a worker hands its summary back here
    p.add_argument("-v", "--verbose", action="store_true", help="log at info level")
    p.set_defaults(func=cmd_replay)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) == "validate" and not args.config:
        args.config = None  # validate without --config checks the built-in default
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        _print_errors(e.errors)
        return 1
    except BrokenPipeError:
        # the reader went away (``wirespan components | head``): stop quietly, as Unix tools do
        _flush_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as e:  # a bug: one line for the user, the traceback only on request
        if os.environ.get("WIRESPAN_DEBUG"):
            import traceback
            traceback.print_exc()
        print(f"wirespan: {describe(e)} (WIRESPAN_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    finally:
        _flush_stdout()


if __name__ == "__main__":
    sys.exit(main())
