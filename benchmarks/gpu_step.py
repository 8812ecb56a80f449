"""One PCSD training step on one GPU at realistic shapes: throughput, MFU, peak memory, loss accuracy.

Runs in-process with torch + transformers only (no Ray, MLflow or Metaflow: the GPU benchmark machine has
none of them). For each model shape it builds a randomly initialised causal LM from a config written here,
in bf16, and times PCSD steps on synthetic token ids:

    teacher forward (no grad) on teacher prompt + response      2 * N * teacher_tokens FLOPs
    student forward + backward on student prompt + response     6 * N * student_tokens FLOPs
    AdamW step

once with the memory-bounded exact loss of `pcsd_core.loss.distillation` (hidden states + lm_head weight, chunked) and
once with the naive loss (full fp32 logits of teacher and student, log_softmax, KL). N counts the parameters
that take part in matmuls (all but the input embedding; the tied or untied lm_head counts); attention-score
FLOPs are left out, so MFU is slightly understated. MFU divides by the card's dense bf16 peak (H100/H200 SXM:
989 TFLOP/s). It then checks the GPU loss against a CPU float64 reference on a small slice.

    python benchmarks/gpu_step.py                       # both shapes, defaults below
    python benchmarks/gpu_step.py --shapes tiny --device cpu --steps 2 --no-loss-table   # CPU smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pcsd_core.loss.distillation import hidden_state_distillation_loss, token_divergence  # noqa: E402

DENSE_BF16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}

# Real models' shapes; weights are random (the step's cost does not depend on their values).
SHAPES = {
    "qwen2.5-1.5b": dict(
        model_type="qwen2", vocab_size=151_936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
    ),
    # deepseek-math-7b-base has 30 layers; 8 keep weights + grads + AdamW state well inside 80 GB.
    "deepseek-math-7b-8layers": dict(
        model_type="llama", vocab_size=102_400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=8,
        num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False,
    ),
    "tiny": dict(
        model_type="llama", vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    ),
}


def build_model(shape: str, device: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), max_position_embeddings=8192, **spec)
    attn = "flash_attention_2" if _has_flash_attn() and device == "cuda" else "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model, attn


def _has_flash_attn() -> bool:
    from importlib.util import find_spec

    return find_spec("flash_attn") is not None


def matmul_params(model) -> int:
    embedding = model.get_input_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    lm_head_tied = model.lm_head.weight is embedding
    # The input embedding is a lookup, not a matmul; a tied lm_head still does a (V, H) matmul.
    return total - embedding.numel() + (embedding.numel() if lm_head_tied else 0)


def pcsd_step(model, optimizer, batch, loss_kind: str, chunk_tokens: int, timer) -> float:
    student_ids, teacher_ids, prompt_len, response_len = batch
    with timer("teacher"), torch.no_grad():
        teacher_hidden = model.model(input_ids=teacher_ids).last_hidden_state
        teacher_hidden = teacher_hidden[:, 2 * prompt_len - 1 : 2 * prompt_len - 1 + response_len]
        if loss_kind == "naive":
            teacher_logits = model.lm_head(teacher_hidden).float()  # (B, R, V) fp32: the memory we avoid
    with timer("student"):
        student_hidden = model.model(input_ids=student_ids).last_hidden_state
        student_hidden = student_hidden[:, prompt_len - 1 : prompt_len - 1 + response_len]
        if loss_kind == "naive":
            student_logits = model.lm_head(student_hidden).float()
            loss = token_divergence(student_logits, teacher_logits).mean()
        else:
            num_tokens = student_hidden.shape[0] * student_hidden.shape[1]
            weights = torch.full((num_tokens,), 1.0 / num_tokens, device=student_hidden.device)
            loss = hidden_state_distillation_loss(
                student_hidden.reshape(num_tokens, -1),
                teacher_hidden.reshape(num_tokens, -1),
                model.lm_head.weight,
                weights,
                chunk_tokens=chunk_tokens,
            ).loss
        loss.backward()
    with timer("optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.item()


class PhaseTimer:
    """Wall-clock seconds per phase, synchronising the device so GPU work is counted where it happens."""

    def __init__(self, device: str):
        self.device, self.seconds = device, {}

    def __call__(self, name: str):
        timer = self

        class _Phase:
            def __enter__(self):
                timer._sync()
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer._sync()
                timer.seconds.setdefault(name, []).append(time.perf_counter() - self.start)

        return _Phase()

    def _sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()


def run_shape(shape: str, loss_kind: str, args) -> dict:
    device = args.device
    model, attn = build_model(shape, device, torch.bfloat16 if device == "cuda" else torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device == "cuda")
    vocab = model.config.vocab_size
    generator = torch.Generator(device="cpu").manual_seed(0)
    prompt = torch.randint(vocab, (args.batch, args.prompt_len), generator=generator)
    context = torch.randint(vocab, (args.batch, args.prompt_len), generator=generator)  # teacher prompt ~2x
    response = torch.randint(vocab, (args.batch, args.response_len), generator=generator)
    batch = (
        torch.cat([prompt, response], 1).to(device),
        torch.cat([prompt, context, response], 1).to(device),
        args.prompt_len,
        args.response_len,
    )
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    timer = PhaseTimer(device)
    losses = []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            timer.seconds.clear()
        losses.append(pcsd_step(model, optimizer, batch, loss_kind, args.chunk_tokens, timer))
    n_params = matmul_params(model)
    student_tokens = batch[0].numel()
    teacher_tokens = batch[1].numel()
    student_s = statistics.median(timer.seconds["student"])
    teacher_s = statistics.median(timer.seconds["teacher"])
    step_s = student_s + teacher_s + statistics.median(timer.seconds["optimizer"])
    result = dict(
        shape=shape, loss=loss_kind, attn=attn, params_b=n_params / 1e9, step_s=step_s,
        tokens_per_s=(student_tokens + teacher_tokens) / step_s,
        student_tflops=6 * n_params * student_tokens / student_s / 1e12,
        step_tflops=(6 * n_params * student_tokens + 2 * n_params * teacher_tokens) / step_s / 1e12,
        peak_gb=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan"),
        finite=all(torch.isfinite(torch.tensor(losses)).tolist()), last_loss=losses[-1],
    )
    del model, optimizer, batch
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def check_against_float64(args) -> tuple[float, float]:
    """Relative error of the device loss and its hidden-state gradient vs a CPU float64 naive reference."""
    generator = torch.Generator().manual_seed(1)
    tokens, hidden, vocab = 64, 1536, 151_936
    student_hidden = torch.randn(tokens, hidden, generator=generator) * 0.5
    teacher_hidden = student_hidden + 0.3 * torch.randn(tokens, hidden, generator=generator)
    weight = torch.randn(vocab, hidden, generator=generator) * 0.05
    weights = torch.full((tokens,), 1.0 / tokens)

    ref_hidden = student_hidden.double().requires_grad_(True)
    ref_loss = token_divergence(ref_hidden @ weight.double().T, teacher_hidden.double() @ weight.double().T).mean()
    ref_loss.backward()

    device_hidden = student_hidden.to(args.device).requires_grad_(True)
    out = hidden_state_distillation_loss(
        device_hidden, teacher_hidden.to(args.device), weight.to(args.device), weights.to(args.device),
        chunk_tokens=16,
    )
    out.loss.backward()
    loss_err = abs(out.loss.item() - ref_loss.item()) / abs(ref_loss.item())
    grad_err = ((device_hidden.grad.double().cpu() - ref_hidden.grad).norm() / ref_hidden.grad.norm()).item()
    return loss_err, grad_err


def peak_tflops(device: str) -> tuple[float, str]:
    if device != "cuda":
        return float("nan"), "none (CPU run)"
    name = torch.cuda.get_device_name()
    for key, value in DENSE_BF16_PEAK_TFLOPS.items():
        if key in name:
            return value, f"{name}: {value} TFLOP/s dense bf16"
    return float("nan"), f"{name}: peak unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="qwen2.5-1.5b,deepseek-math-7b-8layers")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--prompt-len", type=int, default=256, help="student prompt tokens (teacher: 2x)")
    parser.add_argument("--response-len", type=int, default=2048)
    parser.add_argument("--chunk-tokens", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--loss-table", action=argparse.BooleanOptionalAction, default=True,
                        help="also print benchmarks/loss_memory.py's table at T=2048, V=151936 on this device")
    args = parser.parse_args()
    if args.device == "cpu" and "tiny" not in args.shapes:
        print("note: CPU run of full-size shapes is very slow; use --shapes tiny for a smoke run", file=sys.stderr)
    peak, peak_note = peak_tflops(args.device)
    print(f"device={args.device} peak={peak_note} batch={args.batch} prompt={args.prompt_len} "
          f"teacher_prompt={2 * args.prompt_len} response={args.response_len}")
    header = f"{'shape':26} {'loss':6} {'attn':8} {'N(B)':>5} {'s/step':>7} {'tok/s':>8} {'stud TF/s':>9} " \
             f"{'stud MFU':>8} {'step TF/s':>9} {'peak GB':>8} {'finite':>6}"
    print(header)
    rows = []
    for shape in args.shapes.split(","):
        for loss_kind in ("ours", "naive"):
            try:
                row = run_shape(shape, loss_kind, args)
            except torch.OutOfMemoryError:
                print(f"{shape:26} {loss_kind:6} out of memory")
                torch.cuda.empty_cache()
                continue
            rows.append(row)
            mfu = row["student_tflops"] / peak
            print(f"{row['shape']:26} {row['loss']:6} {row['attn']:8} {row['params_b']:5.2f} {row['step_s']:7.3f} "
                  f"{row['tokens_per_s']:8.0f} {row['student_tflops']:9.1f} {mfu:8.1%} {row['step_tflops']:9.1f} "
                  f"{row['peak_gb']:8.2f} {str(row['finite']):>6}")
    loss_err, grad_err = check_against_float64(args)
    print(f"loss vs CPU float64 (64 tokens, V=151936): rel_err_loss={loss_err:.2e} rel_err_grad={grad_err:.2e}")
    if args.loss_table:
        # The loss benchmark's table on this device at the shape (one subprocess per measurement).
        import subprocess

        subprocess.run([sys.executable, str(Path(__file__).with_name("loss_memory.py")), "--device", args.device,
                        "--cases", "2048x151936", "--hidden", "1536", "--chunk-tokens", "1024", "--repeats", "3"],
                       check=True)


if __name__ == "__main__":
    main()
