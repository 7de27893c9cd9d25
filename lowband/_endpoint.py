"""``Endpoint``: one network address (host, port) and the one rule for writing it.

Accepted: ``host:port``, ``tcp://host:port``, ``[v6]:port`` and ``tcp://[v6]:port``. An
IPv6 address always goes in brackets: ``::1:29500`` is refused rather than guessed at
(is the port 29500, or is it part of the address?). A leaf module, like
:mod:`lowband.errors`: transport, sync and the link emulator all parse addresses with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowband.errors import ConfigError

__all__ = ["Endpoint"]


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @classmethod
    def parse(cls, addr: str, what: str = "address", *, any_port: bool = False) -> Endpoint:
        """``addr`` as an Endpoint; ConfigError naming ``what`` when malformed.

        The port is 1..65535, or 0..65535 with ``any_port`` (0: bind to any free port).
        """
        if not isinstance(addr, str) or not addr:
            raise ConfigError(f"{what} must be 'host:port', got {addr!r}")
        a = addr.removeprefix("tcp://")
        if "://" in a:
            raise ConfigError(f"{what}: only tcp:// addresses are supported, got {addr!r}")
        host, sep, port = a.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            if not host or ":" not in host:
                raise ConfigError(f"{what}: brackets hold an IPv6 address, got {addr!r}")
        elif ":" in host or "[" in host or "]" in host:
            raise ConfigError(f"{what}: write an IPv6 address in brackets, '[{host}]:{port}', got {addr!r}")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"{what} must be 'host:port', got {addr!r}")
        p = int(port)
        if not (0 if any_port else 1) <= p <= 65535:
            raise ConfigError(f"{what}: port {p} out of range in {addr!r}")
        return cls(host, p)

    @property
    def ipv6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.ipv6 else f"{self.host}:{self.port}"

    def url(self, port: int | str | None = None) -> str:
        """The ZeroMQ endpoint ``tcp://host:port`` (another ``port`` if given; ``"*"``: any)."""
        h = f"[{self.host}]" if self.ipv6 else self.host
        return f"tcp://{h}:{self.port if port is None else port}"
