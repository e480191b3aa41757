"""Headless Chromium (Debian's ``chromium``) for loading a page offline: its DOM after load, its console,
the network requests the page made, and a screenshot."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium")
# No name resolves, and the browser's own background traffic (updates, sync) is switched off where it can be.
OFFLINE = ["--host-resolver-rules=MAP * ~NOTFOUND", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--no-first-run", "--disable-default-apps", "--disable-extensions"]


def need_chromium() -> str:
    if CHROMIUM is None:
        reason = ("chromium is not installed (Debian: apt-get install chromium; scripts/dev.py setup installs it "
                  "where apt exists): the report is not rendered in a browser")
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    return CHROMIUM


@dataclass
class Loaded:
    dom: str
    console: list[str]
    """The page's console lines (messages and uncaught errors)."""
    requests: list[str]
    """URLs the page itself asked the network for (the browser's own background requests are left out)."""


def _chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [need_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--user-data-dir={profile}", *OFFLINE, *args, page.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"chromium failed ({done.returncode}): {done.stderr[-2000:]}"
    return done


def load(page: Path, work: Path) -> Loaded:
    """Loads ``page`` offline and returns its DOM once loaded, its console and the page's network requests."""
    netlog = work / "netlog.json"
    done = _chromium(page, work / "profile", "--enable-logging=stderr", "--v=0", f"--log-net-log={netlog}",
                     "--virtual-time-budget=2000", "--dump-dom")
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return Loaded(done.stdout, console, page_requests(netlog))


def page_requests(netlog: Path) -> list[str]:
    doc = json.loads(netlog.read_text())
    start = doc["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = []
    for event in doc["events"]:
        params = event.get("params") or {}
        # The browser's own requests (updates, accounts) have no origin; the page's have the page's.
        if event["type"] == start and "url" in params and params.get("initiator") != "not an origin" \
                and not str(params.get("url", "")).startswith(("file:", "data:")):
            urls.append(params["url"])
    return urls


def screenshot(page: Path, work: Path, out: Path, size: str = "980,2600") -> Path:
    _chromium(page, work / "profile-shot", f"--window-size={size}", f"--screenshot={out}")
    assert out.stat().st_size > 0
    return out
