"""Damaged feature stores (issue 13): every command that opens one ends with an error that names the
file (and the array, shard and clips), exit status 1 and no traceback, and changes nothing on disk.

Damage is done to copies of the session's patch store (24 clips, 3 shards of 8): its zarr.json
files, its shard files (bytes flipped in the middle, cut short, replaced by garbage, emptied,
deleted), its status array and failures logs, the path itself; and to HDF5 exports.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import LAST, ROOT
from faults import assert_clean_error, assert_kept, snapshot, xmei
from stores import ClipReader, FeatureSpec, FeatureStore, StoreError, create_store
from stores.files import FolderFiles
from xmei.data import StoreSamples

TINY = ROOT / "configs" / "tiny.yaml"
VISUAL_1 = ("visual/c/1/0/0/0", "shard 1, clips 8-15")  # a shard file, and what a message says of it
AUDIO_2 = ("audio/c/2/0/0", "shard 2, clips 16-23")
VISUAL_0 = ("visual/c/0/0/0/0", "shard 0, clips 0-7")


def shard_named(said: str, file: Path, span: str) -> bool:
    """Whether ``said`` names the shard file with its shard and clips (a damaged index says so)."""
    return f"{file} ({span})" in said or f"{file} is damaged ({span};" in said


def damage(path: Path, kind: str) -> None:
    """Do ``kind`` of damage to the file ``path``."""
    data = path.read_bytes()
    if kind == "flipped":  # 16 bytes in the middle: inside a clip's bytes
        middle = len(data) // 2
        data = data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 16]) + data[middle + 16:]
    elif kind == "truncated":
        data = data[:len(data) // 2]
    elif kind == "garbage":
        data = np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes()
    elif kind == "emptied":
        data = b""
    if kind == "deleted":
        path.unlink()
    else:
        path.write_bytes(data)


def zstd_copy(source: Path, out: Path) -> Path:
    """``source`` rewritten as a zstd-compressed store (read through Zarr, not the direct reader)."""
    store = FeatureStore(source)
    features = {k: FeatureSpec(tuple(v["shape"]), v["dtype"]) for k, v in store.attrs["features"].items()}
    texts = {k: list(map(str, store.read_whole(k))) for k in store.texts}
    ints = {k: store.read_whole(k) for k in store.ints}
    attrs = {**store.attrs, "extract": {**store.attrs["extract"], "compression": "zstd"}}
    copy = create_store(out, len(store), store.shard_size, features, texts, ints, attrs, compression="zstd")
    status = store.status()
    for shard in range(store.num_shards):
        rows = np.arange(store.shard_range(shard).start, store.shard_range(shard).stop)
        copy.write_shard(shard, {k: store.clip_reader(k).read(rows) for k in features}, status[rows], [])
    copy.write_failures_log()
    return out


@pytest.fixture
def store(patch_store, tmp_path) -> Path:
    """A copy of the patch store, to damage."""
    return Path(shutil.copytree(patch_store, tmp_path / "store"))


@pytest.fixture(scope="module")
def zstd_store(patch_store, tmp_path_factory) -> Path:
    """The patch store, zstd-compressed (never damaged: copy it)."""
    return zstd_copy(patch_store, tmp_path_factory.mktemp("zstd") / "store")


@pytest.fixture
def checkpoint(trained_run) -> Path:
    """A trained checkpoint (conftest), only read."""
    return trained_run / LAST


def train(tiny_models, store: Path, out: Path, *sets: str):
    return xmei("train", "--models", tiny_models, "--config", TINY, "--store", store, "--output-dir", out,
                *[a for s in ("run.max_epoch=1", "run.batch_size_train=4", "run.num_workers=0", *sets)
                  for a in ("--set", s)])


def evaluate(tiny_models, checkpoint: Path, store: Path, out: Path):
    return xmei("eval", "--checkpoint", checkpoint, "--store", store, "--out", out, "--models", tiny_models,
                "--config", TINY, "--set", "run.batch_size_eval=8", "--set", "eval.max_new_tokens=24")


# ----------------------------------------------------------------------------- zarr.json

def rewrite_json(path: Path, change) -> None:
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


ZARR_JSON_DAMAGE = {
    "truncated": lambda path: path.write_text(path.read_text()[:200]),
    "not JSON": lambda path: path.write_bytes(b"\x89PNG\r\n\x1a\n not json at all"),
    "schema version": lambda path: rewrite_json(path, lambda m: m["attributes"].update(schema_version=99)),
    "missing key": lambda path: rewrite_json(path, lambda m: m["attributes"].pop("features")),
    "array truncated": lambda path: path.write_text(path.read_text()[:120]),
    "array missing key": lambda path: rewrite_json(path, lambda m: m.pop("shape")),
    "array not JSON": lambda path: path.write_text("{"),
}


@pytest.mark.parametrize("file, kind", [("zarr.json", "truncated"), ("zarr.json", "not JSON"),
                                        ("zarr.json", "schema version"), ("zarr.json", "missing key"),
                                        ("visual/zarr.json", "array truncated"),
                                        ("visual/zarr.json", "array missing key"),
                                        ("status/zarr.json", "array not JSON")])
def test_a_damaged_zarr_json_is_named_by_info_and_verify(store, file, kind):
    ZARR_JSON_DAMAGE[kind](store / file)
    before = snapshot(store)
    what = "the store's attributes" if file == "zarr.json" else f"the metadata of array {file.split('/')[0]!r}"
    said = {"truncated": f"({what}) is not valid JSON", "array truncated": f"({what}) is not valid JSON",
            "not JSON": f"({what}) is not UTF-8 text: byte 0 (line 1, column 1) is 0x89",
            "array not JSON": f"({what}) is not valid JSON: Expecting property name enclosed in double quotes at "
                              "line 1, column 2 (the end of the file: cut off?)",
            "schema version": "schema version 99"}.get(kind, "damaged")
    for command in ("info", "verify"):
        assert_clean_error(xmei("stores", command, store), store / file, said)
    assert_kept(before)


def test_train_and_eval_name_a_damaged_zarr_json(store, tiny_models, checkpoint, tmp_path):
    ZARR_JSON_DAMAGE["truncated"](store / "zarr.json")
    before = snapshot(store, checkpoint)
    assert_clean_error(train(tiny_models, store, tmp_path / "run"),
                       f"{store / 'zarr.json'} (the store's attributes) is not valid JSON")
    assert_clean_error(evaluate(tiny_models, checkpoint, store, tmp_path / "eval"), store / "zarr.json")
    assert_kept(before)
    assert not (tmp_path / "eval").exists()


# ----------------------------------------------------------------------------- shard files

@pytest.mark.parametrize("layout", ["plain", "zstd"])
@pytest.mark.parametrize("kind", ["flipped", "truncated", "garbage", "emptied", "deleted"])
def test_verify_lists_every_damaged_shard_file(store, zstd_store, tmp_path, layout, kind):
    """Two shard files damaged (visual shard 1, audio shard 2): both named with their shard and
    clips, whether read directly (plain) or through Zarr (zstd). A deleted file of ok clips is a
    problem too: Zarr would read zeros in place of their features."""
    if layout == "zstd":
        store = Path(shutil.copytree(zstd_store, tmp_path / "zstd"))
    for file, _ in (VISUAL_1, AUDIO_2):
        damage(store / file, kind)
    before = snapshot(store)
    said = assert_clean_error(xmei("stores", "verify", store), "2 problem(s)")
    for file, span in (VISUAL_1, AUDIO_2):
        assert shard_named(said, store / file, span), said
    assert_kept(before)
    if kind == "deleted":
        assert xmei("stores", "info", store).returncode == 0  # info reads no features: it still describes the store


@pytest.mark.parametrize("layout", ["plain", "zstd"])
@pytest.mark.parametrize("kind", ["flipped", "truncated", "garbage", "emptied", "deleted"])
def test_both_read_paths_name_the_damaged_shard(store, zstd_store, tmp_path, layout, kind):
    """In process: the direct reader (plain) and the Zarr path (zstd) raise a StoreError naming the
    array, the file, the shard and its clips; the start-up check sees all but flipped bytes without
    decoding a clip; the other shards still read."""
    if layout == "zstd":
        store = Path(shutil.copytree(zstd_store, tmp_path / "zstd"))
    damage(store / VISUAL_1[0], kind)
    reader = FeatureStore(store).clip_reader("visual")
    assert reader.direct == (layout == "plain")
    assert reader.read(np.r_[0:8, 16:24]).any(axis=(1, 2, 3)).all()
    if kind == "deleted":
        assert not reader.read(range(8, 16)).any()  # what Zarr's format says: zeros, so the check must catch it
    else:
        with pytest.raises(StoreError) as caught:
            reader.read([3, *range(8, 16)])
        said = str(caught.value)
        assert said.startswith("visual: ") and shard_named(said, store / VISUAL_1[0], VISUAL_1[1])
    if kind == "flipped":
        StoreSamples([store])  # the start-up check reads no clip's bytes
        return
    with pytest.raises(StoreError) as caught:
        StoreSamples([store])
    said = str(caught.value)
    assert shard_named(said, store / VISUAL_1[0], VISUAL_1[1]) and "xmei stores verify" in said


def test_training_stops_at_start_up_on_a_missing_shard_file(store, patch_store, tiny_models, tmp_path, monkeypatch):
    """Before the model is built (a minute at 7B): here building it fails the test. The training
    store is checked, and so is the validation store."""
    from typer.testing import CliRunner

    from cli import app
    from xmei.model import XMEIQwen

    def built(*args, **kwargs):
        raise AssertionError("the model was built before every store was checked")

    monkeypatch.setattr(XMEIQwen, "__init__", built)
    damage(store / VISUAL_1[0], "deleted")
    before = snapshot(store)
    for stores in (["--store", store], ["--store", patch_store, "--val-store", store]):
        args = ["train", "--models", tiny_models, "--config", TINY, *stores, "--output-dir", tmp_path / "run"]
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert isinstance(result.exception, StoreError), result.exception
        said = str(result.exception)
        assert shard_named(said, store / VISUAL_1[0], VISUAL_1[1]) and "is missing, yet 8 of its clips are ok" in said
        assert "xmei stores verify" in said
    assert_kept(before)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_training_stops_at_the_first_unreadable_batch_in_a_dataloader_worker(zstd_store, tiny_models, tmp_path):
    """Flipped bytes are only seen when the clip is read: through Zarr (a zstd store), in a
    DataLoader worker, whose error the boundary brings back to its message."""
    store = Path(shutil.copytree(zstd_store, tmp_path / "zstd"))
    damage(store / VISUAL_1[0], "flipped")
    before = snapshot(store)
    said = assert_clean_error(train(tiny_models, store, tmp_path / "run", "run.num_workers=1"),
                              f"visual: shard file {store / VISUAL_1[0]} ({VISUAL_1[1]}): clip(s)", "do not decode")
    assert "DataLoader worker" not in said
    assert_kept(before)


def test_eval_stops_at_the_first_unreadable_batch(store, tiny_models, checkpoint, tmp_path):
    """Read directly (a plain store), the clip's crc32c fails."""
    damage(store / VISUAL_0[0], "flipped")
    before = snapshot(store, checkpoint)
    assert_clean_error(evaluate(tiny_models, checkpoint, store, tmp_path / "eval"),
                       f"visual: shard file {store / VISUAL_0[0]} ({VISUAL_0[1]}): clip(s)", "fail their checksum")
    assert_kept(before)
    assert not (tmp_path / "eval" / "predictions.jsonl").exists()


