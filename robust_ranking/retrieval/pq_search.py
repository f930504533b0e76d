"""Exact product-quantization distances by look-up tables: SDC and ADC.

Product quantization (Jegou et al., TPAMI 2011; Feng et al., "Adversarial Attack on Deep
Product Quantization Network for Image Retrieval", AAAI 2020, Sec. "PQ based Image retrieval
systems"): a ``D``-dim vector is split into ``M`` sub-vectors of ``d = D / M`` dims, and
sub-vector ``m`` is stored as the index ``b_m`` of a codeword of the codebook
``C_m = {c_m1, ..., c_mK}`` (Eq. 1). Codes are integer tensors ``[..., M]``.

- **SDC** (symmetric: the query is quantized too)
  ``d(q(y), q(x)) = sqrt(sum_m ||c_{m a_m} - c_{m b_m}||^2)``,
- **ADC** (asymmetric: the query stays a float vector)
  ``d(y, q(x)) = sqrt(sum_m ||y_m - c_{m b_m}||^2)``.

Both are computed as in a PQ search engine: a per-query look-up table ``lut [..., A, M, K]``
(SDC: rows of the codeword-to-codeword table; ADC: query-to-codeword distances) summed over
the stored codes, one gather per sub-space -- a loop over the M sub-spaces only, never over
samples. The results equal the Euclidean distance between the decoded vectors up to float
rounding (tested against a brute-force computation).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["adc_distance", "adc_lookup_table", "decode_codes", "lookup_distance", "sdc_distance", "sdc_table"]


def _check_codebooks(codebooks: Tensor) -> tuple[int, int, int]:
    if codebooks.dim() != 3:
        raise ValueError(f"codebooks must be [M, K, d], got shape {tuple(codebooks.shape)}")
    return tuple(codebooks.shape)  # type: ignore[return-value]


def _check_codes(codes: Tensor, num_codebooks: int, name: str) -> None:
    if codes.is_floating_point() or codes.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of codeword indices, got {codes.dtype}")
    if codes.shape[-1] != num_codebooks:
        raise ValueError(f"{name} must end with M={num_codebooks} sub-codes, got shape {tuple(codes.shape)}")


def decode_codes(codebooks: Tensor, codes: Tensor) -> Tensor:
    """The reconstruction ``q(x) = (c_{1 b_1}, ..., c_{M b_M})``: ``[..., M] -> [..., M * d]``."""
    num_codebooks, _, sub_dim = _check_codebooks(codebooks)
    _check_codes(codes, num_codebooks, "codes")
    m = torch.arange(num_codebooks, device=codes.device)
    return codebooks[m, codes.long()].reshape(*codes.shape[:-1], num_codebooks * sub_dim)


def sdc_table(codebooks: Tensor) -> Tensor:
    """Squared distances between the codewords of each sub-codebook: ``[M, K, K]``."""
    _check_codebooks(codebooks)
    sq = (codebooks * codebooks).sum(-1)
    table = sq[:, :, None] + sq[:, None, :] - 2.0 * codebooks @ codebooks.transpose(1, 2)
    # The diagonal is exactly 0 mathematically; the expansion may leave a rounding residue.
    table = table.clamp_min(0.0)
    return table * (1.0 - torch.eye(table.shape[-1], device=table.device, dtype=table.dtype))


def adc_lookup_table(codebooks: Tensor, queries: Tensor) -> Tensor:
    """Squared distances of each query sub-vector to each codeword: ``[..., A, D] -> [..., A, M, K]``."""
    num_codebooks, _, sub_dim = _check_codebooks(codebooks)
    if queries.shape[-1] != num_codebooks * sub_dim:
        raise ValueError(
            f"ADC queries must be [..., D={num_codebooks * sub_dim}] vectors, got shape {tuple(queries.shape)}"
        )
    y = queries.reshape(*queries.shape[:-1], num_codebooks, 1, sub_dim)
    # ||y_m - c||^2 = ||y_m||^2 + ||c||^2 - 2 <y_m, c> (one batched matmul per call).
    cross = (y @ codebooks.transpose(1, 2)).squeeze(-2)  # [..., A, M, K]
    lut = (y * y).sum(-1) + (codebooks * codebooks).sum(-1) - 2.0 * cross
    return lut.clamp_min(0.0)


def lookup_distance(lut: Tensor, codes: Tensor) -> Tensor:
    """``sqrt(sum_m lut[..., a, m, codes[n, m]])`` for every query ``a`` and stored code ``n``.

    Args:
        lut: ``[..., A, M, K]`` per-query squared sub-distances.
        codes: ``[N, M]`` stored codes.

    Returns:
        ``[..., A, N]`` distances. The square root's gradient is kept finite at 0 by a clamp.
    """
    num_codebooks = lut.shape[-2]
    _check_codes(codes, num_codebooks, "codes")
    if codes.dim() != 2:
        raise ValueError(f"stored codes must be [N, M], got shape {tuple(codes.shape)}")
    codes = codes.to(lut.device).long()
    total = lut[..., 0, :].index_select(-1, codes[:, 0])
    for m in range(1, num_codebooks):  # M sub-spaces (a handful), not samples
        total = total + lut[..., m, :].index_select(-1, codes[:, m])
    return total.clamp_min(1e-12).sqrt()


def sdc_distance(codebooks: Tensor, query_codes: Tensor, database_codes: Tensor, table: Tensor | None = None) -> Tensor:
    """SDC distances ``[..., A, M] x [N, M] -> [..., A, N]`` (``table``: a cached :func:`sdc_table`)."""
    num_codebooks, _, _ = _check_codebooks(codebooks)
    _check_codes(query_codes, num_codebooks, "query codes")
    table = sdc_table(codebooks) if table is None else table
    m = torch.arange(num_codebooks, device=table.device)
    lut = table[m, query_codes.to(table.device).long()]  # [..., A, M, K]: rows of the table
    return lookup_distance(lut, database_codes)


def adc_distance(codebooks: Tensor, queries: Tensor, database_codes: Tensor) -> Tensor:
    """ADC distances ``[..., A, D] x [N, M] -> [..., A, N]``; differentiable w.r.t. ``queries``."""
    return lookup_distance(adc_lookup_table(codebooks, queries), database_codes)
