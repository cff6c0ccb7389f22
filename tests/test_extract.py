"""Stage 1 end to end on real files and tiny real models: `xmei extract` into a Zarr store."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.extract import ExtractionError, extract
from pipeline.farm import PRECISIONS, auto_dtype, local_device
from pipeline.synth import write_camera_mp4
from stores import FAILED, OK, PENDING, FeatureStore, StoreError, export_hdf5, import_hdf5, verify_store
from xmei.runlock import store_lock
from conftest import config
from faults import xmei

ROOT = Path(__file__).resolve().parents[1]
XMEI = Path(sys.executable).parent / "xmei"


def contents(path: Path) -> dict:
    """Every array of a store plus its failures, for exact comparisons."""
    store = FeatureStore(path)
    data = {n: store.array(n)[...] for n in [*store.features, "status", *store.texts, *store.ints]}
    data["failures"] = store.failures()
    return data


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], np.ndarray):
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        else:
            assert a[name] == b[name], name


def test_patch_features_shapes_dtypes_and_texts(patch_store, corpus, tiny_models):
    store = FeatureStore(patch_store)
    assert len(store) == 24 and store.num_shards == 3 and store.shard_size == 8
    assert sorted(p.name for p in (patch_store / "visual" / "c").iterdir()) == ["0", "1", "2"]  # 3 shard files
    assert store.array("visual").shape == (24, 8, 257, 64) and store.array("visual").dtype == np.float16
    assert store.array("visual").chunks == (1, 8, 257, 64) and store.array("visual").shards == (8, 8, 257, 64)
    assert store.array("audio").shape == (24, 8, 64) and store.array("audio").dtype == np.float16
    assert (store.status() == OK).all() and verify_store(store) == []
    plans = {p["video_id"]: p for p in json.loads((corpus / "synth.json").read_text())["clips"]}
    has_audio = store.array("has_audio")[:]
    for i, video_id in enumerate(store.array("video_id")[:]):
        assert has_audio[i] == (plans[video_id]["audio_mode"] != "none")  # flagged, never silent zeros
        if not has_audio[i]:
            assert not store.array("audio")[i].any() and not store.array("audio_lengths")[i].any()
    clip = store[0]
    assert clip["emotion"] == plans[clip["video_id"]]["emotion"]
    assert clip["emotion_label"] == store.attrs["labels"]["emotions"].index(clip["emotion"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models / "caption_tokenizer")
    ids = tok(str(clip["video_description"]), max_length=16, truncation=True, padding="max_length")["input_ids"]
    assert clip["video_caption_ids"].tolist() == ids
    attrs = store.attrs
    assert attrs["extract"]["visual_tokens"] == "patch" and attrs["encoders"]["visual"]["name"] == "tiny-clip-vit-14"
    assert attrs["labels"]["intents"][0] == "questioning" and attrs["schema_version"] == 1


def test_pooled_features_and_determinism(patch_store, pooled_store, tiny_models, corpus, annotations, tmp_path):
    pooled = FeatureStore(pooled_store)
    assert pooled.array("visual").shape == (24, 8, 32)  # get_image_features: the projection width
    assert verify_store(pooled) == []
    extract(config(tiny_models), annotations, corpus, tmp_path / "again", workers=0)
    assert_same(contents(tmp_path / "again"), contents(patch_store))


def visual_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "visual").rglob("*") if p.is_file())


def test_zstd_compressed_store_holds_the_same_features(patch_store, tiny_models, corpus, annotations, tmp_path):
    extract(config(tiny_models, "extract.compression=zstd"), annotations, corpus, tmp_path / "zstd", workers=0)
    store = FeatureStore(tmp_path / "zstd")
    assert [type(c).__name__ for c in store.array("visual").compressors] == ["ZstdCodec"]
    plain, packed = contents(patch_store), contents(tmp_path / "zstd")
    for name in ("visual", "audio", "status", "video_caption_ids"):
        np.testing.assert_array_equal(plain[name], packed[name], err_msg=name)
    assert visual_bytes(tmp_path / "zstd") < visual_bytes(patch_store)


def test_real_checkpoint_layouts_load(tmp_path):
    """The real openai/clip-vit-large-patch14 folder is a whole CLIPModel: pooled features must be
    its get_image_features, read through the same loader as the tiny vision-only folder. The real
    hubert-large-ls960-ft folder is a HubertForCTC: its encoder must load whole."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from pipeline.encoders import EncoderSettings, Encoders, feature_specs

    torch.manual_seed(0)
    config_ = CLIPConfig(vision_config=dict(image_size=224, patch_size=14, hidden_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=64),
                         text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=64, vocab_size=100), projection_dim=24)
    full = CLIPModel(config_).eval()
    full.save_pretrained(tmp_path / "clip")
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    processor.save_pretrained(tmp_path / "clip")
    from pipeline.tiny_models import build_tiny_models

    build_tiny_models(tmp_path / "tiny")
    from transformers import AutoConfig, AutoFeatureExtractor, HubertForCTC

    ctc = HubertForCTC(AutoConfig.from_pretrained(tmp_path / "tiny" / "audio_encoder"))
    ctc.save_pretrained(tmp_path / "hubert_ctc")
    AutoFeatureExtractor.from_pretrained(tmp_path / "tiny" / "audio_encoder").save_pretrained(tmp_path / "hubert_ctc")
    settings = EncoderSettings(str(tmp_path / "clip"), str(tmp_path / "hubert_ctc"), "clip", "hubert",
                               "pooled", 8, 8, 2.0, 4, 4, "cpu")
    assert feature_specs(settings)["visual"].shape == (8, 24)
    encoders = Encoders(settings)
    frames = np.random.default_rng(0).integers(0, 255, (8, 120, 160, 3), dtype=np.uint8)
    got = encoders.encode_frames(encoders.preparation.frames.resize_crop(frames))
    with torch.no_grad():
        want = full.get_image_features(pixel_values=processor(images=list(frames), return_tensors="pt")["pixel_values"])
    want = getattr(want, "pooler_output", want)
    np.testing.assert_allclose(got[0].astype(np.float32), want.numpy(), atol=2e-3)
    for name, weight in ctc.hubert.state_dict().items():
        assert torch.equal(encoders.audio.state_dict()[name], weight), name


