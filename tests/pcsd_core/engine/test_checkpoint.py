"""Checkpoints: HF-loadable, full training state round-trips, atomic, verified by a manifest, and a run killed
with SIGKILL resumes from its last complete checkpoint to the same weights as an uninterrupted run."""

from __future__ import annotations

from pcsd_core.config.loader import config_from_dict
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pcsd_core.engine import checkpoint as ckpt


def write(tmp_path, model_dir, tokenizer, step, **kwargs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    state = {name: tensor + step for name, tensor in model.state_dict().items()}  # recognisable weights
    defaults = dict(model_source=str(model_dir), model_state=state, tokenizer=tokenizer,
                    training_state={"optimizer": {"state": {}, "param_groups": []}, "scheduler": {"last_epoch": step}},
                    trainer_state={"seed": 3, "num_records": 10})
    return ckpt.save_checkpoint(tmp_path, step, **{**defaults, **kwargs}), state


def test_round_trip_and_final_link(tmp_path, tiny_model_dir, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    expected_draw = (torch.rand(1), random.random(), np.random.rand())
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    path, state = write(tmp_path, tiny_model_dir, smollm2_tokenizer, 2,
                        teacher_state={"model.norm.weight": torch.full((64,), 7.0)})
    assert path == tmp_path / "checkpoints" / "step_000002"
    assert (tmp_path / "final").resolve() == path.resolve()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final").state_dict()
    for name, tensor in state.items():  # (tied embeddings appear under one of their two names)
        assert torch.equal(loaded[name], tensor), name
    assert AutoTokenizer.from_pretrained(path).encode("12 + 30") == smollm2_tokenizer.encode("12 + 30")

    torch.manual_seed(0)  # move every RNG; load_checkpoint must restore the saved states
    random.seed(0)
    np.random.seed(0)
    restored = ckpt.load_checkpoint(tmp_path / "final")
    assert (torch.rand(1), random.random(), np.random.rand()) == expected_draw
    assert restored.step == 2 and restored.trainer_state["seed"] == 3
    assert restored.training_state["scheduler"] == {"last_epoch": 2}
    assert torch.equal(restored.teacher_state["model.norm.weight"], torch.full((64,), 7.0))

    newer, _ = write(tmp_path, tiny_model_dir, smollm2_tokenizer, 4)
    assert (tmp_path / "final").resolve() == newer.resolve()


def test_failed_write_leaves_no_partial_checkpoint(tmp_path, tiny_model_dir, smollm2_tokenizer):
    good, _ = write(tmp_path, tiny_model_dir, smollm2_tokenizer, 2)

    class BrokenTokenizer:
        def save_pretrained(self, folder):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write(tmp_path, tiny_model_dir, BrokenTokenizer(), 4)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000002"]  # no temp folder left
    assert (tmp_path / "final").resolve() == good.resolve()


def test_validate_names_the_field_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"train.resume_from .* is not a PCSD checkpoint: missing \['config.json', "
                                         r"'trainer_state.json', 'training_state.pt', 'rng_state.pt', 'manifest.json'\]"):
        ckpt.validate_checkpoint_dir(tmp_path)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def edit_step(path: Path) -> None:  # same size, different content: only the sha256 sees it
    state = path.read_text()
    assert '"step": 2' in state
    path.write_text(state.replace('"step": 2', '"step": 9'))


DAMAGE = {
    "no model.safetensors": (lambda c: (c / "model.safetensors").unlink(), r"the weights \(model.safetensors or "
                             r"model.safetensors.index.json\) are missing; model.safetensors is missing"),
    "no rng_state.pt": (lambda c: (c / "rng_state.pt").unlink(), r"rng_state.pt is missing"),
    "truncated weights": (lambda c: truncate(c / "model.safetensors"),
                          r"model.safetensors has \d+ bytes, the manifest says \d+ \(truncated\?\)"),
    "truncated optimizer state": (lambda c: truncate(c / "training_state.pt"), r"training_state.pt has \d+ bytes"),
    "edited trainer state": (lambda c: edit_step(c / "trainer_state.json"),
                             r"trainer_state.json does not match its sha256 in the manifest \(modified or corrupt\)"),
    "no manifest": (lambda c: (c / "manifest.json").unlink(), r"manifest.json is missing \(it is written last"),
    "tokenizer file gone": (lambda c: (c / "tokenizer.json").unlink(), r"tokenizer.json is missing"),
}


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory, tiny_model_dir, smollm2_tokenizer):
    path, _ = write(tmp_path_factory.mktemp("saved"), tiny_model_dir, smollm2_tokenizer, 2)
    return path


