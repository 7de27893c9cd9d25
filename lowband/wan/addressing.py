"""How a process started on an emulated host finds its own address and reaches its peers.

:meth:`LinkEmulator.spawn` and :meth:`LinkEmulator.popen` set ``LOWBAND_WAN`` in the child's
environment. Code that binds and connects (the transport, ``lowband bench``) calls:

- :func:`local_address` for the IP to bind and to advertise to peers (``None`` when the
  process does not run on an emulated host: bind as usual);
- :func:`connect_address` on every (ip, port) it is about to connect to
  (:func:`connect_endpoint` for a ZeroMQ ``tcp://ip:port`` endpoint). In ``netns`` mode it
  returns its argument (the kernel routes through the emulated links); in ``proxy`` mode it
  returns the relay that carries this host's traffic to that address. Addresses that are not
  emulated hosts (the hub, anything else) come back unchanged.
"""

from __future__ import annotations

import json
import os
import socket

from lowband._endpoint import Endpoint
from lowband._frames import recv_line
from lowband.errors import ConfigError, TransportError

__all__ = [
    "ENV_VAR",
    "local_address",
    "connect_address",
    "connect_endpoint",
    "current_host",
    "control_request",
]

ENV_VAR = "LOWBAND_WAN"


def _info() -> dict | None:
    raw = os.environ.get(ENV_VAR)
    if not raw:
        return None
    try:
        info = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{ENV_VAR} is not valid JSON: {exc}") from None
    if not isinstance(info, dict) or info.get("mode") not in ("netns", "proxy"):
        raise ConfigError(f"{ENV_VAR} must describe a netns or proxy emulator, got {raw!r}")
    return info


def current_host() -> int | None:
    """The emulated host this process runs on (-1: the hub), or ``None`` outside an emulator."""
    info = _info()
    return None if info is None else int(info["host"])


def local_address() -> str | None:
    """The IP this process should bind and advertise, or ``None`` outside an emulator."""
    info = _info()
    return None if info is None else str(info["address"])


def control_request(path: str, line: str, *, timeout: float = 10.0) -> str:
    """Send one command line to a proxy relay's control socket; return its one-line answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall((line + "\n").encode())
            data = recv_line(s, error=TransportError)
    except OSError as exc:
        raise TransportError(
            f"link emulator relay at {path!r} did not answer {line.split()[0]!r}: {exc}"
        ) from exc
    answer = data.decode().strip()
    if answer.startswith("error"):
        raise TransportError(f"link emulator relay: {answer}")
    return answer


def connect_address(ip: str, port: int) -> tuple[str, int]:
    """Where this process should connect to reach ``(ip, port)`` across the emulated links."""
    info = _info()
    if info is None or info["mode"] == "netns":
        return ip, int(port)
    host, port_ = control_request(
        info["control"], f"route {int(info['host'])} {ip} {int(port)}"
    ).split()
    return host, int(port_)


def connect_endpoint(endpoint: str) -> str:
    """:func:`connect_address` for a ZeroMQ ``tcp://ip:port`` endpoint; others come back as is."""
    if not endpoint.startswith("tcp://") or _info() is None:
        return endpoint
    try:
        ep = Endpoint.parse(endpoint, any_port=True)
    except ConfigError:
        return endpoint  # not host:port (say, an interface name with a wildcard port)
    if ep.ipv6:
        return endpoint  # the emulated hosts are IPv4
    ip, port_ = connect_address(ep.host, ep.port)
    return f"tcp://{ip}:{port_}"
