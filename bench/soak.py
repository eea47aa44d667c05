"""Memory soak: relay under a steady load for minutes, its RSS sampled as it goes.

Starts `relay serve` (qingstor source, SQLite store, file sink) and drives it with wrk
in 30-second rounds of unique notifications at a steady rate (bench/notifier.lua with
WRK_DELAY_MS), printing after each round: requests acknowledged so far, events the file
sink holds, and the RSS of relay's processes. Then: the RSS once 100,000 events were
in, and how much it moved over the second half of the run (flat means no leak).

    apt-get install wrk
    python bench/soak.py [--minutes 10] [--workers 0] [--pause-ms 30]

Figures are for reading, not asserting: no test depends on them.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import TOKEN, rss_mib, start_relay  # noqa: E402

ROUND = 30  # seconds of load between two samples
LUA = HERE / "notifier.lua"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=0, help="server.workers")
    parser.add_argument("--pause-ms", type=float, default=30.0, help="mean pause per connection")
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        proc, port = start_relay(
            data,
            "log: {level: warning}\n"
            f"sources: {{qingstor: {{kind: qingstor, token: {TOKEN}}}}}\n"
            "sinks: {archive: {kind: file, path: events.jsonl}}\n"
            f"store: {{path: relay.db}}\nserver: {{workers: {args.workers}}}\n",
        )
        try:
            time.sleep(2.0 if args.workers else 0.5)
            return soak(args, data, port, proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


def soak(args: argparse.Namespace, data: Path, port: int, pid: int) -> int:
    url = f"http://127.0.0.1:{port}/hooks/qingstor?token={TOKEN}"
    env = {**os.environ, "WRK_DELAY_MS": str(args.pause_ms)}
    started = time.monotonic()
    acked = 0
    samples: list[tuple[float, int, float]] = []
    print(f"{'minute':>6} {'acked':>9} {'in file':>9} {'req/s':>7} {'RSS MiB':>8}")
    print(f"{0:6.1f} {0:9} {0:9} {'-':>7} {rss_mib(pid):8.1f}")
    while time.monotonic() - started < args.minutes * 60:
        out = subprocess.run(
            ["wrk", "-t1", f"-c{args.connections}", f"-d{ROUND}s", "-s", str(LUA), url],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        ).stdout
        total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
        non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
        acked += total - (int(non2xx.group(1)) if non2xx else 0)
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        lines = _lines(data / "events.jsonl")
        rss = rss_mib(pid)
        minute = (time.monotonic() - started) / 60
        samples.append((minute, acked, rss))
        print(f"{minute:6.1f} {acked:9} {lines:9} {rps:7.0f} {rss:8.1f}", flush=True)
    deadline = time.monotonic() + 30
    while _lines(data / "events.jsonl") < acked and time.monotonic() < deadline:
        time.sleep(0.5)
    print(f"delivered {_lines(data / 'events.jsonl')} of {acked} acknowledged events")
    past = [rss for _, count, rss in samples if count >= 100_000]
    if past:
        print(f"RSS once 100,000 events were in: {past[0]:.1f} MiB")
    half = [rss for minute, _, rss in samples if minute >= args.minutes / 2]
    if len(half) >= 2:
        print(
            f"RSS over the second half: {min(half):.1f} to {max(half):.1f} MiB"
            f" ({half[-1] - half[0]:+.1f} MiB from its start to its end)"
        )
    return 0


def _lines(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as f:
        return sum(1 for _ in f)


if __name__ == "__main__":
    raise SystemExit(main())
