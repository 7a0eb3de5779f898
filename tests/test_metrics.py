"""The replica's metrics and HTTP endpoints (worker/metrics.py), and the monitoring files that
depend on their names: metrics/alerts.yml (promtool) and metrics/grafana-dashboard.json.

promtool comes from Debian's `prometheus` package (.ci/run installs it). Without it the promtool
tests skip, except under CI (the `CI` variable set), where they fail.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import REPO, wait_until
from worker import __version__
from worker.metrics import CONTENT_TYPE_LATEST, OUTCOMES, Metrics, serve

ALERTS = REPO / "metrics" / "alerts.yml"
ALERT_TESTS = REPO / "metrics" / "alerts_test.yml"
DASHBOARD = REPO / "metrics" / "grafana-dashboard.json"
# Labels Prometheus adds to every scraped series; `le` is the histogram bucket label.
TARGET_LABELS = {"job", "instance", "le"}
# Series Prometheus makes itself, not exported by a replica.
SYNTHETIC = {"up"}


# -- helpers ---------------------------------------------------------------------------------------
def samples(metrics: Metrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)] from the exposition text, as a scraper reads it."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    for lbls, v in samples(metrics).get(name, []):
        if lbls == labels:
            return v
    return None


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", ""), err.read().decode()


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is required under CI (Debian package `prometheus`)")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return path


def busy_metrics() -> Metrics:
    """A leader that has seen one of everything: every family has samples."""
    m = Metrics("host-1:4242:abcd1234")
    m.set_leader(True)
    m.execution_started("EXPORT", 0.012)
    m.execution_started("IMPORT", None)
    for outcome in OUTCOMES:
        m.execution_finished("EXPORT", outcome, 2.5)
    m.claimed(3)
    m.retried()
    m.rescued(2)
    m.stop_applied()
    m.timed_out()
    m.db_error()
    m.reconnected()
    m.heartbeat_ok(time.monotonic())
    m.schedule_invalid("bad_cron")
    m.occurrences_enqueued(2, [0.004, 1.5])
    # What the leader's query returns: waiting and running rows only (finished are history).
    m.set_queue([("NEW", "IMMEDIATE", 7), ("PROCESSING", "HISTORY", 1)], 12.5, 1)
    m.set_slots(1, 4)
    return m


# -- HTTP ------------------------------------------------------------------------------------------
@pytest.fixture
def server():
    metrics = Metrics("host-1:99:feedf00d")
    state = {"ready": (True, "ready")}
    srv = serve(metrics, "127.0.0.1", -1, lambda: state["ready"])
    yield srv, metrics, state
    srv.close()


def test_metrics_endpoint_serves_the_registry(server):
    srv, metrics, _ = server
    assert srv.port > 0
    metrics.execution_started("EXPORT", 0.5)
    code, ctype, body = get(f"http://127.0.0.1:{srv.port}/metrics")
    assert code == 200
    assert ctype == CONTENT_TYPE_LATEST
    assert f'dms_worker_info{{version="{__version__}",worker_id="host-1:99:feedf00d"}} 1.0' in body
    assert 'dms_executions_started_total{mapref="EXPORT"} 1.0' in body
    # A query string does not change the answer (some scrapers add one).
    assert get(f"http://127.0.0.1:{srv.port}/metrics?x=1")[0] == 200


def test_healthz_readyz_and_404(server):
    srv, _, state = server
    base = f"http://127.0.0.1:{srv.port}"
    assert get(f"{base}/healthz")[::2] == (200, "ok\n")
    assert get(f"{base}/readyz")[::2] == (200, "ready\n")
    state["ready"] = (False, "heartbeat 12.0s old")
    assert get(f"{base}/readyz")[::2] == (503, "heartbeat 12.0s old\n")
    # /healthz is liveness only: it does not follow readiness.
    assert get(f"{base}/healthz")[0] == 200
    state["ready"] = (True, "ready")
    assert get(f"{base}/readyz")[0] == 200
    for path in ("/", "/metric", "/metrics/x", "/favicon.ico"):
        assert get(base + path)[0] == 404, path


def test_readyz_is_503_when_the_check_raises():
    def broken() -> tuple[bool, str]:
        raise RuntimeError("boom")
    srv = serve(Metrics("w"), "127.0.0.1", -1, broken)
    try:
        code, _, body = get(f"http://127.0.0.1:{srv.port}/readyz")
        assert code == 503 and "boom" in body
    finally:
        srv.close()


def test_port_zero_turns_the_endpoint_off():
    assert serve(Metrics("w"), "127.0.0.1", 0, lambda: (True, "")) is None


def test_close_releases_the_port():
    srv = serve(Metrics("w"), "127.0.0.1", -1, lambda: (True, ""))
    port = srv.port
    srv.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
    # ... and a new server (a restarted replica) can bind it again at once.
    again = serve(Metrics("w2"), "127.0.0.1", port, lambda: (True, ""))
    try:
        assert again.port == port and get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    finally:
        again.close()


# -- Metrics semantics -------------------------------------------------------------------------------
def test_each_instance_has_its_own_registry():
    a, b = Metrics("a"), Metrics("b")
    a.claimed(5)
    assert value(a, "dms_requests_claimed_total") == 5
    assert value(b, "dms_requests_claimed_total") == 0
    assert value(b, "dms_worker_info", worker_id="b", version=__version__) == 1


def test_follower_exports_no_queue_samples():
    m = Metrics("follower")
    m.set_slots(0, 4)
    m.set_leader(False)          # not a change: still a follower
    text = m.exposition().decode()
    assert "dms_queue_" not in text, "a follower must not export queue gauges, not even zeros"
    assert value(m, "dms_leader") == 0


def test_leader_queue_gauges_replace_vanished_label_sets():
    m = Metrics("leader")
    m.set_leader(True)
    m.set_queue([("NEW", "IMMEDIATE", 5), ("NEW", "HISTORY", 2), ("FAILED", "IMMEDIATE", 1)], 30.0, 2)
    got = {(l["status"], l["request_type"]): v for l, v in samples(m)["dms_queue_requests"]}
    assert {k: v for k, v in got.items() if v} == {("NEW", "IMMEDIATE"): 5, ("NEW", "HISTORY"): 2,
                                                   ("FAILED", "IMMEDIATE"): 1}
    assert value(m, "dms_queue_oldest_new_age_seconds") == 30.0
    assert value(m, "dms_queue_running_executions") == 2

    # The next refresh no longer has NEW HISTORY nor FAILED rows, and no NEW at all has an age:
    # NEW HISTORY reads 0 (a waiting status), FAILED is gone, the age reads 0.
    m.set_queue([("NEW", "IMMEDIATE", 1), ("DONE", "IMMEDIATE", 6)], None, 0)
    got = {(l["status"], l["request_type"]): v for l, v in samples(m)["dms_queue_requests"]}
    assert got[("NEW", "IMMEDIATE")] == 1 and got[("DONE", "IMMEDIATE")] == 6
    assert got[("NEW", "HISTORY")] == 0 and ("FAILED", "IMMEDIATE") not in got
    assert value(m, "dms_queue_oldest_new_age_seconds") == 0
    assert value(m, "dms_queue_running_executions") == 0

    m.clear_queue()
    assert "dms_queue_" not in m.exposition().decode()


def test_an_empty_queue_reads_zero_on_the_leader():
    """`dms_queue_requests{status="NEW"}` must read 0 when nothing waits, not vanish: an absent
    series is "unknown" to Prometheus, and alerts on it cannot tell "empty" from "not watched"."""
    m = Metrics("leader")
    m.set_leader(True)
    m.set_queue([], None, 0)
    got = {(l["status"], l["request_type"]): v for l, v in samples(m)["dms_queue_requests"]}
    for status in ("NEW", "CLAIMED", "PROCESSING"):
        for request_type in ("IMMEDIATE", "HISTORY", "STOP", "REFRESH_SCHEDULE"):
            assert got[(status, request_type)] == 0, (status, request_type)
    assert value(m, "dms_queue_oldest_new_age_seconds") == 0
    assert value(m, "dms_queue_running_executions") == 0


def test_oldest_new_is_also_exported_as_a_point_in_time():
    """So that DmsOldestNewTooOld can go on ageing the last known state when no leader exports:
    the time the oldest NEW request waits since, or the snapshot's time when none waits."""
    m = Metrics("leader")
    m.set_leader(True)
    before = time.time()
    m.set_queue([("NEW", "IMMEDIATE", 3)], 120.0, 0)
    after = time.time()
    stamp = value(m, "dms_queue_oldest_new_timestamp_seconds")
    assert before - 120 <= stamp <= after - 120
    m.set_queue([], None, 0)
    assert time.time() - 1 <= value(m, "dms_queue_oldest_new_timestamp_seconds") <= time.time()


