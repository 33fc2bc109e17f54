"""A perturbation generator that gives the same bits on every device: Philox4x32-10.

Philox (Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011)
is counter-based: block b of the stream of key k is a pure function philox(counter=b, key=k),
so any slice of z is drawn without drawing what precedes it, in any chunking, in any number of
threads, on any device.

Written by hand because no torch op gives device-independent counter-based bits: torch's CPU
generator is a Mersenne Twister, its CUDA generator a Philox whose (seed, offset) bookkeeping
differs per kernel and per GPU, and neither can be positioned at an element index. Here every
step is an integer op on int64 tensors (values kept below 2**32, products split into 16-bit
halves so nothing overflows), which every torch backend computes exactly. Checked bit for bit
against a pure-Python reference (`reference`), itself checked against Random123's published
known-answer vectors (tests/test_philox.py). numpy's `np.random.Philox` is Philox4x64, another
function, so it cannot serve as the reference.

The stream of seed s (0 <= s < 2**64): key (s mod 2**32, s div 2**32), counter (b mod 2**32,
b div 2**32, 0, 0) for block b; a block is 4 words of 32 bits.
  rademacher  element j is bit j mod 32 of word (j div 32) mod 4 of block j div 128:
              0 -> +1, 1 -> -1 (Spall's SPSA perturbations). One random bit per weight.
  gaussian    element j is from block j div 4; words (0, 1) and (2, 3) give two standard
              normals each by Box-Muller (u = (w div 2**8 + 0.5) / 2**24, in float32):
              r = sqrt(-2 ln u0), z0 = r cos(2 pi u1), z1 = r sin(2 pi u1).
The integer words are identical on every device. Rademacher z is exact, so theta + scale z
rounds identically everywhere. Gaussian z goes through log, sqrt, cos and sin, whose last bit
differs between CPU (SLEEF) and CUDA (libdevice) kernels, and CUDA contracts scale * z + theta
into a fused multiply-add: across devices Gaussian z and replayed weights agree to float
rounding, not bit for bit (benchmarks/gpu_check.sh measures the gap). On one device it is
bit-exact for any chunking and thread count.
"""

from __future__ import annotations

import math

import torch

M32 = 0xFFFFFFFF
MUL = (0xD2511F53, 0xCD9E8D57)  # Philox4x32 round multipliers
WEYL = (0x9E3779B9, 0xBB67AE85)  # key schedule increments
ROUNDS = 10
WORDS = 4  # 32-bit words per block
BITS_PER_BLOCK = 128
SLACK = 2 * BITS_PER_BLOCK  # a draw of n elements may write up to n + SLACK into `out`
PIECE = 8192  # blocks per batch of tensor ops on a CPU: 64 KB int64 arrays stay in cache and
#               in the allocator's free lists (1M-block arrays ran 10x slower, page faults)


def reference(counter: tuple[int, int, int, int], key: tuple[int, int], rounds: int = ROUNDS) -> tuple[int, ...]:
    """Philox4x32 of one block in plain Python ints: the specification the tensor code meets."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + WEYL[0]) & M32, (k1 + WEYL[1]) & M32
        p0, p1 = MUL[0] * c0, MUL[1] * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & M32, (p0 >> 32) ^ c3 ^ k1, p0 & M32
    return c0, c1, c2, c3


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * m for 32-bit a and m, without overflowing int64."""
    p_lo, p_hi = (a & 0xFFFF) * m, (a >> 16) * m  # each < 2**48
    t = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (t >> 32), t & M32


def key_of(seed: int) -> tuple[int, int]:
    seed = int(seed)
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"philox seeds are 64-bit unsigned integers, got {seed}")
    return seed & M32, seed >> 32


def blocks(seed: int, first: int, count: int, device) -> torch.Tensor:
    """Blocks first .. first+count-1 of seed's stream: int64 [count, 4], each word < 2**32."""
    k0, k1 = key_of(seed)
    b = torch.arange(first, first + count, dtype=torch.int64, device=device)
    c0, c1 = b & M32, b >> 32
    c2, c3 = torch.zeros_like(b), torch.zeros_like(b)
    for r in range(ROUNDS):
        if r:
            k0, k1 = (k0 + WEYL[0]) & M32, (k1 + WEYL[1]) & M32
        hi0, lo0 = _mulhilo(c0, MUL[0])
        hi1, lo1 = _mulhilo(c2, MUL[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack((c0, c1, c2, c3), dim=1)


def _sign_table(device, dtype) -> torch.Tensor:
    """[256, 8]: row b holds +1 / -1 for bits 0..7 of byte b (1 -> -1)."""
    bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
    return (1 - 2 * bits).to(device=device, dtype=dtype)


_TABLES: dict = {}


def signs_of_bytes(data: torch.Tensor, dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """+1 / -1 for every bit of `data` (uint8 or int64 bytes), bit 0 of byte 0 first; written
    into the front of `out` when given."""
    key = (data.device, dtype)
    if key not in _TABLES:
        _TABLES[key] = _sign_table(*key)
    idx = data.reshape(-1).to(torch.int64)
    if out is not None:
        out = out[:idx.numel() * 8].view(-1, 8)
    return torch.index_select(_TABLES[key], 0, idx, out=out).view(-1)


def words_to_bytes(words: torch.Tensor) -> torch.Tensor:
    """int64 32-bit words [..., 4] -> their bytes, least significant first (no endianness)."""
    return (words[..., None] >> torch.tensor([0, 8, 16, 24], device=words.device)) & 0xFF


def _filled(seed: int, start: int, n: int, per_block: int, fill, device, dtype, out) -> torch.Tensor:
    """Elements start .. start+n-1 of a stream of `per_block` elements per block, written
    piece by piece by fill(blocks, dest) into `out` (n + SLACK elements) or a new tensor."""
    first, skip = divmod(start, per_block)
    count = -(-(skip + n) // per_block)
    dest = out if out is not None else torch.empty(count * per_block, device=device, dtype=dtype)
    piece = PIECE if torch.device(device or "cpu").type == "cpu" else count
    for p in range(0, count, piece):
        m = min(piece, count - p)
        fill(blocks(seed, first + p, m, device), dest[p * per_block:(p + m) * per_block])
    return dest[skip:skip + n]


def _signs(words: torch.Tensor, dest: torch.Tensor) -> None:
    signs_of_bytes(words_to_bytes(words), dest.dtype, out=dest)


def _box_muller(words: torch.Tensor, dest: torch.Tensor) -> None:
    u = ((words >> 8).to(torch.float32) + 0.5) * 2.0 ** -24  # in (0, 1), exact in float32
    r = torch.sqrt(-2 * torch.log(u[:, 0::2]))  # [m, 2]: pairs (w0, w1) and (w2, w3)
    angle = (2 * math.pi) * u[:, 1::2]
    dest.view(-1, 2, 2).copy_(torch.stack((r * torch.cos(angle), r * torch.sin(angle)), dim=2))


def rademacher(seed: int, start: int, n: int, device=None, dtype=torch.float32,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Elements start .. start+n-1 of seed's Rademacher stream (+1 / -1)."""
    return _filled(seed, start, n, BITS_PER_BLOCK, _signs, device, dtype, out)


def gaussian(seed: int, start: int, n: int, device=None, dtype=torch.float32,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """Elements start .. start+n-1 of seed's Gaussian stream (Box-Muller in float32, then
    rounded to dtype)."""
    return _filled(seed, start, n, WORDS, _box_muller, device, dtype, out)


DISTRIBUTIONS = {"gaussian": gaussian, "rademacher": rademacher}
