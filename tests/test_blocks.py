"""DataBlocks: 16 bits from file to batch, train-only mean, augmentation on train only, class balance, show_batch."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from cvfast.data.blocks import IntensityShift, TensorMammo, VerticalFlip, mean_grey, patch_dataloaders, save_batch_grid, whole_image_dataloaders
from cvfast.data.classes import PATCH_CLASSES
from cvfast.data.read import read_png


def test_16_bits_preserved_file_to_batch(s10):
    dls = patch_dataloaders(s10, bs=8, augment=False, balance=False)
    xb, _ = dls.valid.one_batch()
    assert isinstance(xb, TensorMammo) and xb.dtype == torch.float32 and xb.shape[1:] == (1, 48, 48)
    recovered = ((xb.double() + dls.info.mean_grey) * 65535).round().long().numpy()
    files = [read_png(p) for p in dls.valid_ds.items["path"][:8]]
    np.testing.assert_array_equal(recovered[:, 0], np.stack(files))
    assert (np.stack(files) % 257 != 0).mean() > 0.9  # genuinely 16-bit values, not 8-bit scaled up


def test_patch_mean_grey_is_the_whole_image_train_split_mean(s10, ddsm_data):
    dls = patch_dataloaders(s10, bs=8, augment=False)
    m = pd.read_csv(ddsm_data / "manifest.csv")
    files = lambda split: np.stack([read_png(ddsm_data / f) for f in m.loc[m["split"].isin(split), "path"]])  # noqa: E731
    assert dls.info.mean_grey == pytest.approx(files(["train"]).mean() / 65535, rel=1e-9)  # plain numpy, train images only
    assert dls.info.mean_grey != pytest.approx(files(["train", "valid", "test"]).mean() / 65535, rel=1e-6)
    p = pd.read_csv(s10 / "patches.csv")
    assert dls.info.mean_grey != pytest.approx(mean_grey([str(s10 / f) for f in p.loc[p["split"] == "train", "path"]]), rel=1e-3)
    assert set(dls.train_ds.items["split"]) == {"train"} and set(dls.valid_ds.items["split"]) == {"valid"}


def test_class_balanced_training_batches(s10):
    dls = patch_dataloaders(s10, bs=16, augment=False, seed=0)
    present = Counter(pd.read_csv(s10 / "patches.csv").query("split == 'train'")["label"])
    assert max(present.values()) >= 2 * min(present.values()), "fixture must be imbalanced for this test to mean anything"
    seen = Counter()
    for _ in range(15):
        for _, yb in dls.train:
            seen.update(PATCH_CLASSES[i] for i in yb.tolist())
    share = np.array([seen[c] for c in present]) / sum(seen.values())
    np.testing.assert_allclose(share, 1 / len(present), atol=0.04)


def test_augmentation_on_train_only(s10):
    plain = patch_dataloaders(s10, bs=8, augment=False, balance=False)
    aug = patch_dataloaders(s10, bs=8, augment=True, balance=False)
    xa, _ = aug.valid.one_batch()
    xp, _ = plain.valid.one_batch()
    torch.testing.assert_close(xa, xp, rtol=0, atol=0)
    same_items = lambda dl: dl.new(shuffle=False, drop_last=False).one_batch()[0]  # noqa: E731
    assert (same_items(aug.train) - same_items(plain.train)).abs().mean() > 1e-3


def test_vertical_flip_and_intensity_shift():
    x = TensorMammo(torch.arange(2 * 1 * 4 * 3, dtype=torch.float32).reshape(2, 1, 4, 3))
    flip = VerticalFlip(p=1.0)
    torch.testing.assert_close(flip((x, torch.zeros(2)), split_idx=0)[0], x.flip(-2))
    assert torch.equal(flip((x, torch.zeros(2)), split_idx=1)[0], x)  # never on validation
    shift = IntensityShift(max_shift=0.1)
    out = shift((x, torch.zeros(2)), split_idx=0)[0] - x
    per_item = out.flatten(1)
    assert torch.allclose(per_item, per_item[:, :1].expand_as(per_item), atol=1e-5) and per_item.abs().max() <= 0.1


def test_whole_image_dataloaders(ddsm_data):
    dls = whole_image_dataloaders(ddsm_data, bs=2, augment=True)
    xb, yb = dls.one_batch()
    assert xb.shape == (2, 1, 256, 192) and dls.vocab == ["no_cancer", "cancer"]
    assert "test" not in set(dls.train_ds.items["split"]) | set(dls.valid_ds.items["split"])


def test_show_batch_on_both(s10, ddsm_data, tmp_path):
    for dls, name in [(patch_dataloaders(s10, bs=8), "p.png"), (whole_image_dataloaders(ddsm_data, bs=4), "w.png")]:
        out = save_batch_grid(dls, tmp_path / name, max_n=4)
        assert out.stat().st_size > 5000
