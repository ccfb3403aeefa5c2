"""Counter-addressable random streams for the random merge methods (DARE, DELLA, adaptive-RMS).

Every (global seed, tensor name, expert index) has its own stream of 32-bit words w_0, w_1, ...
(:func:`stream_key`: BLAKE2b of the three, 128 bits, as the entropy of a ``SeedSequence`` that
seeds numpy's PCG64-DXSM). The raw 64-bit output j of that generator holds the words 2j (low half)
and 2j + 1 (high half). Element e of a tensor (row-major flat index) uses word e, so

    u_e = ⌊w_e / 2⁸⌋ · 2⁻²⁴  ∈ [0, 1)         (24 bits: exactly representable in float32)
    keep_e = [u_e < q_e]                      (P(keep_e) = ⌈q_e·2²⁴⌉ / 2²⁴, q_e as float32)

For a scalar q the mask is one integer comparison, w_e < ⌈q·2²⁴⌉·2⁸ (the same decision, since
u_e < q ⟺ ⌊w_e / 2⁸⌋ < ⌈q·2²⁴⌉).

Why this generator: PCG64 jumps ahead by any number of outputs in O(log n) (``advance``), so the
words of any element range [a, b) are computed without the ones before it. The stream therefore
gives the same mask whatever the order tensors are merged in, the rank or number of ranks that
compute it, the row range a shard needs, and the number of threads that fill it: ranges of at
least :data:`CHUNK` elements are filled by separate threads, each from its own jump. numpy's bit
generators keep their raw streams stable across versions (numpy's policy for ``BitGenerator``),
so a seed means the same masks on every machine. It is also 2-4x faster than ``torch.rand`` on CPU.

On other devices (CUDA) the draws come from a ``torch.Generator`` on that device seeded by the low
63 bits of the same key: reproducible per device type, made where the tensor lives, without a host
round trip; CPU and CUDA masks differ, and element offsets (``start``) are CPU-only.
"""

from __future__ import annotations

import hashlib
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

#: elements per thread: smaller ranges are filled by the calling thread alone
CHUNK = 1 << 20
#: words per generator call (an even number: blocks after the first start on a raw output)
BLOCK = 1 << 16
_TWO24 = float(1 << 24)
_POOLS: dict[int, ThreadPoolExecutor] = {}


def stream_key(seed: int, name: str, expert: int) -> int:
    """The 128-bit key of the stream of (global seed, tensor name, expert index)."""
    digest = hashlib.blake2b(f"lm-rng\x00{seed}\x00{name}\x00{expert}".encode(), digest_size=16).digest()
    return int.from_bytes(digest, "little")


def words(key: int, start: int, count: int) -> np.ndarray:
    """The 32-bit words w_start .. w_(start+count−1) of stream ``key`` (uint32, one thread)."""
    out = np.empty(count, np.uint32)
    for a, w in blocks(key, start, count):
        out[a:a + w.size] = w
    return out


