"""Hostile input: fuzzing every route from the OpenAPI schema, fuzzing the decoders, and the
explicit nasty cases (decompression bombs, huge and endless bodies, deeply nested and huge JSON,
NaN/inf vectors, unicode and overlong class names, path traversal in client data and artifacts).

The claim everywhere: no 5xx, and every refusal is the one error envelope
{"error": {"message", "type", "code", "param"}}.

Schemathesis drives the fuzzing through its Hypothesis strategies (one per operation, positive
and negative data); the requests go to the whole app in this process under Starlette's
TestClient, whose lifespan loads the tiny model once for the module. `CBBT_FUZZ_EXAMPLES`
raises the examples per operation and mode for a deeper run (default 25).
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import select
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from PIL import Image
from pydantic import SecretStr
from schemathesis import GenerationMode
from starlette.testclient import TestClient

from client.artifact import Artifact, load_artifact, save_artifact
from client.data import load_dataset
from server.app import create_app
from server.errors import ApiError
from server.images import ImageLimits, decode_image
from server.settings import ServerSettings
from server.store import SqliteStore
from shared.arrays import ArrayDecodeError, decode_array, encode_array
from tests.helpers import (
    REPO_ROOT,
    TINY_MODEL,
    ServerProcess,
    assert_error,
    bomb_png,
    data_uri,
    image_bytes,
    image_data_uri,
    noise_image,
)

ADMIN_TOKEN = "hostile-tests-admin-token"
FUZZ_KEY_NAME = "fuzz-key-5d1c9e"
EXAMPLES = int(os.environ.get("CBBT_FUZZ_EXAMPLES", "25"))
ENVELOPE_FIELDS = {"message", "type", "code", "param"}
FUZZED: Counter[str] = Counter()  # requests sent per "METHOD /path mode status"


def _settings(db: Path | str, **overrides: Any) -> ServerSettings:
    return ServerSettings(
        model=TINY_MODEL, pretrained="none", db=db, admin_token=SecretStr(ADMIN_TOKEN), **overrides
    )


# The schema comes from the app itself (building an app loads nothing: the model and the
# database are opened by its lifespan).
SCHEMA = schemathesis.openapi.from_dict(create_app(_settings("unused.db")).openapi())
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]
# Negative data needs something with a schema to violate: a body or a query parameter (any
# string is a valid path segment or header).
CASES = [(op, GenerationMode.POSITIVE) for op in OPERATIONS] + [
    (op, GenerationMode.NEGATIVE) for op in OPERATIONS if len(op.body) or len(op.query)
]


class Api:
    def __init__(self, client: TestClient, key: str, db: Path) -> None:
        self.client = client
        self.key = key
        self.db = db

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def post(self, path: str, **kwargs: Any) -> Any:
        headers = {**self.auth, **kwargs.pop("headers", {})}
        return self.client.post(path, headers=headers, **kwargs)

    def spent(self) -> int:
        response = self.client.get("/v1/usage", headers=self.auth)
        assert response.status_code == 200, response.text
        return int(response.json()["spent_items"])


@contextmanager
def _serving(db: Path) -> Iterator[Api]:
    """An app on a fresh database with one key, once its model has loaded."""
    with SqliteStore(db) as store:
        key, _ = store.create_key(FUZZ_KEY_NAME, ["embed", "classify"], None)
    with TestClient(create_app(_settings(db)), raise_server_exceptions=False) as client:
        deadline = time.monotonic() + 120
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.05)
        yield Api(client, key, db)


@pytest.fixture(scope="module")
def admin_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """The admin routes are fuzzed on a store of their own: fuzzed calls may revoke any key (by
    name, or by id: `/admin/keys/1/revoke` is key 1), and the other tests need theirs."""
    with _serving(tmp_path_factory.mktemp("hostile-admin") / "cbbt.db") as api:
        yield api


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with _serving(tmp_path_factory.mktemp("hostile") / "cbbt.db") as api:
        yield api
    if FUZZED:
        total = sum(FUZZED.values())
        lines = "\n".join(f"  {n:6d}  {what}" for what, n in sorted(FUZZED.items()))
        print(f"\nfuzzed requests: {total}\n{lines}")


@pytest.fixture(scope="module")
def token_width(api: Api) -> int:
    return int(api.client.get("/v1/models", headers=api.auth).json()["data"][0]["token_width"])


def assert_envelope(response: Any) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:1000])
    if response.status_code >= 300:
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == ENVELOPE_FIELDS, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"], body


# -- 1. schemathesis: every route, positive and negative data ---------------------------------
@pytest.mark.parametrize(("operation", "mode"), CASES, ids=[f"{op.label} {mode.value}" for op, mode in CASES])
def test_fuzz_every_route(api: Api, admin_api: Api, operation: Any, mode: GenerationMode) -> None:
    target, token = (admin_api, ADMIN_TOKEN) if operation.path.startswith("/admin") else (api, api.key)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode), any_model=st.booleans())
    def check(case: Any, any_model: bool) -> None:
        kwargs = case.as_transport_kwargs(base_url="http://testserver")
        # Our credentials replace any generated Authorization header (else most calls stop at 401).
        headers = {k: v for k, v in kwargs.get("headers", {}).items() if k.lower() != "authorization"}
        headers["Authorization"] = f"Bearer {token}"
        body: dict[str, Any] = {}
        if "json" in kwargs:
            body["json"] = kwargs["json"]
            if not any_model and isinstance(body["json"], dict):
                # Half the time no `model`: a random one stops the request at 404 before the model runs.
                body["json"].pop("model", None)
        elif "data" in kwargs:
            data = kwargs["data"]
            body["content"] = data if isinstance(data, bytes | str) else json.dumps(data)
        if kwargs.get("cookies"):
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in kwargs["cookies"].items())
        response = target.client.request(
            kwargs["method"], kwargs["url"], params=kwargs.get("params"), headers=headers, **body
        )
        FUZZED[f"{operation.label} {mode.value} {response.status_code}"] += 1
        assert_envelope(response)

    try:
        check()
    except Unsatisfiable:
        pytest.skip(f"{operation.label} has no input that {mode.value} generation can vary")


def test_schema_covers_every_route() -> None:
    """The fuzzing above reaches every route the app serves (admin ones included)."""
    labels = {op.label for op in OPERATIONS}
    assert {"POST /v1/embeddings", "POST /v1/prompt-embeddings", "POST /v1/token-embeddings"} <= labels
    assert {
        "POST /v1/classify",
        "GET /v1/usage",
        "POST /admin/keys",
        "POST /admin/keys/{name}/top-up",
    } <= labels


# -- 2. hypothesis: the decoders -----------------------------------------------------------------
LIMITS = ImageLimits(max_bytes=1 << 20, max_pixels=1 << 20)


def _seed_images() -> list[bytes]:
    seeds = []
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"):
        seeds.append(image_bytes(noise_image(12, 9, seed=3), fmt))
    seeds.append(image_bytes(noise_image(8, 8, mode="L"), "PNG"))
    seeds.append(image_bytes(noise_image(8, 8, mode="P"), "GIF"))
    seeds.append(bomb_png(3000, 3000))
    return seeds


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """Real image files, then truncated and with random bytes overwritten: reaches the decoders'
    error paths far more often than random bytes (which rarely get past the format sniffing)."""
    raw = bytearray(draw(st.sampled_from(_seed_images())))
    for _ in range(draw(st.integers(0, 8))):
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(raw)))
    return bytes(raw[: cut or len(raw)])


def _decode_image_or_4xx(payload: str) -> None:
    try:
        image = decode_image(payload, LIMITS)
    except ApiError as exc:
        assert 400 <= exc.status < 500, exc.status
        return
    assert image.mode == "RGB" and image.width * image.height <= LIMITS.max_pixels


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.one_of(st.binary(max_size=2048), mutated_images()), as_uri=st.booleans())
def test_decode_image_any_bytes(raw: bytes, as_uri: bool) -> None:
    encoded = base64.b64encode(raw).decode()
    _decode_image_or_4xx(data_uri(raw, "image/png") if as_uri else encoded)


@settings(max_examples=200, deadline=None)
@given(payload=st.text(max_size=512))
def test_decode_image_any_string(payload: str) -> None:
    _decode_image_or_4xx(payload)
    _decode_image_or_4xx("data:" + payload)


@settings(max_examples=300, deadline=None)
@given(
    payload=st.one_of(
        st.text(max_size=256), st.binary(max_size=256).map(lambda b: base64.b64encode(b).decode())
    ),
    width=st.one_of(st.none(), st.integers(-2, 8)),
    shape=st.one_of(st.none(), st.lists(st.integers(0, 5), max_size=3)),
)
def test_decode_array_any_input(payload: str, width: int | None, shape: list[int] | None) -> None:
    try:
        array = decode_array(payload, shape, width=width)
    except ArrayDecodeError:
        return
    assert array.dtype == np.float32 and np.isfinite(array).all()
    if shape is not None:
        assert list(array.shape) == shape
    elif width is not None:
        assert array.ndim == 2 and array.shape[1] == width


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.floats(width=32), min_size=1, max_size=64))
def test_decode_array_round_trips_or_refuses_non_finite(values: list[float]) -> None:
    encoded = encode_array(values)
    if all(math.isfinite(v) for v in values):
        np.testing.assert_array_equal(decode_array(encoded), np.asarray(values, dtype=np.float32))
    else:
        with pytest.raises(ArrayDecodeError, match="NaN or infinite"):
            decode_array(encoded)


# -- 3. explicit cases: images -----------------------------------------------------------------
def test_decompression_bomb_is_413_and_not_charged(api: Api) -> None:
    before = api.spent()
    bomb = data_uri(bomb_png(20000, 20000))
    assert_error(
        api.post("/v1/embeddings", json={"input": [bomb], "modality": "image"}), 413, "image_too_large"
    )
    classify = {"images": [bomb], "texts": ["a cat", "a dog"]}
    assert_error(api.post("/v1/classify", json=classify), 413, "image_too_large")
    assert api.spent() == before


def test_small_images_that_decode_huge_do_not_exhaust_memory() -> None:
    """24 WebP images of 16 megapixels each (702 bytes apiece, within every limit) used to be
    decoded all at once before preprocessing: ~1.6 GB for a 22 kB request (4096 of them would
    need 270 GB). Decoded one at a time, the peak stays near one image."""
    script = """
