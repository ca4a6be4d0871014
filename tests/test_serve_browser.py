"""The web page at ``/`` in a real browser: headless Chromium (Debian's ``chromium``) driven over its DevTools
protocol types a prompt, clicks Generate against a server on the embedded model, and the gallery shows the
64x64 PNG with its infotext. Skipped where no chromium binary is installed (``.ci/run`` installs it)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import urllib.request

import pytest
from serve_helpers import free_port, running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (apt-get install chromium)")


class CDP:
    """A minimal DevTools client: one page target, commands answered in order, events ignored."""

    def __init__(self, ws_url: str):
        import websocket  # websocket-client

        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.next_id = 0

    def send(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def eval(self, expression: str):
        res = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression!r} raised: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")

    def click(self, selector: str):
        """A real mouse click at the centre of the element."""
        x, y = self.eval(f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                         " return [r.x + r.width / 2, r.y + r.height / 2]; })()")  # fmt: skip
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def drag(self, selector: str, points):
        """Press the left button at the first point (fractions of the element's box), move through the rest, release."""
        box = self.eval(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView();"
                        " const r = e.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; })()")  # fmt: skip
        xy = [(box[0] + fx * box[2], box[1] + fy * box[3]) for fx, fy in points]
        self.send("Input.dispatchMouseEvent", type="mousePressed", x=xy[0][0], y=xy[0][1], button="left", clickCount=1)
        for x, y in xy[1:]:
            self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y, button="left", buttons=1)
        self.send("Input.dispatchMouseEvent", type="mouseReleased", x=xy[-1][0], y=xy[-1][1], button="left",
                  clickCount=1)  # fmt: skip

    def close(self):
        self.ws.close()


@pytest.fixture
def browser(tmp_path):
    """A headless Chromium's page target, as a :class:`CDP`."""
    pytest.importorskip("websocket", reason="websocket-client is in the test extra")
    port = free_port()
    proc = subprocess.Popen(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--no-default-browser-check", "--window-size=1200,900",
         f"--remote-debugging-port={port}", f"--user-data-dir={tmp_path / 'profile'}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    cdp = None
    try:
        deadline = time.time() + 30
        while cdp is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=5) as r:
                    pages = [t for t in json.load(r) if t.get("type") == "page"]
                if pages:
                    cdp = CDP(pages[0]["webSocketDebuggerUrl"])
            except OSError:
                pass
            if cdp is None:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"chromium's DevTools endpoint did not come up (exit code {proc.poll()})")
                time.sleep(0.2)
        yield cdp
    finally:
        if cdp is not None:
            cdp.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for_result(browser: CDP, timeout: float = 120):
    """Until the gallery's first img.result has loaded; fails at once with the text of #error if it shows one."""
    state = browser.wait_for("(() => { const e = document.querySelector('#error').textContent;"
                             " if (e) return {error: e};"
                             " const i = document.querySelector('#gallery img.result');"
                             " return i && i.complete && i.naturalWidth > 0 ? {done: true} : null; })()",
                             timeout, "an img.result in #gallery")  # fmt: skip
    assert "error" not in state, f"the page showed an error: {state['error']}"


def test_page_generates_an_image(browser, tmp_path):
    """txt2img from the page: typed prompt, steps/size/seed set, Generate clicked; a screenshot is saved."""
    with running_server("--max-batch", "2") as (base, _state):
        browser.send("Page.enable")
        browser.send("Page.navigate", url=base + "/")
        browser.wait_for("document.readyState === 'complete' && document.querySelector('#sampler').options.length > 0"
                         " && document.querySelector('#scheduler').options.length > 0", 30,
                         "the page and its sampler/schedule lists")  # fmt: skip
        samplers = browser.eval("[...document.querySelectorAll('#sampler option')].map(o => o.value)")
        assert "Euler" in samplers and browser.eval("document.querySelector('#sampler').value") == "Euler"
        assert "karras" in browser.eval("[...document.querySelectorAll('#scheduler option')].map(o => o.value)")

        browser.eval("document.querySelector('#prompt').focus()")
        browser.send("Input.insertText", text="a red circle")
        for field, value in (("steps", 4), ("width", 64), ("height", 64), ("seed", 1234)):
            browser.eval(f"(() => {{ const e = document.getElementById('{field}'); e.value = '{value}';"
                         " e.dispatchEvent(new Event('input', {bubbles: true})); })()")  # fmt: skip
        assert browser.eval("document.querySelector('#prompt').value") == "a red circle"

        t0 = time.time()
        browser.click("#generate")
        wait_for_result(browser)
        print(f"generated in {time.time() - t0:.1f}s")

        browser.wait_for("!document.querySelector('#generate').disabled", 10, "Generate to be enabled again")
        shot = tmp_path / "serve_page.png"
        shot.write_bytes(base64.b64decode(browser.send("Page.captureScreenshot", format="png")["data"]))
        print(f"screenshot: {shot}")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        got = browser.eval("""(() => {
            const imgs = [...document.querySelectorAll('#gallery img.result')];
            const i = imgs[0], link = document.querySelector('#gallery a[download]');
            return {n: imgs.length, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight,
                    src: i.src.slice(0, 40), text: document.querySelector('#gallery').textContent,
                    href: link && link.href.slice(0, 40), download: link && link.getAttribute('download')};
        })()""")
        assert got["n"] == 1
        assert got["complete"] and (got["w"], got["h"]) == (64, 64)
        assert got["src"].startswith("data:image/png;base64,iVBOR")
        assert "Seed: 1234" in got["text"] and "a red circle" in got["text"] and "Steps: 4" in got["text"]
        assert got["href"] == got["src"] and got["download"] == "sd-jax-1234.png"