def test_stepping_down_clears_the_queue_gauges():
    m = Metrics("leader")
    m.set_leader(True)
    m.set_queue([("NEW", "IMMEDIATE", 5)], 1.0, 0)
    m.set_leader(False)
    assert "dms_queue_" not in m.exposition().decode()


def test_queue_labels_stay_bounded():
    m = Metrics("leader")
    m.set_leader(True)
    m.set_queue([("NEW", "GARBAGE1", 1), ("NEW", "GARBAGE2", 2), ("WEIRD", "IMMEDIATE", 3)], None, 0)
    got = {(l["status"], l["request_type"]): v for l, v in samples(m)["dms_queue_requests"] if v}
    assert got == {("NEW", "other"): 3, ("other", "IMMEDIATE"): 3}


def test_heartbeat_age_grows_at_scrape_time_without_calls():
    m = Metrics("w")
    m.heartbeat_ok(time.monotonic())
    first = value(m, "dms_heartbeat_age_seconds")
    assert 0 <= first < 1
    wait_until(lambda: value(m, "dms_heartbeat_age_seconds") >= first + 0.2, 5, "heartbeat age to grow")
    m.heartbeat_ok(time.monotonic() - 30)
    assert 30 <= value(m, "dms_heartbeat_age_seconds") < 31
    m.heartbeat_ok(time.monotonic())
    assert value(m, "dms_heartbeat_age_seconds") < 1


