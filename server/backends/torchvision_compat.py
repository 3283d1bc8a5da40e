"""Make `import torchvision` work beside the CPU build of torch.

PyPI's torchvision 0.28 wheel is a CUDA build; against torch 2.13.0+cpu its compiled
ops fail to register and the import dies with "operator torchvision::nms does not
exist". open_clip, timm and transformers import torchvision but use none of its
compiled ops, so defining the two op schemas before the first import is enough.

Where torchvision's own ops load (a matching torch build), this is a no-op.
Call `ensure_torchvision_importable()` before importing open_clip or transformers.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

logger = logging.getLogger(__name__)

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library: torch.library.Library | None = None


def _nms_registered() -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
    except RuntimeError:
        return False
    return True


def ensure_torchvision_importable() -> bool:
    """Define the missing op schemas if needed; returns True when the shim was installed."""
    global _library
    if _library is not None or importlib.util.find_spec("torchvision") is None:
        return False
    if _nms_registered():
        return False
    try:
        import torchvision  # noqa: F401
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
    else:
        return False
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _library.define(schema)
    logger.debug("installed the torchvision op-schema shim for a CPU torch build")
    return True
