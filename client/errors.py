"""What can go wrong, arranged by what the caller can do about it.

    CbbtError                      anything cbbt reports to a user (exit 1)
      RequestError                 fix the request: arguments, data, budget, artifact (exit 2)
        BudgetTooSmall             the budget cannot pay for the run's fixed costs
        ApiError                   the server refused the request (4xx, not retryable)
      CredentialsError             fix the credentials: missing, wrong or revoked key (exit 3)
      QuotaExhausted               give up: the key's budget is spent; top it up (exit 4)
      RetryLater                   wait and retry: nothing is wrong with the request (exit 5)
        ServerUnreachable          no cbbt server answers at the URL
        ServiceUnavailable         the server kept failing / rate-limiting past the retry bound

Every message is one line that names the fix; `cbbt --debug` adds the traceback.
`TransientError` is internal to the retry loop (a failure worth another attempt) and never
reaches a user: when the retries run out it becomes a `RetryLater`.
"""

from __future__ import annotations

__all__ = [
    "ApiError",
    "BudgetTooSmall",
    "CbbtError",
    "CredentialsError",
    "QuotaExhausted",
    "RequestError",
    "RetryLater",
    "ServerUnreachable",
    "ServiceUnavailable",
    "TransientError",
]


class CbbtError(Exception):
    """A failure cbbt explains to its user in one line (and an exit code)."""

    exit_code = 1


class RequestError(CbbtError):
    """Fix the request: a bad argument, data set, split file, artifact or budget."""

    exit_code = 2


class BudgetTooSmall(RequestError):
    """The budget cannot pay for the image features and the initial prompt."""


class ApiError(RequestError):
    """The server answered with an error that retrying cannot fix."""

    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(f"the server refused the request ({status} {code}): {message}")
        self.status = status
        self.code = code
        self.message = message


class CredentialsError(ApiError):
    """401/403: the API key is missing, wrong, revoked or lacks the scope."""

    exit_code = 3

    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(status, code, message)
        self.args = (
            f"the server rejected the API key ({status} {code}: {message}); "
            "set CBBT_API_KEY (or --api-key) to a valid key",
        )


class QuotaExhausted(ApiError):
    """The key's budget cannot pay for the call (`insufficient_quota`): stop, do not retry."""

    exit_code = 4

    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(status, code, message)
        self.args = (f"the key's budget is exhausted ({message}); top the key up or use another key",)


class RetryLater(CbbtError):
    """Nothing is wrong with the request: the service is down, busy or rate-limiting."""

    exit_code = 5


class ServerUnreachable(RetryLater):
    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"no cbbt server at {url} ({reason}); start one or set CBBT_SERVER / --server")
        self.url = url


class ServiceUnavailable(RetryLater):
    def __init__(self, what: str, waited_s: float, attempts: int) -> None:
        super().__init__(
            f"the server is busy or failing ({what}); gave up after {attempts} attempt(s) in "
            f"{waited_s:.0f} s: try again later, or raise CBBT_RETRY_TOTAL_S to wait longer"
        )
        self.what = what


class TransientError(Exception):
    """A failure worth retrying (429 rate limit, 503, a timeout, a dropped connection)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