# ----------------------------------------------------------------------------- other store faults

@pytest.mark.parametrize("kind", ["a file", "not a store", "an empty folder", "nothing"])
def test_a_path_that_is_no_store(tmp_path, kind):
    path = tmp_path / "store"
    if kind == "a file":
        path.write_text("clips\n")
    elif kind == "not a store":
        path.mkdir()
        (path / "notes.txt").write_text("features\n")
    elif kind == "an empty folder":
        path.mkdir()
    expected = {"a file": "a file, not a folder", "not a store": "a folder without zarr.json",
                "an empty folder": "an empty folder", "nothing": "it does not exist"}[kind]
    before = snapshot(tmp_path)
    for command in ("info", "verify"):
        assert_clean_error(xmei("stores", command, path), f"{path} is not a feature store", expected)
    assert_kept(before)


@pytest.mark.parametrize("byte", [3, -10])
def test_a_damaged_status_array(store, byte):
    """A byte of clip 8's status (its crc32c fails), or of the shard's index."""
    path = store / "status" / "c" / "1"
    data = bytearray(path.read_bytes())
    data[byte] ^= 0xFF
    path.write_bytes(bytes(data))
    before = snapshot(store)
    for command in ("info", "verify"):
        said = assert_clean_error(xmei("stores", command, store), "status: ")
        assert shard_named(said, path, "shard 1, clips 8-15"), said
    assert "pending" not in said  # verify does not take its clips for pending ones
    assert_kept(before)


