"""Sector encryption of qcow and qcow2 images: qcow AES (crypt_method 1) and LUKS1 (method 2).

Both kinds encrypt whole 512-byte sectors, each with its own IV derived from a sector number.
The caller chooses that number: the **guest** offset / 512 for AES, the **host** offset / 512
for LUKS inside qcow2. A :class:`SectorCipher` takes any run of whole sectors and the number of
the first one, and does the work in a handful of calls into ``cryptography`` per run: one
``Cipher`` object per key, and Python work per sector at most (CBC encryption), never per byte.

- :func:`qcow_aes_cipher` gives the AES-128-CBC cipher of qcow v1 and qcow2 crypt_method 1.
- :func:`luks_unlock` tries the passphrase on each active LUKS1 key slot (PBKDF2, key material
  decryption, anti-forensic merge, master key digest) and gives the data cipher.
- :func:`sector_cipher` builds a cipher from LUKS names ("aes", "xts-plain64") and a key.

Supported: ciphers aes (128/192/256, and 256/384/512-bit keys for XTS), cast5 (128) and sm4;
modes xts, cbc, ecb and ctr; IV generators plain, plain64 and essiv:HASH; hashes md5, sha1,
sha224, sha256, sha384, sha512 and ripemd160 (when hashlib's OpenSSL offers it). twofish and
serpent, which qemu-img also writes, are refused with :class:`UnsupportedCipherError`: the
``cryptography`` package has neither.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sys
import time
import uuid
from abc import ABC, abstractmethod
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Final, Protocol

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.decrepit.ciphers.algorithms import CAST5
from cryptography.hazmat.primitives.ciphers import BlockCipherAlgorithm, Cipher, algorithms, modes

from .errors import FormatError
from .generated import qcow2 as _q

if TYPE_CHECKING:
    from .generated.qcow2 import LuksHeader

__all__ = [
    "LUKS_STRIPES",
    "SECTOR_SIZE",
    "CryptoError",
    "InvalidPasswordError",
    "LuksHeaderError",
    "LuksParams",
    "SectorCipher",
    "UnsupportedCipherError",
    "af_merge",
    "af_split",
    "luks_cipher",
    "luks_format",
    "luks_master_key",
    "luks_unlock",
    "qcow_aes_cipher",
    "sector_cipher",
]

SECTOR_SIZE: Final = 512
"""Both AES and LUKS encrypt 512-byte sectors, whatever the cluster size."""

LUKS_STRIPES: Final = 4000
"""Anti-forensic stripes of every LUKS1 key slot; qemu refuses any other count."""

_SECTOR_WORDS: Final = SECTOR_SIZE // 8
if array("Q").itemsize != 8:  # pragma: no cover - every CPython platform has 8-byte "Q"
    raise ImportError("diskspec.crypto needs 8-byte array('Q') items")
_U64: Final = (1 << 64) - 1
_U32: Final = (1 << 32) - 1
_LUKS_HEADER_SECTORS: Final = 4096 // SECTOR_SIZE  # qemu: key material starts after 4 KiB
_LUKS_SLOT_ACTIVE: Final = int(_q.LuksKeySlotState.ACTIVE)  # from the spec
_LUKS_SLOT_DISABLED: Final = int(_q.LuksKeySlotState.DISABLED)
_LUKS_DIGEST_SIZE: Final = 20
_LUKS_HASHES: Final = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160")


class CryptoError(FormatError):
    """The encryption metadata of an image cannot be used."""


class UnsupportedCipherError(CryptoError):
    """The image names a cipher, mode, IV generator, hash or key size this module cannot do."""


class LuksHeaderError(CryptoError):
    """The LUKS header or its key material is corrupt (qemu refuses it too)."""


class InvalidPasswordError(CryptoError):
    """The passphrase opens no active key slot."""

    def __init__(self, message: str = "Invalid password, cannot unlock any keyslot") -> None:
        super().__init__(message)


# --------------------------------------------------------------------------------------------
# Helpers on whole buffers: no per-byte Python work anywhere.


def _words(data: bytes | bytearray | memoryview) -> array[int]:
    """The buffer as 64-bit words in memory order (moving words never changes byte order)."""
    out = array("Q")
    out.frombytes(data)
    return out


def _zeros(size: int) -> array[int]:
    """``size`` zero bytes as 64-bit words."""
    return array("Q", [0]) * (size // 8)


def _xor(a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview) -> bytes:
    """Bytewise a XOR b, equal lengths, through two big integers."""
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


@lru_cache(maxsize=16)
def _lane_masks(lanes: int) -> tuple[int, int]:
    """(bit 0 of every 128-bit lane, every other bit) for ``lanes`` lanes in one integer."""
    low = int.from_bytes((b"\x01" + bytes(15)) * lanes, "little")
    return low, ((1 << (128 * lanes)) - 1) ^ low


@lru_cache(maxsize=2)
def _ctr_steps(block_words: int, sectors: int) -> int:
    """0, 1, 2, ... for the blocks of each sector, as big-endian lanes of a guard word and a
    block of ``block_words`` words."""
    blocks = SECTOR_SIZE // (8 * block_words)
    per_sector = b"".join(j.to_bytes(8 * (block_words + 1), "big") for j in range(blocks))
    return int.from_bytes(per_sector * sectors, "big")


def _sector_numbers(sector: int, count: int, width: int) -> array[int]:
    """Sector numbers sector .. sector+count-1 modulo 2**width as little-endian 64-bit words."""
    if width == 64:
        values: array[int] = array("Q", range(sector, sector + count))
    else:
        start = sector & _U32
        if start + count <= 1 << 32:
            values = array("Q", range(start, start + count))
        else:
            values = array("Q", range(start, 1 << 32))
            values.extend(range(start + count - (1 << 32)))
    if sys.byteorder == "big":
        values.byteswap()
    return values


# --------------------------------------------------------------------------------------------
# Block ciphers and IV generators.

_KEY_SIZES: Final[dict[str, tuple[int, ...]]] = {
    "aes": (16, 24, 32),
    "cast5": (16,),
    "sm4": (16,),
}
_MISSING: Final[dict[str, str]] = {
    "twofish": "Twofish",
    "serpent": "Serpent",
}


def _check_family(family: str) -> None:
    if family in _MISSING:
        raise UnsupportedCipherError(
            f"cipher {family!r} is not supported: the cryptography package has no "
            f"{_MISSING[family]} implementation"
        )
    if family not in _KEY_SIZES:
        raise UnsupportedCipherError(f"unknown cipher {family!r}")


def _algorithm(family: str, key: bytes) -> BlockCipherAlgorithm:
    _check_family(family)
    sizes = _KEY_SIZES[family]
    if len(key) not in sizes:
        bits = ", ".join(str(8 * s) for s in sizes)
        raise UnsupportedCipherError(
            f"cipher {family!r} takes {bits}-bit keys, not {8 * len(key)}-bit"
        )
    if family == "aes":
        return algorithms.AES(key)
    if family == "sm4":
        return algorithms.SM4(key)
    return CAST5(key)


class _Block:
    """One key of a block cipher: raw (ECB) block encryption, and CBC with a zero IV."""

    __slots__ = ("_cbc", "_ecb", "block_size")

    def __init__(self, family: str, key: bytes) -> None:
        alg = _algorithm(family, key)
        self.block_size: int = alg.block_size // 8
        try:
            self._ecb = Cipher(alg, modes.ECB())
            self._cbc = Cipher(alg, modes.CBC(bytes(self.block_size)))
            self._ecb.encryptor()
        except UnsupportedAlgorithm as exc:
            raise UnsupportedCipherError(
                f"cipher {family!r} is not available in this OpenSSL ({exc})"
            ) from exc

    def encrypt_blocks(self, data: bytes | bytearray | memoryview) -> bytes:
        return self._ecb.encryptor().update(data)

    def decrypt_blocks(self, data: bytes | bytearray | memoryview) -> bytes:
        return self._ecb.decryptor().update(data)

    def cbc_encryptor(self) -> Callable[[bytes], bytes]:
        """A CBC chain started with a zero IV; each call continues the chain."""
        return self._cbc.encryptor().update

    def cbc_decrypt(self, data: bytes | bytearray | memoryview) -> bytes:
        """CBC decryption of the whole buffer as one chain started with a zero IV."""
        return self._cbc.decryptor().update(data)


class _IvGen(ABC):
    """Makes the IV (tweak, initial counter) block of each sector of a run."""

    __slots__ = ("block_size", "name")

    def __init__(self, name: str, block_size: int) -> None:
        self.name = name
        self.block_size = block_size

    @abstractmethod
    def ivs(self, sector: int, count: int) -> bytes:
        """``count`` IV blocks, for sectors sector .. sector+count-1, concatenated."""


class _PlainIv(_IvGen):
    """plain64: little-endian u64 sector number, zero padded; plain: the same modulo 2**32."""

    __slots__ = ("_width",)

    def __init__(self, name: str, block_size: int, width: int) -> None:
        super().__init__(name, block_size)
        self._width = width

    def ivs(self, sector: int, count: int) -> bytes:
        numbers = _sector_numbers(sector, count, self._width)
        per_block = self.block_size // 8
        if per_block == 1:
            return numbers.tobytes()
        out = _zeros(count * self.block_size)
        out[0::per_block] = numbers
        return out.tobytes()


class _EssivIv(_IvGen):
    """essiv:HASH: the plain64 block encrypted under HASH(key) with the same cipher family."""

    __slots__ = ("_block", "_plain")

    def __init__(self, name: str, family: str, key: bytes, hash_name: str) -> None:
        salt = hashlib.new(_check_hash(hash_name), key).digest()
        try:
            block = _Block(family, salt)
        except UnsupportedCipherError as exc:
            raise UnsupportedCipherError(
                f"essiv with {hash_name} gives a {8 * len(salt)}-bit {family} key: {exc}"
            ) from exc
        super().__init__(name, block.block_size)
        self._block = block
        self._plain = _PlainIv("plain64", block.block_size, 64)

    def ivs(self, sector: int, count: int) -> bytes:
        return self._block.encrypt_blocks(self._plain.ivs(sector, count))


def _check_hash(name: str) -> str:
    """A hash name as hashlib spells it, or UnsupportedCipherError."""
    if name not in _LUKS_HASHES:
        raise UnsupportedCipherError(f"unknown hash {name!r}")
    try:
        hashlib.new(name)
    except ValueError as exc:
        raise UnsupportedCipherError(f"hash {name!r} is not available in hashlib ({exc})") from exc
    return name


# --------------------------------------------------------------------------------------------
# Sector ciphers.


class SectorCipher(ABC):
    """Encrypts and decrypts runs of whole 512-byte sectors, each with its own IV.

    ``sector`` is the IV sector number of the first sector of ``data``; the following sectors
    get sector + 1, sector + 2, ... The object holds no per-call state, so one instance may
    serve several threads.
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name
        """The cipher in LUKS spelling with its key size, e.g. "aes-256-xts-plain64"."""

    def decrypt(self, data: bytes | bytearray | memoryview, sector: int) -> bytes:
        """Plaintext of the whole sectors ``data``, whose first sector has IV number ``sector``."""
        raw = data if type(data) is bytes else bytes(data)
        count = _check_run(raw, sector)
        return self._decrypt(raw, sector, count) if count else b""

    def encrypt(self, data: bytes | bytearray | memoryview, sector: int) -> bytes:
        """Ciphertext of the whole sectors ``data``, whose first sector has IV number ``sector``."""
        raw = data if type(data) is bytes else bytes(data)
        count = _check_run(raw, sector)
        return self._encrypt(raw, sector, count) if count else b""

    @abstractmethod
    def _decrypt(self, data: bytes, sector: int, count: int) -> bytes:
        """Decrypt ``count`` sectors (checked: whole sectors, numbers within u64)."""

    @abstractmethod
    def _encrypt(self, data: bytes, sector: int, count: int) -> bytes:
        """Encrypt ``count`` sectors (checked: whole sectors, numbers within u64)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


def _check_run(data: bytes, sector: int) -> int:
    size = len(data)
    if size % SECTOR_SIZE:
        raise ValueError(f"encrypted I/O needs whole 512-byte sectors, got {size} bytes")
    count = size // SECTOR_SIZE
    if sector < 0 or sector + count - 1 > _U64:
        raise ValueError(f"sector numbers {sector}..{sector + count - 1} do not fit in 64 bits")
    return count


class _EcbSectors(SectorCipher):
    """ECB: every block on its own, the IV generator is ignored (as qemu does)."""

    __slots__ = ("_block",)

    def __init__(self, name: str, block: _Block) -> None:
        super().__init__(name)
        self._block = block

    def _decrypt(self, data: bytes, sector: int, count: int) -> bytes:
        return self._block.decrypt_blocks(data)

    def _encrypt(self, data: bytes, sector: int, count: int) -> bytes:
        return self._block.encrypt_blocks(data)


class _CbcSectors(SectorCipher):
    """CBC restarted at every sector with that sector's IV."""

    __slots__ = ("_block", "_ivgen")

    def __init__(self, name: str, block: _Block, ivgen: _IvGen) -> None:
        super().__init__(name)
        self._block = block
        self._ivgen = ivgen

    def _decrypt(self, data: bytes, sector: int, count: int) -> bytes:
        # Decrypt the run as one CBC chain from a zero IV. Every block comes out right except
        # the first of each sector, which was XORed with the previous ciphertext block (zero
        # for the first sector) instead of the sector's IV: XOR that back out and the IV in.
        bs = self._block.block_size
        per_block = bs // 8
        plain = _words(self._block.cbc_decrypt(data))
        cipher = _words(data)
        first = _zeros(count * bs)
        chained = _zeros(count * bs)
        for w in range(per_block):
            first[w::per_block] = plain[w::_SECTOR_WORDS]
            chained[per_block + w :: per_block] = cipher[
                _SECTOR_WORDS - per_block + w :: _SECTOR_WORDS
            ][: count - 1]
        fixed = int.from_bytes(first.tobytes(), "little")
        fixed ^= int.from_bytes(chained.tobytes(), "little")
        fixed ^= int.from_bytes(self._ivgen.ivs(sector, count), "little")
        fixed_words = _words(fixed.to_bytes(count * bs, "little"))
        for w in range(per_block):
            plain[w::_SECTOR_WORDS] = fixed_words[w::per_block]
        return plain.tobytes()

    def _encrypt(self, data: bytes, sector: int, count: int) -> bytes:
        # CBC encryption is serial inside a sector. Run one chain through the whole run and
        # make each sector start from its IV by pre-XORing its first plaintext block with
        # (IV XOR the chaining value the context will apply, the last ciphertext block).
        bs = self._block.block_size
        update = self._block.cbc_encryptor()
        ivs = self._ivgen.ivs(sector, count)
        view = memoryview(data)  # slices without copies
        previous = 0
        out = []
        for s in range(count):
            at = s * SECTOR_SIZE
            head = int.from_bytes(view[at : at + bs], "little")
            head ^= int.from_bytes(ivs[s * bs : (s + 1) * bs], "little") ^ previous
            sealed = update(head.to_bytes(bs, "little") + view[at + bs : at + SECTOR_SIZE])
            previous = int.from_bytes(sealed[-bs:], "little")
            out.append(sealed)
        return b"".join(out)


