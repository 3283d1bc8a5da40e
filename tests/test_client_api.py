"""CbbtClient through `httpx.MockTransport` (no server): retries, idempotency keys, counting.

A `FakeApi` answers the four routes the client uses with well-formed bodies and can be told
to fail the next attempts in scripted ways (an exception, or a status with a code and headers).
Sleeps are recorded, not slept, so the retry schedule is checked without waiting for it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest

from client.api import CbbtClient, QueryCounter, RetryPolicy
from client.errors import (
    ApiError,
    CredentialsError,
    QuotaExhausted,
    RetryLater,
    ServerUnreachable,
    ServiceUnavailable,
)
from shared.arrays import decode_array, encode_array

DIM = 4
WIDTH = 3
FAST = RetryPolicy(max_attempts=6, max_total_s=60.0, backoff_initial_s=0.001, backoff_max_s=0.01, jitter=0.5)
# Retry-After is honoured up to 3 x backoff_max_s; this policy lets the tests' values through.
PATIENT = RetryPolicy(max_attempts=6, max_total_s=60.0, backoff_initial_s=0.001, backoff_max_s=1.0)

CARD = {
    "id": "fake-model",
    "object": "model",
    "owned_by": "cbbt",
    "backend": "fake",
    "feature_dim": DIM,
    "token_width": WIDTH,
    "max_context_vectors": 8,
    "context_length": 77,
    "logit_scale": 100.0,
    "image_size": 32,
    "causal_text": True,
    "has_semantics": False,
}
USAGE = {
    "object": "usage",
    "key_name": "k",
    "budget_items": 100,
    "spent_items": 7,
    "remaining_items": 93,
    "budget_requests": None,
    "spent_requests": 3,
    "remaining_requests": None,
    "recent": [],
}

# A scripted fault: an exception to raise, (status, error code, headers) to answer, or None
# (answer this attempt normally).
Fault = BaseException | tuple[int, str | None, dict[str, str]] | None


@dataclass
class Attempt:
    method: str
    path: str
    idempotency_key: str | None
    body: dict[str, object] | None


@dataclass
class FakeApi:
    faults: list[Fault] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)

    def fail(self, *faults: Fault) -> None:
        self.faults.extend(faults)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.attempts.append(
            Attempt(request.method, request.url.path, request.headers.get("idempotency-key"), body)
        )
        if self.faults:
            fault = self.faults.pop(0)
            if fault is None:
                return self._answer(request.method, request.url.path, body)
            if isinstance(fault, BaseException):
                raise fault
            status, code, headers = fault
            error = {"message": f"scripted {status}", "type": "error", "code": code, "param": None}
            return httpx.Response(status, json={"error": error}, headers=headers)
        return self._answer(request.method, request.url.path, body)

    def _answer(self, method: str, path: str, body: dict[str, object] | None) -> httpx.Response:
        if method == "GET" and path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [CARD]})
        if method == "GET" and path == "/v1/usage":
            return httpx.Response(200, json=USAGE)
        assert body is not None
        if path == "/v1/embeddings":
            inputs = body["input"]
            assert isinstance(inputs, list)
            data = [
                {"object": "embedding", "index": i, "embedding": encode_array(np.full(DIM, i, np.float32))}
                for i in range(len(inputs))
            ]
            usage = {"items": len(inputs)}
            return httpx.Response(200, json={"object": "list", "data": data, "model": "fake", "usage": usage})
        if path == "/v1/prompt-embeddings":
            prompts, names = body["prompts"], body["class_names"]
            assert isinstance(prompts, list) and isinstance(names, list)
            # Feature [p, c] = (first context value of prompt p) + c, so order can be checked.
            firsts = [float(decode_array(str(p))[0]) for p in prompts]
            out = np.array([[[f + c] * DIM for c in range(len(names))] for f in firsts], np.float32)
            return httpx.Response(
                200,
                json={
                    "object": "prompt_embedding",
                    "model": "fake",
                    "shape": list(out.shape),
                    "embeddings": encode_array(out),
                    "usage": {"items": out.shape[0] * out.shape[1]},
                },
            )
        if path == "/v1/token-embeddings":
            out = np.arange(2 * WIDTH, dtype=np.float32).reshape(2, WIDTH)
            return httpx.Response(
                200,
                json={
                    "object": "token_embedding",
                    "model": "fake",
                    "tokens": ["a", "b"],
                    "shape": [2, WIDTH],
                    "embedding": encode_array(out),
                    "usage": {"items": 1},
                },
            )
        return httpx.Response(404, json={"error": {"message": "no", "type": "x", "code": "not_found"}})

    def posts(self) -> list[Attempt]:
        return [a for a in self.attempts if a.method == "POST"]


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record tenacity's sleeps instead of sleeping (its default sleep calls time.sleep)."""
    recorded: list[float] = []
    monkeypatch.setattr(time, "sleep", recorded.append)
    return recorded


