"""ZeroMQ CURVE for the cluster's internal sockets: the key set, the ZAP authenticator, the socket options.

Key set layout (one directory, written by ``diptych keys generate DIR``)::

    DIR/public/<name>.key             public key of <name>, ZeroMQ certificate format, mode 0644
    DIR/private/<name>.key_secret     public and secret key of <name>, mode 0600 (directory 0700)

``<name>`` is a process's identity in the cluster: ``coordinator``, ``frontend``, and each worker's id
(``prefill-0``, ``decode-0``, ...). Every process needs all of ``public/`` (the keys it admits and the servers it
connects to) and only its own file of ``private/``: a deployment may hand each process a copy holding just that.

Invariants:
- A server socket (``CurveServer``) admits a client only when the context's ``ZapAuthenticator`` finds the client's
  public key in the set; with no authenticator running the connection is refused (``ZAP_ENFORCE_DOMAIN``), never
  silently admitted.
- The authenticated user id of every message on such a socket is the client key's name (``recv_authenticated`` in
  ``services.common.sockets`` returns it), so receivers can tie a worker id or a request to the connection.
- A client socket (``CurveClient``) only completes the handshake with the server holding the named key: traffic is
  encrypted and the server authenticated.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.asyncio
import zmq.auth
from zmq.utils import z85

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_VERSION = b"1.0"
ZAP_DOMAIN = "diptych"
DEFAULT_NAMES = ("coordinator", "frontend", "prefill-0", "decode-0")
"""The names ``diptych keys generate`` writes unless told otherwise: the processes of ``docker-compose.yml``."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


INSECURE_WARNING = ("CURVE is off (--insecure-no-curve): internal sockets are plaintext and admit anyone who reaches "
                    "them")


def is_frontend_key(name: str | None) -> bool:
    """Whether ``name`` is a frontend's key (``frontend`` or ``frontend-<suffix>``): only these may submit, cancel
    and read the cluster status; no worker may register under such a name."""
    return name is not None and (name == "frontend" or name.startswith("frontend-"))


def load_keys(keys_dir: str | None, name: str) -> KeySet | None:
    """The key set of process ``name``, its own secret checked now so that a missing key fails at start
    (ValueError/KeyError); None, with a warning, when ``keys_dir`` is None (CURVE off)."""
    if keys_dir is None:
        log.warning(INSECURE_WARNING)
        return None
    keys = KeySet.load(keys_dir)
    keys.own(name)
    return keys


def check_name(name: str) -> str:
    """``name`` if it can name a key (letters, digits, ``_ . -``; at most 64), else ValueError."""
    if not _NAME.match(name):
        raise ValueError(f"invalid key name {name!r}: use letters, digits, '_', '.', '-' (at most 64)")
    return name


@dataclass(frozen=True)
class KeyPair:
    """One process's CURVE key pair; keys are Z85 text as bytes (40 characters)."""

    name: str
    public: bytes
    secret: bytes


class KeySet:
    """The cluster's public keys by name, read from ``DIR/public``; ``own(name)`` reads one secret from
    ``DIR/private``. Invariant: names and public keys are one-to-one."""

    def __init__(self, directory: str | Path, publics: dict[str, bytes]) -> None:
        self.directory = Path(directory)
        self._publics = dict(publics)
        self._names = {public: name for name, public in publics.items()}
        if len(self._names) != len(self._publics):
            raise ValueError(f"{self.directory}: two names share one public key")

    @classmethod
    def load(cls, directory: str | Path) -> KeySet:
        """Read ``DIR/public/*.key``; ValueError when the directory holds no key set."""
        public_dir = Path(directory) / "public"
        if not public_dir.is_dir():
            raise ValueError(f"{directory} is not a key set (no public/ directory; see 'diptych keys generate')")
        publics = {}
        for path in sorted(public_dir.glob("*.key")):
            public, _ = zmq.auth.load_certificate(path)
            publics[check_name(path.stem)] = public
        if not publics:
            raise ValueError(f"{public_dir} holds no public keys")
        return cls(directory, publics)

    def names(self) -> list[str]:
        return sorted(self._publics)

    def public_key(self, name: str) -> bytes:
        """The public key of ``name``; KeyError naming the known names when there is none."""
        try:
            return self._publics[name]
        except KeyError:
            raise KeyError(f"no key named {name!r} in {self.directory} (known: {', '.join(self.names())})") from None

    def name_of(self, public: bytes) -> str | None:
        """The name whose public key is ``public`` (Z85), None for a key outside the set."""
        return self._names.get(public)

    def own(self, name: str) -> KeyPair:
        """``name``'s key pair from ``DIR/private/<name>.key_secret``; ValueError when missing or not matching."""
        path = self.directory / "private" / f"{check_name(name)}.key_secret"
        try:
            public, secret = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the secret key of {name!r}: {exc}") from None
        if secret is None or public != self._publics.get(name):
            raise ValueError(f"{path} does not hold the secret key of public/{name}.key")
        if path.stat().st_mode & 0o077:
            log.warning("%s is readable by other users (chmod 600 it)", path)
        return KeyPair(name, public, secret)

    def server(self, name: str) -> CurveServer:
        """Options for a socket that binds, owned by the process named ``name``."""
        return CurveServer(self.own(name))

    def client(self, name: str, server_name: str) -> CurveClient:
        """Options for a socket of process ``name`` that connects to the server socket of process ``server_name``."""
        return CurveClient(self.own(name), self.public_key(server_name))