def test_manifest_lists_every_file_with_sizes_and_small_file_hashes(saved_checkpoint, monkeypatch):
    import hashlib

    manifest = json.loads((saved_checkpoint / "manifest.json").read_text())["files"]
    on_disk = {p.name for p in saved_checkpoint.iterdir()} - {"manifest.json"}
    assert set(manifest) == on_disk and {"model.safetensors", "rng_state.pt", "training_state.pt"} <= on_disk
    for name, entry in manifest.items():
        data = (saved_checkpoint / name).read_bytes()
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == (hashlib.sha256(data).hexdigest() if len(data) <= ckpt.HASH_MAX_BYTES else None)
    assert ckpt.validate_checkpoint_dir(saved_checkpoint) == saved_checkpoint.resolve()


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_damaged_checkpoint_is_refused_with_what_is_wrong(saved_checkpoint, tmp_path, damage):
    damaged = tmp_path / "checkpoints" / "step_000002"
    shutil.copytree(saved_checkpoint, damaged)
    harm, problem = DAMAGE[damage]
    harm(damaged)
    with pytest.raises(ValueError, match=rf"^train.resume_from \('{re.escape(str(damaged))}'\) is damaged or incomplete: "
                                         rf".*{problem}.*Resume from another checkpoint, or pass the run's output_dir"):
        ckpt.validate_checkpoint_dir(damaged)
    with pytest.raises(ValueError, match="is damaged or incomplete"):
        ckpt.load_checkpoint(damaged)


def test_output_dir_resumes_from_the_newest_complete_checkpoint(tmp_path, tiny_model_dir, smollm2_tokenizer):
    older, _ = write(tmp_path, tiny_model_dir, smollm2_tokenizer, 2)
    newer, _ = write(tmp_path, tiny_model_dir, smollm2_tokenizer, 4)
    assert ckpt.validate_checkpoint_dir(tmp_path) == newer.resolve()
    (newer / "rng_state.pt").unlink()
    with pytest.warns(UserWarning, match=r"skipping damaged checkpoint .*step_000004: rng_state.pt is missing"):
        assert ckpt.validate_checkpoint_dir(tmp_path) == older.resolve()
    with pytest.raises(ValueError, match="is damaged or incomplete: rng_state.pt is missing"):
        ckpt.validate_checkpoint_dir(tmp_path / "final")  # final still points at the damaged newest one
    (older / "model.safetensors").unlink()
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"is a run folder, but none of its "
                                                                    r"checkpoints/step_\* folders is complete"):
        ckpt.validate_checkpoint_dir(tmp_path)


def dead_pid() -> int:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(finished.stdout)


def test_orphan_staging_folders_are_removed_at_the_next_save_and_resume(tmp_path, tiny_model_dir, smollm2_tokenizer):
    checkpoints = tmp_path / "checkpoints"
    orphans = [checkpoints / f".step_000004-{dead_pid()}-abc", checkpoints / ".step_000006-xyz"]  # pid gone; old format
    live = checkpoints / f".step_000008-{os.getpid()}-def"  # a save in progress in a running process: kept
    for folder in (*orphans, live):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    path, _ = write(tmp_path, tiny_model_dir, smollm2_tokenizer, 2)
    assert sorted(p.name for p in checkpoints.iterdir()) == [live.name, "step_000002"]

    orphans[0].mkdir()  # killed again, during a later save; the resume cleans up
    ckpt.load_checkpoint(tmp_path / "final")
    assert sorted(p.name for p in checkpoints.iterdir()) == [live.name, "step_000002"]
    assert ckpt.remove_orphan_staging(checkpoints) == [] and path.is_dir()


