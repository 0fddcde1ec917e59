#!/usr/bin/env python
"""Screenshots of the MLflow UI on a binaryduo store, for the README (``make screenshots``; not
part of CI: it needs Debian's ``chromium``).

1. Copies the store (``./mlflow.db`` of ``make demo`` by default, or ``--db PATH``) into a
   temporary folder: the original is never opened by the server, so never modified.
2. Starts ``mlflow server`` on the copy, on 127.0.0.1 and a free port (one worker, no job
   execution), and waits for ``/health``.
3. Finds the experiment (``--experiment``, default ``binaryduo``) and a stage run (``--run-id``,
   default: the newest BinaryDuo ``finetune`` stage, else the newest stage run) through the REST
   API.
4. Has headless Chromium (driven over its DevTools protocol: :class:`Browser`) render the
   experiment's training-runs page, that run's model-metrics page with ``--search`` typed into
   its chart search (default ``val_``: the validation curves, not the health sections listed
   first) and its system-metrics page. The UI is a React single-page app that loads its data
   after the first paint: each picture waits for the page's own content, then ``--settle-s``.

Writes ``docs/mlflow_runs.png``, ``docs/mlflow_run_metrics.png`` and
``docs/mlflow_system_metrics.png`` (``--out DIR``). Run:
    .venv/bin/python docs/make_screenshots.py [--db mlflow.db] [--out docs] [--run-id ID]
        [--width 1600 --height 1000] [--settle-s 6] [--search val_]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

DOCS = Path(__file__).resolve().parent
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
#: The browser reaches the server (on 127.0.0.1) under this name: MLflow's UI opens its chat
#: "Assistant" panel by itself on localhost / 127.0.0.1 only, and it would cover a third of the
#: picture. Chromium maps the name to 127.0.0.1 itself (--host-resolver-rules): no DNS, no network.
HOST = "mlflow-ui.binaryduo"


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    sys.exit("make_screenshots: no headless Chromium found (apt-get install chromium)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(db: Path, port: int, log: Path) -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1:``port``, answering requests addressed to :data:`HOST`."""
    mlflow = Path(sys.executable).with_name("mlflow")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "w") as out:
        return subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{db}", "--host",
             "127.0.0.1", "--port", str(port), "--workers", "1", "--allowed-hosts",
             f"{HOST},{HOST}:{port},127.0.0.1,127.0.0.1:{port},localhost,localhost:{port}",
             "--cors-allowed-origins", f"http://{HOST}:{port}"],  # else its POSTs get 403
            cwd=db.parent, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)


def wait_for(url: str, server: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {server.returncode}")
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"mlflow server at {url} did not answer within {seconds:.0f} s")