def generate_key_set(directory: str | Path, names: list[str] | tuple[str, ...] = DEFAULT_NAMES) -> KeySet:
    """Write a key pair for each of ``names`` not already in ``directory`` (existing keys are kept, so this also
    adds names to a set). Returns the whole set."""
    wanted = list(dict.fromkeys(check_name(n) for n in names))
    root = Path(directory)
    public_dir, private_dir = root / "public", root / "private"
    public_dir.mkdir(parents=True, exist_ok=True)
    private_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(private_dir, 0o700)
    for name in wanted:
        if (public_dir / f"{name}.key").exists():
            continue
        public, secret = zmq.curve_keypair()
        _write(private_dir / f"{name}.key_secret", _certificate(name, public, secret), 0o600)
        _write(public_dir / f"{name}.key", _certificate(name, public, None), 0o644)
    return KeySet.load(root)


def _certificate(name: str, public: bytes, secret: bytes | None) -> str:
    """ZeroMQ's certificate text format (``zmq.auth.load_certificate`` and czmq read it)."""
    lines = [f"#   ZeroMQ CURVE {'Secret' if secret else 'Public'} Certificate of {name} (Diptych)",
             "metadata", f'    name = "{name}"', "curve", f'    public-key = "{public.decode()}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)


@dataclass(frozen=True)
class CurveServer:
    """CURVE server options: the socket proves it holds ``key`` and asks the ZAP handler about every client."""

    key: KeyPair
    domain: str = ZAP_DOMAIN

    def apply(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.key.secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.key.public)
        sock.setsockopt(zmq.ZAP_DOMAIN, self.domain.encode())
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


@dataclass(frozen=True)
class CurveClient:
    """CURVE client options: authenticate as ``key`` to the server whose public key is ``server_public``."""

    key: KeyPair
    server_public: bytes

    def apply(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.key.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.key.secret)


SocketSecurity = CurveServer | CurveClient


class ZapAuthenticator:
    """The ZAP handler of one asyncio ZeroMQ context: admits CURVE clients whose public key is in ``keys`` (user id:
    the key's name) and refuses everything else, logging each refusal with the peer's address.

    ``start()`` (in the running loop) before any ``CurveServer`` socket binds; or, where sockets are made before the
    loop runs, ``bind()`` first and run ``serve()`` as a task later: handshakes wait in the queue meanwhile.
    ``stop()`` before the context terminates. One per context (ZeroMQ allows one handler on
    ``inproc://zeromq.zap.01``)."""

    def __init__(self, ctx: zmq.asyncio.Context, keys: KeySet, domain: str = ZAP_DOMAIN) -> None:
        self._ctx = ctx
        self._keys = keys
        self._domain = domain
        self._sock: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self.refused = 0
        """Refused handshakes so far (tests and metrics)."""

    def bind(self) -> None:
        """Take the context's ZAP endpoint (no event loop needed); idempotent."""
        if self._sock is None:
            sock = self._ctx.socket(zmq.ROUTER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(ZAP_ENDPOINT)
            self._sock = sock

    def start(self) -> None:
        """``bind()`` and answer requests in a task of the running loop."""
        self.bind()
        self._task = asyncio.get_running_loop().create_task(self.serve(), name="zap")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        """Close the ZAP socket, where ``serve`` ran as a task that its owner has already cancelled."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def __aenter__(self) -> ZapAuthenticator:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def serve(self) -> None:
        """Answer ZAP requests until cancelled (after ``bind()``)."""
        self.bind()
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart()
            try:
                reply = self._answer(frames)
            except Exception:  # a bug answering one request must not leave every later handshake hanging
                log.exception("ZAP request failed; refusing it")
                reply = [*frames[:4], b"500", b"internal error", b"", b""]
            await self._sock.send_multipart(reply)

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        """ZAP (RFC 27): [peer, b"", version, request id, domain, address, identity, mechanism, *credentials] ->
        [peer, b"", version, request id, status, status text, user id, metadata]."""
        if len(frames) < 8 or frames[2] != ZAP_VERSION:
            log.warning("malformed ZAP request refused")
            return [*frames[:2], ZAP_VERSION, frames[3] if len(frames) > 3 else b"", b"500", b"bad request", b"", b""]
        peer, empty, version, request_id, domain, address, _, mechanism, *credentials = frames
        reply = [peer, empty, version, request_id]
        name = None
        if domain.decode(errors="replace") == self._domain and mechanism == b"CURVE" and len(credentials) == 1:
            name = self._keys.name_of(z85.encode(credentials[0]))
        if name is None:
            self.refused += 1
            key = z85.encode(credentials[0]).decode() if mechanism == b"CURVE" and credentials else "-"
            log.warning("refused a %s connection from %s (key %s is not in the cluster's key set)",
                        mechanism.decode(errors="replace"), address.decode(errors="replace"), key)
            return [*reply, b"400", b"not allowed", b"", b""]
        log.debug("admitted %s from %s", name, address.decode(errors="replace"))
        return [*reply, b"200", b"OK", name.encode(), b""]
