"""A real Prometheus server (Debian's `prometheus`, a plain process on a free port with its own data
directory, scraping every second) scrapes the edge, the control plane and the node of a running fleet.
After known traffic through the official `openai` client, PromQL over /api/v1/query returns the expected
series and counts: requests, prompt and completion tokens equal to the usage the client saw, and a
time-to-first-token histogram with one observation per generation.

There is no PyPI wheel of the Prometheus server. When it is missing the test fails with the command that
installs it (`make test` runs scripts/test_tools.sh, which installs it as root on Debian, as in CI): it
never passes without it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from launcher.default_model import default_model_path
from mesh.lifecycle import free_port
from tests.cluster import MODEL, Cluster, Proc, smollm_entry, streamed_chat, wait_for, write_catalog

pytestmark = [pytest.mark.model, pytest.mark.cluster]

INSTALL = (
    "apt-get update && apt-get install -y prometheus (Debian/Ubuntu, as root; make test does it with"
    " scripts/test_tools.sh),"
    " or put the prometheus binary of https://prometheus.io/download/ on the PATH"
)
DOCKER = Path(__file__).resolve().parent.parent / "docker"
ALERTS = DOCKER / "alerts.yml"
# Scrapes come every second; a query's answer may lag a couple of scrapes on two busy cores, and Prometheus
# itself takes a few seconds to start: generous bounds, which only a broken scrape exceeds.
SCRAPE_WAIT = 60


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        pytest.fail(f"the Prometheus server is not installed; this test needs a real one: {INSTALL}")
    return found


def scrape_config(targets: dict[str, str]) -> dict[str, Any]:
    """One job per service (job name: the service), scraped every second over plain HTTP, with the alerting
    rules the compose fleet's Prometheus loads (docker/alerts.yml)."""
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [t]}]} for job, t in targets.items()],
    }


@dataclass
class Prometheus:
    url: str

    def query(self, promql: str) -> list[dict[str, Any]]:
        reply = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10)
        body = reply.json()
        assert reply.status_code == 200 and body["status"] == "success", body
        return list(body["data"]["result"])

    def scalar(self, promql: str) -> float | None:
        """The value of a query with one series (None when it has none)."""
        result = self.query(promql)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, promql: str, expected: float) -> None:
        """Until the query answers `expected` (scrapes arrive every second)."""
        seen: list[float | None] = []
        try:
            wait_for(lambda: seen.append(self.scalar(promql)) or seen[-1] == expected, SCRAPE_WAIT, promql)
        except TimeoutError:
            pytest.fail(f"{promql} answered {seen[-5:]} (last five), expected {expected}")


@dataclass
class Fleet:
    cluster: Cluster
    http: str
    prometheus: Prometheus


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    binary = prometheus_binary()
    workdir = tmp_path_factory.mktemp("prometheus")
    cluster = Cluster(workdir)
    procs: list[Proc] = []
    try:
        cluster.start_etcd()
        cp_metrics, node_metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        # A deployment (not a node's own catalog): the control plane's series of deployments and replicas too.
        deployments = write_catalog(workdir / "deployments.yaml", [smollm_entry()])
        cluster.start_controlplane(3, "--deployments", str(deployments), "--metrics-listen", cp_metrics)
        models_dir = str(default_model_path().parent)
        cluster.start_node("node-a", models_dirs=[models_dir], extra=("--metrics-listen", node_metrics))
        _, http, _ = cluster.start_edge()
        cluster.wait_model_state(http, MODEL)

        config = workdir / "prometheus.yml"
        targets = {"edge": http.removeprefix("http://"), "controlplane": cp_metrics, "node": node_metrics}
        config.write_text(yaml.safe_dump(scrape_config(targets)))
        url = f"http://127.0.0.1:{free_port()}"
        argv = [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address={url.removeprefix('http://')}",
        ]
        server = Proc("prometheus", argv, workdir)
        procs.append(server)
        wait_for(lambda: httpx.get(f"{url}/-/ready", timeout=2).status_code == 200, 60, "Prometheus", server)
        yield Fleet(cluster, http, Prometheus(url))
    except BaseException:
        print(cluster.logs(), *(p.log_text() for p in procs))
        raise
    finally:
        for proc in procs:
            proc.stop()
        cluster.close()


def test_prometheus_scrapes_all_three_services(fleet: Fleet) -> None:
    prometheus = fleet.prometheus
    for job in ("edge", "controlplane", "node"):
        prometheus.wait_for(f'up{{job="{job}"}}', 1)
    # Each job serves fleetlm's own series, under its component's prefix.
    for job, prefix in (
        ("edge", "fleetlm_edge_"),
        ("controlplane", "fleetlm_controlplane_"),
        ("node", "fleetlm_node_"),
    ):
        series = prometheus.query(f'count({{job="{job}", __name__=~"{prefix}.+"}})')
        assert series and float(series[0]["value"][1]) > 0, f"no {prefix}* series from the {job}"


