"""`relay qingstor register|show|unregister` against a local server playing QingStor.

The fake speaks QingStor's bucket notification API on a real socket, path style
(`GET|PUT|DELETE /<bucket>?notification`), checks every request's signature the way
QingStor does (recomputed here from the documented string-to-sign, not with the SDK's
code) and records each request.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import hashlib
import hmac
import json
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from relay import qingstor_admin
from tests.processes import free_port, run_cli

ACCESS_KEY_ID = "QYACCESSKEYIDEXAMPLE"
SECRET = "SECRETACCESSKEY-for-tests-only"
TOKEN = "tok-9f2c1e-never-printed"
NOTIFY_URL = f"https://relay.example.com/hooks/qingstor?token={TOKEN}"
ALL_TYPES = ["create_object", "delete_object", "abort_multipart", "complete_multipart"]

# Rules somebody else put on the bucket: register/unregister must keep them as they are.
OTHER_RULES: list[dict[str, Any]] = [
    {
        "id": "thumbnails",
        "event_types": ["create_object"],
        "object_filters": ["photos/*.jpg"],
        "cloudfunc": "image",
        "cloudfunc_args": {"action": "resize:w_200", "keep_policy": "", "key_prefix": "t/"},
        "notify_url": "https://images.example.com/done?sig=other-secret",
    },
    {
        "id": "audit",
        "event_types": ["delete_object"],
        "cloudfunc": "notifier",
        "notify_url": "https://audit.example.com/qingstor?key=audit-secret&team=ops",
    },
]

# QingStor's sub-resources: the query parameters that are part of the signed resource.
SUB_RESOURCES = {
    "acl", "cors", "delete", "mirror", "part_number", "policy", "stats", "upload_id",
    "uploads", "image", "notification", "lifecycle", "logging", "replication", "append",
    "position", "cname", "response-expires", "response-cache-control",
    "response-content-type", "response-content-language", "response-content-encoding",
    "response-content-disposition",
}  # fmt: skip


def qingstor_signature(
    secret: str, method: str, path: str, query: str, headers: dict[str, str]
) -> str:
    """QingStor's header signature, as documented:

    base64(HMAC-SHA256(secret, VERB \\n Content-MD5 \\n Content-Type \\n Date \\n
    CanonicalizedHeaders CanonicalizedResource)), where the headers are the x-qs-* ones
    (lower-cased, sorted, `name:value\\n` each) and the resource is the path plus the
    sorted sub-resource parameters of the query string.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    date = "" if "x-qs-date" in lower else lower.get("date", "")
    canonical_headers = "".join(
        f"{name}:{lower[name].strip()}\n" for name in sorted(lower) if name.startswith("x-qs-")
    )
    params = sorted(p for p in query.split("&") if p and p.split("=", 1)[0] in SUB_RESOURCES)
    resource = path + ("?" + "&".join(params) if params else "")
    string_to_sign = (
        f"{method}\n{lower.get('content-md5', '')}\n{lower.get('content-type', '')}\n"
        f"{date}\n{canonical_headers}{resource}"
    )
    digest = hmac.new(secret.encode(), string_to_sign.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def qingstor_error(status: int, code: str, message: str) -> web.Response:
    body = {
        "code": code,
        "message": message,
        "request_id": "aa08cf7a43f611e5886952542e6ce14b",
        "url": f"https://docs.qingcloud.com/qingstor/api/common/error_code.html#{code}",
    }
    return web.json_response(body, status=status)


@dataclass
class FakeQingStor:
    """A QingStor-compatible bucket API: signed requests only, rules kept per bucket."""

    # bucket -> its rules; None: the bucket never had any. A bucket not here does not exist.
    buckets: dict[str, list[dict[str, Any]] | None] = field(default_factory=dict)
    # What GET answers for a bucket without rules: "404" or "empty" ({"notifications": []}).
    no_rules: str = "404"
    # method -> (status, code, message) answered (after the signature check) instead.
    fail: dict[str, tuple[int, str, str]] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        path = request.rel_url.raw_path
        headers = dict(request.headers)
        record = {
            "method": request.method,
            "path": path,
            "query": request.query_string,
            "headers": headers,
            "body": body,
            "json": json.loads(body) if body else None,
        }
        self.requests.append(record)

        authorization = headers.get("Authorization", "")
        expected = qingstor_signature(SECRET, request.method, path, request.query_string, headers)
        record["signature_ok"] = authorization == f"QS {ACCESS_KEY_ID}:{expected}"
        if not authorization.startswith(f"QS {ACCESS_KEY_ID}:"):
            return qingstor_error(401, "invalid_access_key_id", "The access key id is wrong.")
        if not record["signature_ok"]:
            return qingstor_error(401, "signature_not_matched", "The signature does not match.")
        skew = abs((datetime.now(UTC) - parsedate_to_datetime(headers["Date"])).total_seconds())
        if skew > 15 * 60:
            return qingstor_error(403, "request_expired", "Date is off by more than 15 min.")
        if request.query_string != "notification":
            return qingstor_error(400, "invalid_request", "This fake serves ?notification only.")

        bucket = request.match_info["bucket"]
        if bucket not in self.buckets:
            return qingstor_error(404, "bucket_not_exists", "The bucket does not exist.")
        if request.method in self.fail:
            return qingstor_error(*self.fail[request.method])
        if request.method == "GET":
            rules = self.buckets[bucket]
            if rules is None and self.no_rules == "404":
                return qingstor_error(404, "notification_not_exists", "No notification yet.")
            return web.json_response({"notifications": copy.deepcopy(rules or [])})
        if request.method == "PUT":
            self.buckets[bucket] = record["json"]["notifications"]
            return web.Response(status=200)
        self.buckets[bucket] = None  # DELETE
        return web.Response(status=204)

    def writes(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] != "GET"]


