"""Differentially private releases, on the client: asking for one (:func:`dp_release`) and
what comes back (:class:`PrivateValue`: the noisy value, and how it was made)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import ValidationError

from protocol.errors import InvalidRequest
from protocol.messages import DPRelease, NoiseInfo


@dataclass(frozen=True)
class PrivateValue:
    """A differentially private release: the noisy value, and how it was made."""

    value: torch.Tensor
    noise: NoiseInfo

    def item(self) -> float:
        return float(self.value.item())

    def __float__(self) -> float:
        return self.item()

    def __repr__(self) -> str:
        n = self.noise
        shown = f"{self.item():.6g}" if self.value.numel() == 1 else f"tensor of shape {tuple(self.value.shape)}"
        privacy = f"ε={n.epsilon:g}" + (f", δ={n.delta:g}" if n.delta else "")
        after = " on its aggregates, then post-processed" if n.post_processed else ""
        return f"PrivateValue({shown}; {n.mechanism} noise of scale {n.scale:.4g}{after}, {privacy})"


def dp_release(epsilon: float | None, delta: float) -> DPRelease | None:
    """The DP release asked for, or None for none. A ``delta`` without an ``epsilon`` is a
    mistake, not a request for the exact value: it is refused, naming both fixes."""
    if epsilon is None:
        if delta:
            raise InvalidRequest(f"delta={delta} asks for a differentially private release, which needs an epsilon "
                                 f"too: get(epsilon=0.2, delta={delta}); or leave delta out for the exact value "
                                 "(released only if you may see it)")
        return None
    try:
        return DPRelease(epsilon=epsilon, delta=delta)
    except ValidationError:
        raise InvalidRequest(f"a DP release needs 0 < epsilon ≤ 100 and 0 ≤ delta < 1, not epsilon={epsilon}, "
                             f"delta={delta}") from None
