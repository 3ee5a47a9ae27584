"""Owns the keys of the model package format: the key id a manifest names its signer by, public
key text (PEM or base64), the publisher's private key file, and the trusted keys whose
signatures an appliance accepts (docs/model-packages.md).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

KEY_ID_PATTERN = r"^[0-9a-f]{16}$"


class PackageKeyError(ValueError):
    """A key (trusted public key or publisher's private key) that cannot be used."""


def key_id(public_key: Ed25519PublicKey) -> str:
    """The short fingerprint a manifest names its signing key by: 16 hex digits of the sha256 of
    the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_text(public_key: Ed25519PublicKey) -> str:
    """The public key as base64 of its 32 raw bytes (what `trusted_keys` takes)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def parse_public_key(text: str) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM (`BEGIN PUBLIC KEY`) or base64 of its 32 raw bytes."""
    stripped = text.strip()
    if stripped.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(stripped.encode())
        except ValueError as exc:
            raise PackageKeyError(f"not a readable PEM public key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise PackageKeyError(f"a {type(key).__name__}, not an Ed25519 public key")
        return key
    try:
        raw = base64.b64decode(stripped, validate=True)
    except binascii.Error:
        raise PackageKeyError("neither a PEM public key nor base64") from None
    if len(raw) != 32:
        raise PackageKeyError(f"base64 of {len(raw)} bytes; an Ed25519 public key has 32")
    return Ed25519PublicKey.from_public_bytes(raw)


def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def write_private_key(path: Path, private_key: Ed25519PrivateKey) -> None:
    """The key as unencrypted PKCS#8 PEM in a new file readable by its owner only (0600); an
    existing file is never overwritten (it may be the only copy of another key)."""
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
        handle.flush()
        os.fsync(handle.fileno())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The publisher's Ed25519 private key from a PEM file (as `models keygen` writes it)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PackageKeyError(f"{path}: cannot read the key ({exc.strerror or exc})") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise PackageKeyError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise PackageKeyError(f"{path}: a {type(key).__name__}, not an Ed25519 private key")
    return key


@dataclass(frozen=True, slots=True)
class TrustedKey:
    label: str
    key_id: str
    public_key: Ed25519PublicKey

    def describe(self) -> str:
        return self.key_id if self.label == self.key_id else f"{self.label} ({self.key_id})"


class TrustedKeys:
    """The public keys whose signatures this appliance accepts, by key id."""

    def __init__(self, keys: Iterable[TrustedKey] = ()) -> None:
        self._by_id = {key.key_id: key for key in keys}

    @classmethod
    def parse(cls, entries: Mapping[str, str]) -> TrustedKeys:
        """From config `trusted_keys` (label or key id -> key text); a bad entry names its label."""
        keys = []
        for label, text in entries.items():
            try:
                public_key = parse_public_key(text)
            except PackageKeyError as exc:
                raise PackageKeyError(f"trusted key {label!r}: {exc}") from None
            fingerprint = key_id(public_key)
            if re.fullmatch(KEY_ID_PATTERN, label) and label != fingerprint:
                raise PackageKeyError(
                    f"trusted key {label!r} is labelled like a key id, but the key's id is "
                    f"{fingerprint}"
                )
            keys.append(TrustedKey(label, fingerprint, public_key))
        return cls(keys)

    def get(self, key_id: str) -> TrustedKey | None:
        return self._by_id.get(key_id)

    def verifying(self, data: bytes, signature: bytes) -> TrustedKey | None:
        """The trusted key that made `signature` over `data`, if any."""
        for key in self._by_id.values():
            try:
                key.public_key.verify(signature, data)
            except InvalidSignature:
                continue
            return key
        return None

    def describe(self) -> str:
        if not self._by_id:
            return "none (add model_packages.trusted_keys to the config)"
        return ", ".join(key.describe() for key in self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)
