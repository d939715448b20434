"""The probe sets of a run: sized from the labels, decoded once, a smaller set a subset of a larger one."""

from __future__ import annotations

import torch

from chexfound.ssl.probe import split_sizes
from chexfound.ssl.probe_sets import ProbeSets


def _rows_in(small: torch.Tensor, big: torch.Tensor) -> bool:
    flat = big.flatten(1)
    return all(bool((flat == row).all(1).any()) for row in small.flatten(1))


def test_sets_are_sized_from_the_labels_decoded_once_and_nested(tiny_config, data_root):
    kermany, nih = data_root / "kermany", data_root / "nih14-tiny64"
    sets = ProbeSets(tiny_config(f"probe.kermany={kermany}", f"probe.nih14={nih}", "probe.n_train=10",
                                 "probe.n_test=1000000000", "probe.final_n_train=1000000000", "probe.final_n_test=8"))
    k_tr, k_te, k_f = split_sizes("kermany", kermany)
    assert sets.periodic_sizes() == (10, k_te)
    finals = sets.final_sets()
    assert [(f.task, f.n_test) for f in finals] == [("kermany", 8), ("nih14", 8)]
    assert (finals[0].n_train, finals[0].n_findings) == (k_tr, k_f)  # capped by the labels, not the setting
    assert finals[1].n_train == split_sizes("nih14", nih)[0]
    assert sets.decoded == set()  # nothing decoded until asked for
    big = sets.get("kermany", 12, 8)
    assert sets.get("kermany", 12, 8) is big
    small = sets.get("kermany", 6, 4)
    assert sets.decoded == {"kermany:12+8", "kermany:6+4"}
    assert (len(small.train_labels), len(small.test_labels)) == (6, 4)
    assert _rows_in(small.train_images, big.train_images) and _rows_in(small.test_images, big.test_images)


def test_probes_off_means_no_sets(tiny_config):
    sets = ProbeSets(tiny_config())  # the tiny recipe sets probe.kermany=null
    assert sets.kermany is None and sets.nih14 is None and sets.final_sets() == []
