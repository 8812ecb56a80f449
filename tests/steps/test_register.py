"""Register step against a real SQLite MLflow store: idempotence for a retried step and the champion alias."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from steps import tracking
from steps.register import CHAMPION_ALIAS, register, registered_model_name


def _source_run() -> str:
    run = tracking.client().create_run(tracking.setup_tracking("register-test"), run_name="branch")
    return run.info.run_id


def test_registered_model_name_is_a_slug_of_model_and_dataset():
    assert registered_model_name("smollm2-135m", "openai/gsm8k") == "pcsd-smollm2-135m-gsm8k"
    assert registered_model_name("/data/ckpt/DeepSeek_Math-7B/", "/data/gsm8k") == "pcsd-deepseek-math-7b-gsm8k"


def test_a_generated_task_registers_under_its_own_name_not_the_hub_datasets():
    """A positive-control run must not compete with (or replace) the GSM8K champion."""
    from pcsd_core.config.schema import DataConfig

    names = {registered_model_name("smollm2-135m", data.source) for data in (
        DataConfig(synthetic="lookup", data_source="synthetic/lookup"), DataConfig(), DataConfig(path="/data/gsm8k"))}
    assert names == {"pcsd-smollm2-135m-synthetic-lookup", "pcsd-smollm2-135m-gsm8k"}
    assert DataConfig(synthetic="arithmetic").source == "synthetic-arithmetic"


def test_register_is_idempotent_and_moves_champion_only_on_improvement(store, tiny_model_dir):
    common = dict(model="smollm2-135m", dataset="openai/gsm8k")
    first = register(tiny_model_dir, metric_value=0.25, flow_run_id="1", source_run_id=_source_run(), **common)
    name = first.name
    assert (first.version, first.is_champion, first.already_registered) == ("1", True, False)
    # The model and tokenizer files (in model.dtype, float32 here), with pinned requirements.
    local = Path(mlflow.artifacts.download_artifacts(first.model_uri))
    files = {path.name for path in local.rglob("*")}
    assert {"MLmodel", "model.safetensors", "tokenizer.json"} <= files
    requirements = (local / "requirements.txt").read_text()
    assert "torch==" in requirements and "transformers==" in requirements

    # A retried register step of the same flow run finds its version instead of registering again.
    retry = register(tiny_model_dir, metric_value=0.25, flow_run_id="1", source_run_id=_source_run(), **common)
    assert (retry.version, retry.already_registered) == ("1", True)
    assert len(store.search_model_versions(f"name = '{name}'")) == 1

    worse = register(tiny_model_dir, metric_value=0.10, flow_run_id="2", source_run_id=_source_run(), **common)
    assert (worse.version, worse.is_champion) == ("2", False)
    assert str(store.get_model_version_by_alias(name, CHAMPION_ALIAS).version) == "1"

    tie = register(tiny_model_dir, metric_value=0.25, flow_run_id="3", source_run_id=_source_run(), **common)
    assert not tie.is_champion  # a tie does not dethrone the holder

    better = register(tiny_model_dir, metric_value=0.50, flow_run_id="4", source_run_id=_source_run(), **common)
    assert better.is_champion
    champion = store.get_model_version_by_alias(name, CHAMPION_ALIAS)
    assert str(champion.version) == better.version == "4"
    assert champion.tags["pcsd.flow_run_id"] == "4" and float(champion.tags["pcsd.eval_value"]) == 0.5


def test_register_rejects_a_folder_without_a_checkpoint(store, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        register(tmp_path, model="m", dataset="d", metric_value=0.0, flow_run_id="1", source_run_id="x")


def test_a_checkpoint_at_a_storage_uri_is_downloaded_once_and_not_again_on_a_retry(store, tiny_model_dir, tmp_path,
                                                                                   monkeypatch):
    from steps import storage

    location = f"file://{tmp_path / 'store' / 'checkpoints' / 'step_000004'}"
    common = dict(model="smollm2-135m", dataset="openai/gsm8k", metric_value=0.25, flow_run_id="7")
    with pytest.raises(FileNotFoundError, match="holds no published checkpoint"):
        register(location, source_run_id=_source_run(), **common)  # nothing published there yet
    storage.publish(tiny_model_dir, location)
    downloads, real_local_copy = [], storage.local_copy
    monkeypatch.setattr(storage, "local_copy", lambda *args: downloads.append(args[0]) or real_local_copy(*args))

    first = register(location, source_run_id=_source_run(), **common)
    local = Path(mlflow.artifacts.download_artifacts(first.model_uri))
    assert {"model.safetensors", "config.json"} <= {path.name for path in local.rglob("*")}
    retry = register(location, source_run_id=_source_run(), **common)
    assert (retry.version, retry.already_registered) == (first.version, True)
    assert downloads == [location]  # the retried step found its version without downloading the weights again


# ---- the promotion rule (register.promote_if) --------------------------------------------------------------


def _scores(correct: list[bool]) -> list:
    from pcsd_core.eval.metrics import ResponseScore

    return [ResponseScore(correct_strict=c, correct_flexible=c, has_answer_line=True, degenerate=False,
                          length_tokens=10, truncated=False) for c in correct]


def _paired(new: list[bool], old: list[bool]) -> dict[str, float]:
    from pcsd_core.eval.metrics import compare_paired

    return compare_paired(_scores(new), _scores(old))


def test_promotion_is_refused_for_a_model_no_better_than_the_base():
    from steps.register import promotion_decision

    same = [True] * 3 + [False] * 37
    decision = promotion_decision("significant_gain", 0.05, metric_value=0.075, vs_base=_paired(same, same),
                                  champion_value=None, vs_champion=None)
    assert not decision.promote
    assert decision.reason.startswith("no significant gain over the base model at alpha 0.05: strict accuracy +0.000")
    # Better by 3 of 40 questions (3 turned right, 0 wrong): McNemar p = 0.25, not significant either.
    slightly = [True] * 6 + [False] * 34
    decision = promotion_decision("significant_gain", 0.05, metric_value=0.15, vs_base=_paired(slightly, same),
                                  champion_value=None, vs_champion=None)
    assert not decision.promote and "McNemar p = 0.25 (3 turned right, 0 turned wrong)" in decision.reason


def test_promotion_needs_a_significant_gain_over_the_base_and_the_champion():
    from scipy.stats import binomtest

    from steps.register import promotion_decision

    base = [False] * 40
    much_better = [True] * 12 + [False] * 28  # 12 turned right, 0 wrong: exact McNemar p = 2 * 0.5**12
    assert binomtest(12, 12, 0.5).pvalue == pytest.approx(2 * 0.5**12)
    vs_base = _paired(much_better, base)
    assert vs_base["strict/mcnemar_p"] == pytest.approx(binomtest(12, 12, 0.5).pvalue)
    first = promotion_decision("significant_gain", 0.05, metric_value=0.3, vs_base=vs_base, champion_value=None,
                               vs_champion=None)
    assert first.promote and first.reason.startswith("significant gain over the base model")
    # A champion as good as the new version: the gain over the base is not enough.
    kept = promotion_decision("significant_gain", 0.05, metric_value=0.3, vs_base=vs_base, champion_value=0.3,
                              vs_champion=_paired(much_better, much_better))
    assert not kept.promote and kept.reason.startswith("no significant gain over the champion")
    # A champion scored on other questions cannot be compared pairwise: it stays.
    other = promotion_decision("significant_gain", 0.05, metric_value=0.3, vs_base=vs_base, champion_value=0.0,
                               vs_champion=None)
    assert not other.promote and "other questions" in other.reason
    beats = promotion_decision("significant_gain", 0.05, metric_value=0.3, vs_base=vs_base, champion_value=0.0,
                               vs_champion=_paired(much_better, base))
    assert beats.promote
    assert not promotion_decision("never", 0.05, metric_value=1.0, vs_base=vs_base, champion_value=None,
                                  vs_champion=None).promote
    assert promotion_decision("better", 0.05, metric_value=0.3, vs_base=None, champion_value=0.2,
                              vs_champion=None).promote


def test_a_registered_version_says_why_it_is_not_the_champion(store, tiny_model_dir):
    """The default rule registers every run's best branch, and crowns none without a significant gain."""
    from steps.register import HeldOutScores

    same = [True] * 2 + [False] * 18
    result = register(tiny_model_dir, model="smollm2-135m", dataset="openai/gsm8k", metric_value=0.1,
                      flow_run_id="1", source_run_id=_source_run(), promote_if="significant_gain",
                      vs_base=_paired(same, same), scores=HeldOutScores(dict(enumerate(_scores(same)))))
    assert not result.is_champion and result.reason.startswith("no significant gain over the base model")
    version = store.get_model_version(result.name, result.version)
    assert version.tags["pcsd.promotion"] == result.reason and version.aliases == []
    with pytest.raises(mlflow.exceptions.MlflowException):
        store.get_model_version_by_alias(result.name, CHAMPION_ALIAS)


