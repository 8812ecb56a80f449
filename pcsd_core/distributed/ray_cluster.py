"""Ray itself: join a cluster or start one (`ensure_ray`), and where train workers and the rollout go on it.

`ensure_ray` follows Ray's own rule for an address (train.ray_address, RAY_ADDRESS, else the cluster `ray start`
left on this machine) and starts a local Ray only when there is none, with `RAY_SYSTEM_CONFIG`.
`placement_bundles` spreads the workers over nodes; `local_gpu_indexes` turns the GPUs Ray gave workers on this
machine into this process's torch indexes, so a split rollout engine can take others.
"""

from __future__ import annotations

import os
import socket

# The Ray we start frees an object as soon as its last reference goes. By default Ray frees them in batches about
# once a second, and the weight sync sends buckets faster than that: the object store would hold a second's worth
# of buckets (at 135M on CPU, the whole model) instead of one. A cluster we join keeps its own setting: start its
# nodes with RAY_free_objects_period_milliseconds=0 in the environment (README, "Beyond one machine").
RAY_SYSTEM_CONFIG = {"free_objects_period_milliseconds": 0}
NO_LOCAL_CLUSTER = "Could not find any running Ray instance"  # ray.init(address="auto") finding none


def ensure_ray(address: str = "") -> bool:
    """Connect to Ray; True only when this call started a Ray instance of its own (shut it down when done).

    With `address` (train.ray_address) or RAY_ADDRESS set, join that cluster and start nothing: the cluster's
    resources are its own (num_cpus would be an error), and it keeps running after we leave. Already connected:
    nothing to do. Without an address, Ray's own rule: join the cluster that `ray start` left on this machine if
    there is one, else start a local instance with every CPU of this machine and `RAY_SYSTEM_CONFIG`.
    """
    import ray

    if ray.is_initialized():
        return False
    try:
        ray.init(address=address or "auto", configure_logging=False)  # "auto" reads RAY_ADDRESS first
        return False
    except ConnectionError as error:
        if address or NO_LOCAL_CLUSTER not in str(error):
            where = address or "auto (RAY_ADDRESS, else the cluster `ray start` left on this machine)"
            raise ConnectionError(
                f"could not join the Ray cluster at {where}: {error}. Check that the address is the head's `ray "
                "start` address and reachable from here. Ray >= 2.59 runs a cluster with token authentication when "
                "its head was started with RAY_AUTH_MODE=token or found a token in ~/.ray/auth_token: then set "
                "RAY_AUTH_MODE=token here too, with the cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token (`ray "
                "get-auth-token` on the head).") from error
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, configure_logging=False,
             _system_config=RAY_SYSTEM_CONFIG)
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now ("" = every interface of this machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def placement_bundles(num_workers: int, num_nodes: int, device_type: str) -> tuple[list[dict], str]:
    """One bundle per node holding its workers' CPUs (and GPUs), and the strategy that puts them on distinct nodes.

    Bundles are per node, not per worker, so "num_workers / num_nodes workers on each of num_nodes nodes" is one
    STRICT_SPREAD placement group (one bundle per node; a single node is the single-bundle case).
    """
    per_node = num_workers // num_nodes
    bundle = {"CPU": per_node, "GPU": per_node} if device_type == "cuda" else {"CPU": per_node}
    return [dict(bundle) for _ in range(num_nodes)], "STRICT_SPREAD" if num_nodes > 1 else "STRICT_PACK"


def local_gpu_indexes(ray_gpu_ids: list[int | str], cuda_visible_devices: str | None) -> list[int]:
    """Ray's GPU ids (CUDA_VISIBLE_DEVICES entries of the node) as torch device indexes in this process: their
    positions in this process's CUDA_VISIBLE_DEVICES, or the ids themselves when it is unset. An id this process
    cannot see is dropped (it cannot collide with a device here)."""
    if cuda_visible_devices is None:
        return sorted(int(gpu) for gpu in ray_gpu_ids)
    visible = [entry.strip() for entry in cuda_visible_devices.split(",")]
    return sorted(visible.index(str(gpu)) for gpu in ray_gpu_ids if str(gpu) in visible)
