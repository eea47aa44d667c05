"""Who sent a request, when proxies stand in between: `server.trusted_proxies`.

A proxy's forwarding header is believed only when the socket peer is a trusted proxy,
and then only back to the first hop that is not one: anything left of it was written by
the client, who may write anything. Only the one header the proxies write is read
(`server.forwarded_header`): most proxies pass a client's own `Forwarded` through
untouched while appending to `X-Forwarded-For`, so reading both would let a client
choose. Pure; no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network


def parse_address(text: str) -> Address | None:
    """An address as proxies write it: bare, `[v6]`, `[v6]:port` or `v4:port`."""
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ip_address(text)
    except ValueError:
        return None  # also "unknown" and obfuscated "_hidden" nodes
    # A dual-stack listener reports IPv4 senders as ::ffff:a.b.c.d; operators write a.b.c.d.
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_address(
    peer: str | None, hops: Sequence[str] | None, trusted: Sequence[Network]
) -> str | None:
    """The sender's address: the socket `peer`, or, when it is a trusted proxy, the
    nearest of `hops` (the forwarding header's addresses, oldest first) that is not
    itself a trusted proxy. None when a hop the walk must read is unparsable, or the
    header could not be read (`hops` None): allow_ips then refuses, failing closed."""
    address = parse_address(peer or "")
    if address is None or not _within(address, trusted):
        return peer
    if hops is None:
        return None
    for hop in reversed(hops):
        address = parse_address(hop)
        if address is None:
            return None
        if not _within(address, trusted):
            return str(address)
    # Every hop is a trusted proxy: the request began inside; the first one is the sender.
    return str(address)


def x_forwarded_for_hops(headers: Iterable[str]) -> list[str]:
    return [hop for header in headers for hop in header.split(",")]


# A `for=` value: a token, or a quoted string with no quote or backslash inside.
_FOR_VALUE = re.compile(r'[^"\\,;]*|"[^"\\,;]*"')


def forwarded_hops(headers: Iterable[str]) -> list[str] | None:
    """The `for=` of each RFC 7239 `Forwarded` element, oldest first; None if any part
    is not plain. Strict on purpose: a lenient parser lets a client open a quoted
    string that swallows the element its proxy appends after it."""
    hops = []
    for header in headers:
        for element in header.split(","):
            hop = ""
            for pair in element.split(";"):
                name, _, value = pair.strip().partition("=")
                if not _FOR_VALUE.fullmatch(value):
                    return None
                if name.lower() == "for":
                    hop = value
            hops.append(hop)
    return hops


def _within(address: Address, networks: Sequence[Network]) -> bool:
    return any(address in network for network in networks)


# `server.forwarded_header` -> the header's name and how its hops are read.
READERS: dict[str, tuple[str, Callable[[Iterable[str]], list[str] | None]]] = {
    "x-forwarded-for": ("X-Forwarded-For", x_forwarded_for_hops),
    "forwarded": ("Forwarded", forwarded_hops),
}
