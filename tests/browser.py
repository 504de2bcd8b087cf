"""Headless Chromium for the UI tests, brought by the tests themselves.

`python -m pytest` must pass on a fresh machine with nothing else installed, so when no Chromium
is on the PATH the first UI test installs Debian's `chromium` package (as root, with apt-get),
the browser these tests are written against. Elsewhere it fails with the command to run.
"""

import os
import shutil
import subprocess

import pytest

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find() -> str | None:
    return next((path for path in map(shutil.which, NAMES) if path), None)


def ensure() -> str:
    """The path of a Chromium binary, installing Debian's package first if there is none."""
    path = find()
    if path:
        return path
    apt = shutil.which("apt-get")
    if not apt or os.geteuid() != 0:
        pytest.fail("the MLflow UI tests need headless Chromium and none is installed: "
                    "install it (Debian/Ubuntu: `sudo apt-get install chromium`) and run again")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for args in ([apt, "update", "-qq"], [apt, "install", "-y", "-qq", "--no-install-recommends", "chromium"]):
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            pytest.fail(f"could not install Chromium ({' '.join(args[1:])}): {proc.stderr[-1500:]}")
    path = find()
    assert path, "apt-get installed chromium, but no chromium binary is on the PATH"
    return path


class Page:
    """A headless Chromium tab driven over the DevTools protocol, in real time: the page's own
    redirects and requests run as they would for a person, and the test reads where the page
    ended up (`url`), what it shows (`text`) and what it looks like (`screenshot`).

        with Page(tmp_path) as page:
            page.open(url, until=lambda p: "matching runs" in p.text())
    """

    def __init__(self, profile, size=(1600, 1000)):
        self.profile, self.size = profile, size

    def __enter__(self) -> "Page":
        import json
        import time
        import urllib.request

        from procs import free_port
        port = free_port()
        self.proc = subprocess.Popen(
            [ensure(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={self.profile}",
             f"--window-size={self.size[0]},{self.size[1]}", f"--remote-debugging-port={port}",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                    tabs = [t for t in json.load(r) if t.get("type") == "page"]
                if tabs:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("headless Chromium did not open its DevTools port")
            time.sleep(0.3)
        from websockets.sync.client import connect
        self.ws = connect(tabs[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self._id = 0
        return self

    def __exit__(self, *exc) -> None:
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def call(self, method: str, **params):
        import json
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:  # skip the events the browser sends in between
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def url(self) -> str:
        return self.evaluate("location.href")

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def open(self, url: str, until, timeout: float = 90.0) -> None:
        """Load `url` and wait (real time) until `until(page)` holds; fails with what the page
        shows after `timeout` seconds."""
        import time
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while not until(self):
            if time.monotonic() > deadline:
                pytest.fail(f"{url}: condition not met after {timeout}s; the page is at "
                            f"{self.url()} and shows: {self.text()[-1500:]}")
            time.sleep(0.5)

    def screenshot(self, path) -> None:
        import base64
        from pathlib import Path
        data = self.call("Page.captureScreenshot", format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))
