"""Node identities: Ed25519 keys, node ids derived from public keys, signatures.

A node creates its key on first run and keeps it in its state dir (``identity.key``, mode
0600); its node id is the first 16 bytes of SHA-256 of the raw public key, in hex, so anyone
holding the public key can check the id. :func:`verify` raises
:class:`~swarm.errors.AuthError` with a message that says what to do.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from swarm.errors import AuthError, ConfigError

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
NODE_ID_HEX_CHARS = 32
KEY_FILE = "identity.key"


def node_id_for(public_key: bytes) -> str:
    """The node id of a raw Ed25519 public key."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise AuthError(f"public key must be {PUBLIC_KEY_BYTES} raw bytes, got {len(public_key)}")
    return hashlib.sha256(public_key).hexdigest()[:NODE_ID_HEX_CHARS]


def is_node_id(text: str) -> bool:
    return (
        isinstance(text, str)
        and len(text) == NODE_ID_HEX_CHARS
        and all(c in "0123456789abcdef" for c in text)
    )


@dataclass(frozen=True, slots=True)
class Identity:
    """A node's key pair. ``sign`` signs bytes; ``public_key`` is raw (32 bytes)."""

    private_key: Ed25519PrivateKey

    @property
    def public_key(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def node_id(self) -> str:
        return node_id_for(self.public_key)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    @classmethod
    def generate(cls) -> "Identity":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> "Identity":
        """Deterministic key from 32 seed bytes (tests)."""
        return cls(Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed).digest()))

    @classmethod
    def load_or_create(cls, state_dir: Path) -> "Identity":
        """Load ``state_dir/identity.key`` or create it (0600) on first run."""
        path = Path(state_dir) / KEY_FILE
        if path.exists():
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{path} is not a valid identity key ({exc}); move it away to create a new identity") from exc
            if not isinstance(key, Ed25519PrivateKey):
                raise ConfigError(f"{path} is not an Ed25519 key; move it away to create a new identity")
            return cls(key)
        ident = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = ident.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        os.replace(tmp, path)
        return ident


def verify(public_key: bytes, signature: bytes, data: bytes) -> str:
    """Check ``signature`` over ``data``; return the signer's node id. Raises AuthError."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise AuthError(f"public key must be {PUBLIC_KEY_BYTES} raw bytes, got {len(public_key)}; upgrade the node")
    if len(signature) != SIGNATURE_BYTES:
        raise AuthError(f"signature must be {SIGNATURE_BYTES} bytes, got {len(signature)}; upgrade the node")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError) as exc:
        raise AuthError("bad signature on the registration; the node's identity key does not match what it sent") from exc
    return node_id_for(public_key)
