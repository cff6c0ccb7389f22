"""Stores in object storage (stores.location, stores.files, stores.reader.ObjectClipReader) against
a real S3 endpoint on 127.0.0.1 (conftest's s3_endpoint: moto's server, a bucket "xmei"): reads
equal to the same store on disk, in few requests; extraction into a URL killed, resumed and
verified; training and evaluation from it equal to from disk; export and import through it; the
run lock as an object; incomplete and foreign objects refused, never deleted."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import KEEP_EVERY_3, LAST, ROOT, config, train_run
from faults import XMEI, xmei
from stores import OK, PENDING, FeatureStore, StoreError, verify_store
from stores.files import store_files
from stores.store import copy_store
from test_extract import KILLED_CREATION, assert_same, contents
from test_train import assert_same_weights, losses_by_step
from xmei.runlock import run_lock, store_lock


def url(name: str) -> str:
    return f"s3://xmei/test_object_stores/{name}"


@pytest.fixture(scope="module")
def s3_store(s3_endpoint, patch_store) -> str:
    """The patch store (24 clips, 3 shards of 8) uploaded to the S3 endpoint."""
    return copy_store(patch_store, url("patch")).where


def extract_args(tiny_models: Path, annotations: Path, corpus: Path, out: str, endpoint: str) -> list[str]:
    """`xmei extract` as conftest's patch_store makes it (shards of 8, in this process), into ``out``."""
    return ["extract", "--config", ROOT / "configs" / "tiny.yaml", "--models", tiny_models, "--annotations",
            annotations, "--media-root", corpus, "--out", out, "--workers", "0", "--set", "extract.shard_size=8",
            "--set", "extract.batch_size=4", "--set", f"stores.endpoint_url={endpoint}"]


# ----------------------------------------------------------------------------- reading

def test_clips_read_from_s3_equal_the_store_on_disk_in_few_requests(s3_store, patch_store):
    local, remote = FeatureStore(patch_store), FeatureStore(s3_store)
    order = np.random.default_rng(26).permutation(24)[:17].tolist() + [5, 5, 20]  # any order, repeats
    for name in [*local.features, "status"]:
        np.testing.assert_array_equal(remote.clip_reader(name).read(order), local.clip_reader(name).read(order), name)
        for a, b in zip(remote.clip_reader(name).read_each(order), local.clip_reader(name).read_each(order)):
            np.testing.assert_array_equal(a, b, name)
    for name in [*local.texts, *local.ints]:
        np.testing.assert_array_equal(remote.read_whole(name), local.read_whole(name), name)
    assert str(remote[7]["subtitle"]) == str(local[7]["subtitle"]) and remote.failures() == local.failures()
    assert verify_store(remote) == [] and remote.where == s3_store
    # one suffix-range request per shard index (kept), one per run of clips back to back
    visual = FeatureStore(s3_store).clip_reader("visual")  # a clip: 8 x 257 x 64 float16 (263 kB), more than GAP_BYTES
    visual.read(np.arange(8))
    assert visual.requests == 2, "shard 0 whole: its index, then one range"
    visual.read([9, 3, 17, 2])
    assert visual.requests == 2 + 2 + 3, "the indexes of shards 1 and 2, one range in each of the 3 shards"
    visual.read([0, 1, 3])
    assert visual.requests == 7 + 2, "clips 0-1 back to back, clip 3 a clip further on"


def test_a_damaged_clip_is_named_and_a_rewritten_shard_read_anew(s3_endpoint, patch_store):
    where = url("damaged")
    store = copy_store(patch_store, where)
    key = "visual/c/1/0/0/0"
    data = bytearray(store.files.read(key))
    data[100] ^= 0xFF  # inside the shard's first clip, clip 8
    store.files.write(key, bytes(data), "a damaged shard")
    message = (f"visual: shard object {where}/{key} (shard 1, clips 8-15): clip(s) 8: they fail their checksum "
               "(crc32c), damaged")
    with pytest.raises(StoreError, match=message.replace("(", r"\(").replace(")", r"\)")):
        FeatureStore(where).clip_reader("visual").read([9, 8])
    assert any("clip(s) 8" in p for p in verify_store(FeatureStore(where)))
    # shard 0 rewritten after its index was kept: clip 0 now the fill value (not written), every other clip moves
    reader = FeatureStore(where).clip_reader("visual")
    before = reader.read(np.arange(8))
    changed = before.copy()
    changed[0] = 0
    FeatureStore(where, mode="r+").array("visual")[0:8] = changed
    requests = reader.requests
    np.testing.assert_array_equal(reader.read([3, 0, 5]), changed[[3, 0, 5]])
    assert reader.requests > requests + 1, "the index was fetched again after a clip failed its checksum"


# ----------------------------------------------------------------------------- writing

