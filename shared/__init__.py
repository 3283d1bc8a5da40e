"""The wire protocol shared by the cbbt server and client: schemas, arrays, errors."""

from shared.arrays import decode_array, encode_array
from shared.errors import ErrorBody, ErrorCode, ErrorEnvelope
from shared.schemas import (
    API_PREFIX,
    ClassifyRequest,
    ClassifyResponse,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
    PromptEmbeddingRequest,
    PromptEmbeddingResponse,
    TokenEmbeddingRequest,
    TokenEmbeddingResponse,
    Usage,
    UsageReport,
)

__all__ = [
    "API_PREFIX",
    "ClassifyRequest",
    "ClassifyResponse",
    "EmbeddingData",
    "EmbeddingRequest",
    "EmbeddingResponse",
    "ErrorBody",
    "ErrorCode",
    "ErrorEnvelope",
    "ModelCard",
    "ModelList",
    "PromptEmbeddingRequest",
    "PromptEmbeddingResponse",
    "TokenEmbeddingRequest",
    "TokenEmbeddingResponse",
    "Usage",
    "UsageReport",
    "decode_array",
    "encode_array",
]
