"""Mixed precision for the actor in this process: master weights in `train.master_dtype`, compute in `model.dtype`.

With FSDP2 the policy is `MixedPrecisionPolicy(param_dtype=model.dtype, reduce_dtype=float32)` on sharded masters
(`mixed_precision_policy`): each forward all-gathers the shards cast to the compute dtype, forward and backward
run in it, and each micro-batch's gradient is cast to float32, reduced and accumulated into the masters' float32
gradient; AdamW then steps the masters.

Without FSDP (`ComputeCopy`) the module holds the masters and a copy of it holds the compute-dtype weights,
so the numerics are FSDP's: the forward and backward see exactly the cast masters; after each
micro-batch the compute gradient is cast to the master dtype and added to the master gradient (the float32
accumulation FSDP does with `reduce_dtype`); the optimizer, clipping and EMA act on the masters, which are then
cast into the copy. Autocast would differ: it keeps the parameters in float32 and casts per op, running
norms and softmax in float32, so its forward is not the one FSDP's bf16 parameters give.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from pcsd_core.models import DTYPES


def mixed_precision_policy(compute_dtype: str):
    """FSDP2's policy: parameters unsharded in the compute dtype, gradients reduced (and accumulated) in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=DTYPES[compute_dtype], reduce_dtype=torch.float32)


class ComputeCopy:
    """A copy of the master module `master` whose parameters are in `compute_dtype`: forward and backward run on it.

    The master module stays what the optimizer steps and what state dicts and checkpoints read, so the torch
    state-dict machinery (parameter names, optimizer state by name) is the same with and without FSDP.
    """

    def __init__(self, master: nn.Module, compute_dtype: str):
        self.module = copy.deepcopy(master)  # ties (embedding = lm_head) are kept: deepcopy memoises the Parameter
        # Parameters only; buffers (RoPE's inv_freq) stay as loaded, as FSDP2's policy leaves them.
        for param in self.module.parameters():
            param.data = param.data.to(DTYPES[compute_dtype])
        # parameters() yields a tied parameter once, in the same order on both modules.
        self.pairs = list(zip(self.module.parameters(), master.parameters(), strict=True))

    @torch.no_grad()
    def accumulate_grads(self) -> None:
        """After a backward: the compute gradients, cast to the master dtype, added to the masters' gradients."""
        for param, master in self.pairs:
            if param.grad is None:
                continue
            grad = param.grad.to(master.dtype)
            master.grad = grad if master.grad is None else master.grad.add_(grad)
            param.grad = None

    @torch.no_grad()
    def copy_from_masters(self) -> None:
        """After the masters moved (an optimizer step, EMA, a loaded state): cast them into the copy."""
        for param, master in self.pairs:
            param.copy_(master)
