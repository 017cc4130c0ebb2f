"""The HTML case review, written by `cvfast review` and checked in a real headless Chromium (Debian's, via Playwright)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli

from cvfast.data.manifest import read_manifest
from cvfast.errors import CvfastError
from cvfast.infer.evaluate import EvalSettings, evaluate
from cvfast.infer.review import ReviewSettings, outcomes, review

ARTIFACTS = Path(os.environ.get("CVFAST_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


def _chromium() -> str:
    """The system's Chromium, or a skip that says why (tests/browser.sh installs it where it can)."""
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no Chromium on this machine: tests/browser.sh installs Debian's package as root or with sudo")
    return path


@pytest.fixture()
def page_of(request):
    """Open a review page in headless Chromium; console errors and page errors are collected."""
    from playwright.sync_api import sync_playwright

    executable = _chromium()
    pw = sync_playwright().start()
    browser = pw.chromium.launch(executable_path=executable, args=["--no-sandbox", "--allow-file-access-from-files"])
    request.addfinalizer(lambda: (browser.close(), pw.stop()))

    def open_page(path: Path, javascript: bool = True, on_request=None):
        context = browser.new_context(java_script_enabled=javascript, viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        if on_request is not None:
            page.on("request", on_request)
        page.problems = []
        page.on("console", lambda m: page.problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda err: page.problems.append(f"page error: {err}"))
        page.goto(path.resolve().as_uri())
        page.wait_for_load_state("load")
        return page

    return open_page


def _predictions(ddsm_data: Path, cases: int, seed: int = 0) -> pd.DataFrame:
    """Predictions over the prepared images (reused cyclically for large case counts): valid and test women, noisy scores."""
    rng = np.random.default_rng(seed)
    images = read_manifest(ddsm_data)
    rows = []
    for k in range(cases):
        src = images.iloc[k % len(images)]
        woman, label = k // 2, int(rng.random() < 0.3)
        rows.append({"path": src["path"], "image_id": f"case{k:05d}", "patient_id": f"W{woman:05d}", "side": "LR"[k % 2], "view": src["view"],
                     "split": "valid" if woman % 3 == 0 else "test", "label": label,
                     "p_cancer": float(np.clip(0.35 + 0.3 * label + rng.normal(0, 0.2), 0.001, 0.999))})
    return pd.DataFrame(rows)


def _visible(page, column: int) -> list[str]:
    """The text of one column over the rows the page shows."""
    return page.eval_on_selector_all("#cases tbody tr:not([hidden])", f"rows => rows.map(r => r.cells[{column}].textContent)")


def test_review_page_in_a_real_browser(ddsm_data, untrained_models, page_of, tmp_path):
    df = _predictions(ddsm_data, 60)
    df.to_csv(tmp_path / "preds.csv", index=False)
    threshold = evaluate(tmp_path / "preds.csv", EvalSettings(n_boot=200))["operating_points"]["youden"]["threshold"]
    tied = df.index[df["split"] == "test"][3]
    df.loc[tied, "p_cancer"] = threshold  # a test case exactly at the threshold (chosen on valid): called positive (>=)
    df.to_csv(tmp_path / "preds.csv", index=False)
    res = run_cli("review", str(tmp_path / "preds.csv"), "--model", str(untrained_models[1]), "--out", str(tmp_path / "review"),
                  "--errors", "2", "--page-size", "15", "--n-boot", "200", "--workers", "1")
    assert res.returncode == 0, res.stderr
    out = tmp_path / "review"
    report = evaluate(tmp_path / "preds.csv", EvalSettings(n_boot=200))
    test = df[df["split"] == "test"]
    assert report["operating_points"]["youden"]["threshold"] == threshold
    expected = np.where(test["p_cancer"] >= threshold, np.where(test["label"] == 1, "TP", "FP"), np.where(test["label"] == 1, "FN", "TN"))
    np.testing.assert_array_equal(outcomes(test["label"], test["p_cancer"], threshold), expected)
    truth_fn = sorted(test["image_id"][expected == "FN"])
    assert truth_fn and (expected == "FP").any()
    # every case's thumbnail and each worst error's image + heatmap overlay are PNG files beside the page, none inline
    html = (out / "index.html").read_text()
    assert "data:image" not in html and len(list((out / "thumbs").glob("*.png"))) == test["path"].nunique()
    assert len(list((out / "errors").glob("*-overlay.png"))) == 4  # 2 false negatives + 2 false positives

    page = page_of(out / "index.html")
    assert page.locator("#cases tbody tr").count() == len(test)  # every evaluated case, valid rows left out
    confusion = report["operating_points"]["youden"]["confusion"]  # the page's counts are evaluate's confusion matrix
    for outcome in ("TP", "FP", "FN", "TN"):
        assert page.inner_text(f"#controls button[data-filter='{outcome}']") == f"{outcome} ({confusion[outcome.lower()]})"
    tied_row = page.locator(f"#cases tbody tr:has(td.id:text-is('{df.at[tied, 'image_id']}'))")
    assert tied_row.get_attribute("data-outcome") == ("TP" if df.at[tied, "label"] == 1 else "FP")
    assert len(_visible(page, 0)) == 15  # paginated
    page.click("th:has-text('p_cancer')")  # first click: highest first
    shown = [float(v) for v in _visible(page, 6)]
    assert shown == sorted(shown, reverse=True) and shown[0] == pytest.approx(test["p_cancer"].max(), abs=1e-4)
    page.click("th:has-text('p_cancer')")
    shown = [float(v) for v in _visible(page, 6)]
    assert shown == sorted(shown) and shown[0] == pytest.approx(test["p_cancer"].min(), abs=1e-4)
    page.click("#controls button[data-filter='FN']")
    assert sorted(_visible(page, 0)) == truth_fn and set(_visible(page, 7)) == {"FN"}
    page.click("#controls button[data-filter='TN']")  # more than a page of TN: the pager moves through them
    tn = int((expected == "TN").sum())
    assert tn > 15 and len(_visible(page, 0)) == 15 and page.inner_text("#pageinfo") == f"page 1 of {-(-tn // 15)} ({tn} cases)"
    first = _visible(page, 0)
    page.click("#next")
    assert set(_visible(page, 7)) == {"TN"} and not set(first) & set(_visible(page, 0))
    page.click("#controls button[data-filter='all']")
    assert page.locator("img[alt='overlay']").count() == 4
    assert page.evaluate("Array.from(document.images).filter(i => i.complete && i.naturalWidth === 0).map(i => i.src)") == []  # no broken image
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "review-page.png"), full_page=True)
    assert (ARTIFACTS / "review-page.png").stat().st_size > 10_000
    assert page.problems == []

    plain = page_of(out / "index.html", javascript=False)  # JavaScript off: the whole table, as plain HTML
    assert plain.locator("#cases tbody tr:visible").count() == len(test) and plain.problems == []