@pytest.fixture
async def qingstor(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> FakeQingStor:
    fake = FakeQingStor(buckets={"media": copy.deepcopy(OTHER_RULES), "empty": None})
    app = web.Application()
    app.router.add_route("*", "/{bucket}", fake.handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    fake.url = f"http://127.0.0.1:{server.port}"
    return fake


@pytest.fixture
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(qingstor_admin.ENV_ACCESS_KEY_ID, ACCESS_KEY_ID)
    monkeypatch.setenv(qingstor_admin.ENV_SECRET_ACCESS_KEY, SECRET)


@dataclass
class Result:
    code: int
    out: str
    err: str


def parser() -> argparse.ArgumentParser:
    """relay's command parser as cli.py wires it: `commands` + qingstor_admin.add_parser."""
    top = argparse.ArgumentParser(prog="relay")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    qingstor_admin.add_parser(commands)
    return top


@pytest.fixture
def relay_qingstor(
    capsys: pytest.CaptureFixture[str], qingstor: FakeQingStor
) -> Callable[..., Awaitable[Result]]:
    """Run `relay qingstor ARGS --endpoint <fake>` in-process (in a thread: the SDK blocks
    while the fake answers on this loop); return exit code, stdout and stderr."""

    async def run(*args: str, endpoint: bool = True) -> Result:
        argv = ["qingstor", *args] + (["--endpoint", qingstor.url] if endpoint else [])
        capsys.readouterr()
        namespace = parser().parse_args(argv)
        code = await asyncio.to_thread(qingstor_admin.run, namespace)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def relay_rule(url: str = NOTIFY_URL, **changes: Any) -> dict[str, Any]:
    rule = {
        "id": "relay",
        "event_types": ALL_TYPES,
        "object_filters": ["*"],
        "cloudfunc": "notifier",
        "notify_url": url,
    }
    return {**rule, **changes}


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in (TOKEN, SECRET, "audit-secret", "other-secret"):
            assert secret not in text


# -- register ---------------------------------------------------------------------------


@pytest.mark.usefixtures("credentials")
async def test_register_adds_its_rule_and_keeps_the_others(qingstor, relay_qingstor):
    result = await relay_qingstor(
        "register", "--bucket", "media", "--zone", "pek3b", "--notify-url", NOTIFY_URL
    )

    assert result.code == 0, result.err
    assert [(r["method"], r["path"], r["query"]) for r in qingstor.requests] == [
        ("GET", "/media", "notification"),  # read first...
        ("PUT", "/media", "notification"),  # ...then write the whole list back
    ]
    put = qingstor.requests[1]
    assert put["headers"]["Content-Type"] == "application/json"
    assert put["json"] == {"notifications": [*OTHER_RULES, relay_rule()]}
    assert qingstor.buckets["media"] == [*OTHER_RULES, relay_rule()]
    # --endpoint is used as given: no zone in front of 127.0.0.1.
    assert {r["headers"]["Host"] for r in qingstor.requests} == {qingstor.url.split("//")[1]}
    assert result.out.startswith("registered rule 'relay' on bucket media (")
    assert "(3 rules in total)" in result.out
    assert "?token=[redacted]" in result.out
    assert result.out.count("\n") == 1
    assert_no_secret(result.out, result.err)


@pytest.mark.usefixtures("credentials")
async def test_every_request_is_signed_the_qingstor_way(qingstor, relay_qingstor):
    await relay_qingstor("register", "--bucket", "media", "--notify-url", NOTIFY_URL)
    await relay_qingstor("unregister", "--bucket", "media")

    assert [r["method"] for r in qingstor.requests] == ["GET", "PUT", "GET", "PUT"]
    for request in qingstor.requests:
        authorization = request["headers"]["Authorization"]
        scheme, _, credential = authorization.partition(" ")
        key_id, _, signature = credential.partition(":")
        assert (scheme, key_id) == ("QS", ACCESS_KEY_ID)
        expected = qingstor_signature(
            SECRET, request["method"], request["path"], request["query"], request["headers"]
        )
        assert signature == expected
        assert request["signature_ok"]
        assert SECRET not in json.dumps(request["headers"])


@pytest.mark.usefixtures("credentials")
async def test_a_wrong_secret_is_refused_by_the_signature_check(qingstor, relay_qingstor):
    result = await relay_qingstor(
        "register", "--bucket", "media", "--notify-url", NOTIFY_URL,
        "--secret-access-key", "not-the-secret",
    )  # fmt: skip

    assert result.code == 1
    assert "401" in result.err and "signature_not_matched" in result.err
    assert qingstor.writes() == []
    assert "not-the-secret" not in result.err


@pytest.mark.usefixtures("credentials")
async def test_re_register_replaces_only_its_own_rule_in_place(qingstor, relay_qingstor):
    qingstor.buckets["media"] = [OTHER_RULES[0], relay_rule(), OTHER_RULES[1]]
    new_url = "https://relay2.example.com/hooks/qingstor?token=tok-new-also-secret"

    result = await relay_qingstor(
        "register", "--bucket", "media", "--notify-url", new_url,
        "--event-types", "create_object, delete_object", "--filters", "photos/*,videos/*",
    )  # fmt: skip

    assert result.code == 0, result.err
    expected = relay_rule(
        new_url,
        event_types=["create_object", "delete_object"],
        object_filters=["photos/*", "videos/*"],
    )
    assert qingstor.writes()[0]["json"] == {
        "notifications": [OTHER_RULES[0], expected, OTHER_RULES[1]]
    }
    assert [r["id"] for r in qingstor.buckets["media"] or []] == ["thumbnails", "relay", "audit"]
    assert result.out.startswith("replaced rule 'relay' on bucket media")
    assert "(3 rules in total)" in result.out
    assert "tok-new-also-secret" not in result.out + result.err


@pytest.mark.usefixtures("credentials")
async def test_register_twice_is_idempotent(qingstor, relay_qingstor):
    args = ("register", "--bucket", "media", "--notify-url", NOTIFY_URL)
    assert (await relay_qingstor(*args)).code == 0
    again = await relay_qingstor(*args)

    assert again.code == 0
    assert "already up to date (3 rules in total)" in again.out
    assert len(qingstor.writes()) == 1  # the second run wrote nothing
    assert [r["id"] for r in qingstor.buckets["media"] or []] == ["thumbnails", "audit", "relay"]


@pytest.mark.usefixtures("credentials")
async def test_duplicate_copies_of_its_rule_collapse_into_one(qingstor, relay_qingstor):
    stale = relay_rule("https://old.example.com/hooks/qingstor?token=old")
    qingstor.buckets["media"] = [stale, OTHER_RULES[1], stale]

    result = await relay_qingstor("register", "--bucket", "media", "--notify-url", NOTIFY_URL)

    assert result.code == 0, result.err
    assert qingstor.buckets["media"] == [relay_rule(), OTHER_RULES[1]]


@pytest.mark.parametrize("no_rules", ["404", "empty"])
@pytest.mark.usefixtures("credentials")
async def test_register_on_a_bucket_without_rules(qingstor, relay_qingstor, no_rules):
    qingstor.no_rules = no_rules

    result = await relay_qingstor(
        "register", "--bucket", "empty", "--id", "relay-prod", "--notify-url", NOTIFY_URL
    )

    assert result.code == 0, result.err
    assert qingstor.writes()[0]["json"] == {"notifications": [relay_rule(id="relay-prod")]}
    assert "registered rule 'relay-prod' on bucket empty" in result.out
    assert "(1 rule in total)" in result.out


@pytest.mark.usefixtures("credentials")
async def test_a_bucket_that_does_not_exist_is_an_error_not_an_empty_list(qingstor, relay_qingstor):
    result = await relay_qingstor("register", "--bucket", "nosuch", "--notify-url", NOTIFY_URL)

    assert result.code == 1
    assert "404 bucket_not_exists" in result.err
    assert qingstor.writes() == []


@pytest.mark.parametrize("method", ["GET", "PUT"])
@pytest.mark.usefixtures("credentials")
async def test_a_qingstor_error_prints_status_and_code_and_exits_1(
    qingstor, relay_qingstor, method
):
    qingstor.fail[method] = (403, "permission_denied", "You are not the owner of this bucket.")

    result = await relay_qingstor("register", "--bucket", "media", "--notify-url", NOTIFY_URL)

    assert result.code == 1
    assert result.out == ""
    verb = "get_notification" if method == "GET" else "put_notification"
    assert f"{verb}: QingStor answered 403 permission_denied" in result.err
    assert "You are not the owner of this bucket." in result.err
    assert "request_id aa08cf7a43f611e5886952542e6ce14b" in result.err
    assert_no_secret(result.err)
    assert qingstor.buckets["media"] == OTHER_RULES  # nothing changed
    assert len(qingstor.writes()) == (1 if method == "PUT" else 0)


# -- unregister -------------------------------------------------------------------------


@pytest.mark.usefixtures("credentials")
async def test_unregister_removes_only_its_rule(qingstor, relay_qingstor):
    qingstor.buckets["media"] = [OTHER_RULES[0], relay_rule(), OTHER_RULES[1]]

    result = await relay_qingstor("unregister", "--bucket", "media", "--zone", "pek3b")

    assert result.code == 0, result.err
    assert [(r["method"], r["json"]) for r in qingstor.writes()] == [
        ("PUT", {"notifications": OTHER_RULES})
    ]
    assert qingstor.buckets["media"] == OTHER_RULES
    assert result.out == "unregistered rule 'relay' from bucket media (2 rules left)\n"


@pytest.mark.usefixtures("credentials")
async def test_unregister_the_last_rule_deletes_the_configuration(qingstor, relay_qingstor):
    qingstor.buckets["media"] = [relay_rule(id="mine")]

    result = await relay_qingstor("unregister", "--bucket", "media", "--id", "mine")

    assert result.code == 0, result.err
    assert [(r["method"], r["path"], r["query"]) for r in qingstor.writes()] == [
        ("DELETE", "/media", "notification")
    ]
    assert all(r["signature_ok"] for r in qingstor.requests)
    assert qingstor.buckets["media"] is None
    assert "(0 rules left)" in result.out


@pytest.mark.usefixtures("credentials")
async def test_unregister_without_its_rule_changes_nothing(qingstor, relay_qingstor):
    result = await relay_qingstor("unregister", "--bucket", "media")

    assert result.code == 0, result.err
    assert "no rule 'relay' on bucket media; nothing to do (2 rules in total)" in result.out
    assert qingstor.writes() == []


# -- show -------------------------------------------------------------------------------


@pytest.mark.usefixtures("credentials")
async def test_show_prints_the_rules_with_url_queries_redacted(qingstor, relay_qingstor):
    qingstor.buckets["media"] = [*OTHER_RULES, relay_rule()]

    result = await relay_qingstor("show", "--bucket", "media")

    assert result.code == 0, result.err
    shown = json.loads(result.out)["notifications"]
    assert [r["notify_url"] for r in shown] == [
        "https://images.example.com/done?sig=[redacted]",
        "https://audit.example.com/qingstor?key=[redacted]&team=[redacted]",
        "https://relay.example.com/hooks/qingstor?token=[redacted]",
    ]
    # Everything but the URLs' query strings is shown as QingStor has it.
    for seen, stored in zip(shown, qingstor.buckets["media"] or [], strict=True):
        assert {k: v for k, v in seen.items() if k != "notify_url"} == {
            k: v for k, v in stored.items() if k != "notify_url"
        }
    assert_no_secret(result.out, result.err)
    assert qingstor.writes() == []


@pytest.mark.usefixtures("credentials")
async def test_show_a_bucket_without_rules(qingstor, relay_qingstor):
    result = await relay_qingstor("show", "--bucket", "empty")

    assert result.code == 0, result.err
    assert json.loads(result.out) == {"notifications": []}


def test_redact_url():
    redact = qingstor_admin.redact_url
    assert (
        redact("https://r.example.com/h/q?token=abc")
        == "https://r.example.com/h/q?token=[redacted]"
    )
    assert redact("https://u:pw@r.example.com/h?abc#frag") == (
        "https://u:[redacted]@r.example.com/h?[redacted]#[redacted]"
    )
    assert redact("https://r.example.com/h/q") == "https://r.example.com/h/q"
    assert redact("http://[::1/h?token=abc") == "http://[::1/h?[redacted]"  # unparsable


# -- usage errors, credentials, the SDK -------------------------------------------------


async def test_missing_credentials_exit_2_before_any_request(qingstor, relay_qingstor, monkeypatch):
    monkeypatch.delenv(qingstor_admin.ENV_ACCESS_KEY_ID, raising=False)
    monkeypatch.setenv(qingstor_admin.ENV_SECRET_ACCESS_KEY, SECRET)

    result = await relay_qingstor("register", "--bucket", "media", "--notify-url", NOTIFY_URL)

    assert result.code == 2
    assert "missing QingStor credentials" in result.err
    assert "QINGSTOR_ACCESS_KEY_ID" in result.err
    assert "QINGSTOR_SECRET_ACCESS_KEY" not in result.err  # that one is set
    assert qingstor.requests == []


async def test_credentials_from_flags(qingstor, relay_qingstor, monkeypatch):
    monkeypatch.delenv(qingstor_admin.ENV_ACCESS_KEY_ID, raising=False)
    monkeypatch.delenv(qingstor_admin.ENV_SECRET_ACCESS_KEY, raising=False)

    result = await relay_qingstor(
        "show", "--bucket", "media", "--access-key-id", ACCESS_KEY_ID,
        "--secret-access-key", SECRET,
    )  # fmt: skip

    assert result.code == 0, result.err
    assert qingstor.requests[0]["signature_ok"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--event-types", "create_object,put_object"], "unknown event type 'put_object'"),
        (["--event-types", "complete_upload"], "rules call it complete_multipart"),
        (["--event-types", " , "], "--event-types: give at least one value"),
        (["--filters", ""], "--filters: give at least one value"),
        (["--id", "no spaces"], "--id 'no spaces'"),
        (["--notify-url", "ftp://relay.example.com/x?token=zzz"], "give an http(s) URL"),
        (["--bucket", "a/b"], "not a bucket name"),
        (["--timeout", "0"], "--timeout"),
    ],
)
@pytest.mark.usefixtures("credentials")
async def test_bad_flags_exit_2_before_any_request(qingstor, relay_qingstor, args, message):
    # A flag given twice: argparse keeps the last value.
    result = await relay_qingstor(
        "register", "--bucket", "media", "--notify-url", NOTIFY_URL, *args
    )

    assert result.code == 2
    assert message in result.err
    assert "zzz" not in result.err
    assert qingstor.requests == []


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        (None, "give --zone"),
        ("127.0.0.1:9000", "give http(s)://HOST[:PORT]"),
        ("http://127.0.0.1:9000/prefix", "only scheme, host and port"),
        ("http://127.0.0.1:99999", "--endpoint"),
    ],
)
@pytest.mark.usefixtures("credentials")
async def test_bad_endpoint_or_zone_exits_2(relay_qingstor, endpoint, message):
    args = ["show", "--bucket", "media"] + (["--endpoint", endpoint] if endpoint else [])
    result = await relay_qingstor(*args, endpoint=False)

    assert result.code == 2
    assert message in result.err


