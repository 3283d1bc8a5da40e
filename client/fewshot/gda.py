"""Gaussian discriminant analysis on image features, fused with the zero-shot logits (GDA,
Wang et al., ICLR 2024; method.md §7).

Class means μ_k and one shared covariance Σ from every training view; Σ is shrunk toward
(tr Σ / d)·I, which keeps it invertible with far fewer samples than dimensions. Then
W = Σ⁻¹μ and b_k = −½ μ_kᵀΣ⁻¹μ_k (uniform class prior) give linear logits x·W + b.
One eigendecomposition serves every shrinkage value, so a grid over it costs one `eigh`.

The fused classifier is zero-shot + α·s·GDA, where s = std(zero-shot) / std(GDA) on the
training features puts the two on one scale, so α's grid means the same on any model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from client.fewshot.shots import Shots


@dataclass(frozen=True)
class GdaModel:
    weight: torch.Tensor  # [D, C]
    bias: torch.Tensor  # [C]

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.weight + self.bias


@dataclass(frozen=True)
class CovarianceBasis:
    """Class means and the eigendecomposition of the pooled within-class covariance."""

    means: torch.Tensor  # [C, D]
    eigenvalues: torch.Tensor  # [D]
    eigenvectors: torch.Tensor  # [D, D]

    @property
    def mean_variance(self) -> float:
        return float(self.eigenvalues.mean())  # tr Σ / d

    def model(self, shrinkage: float) -> GdaModel:
        """GDA with Σ_λ = (1 − λ)Σ + λ·(tr Σ / d)·I, λ in (0, 1]."""
        if not 0.0 < shrinkage <= 1.0:
            raise ValueError("shrinkage must be in (0, 1]")
        shrunk = (1.0 - shrinkage) * self.eigenvalues.clamp(min=0.0) + shrinkage * self.mean_variance
        q = self.eigenvectors
        projected = q.T @ self.means.T  # [D, C]
        weight = q @ (projected / shrunk.unsqueeze(1))  # Σ⁻¹ μᵀ
        bias = -0.5 * (self.means.T * weight).sum(dim=0)
        return GdaModel(weight.float(), bias.float())


def covariance_basis(shots: Shots) -> CovarianceBasis:
    """Means per class over all views, and Σ's eigenbasis (float64 for a stable solve)."""
    x, y = shots.flat()
    x = x.double()
    means = torch.zeros(shots.num_classes, x.shape[1], dtype=torch.float64)
    means.index_add_(0, y, x)
    counts = torch.bincount(y, minlength=shots.num_classes).clamp(min=1).unsqueeze(1)
    means = means / counts
    centred = x - means[y]
    cov = centred.T @ centred / max(1, x.shape[0])
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    return CovarianceBasis(means, eigenvalues, eigenvectors)


def fit_gda(shots: Shots, shrinkage: float) -> GdaModel:
    return covariance_basis(shots).model(shrinkage)


def fusion_scale(zero_shot_logits: torch.Tensor, gda_logits: torch.Tensor) -> float:
    """std(zero-shot) / std(GDA) over a set of logits (centred per row, as softmax ignores shifts)."""
    zs = zero_shot_logits - zero_shot_logits.mean(dim=1, keepdim=True)
    gd = gda_logits - gda_logits.mean(dim=1, keepdim=True)
    return float(zs.std() / gd.std().clamp(min=1e-12))