def test_the_champion_is_compared_on_the_same_questions_from_its_logged_table(store, tiny_model_dir):
    """The champion's per-question scores come back from its run's `eval/after_examples.json`, as the evaluate step
    logs it; a new version must beat them significantly, question by question."""
    from dataclasses import asdict

    from steps.register import HeldOutScores

    def source_run_with(correct: list[bool]) -> str:
        run_id = _source_run()
        rows = [{"index": i, **asdict(score)} for i, score in enumerate(_scores(correct))]
        mlflow.log_table(data={key: [row[key] for row in rows] for key in rows[0]},
                         artifact_file="eval/after_examples.json", run_id=run_id)
        return run_id

    base, good = [False] * 40, [True] * 12 + [False] * 28
    better = [True] * 30 + [False] * 10  # 18 more right than `good`, none worse
    common = dict(model="smollm2-135m", dataset="openai/gsm8k", promote_if="significant_gain")
    first = register(tiny_model_dir, metric_value=0.3, flow_run_id="1", source_run_id=source_run_with(good),
                     vs_base=_paired(good, base), scores=HeldOutScores(dict(enumerate(_scores(good)))), **common)
    assert first.is_champion
    same_again = register(tiny_model_dir, metric_value=0.3, flow_run_id="2", source_run_id=source_run_with(good),
                          vs_base=_paired(good, base), scores=HeldOutScores(dict(enumerate(_scores(good)))), **common)
    assert not same_again.is_champion and same_again.reason.startswith("no significant gain over the champion")
    best = register(tiny_model_dir, metric_value=0.75, flow_run_id="3", source_run_id=source_run_with(better),
                    vs_base=_paired(better, base), scores=HeldOutScores(dict(enumerate(_scores(better)))), **common)
    assert best.is_champion and "and the champion (strict accuracy +0.450" in best.reason
    assert str(store.get_model_version_by_alias(best.name, CHAMPION_ALIAS).version) == best.version


