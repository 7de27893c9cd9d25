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


# -- every address parser is this one (issue 14, item 6) ------------------------------------

_BAD = ["::1:29500", "host", "udp://host:1", "[]:1", "host:65536"]


@pytest.mark.parametrize("addr", _BAD)
def test_every_site_refuses_what_endpoint_refuses(addr: str) -> None:
    import zmq

    from lowband.sync._net import parse_endpoint
    from lowband.transport._coord_client import CoordinatorClient
    from lowband.transport.coordinator import Coordinator

    with pytest.raises(ConfigError):
        parse_endpoint(addr, "sync")
    with pytest.raises(ConfigError):
        Coordinator(addr)
    ctx = zmq.Context()
    try:
        with pytest.raises(ConfigError):
            CoordinatorClient(ctx, addr)
    finally:
        ctx.term()


def test_sync_endpoints_are_the_shared_type() -> None:
    from lowband.sync import _net

    assert _net.Endpoint is Endpoint
    assert _net.parse_endpoint("tcp://[::1]:0", "x") == Endpoint("::1", 0)


def test_coordinator_serves_and_is_reached_over_bracketed_ipv6() -> None:
    """A real coordinator process bound to ``[::1]:0`` and a client that finds it there."""
    import zmq

    from lowband.transport._coord_client import CoordinatorClient
    from lowband.transport.coordinator import start_coordinator

    ctx = zmq.Context()
    with start_coordinator("[::1]:0") as co:
        ep = Endpoint.parse(co.address)
        assert ep.host == "::1" and ep.port > 0
        client = CoordinatorClient(ctx, co.address)
        try:
            assert client.ask({"op": "ping"}, timeout=20) is not None
        finally:
            client.close()
    ctx.term()


@pytest.mark.parametrize("host", [None, "::1"])
def test_a_zmq_group_all_reduces_over_ipv6_loopback(host: str | None) -> None:
    """Two ranks of ``init_group(backend="zmq")`` through a coordinator on ``[::1]``: their
    stream and heartbeat sockets bind and dial IPv6 (``host=None``: the source address
    routed to the coordinator, ``::1``), and the all-reduce gives the exact mean."""
    import threading

    import torch

    import lowband
    from lowband.transport.coordinator import start_coordinator

    results: dict[int, torch.Tensor] = {}
    endpoints: dict[int, str] = {}
    errors: list[BaseException] = []

    def rank(r: int, address: str) -> None:
        try:
            g = lowband.init_group(r, 2, store=address, backend="zmq", host=host, peer_timeout=20,
                                   group_name=f"v6{host}", init_timeout=60)
            try:
                endpoints[r] = g.carrier.io.data_endpoint
                results[r] = g.all_reduce(torch.full((1000,), float(r + 1)), op="mean").wait()
            finally:
                g.close()
        except BaseException as e:  # noqa: BLE001 - asserted below
            errors.append(e)

    with start_coordinator("[::1]:0") as co:
        threads = [threading.Thread(target=rank, args=(r, co.address), daemon=True) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
    assert not errors, errors
    assert all(e.startswith("tcp://[::1]:") for e in endpoints.values()), endpoints
    for r in range(2):
        assert torch.equal(results[r], torch.full((1000,), 1.5))
