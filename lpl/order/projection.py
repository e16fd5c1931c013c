"""Seeded Johnson-Lindenstrauss projection that is generated on the fly and never materialised.

The k x d matrix P = R / sqrt(k) (R Rademacher +-1 or standard Gaussian) is defined entry by entry by a counter-based
hash of (seed, row, column), so any block of columns can be generated alone, on any device, in any process, and it
is the same block every time. ``project`` walks the input in column chunks: memory is O(k x chunk), never O(k x d).

Rademacher entries come from integer arithmetic only, so the matrix is bit-identical on every device. Gaussian entries
go through ``log``/``cos`` in float64 and are rounded to float32; they agree across devices to the last bit in
practice but that is not guaranteed by the maths libraries. Projected outputs are deterministic for a given device
and input shape (the sums' order is fixed); CPU and GPU outputs agree to float32 rounding.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from lpl.utils.errors import LplError

_MASK32 = 0xFFFFFFFF
_BITS_PER_WORD = 32
_CHUNK_ELEMENTS = 1 << 22  # k x chunk entries generated at once (16 MiB of float32)
PROJECTION_KINDS = ("rademacher", "gaussian")


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2^32 for int64 x in [0, 2^32) without int64 overflow (split the constant in 16-bit halves)."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + ((x * high) & 0xFFFF) * 65536) & _MASK32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def _sign_table(device: torch.device) -> torch.Tensor:
    """[256, 8] float32: the +-1 signs of the 8 bits of every byte value (bit i -> column i)."""
    byte = torch.arange(256, dtype=torch.int64, device=device)
    bits = (byte[:, None] >> torch.arange(8, device=device)) & 1
    return (1 - 2 * bits).to(torch.float32)


class Projector:
    """x -> P x with P a k x d seeded random matrix scaled by 1/sqrt(k), so ``<Pa, Pb> ~ <a, b>``.

    Example::

        projector = Projector(dim_in=model_numel, proj_dim=4096, seed=0)
        k_vector = projector.project_tensors([p.grad for p in model.parameters()])  # no flat copy is made
        k_rows = projector.project_batch(torch.randn(8, model_numel))               # [8, 4096]

    Args:
        dim_in: d, the length of the (flattened) vectors to project.
        proj_dim: k, the projected length.
        seed: selects the matrix; the same seed gives the same matrix in every process, run and device.
        kind: "rademacher" (entries +-1/sqrt(k), exact everywhere) or "gaussian" (N(0, 1/k)).
    """

    def __init__(self, dim_in: int, proj_dim: int, seed: int = 0, kind: str = "rademacher") -> None:
        if int(dim_in) <= 0:
            raise LplError(f"Projector dim_in must be positive, got {dim_in}.")
        if int(proj_dim) <= 0:
            raise LplError(f"Projector proj_dim must be positive, got {proj_dim}.")
        if kind not in PROJECTION_KINDS:
            raise LplError(f"Projector kind must be one of {PROJECTION_KINDS}, got {kind!r}.")
        if not 0 <= int(seed) < 2**32:
            raise LplError(f"Projector seed must be in [0, 2**32), got {seed}.")
        self.dim_in = int(dim_in)
        self.proj_dim = int(proj_dim)
        self.seed = int(seed)
        self.kind = kind
        self.scale = 1.0 / math.sqrt(self.proj_dim)
        columns = max(_BITS_PER_WORD, _CHUNK_ELEMENTS // self.proj_dim)
        self.chunk_columns = columns - columns % _BITS_PER_WORD
        self._row_keys: dict[tuple[str, int], torch.Tensor] = {}
        self._sign_tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return f"Projector(dim_in={self.dim_in}, proj_dim={self.proj_dim}, seed={self.seed}, kind={self.kind!r})"

    def _keys(self, device: torch.device, salt: int) -> torch.Tensor:
        """Per-row hash keys [k] for one stream (salt 0: signs / first uniform, 1: second uniform)."""
        cache_key = (str(device), salt)
        if cache_key not in self._row_keys:
            rows = torch.arange(self.proj_dim, dtype=torch.int64, device=device)
            seed_key = _fmix32(
                torch.tensor((self.seed * 2 + salt) & _MASK32, dtype=torch.int64, device=device) ^ 0x5BD1E995
            )
            self._row_keys[cache_key] = _fmix32((rows + seed_key) & _MASK32)
        return self._row_keys[cache_key]

    def _words(self, first_word: int, num_words: int, device: torch.device, salt: int) -> torch.Tensor:
        """Hashes [k, num_words] of 32-bit words; word w covers columns 32w .. 32w + 31."""
        words = torch.arange(first_word, first_word + num_words, dtype=torch.int64, device=device)
        word_keys = _fmix32((words ^ 0x27D4EB2F) & _MASK32)
        return _fmix32((self._keys(device, salt)[:, None] + word_keys[None, :]) & _MASK32)

    def block(self, start: int, stop: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Columns ``start:stop`` of P as float32 [k, stop - start] (already scaled by 1/sqrt(k))."""
        device = torch.device(device)
        if not 0 <= start <= stop <= self.dim_in:
            raise LplError(f"column range {start}:{stop} is outside 0:{self.dim_in}.")
        first_word = start // _BITS_PER_WORD
        num_words = -(-stop // _BITS_PER_WORD) - first_word
        offset = start - first_word * _BITS_PER_WORD
        if self.kind == "rademacher":
            hashes = self._words(first_word, num_words, device, salt=0)
            if str(device) not in self._sign_tables:  # per device, so no host-to-device copy per block on GPU
                shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int64, device=device)
                self._sign_tables[str(device)] = (_sign_table(device) * self.scale, shifts)
            table, shifts = self._sign_tables[str(device)]
            byte_values = (hashes[:, :, None] >> shifts) & 0xFF
            # a table lookup per byte turns 8 hash bits into 8 scaled signs at memory-copy speed
            signs = torch.nn.functional.embedding(byte_values, table).reshape(self.proj_dim, num_words * _BITS_PER_WORD)
            return signs[:, offset : offset + stop - start]
        # Gaussian: one normal per entry from two independent 32-bit uniforms (Box-Muller).
        columns = torch.arange(start, stop, dtype=torch.int64, device=device)
        column_keys = _fmix32((columns ^ 0x165667B1) & _MASK32)
        u1 = _fmix32((self._keys(device, 0)[:, None] + column_keys[None, :]) & _MASK32)
        u2 = _fmix32((self._keys(device, 1)[:, None] + column_keys[None, :]) & _MASK32)
        uniform1 = (u1.to(torch.float64) + 1.0) / 4294967297.0  # in (0, 1): log is finite
        uniform2 = u2.to(torch.float64) / 4294967296.0
        normal = torch.sqrt(-2.0 * torch.log(uniform1)) * torch.cos(2.0 * math.pi * uniform2)
        return (normal * self.scale).to(torch.float32)

    def _project_columns(self, blocks: Sequence[torch.Tensor]) -> torch.Tensor:
        """Sum over column blocks [n, d_i] (consecutive, in order) of block @ P[:, cols]^T -> float32 [n, k]."""
        total = sum(block.shape[1] for block in blocks)
        if total != self.dim_in:
            raise LplError(f"the projector expects vectors of length {self.dim_in}, got {total}.")
        device = blocks[0].device
        out = torch.zeros(blocks[0].shape[0], self.proj_dim, dtype=torch.float32, device=device)
        offset = 0
        for block in blocks:
            for start in range(0, block.shape[1], self.chunk_columns):
                stop = min(start + self.chunk_columns, block.shape[1])
                piece = block[:, start:stop].to(torch.float32)
                out.addmm_(piece, self.block(offset + start, offset + stop, device).T)
            offset += block.shape[1]
        return out

    @torch.no_grad()
    def project(self, flat: torch.Tensor) -> torch.Tensor:
        """P x for one vector of length d: float32 [k]."""
        if flat.ndim != 1:
            raise LplError(f"project expects a 1-D tensor of length {self.dim_in}, got shape {tuple(flat.shape)}.")
        return self._project_columns([flat[None, :]])[0]

    @torch.no_grad()
    def project_batch(self, rows: torch.Tensor) -> torch.Tensor:
        """P x for each row of [n, d]: float32 [n, k]; the matrix is generated once for all rows."""
        if rows.ndim != 2:
            raise LplError(f"project_batch expects [n, {self.dim_in}], got shape {tuple(rows.shape)}.")
        return self._project_columns([rows])

    @torch.no_grad()
    def project_tensors(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """P x where x is the concatenation of the flattened tensors (e.g. per-parameter gradients): float32 [k].

        No concatenated copy is made; each tensor is projected against its own columns of P.
        """
        return self._project_columns([t.reshape(1, -1) for t in tensors])[0]

    @torch.no_grad()
    def project_tensors_batch(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Like ``project_tensors`` for n vectors at once: every tensor is [n, ...]; returns float32 [n, k]."""
        return self._project_columns([t.reshape(t.shape[0], -1) for t in tensors])


class MatrixProjector:
    """A projection held as a dense matrix [k, d], or none at all (``matrix=None``: vectors pass unchanged).

    For references and small models: the materialised matrix is faster than :class:`Projector` on CPU when it fits
    in memory, and the identity records full-space quantities (an exact reference for projected estimates).
    :class:`Projector` is what ``TrainOrderRecorder`` uses: seeded, generated in chunks, never materialised.
    """

    def __init__(self, matrix: torch.Tensor | None = None) -> None:
        self.matrix = None if matrix is None else matrix.float()

    @torch.no_grad()
    def project(self, flat: torch.Tensor) -> torch.Tensor:
        """P x for one vector: float32 [k] (a copy of x as float32 for the identity)."""
        return flat.float().clone() if self.matrix is None else self.matrix @ flat.float()

    @torch.no_grad()
    def project_batch(self, rows: torch.Tensor) -> torch.Tensor:
        """P x for each row of [n, d]: float32 [n, k]."""
        return rows.float().clone() if self.matrix is None else rows.float() @ self.matrix.T
