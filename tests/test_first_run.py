"""The first hour: safe defaults, the start-up line, start-up failures in one clear line,
and the warnings that name a source anyone can post to. All through the command line and
real sockets, as an operator meets them."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import FIXTURES, TOKEN, eventually
from tests.processes import free_port, post, run_cli


def serve_args(*extra: str) -> list[str]:
    return [sys.executable, "-m", "relay", "serve", *extra]


def write(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def config_with(host: str | None = None, **source: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "store": {"path": "data/relay.db"},
        "sources": {"qingstor": {"kind": "qingstor", **source}},
        "sinks": {"archive": {"kind": "file", "path": "data/events.jsonl"}},
    }
    if host is not None:
        config["server"] = {"host": host}
    return config


def outside_address() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET: nothing is sent, a route is chosen
        except OSError:
            return None
        address = str(s.getsockname()[0])
    return None if address.startswith("127.") or address == "0.0.0.0" else address


async def test_the_embedded_default_listens_on_loopback_and_says_the_source_is_open(
    tmp_path, processes
):
    relay = processes(tmp_path, None)
    relay.args = serve_args("--port", "0")  # no --host, no --config: the defaults
    await relay.start()
    [line] = [e for e in relay.logs() if e.get("event") == "relay.listening"]
    assert line["host"] == "127.0.0.1"
    assert line["url"] == f"http://127.0.0.1:{relay.port}"
    message = line["message"]
    assert f"listening on http://127.0.0.1:{relay.port}" in message
    assert "loopback only" in message and "embedded default" in message
    assert "source 'qingstor' has no token" in message and "local trial" in message
    # Loopback: nothing to warn about beyond that note.
    assert not [e for e in relay.logs() if e.get("event") == "relay.open_source"]

    body = (FIXTURES / "notifier-create_object.json").read_bytes()
    status, answer = await post(relay.url("/hooks/qingstor"), yaml.safe_load(body))
    assert (status, answer) == (200, {"accepted": 1, "duplicates": 0})
    other = outside_address()
    if other is not None:  # the same port is closed to every other address
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(other, relay.port), 2)
        except OSError:
            pass
        else:
            writer.close()
            raise AssertionError(f"relay answered on {other}")


async def test_a_config_file_without_host_also_listens_on_loopback(tmp_path, processes):
    path = write(tmp_path / "relay.yaml", config_with(token=TOKEN))
    relay = processes(tmp_path, None)
    relay.args = serve_args("--port", "0", "--config", str(path))
    await relay.start()
    [line] = [e for e in relay.logs() if e.get("event") == "relay.listening"]
    assert line["host"] == "127.0.0.1"
    assert "no token" not in line["message"]


async def test_an_open_source_beyond_loopback_is_named_at_start_and_by_check_config(
    tmp_path, processes
):
    path = write(tmp_path / "relay.yaml", config_with(host="0.0.0.0"))
    relay = processes(tmp_path, None)
    relay.args = serve_args("--port", "0", "--config", str(path))
    await relay.start()
    [warning] = [e for e in relay.logs() if e.get("event") == "relay.open_source"]
    assert warning["level"] == "warning"
    assert "source 'qingstor' has no token and no allow_ips" in warning["message"]
    assert f"0.0.0.0:{relay.port}" in warning["message"]
    assert "anyone who can reach it can post events" in warning["message"]

    checked = run_cli("check-config", str(path))
    assert checked.returncode == 0, checked.stderr
    assert "OK" in checked.stdout
    [line] = checked.stderr.splitlines()
    assert line.startswith("warning: source 'qingstor' has no token and no allow_ips")
    assert "0.0.0.0:8080" in line and "sources.qingstor.token" in line


def test_which_sources_check_config_names(tmp_path):
    everywhere = {"allow_ips": ["0.0.0.0/0", "::/0"]}  # an allow-list that allows all
    cases = [
        (config_with(host="0.0.0.0", token=TOKEN), False),
        (config_with(host="0.0.0.0", allow_ips=["10.0.0.0/8"]), False),
        (config_with(host="0.0.0.0", **everywhere), True),
        (config_with(host="127.0.0.1"), False),
        (config_with(host="::1"), False),
        (config_with(host="localhost"), False),
        (config_with(host="::"), True),
        (config_with(host=""), True),
        (config_with(host="[::1]"), False),
        (config_with(host="::ffff:127.0.0.1"), False),
        (config_with(host="0.0.0.0", allow_ips=["0.0.0.0/1", "128.0.0.0/1"]), True),
        (config_with(host="::", allow_ips=["::ffff:0:0/96"]), True),  # every IPv4 sender
        (config_with(host="::", allow_ips=["::ffff:10.0.0.0/104"]), False),
        # A proxy of the operator's in front: the loopback listener faces the world.
        (config_with(host="127.0.0.1") | {"server": {"trusted_proxies": ["127.0.0.1/32"]}}, True),
    ]
    for i, (config, named) in enumerate(cases):
        path = write(tmp_path / f"c{i}.yaml", config)
        result = run_cli("check-config", str(path))
        assert result.returncode == 0, (config, result.stderr)
        assert ("warning: source 'qingstor'" in result.stderr) == named, config
    generic = {
        "server": {"host": "0.0.0.0"},
        "sources": {
            "open": {"kind": "generic"},
            "password": {"kind": "generic", "basic_auth": {"username": "u", "password": "p"}},
            "signed": {"kind": "hmac", "secrets": ["s3cret"]},
        },
        "sinks": {"archive": {"kind": "file", "path": "e.jsonl"}},
    }
    result = run_cli("check-config", str(write(tmp_path / "g.yaml", generic)))
    assert [line.split("'")[1] for line in result.stderr.splitlines()] == ["open"]


def test_the_image_and_deploy_configs_still_require_a_token():
    root = Path(__file__).parent.parent
    for name in ("config/docker.yaml", "deploy/config/relay.yaml"):
        result = run_cli("check-config", str(root / name), env={"RELAY_SIGNING_SECRET": "x"})
        assert result.returncode == 2, name
        assert "RELAY_QINGSTOR_TOKEN is not set" in result.stderr, name
        text = (root / name).read_text()
        assert "host: 0.0.0.0" in text, name  # explicit: the container must be reachable


# --- start-up failures ----------------------------------------------------------------


def failure_lines(output: str) -> list[dict[str, Any]]:
    lines = [yaml.safe_load(line) for line in output.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == "relay.failed"]


def test_a_port_in_use_is_one_line_naming_the_cause_and_the_fix(tmp_path):
    path = write(tmp_path / "relay.yaml", config_with(token=TOKEN))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--config", str(path), "--port", str(port))
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    [failed] = failure_lines(output)
    assert failed["message"].startswith(f"cannot listen on 127.0.0.1:{port}: the address is")
    assert "already in use" in failed["message"] and "--port" in failed["message"]


def test_at_debug_level_the_failure_carries_its_traceback(tmp_path):
    config = config_with(token=TOKEN) | {"log": {"level": "debug"}}
    path = write(tmp_path / "relay.yaml", config)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_cli("serve", "--config", str(path), "--port", str(taken.getsockname()[1]))
    assert result.returncode == 1
    [failed] = failure_lines(result.stdout)
    assert "already in use" in failed["message"]
    assert "Traceback" in failed["exception"]


async def test_a_second_relay_on_the_same_store_says_who_holds_it(tmp_path, processes):
    path = write(tmp_path / "relay.yaml", config_with(token=TOKEN))
    relay = processes(tmp_path, None)
    relay.args = serve_args("--port", "0", "--config", str(path))
    await relay.start()
    result = await asyncio.to_thread(
        run_cli, "serve", "--config", str(path), "--port", str(free_port())
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    [failed] = failure_lines(result.stdout)
    assert "another relay process is serving" in failed["message"]
    assert "store.path" in failed["message"]


def test_an_out_of_range_port_is_a_usage_error(tmp_path):
    for port in ("70000", "-1", "http"):
        result = run_cli("serve", "--port", port)
        assert result.returncode == 2, port
        assert "--port" in result.stderr and "Traceback" not in result.stderr
    assert "between 0 and 65535" in run_cli("serve", "--port", "70000").stderr


async def test_an_unknown_host_name_is_one_line_too(tmp_path):
    path = write(tmp_path / "relay.yaml", config_with(host="no-such-host.invalid", token=TOKEN))
    result = await asyncio.to_thread(run_cli, "serve", "--config", str(path))
    assert result.returncode == 1
    [failed] = failure_lines(result.stdout)
    assert failed["message"].startswith("cannot listen on no-such-host.invalid:8080")
    assert "Traceback" not in result.stdout + result.stderr


async def test_the_open_source_warning_is_not_repeated_by_workers(tmp_path, processes):
    config = config_with(host="0.0.0.0") | {"server": {"host": "0.0.0.0", "workers": 1}}
    path = write(tmp_path / "relay.yaml", config)
    relay = processes(tmp_path, None)
    relay.args = serve_args("--port", "0", "--config", str(path))
    await relay.start()
    await eventually(lambda: [e for e in relay.logs() if e.get("event") == "worker.listening"])
    warnings = [e for e in relay.logs() if e.get("event") == "relay.open_source"]
    assert len(warnings) == 1


async def test_a_second_relay_with_workers_cannot_share_the_port(tmp_path, processes):
    # SO_REUSEPORT lets workers share their port; it must not let another relay in.
    port = free_port()
    first = write(tmp_path / "a.yaml", config_with(token=TOKEN) | {"server": {"workers": 1}})
    relay = processes(tmp_path, None)
    relay.args = serve_args("--port", str(port), "--config", str(first))
    await relay.start()
    other = tmp_path / "other"
    other.mkdir()
    second = write(other / "b.yaml", config_with(token=TOKEN) | {"server": {"workers": 1}})
    result = await asyncio.to_thread(run_cli, "serve", "--config", str(second), "--port", str(port))
    assert result.returncode == 1
    [failed] = failure_lines(result.stdout)
    assert "already in use" in failed["message"]


async def test_a_second_ctrl_c_while_draining_is_answered_not_a_traceback(
    tmp_path, processes, receiver
):
    import signal

    receiver.hang = True  # the send stays in flight: shutdown has something to drain
    config = config_with(token=TOKEN) | {
        "server": {"drain_timeout": "2s"},
        "sinks": {"app": {"kind": "http", "url": receiver.url, "timeout": "30s"}},
    }
    path = write(tmp_path / "relay.yaml", config)
    relay = processes(tmp_path, None)
    relay.args = serve_args("--port", "0", "--config", str(path))
    await relay.start()
    body = yaml.safe_load((FIXTURES / "notifier-create_object.json").read_text())
    assert (await post(relay.url(f"/hooks/qingstor?token={TOKEN}"), body))[0] == 200
    await eventually(lambda: receiver.requests)
    relay.kill(signal.SIGINT)
    await eventually(lambda: [e for e in relay.logs() if e.get("event") == "relay.stopping"])
    relay.kill(signal.SIGINT)
    assert await asyncio.to_thread(relay.wait, 20) == 0
    events = [e.get("event") for e in relay.logs()]
    assert "relay.already_stopping" in events and events[-1] == "relay.stopped"
    assert "Traceback" not in relay.log_path.read_text()


def test_usage_errors_are_one_line_naming_the_argument():
    result = run_cli("serve", "--port", "99999")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "relay serve: error: argument --port: must be between 0 and 65535, not 99999"
        " (see `relay serve --help`)"
    ]
