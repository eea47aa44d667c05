"""SQLite before and after: bench/run.py's relay row for two versions of relay, one run.

Each side is `relay serve` as bench/run.py starts it (a `qingstor` source with a token,
SQLite with synchronous=FULL, one file sink, one process) under run.py's very load
(`wrk -t1 -c32`, bench/notifier.lua); the sides take turns, in a rotated order each
round. Per run: req/s, p50/p99, relay's CPU per accepted event (from /proc/<pid>/stat,
from the start of the load until the file sink holds every accepted event: ingest and
delivery), events lost, then p99 under run.py's steady ~1,000 req/s. The table holds
medians and the after/before ratio taken within each round.

The "after" side is this checkout's relay/ (copied at start, so edits made meanwhile do
not leak in), run with this interpreter. A "before" side is a Python with another relay
installed (a venv), or a source tree run with this interpreter:

    git -C /work/main worktree add --detach /tmp/relay-before a676f5b
    python3 -m venv /tmp/venv-before && /tmp/venv-before/bin/pip install -q /tmp/relay-before
    python bench/compare_sqlite.py --side "before a676f5b=/tmp/venv-before/bin/python"
    git -C /work/main worktree remove --force /tmp/relay-before

Figures are for comparing within one run on one machine; no test asserts them.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from machine import (  # noqa: E402
    counted,
    cpu_seconds,
    log_events,
    machine,
    machine_ticks,
    scrape,
    shares,
    snapshot_code,
    wait_for_lines,
)
from run import TOKEN, free_port, run_wrk, wait_listening  # noqa: E402

LOG_LINES: list[str] = []  # relay's log lines at warning or above, over all runs


@dataclass(frozen=True)
class Side:
    label: str
    python: str
    pythonpath: str | None  # None: the relay installed in that Python

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        if self.pythonpath:
            env["PYTHONPATH"] = self.pythonpath
        return env

    def command(self) -> list[str]:
        return [self.python, "-m", "relay", "serve", "--config", "relay.yaml"]

    def relay_module(self, cwd: Path) -> str:
        """Where this side's `import relay` comes from (checked, not assumed)."""
        return subprocess.run(
            [self.python, "-c", "import relay; print(relay.__file__)"],
            cwd=cwd,
            env=self.env(),
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()


def parse_side(text: str) -> tuple[str, str]:
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError("--side takes LABEL=PATH")
    return label, path


def make_side(label: str, path: str) -> Side:
    if Path(path, "relay", "__init__.py").is_file():  # a source tree
        return Side(label, sys.executable, str(Path(path).resolve()))
    return Side(label, path, None)


def one_run(side: Side, workdir: Path, args: argparse.Namespace) -> dict[str, float]:
    workdir.mkdir()
    (workdir / "relay.yaml").write_text(
        (f"log: {{level: {args.log_level}}}\n" if args.log_level else "")
        + f"sources: {{qingstor: {{kind: qingstor, token: {TOKEN}}}}}\n"
        "sinks: {archive: {kind: file, path: events.jsonl}}\n"
        "store: {path: relay.db}\n"
        "server: {workers: 0}\n"
    )
    port = free_port()
    log = workdir / "relay.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*side.command(), "--host", "127.0.0.1", "--port", str(port)],
            cwd=workdir,
            env=side.env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    result: dict[str, float] = {}
    try:
        wait_listening(port)
        time.sleep(0.5)
        cpu, ticks = cpu_seconds(proc.pid), machine_ticks()
        url = f"http://127.0.0.1:{port}/hooks/qingstor?token={TOKEN}"
        waited = resource.getrusage(resource.RUSAGE_CHILDREN)
        own = sum(os.times()[:2])
        result.update(run_wrk(url, args.duration, args.connections))
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk, only
        wrk_cpu = reaped.ru_utime + reaped.ru_stime - waited.ru_utime - waited.ru_stime
        metrics = scrape(port)
        accepted = counted(metrics, "relay_events_received_total") - counted(
            metrics, "relay_events_duplicate_total"
        )
        result["accepted"] = accepted
        result["answered_5xx"] = counted(metrics, "relay_requests_total", 'status="5')
        lines = wait_for_lines(workdir / "events.jsonl", accepted)
        result["cpu"] = cpu_seconds(proc.pid) - cpu
        ours = result["cpu"] + wrk_cpu + sum(os.times()[:2]) - own
        result.update(shares(ticks, machine_ticks(), ours))
        result["delivered"] = lines
        result["lost"] = max(accepted - lines, 0)
        if args.steady:
            # The same rate for every side, so the CPU per event compares like with like
            # (under the full load, a faster side commits bigger groups).
            cpu = cpu_seconds(proc.pid)
            steady = run_wrk(url, args.duration, 32, pause_ms=args.steady_pause_ms)
            time.sleep(1.0)  # the file sink's last writes
            result["steady_rps"], result["steady_p99"] = steady["rps"], steady["p99"]
            result["steady_cpu"] = (cpu_seconds(proc.pid) - cpu) / max(steady["ok"], 1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    problems = [
        line
        for line in log.read_text(errors="replace").splitlines()
        if line.strip() and not re.search(r'"level": ?"(info|debug)"', line)
    ]
    result["log_lines"] = len(problems)
    LOG_LINES.extend(f"{side.label}: {line}" for line in problems)
    if proc.returncode:
        print(f"    {side.label}: relay exited {proc.returncode}", file=sys.stderr)
    for line in problems[:5]:
        print(f"    {side.label} log: {line[:400]}", file=sys.stderr)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--side",
        type=parse_side,
        action="append",
        metavar="LABEL=PATH",
        help="a version to compare with this checkout: PATH is a Python with that relay"
        " installed, or a source tree (run with this Python); repeatable. Default:"
        " 'before a676f5b=/tmp/venv-before/bin/python'",
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds of load per run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--steady",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also take the p99 at a steady ~1,000 req/s after each run (as run.py does)",
    )
    parser.add_argument("--steady-pause-ms", type=float, default=30.0)
    parser.add_argument(
        "--log-level",
        default=None,
        help="run relay with this log.level (default: none set, which is info)",
    )
    args = parser.parse_args()
    wanted = args.side or [("before a676f5b", "/tmp/venv-before/bin/python")]
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="relay-compare-") as tmp:
        src, code = snapshot_code(Path(tmp) / "src")
        sides = [make_side(label, path) for label, path in wanted]
        sides.append(Side(f"after ({code.split()[0]})", sys.executable, str(src)))
        print(f"after: {code}")
        for side in sides:
            print(f"{side.label}: {side.python}, relay from {side.relay_module(Path(tmp))}")
        print(
            f"load: wrk -t1 -c{args.connections} -d{args.duration}s (bench/notifier.lua);"
            " relay: qingstor source, SQLite synchronous=FULL, one file sink, one process"
        )
        runs: dict[str, list[dict[str, float]]] = {s.label: [] for s in sides}
        for round_ in range(args.rounds):
            order = sides[round_ % len(sides) :] + sides[: round_ % len(sides)]
            for number, side in enumerate(order):
                result = one_run(side, Path(tmp) / f"{round_}-{number}", args)
                result["round"] = round_
                runs[side.label].append(result)
                print(
                    f"  round {round_ + 1} {side.label:22} {result['rps']:6.0f} req/s"
                    f" p99 {result['p99']:6.2f} ms"
                    f" CPU {1e6 * result['cpu'] / max(result['accepted'], 1):4.0f} µs/event"
                    f" lost {result['lost']:.0f}"
                    + (
                        f" steady p99 {result['steady_p99']:.2f} ms"
                        f" CPU {1e6 * result['steady_cpu']:.0f} µs/event"
                        if args.steady
                        else ""
                    )
                    + f" busy {100 * result['busy']:.0f}% others {100 * result['others']:.0f}%"
                    f" steal {100 * result['steal']:.0f}%",
                    flush=True,
                )
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}; medians of {args.rounds} round(s); ratios"
        f" after/before taken within each round; lost and 5xx summed over rounds"
    )
    after = runs[sides[-1].label]
    head = (
        "| relay | req/s | p50 ms | p99 ms | CPU µs/event | steady req/s | steady p99 ms"
        " | steady CPU µs/event"
        " | busy | others | steal | accepted | lost | 5xx |"
    )
    print(head)
    print("|" + "---|" * head.count(" | ") + "---|")
    for side in sides:
        print(f"| {side.label} | {_row(runs[side.label], args.steady)} |")
    for side in sides[:-1]:
        before = {int(r["round"]): r for r in runs[side.label]}
        print(f"after / {side.label}: {_ratios(after, before, args.steady)}")
    if LOG_LINES:
        counts = log_events([line.split(": ", 1)[1] for line in LOG_LINES])
        print(
            "relay logged at warning or above: " + "; ".join(f"{k} x{n}" for k, n in counts.items())
        )
    return 0


