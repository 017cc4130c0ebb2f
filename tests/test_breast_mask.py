"""The breast mask follows the skin line, blanking removes what lies outside it, and ROIs off the breast are rejected."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from cvfast.data.crop import CropSpec, cut_breast, segment_breast
from cvfast.data.ingest import prepare_mias
from cvfast.data.ingest.common import PrepareOptions
from cvfast.data.manifest import read_manifest
from cvfast.data.read import read_png

G = 257  # 8-bit grey levels as 16-bit values


def fatty_breast(h: int = 400, w: int = 320) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A film-like mammogram: faint fatty tissue out to the skin line around a dense core, a bright label apart from it.

    Returns the image, the true breast and the label's pixels.
    """
    rng = np.random.default_rng(0)
    yy, xx = np.ogrid[:h, :w]
    breast = ((xx - 0) / (0.8 * w)) ** 2 + ((yy - h / 2) / (0.42 * h)) ** 2 < 1  # against the left edge (chest wall)
    dense = ((xx - 0) / (0.45 * w)) ** 2 + ((yy - h / 2) / (0.25 * h)) ** 2 < 1
    img = np.full((h, w), 6 * G, np.float64) + rng.normal(0, 2 * G, (h, w))  # film background with grain
    img[breast] = 45 * G + rng.normal(0, 3 * G, int(breast.sum()))  # fatty tissue: faint, as at the skin line
    img[dense] = 200 * G
    label = np.zeros((h, w), bool)
    label[20:50, w - 70 : w - 20] = True  # a film label in the corner, clear of the breast
    img[label] = 250 * G
    return np.clip(img, 0, 65535).astype(np.uint16), breast, label


def test_mask_keeps_the_faint_skin_line_of_a_fatty_breast_and_drops_the_label():
    img, breast, label = fatty_breast()
    mask = segment_breast(img)
    fatty = breast & ~(((np.ogrid[:400, :320][1]) / (0.45 * 320)) ** 2 + ((np.ogrid[:400, :320][0] - 200) / 100.0) ** 2 < 1)
    assert mask[fatty].mean() > 0.95  # Otsu's threshold alone falls between fat and dense tissue and cuts the fat away
    assert not mask[label].any()
    assert mask[~breast].mean() < 0.02  # and the background stays out


def test_blanking_sets_everything_outside_the_breast_to_the_background_and_keeps_the_breast():
    img, breast, label = fatty_breast()
    cut, crop, mask = cut_breast(img, CropSpec(breast=False, blank=True))
    assert crop.box == (0, 0, *img.shape) and not crop.flipped
    assert np.array_equal(cut[mask], img[mask])  # tissue untouched
    outside = cut[~mask]
    assert outside.min() == outside.max() and abs(int(outside[0]) - 6 * G) < 3 * G  # one value: the film background's
    assert cut[label].max() < 20 * G  # the label is gone
    kept, _, _ = cut_breast(img, CropSpec(breast=False, flip_to="left"))
    assert np.array_equal(kept, img)  # without blank nothing is changed (the breast is on the left already)


def test_crop_spec_without_blank_reads_as_before():
    """Models and manifests written before `blank` existed carry specs without it: they mean no blanking."""
    assert CropSpec(**{"breast": True, "flip_to": None, "margin": 0.01}) == CropSpec(breast=True, blank=False)


def _write_mias(folder, info_lines: list[str], images: dict[str, np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Info.txt").write_text("\n".join(info_lines) + "\n")
    for name, px in images.items():
        Image.fromarray((px // G).astype(np.uint8)).save(folder / f"{name}.png")


def test_an_roi_off_the_breast_is_rejected_with_its_reason_and_the_image_kept(tmp_path):
    img, breast, _ = fatty_breast(256, 256)
    # mini-MIAS y counts from the bottom: (x, y) = (30, 128) is on the breast, (230, 230) is in the background corner
    _write_mias(tmp_path / "src", ["mdb001 F CIRC M 30 128 12", "mdb002 F CIRC B 230 230 10", "mdb003 F NORM", "mdb004 F NORM"],
                {f"mdb00{i}": img for i in range(1, 5)})
    # same pixels four times would be de-duplicated; vary them a little
    for i in range(2, 5):
        px = img.copy()
        px[100 + i, 20] += G
        Image.fromarray((px // G).astype(np.uint8)).save(tmp_path / "src" / f"mdb00{i}.png")
    df = prepare_mias(tmp_path / "src", PrepareOptions(out=tmp_path / "d", size=(128, 128), workers=1, valid_frac=0, test_frac=0,
                                                        crop=CropSpec(breast=True, blank=True)))
    rejects = pd.read_csv(tmp_path / "d" / "rejects.csv")
    off = rejects[rejects["row"].astype(str).str.startswith("mdb002")]
    assert len(off) == 1 and "lies off the breast" in off["reason"].iloc[0]
    m = read_manifest(tmp_path / "d").set_index("image_id")
    assert m.loc["mdb001", "abnormalities"][0]["mask"] and read_png(m.loc["mdb001", "abnormalities"][0]["mask"]).any()
    assert "mdb002" in m.index and m.loc["mdb002", "abnormalities"][0]["mask"] == ""  # kept for its label, without the ROI
    assert len(df) == 4
