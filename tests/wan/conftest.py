"""Shared fixtures of the link emulator tests: the two modes, and a check that nothing leaks."""

from __future__ import annotations

import subprocess

import pytest

from lowband.wan._netns import list_namespaces, netns_available


def _own_namespaces() -> set[str]:
    import os

    return set(list_namespaces(f"lbw{os.getpid()}x"))


@pytest.fixture(params=["proxy", "netns"])
def mode(request: pytest.FixtureRequest) -> str:
    """Each emulator test runs in both modes; netns skips with the reason where it cannot run."""
    if request.param == "netns":
        ok, why = netns_available()
        if not ok:
            pytest.skip(why)
    return request.param


@pytest.fixture(autouse=True)
def no_leftovers():
    """After every test, this process owns no namespace and no relay or delay-line process."""
    yield
    assert not _own_namespaces(), "a test left network namespaces behind"
    out = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout
    import os

    mine = [
        line
        for line in out.splitlines()[1:]
        if line.split()[1] == str(os.getpid()) and ("lowband.wan._" in line)
    ]
    assert not mine, f"relay or delay line still running: {mine}"
