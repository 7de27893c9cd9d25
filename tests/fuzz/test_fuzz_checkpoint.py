"""Fuzz checkpoint loading past the hash: mutated structures raise only lowband errors."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import tempfile
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lowband
from lowband import checkpoint as ck
from lowband.errors import LowbandError

from ._budget import fuzz_settings


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    m(torch.randn(2, 3)).sum().backward()
    opt.step()
    return m, opt


def _seed() -> tuple[Any, bytes]:
    m, opt = _model()
    with tempfile.TemporaryDirectory() as d:
        lowband.save(os.path.join(d, "c.pt"), m, opt, step=3, pos=[1, (2, 3.5)], t=torch.arange(4))
        blob = open(os.path.join(d, "c.pt"), "rb").read()
    _, _, hlen = ck._PREFIX.struct.unpack_from(blob)
    start = ck._PREFIX.size
    return json.loads(blob[start : start + hlen]), blob[start + hlen : -ck.DIGEST]


TREE, DATA = _seed()
ODD = [None, True, 0, -1, 1.5, float("nan"), 2**31, 2**63, -(2**70), "", "x", "float32", "cpu", "meta",
       [], [0], [1, 2], [-1], {}, {"list": []}, {"dict": []}, {"tuple": [1]}, {"float": "inf"}, {"float": "1"},
       {"tensor": ["float32", [1], 4, "cpu"]}, {"tensor": ["uint8", [2**40], 2**40, "cpu"]}, {"bogus": 1}]


def _paths(x: Any, here: tuple = ()) -> list[tuple]:
    out = [here]
    if isinstance(x, list):
        for i, v in enumerate(x):
            out += _paths(v, here + (i,))
    elif isinstance(x, dict):
        for k, v in x.items():
            out += _paths(v, here + (k,))
    return out


def _mutate(data: st.DataObject, tree: Any, raw: bytearray) -> Any:
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["replace", "drop", "dup", "data", "cut", "grow"]))
        if op in ("data", "cut", "grow"):
            if op == "data" and raw:
                raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
            elif op == "cut":
                del raw[data.draw(st.integers(0, len(raw))):]
            elif op == "grow":
                raw += data.draw(st.binary(min_size=1, max_size=16))
            continue
        where = data.draw(st.sampled_from(_paths(tree)))
        if not where:
            tree = copy.deepcopy(data.draw(st.sampled_from(ODD)))
            continue
        parent = tree
        for k in where[:-1]:
            parent = parent[k]
        k = where[-1]
        if op == "replace":
            # a copy: later mutations of this case must not change ODD (hypothesis replays cases)
            parent[k] = copy.deepcopy(data.draw(st.one_of(st.sampled_from(ODD), st.integers(), st.text(max_size=8))))
        elif op == "drop":
            del parent[k]
        elif isinstance(parent, list):
            parent.insert(k, json.loads(json.dumps(parent[k])))
    return tree


@fuzz_settings
@given(st.data())
def test_mutated_checkpoints_raise_only_lowband_errors(data: st.DataObject) -> None:
    tree = _mutate(data, json.loads(json.dumps(TREE)), raw := bytearray(DATA))
    header = json.dumps(tree).encode()
    body = ck._PREFIX.pack(len(header)) + header + bytes(raw)
    blob = body + hashlib.sha256(body).digest()  # the hash and lengths are right: the checks behind them are fuzzed
    fd, path = tempfile.mkstemp(suffix=".pt")
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        os.write(fd, blob)
        os.close(fd)
        m, opt = _model()
        try:
            lowband.load(path, m, opt)
        except LowbandError:
            pass
    finally:
        os.unlink(path)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


@pytest.mark.parametrize("n", [0, 1, 7, 8, 20, 21])
def test_truncated_prefixes_raise_checkpoint_errors(tmp_path, n: int) -> None:  # type: ignore[no-untyped-def]
    header = json.dumps(TREE).encode()
    body = ck._PREFIX.pack(len(header)) + header + DATA
    (tmp_path / "c.pt").write_bytes((body + hashlib.sha256(body).digest())[:n])
    with pytest.raises(lowband.errors.CheckpointError):
        lowband.load(tmp_path / "c.pt")