def test_the_registry_gets_the_model_in_model_dtype_without_training_state(store, tiny_model_dir, tmp_path):
    """A bf16 run's checkpoint holds float32 masters and the optimizer state; the registered model is the weights
    cast to bf16 on the sending side (what the run evaluated), and none of the training state."""
    import shutil

    import torch
    from safetensors import safe_open

    checkpoint = tmp_path / "step_000004"
    shutil.copytree(tiny_model_dir, checkpoint)
    torch.save({"optimizer": {}}, checkpoint / "training_state.pt")
    result = register(checkpoint, model="smollm2-135m", dataset="openai/gsm8k", metric_value=0.25, flow_run_id="1",
                      source_run_id=_source_run(), dtype="bfloat16")
    local = Path(mlflow.artifacts.download_artifacts(result.model_uri))
    files = {path.name: path for path in local.rglob("*")}
    assert "training_state.pt" not in files and "tokenizer.json" in files
    with safe_open(files["model.safetensors"], framework="pt") as registered, \
            safe_open(checkpoint / "model.safetensors", framework="pt") as saved:
        assert set(registered.keys()) <= set(saved.keys())
        for name in registered.keys():
            assert torch.equal(registered.get_tensor(name), saved.get_tensor(name).to(torch.bfloat16)), name
