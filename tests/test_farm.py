"""Which GPU each stage-1 worker uses: the layout table, the farm check on workers' declarations,
a real 2-worker LocalCluster on 127.0.0.1 (CPU only: the devices are strings), and the
LocalCUDACluster branch against a stand-in dask_cuda."""
from __future__ import annotations

import os
import re
import socket
import sys
import types
from types import SimpleNamespace

import dask
import distributed
import pytest
from distributed import Client

from pipeline import farm
from pipeline.farm import DevicePlugin, FarmError, assigned_device, check_farm, start_cluster, worker_devices, \
    worker_gpu_info


@pytest.mark.parametrize("device, workers, per_gpu, gpus, expected", [
    ("cpu", None, 1, 4, ["cpu"]),
    ("cpu", 3, 1, 4, ["cpu"] * 3),
    ("auto", None, 1, 0, ["cpu"]),
    ("auto", 2, 1, 0, ["cpu"] * 2),
    ("auto", None, 1, 2, ["cuda:0", "cuda:1"]),
    ("cuda", None, 1, 4, ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]),
    ("cuda", 2, 1, 4, ["cuda:0", "cuda:1"]),  # fewer workers than GPUs: still one per GPU
    ("cuda", None, 2, 2, ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]),
    ("cuda", 3, 2, 2, ["cuda:0", "cuda:1", "cuda:0"]),
    ("cuda:2", None, 1, 4, ["cuda:2"]),
    ("cuda:1", None, 3, 2, ["cuda:1"] * 3),
])
def test_worker_devices(device, workers, per_gpu, gpus, expected):
    assert worker_devices(device, workers, per_gpu, gpus) == expected


@pytest.mark.parametrize("device, workers, per_gpu, gpus, message", [
    ("cuda", 5, 1, 4, r"5 workers on 4 GPU\(s\) at 1 per GPU .* at most 4 workers, or raise workers_per_gpu to 2"),
    ("auto", 3, 1, 2, r"3 workers on 2 GPU\(s\) at 1 per GPU"),
    ("cuda:1", 2, 1, 4, r"2 workers on 1 GPU\(s\) at 1 per GPU .* at most 1 workers"),
    ("cuda", None, 1, 0, "'cuda': this machine has no GPU"),
    ("cuda:0", None, 1, 0, "'cuda:0': this machine has no GPU"),
    ("cuda:2", None, 1, 2, r"'cuda:2': this machine has 2 GPU\(s\): cuda:0..cuda:1"),
    ("cuda", None, 0, 4, "workers_per_gpu is 0"),
    ("cpu", 0, 1, 0, "0 workers"),
    ("gpu", None, 1, 2, "'gpu': expected auto, cpu, cuda or cuda:N"),
])
def test_worker_devices_refuses(device, workers, per_gpu, gpus, message):
    with pytest.raises(FarmError, match=message):
        worker_devices(device, workers, per_gpu, gpus)


def info(host="node1", assigned=None, visible=None, gpus=1, dask_cuda=False) -> dict:
    return {"host": host, "assigned": assigned, "visible": visible, "gpus": gpus, "dask_cuda": dask_cuda}


def test_check_farm_accepts_one_worker_per_gpu():
    check_farm({"tcp://a:1": info(visible="0"), "tcp://a:2": info(visible="1")}, "cuda", 1)
    # the same GPU ids on two hosts are two GPUs
    check_farm({"tcp://a:1": info("node1", visible="0"), "tcp://b:1": info("node2", visible="0")}, "auto", 1)
    # declared by XMEI_DEVICE on a node whose workers see all 8 GPUs
    check_farm({"tcp://a:1": info(assigned="cuda:3", gpus=8), "tcp://a:2": info(assigned="cuda:5", gpus=8)},
               "cuda", 1)
    # dask-cuda's rotated lists: each worker's GPU is the first it sees
    check_farm({"tcp://a:1": info(visible="0,1", gpus=2, dask_cuda=True),
                "tcp://a:2": info(visible="1,0", gpus=2, dask_cuda=True)}, "cuda", 1)
    check_farm({"tcp://a:1": info(visible="3"), "tcp://a:2": info(visible="3")}, "cuda", 2)  # asked for two
    check_farm({"tcp://a:1": info(gpus=0), "tcp://a:2": info(gpus=0)}, "auto", 1)  # a CPU farm


