"""Prometheus and Grafana, checked with promtool: scrape config, rules and their unit tests, alerts, and the dashboard.

The alerts are the ones the runbook needs; the dashboard must import and query only metrics the service exports.
"""

from __future__ import annotations

import re

import yaml

from tests.deploy_artefacts import (
    INFERENCE_ROUTES,
    PROM,
    STANDARD_METRICS,
    dashboard,
    dashboard_targets,
    exported_metric_names,
    grafana_to_promql,
    promql_metric_names,
    promtool,
    recorded_names,
    rule_groups,
    run,
)

# ---- the checker's own checks ----------------------------------------------------------------------------------------

def test_promql_parser_finds_metric_names():
    expr = ('histogram_quantile(0.99, sum by (le, route) (rate(foo_seconds_bucket{job=~"$job", le!="1"}[5m]))) '
            '/ ignoring (x) bar:ratio offset 15m > 0.5 and on (job) absent(up{job="a"}) or baz == bool 1e3')
    assert promql_metric_names(expr) == {"foo_seconds_bucket", "bar:ratio", "up", "baz"}


def test_exported_metric_names_are_derived_from_the_service():
    names = exported_metric_names()
    assert {"convserve_requests_total", "convserve_request_duration_seconds_bucket", "convserve_ready"} <= names
    assert "convserve_requests" not in names and "convserve_ready_total" not in names


# ---- Prometheus ------------------------------------------------------------------------------------------------------



def test_promtool_check_config():
    result = run([promtool(), "check", "config", "prometheus.yml"], cwd=PROM)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout + result.stderr


def test_promtool_check_rules():
    result = run([promtool(), "check", "rules", "rules.yml"], cwd=PROM)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules():
    result = run([promtool(), "test", "rules", "rules_test.yml"], cwd=PROM)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_prometheus_scrapes_the_service():
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["convserve"]["metrics_path"] == "/metrics"
    assert config["rule_files"] == ["rules.yml"]


def test_the_required_alerts_exist():
    alerts = {rule["alert"]: rule for group in rule_groups() for rule in group["rules"] if "alert" in rule}
    assert {"ConvserveHighErrorRate", "ConvserveHighLatencyP99", "ConvserveNoReadyReplica",
            "ConvserveModelLoadFailures", "ConvserveModelNotLoaded", "ConvserveSheddingLoad"} <= set(alerts)
    assert "convserve_ready" in alerts["ConvserveNoReadyReplica"]["expr"]
    assert "up{" in alerts["ConvserveNoReadyReplica"]["expr"]
    # New versions load and old ones unload while pods serve (MODEL_POLL_SECONDS): a version at
    # convserve_model_loaded 0 is normal then; the critical alert is about a model with nothing served.
    not_loaded = alerts["ConvserveModelNotLoaded"]["expr"]
    assert alerts["ConvserveModelNotLoaded"]["labels"]["severity"] == "critical"
    assert "convserve_model_served" in not_loaded
    for labels in re.findall(r"\bby \(([^)]*)\)", not_loaded):
        assert "version" not in labels, "per model: one version unloaded or failed while another serves is no outage"
    assert "increase(convserve_model_load_failures_total" in alerts["ConvserveModelLoadFailures"]["expr"]
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_shedding_alert_is_the_shed_share_of_inference_requests():
    """ConvserveSheddingLoad: shed over the inference routes' requests (not health checks), > 5% for 10 minutes."""
    rules = {rule.get("alert") or rule["record"]: rule for group in rule_groups() for rule in group["rules"]}
    alert = rules["ConvserveSheddingLoad"]
    assert alert["for"] == "10m" and alert["labels"]["severity"] == "warning"
    ratio = re.fullmatch(r"(\S+) > 0\.05", alert["expr"]).group(1)
    shed, inference = (name.strip() for name in rules[ratio]["expr"].split(" / "))
    assert "rate(convserve_shed_total{" in rules[shed]["expr"] and "[5m]" in rules[shed]["expr"]
    assert "convserve_requests_total{" in rules[inference]["expr"] and INFERENCE_ROUTES in rules[inference]["expr"]
    for word in ("MAX_QUEUE", "QUEUE_TIMEOUT", "maxReplicas"):
        assert word in alert["annotations"]["description"], f"the description should say what to do ({word})"