def test_page_shows_a_422(browser):
    """A request the server refuses (a width over its --max-size; the form's own checks pass) puts the 422's
    message in #error, and nothing in the gallery."""
    with running_server("--max-size", "64") as (base, _state):
        browser.send("Page.navigate", url=base + "/")
        browser.wait_for("document.readyState === 'complete' && document.querySelector('#sampler').options.length"
                         " > 0", 30, "the page")  # fmt: skip
        browser.eval("document.getElementById('width').value = '128'; document.getElementById('height').value = '64';"
                     " document.getElementById('steps').value = '4'")  # fmt: skip
        browser.click("#generate")
        error = browser.wait_for("document.querySelector('#error').textContent", 30, "#error")
        assert "width" in error and "--max-size 64" in error
        assert browser.eval("document.querySelectorAll('#gallery img.result').length") == 0
        browser.wait_for("!document.querySelector('#generate').disabled", 10, "Generate to be enabled again")


def test_page_inpaints_an_uploaded_image(browser, tmp_path):
    """img2img mode: a file chosen in the file input, a mask stroke painted with the mouse; the request carries both
    (the infotext says inpaint) and the result has the upload's size."""
    from PIL import Image

    upload = tmp_path / "upload.png"
    Image.new("RGB", (64, 64), (40, 90, 200)).save(upload)
    with running_server() as (base, _state):
        browser.send("Page.navigate", url=base + "/")
        browser.wait_for("document.readyState === 'complete' && document.querySelector('#sampler').options.length"
                         " > 0", 30, "the page")  # fmt: skip
        browser.eval("(() => { const m = document.getElementById('mode'); m.value = 'img2img';"
                     " m.dispatchEvent(new Event('change')); document.getElementById('width').value = '512';"
                     " document.getElementById('steps').value = '4'; document.getElementById('prompt').value = 'a"
                     " square'; document.getElementById('denoising_strength').value = '0.6'; })()")  # fmt: skip
        browser.send("DOM.enable")
        node = browser.send("DOM.querySelector", nodeId=browser.send("DOM.getDocument")["root"]["nodeId"],
                            selector="#init-image")["nodeId"]  # fmt: skip
        browser.send("DOM.setFileInputFiles", nodeId=node, files=[str(upload)])
        browser.wait_for("document.getElementById('mask-canvas').width === 64", 10, "the upload on the canvas")
        assert browser.eval("document.getElementById('width').value") == "64"  # taken from the upload
        browser.drag("#mask-canvas", [(0.2, 0.5), (0.5, 0.5), (0.8, 0.5)])
        painted = browser.eval("(() => { const c = document.getElementById('mask-canvas');"
                               " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                               " let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0;"
                               " return n; })()")  # fmt: skip
        assert 0 < painted < 64 * 64, painted
        browser.click("#generate")
        wait_for_result(browser)
        got = browser.eval("(() => { const i = document.querySelector('#gallery img.result');"
                           " return [i.naturalWidth, i.naturalHeight, document.querySelector('#gallery').textContent];"
                           " })()")  # fmt: skip
        assert got[:2] == [64, 64]
        assert "Mode: inpaint" in got[2] and "Denoising strength: 0.6" in got[2] and "Mask blur: 4" in got[2]
