"""The same journey on the ``kubernetes`` runtime, against the Kubernetes API double (real socket,
the real ``kubernetes-asyncio`` client): an InferenceService is created in the project's
namespace, KServe's Ready condition and URL make the endpoint ready, the OpenAI client answers at
the upstream URL; scaling patches it, deleting removes it; a model that fails to load fails."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from kubernetes_asyncio import client as kube_client
from kubernetes_asyncio.client.exceptions import ApiException

from libs.common.settings import Settings
from services.inference.config import InferenceConfig
from services.inference.runtimes.base import EndpointSpec, RuntimeFailure
from services.inference.runtimes.kubernetes import KubernetesRuntime, interpret, manifest
from tests.approval.support import eventually
from tests.helpers import bearer, ok
from tests.inference.kube_double import TOKEN, KubeDouble, Outcome
from tests.inference.support import (
    approved_model,
    endpoint_of_request,
    listening,
    request_endpoint,
    team,
    wait_status,
)

ISVC = ("serving.kserve.io", "v1beta1")


async def test_approved_request_becomes_a_ready_kserve_inference_service(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    inference: httpx.AsyncClient,
    admin_key: str,
    kube: tuple[KubeDouble, str],
    settings: Settings,
) -> None:
    double, _ = kube
    who = await team(authz, admin_key)
    name = await approved_model(authz, catalog, approval, admin_key, who)
    async with listening(settings) as heard:
        decided = await request_endpoint(
            approval, admin_key, who, name, "kubernetes", gpus=2, replicas=2
        )
        found = await endpoint_of_request(inference, who.dev, who.project, decided["id"])
        ready = await wait_status(inference, who.dev, who.project, found["id"], "ready")

        assert 0 < ready["lead_time_seconds"] < 30
        print(f"\nrequest-to-ready on the kubernetes runtime: {ready['lead_time_seconds']:.2f}s")

        # One InferenceService, in the project's namespace, saying who and why.
        namespace = f"steward-{who.project}"
        assert namespace in double.namespaces
        isvc = double.find("inferenceservices", namespace, _name(ready))
        assert isvc is not None
        labels = isvc["metadata"]["labels"]
        assert labels["steward.dev/project"] == who.project
        assert labels["steward.dev/endpoint-id"] == ready["id"]
        assert labels["steward.dev/approval-request"] == decided["id"]
        assert isvc["metadata"]["annotations"]["steward.dev/model"] == f"{name}@1.0.0"
        predictor = isvc["spec"]["predictor"]
        assert (predictor["minReplicas"], predictor["maxReplicas"]) == (2, 2)
        assert predictor["model"]["modelFormat"] == {"name": "huggingface"}
        assert predictor["model"]["runtime"] == "kserve-huggingfaceserver"
        assert predictor["model"]["storageUri"] == ready["source_uri"]
        assert predictor["model"]["resources"]["limits"] == {"nvidia.com/gpu": "2"}

        # Ready with KServe's URL plus its OpenAI path; the client answers there.
        assert ready["upstream_url"] == isvc["status"]["url"] + "/openai/v1"
        client = openai.AsyncOpenAI(base_url=ready["upstream_url"], api_key="unused")
        stream = await client.chat.completions.create(
            model=name,
            messages=[{"role": "user", "content": "hello"}],
            stream=True,
            max_tokens=3,
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await client.close()
        assert len(text.split()) == 3

        # Scaling patches the replicas in place (within the pool: 3 x 2 GPUs).
        scaled = await ok(
            await inference.post(
                f"/v1/projects/{who.project}/endpoints/{found['id']}/scale",
                json={"replicas": 3},
                headers=bearer(who.admin),
            )
        )
        assert scaled["replicas"] == 3

        async def patched() -> bool:
            obj = double.find("inferenceservices", namespace, _name(ready)) or {}
            return bool(obj.get("spec", {}).get("predictor", {}).get("maxReplicas") == 3)

        await eventually(patched, what="the InferenceService to be scaled")
        assert (
            "PATCH",
            f"/apis/serving.kserve.io/v1beta1/namespaces/{namespace}/"
            f"inferenceservices/{_name(ready)}",
        ) in double.requests

        # Deleting removes the object; the endpoint ends deleted.
        await ok(
            await inference.delete(
                f"/v1/projects/{who.project}/endpoints/{found['id']}", headers=bearer(who.admin)
            ),
            202,
        )
        await wait_status(inference, who.dev, who.project, found["id"], "deleted")
        assert double.find("inferenceservices", namespace, _name(ready)) is None
    assert heard.statuses(found["id"])[0] == "provisioning"
    assert "ready" in heard.statuses(found["id"])
    assert heard.statuses(found["id"])[-2:] == ["deleting", "deleted"]


def _name(endpoint: dict[str, object]) -> str:
    return "ep-" + str(endpoint["id"]).replace("-", "")[-12:]


async def test_a_model_that_fails_to_load_fails_with_kserves_reason(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    inference: httpx.AsyncClient,
    admin_key: str,
    kube: tuple[KubeDouble, str],
    settings: Settings,
) -> None:
    double, _ = kube
    who = await team(authz, admin_key)
    double.outcomes[f"steward-{who.project}"] = Outcome(
        ready=False, message="OSError: model.safetensors not found"
    )
    name = await approved_model(authz, catalog, approval, admin_key, who)
    async with listening(settings) as heard:
        decided = await request_endpoint(approval, admin_key, who, name, "kubernetes")
        found = await endpoint_of_request(inference, who.dev, who.project, decided["id"])
        failed = await wait_status(inference, who.dev, who.project, found["id"], "failed")
        assert failed["reason"] == (
            "KServe reports FailedToLoad: ModelLoadFailed: OSError: model.safetensors not found"
        )
        assert failed["ready_at"] is None

        # A failed endpoint holds no GPUs, and its object is cleaned up.
        async def cleaned() -> bool:
            return double.find("inferenceservices", f"steward-{who.project}", _name(failed)) is None

        await eventually(cleaned, what="the failed InferenceService to be removed")
        pool = await ok(await inference.get("/v1/gpu-pool", headers=bearer(admin_key)))
        assert who.project not in pool["projects"]
    assert heard.statuses(found["id"]) == ["provisioning", "failed"]
    assert heard.about(found["id"])[-1]["data"]["reason"] == failed["reason"]


def _spec(project: str, endpoint_id: str, source: str | None = "hf://org/model") -> EndpointSpec:
    return EndpointSpec(
        endpoint_id=endpoint_id,
        project=project,
        runtime_name="ep-" + endpoint_id[-12:],
        asset_name="org/model",
        version="1.0.0",
        source_uri=source,
        served_model_name="org/model",
        replicas=1,
        gpus=1,
        gpu_type="nvidia-a100",
        profile=None,
        owner="alice",
        request_id=None,
    )


def _configuration(url: str, token: str = TOKEN) -> kube_client.Configuration:
    configuration = kube_client.Configuration(host=url)
    configuration.api_key = {"BearerToken": token}
    configuration.api_key_prefix = {"BearerToken": "Bearer"}
    return configuration


async def test_the_runtime_tolerates_409_and_404_and_refuses_a_foreign_object(
    kube: tuple[KubeDouble, str],
) -> None:
    _, url = kube
    runtime = KubernetesRuntime(InferenceConfig(), _configuration(url))
    spec = _spec("wire-test", "0190aaaa-0000-7000-8000-00000000a001")
    try:
        await runtime.provision(spec)
        # Again: namespace and object answer 409 AlreadyExists; both are ours, so it is fine.
        await runtime.provision(spec)
        status = await runtime.status(spec)
        assert status.state in ("pending", "ready")
        # Another endpoint whose object name collides is refused, not adopted.
        other = _spec("wire-test", "0190bbbb-0000-7000-8000-00000000a001")
        with pytest.raises(RuntimeFailure, match="is not this endpoint's"):
            await runtime.provision(other)
        await runtime.delete(spec)
        await runtime.delete(spec)  # 404 NotFound: already gone is fine
        assert (await runtime.status(spec)).state == "failed"
        # KServe needs a storage URI; without one the spec is refused before any call.
        with pytest.raises(RuntimeFailure, match="no source URI"):
            await runtime.provision(_spec("wire-test", spec.endpoint_id, source=None))
    finally:
        await runtime.aclose()


async def test_a_wrong_token_is_an_api_error_not_a_silent_success(
    kube: tuple[KubeDouble, str],
) -> None:
    _, url = kube
    runtime = KubernetesRuntime(InferenceConfig(), _configuration(url, token="wrong"))
    try:
        with pytest.raises(ApiException) as raised:
            await runtime.provision(_spec("wire-test", "0190cccc-0000-7000-8000-00000000a001"))
        assert raised.value.status == 401
    finally:
        await runtime.aclose()


async def test_watch_follows_the_object_from_pending_to_ready(
    kube: tuple[KubeDouble, str],
) -> None:
    _, url = kube
    runtime = KubernetesRuntime(InferenceConfig(), _configuration(url))
    spec = _spec("watch-test", "0190dddd-0000-7000-8000-00000000a001")
    try:
        await runtime.provision(spec)
        seen = []
        async with asyncio.timeout(30):  # the double makes it ready within a second
            async for status in runtime.watch(spec):
                seen.append(status.state)
                if status.state == "ready":
                    assert status.url is not None and status.url.endswith("/openai/v1")
                    break
        assert seen[-1] == "ready"
        assert "pending" in seen
        await runtime.delete(spec)
    finally:
        await runtime.aclose()


def test_llm_inference_service_can_be_emitted_instead() -> None:
    config = InferenceConfig(kube_kind="LLMInferenceService")
    spec = _spec("team-a", "0190eeee-0000-7000-8000-00000000a001")
    body = manifest(spec, config, "steward-team-a")
    assert body["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert body["kind"] == "LLMInferenceService"
    assert body["spec"]["model"] == {"uri": "hf://org/model", "name": "org/model"}
    assert body["spec"]["replicas"] == 1
    container = body["spec"]["template"]["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert body["metadata"]["labels"]["steward.dev/endpoint-id"] == spec.endpoint_id


def test_kserve_status_is_read_as_kserve_writes_it() -> None:
    pending = interpret({"status": {}}, "/openai/v1")
    assert pending.state == "pending"
    invalid = interpret(
        {
            "status": {
                "conditions": [{"type": "Ready", "status": "False"}],
                "modelStatus": {
                    "transitionStatus": "InvalidSpec",
                    "lastFailureInfo": {
                        "reason": "InvalidPredictorSpec",
                        "message": "no runtime supports vLLM",
                    },
                },
            }
        },
        "/openai/v1",
    )
    assert invalid.state == "failed"
    assert (
        invalid.reason
        == "KServe reports InvalidSpec: InvalidPredictorSpec: no runtime supports vLLM"
    )
    ready = interpret(
        {
            "status": {
                "conditions": [{"type": "Ready", "status": "True"}],
                "url": "http://m.team-a.example.com/",
            }
        },
        "/openai/v1",
    )
    assert (ready.state, ready.url) == ("ready", "http://m.team-a.example.com/openai/v1")


async def test_an_api_server_outage_does_not_take_a_ready_route_away(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    inference: httpx.AsyncClient,
    admin_key: str,
    kube: tuple[KubeDouble, str],
    settings: Settings,
) -> None:
    double, _ = kube
    who = await team(authz, admin_key)
    name = await approved_model(authz, catalog, approval, admin_key, who)
    body = {"model_name": name, "version": "1.0.0", "runtime": "kubernetes"}
    created = await ok(
        await inference.post(
            f"/v1/projects/{who.project}/endpoints", json=body, headers=bearer(who.admin)
        ),
        201,
    )
    await wait_status(inference, who.dev, who.project, created["id"], "ready")
    async with listening(settings) as heard:
        before = len(double.requests)
        await double.set_down(True)
        try:

            async def retried() -> bool:
                return len(double.requests) >= before + 2  # the watch ended; reads got 503s

            await eventually(retried, what="the runtime to meet the outage")
            still = await wait_status(inference, who.dev, who.project, created["id"], "ready")
            assert still["status"] == "ready"
        finally:
            await double.set_down(False)
        opened = double.watches

        async def watching_again() -> bool:
            return double.watches > opened

        # Back: the watch resumes; nothing changed, so nothing is published.
        await eventually(watching_again, what="the watch to be re-established")
    assert heard.statuses(created["id"]) == []
    await ok(
        await inference.delete(
            f"/v1/projects/{who.project}/endpoints/{created['id']}", headers=bearer(who.admin)
        ),
        202,
    )
    await wait_status(inference, who.dev, who.project, created["id"], "deleted")


async def test_an_endpoint_being_deleted_holds_no_gpus_while_its_cleanup_retries(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    inference: httpx.AsyncClient,
    admin_key: str,
    kube: tuple[KubeDouble, str],
) -> None:
    double, _ = kube
    who = await team(authz, admin_key)
    name = await approved_model(authz, catalog, approval, admin_key, who)
    body = {
        "model_name": name,
        "version": "1.0.0",
        "runtime": "kubernetes",
        "gpus": 2,
        "gpu_type": "tiny",
    }
    url = f"/v1/projects/{who.project}/endpoints"
    created = await ok(await inference.post(url, json=body, headers=bearer(who.admin)), 201)
    ready = await wait_status(inference, who.dev, who.project, created["id"], "ready")
    pool = await ok(await inference.get("/v1/gpu-pool", headers=bearer(admin_key)))
    assert pool["projects"][who.project] == {"tiny": 2}
    path = f"/apis/{ISVC[0]}/{ISVC[1]}/namespaces/steward-{who.project}/inferenceservices/"
    path += _name(ready)

    await double.set_down(True)  # every cleanup attempt is refused
    try:
        deleting = await ok(
            await inference.delete(f"{url}/{created['id']}", headers=bearer(who.admin)), 202
        )
        assert deleting["status"] == "deleting"
        # Free at once, before the runtime has removed anything.
        pool = await ok(await inference.get("/v1/gpu-pool", headers=bearer(admin_key)))
        assert who.project not in pool["projects"]
        assert pool["types"]["tiny"]["free"] == 2

        async def retried() -> bool:
            return double.requests.count(("DELETE", path)) >= 2

        await eventually(retried, what="the refused cleanup to be retried")
        still = await ok(await inference.get(f"{url}/{created['id']}", headers=bearer(who.dev)))
        assert still["status"] == "deleting"
    finally:
        await double.set_down(False)
    # Back: the cleanup goes through and the endpoint ends deleted.
    await wait_status(inference, who.dev, who.project, created["id"], "deleted")
    assert double.find("inferenceservices", f"steward-{who.project}", _name(ready)) is None
