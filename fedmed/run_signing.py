"""Run settings signed by the coordinator, checked by every site before it does any work.

A SuperNode serves whatever run the SuperLink hands it, so the SuperLink alone cannot
tell a site which runs are its federation's. fedmed's answer is a key pair that belongs
to the coordinator: ``fedmed-server`` signs each run's settings (Flower's run config, the
same for every site) with its private key, and a site that pinned the public key
(``site.coordinator_key``) serves only runs whose settings carry a valid signature by it,
and, when it names one, only runs of its ``site.federation_name``. Anyone else who gets a run
onto the SuperLink, or changes a setting on the way, has a run the site refuses before it
reads a byte of its data or spends any budget.

What is signed is the run's settings in a canonical form (``RunSettings.to_flower``, keys
sorted, without the signature itself), so the bytes do not depend on how Flower carried
the values. The keys are Ed25519 (``cryptography``), stored as PEM.
"""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedmed.config import RunSettings
from fedmed.files import write_atomic

PRIVATE_KEY, PUBLIC_KEY = "coordinator.key", "coordinator.pub"


_HINT = {
    what: f"give the coordinator's {name} (a key pair is made by `fedmed certificates coordinator-key`)"
    for what, name in (("public", PUBLIC_KEY), ("private", PRIVATE_KEY))
}


class RunRefused(Exception):
    """A site does not serve this run: it is not signed by the coordinator the site pinned,
    or not of the site's federation. Nothing was read or spent."""


def make_coordinator_key(out_dir: Path) -> tuple[Path, Path]:
    """A new signing key pair: ``coordinator.key`` stays with the coordinator (owner-only),
    ``coordinator.pub`` goes to every site."""
    key = Ed25519PrivateKey.generate()
    out_dir.mkdir(parents=True, exist_ok=True)
    private, public = out_dir / PRIVATE_KEY, out_dir / PUBLIC_KEY
    write_atomic(
        private,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )  # created 0600
    write_atomic(
        public,
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
    )
    public.chmod(0o644)
    return private, public


def signed_payload(run: RunSettings) -> bytes:
    """The bytes a run's signature covers: every setting but the signature, canonically."""
    settings = {k: v for k, v in run.to_flower().items() if k != "run-signature"}
    return json.dumps(settings, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def sign_run(run: RunSettings, private_key: Path) -> RunSettings:
    """``run`` carrying the coordinator's signature of its settings."""
    key = _load(private_key, serialization.load_pem_private_key, Ed25519PrivateKey, "private")
    signature = key.sign(signed_payload(run))
    return replace(run, run_signature=base64.b64encode(signature).decode("ascii"))


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The coordinator's public signing key; ValueError naming the file if it is not one."""
    return _load(path, serialization.load_pem_public_key, Ed25519PublicKey, "public")


def check_run(run: RunSettings, public_key: Path, federation: str = "") -> None:
    """Raise ``RunRefused`` unless ``run`` is signed with the key in ``public_key`` and,
    when ``federation`` is given, belongs to it."""
    key = load_public_key(public_key)
    if not run.run_signature:
        raise RunRefused(
            f"run {run.run_id or '(no id)'} carries no coordinator signature; this site serves only "
            f"runs signed with the key in {public_key}"
        )
    try:
        key.verify(base64.b64decode(run.run_signature, validate=True), signed_payload(run))
    except (InvalidSignature, ValueError):
        raise RunRefused(
            f"run {run.run_id or '(no id)'} is not signed by the coordinator whose key is in "
            f"{public_key} (another coordinator, or settings changed after signing)"
        ) from None
    if federation and run.federation_name != federation:
        raise RunRefused(
            f"run {run.run_id} belongs to federation {run.federation_name!r}; this site serves only "
            f"{federation!r} (site.federation_name)"
        )


def _load(path: Path, loader, kind: type, what: str):
    """The Ed25519 key in a PEM file, with an error that names the file."""
    try:
        data = Path(path).read_bytes()
        key = loader(data, None) if what == "private" else loader(data)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"cannot read the coordinator's {what} signing key {path} ({error}); {_HINT[what]}") from error
    if not isinstance(key, kind):
        raise ValueError(f"{path} is not an Ed25519 {what} key; {_HINT[what]}")
    return key