def test_extraction_into_s3_killed_then_resumed_equals_the_store_on_disk(s3_endpoint, tiny_models, corpus,
                                                                        annotations, patch_store):
    endpoint, out = s3_endpoint[0], url("killed")
    args = [str(XMEI), *map(str, extract_args(tiny_models, annotations, corpus, out, endpoint))]
    alone = {k: v for k, v in os.environ.items() if k not in ("AWS_ENDPOINT_URL", "AWS_ALLOW_HTTP")}  # the config's
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=alone)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:  # kill it once one shard of 3 is written
        try:
            if FeatureStore(out).done_shards():
                break
        except StoreError:
            pass
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    status = FeatureStore(out).status()
    assert (status == PENDING).any() and (status == OK).any(), "the kill came too late or too early"
    lock = store_lock(out)
    assert str(lock) == "s3://xmei/test_object_stores/.killed.xmei.lock"  # beside the store, left by the kill
    again = xmei(*extract_args(tiny_models, annotations, corpus, out, endpoint))
    said = " ".join((again.stdout + again.stderr).split())
    assert again.returncode == 0, said
    assert f"taking over {lock}: the run that held it (`xmei extract" in said and "resuming:" in said
    verified = xmei("stores", "verify", out)  # the stores commands: the endpoint from the environment
    assert verified.returncode == 0 and f"{out}: ok (24 clips verified)" in verified.stdout, verified.stderr
    assert_same(contents(out), contents(patch_store))
    files = FeatureStore(out).files
    assert not files.exists(".killed.xmei.lock") and endpoint not in json.dumps(FeatureStore(out).attrs)


def test_a_creation_cut_off_in_s3_is_refused_then_made_again(s3_endpoint, tiny_models, corpus, annotations,
                                                             patch_store):
    endpoint, out = s3_endpoint[0], url("cut")
    script = KILLED_CREATION.format(root=str(ROOT), tests=str(ROOT / "tests"), models=str(tiny_models),
                                    annotations=str(annotations), corpus=str(corpus), out=out)
    script = script.replace(f"Path({out!r})", repr(out))  # the store is a URL, not a Path
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr
    refused = xmei("stores", "verify", out)  # the stores commands: the endpoint from the environment
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert (f"{out} was cut off while being created (its attributes, written last, are missing): run the same xmei "
            "extract again to create it") in " ".join(refused.stderr.split())
    made = xmei(*extract_args(tiny_models, annotations, corpus, out, endpoint))
    assert made.returncode == 0, made.stderr
    assert_same(contents(out), contents(patch_store))


def test_objects_that_are_no_store_are_refused_and_kept(s3_endpoint, tiny_models, corpus, annotations):
    endpoint, out = s3_endpoint[0], url("notes")
    files = store_files(out)
    files.write("readme.txt", "not features", "a user's object")
    result = xmei(*extract_args(tiny_models, annotations, corpus, out, endpoint))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{out} holds objects but no zarr.json: not a feature store; choose another place" in \
        " ".join(result.stderr.split())
    assert files.read("readme.txt") == b"not features"
    missing = xmei("stores", "info", url("nothing"))
    assert missing.returncode == 1 and (f"{url('nothing')} is not a feature store (a folder or URL xmei extract "
                                        "makes): no object there") in " ".join(missing.stderr.split())


def test_a_second_run_into_one_url_is_refused_naming_the_first(s3_endpoint, tiny_models, corpus, annotations):
    endpoint, out = s3_endpoint[0], url("locked")
    with run_lock(store_lock(out), out, "--out"):  # a live run of this host holds it
        result = xmei(*extract_args(tiny_models, annotations, corpus, out, endpoint), process=True)
    said = " ".join(result.stderr.split())
    assert result.returncode == 1 and "Traceback" not in said
    assert f"--out {out} is in use by another run on this host" in said
    assert not store_files(out).exists() and not store_files(url("")).exists(".locked.xmei.lock")


def test_export_and_import_through_s3(s3_store, patch_store, tmp_path):
    """The endpoint from the environment (AWS_ENDPOINT_URL, conftest's s3_endpoint): the stores
    commands read no config."""
    h5 = tmp_path / "patch.h5"
    exported = xmei("stores", "export", s3_store, h5)
    assert exported.returncode == 0, exported.stderr
    imported = xmei("stores", "import", h5, url("imported"))
    assert imported.returncode == 0 and "verify: no problem(s)" in imported.stdout, imported.stderr
    assert_same(contents(url("imported")), contents(patch_store))
    again = xmei("stores", "import", h5, url("imported"))
    assert again.returncode == 1 and f"{url('imported')} exists already" in again.stderr


def test_a_store_copied_into_s3_and_back_is_the_same(s3_store, patch_store, tmp_path):
    """`xmei stores copy` both ways (s3_store itself is patch_store copied by copy_store)."""
    there, back = url("copied"), tmp_path / "back"
    for source, dest in ((patch_store, there), (there, back)):
        result = xmei("stores", "copy", source, dest)
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        assert f"copied {source} to {dest} (24 clips)" in " ".join(result.stdout.split())
    assert_same(contents(back), contents(patch_store))
    assert sorted(p.relative_to(back).as_posix() for p in back.rglob("*") if p.is_file()) == \
        sorted(p.relative_to(patch_store).as_posix() for p in patch_store.rglob("*") if p.is_file())
    again = xmei("stores", "copy", patch_store, there)
    assert again.returncode == 1 and f"{there} exists already" in again.stderr


