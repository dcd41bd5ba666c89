"""The router head module: per-feature standardization, then a linear layer or a small MLP.

Checkpoint I/O (head.safetensors + router.json), compatibility checks and promotion
live in :mod:`vlrouter.core.store`; training lives in :mod:`vlrouter.core.fit`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    import torch


class HeadShape(BaseModel):
    """Everything needed to rebuild the head (nanoGPT's ``model_args``), saved in router.json."""

    model_config = ConfigDict(extra="ignore")
    kind: Literal["linear", "mlp"] = "linear"
    in_dim: int = Field(ge=1, le=131_072)
    hidden: int = Field(0, ge=0, le=65_536)
    num_labels: int = Field(ge=1, le=10_000)

    @model_validator(mode="after")
    def _size(self) -> HeadShape:
        """Refuse shapes no router has (checked from router.json before anything is allocated)."""
        if self.kind == "mlp" and self.hidden < 1:
            raise ValueError("an mlp head needs hidden >= 1")
        n = sum(_prod(s) for s in head_param_shapes(self).values())
        if n > MAX_HEAD_PARAMS:
            raise ValueError(f"a head of {n:,} parameters is over the limit of {MAX_HEAD_PARAMS:,}")
        return self


MAX_HEAD_PARAMS = 100_000_000  # a linear head on an 8B model's 4096 features has ~4096 x labels


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def head_param_shapes(shape: HeadShape) -> dict[str, tuple[int, ...]]:
    """Every tensor :func:`build_head` makes for ``shape``, by state-dict name (nothing allocated)."""
    d, k = shape.in_dim, shape.num_labels
    out: dict[str, tuple[int, ...]] = {"0.mean": (d,), "0.std": (d,)}
    if shape.kind == "linear":
        out.update({"1.weight": (k, d), "1.bias": (k,)})
    else:
        out.update({"1.weight": (shape.hidden, d), "1.bias": (shape.hidden,), "4.weight": (k, shape.hidden),
                    "4.bias": (k,)})
    return out


def standardize_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std (clamped away from 0) of ``x``: what the head's Standardize layer holds."""
    return x.mean(0), (x.std(0).clamp_min(1e-6) if x.shape[0] > 1 else x.new_ones(x.shape[1]))


def _standardize_cls():
    from torch import nn

    class Standardize(nn.Module):
        """Per-feature ``(x - mean) / std`` with statistics fitted on the training features.

        LLM hidden states have a few dimensions with huge activations; a per-sample
        LayerNorm lets those dominate, per-feature standardization does not. The
        statistics are buffers, so they travel in head.safetensors.
        """

        def __init__(self, dim: int) -> None:
            super().__init__()
            import torch

            self.register_buffer("mean", torch.zeros(dim))
            self.register_buffer("std", torch.ones(dim))

        def fit(self, feats) -> None:
            mean, std = standardize_stats(feats)
            self.mean.copy_(mean)
            self.std.copy_(std)

        def forward(self, x):
            return (x - self.mean) / self.std

    return Standardize


def build_head(shape: HeadShape):
    """Standardize -> Linear, or a small MLP (Standardize -> Linear -> GELU -> Dropout -> Linear).

    Call ``head[0].fit(train_features)`` before training.
    """
    from torch import nn

    std = _standardize_cls()(shape.in_dim)
    if shape.kind == "linear":
        return nn.Sequential(std, nn.Linear(shape.in_dim, shape.num_labels))
    return nn.Sequential(
        std,
        nn.Linear(shape.in_dim, shape.hidden),
        nn.GELU(),
        nn.Dropout(0.1),
        nn.Linear(shape.hidden, shape.num_labels),
    )


def head_logits(head, feats: torch.Tensor) -> torch.Tensor:
    """The head's logits for ``feats`` (fp32, eval mode, no gradients)."""
    import torch

    head.eval()
    with torch.no_grad():
        return head(feats.float())
