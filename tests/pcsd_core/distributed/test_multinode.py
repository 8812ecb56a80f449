"""A real two-node Ray cluster on this machine: two FSDP2 workers (gloo) on different nodes match one process.

`ray.cluster_utils.Cluster` runs a head node and a second node, each its own raylet with 1 CPU, so a
STRICT_SPREAD placement of 2 workers has to use both. The run joins the cluster through `train.ray_address`
(starting no Ray of its own), trains one rollout batch (teacher pass + 2 optimizer steps), and a rank killed
afterwards fails the next call with its rank and node named; the cluster outlives the run. ~40 s.

A second test starts a real `ray start --head` and checks that, given no address, the trainer joins it. ~40 s.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_workers import config, random_batch, single_process_reference

from pcsd_core.distributed.weight_sync import drain, whole_tensors

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")


def raylet_count() -> int:
    """Raylet processes on this machine (one per Ray node)."""
    count = 0
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv0 = cmdline.read_bytes().split(b"\0")[0]
        except OSError:
            continue
        count += Path(argv0.decode(errors="replace")).name == "raylet"
    return count


@pytest.fixture
def two_node_cluster():
    if ray.is_initialized():
        ray.shutdown()  # a test module's local Ray; this test needs to be the cluster's driver
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_two_fsdp_workers_on_two_nodes_match_one_process(tiny_model_dir, two_node_cluster):
    from pcsd_core.distributed.ray_cluster import ensure_ray
    from pcsd_core.distributed.ray_workers import launch_train_workers

    batch = random_batch(8)
    single_teacher, single_stats, expected, _ = single_process_reference(tiny_model_dir, batch)

    raylets = raylet_count()
    assert raylets >= 2
    assert ensure_ray(two_node_cluster.address) is False  # joined, not started: nothing of ours to shut down
    cfg = config(use_ray=True, num_workers=2, num_nodes=2, ray_address=two_node_cluster.address)
    group = launch_train_workers(cfg.model, cfg.train, cfg.loss, str(tiny_model_dir), device_type="cpu")
    try:
        assert group.owns_ray is False
        assert raylet_count() == raylets  # joining started no Ray instance of its own
        node_ids = ray.get([w.node_id.remote() for w in group.workers])
        cluster_nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
        assert len(set(node_ids)) == 2 and set(node_ids) == cluster_nodes  # one rank on each node

        teacher = group.compute_distributions(batch)
        for got, want in zip(teacher.hidden, single_teacher.hidden, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        stats = group.update_policy_with_distillation(batch, teacher)
        streamed = dict(whole_tensors(drain(group.iter_state_dict_buckets(2**18))))

        ray.kill(group.workers[1])  # a rank dies: the next call fails naming it and its node, without hanging
        with pytest.raises(RuntimeError, match=rf"train worker rank 1 on node .*{node_ids[1]}.* died"):
            group.compute_distributions(batch)
    finally:
        group.shutdown()

    assert stats.loss_sum == pytest.approx(single_stats.loss_sum, rel=1e-5)
    assert stats.num_tokens == single_stats.num_tokens
    assert set(expected) - set(streamed) <= {"lm_head.weight"}
    for name, tensor in streamed.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=2e-5, msg=name)
    assert len([node for node in ray.nodes() if node["Alive"]]) == 2  # the cluster we joined is still up
    assert raylet_count() == raylets


def test_without_an_address_the_trainer_joins_the_cluster_ray_start_left_on_this_machine():
    """Ray's own rule for ray.init(): no address means the cluster `ray start` left here, if any. Starting one of
    our own instead would fail (Ray refuses num_cpus when a cluster is found) or double-book the machine. A join
    that fails (here: a wrong token) names the token-authentication fix.

    The head runs with its own RAY_TMPDIR, where `ray start` records its address, so no other test can find it,
    and it is stopped by killing its `--block` process group (`ray stop` would stop every Ray on the machine). It
    runs with token authentication and a token of this test's, whatever ~/.ray holds on this machine.
    """
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    from pcsd_core.distributed.ray_cluster import free_port

    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_TMPDIR": temp_dir, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "pcsd-test-token-1"}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    raylets = raylet_count()
    head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                             f"--port={port}", "--num-cpus=1", "--include-dashboard=false"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def probe(code: str, **extra_env: str) -> str:
        script = ("import ray\nfrom pcsd_core.distributed.ray_cluster import ensure_ray\nfrom test_multinode import raylet_count\n"
                  + code)
        path = os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[3])])
        return subprocess.run([sys.executable, "-c", script], env={**env, "PYTHONPATH": path, **extra_env},
                              capture_output=True, text=True, timeout=120).stdout

    try:
        address_file = Path(temp_dir, "ray", "ray_current_cluster")  # written by `ray start` once the head is up
        for _ in range(120):
            if address_file.exists() or head.poll() is not None:
                break
            time.sleep(0.5)
        assert address_file.exists(), "the `ray start` head did not come up within 60 s"
        joined = probe("owns = ensure_ray()\n"
                       "print(owns, ray.get_runtime_context().gcs_address, raylet_count(), flush=True)\nray.shutdown()")
        owns, address, raylets_while_joined = joined.split()[-3:]
        refused = probe(f"try:\n    ensure_ray({address!r})\nexcept ConnectionError as error:\n    print(error)",
                        RAY_AUTH_TOKEN="not-the-cluster-token")
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert owns == "False"  # joined: nothing of ours to shut down, and the cluster stays
    assert address.endswith(f":{port}")
    assert int(raylets_while_joined) == raylets + 1  # the head's raylet only: no Ray instance of our own
    assert f"could not join the Ray cluster at {address}" in refused
    assert "set RAY_AUTH_MODE=token here too, with the cluster's token in RAY_AUTH_TOKEN" in refused
