"""Screenshot /docs of a real server in headless Chromium (Debian's `chromium` package).

    .venv/bin/python scripts/docs_screenshot.py docs/img/docs-offline.png

Starts a tiny-model server on loopback, waits until Swagger UI has rendered the operations
(Chromium's --virtual-time-budget lets the page's scripts run first), saves the PNG and checks
that the rendered DOM lists the API's operations and the "Authorize" button: the page is built
from the fastapi-offline package's files, with no CDN (this machine has no internet access).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.server_process import ServerProcess


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        raise SystemExit("chromium not found: apt-get install -y chromium")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--virtual-time-budget=15000",
    ]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=180)


def main(out: str) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(Path(tmp) / "docs.db", model="cbbt-tiny", pretrained="none")
        with server:
            url = f"{server.url}/docs"
            dom = chromium("--dump-dom", url).stdout
            shot = chromium(f"--screenshot={out}", "--window-size=1280,1600", url)
    missing = [text for text in ("/v1/embeddings", "/v1/classify", "Authorize") if text not in dom]
    if missing or not Path(out).exists():
        print(f"not rendered: missing {missing}; chromium said: {shot.stderr[-1500:]}", file=sys.stderr)
        return 1
    print(f"rendered /docs: {out} ({Path(out).stat().st_size} bytes); operations and Authorize present")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "docs/img/docs-offline.png"))
