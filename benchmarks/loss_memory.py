"""Peak extra memory and time of the distillation loss: naive full logits vs pcsd_core's chunked loss.

Run:  python benchmarks/loss_memory.py            (full table: V in {49152, 102400, 151936} x T in {512, 2048})
      python benchmarks/loss_memory.py --quick    (only T=2048, V=102400, the target case)

Each measurement (case x method) runs in a fresh subprocess, so one allocation pattern cannot hide in another's
heap. Forward + backward of forward KL(P_t || P_s) over T response tokens of one sequence, fp32:
- naive: what peers do (TRL `full_logits`): student and teacher logits (T, V) = h @ W^T, log_softmax both,
  F.kl_div, backward through autograd.
- ours:  `pcsd_core.loss.distillation.hidden_state_distillation_loss` (token chunks, exact gradients, metrics on).
Memory: on CPU, peak RSS (VmHWM, reset through /proc/self/clear_refs) minus RSS after the inputs exist; on
GPU, torch.cuda.max_memory_allocated minus allocated before. "working" subtracts the gradient outputs both
methods must return (W.grad (V, H) and h.grad (T, H)), i.e. the memory the loss itself needs. Correctness:
the loss values and gradient fingerprints (full h.grad, W.grad projected on a fixed random vector) of ours
are compared with naive's. The last line is machine-readable:
memory_ratio_T2048_V102400=<ours/naive working memory> time_ratio_T2048_V102400=<ours/naive time>
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCABS = (49152, 102400, 151936)
TOKENS = (512, 2048)


def _rss_bytes(field: str) -> int:
    """VmRSS / VmHWM of this process from /proc (kB -> bytes)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status; this benchmark's CPU mode needs Linux.")


def _naive_loss(torch, student_hidden, teacher_hidden, weight, weights):
    import torch.nn.functional as F

    student_logits = student_hidden @ weight.T  # (T, V)
    with torch.no_grad():
        teacher_logprobs = torch.log_softmax(teacher_hidden @ weight.T, dim=-1)  # (T, V)
    student_logprobs = torch.log_softmax(student_logits, dim=-1)
    per_token = F.kl_div(student_logprobs, teacher_logprobs, reduction="none", log_target=True).sum(-1)
    return (per_token * weights).sum()


def _ours_loss(torch, student_hidden, teacher_hidden, weight, weights, chunk_tokens):
    from pcsd_core.loss.distillation import hidden_state_distillation_loss

    return hidden_state_distillation_loss(student_hidden, teacher_hidden, weight, weights,
                                          chunk_tokens=chunk_tokens).loss


