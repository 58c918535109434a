"""Screenshots of the MLflow review path, in headless Chromium (Debian's ``chromium``; not run in CI).

    .venv/bin/python tools/review_screenshots.py --search-store runs/demo --study-store runs/study-mini \
        --out review-screenshots

For each store (an ``output_dir`` of `fliqs search` / `fliqs study`: its ``mlflow.db``) it starts ``mlflow ui`` on
127.0.0.1 (a free port), drives Chromium through a small DevTools-protocol client (aiohttp's websocket, which Ray's
dashboard dependencies bring) and saves PNGs:

  01_landing.png           what MLflow opens on (its home page)
  02_experiment.png        the experiment opened by its plain address in a fresh browser (MLflow's GenAI side)
  03_runs_charts.png       the link fliqs prints: the runs table in chart view
  04_search_run.png        the search run's page: its description holds the result plot, the result and the format
                           per layer
  05_study_parent.png      the study's parent run: the per-method table and the Pareto plot in its description
  06_study_pareto.png      the parent's Artifacts tab on pareto.png
  07_study_methods.png     the parent's Artifacts tab on methods.csv, shown as a table

Each page must show the run's own data (its accuracy, its methods, its loaded plots) within a minute, or the tool
fails naming what was missing. Only 127.0.0.1 is contacted; the servers and the browser are stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

from fliqs.analysis.review import run_url, runs_url
from fliqs.run import schema
from fliqs.run.config import DEFAULT_EXPERIMENT

WIDTH, HEIGHT = 1600, 1000
# Close MLflow's assistant side panel and unfold collapsed descriptions, so a screenshot shows the page itself.
TIDY_JS = """
(() => {
  for (const b of document.querySelectorAll('button')) {
    const label = (b.getAttribute('aria-label') || '') + ' ' + (b.textContent || '');
    if (/show more/i.test(label)) b.click();
  }
  for (const b of document.querySelectorAll('button[aria-label="Close"]')) b.click();  // the assistant panel
  for (const b of document.querySelectorAll('button')) {   // one-time hints and banners
    if (/^(got it|dismiss)$/i.test((b.textContent || '').trim())) b.click();
  }
  return true;
})()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"{url} did not answer within {timeout:.0f} s")


class MlflowUI:
    def __init__(self, store: Path):
        self.uri = f"sqlite:///{(store / 'mlflow.db').resolve()}"
        if not (store / "mlflow.db").exists():
            raise SystemExit(f"no MLflow store in {store}")
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_LOGGING_LEVEL": "WARNING"}
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", self.uri, "--host",
                                      "127.0.0.1", "--port", str(self.port)], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(f"{self.base}/health")

    def close(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=30)


