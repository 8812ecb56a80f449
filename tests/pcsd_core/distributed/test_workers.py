"""Ray + FSDP2: two sharded workers (gloo, CPU) match one in-process actor; gathered weights sync the rollout.

One Ray start for the module (~15 s) and one two-worker group (~15 s); tiny 2-layer model.
"""

from __future__ import annotations

from pcsd_core.config.loader import config_from_dict
import pytest
import torch

from pcsd_core.engine.actor import Actor
from pcsd_core.engine.batch import RolloutBatch, TeacherOutputs
from pcsd_core.config.schema import PCSDConfig
from pcsd_core.distributed.weight_sync import drain, whole_tensors, wire_to_tensor

ray = pytest.importorskip("ray")


def random_batch(rows: int) -> RolloutBatch:
    """Two responses per prompt, of different lengths (packing, padding and row splits get exercised)."""
    generator = torch.Generator().manual_seed(1)

    def ids(length: int) -> list[int]:
        return torch.randint(10, 40000, (length,), generator=generator).tolist()

    students, teachers = [ids(5 + i) for i in range(rows // 2)], [ids(9 + 2 * i) for i in range(rows // 2)]
    return RolloutBatch([students[i // 2] for i in range(rows)], [teachers[i // 2] for i in range(rows)],
                        [ids(2 + (3 * i) % 5) for i in range(rows)], [True] * rows, [i // 2 for i in range(rows)])


def assert_buckets_bounded(buckets, bucket_bytes: int) -> None:
    """Every bucket within the bound; only a single row bigger than the bound may exceed it, alone."""
    for bucket in buckets:
        size = sum(piece.tensor.numel() * piece.tensor.element_size() for piece in bucket)
        one_row = len(bucket) == 1 and (bucket[0].tensor.dim() < 2 or len(bucket[0].tensor) == 1)
        assert size <= bucket_bytes or one_row, [(piece.name, piece.row_start) for piece in bucket]


def actor_of(cfg: PCSDConfig, model_path: str, **options) -> Actor:
    """The actor of a run config, built from the sections it reads."""
    return Actor(cfg.model, cfg.train, cfg.loss, model_path, **options)


def config(**train) -> PCSDConfig:
    # 8 responses, 2 mini-batches of 4 -> 2 optimizer steps; per worker: 2 rows = 1 micro-batch holding the
    # two responses of one prompt in one packed row.
    base = {"prompts_per_step": 4, "mini_batch_size": 4, "micro_batch_size": 2, "lr": 1e-3, "device": "cpu"}
    return config_from_dict({"train": {**base, **train}, "rollout": {"n": 2}})


@pytest.fixture(scope="module")
def ray_session():
    from pcsd_core.distributed.ray_cluster import ensure_ray

    started = ensure_ray()  # the Ray the trainer starts, with its settings
    yield
    if started:
        ray.shutdown()


def single_process_reference(model_dir, batch):
    """(teacher outputs, update stats, updated weights) of one in-process actor: what FSDP ranks must reproduce."""
    single = actor_of(config(), str(model_dir))
    teacher = single.compute_distributions(batch)
    stats = single.update_policy_with_distillation(batch, teacher)
    return teacher, stats, single.full_state_dict(), single


def test_two_fsdp_workers_match_one_in_process_actor(tiny_model_dir, ray_session):
    """Same batch, same loss (rel 1e-5) and same updated weights (atol 2e-5 after Adam steps of ~1e-3)."""
    from pcsd_core.rollout.hf import HFRolloutEngine
    from pcsd_core.distributed.ray_workers import launch_train_workers

    batch = random_batch(8)
    single_teacher, single_stats, expected, single = single_process_reference(tiny_model_dir, batch)

    cfg = config(use_ray=True, num_workers=2)
    group = launch_train_workers(cfg.model, cfg.train, cfg.loss, str(tiny_model_dir), device_type="cpu")
    try:
        teacher = group.compute_distributions(batch)  # the trainer's calls: rows gathered in rank order
        for got, want in zip(teacher.hidden, single_teacher.hidden, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        stats = group.update_policy_with_distillation(batch, teacher)
        wires = ray.get([w.full_state_dict.remote() for w in group.workers])  # (name, numpy array, dtype) lists
        optimizer_states = ray.get([w.training_state.remote() for w in group.workers])
        bucket_bytes = 2**17  # 128 KiB: several buckets on the tiny model, the embedding cut into rows
        buckets = list(group.iter_state_dict_buckets(bucket_bytes))
        assert group.local_gpu_ids() == []  # CPU workers hold no GPU a split rollout would have to avoid
    finally:
        group.shutdown()

    assert stats.loss_sum == pytest.approx(single_stats.loss_sum, rel=1e-5)
    assert stats.num_tokens == single_stats.num_tokens
    assert stats.grad_norms == pytest.approx(single_stats.grad_norms, rel=1e-4)
    assert wires[1] == []  # only rank 0 receives the gathered weights
    gathered = dict(wire_to_tensor(item) for item in wires[0])
    assert set(gathered) == set(expected)
    initial = actor_of(config(), str(tiny_model_dir)).full_state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(gathered[name], tensor, rtol=0, atol=2e-5, msg=name)
        assert not torch.equal(tensor, initial[name]), f"{name} did not move"
    assert len(optimizer_states[0]["optimizer"]["state"]) == len(list(single.student.parameters()))

    # The bucketed sync, with no gather: each rank sends rows of its own shard, every bucket within its bound;
    # assembled, they are the full gather's tensors (tied ones once).
    assert_buckets_bounded(buckets, bucket_bytes)
    embedding = [piece for bucket in buckets for piece in bucket if piece.name == "model.embed_tokens.weight"]
    assert len(embedding) > 2 and all(piece.full_rows == len(gathered["model.embed_tokens.weight"])
                                      for piece in embedding)  # 12.6 MB cut into rows of at most 128 KiB
    streamed = dict(whole_tensors(piece for bucket in buckets for piece in bucket))
    assert set(gathered) - set(streamed) <= {"lm_head.weight"}
    for name, tensor in streamed.items():
        assert torch.equal(tensor, gathered[name]), name

    # Weight sync from the bucket stream of the FSDP shards: the rollout engine's logits equal the actor's.
    engine = HFRolloutEngine(str(tiny_model_dir))
    engine.update_weights(drain(buckets))
    ids = torch.tensor([[1, 400, 2000, 30, 77, 9]])
    with torch.no_grad():
        torch.testing.assert_close(engine.model(ids).logits, single.student.lm(ids).logits, rtol=0, atol=1e-4)


def test_in_process_buckets_are_the_live_weights_whole_within_the_bound(tiny_model_dir):
    """No copy and no row planning: every piece is a whole live parameter (the same storage), each tied tensor
    once; buckets stay within the bound, except that a tensor bigger than a bucket goes alone."""
    from pcsd_core.distributed.workers import InProcessWorkers

    actor = actor_of(config(), str(tiny_model_dir))
    workers = InProcessWorkers(actor)
    assert workers.local_gpu_ids() == []
    full = actor.full_state_dict()
    live = dict(actor.student.lm.state_dict(keep_vars=True))
    for bucket_bytes in (2**12, 2**16, 2**40):
        buckets = list(workers.iter_state_dict_buckets(bucket_bytes))
        for bucket in buckets:
            size = sum(piece.tensor.numel() * piece.tensor.element_size() for piece in bucket)
            assert size <= bucket_bytes or len(bucket) == 1, [piece.name for piece in bucket]
        pieces = [piece for bucket in buckets for piece in bucket]
        assert all(piece.is_whole for piece in pieces)
        names = [piece.name for piece in pieces]
        assert len(names) == len(set(names)) and set(names) <= set(full)
        assert set(full) - set(names) <= {"lm_head.weight"}  # tied to the embedding: sent once
        for piece in pieces:
            assert piece.tensor.data_ptr() == live[piece.name].data_ptr(), piece.name
            assert torch.equal(piece.tensor, full[piece.name]), piece.name
    # A 256-byte bound: every tensor alone, the embedding (49152 rows of 64 floats) among them, whole.
    alone = list(workers.iter_state_dict_buckets(256))
    (everything,) = list(workers.iter_state_dict_buckets(2**40))
    assert [bucket[0].name for bucket in alone] == [piece.name for piece in everything]
    assert "model.embed_tokens.weight" in names


def test_distiller_runs_with_ray_workers(tiny_model_dir, gsm8k_dir, tmp_path, ray_session):
    """The whole loop with 2 Ray workers: one step, the rollout engine synced to the sharded actor."""
    from transformers import AutoModelForCausalLM

    from pcsd_core.config.schema import DataConfig
    from pcsd_core.data.prepare import prepare_dataset
    from pcsd_core.engine.trainer import Distiller

    prepared = prepare_dataset(DataConfig(path=str(gsm8k_dir), max_train_rows=8, max_test_rows=2), tmp_path / "data")
    cfg = config_from_dict({}, {
        "model.name": str(tiny_model_dir), "rollout.n": 2, "rollout.max_response_tokens": 4,
        "train.prompts_per_step": 2, "train.mini_batch_size": 4, "train.micro_batch_size": 2,
        "train.total_training_steps": 1, "train.use_ray": True, "train.num_workers": 2, "train.device": "cpu",
        "train.weight_sync_bucket_mb": 1,
        "train.output_dir": str(tmp_path / "run")})
    distiller = Distiller(cfg, prepared.train_path)
    try:
        distiller.setup()
        result = distiller.train()
        ids = torch.tensor([[1, 400, 2000, 30]])
        saved = AutoModelForCausalLM.from_pretrained(result.checkpoint_dir)
        with torch.no_grad():
            torch.testing.assert_close(distiller.engine.model(ids).logits, saved(ids).logits, rtol=0, atol=1e-6)
        assert result.history[0]["train/loss"] > 0 and result.history[0]["perf/peak_mem_mb"] > 0
    finally:
        distiller.close()
    assert ray.is_initialized()  # the fixture's Ray session is not torn down by the Distiller


def test_two_fsdp_workers_train_float32_masters_in_bf16_and_resume_through_rank_0(tiny_model_dir, ray_session):
    """model.dtype bfloat16 at lr 1e-6 on two FSDP2 ranks: one step moves >= 90% of the float32 masters (a bf16
    weight keeps a 1e-6 step only for |w| < ~5e-4), as the in-process actor does; the weight sync sends the masters
    cast to bf16. A resume hands the optimizer state to rank 0 alone, and rank 1 gets its shards by broadcast."""
    from pcsd_core.distributed.ray_workers import launch_train_workers

    bf16 = {"lr": 1e-6, "use_ray": True, "num_workers": 2}
    cfg = config_from_dict({"train": {"prompts_per_step": 4, "mini_batch_size": 4, "micro_batch_size": 2,
                                      "device": "cpu", **bf16}, "rollout": {"n": 2}, "model": {"dtype": "bfloat16"}})
    single_cfg = config_from_dict({"train": {**cfg.to_dict()["train"], "use_ray": False, "num_workers": 1},
                                   "rollout": {"n": 2}, "model": {"dtype": "bfloat16"}})
    batch = random_batch(8)
    single = actor_of(single_cfg, str(tiny_model_dir))
    initial = {name: tensor.clone() for name, tensor in single.full_state_dict().items()}
    single_stats = single.update_policy_with_distillation(batch, single.compute_distributions(batch))

    group = launch_train_workers(cfg.model, cfg.train, cfg.loss, str(tiny_model_dir), device_type="cpu")
    try:
        stats = group.update_policy_with_distillation(batch, group.compute_distributions(batch))
        gathered = group.full_state_dict()
        pieces = [piece for bucket in group.iter_state_dict_buckets(2**20) for piece in bucket]
        state = group.training_state()
        sent = group.load_training_state(state, None)
        reloaded = group.training_state()
    finally:
        group.shutdown()

    assert stats.loss_sum == pytest.approx(single_stats.loss_sum, rel=1e-3)
    assert {tensor.dtype for tensor in gathered.values()} == {torch.float32}
    moved = sum(int((gathered[name] != tensor).sum()) for name, tensor in initial.items())
    assert moved / sum(tensor.numel() for tensor in initial.values()) >= 0.9
    expected = single.full_state_dict()
    for name, tensor in expected.items():  # Adam steps of 1e-6; a sign of a near-zero gradient may differ
        torch.testing.assert_close(gathered[name], tensor, rtol=0, atol=2.5e-6, msg=name)
    streamed = dict(whole_tensors(pieces))
    for name, tensor in streamed.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, gathered[name].to(torch.bfloat16)), name

    assert sent[0] > 0 and sent[1] == 0  # bytes of optimizer state each rank was handed
    moments = state["optimizer"]["state"]
    assert {value.dtype for per_param in moments.values() for value in per_param.values() if value.dim()} == {
        torch.float32}
    for name, per_param in moments.items():  # rank 1's shards came back by broadcast: the same full state
        for key, value in per_param.items():
            assert torch.equal(reloaded["optimizer"]["state"][name][key], value), (name, key)


def test_two_fsdp_workers_anchor_to_a_sharded_reference_as_one_actor(tiny_model_dir, moved_model_dir, ray_session):
    """loss.ref_kl_coef > 0 with a live teacher: each rank holds an extra FSDP-sharded frozen reference (the initial
    weights, teacher_path) and gathers its lm_head; the reference states arrive in row order, and loss and ref_kl
    equal one in-process actor's."""
    from pcsd_core.distributed.ray_workers import launch_train_workers

    def anchored(**train) -> PCSDConfig:  # config() with the anchor on: 2 mini-batches, 2 optimizer steps
        return config_from_dict({**config(**train).to_dict(), "loss": {"ref_kl_coef": 0.5}})

    batch = random_batch(8)
    single = actor_of(anchored(), str(moved_model_dir), teacher_path=str(tiny_model_dir))
    single_outputs = single.compute_distributions(batch)
    single_stats = single.update_policy_with_distillation(batch, single_outputs)

    cfg = anchored(use_ray=True, num_workers=2)
    group = launch_train_workers(cfg.model, cfg.train, cfg.loss, str(moved_model_dir), device_type="cpu",
                                 teacher_path=str(tiny_model_dir))
    try:
        outputs = group.compute_distributions(batch)
        stats = group.update_policy_with_distillation(batch, outputs)
    finally:
        group.shutdown()

    for got, want in zip(outputs.reference_hidden, single_outputs.reference_hidden, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert single_stats.ref_kl_sum > 1e-3 * single_stats.num_tokens  # the anchor is not trivially zero
    assert stats.ref_kl_sum == pytest.approx(single_stats.ref_kl_sum, rel=1e-5)
    assert stats.loss_sum == pytest.approx(single_stats.loss_sum, rel=1e-5)
    assert stats.grad_norms == pytest.approx(single_stats.grad_norms, rel=1e-4)


GRADIENT_SYNC_SCRIPT = """
import sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp._fully_shard import _fsdp_param_group
from pcsd_core.config.loader import config_from_dict
from pcsd_core.engine.actor import Actor
from pcsd_core.engine.batch import RolloutBatch

calls = []
original = _fsdp_param_group.foreach_reduce
_fsdp_param_group.foreach_reduce = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=0, world_size=1)
cfg = config_from_dict({"train": {"prompts_per_step": 4, "mini_batch_size": 4, "micro_batch_size": 1,
                                  "device": "cpu", "use_ray": True}, "rollout": {"n": 2}})
actor = Actor(cfg.model, cfg.train, cfg.loss, sys.argv[1], mesh=init_device_mesh("cpu", (1,)))
ids = [[11 + i, 12, 13, 14] for i in range(8)]
batch = RolloutBatch(ids, ids, [[20, 21 + i] for i in range(8)], [True] * 8, [i // 2 for i in range(8)])
actor.update_policy_with_distillation(batch, actor.compute_distributions(batch))
groups = 1 + len(actor.student.decoder_layers)  # one FSDP parameter group per layer, plus the root
print("REDUCES", len(calls), "GROUPS", groups)
dist.destroy_process_group()
"""


def test_gradients_are_reduced_once_per_optimizer_step_not_per_micro_batch(tiny_model_dir):
    """2 optimizer steps of 4 micro-batches each on one FSDP2 rank: FSDP's reduce runs once per parameter group
    per optimizer step (8 reduces of 4 groups would mean one per micro-batch). In a subprocess: the process
    group and the counting patch stay out of the test process."""
    import subprocess
    import sys

    from pcsd_core.distributed.ray_cluster import free_port

    result = subprocess.run([sys.executable, "-c", GRADIENT_SYNC_SCRIPT, str(tiny_model_dir), str(free_port())],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    _, reduces, _, groups = next(line for line in result.stdout.splitlines() if line.startswith("REDUCES")).split()
    assert int(reduces) == 2 * int(groups), result.stdout