def test_resumed_metrics_file_drops_the_steps_after_the_checkpoint(tmp_path):
    from cli.train import open_metrics_file

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "train/loss": s / 10}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "tr')
    with open_metrics_file(metrics, resumed_step=2) as handle:  # killed mid-write of step 4, resumed from step 2
        handle.write(json.dumps({"step": 3, "train/loss": 0.33}) + "\n")
    assert [json.loads(line) for line in metrics.read_text().splitlines()] == [
        {"step": 1, "train/loss": 0.1}, {"step": 2, "train/loss": 0.2}, {"step": 3, "train/loss": 0.33}]
    with open_metrics_file(metrics, resumed_step=0) as handle:  # not a resume: plain append
        handle.write("{}\n")
    assert len(metrics.read_text().splitlines()) == 4


# ---- SIGKILL mid-training ------------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[3]
KILL_STEPS = 6


def train_command(config: Path, parquet: Path, metrics: Path, *overrides: str) -> list[str]:
    command = [sys.executable, "-m", "cli.train", "--config", str(config), "--train-parquet", str(parquet),
               "--metrics-jsonl", str(metrics)]
    return command + [item for override in overrides for item in ("--set", override)]


def test_sigkill_after_a_checkpoint_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_model_dir, gsm8k_dir):
    """`python -m cli.train` killed with SIGKILL after its first checkpoint; resumed from the run's
    output_dir it ends with the weights of a run that was never killed (tolerance of the resume test: atol 1e-6)."""
    from transformers import AutoModelForCausalLM

    from pcsd_core.config.schema import DataConfig, PCSDConfig
    from pcsd_core.data.prepare import prepare_dataset

    parquet = prepare_dataset(DataConfig(path=str(gsm8k_dir), max_train_rows=12, max_test_rows=2), tmp_path / "data").train_path
    config = tmp_path / "tiny.yaml"
    config.write_text(config_from_dict({}, {
        "model.name": str(tiny_model_dir), "rollout.n": 2, "rollout.max_response_tokens": 6, "rollout.batch_size": 4,
        "train.prompts_per_step": 2, "train.mini_batch_size": 2, "train.micro_batch_size": 1, "train.lr": 1e-3,
        "train.total_training_steps": KILL_STEPS, "train.checkpoint_every": 1, "train.device": "cpu",
        "train.lr_schedule": "cosine", "train.warmup_steps": 1}).to_yaml())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}  # same threads in every run
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    reference = subprocess.Popen(train_command(config, parquet, straight / "m.jsonl", f"train.output_dir={straight}"),
                                 cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    straight.mkdir()
    killed.mkdir()
    victim = subprocess.Popen(train_command(config, parquet, killed / "m.jsonl", f"train.output_dir={killed}"),
                              cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "step_000001").is_dir() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, victim.stderr.read().decode()[-2000:]
    assert not (killed / "checkpoints" / f"step_{KILL_STEPS:06d}").exists(), "the run finished before the kill"

    resumed = subprocess.run(train_command(config, parquet, killed / "m.jsonl", f"train.output_dir={killed}",
                                           f"train.resume_from={killed}"),
                             cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()[-3000:]

    a = AutoModelForCausalLM.from_pretrained(straight / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(killed / "final").state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    assert not list((killed / "checkpoints").glob(".step_*")), "an orphan staging folder survived the resume"
    steps = [json.loads(line)["step"] for line in (killed / "m.jsonl").read_text().splitlines()]
    assert steps == list(range(1, KILL_STEPS + 1)), steps  # each step once, resumed ones not twice
