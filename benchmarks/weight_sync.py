"""Peak extra memory and time of one weight sync (train workers -> HF rollout engine): buckets vs full gather.

Run:  python benchmarks/weight_sync.py            (SmolLM2-135M fp32 on CPU; a few minutes)

Cases, each in a fresh subprocess (one case's heap cannot hide another's): the actor in this process
(`InProcessWorkers`) and 2 FSDP2 Ray workers (gloo, CPU), each with
- full:  the old sync, `engine.update_weights(workers.full_state_dict("student").items())` (the whole model
         gathered to rank 0, shipped through the Ray object store at once);
- bucket <N> MB: `engine.update_weights(drain(workers.iter_state_dict_buckets(N MiB)))`, each rank
         sending rows of its own shard (no gather);
and one more Ray case, 16 MB buckets on a Ray started with Ray's default object freeing (in batches about once a
second) instead of the trainer's (`ray_cluster.RAY_SYSTEM_CONFIG`, each object freed at once): what a joined cluster
started without RAY_free_objects_period_milliseconds=0 costs.
Memory: the sum of PSS (proportional set size, /proc/<pid>/smaps_rollup) over the controller, the worker
processes and the raylet (the object store), sampled every 5 ms in a thread; extra = peak during the syncs
minus the sum just before. PSS counts a page shared by several processes (the object store's) once in total.
Each process's own peak extra is printed beside it (the peaks need not coincide, so they may not add up to it).
Weights are written once before measuring (a fresh load may leave them as file-backed pages that the first
write would materialize: a loading cost, not a sync's). Time: mean of 2 syncs. The last line is machine-readable,
for the 2-Ray-worker path at BUCKET_REPORTED_MB:
sync_extra_mb=<bucketed> full_gather_extra_mb=<baseline> model_mb=<size>
"""

from __future__ import annotations

from pcsd_core.config.loader import config_from_dict
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BUCKETS_MB = (16, 64, 256)
BUCKET_REPORTED_MB = 16
SYNCS = 2
sys.path.insert(0, str(REPO_ROOT))  # this checkout's pcsd_core, in the cases' subprocesses too


