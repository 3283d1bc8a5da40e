"""Schemathesis, with all its checks, against a real server process (the OpenAPI document is
the contract: documented statuses and content types, schema-conformant answers, auth enforced)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO_ROOT, ServerProcess

CONFIG = Path(__file__).parent / "data" / "schemathesis.toml"


def test_schemathesis_all_checks_pass(tmp_path: Path) -> None:
    with ServerProcess(tmp_path / "st.db") as server:
        key = server.create_key("schemathesis")
        done = subprocess.run(
            [
                str(Path(sys.executable).parent / "schemathesis"),
                "--config-file",
                str(CONFIG),
                "run",
                f"{server.url}/openapi.json",
                "--header",
                f"Authorization: Bearer {key}",
                "--checks",
                "all",
                "--max-examples",
                "25",
                "--generation-deterministic",
                "--report-dir",
                str(tmp_path / "report"),
            ],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
    tail = done.stdout[-6000:] + done.stderr[-2000:]
    assert done.returncode == 0, tail
    assert "Tested: 10" in done.stdout, tail  # every operation of the document was exercised
    assert " passed" in done.stdout and "failures" not in done.stdout.split("SUMMARY")[-1], tail