class _XtsSectors(SectorCipher):
    """XTS (IEEE 1619) with one data unit per sector and the IV block as the tweak."""

    __slots__ = ("_data", "_ivgen", "_tweak")

    def __init__(self, name: str, data: _Block, tweak: _Block, ivgen: _IvGen) -> None:
        super().__init__(name)
        self._data = data
        self._tweak = tweak
        self._ivgen = ivgen

    def _tweaks(self, sector: int, count: int) -> int:
        # T(s, 0) = E_k2(IV(s)); T(s, j+1) = T(s, j) * x in GF(2^128), little-endian bytes.
        # All sectors' tweaks of one block index sit in one integer as 128-bit lanes, so each
        # doubling is a few big-integer operations; the lanes are then spread to their blocks.
        low, rest = _lane_masks(count)
        lanes = int.from_bytes(self._tweak.encrypt_blocks(self._ivgen.ivs(sector, count)), "little")
        stream = _zeros(count * SECTOR_SIZE)
        for j in range(SECTOR_SIZE // 16):
            words = _words(lanes.to_bytes(count * 16, "little"))
            stream[2 * j :: _SECTOR_WORDS] = words[0::2]
            stream[2 * j + 1 :: _SECTOR_WORDS] = words[1::2]
            lanes = ((lanes << 1) & rest) ^ (((lanes >> 127) & low) * 0x87)
        return int.from_bytes(stream.tobytes(), "little")

    def _decrypt(self, data: bytes, sector: int, count: int) -> bytes:
        size = count * SECTOR_SIZE
        tweaks = self._tweaks(sector, count)
        masked = (int.from_bytes(data, "little") ^ tweaks).to_bytes(size, "little")
        opened = self._data.decrypt_blocks(masked)
        return (int.from_bytes(opened, "little") ^ tweaks).to_bytes(size, "little")

    def _encrypt(self, data: bytes, sector: int, count: int) -> bytes:
        size = count * SECTOR_SIZE
        tweaks = self._tweaks(sector, count)
        masked = (int.from_bytes(data, "little") ^ tweaks).to_bytes(size, "little")
        sealed = self._data.encrypt_blocks(masked)
        return (int.from_bytes(sealed, "little") ^ tweaks).to_bytes(size, "little")


class _CtrSectors(SectorCipher):
    """CTR restarted at every sector: the counter starts at the IV block (a big-endian
    integer) and adds one per block, modulo 2**(8 * block size)."""

    __slots__ = ("_block", "_ivgen")

    def __init__(self, name: str, block: _Block, ivgen: _IvGen) -> None:
        super().__init__(name)
        self._block = block
        self._ivgen = ivgen

    def _keystream(self, sector: int, count: int) -> bytes:
        # Lay the counter blocks out with a zero guard word before each, every block of a
        # sector starting as the sector's IV. Read as one big-endian integer, a single addition
        # then adds j to block j of every sector; a carry out of a block stops in its guard
        # word, so each counter wraps modulo 2**(8 * block size) on its own.
        per_block = self._block.block_size // 8
        lane = per_block + 1
        blocks = SECTOR_SIZE // self._block.block_size
        ivs = _words(self._ivgen.ivs(sector, count))
        wide = _zeros(8 * lane * blocks * count)
        for j in range(blocks):
            for w in range(per_block):
                wide[j * lane + 1 + w :: lane * blocks] = ivs[w::per_block]
        total = int.from_bytes(wide.tobytes(), "big") + _ctr_steps(per_block, count)
        summed = _words(total.to_bytes(len(wide) * 8, "big"))
        counters = _zeros(count * SECTOR_SIZE)
        for w in range(per_block):
            counters[w::per_block] = summed[1 + w :: lane]
        return self._block.encrypt_blocks(counters.tobytes())

    def _decrypt(self, data: bytes, sector: int, count: int) -> bytes:
        return _xor(data, self._keystream(sector, count))

    def _encrypt(self, data: bytes, sector: int, count: int) -> bytes:
        return _xor(data, self._keystream(sector, count))


def sector_cipher(cipher_name: str, cipher_mode: str, key: bytes) -> SectorCipher:
    """The sector cipher LUKS names ``cipher_name`` ("aes") and ``cipher_mode``
    ("xts-plain64", "cbc-essiv:sha256", ...) with ``key`` (both XTS keys for XTS).

    Raises UnsupportedCipherError for names, key sizes or combinations it cannot do.
    """
    family = cipher_name.lower()
    mode, _, ivspec = cipher_mode.lower().partition("-")
    if mode not in ("ecb", "cbc", "xts", "ctr"):
        raise UnsupportedCipherError(f"unknown cipher mode {cipher_mode!r}")
    _check_family(family)
    if mode == "xts":
        if len(key) % 2:
            raise UnsupportedCipherError(f"xts needs an even key size, not {len(key)} bytes")
        half = len(key) // 2
        blocks = [_Block(family, key[:half]), _Block(family, key[half:])]
    else:
        blocks = [_Block(family, key)]
    bs = blocks[0].block_size
    name = f"{family}-{8 * len(key) // len(blocks)}-{cipher_mode.lower()}"
    if mode == "ecb":
        return _EcbSectors(name, blocks[0])
    ivgen = _ivgen(ivspec, family, key, bs, cipher_mode)
    if mode == "cbc":
        return _CbcSectors(name, blocks[0], ivgen)
    if mode == "ctr":
        return _CtrSectors(name, blocks[0], ivgen)
    if bs != 16:
        raise UnsupportedCipherError(f"xts needs a 128-bit block cipher, {family} has {8 * bs}")
    return _XtsSectors(name, blocks[0], blocks[1], ivgen)


def _ivgen(ivspec: str, family: str, key: bytes, block_size: int, cipher_mode: str) -> _IvGen:
    generator, colon, hash_name = ivspec.partition(":")
    if generator == "essiv" and hash_name:
        return _EssivIv(ivspec, family, key, hash_name)
    if colon and generator in ("plain", "plain64"):
        _check_hash(hash_name)  # qemu writes an ivgen-hash-alg it was given; plain IVs ignore it
    if generator == "plain64":
        return _PlainIv(ivspec, block_size, 64)
    if generator == "plain":
        return _PlainIv(ivspec, block_size, 32)
    raise UnsupportedCipherError(f"unknown IV generator in cipher mode {cipher_mode!r}")


def qcow_aes_cipher(passphrase: bytes) -> SectorCipher:
    """The cipher of qcow v1 and qcow2 crypt_method 1: AES-128-CBC, plain64 IVs.

    The key is the passphrase up to its first NUL (qemu takes it as a C string), cut to 16
    bytes and zero padded; there is no key derivation. IV numbers are guest sectors.
    """
    key = passphrase.split(b"\0", 1)[0][:16].ljust(16, b"\0")
    block = _Block("aes", key)
    return _CbcSectors("aes-128-cbc-plain64", block, _PlainIv("plain64", 16, 64))


# --------------------------------------------------------------------------------------------
# LUKS1.


class _Hasher(Protocol):
    @property
    def digest_size(self) -> int: ...
    def copy(self) -> _Hasher: ...
    def update(self, data: bytes, /) -> None: ...
    def digest(self) -> bytes: ...


def _diffuse(data: bytes, hasher: _Hasher) -> bytes:
    """The LUKS1 diffusion: digest-sized pieces each hashed after a big-endian u32 index, the
    last piece's digest cut to its length."""
    size = hasher.digest_size
    out = []
    for i in range(0, (len(data) + size - 1) // size):
        h = hasher.copy()
        h.update(i.to_bytes(4, "big"))
        piece = data[i * size : (i + 1) * size]
        h.update(piece)
        out.append(h.digest()[: len(piece)])
    return b"".join(out)


def af_merge(material: bytes, key_size: int, stripes: int, hash_name: str) -> bytes:
    """The key that ``stripes`` anti-forensic stripes of ``key_size`` bytes hold (LUKS1)."""
    if len(material) < key_size * stripes or stripes < 1:
        raise LuksHeaderError(
            f"anti-forensic material of {len(material)} bytes is too short for "
            f"{stripes} stripes of {key_size} bytes"
        )
    hasher = hashlib.new(_check_hash(hash_name))
    value = 0
    for i in range(stripes - 1):
        value ^= int.from_bytes(material[i * key_size : (i + 1) * key_size], "little")
        value = int.from_bytes(_diffuse(value.to_bytes(key_size, "little"), hasher), "little")
    last = int.from_bytes(material[(stripes - 1) * key_size : stripes * key_size], "little")
    return (value ^ last).to_bytes(key_size, "little")


def af_split(
    key: bytes,
    stripes: int,
    hash_name: str,
    random: Callable[[int], bytes] = os.urandom,
) -> bytes:
    """Anti-forensic material for ``key``: ``stripes`` - 1 random stripes and the one that
    makes :func:`af_merge` give ``key`` back."""
    if stripes < 1:
        raise ValueError("stripes must be at least 1")
    size = len(key)
    hasher = hashlib.new(_check_hash(hash_name))
    head = random(size * (stripes - 1))
    value = 0
    for i in range(stripes - 1):
        value ^= int.from_bytes(head[i * size : (i + 1) * size], "little")
        value = int.from_bytes(_diffuse(value.to_bytes(size, "little"), hasher), "little")
    last = value ^ int.from_bytes(key, "little")
    return head + last.to_bytes(size, "little")


def _text(field: bytes, what: str) -> str:
    raw = field.split(b"\0", 1)[0]
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise LuksHeaderError(f"LUKS {what} {raw!r} is not ASCII") from exc
    if not text:
        raise LuksHeaderError(f"LUKS {what} is empty")
    return text.lower()


def _material_sectors(key_size: int, stripes: int) -> int:
    return (key_size * stripes + SECTOR_SIZE - 1) // SECTOR_SIZE


def _check_header(header: LuksHeader) -> tuple[str, str, str]:
    """qemu's sanity checks of a LUKS1 header; gives (cipher name, mode, hash)."""
    cipher_name = _text(header.cipher_name, "cipher name")
    cipher_mode = _text(header.cipher_mode, "cipher mode")
    hash_name = _check_hash(_text(header.hash_spec, "hash spec"))
    if header.len_key < 1:
        raise LuksHeaderError(f"LUKS key size {header.len_key} is not valid")
    if header.mk_digest_iterations < 1:
        raise LuksHeaderError("LUKS master key digest iteration count is zero")
    extents: list[tuple[int, int]] = []
    for i, slot in enumerate(header.key_slots):
        state = int(slot.active)
        if state not in (_LUKS_SLOT_ACTIVE, _LUKS_SLOT_DISABLED):
            raise LuksHeaderError(f"Keyslot {i} state (active/disable) is corrupted")
        if slot.num_stripes != LUKS_STRIPES:
            raise LuksHeaderError(
                f"Keyslot {i} is corrupted (stripes {slot.num_stripes} != {LUKS_STRIPES})"
            )
        if state == _LUKS_SLOT_ACTIVE and slot.iterations < 1:
            raise LuksHeaderError(f"Keyslot {i} iteration count is zero")
        start = slot.ofs_key_material_sectors
        end = start + _material_sectors(header.len_key, slot.num_stripes)
        if start < _LUKS_HEADER_SECTORS:
            raise LuksHeaderError(f"Keyslot {i} is overlapping with the LUKS header")
        if end > header.ofs_payload_sectors:
            raise LuksHeaderError(f"Keyslot {i} is overlapping with the encrypted payload")
        for j, (other_start, other_end) in enumerate(extents):
            if start < other_end and other_start < end:
                raise LuksHeaderError(f"Keyslots {j} and {i} are overlapping in the header")
        extents.append((start, end))
    return cipher_name, cipher_mode, hash_name


def luks_master_key(
    header: LuksHeader, read: Callable[[int, int], bytes], passphrase: bytes
) -> tuple[int, bytes]:
    """(key slot number, master key) of the first active key slot ``passphrase`` opens.

    ``read(offset, length)`` reads bytes counted from the start of the LUKS header. Raises
    InvalidPasswordError when no slot opens, UnsupportedCipherError or LuksHeaderError when
    the header cannot be used.
    """
    cipher_name, cipher_mode, hash_name = _check_header(header)
    key_size = header.len_key
    # Fail on an unusable cipher before spending time on key derivation.
    sector_cipher(cipher_name, cipher_mode, bytes(key_size))
    for i, slot in enumerate(header.key_slots):
        if int(slot.active) != _LUKS_SLOT_ACTIVE:
            continue
        length = _material_sectors(key_size, slot.num_stripes) * SECTOR_SIZE
        material = read(slot.ofs_key_material_sectors * SECTOR_SIZE, length)
        if len(material) != length:
            raise LuksHeaderError(
                f"Keyslot {i}: key material is truncated ({len(material)} of {length} bytes)"
            )
        slot_key = hashlib.pbkdf2_hmac(hash_name, passphrase, slot.salt, slot.iterations, key_size)
        opened = sector_cipher(cipher_name, cipher_mode, slot_key).decrypt(material, 0)
        candidate = af_merge(opened, key_size, slot.num_stripes, hash_name)
        digest = hashlib.pbkdf2_hmac(
            hash_name,
            candidate,
            header.mk_digest_salt,
            header.mk_digest_iterations,
            _LUKS_DIGEST_SIZE,
        )
        if hmac.compare_digest(digest, header.mk_digest[:_LUKS_DIGEST_SIZE]):
            return i, candidate
    raise InvalidPasswordError()


def luks_cipher(header: LuksHeader, master_key: bytes) -> SectorCipher:
    """The data cipher of a LUKS1 header for a known master key."""
    cipher_name, cipher_mode, _ = _check_header(header)
    if len(master_key) != header.len_key:
        raise ValueError(f"master key has {len(master_key)} bytes, the header {header.len_key}")
    return sector_cipher(cipher_name, cipher_mode, master_key)


def luks_unlock(
    header: LuksHeader, read: Callable[[int, int], bytes], passphrase: bytes
) -> SectorCipher:
    """The data cipher of a LUKS1 header, unlocked with ``passphrase``.

    ``read(offset, length)`` reads bytes counted from the start of the LUKS header (for qcow2:
    the FDE extension's offset plus ``offset``). In qcow2 the IV sector number of a data
    sector is its host offset / 512. Raises InvalidPasswordError ("Invalid password, cannot
    unlock any keyslot") when no active key slot opens.
    """
    _, key = luks_master_key(header, read, passphrase)
    return luks_cipher(header, key)


# --------------------------------------------------------------------------------------------
# Creating LUKS1 headers, as qemu's crypto layer lays them out.

_LUKS_MATERIAL_ALIGN: Final = 4096  # qemu aligns each key slot's material to 4 KiB
_LUKS_SALT_SIZE: Final = 32
_LUKS_SLOTS: Final = 8
_LUKS_MIN_ITERATIONS: Final = 1000  # qemu's floor for both the slot and the digest counts
_LUKS_DIGEST_DIVISOR: Final = 8  # qemu (as cryptsetup) spends an eighth on the digest
_LUKS_CALIBRATION_SECONDS: Final = 0.02

# qemu's cipher-alg names -> (LUKS cipher name, key bytes)
LUKS_CIPHER_ALGS: Final[dict[str, tuple[str, int]]] = {
    "aes-128": ("aes", 16),
    "aes-192": ("aes", 24),
    "aes-256": ("aes", 32),
    "des": ("des", 8),
    "3des": ("3des", 24),
    "cast5-128": ("cast5", 16),
    "serpent-128": ("serpent", 16),
    "serpent-192": ("serpent", 24),
    "serpent-256": ("serpent", 32),
    "twofish-128": ("twofish", 16),
    "twofish-192": ("twofish", 24),
    "twofish-256": ("twofish", 32),
}
LUKS_CIPHER_MODES: Final = ("ecb", "cbc", "xts", "ctr")
LUKS_IVGEN_ALGS: Final = ("plain", "plain64", "essiv")
LUKS_HASH_ALGS: Final = _LUKS_HASHES


@dataclass(frozen=True, slots=True)
class LuksParams:
    """The encrypt.* create options of a LUKS1 image, with qemu's defaults and names."""

    cipher_alg: str = "aes-256"
    cipher_mode: str = "xts"
    ivgen_alg: str = "plain64"
    ivgen_hash_alg: str | None = None
    hash_alg: str = "sha256"
    iter_time: int = 2000
    """Milliseconds of PBKDF2 per key slot unlock; the iteration counts are timed to match."""

    @property
    def cipher_name(self) -> str:
        """The LUKS cipher name ("aes")."""
        return LUKS_CIPHER_ALGS[self.cipher_alg][0]

    @property
    def key_bytes(self) -> int:
        """Bytes of the master key: both keys for XTS."""
        size = LUKS_CIPHER_ALGS[self.cipher_alg][1]
        return 2 * size if self.cipher_mode == "xts" else size

    @property
    def mode_spec(self) -> str:
        """The LUKS cipher mode string ("xts-plain64", "cbc-essiv:sha256"); as qemu, a given
        ivgen hash is written for every IV generator (only essiv uses it)."""
        ivhash = self.ivgen_hash_alg or ("sha256" if self.ivgen_alg == "essiv" else None)
        suffix = f":{ivhash}" if ivhash else ""
        return f"{self.cipher_mode}-{self.ivgen_alg}{suffix}"

    @property
    def material_sectors(self) -> int:
        """Sectors between two key slots' material: key bytes * stripes, 4 KiB aligned."""
        size = self.key_bytes * LUKS_STRIPES
        return -(-size // _LUKS_MATERIAL_ALIGN) * _LUKS_MATERIAL_ALIGN // SECTOR_SIZE

    def slot_sector(self, index: int) -> int:
        """Start of key slot ``index``'s material, in sectors from the LUKS header."""
        return _LUKS_HEADER_SECTORS + index * self.material_sectors

    @property
    def payload_offset(self) -> int:
        """Bytes of the LUKS header and all eight slots' material (qemu's payload offset)."""
        return self.slot_sector(_LUKS_SLOTS) * SECTOR_SIZE

    def cipher(self, key: bytes) -> SectorCipher:
        """The sector cipher these parameters name, for ``key``."""
        return sector_cipher(self.cipher_name, self.mode_spec, key)


def pbkdf2_iterations(hash_name: str, key_size: int, out_size: int, milliseconds: int) -> int:
    """PBKDF2 iterations that take about ``milliseconds`` of CPU time here, as qemu times them
    (it measures the rate once and scales it)."""
    _check_hash(hash_name)
    secret, salt = os.urandom(key_size), os.urandom(_LUKS_SALT_SIZE)
    count = 1 << 10
    while True:
        start = time.thread_time()
        hashlib.pbkdf2_hmac(hash_name, secret, salt, count, out_size)
        spent = time.thread_time() - start
        if spent >= _LUKS_CALIBRATION_SECONDS or count >= 1 << 24:
            break
        count *= 2
    rate = count / max(spent, 1e-6)
    iterations = int(rate * milliseconds / 1000)
    if iterations > _U32:
        raise CryptoError(f"PBKDF iterations {iterations} too large to scale")
    return iterations


def luks_format(
    passphrase: bytes,
    params: LuksParams,
    random: Callable[[int], bytes] = os.urandom,
) -> tuple[LuksHeader, bytes]:
    """A new LUKS1 header whose key slot 0 opens with ``passphrase``, and that slot's
    encrypted key material (to be written at ``slot_sector(0)`` sectors from the header).

    The master key, the salts and the UUID are random; the iteration counts follow
    ``params.iter_time`` (the digest gets an eighth of it). Slots 1 to 7 are disabled.
    """
    key_size = params.key_bytes
    hash_name = _check_hash(params.hash_alg)
    params.cipher(bytes(key_size))  # refuse an unusable cipher before any key derivation
    master = random(key_size)
    digest_salt = random(_LUKS_SALT_SIZE)
    digest_iterations = max(
        _LUKS_MIN_ITERATIONS,
        pbkdf2_iterations(hash_name, key_size, _LUKS_DIGEST_SIZE, params.iter_time)
        // _LUKS_DIGEST_DIVISOR,
    )
    digest = hashlib.pbkdf2_hmac(hash_name, master, digest_salt, digest_iterations,
                                 _LUKS_DIGEST_SIZE)
    slot_salt = random(_LUKS_SALT_SIZE)
    slot_iterations = max(
        _LUKS_MIN_ITERATIONS,
        pbkdf2_iterations(hash_name, len(passphrase) or 1, key_size, params.iter_time),
    )
    slot_key = hashlib.pbkdf2_hmac(hash_name, passphrase, slot_salt, slot_iterations, key_size)
    split = af_split(master, LUKS_STRIPES, hash_name, random)
    padded = split + bytes(-len(split) % SECTOR_SIZE)
    # a short last sector (CBC, ECB, CTR only) is the head of a whole one's ciphertext
    material = params.cipher(slot_key).encrypt(padded, 0)[: len(split)]
    slots = [
        _q.LuksKeySlot(
            active=_q.LuksKeySlotState.ACTIVE if i == 0 else _q.LuksKeySlotState.DISABLED,
            iterations=slot_iterations if i == 0 else 0,
            salt=slot_salt if i == 0 else bytes(_LUKS_SALT_SIZE),
            ofs_key_material_sectors=params.slot_sector(i),
            num_stripes=LUKS_STRIPES,
        )
        for i in range(_LUKS_SLOTS)
    ]

    def field(text: str, size: int) -> bytes:
        return text.encode("ascii").ljust(size, b"\0")

    header = _q.LuksHeader(
        version=1,
        cipher_name=field(params.cipher_name, 32),
        cipher_mode=field(params.mode_spec, 32),
        hash_spec=field(hash_name, 32),
        ofs_payload_sectors=params.payload_offset // SECTOR_SIZE,
        len_key=key_size,
        mk_digest=digest,
        mk_digest_salt=digest_salt,
        mk_digest_iterations=digest_iterations,
        uuid=field(str(uuid.UUID(bytes=random(16), version=4)), 40),
        key_slots=slots,
    )
    return header, material
