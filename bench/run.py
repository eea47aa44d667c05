"""Ingest benchmark: relay against adnanh/webhook and a bare aiohttp handler, side by side.

Starts each server on loopback, drives it with the same `wrk -t1 -c32` load of unique
QingStor notifications (bench/notifier.lua), and prints one table: req/s, p50/p99
latency, ratios to webhook and to bare aiohttp, delivered events (relay), RSS.

    apt-get install wrk webhook      # Debian packages
    python bench/run.py [--duration 10] [--connections 32] [--rounds 3] [--workers N]

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
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
BARE, HOOK = "bare aiohttp (parse JSON)", "adnanh/webhook"
ROOT = HERE.parent
TOKEN = "benchtoken"


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


def run_wrk(url: str, duration: int, connections: int, pause_ms: float = 0.0) -> dict[str, float]:
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


def parse_wrk(out: str) -> dict[str, float]:
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


def measure(proc: subprocess.Popen[bytes], port: int, args: argparse.Namespace) -> dict[str, float]:
    """Load a started server, take its RSS, stop it."""
    try:
        wait_listening(port)
        result = run_wrk(f"http://127.0.0.1:{port}/hooks/qingstor", args.duration, args.connections)
        result["rss"] = rss_mib(proc.pid)
        return result
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def bench_bare(workdir: Path, args: argparse.Namespace) -> dict[str, float]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(HERE / "bare_aiohttp.py"), str(port)])
    return measure(proc, port, args)


def bench_webhook(workdir: Path, args: argparse.Namespace) -> dict[str, float] | None:
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


def bench_relay(workdir: Path, args: argparse.Namespace, workers: int) -> dict[str, float]:
    data = workdir / "relay"
    data.mkdir()
    config = data / "relay.yaml"
    config.write_text(
        "log: {level: warning}\n"
        f"sources: {{qingstor: {{kind: qingstor, token: {TOKEN}}}}}\n"
        "sinks: {archive: {kind: file, path: events.jsonl}}\n"
        "store: {path: relay.db}\n"
        f"server: {{workers: {workers}}}\n"
    )
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
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
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_listening(port)
        if workers:
            time.sleep(2.0)  # the port answers once the first worker listens: wait for all
        url = f"http://127.0.0.1:{port}/hooks/qingstor?token={TOKEN}"
        result = run_wrk(url, args.duration, args.connections)
        result["rss"] = rss_mib(proc.pid)
        # Every acknowledged event must reach the file sink within 30 s of the load.
        deadline, lines = time.monotonic() + 30, 0
        while time.monotonic() < deadline:
            events = data / "events.jsonl"
            lines = sum(1 for _ in events.open()) if events.exists() else 0
            if lines >= result["ok"]:
                break
            time.sleep(0.2)
        result["delivered"] = lines
        # Then a steady load: 32 connections pausing 30 ms on average, about 1,000 req/s.
        steady = run_wrk(url, args.duration, 32, pause_ms=args.steady_pause_ms)
        result["steady_rps"], result["steady_p99"] = steady["rps"], steady["p99"]
        return result
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


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
        " which the leader takes)",
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
    servers: dict[str, Callable[[Path], dict[str, float] | None]] = {
        BARE: lambda d: bench_bare(d, args),
        HOOK: lambda d: bench_webhook(d, args),
        "relay, 1 process": lambda d: bench_relay(d, args, 0),
    }
    if args.workers:
        servers[f"relay, workers: {args.workers}"] = lambda d: bench_relay(d, args, args.workers)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for number, (name, bench) in enumerate(servers.items()):
                workdir = Path(tmp) / f"{round_}-{number}"
                workdir.mkdir()
                result = bench(workdir)
                if result is not None:
                    runs[name].append(result)
    print(
        f"wrk -t1 -c{args.connections} -d{args.duration}s, unique notifier per request;"
        f" {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}"
        + (f"; medians of {args.rounds} rounds" if args.rounds > 1 else "")
    )
    print(
        f"{'server':30} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'vs webhook':>10}"
        f" {'vs bare':>8} {'delivered':>13} {'RSS MiB':>8} {'steady req/s':>12}"
        f" {'steady p99':>10}"
    )
    for name, results in runs.items():
        if not results:
            print(f"{name:30} (not installed: apt-get install webhook)")
            continue
        print(f"{name:30} {_row(results, runs[HOOK], runs[BARE])}")
    return 0


def _row(
    results: list[dict[str, float]], hook: list[dict[str, float]], bare: list[dict[str, float]]
) -> str:
    def mid(key: str, of: list[dict[str, float]] = results) -> float:
        return statistics.median(r[key] for r in of)

    def ratio(base: list[dict[str, float]]) -> str:
        if len(base) != len(results):
            return "-"
        pairs = zip(results, base, strict=True)
        return f"{statistics.median(r['rps'] / b['rps'] for r, b in pairs):.2f}x"

    delivered = "-"
    if "delivered" in results[0]:
        delivered = (
            f"{sum(int(r['delivered']) for r in results)}/{sum(int(r['ok']) for r in results)}"
        )
    steady = ""
    if "steady_rps" in results[0]:
        steady = f"{mid('steady_rps'):12.0f} {mid('steady_p99'):10.2f}"
    return (
        f"{mid('rps'):7.0f} {mid('p50'):7.2f} {mid('p99'):7.2f} {ratio(hook):>10}"
        f" {ratio(bare):>8} {delivered:>13} {max(r['rss'] for r in results):8.1f} {steady}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
