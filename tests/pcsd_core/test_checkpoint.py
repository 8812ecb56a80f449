"""Checkpoints: HF-loadable, full training state round-trips, atomic (a failed write leaves nothing behind)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from pcsd_core import checkpoint as ckpt


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
    with pytest.raises(ValueError, match=r"train.resume_from .* missing \['config.json', 'trainer_state.json'"):
        ckpt.validate_checkpoint_dir(tmp_path)
