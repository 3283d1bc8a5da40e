"""`keys ...` commands on a real database file: stdout carries only the result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from server.cli_keys import main
from server.store import SqliteStore

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_create_prints_the_key_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "k.db")
    code, out, err = _run(
        capsys, "keys", "create", "--db", db, "--name", "alice", "--budget-items", "100", "--rpm", "60"
    )
    assert code == 0
    plaintext = out.strip()
    assert out == plaintext + "\n" and plaintext.startswith("cbbt-") and " " not in plaintext
    assert "alice" in err and plaintext not in err
    with SqliteStore(db) as store:
        key = store.authenticate(plaintext)
    assert key is not None and key.budget_items == 100 and key.rpm == 60
    assert key.scopes == frozenset({"embed", "classify"})


def test_create_as_a_subprocess(tmp_path: Path) -> None:
    db = tmp_path / "k.db"
    cmd = [sys.executable, "-m", "server.cli_keys", "keys", "create", "--db", str(db), "--name", "bob"]
    result = subprocess.run(
        [*cmd, "--budget-items", "5", "--scopes", "embed"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    plaintext = result.stdout.strip()
    assert result.stdout == plaintext + "\n"
    with SqliteStore(db) as store:
        key = store.authenticate(plaintext)
    assert key is not None and key.scopes == frozenset({"embed"})


def test_db_defaults_to_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "env.db"
    monkeypatch.setenv("CBBT_DB", str(db))
    code, out, _ = _run(capsys, "keys", "create", "--name", "alice", "--budget-items", "1")
    assert code == 0
    with SqliteStore(db) as store:
        assert store.authenticate(out.strip()) is not None


def test_list_show_top_up_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "k.db")
    _, out, _ = _run(capsys, "keys", "create", "--db", db, "--name", "alice", "--budget-items", "10")
    plaintext = out.strip()
    _run(capsys, "keys", "create", "--db", db, "--name", "bob", "--budget-items", "3", "--ipm", "50")
    with SqliteStore(db) as store:
        key = store.get_key("alice")
        store.reserve(key.id, 4, "r1", "/v1/embeddings")
        store.settle("r1", 200)

    code, out, _ = _run(capsys, "keys", "list", "--db", db)
    listed = json.loads(out)
    assert code == 0 and [k["name"] for k in listed] == ["alice", "bob"]
    assert listed[1]["ipm"] == 50

    code, out, _ = _run(capsys, "keys", "show", "--db", db, "alice")
    shown = json.loads(out)
    assert code == 0 and (shown["spent_items"], shown["remaining_items"]) == (4, 6)
    assert [row["request_id"] for row in shown["recent"]] == ["r1"]

    code, out, _ = _run(capsys, "keys", "top-up", "--db", db, "alice", "--items", "5", "--requests", "2")
    assert code == 0 and json.loads(out)["budget_items"] == 15

    code, out, _ = _run(capsys, "keys", "revoke", "--db", db, "alice")
    assert code == 0 and json.loads(out)["revoked"] is True

    # Neither hashes nor plaintext keys are ever printed.
    for command in (["list"], ["show", "alice"]):
        _, out, _ = _run(capsys, "keys", *command, "--db", db)
        assert "hash" not in out and plaintext not in out


def test_errors_go_to_stderr_with_an_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "k.db")
    code, out, err = _run(capsys, "keys", "show", "--db", db, "nobody")
    assert code == 1 and out == "" and "nobody" in err

    _run(capsys, "keys", "create", "--db", db, "--name", "alice", "--budget-items", "1")
    code, out, err = _run(capsys, "keys", "create", "--db", db, "--name", "alice", "--budget-items", "1")
    assert code == 1 and out == "" and "already exists" in err

    code, out, err = _run(capsys, "keys", "create", "--db", db, "--name", "9bad", "--budget-items", "1")
    assert code == 2 and out == "" and "invalid key name" in err

    with pytest.raises(SystemExit):
        main(["keys", "create", "--db", db, "--name", "x", "--budget-items", "-3"])
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    ("argv", "env", "field"),
    [
        (["--image-batch-max-items", "0"], {}, "image_batch_max_items"),
        ([], {"CBBT_FAILURE_RATE": "2"}, "failure_rate"),
        (["--batch-max-items", "0"], {}, "batch_max_items"),
        # A lease renewed less often than it expires: other replicas would refund live requests.
        ([], {"CBBT_LEASE_TTL_S": "2", "CBBT_LEASE_RENEW_S": "5"}, "lease_renew_s (5) must be below"),
    ],
)
def test_serve_refuses_out_of_range_settings_in_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    env: dict[str, str],
    field: str,
) -> None:
    from server.cli import main as server_main

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exited:
        server_main(["serve", "--db", str(tmp_path / "cbbt.db"), *argv])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {field}" in err and "Traceback" not in err
    assert not (tmp_path / "cbbt.db").exists()  # refused before anything was opened
