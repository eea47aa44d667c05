"""Who sent a request, when proxies stand in between: `server.trusted_proxies`.

A proxy's `Forwarded` or `X-Forwarded-For` header is believed only when the socket
peer is a trusted proxy, and then only back to the first hop that is not one: anything
left of it was written by the client, who may write anything. Pure; no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
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
    peer: str | None,
    forwarded: Sequence[Mapping[str, str]],
    x_forwarded_for: Iterable[str],
    trusted: Sequence[Network],
) -> str | None:
    """The sender's address: the socket `peer`, or, when it is a trusted proxy, the
    nearest hop its forwarding headers name that is not itself a trusted proxy.

    `forwarded` is RFC 7239 `Forwarded` parsed into its elements (aiohttp's
    `request.forwarded`); it wins over `X-Forwarded-For` when present. None when a hop
    the walk must read is unparsable: allow_ips then refuses, failing closed."""
    address = parse_address(peer or "")
    if address is None or not _within(address, trusted):
        return peer
    if forwarded:
        hops = [element.get("for", "") for element in forwarded]
    else:
        hops = [hop for header in x_forwarded_for for hop in header.split(",")]
    for hop in reversed(hops):
        address = parse_address(hop)
        if address is None:
            return None
        if not _within(address, trusted):
            return str(address)
    # Every hop is a trusted proxy: the request began inside; the first one is the sender.
    return str(address)


def _within(address: Address, networks: Sequence[Network]) -> bool:
    return any(address in network for network in networks)
