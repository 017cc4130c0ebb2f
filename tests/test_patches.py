"""Patch sets: counts and labels match the ground truth, backgrounds clear of every ROI, determinism."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import PATCH, run_cli

from cvfast.data.classes import PATCH_CLASSES
from cvfast.data.crop import segment_breast
from cvfast.data.manifest import read_manifest
from cvfast.data.read import read_png
from cvfast.data.sample import PATCH_SETS, make_patches


def test_s10_counts_and_labels_match_ground_truth(s10, truth):
    p = pd.read_csv(s10 / "patches.csv", dtype={"image_id": str})
    gt = truth["ddsm"]["images"]
    expected = {"background": 10 * len(gt)}
    for im in gt.values():
        for a in im["abnormalities"]:
            cls = f"{a['kind']}_{'malignant' if a['malignant'] else 'benign'}"
            expected[cls] = expected.get(cls, 0) + 10
    assert p["label"].value_counts().to_dict() == expected
    assert (p["class_idx"] == p["label"].map(PATCH_CLASSES.index)).all()
    assert json.loads((s10 / "patchset.json").read_text())["classes"] == PATCH_CLASSES
    assert len(pd.read_csv(s10 / "rejects.csv")) == 0
    for path in p["path"].sample(20, random_state=0):
        arr = read_png(s10 / path)
        assert arr.shape == (PATCH, PATCH) and arr.dtype == np.uint16


def test_split_and_patient_carried_over(s10, ddsm_data):
    m = read_manifest(ddsm_data).set_index("image_id")
    p = pd.read_csv(s10 / "patches.csv", dtype={"image_id": str, "patient_id": str})
    assert (p["split"].to_numpy() == m.loc[p["image_id"], "split"].to_numpy()).all()
    assert (p["patient_id"].to_numpy() == m.loc[p["image_id"], "patient_id"].to_numpy()).all()
    assert p.groupby("patient_id")["split"].nunique().max() == 1


def test_background_patches_clear_of_every_roi(s10, ddsm_data):
    m = read_manifest(ddsm_data).set_index("image_id")
    p = pd.read_csv(s10 / "patches.csv", dtype={"image_id": str})
    checked_multi = 0
    for image_id, group in p[p["label"] == "background"].groupby("image_id"):
        masks = [read_png(a["mask"]) > 0 for a in m.loc[image_id, "abnormalities"]]
        union = np.logical_or.reduce(masks)
        img = read_png(m.loc[image_id, "path"])
        breast = segment_breast(img)
        checked_multi += len(masks) > 1
        for r in group.itertuples():
            y0, x0 = r.cy - PATCH // 2, r.cx - PATCH // 2
            window = (slice(max(y0, 0), y0 + PATCH), slice(max(x0, 0), x0 + PATCH))
            assert not union[window].any(), f"background patch {r.patch_id} touches an ROI"
            assert breast[window].mean() >= 0.4, f"background patch {r.patch_id} is off the breast"
    assert checked_multi > 0, "the fixture must include images with several ROIs"


def test_roi_patches_cover_their_roi(s10, ddsm_data):
    m = read_manifest(ddsm_data).set_index("image_id")
    p = pd.read_csv(s10 / "patches.csv", dtype={"image_id": str})
    for r in p[p["label"] != "background"].itertuples():
        abn_id = int(r.patch_id.split("_roi")[1].split("_")[0])
        roi = read_png(m.loc[r.image_id, "abnormalities"][abn_id - 1]["mask"]) > 0
        y0, x0 = r.cy - PATCH // 2, r.cx - PATCH // 2
        inside = roi[max(y0, 0) : y0 + PATCH, max(x0, 0) : x0 + PATCH].sum()
        assert inside >= 0.5 * min(roi.sum(), PATCH * PATCH)


def test_s1_is_centred_and_deterministic(ddsm_data, tmp_path):
    spec = replace(PATCH_SETS["s1"], size=PATCH)
    a = make_patches(ddsm_data, spec, out=tmp_path / "a", workers=1)
    b = make_patches(ddsm_data, spec, out=tmp_path / "b", workers=2)
    c = make_patches(ddsm_data, replace(spec, seed=1), out=tmp_path / "c", workers=1)
    pd.testing.assert_frame_equal(a, b)
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in a["path"])
    assert not a[["cy", "cx"]].equals(c[["cy", "cx"]])
    m = read_manifest(ddsm_data).set_index("image_id")
    for r in a[a["label"] != "background"].itertuples():
        abn_id = int(r.patch_id.split("_roi")[1].split("_")[0])
        ys, xs = np.nonzero(read_png(m.loc[r.image_id, "abnormalities"][abn_id - 1]["mask"]))
        assert abs(r.cy - (ys.min() + ys.max()) / 2) <= 0.5 and abs(r.cx - (xs.min() + xs.max()) / 2) <= 0.5
    assert (a["label"] == "background").sum() == len(m)


def test_patches_need_rois(inbreast_data):
    r = run_cli("patches", str(inbreast_data))
    assert r.returncode == 1 and "no image has an ROI mask" in r.stderr


def test_cli_patches_prints_table(ddsm_data, tmp_path):
    r = run_cli("patches", str(ddsm_data), "--set", "s1", "--size", "32", "--out", str(tmp_path / "p"))
    assert r.returncode == 0, r.stderr
    assert "background" in r.stdout and (tmp_path / "p" / "patches.csv").is_file()


def test_patch_set_refused_after_the_manifest_changes(ddsm_data, tmp_path):
    import shutil

    from cvfast.data.blocks import patch_dataloaders
    from cvfast.errors import CvfastError

    data = Path(shutil.copytree(ddsm_data, tmp_path / "data"))
    make_patches(data, replace(PATCH_SETS["s1"], size=PATCH), workers=1)
    patch_dataloaders(data / "patches_s1", bs=4)  # fine while the manifest is unchanged
    m = pd.read_csv(data / "manifest.csv")
    m.loc[m["split"] == "valid", "split"] = "train"
    m.to_csv(data / "manifest.csv", index=False)
    with pytest.raises(CvfastError, match="changed since these patches were cut"):
        patch_dataloaders(data / "patches_s1", bs=4)


def test_edge_share_puts_background_patches_on_the_skin_line_and_the_border(ddsm_data, tmp_path):
    plain = make_patches(ddsm_data, replace(PATCH_SETS["s10"], size=PATCH), out=tmp_path / "plain", workers=1)
    r = run_cli("patches", str(ddsm_data), "--size", str(PATCH), "--edge-share", "0.4", "--out", str(tmp_path / "edge"))
    assert r.returncode == 0, r.stderr
    edged = pd.read_csv(tmp_path / "edge" / "patches.csv", dtype={"image_id": str})
    assert json.loads((tmp_path / "edge" / "patchset.json").read_text())["spec"]["edge_share"] == 0.4
    m = read_manifest(ddsm_data).set_index("image_id")
    kinds = {"skin": 0, "border": 0}
    for image_id, group in edged[edged["label"] == "background"].groupby("image_id"):
        assert len(group) == 10
        edge = group[group["patch_id"].str.contains("_edge_")]
        assert len(edge) == 4, image_id
        # the inner patches are the paper sampler's own, minus the share the edge took
        inner = group[group["patch_id"].str.contains("_bg_")][["cy", "cx"]].to_numpy()
        first = plain[(plain["image_id"] == image_id) & (plain["label"] == "background")][["cy", "cx"]].to_numpy()[:6]
        assert np.array_equal(inner, first)
        img = read_png(m.loc[image_id, "path"])
        breast = segment_breast(img)
        union = np.logical_or.reduce([read_png(a["mask"]) > 0 for a in m.loc[image_id, "abnormalities"]] or [np.zeros(img.shape, bool)])
        for p in edge.itertuples():
            y0, x0 = p.cy - PATCH // 2, p.cx - PATCH // 2
            assert 0 <= y0 and y0 + PATCH <= img.shape[0] and 0 <= x0 and x0 + PATCH <= img.shape[1], "an edge patch lies inside the image"
            window = breast[y0 : y0 + PATCH, x0 : x0 + PATCH]
            assert not union[y0 : y0 + PATCH, x0 : x0 + PATCH].any() and window.mean() >= 0.25
            on_skin = not window.all()  # background beside the breast inside the window
            on_border = (y0 == 0 and window[0].any()) or (x0 == 0 and window[:, 0].any()) or \
                (y0 + PATCH == img.shape[0] and window[-1].any()) or (x0 + PATCH == img.shape[1] and window[:, -1].any())
            assert on_skin or on_border, f"{p.patch_id} is inner tissue"
            kinds["skin" if on_skin else "border"] += 1
    assert min(kinds.values()) > 0, kinds


def test_edge_centres_alternate_skin_line_and_border_and_keep_clear_of_rois():
    from cvfast.data.sample import PatchSetSpec, edge_centres

    yy, xx = np.mgrid[:64, :64]
    breast = (xx**2 + (yy - 32) ** 2) < 30**2  # a half disc against the left border only: the chest wall
    rois = np.zeros_like(breast)
    rois[:, :20] = True  # everything near the chest wall is lesion: only skin-line patches are left
    spec = PatchSetSpec(size=16)
    free = edge_centres(np.random.default_rng(0), breast, np.zeros_like(breast), spec, 6)
    assert len(free) == 6 and len(set(free)) == 6
    assert [cx == 8 for _, cx in free] == [False, True] * 3  # skin line, chest wall, skin line, ...
    blocked = edge_centres(np.random.default_rng(0), breast, rois, spec, 6)
    assert len(blocked) == 6 and all(cx - 8 >= 20 for _, cx in blocked)
    with pytest.raises(Exception, match="edge-share"):
        PatchSetSpec(edge_share=1.5)