def test_leadership_transitions_count_real_changes_only():
    m = Metrics("w")
    for leading in (False, True, True, True, False, False, True):
        m.set_leader(leading)
    assert value(m, "dms_leadership_changes_total") == 3
    assert value(m, "dms_leader") == 1


def test_execution_counters_and_histograms():
    m = Metrics("w")
    m.execution_started("A", 0.003)
    m.execution_started("A", None)            # unknown pickup time: counted, not observed
    m.execution_started("A", -0.2)            # clock skew: observed as 0
    m.execution_finished("A", "completed", 1.0)
    m.execution_finished("A", "failed", 7.0)
    m.execution_finished("A", "bogus", 1.0)   # outside the fixed set: folded, never a new label
    s = samples(m)
    assert value(m, "dms_executions_started_total", mapref="A") == 3
    assert value(m, "dms_pickup_latency_seconds_count") == 2
    assert value(m, "dms_pickup_latency_seconds_bucket", le="0.001") == 1      # the clamped one
    assert value(m, "dms_pickup_latency_seconds_bucket", le="0.005") == 2
    assert value(m, "dms_executions_finished_total", mapref="A", outcome="completed") == 1
    assert value(m, "dms_executions_finished_total", mapref="A", outcome="failed") == 1
    assert {l["outcome"] for l, _ in s["dms_executions_finished_total"]} == {"completed", "failed", "other"}
    assert value(m, "dms_execution_duration_seconds_count", mapref="A") == 3
    assert value(m, "dms_execution_duration_seconds_sum", mapref="A") == 9.0
    buckets = {l["le"] for l, _ in s["dms_execution_duration_seconds_bucket"]}
    assert {"0.01", "3600.0", "+Inf"} <= buckets
    assert {"0.001", "60.0"} <= {l["le"] for l, _ in s["dms_pickup_latency_seconds_bucket"]}


