"""Ingest benchmark: relay at its defaults against adnanh/webhook and a bare aiohttp
handler, side by side.

Starts each server on loopback, drives it with the same `wrk -t1 -c32` load of unique
QingStor notifications (bench/notifier.lua), and prints one table: req/s, p50/p99
latency, CPU per event, the ratios to webhook and to bare aiohttp, delivered events and
log lines (relay), RSS; then where relay's CPU went, thread by thread.

    apt-get install wrk webhook      # Debian packages
    pip install py-spy               # optional: names relay's threads, and --profile
    python bench/run.py [--duration 10] [--connections 32] [--rounds 3] [--workers N]
                        [--log-level info|warning|...] [--profile]

relay runs as the README's quick start leaves it: no `log:` section (level info, one
JSON line per request on stdout, read here through a pipe as a container runtime
would), a `qingstor` source with a token, SQLite, one file sink.

CPU per event is the user + system time of every thread of the server's processes
(relay's workers included, and the commands webhook forks once they are reaped), from
the first request until relay's file sink holds every acknowledged event, divided by
the events acknowledged: for relay that is ingest and delivery together.

Figures are for comparing within one run on one machine; no test asserts them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import IO

from machine import TICK, cpu_seconds, machine, snapshot_code, wait_for_lines

HERE = Path(__file__).resolve().parent
BARE, HOOK = "bare aiohttp (parse JSON)", "adnanh/webhook"
ROOT = HERE.parent
# Where relay's code runs from: a copy taken at start (main sets it), so that edits made
# while the benchmark runs do not change the code under test halfway.
CODE = ROOT
TOKEN = "benchtoken"
Result = dict[str, float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


RELAY = (sys.executable, "-m", "relay", "serve", "--config", "relay.yaml")


def start_relay(workdir: Path, config_yaml: str) -> tuple[subprocess.Popen[bytes], int]:
    """`relay serve` in `workdir` with this config, on a free loopback port, listening."""
    (workdir / "relay.yaml").write_text(config_yaml)
    port = free_port()
    proc = subprocess.Popen(
        [*RELAY, "--host", "127.0.0.1", "--port", str(port)],
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_listening(port)
    except RuntimeError:
        proc.kill()
        raise
    return proc, port


def rss_mib(pid: int) -> float:
    """RSS of the process and its children (relay's workers), in MiB."""
    total = 0.0
    for proc in [pid, *children(pid)]:
        try:
            for line in Path(f"/proc/{proc}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:  # gone meanwhile
            continue
    return total


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process, its reaped children, and its live children (workers)."""
    total = cpu_seconds(pid)
    for child in children(pid):
        try:
            total += cpu_seconds(child)
        except OSError:  # gone meanwhile
            continue
    return total


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of a process, by thread id."""
    found = {}
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        found[int(stat.parent.name)] = (int(fields[11]) + int(fields[12])) / TICK
    return found


def thread_names(pid: int) -> dict[int, str]:
    """Python's names of a process's threads, from `py-spy dump` when it is installed
    (Python 3.11 gives the operating system no thread names: every one is `python`)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        return {pid: "MainThread"}
    out = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True)
    found = re.findall(r'^Thread (\d+) \([^)]*\): "([^"]+)"', out.stdout, re.M)
    names = {int(tid): name for tid, name in found}
    return names or {pid: "MainThread"}


def run_wrk(url: str, duration: int, connections: int, pause_ms: float = 0.0) -> Result:
    env = {**os.environ, "WRK_DELAY_MS": str(pause_ms)}
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration}s",
            "--latency",
            "-s",
            str(HERE / "notifier.lua"),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout
    return parse_wrk(out)


def parse_wrk(out: str) -> Result:
    """wrk's report: req/s, p50/p99 ms (with --latency), requests answered 2xx/3xx
    (`ok`), non-2xx/3xx answers, socket errors, and the seconds the load ran."""

    def latency(label: str) -> float:
        match = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not match:
            return float("nan")
        value, unit = float(match.group(1)), match.group(2)
        return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    done = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)", out)
    assert done is not None, out
    total = int(done.group(1))
    seconds = float(done.group(2)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[done.group(3)]
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = int(non2xx.group(1)) if non2xx else 0
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    return {
        "rps": rps,
        "p50": latency("50"),
        "p99": latency("99"),
        "ok": total - errors,
        "non2xx": errors,
        "socket_errors": sum(int(n) for n in sockets.groups()) if sockets else 0,
        "seconds": seconds,
    }


def measure(proc: subprocess.Popen[bytes], port: int, args: argparse.Namespace) -> Result:
    """Load a started server; its CPU per request and RSS; stop it."""
    try:
        wait_listening(port)
        url = f"http://127.0.0.1:{port}/hooks/qingstor"
        cpu = tree_cpu(proc.pid)
        result = run_wrk(url, args.duration, args.connections)
        result["cpu_us"] = 1e6 * (tree_cpu(proc.pid) - cpu) / max(result["ok"], 1)
        result["rss"] = rss_mib(proc.pid)
        result.update(steady_load(proc.pid, url, args))
        return result
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def steady_load(pid: int, url: str, args: argparse.Namespace) -> Result:
    """32 connections pausing 30 ms on average, about 1,000 req/s: p50/p99 and CPU per
    request at a rate every server keeps up with (relay's file sink included)."""
    cpu = tree_cpu(pid)
    steady = run_wrk(url, args.duration, 32, pause_ms=args.steady_pause_ms)
    time.sleep(1.0)  # relay's file sink: the last writes
    return {
        "steady_rps": steady["rps"],
        "steady_p50": steady["p50"],
        "steady_p99": steady["p99"],
        "steady_cpu_us": 1e6 * (tree_cpu(pid) - cpu) / max(steady["ok"], 1),
        "steady_ok": steady["ok"],
        "steady_non2xx": steady["non2xx"],
    }


def bench_bare(workdir: Path, args: argparse.Namespace) -> Result:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(HERE / "bare_aiohttp.py"), str(port)])
    return measure(proc, port, args)


def bench_webhook(workdir: Path, args: argparse.Namespace) -> Result | None:
    if shutil.which("webhook") is None:
        return None
    hooks = workdir / "hooks.json"
    hooks.write_text(
        json.dumps(
            [
                {
                    "id": "qingstor",
                    "execute-command": "/bin/true",
                    "response-message": "ok",
                }
            ]
        )
    )
    port = free_port()
    proc = subprocess.Popen(
        ["webhook", "-hooks", str(hooks), "-ip", "127.0.0.1", "-port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return measure(proc, port, args)


class LogReader:
    """Drains relay's stdout as a container runtime would, counting lines by event."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.events: Counter[str] = Counter()
        self.others: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            try:
                record = json.loads(raw)
                name, level = str(record.get("event")), str(record.get("level"))
            except ValueError:
                name, level = "(not JSON)", "?"
            self.events[name] += 1
            if level not in ("info", "debug") and len(self.others) < 5:
                self.others.append(raw.decode(errors="replace").strip()[:300])

    def join(self) -> None:
        self._thread.join(10)


def bench_relay(
    workdir: Path, args: argparse.Namespace, workers: int, sampled: bool = False
) -> Result:
    data = workdir / "relay"
    data.mkdir()
    config = data / "relay.yaml"
    config.write_text(
        (f"log: {{level: {args.log_level}}}\n" if args.log_level else "")
        + f"sources: {{qingstor: {{kind: qingstor, token: {TOKEN}}}}}\n"
        "sinks: {archive: {kind: file, path: events.jsonl}}\n"
        "store: {path: relay.db}\n"
        f"server: {{workers: {workers}}}\n"
    )
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(CODE)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "relay",
            "serve",
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        cwd=data,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    logs = LogReader(proc.stdout)
    spy: subprocess.Popen[bytes] | None = None
    try:
        wait_listening(port)
        if workers:
            time.sleep(2.0)  # the port answers once the first worker listens: wait for all
        url = f"http://127.0.0.1:{port}/hooks/qingstor?token={TOKEN}"
        names = thread_names(proc.pid)
        cpu, threads = tree_cpu(proc.pid), thread_cpu(proc.pid)
        if sampled:
            spy = profile(proc.pid, workdir / "profile.txt", args.duration)
        result = run_wrk(url, args.duration, args.connections)
        result["rss"] = rss_mib(proc.pid)
        # Every acknowledged event must reach the file sink within 30 s of the load.
        result["delivered"] = wait_for_lines(data / "events.jsonl", result["ok"])
        result["cpu_us"] = 1e6 * (tree_cpu(proc.pid) - cpu) / max(result["ok"], 1)
        after = thread_cpu(proc.pid)
        for tid, seconds in after.items():
            name = names.get(tid, "other threads")
            key = f"thread {name}"
            result[key] = result.get(key, 0.0) + 1e6 * (seconds - threads.get(tid, 0.0)) / max(
                result["ok"], 1
            )
        if spy is not None:
            spy.wait()
            result.update(main_thread_split(workdir / "profile.txt"))
        result.update(steady_load(proc.pid, url, args))
        result["answered"] = (
            result["ok"] + result["non2xx"] + result["steady_ok"] + result["steady_non2xx"]
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        logs.join()
    result["request_lines"] = logs.events["request"]
    if logs.others:
        print(f"    relay logged: {logs.others}", file=sys.stderr)
    return result


def profile(pid: int, into: Path, duration: int) -> subprocess.Popen[bytes] | None:
    """py-spy sampling every thread of relay during the load (without pausing it)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("--profile needs py-spy: pip install py-spy", file=sys.stderr)
        return None
    return subprocess.Popen(
        [
            *(spy, "record", "--pid", str(pid), "--duration", str(duration), "--rate", "200"),
            *("--nonblocking", "--threads", "--format", "raw", "--output", str(into)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


# Where the main thread's samples are, by the first of these found on the stack from
# its innermost frame outwards: what the event loop was doing at that moment.
SPLIT = (
    ("request log", ("relay/app.py:_log_request", "structlog/", "relay/logs.py")),
    ("store (loop side)", ("relay/store/",)),
    ("sink and dispatch", ("relay/dispatch.py", "relay/sinks/")),
    (
        "ingest (verify, parse, envelope)",
        (
            "relay/ingest.py",
            "relay/sources/",
            "relay/events.py",
            "relay/models.py",
            "relay/routing.py",
        ),
    ),
    ("metrics", ("prometheus_client/", "relay/metrics.py")),
    ("request middleware", ("relay/app.py",)),
    ("aiohttp (HTTP parse, answer)", ("aiohttp/", "multidict/", "yarl/")),
    ("asyncio (loop, transports)", ("asyncio/", "selectors.py")),
)


def main_thread_split(path: Path) -> Result:
    """Shares of the main thread's samples, by SPLIT; idle samples are not taken."""
    counts: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        frames = stack.split(";")
        if not any("MainThread" in f for f in frames[:2]):
            continue
        where = "other"
        for frame in reversed(frames):
            found = next((name for name, marks in SPLIT if any(m in frame for m in marks)), None)
            if found:
                where = found
                break
        counts[where] += int(number)
    total = sum(counts.values()) or 1
    return {f"main {name}": 100 * n / total for name, n in counts.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per server")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--steady-pause-ms",
        type=float,
        default=30.0,
        help="mean pause per connection for the steady-load p99 (30 ms: ~1,000 req/s)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=max((os.cpu_count() or 1) - 1, 1),
        help="server.workers for the second relay row (default: one per core but one,"
        " which the leader takes; 0: no such row)",
    )
    parser.add_argument(
        "--log-level",
        default=None,
        help="run relay with this log.level (default: none set, which is info)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the rounds, one more run of relay (one process) sampled by py-spy;"
        " print its main thread's split (the sampler takes CPU: that run is not in the table)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every server this many times, in turn; print medians (the ratios are"
        " taken within each round)",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is missing: apt-get install wrk", file=sys.stderr)
        return 2
    servers: dict[str, Callable[[Path], Result | None]] = {
        BARE: lambda d: bench_bare(d, args),
        HOOK: lambda d: bench_webhook(d, args),
        "relay, 1 process": lambda d: bench_relay(d, args, 0),
    }
    if args.workers:
        servers[f"relay, workers: {args.workers}"] = lambda d: bench_relay(d, args, args.workers)
    global CODE
    print(f"machine: {machine()}")
    runs: dict[str, list[Result]] = {name: [] for name in servers}
    with tempfile.TemporaryDirectory() as tmp:
        CODE, code = snapshot_code(Path(tmp) / "src")
        print(f"code: {code}")
        for round_ in range(args.rounds):
            for number, (name, bench) in enumerate(servers.items()):
                workdir = Path(tmp) / f"{round_}-{number}"
                workdir.mkdir()
                result = bench(workdir)
                if result is not None:
                    runs[name].append(result)
                    print(
                        f"  round {round_ + 1} {name:30} {result['rps']:6.0f} req/s"
                        f" p99 {result['p99']:6.2f} ms CPU {result['cpu_us']:4.0f} µs/event",
                        file=sys.stderr,
                        flush=True,
                    )
        if args.profile:
            workdir = Path(tmp) / "sampled"
            workdir.mkdir()
            sampled = bench_relay(workdir, args, 0, sampled=True)
    level = args.log_level or "the default (info)"
    print(
        f"wrk -t1 -c{args.connections} -d{args.duration}s, unique notifier per request;"
        f" relay's log level: {level}; {time.strftime('%Y-%m-%d %H:%M')}"
        + (f"; medians of {args.rounds} rounds, ratios within each" if args.rounds > 1 else "")
    )
    head = (
        "| server | req/s | p50 ms | p99 ms | CPU µs/event | req/s vs webhook | req/s vs bare"
        " | CPU vs bare | delivered | request lines | RSS MiB | steady req/s | steady p50 ms"
        " | steady p99 ms | steady CPU µs/event |"
    )
    print(head)
    print("|" + "---|" * head.count(" | ") + "---|")
    for name, results in runs.items():
        if not results:
            print(f"| {name} | (not installed: apt-get install webhook) |")
            continue
        print(f"| {name} | {_row(results, runs[HOOK], runs[BARE])} |")
    for name, results in runs.items():
        threads = sorted({k for r in results for k in r if k.startswith("thread ")})
        if not threads:
            continue
        parts = [
            f"{key[7:]} {statistics.median(r.get(key, 0.0) for r in results):.0f}"
            for key in threads
        ]
        print(f"{name}, CPU µs per event by thread: " + ", ".join(parts))
    if args.profile:
        shares = {k[5:]: v for k, v in sampled.items() if k.startswith("main ")}
        print(
            "relay, 1 process, sampled by py-spy: the main thread's busy samples: "
            + ", ".join(f"{k} {v:.0f}%" for k, v in sorted(shares.items(), key=lambda i: -i[1]))
        )
    return 0


def _row(results: list[Result], hook: list[Result], bare: list[Result]) -> str:
    def mid(key: str, of: list[Result] = results) -> float:
        return statistics.median(r[key] for r in of)

    def ratio(base: list[Result], key: str = "rps") -> str:
        if len(base) != len(results):
            return "-"
        pairs = zip(results, base, strict=True)
        return f"{statistics.median(r[key] / b[key] for r, b in pairs):.2f}x"

    delivered = lines = "-"
    if "delivered" in results[0]:
        delivered = (
            f"{sum(int(r['delivered']) for r in results)}/{sum(int(r['ok']) for r in results)}"
        )
        lines = (
            f"{sum(int(r['request_lines']) for r in results)}"
            f"/{sum(int(r['answered']) for r in results)}"
        )
    steady = (
        f"{mid('steady_rps'):.0f} | {mid('steady_p50'):.2f} | {mid('steady_p99'):.2f}"
        f" (max {max(r['steady_p99'] for r in results):.2f}) | {mid('steady_cpu_us'):.0f}"
    )
    return (
        f"{mid('rps'):.0f} | {mid('p50'):.2f} | {mid('p99'):.2f} | {mid('cpu_us'):.0f}"
        f" | {ratio(hook)} | {ratio(bare)} | {ratio(bare, 'cpu_us')} | {delivered} | {lines}"
        f" | {max(r['rss'] for r in results):.1f} | {steady}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
