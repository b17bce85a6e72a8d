"""What the coordinator shows an operator: the run as one document (``/status.json``), the same facts in the Prometheus
exposition format (``/metrics``) and a status page (``/``) that polls the document. Host-side only: no jax.

``intellect-jax coordinator --http 127.0.0.1:9400`` serves them (opt-in). On a loopback address a token is optional;
on any other address one is required (``--http-token-file``, a file of mode 0600), since the page shows the islands'
addresses: Prometheus sends it as ``Authorization: Bearer TOKEN`` (``bearer_token_file``), a browser as the password
of HTTP basic authentication (any user name). The server answers at most MAX_CLIENTS requests at once, each with
REQUEST_TIMEOUT_S to arrive, so a crowd of clients costs a bounded number of threads; the document is built under
the coordinator's lock in well under a millisecond for a run of a few dozen islands.
"""

from __future__ import annotations

import base64
import hmac
import http.server
import ipaddress
import json
import logging
import threading
import time
from importlib import resources
from typing import Any, Callable

from .protocol import RunState

log = logging.getLogger("intellect_jax.elastic.status")

VERSION = 1  # of the /status.json document
MAX_CLIENTS = 16
REQUEST_TIMEOUT_S = 5.0
SHOWN_EVENTS = 50


def island_state(st: RunState, name: str, now: float) -> str:
    isl = st.islands[name]
    if not isl.alive:
        return "dead"
    if st.quarantined(isl, now):
        return "quarantined"
    if st.epoch is not None and name in st.epoch.members:
        return "reducing"
    if st.run_step is not None and not st.recovering and st.needs_state(isl):
        return "needs state"
    if st.ready.get(name) == st.run_step:
        return "ready"
    return "training"


def document(st: RunState, run_id: str, now: float) -> dict[str, Any]:
    """The run as the coordinator knows it, as one JSON-able document (call under the coordinator's lock)."""
    wall = time.time()
    islands = []
    for name in sorted(st.islands):
        i = st.islands[name]
        islands.append({"name": name, "state": island_state(st, name, now), "step": i.step,
                        "hash": i.hash[:16] if i.hash else None, "addr": i.addr,
                        "last_heartbeat_s": round(now - i.last_seen, 1) if i.last_seen else None,
                        "strikes": i.strikes, "quarantines": i.quarantines,
                        "quarantined_s": round(st.quarantined(i, now), 1), "quarantine_why": i.quarantine_why,
                        "rates": {k: round(v) for k, v in sorted(i.rates.items())},
                        "rtts": {k: round(v, 4) for k, v in sorted(i.rtts.items())}})
    e = st.epoch
    epoch = None if e is None else {
        "id": e.id, "step": e.step, "members": e.members, "topology": e.topology, "order": e.order,
        "streams": e.streams, "min_rate": e.min_rate, "done": dict(e.done),
        "running_s": round(now - e.formed_at, 1) if e.formed_at else None, "excluded": dict(e.excluded)}
    counts: dict[str, dict[str, int]] = {}
    for (group, reason), n in st.counts.items():
        counts.setdefault(group, {})[reason] = n
    return {"version": VERSION, "run_id": run_id, "time": wall, "recovering": st.recovering, "run_step": st.run_step,
            "finished_step": st.finished_step, "rebuilt_from": st.rebuilt_from, "islands": islands, "epoch": epoch,
            "recent_steps": list(st.recent)[-20:], "counts": counts,
            "events": list(st.events)[-SHOWN_EVENTS:], "alerts": alerts(st, now, wall),
            "settings": {"min_islands": st.cfg.min_islands, "max_islands": st.cfg.max_islands,
                         "sync_timeout_s": st.cfg.sync_timeout_s, "vote_timeout_s": st.cfg.vote_timeout_s,
                         "quarantine_s": st.cfg.quarantine_s, "quarantine_after": st.cfg.quarantine_after,
                         "dead_after_s": st.cfg.dead_after_s}}


def alerts(st: RunState, now: float, wall: float) -> list[str]:
    """What an operator should look at now."""
    out = []
    if st.recovering:
        out.append("the coordinator is rebuilding the run's state from the islands (after a restart)")
    for name, isl in sorted(st.islands.items()):
        left = st.quarantined(isl, now)
        if left:
            out.append(f"{name} is quarantined for {left:.0f} s more: {isl.quarantine_why}")
    for s, votes in sorted(st.contested.items())[-3:]:
        out.append(f"outer step {s}: the members' hashes split with no majority ({len(votes)} votes)")
    for s, why in sorted(st.guard_errors.items())[-1:]:
        out.append(why)
    recent = [ev for ev in st.events if wall - ev["time"] < 600]
    aborts = sum(ev["kind"] == "abort" for ev in recent)
    if aborts:
        out.append(f"{aborts} aborted reduce(s) in the last 10 minutes")
    deaths = sorted({ev["text"].split()[1] for ev in recent if ev["kind"] == "dead"})
    if deaths:
        out.append(f"islands that died in the last 10 minutes: {', '.join(deaths)}")
    if any(ev["kind"] == "recovery" for ev in st.events):
        out.append("the last recovery took some island's word for the run's state (see the events)")
    return out


