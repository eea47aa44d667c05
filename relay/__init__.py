"""relay: a durable relay for QingStor bucket notifications.

Installed as the distribution `qingstor-relay` (the name `relay` on PyPI is an
unrelated project); imported as `relay`, run as the `relay` command.
"""

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "qingstor-relay"

try:
    __version__ = version(DISTRIBUTION)
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.0.0+unknown"
