"""Head types: one registry in chexfound.adapt.heads that the CLI choices, the evaluate trainers, option checks and
head files all read."""

from __future__ import annotations

import pytest

from chexfound.adapt.heads import HEAD_TYPES, GloriHead, LinearHead, MLPHead, head_class
from chexfound.adapt.heads.base import Head
from chexfound.cli.main import build_parser
from chexfound.evaluate.trainers import ADAPT_HEADS, AdaptTrainer


def test_the_registry_holds_each_head_class_once() -> None:
    assert HEAD_TYPES == {"glori": GloriHead, "linear": LinearHead, "mlp": MLPHead}
    assert set(ADAPT_HEADS) == set(HEAD_TYPES) and head_class("mlp") is MLPHead
    assert GloriHead.needs_tokens and not LinearHead.needs_tokens and not MLPHead.needs_tokens
    with pytest.raises(ValueError, match="unknown head type 'nope'; known: glori, linear, mlp"):
        head_class("nope")


def test_a_registered_head_is_a_choice_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    class ToyHead(LinearHead):  # no head_type: not registered by itself
        pass

    monkeypatch.setitem(HEAD_TYPES, "toy", ToyHead)
    parser = build_parser()
    assert parser.parse_args(["adapt", "--train", "t.csv", "--out", "o", "--head", "toy"]).head == "toy"
    assert parser.parse_args(["evaluate", "--out", "o", "--head", "toy", "--head", "logistic"]).head == \
        ["toy", "logistic"]
    head = AdaptTrainer("toy", ["A", "B"], 2, 8)._make()
    assert isinstance(head, ToyHead) and isinstance(head, Head) and head.findings == ["A", "B"]
    with pytest.raises(SystemExit):
        parser.parse_args(["adapt", "--train", "t.csv", "--out", "o", "--head", "nope"])
