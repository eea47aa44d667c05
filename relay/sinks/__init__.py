"""Sinks: one file per kind behind the Sink protocol, and the registry of kinds."""

from __future__ import annotations

import importlib
from typing import Any

from relay.sinks.base import DONE, Outcome, Sink

# kind -> the class implementing it, imported when a sink of that kind is built; each
# class takes (name, its validated config section).
SINKS: dict[str, str] = {
    "file": "relay.sinks.file:FileSink",
    "http": "relay.sinks.http:HttpSink",
    "slack": "relay.sinks.slack:SlackSink",
    "dingtalk": "relay.sinks.dingtalk:DingTalkSink",
    "feishu": "relay.sinks.feishu:FeishuSink",
    "wecom": "relay.sinks.wecom:WeComSink",
    "discord": "relay.sinks.discord:DiscordSink",
    "teams": "relay.sinks.teams:TeamsSink",
}


def sink_class(kind: str) -> Any:
    module, _, name = SINKS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def build_sink(name: str, config: Any) -> Sink:
    sink: Sink = sink_class(config.kind)(name, config)
    return sink


__all__ = ["DONE", "SINKS", "Outcome", "Sink", "build_sink", "sink_class"]