def test_drift_alerts_compare_the_served_answers_with_the_baselines():
    """ConvserveOutOfDomainShareHigh and ConvserveConfidenceDrift: per model version, what is served against what
    validation measured at export (convserve_model_baseline), sustained, and only with enough traffic."""
    rules = {rule.get("alert") or rule["record"]: rule for group in rule_groups() for rule in group["rules"]}

    def sources(name: str) -> set[str]:  # the metrics a rule reads, through the recording rules it uses
        found = set()
        for used in promql_metric_names(rules[name]["expr"]):
            found |= {used} | (sources(used) if used in rules else set())
        return found

    for name in ("ConvserveOutOfDomainShareHigh", "ConvserveConfidenceDrift"):
        alert = rules[name]
        assert alert["for"] == "30m" and alert["labels"]["severity"] == "warning", name
        assert "convserve_model_baseline" in sources(name), f"{name} compares with the baselines"
        assert "on (namespace, job, model, version)" in alert["expr"], f"{name}: per model version"
        assert re.search(r"and on \(namespace, job, model, version\) \S+ > 0\.1$", alert["expr"]), \
            f"{name}: a traffic floor, so that a quiet service does not alert"
        for words in ("recent inputs", "retrain", "recalibrate", "/v1/models/", "baselines"):
            assert words in alert["annotations"]["description"], f"{name}: the description should say {words!r}"
    assert {"convserve_out_of_domain_total", "convserve_confidence_count"} <= sources("ConvserveOutOfDomainShareHigh")
    assert "convserve_confidence_sum" in sources("ConvserveConfidenceDrift")
    assert "abs(" in rules["ConvserveConfidenceDrift"]["expr"], "confidence drift both ways"


def test_every_alert_is_tested_firing_and_not_firing():
    alerts = {rule["alert"] for group in rule_groups() for rule in group["rules"] if "alert" in rule}
    tests = yaml.safe_load((PROM / "rules_test.yml").read_text())
    assert tests["rule_files"] == ["rules.yml"]
    fired, quiet = set(), set()
    for test in tests["tests"]:
        for case in test.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert alerts <= fired, f"alerts never tested firing: {sorted(alerts - fired)}"
    assert alerts <= quiet, f"alerts never tested staying quiet: {sorted(alerts - quiet)}"


def test_rules_use_only_exported_metrics():
    allowed = exported_metric_names() | STANDARD_METRICS
    recorded = recorded_names()
    used = set()
    for group in rule_groups():
        for rule in group["rules"]:
            used |= promql_metric_names(rule["expr"])
    assert used, "no metric names parsed from rules.yml"
    unknown = {name for name in used if name not in allowed and name not in recorded}
    assert not unknown, f"rules.yml uses metrics the service does not export: {sorted(unknown)}"
    assert {"convserve_requests_total", "convserve_request_duration_seconds_bucket", "convserve_ready",
            "convserve_model_load_failures_total", "convserve_model_loaded", "convserve_model_served"} <= used


# ---- Grafana ---------------------------------------------------------------------------------------------------------