def test_argparse_refuses_a_missing_required_flag(capsys):
    with pytest.raises(SystemExit) as exited:
        parser().parse_args(["qingstor", "register", "--bucket", "media"])
    assert exited.value.code == 2
    assert "--notify-url" in capsys.readouterr().err


@pytest.mark.usefixtures("credentials")
async def test_an_unreachable_endpoint_exits_1(relay_qingstor):
    port = free_port()
    result = await relay_qingstor(
        "show", "--bucket", "media", "--endpoint", f"http://127.0.0.1:{port}", "--retries", "0",
        endpoint=False,
    )  # fmt: skip

    assert result.code == 1
    assert f"get_notification: request to QingStor (http://127.0.0.1:{port}) failed" in result.err


@pytest.mark.usefixtures("credentials")
async def test_without_the_sdk_it_says_how_to_install_it(relay_qingstor, monkeypatch, qingstor):
    for module in ("qingstor", "qingstor.sdk", "qingstor.sdk.config", "qingstor.sdk.service"):
        monkeypatch.setitem(sys.modules, module, None)  # `import` now raises ImportError
    monkeypatch.setitem(sys.modules, "qingstor.sdk.service.qingstor", None)

    result = await relay_qingstor("show", "--bucket", "media")

    assert result.code == 1
    assert "pip install 'qingstor-relay[qingstor]'" in result.err
    assert qingstor.requests == []


