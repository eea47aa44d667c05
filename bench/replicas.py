"""Scaling out: SQLite with one relay against Redis with one and with two relays, one run.

For each configuration, relay (`relay serve` subprocesses, one per port) gets a `wrk`
load of unique QingStor notifications (bench/replicas.lua: notifier.lua's bodies; wrk
threads spread over the relays' ports, so one latency distribution covers both) while
its HTTP sink delivers every event to a local receiver (bench/receiver.py, a bare
asyncio server counting unique `webhook-id`s). Per run it measures:

- ingest: events acknowledged (2xx) per second, p50/p99 ack latency (wrk);
- end to end: events per second from the first POST until the receiver holds every
  event the relays accepted (their /metrics), and any that never arrived (`lost`);
- CPU per event: the relay processes' and redis-server's (from /proc/<pid>/stat over
  the same span), the receiver's and wrk's; the machine's busy share, the share other
  processes took meanwhile (the machine is shared) and the hypervisor's steal.

Configurations run in turn, in a rotated order each round; the table holds medians
and each configuration's ratio to SQLite within the same round. Redis is this script's
own redis-server in a temporary folder, `--appendonly yes --appendfsync everysec` by
default (an acknowledged event can be lost with the last second of writes on a power
cut, where SQLite fsyncs before every acknowledgement); `--appendfsync always` gives
Redis the same promise. Redis is flushed between runs.

    python bench/replicas.py [--duration 10] [--connections 32] [--rounds 3]

Figures are for comparing within one run on one machine; no test asserts them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
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
)
from run import free_port, parse_wrk, wait_listening  # noqa: E402

TOKEN = "benchtoken"
LOG_LINES: list[str] = []  # relay's log lines at warning or above, over all runs


@dataclass(frozen=True)
class Setup:
    name: str
    backend: str  # sqlite | redis
    relays: int


SETUPS = (
    Setup("SQLite, 1 relay", "sqlite", 1),
    Setup("Redis, 1 relay", "redis", 1),
    Setup("Redis, 2 relays", "redis", 2),
)


class Redis:
    """A redis-server of our own, in a temporary folder, on a free port."""

    def __init__(self, folder: Path, appendfsync: str) -> None:
        self.port = free_port()
        self.folder = folder
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(folder),
                "--appendonly",
                "yes",
                "--appendfsync",
                appendfsync,
                "--save",
                "",
                "--maxmemory-policy",
                "noeviction",
                "--logfile",
                str(folder / "redis.log"),
            ]
        )
        wait_listening(self.port)
        import redis  # relay's own dependency

        self.client = redis.Redis(port=self.port)
        self.client.ping()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def empty(self) -> None:
        """Flush, and rewrite the append-only file so that it does not grow run by run."""
        self.client.flushall()
        self.client.bgrewriteaof()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            info = self.client.info("persistence")
            if not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]:
                return
            time.sleep(0.05)

    def calls(self) -> dict[str, int]:
        """Commands Redis ran so far, by name (INFO commandstats)."""
        stats = self.client.info("commandstats")
        return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}

    def stop(self) -> None:
        self.client.close()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


class Receiver:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, str(HERE / "receiver.py"), str(self.port)])
        wait_listening(self.port)

    def _call(self, method: str, path: str) -> bytes:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            method=method,
            data=b"" if method == "POST" else None,
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            return bytes(answer.read())

    def reset(self) -> None:
        self._call("POST", "/reset")

    def stats(self) -> dict[str, float]:
        return dict(json.loads(self._call("GET", "/stats")))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)


def relay_config(
    setup: Setup, receiver: Receiver, redis: Redis | None, prefix: str, args: argparse.Namespace
) -> str:
    sink = (
        f"app: {{kind: http, url: 'http://127.0.0.1:{receiver.port}/events',"
        f" concurrency: {args.sink_concurrency}}}"
    )
    if setup.backend == "redis":
        assert redis is not None
        store = f"{{backend: redis, url: '{redis.url}', prefix: {prefix}}}"
    else:
        store = "{path: relay.db}"
    return (
        "log: {level: warning}\n"
        f"sources: {{qingstor: {{kind: qingstor, token: {TOKEN}}}}}\n"
        f"sinks: {{{sink}}}\n"
        f"store: {store}\n"
        "server: {workers: 0}\n"
    )


def start_relays(
    setup: Setup, workdir: Path, config: str, pythonpath: Path
) -> list[tuple[subprocess.Popen[bytes], int, Path]]:
    started = []
    try:
        for number in range(setup.relays):
            data = workdir / f"relay{number}"
            data.mkdir()
            (data / "relay.yaml").write_text(config)
            port = free_port()
            log = data / "relay.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "relay",
                        "serve",
                        "--config",
                        "relay.yaml",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                    ],
                    cwd=data,
                    env={**os.environ, "PYTHONPATH": str(pythonpath)},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            started.append((proc, port, log))
            wait_listening(port)
    except BaseException:
        for proc, _, _ in started:
            proc.kill()
        raise
    return started


def run_wrk(ports: list[int], args: argparse.Namespace) -> tuple[dict[str, float], float]:
    """wrk -t2 (one thread per port, or both on the one port) with -c connections in
    all; returns its figures and its own CPU seconds."""
    url = f"http://127.0.0.1:{ports[0]}/hooks/qingstor?token={TOKEN}"
    proc = subprocess.Popen(
        [
            "wrk",
            f"-t{args.threads}",
            f"-c{args.connections}",
            f"-d{args.duration}s",
            "--latency",
            "-s",
            str(HERE / "replicas.lua"),
            url,
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "RELAY_PORTS": ",".join(map(str, ports))},
    )
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{out}")
    return parse_wrk(out), usage.ru_utime + usage.ru_stime


def log_problems(logs: list[Path]) -> list[str]:
    """Lines of relay's logs at warning or above (the configured level)."""
    found = []
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            if line.strip():
                found.append(f"{log.parent.name}: {line}")
    return found


