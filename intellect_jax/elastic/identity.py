"""Who is who in an elastic run: one Ed25519 key pair per island and one for the coordinator, and the operator's list
of admitted keys (the islands file). Host-side only: no jax.

A name is the one a key is listed under, never a field a peer sends: the handshake (wire.py) proves possession of
the private key, and the listener looks the proven public key up here.

Key files are OpenSSH private keys (``intellect-jax keygen --out island.key``, or ``ssh-keygen -t ed25519 -N ""``),
mode 0600. The islands file (``elastic.islands_file``) has one admitted identity per line, in the spirit of SSH's
authorized_keys::

    # NAME        KEY TYPE     PUBLIC KEY                                            COMMENT (optional)
    coordinator   ssh-ed25519  AAAAC3NzaC1lZDI1NTE5AAAAIGv1...                       run operator
    alice-h100    ssh-ed25519  AAAAC3NzaC1lZDI1NTE5AAAAIB3x...                       alice@lab, 8xH100

``coordinator`` is the coordinator's own key (islands check that they talk to it); every other line admits one
island. Admitting, rotating or revoking an island is an edit of this file on the coordinator, which re-reads it
while the run goes on (islands learn their peers' keys from the coordinator).

Shared-secret mode (``elastic.secret_file``, for local tests and demos): every identity's key is derived from the
secret and the name, so holding the secret lets anyone be anybody. Use the islands file on the internet.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import re
import threading
import time
from pathlib import Path
from typing import Callable, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

KEY_TYPE = "ssh-ed25519"
COORDINATOR = "coordinator"  # the name of the coordinator's key in the islands file
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
MAX_ROSTER_LINES = 100_000
MAX_ROSTER_BYTES = 16 << 20


class IdentityError(ValueError):
    """A key, secret or islands file that cannot be used; the message names the file, the line and the fix."""


class SecretError(IdentityError):
    """A secret file that is missing, too short or readable by others; the message says the command that fixes it."""


def valid_name(name: object) -> bool:
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


def check_name(name: object, what: str = "island name") -> str:
    if not valid_name(name):
        raise ValueError(f"{what} must be 1-64 characters of letters, digits and . _ @ + - (starting with a letter or "
                         f"digit), got {name!r:.80}")
    return name  # type: ignore[return-value]


def public_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_text(key: Ed25519PrivateKey | Ed25519PublicKey | bytes) -> str:
    """``ssh-ed25519 AAAA...``: the form of a public key in the islands file."""
    pub = Ed25519PublicKey.from_public_bytes(key) if isinstance(key, bytes) else key
    if isinstance(pub, Ed25519PrivateKey):
        pub = pub.public_key()
    return pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def fingerprint(raw: bytes) -> str:
    """``SHA256:...`` as ``ssh-keygen -l`` prints it, to name a key in logs without printing it."""
    blob = b"".join(len(p).to_bytes(4, "big") + p for p in (KEY_TYPE.encode(), raw))
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def parse_public(key_type: str, b64: str) -> bytes:
    """The raw 32 bytes of an ``ssh-ed25519 AAAA...`` public key; ValueError if it is not one."""
    if key_type != KEY_TYPE:
        raise ValueError(f"key type {key_type!r} is not supported: use {KEY_TYPE} keys (`intellect-jax keygen`)")
    try:
        pub = serialization.load_ssh_public_key(f"{key_type} {b64}".encode())
    except (ValueError, TypeError) as e:
        raise ValueError(f"not a valid {KEY_TYPE} public key ({e})") from None
    if not isinstance(pub, Ed25519PublicKey):
        raise ValueError(f"not an {KEY_TYPE} public key")
    return public_bytes(pub)


# -- private keys --------------------------------------------------------------------------------------------------


def _create_private(p: Path, data: bytes, exists: str, error: type[IdentityError]) -> None:
    """Writes `data` to a new file of mode 0600 (never over an existing one: `exists` says what to do instead)."""
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise error(f"{str(p)!r} already exists; {exists}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def read_private(path: str | os.PathLike, what: str, create: str, error: type[IdentityError] = IdentityError
                 ) -> bytes:
    """A private file's bytes; refuses a missing one (`create` says how to make it) and one that group or others may
    read."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} {str(p)!r} does not exist; {create}")
    mode = p.stat().st_mode & 0o777
    if mode & 0o077:
        raise error(f"{what} {str(p)!r} has mode {mode:04o}: group or others can read it; run `chmod 600 {p}`")
    return p.read_bytes()