def test_promql_counts_what_the_openai_client_saw(fleet: Fleet) -> None:
    client = openai.OpenAI(base_url=f"{fleet.http}/v1", api_key="unused", max_retries=0, timeout=120)
    prompt_tokens = completion_tokens = 0
    chats = completions = 0
    with_text = 0  # generations whose client received text: each has one first token
    for i in range(3):
        text, prompt, completion = streamed_chat(client, f"Count from {i} to {i + 5}.", 8)
        prompt_tokens += prompt
        completion_tokens += completion
        chats += 1
        with_text += bool(text)
    for i in range(2):
        reply = client.completions.create(model=MODEL, prompt=f"The number {i} is", max_tokens=6, temperature=0)
        assert reply.usage is not None
        prompt_tokens += reply.usage.prompt_tokens
        completion_tokens += reply.usage.completion_tokens
        completions += 1
        with_text += bool(reply.choices[0].text)
    assert completion_tokens > 0 and with_text > 0

    prometheus = fleet.prometheus
    model = f'model="{MODEL}"'
    prometheus.wait_for(
        f'sum(fleetlm_edge_requests_total{{{model}, route="/v1/chat/completions", status="200"}})', chats
    )
    prometheus.wait_for(
        f'sum(fleetlm_edge_requests_total{{{model}, route="/v1/completions", status="200"}})', completions
    )
    prometheus.wait_for(f"sum(fleetlm_edge_prompt_tokens_total{{{model}}})", prompt_tokens)
    prometheus.wait_for(f"sum(fleetlm_edge_generation_tokens_total{{{model}}})", completion_tokens)
    prometheus.wait_for(f"sum(fleetlm_edge_time_to_first_token_seconds_count{{{model}}})", with_text)
    # The histogram's buckets are there to compute quantiles with: the median first token is a real time.
    median = prometheus.scalar(
        f"histogram_quantile(0.5, sum by (le) (fleetlm_edge_time_to_first_token_seconds_bucket{{{model}}}))"
    )
    assert median is not None and 0 < median < 80
    prometheus.wait_for(f"sum(fleetlm_edge_e2e_request_latency_seconds_count{{{model}}})", chats + completions)
    # The node served them all, and counted the same usage; the control plane sees the fleet it placed.
    prometheus.wait_for(f'sum(fleetlm_node_requests_total{{{model}, outcome="ok"}})', chats + completions)
    prometheus.wait_for(f"sum(fleetlm_node_generation_tokens_total{{{model}}})", completion_tokens)
    prometheus.wait_for(f"sum(fleetlm_node_prompt_tokens_total{{{model}}})", prompt_tokens)
    prometheus.wait_for(f'fleetlm_node_replica_state{{{model}, state="ready"}}', 1)
    prometheus.wait_for(f'sum(fleetlm_controlplane_replicas{{{model}, state="ready"}})', 1)
    prometheus.wait_for(f"sum(fleetlm_controlplane_deployment_replicas{{{model}}})", 1)
    prometheus.wait_for("fleetlm_controlplane_is_leader", 1)
    prometheus.wait_for('fleetlm_controlplane_nodes{state="active"}', 1)


# --- docker/: the compose fleet's Prometheus and the Grafana dashboard ---------------------------------------

DASHBOARD = DOCKER / "grafana" / "fleetlm-dashboard.json"
# Series that exist only once something rare happened (a 429): the dashboard may query them before then.
RARE_SERIES = {"fleetlm_edge_rate_limited_total"}