@pytest.fixture
def api() -> FakeApi:
    return FakeApi()


@pytest.fixture
def make_client(api: FakeApi) -> Iterator[Callable[..., CbbtClient]]:
    clients: list[CbbtClient] = []

    def make(*, card: bool = True, **kwargs: object) -> CbbtClient:
        """A client on the fake; with `card`, it has read the model card (and its request
        limits) already, as every run does first, so scripted faults hit the next call."""
        kwargs.setdefault("retry", FAST)
        client = CbbtClient("http://fake", "sk-test", transport=httpx.MockTransport(api), **kwargs)  # type: ignore[arg-type]
        clients.append(client)
        if card:
            client.model_card()
            api.attempts.clear()
        return client

    yield make
    for client in clients:
        client.close()


def texts(client: CbbtClient, n: int = 2, key: str | None = None) -> np.ndarray:
    return client.embed_texts([f"t{i}" for i in range(n)], idempotency_key=key)


# -- retries --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [
        httpx.ConnectError("refused"),
        httpx.ConnectTimeout("connect timeout"),
        httpx.ReadTimeout("read timeout"),
        httpx.WriteTimeout("write timeout"),
        httpx.RemoteProtocolError("peer closed connection without sending complete message body"),
        httpx.ReadError("connection reset"),
        (408, None, {}),
        (409, "idempotency_conflict", {}),
        (429, "rate_limit_exceeded", {}),
        (500, "internal_error", {}),
        (500, "injected_failure", {}),
        (502, None, {}),
        (503, "overloaded", {}),
        (503, "injected_failure", {}),
        (504, None, {}),
    ],
    ids=lambda f: type(f).__name__ if isinstance(f, BaseException) else f"{f[0]}-{f[1]}",
)
def test_transient_failures_are_retried_and_counted_once(
    api: FakeApi, make_client: Callable[..., CbbtClient], sleeps: list[float], fault: Fault
) -> None:
    client = make_client()  # mid-run: the server has answered (a refused connection is then a restart)
    api.fail(fault, fault)
    out = texts(client, 3)
    assert out.shape == (3, DIM)
    posts = api.posts()
    assert len(posts) == 3  # two failures, then the answer
    assert len({p.idempotency_key for p in posts}) == 1 and posts[0].idempotency_key
    assert client.counter.calls == 1 and client.counter.items == 3
    assert client.counter.retries == 2
    assert len(sleeps) == 2


def test_backoff_grows_exponentially_with_jitter(
    api: FakeApi, make_client: Callable[..., CbbtClient], sleeps: list[float]
) -> None:
    policy = RetryPolicy(max_attempts=6, backoff_initial_s=0.01, backoff_max_s=0.05, jitter=0.5)
    client = make_client(retry=policy)
    api.fail(*[(503, "overloaded", {})] * 5)
    texts(client)
    assert len(sleeps) == 5
    bases = [0.01, 0.02, 0.04, 0.05, 0.05]  # doubled, then capped at backoff_max_s
    for slept, base in zip(sleeps, bases, strict=True):
        assert base * 0.5 <= slept <= base * 1.5


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "2"}, 2.0),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after": "3", "retry-after-ms": "1500"}, 1.5),  # the precise one wins
    ],
)
def test_retry_after_is_honoured(
    api: FakeApi,
    make_client: Callable[..., CbbtClient],
    sleeps: list[float],
    headers: dict[str, str],
    expected: float,
) -> None:
    client = make_client(retry=PATIENT)
    waits: list[float] = []
    client.on_retry = lambda _exc, wait: waits.append(wait)
    api.fail((429, "rate_limit_exceeded", headers))
    texts(client)
    assert sleeps == [pytest.approx(expected)]
    assert waits == [pytest.approx(expected)]


