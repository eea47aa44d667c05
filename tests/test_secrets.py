"""No secret relay is given ever comes back out of it.

The main test is one full run of `relay serve` as a real process, at log level debug,
configured with every kind of secret relay accepts, driven through good and refused
requests, failing sinks, a refused and an accepted SIGHUP reload, /metrics and the
operator commands. Then everything relay wrote, answered or printed is scanned for
every secret, in each form it travelled in (a basic-auth password also base64'd in its
header, a whsec_ secret also as its key), and for the credentials and signatures
presented to it. The scan is a plain substring search on purpose: a leak may sit in a
traceback, a library's message or a quoted answer, not in a field with a known name.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import logging
import re
import secrets
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from relay.config import build_config
from relay.logs import configure, redact_text, redact_url_paths
from relay.models import Delivery
from relay.sinks.base import ANSWER_KEPT, Answer, post
from relay.sinks.http import HttpSink, credentials
from tests.conftest import eventually, notifier_body, sample
from tests.processes import RelayProcess, free_port, run_cli

TAG = secrets.token_hex(4)
BASIC_USER = "ops"


def secret(label: str) -> str:
    # Unique per run, and readable in a failure message: the label says which one leaked.
    return f"sekrit-{label}-{TAG}"


class Secrets:
    """Every value that must not come out of relay, by a name that says what it is."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def add(self, name: str, value: str) -> str:
        assert name not in self.values
        self.values[name] = value
        return value

    def add_whsec(self, name: str) -> str:
        key = self.add(f"{name} (its key)", f"whkey-{name.replace(' ', '-')}-{TAG}")
        # The base64 part is a substring of the whole, so the whole covers both.
        return self.add(name, "whsec_" + base64.b64encode(key.encode()).decode())

    def found_in(self, text: str) -> list[str]:
        return sorted(name for name, value in self.values.items() if value in text)


# --- local servers playing the sinks ------------------------------------------------------


def reset(request: web.Request) -> web.Response:
    """Drop the connection with a TCP RST, as a crashing peer does."""
    transport = request.transport
    assert transport is not None
    transport.get_extra_info("socket").setsockopt(
        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
    )
    transport.abort()
    return web.Response()


def debug_page(request: web.Request) -> str:
    # A framework's debug error page: the request line and every header, credentials
    # included. relay quotes answers in its delivery errors, logs and dead letters.
    headers = "\n".join(f"{k}: {v}" for k, v in request.headers.items())
    return f"Internal error handling {request.method} {request.url}\n{headers}\n"


def refusal(request: web.Request) -> str:
    # Many APIs quote the credential they refuse ("Incorrect API key provided: ..."),
    # and not as a header line the log scrubber would recognise.
    return json.dumps(
        {
            "error": "invalid_api_key",
            "message": f"Incorrect API key provided: {request.headers.get('X-Custom-Auth')}",
            "authorization": request.headers.get("Authorization"),
        }
    )


@dataclass
class Downstream:
    """Every sink's receiver on one local server: an app, a chat robot, a bot, Slack."""

    base: str = ""
    received: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {"app": [], "robot": [], "bot": [], "slack": [], "chat": []}
    )

    async def record(self, name: str, request: web.Request) -> int:
        self.received[name].append(
            {
                "path_qs": request.path_qs,
                "headers": dict(request.headers),
                "body": (await request.read()).decode(),
            }
        )
        return len(self.received[name])

    async def app(self, request: web.Request) -> web.Response:
        # An error page, a reset, a refusal (a dead letter); then accepted.
        n = await self.record("app", request)
        if n == 1:
            return web.Response(status=500, text=debug_page(request))
        if n == 2:
            return reset(request)
        if n == 3:
            return web.Response(status=403, text=refusal(request))
        return web.Response(text="ok")

    async def robot(self, request: web.Request) -> web.Response:
        # A DingTalk-style robot behind a proxy that is down and says whom it turned away.
        await self.record("robot", request)
        who = request.headers.get("Authorization")
        return web.Response(status=503, text=f"no upstream for {request.url} ({who})")

    async def bot(self, request: web.Request) -> web.Response:
        # A Feishu-style bot, the credential in its URL's path; the peer keeps resetting.
        await self.record("bot", request)
        return reset(request)

    async def chat(self, request: web.Request) -> web.Response:
        # Each chat robot kind: first a debug page quoting the whole request (its URL with
        # token, key, signature, the body with Feishu's sign), then its own success.
        n = await self.record("chat", request)
        path = request.path
        if sum(r["path_qs"].split("?")[0] == path for r in self.received["chat"][:n]) == 1:
            body = (await request.read()).decode()
            return web.Response(status=200, text=debug_page(request) + "\n" + body)
        if request.path.startswith("/api/webhooks/"):
            return web.Response(status=204)
        if request.path.startswith("/workflows/"):
            return web.Response(status=202)
        field = "code" if request.path.startswith("/open-apis/") else "errcode"
        return web.json_response({field: 0, "msg": "ok"})

    async def slack(self, request: web.Request) -> web.Response:
        if await self.record("slack", request) == 1:
            return web.Response(status=500, text=f"rollup_error at {request.url}")
        return web.Response(text="ok")


