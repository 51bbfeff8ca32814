"""The alert rules and the dashboard: promtool checks and unit tests, links, coverage."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "conf" / "prometheus" / "imdsd-alerts.yml"
RULE_TESTS = ROOT / "conf" / "prometheus" / "imdsd-alerts.test.yml"
DASHBOARD = ROOT / "conf" / "grafana" / "imdsd.json"
README = ROOT / "README.md"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package 'prometheus')"
)
#: What issue 14 asks the rules to cover, and the metric each alert must watch.
COVERED = {
    "ImdsdDown": "up",
    "ImdsdTargetMissing": "absent(up",
    "ImdsdDataStale": "imdsd_upstream_stale",
    "ImdsdUpstreamThrottled": "imdsd_upstream_throttled_total",
    "ImdsdBudgetSaturated": "imdsd_budget_in_use",
    "ImdsdHookFailing": "imdsd_hook_runs_total",
    "ImdsdHookGaveUp": "imdsd_hook_failures_total",
    "ImdsdWatchersOverflowing": "imdsd_watch_overflows_total",
    "ImdsdStateNotSaved": "imdsd_state_save_failures_total",
}


def alerts() -> dict[str, str]:
    """Alert name -> its rule's text (the rules file is a flat list of alerts)."""
    text = RULES.read_text()
    parts = re.split(r"\n      - alert: ", text)[1:]
    return {part.split("\n", 1)[0].strip(): part for part in parts}


def github_anchor(heading: str) -> str:
    """The anchor GitHub (and most renderers) give a Markdown heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def readme_anchors() -> set[str]:
    """Anchors of every heading in the README."""
    return {
        github_anchor(line.lstrip("#"))
        for line in README.read_text().splitlines()
        if line.startswith("#")
    }


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run promtool in the rules directory."""
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *argv],
        check=False,
        cwd=RULES.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )


@needs_promtool
def test_promtool_check_rules_is_clean() -> None:
    result = run("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(COVERED)} rules found" in result.stdout
    assert "WARNING" not in (result.stdout + result.stderr).upper()


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    result = run("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_asked_for_alert_exists_with_a_for_and_severity() -> None:
    rules = alerts()
    assert set(rules) == set(COVERED)
    for name, text in rules.items():
        expr = text.split("expr:", 1)[1].split("\n        for:", 1)[0]
        assert COVERED[name] in expr, name
        assert re.search(r"\n        for: \d+m\n", text), f"{name} has no for:"
        assert re.search(r"severity: (critical|warning)\n", text), name


def test_every_alert_has_a_unit_test_that_fires_and_one_that_does_not() -> None:
    tests = RULE_TESTS.read_text()
    for name in COVERED:
        blocks = tests.split(f"alertname: {name}\n")[1:]
        fired = [b for b in blocks if b.lstrip().startswith("exp_alerts:\n")]
        quiet = [b for b in blocks if b.lstrip().startswith("exp_alerts: []")]
        assert fired, f"no promtool case where {name} fires"
        assert quiet, f"no promtool case where {name} stays quiet"


def test_runbook_links_point_at_readme_sections_that_exist() -> None:
    anchors = readme_anchors()
    for name, text in alerts().items():
        [link] = re.findall(r'runbook_url: "file:///usr/share/doc/imdsd/README.md#([\w-]+)"', text)
        assert link == name.lower()
        assert link in anchors, f"{name}: README has no section #{link}"


def test_dashboard_is_importable_and_fleet_wide() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= set(variables)
    assert variables["instance"]["multi"]
    assert variables["instance"]["includeAll"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for expr in exprs:
        for name in re.findall(r"\b(imdsd_[a-z_]+)\{", expr):
            assert f'{name}{{job=~"$job", instance=~"$instance"}}' in expr, expr
    text = " ".join(exprs)
    for family in (
        "imdsd_upstream_requests_total",
        "imdsd_upstream_throttled_total",
        "imdsd_budget_in_use",
        "imdsd_revision",
        "imdsd_changes_total",
        "imdsd_fetch_duration_seconds_bucket",
        "imdsd_watchers",
        "imdsd_connections",
        "imdsd_hook_runs_total",
        "imdsd_hook_failures_total",
        "imdsd_hook_duration_seconds_sum",
    ):
        assert family in text, family
