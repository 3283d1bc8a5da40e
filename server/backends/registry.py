"""One factory for every hosted model: `create_backend(name, pretrained)`.

- the default name (`devise-effnet-minilm`) is the offline real-weights dual encoder;
- anything else is an open_clip architecture (`ViT-B-32`, or `open_clip/ViT-B-32`),
  including cbbt's own configs in server/model_configs and a user's `model_config_dir`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from server.backends.base import Backend

logger = logging.getLogger(__name__)

DEVISE_NAMES = frozenset({"devise-effnet-minilm", "default"})


def list_models(extra_config_dir: Path | None = None) -> list[str]:
    from server.backends.openclip import register_model_configs

    register_model_configs(extra_config_dir)
    import open_clip

    return ["devise-effnet-minilm", *open_clip.list_models()]


def create_backend(
    name: str,
    pretrained: str | None = None,
    *,
    device: str = "cpu",
    extra_config_dir: Path | None = None,
) -> Backend:
    backend = _build_backend(name, pretrained, device=device, extra_config_dir=extra_config_dir)
    # OpenAI's model objects carry `created`; here the model is built (the ridge map fitted,
    # the checkpoint loaded) when the server starts, so that is its creation time.
    backend.card = backend.card.model_copy(update={"created": int(time.time())})
    return backend


def _build_backend(
    name: str,
    pretrained: str | None = None,
    *,
    device: str = "cpu",
    extra_config_dir: Path | None = None,
) -> Backend:
    if name in DEVISE_NAMES:
        if pretrained not in (None, "", "default"):
            raise ValueError(f"{name} ships its own weights; --pretrained does not apply")
        from server.backends.devise import DeviseBackend

        return DeviseBackend(device=device)
    from server.backends.openclip import OpenClipBackend, register_model_configs

    register_model_configs(extra_config_dir)
    arch = name.removeprefix("open_clip/")
    import open_clip

    if arch not in open_clip.list_models():
        raise ValueError(f"unknown model {name!r}; known: devise-effnet-minilm or an open_clip architecture")
    if pretrained is None:
        raise ValueError(
            f"open_clip model {arch} needs --pretrained: a local checkpoint path, a hub tag "
            "(needs network), or 'none' for random init (tests only)"
        )
    return OpenClipBackend(arch, pretrained, device=device)
