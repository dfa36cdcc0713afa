"""The critic: a transformer backbone with a scalar value head, as a plain nn.Module (DeepSpeed wraps it as is).

On disk a critic is a Hugging Face backbone directory (save_pretrained) plus `value_head.safetensors`. Loading a
directory that holds only a causal LM (e.g. the SFT model) gives a zero-initialised head, so every value starts at
exactly 0 and the first updates come from the returns. Loading a scalar reward model (a ...ForSequenceClassification
with num_labels=1, as `rlhf-dist rm` saves) starts the value head from its score head, as OpenRLHF does: the first
values are the reward model's per-token scores.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, PreTrainedModel

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

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """input_ids, attention_mask, position_ids: [B, L] -> values [B, L] float32."""
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return self.value_head(hidden).squeeze(-1).float()

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        self.backbone.save_pretrained(directory)
        head = {name: tensor.detach().cpu().contiguous() for name, tensor in self.value_head.state_dict().items()}
        save_file(head, directory / VALUE_HEAD_FILE)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, dtype: torch.dtype = torch.float32) -> CriticModel:
        """From a saved critic (backbone + value_head.safetensors), a scalar reward model (its score head becomes the
        value head) or any causal-LM / backbone directory (a zero head)."""
        directory = Path(directory)
        head_path = directory / VALUE_HEAD_FILE
        if not head_path.is_file() and is_scalar_reward_model(directory):
            return cls._from_reward_model(directory, dtype)
        critic = cls(AutoModel.from_pretrained(directory, dtype=dtype))
        if head_path.is_file():
            state = load_file(head_path)
            expected = {name: tuple(t.shape) for name, t in critic.value_head.state_dict().items()}
            found = {name: tuple(t.shape) for name, t in state.items()}
            if found != expected:
                raise ValueError(
                    f"{head_path} holds tensors {found} but the backbone in {directory} needs "
                    f"{expected}; the value head was saved with another backbone"
                )
            critic.value_head.load_state_dict({name: t.to(dtype) for name, t in state.items()})
        return critic

    @classmethod
    def _from_reward_model(cls, directory: Path, dtype: torch.dtype) -> CriticModel:
        reward_model = AutoModelForSequenceClassification.from_pretrained(directory, dtype=dtype)
        score = getattr(reward_model, "score", None)
        if not isinstance(score, nn.Linear) or score.out_features != 1:
            raise ValueError(
                f"{directory} is a {type(reward_model).__name__} without a one-output `score` layer to "
                f"start the value head from; point model.critic at a critic or a causal-LM directory"
            )
        backbone = reward_model.base_model
        critic = cls(backbone)
        with torch.no_grad():
            critic.value_head.weight.copy_(score.weight)
            if score.bias is not None:  # Llama/Qwen score heads have none: the value head's bias stays 0
                critic.value_head.bias.copy_(score.bias)
        return critic


def is_scalar_reward_model(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a ...ForSequenceClassification with one output (config.json only, no weights)."""
    config = AutoConfig.from_pretrained(directory)
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith("ForSequenceClassification") for a in archs) and config.num_labels == 1