def test_retry_after_on_a_5xx_is_honoured_too(
    api: FakeApi, make_client: Callable[..., CbbtClient], sleeps: list[float]
) -> None:
    client = make_client(retry=PATIENT)
    api.fail((503, "overloaded", {"retry-after": "1"}))
    texts(client)
    assert sleeps == [pytest.approx(1.0)]


def test_a_huge_retry_after_is_capped(
    api: FakeApi, make_client: Callable[..., CbbtClient], sleeps: list[float]
) -> None:
    client = make_client(retry=PATIENT)
    api.fail((429, "rate_limit_exceeded", {"retry-after": "86400"}), (503, None, {"retry-after": "soon"}))
    texts(client)
    assert sleeps[0] == pytest.approx(3.0)  # 3 x backoff_max_s
    assert 0.0 < sleeps[1] <= 0.01  # unparseable: ordinary backoff


def test_gives_up_after_max_attempts_with_the_last_error(
    api: FakeApi, make_client: Callable[..., CbbtClient], sleeps: list[float]
) -> None:
    client = make_client(retry=RetryPolicy(max_attempts=3, backoff_initial_s=0.001, backoff_max_s=0.001))
    api.fail(*[(503, "overloaded", {})] * 10)
    with pytest.raises(ServiceUnavailable, match="503 overloaded") as info:
        texts(client)
    assert isinstance(info.value, RetryLater) and "after 3 attempt(s)" in str(info.value)
    assert len(api.posts()) == 3
    assert client.counter.calls == 0 and client.counter.items == 0

    api.faults.clear()
    api.fail(*[httpx.ConnectError("refused")] * 10)
    with pytest.raises(ServerUnreachable, match="no cbbt server at http://fake"):
        texts(client)
    assert len(api.posts()) == 6  # mid-run, a refused connection is retried (a restarting server)

    api.faults.clear()
    api.fail(*[httpx.ReadError("reset")] * 10)
    with pytest.raises(ServiceUnavailable, match="ReadError"):
        texts(client)


def test_the_retries_of_one_call_end_within_the_total_time_bound(
    api: FakeApi, make_client: Callable[..., CbbtClient], sleeps: list[float]
) -> None:
    # Each wait is 1 s (Retry-After); with a 2.5 s bound the third wait would end past it.
    client = make_client(retry=RetryPolicy(max_attempts=100, max_total_s=2.5, backoff_max_s=1.0))
    api.fail(*[(429, "rate_limit_exceeded", {"retry-after": "1"})] * 100)
    with pytest.raises(ServiceUnavailable, match="rate_limit_exceeded"):
        texts(client)
    assert 1 <= len(sleeps) <= 3 and sum(sleeps) <= 2.5


def test_a_refused_connection_at_the_first_call_fails_at_once(
    api: FakeApi, make_client: Callable[..., CbbtClient], sleeps: list[float]
) -> None:
    client = make_client(card=False)
    api.fail(httpx.ConnectError("[Errno 111] Connection refused"))
    with pytest.raises(ServerUnreachable, match="no cbbt server at http://fake"):
        client.model_card()
    assert len(api.attempts) == 1 and sleeps == []


# -- never retried --------------------------------------------------------------------------


def test_insufficient_quota_is_never_retried(
    api: FakeApi, make_client: Callable[..., CbbtClient], sleeps: list[float]
) -> None:
    client = make_client()
    api.fail((429, "insufficient_quota", {"x-should-retry": "false", "retry-after": "1"}))
    with pytest.raises(QuotaExhausted) as info:
        texts(client)
    assert info.value.status == 429 and info.value.code == "insufficient_quota"
    assert len(api.posts()) == 1 and sleeps == []
    assert client.counter.calls == 0 and client.counter.items == 0