import base64, io, resource, sys
import torch
from PIL import Image
from server.images import ImageLimits
from server.routes.embeddings import decode_and_preprocess
class Backend:
    def preprocess(self, image):
        return torch.zeros(3, 32, 32)
buffer = io.BytesIO()
Image.new("RGB", (4096, 4096)).save(buffer, "WEBP", lossless=True)
uri = "data:image/webp;base64," + base64.b64encode(buffer.getvalue()).decode()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
decode_and_preprocess([uri] * 24, Backend(), ImageLimits(8 << 20, 4096 * 4096), "input")
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    grew_mib = int(done.stdout.strip().splitlines()[-1])
    assert grew_mib < 600, f"decoding 24 small images grew the peak memory by {grew_mib} MiB"


# -- 4. explicit cases: huge and endless bodies ----------------------------------------------------
def _asgi_post(app: Any, chunks: Iterator[bytes], headers: list[tuple[bytes, bytes]]) -> tuple[int, int]:
    """Drive the ASGI app by hand with a streamed body; returns (status, chunks the app read)."""
    read = 0
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal read
        chunk = next(chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        read += 1
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "path": "/v1/embeddings",
        "raw_path": b"/v1/embeddings",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), *headers],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "scheme": "http",
        "root_path": "",
    }
    asyncio.run(app(scope, receive, send))
    return status, read


