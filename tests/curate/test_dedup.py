from __future__ import annotations

import numpy as np

from chexfound.curate.dedup import Edges, embedding_edges, exact_groups, phash_edges, resolve


def _e(pairs, scores, method="phash"):
    i, j = (np.array(x, dtype=np.int64) for x in zip(*pairs))
    return Edges(i, j, method, np.array(scores, dtype=float))


def test_exact_groups_keep_the_best_ranked():
    digests = ["a", "b", "a", "a", "c"]
    rank = np.array([3, 0, 1, 2, 4])
    assert exact_groups(digests, rank).tolist() == [2, 1, 2, 2, 4]


def test_greedy_keeps_best_rank_and_never_chains():
    # 0~1 (d=3), 1~2 (d=5), 0 and 2 not matched; rank order 0, 1, 2
    rank = np.arange(3)
    r = resolve(3, rank, None, [_e([(0, 1), (1, 2)], [3, 5])])
    # 1 matches kept 0 -> dropped; 2 matches only the dropped 1 -> kept (no chain A~B~C)
    assert r.keep.tolist() == [True, False, True]
    assert r.dup_of.tolist() == [-1, 0, -1] and r.method[1] == "phash" and r.score[1] == 3


def test_dropped_item_names_its_closest_kept_match():
    rank = np.array([0, 1, 2])
    r = resolve(3, rank, None, [_e([(0, 2), (1, 2)], [9, 2])])
    assert r.keep.tolist() == [True, True, False] and r.dup_of[2] == 1 and r.score[2] == 2


def test_exact_first_then_near_among_survivors_with_method_preference():
    # 0 and 1 are exact copies; 2 is near 1 by phash and by embedding; rank prefers 1 over 0
    rank = np.array([1, 0, 2])
    best = exact_groups(["x", "x", "y"], rank)
    r = resolve(3, rank, best, [_e([(1, 2)], [7]), _e([(1, 2)], [0.999], "embedding")])
    assert r.keep.tolist() == [False, True, False]
    assert (r.method[0], r.dup_of[0]) == ("exact", 1)
    assert (r.method[2], r.dup_of[2]) == ("phash", 1)  # phash edges listed first win over embedding ones


def test_phash_and_embedding_edges_map_back_to_item_indices():
    hexes = ["00" * 32, "00" * 31 + "03", "ff" * 32]
    e = phash_edges(hexes, np.array([5, 7, 9]), threshold=2)
    assert e.i.tolist() == [5] and e.j.tolist() == [7] and e.score.tolist() == [2]
    emb = np.array([[1, 0, 0], [0.99, 0.1, 0], [0, 1, 0]], dtype=np.float32)
    e = embedding_edges(emb, np.array([4, 6, 8]), threshold=0.99, block=2)
    assert e.i.tolist() == [4] and e.j.tolist() == [6] and 0.99 <= e.score[0] <= 1


def test_exact_copies_never_name_a_removed_image():
    # 1 and 2 are exact copies (1 is their group's best); 0 outranks 1 and is near it, so 1 is dropped too:
    # 2 must then name 0 (what 1 was dropped for, at the same distance), never the removed 1
    rank = np.array([0, 1, 2])
    best = exact_groups(["a", "x", "x"], rank)
    r = resolve(3, rank, best, [_e([(0, 1)], [4])])
    assert r.keep.tolist() == [True, False, False]
    assert r.dup_of.tolist() == [-1, 0, 0]
    assert (r.method[2], r.score[2]) == ("phash", 4)
