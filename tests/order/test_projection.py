import hashlib
import math
import subprocess
import sys

import pytest
import torch

from lpl.order.projection import Projector
from lpl.utils.errors import LplError

MASK = 0xFFFFFFFF


def _fmix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & MASK
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & MASK
    return x ^ (x >> 16)


def _reference_rademacher(dim_in: int, proj_dim: int, seed: int) -> torch.Tensor:
    """The matrix entry by entry with Python integers: the slow, obvious definition."""
    seed_key = _fmix32(seed * 2 ^ 0x5BD1E995)
    out = torch.empty(proj_dim, dim_in)
    for row in range(proj_dim):
        row_key = _fmix32((row + seed_key) & MASK)
        for col in range(dim_in):
            word_hash = _fmix32((row_key + _fmix32((col // 32) ^ 0x27D4EB2F)) & MASK)
            out[row, col] = -1.0 if (word_hash >> (col % 32)) & 1 else 1.0
    return out


def test_rademacher_matches_entrywise_reference():
    projector = Projector(dim_in=70, proj_dim=6, seed=11)
    block = projector.block(0, 70)
    assert torch.equal(torch.sign(block), _reference_rademacher(70, 6, 11))
    assert torch.equal(block.abs(), torch.full_like(block, 1 / math.sqrt(6)))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_any_column_block_is_the_same_slice(kind):
    projector = Projector(dim_in=300, proj_dim=16, seed=3, kind=kind)
    full = projector.block(0, 300)
    for start, stop in [(0, 1), (5, 37), (31, 33), (64, 300), (299, 300)]:
        assert torch.equal(projector.block(start, stop), full[:, start:stop])


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_project_variants_agree_with_dense_product(kind):
    torch.manual_seed(0)
    projector = Projector(dim_in=2500, proj_dim=40, seed=5, kind=kind)
    projector.chunk_columns = 256  # force several chunks, straddling tensor boundaries
    dense = projector.block(0, 2500).double()
    tensors = [torch.randn(3, 7, 10), torch.randn(3, 1000), torch.randn(3, 1430)]
    flat = torch.cat([t.reshape(3, -1) for t in tensors], dim=1)
    expected = (flat.double() @ dense.T).float()
    torch.testing.assert_close(projector.project_batch(flat), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(projector.project(flat[1]), expected[1], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(projector.project_tensors([t[2] for t in tensors]), expected[2], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(projector.project_tensors_batch(tensors), expected, rtol=1e-5, atol=1e-4)


def test_seed_changes_matrix_and_entries_are_balanced():
    a = Projector(4000, 64, seed=0).block(0, 4000)
    b = Projector(4000, 64, seed=1).block(0, 4000)
    assert not torch.equal(a, b)
    signs = a * 8
    assert abs(signs.mean().item()) < 0.01  # 256k fair coins: std 0.002
    rows = signs @ signs.T / 4000  # distinct rows are near-orthogonal: std 1/sqrt(4000) = 0.016
    assert (rows - torch.eye(64)).abs().max() < 0.09
    gaussian = Projector(4000, 64, seed=0, kind="gaussian").block(0, 4000) * 8
    assert abs(gaussian.mean().item()) < 0.01 and abs(gaussian.std().item() - 1) < 0.01


def _matrix_digest(kind: str) -> str:
    block = Projector(1000, 50, seed=123, kind=kind).block(0, 1000)
    return hashlib.sha256(block.numpy().tobytes()).hexdigest()


def test_matrix_is_bit_identical_in_another_process():
    code = (
        "import hashlib, torch; from lpl.order.projection import Projector\n"
        "for kind in ('rademacher', 'gaussian'):\n"
        "    b = Projector(1000, 50, seed=123, kind=kind).block(0, 1000)\n"
        "    print(hashlib.sha256(b.numpy().tobytes()).hexdigest())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert other == [_matrix_digest("rademacher"), _matrix_digest("gaussian")]


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_inner_products_preserved_within_jl_bound(kind):
    """<Pa, Pb> - <a, b> has std <= sqrt(2/k) |a||b|; check mean, spread and the JL tail bound over many pairs."""
    torch.manual_seed(1)
    dim_in, proj_dim, pairs = 2000, 1024, 150
    projector = Projector(dim_in, proj_dim, seed=7, kind=kind)
    a = torch.randn(pairs, dim_in, dtype=torch.float64)
    b = 0.5 * a + torch.randn(pairs, dim_in, dtype=torch.float64)  # correlated pairs: <a, b> far from 0
    pa, pb = projector.project_batch(a).double(), projector.project_batch(b).double()
    exact = (a * b).sum(1)
    norms = a.norm(dim=1) * b.norm(dim=1)
    error = ((pa * pb).sum(1) - exact) / norms
    # Var(<Pa,Pb>) = (|a|^2|b|^2 + <a,b>^2 - c)/k with c >= 0 (c = 2 sum a_i^2 b_i^2 for Rademacher)
    predicted_std = torch.sqrt((1 + (exact / norms) ** 2) / proj_dim).mean().item()
    assert abs(error.mean().item()) < 4 * predicted_std / math.sqrt(pairs)
    assert 0.7 * predicted_std < error.std().item() < 1.3 * predicted_std
    # JL for unit vectors (polarisation): P(|error| > eps) <= 4 exp(-k (eps^2/2 - eps^3/3) / 2) per pair;
    # with eps = 0.3 the union bound over all pairs is < 1e-3
    eps = 0.3
    assert pairs * 4 * math.exp(-proj_dim * (eps**2 / 2 - eps**3 / 3) / 2) < 1e-3
    assert error.abs().max().item() < eps
    norm_ratio = pa.norm(dim=1) / a.norm(dim=1)
    assert (norm_ratio - 1).abs().max().item() < eps


def test_bad_arguments_raise_lpl_error():
    with pytest.raises(LplError, match="kind"):
        Projector(10, 4, kind="sparse")
    with pytest.raises(LplError, match="proj_dim"):
        Projector(10, 0)
    with pytest.raises(LplError, match="length 10"):
        Projector(10, 4).project(torch.ones(11))
    with pytest.raises(LplError, match="length 10"):
        Projector(10, 4).project_tensors([torch.ones(3), torch.ones(3)])


def test_matrix_projector_projects_rows_as_vectors_and_the_identity_copies():
    from lpl.order.projection import MatrixProjector

    rows = torch.randn(3, 10, dtype=torch.float64)
    matrix = torch.randn(4, 10)
    dense = MatrixProjector(matrix)
    torch.testing.assert_close(dense.project_batch(rows), torch.stack([dense.project(r) for r in rows]))
    torch.testing.assert_close(dense.project(rows[0]), matrix @ rows[0].float())
    identity = MatrixProjector()
    copied = identity.project(rows[0])
    assert copied.dtype == torch.float32 and torch.equal(copied, rows[0].float())
    copied.zero_()
    assert rows[0].abs().sum() > 0  # a copy, not a view of the caller's vector