def _endless(chunk_bytes: int) -> Iterator[bytes]:
    yield b'{"input": ["'
    while True:
        yield b"a" * chunk_bytes


@pytest.mark.parametrize("declared", [False, True], ids=["chunked", "content-length-lies"])
def test_endless_body_is_refused_without_being_read_whole(declared: bool) -> None:
    limit, chunk = 64 * 1024, 4096
    app = create_app(_settings("unused.db", max_body_bytes=limit, auth=False))
    headers = [(b"content-length", str(limit).encode())] if declared else []
    status, read = _asgi_post(app, _endless(chunk), headers)
    # A body longer than its Content-Length cannot reach the app over HTTP/1.1 (uvicorn stops at
    # the declared length); handed over anyway, the guard's read is cut at the limit: 413 too.
    assert status == 413
    assert read <= limit // chunk + 2, f"read {read} chunks of {chunk} bytes for a {limit}-byte limit"


def test_huge_body_over_loopback_gets_413_before_it_is_sent(tmp_path: Path) -> None:
    """A real server, a raw socket: the 413 arrives while the client is still sending."""
    limit = 256 * 1024
    server = ServerProcess(tmp_path / "cbbt.db", extra_args=["--max-body-bytes", str(limit)])
    # Authenticated: without a key the answer (401) comes before a byte of the body is read.
    auth = f"Authorization: Bearer {server.create_key('big-body')}\r\n"
    with server:
        request_head = (
            f"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n{auth}"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        ).encode()
        chunk = b"a" * 16384
        framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
        # 64 MiB, far more than the loopback socket buffers hold: a server that read the body
        # whole would let the client send all of it before answering.
        planned = 4096 * len(chunk)
        sent = 0
        answer = b""
        with socket.create_connection(("127.0.0.1", server.port or 0), timeout=60) as sock:
            sock.sendall(request_head)
            try:
                while sent < planned and not select.select([sock], [], [], 0)[0]:
                    sock.sendall(framed)
                    sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server answered and closed
            try:
                while b"\r\n\r\n" not in answer:
                    part = sock.recv(65536)
                    if not part:
                        break
                    answer += part
            except ConnectionResetError:
                pass
        # Declared too large up front: refused before a single byte of the body is sent.
        declared = (
            f"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n{auth}"
            f"Content-Type: application/json\r\nContent-Length: {100 * limit}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", server.port or 0), timeout=60) as sock:
            sock.sendall(declared)
            early = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < planned, "the server let the client send the whole body before answering"
    assert early.startswith(b"HTTP/1.1 413"), early[:200]


