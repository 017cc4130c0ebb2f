"""A case review of a predictions file: a static HTML page (metrics, plots, every case, the worst errors with heatmaps).

The page opens from the file system in any browser: no server, no external scripts or styles, images as PNG files
beside it (thumbnails lazy-loaded). The case table is plain HTML, so everything reads with JavaScript off; a small
inline script only sorts, filters and paginates it, which keeps 10,000 cases responsive.
"""

from __future__ import annotations

import hashlib
import html
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cvfast.data.read import read_mammogram, resize
from cvfast.errors import CvfastError
from cvfast.infer.evaluate import REPORT_FILES, EvalSettings, read_predictions, run_evaluation, unit_of, write_report
from cvfast.infer.heatmap import heatmap, overlay
from cvfast.models.artifact import model_files
from cvfast.util.files import atomic_write_bytes, check_output_name, refuse_overwrite, unique_stems
from cvfast.util.parallel import parallel_map
from cvfast.util.progress import progress_bar

log = logging.getLogger(__name__)

OUTCOMES = ("TP", "FP", "FN", "TN")
PAGE = "index.html"
THUMBS, ERRORS = "thumbs", "errors"


@dataclass
class ReviewSettings:
    """What the review shows: the operating point that splits cases into TP/FP/FN/TN, how many errors get heatmaps."""

    point: str = "youden"  # an operating point of the evaluation: youden, specificity_0.9, fixed_0.5, ...
    errors: int = 6  # false negatives and false positives each shown large, with the model's heatmap
    thumb_height: int = 128
    error_height: int = 512  # large enough for a person to read the breast
    page_size: int = 100  # rows per page when JavaScript paginates
    workers: int = 1  # processes writing thumbnails


def outcomes(label: np.ndarray, score: np.ndarray, threshold: float) -> np.ndarray:
    """TP/FP/FN/TN of each case when score >= threshold is called positive."""
    call = np.asarray(score) >= threshold
    label = np.asarray(label).astype(bool)
    return np.select([call & label, call & ~label, ~call & label], ["TP", "FP", "FN"], "TN")


def review(preds: str | Path, out: str | Path, model: str | Path | None = None, settings: EvalSettings | None = None,
           options: ReviewSettings | None = None, labels: str | Path | None = None) -> Path:
    """Write the review page OUT/index.html (+ the evaluation report, plots, thumbnails, error overlays); returns its path."""
    settings, options, out = settings or EvalSettings(), options or ReviewSettings(), Path(out)
    points = ("youden", "fixed_0.5", *(f"specificity_{s:g}" for s in settings.specificities))
    if options.point not in points:  # before the bootstrap, not after it
        raise CvfastError(f"--point {options.point}: expected one of {', '.join(points)}")
    images = read_predictions(preds, labels, settings.score)
    if "path" not in images.columns:
        raise CvfastError(f"{preds}: no 'path' column, so the review has no images to show; review a `cvfast predict` output")
    blank = images["path"].isna() | (images["path"].astype(str).str.strip() == "")
    if blank.any():
        raise CvfastError(f"{preds}: row {int(images.index[blank][0]) + 2} (image_id {images.loc[blank, 'image_id'].iloc[0]}): empty path")
    ev = run_evaluation(preds, settings, labels=labels, one_class=True)  # one class: the cases are still worth a look
    if options.point not in ev.report["operating_points"]:
        raise CvfastError(f"--point {options.point}: no such operating point here (thresholds chosen on {ev.report['thresholds_chosen_on']}); "
                          f"use --point {', '.join(ev.report['operating_points'])}")
    op = ev.report["operating_points"][options.point]
    images = images.assign(path=images["path"].astype(str), unit=unit_of(images, settings.by))
    cases = ev.cases.assign(outcome=outcomes(ev.cases["label"], ev.cases[settings.score], op["threshold"]))
    members = images[images["unit"].isin(cases["unit"])].sort_values(["unit", "view" if "view" in images.columns else "image_id"])
    inputs = [str(preds), *map(str, members["path"]), *([str(labels)] if labels else []), *(map(str, model_files(model)) if model else [])]
    thumb_names = _thumb_names(members["path"], options.thumb_height)
    error_rows = _worst_errors(cases, settings.score, options.errors)
    planned = [out / PAGE, *(out / n for n in REPORT_FILES), *(out / THUMBS / n for n in thumb_names.values())]
    refuse_overwrite(planned, inputs, hint="choose another --out for the review")
    check_output_name(out / PAGE)
    write_report(ev.report, ev.curves, out)
    unit_paths = members.groupby("unit")["path"].apply(list).to_dict()
    unreadable = _write_thumbnails(out / THUMBS, thumb_names, options)
    errors = _write_errors(out / ERRORS, error_rows, unit_paths, model, options, inputs)
    page = _page(ev.report, op, options, cases, unit_paths, thumb_names, errors, settings, unreadable)
    atomic_write_bytes(out / PAGE, page.encode())
    log.info("review of %d %ss written to %s", len(cases), settings.by, out / PAGE)
    return out / PAGE


