"""The Helm chart renders with real helm, and every object validates against Kubernetes' schemas.

helm comes from scripts/test-tools.sh (``make test`` runs it); the schemas from the
kubernetes-validate package. What cannot be checked here is a real install: no cluster.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from cli.stack import SERVICES

CHART = Path(__file__).parents[2] / "deploy" / "helm" / "steward"
HELM = shutil.which("helm") or str(Path(__file__).parents[2] / ".steward" / "tools" / "helm")
KUBERNETES = "1.30.0"
REQUIRED = [
    "--set",
    "database.url=postgresql+asyncpg://steward:pw@db:5432/steward",
    "--set",
    "secrets.apiKeyPepper=a-long-random-pepper",
]

pytestmark = pytest.mark.skipif(
    not Path(HELM).exists(), reason="helm is not installed (scripts/test-tools.sh fetches it)"
)


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - a fixed binary with our own arguments
        [HELM, *args], capture_output=True, text=True, timeout=60, check=False
    )


def render(*values: str) -> list[dict[str, Any]]:
    result = helm("template", "rel", str(CHART), "--namespace", "steward", *REQUIRED, *values)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def of_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def test_the_chart_lints_clean() -> None:
    result = helm("lint", str(CHART), "--strict", *REQUIRED)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "values",
    [
        [],
        ["--set", "gateway.autoscaling.enabled=false", "--set", "networkPolicy.enabled=false"],
        [
            "--set",
            "secrets.existingSecret=mine",
            "--set",
            "database.existingSecret=mine",
            "--set",
            "keycloak.url=https://sso.example.com",
            "--set",
            "keycloak.realm=ai",
            "--set",
            "inference.kserve.rbac=false",
        ],
    ],
    ids=["defaults", "no-hpa-no-netpol", "existing-secrets-keycloak"],
)
def test_every_rendered_object_is_valid_kubernetes(values: list[str]) -> None:
    objects = render(*values)
    assert objects
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)


def test_each_service_and_the_gateway_get_a_hardened_deployment_with_probes() -> None:
    objects = render()
    deployments = of_kind(objects, "Deployment")
    services = of_kind(objects, "Service")
    for name in (*SERVICES, "gateway"):
        assert f"rel-steward-{name}" in deployments, name
        assert f"rel-steward-{name}" in services, name
    for deployment in deployments.values():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            assert {"startupProbe", "livenessProbe", "readinessProbe"} <= set(container)
            assert container["resources"]["requests"]
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            env = {e["name"]: e for e in container["env"]}
            assert "secretKeyRef" in env["STEWARD_API_KEY_PEPPER"]["valueFrom"]
            assert "secretKeyRef" in env["STEWARD_DATABASE_URL"]["valueFrom"]


def test_only_approval_holds_the_audit_key_and_checkpoints_go_to_nats_alone() -> None:
    objects = render()
    holders = [
        name
        for name, deployment in of_kind(objects, "Deployment").items()
        for container in deployment["spec"]["template"]["spec"]["containers"]
        if any(e["name"] == "STEWARD_AUDIT_KEY" for e in container["env"])
    ]
    assert holders == ["rel-steward-approval"]
    (secret,) = of_kind(objects, "Secret").values()
    assert secret["data"]["audit-key"]
    config = next(iter(of_kind(objects, "ConfigMap").values()))
    assert config["data"]["STEWARD_AUDIT_CHECKPOINT_FILE"] == ""


def test_no_secret_lands_in_the_configmap() -> None:
    objects = render()
    config = next(iter(of_kind(objects, "ConfigMap").values()))
    text = yaml.safe_dump(config)
    assert "a-long-random-pepper" not in text
    assert "steward:pw" not in text


def test_migrations_run_as_a_hook_before_install_and_upgrade() -> None:
    jobs = of_kind(render(), "Job")
    (job,) = jobs.values()
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "steward migrate" in " ".join(args)


def test_only_the_inference_service_may_manage_kserve_resources() -> None:
    objects = render()
    (role,) = of_kind(objects, "ClusterRole").values()
    groups = {g for rule in role["rules"] for g in rule["apiGroups"]}
    assert groups == {"serving.kserve.io", ""}
    assert any("inferenceservices" in rule["resources"] for rule in role["rules"])
    (binding,) = of_kind(objects, "ClusterRoleBinding").values()
    assert binding["subjects"][0]["name"] == "rel-steward-inference"
    tokens = {
        name: d["spec"]["template"]["spec"]["automountServiceAccountToken"]
        for name, d in of_kind(objects, "Deployment").items()
    }
    assert [name for name, mounted in tokens.items() if mounted] == ["rel-steward-inference"]


def test_inference_runs_replicated_with_its_service_key() -> None:
    """Two replicas: one leads the reconciler (libs/common/lease.py), the other stands by, so a
    rolling update needs no Recreate."""
    inference = of_kind(render(), "Deployment")["rel-steward-inference"]
    assert inference["spec"]["replicas"] == 2
    assert "strategy" not in inference["spec"]
    env = {e["name"] for e in inference["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert {"STEWARD_INFERENCE_API_KEY", "STEWARD_UPSTREAM_CREDENTIAL_KEY"} <= env


def test_the_migration_job_installs_the_service_keys() -> None:
    (job,) = of_kind(render(), "Job").values()
    env = {e["name"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert {
        "STEWARD_BOOTSTRAP_API_KEY",
        "STEWARD_GATEWAY_API_KEY",
        "STEWARD_INFERENCE_API_KEY",
    } <= env


def test_every_replicated_component_has_a_disruption_budget_matching_its_pods() -> None:
    objects = render()
    budgets = of_kind(objects, "PodDisruptionBudget")
    deployments = of_kind(objects, "Deployment")
    assert set(budgets) == set(deployments)
    for name, budget in budgets.items():
        pods = deployments[name]["spec"]["template"]["metadata"]["labels"]
        selector = budget["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pods.items()
        assert budget["spec"]["maxUnavailable"] == 1
    # A component with one pod gets none: its budget would block every node drain.
    single = render("--set", "services.catalog.replicas=1")
    assert "rel-steward-catalog" not in of_kind(single, "PodDisruptionBudget")


def test_a_nats_cluster_is_named_with_its_stream_replicas() -> None:
    servers = "nats://nats-0.nats:4222,nats://nats-1.nats:4222,nats://nats-2.nats:4222"
    escaped = servers.replace(",", "\\,")  # --set splits values at commas
    objects = render("--set", f"nats.url={escaped}", "--set", "nats.replicas=3")
    (config,) = of_kind(objects, "ConfigMap").values()
    assert config["data"]["STEWARD_NATS_URL"] == servers
    assert config["data"]["STEWARD_NATS_REPLICAS"] == "3"


def test_the_gateway_scales_with_an_hpa() -> None:
    (hpa,) = of_kind(render(), "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"]["name"] == "rel-steward-gateway"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["--set", "gateway.replicas=0"], "gateway.replicas"),
        (["--set", "services.authz.port=70000"], "services.authz.port"),
        (["--set", "database.url=mysql://x"], "database.url"),
        (["--set", "secrets.bootstrapApiKey=not-a-key"], "secrets.bootstrapApiKey"),
        (["--set", "unknownTopLevel=1"], "unknownTopLevel"),
        (["--set", "services.inference.replicas=101"], "services.inference.replicas"),
    ],
)
def test_bad_values_are_refused_by_the_schema(values: list[str], message: str) -> None:
    result = helm("template", "rel", str(CHART), *REQUIRED, *values)
    assert result.returncode != 0
    assert message.split(".")[-1] in result.stderr


def test_a_missing_database_or_pepper_is_refused_with_a_clear_message() -> None:
    result = helm("template", "rel", str(CHART), "--set", "secrets.apiKeyPepper=x")
    assert result.returncode != 0 and "database.url" in result.stderr
    result = helm("template", "rel", str(CHART), "--set", "database.url=postgresql+asyncpg://x/y")
    assert result.returncode != 0 and "apiKeyPepper" in result.stderr
