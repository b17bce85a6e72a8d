"""Identities for the elastic tests: in-memory key pairs and rosters, and key files + an islands file on disk."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from intellect_jax.elastic import identity
from intellect_jax.elastic.identity import COORDINATOR, Auth, Identity, Roster, RosterKeys


class Keyring:
    """A key per name (the coordinator's included) and the roster that admits them, in memory."""

    def __init__(self, names=("a", "b", "c", "d")):
        self.keys = {n: Ed25519PrivateKey.generate() for n in (COORDINATOR, *names)}

    @property
    def roster(self) -> Roster:
        return Roster({n: identity.public_bytes(k) for n, k in self.keys.items()}, "test roster")

    def auth(self, name: str, roster: Roster | None = None) -> Auth:
        """`name`'s identity, checking others against `roster` (default: everyone here)."""
        if name not in self.keys:
            self.keys[name] = Ed25519PrivateKey.generate()
        return Auth(Identity(name, self.keys[name]), RosterKeys(roster or self.roster))


def write_roster(tmp: Path, names, extra: str = "") -> tuple[Path, dict[str, Path]]:
    """Key files for the coordinator and every name, and the islands file listing them (plus `extra` lines);
    returns (islands file, name -> key file)."""
    files, lines = {}, ["# test run: NAME ssh-ed25519 KEY"]
    for n in (COORDINATOR, *names):
        files[n] = tmp / f"{n}.key"
        if not files[n].exists():
            identity.write_key(files[n])
        lines.append(f"{n} {identity.public_text(identity.load_key(files[n]))}")
    path = tmp / "islands"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path, files