# -- 5. explicit cases: JSON shapes ---------------------------------------------------------------
def test_deeply_nested_json_is_4xx(api: Api) -> None:
    for depth in (10_000, 900):
        body = '{"prompts": %s, "class_names": ["cat"]}' % ("[" * depth + "]" * depth)
        response = api.post(
            "/v1/prompt-embeddings", content=body.encode(), headers={"Content-Type": "application/json"}
        )
        assert response.status_code in (400, 422), response.text[:300]
        assert_envelope(response)


def test_huge_json_arrays_are_4xx_and_not_charged(api: Api, token_width: int) -> None:
    before = api.spent()
    vector = [0.0] * token_width
    cases = [
        ("/v1/embeddings", {"input": ["a"] * 200_000}),
        ("/v1/prompt-embeddings", {"prompts": [[vector]] * 5000, "class_names": ["cat"]}),
        ("/v1/prompt-embeddings", {"prompts": [[vector] * 100_000], "class_names": ["cat"]}),
        ("/v1/prompt-embeddings", {"prompts": [[vector]], "class_names": ["cat"] * 100_000}),
        ("/v1/classify", {"images": ["x"] * 100_000, "texts": ["a cat"]}),
    ]
    for path, body in cases:
        response = api.post(path, json=body)
        assert 400 <= response.status_code < 500, (path, response.text[:300])
        assert_envelope(response)
    assert api.spent() == before


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e39", "-1e400"])
def test_non_finite_vectors_are_422(api: Api, token_width: int, literal: str) -> None:
    """JSON has no NaN, but Python's parser takes these literals; 1e39 overflows float32."""
    before = api.spent()
    row = "[" + ", ".join(["0.0"] * (token_width - 1) + [literal]) + "]"
    image = json.dumps(_tiny_png_b64())
    for path, body in (
        ("/v1/prompt-embeddings", f'{{"prompts": [[{row}]], "class_names": ["cat"]}}'),
        ("/v1/classify", f'{{"images": [{image}], "context": [{row}], "class_names": ["cat", "dog"]}}'),
    ):
        response = api.post(path, content=body.encode(), headers={"Content-Type": "application/json"})
        assert_error(response, 422, "non_finite_values")
    nan = np.zeros((1, token_width), np.float32)
    nan[0, 3] = np.nan
    response = api.post(
        "/v1/prompt-embeddings", json={"prompts": [encode_array(nan)], "class_names": ["cat"]}
    )
    assert_error(response, 422, "non_finite_values")
    assert api.spent() == before