def _per_event(r: dict[str, float]) -> float:
    return 1e6 * r["cpu"] / max(r["accepted"], 1)


def _row(results: list[dict[str, float]], steady: bool) -> str:
    def mid(key: str) -> float:
        return statistics.median(r[key] for r in results)

    def total(key: str) -> int:
        return int(sum(r[key] for r in results))

    return (
        f"{mid('rps'):.0f} | {mid('p50'):.2f} | {mid('p99'):.2f}"
        f" | {statistics.median(_per_event(r) for r in results):.0f}"
        + (
            f" | {mid('steady_rps'):.0f} | {mid('steady_p99'):.2f} | {1e6 * mid('steady_cpu'):.0f}"
            if steady
            else " | - | - | -"
        )
        + f" | {100 * mid('busy'):.0f}% | {100 * mid('others'):.0f}% | {100 * mid('steal'):.0f}%"
        f" | {total('accepted')} | {total('lost')} | {total('answered_5xx')}"
    )


def _ratios(
    after: list[dict[str, float]], before: dict[int, dict[str, float]], steady: bool
) -> str:
    pairs = [(a, before[int(a["round"])]) for a in after if int(a["round"]) in before]

    def ratio(key: str) -> str:
        values = sorted(a[key] / b[key] for a, b in pairs)
        return f"{statistics.median(values):.2f}x (rounds {', '.join(f'{v:.2f}' for v in values)})"

    cpu = sorted(_per_event(a) / _per_event(b) for a, b in pairs)
    parts = [
        f"req/s {ratio('rps')}",
        f"p99 {ratio('p99')}",
        f"CPU/event {statistics.median(cpu):.2f}x (rounds {', '.join(f'{v:.2f}' for v in cpu)})",
    ]
    if steady:
        parts.append(f"steady p99 {ratio('steady_p99')}")
        parts.append(f"steady CPU/event {ratio('steady_cpu')}")
    return "; ".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