@pytest.fixture
def broken_corpus(corpus, annotations, tmp_path):
    """A copy of the corpus with each kind of bad media; returns (root, annotations, expected failures)."""
    root = tmp_path / "corpus"
    shutil.copytree(corpus, root)
    rows = json.loads(annotations.read_text())
    by_id = {r["video_id"]: r for r in rows}
    (root / by_id["synth_00000"]["video_path"]).unlink()                               # missing video
    (root / by_id["synth_00002"]["video_path"]).write_bytes(os.urandom(20000))          # corrupt video
    video = root / by_id["synth_00003"]["video_path"]
    video.write_bytes(video.read_bytes()[: video.stat().st_size // 2])                  # truncated video
    (root / by_id["synth_00010"]["audio_path"]).unlink()                                # missing audio file
    (root / by_id["synth_00019"]["audio_path"]).write_bytes(b"RIFF" + os.urandom(3000))  # corrupt wav
    by_id["synth_00020"]["audio_path"] = ""  # wav-only clip now without any audio: flagged, not failed
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(rows))
    expected = {"synth_00000": ("video", "missing video file"), "synth_00002": ("video", "cannot decode video"),
                "synth_00003": ("video", "cannot decode video"), "synth_00010": ("audio", "missing audio file"),
                "synth_00019": ("audio", "cannot decode audio")}
    return root, path, expected


def test_bad_media_are_recorded_as_failed_and_the_run_goes_on(tiny_models, broken_corpus, tmp_path):
    root, path, expected = broken_corpus
    reported = []
    summary = extract(config(tiny_models), path, root, tmp_path / "store", workers=0,
                      progress=lambda clips, failed: reported.append((clips, failed)))
    assert summary.ok == 24 - len(expected)
    assert len(reported) > 3 and [sum(x) for x in zip(*reported)] == [24, len(expected)]  # per batch / failure
    got = {row["video_id"]: (row["stage"], row["reason"]) for row in summary.failed}
    assert got.keys() == expected.keys()
    for video_id, (stage, reason) in expected.items():
        assert got[video_id][0] == stage and reason in got[video_id][1] and video_id[6:] in got[video_id][1]
    store = FeatureStore(tmp_path / "store")
    status = dict(zip(store.array("video_id")[:], store.status()))
    assert all(status[v] == FAILED for v in expected) and verify_store(store) == []
    failed_rows = [i for i, v in enumerate(store.array("video_id")[:]) if v in expected]
    assert not store.array("visual")[failed_rows].any()  # nothing made up for a failed clip
    log = [json.loads(line) for line in (tmp_path / "store" / "failures.jsonl").read_text().splitlines()]
    assert {row["video_id"] for row in log} == expected.keys()
    assert store[20]["has_audio"] == 0 and store[20]["status"] == OK


def test_strict_stops_at_the_first_failure(tiny_models, broken_corpus, tmp_path):
    root, path, _ = broken_corpus
    with pytest.raises(ExtractionError, match=r"clip 'synth_00000' failed \(video\).*missing video file"):
        extract(config(tiny_models), path, root, tmp_path / "store", workers=0, strict=True)


def test_an_unexpected_error_fails_only_its_clip(tiny_models, corpus, annotations, patch_store, tmp_path,
                                                 monkeypatch):
    """In the decode processes (tests/faulty_decoder.py): a segfault on one clip and a bug (not a
    MediaError) on another; in the encoders, an error on a batch holding a bad clip (retried
    clip by clip). Each fails that clip alone with its reason."""
    import pipeline.extract as stage1
    from pipeline.decode_pool import DecodePool
    from pipeline.encoders import Encoders

    faults = [f"{fault}=synth_{k:05d}.mp4" for fault, k in (("bug", 3), ("mark", 5), ("crash", 12))]
    pool = DecodePool(2, command=[sys.executable, str(ROOT / "tests" / "faulty_decoder.py"), *faults])
    monkeypatch.setitem(stage1._POOLS, 2, pool)
    encode_frames = Encoders.encode_frames

    def picky_encode_frames(self, pixels):
        if (pixels.reshape(-1, 8 * 3 * 224 * 224) == 7).all(1).any():  # the marked clip
            raise ValueError("a clip the encoder cannot take")
        return encode_frames(self, pixels)

    monkeypatch.setattr(Encoders, "encode_frames", picky_encode_frames)
    cfg = config(tiny_models, "extract.decode_workers=2")
    try:
        summary = extract(cfg, annotations, corpus, tmp_path / "store", workers=0)
        with pytest.raises(ExtractionError, match=r"clip 'synth_00003' failed \(prepare\): RuntimeError: a decoder bug"):
            extract(cfg, annotations, corpus, tmp_path / "strict", workers=0, strict=True)
    finally:
        pool.close()
    got = {row["video_id"]: (row["stage"], row["reason"]) for row in summary.failed}
    assert got == {"synth_00003": ("prepare", "RuntimeError: a decoder bug"),
                   "synth_00005": ("encode", "ValueError: a clip the encoder cannot take"),
                   "synth_00012": ("crash", "the decode process died (SIGSEGV) while decoding this clip")}
    store, whole = FeatureStore(tmp_path / "store"), FeatureStore(patch_store)
    assert summary.ok == 21 and verify_store(store) == []
    ok, visual = store.status() == OK, store.array("visual")[:]
    assert not visual[~ok].any()  # nothing made up for the failed clips
    # the bad clip's batch mates (4, 6, 7) were encoded one by one: the same features
    np.testing.assert_allclose(visual[ok].astype(np.float32), whole.array("visual")[:][ok].astype(np.float32),
                               rtol=1e-2, atol=1e-2)


def test_a_store_made_otherwise_is_not_resumed(patch_store, tiny_models, corpus, annotations, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(patch_store, copy)
    with pytest.raises(StoreError, match="made with extract.audio_layers 4, this run 2; choose another --out"):
        extract(config(tiny_models, "extract.audio_layers=2"), annotations, corpus, copy, workers=0)
    with pytest.raises(StoreError, match="extract.num_frames 8, this run 4"):
        extract(config(tiny_models, "extract.num_frames=4"), annotations, corpus, copy, workers=0)
    summary = extract(config(tiny_models), annotations, corpus, copy, workers=0)  # same inputs: all skipped
    assert summary.shards_skipped == 3 and summary.ok == 24


def test_a_partial_store_resumes_with_another_batch_size_and_device(patch_store, tiny_models, corpus, annotations,
                                                                    tmp_path):
    """Lowering the batch size after running out of memory (or pinning the device) is no other store."""
    copy = tmp_path / "copy"
    shutil.copytree(patch_store, copy)
    store = FeatureStore(copy, mode="r+")
    rows = store.shard_range(1)
    store.write_shard(1, {name: np.zeros((len(rows), *store.array(name).shape[1:]), store.array(name).dtype)
                          for name in store.features}, np.full(len(rows), PENDING, np.uint8), [])  # as if killed
    summary = extract(config(tiny_models, "extract.batch_size=3", "extract.device=cpu"), annotations, corpus, copy,
                      workers=0)
    assert summary.shards_skipped == 2 and summary.ok == 24
    assert verify_store(FeatureStore(copy)) == []
    redone, whole = contents(copy), contents(patch_store)
    for name in ("visual", "audio"):  # equal on a cpu-only machine; allow for the fixture's cuda run elsewhere
        np.testing.assert_allclose(redone[name].astype(np.float32), whole[name].astype(np.float32), atol=1e-2,
                                   err_msg=name)
    for name in ("status", "has_audio", "audio_lengths", "video_caption_ids"):
        np.testing.assert_array_equal(redone[name], whole[name], err_msg=name)


KILLED_CREATION = """
import os, signal, sys
from pathlib import Path
sys.path[:0] = [{root!r}, {tests!r}]
from zarr.core.attributes import Attributes
from conftest import config
from pipeline.extract import extract

Attributes.update = lambda self, *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # arrays written, no attributes
extract(config(Path({models!r})), Path({annotations!r}), Path({corpus!r}), Path({out!r}), workers=0)
"""


def test_a_kill_while_creating_the_store_leaves_nothing_half_made(patch_store, tiny_models, corpus, annotations,
                                                                  tmp_path):
    out = tmp_path / "store"
    script = KILLED_CREATION.format(root=str(ROOT), tests=str(ROOT / "tests"), models=str(tiny_models),
                                    annotations=str(annotations), corpus=str(corpus), out=str(out))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert not out.exists()  # never half-made under its own name
    leftovers = list(tmp_path.glob("store.partial-*"))
    assert len(leftovers) == 1 and (leftovers[0] / "visual" / "zarr.json").is_file()
    with pytest.raises(StoreError, match="not a feature store|schema version"):
        FeatureStore(leftovers[0])  # what a rerun would have found in ``out`` before
    summary = extract(config(tiny_models), annotations, corpus, out, workers=0)
    assert summary.shards_skipped == 0 and summary.ok == 24
    assert not list(tmp_path.glob("store.partial-*"))  # the killed creation's folder is gone
    assert verify_store(FeatureStore(out)) == []
    assert_same(contents(out), contents(patch_store))


def test_a_failed_creation_removes_its_partial_folder(tmp_path, monkeypatch):
    from stores import FeatureSpec, create_store

    args = (tmp_path / "s", 2, 2, {"visual": FeatureSpec((3,), "float16")}, {"video_id": ["a", "b"]},
            {"label": np.array([0, 1])}, {"split": "x"})
    with pytest.raises(StoreError, match="text array 'video_id' has 1 values for 2 clips"):
        create_store(*args[:4], {"video_id": ["a"]}, *args[5:])
    assert list(tmp_path.iterdir()) == []
    (tmp_path / f"s.partial-{os.getpid() + 10_000_000}").mkdir()  # a dead creator's leftover
    store = create_store(*args)
    assert len(store) == 2 and [p.name for p in tmp_path.iterdir()] == ["s"]


def extract_args(tiny_models: Path, annotations: Path, corpus: Path, out: Path, workers: int) -> list[str]:
    return ["extract", "--config", str(ROOT / "configs" / "tiny.yaml"), "--models", str(tiny_models),
            "--annotations", str(annotations), "--media-root", str(corpus), "--out", str(out),
            "--workers", str(workers), "--set", "extract.shard_size=2", "--set", "extract.batch_size=2"]


def cli_extract(tiny_models: Path, annotations: Path, corpus: Path, out: Path, workers: int, **popen):
    args = [str(XMEI), *extract_args(tiny_models, annotations, corpus, out, workers)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


@pytest.fixture(scope="module")
def cluster_store(tiny_models, corpus, annotations, tmp_path_factory):
    """An uninterrupted run on a 1-worker LocalCluster, 12 shards of 2 clips."""
    out = tmp_path_factory.mktemp("cluster") / "store"
    proc = cli_extract(tiny_models, annotations, corpus, out, 1)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert "dask dashboard: http://127.0.0.1:" in output and "24 ok, 0 failed of 24 clips in 12 shards" in output
    return out


def test_two_workers_give_the_same_store_as_one(cluster_store, tiny_models, corpus, annotations, tmp_path):
    proc = cli_extract(tiny_models, annotations, corpus, tmp_path / "two", 2)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert_same(contents(tmp_path / "two"), contents(cluster_store))


def test_a_killed_run_resumes_to_the_same_store(cluster_store, tiny_models, corpus, annotations, tmp_path):
    out = tmp_path / "killed"
    proc = cli_extract(tiny_models, annotations, corpus, out, 1, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # kill it once some, not all, shards are written
        try:
            done = len(FeatureStore(out).done_shards())
        except (StoreError, FileNotFoundError, KeyError):
            done = 0
        if done >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its LocalCluster and its worker, mid-run
    proc.wait()
    status = FeatureStore(out).status()
    assert (status == PENDING).any() and (status == OK).any(), "the kill came too late or too early"
    proc = cli_extract(tiny_models, annotations, corpus, out, 1)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert "resuming:" in output
    assert f"taking over {store_lock(out)}: the run that held it (`xmei extract " in " ".join(output.split())
    assert_same(contents(out), contents(cluster_store))
    assert not store_lock(out).exists()


@pytest.mark.parametrize("workers, how", [(0, "SIGTERM to the process"), (1, "SIGINT to its group, as Ctrl-C")])
def test_a_signal_stops_at_a_shard_boundary_and_the_rerun_resumes_to_the_same_store(
        workers, how, cluster_store, tiny_models, corpus, annotations, tmp_path):
    out = tmp_path / "stopped"
    proc = cli_extract(tiny_models, annotations, corpus, out, workers, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:  # once the first shard is written
        try:
            if FeatureStore(out).done_shards():
                break
        except (StoreError, FileNotFoundError, KeyError):
            pass
        time.sleep(0.05)
    if workers:  # the driver, its LocalCluster's processes and their decode processes
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=200)  # finishing the shard in progress: well within the grace
    said = " ".join(output.split())
    name = "SIGINT" if workers else "SIGTERM"
    assert proc.returncode == 128 + getattr(signal, name), output
    assert "Traceback" not in output and f"{name} received: stopping at the next safe point" in said
    done = FeatureStore(out).done_shards()
    assert (f"error: {name}: stopped at a shard boundary; {len(done)} of 12 shards are finished and kept in {out}, the "
            "clips of the others stay pending: run the same command again to resume") in said
    status = FeatureStore(out).status().reshape(12, 2)
    assert 0 < len(done) < 12 and all(len(set(shard)) == 1 for shard in status)  # no shard half-marked done
    assert not store_lock(out).exists()
    result = xmei(*extract_args(tiny_models, annotations, corpus, out, workers))  # in this process: cheaper
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming: {len(done)} of 12 shards already done" in result.stderr
    assert_same(contents(out), contents(cluster_store))


def test_hdf5_round_trip(patch_store, tmp_path):
    export_hdf5(FeatureStore(patch_store), tmp_path / "s.h5")
    imported = import_hdf5(tmp_path / "s.h5", tmp_path / "back")
    assert verify_store(imported) == []
    assert_same(contents(tmp_path / "back"), contents(patch_store))
    assert imported.attrs == FeatureStore(patch_store).attrs
    with pytest.raises(StoreError, match="not an xmei feature export"):
        import h5py

        with h5py.File(tmp_path / "other.h5", "w") as h5:
            h5["x"] = np.zeros(3)
        import_hdf5(tmp_path / "other.h5", tmp_path / "nope")


def test_verify_catches_a_corrupted_store(patch_store, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(patch_store, bad)
    store = FeatureStore(bad, mode="r+")
    visual = store.array("visual")
    clip = visual[3]
    clip[0, 0, 0] = np.nan
    visual[3] = clip                                    # NaN in an ok clip
    status = store.status()
    status[5] = FAILED
    store.array("status")[:] = status                  # failed, but data present and not in the log
    audio = store.array("audio")
    silent = int(np.flatnonzero(store.array("has_audio")[:] == 0)[0])
    audio[silent] = np.ones(audio.shape[1:], np.float16)  # flagged without audio, yet audio features
    problems = verify_store(FeatureStore(bad))
    text = "\n".join(problems)
    assert "visual: clip 3" in text and "NaN or Inf" in text
    assert "status: clip 5" in text and "failed but holds feature data" in text
    assert f"audio: clip {silent}" in text and "flagged without audio" in text
    assert "failures log" in text and "synth_00005" in text
    result = xmei("stores", "verify", bad)
    assert result.returncode == 1 and "problem(s)" in result.stderr
    result = xmei("stores", "verify", patch_store)
    assert result.returncode == 0, result.stderr


def test_stores_cli_info_export_import(patch_store, tmp_path):
    result = xmei("stores", "info", patch_store, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["clips"] == 24 and info["status"] == {"pending": 0, "ok": 24, "failed": 0}
    assert info["compute_dtype"] == auto_dtype(local_device("auto"))  # extract.precision auto: float32 on the CPU
    assert info["arrays"]["visual"]["shape"] == [24, 8, 257, 64] and info["arrays"]["visual"]["bytes"] > 0
    h5 = tmp_path / "s.h5"
    assert xmei("stores", "export", patch_store, h5).returncode == 0
    result = xmei("stores", "import", h5, tmp_path / "in")
    assert result.returncode == 0 and "verify: no problem(s)" in result.stdout


def test_camera_like_mp4s_extract(tiny_models, tmp_path):
    from fractions import Fraction

    media = tmp_path / "media"
    media.mkdir()
    write_camera_mp4(media / "hd.mp4", 1920, 1080, Fraction(24000, 1001), 1.5, 48000)
    write_camera_mp4(media / "long.mp4", 672, 378, 25, 15.0, 44100)
    rows = [dict(video_id=name, video_path=f"{name}.mp4", audio_path="", subtitle="Hi.", emotion="neutral",
                 intent="neutral", video_description="", audio_description="", emotion_reason="",
                 intent_reason="", explanation="") for name in ("hd", "long")]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    summary = extract(config(tiny_models), tmp_path / "a.json", media, tmp_path / "store", workers=0)
    assert summary.ok == 2 and not summary.failed
    store = FeatureStore(tmp_path / "store")
    assert verify_store(store) == [] and store.array("has_audio")[:].tolist() == [1, 1]
    lengths = store.array("audio_lengths")[:]
    # 1.5 s at 16 kHz, plus less than one AAC frame (1024 samples at the source rate) of priming:
    # every window is the whole clip, padded
    assert len(set(lengths[0])) == 1 and 24000 <= lengths[0][0] < 24000 + 1024
    assert lengths[1].tolist() == [32000] * 8  # 15 s: eight full 2 s windows spread over it


def test_silent_audio_extracts_and_verifies(tiny_models, tmp_path):
    """Digital silence is audio: flagged as such, whatever features the encoder gives it, even all zero."""
    import soundfile

    media = tmp_path / "media"
    media.mkdir()
    write_camera_mp4(media / "mute.mp4", 320, 240, 25, 2.0, 48000, volume=0.0)  # a silent AAC track
    soundfile.write(media / "mute.wav", np.zeros(16000 * 3, np.float32), 16000)      # a silent wav
    rows = [dict(video_id=name, video_path="mute.mp4", audio_path=audio, subtitle="Hi.", emotion="neutral",
                 intent="neutral", video_description="", audio_description="", emotion_reason="",
                 intent_reason="", explanation="") for name, audio in (("track", ""), ("wav", "mute.wav"))]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    summary = extract(config(tiny_models), tmp_path / "a.json", media, tmp_path / "store", workers=0)
    assert summary.ok == 2 and not summary.failed
    store = FeatureStore(tmp_path / "store", mode="r+")
    assert store.array("has_audio")[:].tolist() == [1, 1] and (store.array("audio_lengths")[:] > 0).all()
    assert verify_store(store) == []
    audio = store.array("audio")
    audio[1] = np.zeros(audio.shape[1:], np.float16)  # an encoder that maps silence to exact zeros
    assert verify_store(FeatureStore(store.path)) == []
    lengths = store.array("audio_lengths")
    lengths[1] = np.zeros(lengths.shape[1:], lengths.dtype)  # flagged with audio, yet no window: still caught
    assert verify_store(FeatureStore(store.path)) == ["audio: clip 1 ('wav') has audio but zero window lengths"]


CUDA_FAULT = "CUDA error: an illegal memory access was encountered"


def test_a_failing_machine_fails_no_clip_and_a_rerun_completes_the_store(patch_store, tiny_models, corpus,
                                                                       annotations, tmp_path, monkeypatch):
    """An encoder whose GPU fails on every call: the run ends at the first batch naming this
    process and the error, no clip is failed, nothing is written; the encoders are dropped, and a
    rerun on a working encoder gives the store of an uninterrupted run."""
    import socket

    import pipeline.extract as stage1
    from pipeline.encoders import Encoders

    broken = []

    def sick_gpu(self, clips):
        broken.append(self)
        raise RuntimeError(CUDA_FAULT)

    monkeypatch.setattr(Encoders, "encode", sick_gpu)
    out = tmp_path / "store"
    with pytest.raises(stage1.MachineError) as caught:
        extract(config(tiny_models), annotations, corpus, out, workers=0)
    message = str(caught.value)
    assert f"this process on {socket.gethostname()} failed on shard 0 of {out}: RuntimeError: {CUDA_FAULT}" in message
    assert "0 of 3 shards are finished and kept" in message and "run the same command again" in message
    assert len(broken) == 1  # an illegal memory access is not retried clip by clip
    assert broken[0] not in stage1._ENCODERS.values()  # the next task loads them anew
    store = FeatureStore(out)
    assert (store.status() == PENDING).all() and store.failures() == [] and not store.done_shards()
    monkeypatch.undo()
    summary = extract(config(tiny_models), annotations, corpus, out, workers=0)
    assert summary.ok == 24 and summary.shards_skipped == 0
    assert_same(contents(out), contents(patch_store))


@pytest.fixture(scope="module")
def first_shard(annotations, tmp_path_factory) -> Path:
    """The first 8 records of the corpus (the patch store's first shard)."""
    path = tmp_path_factory.mktemp("first") / "first.json"
    path.write_text(json.dumps(json.loads(annotations.read_text())[:8]))
    return path


def test_out_of_memory_is_retried_clip_by_clip_then_is_the_machines(patch_store, tiny_models, corpus, first_shard,
                                                                   tmp_path, monkeypatch):
    """A batch that runs out of memory is encoded clip by clip (every clip ok, the features of the
    uninterrupted run); out of memory on one clip alone ends the task, failing no clip."""
    import torch

    import pipeline.extract as stage1
    from pipeline.encoders import Encoders

    encode, sizes = Encoders.encode, []

    def small_gpu(limit):
        def encode_within(self, clips):
            sizes.append(len(clips))
            if len(clips) > limit:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return encode(self, clips)
        return encode_within

    monkeypatch.setattr(Encoders, "encode", small_gpu(1))
    summary = extract(config(tiny_models), first_shard, corpus, tmp_path / "alone", workers=0)
    assert summary.ok == 8 and sizes == [4, 1, 1, 1, 1, 4, 1, 1, 1, 1]  # batches of 4, retried one by one
    alone, whole = contents(tmp_path / "alone"), contents(patch_store)
    for name in ("visual", "audio"):
        np.testing.assert_allclose(alone[name].astype(np.float32), whole[name][:8].astype(np.float32), atol=1e-2,
                                   err_msg=name)
    monkeypatch.setattr(Encoders, "encode", small_gpu(0))
    with pytest.raises(stage1.MachineError, match="OutOfMemoryError: CUDA out of memory"):
        extract(config(tiny_models), first_shard, corpus, tmp_path / "none", workers=0)
    store = FeatureStore(tmp_path / "none")
    assert (store.status() == PENDING).all() and store.failures() == []


def test_the_compute_dtype_is_recorded_and_a_resume_in_another_is_refused(patch_store, tiny_models, corpus,
                                                                        annotations, first_shard, tmp_path):
    from pipeline.extract import ExtractWarning

    auto = auto_dtype(local_device("auto"))  # float32 on the CPU
    same = {dtype: name for name, dtype in PRECISIONS.items()}[auto]
    other = "fp16" if auto != "float16" else "fp32"
    assert FeatureStore(patch_store).attrs["compute_dtype"] == auto
    copy = Path(shutil.copytree(patch_store, tmp_path / "copy"))
    with pytest.raises(StoreError, match=f"{copy} cannot be resumed .* encoders computing in {auto}, this run in "
                                         rf"{PRECISIONS[other]} \(resume it with extract.precision={same} "):
        extract(config(tiny_models, f"extract.precision={other}"), annotations, corpus, copy, workers=0)
    summary = extract(config(tiny_models, f"extract.precision={same}"), annotations, corpus, copy, workers=0)
    assert summary.shards_skipped == 3  # what auto gave: the same store
    meta = json.loads((copy / "zarr.json").read_text())
    del meta["attributes"]["compute_dtype"]  # as made by an earlier xmei
    (copy / "zarr.json").write_text(json.dumps(meta))
    with pytest.warns(ExtractWarning, match=f"{copy} does not record the encoders' compute dtype .* resuming it in "
                                            f"{PRECISIONS[other]}"):
        summary = extract(config(tiny_models, f"extract.precision={other}"), annotations, corpus, copy, workers=0)
    assert summary.shards_skipped == 3
    # another precision is computed in (close, not equal) and recorded
    extract(config(tiny_models, f"extract.precision={other}"), first_shard, corpus, tmp_path / "other", workers=0)
    low, full = FeatureStore(tmp_path / "other"), FeatureStore(patch_store)
    assert low.attrs["compute_dtype"] == PRECISIONS[other] and (low.status() == OK).all()
    low, full = low.array("visual")[:].astype(np.float32), full.array("visual")[:8].astype(np.float32)
    assert not np.array_equal(low, full)
    np.testing.assert_allclose(low, full, atol=0.1)


@pytest.mark.parametrize("error, fault", [
    (RuntimeError("CUDA error: an illegal memory access was encountered"), "device"),
    (RuntimeError("CUDA error: device-side assert triggered\nCompile with `TORCH_USE_CUDA_DSA`"), "device"),
    (RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx( handle, ...)`"), "device"),
    (RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"), "device"),
    (RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error"), "device"),
    (RuntimeError("No CUDA GPUs are available"), "device"),
    (RuntimeError("Found no NVIDIA driver on your system."), "device"),
    ("accelerator", "device"),  # torch.AcceleratorError, whatever its message
    ("out of memory", "memory"),  # torch.OutOfMemoryError
    (RuntimeError("CUDA error: out of memory"), "memory"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"), "memory"),
    (ValueError("a clip the encoder cannot take"), None),
    (RuntimeError("The size of tensor a (257) must match the size of tensor b (50)"), None),
])
def test_machine_faults_are_told_from_a_clips_own(error, fault):
    import torch

    from pipeline.encoders import machine_fault

    error = {"accelerator": torch.AcceleratorError("an error of the device"),
             "out of memory": torch.OutOfMemoryError("Tried to allocate 2.00 GiB")}.get(error, error)
    assert machine_fault(error) == fault
