"""Distiller.close() survives an engine whose shutdown kills every child of this process, as SGLang's does.

SGLang's `Engine.shutdown()` calls `kill_process_tree(os.getpid(), include_parent=False)`: every descendant of
the trainer gets SIGKILL, the local Ray that the trainer started included. The scenario runs in a subprocess,
so the kill reaches only that process's children, never the test session's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil

from pcsd_core.config.schema import DataConfig

SCRIPT = """
import json, os, signal, sys
import psutil
from pcsd_core.config.loader import config_from_dict
from pcsd_core.engine import trainer


class KillTreeEngine:
    '''A rollout engine whose close() is SGLang's: SIGKILL to every descendant of this process.'''

    def close(self):
        for child in psutil.Process(os.getpid()).children(recursive=True):
            try:
                child.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass


trainer.create_rollout_engine = lambda *args, **kwargs: KillTreeEngine()
cfg = config_from_dict({}, {"model.name": sys.argv[1], "rollout.n": 2, "train.prompts_per_step": 2,
                            "train.mini_batch_size": 4, "train.micro_batch_size": 2, "train.use_ray": True,
                            "train.num_workers": 1, "train.device": "cpu", "train.output_dir": sys.argv[3]})
distiller = trainer.Distiller(cfg, sys.argv[2])
distiller.setup()
assert distiller.workers.owns_ray, "the test needs a Ray that the trainer starts (is a `ray start` cluster running?)"
print("CHILDREN", json.dumps([p.pid for p in psutil.Process().children(recursive=True)]), flush=True)
distiller.close()
print("CLOSED", flush=True)
"""


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_close_returns_and_leaves_no_process_when_the_engine_kills_its_process_tree(tiny_model_dir, gsm8k_dir,
                                                                                   tmp_path):
    from pcsd_core.data.prepare import prepare_dataset

    prepared = prepare_dataset(DataConfig(path=str(gsm8k_dir), max_train_rows=4, max_test_rows=2), tmp_path / "data")
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    process = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tiny_model_dir), str(prepared.train_path),
                                str(tmp_path / "run")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the hang is the failure; clean up what it left
        stdout, stderr = process.communicate()
        raise AssertionError(f"Distiller.close() hung; stdout: {stdout[-2000:]} stderr: {stderr[-3000:]}") from None
    assert process.returncode == 0 and "CLOSED" in stdout, stderr[-4000:]
    children = json.loads(next(line for line in stdout.splitlines() if line.startswith("CHILDREN")).split(" ", 1)[1])
    assert children, "Ray started no process: the scenario did not run"
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [pid for pid in children if alive(pid)]
    for pid in left:  # do not leak them into the session either way
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left after close(): {left}"
