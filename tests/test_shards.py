"""Sharded preparation: `prepare ... --shard K/N` on each machine, then `prepare merge`, equals one unsharded run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from typer.testing import CliRunner

from cvfast.cli import app
from cvfast.data.ingest.common import SHARDS_DIR, shard_of


def _run(*args):
    """A cvfast command run in this process; its result."""
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "300"})


def _tree(root: Path) -> dict[str, bytes]:
    """Every file of a DATA folder but the bookkeeping (shard and conversion records), by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not {SHARDS_DIR, ".records"} & set(p.relative_to(root).parts)}


def test_three_shards_and_a_merge_equal_one_unsharded_run(synth_dir, tmp_path):
    src = Path(shutil.copytree(synth_dir / "ddsm", tmp_path / "ddsm"))
    common = ["prepare", "ddsm", src, "--size", "64x48", "--workers", "1", "--seed", "4"]
    assert _run(*common, "--out", tmp_path / "one").exit_code == 0
    for k in (1, 2, 3):
        r = _run(*common, "--out", tmp_path / "sharded", "--shard", f"{k}/3")
        assert r.exit_code == 0 and "merge when every shard is done" in r.output, r.output
        assert not (tmp_path / "sharded" / "manifest.csv").exists()  # no manifest until the merge
        if k == 2:
            r = _run("prepare", "merge", tmp_path / "sharded")
            assert r.exit_code == 1 and "shard(s) 3/3 of 3 not done yet" in " ".join(r.output.split())
    shard_sizes = [len(list((tmp_path / "sharded" / SHARDS_DIR).glob(f"{k}-of-3.json"))) for k in (1, 2, 3)]
    assert shard_sizes == [1, 1, 1]
    # re-running a finished shard resumes it: nothing is converted again
    cached = sorted((tmp_path / "sharded" / "images").iterdir())
    stamps = {p: os.stat(p).st_mtime_ns for p in cached}
    assert _run(*common, "--out", tmp_path / "sharded", "--shard", "2/3").exit_code == 0
    assert {p: os.stat(p).st_mtime_ns for p in cached} == stamps
    r = _run("prepare", "merge", tmp_path / "sharded")
    assert r.exit_code == 0, r.output
    one, merged = _tree(tmp_path / "one"), _tree(tmp_path / "sharded")
    assert merged.keys() == one.keys() and all(merged[k] == one[k] for k in one)  # manifest, rejects, images and masks alike
    assert len([k for k in one if k.startswith("images/")]) >= 20


def test_shards_split_the_images_evenly_and_disjointly():
    ids = [f"P_{k:05d}_LEFT_CC" for k in range(3000)]
    counts = [sum(shard_of(i, 4) == k for i in ids) for k in (1, 2, 3, 4)]
    assert sum(counts) == 3000 and min(counts) > 650  # every image in exactly one shard, about 750 each


def test_shards_of_different_commands_are_not_merged(synth_dir, tmp_path):
    src = Path(shutil.copytree(synth_dir / "ddsm", tmp_path / "ddsm"))
    assert _run("prepare", "ddsm", src, "--size", "64x48", "--workers", "1", "--out", tmp_path / "d", "--shard", "1/2").exit_code == 0
    assert _run("prepare", "ddsm", src, "--size", "64x48", "--workers", "1", "--seed", "9", "--out", tmp_path / "d", "--shard", "2/2").exit_code == 0
    r = _run("prepare", "merge", tmp_path / "d")
    assert r.exit_code == 1 and "every shard must run the same command" in " ".join(r.output.split())
    for bad in ("3/2", "two/4", "0/1"):
        r = _run("prepare", "ddsm", src, "--out", tmp_path / "e", "--shard", bad)
        assert r.exit_code == 1 and "--shard" in r.output


def test_merge_of_a_folder_without_shards_is_a_clear_error(tmp_path):
    r = _run("prepare", "merge", tmp_path)
    assert r.exit_code == 1 and "no shards here" in " ".join(r.output.split())


def test_shards_with_crop_failures_and_repeats_merge_to_the_unsharded_run(tmp_path):
    from cvfast.data.synth import synthesize

    synthesize(tmp_path / "s", patients=8, seed=2, layouts=("rsna",))
    src = tmp_path / "s" / "rsna"
    dicoms = sorted((src / "train_images").rglob("*.dcm"))
    for f in dicoms[1::9]:  # truncated files, met by different shards
        f.write_bytes(f.read_bytes()[:3000])
    rows = (src / "train.csv").read_text().splitlines()
    (src / "train.csv").write_text("\n".join([*rows, rows[3]]) + "\n")  # a repeated row
    common = ["prepare", "rsna", src, "--size", "64x48", "--workers", "1", "--crop", "breast", "--flip-to", "left"]
    assert _run(*common, "--out", tmp_path / "one").exit_code == 0
    for k in (1, 2, 3):
        assert _run(*common, "--out", tmp_path / "sharded", "--shard", f"{k}/3").exit_code == 0
    assert _run("prepare", "merge", tmp_path / "sharded").exit_code == 0
    one, merged = _tree(tmp_path / "one"), _tree(tmp_path / "sharded")
    assert merged.keys() == one.keys() and all(merged[k] == one[k] for k in one)
    rejects = (tmp_path / "one" / "rejects.csv").read_text()
    assert all(str(f) in rejects for f in dicoms[1::9]) and len(dicoms[1::9]) >= 2 and "counted once" in rejects
    assert {shard_of(p.stem, 3) for p in dicoms[1::9]} != {1}  # the failures really were in more than one shard
