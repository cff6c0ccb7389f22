"""Fault suite: full disks (issue 23, point 2). Each writer runs on a small tmpfs (``faults.tmpfs``,
skipped where it cannot be mounted) and ends with exit status 1, "no space left on MOUNT (tmpfs,
tmpfs: FREE free of SIZE) while writing PATH (WHAT)" (or, refused before a long write, "not enough
space on ... it needs about N"), no traceback, nothing half-written where a reader would take it
for whole, and what was there before kept. The checks before a long write are taken out
(monkeypatch) where a test needs the write itself to meet the full disk: a disk that another
writer fills meanwhile. Extraction on a dask farm: tests/test_farm.py."""
from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import EARLIER, KEEP_EVERY_3, LAST, ROOT, TRAIN
from faults import assert_full_disk, assert_kept, leave_free, resize, snapshot, tmpfs, xmei
from xmei.errors import DiskFullError, check_space, disk_full, writing

MB = 10**6


# ----------------------------------------------------------------------------- the one wording

def test_each_way_a_full_disk_shows_is_named_with_its_filesystem(tmp_path):
    """Python's OSError, safetensors' (Rust) error and torch's serializer, which loses the errno."""
    import torch
    from safetensors.torch import save_file

    tensors = {"w": torch.zeros(2**20)}  # 4 MB
    writers = {"text.json": lambda p: p.write_bytes(bytes(4 * MB)),
               "weights.safetensors": lambda p: save_file(tensors, p), "state.pt": lambda p: torch.save(tensors, p)}
    with tmpfs(tmp_path / "disk", 1 * MB) as disk:
        # torch's words on a disk with room are not taken for a full disk
        failed = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        assert disk_full(failed, disk / "state.pt") is None
        with pytest.raises(RuntimeError, match="unexpected pos"), writing(disk / "state.pt", "a torch file"):
            raise failed
        assert disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"), disk) == errno.EDQUOT
        for name, write in writers.items():
            with pytest.raises(DiskFullError) as caught, writing(disk / name, f"the {name} file", "nothing kept"):
                write(disk / name)
            said = str(caught.value).replace(str(disk), "DISK")
            assert re.fullmatch(rf"no space left on DISK \(tmpfs, tmpfs: [\d.]+ [kM]?B free of 1\.0 MB\) while writing "
                                rf"DISK/{name} \(the {name} file\); nothing kept", said), said
            (disk / name).unlink(missing_ok=True)


def test_a_long_write_is_refused_when_it_cannot_fit_and_warned_of_when_close(tmp_path):
    with tmpfs(tmp_path / "disk", 2 * MB) as disk:
        with pytest.raises(DiskFullError) as caught:
            check_space(disk / "big", 3 * MB, "features", "try again")
        assert str(caught.value) == (f"not enough space on {disk} (tmpfs, tmpfs: 2.0 MB free of 2.0 MB) for "
                                     f"{disk / 'big'} (features): it needs about 3.0 MB; try again")
        assert check_space(disk / "big", 1 * MB, "features") is None
        warned = check_space(disk / "big", int(1.9 * MB), "features")
        assert warned.startswith(f"little space on {disk} (tmpfs, tmpfs: 2.0 MB free of 2.0 MB) for {disk / 'big'} "
                                 "(features): it will take about 2.3 MB")
        assert not list(disk.iterdir())  # a check writes nothing


# ----------------------------------------------------------------------------- training

def train(tiny_models: Path, store: Path, out: Path):
    sets = [a for s in (*TRAIN, *KEEP_EVERY_3) for a in ("--set", s)]
    return xmei("train", "--config", ROOT / "configs" / "tiny.yaml", "--models", tiny_models, "--store", store,
                "--output-dir", out, *sets, "--resume")


def test_a_disk_that_holds_one_checkpoint_but_not_two(trained_run, tiny_models, patch_store, tmp_path, monkeypatch):
    """The run's step_0000003 on a disk with room for half a checkpoint more: --resume is refused at
    start; then (the start's check taken out) at the save of step 6, before anything is written; then
    (every check taken out) the save meets the full disk and its partial folder is removed. step 3
    stays as it was throughout, and on a larger disk --resume finishes the run."""
    from xmei.checkpoint import verify_checkpoint
    from xmei.train import Trainer

    size = sum(f.stat().st_size for f in (trained_run / EARLIER).rglob("*") if f.is_file())
    with tmpfs(tmp_path / "disk", int(1.5 * size) + 2 * MB) as disk:
        run = disk / "run"
        shutil.copytree(trained_run / "logs", run / "logs")
        shutil.copytree(trained_run / EARLIER, run / EARLIER)
        kept = snapshot(run / EARLIER)
        needs = f"for {run / 'checkpoints'} (a checkpoint of about {size / MB:.1f} MB: the size of step_0000003): " \
                f"it needs about {size / MB:.1f} MB"
        resume = f"the earlier checkpoints are kept as they were (the newest: {run / EARLIER}); free space (or move " \
                 f"{run} to a larger disk), then continue with --resume"

        assert_full_disk(train(tiny_models, patch_store, run), disk, needs, "then run again with --resume")
        check = Trainer._check_checkpoint_space
        monkeypatch.setattr(Trainer, "_check_checkpoint_space", lambda self, start=False: start or check(self))
        assert_full_disk(train(tiny_models, patch_store, run), disk, needs, resume)
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000003"]

        monkeypatch.setattr(Trainer, "_check_checkpoint_space", lambda self, start=False: None)
        partial = run / "checkpoints" / "step_0000006.partial"
        said = assert_full_disk(train(tiny_models, patch_store, run), disk,
                                f"while writing {partial} (checkpoint step_0000006)", resume)
        assert "no space left on" in said
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000003"]  # no partial folder
        assert_kept(kept)
        log = [json.loads(line) for line in (run / "logs" / "train.jsonl").read_text().splitlines()]  # whole lines
        assert [r["step"] for r in log if "loss" in r][-3:] == [4, 5, 6]

        resize(disk, 3 * size)  # space freed
        monkeypatch.undo()
        result = train(tiny_models, patch_store, run)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "done: 6 steps" in result.stdout
        assert_kept(kept)
        verify_checkpoint(run / "checkpoints" / "step_0000006")


