"""Model backends: one interface (`Backend`), one factory (`create_backend`)."""

from server.backends.base import Backend, PromptItem, PromptTooLong
from server.backends.registry import create_backend, list_models

__all__ = ["Backend", "PromptItem", "PromptTooLong", "create_backend", "list_models"]
