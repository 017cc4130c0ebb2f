"""mini-MIAS adapter (real data; circular ROIs from Info.txt become masks).

Dataset: Suckling et al., "The Mammographic Image Analysis Society Digital Mammogram Database", Excerpta
Medica International Congress Series 1069:375-378 (1994); the 1024x1024 "mini" version from
http://peipa.essex.ac.uk/info/mias.html (research-use licence). Point ``cvfast prepare mias`` at the folder
holding ``Info.txt`` and ``mdb001.pgm|png`` ... ``mdb322``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pandas as pd

from cvfast.data.convert import ImageJob, RoiSpec
from cvfast.data.ingest.common import PrepareOptions, check_source, finish
from cvfast.data.manifest import abnormality
from cvfast.errors import CvfastError

log = logging.getLogger(__name__)

CLASSES = {"CALC": "calc", "CIRC": "mass", "SPIC": "mass", "MISC": "mass", "ARCH": "mass", "ASYM": "mass"}
LINE = re.compile(r"^(mdb\d{3})\s+([FGD])\s+([A-Z]+)(?:\s+([BM]))?(?:\s+(\d+)\s+(\d+)\s+(\d+))?", re.I)


def parse_info(path: Path) -> tuple[dict[str, list[dict]], list[dict]]:
    """Info.txt rows grouped by image (several rows per image happen), plus rejects for lines that do not parse."""
    rows: dict[str, list[dict]] = {}
    rejects = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.startswith("mdb"):
            continue  # the file carries a free-text preamble
        m = LINE.match(line.strip())
        cls = m[3].upper() if m else ""
        if not m or (cls != "NORM" and cls not in CLASSES) or (cls != "NORM" and not m[4]):
            rejects.append({"source": str(path), "row": f"line {n}", "reason": f"cannot parse {line.strip()!r}"})
            continue
        entry = {"tissue": m[2].upper(), "class": cls, "severity": (m[4] or "").upper(),
                 "circle": (float(m[5]), float(m[6]), float(m[7])) if m[5] else None, "line": n}
        same = [e for e in rows.get(m[1].lower(), []) if {**e, "line": n} == entry]
        if same:  # one abnormality listed twice: count it once
            rejects.append({"source": str(path), "row": f"line {n}", "reason": f"repeats line {same[0]['line']} ({line.strip()!r}); counted once"})
            continue
        rows.setdefault(m[1].lower(), []).append(entry)
    return rows, rejects


def prepare_mias(source: str | Path, opts: PrepareOptions) -> pd.DataFrame:
    """Ingest mini-MIAS: y origin at the bottom, several rows per image, rows without coordinates, pairs = women."""
    source = check_source(source, "mini-MIAS folder")
    info = source / "Info.txt"
    if not info.is_file():
        raise CvfastError(f"{source}: no Info.txt (the mini-MIAS truth file)")
    rows, rejects = parse_info(info)
    files = {p.stem.lower(): p for p in sorted(source.iterdir()) if p.suffix.lower() in (".pgm", ".png", ".tif", ".tiff")}
    images, jobs = {}, []
    no_coords = []
    for ref, entries in sorted(rows.items()):
        if ref not in files:
            rejects.append({"source": str(info), "row": ref, "reason": f"{ref}: listed in Info.txt but no {ref}.pgm/.png in {source}"})
            continue
        number = int(ref[3:])
        abns, rois = [], []
        for e in (e for e in entries if e["class"] != "NORM"):
            abn_id = len(abns) + 1
            abns.append(abnormality(abn_id, CLASSES[e["class"]], e["severity"] == "M", mias_class=e["class"]))
            if e["circle"]:
                rois.append(RoiSpec(abn_id, circle=e["circle"], y_from_bottom=True))
            else:
                no_coords.append(ref)
        images[ref] = {"patient_id": f"mias_{(number + 1) // 2:03d}", "side": "L" if number % 2 == 0 else "R", "view": "MLO",
                       "label": int(any(a["pathology"] == "MALIGNANT" for a in abns)), "tissue": entries[0]["tissue"], "abnormalities": abns}
        jobs.append(ImageJob(ref, str(files[ref]), rois))
    for ref in sorted(set(files) - set(rows)):
        rejects.append({"source": str(files[ref]), "row": "", "reason": "not listed in Info.txt (no label)"})
    if no_coords:
        log.info("%d abnormalities without coordinates (%s): kept for image labels, no ROI mask", len(no_coords), ", ".join(no_coords))
    return finish("mini-mias", images, jobs, rejects, opts, inputs=[info])
