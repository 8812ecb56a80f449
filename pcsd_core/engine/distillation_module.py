"""`DistillationModule`: one forward of a causal LM that gives either the teacher's response hidden states or
the student's distillation loss.

Both run inside one forward so that, under FSDP2, the sharded root module's hooks unshard its parameters (the
embeddings and the tied lm_head, which the loss reads) for the loss too, and reduce-scatter their gradients
afterwards. The actor builds its student, teacher and reference modules from it; the held-out KL scores with it.
"""

from __future__ import annotations

import torch
from torch import nn

from pcsd_core.engine import lora
from pcsd_core.loss import distillation as losses
from pcsd_core.loss.spec import LossSpec


class DistillationModule(nn.Module):
    """Wraps a causal LM: forward gives response hidden states (teacher) or the distillation loss (student)."""

    def __init__(self, causal_lm: nn.Module, loss_spec: LossSpec, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.lm = causal_lm
        self.loss_spec = loss_spec
        self.compute_dtype = compute_dtype  # what the forward runs in (FSDP's param_dtype), not the masters' dtype

    @property
    def decoder_layers(self) -> nn.ModuleList:
        layers = getattr(lora.backbone(self.lm), "layers", None)
        if layers is None:
            raise TypeError(f"{type(self.lm).__name__} has no `base_model.layers`; FSDP sharding needs decoder layers.")
        return layers

    def lm_head_weight(self) -> torch.Tensor:
        return self.lm.get_output_embeddings().weight  # (V, H); tied to the input embeddings in SmolLM2

    def forward(self, input_ids, attention_mask, position_ids, response_positions, teacher_hidden=None, weights=None,
                response_tokens=None, teacher_weight=None, reference_hidden=None, reference_weight=None):
        if attention_mask.dim() == 4 and self.lm.config._attn_implementation == "eager":
            # Eager attention adds the mask to the scores; sdpa takes the boolean mask as is.
            blocked = torch.finfo(self.compute_dtype).min
            attention_mask = torch.zeros(attention_mask.shape, dtype=self.compute_dtype,
                                         device=attention_mask.device).masked_fill(~attention_mask, blocked)
        hidden = lora.backbone(self.lm)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    use_cache=False).last_hidden_state
        response_hidden = hidden.reshape(-1, hidden.shape[-1])[response_positions]  # (N, H)
        if teacher_hidden is None:
            return response_hidden
        output = losses.hidden_state_distillation_loss(
            response_hidden, teacher_hidden, self.lm_head_weight(), weights,
            teacher_weight=teacher_weight, response_ids=response_tokens, spec=self.loss_spec,
            reference_hidden=reference_hidden, reference_weight=reference_weight,
        )
        # A tuple, not the dataclass: FSDP finds the tensors of a forward's output to hook its backward.
        return output.loss, output.per_token, output.metrics
