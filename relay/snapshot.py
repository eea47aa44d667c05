"""The config as the leader last loaded it, for its workers to load (server.workers).

Workers never read the operator's file: one restarted after an edit the leader has not
reloaded yet, or reloading a moment after the leader while the file changes again,
would run another config than the leader's, and could route events to sinks the leader
does not have. The leader reads the file once, and writes exactly the text it loaded
here; its workers load that.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from relay.config import RelayConfig, parse_config, read_config_text
from relay.errors import ConfigError

# The snapshot's first line names the folder relative paths follow: the operator's file
# may sit behind symlinks that move (a Kubernetes ConfigMap), and one file is replaced
# in one step, so a worker never reads a new base with an old text. JSON-quoted: a
# folder's name may hold a newline, or bytes that are not UTF-8.
_BASE = "# relay: relative paths follow "


class ConfigSnapshot:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._staged: str | None = None
        self.digest = ""  # of the text `load` last read

    def take(self, source: Path) -> RelayConfig:
        """The leader's load: read `source` once and load that text, which `commit()`
        then makes the snapshot, once the leader runs it. Raises ConfigError."""
        self._staged = None
        text = read_config_text(source)
        base = source.resolve().parent
        config = parse_config(text, str(source), base)
        self._staged = f"{_BASE}{json.dumps(str(base))}\n{text}"
        return config

    def commit(self) -> None:
        """Write what `take` loaded last, in one step (a worker reads it whole or not)."""
        if self._staged is None:
            return
        fresh = self.path.with_name(f".{self.path.name}.new")
        fresh.unlink(missing_ok=True)
        # The text may hold secrets, as the file does: readable by this user only.
        fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(self._staged)
            os.replace(fresh, self.path)
        except BaseException:
            fresh.unlink(missing_ok=True)
            raise
        self._staged = None

    def load(self) -> RelayConfig:
        """A worker's load. Raises ConfigError."""
        whole = read_config_text(self.path)
        first, _, text = whole.partition("\n")
        try:
            base = Path(json.loads(first.removeprefix(_BASE)))
        except ValueError:
            raise ConfigError([f"{self.path}: not a config snapshot"]) from None
        config = parse_config(text, str(self.path), base)
        self.digest = _digest(whole)
        return config

    def changed(self) -> bool:
        """Whether the snapshot is no longer what `load` last read."""
        try:
            return _digest(read_config_text(self.path)) != self.digest
        except ConfigError:
            return False  # unreadable: a reload would only fail the same way


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