def test_ten_thousand_cases_stay_responsive(page_of, tmp_path):
    """10,000 cases, each its own image: one page of rows shown, only its thumbnails fetched (lazy), sorting and filtering work."""
    import cv2

    rng = np.random.default_rng(1)
    (tmp_path / "img").mkdir()
    rows = []
    for k in range(10_000):
        path = tmp_path / "img" / f"c{k:05d}.png"
        cv2.imwrite(str(path), rng.integers(0, 65535, (32, 24), dtype=np.uint16))
        label = int(rng.random() < 0.3)
        rows.append({"path": str(path), "image_id": f"c{k:05d}", "patient_id": f"W{k // 2:05d}", "split": "valid" if k // 2 % 3 == 0 else "test",
                     "label": label, "p_cancer": float(np.clip(0.35 + 0.3 * label + rng.normal(0, 0.2), 0.001, 0.999))})
    df = pd.DataFrame(rows)
    df.to_csv(tmp_path / "preds.csv", index=False)
    review(tmp_path / "preds.csv", tmp_path / "review", settings=EvalSettings(n_boot=100), options=ReviewSettings(errors=1, page_size=100))
    test = df[df["split"] == "test"]
    assert len(list((tmp_path / "review" / "thumbs").glob("*.png"))) == len(test)
    fetched = []
    page = page_of(tmp_path / "review" / "index.html", on_request=lambda r: fetched.append(r.url) if "/thumbs/" in r.url else None)
    assert page.locator("#cases tbody tr").count() == len(test) and len(_visible(page, 0)) == 100
    page.wait_for_timeout(500)
    assert 0 < len(set(fetched)) <= 100  # the hidden rows' thumbnails are never fetched
    page.click("th:has-text('p_cancer')")
    shown = [float(v) for v in _visible(page, 6)]
    assert len(shown) == 100 and shown == sorted(shown, reverse=True) and shown[0] == pytest.approx(test["p_cancer"].max(), abs=1e-4)
    page.click("#controls button[data-filter='FP']")
    assert set(_visible(page, 7)) == {"FP"} and "page 1 of" in page.inner_text("#pageinfo")
    assert page.problems == []


