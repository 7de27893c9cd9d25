"""Shared fixtures of the link emulator tests: the two modes, and a check that nothing leaks."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lowband.wan._netns import list_namespaces, netns_available


def _helpers_of_this_process() -> list[str]:
    """Command lines of this process's children that are delay lines or relays."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = (proc / "stat").read_text().rsplit(")", 1)[1].split()[1]
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue  # it ended while we looked
        if ppid == str(os.getpid()) and "lowband.wan._" in cmd:
            found.append(cmd)
    return found


@pytest.fixture(params=["proxy", "netns"])
def mode(request: pytest.FixtureRequest) -> str:
    """Each emulator test runs in both modes; netns skips with the reason where it cannot run."""
    if request.param == "netns":
        ok, why = netns_available()
        if not ok:
            pytest.skip(why)
    return request.param


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """After every test, this process owns no namespace and no relay or delay-line process."""
    yield
    assert not list_namespaces(f"lbw{os.getpid()}x"), "a test left network namespaces behind"
    assert not _helpers_of_this_process(), "a relay or delay line is still running"