def rest(url: str, endpoint: str, body: dict | None = None, **query) -> dict:
    address = f"{url}/api/2.0/mlflow/{endpoint}"
    if query:
        address += "?" + urllib.parse.urlencode(query)
    request = urllib.request.Request(
        address, data=None if body is None else json.dumps(body).encode(),
        method="GET" if body is None else "POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def pick_run(url: str, experiment_id: str) -> dict:
    """The newest BinaryDuo fine-tune stage run (the demo's decoupled network), else the newest
    stage run."""
    runs = rest(url, "runs/search", {"experiment_ids": [experiment_id], "max_results": 200,
                                     "order_by": ["attributes.start_time DESC"]})["runs"]
    stages = [r for r in runs if any(t["key"] == "mlflow.parentRunId"
                                     for t in r["data"].get("tags", []))]
    if not stages:
        raise RuntimeError("no stage runs in the experiment")

    def tags(run):
        return {t["key"]: t["value"] for t in run["data"].get("tags", [])}

    finetunes = [r for r in stages if tags(r).get("stage") == "finetune"
                 and "binaryduo" in tags(r).get("recipe", "")]
    return (finetunes or stages)[0]


class Browser:
    """Headless Chromium driven over the DevTools protocol (aiohttp's websocket client, an mlflow
    dependency): a page is loaded, waited for, optionally typed into (the run page's chart search
    box), then captured. ``--screenshot`` alone cannot type, and the run page lists its charts by
    metric prefix (the 30-odd ``health/<layer>`` sections come before ``val_top1``)."""

    def __init__(self, executable: str, profile: Path, width: int, height: int):
        self.port = free_port()
        self.width, self.height = width, height
        self.process = subprocess.Popen(
            [executable, "--headless=new", "--no-sandbox", "--disable-gpu",
             "--disable-dev-shm-usage", "--hide-scrollbars", "--no-first-run",
             f"--user-data-dir={profile}", f"--window-size={width},{height}",
             f"--host-resolver-rules=MAP {HOST} 127.0.0.1",
             f"--remote-debugging-port={self.port}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def close(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)

    def _page_socket(self) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list",
                                            timeout=2) as answer:
                    pages = [t for t in json.loads(answer.read()) if t["type"] == "page"]
                if pages:
                    return pages[0]["webSocketDebuggerUrl"]
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError("chromium's DevTools endpoint did not answer within 60 s")

    def capture(self, url: str, path: Path, *, ready: str, search: str | None = None,
                settle_s: float = 6.0, timeout_s: float = 90.0) -> None:
        """Loads ``url``, waits until the JavaScript expression ``ready`` is true, types
        ``search`` into the focused ``input`` found by it (when given), lets the page settle and
        writes the PNG."""
        import asyncio
        asyncio.run(self._capture(url, path, ready, search, settle_s, timeout_s))

    async def _capture(self, url, path, ready, search, settle_s, timeout_s) -> None:
        import asyncio
        import base64

        import aiohttp
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(self._page_socket(), max_msg_size=0) as socket_:
            ids = iter(range(1, 1_000_000))

            async def call(method: str, **params):
                number = next(ids)
                await socket_.send_json({"id": number, "method": method, "params": params})
                async for message in socket_:
                    answer = json.loads(message.data)
                    if answer.get("id") == number:
                        if "error" in answer:
                            raise RuntimeError(f"{method}: {answer['error']}")
                        return answer.get("result", {})
                raise RuntimeError(f"chromium closed the connection during {method}")

            async def evaluate(expression: str):
                result = await call("Runtime.evaluate", expression=expression,
                                    returnByValue=True)
                return result.get("result", {}).get("value")

            await call("Emulation.setDeviceMetricsOverride", width=self.width,
                       height=self.height, deviceScaleFactor=1, mobile=False)
            await call("Page.enable")
            await call("Page.navigate", url=url)
            deadline = time.monotonic() + timeout_s
            while not await evaluate(f"Boolean({ready})"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{url}: not ready within {timeout_s:.0f} s ({ready})")
                await asyncio.sleep(0.5)
            if search:
                await evaluate(f"({ready}).focus()")
                await call("Input.insertText", text=search)
            await asyncio.sleep(settle_s)
            shot = await call("Page.captureScreenshot", format="png")
            path.write_bytes(base64.b64decode(shot["data"]))


#: The run page's chart search box (MLflow 3.17: placeholder "Search metric charts").
SEARCH_BOX = "document.querySelector('input[placeholder*=\"Search metric\"]')"
#: A link to one run: the runs table has loaded.
RUNS_LOADED = "document.querySelector('a[href*=\"/runs/\"]')"
#: A system-metrics chart has drawn (its plot's SVG or canvas is in the page).
CHART_DRAWN = "document.querySelector('.js-plotly-plot, canvas')"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, default=Path("mlflow.db"),
                        help="the sqlite store (default ./mlflow.db, as `make demo` leaves it)")
    parser.add_argument("--out", type=Path, default=DOCS)
    parser.add_argument("--experiment", default="binaryduo")
    parser.add_argument("--run-id", help="the run whose metrics page is taken")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--settle-s", type=float, default=6.0,
                        help="seconds a loaded page gets to draw its charts")
    parser.add_argument("--search", default="val_",
                        help="typed into the run page's chart search (default: the "
                             "validation metrics)")
    args = parser.parse_args()
    if not args.db.is_file():
        sys.exit(f"make_screenshots: no store at {args.db} (run `make demo` first, or --db PATH)")
    executable = find_browser()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="binaryduo-screenshots-") as tmp:
        work = Path(tmp)
        db = work / "mlflow.db"
        shutil.copyfile(args.db, db)  # the server opens the copy only
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(db, port, work / "server.log")
        try:
            wait_for(url, server)
            experiment = rest(url, "experiments/get-by-name",
                              experiment_name=args.experiment)["experiment"]
            experiment_id = experiment["experiment_id"]
            run_id = args.run_id or pick_run(url, experiment_id)["info"]["run_id"]
            # the side bar's "Model training" view (MLflow's default is its GenAI view)
            site, view = f"http://{HOST}:{port}", "workflowType=machine_learning"
            base = f"{site}/#/experiments/{experiment_id}"
            pages = [  # (file, page, ready, text typed into the chart search box)
                ("mlflow_runs.png", f"{base}/runs?{view}", RUNS_LOADED, None),
                ("mlflow_run_metrics.png", f"{base}/runs/{run_id}/model-metrics?{view}",
                 SEARCH_BOX, args.search),
                ("mlflow_system_metrics.png", f"{base}/runs/{run_id}/system-metrics?{view}",
                 CHART_DRAWN, None),
            ]
            browser = Browser(executable, work / "chromium-profile", args.width, args.height)
            try:
                for name, page, ready, search in pages:
                    browser.capture(page, args.out / name, ready=ready, search=search,
                                    settle_s=args.settle_s)
                    print(f"{args.out / name}: {page}")
            finally:
                browser.close()
        finally:
            errors = [line for line in (work / "server.log").read_text().splitlines()
                      if "Traceback" in line or "Error" in line]
            if errors:  # the UI shows "Request error": say what the server said
                print(f"mlflow server: {len(errors)} error lines, e.g. {errors[-1][:300]}")
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