def test_damaged_failures_logs(store):
    (store / "failures.jsonl").write_text('{"video_id": "synth_00003", "stage": "decode", "reason": "x"}\nnot json\n')
    before = snapshot(store)
    assert_clean_error(xmei("stores", "verify", store), f"{store / 'failures.jsonl'} (the failures log): line 2 is not "
                       "valid JSON: Expecting value at column 1; rerun xmei extract to rewrite the log")
    (store / "failures" / "shard_00001.json").write_text("[{")
    before = snapshot(store)
    for command in ("info", "verify"):
        assert_clean_error(xmei("stores", command, store), f"{store / 'failures' / 'shard_00001.json'} (the failed "
                           "clips of shard 1) is not valid JSON: Expecting property name enclosed in double quotes at "
                           "line 1, column 3 (the end of the file: cut off?)")
    assert_kept(before)


@pytest.mark.parametrize("kind", ["not HDF5", "truncated", "no export"])
def test_import_of_a_file_that_is_no_whole_export(patch_store, tmp_path, kind):
    h5 = tmp_path / "in.h5"
    if kind == "not HDF5":
        h5.write_text("video_id,visual\n")
    elif kind == "no export":
        import h5py

        with h5py.File(h5, "w") as f:
            f["visual"] = np.zeros(3)
    else:
        assert xmei("stores", "export", patch_store, h5).returncode == 0
        damage(h5, "truncated")
    expected = {"not HDF5": "is not an HDF5 file", "truncated": "cannot be read whole, damaged",
                "no export": "not an xmei feature export"}[kind]
    before = snapshot(tmp_path)
    assert_clean_error(xmei("stores", "import", h5, tmp_path / "out"), f"{h5}", expected)
    assert_kept(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5"]  # no store, no partial folder


def test_import_of_a_text_that_is_not_utf8_names_the_dataset_and_row(patch_store, tmp_path):
    import h5py

    h5 = tmp_path / "in.h5"
    assert xmei("stores", "export", patch_store, h5).returncode == 0
    with h5py.File(h5, "r+") as f:  # another tool's bytes: row 5 of the subtitles is Latin-1
        subtitles = [s.encode() for s in f["subtitle"].asstr()[:]]
        subtitles[5] = "café".encode("latin-1")
        del f["subtitle"]
        data = np.empty(len(subtitles), dtype=object)
        data[:] = [np.frombuffer(s, np.uint8) for s in subtitles]
        f.create_dataset("subtitle", data=data, dtype=h5py.vlen_dtype(np.uint8)).attrs["xmei_encoding"] = "utf-8 bytes"
    before = snapshot(tmp_path)
    assert_clean_error(xmei("stores", "import", h5, tmp_path / "out"), f"{h5}: dataset 'subtitle', row 5: not UTF-8 "
                                                                      "text (unexpected end of data at byte 3)")
    assert_kept(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5"]  # no store, no partial folder


def test_export_never_replaces_a_file_unless_asked_and_whole(store, patch_store, tmp_path):
    out = tmp_path / "out.h5"
    out.write_bytes(b"an earlier export")
    before = snapshot(out)
    assert_clean_error(xmei("stores", "export", patch_store, out), f"{out} exists already", "--overwrite")
    damage(store / VISUAL_1[0], "truncated")
    assert_clean_error(xmei("stores", "export", store, out, "--overwrite"), store / VISUAL_1[0], VISUAL_1[1])
    assert_kept(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5", "store"]  # no partial file left
    assert xmei("stores", "export", patch_store, out, "--overwrite").returncode == 0
    assert out.stat().st_size > 1000


def test_a_store_written_before_clips_carried_checksums_reads_the_same(patch_store, tmp_path):
    """Old stores (a crc32c per shard index only) are still read directly, unchecked per clip."""
    import zarr

    store = FeatureStore(patch_store)
    old = tmp_path / "old"
    group = zarr.open_group(old, mode="w-", zarr_format=3)
    values = store.clip_reader("visual").read(np.arange(len(store)))
    group.create_array("visual", shape=values.shape, dtype=values.dtype, chunks=(1, *values.shape[1:]),
                       shards=(8, *values.shape[1:]), compressors=None, fill_value=0)[...] = values
    reader = store.clip_reader("visual")
    old_reader = ClipReader(group["visual"], FolderFiles(old), "visual")
    assert old_reader.direct and not old_reader.checksummed and reader.checksummed
    np.testing.assert_array_equal(old_reader.read([5, 20, 0]), values[[5, 20, 0]])


# ----------------------------------------------------------------------------- texts

def test_texts_of_every_character_class_come_back_byte_for_byte(tiny_models, corpus, checkpoint, tmp_path):
    """Issue 23: the texts of 4 clips, each of their 6 text fields one class of EVERY_CLASS (a NUL
    at either end, controls, combining marks, right-to-left, astral, line breaks, 20 kB), ids with
    NULs and controls: extracted by `xmei extract`, then read by a clip, whole, as the DataLoader's
    samples, through `xmei stores export` and `import`, and echoed in eval's predictions (generated
    and written as `xmei eval` does, read as `xmei score` does; the scoring, 10 s of Java, left
    out), byte for byte."""
    from pipeline.annotations import FIELDS
    from test_store_texts import TEXT_CASES
    from xmei.config import load_config
    from xmei.data import StoreSamples, loader
    from xmei.evaluate import read_predictions, write_predictions
    from xmei.generate import GenerationSettings, generate_store
    from xmei.model import XMEIQwen

    texts = ("subtitle", "video_description", "audio_description", "emotion_reason", "intent_reason", "explanation")
    rows = json.loads((corpus / "annotations" / "train.json").read_text())[:4]
    for i, row in enumerate(rows):  # every class twice
        row.update({f: TEXT_CASES[i + 4 * (j % 3)] for j, f in enumerate(texts)},
                   video_id=f"\x00clip {i}\u05e9e\u0301\U0001F600\r\n\x07\x00")
    (tmp_path / "texts.json").write_text(json.dumps(rows))
    made = xmei("extract", "--annotations", tmp_path / "texts.json", "--out", tmp_path / "store", "--media-root",
                corpus, "--config", TINY, "--models", tiny_models, "--set", "extract.shard_size=2", "--workers", "0")
    assert made.returncode == 0, made.stderr[-3000:]
    expected = [[r[f] for f in FIELDS] for r in rows]
    store = FeatureStore(tmp_path / "store")
    assert [[store[i][f] for f in FIELDS] for i in range(4)] == expected
    assert [list(t) for t in zip(*(store.read_whole(f).tolist() for f in FIELDS))] == expected
    data = StoreSamples([tmp_path / "store"])
    samples = [s for batch in loader(data, [[0, 1], [2, 3]], collate_fn=list) for s in batch]
    assert [s["texts"] for s in samples] == [{f: r[f] for f in s["texts"]} for s, r in zip(samples, rows)]

    assert xmei("stores", "export", tmp_path / "store", tmp_path / "texts.h5").returncode == 0
    assert xmei("stores", "import", tmp_path / "texts.h5", tmp_path / "back").returncode == 0
    back = FeatureStore(tmp_path / "back")
    assert [[back[i][f] for f in FIELDS] for i in range(4)] == expected
    assert [list(t) for t in zip(*(back.read_whole(f).tolist() for f in FIELDS))] == expected

    cfg = load_config(TINY, ["eval.max_new_tokens=8", "eval.constrained=false"], models_dir=tiny_models)
    model = XMEIQwen.from_checkpoint(checkpoint)
    generated, _ = generate_store(model, tmp_path / "store", cfg.emotions, cfg.intents,
                                  GenerationSettings.from_config(cfg))
    write_predictions(generated, tmp_path / "predictions.jsonl")
    predicted = read_predictions(tmp_path / "predictions.jsonl", cfg.emotions, cfg.intents)
    assert [(r["video_id"], r["ref_explanation"]) for r in predicted] == [(r["video_id"], r["explanation"]) for r in rows]
