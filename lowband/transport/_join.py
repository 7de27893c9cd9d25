"""Joining a running group: the members' welcome and the joiner's heal (issue 16).

A process that starts while its group runs (a restart, or a late rank) waits in
``init_group`` until the members let it in with ``Group.admit()``. Members do that
at a boundary of their optimizer (after a sync, once the last commit said that
ranks wait), so it never lands inside another collective. Right after the
admission, members and joiners run two collectives together:

1. ``exchange``: each sends a small JSON blob: its optimizer configuration, whether
   it is a newcomer, and (members) the size and fingerprint of the state it offers;
2. ``share``: the lowest member sends its state (``torch.save`` bytes, read back
   with ``weights_only=True``) to the newcomers. Every member offers it, so if the
   first one is lost the retry takes the next.

The joiner checks the configuration against the sender's (``ConfigMismatch``) and
the fingerprint (SHA-256 over the fp32 bytes of the state's parameters) of what it
loaded against the sender's (``TransportError``), so a healed peer is known to hold
the sender's bits. Members do not wait for the joiner: their collectives run in the
background while they train on, and the joiner takes part from the next one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from typing import Any

import torch

from lowband.errors import ConfigMismatch, TransportError

__all__ = ["fingerprint", "heal", "joining", "welcome"]

log = logging.getLogger(__name__)


def joining(group: Any) -> bool:
    """Whether this rank entered a running group and has not taken its state yet."""
    return getattr(group, "joined_at", None) is not None


def fingerprint(tensors: list[torch.Tensor]) -> str:
    """SHA-256 over the fp32 bytes of ``tensors``, in order."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _pack(state: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def welcome(group: Any, config: dict[str, Any], state: dict[str, Any], fp: str) -> list[Any]:
    """Members: admit the ranks waiting, then offer ``state`` (fingerprint ``fp``) to them.

    Returns the works of the two collectives (empty when nobody was admitted); the caller
    need not wait for them before it trains on."""
    admitted = tuple(group.admit().wait())
    if not admitted:
        return []
    data = _pack(state)
    log.info("rank %d: admitted ranks %s; offering %d bytes of state", group.rank, admitted, len(data))
    blob = json.dumps({"config": config, "newcomer": False, "bytes": len(data), "fingerprint": fp},
                      sort_keys=True, default=str).encode()
    return [group.exchange(blob), group.share(data, to=admitted)]


def heal(group: Any, config: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Joiner: the state a member offers and its fingerprint (to check after loading)."""
    mine = json.dumps({"config": config, "newcomer": True}, sort_keys=True, default=str).encode()
    blobs = group.exchange(mine).wait()
    log.debug("rank %d: join handshake from ranks %s", group.rank, sorted(blobs))
    parsed: dict[int, dict[str, Any]] = {}
    for r, b in blobs.items():
        try:
            parsed[r] = json.loads(b)
        except ValueError:
            raise TransportError(f"rank {r} sent an unreadable join handshake") from None
    newcomers = tuple(sorted(r for r, p in parsed.items() if p.get("newcomer") is True))
    sender, data = group.share(None, to=newcomers).wait()
    log.debug("rank %d: %d bytes of state from rank %d", group.rank, 0 if data is None else len(data), sender)
    offer = parsed.get(sender, {})
    ref = json.loads(json.dumps(config, sort_keys=True, default=str))
    if offer.get("config") != ref:
        raise ConfigMismatch(
            f"rank {group.rank} joined a group whose rank {sender} runs another configuration: "
            f"{offer.get('config')!r} there, {ref!r} here"
        )
    if data is None or len(data) != offer.get("bytes"):
        raise TransportError(f"rank {sender} sent {0 if data is None else len(data)} bytes of state, "
                             f"it announced {offer.get('bytes')}")
    state = torch.load(io.BytesIO(data), weights_only=True)
    if not isinstance(state, dict):
        raise TransportError(f"rank {sender} sent a state that is not a dict")
    return state, str(offer.get("fingerprint"))