def one_run(
    setup: Setup,
    workdir: Path,
    receiver: Receiver,
    redis: Redis | None,
    pythonpath: Path,
    args: argparse.Namespace,
) -> dict[str, float]:
    receiver.reset()
    if redis is not None:
        redis.empty()
    if setup.backend != "redis":
        redis = None
    config = relay_config(setup, receiver, redis, workdir.name, args)
    relays = start_relays(setup, workdir, config, pythonpath)
    pids = [proc.pid for proc, _, _ in relays]
    ports = [port for _, port, _ in relays]
    result: dict[str, float] = {}
    try:
        time.sleep(0.5)  # past start-up: the dispatcher and pub/sub are up
        cpu_relay = sum(cpu_seconds(p) for p in pids)
        cpu_redis = cpu_seconds(redis.proc.pid) if redis else 0.0
        calls = redis.calls() if redis else {}
        cpu_receiver = cpu_seconds(receiver.proc.pid)
        ticks = machine_ticks()
        own_cpu = sum(os.times()[:2])  # this script's polling
        started = time.monotonic()
        wrk, wrk_cpu = run_wrk(ports, args)
        metrics = [scrape(port) for port in ports]
        accepted = sum(
            counted(m, "relay_events_received_total") - counted(m, "relay_events_duplicate_total")
            for m in metrics
        )
        result.update(wrk)
        result["acked_rps"] = wrk["ok"] / wrk["seconds"]
        result["accepted"] = accepted
        result["duplicate_answers"] = sum(
            counted(m, "relay_events_duplicate_total") for m in metrics
        )
        result["answered_5xx"] = sum(
            counted(m, "relay_requests_total", 'status="5') for m in metrics
        )
        # Every accepted event must reach the receiver.
        deadline = time.monotonic() + args.drain_timeout
        stats = receiver.stats()
        while stats["unique"] < accepted and time.monotonic() < deadline:
            time.sleep(0.05)
            stats = receiver.stats()
        now_ticks = machine_ticks()
        result["relay_cpu"] = sum(cpu_seconds(p) for p in pids) - cpu_relay
        result["redis_cpu"] = (cpu_seconds(redis.proc.pid) - cpu_redis) if redis else 0.0
        calls_after = redis.calls() if redis else {}
        made = {k: n - calls.get(k, 0) for k, n in calls_after.items() if n > calls.get(k, 0)}
        made.pop("info", None)  # ours
        result["redis_calls"] = float(sum(made.values()))
        if made and args.verbose:
            per = ", ".join(
                f"{k} {n / max(accepted, 1):.2f}"
                for k, n in sorted(made.items(), key=lambda i: -i[1])
            )
            print(f"    Redis commands per event: {per}")
        result["receiver_cpu"] = cpu_seconds(receiver.proc.pid) - cpu_receiver
        result["wrk_cpu"] = wrk_cpu
        ours = sum(result[k] for k in ("relay_cpu", "redis_cpu", "receiver_cpu", "wrk_cpu"))
        ours += sum(os.times()[:2]) - own_cpu
        result.update(shares(ticks, now_ticks, ours))
        result["delivered"] = stats["unique"]
        result["lost"] = max(accepted - stats["unique"], 0)
        result["repeats"] = stats["total"] - stats["unique"] - stats["missing_id"]
        last = stats["last_new_at"] or time.monotonic()
        result["e2e_seconds"] = last - started
        result["e2e_rps"] = stats["unique"] / result["e2e_seconds"]
        final = [scrape(port) for port in ports]
        result["retries"] = sum(
            counted(m, "relay_deliveries_total", 'outcome="retry"') for m in final
        )
    finally:
        for proc, _, _ in relays:
            proc.send_signal(signal.SIGTERM)
        for proc, _, _ in relays:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    for proc, port, _ in relays:
        if proc.returncode:
            print(f"  {setup.name}: the relay on {port} exited {proc.returncode}", file=sys.stderr)
    problems = log_problems([log for _, _, log in relays])
    LOG_LINES.extend(f"{setup.name}, round {args.round + 1}: {line}" for line in problems)
    if problems:
        print(f"  {setup.name}: {len(problems)} log line(s) at warning or above:", file=sys.stderr)
        for line in problems[:5]:
            print(f"    {line[:400]}", file=sys.stderr)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds of wrk load per run")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections in all")
    parser.add_argument(
        "--threads", type=int, default=2, help="wrk threads, dealt to the relays' ports in turn"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sink-concurrency", type=int, default=32, help="HTTP sink concurrency")
    parser.add_argument(
        "--appendfsync", choices=("everysec", "always"), default="everysec", help="Redis AOF fsync"
    )
    parser.add_argument(
        "--drain-timeout", type=float, default=180.0, help="seconds to wait for every delivery"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="also print Redis's commands per event, by name"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=[s.backend + str(s.relays) for s in SETUPS],
        help="run only these configurations (sqlite1, redis1, redis2); repeatable",
    )
    args = parser.parse_args()
    for tool in ("wrk", "redis-server"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing (apt-get install wrk redis-server)", file=sys.stderr)
            return 2
    setups = [s for s in SETUPS if not args.only or s.backend + str(s.relays) in args.only]
    print(f"machine: {machine()}")
    runs: dict[str, list[dict[str, float]]] = {s.name: [] for s in setups}
    with tempfile.TemporaryDirectory(prefix="relay-replicas-") as tmp:
        pythonpath, code = snapshot_code(Path(tmp) / "src")
        print(f"code: {code}")
        redis = Redis(Path(tmp), args.appendfsync)
        receiver = Receiver()
        print(
            f"redis-server --appendonly yes --appendfsync {args.appendfsync}"
            " --maxmemory-policy noeviction, flushed before each run; relay: qingstor source,"
            f" one http sink (concurrency {args.sink_concurrency}) to bench/receiver.py;"
            f" SQLite synchronous=FULL"
        )
        print(
            f"load: wrk -t{args.threads} -c{args.connections} -d{args.duration}s, unique"
            " notifier per request, threads dealt to the relays' ports; deliveries run"
            " during the load"
        )
        try:
            for round_ in range(args.rounds):
                order = setups[round_ % len(setups) :] + setups[: round_ % len(setups)]
                for setup in order:
                    workdir = Path(tmp) / f"r{round_}-{setup.backend}{setup.relays}"
                    workdir.mkdir()
                    args.round = round_
                    result = one_run(setup, workdir, receiver, redis, pythonpath, args)
                    result["round"] = round_
                    runs[setup.name].append(result)
                    print(f"  round {round_ + 1} {setup.name:16} {_brief(result)}", flush=True)
        finally:
            receiver.stop()
            redis.stop()
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}; medians of {args.rounds} round(s);"
        " ratios to SQLite taken within each round; lost/5xx/repeats summed over rounds"
    )
    print(_table(runs, setups[0].name))
    if LOG_LINES:
        counts = log_events([line.split(": ", 2)[2] for line in LOG_LINES])
        print(
            "relay logged at warning or above: "
            + "; ".join(f"{key} x{n}" for key, n in sorted(counts.items()))
        )
        for line in LOG_LINES[:10]:
            print(f"  {line[:400]}")
    return 0


