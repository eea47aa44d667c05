"""relay, run as `python -m tests.crashing_relay serve ...`, with a store that dies like a
power cut at its Nth acknowledging commit (RELAY_TEST_CRASH_AT_COMMIT=N): after the
group's writes, before their commit reaches the disk. The fault is composed around the
store here, by the tests, and chosen through relay's own backend registry; relay itself
carries no fault switch."""

from __future__ import annotations

import os
from pathlib import Path

from relay import store
from relay.cli import main
from relay.config import SqliteStoreConfig
from relay.store.sqlite import SqliteStore

EXIT_CRASHED = 86


class CrashingStore(SqliteStore):
    def __init__(self, path: Path, *, dedupe_window: float) -> None:
        super().__init__(path, dedupe_window=dedupe_window)
        self.crash_at = int(os.environ.get("RELAY_TEST_CRASH_AT_COMMIT", "0") or 0)
        self.commits = 0

    @classmethod
    def from_config(cls, config: SqliteStoreConfig, *, dedupe_window: float) -> CrashingStore:
        return cls(config.path, dedupe_window=dedupe_window)

    def _before_acknowledging_commit(self) -> None:
        self.commits += 1
        if self.commits == self.crash_at:
            os._exit(EXIT_CRASHED)


if __name__ == "__main__":
    store.BACKENDS["sqlite"] = f"{__name__}:CrashingStore"
    raise SystemExit(main())