def test_finite_but_huge_vectors_are_422_and_refunded(api: Api, token_width: int) -> None:
    """Large enough to overflow the text encoder: 422, never NaN features (or JSON nulls) for money."""
    before = api.spent()
    huge = [[3e38] * token_width]
    for encoding in ("float", "base64"):
        body = {"prompts": [huge], "class_names": ["cat"], "encoding_format": encoding}
        assert_error(api.post("/v1/prompt-embeddings", json=body), 422, "non_finite_values")
    classify = {"images": [image_data_uri(noise_image())], "context": huge, "class_names": ["cat", "dog"]}
    assert_error(api.post("/v1/classify", json=classify), 422, "non_finite_values")
    assert api.spent() == before


def _tiny_png_b64() -> str:
    return base64.b64encode(image_bytes(noise_image(8, 8))).decode()


# -- 6. explicit cases: names and headers ------------------------------------------------------------
def test_unicode_class_names_are_accepted(api: Api, token_width: int) -> None:
    names = ["猫 🐱", "chien", "Ελληνικά", "עברית", "e\u0301 combining", "zero\u200bwidth"]
    body = {"prompts": [[[0.01] * token_width]], "class_names": names, "encoding_format": "float"}
    response = api.post("/v1/prompt-embeddings", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["shape"][:2] == [1, len(names)]
    classify = {"images": [image_data_uri(noise_image())], "texts": ["猫 🐱", "a dog"]}
    assert api.post("/v1/classify", json=classify).status_code == 200


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("x" * 201, 400),  # over max_class_name_chars
        ("🐱 " * 99, 422),  # within the characters (and the word bound), over the text tower's tokens
        ("cat\x00", 400),
        ("   ", 400),
        ("", 400),
        ("\ud800 lone surrogate", None),  # any 2xx/4xx, never a 5xx
        ("\u202e right-to-left override", None),
    ],
    ids=["overlong", "too-many-tokens", "nul", "blank", "empty", "surrogate", "bidi"],
)
def test_hostile_class_names_are_refused_cleanly(
    api: Api, token_width: int, name: str, status: int | None
) -> None:
    context = [[0.01] * token_width]
    # json.dumps escapes to ASCII, so a lone surrogate travels as the JSON escape \\ud800.
    for path, body in (
        ("/v1/prompt-embeddings", {"prompts": [context], "class_names": [name]}),
        ("/v1/classify", {"images": [_tiny_png_b64()], "context": context, "class_names": [name, "dog"]}),
    ):
        payload = json.dumps(body).encode()
        response = api.post(path, content=payload, headers={"Content-Type": "application/json"})
        assert_envelope(response)
        if status is not None:
            assert response.status_code == status, (path, response.text[:300])


def test_client_chosen_request_ids_cannot_collide(api: Api) -> None:
    """X-Request-Id used to become the ledger's primary key: reusing one (anyone's) was a 500."""
    for _ in range(2):
        response = api.post("/v1/embeddings", json={"input": ["a"]}, headers={"X-Request-Id": "chosen"})
        assert response.status_code == 200, response.text
        assert response.headers["x-request-id"] != "chosen"


def test_hostile_headers_are_4xx(api: Api) -> None:
    cases = [
        {"Idempotency-Key": "k" * 256},
        {"Authorization": "Bearer " + "x" * 10_000},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": b"Bearer cbbt-\xc3\xa9\xff"},
    ]
    for headers in cases:
        merged = {**api.auth, **headers}
        response = api.client.post("/v1/embeddings", json={"input": ["a"]}, headers=merged)
        assert 400 <= response.status_code < 500, (headers, response.text[:300])
        assert_envelope(response)


def test_admin_routes_refuse_absurd_numbers(api: Api) -> None:
    """Integers past SQLite's 64 bits used to be a 500 (OverflowError) on create and top-up."""
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    name = f"big{uuid.uuid4().hex[:8]}"
    response = api.client.post("/admin/keys", json={"name": name, "budget_items": 10**40}, headers=admin)
    assert_error(response, 400)  # a validation error: 400, as OpenAI answers
    created = api.client.post("/admin/keys", json={"name": name, "budget_items": 10**15}, headers=admin)
    assert created.status_code == 201, created.text
    topped = api.client.post(f"/admin/keys/{name}/top-up", json={"items": 10**15}, headers=admin)
    assert_error(topped, 400)
    assert api.client.get(f"/admin/keys/{name}", headers=admin).json()["budget_items"] == 10**15


