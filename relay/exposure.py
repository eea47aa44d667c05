"""Who can post to relay: sources that check nobody, and whether the listener reaches
beyond this machine. Pure: `check-config`, `serve` and `qingstor register` all word the
same finding the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from ipaddress import (
    IPv4Network,
    IPv6Address,
    IPv6Network,
    collapse_addresses,
    ip_address,
)

from relay.config import RelayConfig, SourceConfig

# The consequence, in the same words wherever relay names an open source or URL.
ANYONE = "anyone who can reach it can post events."

_ALL_V4 = IPv4Network("0.0.0.0/0")
_ALL_V6 = IPv6Network("::/0")
# On a dual-stack listener every IPv4 sender arrives as ::ffff:a.b.c.d.
_ALL_V4_MAPPED = IPv6Network("::ffff:0:0/96")


def is_loopback(host: str) -> bool:
    """Whether a listen address is reachable from this machine only. A name other than
    localhost may resolve anywhere, and "" binds every interface: both count as beyond."""
    if host.lower() == "localhost":
        return True
    try:
        address = ip_address(host.strip("[]"))
    except ValueError:
        return False
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def authenticates(source: SourceConfig) -> bool:
    """Whether a request must prove who sent it (a token, a password or a signature)."""
    return source.authenticates


def allows_everyone(networks: Sequence[IPv4Network | IPv6Network]) -> bool:
    """Whether an allow-list, taken together, admits every sender of a whole address
    family: 0.0.0.0/0, ::/0, the mapped IPv4 range, or halves that add up to one."""
    v4 = list(collapse_addresses(n for n in networks if isinstance(n, IPv4Network)))
    v6 = list(collapse_addresses(n for n in networks if isinstance(n, IPv6Network)))
    return _ALL_V4 in v4 or _ALL_V6 in v6 or any(_ALL_V4_MAPPED.subnet_of(n) for n in v6)


def allow_listed(source: SourceConfig) -> bool:
    networks = source.allow_ips
    return networks is not None and not allows_everyone(networks)


def open_sources(config: RelayConfig) -> list[str]:
    """Sources that take events from anyone who can reach relay's port."""
    return [
        name
        for name, source in config.sources.items()
        if not authenticates(source) and not allow_listed(source)
    ]


def listen_url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else (host or "0.0.0.0")
    return f"http://{shown}:{port}"


def reachable_from_elsewhere(config: RelayConfig, addresses: Iterable[str]) -> bool:
    """Whether senders on other machines can reach relay: one bound address beyond
    loopback is enough (a name may resolve to several), and so is a proxy in front,
    which is what server.trusted_proxies says is there."""
    return bool(config.server.trusted_proxies) or not all(is_loopback(a) for a in addresses)


def exposure_warnings(config: RelayConfig, where: str, exposed: bool) -> list[str]:
    """One sentence per source that anyone can post to while relay is reachable from
    elsewhere (`where` says how): allowed, but only as the operator's named choice."""
    if not exposed:
        return []
    return [
        f"source {name!r} has no token and no allow_ips, and relay listens on {where}:"
        f" {ANYONE} Set sources.{name}.token (or allow_ips) unless that is what you want."
        for name in open_sources(config)
    ]


def exposure_of(config: RelayConfig, addresses: Sequence[str], port: int) -> tuple[str, bool]:
    """How to name the listener, and whether it is reachable from elsewhere: from the
    addresses bound (serve), or the configured one alone (check-config binds nothing)."""
    where = ", ".join(listen_url(a, port) for a in addresses)
    if config.server.trusted_proxies:
        where += " behind the proxies of server.trusted_proxies"
    return where, reachable_from_elsewhere(config, addresses)


def trial_note(config: RelayConfig, exposed: bool) -> str | None:
    """For the start-up line on loopback: which sources take posts without a token."""
    names = open_sources(config)
    if not names or exposed:
        return None
    listed = ", ".join(repr(n) for n in names)
    which = f"source {listed} has" if len(names) == 1 else f"sources {listed} have"
    return f"{which} no token: for a local trial only; set a token before listening beyond loopback"
