"""Exceptions raised by lowband.

Every class subclasses :class:`LowbandError` and the builtin exception a caller
would naturally catch, so ``except ValueError`` in user code keeps working when
lowband rejects a bad setting or bad bytes.
"""

from __future__ import annotations

__all__ = [
    "LowbandError",
    "ConfigError",
    "ConfigMismatch",
    "RankInUse",
    "CodecError",
    "BackendUnavailable",
    "TransportError",
    "PeerLost",
    "CollectiveTimeout",
    "SecurityError",
    "CheckpointError",
]


class LowbandError(Exception):
    """Base class of every error lowband raises on purpose."""


class ConfigError(LowbandError, ValueError):
    """A bad argument, flag, spec string or environment setting."""


class ConfigMismatch(ConfigError):
    """Peers disagree at the init handshake (versions, codec, shapes, ...)."""


class RankInUse(ConfigError):
    """Another live process holds this rank of the group: two processes were started as one rank."""


class CodecError(LowbandError, ValueError):
    """Bytes that are not a valid payload, or input a codec cannot encode."""


class BackendUnavailable(LowbandError, RuntimeError):
    """A kernel backend was named explicitly but cannot run here."""


class TransportError(LowbandError, ConnectionError):
    """The transport failed: a socket, a frame or the coordinator."""


class PeerLost(TransportError):
    """A peer sent neither heartbeat nor progress for ``peer_timeout`` seconds.

    ``peers`` holds the ranks that were lost.
    """

    def __init__(self, message: str, peers: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.peers = tuple(peers)


class CollectiveTimeout(LowbandError, TimeoutError):
    """A collective did not complete before its deadline."""


class SecurityError(LowbandError, PermissionError):
    """Authentication failed, or a message was tampered with or replayed."""


class CheckpointError(LowbandError, OSError):
    """A checkpoint could not be written or read intact."""
