"""The one k-NN: distance to the k-th nearest embedding of the detector's bank (the `knn_score` column, and
the benchmarks' k-NN row), and the two-sided density score built on it (the `density_score` column)."""

from __future__ import annotations

import torch


def knn_distance(embedding: torch.Tensor, bank: torch.Tensor | None, k: int, *, chunk: int = 64
                 ) -> torch.Tensor | None:
    """(N, D) -> (N,) float32 Euclidean distance to the k-th nearest bank row (B, D); None without a bank.

    Rows go through torch.cdist in fixed chunks of `chunk` (zero-padded), as in the Scorer: the matmul kernels
    then always see one shape, so a row's distance does not depend on the batch it arrived in.
    """
    if bank is None or bank.shape[0] == 0:
        return None
    bank = bank.float()
    out = []
    for start in range(0, embedding.shape[0], chunk):
        rows = embedding[start:start + chunk]
        padded = torch.zeros(chunk, bank.shape[1], device=bank.device)
        padded[:len(rows)] = rows.to(bank.device, torch.float32)
        dist = torch.cdist(padded, bank, compute_mode="use_mm_for_euclid_dist")[:len(rows)]
        out.append(dist.kthvalue(k, dim=1).values.cpu())
    return torch.cat(out) if out else torch.empty(0)


def density_score(knn: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Two-sided density: |log k-distance - median| / MAD, the median and MAD over `reference` k-distances (the
    held-out calibration images'). High when an embedding sits in an abnormally tight cluster (triggered embeddings
    collapsing onto the target, with triggered neighbours in the bank) or abnormally far from everything (the same
    collapse with a clean bank). Row by row, so batch-invariant."""
    ref = torch.log(reference.double().clamp_min(1e-12))
    median = ref.median()
    mad = (ref - median).abs().median().clamp_min(1e-12)
    return ((torch.log(knn.double().clamp_min(1e-12)) - median).abs() / mad).float()