def write_key(path: str | os.PathLike) -> str:
    """Writes a new Ed25519 private key (OpenSSH format, mode 0600) to a new file; returns its public key line."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                            serialization.NoEncryption())
    _create_private(Path(path), pem, "keep it (its public key is already admitted), or remove it first and admit the "
                    "new key's line in the islands file", IdentityError)
    return public_text(key)


def load_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    """Reads this process's private key; refuses a missing file, one that group or others may read, an encrypted key
    and a key that is not Ed25519, each with the command that fixes it."""
    p = Path(path)
    data = read_private(p, "key file", f"create one with `intellect-jax keygen --out {p}` and add the public key it "
                         "prints to the run's islands file", IdentityError)
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            hint = " (it is passphrase-protected: make a key without one)" if b"ENCRYPTED" in data or "password" in \
                str(e).lower() or "encrypted" in str(e).lower() else ""
            raise IdentityError(f"key file {str(p)!r} is not an unencrypted Ed25519 private key{hint}; make one with "
                                "`intellect-jax keygen --out FILE`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"key file {str(p)!r} holds a {type(key).__name__}, not an Ed25519 key; make one with "
                            "`intellect-jax keygen --out FILE`")
    return key


def derived_key(secret: bytes, name: str) -> Ed25519PrivateKey:
    """Shared-secret mode: the key of `name`, derived from the secret (anyone holding the secret can derive it)."""
    seed = hashlib.sha256(b"intellect-jax/4 identity\0" + secret + b"\0" + name.encode()).digest()
    return Ed25519PrivateKey.from_private_bytes(seed)


# -- shared-secret mode ----------------------------------------------------------------------------------------------

SECRET_BYTES = 32


def write_secret(path: str | os.PathLike) -> Path:
    """Writes SECRET_BYTES random bytes to a new file with mode 0600 (``intellect-jax secret --out FILE``)."""
    p = Path(path)
    _create_private(p, os.urandom(SECRET_BYTES), "keep it (every island needs the same secret) or remove it first "
                    "to make a new one", SecretError)
    return p


def load_secret(path: str | os.PathLike) -> bytes:
    """Reads the shared secret file. Refuses a missing one, one shorter than SECRET_BYTES (a passphrase is not a
    key) and one that group or others may read, each with the command that fixes it."""
    p = Path(path)
    data = read_private(p, "secret file", f"create one with `intellect-jax secret --out {p}` and give the same file "
                         "to every island and the coordinator", SecretError)
    if len(data) < SECRET_BYTES:
        raise SecretError(f"secret file {str(p)!r} holds {len(data)} bytes, fewer than {SECRET_BYTES} random bytes; "
                          f"make a new one with `intellect-jax secret --out NEWFILE` and give it to every island")
    return data


# -- the islands file ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Roster:
    """The admitted identities: name -> raw public key (the coordinator's under COORDINATOR)."""

    keys: dict[str, bytes]
    source: str = ""

    def name_of(self, raw: bytes) -> str | None:
        for name, k in self.keys.items():
            if k == raw:
                return name
        return None

    @property
    def islands(self) -> dict[str, bytes]:
        return {n: k for n, k in self.keys.items() if n != COORDINATOR}

    def digest(self) -> str:
        """Changes whenever an identity is admitted, revoked or re-keyed (islands re-fetch their peers' keys)."""
        h = hashlib.sha256()
        for n in sorted(self.keys):
            h.update(n.encode() + b"\0" + self.keys[n])
        return h.hexdigest()[:16]


def parse_roster(text: str, source: str = "islands file") -> Roster:
    """Parses the islands file; IdentityError names the line and what is wrong with it."""
    keys: dict[str, bytes] = {}
    seen: dict[bytes, str] = {}
    lines = text.splitlines()
    if len(lines) > MAX_ROSTER_LINES:
        raise IdentityError(f"{source}: {len(lines)} lines, more than {MAX_ROSTER_LINES}")
    for i, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 3)
        if len(parts) < 3:
            raise IdentityError(f"{source}:{i}: expected `NAME ssh-ed25519 PUBLIC_KEY [COMMENT]`, got {line[:80]!r}")
        name, ktype, b64 = parts[:3]
        if not valid_name(name):
            raise IdentityError(f"{source}:{i}: {name[:80]!r} is not a valid name (1-64 letters, digits, . _ @ + -)")
        try:
            raw = parse_public(ktype, b64)
        except ValueError as e:
            raise IdentityError(f"{source}:{i} ({name}): {e}") from None
        if name in keys:
            raise IdentityError(f"{source}:{i}: the name {name!r} is listed twice; one key per name (to rotate a key, "
                                "replace its line)")
        if raw in seen:
            raise IdentityError(f"{source}:{i}: the key of {name!r} is already listed as {seen[raw]!r}; every island "
                                "needs its own key (`intellect-jax keygen`)")
        keys[name], seen[raw] = raw, name
    return Roster(keys, source)


