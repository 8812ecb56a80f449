"""Shared fixtures: the local GSM8K copy, the embedded SmolLM2 model, tiny random models. No network."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Metaflow refuses the user name `root`; the hub is never reached from tests.
os.environ.setdefault("METAFLOW_USER", "pcsd-tests")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    """The local GSM8K copy (train.jsonl, test.jsonl) shipped beside the repository."""
    path = Path(os.environ.get("PCSD_GSM8K_DIR", REPO_ROOT.parent / "shared" / "data" / "gsm8k"))
    if not (path / "train.jsonl").is_file():
        pytest.fail(f"GSM8K copy not found at {path}; set PCSD_GSM8K_DIR to a folder with train.jsonl/test.jsonl")
    return path


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """Folder of the converted embedded SmolLM2-135M-Instruct (converted once per cache)."""
    from pcsd_core.models import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    from pcsd_core.models import load_tokenizer

    return load_tokenizer(smollm2_path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A tiny random-weight Llama (2 layers, hidden 64) with SmolLM2's tokenizer, saved as a checkpoint.

    Shared by the whole session: tests read it and write their own outputs elsewhere."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smollm2_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=smollm2_tokenizer.bos_token_id,
        eos_token_id=smollm2_tokenizer.eos_token_id,
        pad_token_id=smollm2_tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def moved_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with every weight moved (noise 0.02, seeded): a student that already differs from its initial
    model, as after a resume, for tests that need KL(student || initial) > 0 on the first step."""
    import torch

    from pcsd_core.models import load_model

    model = load_model(str(tiny_model_dir))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    path = tmp_path_factory.mktemp("moved_tiny_llama")
    model.save_pretrained(path)
    return path


# ---- one real tiny flow run, shared by tests/flows and tests/dashboards -----------------------------------

FLOW_STEPS = 2
FLOW_LEARNING_RATES = [1.0e-4, 1.0e-3]  # two sweep branches: "lr=0.0001", "lr=0.001"
FLOW_RESOURCES = {"distill": {"cpu": 3, "memory": 5000}, "evaluate": {"memory": 6000}}  # the preset's `resources:`


@dataclass(frozen=True)
class TinyFlowRun:
    root: Path  # cwd of the run: tiny.yaml, store/ (the storage URI's folder), tmp/ (TMPDIR), flow.log
    run_id: str
    datastore: Path  # METAFLOW_DATASTORE_SYSROOT_LOCAL
    tracking_uri: str  # the run's SQLite MLflow store
    steps: int = FLOW_STEPS
    learning_rates: tuple[float, ...] = tuple(FLOW_LEARNING_RATES)


def tiny_flow_preset(model_dir: Path, data_dir: Path, output_dir: Path, *, steps: int, eval_questions: int) -> dict:
    """A flow preset on the tiny model and a few GSM8K rows: 2 prompts x 2 responses of <= 8 tokens a step."""
    return {
        "model": {"name": str(model_dir)},
        "data": {"path": str(data_dir), "max_train_rows": 4, "max_test_rows": max(eval_questions, 2)},
        "rollout": {"n": 2, "max_response_tokens": 8, "batch_size": 4},
        "train": {"total_training_steps": steps, "prompts_per_step": 2, "mini_batch_size": 4,
                  "micro_batch_size": 2, "device": "cpu", "output_dir": str(output_dir)},
        "eval": {"num_examples": eval_questions, "max_new_tokens": 8, "batch_size": min(eval_questions, 4)},
    }  # fmt: skip


@pytest.fixture(scope="session")
def tiny_preset():
    """`tiny_flow_preset`, for tests that run the flow themselves."""
    return tiny_flow_preset


@pytest.fixture(scope="session")
def tiny_flow_run(tmp_path_factory, tiny_model_dir, gsm8k_dir) -> TinyFlowRun:
    """`python flows/pcsd_flow.py run` on the tiny model: 4 GSM8K rows, 2 steps, a 2-branch lr sweep.

    As on separate machines: the run's files go to a storage URI (`file://<root>/store` stands in for s3://), each
    task works in a scratch folder under `<root>/tmp` that is deleted when it ends, and the preset sizes the tasks.
    """
    import yaml

    root = tmp_path_factory.mktemp("flow_run")
    preset = tiny_flow_preset(tiny_model_dir, gsm8k_dir, root / "outputs", steps=FLOW_STEPS, eval_questions=4)
    preset["train"]["output_dir"] = f"file://{root / 'store'}"
    preset["sweep"] = {"train.lr": FLOW_LEARNING_RATES}
    preset["resources"] = FLOW_RESOURCES
    (root / "tmp").mkdir()
    (root / "tiny.yaml").write_text(yaml.safe_dump(preset))
    datastore = root / "metaflow"
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    env = {
        **os.environ,
        "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(datastore),
        "METAFLOW_CARD_LOCALROOT": str(datastore / "cards"),
        "MLFLOW_TRACKING_URI": tracking_uri,
        "OMP_NUM_THREADS": "1",  # two branches share the cores
        "TMPDIR": str(root / "tmp"),
    }
    for variable in ("MODEL_PATH", "DATA_PATH", "TOTAL_STEPS", "ACTOR_NUM_GPUS", "ROLLOUT_NUM_GPUS"):
        env.pop(variable, None)
    from metaflow import Runner

    # Metaflow's own Runner API: a real `run` subprocess, as `python flows/pcsd_flow.py --config config ... run`.
    with Runner(str(REPO_ROOT / "flows" / "pcsd_flow.py"), show_output=False, env=env, cwd=str(root), pylint=False,
                config=[("config", str(root / "tiny.yaml"))]) as runner:
        result = runner.run()
        output = result.stdout + result.stderr
        (root / "flow.log").write_text(output)  # kept for debugging
        assert result.status == "successful", output[-8000:]
        run_id = result.run.id
    assert "mlflow ui --backend-store-uri" in output
    return TinyFlowRun(root, run_id, datastore, tracking_uri)
