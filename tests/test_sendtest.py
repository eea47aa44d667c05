"""`relay send-test`: real sockets, relay itself and scripted local servers."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from relay import sendtest
from tests.conftest import TOKEN, eventually, read_lines, relay_config, sample
from tests.processes import free_port

HOOK = f"/hooks/qingstor?token={TOKEN}"
FAST = ["--timeout", "0.3", "--interval", "0.2"]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="relay")
    commands = parser.add_subparsers(dest="command", required=True)
    sendtest.add_parser(commands)
    return parser.parse_args(["send-test", *argv])


async def send(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await sendtest.run_async(parse(*argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def attempt_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("event ")]


@dataclass
class Scripted:
    """A QingStor receiver that answers from a script: a status, or "hang"."""

    script: list[int | str] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(
            {
                "at": time.monotonic(),
                "body": await request.read(),
                "headers": dict(request.headers),
                "url": str(request.url),
            }
        )
        action = self.script.pop(0) if self.script else 200
        if action == "hang":
            await self.release.wait()  # longer than the client's timeout
            action = 200
        assert isinstance(action, int)
        if action == 200:
            return web.json_response({"accepted": 1, "duplicates": 0})
        # Echoes the URL it was called at, token included, as careless servers do.
        return web.json_response({"error": "nope", "url": str(request.url)}, status=action)


@pytest.fixture
async def scripted(aiohttp_server):
    server_side = Scripted()
    app = web.Application()
    app.router.add_post("/hooks/qingstor", server_side.handle)
    server = await aiohttp_server(app)
    server_side.url = str(server.make_url(HOOK))
    yield server_side
    server_side.release.set()


async def test_count_three_against_relay_gives_three_distinct_events(tmp_path: Path, start_relay):
    client = await start_relay(relay_config(tmp_path))
    code, output, _ = await send(str(client.make_url(HOOK)), "--count", "3")

    assert code == 0, output
    lines = attempt_lines(output)
    assert len(lines) == 3
    for n, line in enumerate(lines, start=1):
        assert line.startswith(f"event {n}/3 attempt 1: 200 in ")
        assert line.endswith(' ms {"accepted": 1, "duplicates": 0}')
    assert output.splitlines()[-1] == "summary: 3/3 events got 200 (3 attempts)"

    out = tmp_path / "out" / "events.jsonl"
    written = await eventually(lambda: len(read_lines(out)) == 3 and read_lines(out))
    assert len({event["id"] for event in written}) == 3
    request_ids = {event["data"]["response_elements"]["request_id"] for event in written}
    assert len(request_ids) == 3
    documented = sample()["events"][0]
    for event in written:  # the documented sample, only its request id changed
        data = dict(event["data"], response_elements=documented["response_elements"])
        assert data == documented


async def test_a_timed_out_attempt_is_retried_with_the_same_body(scripted: Scripted):
    scripted.script = ["hang"]
    code, output, _ = await send(scripted.url, *FAST)

    assert code == 0, output
    first_line, second_line = attempt_lines(output)
    assert first_line == "event 1/1 attempt 1: timed out after 0.3s; retry in 0.2s"
    assert second_line.startswith("event 1/1 attempt 2: 200 in ")
    first, second = scripted.requests
    assert first["body"] == second["body"]
    assert json.loads(first["body"])["events"][0]["event_type"] == "create_object"
    assert first["headers"]["Content-Type"] == "application/json"
    gap = second["at"] - first["at"]  # the timeout, then the interval
    assert 0.5 - 0.05 <= gap < 1.5, gap


async def test_notifier_does_not_retry_an_answer(scripted: Scripted):
    scripted.script = [503]
    code, output, _ = await send(scripted.url, *FAST)

    assert code == 1
    [line] = attempt_lines(output)
    assert line.startswith("event 1/1 attempt 1: 503 in ")
    assert line.endswith("; not retried (notifier retries only on timeout)")
    assert len(scripted.requests) == 1
    assert output.splitlines()[-1] == (
        "summary: 0/1 events got 200 (1 attempt); not delivered: event 1 (last: 503)"
    )


async def test_notifier_gives_up_on_a_connection_error_after_its_attempts():
    url = f"http://127.0.0.1:{free_port()}{HOOK}"  # nothing listens there
    code, output, _ = await send(url, "--interval", "0.05", "--attempts", "3")

    assert code == 1
    lines = attempt_lines(output)
    assert len(lines) == 3
    assert all(": failed after " in line for line in lines)
    assert lines[-1].endswith("; giving up after 3 attempts")
    assert TOKEN not in output


async def test_tupu_porn_retries_any_non_200(scripted: Scripted):
    scripted.script = [500, 500]
    code, output, _ = await send(scripted.url, "--kind", "tupu-porn", "--interval", "0.2")

    assert code == 0, output
    statuses = [line.split(": ", 1)[1].split(" ", 1)[0] for line in attempt_lines(output)]
    assert statuses == ["500", "500", "200"]
    assert "retry in 0.2s" in attempt_lines(output)[0]
    assert len({r["body"] for r in scripted.requests}) == 1  # one event, sent three times
    assert json.loads(scripted.requests[0]["body"])["result"]["code"] == 0
    at = [r["at"] for r in scripted.requests]
    for gap in (at[1] - at[0], at[2] - at[1]):
        assert 0.2 - 0.05 <= gap < 1.0, gap


async def test_tupu_porn_gives_up_after_three_retries(scripted: Scripted):
    scripted.script = [500] * 10
    code, output, _ = await send(scripted.url, "--kind", "tupu-porn", "--interval", "0.05")

    assert code == 1
    lines = attempt_lines(output)
    assert len(lines) == 4 == len(scripted.requests)
    assert lines[-1].endswith("; giving up after 4 attempts")
    assert "not delivered: event 1 (last: 500)" in output.splitlines()[-1]


async def test_tupu_porn_count_sends_distinct_nonces(scripted: Scripted):
    code, output, _ = await send(scripted.url, "--kind", "tupu-porn", "--count", "3")

    assert code == 0, output
    nonces = [json.loads(r["body"])["result"]["nonce"] for r in scripted.requests]
    assert len(set(nonces)) == 3
    assert all(0 <= float(nonce) < 1 for nonce in nonces)


async def test_the_token_is_never_printed(scripted: Scripted):
    scripted.script = [401]  # its body echoes the URL, token included
    code, output, errors = await send(scripted.url, *FAST)

    assert code == 1
    assert TOKEN in scripted.requests[0]["url"]  # the token was sent...
    assert TOKEN not in output + errors  # ...but never printed
    shown = scripted.url.replace(TOKEN, "[redacted]")
    assert output.splitlines()[0].startswith(f"POST {shown}: 1 notifier event, timeout 0.3s")
    assert "[redacted]" in attempt_lines(output)[0]


async def test_file_is_posted_byte_for_byte(scripted: Scripted, tmp_path: Path):
    body = b'{"bucket": "b", "object": "k.jpg",\n "result": {"code": 0, "nonce": "0.5"}}\n'
    path = tmp_path / "result.json"
    path.write_bytes(body)
    code, output, _ = await send(scripted.url, "--file", str(path))

    assert code == 0, output
    assert "1 tupu-porn event" in output.splitlines()[0]  # kind from the file's shape
    assert [r["body"] for r in scripted.requests] == [body]


def test_file_with_count_gets_a_fresh_id_per_copy(tmp_path: Path):
    path = tmp_path / "batch.json"
    path.write_text(json.dumps(sample()))
    prepared = sendtest.plan(parse("http://localhost/hooks/q", "--file", str(path), "--count", "4"))

    assert prepared.policy == sendtest.Policy("notifier", 5.0, 1.0, 5)  # QingStor's defaults
    ids = [json.loads(b)["events"][0]["response_elements"]["request_id"] for b in prepared.bodies]
    assert len(set(ids)) == 4


def test_defaults_are_qingstors():
    assert sendtest.Policy.for_kind("notifier") == sendtest.Policy("notifier", 5.0, 1.0, 5)
    assert sendtest.Policy.for_kind("tupu-porn") == sendtest.Policy("tupu-porn", 5.0, 0.5, 4)
    assert sample() == sendtest.NOTIFIER_SAMPLE
    assert sample("tupu-porn-result.json") == sendtest.TUPU_PORN_SAMPLE


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read --file"),
        ("{not json", "is not valid JSON: line 1 column 2"),
    ],
)
def test_bad_file_exits_2(tmp_path: Path, capsys, content: str | None, message: str):
    path = tmp_path / "event.json"
    if content is not None:
        path.write_text(content)
    code = sendtest.run(parse(f"http://127.0.0.1:1{HOOK}", "--file", str(path)))

    assert code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("relay send-test: ")
    assert message in captured.err
    assert TOKEN not in captured.err


def test_count_needs_an_id_to_vary(tmp_path: Path, capsys):
    path = tmp_path / "other.json"
    path.write_text('{"anything": 1}')
    code = sendtest.run(parse("http://127.0.0.1:1/", "--file", str(path), "--count", "2"))

    assert code == 2
    assert "--count 2 needs a notifier batch" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--count", "0"], ["--count", "x"], ["--timeout", "-1"]])
def test_bad_numbers_are_usage_errors(argv: list[str], capsys):
    with pytest.raises(SystemExit) as exited:
        parse("http://127.0.0.1:1/", *argv)
    assert exited.value.code == 2
    assert "relay send-test: error: argument" in capsys.readouterr().err


def test_bad_url_exits_2(capsys):
    code = sendtest.run(parse(f"ftp://example.com{HOOK}"))

    assert code == 2
    err = capsys.readouterr().err
    assert "URL must be an absolute http:// or https:// URL" in err
    assert TOKEN not in err
