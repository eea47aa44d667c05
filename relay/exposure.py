"""Who can post to relay: sources that check nobody, and whether the listener reaches
beyond this machine. Pure: `check-config`, `serve` and `qingstor register` all word the
same finding the same way.
"""

from __future__ import annotations

from ipaddress import ip_address, ip_network

from relay.config import GenericSourceConfig, QingStorSourceConfig, RelayConfig, SourceConfig

# The consequence, in the same words wherever relay names an open source or URL.
ANYONE = "anyone who can reach it can post events."

# An allow-list holding one of these lets every address in: it protects nothing.
_EVERYWHERE = (ip_network("0.0.0.0/0"), ip_network("::/0"))


def is_loopback(host: str) -> bool:
    """Whether a listen address is reachable from this machine only. A name other than
    localhost may resolve anywhere, and "" binds every interface: both count as beyond."""
    if host.lower() == "localhost":
        return True
    try:
        return ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def authenticates(source: SourceConfig) -> bool:
    """Whether a request must prove who sent it (a token, a password or a signature)."""
    if isinstance(source, QingStorSourceConfig):
        return source.token is not None
    if isinstance(source, GenericSourceConfig):
        return source.token is not None or source.basic_auth is not None
    return True  # standard-webhooks and hmac always verify a signature


def allow_listed(source: SourceConfig) -> bool:
    networks = source.allow_ips
    return networks is not None and not any(net in _EVERYWHERE for net in networks)


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


def exposure_warnings(config: RelayConfig, host: str, port: int) -> list[str]:
    """One sentence per source that anyone can post to while relay listens beyond
    loopback: allowed, but only as the operator's explicit, named choice."""
    if is_loopback(host):
        return []
    where = listen_url(host, port)
    return [
        f"source {name!r} has no token and no allow_ips, and relay listens on {where}:"
        f" {ANYONE} Set sources.{name}.token (or allow_ips) unless that is what you want."
        for name in open_sources(config)
    ]


def trial_note(config: RelayConfig, host: str) -> str | None:
    """For the start-up line on loopback: which sources take posts without a token."""
    names = open_sources(config)
    if not names or not is_loopback(host):
        return None
    listed = ", ".join(repr(n) for n in names)
    which = f"source {listed} has" if len(names) == 1 else f"sources {listed} have"
    return f"{which} no token: for a local trial only; set a token before listening beyond loopback"
