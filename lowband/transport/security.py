"""CURVE security for the ZeroMQ transport, and the ``lowband keys`` command.

``Curve`` turns on ZeroMQ's CURVE mechanism (CurveZMQ: Curve25519 key exchange,
every message encrypted and authenticated) on every socket a peer or the
coordinator opens, with an allow-list of public keys checked by a ZAP handler
(``zmq.auth``): a client whose key is not listed fails the handshake, so it can
neither join through the coordinator nor inject frames into a peer.

Keys come from files or arguments, never from the rendezvous store, which is not
authenticated. The coordinator tells each peer which allowed key another rank
uses; a peer refuses any key that is not in its own allow-list, so the
coordinator can at worst point one allowed peer at another, never at a stranger.
What CURVE proves is "holds one of the allowed secret keys": a holder of an
allowed key is trusted to state its own rank truthfully.

``lowband keys generate --dir DIR --name NAME`` writes ``NAME.key`` (public) and
``NAME.key_secret`` (secret, mode 0600) in the format of ``zmq.auth``.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from lowband.errors import ConfigError, SecurityError

__all__ = ["Curve", "generate_keys", "is_loopback", "main", "warn_if_exposed"]

log = logging.getLogger(__name__)

_KEY_LEN = 40  # z85 text of a 32-byte Curve25519 key


def _z85_key(key: bytes | str, what: str) -> bytes:
    raw = key.encode("ascii") if isinstance(key, str) else bytes(key)
    if len(raw) != _KEY_LEN:
        raise ConfigError(f"{what}: a CURVE key is {_KEY_LEN} z85 characters, got {len(raw)}")
    try:
        zmq.utils.z85.decode(raw)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{what}: not a z85 CURVE key") from e
    return raw


def _load_public(path: str | os.PathLike[str]) -> bytes:
    try:
        public, _ = zmq.auth.load_certificate(os.fspath(path))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read CURVE public key from {os.fspath(path)!r}: {e}") from e
    return _z85_key(public, os.fspath(path))


@dataclass(frozen=True)
class Curve:
    """This process's key pair and the public keys it accepts.

    ``allowed`` lists every peer's public key (this process's own key is always
    accepted too); ``coordinator_key`` is the coordinator's public key, needed by
    peers (the coordinator itself leaves it ``None``).
    """

    public_key: bytes
    secret_key: bytes = field(repr=False)
    allowed: frozenset[bytes] = frozenset()
    coordinator_key: bytes | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "public_key", _z85_key(self.public_key, "public_key"))
        object.__setattr__(self, "secret_key", _z85_key(self.secret_key, "secret_key"))
        keys = frozenset(_z85_key(k, "allowed key") for k in self.allowed) | {self.public_key}
        object.__setattr__(self, "allowed", keys)
        if self.coordinator_key is not None:
            object.__setattr__(
                self, "coordinator_key", _z85_key(self.coordinator_key, "coordinator_key")
            )

    @classmethod
    def from_files(
        cls,
        secret_file: str | os.PathLike[str],
        *,
        allowed: Iterable[str | os.PathLike[str]] = (),
        coordinator: str | os.PathLike[str] | None = None,
    ) -> Curve:
        """Load a key pair from ``NAME.key_secret``; ``allowed`` are public key files or
        directories of them; ``coordinator`` is the coordinator's public key file."""
        try:
            public, secret = zmq.auth.load_certificate(os.fspath(secret_file))
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"cannot read CURVE key pair from {os.fspath(secret_file)!r}: {e}"
            ) from e
        if secret is None:
            raise ConfigError(
                f"{os.fspath(secret_file)!r} holds no secret key (use the .key_secret file)"
            )
        keys: set[bytes] = set()
        for item in allowed:
            p = Path(item)
            files = sorted(p.glob("*.key")) if p.is_dir() else [p]
            keys.update(_load_public(f) for f in files)
        coord = _load_public(coordinator) if coordinator is not None else None
        return cls(public, secret, frozenset(keys), coord)

    def check_allowed(self, key: bytes | str, what: str) -> bytes:
        """``key`` as z85 bytes if it is on the allow-list, else :class:`SecurityError`."""
        raw = key.encode("ascii") if isinstance(key, str) else bytes(key)
        if raw not in self.allowed:
            raise SecurityError(f"{what} uses a CURVE key that is not on the allow-list")
        return raw

    # -- socket set-up -----------------------------------------------------------------
    def start_authenticator(self, ctx: zmq.Context) -> ThreadAuthenticator:
        """Start the ZAP handler for ``ctx``; servers on ``ctx`` then accept only ``allowed``."""
        auth = ThreadAuthenticator(ctx, log=logging.getLogger(__name__ + ".zap"))
        auth.start()
        auth.configure_curve_callback("*", _AllowList(self.allowed))
        return auth

    def server(self, sock: zmq.Socket) -> None:
        """Make a binding socket a CURVE server (before ``bind``)."""
        sock.curve_secretkey = self.secret_key
        sock.curve_publickey = self.public_key
        sock.curve_server = True

    def client(self, sock: zmq.Socket, server_key: bytes) -> None:
        """Make a connecting socket a CURVE client of ``server_key`` (before ``connect``)."""
        sock.curve_secretkey = self.secret_key
        sock.curve_publickey = self.public_key
        sock.curve_serverkey = server_key


class _AllowList:
    """ZAP credentials provider: accept exactly the listed public keys."""

    def __init__(self, keys: frozenset[bytes]) -> None:
        self._keys = keys
        self._lock = threading.Lock()

    def callback(self, domain: str, key: bytes) -> bool:
        with self._lock:
            ok = bytes(key) in self._keys
        if not ok:
            log.warning(
                "CURVE: refused a connection from an unknown key %s",
                bytes(key).decode("ascii", "replace"),
            )
        return ok


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    import ipaddress

    h = host.strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def warn_if_exposed(host: str, security: Curve | None, what: str) -> None:
    """Log a warning when ``what`` binds a non-loopback address without CURVE."""
    if security is None and not is_loopback(host):
        log.warning(
            "%s binds %s without CURVE: anyone who can reach it can join or inject frames; "
            "pass security=lowband.transport.Curve(...)",
            what,
            host,
        )


def generate_keys(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` and ``NAME.key_secret`` (mode 0600) into ``directory``."""
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"bad key name {name!r}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    public, secret = (d / f"{name}.key"), (d / f"{name}.key_secret")
    for p in (public, secret):
        if p.exists():
            raise ConfigError(f"{p} exists; refusing to overwrite a key")
    pub, sec = zmq.auth.create_certificates(os.fspath(d), name)
    os.chmod(sec, 0o600)
    return Path(pub), Path(sec)


def main(argv: list[str]) -> int:
    """``lowband keys generate --dir DIR --name NAME``."""
    ap = argparse.ArgumentParser(
        prog="lowband keys", description="CURVE key pairs for lowband peers"
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    gen = sub.add_parser("generate", help="write NAME.key (public) and NAME.key_secret (secret)")
    gen.add_argument("--dir", default=".", help="directory for the key files (default: .)")
    gen.add_argument("--name", required=True, help="base name of the key files, e.g. rank0")
    args = ap.parse_args(argv)
    try:
        pub, sec = generate_keys(args.dir, args.name)
    except ConfigError as e:
        print(f"lowband keys: {e}")
        return 2
    public, _ = zmq.auth.load_certificate(os.fspath(pub))
    print(f"public key {public.decode('ascii')}\n  wrote {pub}\n  wrote {sec} (keep it secret)")
    return 0
