"""First-order influence of removing groups of training points."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fragile.errors import InvalidArgumentError, check_indices


def group_influence(predicted: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """Predicted test-loss change for removing each group of training points, to first order: the sum of
    its members' influences (how the paper's appendix predicts group removal). (n_test, n) → (n_test, G).

    ``predicted`` has one column per training point (an :class:`~fragile.estimators.base.InfluenceResult` over all
    of them). The first-order sum ignores how removing one member changes the others' influence; for large groups
    that interaction is what group-retraining measures against it.
    """
    if not isinstance(predicted, torch.Tensor) or predicted.ndim != 2:
        raise InvalidArgumentError("predicted must be a (n_test, n) tensor: one column per training point")
    if not groups:
        raise InvalidArgumentError("groups is empty; give at least one group of training indices")
    n = predicted.shape[1]
    return torch.stack([predicted[:, check_indices(f"groups[{g}]", grp, n)].sum(dim=1) for g, grp in enumerate(groups)], dim=1)


__all__ = ["group_influence"]
