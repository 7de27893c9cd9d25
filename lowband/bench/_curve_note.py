"""The bench's emulated hosts talk without CURVE: the launcher says so once, not every process.

Each worker binds its emulated host's address (``10.77.r.2`` in netns mode) and the
coordinator binds the hub's, so :func:`lowband.transport.security.warn_if_exposed` would
warn once per rank and once more for the coordinator. Those addresses exist only inside
the namespaces the bench created on this machine. The bench drops exactly those warnings
(the one about the address this process was given, nothing else) and prints
:data:`NOTE` once; any other exposure warning still reaches the user.
"""

from __future__ import annotations

import logging

__all__ = ["NOTE", "EmulatedBindFilter", "quiet_emulated_binds"]

#: What the launcher prints once, in place of every worker's and the coordinator's warning.
NOTE = (
    "the workers and the coordinator bind their emulated hosts' addresses without CURVE: "
    "that traffic stays inside this machine's link emulator"
)

_SECURITY_LOGGER = "lowband.transport.security"


class EmulatedBindFilter(logging.Filter):
    """Drops ``warn_if_exposed``'s warning about binding ``address`` without CURVE."""

    def __init__(self, address: str) -> None:
        super().__init__()
        self.address = address

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        about_this_address = (
            isinstance(args, tuple)
            and len(args) == 2
            and args[1] == self.address
            and "without CURVE" in str(record.msg)
        )
        return not about_this_address


def quiet_emulated_binds(address: str) -> EmulatedBindFilter:
    """In a bench process on an emulated host: drop the exposure warning for ``address``."""
    f = EmulatedBindFilter(address)
    logging.getLogger(_SECURITY_LOGGER).addFilter(f)
    return f