# ----------------------------------------------------------------------------- training and evaluation

def test_training_from_s3_equals_training_from_disk(s3_store, s3_endpoint, trained_run, tiny_models, tmp_path):
    """Two DataLoader workers (started by forkserver: this process has used obstore) against
    conftest's trained_run (no workers, the store on disk): the same losses and weights; no
    checkpoint names the endpoint."""
    out = train_run(tiny_models, s3_store, tmp_path / "run", *KEEP_EVERY_3, "run.num_workers=2",
                    f"stores.endpoint_url={s3_endpoint[0]}")
    assert losses_by_step(out) == losses_by_step(trained_run)
    assert_same_weights(out, trained_run, "trained from s3")
    saved = [p for p in out.rglob("*") if p.is_file() and p.suffix in (".yaml", ".json", ".jsonl")]
    assert saved and not [p for p in saved if s3_endpoint[0].split("//")[1] in p.read_text()]


def test_evaluation_from_s3_equals_evaluation_from_disk(s3_store, s3_endpoint, patch_store, trained_run, tmp_path):
    sets = ("--set", "eval.max_new_tokens=48", "--set", "run.batch_size_eval=8", "--set",
            f"stores.endpoint_url={s3_endpoint[0]}")
    for name, store in (("s3", s3_store), ("disk", patch_store)):
        result = xmei("eval", "--checkpoint", trained_run / LAST, "--store", store, "--out", tmp_path / name, *sets)
        assert result.returncode == 0, result.stderr
    assert (tmp_path / "s3" / "predictions.jsonl").read_bytes() == (tmp_path / "disk" / "predictions.jsonl").read_bytes()
    results = json.loads((tmp_path / "s3" / "results.json").read_text())
    assert results["store"] == s3_store


def test_predict_report_and_attention_read_a_store_in_s3(s3_store, s3_endpoint, patch_store, trained_run, corpus,
                                                         tmp_path):
    sets = ("--set", "eval.max_new_tokens=48", "--set", "run.batch_size_eval=8", "--set",
            f"stores.endpoint_url={s3_endpoint[0]}")
    for name, store in (("s3", s3_store), ("disk", patch_store)):
        result = xmei("predict", "--store", store, "--checkpoint", trained_run / LAST, "--out", tmp_path / name, *sets)
        assert result.returncode == 0, result.stderr
    for name in ("predictions.jsonl", "predictions.csv"):
        assert (tmp_path / "s3" / name).read_text() == (tmp_path / "disk" / name).read_text(), name
    assert json.loads((tmp_path / "s3" / "predict.json").read_text())["store"] == s3_store
    page = xmei("report", tmp_path / "s3", "--media-root", corpus, *sets)  # its store: the URL predict.json names
    assert page.returncode == 0 and "synth_00004" in (tmp_path / "s3" / "report.html").read_text(), page.stderr
    maps = xmei("attention", "--checkpoint", trained_run / LAST, "--store", s3_store, "--clip", "synth_00004",
                "--out", tmp_path / "maps", "--media-root", corpus, *sets)
    assert maps.returncode == 0 and (tmp_path / "maps" / "attention_synth_00004.png").is_file(), maps.stderr


def test_the_endpoint_is_a_plain_server_url(tiny_models):
    from xmei.config import ConfigError

    for bad, said in (("127.0.0.1:9000", "'127.0.0.1:9000' is not an http:// or https:// URL of a server"),
                      ("http://user:secret@127.0.0.1:9000", "an endpoint URL holds no credentials or query"),
                      ("http://127.0.0.1:9000?token=secret", "an endpoint URL holds no credentials or query")):
        with pytest.raises(ConfigError) as caught:
            config(tiny_models, f"stores.endpoint_url={bad}")
        assert said in str(caught.value) and "secret" not in str(caught.value).replace("SECRET", "")
    given = config(tiny_models, "stores.endpoint_url=http://127.0.0.1:9000")
    assert "stores" not in given.to_dict() and given.to_dict(machine=True)["stores"]["endpoint_url"]


def test_a_server_that_cannot_be_reached_is_an_error_naming_the_object_not_the_secret(s3_endpoint):
    """Within seconds (stores.location.RETRIES), with where the credentials come from."""
    from test_train import free_port

    gone = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = xmei("stores", "info", url("patch"), env={"AWS_ENDPOINT_URL": gone})
    said = " ".join(result.stderr.split())
    assert result.returncode == 1 and "Traceback" not in said
    assert f"error: {url('patch')}/zarr.json: cannot look it up" in said and "AWS_ACCESS_KEY_ID" in said
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in said