# -- Prometheus ------------------------------------------------------------------------------------------------------


class Collector:
    """The status document as Prometheus metrics, built at each scrape."""

    def __init__(self, snapshot: Callable[[], tuple[dict[str, Any], dict[str, Any]]]):
        self._snapshot = snapshot  # () -> (document, histograms)

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)

        doc, hists = self._snapshot()
        g = GaugeMetricFamily("intellect_jax_islands", "Islands by state", labels=["state"])
        states: dict[str, int] = {}
        for i in doc["islands"]:
            states[i["state"]] = states.get(i["state"], 0) + 1
        for state in ("training", "ready", "reducing", "needs state", "quarantined", "dead"):
            g.add_metric([state], states.get(state, 0))
        yield g
        yield GaugeMetricFamily("intellect_jax_outer_step", "Completed outer steps of the run (-1: not started)",
                                value=-1 if doc["run_step"] is None else doc["run_step"])
        yield GaugeMetricFamily("intellect_jax_recovering", "1 while a restarted coordinator rebuilds the run",
                                value=int(doc["recovering"]))
        yield GaugeMetricFamily("intellect_jax_rebuilt_view", "1 if this coordinator process rebuilt a running run "
                                "from the islands (it was restarted)", value=int(bool(doc["rebuilt_from"])))
        names = {"epochs": "Epochs by outcome (formed, redo: formed again for an aborted step, committed, aborted)",
                 "aborts": "Aborted reduces by reason", "strikes": "Strikes by reason",
                 "quarantines": "Quarantines by the reason of their last strike",
                 "excluded": "Islands left out of an outer step by reason", "splits": "Hash votes with no majority"}
        for group, help_ in names.items():
            c = CounterMetricFamily(f"intellect_jax_{group}", help_, labels=["reason"])
            for reason, n in sorted(doc["counts"].get(group, {}).items()):
                c.add_metric([reason], n)
            yield c
        for key, help_ in (("reduce_seconds", "Reduce time of a committed outer step (the slowest member)"),
                           ("reduce_bytes", "Bytes the members of a committed outer step sent")):
            h = hists[key]
            buckets = [(repr(float(b)), c) for b, c in zip(h.bounds, h.counts)] + [("+Inf", h.n)]
            yield HistogramMetricFamily(f"intellect_jax_{key}", help_, buckets=buckets, sum_value=h.sum)
        step = GaugeMetricFamily("intellect_jax_island_step", "Completed outer steps each island holds (its claim)",
                                 labels=["island"])
        beat = GaugeMetricFamily("intellect_jax_island_last_heartbeat_seconds", "Seconds since an island was heard",
                                 labels=["island"])
        quar = GaugeMetricFamily("intellect_jax_island_quarantined_seconds", "Quarantine left", labels=["island"])
        strikes = GaugeMetricFamily("intellect_jax_island_strikes", "Strikes in a row", labels=["island"])
        rate = GaugeMetricFamily("intellect_jax_link_rate_bytes_per_second", "Outbound rate an island measured to a "
                                 "peer", labels=["src", "dst"])
        rtt = GaugeMetricFamily("intellect_jax_link_rtt_seconds", "Round trip an island measured to a peer",
                                labels=["src", "dst"])
        for i in doc["islands"]:
            step.add_metric([i["name"]], i["step"])
            if i["last_heartbeat_s"] is not None:
                beat.add_metric([i["name"]], i["last_heartbeat_s"])
            quar.add_metric([i["name"]], i["quarantined_s"])
            strikes.add_metric([i["name"]], i["strikes"])
            for peer, v in i["rates"].items():
                rate.add_metric([i["name"], peer], v)
            for peer, v in i["rtts"].items():
                rtt.add_metric([i["name"], peer], v)
        yield from (step, beat, quar, strikes, rate, rtt)
        last = next((r for r in reversed(doc["recent_steps"]) if r.get("voters")), None)
        yield GaugeMetricFamily("intellect_jax_hash_agreement", "Share of the last decided step's voters that voted "
                                "its canonical hash", value=(last["agree"] / last["voters"]) if last else 1.0)


def registry(snapshot: Callable[[], tuple[dict[str, Any], dict[str, Any]]]):
    from prometheus_client import CollectorRegistry
    from prometheus_client.process_collector import ProcessCollector

    reg = CollectorRegistry(auto_describe=False)
    reg.register(Collector(snapshot))
    ProcessCollector(registry=reg)  # process_start_time_seconds, CPU, memory, open file descriptors
    return reg


# -- HTTP ------------------------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def page() -> bytes:
    return resources.files("intellect_jax.elastic").joinpath("status.html").read_bytes()