def test_dashboard_is_importable():
    board = dashboard()
    assert board["title"] and board["uid"] and isinstance(board["schemaVersion"], int)
    assert "id" not in board or board["id"] is None, "an id would clash on import"
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panel_ids = []

    def walk(panels):
        for panel in panels:
            panel_ids.append(panel["id"])
            assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
            if panel["type"] != "row":
                assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
                assert panel["targets"], f"panel {panel['title']} has no query"
                for target in panel["targets"]:
                    assert target["datasource"]["uid"] == "${DS_PROMETHEUS}" and target["refId"] and target["expr"]
            walk(panel.get("panels", []))

    walk(board["panels"])
    assert len(panel_ids) == len(set(panel_ids)), "panel ids must be unique"
    boxes = [(panel["title"], panel["gridPos"]) for panel in board["panels"]]
    for i, (title, a) in enumerate(boxes):
        assert a["x"] >= 0 and a["x"] + a["w"] <= 24, f"{title} is outside the 24-column grid"
        for other, b in boxes[i + 1:]:
            overlap = (a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
                       and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"])
            assert not overlap, f"panels {title!r} and {other!r} overlap"
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == "${DS_PROMETHEUS}"


def test_dashboard_uses_only_exported_metrics():
    allowed = exported_metric_names() | STANDARD_METRICS | recorded_names()
    used = set()
    for _, target in dashboard_targets():
        used |= promql_metric_names(grafana_to_promql(target["expr"]))
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", variable["query"]["query"]).group(1)
            used |= promql_metric_names(inner)
    unknown = used - allowed
    assert not unknown, f"the dashboard queries metrics the service does not export: {sorted(unknown)}"
    # every family the service exports is on the dashboard
    families = {name for name in exported_metric_names() if not name.endswith(("_sum", "_count"))}
    assert families - used == set(), f"exported metrics missing from the dashboard: {sorted(families - used)}"


def test_dashboard_panels_cover_the_brief():
    exprs: dict[str, str] = {}
    for title, target in dashboard_targets():
        exprs[title] = exprs.get(title, "") + " " + target["expr"]
    joined = " ".join(exprs.values())
    assert re.search(r"histogram_quantile\(0\.5,[^;]*convserve_request_duration_seconds_bucket", joined)
    assert re.search(r"histogram_quantile\(0\.99,[^;]*convserve_request_duration_seconds_bucket", joined)
    assert re.search(r"histogram_quantile\(0\.99, sum by \(model, version, le\)[^;]*"
                     r"convserve_inference_duration_seconds_bucket", joined), "inference latency per model"
    assert "sum by (label)" in exprs["Predicted class distribution"]
    assert "status=~\"5..\"" in exprs["Error ratio"]
    assert "convserve_batch_size" in exprs["Average batch size by model"]
    assert "convserve_requests_in_flight" in exprs["Requests in flight by pod"]
    # queue and load shedding
    queue_row = next(panel for panel in dashboard()["panels"] if panel["title"] == "Queue and load shedding")
    assert queue_row["type"] == "row"
    assert "convserve_queue_depth" in exprs["Queue depth and inference threads (all pods)"]
    assert "convserve_inference_threads" in exprs["Queue depth and inference threads (all pods)"]
    assert "sum by (instance) (convserve_queue_depth" in exprs["Queue depth and inference threads by pod"]
    assert "sum by (instance) (convserve_inference_threads" in exprs["Queue depth and inference threads by pod"]
    for quantile in ("0.5", "0.99"):
        assert re.search(rf"histogram_quantile\({quantile}, sum by \(le\) \(rate\(convserve_queue_wait_seconds_bucket",
                         exprs["Queue wait p50 / p99"])
    assert "sum by (reason) (rate(convserve_shed_total" in exprs["Shed requests/s by reason"]
    share = exprs["Shed share of inference requests"]
    assert "convserve_shed_total" in share and INFERENCE_ROUTES in share, "the same share as ConvserveSheddingLoad"
    # models and access: the panels sit in their row (below it, above the next row)
    panels = dashboard()["panels"]

    def in_row(title: str) -> set[str]:
        row = next(panel for panel in panels if panel["title"] == title)
        assert row["type"] == "row"
        top = row["gridPos"]["y"]
        bottom = min([panel["gridPos"]["y"] for panel in panels
                      if panel["type"] == "row" and panel["gridPos"]["y"] > top], default=10**6)
        return {panel["title"] for panel in panels if top < panel["gridPos"]["y"] < bottom}

    wanted = {
        "Models and access": {
            "Served version per model (pods serving it)": r"sum by \(model, version\) \(convserve_model_served\{",
            "Loaded versions per model (pods with it loaded)": r"sum by \(model, version\) \(convserve_model_loaded\{",
            "Model load failures": r"sum by \(model, version\) \(increase\(convserve_model_load_failures_total\{",
            "Auth failures/s by reason": r"sum by \(reason\) \(rate\(convserve_auth_failures_total\{",
        },
        # drift: what is served against what validation measured, over the hour the drift alerts look at
        "Drift: confidence and none-of-these": {
            "Mean confidence served vs baseline (1h)":
                r"rate\(convserve_confidence_sum\{[^}]*\}\[1h\]\).*rate\(convserve_confidence_count\{"
                r".*convserve_model_baseline\{[^}]*quantity=\"mean_confidence\"",
            "Out-of-domain (none of these) share vs baseline (1h)":
                r"rate\(convserve_out_of_domain_total\{[^}]*\}\[1h\]\).*rate\(convserve_confidence_count\{"
                r".*convserve_model_baseline\{[^}]*quantity=\"out_of_domain_share\"",
            "Confidence distribution": r"sum by \(le\) \(increase\(convserve_confidence_bucket\{",
            "Domain score p10 / p50 and mean vs baseline (1h)":
                r"histogram_quantile\(0\.1, sum by \(model, version, le\) \(rate\(convserve_domain_score_bucket\{"
                r".*quantity=\"mean_domain_score\"",
            "Precision serving (pods per model version)":
                r"count by \(model, version, precision\) \(convserve_model_info\{",
        },
    }
    for row, row_panels in wanted.items():
        titles = in_row(row)
        for title, pattern in row_panels.items():
            assert title in titles, f"{title!r} is not in the row {row!r}"
            assert re.search(pattern, exprs[title]), f"{title}: {exprs[title]}"


def test_dashboard_queries_are_valid_promql(tmp_path):
    """promtool parses every dashboard query (as recording rules), with Grafana's variables substituted."""
    rules = [{"record": f"dashboard:query_{i}", "expr": grafana_to_promql(target["expr"])}
             for i, (_, target) in enumerate(dashboard_targets())]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run([promtool(), "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout + result.stderr
