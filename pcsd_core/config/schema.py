"""The one typed, validated configuration of a PCSD run: frozen sections, each field documented where declared.

`PCSDConfig` holds the sections `model`, `data`, `rollout`, `loss` (`pcsd_core.loss.spec`), `train`
(`pcsd_core.config.train`, the largest), `eval` and `register`, and checks the rules that span sections.

Each section checks its ranges and cross-field rules in `__post_init__`, also when built directly in Python; a
broken rule raises `ConfigError` naming the field (`error.field == "train.lr"`). Reading YAML presets and
`key=value` overrides, and turning their text into typed values, is `pcsd_core.config.loader`'s job, done once
per task. Sections are frozen: a task that changes a value (say, its output folder) uses `dataclasses.replace`.
The flattened form (`to_flat_dict`) is what MLflow records as params.

    from pcsd_core.config.loader import load_config
    cfg = load_config("configs/cpu_smollm2.yaml", {"train.total_training_steps": 4})
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from pcsd_core.data.privileged import parse_privileged_context
from pcsd_core.data.prompts import DEFAULT_TEACHER_TEMPLATE_NAME, resolve_teacher_template
from pcsd_core.data.synthetic import MAX_DIFFICULTY, TASKS as SYNTHETIC_TASKS
from pcsd_core.config.fields import DTYPE_NAMES, check_field_types, require_text
from pcsd_core.config.train import TrainConfig
from pcsd_core.errors import require
from pcsd_core.loss.spec import LossSpec

GSM8K_INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention")
# The attention and MLP projections of Llama/Qwen/Mistral-shaped decoders (also deepseek-math-7b, SmolLM2).
DEFAULT_LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
# The loss reads the lm_head weight directly (chunked logits) and the embeddings are the tied lm_head in small
# models, so an adapter there would be silently bypassed: refused.
LORA_UNTARGETABLE = ("lm_head", "embed_tokens")


@dataclass(frozen=True)
class ModelConfig:
    # Alias (`smollm2-135m`, `deepseek-math-7b-base`), Hugging Face id or local checkpoint folder.
    name: str = "smollm2-135m"
    # Compute dtype: the forward/backward of training runs in it (FSDP2's `param_dtype`), and the rollout engine
    # holds its weights in it (what weight sync and the registry send): "float32", "bfloat16" or "float16". The
    # weights that the optimizer updates live in train.master_dtype.
    dtype: Literal[DTYPE_NAMES] = "float32"
    # transformers attention implementation: one of ATTN_IMPLEMENTATIONS ("sdpa", "eager",
    # "flash_attention_2", ...) or a kernels-hub repository "owner/name".
    attn_implementation: str = "sdpa"
    # Allow models whose repository ships its own Python code.
    trust_remote_code: bool = False
    # Recompute activations in the backward pass to save memory (GPU runs of large models).
    gradient_checkpointing: bool = False
    # LoRA adapter rank (peft): 0 = full fine-tuning (the default); >= 1 trains only a rank-r adapter on
    # `lora_target_modules`, the base weights stay frozen (the frozen teacher is the base with the adapter off).
    lora_rank: int = 0
    # LoRA scaling numerator: the adapter's update is (lora_alpha / lora_rank) * B @ A. > 0.
    lora_alpha: float = 32.0
    # Dropout on the adapter's input during training, in [0, 1). 0 keeps the teacher/student passes deterministic.
    lora_dropout: float = 0.0
    # Comma-separated module names (the last part of a module's name) that get an adapter: the linear layers
    # of the decoder blocks. Checked against the model's modules at setup, before training (an unknown name, or
    # a model with none of them, is refused). Not lm_head/embed_tokens (the loss reads lm_head directly).
    lora_target_modules: str = DEFAULT_LORA_TARGETS

    def __post_init__(self) -> None:
        check_field_types(self, "model")
        require_text("model.name", self.name)
        require(self.lora_rank >= 0, f"model.lora_rank ({self.lora_rank}) must be >= 0 (0 = full fine-tuning, "
                 "e.g. 16 for a rank-16 LoRA adapter).")
        require(self.lora_alpha > 0, f"model.lora_alpha ({self.lora_alpha}) must be > 0 (e.g. 2 * lora_rank).")
        require(0 <= self.lora_dropout < 1, f"model.lora_dropout ({self.lora_dropout}) must be in [0, 1).")
        targets = self.lora_targets
        require(bool(targets) and all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) for name in targets),
                 f"model.lora_target_modules ({self.lora_target_modules!r}) must be comma-separated module names, "
                 f"e.g. {DEFAULT_LORA_TARGETS!r}.")
        bad = [name for name in targets if name in LORA_UNTARGETABLE]
        require(not bad, f"model.lora_target_modules ({self.lora_target_modules!r}) names {bad}: the loss reads "
                 "the lm_head weight directly, so an adapter there (or on the tied embeddings) would be bypassed; "
                 f"target the decoder's linear layers, e.g. {DEFAULT_LORA_TARGETS!r}.")
        attn = self.attn_implementation
        require(
            attn in ATTN_IMPLEMENTATIONS or (attn.count("/") == 1 and all(attn.split("/"))),
            f"model.attn_implementation ({attn!r}) must be one of {list(ATTN_IMPLEMENTATIONS)} (or a kernels-hub "
            "repository 'owner/name'); 'sdpa' works everywhere.",
        )

    @property
    def lora_targets(self) -> tuple[str, ...]:
        """`lora_target_modules` as a tuple of names."""
        return tuple(name.strip() for name in self.lora_target_modules.split(","))  # "" stays, and is refused

    @property
    def uses_lora(self) -> bool:
        return self.lora_rank > 0


@dataclass(frozen=True)
class DataConfig:
    # Local folder with train/test .jsonl or .parquet files; empty string means the hub dataset below.
    path: str = ""
    # Hugging Face dataset id and config used when `path` is empty.
    hub_name: str = "openai/gsm8k"
    hub_config: str = "main"
    # Privileged context, put into the teacher prompt through `teacher_template` (the same template for every
    # choice, so an experiment's arms differ only in the context): "solution" (the treatment), "answer_only",
    # the control arms "shuffled" and "generic_hint", or "column:<name>". Each is defined and documented in
    # `pcsd_core.data.privileged`.
    privileged_context: str = "solution"
    # Seed of the `shuffled` derangement (>= 0); the same seed and rows give the same pairing.
    shuffle_seed: int = 0
    # Column mapping for datasets whose columns are not GSM8K's `question` / `answer`.
    question_column: str = "question"
    answer_column: str = "answer"
    # Optional column holding a row id; when empty the row number is the id.
    id_column: str = ""
    # Rows kept per split after loading (0 = all); the CPU preset uses small slices.
    max_train_rows: int = 0
    max_test_rows: int = 0
    # Instruction appended to each question in the student prompt (verl's GSM8K convention).
    instruction: str = GSM8K_INSTRUCTION
    # How the teacher prompt adds the privileged context to the question: a name from
    # `pcsd_core.data.prompts.TEACHER_TEMPLATES` ("reference", the default: question, blank line, context, as the verl
    # reference; "worked_solution") or a custom format string holding {question} and {context}.
    teacher_template: str = DEFAULT_TEACHER_TEMPLATE_NAME
    # `data_source` written into the parquet (verl uses it to pick a reward function).
    data_source: str = "openai/gsm8k"
    # A generated task instead of a dataset: "" (none), "arithmetic" or "lookup", the shipped positive controls
    # (`pcsd_core.data.synthetic`: seeded word problems in GSM8K's answer format). Rows per
    # split come from max_train_rows / max_test_rows (0 = SYNTHETIC_DEFAULT_ROWS); `path` must then be empty.
    synthetic: Literal[("",) + SYNTHETIC_TASKS] = ""
    # Operations chained (arithmetic) or distractor people (lookup) per question, 1 to MAX_DIFFICULTY; calibrated in
    # benchmarks/synthetic_calibration.py and fixed in configs/positive_control_cpu_smollm2.yaml.
    synthetic_difficulty: int = 2
    # Seed of the generated questions (>= 0): the same seed, difficulty and sizes give the same rows.
    synthetic_seed: int = 0

    @property
    def source(self) -> str:
        """Where the questions come from, for names and records: the data folder, the generated task
        ("synthetic-lookup"), or the hub dataset."""
        if self.path:
            return self.path
        return f"synthetic-{self.synthetic}" if self.synthetic else self.hub_name

    def __post_init__(self) -> None:
        check_field_types(self, "data")
        require_text("data.path", self.path, allow_empty=True)
        require_text("data.hub_name", self.hub_name)
        require_text("data.hub_config", self.hub_config, allow_empty=True)
        require_text("data.question_column", self.question_column)
        require_text("data.answer_column", self.answer_column)
        require_text("data.id_column", self.id_column, allow_empty=True)
        require_text("data.data_source", self.data_source)
        parse_privileged_context(self.privileged_context)
        require(1 <= self.synthetic_difficulty <= MAX_DIFFICULTY,
                 f"data.synthetic_difficulty ({self.synthetic_difficulty}) must be in 1..{MAX_DIFFICULTY}.")
        require(self.synthetic_seed >= 0, f"data.synthetic_seed ({self.synthetic_seed}) must be >= 0.")
        require(not (self.synthetic and self.path),
                 f"data.synthetic ({self.synthetic!r}) generates the data, so data.path ({self.path!r}) must be empty; "
                 "set one of them.")
        require(
            isinstance(self.shuffle_seed, int) and self.shuffle_seed >= 0,
            f"data.shuffle_seed ({self.shuffle_seed!r}) must be a whole number >= 0; for example 0.",
        )
        resolve_teacher_template(self.teacher_template)  # raises ValueError naming the field and the names
        require(self.max_train_rows >= 0, f"data.max_train_rows ({self.max_train_rows}) must be >= 0.")
        require(self.max_test_rows >= 0, f"data.max_test_rows ({self.max_test_rows}) must be >= 0.")


@dataclass(frozen=True)
class RolloutConfig:
    # Rollout engine: "hf" (transformers generate, CPU and GPU) or "sglang" (GPU only).
    engine: Literal["hf", "sglang"] = "hf"
    # Responses sampled per student prompt (the reference's `actor_rollout_ref.rollout.n`).
    n: int = 2
    temperature: float = 1.0
    top_p: float = 1.0
    # Longest response in tokens; longer samples are truncated and counted in `rollout/truncated_frac`.
    # Prompt + response must fit the model's context, which the config alone cannot know: checked by
    # models.check_context_length once the model's config is loaded (trainer setup), as eval.max_new_tokens.
    max_response_tokens: int = 256
    # Prompts generated together in one engine call (HF engine memory bound).
    batch_size: int = 16
    # "colocated": actor and rollout share devices (rollout sleeps during training);
    # "split": rollout on its own `num_gpus` devices.
    placement: Literal["colocated", "split"] = "colocated"
    num_gpus: int = 0
    # SGLang: fraction of GPU memory for weights + KV cache.
    gpu_memory_utilization: float = 0.5

    def __post_init__(self) -> None:
        check_field_types(self, "rollout")  # also refuses inf/nan, e.g. temperature .inf
        require(self.n >= 1, f"rollout.n ({self.n}) must be >= 1.")
        require(self.temperature > 0, f"rollout.temperature ({self.temperature}) must be > 0.")
        require(0 < self.top_p <= 1, f"rollout.top_p ({self.top_p}) must be in (0, 1].")
        require(self.max_response_tokens >= 1, f"rollout.max_response_tokens ({self.max_response_tokens}) must be >= 1.")
        require(self.batch_size >= 1, f"rollout.batch_size ({self.batch_size}) must be >= 1.")
        require(
            0 < self.gpu_memory_utilization < 1,
            f"rollout.gpu_memory_utilization ({self.gpu_memory_utilization}) must be in (0, 1).",
        )
        require(self.num_gpus >= 0, f"rollout.num_gpus ({self.num_gpus}) must be >= 0 (0 = share the actor's devices).")
        require(
            self.placement == "colocated" or self.num_gpus >= 1,
            f"rollout.placement 'split' needs rollout.num_gpus >= 1 (got {self.num_gpus}); "
            "give it GPUs of its own or use placement 'colocated'.",
        )


# The loss section is the loss module's own option set, validated there (pcsd_core.loss.spec).
LossConfig = LossSpec


@dataclass(frozen=True)
class EvalConfig:
    # Test questions scored (0 = the whole test split).
    num_examples: int = 16
    max_new_tokens: int = 256
    batch_size: int = 16
    # Stop each answer at the end of its first `#### <number>` line (the line's newline; EOS and max_new_tokens
    # still apply), as lm-evaluation-harness stops at its stop sequences. Faster (no tokens spent after the
    # answer, e.g. `#### 16` repeated) and the strict answer is then the FIRST answer line: the response ends
    # there, so scoring's last-`####` rule reads that line. false = decode to EOS / max_new_tokens and score
    # the last `####` line (verl's convention).
    stop_at_answer: bool = True
    # Questions (the first N scored) on which the held-out KL(teacher || student) is computed (0 = all scored).
    # It costs a teacher and a student forward pass over prompt + answer per question: on 2 CPU cores about
    # 1.7 s a question for SmolLM2-135M (measured: 5m36s for 200 questions, i.e. ~6 minutes per evaluated model).
    heldout_kl_questions: int = 64
    # Questions of each validation during training (train.validate_every), held out from the train split.
    validation_questions: int = 16

    def __post_init__(self) -> None:
        check_field_types(self, "eval")
        require(self.validation_questions >= 1, f"eval.validation_questions ({self.validation_questions}) must be >= 1.")
        require(self.heldout_kl_questions >= 0,
                 f"eval.heldout_kl_questions ({self.heldout_kl_questions}) must be >= 0 (0 = every scored question).")
        require(self.num_examples >= 0, f"eval.num_examples ({self.num_examples}) must be >= 0.")
        require(self.max_new_tokens >= 1, f"eval.max_new_tokens ({self.max_new_tokens}) must be >= 1.")
        require(self.batch_size >= 1, f"eval.batch_size ({self.batch_size}) must be >= 1.")


PROMOTION_RULES = ("significant_gain", "better", "never")


@dataclass(frozen=True)
class RegisterConfig:
    # When the registry's `champion` alias moves to a run's registered version (every run registers its best
    # branch, for lineage):
    #   "significant_gain" (default): its strict accuracy beats the base model's on the same held-out questions by
    #       an exact McNemar test at level `alpha` (more questions turned right than wrong), and beats the current
    #       champion's the same way (paired, on the same questions; a champion scored on other questions is kept);
    #   "better": strictly higher strict accuracy than the champion, no test (a first version always promotes);
    #   "never": register for lineage only.
    promote_if: Literal[PROMOTION_RULES] = "significant_gain"
    # Level of the McNemar tests of "significant_gain" (two-sided exact p-value below it, difference above 0).
    alpha: float = 0.05
    # LoRA runs (model.lora_rank >= 1): false logs the adapter as a PEFT model (MLflow's transformers flavour loads
    # base + adapter; a local base is referenced by its path); true merges the adapter into the base first and
    # logs the merged model, servable without peft.
    merge_adapter: bool = False

    def __post_init__(self) -> None:
        check_field_types(self, "register")
        require(0 < self.alpha < 1, f"register.alpha ({self.alpha}) must be in (0, 1); 0.05 is the usual level.")


@dataclass(frozen=True)
class PCSDConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)

    def __post_init__(self) -> None:
        require(self.model.uses_lora or not self.register.merge_adapter,
                 "register.merge_adapter (true) needs model.lora_rank >= 1: full fine-tuning has no adapter to merge; "
                 "set it false.")
        responses_per_step = self.train.prompts_per_step * self.rollout.n
        require(
            responses_per_step % self.train.mini_batch_size == 0,
            f"train.prompts_per_step * rollout.n ({self.train.prompts_per_step} * {self.rollout.n} = "
            f"{responses_per_step}) must be divisible by train.mini_batch_size ({self.train.mini_batch_size}); "
            "change one of them.",
        )
        per_worker = self.train.mini_batch_size // self.train.num_workers
        require(
            self.train.mini_batch_size % self.train.num_workers == 0 and per_worker % self.train.micro_batch_size == 0,
            f"train.mini_batch_size ({self.train.mini_batch_size}) must split evenly over train.num_workers "
            f"({self.train.num_workers}) into whole micro-batches of train.micro_batch_size "
            f"({self.train.micro_batch_size}); change one of them.",
        )
        require(
            not self.train.share_prompt_prefix or self.model.attn_implementation in ("sdpa", "eager"),
            f"train.share_prompt_prefix packs responses with a 4D attention mask, which "
            f"model.attn_implementation {self.model.attn_implementation!r} does not take; use 'sdpa' or 'eager', "
            "or set train.share_prompt_prefix: false.",
        )
        require(
            self.rollout.engine != "sglang" or self.train.device != "cpu",
            "rollout.engine 'sglang' needs a GPU; use rollout.engine 'hf' with train.device 'cpu'.",
        )
        require(
            self.train.master_dtype in ("float32", self.model.dtype),
            f"train.master_dtype ({self.train.master_dtype!r}) must be 'float32' or model.dtype "
            f"({self.model.dtype!r}): masters narrower than the compute dtype lose the updates; use 'float32'.",
        )
        require(
            self.rollout.engine != "sglang" or self.model.dtype != "float32",
            "rollout.engine 'sglang' with model.dtype 'float32' is refused: SGLang's GPU attention backends run "
            "bfloat16/float16 only; set model.dtype: bfloat16 (or use rollout.engine 'hf').",
        )

    @property
    def responses_per_step(self) -> int:
        return self.train.prompts_per_step * self.rollout.n

    # ---- saving ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_flat_dict(self) -> dict[str, Any]:
        return {f"{section}.{key}": value for section, values in self.to_dict().items() for key, value in values.items()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