# ----------------------------------------------------------------------------- eval, score, report

def test_eval_on_a_full_disk_leaves_the_earlier_outputs(trained_run, patch_store, tmp_path):
    with tmpfs(tmp_path / "disk", 1 * MB) as disk:
        out = disk / "eval"
        out.mkdir()
        for name in ("predictions.jsonl", "results.json", "report.md"):  # an earlier evaluation's
            (out / name).write_text(f"the earlier {name}\n")
        kept = snapshot(out)
        leave_free(disk, 4096)
        result = xmei("eval", "--checkpoint", trained_run / LAST, "--store", patch_store, "--out", out,
                      "--set", "eval.max_new_tokens=16", "--set", "run.batch_size_eval=24")
        assert_full_disk(result, disk, f"while writing {out}/.outputs.partial-",
                         f"the outputs in {out} are as they were, and nothing of this run is kept")
        assert_kept(kept)
        assert sorted(p.name for p in out.iterdir()) == ["predictions.jsonl", "report.md", "results.json"]


def test_scores_that_do_not_fit_keep_the_predictions_whole_apart(tmp_path):
    """The predictions were written, the scores meet the full disk: OUT is as it was and the
    predictions wait whole in the partial folder, the half-written files removed."""
    from xmei.evaluate import staged, write_predictions

    rows = [{"video_id": f"v{i}", "text": "x" * 100} for i in range(40)]
    with tmpfs(tmp_path / "disk", 1 * MB) as disk:
        out = disk / "eval"
        out.mkdir()
        (out / "results.json").write_text('{"count": 1}\n')
        kept = snapshot(out)
        with pytest.raises(DiskFullError) as caught, staged(out) as partial:
            write_predictions(rows, partial / "predictions.jsonl")
            (partial / "confusion_emotion.png").write_bytes(bytes(2 * MB))
        assert str(caught.value).endswith(
            f"the outputs in {out} are as they were; this run's predictions are whole in "
            f"{partial / 'predictions.jsonl'}: move them elsewhere (the next evaluation into {out} removes that "
            "folder) and score them with xmei score once there is space")
        assert_kept(kept)
        assert [p.name for p in partial.iterdir()] == ["predictions.jsonl"]
        assert [json.loads(line) for line in (partial / "predictions.jsonl").read_text().splitlines()] == rows


def test_a_report_page_that_does_not_fit_leaves_the_earlier_page(tmp_path):
    from test_report import eval_folder, make_rows
    from xmei.report import build_report

    with tmpfs(tmp_path / "disk", 1 * MB) as disk:
        folder = eval_folder(disk / "eval", make_rows(300))
        build_report(folder)
        kept = snapshot(folder)
        leave_free(disk, 0)
        assert_full_disk(xmei("report", folder), disk, f"while writing {folder} (the report page and its images); "
                                                       f"the earlier page in {folder} is as it was")
        assert_kept(kept)
        assert sorted(p.name for p in folder.iterdir()) == ["predictions.jsonl", "report.html", "results.json"]


# ----------------------------------------------------------------------------- stores export / import

def test_export_and_import_on_a_full_disk(patch_store, tmp_path, monkeypatch):
    """A disk that holds one export but not two: a second export is refused before it begins, and
    (the check taken out) meets the full disk, the earlier export kept whole and no partial file
    left; an import that does not fit leaves no store."""
    import stores.hdf5

    features = sum(f.stat().st_size for f in patch_store.rglob("*") if f.is_file())
    with tmpfs(tmp_path / "disk", int(1.5 * features)) as disk:
        h5 = disk / "store.h5"
        assert xmei("stores", "export", patch_store, h5).returncode == 0
        kept = snapshot(h5)
        export = xmei("stores", "export", patch_store, h5, "--overwrite")
        assert_full_disk(export, disk, f"for {h5} (the HDF5 export of {patch_store}, its features): it needs about",
                         "the earlier store.h5 is as it was")
        monkeypatch.setattr(stores.hdf5, "check_space", lambda *args: None)
        export = xmei("stores", "export", patch_store, h5, "--overwrite")
        assert_full_disk(export, disk, f"while writing {h5}.partial-", f"(the HDF5 export of {patch_store}, renamed "
                         "to store.h5 once whole); the earlier store.h5 is as it was")
        imported = xmei("stores", "import", h5, disk / "imported")
        assert_full_disk(imported, disk, f"while writing {disk / 'imported'}.partial-", "nothing of it is kept")
        assert_kept(kept)
        assert [p.name for p in disk.iterdir()] == ["store.h5"]