def test_simple_counters_and_gauges():
    m = Metrics("w")
    m.claimed(3)
    m.claimed(0)
    m.retried()
    m.rescued(4)
    m.stop_applied()
    m.timed_out()
    m.db_error()
    m.db_error()
    m.reconnected()
    m.set_slots(3, 8)
    m.occurrences_enqueued(2, [0.5, 90.0])
    m.schedule_invalid("bad_cron")
    m.schedule_invalid("no such reason")
    assert value(m, "dms_requests_claimed_total") == 3
    assert value(m, "dms_retries_total") == 1
    assert value(m, "dms_rescued_requests_total") == 4
    assert value(m, "dms_stops_applied_total") == 1
    assert value(m, "dms_timeouts_total") == 1
    assert value(m, "dms_db_errors_total") == 2
    assert value(m, "dms_db_reconnects_total") == 1
    assert value(m, "dms_execution_slots_busy") == 3
    assert value(m, "dms_execution_slots") == 8
    assert value(m, "dms_occurrences_enqueued_total") == 2
    assert value(m, "dms_occurrence_lateness_seconds_bucket", le="60.0") == 1
    assert value(m, "dms_occurrence_lateness_seconds_count") == 2
    assert value(m, "dms_schedule_invalid_total", reason="bad_cron") == 1
    assert value(m, "dms_schedule_invalid_total", reason="other") == 1
    assert value(m, "dms_schedule_invalid_total", reason="bad_code") == 0    # exists from the start
    assert not any("_created" in name for name in samples(m))


def test_methods_are_cheap():
    """They run in the claim loop: thousands per millisecond-ish, never a scrape's worth of work."""
    m = busy_metrics()
    start = time.perf_counter()
    for i in range(10_000):
        m.execution_started("EXPORT", 0.01)
        m.execution_finished("EXPORT", "completed", 0.2)
        m.claimed(1)
        m.heartbeat_ok(time.monotonic())
        m.set_slots(i % 4, 4)
    per_round = (time.perf_counter() - start) / 10_000
    assert per_round < 500e-6, f"{per_round * 1e6:.0f} µs per round of five calls"