def pss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class PeakSampler:
    """Peak of the summed PSS of `pids` while running, and each process's own peak, sampled in a thread."""

    def __init__(self, pids: list[int], interval_s: float = 0.005):
        self.pids, self.interval_s, self.peak = pids, interval_s, 0.0
        self.peak_by_pid = {pid: 0.0 for pid in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def total(self) -> float:
        return sum(pss_mb(pid) for pid in self.pids)

    def _run(self) -> None:
        while not self._stop.is_set():
            sizes = {pid: pss_mb(pid) for pid in self.pids}
            self.peak = max(self.peak, sum(sizes.values()))
            self.peak_by_pid = {pid: max(self.peak_by_pid[pid], size) for pid, size in sizes.items()}
            time.sleep(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.total())


def raylet_pids() -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if Path(cmdline.read_bytes().split(b"\0")[0].decode(errors="replace")).name == "raylet":
                pids.append(int(cmdline.parent.name))
        except (OSError, ValueError):
            continue
    return pids


def run_case(path: str, workers: str, bucket_mb: int) -> dict:
    """One case in this (fresh) process: build workers and engine, measure SYNCS syncs."""
    import torch

    from pcsd_core.config.schema import PCSDConfig
    from pcsd_core.rollout.hf import HFRolloutEngine
    from pcsd_core.distributed.weight_sync import drain, unique_state_items
    from pcsd_core.distributed.ray_cluster import ensure_ray
    from pcsd_core.distributed.ray_workers import launch_train_workers
    from pcsd_core.distributed.workers import InProcessWorkers

    torch.set_num_threads(1)
    train = {"device": "cpu", "prompts_per_step": 2, "mini_batch_size": 4, "micro_batch_size": 2}
    if workers.startswith("ray"):
        import ray

        train.update(use_ray=True, num_workers=2)
        if workers == "ray-batched-free":
            ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
        else:
            ensure_ray()  # the Ray the trainer starts, with its object-freeing setting
    cfg = config_from_dict({"model": {"name": path}, "train": train, "rollout": {"n": 2}})
    if workers.startswith("ray"):
        group = launch_train_workers(cfg.model, cfg.train, cfg.loss, path, device_type="cpu")
        ranks = ray.get([w.pid.remote() for w in group.workers])
        names = {os.getpid(): "controller", **{pid: f"rank {r}" for r, pid in enumerate(ranks)},
                 **{pid: "raylet" for pid in raylet_pids()}}
    else:
        from pcsd_core.engine.actor import Actor

        group, names = InProcessWorkers(Actor(cfg.model, cfg.train, cfg.loss, path)), {os.getpid(): "controller"}
    pids = list(names)
    engine = HFRolloutEngine(path)
    # Weights loaded from safetensors may be file-backed pages until first written; write them once now so that
    # the syncs measure what they allocate, not the one-time page-in of a fresh load.
    with torch.no_grad():
        for module in (engine.model, *([] if workers.startswith("ray") else [group.actor.student])):
            for tensor in module.state_dict().values():
                tensor.mul_(1)
    model_mb = sum(t.numel() * t.element_size() for _, t in unique_state_items(engine.model)) / 2**20
    durations = []
    sampler = PeakSampler(pids)
    before = sampler.total()
    before_by_pid = {pid: pss_mb(pid) for pid in pids}
    with sampler:
        for _ in range(SYNCS):
            started = time.perf_counter()
            if bucket_mb == 0:
                engine.update_weights(group.full_state_dict("student").items())
            else:
                engine.update_weights(drain(group.iter_state_dict_buckets(bucket_mb * 2**20)))
            durations.append(time.perf_counter() - started)
    group.shutdown()
    by_process = {names[pid]: sampler.peak_by_pid[pid] - before_by_pid[pid] for pid in pids}
    return {"extra_mb": sampler.peak - before, "sync_s": sum(durations) / len(durations), "model_mb": model_mb,
            "by_process": by_process}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--case":
        print(json.dumps(run_case(sys.argv[2], sys.argv[3].split(":")[0], int(sys.argv[3].split(":")[1]))))
        return
    from pcsd_core.models import resolve_model

    path = resolve_model("smollm2-135m")
    rows = {}
    print(f"{'workers':<14} {'sync':<12} {'extra_mb':>10} {'sync_s':>8}  each process's own peak extra MB", flush=True)
    cases = [(workers, bucket_mb) for workers in ("in-process", "ray") for bucket_mb in (0, *BUCKETS_MB)]
    for workers, bucket_mb in [*cases, ("ray-batched-free", BUCKET_REPORTED_MB)]:
        out = subprocess.run([sys.executable, __file__, "--case", path, f"{workers}:{bucket_mb}"], cwd=REPO_ROOT,
                             env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True,
                             check=True)
        rows[workers, bucket_mb] = result = json.loads(out.stdout.strip().splitlines()[-1])
        label = "full gather" if bucket_mb == 0 else f"bucket {bucket_mb}MB"
        name = {"ray": "2 ray (fsdp)", "ray-batched-free": "2 ray, 1s free"}.get(workers, workers)
        own = ", ".join(f"{who} {mb:.0f}" for who, mb in result["by_process"].items())
        print(f"{name:<14} {label:<12} {result['extra_mb']:>10.1f} {result['sync_s']:>8.2f}  {own}", flush=True)
    model_mb = rows["ray", 0]["model_mb"]
    print(f"model {model_mb:.0f} MB; target: bucketed extra <= {model_mb / 4:.0f} MB (1/4 of the model)")
    print(f"sync_extra_mb={rows['ray', BUCKET_REPORTED_MB]['extra_mb']:.1f} "
          f"full_gather_extra_mb={rows['ray', 0]['extra_mb']:.1f} model_mb={model_mb:.1f}")


if __name__ == "__main__":
    main()
