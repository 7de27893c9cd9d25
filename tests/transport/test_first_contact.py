"""First contact (issue 13): the paths a new user walks work, or fail fast and say why.

Real processes, real sockets, a real coordinator and torch's real TCPStore; torchrun as
users run it. No test here asserts a duration: each failure case is given a deadline far
beyond the fast path (60 s) and checks that the *specific* error arrived, which only the
fast path produces (a deadline would give CollectiveTimeout instead).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import lowband
from lowband.errors import CollectiveTimeout, ConfigError, TransportError
from lowband.testing import start_store
from lowband.transport import start_coordinator
from lowband.transport.security import Curve, generate_keys

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parent / "scripts"
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _coordinator_children(launcher_pid: int) -> list[int]:
    """Coordinators started to end with ``launcher_pid`` that still run."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"lowband.transport.coordinator" in cmd and str(launcher_pid).encode() in cmd:
            out.append(int(d.name))
    return out


@pytest.mark.slow
def test_torchrun_default_backend_trains_the_readme_quickstart() -> None:
    """`torchrun --nproc_per_node 2 examples/quickstart.py`: the README's lines, as written."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    proc = subprocess.Popen(
        [torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()),
         str(ROOT / "examples" / "quickstart.py")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
    )
    try:
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, out
    lines = re.findall(r"rank (\d): loss [\d.]+, (\d+) syncs, ([\d,]+) payload bytes sent", out)
    assert sorted(r for r, _, _ in lines) == ["0", "1"], out
    assert all(int(s) == 5 and int(b.replace(",", "")) > 0 for _, s, b in lines), out
    # the coordinator that lowband started beside torchrun's agent ends with it
    deadline = time.monotonic() + 10
    while _coordinator_children(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _coordinator_children(proc.pid)


def test_init_timeout_bounds_the_wait_and_says_nothing_answered() -> None:
    port = _free_port()  # nothing listens there
    with pytest.raises(CollectiveTimeout, match=r"within 3s \(init_timeout\).*nothing answered"):
        lowband.init_group(0, 2, store=f"127.0.0.1:{port}", init_timeout=3)


def test_init_timeout_names_the_missing_ranks() -> None:
    with start_coordinator() as co:
        with pytest.raises(CollectiveTimeout, match=r"ranks \[1, 2\] of 3 have not joined \(joined: \[0\]\)"):
            lowband.init_group(0, 3, store=co.address, init_timeout=3)


def test_a_torch_store_is_not_taken_for_a_coordinator() -> None:
    """The old torchrun hang: the zmq backend pointed at a TCPStore now says what it found."""
    store, addr = start_store()
    try:
        with pytest.raises(TransportError, match="closes them during the handshake"):
            lowband.init_group(0, 2, store=addr, init_timeout=60)
    finally:
        del store


def test_curve_without_the_coordinator_key_fails_at_once(tmp_path: Path) -> None:
    """The README's old CURVE example: a ConfigError, not a hang in zmq's Context.term()."""
    generate_keys(tmp_path, "me")
    sec = Curve.from_files(tmp_path / "me.key_secret", allowed=[tmp_path])
    errors: list[BaseException] = []

    def join() -> None:
        try:
            lowband.init_group(0, 2, store="127.0.0.1:1", security=sec, init_timeout=60)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=join, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "init_group hung"
    assert len(errors) == 1 and isinstance(errors[0], ConfigError), errors
    assert "coordinator" in str(errors[0])


@pytest.mark.slow
def test_a_config_mismatch_reaches_every_rank() -> None:
    with start_coordinator() as co:
        procs = [
            subprocess.Popen(
                [sys.executable, str(SCRIPTS / "mismatch.py"), str(r), "3", co.address, str(se)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
            )
            for r, se in ((0, 10), (1, 10), (2, 20))
        ]
        outs = []
        for p in procs:
            try:
                outs.append(p.communicate(timeout=120)[0])
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
    for r, out in enumerate(outs):
        res = [ln for ln in out.splitlines() if ln.startswith("RESULT")]
        assert res and res[0].startswith("RESULT ConfigMismatch") and "sync_every" in res[0], (r, out)


def _listeners(port: int) -> list[str]:
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout
    return [ln.split()[3] for ln in out.splitlines() if ln.strip()]


def test_start_store_listens_on_the_address_asked_only() -> None:
    store, addr = start_store("127.0.0.1")
    try:
        port = int(addr.rpartition(":")[2])
        assert _listeners(port) == [f"127.0.0.1:{port}"]
        store.set("k", "v")
        assert store.get("k") == b"v"
    finally:
        del store


def test_coordinator_torch_store_port_binds_what_was_asked() -> None:
    port = _free_port()
    with start_coordinator(args=["--torch-store-port", str(port)]):
        listeners = _listeners(port)
    assert listeners == [f"127.0.0.1:{port}"], listeners


def _rendezvous_args(rdzv: str, host: int, emu: object, port: str) -> list[str]:
    """torchrun's rendezvous options for node ``host`` of two, as a user on such hosts passes them.

    c10d: torchrun decides which node hosts its store by matching the endpoint against this
    machine's hostname and its addresses; in these namespaces (as on hosts whose hostname
    resolves to 127.0.x.1) it matches on neither node, so no node hosts it ("The connection to
    the C10d store has failed"): ``--rdzv_conf is_host=1`` on the endpoint's node says so.
    The address torchrun hands its workers (MASTER_ADDR) is rank 0's node's hostname unless
    ``--local_addr`` names the address the others can reach (docs/troubleshooting.md).
    """
    addr0 = emu.host_address(0)  # type: ignore[attr-defined]
    if rdzv == "static":
        return ["--node_rank", str(host), "--master_addr", addr0, "--master_port", port]
    return ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"{addr0}:{port}", "--rdzv_id", "first-contact",
            "--rdzv_conf", f"is_host={int(host == 0)}",
            "--local_addr", emu.host_address(host)]  # type: ignore[attr-defined]


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.parametrize("rdzv", ["static", "c10d"])
def test_torchrun_two_nodes_in_two_namespaces_without_host(rdzv: str) -> None:
    """`torchrun --nnodes 2` on two emulated hosts with their own addresses: the README's
    quickstart as written, no host= and no coordinator started by hand; with static
    rendezvous (--master_addr, --node_rank) and with c10d rendezvous (--rdzv_endpoint)."""
    from lowband.wan import LinkEmulator, Topology
    from lowband.wan._netns import netns_available

    ok, why = netns_available()
    if not ok:
        pytest.skip(f"needs network namespaces: {why}")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    with LinkEmulator(Topology.uniform(2, rate="1gbit", rtt="2ms"), mode="netns") as emu:
        port = str(_free_port())
        nodes = [
            emu.popen(h, [torchrun, "--nnodes", "2", "--nproc_per_node", "1",
                          *_rendezvous_args(rdzv, h, emu, port),
                          str(ROOT / "examples" / "quickstart.py")],
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
            for h in range(2)
        ]
        outs = []
        try:
            for p in nodes:
                outs.append(p.communicate(timeout=180)[0])
        finally:  # every node ends here, also when one did not finish in time
            for p in nodes:
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
    out = "\n".join(outs)
    assert all(p.returncode == 0 for p in nodes), out
    lines = re.findall(r"rank (\d): loss [\d.]+, (\d+) syncs", out)
    assert sorted(r for r, _ in lines) == ["0", "1"] and all(s == "5" for _, s in lines), out
    assert "binds 127.0.0.1" not in out


def test_a_worker_of_another_node_told_master_addr_is_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun --nnodes 2 without --local_addr, where rank 0's hostname resolves to loopback:
    node 1's workers cannot reach the store, and the error says why and what to pass."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "first-contact")
    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "GROUP_RANK": "1",
                 "MASTER_ADDR": "localhost", "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(TransportError, match=r"MASTER_ADDR 'localhost' resolves to .*127\.0\.0\.1.*--local_addr"):
        lowband.init_group(init_timeout=2)


@pytest.mark.slow
def test_a_script_that_ends_without_close_leaves_its_peers_whole() -> None:
    """The README's first lines end with no group.close(): the last collective must still reach
    every peer (open groups close, and wait for their peers' acks, at interpreter exit)."""
    with start_coordinator() as co:
        procs = [
            subprocess.Popen([sys.executable, str(SCRIPTS / "no_close.py"), str(r), co.address],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
            for r in range(2)
        ]
        outs = []
        try:
            for p in procs:
                outs.append(p.communicate(timeout=120)[0])
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"RESULT rank {r}: 1.5 True" in out, (r, out)
