"""The ``kubernetes`` runtime: a KServe ``InferenceService`` (or an llm-d ``LLMInferenceService``)
per endpoint, in a namespace per project, through ``kubernetes-asyncio``.

The object is labelled with the project, the endpoint id and the approval request, so that
``kubectl get isvc -A -l app.kubernetes.io/managed-by=steward`` shows what Steward runs and why.
Readiness comes from the object's ``Ready`` condition and ``status.url``; KServe's model status
(``FailedToLoad``, ``BlockedByFailedLoad``, ``InvalidSpec`` and ``lastFailureInfo``) becomes
the endpoint's failure reason.

An MCP server endpoint is a ToolHive ``MCPServer`` (``toolhive.stacklok.dev/v1beta1``): its OCI
package's image behind ToolHive's proxy (stdio to streamable HTTP at ``status.url``), its
environment in a Secret beside it that the object names. ToolHive's operator must be installed;
npm and PyPI packages run on the local runtime (the operator runs images only).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncGenerator
from typing import Any

from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException

from libs.common.mcp_packages import StdioPackage
from services.inference.config import InferenceConfig
from services.inference.runtimes.base import (
    EndpointSpec,
    RuntimeFailure,
    RuntimeStatus,
    clip,
    environment_of,
)

log = logging.getLogger("steward.inference.kubernetes")

GROUP = "serving.kserve.io"
KINDS: dict[str, tuple[str, str]] = {
    # kind: (version, plural)
    "InferenceService": ("v1beta1", "inferenceservices"),
    "LLMInferenceService": ("v1alpha1", "llminferenceservices"),
}
# An MCP server endpoint's object: (group, version, plural).
TOOLHIVE = ("toolhive.stacklok.dev", "v1beta1", "mcpservers")
MANAGED_BY = {"app.kubernetes.io/managed-by": "steward"}
FAILED_TRANSITIONS = ("BlockedByFailedLoad", "InvalidSpec")


def _text(body: object) -> str:
    return body.decode(errors="replace") if isinstance(body, bytes) else str(body)


def namespace_for(prefix: str, project: str) -> str:
    """A DNS label: the prefix and the project, shortened with a hash when too long."""
    name = f"{prefix}{project}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(project.encode()).hexdigest()[:6]
    return f"{prefix}{project[: 63 - len(prefix) - 7]}-{digest}".replace("--", "-")


def _labels(spec: EndpointSpec) -> dict[str, str]:
    labels = {
        **MANAGED_BY,
        "steward.dev/project": spec.project,
        "steward.dev/endpoint-id": spec.endpoint_id,
    }
    if spec.request_id:
        labels["steward.dev/approval-request"] = spec.request_id
    return labels


def _annotations(spec: EndpointSpec) -> dict[str, str]:
    return {
        "steward.dev/model": f"{spec.asset_name}@{spec.version}",
        "steward.dev/served-model-name": spec.served_model_name,
        "steward.dev/owner": spec.owner,
        "steward.dev/approval-request": spec.request_id or "",
    }


def _resources(spec: EndpointSpec) -> dict[str, Any]:
    if spec.gpus <= 0:
        return {}
    gpus = str(spec.gpus)
    return {"limits": {"nvidia.com/gpu": gpus}, "requests": {"nvidia.com/gpu": gpus}}


def manifest(spec: EndpointSpec, cfg: InferenceConfig, namespace: str) -> dict[str, Any]:
    """The object Steward creates for an endpoint."""
    if not spec.source_uri:
        raise RuntimeFailure(
            f"{spec.asset_name}@{spec.version} has no source URI in the catalog; "
            "KServe needs one for storageUri"
        )
    version, _ = KINDS[cfg.kube_kind]
    metadata = {
        "name": spec.runtime_name,
        "namespace": namespace,
        "labels": _labels(spec),
        "annotations": _annotations(spec),
    }
    if cfg.kube_kind == "LLMInferenceService":
        return {
            "apiVersion": f"{GROUP}/{version}",
            "kind": "LLMInferenceService",
            "metadata": metadata,
            "spec": {
                "model": {"uri": spec.source_uri, "name": spec.served_model_name},
                "replicas": spec.replicas,
                "router": {"route": {}, "gateway": {}, "scheduler": {}},
                "template": {"containers": [{"name": "main", "resources": _resources(spec)}]},
            },
        }
    return {
        "apiVersion": f"{GROUP}/{version}",
        "kind": "InferenceService",
        "metadata": metadata,
        "spec": {
            "predictor": {
                "minReplicas": spec.replicas,
                "maxReplicas": spec.replicas,
                "model": {
                    "modelFormat": {"name": cfg.kserve_model_format},
                    "runtime": cfg.kserve_runtime,
                    "storageUri": spec.source_uri,
                    "args": [f"--model_name={spec.served_model_name}"],
                    "resources": _resources(spec),
                },
            }
        },
    }


def env_secret_name(spec: EndpointSpec) -> str:
    return f"{spec.runtime_name}-env"


def mcp_manifest(spec: EndpointSpec, namespace: str, env_names: list[str]) -> dict[str, Any]:
    """ToolHive's ``MCPServer`` for an MCP server endpoint; ``env_names`` are the keys of its
    Secret (``env_secret_name``), each given to the server under its own name."""
    if spec.package is None:
        raise RuntimeFailure("the MCP server endpoint has no package to run")
    package = StdioPackage.from_dict(spec.package)
    if package.registry_type != "oci":
        raise RuntimeFailure(
            f"on Kubernetes an MCP server runs from an OCI image (ToolHive's MCPServer); "
            f"this one is a {package.registry_type} package: run it on the local runtime"
        )
    tagged = "@" in package.identifier or ":" in package.identifier.rsplit("/", 1)[-1]
    image = (
        package.identifier
        if tagged or not package.version
        else (f"{package.identifier}:{package.version}")
    )
    server: dict[str, Any] = {"image": image, "transport": "stdio", "proxyMode": "streamable-http"}
    if package.arguments:
        server["args"] = list(package.arguments)
    if env_names:
        secret = env_secret_name(spec)
        server["secrets"] = [{"name": secret, "key": n, "targetEnvName": n} for n in env_names]
    group, version, _ = TOOLHIVE
    return {
        "apiVersion": f"{group}/{version}",
        "kind": "MCPServer",
        "metadata": {
            "name": spec.runtime_name,
            "namespace": namespace,
            "labels": _labels(spec),
            "annotations": _annotations(spec),
        },
        "spec": server,
    }


def interpret_mcp(obj: dict[str, Any]) -> RuntimeStatus:
    """Read ToolHive's status: ``Ready`` with the proxy's URL, ``Failed``, or on its way."""
    status = obj.get("status") or {}
    phase, message = status.get("phase"), status.get("message") or ""
    if phase == "Ready" and status.get("url"):
        return RuntimeStatus("ready", url=str(status["url"]).split("#", 1)[0].rstrip("/"))
    if phase == "Failed":
        return RuntimeStatus(
            "failed", reason=clip(f"ToolHive reports Failed: {message or 'no detail'}")
        )
    return RuntimeStatus(
        "pending", reason=clip(message or f"waiting for ToolHive ({phase or 'no phase yet'})")
    )


def interpret(obj: dict[str, Any], openai_path: str) -> RuntimeStatus:
    """Read KServe's status: Ready with a URL, a load/spec failure, or still on its way."""
    status = obj.get("status") or {}
    conditions = status.get("conditions") or []
    ready = next((c for c in conditions if c.get("type") == "Ready"), None)
    url = status.get("url") or (status.get("address") or {}).get("url")
    if url is None and status.get("addresses"):
        url = status["addresses"][0].get("url")
    if ready is not None and ready.get("status") == "True" and url:
        return RuntimeStatus("ready", url=url.rstrip("/") + openai_path)
    model = status.get("modelStatus") or {}
    transition = model.get("transitionStatus")
    active = (model.get("states") or {}).get("activeModelState")
    failure = model.get("lastFailureInfo") or {}
    if transition in FAILED_TRANSITIONS or active == "FailedToLoad":
        what = active if active == "FailedToLoad" else transition
        detail = ": ".join(p for p in (failure.get("reason"), failure.get("message")) if p)
        return RuntimeStatus(
            "failed", reason=clip(f"KServe reports {what}: {detail or 'no detail'}")
        )
    why = ""
    if ready is not None:
        why = ": ".join(p for p in (ready.get("reason"), ready.get("message")) if p)
    return RuntimeStatus("pending", reason=clip(why or "waiting for KServe to report Ready"))