def test_insufficient_quota_without_the_header_is_not_retried_either(
    api: FakeApi, make_client: Callable[..., CbbtClient], sleeps: list[float]
) -> None:
    client = make_client()
    api.fail((429, "insufficient_quota", {}))
    with pytest.raises(QuotaExhausted):
        texts(client)
    assert len(api.posts()) == 1


@pytest.mark.parametrize(
    "fault",
    [
        (429, "rate_limit_exceeded", {"x-should-retry": "false"}),  # a request that can never pass
        (409, "idempotency_conflict", {"x-should-retry": "false"}),  # key reused with another body
        (503, "overloaded", {"x-should-retry": "false"}),
        (400, "invalid_request", {}),
        (401, "invalid_api_key", {}),
        (403, "permission_denied", {}),
        (404, "not_found", {}),
        (413, "request_too_large", {}),
        (422, "invalid_request", {}),
    ],
    ids=lambda f: f"{f[0]}-{f[1]}",
)
def test_other_errors_raise_api_error_without_retry(
    api: FakeApi, make_client: Callable[..., CbbtClient], sleeps: list[float], fault: Fault
) -> None:
    client = make_client()
    api.fail(fault)
    with pytest.raises(ApiError) as info:
        texts(client)
    assert not isinstance(info.value, QuotaExhausted)
    assert isinstance(fault, tuple)
    assert info.value.status == fault[0] and info.value.code == fault[1]
    assert isinstance(info.value, CredentialsError) == (fault[0] in (401, 403))
    assert len(api.posts()) == 1 and sleeps == []
    assert client.counter.calls == 0 and client.counter.retries == 0


def test_non_json_error_body_still_raises() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, text="<html>bad gateway config</html>")

    with (
        CbbtClient("http://fake", transport=httpx.MockTransport(handler), retry=FAST) as raw,
        pytest.raises(ApiError) as info,
    ):
        texts(raw)
    assert info.value.code is None and "bad gateway" in info.value.message


# -- idempotency keys -----------------------------------------------------------------------


def test_one_key_per_logical_call_reused_across_its_retries(
    api: FakeApi, make_client: Callable[..., CbbtClient], sleeps: list[float]
) -> None:
    client = make_client()
    api.fail(httpx.ReadTimeout("slow"), (503, "overloaded", {}))
    texts(client)
    first = {a.idempotency_key for a in api.posts()}
    assert len(first) == 1
    texts(client)
    keys = [a.idempotency_key for a in api.posts()]
    assert len(keys) == 4
    assert keys[3] not in first  # the next logical call gets a new key
    assert all(k and len(k) <= 255 for k in keys)


def test_a_caller_given_key_is_used_as_is(
    api: FakeApi, make_client: Callable[..., CbbtClient], sleeps: list[float]
) -> None:
    client = make_client()
    api.fail((500, "internal_error", {}))
    texts(client, key="run-1/features-abc")
    assert [a.idempotency_key for a in api.posts()] == ["run-1/features-abc"] * 2
    client.embed_images([b"\x89PNG fake"], idempotency_key="img-key")
    assert api.posts()[-1].idempotency_key == "img-key"


def test_gets_carry_no_idempotency_key_and_are_not_counted(
    api: FakeApi, make_client: Callable[..., CbbtClient], sleeps: list[float]
) -> None:
    client = make_client(card=False)
    api.fail((503, "overloaded", {}))
    card = client.model_card()
    usage = client.usage()
    assert card.id == "fake-model" and card.feature_dim == DIM
    assert usage.remaining_items == 93
    gets = [a for a in api.attempts if a.method == "GET"]
    assert len(gets) == 3  # the card was retried once
    assert all(a.idempotency_key is None for a in gets)
    assert client.counter.calls == 0 and client.counter.items == 0
    client.model_card()  # cached: no second request
    assert len(api.attempts) == 3


@pytest.mark.parametrize("base", ["http://fake", "http://fake/", "http://fake/v1", "http://fake/v1/"])
def test_the_base_url_works_with_or_without_v1(api: FakeApi, base: str) -> None:
    with CbbtClient(base, "sk", transport=httpx.MockTransport(api), retry=FAST) as client:
        assert client.model_card().id == "fake-model"
    assert [a.path for a in api.attempts] == ["/v1/models"]