def test_review_per_breast_and_its_refusals(ddsm_data, tmp_path):
    df = _predictions(ddsm_data, 80, seed=2)
    df["side"] = ["L", "L", "R", "R"] * 20  # two views per breast
    df["patient_id"] = [f"W{k // 4:03d}" for k in range(80)]
    df["split"] = ["valid" if k // 4 % 3 == 0 else "test" for k in range(80)]
    df.to_csv(tmp_path / "preds.csv", index=False)
    page = review(tmp_path / "preds.csv", tmp_path / "review", settings=EvalSettings(by="breast", n_boot=100), options=ReviewSettings(errors=1))
    html = page.read_text()
    breasts = df[df["split"] == "test"].groupby(["patient_id", "side"]).ngroups
    assert html.count("<tr data-outcome=") == breasts and html.count('loading="lazy"') == 2 * breasts  # both views of each breast
    assert "Per <b>breast (mean over its images)</b>" in html
    hostile = df.assign(image_id=df["image_id"].where(df.index != 3, "<script>alert(1)</script>"),
                        patient_id=df["patient_id"].where(df.index // 4 != 0, "<img src=x onerror=alert(2)>"))
    hostile.to_csv(tmp_path / "hostile.csv", index=False)
    html = review(tmp_path / "hostile.csv", tmp_path / "hostile", settings=EvalSettings(by="image", split=None, n_boot=100)).read_text()
    assert "<script>alert" not in html and "<img src=x" not in html and "&lt;img src=x onerror=alert(2)&gt;" in html
    res = run_cli("review", str(tmp_path / "preds.csv"), "--out", str(tmp_path / "r2"), "--point", "best")
    assert res.returncode == 1 and "--point best: expected one of youden" in res.stderr and "Traceback" not in res.stderr
    df.drop(columns="path").to_csv(tmp_path / "nopath.csv", index=False)
    res = run_cli("review", str(tmp_path / "nopath.csv"), "--out", str(tmp_path / "r3"))
    assert res.returncode == 1 and "no 'path' column" in res.stderr
    res = run_cli("review", str(tmp_path / "preds.csv"), "--out", str(tmp_path))  # the report would land beside preds.csv: fine,
    assert res.returncode == 0 and (tmp_path / "index.html").is_file() and (tmp_path / "preds.csv").read_text() == df.to_csv(index=False)


def _small_review_set(folder: Path, n: int = 40, seed: int = 0) -> pd.DataFrame:
    """N small distinct images, one per woman, a third of them valid, with labelled scores (no model needed)."""
    import cv2

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(n):
        path = folder / f"c{k:03d}.png"
        cv2.imwrite(str(path), rng.integers(0, 65535, (32, 24), dtype=np.uint16))
        label = k % 2
        rows.append({"path": str(path), "image_id": f"c{k:03d}", "patient_id": f"W{k:03d}", "split": "valid" if k % 3 == 0 else "test",
                     "label": label, "p_cancer": round(float(np.clip(0.4 + 0.2 * label + rng.normal(0, 0.2), 0.01, 0.99)), 2)})
    return pd.DataFrame(rows)


def _thumb_of(html: str, image_id: str) -> str:
    """The thumbnail file the page shows in IMAGE_ID's row."""
    import re

    row = re.search(rf'<tr data-outcome="\w+"><td class="id">{image_id}</td><td class="thumbs"><img src="([^"]+)"', html)
    assert row, image_id
    return row.group(1)


def test_review_redraws_a_thumbnail_whose_image_changed(tmp_path):
    from PIL import Image

    df = _small_review_set(tmp_path / "img")
    df.to_csv(tmp_path / "preds.csv", index=False)
    case = df.loc[df["split"] == "test", "image_id"].iloc[0]
    before = review(tmp_path / "preds.csv", tmp_path / "review", settings=EvalSettings(n_boot=50), options=ReviewSettings(errors=0)).read_text()
    first = _thumb_of(before, case)
    assert Image.open(tmp_path / "review" / first).size == (96, 128)  # 24x32 at height 128
    import cv2  # the image re-prepared (say with --crop breast): same path, new pixels and aspect

    cv2.imwrite(df.set_index("image_id").at[case, "path"], np.full((32, 32), 40000, np.uint16) - np.eye(32, dtype=np.uint16))
    html = review(tmp_path / "preds.csv", tmp_path / "review", settings=EvalSettings(n_boot=50), options=ReviewSettings(errors=0)).read_text()
    again = _thumb_of(html, case)
    assert again != first and Image.open(tmp_path / "review" / again).size == (128, 128)
    others = df.loc[(df["split"] == "test") & (df["image_id"] != case), "image_id"]
    assert all(_thumb_of(html, i) == _thumb_of(before, i) for i in others)  # the unchanged images' thumbnails are reused


def test_review_counts_match_the_predictions_at_the_threshold(tmp_path):
    """The page's outcome counts (filter buttons, the TP / FP / FN / TN line, the rows) against counts made here from the
    predictions with score >= threshold: cases tied with the threshold are called positive (a '>' would call them negative)."""
    import re

    df = _small_review_set(tmp_path / "img", n=60, seed=3)
    df.to_csv(tmp_path / "preds.csv", index=False)
    threshold = evaluate(tmp_path / "preds.csv", EvalSettings(n_boot=50))["operating_points"]["youden"]["threshold"]
    test = df.index[df["split"] == "test"]
    ties = [test[df.loc[test, "label"] == 1][0], test[df.loc[test, "label"] == 0][0]]  # one cancer, one normal exactly at it
    df.loc[ties, "p_cancer"] = threshold
    df.to_csv(tmp_path / "preds.csv", index=False)
    html = review(tmp_path / "preds.csv", tmp_path / "review", settings=EvalSettings(n_boot=50), options=ReviewSettings(errors=0)).read_text()
    t = df.loc[test]
    called, cancer = t["p_cancer"].to_numpy() >= threshold, t["label"].to_numpy() == 1
    expected = {"TP": int((called & cancer).sum()), "FP": int((called & ~cancer).sum()), "FN": int((~called & cancer).sum()),
                "TN": int((~called & ~cancer).sum())}
    assert expected["TP"] and expected["FP"] and expected["FN"] and expected["TN"]
    for outcome, n in expected.items():
        assert f'data-filter="{outcome}">{outcome} ({n})</button>' in html
        assert html.count(f'<tr data-outcome="{outcome}">') == n
    line = re.search(r"<th>TP / FP / FN / TN</th><td>(\d+) / (\d+) / (\d+) / (\d+)</td>", html)
    assert line and tuple(map(int, line.groups())) == (expected["TP"], expected["FP"], expected["FN"], expected["TN"])
    for i in ties:
        assert f'<tr data-outcome="{"TP" if df.at[i, "label"] == 1 else "FP"}"><td class="id">{df.at[i, "image_id"]}</td>' in html


@pytest.mark.parametrize("valid_classes", [2, 1])
def test_review_of_a_one_class_test_split_renders_with_the_metrics_marked(tmp_path, valid_classes):
    df = _small_review_set(tmp_path / "img", n=30, seed=4)
    test = df["split"] == "test"
    df.loc[test, "label"] = 0  # no cancer among the test cases
    if valid_classes == 1:
        df.loc[~test, "label"] = 0  # nor among the valid ones: no threshold can be chosen, the fixed 0.5 is used
    df.to_csv(tmp_path / "preds.csv", index=False)
    with pytest.raises(CvfastError, match="all label 0; ROC AUC needs both classes"):  # evaluate itself still refuses
        evaluate(tmp_path / "preds.csv", EvalSettings(n_boot=50))
    point = "youden" if valid_classes == 2 else "fixed_0.5"
    html = review(tmp_path / "preds.csv", tmp_path / "review", settings=EvalSettings(n_boot=50),
                  options=ReviewSettings(errors=2, point=point)).read_text()
    assert "<th>ROC AUC (95% CI)</th><td>not defined: one class</td>" in html
    assert "<th>average precision</th><td>not defined: one class</td>" in html
    called = df.loc[test, "p_cancer"] >= (0.5 if valid_classes == 1 else evaluate(tmp_path / "preds.csv", EvalSettings(n_boot=50, split="valid"))
                                          ["operating_points"]["youden"]["threshold"])
    assert html.count('<tr data-outcome="FP">') == called.sum() and html.count('<tr data-outcome="TN">') == (~called).sum() == test.sum() - called.sum()
    assert "not defined: one class" in (tmp_path / "review" / "report.md").read_text()
    assert all((tmp_path / "review" / n).stat().st_size > 1000 for n in ("roc.png", "pr.png", "calibration.png"))
    if valid_classes == 1:
        with pytest.raises(CvfastError, match="--point youden: no such operating point here"):
            review(tmp_path / "preds.csv", tmp_path / "r2", settings=EvalSettings(n_boot=50))
