"""Secure aggregation's arithmetic, shared by a site and the coordinator (SecAgg+ with
every chosen site as every other's neighbour; Bonawitz et al. 2017, Bell et al. 2020).

Each site turns its bounded, weighted update into integers modulo 2^64 (``quantize``)
and adds masks: one from a secret seed of its own, and one per other site from a key
the two agree on (Diffie-Hellman), added by one and subtracted by the other, so the
pairwise masks cancel in the sum. Each site also splits its seed and its key-agreement
secret into Shamir shares for the others (threshold ``threshold``), encrypted so that
only the addressee can read them. The coordinator sums the masked vectors; to remove
the masks it asks the surviving sites for shares of the survivors' seeds and of the
dropped sites' secrets, never both of one site. Fewer than ``threshold`` sites at any
stage: the round fails and nothing can be unmasked.

Key agreement, Shamir shares and authenticated encryption are Flower's primitives
(``flwr.common.secure_aggregation``); the masks expand each 32-byte key with AES-256 in
counter mode, so every mask keeps the key's full strength.
"""

from __future__ import annotations

import base64
import struct

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from fedmed import protocol

RANGE = 1024.0  # every summed value lies in [-RANGE, RANGE]: a bounded move's coordinates, a weight share
LEVELS = 2**40  # quantization levels over that range: a step of 2e-9; the sum of 2^24 sites fits in 2^64
STAGE = "secagg-stage"  # the ConfigRecord key naming a protocol message's stage
STAGES = ("keys", "shares", "train", "unmask")
RECORD = protocol.SECURE  # the record of a message that carries the protocol's fields
MASKED = protocol.MASKED  # the ArrayRecord key of a site's masked vector


def threshold(sites: int) -> int:
    """Shares needed to unmask: a majority of the sites that started the round, and at
    least 2, so that a sum is never one site's update."""
    return max(2, sites // 2 + 1)


def quantize(values: np.ndarray) -> np.ndarray:
    """Values in [-RANGE, RANGE] (clipped to it) as integers in [0, LEVELS], uint64."""
    scaled = (np.clip(values.astype(np.float64), -RANGE, RANGE) + RANGE) * (LEVELS / (2 * RANGE))
    return np.rint(scaled).astype(np.uint64)


def dequantize(total: np.ndarray, sites: int) -> np.ndarray:
    """The sum of ``sites`` quantized vectors back as the sum of their values."""
    return total.astype(np.float64) * (2 * RANGE / LEVELS) - sites * RANGE


def mask(key: bytes, size: int) -> np.ndarray:
    """A pseudo-random uint64 vector of ``size`` from a 32-byte key (AES-256-CTR)."""
    encryptor = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()
    stream = encryptor.update(b"\0" * (8 * size)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64)


def key_pair() -> tuple[bytes, bytes]:
    """A fresh elliptic-curve (secret, public) pair, as bytes."""
    secret, public = generate_key_pairs()
    return private_key_to_bytes(secret), public_key_to_bytes(public)


def agreed_key(secret: bytes, public: bytes) -> bytes:
    """The 32-byte key two sites agree on from one's secret and the other's public key."""
    return base64.urlsafe_b64decode(generate_shared_key(bytes_to_private_key(secret), bytes_to_public_key(public)))


def pairwise_sign(own: int, other: int) -> int:
    """+1 for the site with the larger node id, -1 for the other: the pair's masks cancel."""
    return 1 if own > other else -1


def split(secret: bytes, needed: int, count: int) -> list[bytes]:
    return create_shares(secret, needed, count)


def join(shares: list[bytes]) -> bytes:
    return combine_shares(shares)


def seal(key_material: bytes, sender: int, addressee: int, seed_share: bytes, secret_share: bytes) -> bytes:
    """Shares for ``addressee``, readable with the key it agrees on with ``sender``; the
    plaintext names both, so a share forwarded to the wrong site is refused."""
    plaintext = struct.pack(">QQI", sender, addressee, len(seed_share)) + seed_share + secret_share
    return encrypt(base64.urlsafe_b64encode(key_material), plaintext)


def unseal(key_material: bytes, sender: int, addressee: int, sealed: bytes) -> tuple[bytes, bytes]:
    """The (seed share, secret share) ``sender`` sealed for ``addressee``."""
    plaintext = decrypt(base64.urlsafe_b64encode(key_material), sealed)
    source, destination, length = struct.unpack(">QQI", plaintext[:20])
    if (source, destination) != (sender, addressee):
        raise ValueError(
            f"shares from node {source} for node {destination} arrived as from {sender} for {addressee}: refused"
        )
    return plaintext[20 : 20 + length], plaintext[20 + length :]


def add_masks(vector: np.ndarray, own: int, seed: bytes, pair_keys: dict[int, bytes]) -> np.ndarray:
    """``vector`` (uint64) plus the site's own mask and its pairwise masks, modulo 2^64."""
    masked = vector + mask(seed, vector.size)
    for other, key in pair_keys.items():
        pair = mask(key, vector.size)
        masked = masked + pair if pairwise_sign(own, other) > 0 else masked - pair
    return masked