def dashboard_series() -> set[str]:
    """Every fleetlm series the dashboard's queries name (a histogram by its _bucket series)."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    return {name for e in exprs for name in re.findall(r"\bfleetlm_[a-z0-9_]+", e)}


def test_compose_runs_prometheus_beside_the_fleet_and_scrapes_every_service(tmp_path: Path) -> None:
    # No Docker Compose on the machines this runs on: the files are checked for what compose and Prometheus
    # would need of them. `promtool check config` is Prometheus's own check of the scrape configuration.
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    prometheus = services["prometheus"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    assert "./alerts.yml:/etc/prometheus/alerts.yml:ro" in prometheus["volumes"]  # its rule_files, beside it
    assert "fleet:/fleet:ro" in prometheus["volumes"]  # the fleet CA it trusts
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    grafana = services["grafana"]
    assert f"./grafana/{DASHBOARD.name}:/var/lib/grafana/dashboards/{DASHBOARD.name}:ro" in grafana["volumes"]
    for provisioning in (DOCKER / "grafana" / "provisioning").rglob("*.yaml"):
        assert yaml.safe_load(provisioning.read_text())["apiVersion"] == 1

    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"edge", "controlplane", "node"}
    listen = {"edge": "--http-listen", "controlplane": "--metrics-listen", "node": "--metrics-listen"}
    for name, job in jobs.items():
        (target,) = job["static_configs"][0]["targets"]
        host, port = target.split(":")
        # The target is the compose service of that name, on the port its command listens on, over TLS
        # checked against the name fleet-init.sh puts in its certificate.
        command = services[host]["command"].split()
        assert host == name and command[command.index(listen[name]) + 1] == f"0.0.0.0:{port}"
        assert job["scheme"] == "https" and job["tls_config"]["server_name"] == name
        assert job["tls_config"]["ca_file"] == "/fleet/ca/ca.crt"

    promtool = shutil.which("promtool") or pytest.fail(f"promtool (of the Prometheus package) is missing: {INSTALL}")
    ca = tmp_path / "ca.crt"
    ca.write_text("")  # promtool checks that the CA file is there, not what it holds
    local = tmp_path / "prometheus.yml"
    local.write_text((DOCKER / "prometheus.yml").read_text().replace("/fleet/ca/ca.crt", str(ca)))
    shutil.copy(ALERTS, tmp_path / ALERTS.name)  # promtool checks the rule files the configuration names too
    checked = subprocess.run([promtool, "check", "config", str(local)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 9 rules found" in checked.stdout, checked.stdout


def test_each_alert_fires_when_it_should_and_not_otherwise() -> None:
    """promtool's unit tests of the rules (tests/alerts_test.yml): synthetic series, one case each that must
    raise the alert and one that must not (a control plane whose view lags, client errors, a moment's
    unreachable node)."""
    promtool = shutil.which("promtool") or pytest.fail(f"promtool (of the Prometheus package) is missing: {INSTALL}")
    tests = Path(__file__).resolve().parent / "alerts_test.yml"
    done = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


def test_every_series_the_dashboard_shows_is_scraped(fleet: Fleet) -> None:
    # Each name the Grafana dashboard queries exists in the real Prometheus, so no panel stays empty for
    # want of a series that is not there (a misspelt or renamed metric).
    dashboard = json.loads(DASHBOARD.read_text())
    titles = {p["title"] for p in dashboard["panels"]}
    for wanted in (
        "Time to first token (edge)",
        "Inter-token latency (edge)",
        "End-to-end latency (edge)",
        "Errors by code",
        "Tokens per second",
        "In flight",
        "Replicas by state",
        "Nodes",
        "KV cache use",
        "Unreachable nodes (edge)",
        "Routing table age (edge)",
        "Control planes: leaders and etcd errors",
        "Alerts firing",
    ):
        assert wanted in titles  # fmt: skip
    # One generation of its own, so that the series counted per request exist whatever ran before.
    client = openai.OpenAI(base_url=f"{fleet.http}/v1", api_key="unused", max_retries=0, timeout=120)
    client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, temperature=0)
    missing: list[str] = []

    def scraped() -> bool:
        missing[:] = [n for n in sorted(dashboard_series() - RARE_SERIES)
                      if not fleet.prometheus.query(f'count({{__name__="{n}"}})')]  # fmt: skip
        return not missing

    try:
        wait_for(scraped, SCRAPE_WAIT, "every series of the dashboard")
    except TimeoutError:
        pytest.fail(f"the dashboard queries series Prometheus does not have: {missing}")
    # And every query is PromQL this Prometheus takes, with Grafana's variables as a user would have them.
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$model", ".*")
            fleet.prometheus.query(expr)  # asserts a successful answer


def test_the_alert_rules_evaluate_on_a_real_fleet_and_none_fires_while_it_is_healthy(fleet: Fleet) -> None:
    """The rules of docker/alerts.yml loaded by the real Prometheus beside a real fleet: each evaluates
    without error, every fleetlm series it names is scraped (a misspelt metric would never fire), and none
    is pending or firing while every component is up and the deployment's replica serves."""
    names = {name for name in re.findall(r"\bfleetlm_[a-z0-9_]+", ALERTS.read_text())}
    assert len(names) >= 7, names
    rules: list[dict[str, Any]] = []

    def evaluated() -> bool:
        groups = httpx.get(f"{fleet.prometheus.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules[:] = [r for g in groups for r in g["rules"]]
        return len(rules) == 9 and all(r["health"] != "unknown" for r in rules)

    wait_for(evaluated, SCRAPE_WAIT, "every alerting rule evaluated")
    assert [(r["name"], r["health"], r.get("lastError", "")) for r in rules if r["health"] != "ok"] == []
    missing: list[str] = []

    def scraped() -> bool:
        missing[:] = [n for n in sorted(names) if not fleet.prometheus.query(f'count({{__name__="{n}"}})')]
        return not missing

    try:
        wait_for(scraped, SCRAPE_WAIT, "every series the alerting rules name")
    except TimeoutError:
        pytest.fail(f"the alerting rules name series Prometheus does not have: {missing}")
    time.sleep(3)  # a few evaluations (every second) over the scraped series
    alerts = httpx.get(f"{fleet.prometheus.url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    assert [(a["labels"]["alertname"], a["state"]) for a in alerts] == []