# -- 7. path traversal: client data and artifacts ---------------------------------------------------
def _save(path: Path, value: int = 7) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 6), (value, 255 - value, 3)).save(path, format="PNG")


def _coop(tmp_path: Path, extra: list[list[Any]]) -> str:
    root = tmp_path / "images"
    entries: dict[str, list[list[Any]]] = {"train": [], "val": [], "test": []}
    for split in entries:
        for label, name in enumerate(["cat", "dog"]):
            rel = f"{name}/{split}.png"
            _save(root / rel, label * 40)
            entries[split].append([rel, label, name])
    entries["train"].extend(extra)
    split_json = tmp_path / "split.json"
    split_json.write_text(json.dumps(entries))
    return f"coop:{split_json}:{root}"


@pytest.mark.parametrize(
    "entry",
    [
        "cat/../../outside.png",
        "./../outside.png",
        "cat/./../../../outside.png",
        "\\\\server\\share\\x.png",
        "C:\\x.png",
    ],
)
def test_coop_entries_outside_the_image_root_are_refused(tmp_path: Path, entry: str) -> None:
    _save(tmp_path / "outside.png")
    spec = _coop(tmp_path, [[entry, 0, "cat"]])
    with pytest.raises(ValueError, match=r"train\[2\]"):
        load_dataset(spec)


def test_coop_entry_symlinked_outside_is_refused(tmp_path: Path) -> None:
    _save(tmp_path / "secret.png")
    spec = _coop(tmp_path, [["cat/innocent.png", 0, "cat"]])
    (tmp_path / "images" / "cat" / "innocent.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(ValueError, match="outside the data root"):
        load_dataset(spec)


def test_imagefolder_file_symlinked_outside_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for name in ("cat", "dog"):
        for i in range(3):
            _save(root / name / f"{i}.png", i)
    _save(tmp_path / "secret.png")
    (root / "cat" / "3.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(ValueError, match="outside the data root"):
        load_dataset(f"imagefolder:{root}")


def test_imagefolder_split_class_symlinked_outside_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            _save(root / split / name / "0.png")
    for i in range(2):
        _save(tmp_path / "elsewhere" / "cat" / f"{i}.png")
    shutil.rmtree(root / "test" / "cat")
    (root / "test" / "cat").symlink_to(tmp_path / "elsewhere" / "cat", target_is_directory=True)
    with pytest.raises(ValueError, match="outside the data root"):
        load_dataset(f"imagefolder:{root}")


def _artifact(class_names: list[str]) -> Artifact:
    import torch

    return Artifact(
        context=torch.zeros(1, 4),
        class_names=class_names,
        class_text_features=torch.zeros(len(class_names), 8),
        adapter_kind="none",
        adapter_state=None,
        model_card={"logit_scale": 100.0, "id": "../../../etc/passwd"},
        config={"out": "../../escape"},
    )


def test_artifact_strings_never_become_paths(tmp_path: Path) -> None:
    """Class names and card fields are data: saving writes exactly two files, inside the folder."""
    names = ["../../escape", "/etc/passwd", "a/b\\c", "..", "\x00nul"]
    target = tmp_path / "work" / "artifact"
    save_artifact(_artifact(names), target)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "work/artifact/config.json",
        "work/artifact/tensors.safetensors",
    ]
    loaded = load_artifact(target)
    assert loaded.class_names == names and loaded.model_card["id"] == "../../../etc/passwd"


def test_artifact_with_foreign_tensor_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "artifact"
    save_artifact(_artifact(["cat", "dog"]), target)
    (target / "tensors.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a pickle's opening
    with pytest.raises(Exception) as caught:
        load_artifact(target)
    assert not isinstance(caught.value, (SystemExit, KeyboardInterrupt))
    (target / "config.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match="unsupported artifact format"):
        load_artifact(target)
