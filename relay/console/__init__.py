"""The operator console: relay's own pages under /console/, off unless `console.token`
is set (relay.console.auth: who may use it; relay.console.views: the pages)."""

from relay.console.views import console_app

__all__ = ["console_app"]
