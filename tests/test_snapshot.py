"""The leader's config snapshot, which its workers load (server.workers)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml

from relay.errors import ConfigError
from relay.snapshot import ConfigSnapshot


def write(path: Path, token: str) -> None:
    path.write_text(
        yaml.safe_dump(
            {
                "store": {"path": "data/relay.db"},
                "sources": {"q": {"kind": "qingstor", "token": token}},
                "sinks": {"archive": {"kind": "file", "path": "data/events.jsonl"}},
            }
        )
    )


def committed(source: Path, snapshot: ConfigSnapshot) -> None:
    """The leader's part: take the file, and commit it once it runs it."""
    snapshot.take(source)
    snapshot.commit()


def test_a_worker_loads_what_the_leader_committed_with_paths_following_the_file(tmp_path):
    operator = tmp_path / "etc"
    operator.mkdir()
    write(operator / "relay.yaml", "first")
    snapshot = ConfigSnapshot(tmp_path / "run" / "config.yaml")
    (tmp_path / "run").mkdir()

    leader = snapshot.take(operator / "relay.yaml")
    snapshot.commit()
    worker = ConfigSnapshot(snapshot.path).load()

    assert worker == leader
    # Relative paths follow the operator's file, not the snapshot's folder.
    assert worker.sinks["archive"].path == operator / "data" / "events.jsonl"  # type: ignore[union-attr]
    assert stat.S_IMODE(snapshot.path.stat().st_mode) == 0o600  # it may hold secrets


def test_nothing_reaches_the_workers_before_commit_and_a_bad_file_never_does(tmp_path):
    source = tmp_path / "relay.yaml"
    write(source, "first")
    snapshot = ConfigSnapshot(tmp_path / "config.yaml")
    committed(source, snapshot)

    write(source, "second")
    snapshot.take(source)  # loaded, but the leader has not applied it yet
    assert snapshot_token(snapshot) == "first"
    snapshot.commit()
    assert snapshot_token(snapshot) == "second"

    source.write_text("sources: [not, a, mapping")
    with pytest.raises(ConfigError):
        snapshot.take(source)
    snapshot.commit()  # nothing staged: stays as it was
    assert snapshot_token(snapshot) == "second"


def snapshot_token(snapshot: ConfigSnapshot) -> str:
    token = ConfigSnapshot(snapshot.path).load().sources["q"].token
    assert token is not None
    return token.get_secret_value()


def test_a_folder_name_with_a_newline_survives_the_first_line(tmp_path):
    odd = tmp_path / "a\nb"
    odd.mkdir()
    write(odd / "relay.yaml", "first")
    snapshot = ConfigSnapshot(tmp_path / "config.yaml")
    committed(odd / "relay.yaml", snapshot)
    config = ConfigSnapshot(snapshot.path).load()
    assert config.sinks["archive"].path == odd / "data" / "events.jsonl"  # type: ignore[union-attr]


def test_a_worker_sees_that_the_snapshot_moved_on_since_it_loaded(tmp_path):
    source = tmp_path / "relay.yaml"
    write(source, "first")
    leader = ConfigSnapshot(tmp_path / "config.yaml")
    committed(source, leader)
    worker = ConfigSnapshot(leader.path)
    worker.load()
    assert not worker.changed()
    write(source, "second")
    committed(source, leader)
    assert worker.changed()  # a reload it missed while starting: it catches up
    worker.load()
    assert not worker.changed()
