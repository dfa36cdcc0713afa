"""The critic: a transformer backbone with a scalar value head, as a plain nn.Module (DeepSpeed wraps it as is).

On disk a critic is a Hugging Face backbone directory (save_pretrained) plus `value_head.safetensors`. Loading a
directory that holds only a causal LM (the usual start: the critic is initialised from the SFT or reward model)
gives a zero-initialised head, so every value starts at exactly 0 and the first updates come from the returns.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, PreTrainedModel

VALUE_HEAD_FILE = "value_head.safetensors"


def _hidden_size(backbone: PreTrainedModel) -> int:
    config = backbone.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return text_config.hidden_size


class CriticModel(nn.Module):
    """values[b, l] = value_head(backbone(input_ids)[b, l]): the value of the state after reading tokens 0..l."""

    def __init__(self, backbone: PreTrainedModel, value_head: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        if value_head is None:
            value_head = nn.Linear(_hidden_size(backbone), 1, dtype=backbone.dtype, device=backbone.device)
            nn.init.zeros_(value_head.weight)
            nn.init.zeros_(value_head.bias)
        self.value_head = value_head

    @property
    def config(self):
        return self.backbone.config

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.backbone.gradient_checkpointing_enable(**kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, attention_mask, position_ids: [B, L] -> values [B, L] float32."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state
        return self.value_head(hidden).squeeze(-1).float()

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        self.backbone.save_pretrained(directory)
        head = {name: tensor.detach().cpu().contiguous() for name, tensor in self.value_head.state_dict().items()}
        save_file(head, directory / VALUE_HEAD_FILE)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, dtype: torch.dtype = torch.float32) -> "CriticModel":
        """From a saved critic (backbone + value_head.safetensors) or from any causal-LM / backbone directory."""
        directory = Path(directory)
        critic = cls(AutoModel.from_pretrained(directory, dtype=dtype))
        head_path = directory / VALUE_HEAD_FILE
        if head_path.is_file():
            state = load_file(head_path)
            expected = {name: tuple(t.shape) for name, t in critic.value_head.state_dict().items()}
            found = {name: tuple(t.shape) for name, t in state.items()}
            if found != expected:
                raise ValueError(f"{head_path} holds tensors {found} but the backbone in {directory} needs "
                                 f"{expected}; the value head was saved with another backbone")
            critic.value_head.load_state_dict({name: t.to(dtype) for name, t in state.items()})
        return critic