class KubernetesRuntime:
    name = "kubernetes"

    def __init__(
        self,
        cfg: InferenceConfig,
        configuration: client.Configuration | None = None,
        credential_key: bytes | None = None,
    ) -> None:
        self.cfg = cfg
        # Opens an MCP server endpoint's sealed environment, for the Secret it is given in.
        self.credential_key = credential_key
        self.version, self.plural = KINDS[cfg.kube_kind]
        self.openai_path = cfg.kserve_openai_path if cfg.kube_kind == "InferenceService" else "/v1"
        self._configuration = configuration
        self._api: client.ApiClient | None = None
        self._lock = asyncio.Lock()

    async def _client(self) -> client.ApiClient:
        async with self._lock:
            if self._api is None:
                configuration = self._configuration
                if configuration is None:
                    configuration = client.Configuration()
                    try:
                        if self.cfg.kubeconfig is not None:
                            await config.load_kube_config(
                                config_file=str(self.cfg.kubeconfig),
                                context=self.cfg.kube_context,
                                client_configuration=configuration,
                            )
                        else:
                            config.load_incluster_config(  # type: ignore[no-untyped-call]
                                client_configuration=configuration
                            )
                    except (ConfigException, OSError) as exc:
                        raise RuntimeFailure(
                            "the kubernetes runtime is not configured: set "
                            "STEWARD_INFERENCE_KUBECONFIG or run Steward in the cluster "
                            f"({exc})"
                        ) from exc
                self._api = client.ApiClient(configuration)
            return self._api

    async def _objects(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(await self._client())

    def namespace(self, spec: EndpointSpec) -> str:
        return namespace_for(self.cfg.kube_namespace_prefix, spec.project)

    def _where(self, spec: EndpointSpec) -> tuple[str, str, str]:
        """(group, version, plural) of the endpoint's object."""
        if spec.asset_kind == "mcp_server":
            return TOOLHIVE
        return GROUP, self.version, self.plural

    def _read(self, spec: EndpointSpec, obj: dict[str, Any]) -> RuntimeStatus:
        if spec.asset_kind == "mcp_server":
            return interpret_mcp(obj)
        return interpret(obj, self.openai_path)

    async def _put_secret(self, spec: EndpointSpec, namespace: str, env: dict[str, str]) -> None:
        """The MCP server's environment as a Secret beside its object (replaced if there)."""
        core = client.CoreV1Api(await self._client())
        body = client.V1Secret(
            metadata=client.V1ObjectMeta(
                name=env_secret_name(spec), namespace=namespace, labels=_labels(spec)
            ),
            string_data=env,
            type="Opaque",
        )
        try:
            await core.create_namespaced_secret(namespace, body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            await core.replace_namespaced_secret(env_secret_name(spec), namespace, body)

    async def _ensure_namespace(self, name: str, project: str) -> None:
        core = client.CoreV1Api(await self._client())
        labels = {**MANAGED_BY, "steward.dev/project": project}
        body = client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels=labels))
        try:
            await core.create_namespace(body)
        except ApiException as exc:
            if exc.status != 409:  # AlreadyExists: the project's earlier endpoints made it
                raise

    async def _get(self, spec: EndpointSpec) -> dict[str, Any] | None:
        objects = await self._objects()
        group, version, plural = self._where(spec)
        try:
            found: dict[str, Any] = await objects.get_namespaced_custom_object(
                group, version, self.namespace(spec), plural, spec.runtime_name
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return found

    async def provision(self, spec: EndpointSpec) -> None:
        namespace = self.namespace(spec)
        group, version, plural = self._where(spec)
        env: dict[str, str] = {}
        if spec.asset_kind == "mcp_server":
            env = environment_of(spec, self.credential_key)
            body = mcp_manifest(spec, namespace, sorted(env))
        else:
            body = manifest(spec, self.cfg, namespace)
        await self._ensure_namespace(namespace, spec.project)
        if env:
            await self._put_secret(spec, namespace, env)
        objects = await self._objects()
        try:
            await objects.create_namespaced_custom_object(group, version, namespace, plural, body)
        except ApiException as exc:
            if exc.status != 409:
                if exc.status in (400, 422):
                    raise RuntimeFailure(
                        clip(f"Kubernetes refused the object: {_text(exc.body)}")
                    ) from exc
                raise
            existing = await self._get(spec)
            owner = ((existing or {}).get("metadata", {}).get("labels") or {}).get(
                "steward.dev/endpoint-id"
            )
            if owner != spec.endpoint_id:
                raise RuntimeFailure(
                    f"{namespace}/{spec.runtime_name} exists and is not this endpoint's"
                ) from exc

    async def status(self, spec: EndpointSpec) -> RuntimeStatus:
        found = await self._get(spec)
        if found is None:
            return RuntimeStatus("failed", reason="the object is gone from the cluster")
        return self._read(spec, found)

    async def watch(self, spec: EndpointSpec) -> AsyncGenerator[RuntimeStatus, None]:
        """GET, then watch from its resourceVersion; on a dropped or expired watch, again."""
        namespace = self.namespace(spec)
        group, version, plural = self._where(spec)
        while True:
            found = await self._get(spec)
            if found is None:
                yield RuntimeStatus("failed", reason="the object was deleted outside Steward")
                return
            yield self._read(spec, found)
            objects = await self._objects()
            stream = watch.Watch()
            try:
                async for event in stream.stream(
                    objects.list_namespaced_custom_object,
                    group,
                    version,
                    namespace,
                    plural,
                    field_selector=f"metadata.name={spec.runtime_name}",
                    resource_version=found["metadata"].get("resourceVersion"),
                    timeout_seconds=300,
                ):
                    if event["type"] == "DELETED":
                        yield RuntimeStatus(
                            "failed", reason="the object was deleted outside Steward"
                        )
                        return
                    if event["type"] in ("ADDED", "MODIFIED"):
                        yield self._read(spec, event["raw_object"])
            except ApiException as exc:
                if exc.status != 410:  # Gone: our resourceVersion is too old; read again
                    raise
            finally:
                await stream.close()

    async def scale(self, spec: EndpointSpec, replicas: int) -> None:
        if spec.asset_kind == "mcp_server":
            patch: dict[str, Any] = {"spec": {"replicas": replicas}}  # ToolHive's proxy
        elif self.cfg.kube_kind == "LLMInferenceService":
            patch = {"spec": {"replicas": replicas}}
        else:
            patch = {"spec": {"predictor": {"minReplicas": replicas, "maxReplicas": replicas}}}
        objects = await self._objects()
        # A dict body must be sent as a merge patch: the client's default for custom objects is
        # JSON Patch (RFC 6902), which the API server refuses for an object.
        group, version, plural = self._where(spec)
        await objects.patch_namespaced_custom_object(
            group,
            version,
            self.namespace(spec),
            plural,
            spec.runtime_name,
            patch,
            _content_type="application/merge-patch+json",  # type: ignore[call-arg]
        )

    async def delete(self, spec: EndpointSpec) -> None:
        objects = await self._objects()
        group, version, plural = self._where(spec)
        namespace = self.namespace(spec)
        try:
            await objects.delete_namespaced_custom_object(
                group, version, namespace, plural, spec.runtime_name
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
        if spec.sealed_environment is not None:
            core = client.CoreV1Api(await self._client())
            try:
                await core.delete_namespaced_secret(env_secret_name(spec), namespace)
            except ApiException as exc:
                if exc.status != 404:
                    raise

    async def aclose(self) -> None:
        if self._api is not None:
            await self._api.close()
            self._api = None
