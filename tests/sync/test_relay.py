"""Relays: a fan-out tree of verified copies; dead or lying relays are routed around."""

from __future__ import annotations

import time

import pytest
import torch
from sync_helpers import TIMEOUT, same_bits, zeros_like

from lowband.errors import ConfigError
from lowband.sync import WeightPublisher, WeightRelay, WeightSubscriber
from lowband.sync._wire import COMMIT, SNAP_REP, Header, pack, parse_header


def _model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {
        "w": torch.randn(700, generator=g),
        "h": torch.randn(30, 11, generator=g).to(torch.bfloat16),
    }


def _until(cond, timeout: float = TIMEOUT) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.02)


def _sync(sub: WeightSubscriber, version: int) -> None:
    end = time.monotonic() + TIMEOUT
    while sub.version != version:
        assert time.monotonic() < end, f"version {version} not reached, at {sub.version}"
        sub.update(block=True, timeout=TIMEOUT)


def _step(model: dict[str, torch.Tensor], k: int) -> None:
    model["w"][k * 7 % 700] += 0.5
    model["h"][k % 30, k % 11] = float(k)


def test_two_level_tree_is_exact_and_late_joiners_snapshot_from_the_relay() -> None:
    model = _model()
    with WeightPublisher(model, chunk_elems=128) as pub:
        pub.publish()
        with (
            WeightRelay(connect=pub.address, retry_s=0.5) as top,
            WeightRelay(connect=top.address, origin=pub.address, retry_s=0.5) as mid,
        ):
            _until(lambda: mid.version == pub.version)
            near, far = zeros_like(model), zeros_like(model)
            with (
                WeightSubscriber(near, connect=top.address, retry_s=0.5) as s1,
                WeightSubscriber(
                    far, connect=[mid.address, pub.address], origin=pub.address, retry_s=0.5
                ) as s2,
            ):
                for k in range(1, 4):
                    _step(model, k)
                    pub.publish()
                    _sync(s1, pub.version)
                    _sync(s2, pub.version)
                    assert same_bits(model, near) and same_bits(model, far)
                    assert s2.fingerprint == pub.fingerprint
                assert s2.failovers == 0 and s2.fingerprint_mismatches == 0
                served = mid.snapshot_chunks_served
                assert served > 0  # s2's first copy came from the relay, not the learner
                late = zeros_like(model)
                with WeightSubscriber(late, connect=mid.address, origin=pub.address) as s3:
                    assert s3.update(block=True, timeout=TIMEOUT) == pub.version
                    assert same_bits(model, late)
                assert mid.snapshot_chunks_served > served
                assert mid.error is None and top.error is None


def test_subscriber_leaves_a_dead_relay_for_the_next_source() -> None:
    model = _model()
    with WeightPublisher(model, chunk_elems=128, heartbeat_s=0.1) as pub:
        pub.publish()
        relay = WeightRelay(connect=pub.address, retry_s=0.3)
        replica = zeros_like(model)
        try:
            with WeightSubscriber(
                replica, connect=[relay.address, pub.address], origin=pub.address, retry_s=0.3
            ) as sub:
                assert sub.update(block=True, timeout=TIMEOUT) == pub.version
                relay.close()
                _step(model, 1)
                pub.publish()
                _sync(sub, pub.version)
                assert same_bits(model, replica) and sub.failovers == 1
        finally:
            relay.close()


class _LyingRelay(WeightRelay):
    """Serves a tampered copy and claims it is the learner's (a relay that lies)."""

    def _answer(self, body: list) -> list | None:
        reply = super()._answer(body)
        if (
            reply is not None
            and parse_header(reply[:1] + [b""] * (len(reply) - 1)).kind == SNAP_REP
        ):
            data = bytearray(reply[1])
            data[0] ^= 1
            reply = [reply[0], bytes(data)]
        return reply

    def _forward(self, body: list, stream: int) -> None:
        h = parse_header(body)
        if h.kind == COMMIT:  # forward a commit whose fingerprint is not the learner's
            body = [pack(Header(**{**h.__dict__, "finger": h.finger ^ 1}))]
        super()._forward(body, stream)


def test_lying_relay_is_routed_around() -> None:
    model = _model()
    with WeightPublisher(model, chunk_elems=128) as pub:
        pub.publish()
        with (
            _LyingRelay(connect=pub.address, retry_s=0.3) as liar,
            WeightRelay(connect=pub.address, retry_s=0.3) as honest,
        ):
            replica = zeros_like(model)
            with WeightSubscriber(
                replica,
                connect=[liar.address, honest.address],
                origin=pub.address,
                retry_s=0.3,
            ) as sub:
                for k in range(1, 3):
                    _step(model, k)
                    pub.publish()
                    _sync(sub, pub.version)
                    assert same_bits(model, replica)
                assert sub.failovers >= 1 and sub.fingerprint_mismatches >= 1


def test_origin_must_be_the_learner() -> None:
    model = _model()
    with WeightPublisher(model) as pub, WeightRelay(connect=pub.address) as relay:
        pub.publish()
        _until(lambda: relay.version == pub.version)
        with WeightSubscriber(
            zeros_like(model), connect=relay.address, origin=relay.address
        ) as sub:
            with pytest.raises(ConfigError, match="learner"):
                sub.update(block=True, timeout=TIMEOUT)