def _brief(r: dict[str, float]) -> str:
    return (
        f"ingest {r['acked_rps']:7.0f}/s p99 {r['p99']:6.2f} ms  e2e {r['e2e_rps']:7.0f}/s"
        f"  acked {r['ok']:.0f} accepted {r['accepted']:.0f}"
        f" delivered {r['delivered']:.0f} lost {r['lost']:.0f}"
        f"  relay {1e6 * r['relay_cpu'] / max(r['accepted'], 1):4.0f} us/ev"
        f"  redis {1e6 * r['redis_cpu'] / max(r['accepted'], 1):4.0f} us/ev"
        f"  busy {100 * r['busy']:3.0f}% others {100 * r['others']:2.0f}%"
        f" steal {100 * r['steal']:2.0f}%"
    )


def _table(runs: dict[str, list[dict[str, float]]], base: str) -> str:
    vs = "vs SQLite" if base.startswith("SQLite") else f"vs {base}"
    head = (
        f"| configuration | ingest ev/s | {vs} | p50 ms | p99 ms | end-to-end ev/s"
        f" | {vs} | relay CPU µs/ev | Redis CPU µs/ev | Redis calls/ev | receiver µs/ev"
        " | wrk µs/req | busy | others | steal | acked | accepted | lost | 5xx | wrk errors"
        " | repeats |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    by_round = {int(r["round"]): r for r in runs.get(base, [])}
    for name, results in runs.items():
        if results:
            lines.append(f"| {name} | {_row(results, by_round)} |")
    return "\n".join(lines)


def _row(results: list[dict[str, float]], base: dict[int, dict[str, float]]) -> str:
    def mid(key: str) -> float:
        return statistics.median(r[key] for r in results)

    def per_event(key: str, per: str = "accepted") -> float:
        return statistics.median(r[key] / max(r[per], 1) for r in results)

    def ratio(key: str) -> str:
        pairs = [(r[key], base[int(r["round"])][key]) for r in results if int(r["round"]) in base]
        return f"{statistics.median(a / b for a, b in pairs):.2f}x" if pairs else "-"

    def total(key: str) -> int:
        return int(sum(r[key] for r in results))

    return (
        f"{mid('acked_rps'):.0f} | {ratio('acked_rps')} | {mid('p50'):.2f} | {mid('p99'):.2f}"
        f" | {mid('e2e_rps'):.0f} | {ratio('e2e_rps')} | {1e6 * per_event('relay_cpu'):.0f}"
        f" | {1e6 * per_event('redis_cpu'):.0f} | {per_event('redis_calls'):.1f}"
        f" | {1e6 * per_event('receiver_cpu'):.0f} | {1e6 * per_event('wrk_cpu', 'ok'):.0f}"
        f" | {100 * mid('busy'):.0f}% | {100 * mid('others'):.0f}% | {100 * mid('steal'):.0f}%"
        f" | {total('ok')} | {total('accepted')}"
        f" | {total('lost')} | {total('answered_5xx')} | {total('non2xx') + total('socket_errors')}"
        f" | {total('repeats')}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