@pytest.fixture
async def downstream(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> Downstream:
    sinks = Downstream()
    app = web.Application()
    app.router.add_post("/events", sinks.app)
    app.router.add_post("/robot/send", sinks.robot)
    app.router.add_post("/open-apis/bot/v2/hook/{token}", sinks.bot)
    app.router.add_post("/open-apis/bot/v2/hooks/{token}", sinks.chat)
    app.router.add_post("/robot2/send", sinks.chat)
    app.router.add_post("/cgi-bin/webhook/send", sinks.chat)
    app.router.add_post("/api/webhooks/{id}/{token}", sinks.chat)
    app.router.add_post("/workflows/{id}/triggers/manual/paths/invoke", sinks.chat)
    # An incoming webhook's path is its credential; relay is given this server's URL.
    app.router.add_post("/services/{team}/{bot}/{token}", sinks.slack)
    server = await aiohttp_server(app)
    sinks.base = str(server.make_url("")).rstrip("/")
    return sinks


# --- the configuration ---------------------------------------------------------------------

FAST_RETRY = {"max_attempts": 10, "initial": "20ms", "max": "100ms"}
FEW_RETRIES = {"max_attempts": 3, "initial": "20ms", "max": "50ms"}
# Failures are the point here: an open circuit would only slow the run down.
NO_CIRCUIT = {"enabled": False}


@dataclass
class Generation:
    """One generation of secrets (a reload rotates them all) and the config holding them."""

    name: str
    qingstor_token: str
    generic_token: str
    basic_password: str
    hmac_secret: str
    sw_secrets: list[str]  # whsec_..., newest first
    bearer: str
    slack_path: str
    bot_token: str
    s3_token: str
    bus_token: str
    bus_hmac: str
    console_token: str = ""
    config: dict[str, Any] = field(default_factory=dict)


def generation(
    found: Secrets, downstream: Downstream, name: str, before: Generation | None
) -> Generation:
    add = found.add
    sw_new = found.add_whsec(f"standard-webhooks source secret {name}")
    gen = Generation(
        name=name,
        qingstor_token=add(f"qingstor source token {name}", secret(f"qingstor-{name}")),
        generic_token=add(f"generic source token {name}", secret(f"generic-{name}")),
        basic_password=add(f"basic auth password {name}", secret(f"basicpw-{name}")),
        hmac_secret=add(f"hmac source secret {name}", secret(f"hmac-{name}")),
        # While rotating, the previous secret still signs.
        sw_secrets=[sw_new, *(before.sw_secrets[:1] if before else [])],
        bearer=add(f"http sink bearer token {name}", secret(f"bearer-{name}")),
        slack_path=add(f"slack webhook path secret {name}", secret(f"slack-{name}")),
        bot_token=add(f"bot webhook path token {name}", secret(f"feishu-{name}")),
        s3_token=add(f"s3 source token {name}", secret(f"minio-{name}")),
        bus_token=add(f"cloudevents source token {name}", secret(f"bus-{name}")),
        bus_hmac=add(f"cloudevents source hmac secret {name}", secret(f"bushmac-{name}")),
    )
    add(f"basic auth header {name}", basic(gen.basic_password).removeprefix("Basic "))
    custom = add(f"http sink custom header {name}", secret(f"custom-{name}"))
    app_query = add(f"http sink url query token {name}", secret(f"appquery-{name}"))
    robot_token = add(f"robot url access_token {name}", secret(f"ding-{name}"))
    robot_password = add(f"robot url password {name}", secret(f"userinfo-{name}"))
    add(
        f"robot url credentials as basic auth {name}",
        base64.b64encode(f"robot:{robot_password}".encode()).decode(),
    )
    discord_token = add(f"discord webhook path token {name}", secret(f"discord-{name}"))
    chat = {
        "ding_token": add(f"dingtalk access_token {name}", secret(f"dtoken-{name}")),
        "ding_secret": add(f"dingtalk signing secret {name}", "SEC" + secret(f"dsec-{name}")),
        "feishu_token": add(f"feishu hook token {name}", secret(f"ftoken-{name}")),
        "feishu_secret": add(f"feishu signing secret {name}", secret(f"fsec-{name}")),
        "wecom_key": add(f"wecom robot key {name}", secret(f"wkey-{name}")),
        "discord_token": add(f"discord sink token {name}", secret(f"dsink-{name}")),
        "teams_sig": add(f"teams workflow sig {name}", secret(f"tsig-{name}")),
    }
    chat_sink = {"pace": "20ms", "retry": FAST_RETRY, "circuit": NO_CIRCUIT}
    gen.console_token = add(f"console token {name}", secret(f"console-{name}"))
    host = downstream.base.removeprefix("http://")
    gen.config = {
        "store": {"path": "data/relay.db", "prune_interval": "1h"},
        "log": {"level": "debug", "format": "json"},
        "console": {"token": gen.console_token},
        "server": {"max_body_bytes": 65536, "drain_timeout": "2s"},
        "sources": {
            # From the environment, as the README advises; later generations write it.
            "qingstor": {"kind": "qingstor", "token": "${RELAY_TEST_QINGSTOR_TOKEN}"},
            "hooks": {
                "kind": "generic",
                "token": gen.generic_token,
                "basic_auth": {"username": BASIC_USER, "password": gen.basic_password},
            },
            "github": {
                "kind": "hmac",
                "secrets": [gen.hmac_secret],
                "prefix": "sha256=",
                "id_from": "header:X-GitHub-Delivery",
            },
            "sw": {"kind": "standard-webhooks", "secrets": gen.sw_secrets},
            "minio": {"kind": "s3", "token": gen.s3_token},
            "bus": {
                "kind": "cloudevents",
                "token": gen.bus_token,
                "token_header": "x-eventbridge-signature-token",
                "hmac": {"secrets": [gen.bus_hmac], "header": "X-Signature"},
            },
        },
        "sinks": {
            "archive": {"kind": "file", "path": "data/events.jsonl"},
            "app": {
                "kind": "http",
                "url": f"{downstream.base}/events?token={app_query}",
                "headers": {"Authorization": f"Bearer {gen.bearer}", "X-Custom-Auth": custom},
                "signing_secret": found.add_whsec(f"http sink signing secret {name}"),
                "retry": FAST_RETRY,
                "circuit": NO_CIRCUIT,
            },
            "robot": {
                "kind": "http",
                "url": f"http://robot:{robot_password}@{host}/robot/send"
                f"?access_token={robot_token}&timestamp=1700000000000",
                "retry": FEW_RETRIES,
                "circuit": NO_CIRCUIT,
            },
            "bot": {
                "kind": "http",
                "url": f"{downstream.base}/open-apis/bot/v2/hook/{gen.bot_token}",
                "retry": FEW_RETRIES,
                "circuit": NO_CIRCUIT,
            },
            "discord": {
                "kind": "http",
                # Nothing listens there: connection refused.
                "url": f"http://127.0.0.1:{free_port()}/api/webhooks/123/{discord_token}",
                "retry": FEW_RETRIES,
                "circuit": NO_CIRCUIT,
            },
            "ding": {
                "kind": "dingtalk",
                "url": f"{downstream.base}/robot2/send?access_token={chat['ding_token']}",
                "secret": chat["ding_secret"],
                **chat_sink,
            },
            "lark": {
                "kind": "feishu",
                "url": f"{downstream.base}/open-apis/bot/v2/hooks/{chat['feishu_token']}",
                "secret": chat["feishu_secret"],
                **chat_sink,
            },
            "wework": {
                "kind": "wecom",
                "url": f"{downstream.base}/cgi-bin/webhook/send?key={chat['wecom_key']}",
                **chat_sink,
            },
            "guild": {
                "kind": "discord",
                "url": f"{downstream.base}/api/webhooks/42/{chat['discord_token']}",
                **chat_sink,
            },
            "channel": {
                "kind": "teams",
                "url": f"{downstream.base}/workflows/7/triggers/manual/paths/invoke"
                f"?api-version=1&sp=%2Ftriggers%2Fmanual%2Frun&sv=1.0&sig={chat['teams_sig']}",
                **chat_sink,
            },
            "team": {
                "kind": "slack",
                "url": f"{downstream.base}/services/T000/B000/{gen.slack_path}",
                "pace": "20ms",
                "retry": FAST_RETRY,
                "circuit": NO_CIRCUIT,
            },
        },
    }
    return gen


def invalid_config(found: Secrets, gen: Generation) -> dict[str, Any]:
    """Every problem sits on a secret: each must be named by its path, never quoted."""
    config = json.loads(json.dumps(gen.config))
    sinks, sources = config["sinks"], config["sources"]
    bad = found.add(f"slack url with a bad scheme {gen.name}", secret(f"badslack-{gen.name}"))
    sinks["team"]["url"] = f"hxxps://hooks.slack.com/services/T0/B0/{bad}"
    bad = found.add(f"http url with a bad scheme {gen.name}", secret(f"badquery-{gen.name}"))
    sinks["app"]["url"] = f"ftp://app.internal/events?token={bad}"
    bad = found.add(f"malformed whsec {gen.name}", "whsec_!!" + secret(f"badwhsec-{gen.name}"))
    sinks["app"]["signing_secret"] = bad
    bad = found.add(f"header value as a list {gen.name}", secret(f"listheader-{gen.name}"))
    sinks["app"]["headers"] = {"Authorization": [f"Bearer {bad}"]}
    bad = found.add(f"token as a mapping {gen.name}", secret(f"maptoken-{gen.name}"))
    sources["hooks"]["token"] = {"value": bad}
    bad = found.add(f"secret under a misspelt key {gen.name}", secret(f"typo-{gen.name}"))
    sources["github"]["secret"] = bad
    return config


def write(path: str | Path, config: dict[str, Any]) -> None:
    Path(path).write_text(yaml.safe_dump(config))


def unparsable_config(found: Secrets) -> str:
    broken = found.add("secret on a line YAML cannot parse", secret("yamlerror"))
    return f'sources:\n  q: {{kind: qingstor, token: "{broken}\n  other: [\n'


# --- driving relay -------------------------------------------------------------------------


def basic(password: str, user: str = BASIC_USER) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def hub_signature(key: str, body: bytes) -> str:
    return "sha256=" + hmac.new(key.encode(), body, hashlib.sha256).hexdigest()


def sw_signature(whsec: str, msg_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(whsec.removeprefix("whsec_"))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


@dataclass
class Client:
    """Talks to relay over real sockets; keeps every answer, headers included, to scan."""

    relay: RelayProcess
    session: ClientSession
    answers: list[tuple[str, str]] = field(default_factory=list)  # (what, text)

    async def expect(
        self,
        status: int,
        what: str,
        path: str,
        *,
        method: str = "POST",
        body: bytes = b"{}",
        headers: dict[str, str] | None = None,
    ) -> str:
        url = self.relay.url(path)
        async with self.session.request(method, url, data=body, headers=headers) as response:
            head = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
            text = f"{head}\n\n{await response.text()}"
        self.answers.append((what, text))
        assert response.status == status, f"{what}: {response.status}, expected {status}: {text}"
        return text

    async def malformed(self, token: str) -> None:
        """A request so broken that aiohttp's parser refuses it, a token in its request line."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.relay.port)
        writer.write(
            f"POST /hooks/qingstor?token={token} HTTP/1.1\r\nHost: relay\r\n"
            "X-Broken: a\x01b\r\nContent-Length: 2\r\n\r\n{}".encode()
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout=10)
        writer.close()
        self.answers.append(("a malformed request", answer.decode("utf-8", "replace")))
        assert answer.startswith(b"HTTP/1.0 400") or answer.startswith(b"HTTP/1.1 400")

    async def settled(self) -> str | None:
        """The /metrics text once no sink has anything pending, else None."""
        text = await self.expect(200, "/metrics", "/metrics", method="GET")
        depth = [
            s.value
            for family in text_string_to_metric_families(text.split("\n\n", 1)[1])
            for s in family.samples
            if s.name == "relay_queue_depth"
        ]
        return text if depth and not any(depth) else None


async def drive(client: Client, gen: Generation, found: Secrets) -> None:
    """Good and refused requests to every source. What was presented (wrong tokens,
    signatures, the expected signature of a tampered body) joins the secrets: relay
    must neither echo nor log those either."""
    n, add = gen.name, found.add
    qs = gen.qingstor_token
    wrong = add(f"wrong token presented {n}", secret(f"wrongtoken-{n}"))
    body = json.dumps(notifier_body(f"{n}/a.jpg", request_id=f"req-{n}")).encode()
    other = json.dumps(notifier_body(f"{n}/b.jpg", request_id=f"req-{n}")).encode()
    with_token = f"/hooks/qingstor?token={qs}"
    await client.expect(200, f"qingstor ?token= {n}", with_token, body=body)
    await client.expect(
        200, f"qingstor header {n}", "/hooks/qingstor", body=other, headers={"X-Relay-Token": qs}
    )
    await client.expect(401, f"qingstor wrong {n}", f"/hooks/qingstor?token={wrong}", body=body)
    await client.expect(
        401, f"qingstor wrong header {n}", "/hooks/qingstor", headers={"X-Relay-Token": wrong}
    )
    await client.expect(401, f"qingstor no token {n}", "/hooks/qingstor", body=body)
    await client.expect(400, f"not json {n}", with_token, body=b"{not json")
    await client.expect(400, f"not an event {n}", with_token, body=b"[1, 2]")
    await client.expect(400, f"invalid event {n}", with_token, body=b'{"events": [{}]}')
    await client.expect(
        415, f"declared text {n}", with_token, body=b"x", headers={"Content-Type": "text/plain"}
    )
    await client.expect(413, f"too large {n}", with_token, body=b" " * 70000)
    await client.expect(405, f"GET a hook {n}", with_token, method="GET")
    await client.expect(404, f"unknown source {n}", f"/hooks/nosuch?token={qs}")
    await client.expect(404, f"unknown path {n}", f"/hook/qingstor?token={qs}")

    deploy = json.dumps({"type": "deploy", "gen": n}).encode()
    both = {"X-Relay-Token": gen.generic_token, "Authorization": basic(gen.basic_password)}
    await client.expect(200, f"generic {n}", "/hooks/hooks", body=deploy, headers=both)
    wrong_password = add(f"wrong password presented {n}", secret(f"wrongpw-{n}"))
    add(f"wrong basic auth header {n}", basic(wrong_password).removeprefix("Basic "))
    await client.expect(
        401,
        f"generic wrong password {n}",
        "/hooks/hooks",
        body=deploy,
        headers={**both, "Authorization": basic(wrong_password)},
    )
    await client.expect(
        401,
        f"generic wrong token, right password {n}",
        f"/hooks/hooks?token={wrong}",
        body=deploy,
        headers={"Authorization": basic(gen.basic_password)},
    )
    await client.expect(401, f"generic nothing {n}", "/hooks/hooks", body=deploy)

    push = json.dumps({"ref": f"refs/heads/{n}"}).encode()
    signed = add(f"hmac signature {n}", hub_signature(gen.hmac_secret, push))
    delivery = {"X-GitHub-Delivery": f"d-{n}"}
    await client.expect(
        200,
        f"hmac {n}",
        "/hooks/github",
        body=push,
        headers={**delivery, "X-Hub-Signature-256": signed},
    )
    add(
        f"hmac expected signature of a tampered body {n}",
        hub_signature(gen.hmac_secret, push + b" "),
    )
    await client.expect(
        401,
        f"hmac tampered {n}",
        "/hooks/github",
        body=push + b" ",
        headers={**delivery, "X-Hub-Signature-256": signed},
    )
    await client.expect(401, f"hmac unsigned {n}", "/hooks/github", body=push, headers=delivery)

    now = int(time.time())
    event = json.dumps({"type": "invoice.paid", "gen": n}).encode()

    def sw(signature: str, msg_id: str = f"m-{n}", at: int = now) -> dict[str, str]:
        return {"webhook-id": msg_id, "webhook-timestamp": str(at), "webhook-signature": signature}

    good = add(f"sw signature {n}", sw_signature(gen.sw_secrets[0], f"m-{n}", now, event))
    await client.expect(200, f"sw {n}", "/hooks/sw", body=event, headers=sw(good))
    if len(gen.sw_secrets) > 1:
        older = sw_signature(gen.sw_secrets[1], f"m-old-{n}", now, event)
        add(f"sw signature under the older secret {n}", older)
        await client.expect(
            200, f"sw older {n}", "/hooks/sw", body=event, headers=sw(older, f"m-old-{n}")
        )
    expected = sw_signature(gen.sw_secrets[0], f"m-{n}", now, event + b"!")
    add(f"sw expected signature of a tampered body {n}", expected)
    await client.expect(401, f"sw tampered {n}", "/hooks/sw", body=event + b"!", headers=sw(good))
    stale = add(
        f"sw stale signature {n}", sw_signature(gen.sw_secrets[0], f"m-{n}", now - 3600, event)
    )
    await client.expect(
        401, f"sw stale {n}", "/hooks/sw", body=event, headers=sw(stale, at=now - 3600)
    )
    await client.expect(401, f"sw malformed {n}", "/hooks/sw", body=event, headers=sw("v1,!!"))

    minio = sample("minio-put.json")
    minio["Records"][0]["s3"]["object"]["sequencer"] = f"seq-{n}"
    put = json.dumps(minio).encode()
    bearer = {"Authorization": f"Bearer {gen.s3_token}"}
    await client.expect(200, f"s3 bearer {n}", "/hooks/minio", body=put, headers=bearer)
    await client.expect(200, f"s3 bearer probe {n}", "/hooks/minio", method="HEAD", headers=bearer)
    await client.expect(
        401, f"s3 wrong bearer {n}", "/hooks/minio", body=put,
        headers={"Authorization": f"Bearer {wrong}"},
    )  # fmt: skip
    await client.expect(401, f"s3 wrong ?token= {n}", f"/hooks/minio?token={wrong}", body=put)

    ce = json.dumps(
        {"specversion": "1.0", "id": f"ce-{n}", "source": "/bus", "type": "t", "data": {}}
    ).encode()
    ce_signed = add(f"cloudevents hmac signature {n}", hmac.new(
        gen.bus_hmac.encode(), ce, hashlib.sha256).hexdigest())  # fmt: skip
    add(
        f"cloudevents expected hmac of a tampered body {n}",
        hmac.new(gen.bus_hmac.encode(), ce + b" ", hashlib.sha256).hexdigest(),
    )
    by_header = {"x-eventbridge-signature-token": gen.bus_token, "X-Signature": ce_signed}
    await client.expect(200, f"cloudevents {n}", "/hooks/bus", body=ce, headers=by_header)
    await client.expect(
        401, f"cloudevents tampered {n}", "/hooks/bus", body=ce + b" ", headers=by_header
    )
    await client.expect(
        401, f"cloudevents wrong token {n}", "/hooks/bus", body=ce,
        headers={**by_header, "x-eventbridge-signature-token": wrong},
    )  # fmt: skip
    for path in ("/healthz", "/readyz"):
        await client.expect(200, path, path, method="GET")


@dataclass
class Operator:
    """Runs `relay` commands the way an operator would, keeping what they print."""

    cwd: Path
    env: dict[str, str]
    printed: list[tuple[str, str]] = field(default_factory=list)

    async def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = await asyncio.to_thread(run_cli, *args, cwd=self.cwd, env=self.env)
        self.printed.append((f"relay {' '.join(args)}", result.stdout + result.stderr))
        return result


# --- the run ---------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 1])
async def test_no_secret_comes_out_of_a_full_run(
    tmp_path: Path,
    processes: Callable[..., RelayProcess],
    downstream: Downstream,
    workers: int,
) -> None:
    found = Secrets()
    first = generation(found, downstream, "gen1", None)
    first.config["server"]["workers"] = workers
    relay = processes(tmp_path, first.config)
    relay.env = {"RELAY_TEST_QINGSTOR_TOKEN": first.qingstor_token}
    operator = Operator(tmp_path, relay.env)
    config = str(tmp_path / "relay.yaml")

    def logged(event: str) -> int:
        return sum(1 for line in relay.logs() if line["event"] == event)

    await relay.start()
    async with ClientSession() as session:
        client = Client(relay, session)
        await drive(client, first, found)
        await client.malformed(first.qingstor_token)
        await eventually(client.settled, within=30)
        assert (await operator.run("status", "--config", config)).returncode == 0

        # A reload refused on secrets, then one that rotates every secret.
        write(config, invalid_config(found, first))
        relay.kill(signal.SIGHUP)
        await eventually(lambda: logged("config.reload_failed"))
        second = generation(found, downstream, "gen2", first)
        second.config["server"]["workers"] = workers
        second.config["sources"]["qingstor"]["token"] = second.qingstor_token
        write(config, second.config)
        relay.kill(signal.SIGHUP)
        # The leader, then each worker.
        await eventually(lambda: logged("config.reloaded") == 1 + workers, within=20)

        await drive(client, second, found)
        await client.expect(
            401, "the rotated-out token", f"/hooks/qingstor?token={first.qingstor_token}"
        )
        await eventually(client.settled, within=30)

        # Every console page, as an operator opens them: none may show a secret.
        console = {"Authorization": f"Bearer {second.console_token}"}
        pages = ["/console/", "/console/events", "/console/dead-letters", "/console/quarantine"]
        for path in pages:
            await client.expect(200, f"console {path}", path, method="GET", headers=console)
        letters_page = client.answers[-2][1]
        for event_id in sorted(set(re.findall(r'value="(evt_[0-9a-f]+)"', letters_page)))[:3]:
            path = f"/console/events/{event_id}"
            await client.expect(200, f"console {path}", path, method="GET", headers=console)
        rotated = {"Authorization": f"Bearer {first.console_token}"}
        await client.expect(
            401, "the rotated-out console token", "/console/", method="GET", headers=rotated
        )

    for args in (("status",), ("status", "--json"), ("dlq", "list")):
        assert (await operator.run(*args, "--config", config)).returncode == 0
    listed = await operator.run("dlq", "list", "--json", "--config", config)
    letters = [json.loads(line) for line in listed.stdout.splitlines()]
    refused = next(letter for letter in letters if letter["sink"] == "app")
    assert (
        await operator.run("dlq", "show", refused["event_id"], "--config", config)
    ).returncode == 0
    # The unusable bodies of authenticated senders, kept for inspection.
    kept = await operator.run("dlq", "list", "--quarantine", "--json", "--config", config)
    first_kept = json.loads(kept.stdout.splitlines()[0])
    show = ("dlq", "show", "--quarantine", str(first_kept["id"]), "--config", config)
    assert (await operator.run(*show)).returncode == 0
    relay.kill(signal.SIGTERM)
    assert await asyncio.to_thread(relay.wait, 30) == 0

    checks = tmp_path / "checks"
    checks.mkdir()
    write(checks / "valid.yaml", second.config)
    write(checks / "invalid.yaml", invalid_config(found, second))
    (checks / "unparsable.yaml").write_text(unparsable_config(found))
    for name, code in (("valid.yaml", 0), ("invalid.yaml", 2), ("unparsable.yaml", 2)):
        assert (await operator.run("check-config", str(checks / name))).returncode == code

    # --- the run did what it claims: every secret was live, every failure happened --------
    received = downstream.received
    assert received["app"][0]["headers"]["Authorization"] == f"Bearer {first.bearer}"
    assert received["app"][-1]["headers"]["Authorization"] == f"Bearer {second.bearer}"
    assert {r["path_qs"].rsplit("/", 1)[1] for r in received["slack"]} == {
        first.slack_path,
        second.slack_path,
    }
    assert {r["path_qs"].rsplit("/", 1)[1] for r in received["bot"]} == {
        first.bot_token,
        second.bot_token,
    }
    assert all(r["headers"]["Authorization"].startswith("Basic ") for r in received["robot"])
    # Every chat robot kind was sent to, and the signing ones signed.
    chat_paths = {r["path_qs"].split("/")[1] for r in received["chat"]}
    assert chat_paths == {"robot2", "open-apis", "cgi-bin", "api", "workflows"}
    assert all("&sign=" in r["path_qs"] for r in received["chat"] if "/robot2/" in r["path_qs"])
    assert all('"sign"' in r["body"] for r in received["chat"] if "/open-apis/" in r["path_qs"])
    log = relay.logs()
    assert {
        "config.reload_failed",
        "config.reloaded",
        "http.malformed_request",
        "delivery.retry",
        "delivery.dead",
        "delivery.done",
        "relay.stopped",
    } <= {line["event"] for line in log}
    assert {
        ("qingstor", "invalid_token"),
        ("qingstor", "missing_token"),
        ("hooks", "invalid_credentials"),
        ("hooks", "invalid_token"),
        ("hooks", "missing_token"),
        ("github", "invalid_signature"),
        ("github", "missing_signature"),
        ("sw", "invalid_signature"),
        ("sw", "stale_timestamp"),
    } <= {(line.get("source"), line.get("error")) for line in log if line["event"] == "request"}
    retried = {line["sink"] for line in log if line["event"] == "delivery.retry"}
    assert {"app", "robot", "bot", "discord", "team"} <= retried
    assert {"app", "robot", "bot", "discord"} <= {letter["sink"] for letter in letters}

    # --- the scan ---------------------------------------------------------------------------
    scanned = [("relay's log", relay.log_path.read_text()), *client.answers, *operator.printed]
    # What relay stored: envelopes, deliveries' last errors.
    scanned += [(p.name, p.read_bytes().decode("latin-1")) for p in (tmp_path / "data").iterdir()]
    # What relay sent on: event data only (the headers are each sink's own credentials).
    scanned += [
        (f"payloads to {name}", "\n".join(r["body"] for r in requests))
        for name, requests in received.items()
    ]
    leaks = [(where, name) for where, text in scanned for name in found.found_in(text)]
    assert not leaks, "\n".join(f"{name!r} in {where}" for where, name in leaks)


# --- the pieces ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (
            "POST https://hooks.slack.com/services/T0123ABCD/B0456EFGH/xoxbSeCrEt123 failed",
            "POST https://hooks.slack.com/[redacted] failed",
        ),
        (
            "url='https://discord.com/api/webhooks/1234567890/tok_SeCrEt-value?wait=true'",
            "url='https://discord.com/[redacted]'",
        ),
        (
            '{"url": "https://open.feishu.cn/open-apis/bot/v2/hook/0b1c-SeCrEt-uuid"}',
            '{"url": "https://open.feishu.cn/[redacted]"}',
        ),
        (
            "https://acme.webhook.office.com/webhookb2/g1@t1/IncomingWebhook/SeCrEt/g2",
            "https://acme.webhook.office.com/[redacted]",
        ),
        (
            "https://api.telegram.org/bot123:SeCrEt/sendMessage",
            "https://api.telegram.org/[redacted]",
        ),
        # User info is a password, even when it contains an @.
        ("http://robot:p@SeCrEt@10.0.0.7:8080", "http://10.0.0.7:8080/[redacted]"),
        (
            "InvalidURL(URL('https://oapi.dingtalk.com/robot/send?access_token=SeCrEt'))",
            "InvalidURL(URL('https://oapi.dingtalk.com/[redacted]'))",
        ),
        # Nothing to hide: left as it is.
        ("see https://hooks.slack.com/ or http://127.0.0.1:8080", None),
        ("POST /hooks/qingstor 401", None),
    ],
)
def test_redact_url_paths_keeps_scheme_and_host_only(text: str, shown: str | None) -> None:
    assert redact_url_paths(text) == (text if shown is None else shown)


@pytest.mark.parametrize(
    "text",
    [
        '{"Authorization": "Bearer SeCrEt"}',
        "<CIMultiDict('Authorization': 'Bearer SeCrEt')>",
        "Authorization: Bearer SeCrEt",
        "x-relay-token:SeCrEt",
    ],
)
def test_redact_text_hides_secret_headers_written_as_mappings_too(text: str) -> None:
    assert "SeCrEt" not in redact_text(text)
    assert "[redacted]" in redact_text(text)


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    handlers = logging.getLogger().handlers[:]
    out = io.StringIO()
    configure("debug", "json", out)
    yield out
    structlog.reset_defaults()
    logging.getLogger().handlers = handlers


def test_logged_urls_lose_their_path_wherever_they_are(log_stream: io.StringIO) -> None:
    slack = "https://hooks.slack.com/services/T0/B0/SeCrEt1"
    structlog.get_logger().warning(
        "dispatch.sink_error",
        error=f"ValueError: cannot post to {slack}",
        urls=[slack, {"target": "https://discord.com/api/webhooks/1/SeCrEt2"}],
    )
    logging.getLogger("aiohttp.client").error("request to %s failed", slack)
    first, second = (json.loads(line) for line in log_stream.getvalue().splitlines())
    assert first["error"] == "ValueError: cannot post to https://hooks.slack.com/[redacted]"
    assert first["urls"] == [
        "https://hooks.slack.com/[redacted]",
        {"target": "https://discord.com/[redacted]"},
    ]
    assert second["event"] == "request to https://hooks.slack.com/[redacted] failed"


def http_sink(url: str, **extra: Any) -> HttpSink:
    config = build_config(
        {"sinks": {"app": {"kind": "http", "url": url, **extra}}}, base_dir=Path("."), env={}
    )
    return HttpSink("app", config.sinks["app"])  # type: ignore[arg-type]


def test_credentials_are_every_form_a_sink_sends_them_in() -> None:
    sink = http_sink(
        "https://relay-bot:pa55-word@app.example/events",
        headers={"Authorization": "Bearer tok-123456", "X-Api-Key": "key-abcdef", "X-Env": "prod"},
    )
    assert set(credentials(sink.config)) == {
        "Bearer tok-123456",
        "tok-123456",
        "key-abcdef",
        "pa55-word",
        base64.b64encode(b"relay-bot:pa55-word").decode(),
    }


async def test_an_answer_quoting_the_sinks_credentials_comes_back_without_them(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> None:
    async def refuse(request: web.Request) -> web.Response:
        key, auth = request.headers["X-Api-Key"], request.headers["Authorization"]
        return web.Response(status=401, text=f"Incorrect API key {key} (as {auth})")

    app = web.Application()
    app.router.add_post("/events", refuse)
    server = await aiohttp_server(app)
    url = str(server.make_url("/events")).replace("://", "://bot:pa55-word@")
    sink = http_sink(url, headers={"X-Api-Key": "key-abcdef-0123456789"})
    await sink.start()
    try:
        delivery = Delivery(1, "evt_1", "app", 0, 0.0, json.dumps(sample()))
        [outcome] = await sink.send([delivery])
    finally:
        await sink.close()
    assert (outcome.result, outcome.status) == ("dead", 401)
    # The URL's credentials went as basic auth: "Basic " + base64("bot:pa55-word").
    assert outcome.error == "HTTP 401: Incorrect API key [redacted] (as Basic [redacted])"


async def test_a_credential_across_the_end_of_what_is_read_leaves_no_part_behind(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> None:
    key = "key-abcdef-0123456789"

    async def quote_late(request: web.Request) -> web.Response:
        # The key starts 4 characters before the end of the KiB relay keeps.
        return web.Response(status=500, text="x" * (ANSWER_KEPT - 4) + key + "y" * 100)

    app = web.Application()
    app.router.add_post("/events", quote_late)
    server = await aiohttp_server(app)
    async with ClientSession() as session:
        answer = await post(session, str(server.make_url("/events")), b"{}", {}, [key])
    assert isinstance(answer, Answer)
    assert answer.body == "x" * (ANSWER_KEPT - 4) + "[red"


@pytest.mark.parametrize(
    ("page", "bare"),
    [
        # Multibyte text first (1,100 bytes, 368 characters): the bytes read (the KiB
        # kept and the URL's length) end inside the token, short of 1,024 characters.
        pytest.param(
            lambda key: "错误" * 183 + "xx" + key + "y" * 5000, True, id="read-ends-inside-it"
        ),
        # The whole URL, JSON-escaped as JSON error bodies write URLs: the URL's own
        # scrubbing must catch it, with no credentials passed.
        pytest.param(
            lambda key: json.dumps({"url": f"http://host/open-apis/bot/v2/hook/{key}"}).replace(
                "/", "\\/"
            ),
            False,
            id="json-escaped-url",
        ),
    ],
)
async def test_no_part_of_a_quoted_credential_or_url_is_kept(
    aiohttp_server: Callable[..., Awaitable[TestServer]], page: Callable[[str], str], bare: bool
) -> None:
    token = "tok" + "0123456789abcdef" * 5
    text = page(token)

    async def quote(request: web.Request) -> web.Response:
        return web.Response(status=500, text=text)

    app = web.Application()
    app.router.add_post("/open-apis/bot/v2/hook/" + token, quote)
    server = await aiohttp_server(app)
    url = str(server.make_url("/open-apis/bot/v2/hook/" + token))
    secrets = credentials(http_sink(url).config) if bare else ()
    async with ClientSession() as session:
        answer = await post(session, url, b"{}", {}, secrets)
    assert isinstance(answer, Answer) and answer.body
    assert not any(token[:size] in answer.body for size in range(8, len(token) + 1))
