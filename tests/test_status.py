"""The operator's view of an elastic run: the coordinator's /metrics (parsed with prometheus_client's own parser),
/status.json and status page, `intellect-jax status`, and the islands' own /metrics, against live runs."""

import base64
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from intellect_jax.config import ElasticConfig
from intellect_jax.elastic import identity
from intellect_jax.elastic.coordinator import Coordinator
from tests.test_elastic_e2e import Run, _free_port, check_run

ROOT = Path(__file__).resolve().parents[1]


def get(url, token=None, basic=None, timeout=5):
    headers = {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if basic:
        headers["Authorization"] = "Basic " + base64.b64encode(f"op:{basic}".encode()).decode()
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
        return r.status, r.read().decode()


def metrics(url) -> dict:
    """name -> {labels tuple: value} of every sample."""
    out: dict = {}
    for fam in text_string_to_metric_families(get(url)[1]):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


@pytest.fixture
def live(tmp_path):
    port = _free_port()
    run = Run(tmp_path, coordinator_args=["--http", f"127.0.0.1:{port}"])
    run.http = f"127.0.0.1:{port}"
    yield run
    run.stop()


def test_metrics_and_status_match_what_the_islands_logged_including_a_kill(live):
    """Three islands, c SIGKILLs itself mid-ring at outer step 2: the coordinator's /metrics and /status.json agree
    with the islands' own event logs (steps, members of each step, the abort, c dead), and the CLI prints it."""
    run = live
    run.start_coordinator(min_islands=3)
    steps = 6
    run.start_island("a", 1, steps, inner_s=0.3)
    run.start_island("b", 2, steps, inner_s=0.3)
    run.start_island("c", 3, steps, "--die-in-ring", "2:2", inner_s=0.3)
    for n in "ab":
        run.wait_exit(n, timeout=90)
    by_step = check_run(run, "abc", steps)
    m = metrics(f"http://{run.http}/metrics")
    doc = json.loads(get(f"http://{run.http}/status.json")[1])
    assert m["intellect_jax_outer_step"][()] == steps == doc["run_step"]
    aborts = run.coord_log().count("aborted (outer step")
    assert aborts >= 1 and m["intellect_jax_epochs_total"][(("reason", "aborted"),)] == aborts
    assert m["intellect_jax_epochs_total"][(("reason", "committed"),)] == steps
    assert m["intellect_jax_epochs_total"][(("reason", "redo"),)] == aborts  # each aborted step was formed again
    assert m["intellect_jax_epochs_total"][(("reason", "formed"),)] == steps + aborts
    assert m["intellect_jax_reduce_seconds_count"][()] == steps
    assert m["intellect_jax_aborts_total"][(("reason", "a member died"),)] >= 1
    states = {i["name"]: i["state"] for i in doc["islands"]}
    assert states["c"] == "dead" and m["intellect_jax_islands"][(("state", "dead"),)] == 3  # a, b left when done
    recent = {r["step"]: r for r in doc["recent_steps"]}
    for s, e in by_step.items():  # each step's members and hash as the islands logged them
        assert sorted(recent[s]["members"]) == sorted(e["members"]) and e["hash"].startswith(recent[s]["hash"][:12])
    assert recent[2]["members"] == ["a", "b"] and m["intellect_jax_hash_agreement"][()] == 1.0
    assert any(ev["kind"] == "dead" and "island c" in ev["text"] for ev in doc["events"])
    cli = subprocess.run([sys.executable, "-m", "intellect_jax", "status", "--coordinator", run.http],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert cli.returncode == 0 and f"run run: outer step {steps}" in cli.stdout and "dead" in cli.stdout, cli.stderr
    cli = subprocess.run([sys.executable, "-m", "intellect_jax", "status", "--coordinator", run.http, "--json"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert json.loads(cli.stdout)["run_step"] == steps


def test_the_endpoint_needs_its_token_off_loopback_404s_and_stays_bounded(tmp_path, capsys):
    token = tmp_path / "token"
    token.write_text("s3cret-token-of-the-run\n")
    os.chmod(token, 0o600)
    auth = identity.secret_auth(b"t" * 32, identity.COORDINATOR)
    with pytest.raises(ValueError, match="not a loopback address: .* give a token"):
        Coordinator(ElasticConfig(http="0.0.0.0:0"), "r", "127.0.0.1:0", auth)
    c = Coordinator(ElasticConfig(http="0.0.0.0:0", http_token_file=str(token)), "r", "127.0.0.1:0", auth).start()
    try:
        url = f"http://127.0.0.1:{c.http.port}"
        with pytest.raises(urllib.error.HTTPError) as e:
            get(url + "/status.json")
        assert e.value.code == 401 and "Basic" in e.value.headers["WWW-Authenticate"]
        with pytest.raises(urllib.error.HTTPError):
            get(url + "/metrics", token="wrong")
        assert get(url + "/metrics", token="s3cret-token-of-the-run")[0] == 200
        assert get(url + "/", basic="s3cret-token-of-the-run")[1].startswith("<!doctype html>")
        with pytest.raises(urllib.error.HTTPError) as e:
            get(url + "/../etc/passwd", token="s3cret-token-of-the-run")
        assert e.value.code == 404
        # 200 silent connections: the server holds at most MAX_CLIENTS handler threads and still answers after
        before = threading.active_count()
        socks = [socket.create_connection(("127.0.0.1", c.http.port)) for _ in range(200)]
        time.sleep(0.5)
        assert threading.active_count() - before <= 16 + 2
        for s in socks:
            s.close()
        time.sleep(0.3)
        assert get(url + "/status.json", token="s3cret-token-of-the-run")[0] == 200
        assert "the coordinator is rebuilding" in get(url + "/status.json", token="s3cret-token-of-the-run")[1]
    finally:
        c.close()
    assert subprocess.run([sys.executable, "-m", "intellect_jax", "status", "--coordinator", "127.0.0.1:9"],
                          capture_output=True, text=True, cwd=ROOT).stderr.startswith(
        "intellect-jax status: error: no status at http://127.0.0.1:9/status.json")


def test_an_islands_metrics_are_its_metrics_jsonl_rows(tmp_path):
    """`run.metrics_http`: a training run serves the latest value of every field it writes to metrics.jsonl."""
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    p = subprocess.Popen([sys.executable, "-m", "intellect_jax", "train", "--config", "configs/debug.toml",
                          "--data.kind=synthetic", "--data.seq_len=32", "--model.vocab_size=256",
                          "--model.hidden_size=64", "--model.intermediate_size=128", "--model.num_hidden_layers=2",
                          "--mesh.islands=2", "--mesh.fsdp=1", "--run.host_devices=2", "--diloco.inner_steps=4",
                          "--run.steps=400", "--run.log_every=1", f"--run.dir={tmp_path / 'run'}",
                          f"--run.metrics_http=127.0.0.1:{port}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                         stderr=open(tmp_path / "log", "w"))
    try:
        deadline, m = time.monotonic() + 240, {}
        while time.monotonic() < deadline and "intellect_jax_outer_compute_utilization" not in m:
            try:
                m = metrics(f"http://127.0.0.1:{port}/metrics")
            except OSError:
                pass
            time.sleep(0.5)
        assert "intellect_jax_inner_loss" in m, (tmp_path / "log").read_text()[-2000:]
        p.send_signal(signal.SIGINT)  # saves and exits
        p.wait(120)
        rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        losses = {r["loss"] for r in rows if r["kind"] == "inner"}
        assert m["intellect_jax_inner_loss"][()] in {float(x) for x in losses}  # a value the jsonl has
        assert "intellect_jax_outer_sync_seconds" in m
    finally:
        p.kill()


class Chromium:
    """A headless Chromium driven through the DevTools protocol over --remote-debugging-pipe (fd 3: commands in,
    fd 4: answers out, NUL-separated JSON), so a test can load a page once and read its DOM as it changes."""

    def __init__(self, binary: str, profile: Path):
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()

        def fds():  # in the child: the pipe ends Chromium expects on fds 3 and 4 (kept open by pass_fds)
            os.dup2(cmd_r, 3)
            os.dup2(out_w, 4)

        self.proc = subprocess.Popen([binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                      "--disable-background-networking", "--disable-component-update",
                                      "--disable-sync", "--hide-scrollbars", "--window-size=1280,1000",
                                      "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"],
                                     preexec_fn=fds, pass_fds=(3, 4), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(out_w)
        self._buf, self._id, self.session = b"", 0, None

    def call(self, method: str, timeout: float = 90.0, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                answer = json.loads(raw)
                if answer.get("id") == self._id:
                    if "error" in answer:
                        raise AssertionError(f"{method}: {answer['error']}")
                    return answer["result"]
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._out_r], [], [], left)[0]:
                raise AssertionError(f"Chromium did not answer {method} within {timeout} s")
            chunk = os.read(self._out_r, 1 << 16)
            if not chunk:
                raise AssertionError(f"Chromium exited (rc {self.proc.poll()}) before answering {method}")
            self._buf += chunk

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url=url)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def js(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        os.close(self._cmd_w)
        os.close(self._out_r)


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="no Chromium installed (apt-get install chromium) to render the status page")
def test_the_status_page_shows_every_island_and_updates_without_reload_after_a_kill(live, tmp_path):
    """A real headless Chromium loads the page once; its JavaScript polls /status.json: every island is listed, and
    after the test kills island c (SIGKILL) the same page, never reloaded, shows c dead and later outer steps without
    c. Writes docs/status-page.png when INTELLECT_JAX_SCREENSHOT is set."""
    run = live
    run.start_coordinator(min_islands=3)
    for i, n in enumerate("abc"):
        run.start_island(n, 40 + i, 10_000, inner_s=0.4)
    run.wait_for(lambda: all(len(run.events(n, "step")) >= 2 for n in "abc"), 90, "two outer steps")
    browser = Chromium(shutil.which("chromium") or shutil.which("chromium-browser"), tmp_path / "profile")
    try:
        browser.open(f"http://{run.http}/")
        row = "(document.querySelector('[data-island=\"c\"]') || {}).outerHTML || ''"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(
                browser.js(f"!!document.querySelector('[data-island=\"{n}\"]')") for n in "abc"):
            time.sleep(0.2)
        assert all(browser.js(f"!!document.querySelector('[data-island=\"{n}\"]')") for n in "abc"), \
            browser.js("document.body.innerText")
        assert "s-dead" not in browser.js(row)
        loads = browser.js("performance.getEntriesByType('navigation').length")
        run.procs["c"].send_signal(signal.SIGKILL)
        run.wait_for(lambda: "island c dead" in run.coord_log(), 90, "c declared dead")
        after = len(run.events("a", "step"))
        run.wait_for(lambda: len(run.events("a", "step")) >= after + 3, 90, "steps after the kill")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "s-dead" not in browser.js(row):
            time.sleep(0.2)
        assert "s-dead" in browser.js(row), browser.js(row)
        text = browser.js("document.body.innerText")
        assert "islands that died in the last 10 minutes: c" in text, text
        last = browser.js("document.querySelector('#steps tr td:nth-child(3)').textContent")  # the newest step's
        assert last == "a, b", text  # members: the run went on without c
        assert browser.js("performance.getEntriesByType('navigation').length") == loads == 1  # never reloaded
        if os.environ.get("INTELLECT_JAX_SCREENSHOT"):  # docs/status-page.png: the page after the kill
            png = browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
            (ROOT / "docs" / "status-page.png").write_bytes(base64.b64decode(png))
    finally:
        browser.close()