def advertised(**limits: int) -> dict[str, int]:
    """A card's `limits` (shared.schemas.RequestLimits) with these values."""
    base = {"max_image_bytes": 1_000_000, "max_image_pixels": 10_000_000, "max_text_chars": 100}
    return {**base, "max_class_name_chars": 50, **limits}


def test_requests_are_split_by_the_limits_the_server_advertises(
    api: FakeApi, make_client: Callable[..., CbbtClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(CARD, "limits", advertised(max_items_per_request=4, max_body_bytes=10_000_000))
    client = make_client()  # no max_items_per_request: the card's limits decide
    assert client.max_items_per_request == 4
    client.prompt_embeddings(np.zeros((5, 1, WIDTH), np.float32), ["a", "b"], idempotency_key="k")
    assert [len(p.body["prompts"]) for p in api.posts() if p.body] == [2, 2, 1]  # type: ignore[arg-type]
    client.embed_images([b"\x89PNG x"] * 10, idempotency_key="img")
    image_posts = [p for p in api.posts() if p.path == "/v1/embeddings"]
    assert [len(p.body["input"]) for p in image_posts if p.body] == [4, 4, 2]  # type: ignore[arg-type]
    assert [p.idempotency_key for p in image_posts] == ["img/0", "img/1", "img/2"]


def test_image_requests_stay_under_the_advertised_body_size(
    api: FakeApi, make_client: Callable[..., CbbtClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(CARD, "limits", advertised(max_items_per_request=4096, max_body_bytes=3000))
    client = make_client()
    out = client.embed_images([b"\x89PNG" + bytes(600)] * 9)  # ~830 bytes of data URI each
    assert out.shape == (9, DIM)
    sizes = [len(p.body["input"]) for p in api.posts() if p.body]  # type: ignore[arg-type]
    assert sum(sizes) == 9 and max(sizes) <= 3 and len(sizes) >= 3


def test_the_api_key_is_sent_as_a_bearer_token(api: FakeApi, make_client: Callable[..., CbbtClient]) -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return api(request)

    with CbbtClient("http://fake/", "sk-abc", transport=httpx.MockTransport(handler), retry=FAST) as client:
        client.usage()
    assert seen == ["Bearer sk-abc"]


# -- counting -------------------------------------------------------------------------------


def test_counter_counts_answered_posts_once_in_calls_and_items(
    api: FakeApi, make_client: Callable[..., CbbtClient], sleeps: list[float]
) -> None:
    counter = QueryCounter()
    client = make_client(counter=counter)
    assert client.counter is counter
    texts(client, 5)
    api.fail(httpx.ConnectError("x"), httpx.RemoteProtocolError("cut"))
    client.embed_images([b"\x89PNG a", b"\xff\xd8 b"])
    context = client.token_embeddings("a")
    assert context.shape == (2, WIDTH)
    assert counter.as_dict() == {"calls": 3, "items": 5 + 2 + 1, "loss_evaluations": 0, "retries": 2}


def test_counter_round_trips_through_a_dict() -> None:
    counter = QueryCounter(calls=3, items=40, loss_evaluations=12, retries=1)
    other = QueryCounter()
    other.load({**counter.as_dict(), "unknown": 5})
    assert other == counter


def test_embed_images_sends_data_uris_and_orders_rows_by_index(
    api: FakeApi, make_client: Callable[..., CbbtClient]
) -> None:
    client = make_client()
    out = client.embed_images([b"\x89PNG one", b"\xff\xd8 two", b"RIFF0000WEBP three"])
    assert out.shape == (3, DIM) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, 0], [0, 1, 2])
    body = api.posts()[0].body
    assert body is not None and body["modality"] == "image"
    uris = body["input"]
    assert isinstance(uris, list)
    assert uris[0].startswith("data:image/png;base64,")
    assert uris[1].startswith("data:image/jpeg;base64,")
    assert uris[2].startswith("data:image/webp;base64,")


# -- prompt embeddings ----------------------------------------------------------------------


def test_prompt_embeddings_split_into_requests_within_the_item_limit(
    api: FakeApi, make_client: Callable[..., CbbtClient], sleeps: list[float]
) -> None:
    client = make_client(max_items_per_request=10)
    classes = ["cat", "dog", "bird"]  # 3 classes: 3 whole prompts (9 items) per request
    prompts = np.zeros((7, 2, WIDTH), np.float32)
    prompts[:, 0, 0] = np.arange(7)
    out = client.prompt_embeddings(prompts, classes, idempotency_key="run/step3")
    assert out.shape == (7, 3, DIM)
    np.testing.assert_array_equal(out[:, :, 0], np.arange(7)[:, None] + np.arange(3)[None, :])
    posts = api.posts()
    assert [len(p.body["prompts"]) for p in posts if p.body] == [3, 3, 1]  # type: ignore[arg-type]
    assert all(len(p.body["prompts"]) * len(classes) <= 10 for p in posts if p.body)  # type: ignore[arg-type]
    assert [p.idempotency_key for p in posts] == ["run/step3/0", "run/step3/1", "run/step3/2"]
    assert client.counter.calls == 3 and client.counter.items == 21


def test_prompt_embeddings_retry_one_part_with_its_own_key(
    api: FakeApi, make_client: Callable[..., CbbtClient], sleeps: list[float]
) -> None:
    client = make_client(max_items_per_request=4)  # 2 classes: 2 prompts per request
    prompts = np.zeros((5, 1, WIDTH), np.float32)
    prompts[:, 0, 0] = [5, 6, 7, 8, 9]
    api.fail(None, httpx.RemoteProtocolError("cut"), (503, "overloaded", {}))  # part 1 fails twice
    out = client.prompt_embeddings(prompts, ["x", "y"], idempotency_key="k")
    np.testing.assert_array_equal(out[:, 0, 0], [5, 6, 7, 8, 9])
    assert [a.idempotency_key for a in api.posts()] == ["k/0", "k/1", "k/1", "k/1", "k/2"]
    assert client.counter.calls == 3 and client.counter.items == 10 and client.counter.retries == 2


def test_prompt_embeddings_without_a_key_use_a_fresh_key_per_request(
    api: FakeApi, make_client: Callable[..., CbbtClient]
) -> None:
    client = make_client(max_items_per_request=2)
    client.prompt_embeddings(np.zeros((3, 1, WIDTH), np.float32), ["a", "b"])
    keys = [p.idempotency_key for p in api.posts()]
    assert len(keys) == 3 and len(set(keys)) == 3 and all(keys)


def test_prompt_embeddings_in_one_request_when_the_limit_allows(
    api: FakeApi, make_client: Callable[..., CbbtClient]
) -> None:
    client = make_client()  # the default limit: 4096 items
    classes = [f"c{i}" for i in range(10)]
    client.prompt_embeddings(np.zeros((257, 1, WIDTH), np.float32), classes, idempotency_key="s")
    assert [p.idempotency_key for p in api.posts()] == ["s/0"]
    assert client.counter.calls == 1 and client.counter.items == 2570


def test_prompt_embeddings_split_the_class_list_when_it_alone_exceeds_the_limit(
    api: FakeApi, make_client: Callable[..., CbbtClient]
) -> None:
    client = make_client(max_items_per_request=4)
    classes = [f"c{i}" for i in range(6)]  # 6 classes > 4: columns of 4 + 2 classes, one prompt each
    prompts = np.zeros((2, 1, WIDTH), np.float32)
    prompts[:, 0, 0] = [10, 20]
    out = client.prompt_embeddings(prompts, classes, idempotency_key="wide")
    assert out.shape == (2, 6, DIM)
    # The fake's feature is (prompt value + class index within its request): columns 4-5 restart.
    expected = np.array([[10], [20]]) + np.array([0, 1, 2, 3, 0, 1])[None, :]
    np.testing.assert_array_equal(out[:, :, 0], expected)
    posts = api.posts()
    assert [len(p.body["class_names"]) for p in posts if p.body] == [4, 2, 4, 2]  # type: ignore[arg-type]
    assert [p.idempotency_key for p in posts] == ["wide/0", "wide/1", "wide/2", "wide/3"]
    assert client.counter.items == 12
