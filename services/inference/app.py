"""The inference service: endpoints from approved requests, on Kubernetes, locally or external,
within a GPU pool; the events and the snapshot the gateway routes by."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI
from kubernetes_asyncio import client as kube_client

from libs.common.lease import Lease
from libs.common.netpolicy import policy_from_settings
from libs.common.service import ServiceContext, ServiceSpec, create_service_app
from libs.common.settings import Settings
from services.inference.api import router
from services.inference.config import InferenceConfig
from services.inference.domain import Pool
from services.inference.events import make_handlers
from services.inference.models import bus_tables
from services.inference.plane import Plane, PlaneRef
from services.inference.reconciler import Reconciler
from services.inference.runtimes.base import Runtime
from services.inference.runtimes.external import ExternalRuntime
from services.inference.runtimes.kubernetes import KubernetesRuntime
from services.inference.runtimes.local import LocalRuntime


def make_spec(
    config: InferenceConfig,
    *,
    kube_configuration: kube_client.Configuration | None = None,
) -> ServiceSpec:
    """``kube_configuration`` points the kubernetes runtime at an API server explicitly (tests);
    otherwise it reads ``STEWARD_INFERENCE_KUBECONFIG`` or the in-cluster service account."""
    ref = PlaneRef()

    @asynccontextmanager
    async def setup(ctx: ServiceContext, app: FastAPI) -> AsyncIterator[None]:
        settings = ctx.settings
        credential_key = settings.upstream_credential_fernet_key
        policy = await policy_from_settings(settings, config.external_denied_networks)
        runtimes: dict[str, Runtime] = {
            "local": LocalRuntime(config, settings.data_dir, credential_key),
            "kubernetes": KubernetesRuntime(config, kube_configuration, credential_key),
            # The probe fetches a tenant-named URL: every connection checked and pinned.
            "external": ExternalRuntime(config, credential_key, transport=policy.transport()),
        }
        # Several inference replicas may run: one leads the reconciler (services/inference).
        lease = Lease(ctx.engine, f"{settings.event_namespace}.inference.reconciler")
        reconciler = Reconciler(ctx.sessionmaker, ctx.outbox, runtimes, config, lease)
        service_key = settings.inference_api_key
        plane = Plane(
            config=config,
            pool=Pool(total=dict(settings.gpu_pool), project_limit=config.gpu_limit_for),
            credential_key=credential_key,
            reconciler=reconciler,
            catalog=ctx.catalog,
            service_credential=service_key.get_secret_value() if service_key else None,
            address_policy=policy,
        )
        ref.plane = plane
        app.state.plane = plane
        ctx.spawn(reconciler.run(), "reconciler")
        try:
            yield
        finally:
            await reconciler.close()
            await lease.release()
            for runtime in runtimes.values():
                with contextlib.suppress(Exception):
                    await runtime.aclose()
            ref.plane = None

    return ServiceSpec(
        name="inference",
        title="Steward inference",
        tables=bus_tables,
        routers=[router],
        handlers=make_handlers(ref),
        setup=setup,
    )


SPEC = make_spec(InferenceConfig())


def create_app(
    settings: Settings | None = None,
    *,
    config: InferenceConfig | None = None,
    kube_configuration: kube_client.Configuration | None = None,
    transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
) -> FastAPI:
    spec = (
        make_spec(config or InferenceConfig(), kube_configuration=kube_configuration)
        if config is not None or kube_configuration is not None
        else SPEC
    )
    return create_service_app(spec, settings, transports=transports)