def _worker(args) -> None:
    """One measurement in this (fresh) process; writes a JSON result and gradient fingerprints."""
    import torch

    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    student_hidden = torch.randn(args.tokens, args.hidden, generator=generator).to(device).requires_grad_(True)
    teacher_hidden = (student_hidden.detach() + 0.3 * torch.randn(args.tokens, args.hidden, generator=generator).to(device))
    weight = (torch.randn(args.vocab, args.hidden, generator=generator) / args.hidden**0.5).to(device).requires_grad_(True)
    weights = torch.full((args.tokens,), 1.0 / args.tokens, device=device)

    def run(rows):
        if args.method == "naive":
            return _naive_loss(torch, student_hidden[:rows], teacher_hidden[:rows], weight, weights[:rows])
        return _ours_loss(torch, student_hidden[:rows], teacher_hidden[:rows], weight, weights[:rows], args.chunk_tokens)

    run(8).backward()  # warm-up: lazy library initialisation is not the loss's memory
    weight.grad, student_hidden.grad = None, None
    seconds = []
    for repeat in range(args.repeats):
        weight.grad, student_hidden.grad = None, None
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            baseline = torch.cuda.memory_allocated()
        else:
            baseline = _rss_bytes("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark to the current RSS
        start = time.perf_counter()
        loss = run(args.tokens)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_bytes("VmHWM")
        if repeat == 0:
            peak_extra = peak - baseline
    grad_outputs = (weight.numel() + student_hidden.numel()) * 4
    probe = torch.randn(args.hidden, generator=torch.Generator().manual_seed(1)).to(device)
    torch.save({"hidden_grad": student_hidden.grad.cpu(), "weight_grad_probe": (weight.grad @ probe).cpu()},
               args.output + ".pt")
    Path(args.output).write_text(json.dumps({
        "loss": loss.item(), "peak_extra_mb": peak_extra / 2**20, "grad_outputs_mb": grad_outputs / 2**20,
        "working_mb": (peak_extra - grad_outputs) / 2**20, "seconds": min(seconds),
    }))


def _measure(method: str, tokens: int, vocab: int, args, scratch: Path) -> dict:
    output = scratch / f"{method}_{tokens}_{vocab}.json"
    command = [sys.executable, __file__, "--worker", method, "--tokens", str(tokens), "--vocab", str(vocab),
               "--hidden", str(args.hidden), "--chunk-tokens", str(args.chunk_tokens), "--repeats",
               str(args.repeats), "--device", args.device, "--output", str(output)]
    subprocess.run(command, check=True, cwd=REPO_ROOT)
    result = json.loads(output.read_text())
    import torch

    result["fingerprint"] = torch.load(str(output) + ".pt")
    return result


def _relative_error(ours, naive) -> float:
    return ((ours.double() - naive.double()).norm() / naive.double().norm()).item()


def _compare(tokens: int, vocab: int, args, scratch: Path) -> dict:
    naive = _measure("naive", tokens, vocab, args, scratch)
    ours = _measure("ours", tokens, vocab, args, scratch)
    return {
        "tokens": tokens, "vocab": vocab, "naive": naive, "ours": ours,
        "loss_rel_err": abs(ours["loss"] - naive["loss"]) / abs(naive["loss"]),
        "grad_rel_err": max(_relative_error(ours["fingerprint"][k], naive["fingerprint"][k])
                            for k in ("hidden_grad", "weight_grad_probe")),
    }


def _print_table(rows: list[dict], args) -> None:
    print(f"# device={args.device} H={args.hidden} chunk_tokens={args.chunk_tokens} fp32, forward+backward, "
          f"time = min of {args.repeats} run(s)")
    header = ("T", "V", "naive peak MB", "ours peak MB", "naive working MB", "ours working MB", "working ratio",
              "naive s", "ours s", "time ratio", "loss rel err", "grad rel err")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        naive, ours = row["naive"], row["ours"]
        cells = (row["tokens"], row["vocab"], f"{naive['peak_extra_mb']:.0f}", f"{ours['peak_extra_mb']:.0f}",
                 f"{naive['working_mb']:.0f}", f"{ours['working_mb']:.0f}",
                 f"{ours['working_mb'] / naive['working_mb']:.3f}", f"{naive['seconds']:.2f}",
                 f"{ours['seconds']:.2f}", f"{ours['seconds'] / naive['seconds']:.2f}",
                 f"{row['loss_rel_err']:.1e}", f"{row['grad_rel_err']:.1e}")
        print("| " + " | ".join(str(c) for c in cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only T=2048, V=102400")
    parser.add_argument("--cases", help="comma-separated TxV cases instead of the full grid, e.g. 2048x151936")
    parser.add_argument("--hidden", type=int, default=576, help="hidden size H (576 = SmolLM2-135M)")
    parser.add_argument("--chunk-tokens", type=int, default=128, help="chunk_tokens of the chunked loss")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per measurement (min is reported)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--worker", choices=("naive", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.path.insert(0, str(REPO_ROOT))
        args.method = args.worker
        _worker(args)
        return
    cases = [(2048, 102400)] if args.quick else [(t, v) for v in VOCABS for t in TOKENS]
    if args.cases:
        cases = [tuple(int(n) for n in case.split("x")) for case in args.cases.split(",")]
    with tempfile.TemporaryDirectory() as scratch:
        rows = [_compare(tokens, vocab, args, Path(scratch)) for tokens, vocab in cases]
    _print_table(rows, args)
    target = next((row for row in rows if (row["tokens"], row["vocab"]) == (2048, 102400)), None)
    if target is None:  # --cases without the target case: the table is the result
        return
    memory_ratio = target["ours"]["working_mb"] / target["naive"]["working_mb"]
    inclusive_ratio = target["ours"]["peak_extra_mb"] / target["naive"]["peak_extra_mb"]
    print(f"# incl. gradient outputs: peak ratio at T=2048 V=102400 = {inclusive_ratio:.3f}")
    time_ratio = target["ours"]["seconds"] / target["naive"]["seconds"]
    print(f"memory_ratio_T2048_V102400={memory_ratio:.4f} time_ratio_T2048_V102400={time_ratio:.4f}")


if __name__ == "__main__":
    main()