def test_without_endpoint_the_zone_goes_in_front_of_qingstor_com():
    target = qingstor_admin.Target(
        "media", "pek3b", None, ACCESS_KEY_ID, SECRET, timeout=30, retries=3
    )
    request = qingstor_admin.sdk_bucket(target).get_notification_request().sign()

    assert request.url == "https://pek3b.qingstor.com/media?notification"
    assert request.headers["Host"] == "pek3b.qingstor.com"
    assert request.headers["Authorization"].startswith(f"QS {ACCESS_KEY_ID}:")


def test_relay_does_not_import_the_sdk_until_a_qingstor_command_runs():
    # (The SDK's nspkg .pth file makes the bare `qingstor` namespace exist at startup.)
    code = (
        "import sys, relay.cli, relay.qingstor_admin; "
        "sys.exit(any(m.startswith('qingstor.sdk') for m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def _cli_has_qingstor() -> bool:
    from relay import cli

    try:
        cli._parser().parse_args(["qingstor", "show", "--bucket", "b", "--zone", "z"])
    except SystemExit:
        return False
    return True


@pytest.mark.skipif(not _cli_has_qingstor(), reason="relay.cli does not wire `qingstor` yet")
async def test_the_relay_command_as_a_process(qingstor):
    env = {
        qingstor_admin.ENV_ACCESS_KEY_ID: ACCESS_KEY_ID,
        qingstor_admin.ENV_SECRET_ACCESS_KEY: SECRET,
        "RELAY_CONFIG": "",
    }
    common = ["--bucket", "media", "--zone", "pek3b", "--endpoint", qingstor.url]

    def cli(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return run_cli("qingstor", *args, *common, **kwargs)

    registered = await asyncio.to_thread(cli, "register", "--notify-url", NOTIFY_URL, env=env)
    assert registered.returncode == 0, registered.stderr
    assert "registered rule 'relay' on bucket media" in registered.stdout
    shown = await asyncio.to_thread(cli, "show", env=env)
    assert shown.returncode == 0
    assert len(json.loads(shown.stdout)["notifications"]) == 3
    assert_no_secret(registered.stdout, registered.stderr, shown.stdout, shown.stderr)
    removed = await asyncio.to_thread(cli, "unregister", env=env)
    assert removed.returncode == 0
    assert qingstor.buckets["media"] == OTHER_RULES

    no_key = {**env, qingstor_admin.ENV_SECRET_ACCESS_KEY: ""}
    refused = await asyncio.to_thread(cli, "show", env=no_key)
    assert refused.returncode == 2


@pytest.mark.usefixtures("credentials")
async def test_a_notify_url_without_a_token_is_warned_of_in_relays_words(qingstor, relay_qingstor):
    from relay.exposure import ANYONE

    for url in ("https://relay.example.com/hooks/qingstor", "https://r.example.com/h/q?x=1"):
        result = await relay_qingstor(
            "register", "--bucket", "media", "--zone", "pek3b", "--notify-url", url
        )
        assert result.code == 0, result.err
        [warning] = result.err.splitlines()
        assert warning.startswith("warning: --notify-url carries no ?token=: ")
        # The same consequence check-config and serve name for an open source.
        assert ANYONE in warning and "sources.<name>.token" in warning
    quiet = await relay_qingstor(
        "register", "--bucket", "media", "--zone", "pek3b", "--notify-url", NOTIFY_URL
    )
    assert quiet.err == ""
