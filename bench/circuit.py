"""How often each circuit breaker opens on a sink that fails some of its sends.

A seeded simulation on a clock of its own (no network, no wall time): sends at a steady
rate, each failing with probability p, fed to relay's CircuitBreaker as the dispatcher
feeds it (no send while open; one probe when half-open). Printed: circuit openings per
100,000 sends, for relay 0.1's rule (5 failures in a row) and for today's defaults,
and how long a dead sink takes to open the circuit and how its probes space out.

    python bench/circuit.py [--sends 200000] [--seed 1]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.circuit import CircuitBreaker
from relay.config import CircuitConfig

RATES = (0.2, 1.0, 10.0, 100.0)  # sends a second
FAILING = (0.1, 0.2, 0.3, 0.5, 0.8)  # share of sends that fail


def old_rule() -> CircuitBreaker:
    # relay 0.1: 5 consecutive failures, a 30 s cool-down, no rate, no growth.
    return CircuitBreaker(failures=5, min_sends=10**12, cooldown=30.0, max_cooldown=30.0)


def today() -> CircuitBreaker:
    return CircuitBreaker.of(CircuitConfig())


def openings(make: type | object, p: float, per_second: float, sends: int, seed: int) -> int:
    rng = random.Random(seed)
    circuit = make()  # type: ignore[operator]
    now, opened = 0.0, 0
    for _ in range(sends):
        now += 1.0 / per_second
        if circuit.allowance(now) == 0:
            continue
        failed = rng.random() < p
        if circuit.record(not failed, failed, now) == "open" and circuit.reason != "probe":
            opened += 1
    return opened


def dead_sink(per_second: float) -> tuple[float, list[float]]:
    circuit = today()
    now = 0.0
    while circuit.state != "open":
        now += 1.0 / per_second
        circuit.record(False, True, now)
    opened_at, probes = now, []
    for _ in range(8):
        now = circuit.open_until
        circuit.allowance(now)
        probes.append(now)
        circuit.record(False, True, now)
    gaps = [b - a for a, b in zip([opened_at, *probes], probes, strict=False)]
    return opened_at, gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sends", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    scale = 100_000 / args.sends
    print(f"circuit openings per 100,000 sends ({args.sends:,} simulated, seed {args.seed})")
    print(f"{'failing':>8} {'sends/s':>8} {'0.1: 5 in a row':>16} {'today':>8}")
    for p in FAILING:
        for rate in RATES:
            old = openings(old_rule, p, rate, args.sends, args.seed) * scale
            new = openings(today, p, rate, args.sends, args.seed) * scale
            print(f"{p:>8.0%} {rate:>8g} {old:>16.1f} {new:>8.1f}")
    print()
    for rate in (0.2, 1.0, 100.0):
        opened_at, gaps = dead_sink(rate)
        spaced = ", ".join(f"{g:g}" for g in gaps)
        print(f"dead sink at {rate:g} sends/s: open after {opened_at:.1f} s;", end=" ")
        print(f"probes {spaced} s apart")


if __name__ == "__main__":
    main()
