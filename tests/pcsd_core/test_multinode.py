"""A real two-node Ray cluster on this machine: two FSDP2 workers (gloo) on different nodes match one process.

`ray.cluster_utils.Cluster` runs a head node and a second node, each its own raylet with 1 CPU, so a
STRICT_SPREAD placement of 2 workers has to use both. The run joins the cluster through `train.ray_address`
(starting no Ray of its own), trains one rollout batch (teacher pass + 2 optimizer steps), and a rank killed
afterwards fails the next call with its rank and node named; the cluster outlives the run. ~40 s.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_workers import config, random_batch, single_process_reference

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
    from pcsd_core.workers import ensure_ray, launch_train_workers

    batch = random_batch(8)
    single_teacher, single_stats, expected, _ = single_process_reference(tiny_model_dir, batch)

    raylets = raylet_count()
    assert raylets >= 2
    assert ensure_ray(two_node_cluster.address) is False  # joined, not started: nothing of ours to shut down
    cfg = config(use_ray=True, num_workers=2, num_nodes=2, ray_address=two_node_cluster.address)
    group = launch_train_workers(cfg, str(tiny_model_dir), device_type="cpu")
    try:
        assert group.owns_ray is False
        assert raylet_count() == raylets  # joining started no Ray instance of its own
        node_ids = ray.get([w.node_id.remote() for w in group.workers])
        cluster_nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
        assert len(set(node_ids)) == 2 and set(node_ids) == cluster_nodes  # one rank on each node

        teacher = group.compute_distributions(batch)
        for got, want in zip(teacher.hidden, single_teacher.hidden, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        stats = group.update(batch, teacher)
        streamed = {name: tensor for bucket in group.iter_state_dict_buckets("student", 2**18) for name, tensor in bucket}

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
