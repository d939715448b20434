import numpy as np
import pandas as pd
import pytest

from chexfound.data.transform import InputTransform
from chexfound.errors import ManifestError
from chexfound.evaluate.box_scores import (LocalisationItem, box_mask, centre_prior, map_boxes, mass_in_boxes,
                                             pointing_hit, read_boxes, score_items, summarise)


@pytest.mark.parametrize("mode", ["crop", "pad"])
@pytest.mark.parametrize("hw", [(300, 200), (200, 300), (512, 512)])
def test_boxes_follow_the_transform_geometry(mode, hw):
    """Paint a box into an image, run the real transform geometry and check the mapped box covers the paint."""
    h, w = hw
    box = np.array([[60.0, 50.0, 70.0, 90.0]])  # x y w h (inside the centre crop for every shape here)
    img = np.zeros((h, w), dtype=np.float32)
    img[50:140, 60:130] = 1.0
    size = 64
    out = InputTransform(size=size, mode=mode).geometry(img).numpy()
    mapped = map_boxes(box, (h, w), size, mode)
    m = box_mask(mapped, size)
    painted = out > 0.5
    inter = (m & painted).sum() / max(1, (m | painted).sum())
    assert inter > 0.8, (mapped, inter)


def test_crop_clips_boxes_outside():
    # 200 wide x 100 tall -> scale 0.64 to 64 px tall, 128 wide, crop 32 px off each side.
    mapped = map_boxes(np.array([[0, 0, 40, 100]]), (100, 200), 64, "crop")
    assert mapped[0].tolist() == pytest.approx([0, 0, 0, 64])  # entirely cut off horizontally


def test_pointing_and_mass_hand_cases():
    hm = np.zeros((10, 10))
    hm[2, 3] = 1.0  # peak at (x=3.5, y=2.5)
    boxes = np.array([[3, 2, 5, 4]])
    assert pointing_hit(hm, boxes)
    assert not pointing_hit(hm, np.array([[5, 5, 8, 8]]))
    assert pointing_hit(hm, np.array([[5, 5, 8, 8]]), tolerance=3.6)  # distance sqrt(1.5^2+2.5^2)=2.9
    m = box_mask(boxes, 10)
    assert m.sum() == 4 and mass_in_boxes(hm, m) == 1.0
    assert mass_in_boxes(np.ones((10, 10)), m) == pytest.approx(0.04)


def test_centre_prior_peaks_at_the_centre():
    cp = centre_prior(64)
    assert cp.argmax() in {np.ravel_multi_index((31, 31), (64, 64)), np.ravel_multi_index((32, 32), (64, 64))}


def test_read_boxes_renames_and_validates(tmp_path, data_root):
    df = read_boxes(data_root / "nih14" / "boxes.csv", rename={"Infiltrate": "Infiltration"})
    assert "Infiltration" in set(df["finding"]) and "Infiltrate" not in set(df["finding"])
    bad = tmp_path / "b.csv"
    pd.DataFrame({"image_id": ["a"], "finding": ["X"], "x": [1], "y": [1], "w": [0], "h": [3]}).to_csv(bad)
    with pytest.raises(ManifestError, match="non-positive"):
        read_boxes(bad)
    vindr = tmp_path / "v.csv"
    pd.DataFrame({"image_id": ["a"], "class_name": ["Nodule/Mass"], "x_min": [1], "y_min": [2], "x_max": [5],
                  "y_max": [9]}).to_csv(vindr, index=False)
    v = read_boxes(vindr)
    assert v.loc[0, ["x", "y", "w", "h"]].tolist() == [1, 2, 4, 7]


def test_score_and_summarise_model_beats_centre_prior_when_it_points_at_boxes():
    rng = np.random.default_rng(0)
    items = []
    for i in range(30):
        x0, y0 = rng.integers(0, 20, 2)  # boxes in a corner, away from the centre
        boxes = np.array([[x0, y0, x0 + 8, y0 + 8]], dtype=float)
        hm = np.zeros((64, 64))
        hm[y0 + 4, x0 + 4] = 1.0
        hm += 0.001
        items.append(LocalisationItem(f"im{i}", f"p{i // 2}", "A" if i % 3 else "B", hm, boxes))
    scores = score_items(items)
    assert scores["pointing"].mean() == 1.0 and scores["centre_pointing"].mean() == 0.0
    s = summarise(scores, n_boot=100)
    assert s["overall"]["pointing"] == 1.0 and s["overall"]["mass"] > s["overall"]["centre_mass"]
    assert s["overall"]["n_patients"] == 15 and set(s["per_finding"]) == {"A", "B"}
    lo, hi = s["overall"]["mass_ci"]
    assert lo <= s["overall"]["mass"] <= hi