def _thumb_names(paths: pd.Series, height: int) -> dict[str, str]:
    """A thumbnail file name per source image: a safe stem plus a digest of the full path, the file's size and mtime and the
    thumbnail height, so a rerun reuses a thumbnail only while its source is unchanged (not after a re-prepare, say)."""
    unique = list(dict.fromkeys(paths))
    stems = unique_stems(Path(p).stem for p in unique)

    def key(path: str) -> str:
        try:
            st = os.stat(path)
            return f"{path}|{st.st_size}|{st.st_mtime_ns}|{height}"
        except OSError:  # unreadable: reported when the thumbnail is drawn
            return f"{path}|{height}"

    return {p: f"{stems[Path(p).stem]}-{hashlib.sha1(key(p).encode()).hexdigest()[:10]}.png" for p in unique}


def _worst_errors(cases: pd.DataFrame, score: str, n: int) -> pd.DataFrame:
    """The n missed cancers with the lowest scores and the n flagged normals with the highest."""
    fn = cases[cases["outcome"] == "FN"].sort_values(score, kind="stable").head(n)
    fp = cases[cases["outcome"] == "FP"].sort_values(score, ascending=False, kind="stable").head(n)
    return pd.concat([fn, fp])


def _grey_png(pixels: np.ndarray, height: int) -> bytes:
    """An 8-bit PNG of a grey image at the given height, aspect kept."""
    from PIL import Image

    h, w = pixels.shape
    small = resize(pixels, (height, max(1, round(height * w / h))))
    scaled = small.astype(np.float32) / (65535.0 if small.dtype == np.uint16 else 1.0 if small.dtype.kind == "f" else 255.0)
    buf = io.BytesIO()
    Image.fromarray((np.clip(scaled, 0, 1) * 255 + 0.5).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _thumbnail(args: tuple[str, str, int]) -> str | None:
    """Worker: write one thumbnail (kept when it exists: written atomically, named by its source as it is now); the error text if unreadable."""
    source, target, height = args
    if Path(target).is_file():
        return None
    try:
        atomic_write_bytes(Path(target), _grey_png(read_mammogram(source).pixels, height), cache=True)
    except CvfastError as e:
        return str(e)
    return None


def _write_thumbnails(folder: Path, names: dict[str, str], options: ReviewSettings) -> dict[str, str]:
    """Every case image's thumbnail (parallel, resumable); returns the unreadable sources with the reason (logged too)."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(src, str(folder / name), options.thumb_height) for src, name in names.items()]
    failed = {}
    for (src, _, _), error in zip(jobs, parallel_map(_thumbnail, jobs, options.workers, "thumbnails", chunksize=16)):
        if error:
            log.warning("thumbnail not drawn: %s", error)
            failed[src] = error
    return failed


def _write_errors(folder: Path, rows: pd.DataFrame, paths: dict[str, list[str]], model: str | Path | None, options: ReviewSettings,
                  inputs: list[str]) -> list[dict]:
    """Large image + heatmap overlay PNGs of the worst errors (each image of an error unit); their file names per unit."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    shown = []
    todo = [(unit, p) for unit in rows["unit"] for p in paths.get(unit, [])]
    stems = unique_stems(f"{u}|{p}" for u, p in todo)
    with progress_bar(enabled=bool(todo)) as bar:
        task = bar.add_task("error cases" + (" with heatmaps" if model else ""), total=len(todo))
        for unit, path in todo:
            stem = stems[f"{unit}|{path}"]
            entry = {"unit": unit, "path": path, "image": None, "overlay": None, "error": None}
            try:
                if model is not None:
                    hm = heatmap(model, path, progress=False)  # inside this loop's own bar (rich draws one at a time)
                    name = "malignant" if "malignant" in hm.maps else "cancer"
                    for key, alpha in (("image", 0.0), ("overlay", 0.45)):
                        buf = io.BytesIO()
                        Image.fromarray(overlay(hm, name, alpha=alpha, height=options.error_height)).save(buf, format="PNG")
                        target = folder / f"{stem}-{key}.png"
                        refuse_overwrite([target], inputs, hint="choose another --out for the review")
                        atomic_write_bytes(target, buf.getvalue(), cache=True)
                        entry[key] = f"{ERRORS}/{target.name}"
                    entry["map"] = name
                else:
                    target = folder / f"{stem}-image.png"
                    refuse_overwrite([target], inputs, hint="choose another --out for the review")
                    atomic_write_bytes(target, _grey_png(read_mammogram(path).pixels, options.error_height), cache=True)
                    entry["image"] = f"{ERRORS}/{target.name}"
            except CvfastError as e:
                entry["error"] = str(e)
                log.warning("error case %s not drawn: %s", unit, e)
            shown.append(entry)
            bar.advance(task)
    return shown


def _fmt(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _page(report: dict, op: dict, options: ReviewSettings, cases: pd.DataFrame, unit_paths: dict[str, list[str]],
          thumbs: dict[str, str], errors: list[dict], st: EvalSettings, unreadable: dict[str, str]) -> str:
    """The HTML page; every value from the predictions file is escaped (ids are untrusted text)."""
    e = html.escape
    score = st.score
    c = op["confusion"]
    counts = cases["outcome"].value_counts().reindex(list(OUTCOMES), fill_value=0)
    undefined = "not defined: one class"  # all evaluated cases of one label
    auc = undefined if report["auc"] is None else f"{report['auc']:.3f} ({report['auc_ci95'][0]:.3f}-{report['auc_ci95'][1]:.3f})"
    headline = [("ROC AUC (95% CI)", auc), ("average precision", undefined if report["auc"] is None else _fmt(report["average_precision"])),
                ("probabilistic F1", undefined if report["auc"] is None else _fmt(report["probabilistic_f1"])),
                ("ECE / Brier", f"{report['calibration']['ece']:.3f} / {report['calibration']['brier']:.3f}"),
                ("cases / with cancer / patients", f"{report['n']} / {report['n_positive']} / {report['n_patients']}")]
    point = [("threshold", f"{op['threshold']:.4g}"), ("sensitivity", _fmt(op["sensitivity"])), ("specificity", _fmt(op["specificity"])),
             ("PPV", _fmt(op["ppv"])), ("NPV", _fmt(op["npv"])), ("TP / FP / FN / TN", f"{c['tp']} / {c['fp']} / {c['fn']} / {c['tn']}")]
    rows_html = []
    has = {col: col in cases.columns for col in ("side", "view")}
    for r in cases.itertuples(index=False):
        unit = str(r.unit)
        imgs = "".join(f'<span class="warn" title="{e(unreadable[p])}">unreadable: {e(Path(p).name)}</span>' if p in unreadable else
                       f'<img src="{THUMBS}/{e(thumbs[p])}" loading="lazy" height="{options.thumb_height}" alt="{e(Path(p).name)}">'
                       for p in unit_paths.get(unit, []))
        s = float(getattr(r, score))
        side = e(str(getattr(r, "side"))) if has["side"] and pd.notna(getattr(r, "side")) else ""
        view = e(str(getattr(r, "view"))) if has["view"] and pd.notna(getattr(r, "view")) else ""
        rows_html.append(f'<tr data-outcome="{r.outcome}"><td class="id">{e(unit)}</td><td class="thumbs">{imgs}</td>'
                         f'<td>{e(str(r.patient_id))}</td><td>{side}</td><td>{view}</td><td data-value="{int(r.label)}">{int(r.label)}</td>'
                         f'<td data-value="{s:.9g}">{s:.4f}</td><td class="{r.outcome}">{r.outcome}</td></tr>')
    error_html = []
    units = cases.set_index("unit")
    for kind, title in (("FN", "Missed cancers (false negatives) with the lowest scores"), ("FP", "Flagged normals (false positives) with the highest scores")):
        entries = [x for x in errors if units.at[x["unit"], "outcome"] == kind]
        error_html.append(f"<h3>{e(title)}</h3>")
        if not counts[kind]:
            error_html.append("<p>none at this operating point.</p>")
        elif not entries:
            error_html.append(f"<p>{counts[kind]} at this operating point, none drawn (--errors {options.errors}).</p>")
        for x in entries:
            caption = f"{e(x['unit'])}: {score} {float(units.at[x['unit'], score]):.4f}, label {int(units.at[x['unit'], 'label'])} &mdash; {e(Path(x['path']).name)}"
            figs = "".join(f'<img src="{e(x[k])}" alt="{k}">' for k in ("image", "overlay") if x.get(k))
            note = f"<p class='warn'>not drawn: {e(x['error'])}</p>" if x["error"] else ""
            heat = f" (right: the model's {e(x.get('map', ''))} map)" if x.get("overlay") else ""
            error_html.append(f'<figure class="{kind}">{figs}{note}<figcaption>{caption}{heat}</figcaption></figure>')

    def table(pairs) -> str:
        return "<table class='kv'>" + "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in pairs) + "</table>"

    level = report["level"] + (f" ({report['aggregation']} over its images)" if report["aggregation"] else "")
    buttons = "".join(f'<button type="button" data-filter="{o}">{o} ({counts[o]})</button>' for o in OUTCOMES)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cvfast review: {e(Path(report['predictions']).name)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_CSS}
.js #cases tbody tr:nth-child(n+{options.page_size + 1}){{display:none}}</style>
<script>document.documentElement.classList.add('js')</script></head>
<body>
<h1>Case review of {e(report['predictions'])}</h1>
<p>Per <b>{e(level)}</b>, {e(report['rows'])}. Operating point <b>{e(options.point)}</b>, chosen on {e(report['thresholds_chosen_on'])};
a case is called positive when {e(score)} &ge; {op['threshold']:.4g}. CI: {e(report['ci_method'] or 'not defined: ' + report['not_defined'])}.</p>
<div class="cols"><div><h2>Headline</h2>{table(headline)}</div><div><h2>At the operating point</h2>{table(point)}</div></div>
<div class="plots"><img src="roc.png" alt="ROC curve"><img src="pr.png" alt="precision-recall curve"><img src="calibration.png" alt="calibration"></div>
<h2>Errors</h2>
{''.join(error_html)}
<h2>Cases</h2>
<noscript><p>JavaScript is off: every case is listed below, unsorted and unfiltered.</p></noscript>
<div id="controls" hidden><button type="button" data-filter="all" class="on">all ({len(cases)})</button>{buttons}
<span id="pager"><button type="button" id="prev">&larr;</button> <span id="pageinfo"></span> <button type="button" id="next">&rarr;</button></span></div>
<table id="cases" data-page-size="{options.page_size}"><thead><tr><th data-sort="text">{e(st.by)}</th><th>images</th><th data-sort="text">patient</th>
<th data-sort="text">side</th><th data-sort="text">view</th><th data-sort="num">label</th><th data-sort="num">{e(score)}</th><th data-sort="text">outcome</th></tr></thead>
<tbody>
{chr(10).join(rows_html)}
</tbody></table>
<script>{_JS}</script>
</body></html>
"""


_CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse}
td,th{border-bottom:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:middle}th[data-sort]{cursor:pointer}
th[data-sort]:after{content:" \\2195";color:#aaa}.cols{display:flex;gap:3em;flex-wrap:wrap}.kv th{font-weight:normal;color:#555}
.plots img{width:min(360px,32%);margin-right:1%}.thumbs img{margin-right:2px;background:#000}
figure{display:inline-block;margin:0 1.5em 1.5em 0;vertical-align:top}figure img{margin-right:4px;background:#000}
figcaption{max-width:1040px}.TP{color:#166534}.TN{color:#555}.FP{color:#b45309;font-weight:bold}.FN{color:#b91c1c;font-weight:bold}
#controls{margin:.5em 0}#controls button.on{background:#222;color:#fff}#pager{margin-left:2em}.warn{color:#b91c1c}"""

# Sorting, filtering and pagination over the plain-HTML rows (hidden, not removed, so JS off shows them all). Until it
# runs, a CSS rule keyed on the 'js' class set in <head> shows only the first page, so the rows beyond it never load
# their thumbnails while the page is parsed.
_JS = """(function(){
const table=document.getElementById('cases'),body=table.tBodies[0],controls=document.getElementById('controls');
const size=parseInt(table.dataset.pageSize,10);let rows=Array.from(body.rows),filter='all',page=0,dir={};
controls.hidden=false;
function shown(){return rows.filter(r=>filter==='all'||r.dataset.outcome===filter);}
function draw(){const vis=shown(),pages=Math.max(1,Math.ceil(vis.length/size));page=Math.min(page,pages-1);
 const keep=new Set(vis.slice(page*size,(page+1)*size));for(const r of rows){r.hidden=!keep.has(r);}
 document.documentElement.classList.remove('js');
 document.getElementById('pageinfo').textContent='page '+(page+1)+' of '+pages+' ('+vis.length+' cases)';}
controls.addEventListener('click',ev=>{const b=ev.target.closest('button');if(!b)return;
 if(b.dataset.filter){filter=b.dataset.filter;page=0;controls.querySelectorAll('[data-filter]').forEach(x=>x.classList.toggle('on',x===b));}
 else if(b.id==='prev'){page=Math.max(0,page-1);}else if(b.id==='next'){page+=1;}draw();});
table.tHead.addEventListener('click',ev=>{const th=ev.target.closest('th');if(!th||!th.dataset.sort)return;
 const i=th.cellIndex,num=th.dataset.sort==='num',d=dir[i]=-(dir[i]||1);
 const key=r=>{const c=r.cells[i];return num?parseFloat(c.dataset.value):c.textContent;};
 rows.sort((a,b)=>{const x=key(a),y=key(b);return (x<y?-1:x>y?1:0)*d;});
 const frag=document.createDocumentFragment();rows.forEach(r=>frag.appendChild(r));body.appendChild(frag);page=0;draw();});
draw();})();"""

