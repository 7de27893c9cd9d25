"""lowband.wan: emulated internet links between processes on this machine.

Every WAN figure lowband reports (link utilization, time per sync, ``lowband bench``) is measured
through this emulator, so it must not flatter (DESIGN.md, "The link emulator must not flatter").

Two modes behind one API:

- ``netns`` (root): each host is a network namespace joined to a core namespace by a veth pair;
  ``tc tbf`` sets each direction's rate and bounded queue; a TUN delay line in the core holds
  every packet for its pair's one-way delay (plus jitter, never reordering a flow). The real
  kernel TCP stack sees the real round trip.
- ``proxy`` (no root): a userspace TCP relay with the same links, delay and queues, plus a model
  of the sender's window across the emulated round trip, calibrated against ``netns`` mode.

Use::

    from lowband.wan import LinkEmulator, Topology, HUB
    topo = Topology.uniform(4, rate="1gbit", rtt="100ms")   # or Topology.from_links(...)
    with LinkEmulator(topo, mode="auto") as net:             # net.mode: "netns" or "proxy"
        coord = net.spawn(HUB, run_coordinator, args=(net.hub_address, 29500))
        workers = [net.spawn(i, train, args=(i,)) for i in range(4)]
        net.cut(0, 1); net.restore(0, 1); net.stall(2, seconds=5.0)
        print(net.link_bytes())      # {host: {"up": bytes, "down": bytes}}: the link-bytes counter

Processes run "on" a host through :meth:`LinkEmulator.spawn` (a ``multiprocessing`` process,
spawn start method, that joins the host's namespace first) or :meth:`LinkEmulator.popen` /
:meth:`LinkEmulator.command` (commands). Inside them, :func:`local_address` is the IP to bind
and advertise, and :func:`connect_address` maps a peer's advertised ``(ip, port)`` to where to
connect (identity in ``netns`` mode, the relay in ``proxy`` mode). The hub
(:attr:`LinkEmulator.hub_address`, host index ``HUB``) is where a coordinator listens: every
host reaches it without the emulated delay.

``lowband wan cleanup`` removes what a killed run left behind. This package imports only the
standard library (and ``lowband.errors``).
"""

from lowband.wan.addressing import connect_address, connect_endpoint, current_host, local_address
from lowband.wan.emulator import HUB, LinkEmulator
from lowband.wan.topology import HostLink, Topology, parse_bytes, parse_rate, parse_seconds

__all__ = [
    "LinkEmulator",
    "Topology",
    "HostLink",
    "HUB",
    "local_address",
    "connect_address",
    "connect_endpoint",
    "current_host",
    "parse_rate",
    "parse_seconds",
    "parse_bytes",
]
