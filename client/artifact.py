"""The tuned artifact: a small folder that `cbbt eval` / `cbbt predict` load without pickle.

    artifact/
      config.json          class names, model id and card, adapter kind, tuning config
      tensors.safetensors  context vectors, the class text features they give, adapter weights

The class text features are stored so that prediction needs image features only: the
tuned prompt's text side never has to be queried again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from client.adapters import LinearHead, ResidualAdapter, TipAdapter

CONFIG_FILE = "config.json"
TENSORS_FILE = "tensors.safetensors"
FORMAT_VERSION = 1
_ADAPTER_PREFIX = "adapter."


@dataclass
class Artifact:
    context: torch.Tensor  # [M, W]
    class_names: list[str]
    class_text_features: torch.Tensor  # [C, D]
    adapter_kind: str  # "residual" | "tip" | "linear" (the whole classifier) | "none"
    adapter_state: dict[str, torch.Tensor] | None
    model_card: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def logit_scale(self) -> float:
        return float(self.model_card["logit_scale"])

    def build_adapter(self) -> nn.Module | None:
        if self.adapter_kind == "none" or self.adapter_state is None:
            return None
        if self.adapter_kind == "tip":
            return TipAdapter.from_state_dict(self.adapter_state).eval()
        if self.adapter_kind == "linear":
            return LinearHead.from_state(self.adapter_state).eval()
        ratio = float(self.config.get("adapter_ratio", 0.2))
        adapter = ResidualAdapter(int(self.class_text_features.shape[1]), ratio=ratio)
        adapter.load_state_dict(self.adapter_state)
        return adapter.eval()


def save_artifact(artifact: Artifact, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        "context": artifact.context.detach().float().contiguous(),
        "class_text_features": artifact.class_text_features.detach().float().contiguous(),
    }
    for name, value in (artifact.adapter_state or {}).items():
        tensors[_ADAPTER_PREFIX + name] = value.detach().contiguous().clone()
    save_file(tensors, str(directory / TENSORS_FILE))
    config = {
        "format_version": FORMAT_VERSION,
        "class_names": artifact.class_names,
        "adapter_kind": artifact.adapter_kind,
        "model_card": artifact.model_card,
        "config": artifact.config,
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def load_artifact(directory: Path) -> Artifact:
    config_path, tensors_path = directory / CONFIG_FILE, directory / TENSORS_FILE
    if not config_path.is_file() or not tensors_path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a cbbt artifact (needs {CONFIG_FILE} and {TENSORS_FILE})"
        )
    config = json.loads(config_path.read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unsupported artifact format {config.get('format_version')!r}")
    tensors = load_file(str(tensors_path))
    adapter = {
        k.removeprefix(_ADAPTER_PREFIX): v for k, v in tensors.items() if k.startswith(_ADAPTER_PREFIX)
    }
    return Artifact(
        context=tensors["context"],
        class_names=list(config["class_names"]),
        class_text_features=tensors["class_text_features"],
        adapter_kind=str(config["adapter_kind"]),
        adapter_state=adapter or None,
        model_card=dict(config["model_card"]),
        config=dict(config.get("config", {})),
    )