def load_roster(path: str | os.PathLike) -> Roster:
    p = Path(path)
    if not p.is_file():
        raise IdentityError(f"islands file {str(p)!r} does not exist; list the admitted islands there, one "
                            "`NAME ssh-ed25519 PUBLIC_KEY` line each (the coordinator's under the name "
                            f"{COORDINATOR!r})")
    if p.stat().st_size > MAX_ROSTER_BYTES:
        raise IdentityError(f"islands file {str(p)!r} is larger than {MAX_ROSTER_BYTES} bytes")
    return parse_roster(p.read_text(errors="replace"), str(p))


class RosterFile:
    """An islands file that is re-read when it changes (its mtime, size or inode): ``current()`` is always the last
    version that parsed; a version that does not parse is logged by the caller and the previous one kept."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._stamp = self._stat()
        self._roster = load_roster(self.path)
        self._lock = threading.Lock()

    def _stat(self) -> tuple:
        try:
            st = self.path.stat()
        except OSError:
            return ()
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def current(self) -> Roster:
        return self._roster

    def reload(self) -> tuple[Roster, Roster] | None:
        """(old, new) when the file changed and parses; None when unchanged; IdentityError when it no longer
        parses (the old roster stays in force)."""
        with self._lock:
            stamp = self._stat()
            if stamp == self._stamp:
                return None
            self._stamp = stamp
            new = load_roster(self.path)
            old, self._roster = self._roster, new
            return old, new


# -- what the handshake asks: whose key is this, and what key should this name have ------------------------------


class Keys(Protocol):
    def identify(self, raw: bytes, claimed: str | None) -> str | None:
        """The admitted name of the public key `raw` (None: not admitted). `claimed` is the name the peer says it
        has: only shared-secret mode needs it (it derives that name's key and compares)."""

    def public(self, name: str) -> bytes | None:
        """The public key `name` must prove it holds (None: unknown)."""


class RosterKeys:
    """Keys of an islands file (re-read when it changes, through `RosterFile`), plus keys learned from the
    coordinator (islands: their peers' keys come from the coordinator's replies). An unknown key may call `refresh`
    (an island asks the coordinator for the admitted keys), at most every REFRESH_S."""

    REFRESH_S = 2.0
    MAX_LEARNED = 65536

    def __init__(self, roster: RosterFile | Roster):
        self._file = roster if isinstance(roster, RosterFile) else None
        self._fixed = roster if isinstance(roster, Roster) else None
        self._learned: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self.refresh: Callable[[], None] | None = None
        self._refreshed = -1e18

    def roster(self) -> Roster:
        return self._file.current() if self._file is not None else self._fixed  # type: ignore[return-value]

    def learn(self, keys: dict[str, bytes], replace: bool = False) -> None:
        """Adds (or with `replace`, replaces) the peer keys the coordinator vouches for."""
        with self._lock:
            if replace or len(self._learned) + len(keys) > self.MAX_LEARNED:
                self._learned = {}
            self._learned.update(keys)

    def _lookup(self, raw: bytes) -> str | None:
        name = self.roster().name_of(raw)
        if name is not None:
            return name
        with self._lock:
            for n, k in self._learned.items():
                if k == raw:
                    return n
        return None

    def identify(self, raw: bytes, claimed: str | None) -> str | None:
        name = self._lookup(raw)
        if name is None and self.refresh is not None:
            now = time.monotonic()
            with self._lock:
                due = now - self._refreshed >= self.REFRESH_S
                if due:
                    self._refreshed = now
            if due:
                self.refresh()
                name = self._lookup(raw)
        return name

    def public(self, name: str) -> bytes | None:
        k = self.roster().keys.get(name)
        if k is not None:
            return k
        with self._lock:
            return self._learned.get(name)


class SecretKeys:
    """Shared-secret mode: every name's key derives from the secret (anyone with the secret can be anybody)."""

    def __init__(self, secret: bytes):
        self._secret = secret
        self._cache: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def private(self, name: str) -> Ed25519PrivateKey:
        return derived_key(self._secret, name)

    def public(self, name: str) -> bytes | None:
        if not valid_name(name):
            return None
        with self._lock:
            k = self._cache.get(name)
        if k is None:
            k = public_bytes(derived_key(self._secret, name))
            with self._lock:
                if len(self._cache) > 4096:
                    self._cache.clear()
                self._cache[name] = k
        return k

    def identify(self, raw: bytes, claimed: str | None) -> str | None:
        if claimed is None or not valid_name(claimed):
            return None
        return claimed if self.public(claimed) == raw else None

    def learn(self, keys: dict[str, bytes], replace: bool = False) -> None:  # derived keys need no learning
        pass


@dataclasses.dataclass(frozen=True)
class Identity:
    """This process: its name and private key."""

    name: str
    key: Ed25519PrivateKey

    @property
    def public(self) -> bytes:
        return public_bytes(self.key)


@dataclasses.dataclass(frozen=True)
class Auth:
    """What the handshake needs: who this process is, and how to check who the other side is."""

    me: Identity
    keys: RosterKeys | SecretKeys

    @property
    def mode(self) -> str:
        return "secret" if isinstance(self.keys, SecretKeys) else "keys"


def secret_auth(secret: bytes, name: str) -> Auth:
    """Shared-secret mode (tests, demos): `name`'s key derived from the secret."""
    keys = SecretKeys(secret)
    return Auth(Identity(check_name(name), keys.private(name)), keys)


def key_auth(key_file: str, islands_file: str, name: str | None = None, coordinator: bool = False) -> Auth:
    """This process's key and the islands file. The coordinator's key must be the file's COORDINATOR line; an
    island's name is `name` (``elastic.island_name``) or, when None, the name the file lists its key under."""
    key = load_key(key_file)
    roster = RosterFile(islands_file)
    listed = roster.current().name_of(public_bytes(key))
    if COORDINATOR not in roster.current().keys:
        raise IdentityError(f"islands file {islands_file!r} has no {COORDINATOR!r} line: add the coordinator's public "
                            f"key (`{COORDINATOR} ssh-ed25519 ...`, printed by `intellect-jax keygen` for the "
                            "coordinator) so that islands can check whom they talk to")
    if coordinator:
        if listed != COORDINATOR:
            raise IdentityError(f"the key in {key_file!r} ({fingerprint(public_bytes(key))}) is not the one the "
                                f"islands file {islands_file!r} lists as {COORDINATOR!r}; put its public key "
                                f"`{public_text(key)}` on the {COORDINATOR!r} line")
        name = COORDINATOR
    else:
        if listed == COORDINATOR or name == COORDINATOR:
            raise IdentityError(f"{COORDINATOR!r} is the coordinator's name and key; give this island its own key "
                                "(`intellect-jax keygen`) and name")
        if name is None or name == "":
            if listed is None:
                raise IdentityError(f"the key in {key_file!r} ({fingerprint(public_bytes(key))}) is not in this "
                                    f"island's copy of {islands_file!r}: set elastic.island_name to the name the run's "
                                    f"operator admitted it under, or add its line `NAME {public_text(key)}`")
            name = listed
        elif listed is not None and listed != name:
            raise IdentityError(f"the key in {key_file!r} is listed as {listed!r} in {islands_file!r}, but "
                                f"elastic.island_name is {name!r}; use the name the key is listed under")
    return Auth(Identity(check_name(name), key), RosterKeys(roster))