def test_check_farm_never_errs_on_the_cpu():
    shared = {"tcp://a:1": info(gpus=8), "tcp://a:2": info(gpus=8), "tcp://a:3": info(visible="0")}
    check_farm(shared, "cpu", 1)


def test_check_farm_refuses_a_shared_gpu():
    with pytest.raises(FarmError, match=r"GPU 2 of node1 has 2 workers \(tcp://a:1, tcp://a:2\) at 1 per GPU"):
        check_farm({"tcp://a:1": info(visible="2"), "tcp://a:2": info(assigned="cuda:2", gpus=4)}, "cuda", 1)
    # XMEI_DEVICE=cuda:1 read through CUDA_VISIBLE_DEVICES=5,6 is GPU 6
    with pytest.raises(FarmError, match="GPU 6 of node1 has 2 workers"):
        check_farm({"tcp://a:1": info(assigned="cuda:1", visible="5,6", gpus=2), "tcp://a:2": info(visible="6")},
                   "cuda", 1)
    # extract.device=cuda:3 on workers that declare nothing: all on GPU 3
    with pytest.raises(FarmError, match="GPU 3 of node1 has 2 workers"):
        check_farm({"tcp://a:1": info(gpus=4), "tcp://a:2": info(gpus=4)}, "cuda:3", 1)


def test_check_farm_refuses_an_undeclared_worker_and_reports_every_problem():
    infos = {"tcp://a:1": info(gpus=8), "tcp://a:2": info(visible="1"), "tcp://a:3": info(visible="1"),
             "tcp://a:4": info(gpus=0), "tcp://a:5": info(assigned="gpu1", gpus=2)}
    with pytest.raises(FarmError) as caught:
        check_farm(infos, "cuda", 1)
    message = str(caught.value)
    assert "worker tcp://a:1 on node1 sees 8 GPUs (all) and declares none of them" in message
    assert "XMEI_DEVICE=cuda:N or CUDA_VISIBLE_DEVICES=N, or with `dask cuda worker`" in message
    assert "GPU 1 of node1 has 2 workers (tcp://a:2, tcp://a:3)" in message
    assert "worker tcp://a:4 on node1 sees no GPU but extract.device is 'cuda'" in message
    assert "worker tcp://a:5 on node1 declares XMEI_DEVICE='gpu1'" in message
    with pytest.raises(FarmError, match="sees no GPU but XMEI_DEVICE is 'cuda:0'"):
        check_farm({"tcp://a:1": info(assigned="cuda:0", gpus=0)}, "auto", 1)
    with pytest.raises(FarmError, match=r"uses cuda:2 but sees 1 GPU\(s\)"):
        check_farm({"tcp://a:1": info(visible="0")}, "cuda:2", 1)


def test_assigned_device_prefers_the_plugin_then_the_environment(monkeypatch):
    monkeypatch.delenv("XMEI_DEVICE", raising=False)
    assert assigned_device() is None
    monkeypatch.setenv("XMEI_DEVICE", "cuda:3")
    assert assigned_device() == "cuda:3"
    plugin = DevicePlugin(["cuda:0", "cuda:1"])
    worker = SimpleNamespace(name=1, address="tcp://127.0.0.1:1")
    plugin.setup(worker)  # torch sees no GPU here, so no set_device
    assert assigned_device() == "cuda:1"
    plugin.teardown(worker)
    assert assigned_device() == "cuda:3"
    with pytest.raises(FarmError, match=r"worker 2 at tcp://127.0.0.1:2 has no device: .* workers 0..1"):
        plugin.setup(SimpleNamespace(name=2, address="tcp://127.0.0.1:2"))


