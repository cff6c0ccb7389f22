"""Past one machine, on one machine (issue 26): nodes that share no folder but the media and the
models, a store in object storage (conftest's S3 endpoint) between them.

Extraction: a `dask scheduler` and two `dask worker` processes, each started from its own working
folder and without the endpoint in its environment (the driver's stores.endpoint_url travels with
each shard's task), write into s3://; the store equals conftest's patch_store, extracted on one
machine. Training: two torchrun "nodes" (--nnodes 2, c10d rendezvous on 127.0.0.1, gloo, one
process each), each from its own working folder, read that store and write their checkpoints into
one output folder (the shared filesystem a real cluster gives its nodes): the same losses and
weights as two processes on one node reading the store on disk."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT
from test_extract import assert_same, contents
from test_train import (TORCHRUN, XMEI, assert_same_weights, free_port, losses_by_step, two_process_program,
                        two_processes)

DASK = Path(sys.executable).parent / "dask"
__all__ = ["two_processes"]  # test_train's fixture, used here: the same run on one node, from disk


def started(args: list, cwd: Path, env: dict) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([str(a) for a in args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def stopped(procs: list[subprocess.Popen]) -> str:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    return "\n".join(proc.communicate(timeout=60)[0][-2000:] for proc in procs)


def test_two_dask_workers_extract_into_s3_and_two_torchrun_nodes_train_from_it(
        s3_endpoint, tiny_models, corpus, annotations, patch_store, two_processes, tmp_path):
    endpoint, store = s3_endpoint[0], "s3://xmei/test_two_nodes/train"
    # a node's environment: the credentials (AWS_*), no endpoint (it comes from the driver's config)
    node_env = {k: v for k, v in os.environ.items() if k not in ("AWS_ENDPOINT_URL", "AWS_ALLOW_HTTP")}
    port = free_port()
    farm = [started([DASK, "scheduler", "--host", "127.0.0.1", "--port", port, "--no-dashboard"], tmp_path / "scheduler",
                    node_env)]
    try:
        cpu = {**node_env, "XMEI_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": ""}
        farm += [started([DASK, "worker", f"tcp://127.0.0.1:{port}", "--nthreads", "1", "--no-dashboard",
                          "--local-directory", tmp_path / f"node{i}" / "dask", "--name", f"node{i}"],
                         tmp_path / f"node{i}", cpu) for i in (1, 2)]
        from distributed import Client

        with Client(f"tcp://127.0.0.1:{port}", timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        driver = started([XMEI, "extract", "--config", ROOT / "configs" / "tiny.yaml", "--models", tiny_models,
                          "--annotations", annotations, "--media-root", corpus, "--out", store, "--scheduler",
                          f"tcp://127.0.0.1:{port}", "--set", "extract.shard_size=8", "--set", "extract.batch_size=4",
                          "--set", f"stores.endpoint_url={endpoint}"], tmp_path / "driver", node_env)
        output = driver.communicate(timeout=300)[0]
    finally:
        said = stopped(farm)  # the scheduler's and workers' own logs, for a failure's message
    assert driver.returncode == 0, output[-3000:] + said
    assert f"{store}: 24 ok, 0 failed of 24 clips in 3 shards" in " ".join(output.split()), output[-3000:] + said
    assert_same(contents(store), contents(patch_store))
    assert not [f for i in (1, 2) for f in (tmp_path / f"node{i}").rglob("zarr.json")]  # nothing of it on a node

    out, rendezvous = tmp_path / "run", f"127.0.0.1:{free_port()}"
    program = two_process_program(tiny_models, store, out, "torch", "--set", f"stores.endpoint_url={endpoint}")
    nodes = [started([TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                      rendezvous, "--rdzv_id", "xmei-two-nodes", *program], tmp_path / f"node{i}", node_env)
             for i in (1, 2)]
    deadline = time.monotonic() + 600
    outputs = [node.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(o[-3000:] for o in outputs)
    one_node = two_processes("torch")  # two processes on one node, the store on disk
    assert losses_by_step(out) == losses_by_step(one_node)
    assert_same_weights(out, one_node, "two nodes from s3 / two processes from disk")
