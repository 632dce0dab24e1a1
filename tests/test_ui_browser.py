"""The Prefect UI in a real browser: the classification artifact shows its confusion-matrix figure.

A Prefect server from ``deploy/cluster.py`` (127.0.0.1, free port), a flow run that
publishes a classification report with `flows.classify.publish_results`, then headless
Chromium driven through its DevTools protocol: the artifact's page, in both UIs the
server ships (the default one at ``/v2`` and the first one at ``/``), must hold an
``<img>`` whose source is the figure and whose pixels loaded (natural size = the PNG's).
Screenshots of both pages are kept beside the test's files (``SAE_UI_SCREENSHOTS=<folder>``
keeps them there instead).  Skipped where no Chromium is installed
(``apt-get install chromium``).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
BROWSER = next((path for name in ("chromium", "chromium-browser", "google-chrome")
                if (path := shutil.which(name))), None)

pytestmark = [
    pytest.mark.integration, pytest.mark.slow,
    pytest.mark.skipif(BROWSER is None, reason="no Chromium installed (apt-get install chromium)"),
]

# Offline and quiet: nothing but 127.0.0.1 is contacted.
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "--window-size=1400,1000"]

IMAGES = """Array.from(document.images).filter(i => i.src.startsWith("data:image/png;base64,")).map(
    i => ({natural: [i.naturalWidth, i.naturalHeight], shown: [i.width, i.height], complete: i.complete,
           length: i.src.length}))"""


def summaries() -> dict:
    """Two feature sets' cross-validation summaries over three genres (what `sae.classify.cross_validate` returns)."""
    base = {"protocol": "grouped", "classes": [0, 1, 2], "class_names": ["blues", "classical", "metal"],
            "chance": 1 / 3, "n_scores": 10}
    return {
        "baseline": {**base, "accuracy_mean": 0.6, "accuracy_std": 0.05, "per_class_accuracy": [0.5, 0.8, 0.5],
                     "confusion": [[10, 4, 6], [2, 16, 2], [6, 4, 10]]},
        "sae": {**base, "accuracy_mean": 0.75, "accuracy_std": 0.04, "per_class_accuracy": [0.7, 0.9, 0.65],
                "confusion": [[14, 2, 4], [1, 18, 1], [4, 3, 13]]},
    }


def png_size(path: Path) -> list[int]:
    width, height = struct.unpack(">II", path.read_bytes()[16:24])  # the IHDR chunk
    return [width, height]


class DevTools:
    """A page of a headless Chromium, driven through the DevTools protocol over its websocket."""

    def __init__(self, profile: Path):
        self.process = subprocess.Popen([BROWSER, *BROWSER_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        port = None
        while port is None and time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if match := re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line):
                port = int(match.group(1))
            elif not line and self.process.poll() is not None:
                break
        assert port is not None, "Chromium did not start its DevTools server"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            page = next(target for target in json.loads(response.read()) if target["type"] == "page")
        from websockets.sync.client import connect

        self.socket = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=20)
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message["result"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def open(self, url: str | None, ready: str, timeout: float = 60) -> None:
        """Navigate to ``url`` (None: stay) and wait until the expression ``ready`` is true."""
        if url is not None:
            self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while not self.evaluate(ready):
            assert time.monotonic() < deadline, f"{url}: not ready after {timeout:.0f} s"
            time.sleep(0.25)

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def test_the_classification_artifact_page_shows_the_confusion_matrices(tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.classify import publish_results

    state = tmp_path / "state"
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    started = subprocess.run([sys.executable, "deploy/cluster.py", "start", "--state", str(state), "--ports", "auto",
                              "--workers", "0", "--owner-pid", str(os.getpid())], cwd=REPOSITORY, env=env,
                             capture_output=True, text=True,
                             timeout=180, check=False)
    assert started.returncode == 0, started.stdout + started.stderr
    info = json.loads(started.stdout[: started.stdout.rindex("}") + 1])
    api, ui = info["prefect_api_url"], info["prefect_ui_url"]
    browser = None
    try:
        @flow(name="classify-report")
        def report(store: str) -> str:
            _, png = publish_results(store, "0123456789ab", summaries(), "Genre classification (grouped protocol)")
            return str(png)

        with temporary_settings(updates={PREFECT_API_URL: api}):
            png = Path(report(str(tmp_path / "tiny.zarr")))
            with get_client(sync_client=True) as client:
                (artifact,) = [a for a in client.read_artifacts() if a.key == "classify-0123456789ab"]
        size = png_size(png)

        shots = Path(os.environ.get("SAE_UI_SCREENSHOTS") or tmp_path)
        shots.mkdir(parents=True, exist_ok=True)
        profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=tmp_path))
        browser = DevTools(profile)
        loaded = f"({IMAGES}).some(i => i.complete && i.natural[0] > 0)"
        for version, base in (("v2", f"{ui}/v2"), ("v1", ui)):
            browser.open(f"{base}/artifacts/artifact/{artifact.id}", ready=loaded)
            time.sleep(1.0)  # the page fills in its side panels, re-rendering the artifact: let it settle
            browser.open(None, ready=loaded)
            browser.evaluate('document.querySelector(\'img[src^="data:image/png"]\').scrollIntoView({block: "end"})')
            browser.screenshot(shots / f"classify-artifact-{version}.png")
            images = browser.evaluate(IMAGES)  # as on the screenshot
            # the figure itself, decoded and laid out: its natural size is the PNG's, it is drawn on the page
            assert [image["natural"] for image in images] == [size], (version, images)
            assert images[0]["shown"][0] > 200 and images[0]["shown"][1] > 50, (version, images)
            text = browser.evaluate("document.body.innerText")
            assert "75.0 ± 4.0" in text and "classify-0123456789ab" in text, (version, text[:2000])
        print(f"screenshots: {shots}")
    finally:
        if browser is not None:
            browser.close()
        subprocess.run([sys.executable, "deploy/cluster.py", "stop", "--state", str(state)], cwd=REPOSITORY,
                       env=env, capture_output=True, timeout=120, check=False)