def test_a_real_local_cluster_pins_each_worker_before_its_first_task(monkeypatch):
    monkeypatch.delitem(sys.modules, "dask_cuda", raising=False)  # the plugin path, also where dask-cuda exists
    monkeypatch.setattr(sys, "meta_path", [_NoDaskCuda(), *sys.meta_path])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the workers see no GPU, even on a GPU machine
    with start_cluster(["cuda:0", "cuda:1"]) as cluster, Client(cluster) as client:
        names = {address: w["name"] for address, w in client.scheduler_info()["workers"].items()}
        assert sorted(names.values()) == [0, 1]
        first = {names[a]: client.submit(assigned_device, workers=[a], pure=False).result() for a in names}
        assert first == {0: "cuda:0", 1: "cuda:1"}  # the first task on each worker already sees its device
        assert {names[a]: d for a, d in client.run(assigned_device).items()} == first
        infos = client.run(worker_gpu_info)
        assert {names[a]: (i["assigned"], i["gpus"], i["dask_cuda"]) for a, i in infos.items()} == \
            {0: ("cuda:0", 0, False), 1: ("cuda:1", 0, False)}
    assert cluster.status.name == "closed"


class _NoDaskCuda:
    """An import hook under which dask_cuda is not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "dask_cuda":
            raise ImportError("dask_cuda hidden by the test")
        return None


class _Recorder:
    """Stands in for a cluster class: records its keyword arguments and the nanny environ."""
    calls: list[dict] = []

    def __init__(self, **kwargs):
        self.calls.append({**kwargs, "environ": dict(dask.config.get("distributed.nanny.environ"))})


def test_one_worker_per_gpu_uses_local_cuda_cluster(monkeypatch):
    fake = types.ModuleType("dask_cuda")
    cuda_cluster = type("LocalCUDACluster", (_Recorder,), {"calls": []})
    local_cluster = type("LocalCluster", (_Recorder,), {"calls": []})
    fake.LocalCUDACluster = cuda_cluster
    monkeypatch.setitem(sys.modules, "dask_cuda", fake)
    monkeypatch.setattr(distributed, "LocalCluster", local_cluster)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    start_cluster(["cuda:0", "cuda:1"])
    (call,) = cuda_cluster.calls
    assert call["CUDA_VISIBLE_DEVICES"] == "0,1" and call["n_workers"] == 2 and call["threads_per_worker"] == 1
    assert call["environ"]["XMEI_DEVICE"] == "cuda:0"  # each worker's own GPU is first in its list
    assert "XMEI_DEVICE" not in dask.config.get("distributed.nanny.environ")  # only while it starts

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")  # this process sees GPUs 4 and 6 as cuda:0, cuda:1
    start_cluster(["cuda:1"])
    assert cuda_cluster.calls[-1]["CUDA_VISIBLE_DEVICES"] == "6"

    start_cluster(["cuda:0", "cuda:0"])  # two per GPU: LocalCUDACluster cannot, the plugin does
    start_cluster(["cpu"])
    assert len(cuda_cluster.calls) == 2 and len(local_cluster.calls) == 2
    (plugin,) = local_cluster.calls[0]["plugins"]
    assert isinstance(plugin, DevicePlugin) and plugin.devices == ["cuda:0", "cuda:0"]
    assert local_cluster.calls[0]["n_workers"] == 2 and local_cluster.calls[0]["host"] == "127.0.0.1"


def test_start_cluster_refuses_bad_devices():
    with pytest.raises(FarmError, match="no devices"):
        start_cluster([])
    with pytest.raises(FarmError, match="'gpu0': expected"):
        start_cluster(["cuda:0", "gpu0"])
    with pytest.raises(FarmError, match="'cuda': a worker's device is cpu or one GPU"):
        start_cluster(["cuda"])


def test_importing_farm_does_not_import_torch():
    import subprocess

    code = "import sys, pipeline.farm; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=farm.__file__.rsplit("/pipeline/", 1)[0])
    assert out.stdout.strip() == "False"


def test_extract_on_a_farm_of_workers_without_a_gpu_is_refused(tiny_models, corpus, annotations, tmp_path):
    """`--scheduler ADDRESS` with extract.device cuda: every worker is asked which GPU is its own
    before any shard runs; here none sees a GPU, and the error names each of them."""
    from distributed import LocalCluster

    from conftest import config
    from pipeline.extract import extract

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster:
        addresses = sorted(cluster.workers[name].worker_address for name in cluster.workers)
        with pytest.raises(FarmError, match="sees no GPU but extract.device is 'cuda'") as caught:
            extract(config(tiny_models, "extract.device=cuda"), annotations, corpus, tmp_path / "store",
                    scheduler=cluster.scheduler_address)
    assert all(address in str(caught.value) for address in addresses)


def test_check_farm_refuses_a_scheduler_without_workers():
    for device in ("cpu", "auto"):
        with pytest.raises(FarmError, match="the dask scheduler has no workers: start them first"):
            check_farm({}, device, 1)


def test_cli_extract_on_a_gpu_this_machine_lacks_is_a_clear_error(tiny_models, corpus, annotations, tmp_path):
    import subprocess

    from test_extract import ROOT, XMEI

    result = subprocess.run([str(XMEI), "extract", "--config", "configs/tiny.yaml", "--models", str(tiny_models),
                             "--annotations", str(annotations), "--media-root", str(corpus), "--out",
                             str(tmp_path / "store"), "--set", "extract.device=cuda:1"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1 and "device 'cuda:1': this machine has no GPU" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "store").exists()


def test_decode_shares_deal_each_nodes_cores_among_its_workers():
    infos = {f"tcp://a:{i}": {"host": "node1", "cpus": list(range(64))} for i in range(8)}  # 8 GPU workers, 64 cores
    infos.update({"tcp://b:1": {"host": "node2", "cpus": list(range(16))},  # a launcher that pinned each its cores
                  "tcp://b:2": {"host": "node2", "cpus": list(range(16, 32))},
                  **{f"tcp://c:{i}": {"host": "node3", "cpus": [0, 1]} for i in range(3)}})  # more workers than cores
    assert farm.decode_shares(infos) == {"node1": 8, "node2": 16, "node3": 1}
    here = farm.local_infos(["cpu", "cpu"])
    assert farm.decode_shares(here) == {socket.gethostname(): max(1, len(os.sched_getaffinity(0)) // 2)}


def test_compute_dtype_is_one_for_every_worker():
    gpus = {"tcp://a:1": {"dtype": "bfloat16"}, "tcp://a:2": {"dtype": "bfloat16"}}
    old = {**gpus, "tcp://b:1": {"dtype": "float16"}}
    assert farm.compute_dtype(gpus, "auto") == "bfloat16" and farm.compute_dtype(old, "fp16") == "float16"
    assert farm.compute_dtype(farm.local_infos(["cpu"]), "auto") == "float32"
    with pytest.raises(FarmError, match=r"auto gives the workers different dtypes \(bfloat16 on tcp://a:1, "
                                        r"tcp://a:2; float16 on tcp://b:1\)"):
        farm.compute_dtype(old, "auto")
    with pytest.raises(FarmError, match="bf16 but the GPUs of tcp://b:1 do not compute in bfloat16"):
        farm.compute_dtype(old, "bf16")


def _break_encoders() -> None:
    """On a worker: every encoder call fails as a GPU with an illegal memory access does."""
    from pipeline.encoders import Encoders

    def sick_gpu(self, clips):
        global _sick_calls
        _sick_calls = globals().get("_sick_calls", 0) + 1
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    Encoders.real_encode, Encoders.encode = Encoders.encode, sick_gpu


def _mend_encoders() -> int:
    """On a worker: the encoders work again; how many sick calls it saw."""
    from pipeline.encoders import Encoders

    Encoders.encode = Encoders.real_encode
    return globals().get("_sick_calls", 0)


def _decode_pools() -> list[int]:
    from pipeline.extract import _POOLS

    return sorted(_POOLS)


@pytest.fixture(scope="module")
def cpu_cluster():
    """A real 2-worker LocalCluster on 127.0.0.1 whose workers compute on the CPU."""
    from distributed import LocalCluster

    cpu = {"XMEI_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0", env=cpu) as cluster:
        yield cluster


def test_two_extractions_share_one_scheduler(cpu_cluster, tiny_models, corpus, annotations, tmp_path):
    """Two `--scheduler` runs into two stores at once: each completes its own store, counts its
    own progress, and each worker decodes in its share of the cores."""
    import threading
    import time

    from conftest import config
    from pipeline.extract import extract
    from stores import OK, FeatureStore, verify_store
    from test_extract import assert_same, contents

    done, summaries, errors = {"a": [], "b": []}, {}, []

    def run(name: str) -> None:
        try:
            summaries[name] = extract(config(tiny_models), annotations, corpus, tmp_path / name,
                                      scheduler=cpu_cluster.scheduler_address,
                                      progress=lambda clips, failed: done[name].append(clips))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(name,)) for name in done]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    deadline = time.monotonic() + 10  # progress events may trail their task's result
    while time.monotonic() < deadline and min(sum(d) for d in done.values()) < 24:
        time.sleep(0.1)
    assert {name: sum(d) for name, d in done.items()} == {"a": 24, "b": 24}  # its own events only
    for name in done:
        store = FeatureStore(tmp_path / name)
        assert summaries[name].ok == 24 and (store.status() == OK).all() and verify_store(store) == []
    assert_same(contents(tmp_path / "a"), contents(tmp_path / "b"))
    with Client(cpu_cluster) as client:
        share = max(1, len(os.sched_getaffinity(0)) // 2)  # this machine's cores between its 2 workers
        assert sorted(client.run(_decode_pools).values()) == [[share], [share]]


def test_a_failing_gpu_on_a_farm_fails_no_clip(cpu_cluster, tiny_models, corpus, annotations, tmp_path):
    """Every worker's encoder fails as a sick GPU: the one shard task is tried 1 + RETRIES times,
    the run ends naming a worker and the error, and every clip stays pending."""
    from conftest import config
    from pipeline.extract import RETRIES, MachineError, extract
    from stores import PENDING, FeatureStore

    out = tmp_path / "store"
    with Client(cpu_cluster) as client:
        client.run(_break_encoders)
        try:
            with pytest.raises(MachineError) as caught:
                extract(config(tiny_models, "extract.shard_size=24"), annotations, corpus, out,
                        scheduler=cpu_cluster.scheduler_address)
        finally:
            calls = client.run(_mend_encoders)
    message = str(caught.value)
    assert re.search(rf"worker tcp://127\.0\.0\.1:\d+ on {socket.gethostname()} failed on shard 0 of {out}: "
                     r"RuntimeError: CUDA error: an illegal memory access was encountered", message), message
    assert "0 of 1 shards are finished and kept" in message
    tried_on = re.search(rf"tried {1 + RETRIES} times, on (.*)\)", message)[1].split(", ")
    assert len(tried_on) == 3 and tried_on[0] != tried_on[1] and set(tried_on) == set(calls)  # the other worker next
    assert sum(calls.values()) == 1 + RETRIES  # each try failed at its first batch
    store = FeatureStore(out)
    assert (store.status() == PENDING).all() and store.failures() == []


def _executing(dask_worker) -> int:
    """On a worker: how many tasks it is running (a cancelled one runs on to its end)."""
    return len(dask_worker.state.executing)


def test_a_full_disk_on_a_farm_ends_the_run_and_the_same_command_resumes(cpu_cluster, tiny_models, corpus, annotations,
                                                                           tmp_path, monkeypatch):
    """`xmei extract --scheduler` into a store on a 4 MB disk, in 2 shards: 16 clips (4.2 MB of
    features, which never fit) and 8 (2.1 MB). Refused before any shard (6.3 MB to write); with
    that check taken out, the shard that meets the full disk ends the whole run with its message,
    once (not retried on the other worker), no clip failed, the other shard kept; on a larger disk
    the same command resumes."""
    import time

    import pipeline.extract
    from faults import assert_full_disk, assert_kept, resize, snapshot, tmpfs, xmei
    from stores import OK, PENDING, FeatureStore, verify_store
    from test_extract import ROOT

    args = ("extract", "--config", ROOT / "configs" / "tiny.yaml", "--models", tiny_models, "--annotations",
            annotations, "--media-root", corpus, "--scheduler", cpu_cluster.scheduler_address,
            "--set", "extract.shard_size=16", "--set", "extract.batch_size=4")
    with tmpfs(tmp_path / "disk", 4 * 10**6) as disk:
        store = disk / "store"
        assert_full_disk(xmei(*args, "--out", store), disk, f"for {store} (the features of the 24 clips of its 2 "
                         "shards still to extract): it needs about 6.3 MB; its clips stay pending: free space")
        assert (FeatureStore(store).status() == PENDING).all()

        monkeypatch.setattr(pipeline.extract, "_check_space", lambda store, jobs: None)
        said = assert_full_disk(xmei(*args, "--out", store), disk, f"while writing {store} (shard 0 of the store, "
                                f"clips 0-15)\n1 of 2 shards are finished and kept in {store}, the clips of the others "
                                "stay pending: free space there (or move the store to a larger disk), then run the same "
                                "command again to complete them")
        assert not re.search(r"tried \d+ times", said) and "0 failed" in said  # once, and no clip failed
        with Client(cpu_cluster) as client:  # no task runs on
            deadline = time.monotonic() + 60
            while sum(client.run(_executing).values()) and time.monotonic() < deadline:
                time.sleep(0.1)
        status = FeatureStore(store).status()
        assert (status[:16] == PENDING).all() and (status[16:] == OK).all()
        assert FeatureStore(store).failures() == [] and not (store / "failures.jsonl").exists()
        kept = snapshot(store / "visual" / "c" / "1")

        resize(disk, 20 * 10**6)
        monkeypatch.undo()
        result = xmei(*args, "--out", store)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "resuming: 1 of 2 shards already done" in result.stderr and "24 ok, 0 failed" in result.stdout
        assert_kept(kept)
        assert verify_store(FeatureStore(store)) == []


def test_a_shard_that_meets_a_failing_gpu_is_done_by_another_worker(cpu_cluster, tiny_models, corpus, annotations,
                                                                     tmp_path):
    from conftest import config
    from pipeline.extract import extract
    from test_extract import assert_same, contents

    with Client(cpu_cluster) as client:
        sick = sorted(client.scheduler_info()["workers"])[0]
        client.run(_break_encoders, workers=[sick])
        try:
            summary = extract(config(tiny_models), annotations, corpus, tmp_path / "store",
                              scheduler=cpu_cluster.scheduler_address)
        finally:
            calls = client.run(_mend_encoders, workers=[sick])
    assert calls[sick] >= 1  # the sick worker did take shards
    assert summary.ok == 24 and summary.failed == []  # and the other one did them again
    # the same store as healthy workers make (dask's workers compute in one thread each: the in-process
    # store differs from theirs in the last bit of a few float16 values)
    extract(config(tiny_models), annotations, corpus, tmp_path / "healthy", scheduler=cpu_cluster.scheduler_address)
    assert_same(contents(tmp_path / "store"), contents(tmp_path / "healthy"))