class Browser:
    """Headless Chromium driven over the DevTools protocol: navigate, run a script, capture the page."""

    def __init__(self):
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if not chromium:
            raise SystemExit("chromium is not installed (apt-get install -y chromium)")
        self.port = free_port()
        self.profile = tempfile.mkdtemp(prefix="fliqs-chromium-")
        self.proc = subprocess.Popen([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                      f"--remote-debugging-port={self.port}", f"--user-data-dir={self.profile}",
                                      f"--window-size={WIDTH},{HEIGHT}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_http(f"http://127.0.0.1:{self.port}/json/version")
        self._id = 0

    async def open(self) -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list") as resp:
            page = next(t for t in json.load(resp) if t["type"] == "page")
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)

    async def call(self, method: str, **params) -> dict:
        self._id += 1
        await self.ws.send_json({"id": self._id, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json()
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def text(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    async def _until(self, condition: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not await self.text(condition):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.5)
        return True

    async def shot(self, url: str, path: Path, expect: list[str], height: int = HEIGHT, timeout: float = 60.0,
                   click: str | None = None, images: int = 0) -> None:
        """Open ``url`` afresh, wait until the page shows the run's data (every string of ``expect``: values from
        the store, not headings the UI draws before its API calls answer) and at least ``images`` loaded images,
        click the element whose text is ``click`` (an artifact in the tree), tidy the page and save a PNG. A page
        that never shows them fails the tool (SystemExit), naming what was missing."""
        await self.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=height, deviceScaleFactor=1,
                        mobile=False)
        await self.call("Page.navigate", url="about:blank")  # a hash change alone keeps the previous page's state
        await asyncio.sleep(0.5)
        await self.call("Page.navigate", url=url)
        if click:
            await self._until(f"document.body && document.body.innerText.includes({json.dumps(click)})", timeout)
            await self.text("[...document.querySelectorAll('span, div, a')].find(e => e.childElementCount === 0 && "
                            f"e.textContent.trim() === {json.dumps(click)})?.click()")
        shows = " && ".join(f"document.body.innerText.includes({json.dumps(e)})" for e in expect) or "true"
        loaded = f"[...document.images].filter(i => i.complete && i.naturalWidth > 1).length >= {images}"
        if not await self._until(f"!!document.body && {shows} && {loaded}", timeout):
            missing = [e for e in expect if not await self.text(f"document.body.innerText.includes({json.dumps(e)})")]
            raise SystemExit(f"{url} shows nothing to review: missing {missing or f'{images} loaded image(s)'}")
        await self.call("Runtime.evaluate", expression=TIDY_JS)
        if os.environ.get("FLIQS_SHOT_DEBUG"):
            print(await self.text("[...document.querySelectorAll('button')].map(b => (b.getAttribute('aria-label')"
                                  " || '') + '|' + b.textContent.trim().slice(0, 30)).join('; ')"))
        await asyncio.sleep(1.5)
        data = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(data["data"]))
        print(f"{path}  <- {url}")

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=30)
        shutil.rmtree(self.profile, ignore_errors=True)


def find_run(uri: str, role: str):
    """(experiment id, the latest finished run with ``role``) of the store."""
    from fliqs.run.tracking import client

    c = client(uri)
    exp = c.get_experiment_by_name(DEFAULT_EXPERIMENT)
    if exp is None:
        raise SystemExit(f"no experiment {DEFAULT_EXPERIMENT!r} in {uri}")
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`{schema.ROLE}` = '{role}' and "
                         "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise SystemExit(f"no finished run with role {role!r} in {uri}")
    return exp.experiment_id, runs[0]


async def capture(search_store: Path | None, study_store: Path | None, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    browser = Browser()
    await browser.open()
    try:
        if search_store:
            ui = MlflowUI(search_store)
            try:
                exp, run = find_run(ui.uri, schema.SEARCH)
                base, accuracy = ui.base, f"{run.data.metrics[schema.TEST_ACCURACY]:.4f}"
                await browser.shot(f"{base}/", out / "01_landing.png", [DEFAULT_EXPERIMENT])
                await browser.shot(f"{base}/#/experiments/{exp}", out / "02_experiment.png", [DEFAULT_EXPERIMENT])
                await browser.shot(runs_url(base, exp), out / "03_runs_charts.png", [run.info.run_name])
                await browser.shot(run_url(base, exp, run.info.run_id), out / "04_search_run.png", [accuracy],
                                   height=1300, images=1)  # the result plot in its description
            finally:
                ui.close()
        if study_store:
            ui = MlflowUI(study_store)
            try:
                exp, parent = find_run(ui.uri, schema.STUDY_ROLE)
                run_id = parent.info.run_id
                methods = sorted({k.removeprefix(schema.HYPERVOLUME_PREFIX) for k in parent.data.metrics
                                  if k.startswith(schema.HYPERVOLUME_PREFIX) and "mean_" not in k
                                  and "std_" not in k})
                await browser.shot(run_url(ui.base, exp, run_id), out / "05_study_parent.png", methods,
                                   height=1900, images=1)
                await browser.shot(run_url(ui.base, exp, run_id, schema.PARETO_PLOT), out / "06_study_pareto.png",
                                   [], click=schema.PARETO_PLOT, images=1)
                await browser.shot(run_url(ui.base, exp, run_id, schema.METHODS_CSV), out / "07_study_methods.png",
                                   methods, click=schema.METHODS_CSV)
            finally:
                ui.close()
    finally:
        await browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--search-store", type=Path, help="output_dir of a finished fliqs search (runs/demo)")
    parser.add_argument("--study-store", type=Path, help="output_dir of a finished fliqs study")
    parser.add_argument("--out", type=Path, default=Path("review-screenshots"))
    args = parser.parse_args()
    if not args.search_store and not args.study_store:
        parser.error("give --search-store and/or --study-store")
    asyncio.run(capture(args.search_store, args.study_store, args.out))


if __name__ == "__main__":
    main()