# -- promtool --------------------------------------------------------------------------------------
def test_promtool_check_metrics_on_a_scrape():
    tool = promtool()
    m = busy_metrics()
    srv = serve(m, "127.0.0.1", -1, lambda: (True, ""))
    try:
        _, _, text = get(f"http://127.0.0.1:{srv.port}/metrics")
    finally:
        srv.close()
    result = subprocess.run([tool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr


def test_promtool_check_rules():
    result = subprocess.run([promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_alert_unit_tests():
    """metrics/alerts_test.yml: each alert fires on the series it is about, and not otherwise."""
    result = subprocess.run([promtool(), "test", "rules", ALERT_TESTS.name], cwd=ALERT_TESTS.parent,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# -- names used by the alerts and the dashboard ----------------------------------------------------
def exported() -> dict[str, set[str]]:
    """Every sample name a replica can export (leader included) -> its label names."""
    out: dict[str, set[str]] = {}
    for name, rows in samples(busy_metrics()).items():
        out[name] = set().union(*(set(l) for l, _ in rows)) | TARGET_LABELS
    return out


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    found = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                found.append((p["title"], t["expr"]))
            walk(p.get("panels", []))
    walk(dash["panels"])
    return found


def alert_exprs() -> list[tuple[str, str]]:
    """(alert, expr) pairs of alerts.yml. No YAML library is a dependency: this reads the two
    forms the file uses, `expr: <one line>` and `expr: |` with an indented block; promtool
    (test_promtool_check_rules) checks the file as YAML."""
    lines = ALERTS.read_text().splitlines()
    found: list[tuple[str, str]] = []
    alert = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if m := re.match(r"\s*- alert:\s*(\S+)", line):
            alert = m.group(1)
        elif (m := re.match(r"(\s*)expr:\s*(.*)$", line)) and alert:
            indent, rest = len(m.group(1)), m.group(2).strip()
            if rest in ("|", ">", "|-", ">-"):
                block = []
                while i + 1 < len(lines) and (not lines[i + 1].strip()
                                              or len(lines[i + 1]) - len(lines[i + 1].lstrip()) > indent):
                    i += 1
                    block.append(lines[i].strip())
                rest = " ".join(b for b in block if b)
            found.append((alert, rest))
            alert = None
        i += 1
    assert len(found) == sum(1 for l in lines if re.match(r"\s*- alert:", l)) > 0
    return found


SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def check_expr(where: str, expr: str, names: dict[str, set[str]]) -> list[str]:
    problems = []
    no_strings = re.sub(r'"[^"]*"', '""', expr)
    used = {t for t in re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", no_strings) if t.startswith("dms_")}
    if not used and not (set(re.findall(r"\b\w+\b", no_strings)) & SYNTHETIC):
        problems.append(f"{where}: references no dms_ metric: {expr}")
    for name in sorted(used - set(names)):
        problems.append(f"{where}: {name} is not exported")
    labels_here = set(TARGET_LABELS)
    for name in used & set(names):
        labels_here |= names[name]
    for name, body in SELECTOR.findall(no_strings):
        for label in MATCHER.findall(body):
            if name in names and label not in names[name]:
                problems.append(f"{where}: {name} has no label {label!r}")
    for group in GROUPING.findall(no_strings):
        for label in filter(None, (g.strip() for g in group.split(","))):
            if label not in labels_here:
                problems.append(f"{where}: groups by {label!r}, which no metric in the expression has")
    return problems


def test_dashboard_is_valid_grafana_json():
    dash = json.loads(DASHBOARD.read_text())
    assert 36 <= dash["schemaVersion"] <= 41
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(panels) >= 14
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p["targets"], p["title"]


def test_dashboard_datasource_is_a_variable_so_file_provisioning_works():
    """`${DS_PROMETHEUS}` is filled in only by the import dialog; a provisioned file keeps it
    literally and every panel fails. A datasource variable works both ways."""
    text = DASHBOARD.read_text()
    dash = json.loads(text)
    assert "${DS_" not in text and "__inputs" not in dash
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["job"]["datasource"]["uid"] == "${datasource}"
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        for target in p["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", p["title"]


def test_every_dashboard_selector_can_match_an_exported_series():
    """A panel whose label matchers no replica ever exports (finished statuses from the queue
    gauges, which count waiting and running rows only) can never show data."""
    exported_samples = samples(busy_metrics())
    problems = []
    for where, expr in dashboard_exprs():
        for name, body in SELECTOR.findall(expr):
            if not name.startswith("dms_"):
                continue
            matchers = [(label, op, val) for label, op, val in
                        re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"', body)
                        if label not in TARGET_LABELS]

            def matches(labels: dict[str, str]) -> bool:
                for label, op, val in matchers:
                    have = labels.get(label, "")
                    ok = {"=": have == val, "!=": have != val,
                          "=~": re.fullmatch(val, have) is not None, "!~": re.fullmatch(val, have) is None}[op]
                    if not ok:
                        return False
                return True
            if not any(matches(l) for l, _ in exported_samples.get(name, [])):
                problems.append(f"{where}: {name}{{{body}}} matches nothing a replica exports")
    assert not problems, "\n".join(problems)


def test_dashboard_and_alerts_use_only_exported_metrics_and_labels():
    names = exported()
    problems = []
    for where, expr in dashboard_exprs():
        problems += check_expr(f"dashboard panel {where!r}", expr, names)
    for where, expr in alert_exprs():
        problems += check_expr(f"alert {where}", expr, names)
    assert not problems, "\n".join(problems)


def test_the_name_check_catches_a_typo():
    names = exported()
    assert check_expr("x", "rate(dms_executions_finish_total[5m])", names)
    assert check_expr("x", 'dms_leader{status="NEW"}', names)
    assert check_expr("x", "sum by (mapref) (dms_leader)", names)
    assert not check_expr("x", 'sum by (mapref, le) (rate(dms_execution_duration_seconds_bucket{job="a"}[5m]))', names)


def test_the_documented_alertmanager_inhibit_rule_is_valid(tmp_path):
    """docs/operations.md's inhibit rule, in a minimal alertmanager.yml, passes amtool."""
    tool = shutil.which("amtool")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("amtool is required under CI (.ci/run unpacks it from prometheus-alertmanager)")
        pytest.skip("amtool not installed (apt-get install prometheus-alertmanager)")
    text = (REPO / "docs" / "operations.md").read_text()
    (block,) = [b for b in re.findall(r"^```yaml\n(.*?)^```", text, re.M | re.S) if "inhibit_rules:" in b]
    config = tmp_path / "alertmanager.yml"
    config.write_text("route:\n  receiver: pager\nreceivers:\n  - name: pager\n" + block)
    result = subprocess.run([tool, "check-config", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "1 inhibit rules" in result.stdout, result.stdout + result.stderr

