"""Linear probe on the concatenated CLS tokens of the last n blocks (optionally + mean patch token)."""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from chexfound.adapt.heads.base import Features, Head
from chexfound.models.pooled import linear_input_from_blocks


class LinearHead(Head):
    """A linear probe on the CLS tokens of the last blocks (and the last block's mean patch token with
    `avgpool`), DINOv2's linear evaluation head."""
    head_type = "linear"

    def __init__(self, findings: Sequence[str], n_blocks: int, task: str = "multilabel", embed_dim: int = 1024,
                 avgpool: bool = False) -> None:
        super().__init__(findings, n_blocks, task)
        self.embed_dim, self.avgpool = embed_dim, avgpool
        in_dim = embed_dim * (n_blocks + int(avgpool))
        self.linear = nn.Linear(in_dim, self.out_dim)
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def hparams(self) -> dict[str, Any]:
        """The constructor arguments beyond findings/blocks/task: what a head file records to rebuild it."""
        return {"embed_dim": self.embed_dim, "avgpool": self.avgpool}

    def forward(self, features: Features) -> tuple[Tensor, Tensor | None]:
        """Features -> (logits, None): no attention maps."""
        x = linear_input_from_blocks(features, self.n_blocks, self.avgpool)  # DINOv2's create_linear_input
        return self.linear(x.float()), None
