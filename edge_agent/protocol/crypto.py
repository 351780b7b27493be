"""Ed25519 identities (PyNaCl). A device id is bound to its public key in the genesis."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from nacl.exceptions import BadSignatureError, CryptoError
from nacl.signing import SigningKey, VerifyKey


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class KeyPair:
    """A device's (or the operator's) signing key."""

    def __init__(self, signing_key: SigningKey):
        self._sk = signing_key
        self.public_hex = signing_key.verify_key.encode().hex()

    @classmethod
    def generate(cls) -> "KeyPair":
        return cls(SigningKey.generate())

    @classmethod
    def from_seed_hex(cls, seed_hex: str) -> "KeyPair":
        return cls(SigningKey(bytes.fromhex(seed_hex.strip())))

    @classmethod
    def load(cls, path: str | Path) -> "KeyPair":
        """Read a key file: 64 hex characters, the Ed25519 seed."""
        try:
            return cls.from_seed_hex(Path(path).read_text().strip())
        except (ValueError, CryptoError) as exc:  # (UnicodeDecodeError is a ValueError)
            raise ValueError(f"{path}: not an Ed25519 key file (64 hex characters)") from exc

    def save(self, path: str | Path) -> None:
        """Write the seed with owner-only permissions."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self._sk.encode().hex() + "\n")

    def sign(self, data: bytes) -> str:
        return self._sk.sign(data).signature.hex()


def verify(public_hex: str, data: bytes, signature_hex: str) -> bool:
    try:
        VerifyKey(bytes.fromhex(public_hex)).verify(data, bytes.fromhex(signature_hex))
        return True
    except (BadSignatureError, CryptoError, ValueError, TypeError):
        return False


def fingerprint(public_hex: str) -> str:
    """Short human-readable key fingerprint for logs and prompts."""
    return sha256_hex(bytes.fromhex(public_hex))[:16]