def blocks(key: int, start: int, count: int):
    """Yield ``(offset, words)``: the words w_(start+offset) ... of stream ``key`` in consecutive
    blocks of at most :data:`BLOCK` (views of one generator call each, cache-sized, so a consumer
    that reduces each block at once never streams the words through main memory)."""
    first, skip = divmod(start, 2)
    bitgen = np.random.PCG64DXSM(np.random.SeedSequence(key))
    if first:
        bitgen.advance(first)
    done = 0
    m = min(BLOCK - skip, count)  # the first block ends on a raw-output boundary, so the next starts on one
    while done < count:
        raw = bitgen.random_raw((skip + m + 1) // 2)
        if sys.byteorder == "little":
            pairs = raw.view(np.uint32)
        else:  # keep the documented order (low half first) on big-endian hosts
            pairs = np.empty(raw.size * 2, np.uint32)
            pairs[0::2], pairs[1::2] = raw & 0xFFFFFFFF, raw >> 32
        yield done, pairs[skip:skip + m]
        done += m
        skip = 0
        m = min(BLOCK, count - done)


def thread_pool(n: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``n`` worker threads (created on first use)."""
    if n not in _POOLS:
        _POOLS[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="lm-rng")
    return _POOLS[n]


def _ranges(count: int) -> list[tuple[int, int]]:
    """Split [0, count) into at most torch.get_num_threads() ranges of at least CHUNK elements."""
    parts = max(1, min(torch.get_num_threads(), count // CHUNK))
    step = -(-count // parts)
    return [(a, min(a + step, count)) for a in range(0, count, step)]


def _run(fill, count: int) -> None:
    ranges = _ranges(count)
    if len(ranges) == 1:
        fill(0, count)
        return
    for f in [thread_pool(len(ranges)).submit(fill, a, b) for a, b in ranges]:
        f.result()


def scalar_threshold(q: float) -> int:
    """⌈q·2²⁴⌉·2⁸ with q rounded to float32 first: w < threshold ⟺ u < q (0 ≤ threshold ≤ 2³²)."""
    q32 = float(np.float32(q))
    return int(np.ceil(min(max(q32, 0.0), 1.0) * _TWO24)) << 8


@dataclass(frozen=True)
class RandomStream:
    """The stream of one (seed, tensor, expert); see the module docstring for the draws.

    Attributes:
        key: :func:`stream_key` of the triple.
        device: where masks are made (numpy on CPU; a seeded ``torch.Generator`` elsewhere).
        start: the flat index of this tensor's first element in the stream (a shard's row offset
            times the row length), so a slice of a tensor draws exactly the words the whole would.
    """

    key: int
    device: torch.device = torch.device("cpu")
    start: int = 0

    def keep(self, keep_prob: Tensor | float, shape: torch.Size | tuple[int, ...]) -> Tensor:
        """A boolean mask of ``shape`` with keep_e = [u_e < q_e] (``keep_prob`` a scalar or a float32
        tensor of ``shape``)."""
        if self.device.type != "cpu":
            return self._torch_uniform(shape) < keep_prob
        count = int(np.prod(shape)) if len(shape) else 1
        out = torch.empty(count, dtype=torch.bool)
        dst = out.numpy()
        if isinstance(keep_prob, Tensor):
            q = keep_prob.detach().to("cpu", torch.float32).contiguous().reshape(-1).numpy()

            def fill(a: int, b: int) -> None:
                u = np.empty(min(BLOCK, b - a), np.float32)
                for o, w in blocks(self.key, self.start + a, b - a):
                    np.right_shift(w, 8, out=w)
                    v = u[:w.size]
                    np.copyto(v, w, casting="unsafe")  # exact: w < 2^24
                    lo = a + o
                    np.less(v, q[lo:lo + w.size] * np.float32(_TWO24), out=dst[lo:lo + w.size])
        else:
            thr = scalar_threshold(keep_prob)
            if thr >= 1 << 32:
                return out.fill_(True).view(shape)
            limit = np.uint32(thr)

            def fill(a: int, b: int) -> None:
                for o, w in blocks(self.key, self.start + a, b - a):
                    np.less(w, limit, out=dst[a + o:a + o + w.size])

        _run(fill, count)
        return out.view(shape)

    def uniform(self, shape: torch.Size | tuple[int, ...]) -> Tensor:
        """u_e for every element of ``shape`` (float32 in [0, 1))."""
        if self.device.type != "cpu":
            return self._torch_uniform(shape)
        count = int(np.prod(shape)) if len(shape) else 1
        out = torch.empty(count, dtype=torch.float32)
        dst = out.numpy()

        def fill(a: int, b: int) -> None:
            for o, w in blocks(self.key, self.start + a, b - a):
                np.right_shift(w, 8, out=w)
                np.multiply(w, np.float32(1.0 / _TWO24), out=dst[a + o:a + o + w.size], casting="unsafe")

        _run(fill, count)
        return out.view(shape)

    def _torch_uniform(self, shape) -> Tensor:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.key & ((1 << 63) - 1))
        if self.start:
            raise NotImplementedError(
                f"element offsets of a random stream are supported on CPU only, not on {self.device}"
            )
        return torch.rand(shape, generator=gen, device=self.device, dtype=torch.float32)


def stream_for(seed: int, name: str, expert: int, device: torch.device | str = "cpu", start: int = 0) -> RandomStream:
    """The :class:`RandomStream` of (seed, tensor name, expert index) on ``device``."""
    return RandomStream(stream_key(seed, name, expert), torch.device(device), start)


__all__ = ["BLOCK", "CHUNK", "RandomStream", "blocks", "scalar_threshold", "stream_for", "stream_key", "thread_pool",
           "words"]