class StatusServer:
    """Serves ``/`` (the page), ``/status.json`` and ``/metrics``; anything else is a 404."""

    def __init__(self, bind: str, snapshot: Callable[[], tuple[dict[str, Any], dict[str, Any]]],
                 token: str | None = None):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        from .wire import parse_hostport

        host, port = parse_hostport(bind)
        if not is_loopback(host) and not token:
            raise ValueError(f"--http {bind} is not a loopback address: the status page shows the islands' "
                             "addresses, so give a token (--http-token-file FILE, mode 0600), or bind 127.0.0.1")
        self._snapshot, self._token = snapshot, token
        reg = registry(snapshot)
        html = page()
        slots = threading.BoundedSemaphore(MAX_CLIENTS)
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = REQUEST_TIMEOUT_S
            server_version = "intellect-jax"

            def log_message(self, fmt, *args):  # noqa: D401 - requests are not worth a log line each
                log.debug("%s " + fmt, self.client_address[0], *args)

            def _send(self, code: int, body: bytes, ctype: str, headers: dict | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # noqa: N802 - the http.server name
                if not outer._allowed(self.headers.get("Authorization", "")):
                    self._send(401, b"a token is required\n", "text/plain",
                               {"WWW-Authenticate": 'Basic realm="intellect-jax", charset="UTF-8"'})
                    return
                path = self.path.split("?", 1)[0]
                if path == "/":
                    self._send(200, html, "text/html; charset=utf-8")
                elif path == "/status.json":
                    doc, _ = outer._snapshot()
                    self._send(200, json.dumps(doc, default=str).encode(), "application/json")
                elif path == "/metrics":
                    self._send(200, generate_latest(reg), CONTENT_TYPE_LATEST)
                else:
                    self._send(404, b"not found: /, /status.json and /metrics are served\n", "text/plain")

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def process_request(self, request, client_address):
                if not slots.acquire(blocking=False):  # a crowd: refuse rather than grow
                    self.shutdown_request(request)
                    return
                super().process_request(request, client_address)

            def process_request_thread(self, request, client_address):
                try:
                    super().process_request_thread(request, client_address)
                finally:
                    slots.release()

        self.httpd = Server((host, port), Handler)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="status-http", daemon=True)

    def _allowed(self, header: str) -> bool:
        if not self._token:
            return True
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            given = value.strip()
        elif scheme.lower() == "basic":
            try:
                given = base64.b64decode(value.strip()).decode().partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                return False
        else:
            return False
        return hmac.compare_digest(given.encode(), self._token.encode())

    def start(self) -> "StatusServer":
        self._thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# -- `intellect-jax status` -------------------------------------------------------------------------------------------


class StatusError(ConnectionError):
    """No status document at the address; the message says why and what to check."""


def fetch(addr: str, token: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """The status document of the coordinator serving --http at `addr` (HOST:PORT)."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://{addr}/status.json",
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            doc = json.loads(r.read())
    except urllib.error.HTTPError as e:
        hint = " (give --token-file)" if e.code == 401 else ""
        raise StatusError(f"the coordinator at {addr} answered {e.code} {e.reason}{hint}") from None
    except (urllib.error.URLError, OSError) as e:
        raise StatusError(f"no status at http://{addr}/status.json ({getattr(e, 'reason', e)}): is the "
                              "coordinator running with --http at that address?") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise StatusError(f"http://{addr}/status.json is not a version {VERSION} status document")
    return doc


def format_table(doc: dict[str, Any]) -> str:
    """The status document for a terminal."""
    def rows(header: list[str], body: list[list[Any]]) -> list[str]:
        cells = [header] + [[("–" if c is None else str(c)) for c in r] for r in body]
        widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
        return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]

    e = doc["epoch"]
    out = [f"run {doc['run_id']}: outer step {doc['run_step']}" + (" (recovering)" if doc["recovering"] else "") +
           (f"; epoch {e['id']} reducing step {e['step']} with {len(e['members'])} islands, running "
            f"{e['running_s']} s" if e else "; between outer steps"), ""]
    out += rows(["island", "state", "step", "last heard", "out MB/s", "RTT ms", "strikes", "quarantined", "address"],
                [[i["name"], i["state"], i["step"],
                  None if i["last_heartbeat_s"] is None else f"{i['last_heartbeat_s']:.0f} s",
                  f"{sum(i['rates'].values()) / len(i['rates']) / 1e6:.1f}" if i["rates"] else None,
                  f"{1e3 * sum(i['rtts'].values()) / len(i['rtts']):.0f}" if i["rtts"] else None,
                  i["strikes"], f"{i['quarantined_s']:.0f} s" if i["quarantined_s"] else None, i["addr"]]
                 for i in doc["islands"]])
    if doc["recent_steps"]:
        out += ["", "last outer steps:"]
        out += rows(["step", "epoch", "members", "outer s", "reduce s", "MB sent", "hash", "agree"],
                    [[r["step"], r["epoch"], len(r["members"]), None if r.get("outer_s") is None else
                      f"{r['outer_s']:.2f}", f"{r['reduce_s']:.3f}", f"{r['bytes'] / 1e6:.2f}",
                      (r.get("hash") or "")[:12] or None,
                      f"{r['agree']}/{r['voters']}" if r.get("voters") else None]
                     for r in doc["recent_steps"][-8:]])
    out += ["", "alerts:" if doc["alerts"] else "alerts: none"] + [f"  - {a}" for a in doc["alerts"]]
    return "\n".join(out)

