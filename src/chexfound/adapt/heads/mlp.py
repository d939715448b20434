"""MLP probe: the linear probe's input (last-n CLS tokens, optionally + mean patch token) through hidden layers."""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from chexfound.adapt.heads.base import Features, Head
from chexfound.models.pooled import linear_input_from_blocks


class MLPHead(Head):
    """An MLP probe on the same input as `LinearHead`: `num_layers` hidden layers of `hidden_dim` with GELU and
    dropout."""
    head_type = "mlp"

    def __init__(self, findings: Sequence[str], n_blocks: int, task: str = "multilabel", embed_dim: int = 1024,
                 avgpool: bool = False, hidden_dim: int = 1024, num_layers: int = 1, dropout: float = 0.1) -> None:
        super().__init__(findings, n_blocks, task)
        if num_layers < 1:
            raise ValueError("an MLP head needs at least one hidden layer (use LinearHead for none)")
        self.embed_dim, self.avgpool = embed_dim, avgpool
        self.hidden_dim, self.num_layers, self.dropout = hidden_dim, num_layers, dropout
        dims = [embed_dim * (n_blocks + int(avgpool))] + [hidden_dim] * num_layers
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            # LayerNorm first: frozen-backbone CLS features of different blocks have very different scales.
            layers += [nn.LayerNorm(a), nn.Linear(a, b), nn.GELU(), nn.Dropout(dropout)]
        self.mlp = nn.Sequential(*layers)
        self.out = nn.Linear(hidden_dim, self.out_dim)
        nn.init.normal_(self.out.weight, std=0.01)
        nn.init.zeros_(self.out.bias)

    def hparams(self) -> dict[str, Any]:
        """The constructor arguments beyond findings/blocks/task: what a head file records to rebuild it."""
        return {"embed_dim": self.embed_dim, "avgpool": self.avgpool, "hidden_dim": self.hidden_dim,
                "num_layers": self.num_layers, "dropout": self.dropout}

    def forward(self, features: Features) -> tuple[Tensor, Tensor | None]:
        """Features -> (logits, None): no attention maps."""
        x = linear_input_from_blocks(features, self.n_blocks, self.avgpool)  # DINOv2's create_linear_input
        return self.out(self.mlp(x.float())), None
