"""The report in a real browser: headless Chromium opens index.html (no network), every image must decode and
the console must stay free of errors; a full-page screenshot is taken. Chromium is driven over the DevTools
protocol on a pipe (--remote-debugging-pipe: JSON messages ended by NUL on fds 3/4), so nothing but the
standard library is needed. Skips with a reason where Debian's `chromium` is not installed
(`apt-get install chromium chromium-driver`; .ci/run does it).

Set MOEBENCH_SCREENSHOT_DIR to keep the screenshots (the committed reports/h200/screenshot.png is the first screen
of reports/h200/index.html taken this way).
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from moebench import report, results

HERE = Path(__file__).resolve().parent
CHROMIUM = next((p for p in (os.environ.get("MOEBENCH_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium")
                 if p and Path(p).exists()), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--disable-extensions", "--mute-audio", "--remote-debugging-pipe"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian: apt-get install chromium "
                                                         "chromium-driver; .ci/run installs it)")


class Chromium:
    """A headless Chromium and a minimal DevTools-protocol client over its debugging pipe."""

    def __init__(self, profile: Path):
        to_r, self._w = os.pipe()   # we write commands -> chromium reads fd 3
        self._r, from_w = os.pipe()  # chromium writes fd 4 -> we read

        def fds():  # in the child: the pipe ends become fds 3 and 4 (via high copies, in case they were 3/4)
            a, b = fcntl.fcntl(to_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.log_path = profile.parent / "chromium.log"  # a file, not a pipe: chatter can never block chromium
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     preexec_fn=fds, pass_fds=(3, 4),  # noqa: PLW1509 - we start no threads
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log)
        os.close(to_r)
        os.close(from_w)
        self._buf, self._id, self.events = b"", 0, []

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the debugging pipe: "
                                   + self.log_path.read_text(errors="replace")[-2000:])
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}} | ({"sessionId": session} if session else {})
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self._message(deadline)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        for m in self.events:
            if m.get("method") == method:
                return m
        while True:
            m = self._message(deadline)
            self.events.append(m)
            if m.get("method") == method:
                return m

    def close(self):
        try:
            self.call("Browser.close", timeout=10)
        except Exception:  # noqa: BLE001, S110 - closing a browser that already died
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        os.close(self._w)
        os.close(self._r)


IMAGES_JS = """Promise.all(Array.from(document.images).map(img => img.decode().then(
  () => ({alt: img.alt, ok: img.naturalWidth > 0 && img.naturalHeight > 0, w: img.naturalWidth,
          h: img.naturalHeight, shown_w: img.getBoundingClientRect().width}),
  () => ({alt: img.alt, ok: false, w: 0, h: 0, shown_w: 0}))))"""
SECTIONS_JS = """Array.from(document.querySelectorAll('section[id]')).map(s => ({id: s.id,
  title: (s.querySelector('h2') || {}).textContent, text: s.textContent.length}))"""


def inspect(html: Path, shot: Path, first: Path | None = None) -> dict:
    """Open html in headless Chromium; return its images, sections, console errors and page height; save a
    full-page screenshot to `shot` and, when `first` is given, the first screen (1200 x 900) there."""
    b = Chromium(shot.parent / "chromium-profile")
    try:
        target = b.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = b.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            b.call(f"{domain}.enable", session=s)
        b.call("Emulation.setDeviceMetricsOverride", {"width": 1200, "height": 900, "deviceScaleFactor": 1,
                                                      "mobile": False}, session=s)
        b.call("Page.navigate", {"url": html.resolve().as_uri()}, session=s)
        b.wait_event("Page.loadEventFired")
        images = b.call("Runtime.evaluate", {"expression": IMAGES_JS, "awaitPromise": True, "returnByValue": True},
                        session=s)["result"]["value"]
        sections = b.call("Runtime.evaluate", {"expression": SECTIONS_JS, "returnByValue": True},
                          session=s)["result"]["value"]
        if first is not None:
            data = b.call("Page.captureScreenshot", {"format": "png"}, session=s)["data"]
            first.write_bytes(base64.b64decode(data))
        height = b.call("Runtime.evaluate", {"expression": "document.documentElement.scrollHeight",
                                             "returnByValue": True}, session=s)["result"]["value"]
        b.call("Emulation.setDeviceMetricsOverride", {"width": 1200, "height": min(int(height), 20000),
                                                      "deviceScaleFactor": 1, "mobile": False}, session=s)
        png = b.call("Page.captureScreenshot", {"format": "png"}, session=s)["data"]
        shot.write_bytes(base64.b64decode(png))
        errors = []
        for e in b.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                errors.append(p["exceptionDetails"].get("text", "exception"))
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append(" ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                errors.append(f"{p['entry'].get('text')} {p['entry'].get('url', '')}")
        return {"images": images, "sections": sections, "errors": errors, "height": height}
    finally:
        b.close()


def _keep(shot: Path):
    if os.environ.get("MOEBENCH_SCREENSHOT_DIR"):
        dest = Path(os.environ["MOEBENCH_SCREENSHOT_DIR"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, dest / shot.name)


def _synthetic():
    import importlib.util

    spec = importlib.util.spec_from_file_location("synthetic", HERE / "data" / "synthetic.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _aspect_ok(i: dict) -> bool:
    """Wider than tall, or at most 1.5x taller than wide."""
    return i["w"] >= i["h"] or i["h"] <= 1.5 * i["w"]


def test_report_opens_in_chromium_with_every_section_and_image_and_no_console_error(tmp_path):
    syn = _synthetic()
    src = syn.write(tmp_path / "synthetic.jsonl", syn.report_records())
    rep = report.write(results.read([src]), tmp_path / "report", [str(src)])
    got = inspect(tmp_path / "report" / "index.html", tmp_path / "report.png", tmp_path / "report-first.png")
    _keep(tmp_path / "report.png")
    assert got["errors"] == []
    assert [s["id"] for s in got["sections"]] == [s.id for s in rep.sections]
    assert all(s["text"] > 100 for s in got["sections"]), got["sections"]
    assert len(got["images"]) == len(rep.plots) >= 12
    assert all(i["ok"] for i in got["images"]), [i["alt"] for i in got["images"] if not i["ok"]]
    assert all(_aspect_ok(i) for i in got["images"]), [(i["alt"], i["w"], i["h"]) for i in got["images"]]
    # legible at 100%: no figure is shrunk below 90% of its pixels in a 1200-pixel-wide window
    assert all(i["shown_w"] >= 0.9 * min(i["w"], 1100) for i in got["images"]), got["images"]
    assert got["height"] > 2000  # the plots and the tables are laid out, not collapsed
    shot = (tmp_path / "report.png").read_bytes()
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 50_000


COMMITTED = HERE.parent / "reports" / "h200" / "index.html"
COMMITTED_SECTIONS = ["throughput", "memory", "exec", "roofline", "phases", "balance", "paired", "claims", "tables"]


def test_the_committed_h200_report_has_every_section_and_readable_images(tmp_path):
    """reports/h200 (from results/h200 and results/h100/seeds.jsonl): every section, every image decoded and
    not a strip, the roofline drawn, the phase section saying why it has no plot. With MOEBENCH_SCREENSHOT_DIR
    set, its first screen is kept there as h200-first.png (reports/h200/screenshot.png is that file)."""
    got = inspect(COMMITTED, tmp_path / "h200.png", tmp_path / "h200-first.png")
    if os.environ.get("MOEBENCH_SCREENSHOT_DIR"):
        _keep(tmp_path / "h200-first.png")
    assert got["errors"] == []
    ids = [s["id"] for s in got["sections"]]
    assert all(s in ids for s in COMMITTED_SECTIONS), ids
    assert all(i["ok"] for i in got["images"]), [i["alt"] for i in got["images"] if not i["ok"]]
    assert all(_aspect_ok(i) for i in got["images"]), [(i["alt"], i["w"], i["h"]) for i in got["images"]]
    alts = [i["alt"] for i in got["images"]]
    assert any(a.startswith("Roofline: NVIDIA H200") for a in alts), alts
    assert not any(a.startswith("Where the time goes") for a in alts)
    html = COMMITTED.read_text()
    phases = html.split('<section id="phases">', 1)[1].split("</section>", 1)[0]
    assert "no phase split is drawn" in phases
    first = (tmp_path / "h200-first.png").read_bytes()
    assert first[:8] == b"\x89PNG\r\n\x1a\n" and len(first) > 20_000


def test_the_check_catches_a_broken_image_and_a_console_error(tmp_path):
    """The browser check itself can fail: a page with an undecodable image and a script error."""
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
                    '<img alt="broken" src="data:image/png;base64,AAAA">'
                    '<img alt="missing" src="no-such-plot.png">'
                    '<script>console.error("planted error"); undefinedFunction();</script></body></html>')
    got = inspect(page, tmp_path / "broken.png")
    assert [i["ok"] for i in got["images"]] == [False, False]
    assert any("planted error" in e for e in got["errors"])
    assert any("undefinedFunction" in e or "Uncaught" in e for e in got["errors"])
