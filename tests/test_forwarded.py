"""server.trusted_proxies: when Forwarded / X-Forwarded-For decide allow_ips."""

from __future__ import annotations

from ipaddress import ip_network
from typing import Any

import pytest
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from relay.app import STORE
from relay.forwarded import client_address, forwarded_hops, parse_address, x_forwarded_for_hops
from tests.conftest import TOKEN, notifier_body, relay_config

HOOK = f"/hooks/qingstor?token={TOKEN}"
PROXIES = [ip_network("10.0.0.0/8"), ip_network("fd00::/8")]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("203.0.113.9", "203.0.113.9"),
        (" 203.0.113.9:4711", "203.0.113.9"),
        ('"[2001:db8::1]:4711"', "2001:db8::1"),
        ("2001:db8::1", "2001:db8::1"),
        ("::ffff:203.0.113.9", "203.0.113.9"),
        ("unknown", None),
        ("_hidden", None),
        ("", None),
        ("203.0.113.999", None),
    ],
)
def test_addresses_as_proxies_write_them(text: str, expected: str | None):
    address = parse_address(text)
    assert (None if address is None else str(address)) == expected


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        # Not from a trusted proxy: its headers are anybody's words.
        ("198.51.100.7", ["203.0.113.9"], "198.51.100.7"),
        ("10.1.1.1", ["203.0.113.9"], "203.0.113.9"),
        # The client wrote the left part; the walk stops at the first untrusted hop.
        ("10.1.1.1", ["1.2.3.4, 203.0.113.9, 10.2.2.2"], "203.0.113.9"),
        ("10.1.1.1", ["1.2.3.4", "203.0.113.9"], "203.0.113.9"),
        # Every hop a proxy: the request began inside.
        ("10.1.1.1", ["10.3.3.3, 10.2.2.2"], "10.3.3.3"),
        ("10.1.1.1", [], "10.1.1.1"),
        # A hop the walk must read but cannot: no address, so allow_ips refuses.
        ("10.1.1.1", ["garbage"], None),
        # ... but garbage left of the first untrusted hop is never read.
        ("10.1.1.1", ["garbage, 203.0.113.9"], "203.0.113.9"),
        ("::ffff:10.1.1.1", ["203.0.113.9"], "203.0.113.9"),
    ],
)
def test_the_client_is_the_nearest_hop_that_is_not_a_trusted_proxy(
    peer: str, xff: list[str], expected: str | None
):
    assert client_address(peer, x_forwarded_for_hops(xff), PROXIES) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (["for=203.0.113.9;proto=https"], "203.0.113.9"),
        (['for="[2001:db8::1]:80", for=fd00::2'], "2001:db8::1"),
        (["for=203.0.113.9", "for=10.2.2.2"], "203.0.113.9"),
        (["for=unknown"], None),
        (["proto=https"], None),  # an element that names no sender
        # A client opening a quoted string to swallow what its proxy appends.
        (['for=198.51.100.1;x=", for="[2001:db8::9]"'], None),
        (['for="203.0.113.9\\", for=198.51.100.7'], None),
    ],
)
def test_forwarded_is_read_strictly(headers: list[str], expected: str | None):
    assert client_address("fd00::1", forwarded_hops(headers), PROXIES) == expected


def _config(tmp_path, **server: Any):
    source = {"kind": "qingstor", "token": TOKEN, "allow_ips": ["203.0.113.0/24"]}
    return relay_config(tmp_path, server=server, sources={"qingstor": source})


async def test_allow_ips_believes_a_trusted_proxy_and_nobody_else(tmp_path, start_relay):
    # The test client connects from 127.0.0.1: here, the proxy.
    client = await start_relay(_config(tmp_path, trusted_proxies=["127.0.0.0/8"]))

    async def post(key: str, headers: dict[str, str]) -> int:
        response = await client.post(HOOK, json=notifier_body(key), headers=headers)
        return response.status

    with capture_logs(processors=[merge_contextvars]) as logs:
        assert await post("a", {"X-Forwarded-For": "203.0.113.9"}) == 200
    (line,) = [e for e in logs if e["event"] == "request"]
    assert (line["client"], line["peer"]) == ("203.0.113.9", "127.0.0.1")
    # The proxies write X-Forwarded-For (the default): a client's own Forwarded is
    # passed through untouched by most proxies, and never read.
    spoofed = {"Forwarded": "for=203.0.113.10", "X-Forwarded-For": "198.51.100.7"}
    assert await post("b", spoofed) == 403
    assert await post("c", {"X-Forwarded-For": "198.51.100.7"}) == 403
    # A client that writes the allowed address itself, behind the proxy, is still seen.
    assert await post("d", {"X-Forwarded-For": "203.0.113.9, 198.51.100.7"}) == 403
    assert await post("e", {"X-Forwarded-For": "not-an-address"}) == 403
    assert await post("f", {}) == 403  # the proxy itself is not in allow_ips
    assert (await client.app[STORE].counts())["events"] == 1


async def test_forwarded_is_read_instead_when_the_proxies_write_it(tmp_path, start_relay):
    config = _config(tmp_path, trusted_proxies=["127.0.0.0/8"], forwarded_header="forwarded")
    client = await start_relay(config)
    headers = {"Forwarded": 'for="203.0.113.10:443";proto=https', "X-Forwarded-For": "1.2.3.4"}
    response = await client.post(HOOK, json=notifier_body("a"), headers=headers)
    assert response.status == 200


async def test_without_trusted_proxies_forwarding_headers_are_ignored(tmp_path, start_relay):
    client = await start_relay(_config(tmp_path))
    response = await client.post(
        HOOK, json=notifier_body("a"), headers={"X-Forwarded-For": "203.0.113.9"}
    )
    assert response.status == 403
    assert "127.0.0.1" in (await response.json())["message"]
