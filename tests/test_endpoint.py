"""One address type with one IPv6 rule (issue 14, item 6): ``lowband._endpoint.Endpoint``."""

from __future__ import annotations

import pytest

from lowband._endpoint import Endpoint
from lowband.errors import ConfigError
from lowband.transport._init import parse_address


@pytest.mark.parametrize(
    ("addr", "host", "port"),
    [
        ("127.0.0.1:29500", "127.0.0.1", 29500),
        ("tcp://node-3.example:1", "node-3.example", 1),
        ("[::1]:29500", "::1", 29500),
        ("tcp://[fe80::1%eth0]:65535", "fe80::1%eth0", 65535),
    ],
)
def test_accepted_forms_round_trip(addr: str, host: str, port: int) -> None:
    ep = Endpoint.parse(addr)
    assert (ep.host, ep.port) == (host, port) == parse_address(addr)
    assert Endpoint.parse(str(ep)) == ep == Endpoint.parse(ep.url())


@pytest.mark.parametrize(
    "addr",
    ["", "host", "host:", ":29500", "host:port", "host:0", "host:65536", "::1:29500",
     "[]:1", "[10.0.0.1]:5", "udp://host:1", "[::1]29500"],
)
def test_malformed_addresses_raise_config_error(addr: str) -> None:
    with pytest.raises(ConfigError):
        Endpoint.parse(addr)


def test_port_zero_only_when_binding_anywhere() -> None:
    assert Endpoint.parse("0.0.0.0:0", any_port=True).port == 0
    assert Endpoint.parse("[::]:0", any_port=True).url(5555) == "tcp://[::]:5555"
