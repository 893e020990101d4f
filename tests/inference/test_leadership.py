"""Two inference replicas: one leads the reconciler, the other stands by. When the leader dies
(its process gone: its reconciler stops and its database session ends), the standby takes over:
the endpoints the leader made stay ready (none orphaned), new ones are provisioned, and each
has exactly one InferenceService (none duplicated). Kubernetes runtime, against the API double."""

from __future__ import annotations

import asyncio

import httpx
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from libs.common.lease import Lease
from libs.common.service import ServiceContext
from services.inference.reconciler import Reconciler
from tests.approval.support import eventually
from tests.inference.kube_double import KubeDouble
from tests.inference.support import (
    approved_model,
    endpoint_of_request,
    request_endpoint,
    team,
    wait_status,
)


async def test_a_standby_replica_takes_over_without_orphans_or_duplicates(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    inference: httpx.AsyncClient,
    admin_key: str,
    kube: tuple[KubeDouble, str],
    inference_app: FastAPI,
) -> None:
    double, _ = kube
    ctx: ServiceContext = inference_app.state.ctx
    leader: Reconciler = inference_app.state.plane.reconciler
    lease = leader.lease
    assert lease is not None
    await eventually(lambda: asyncio.sleep(0, lease.leading), what="a leader")
    engine = create_async_engine(ctx.engine.url.render_as_string(hide_password=False))
    standby = Reconciler(
        ctx.sessionmaker,
        ctx.outbox,
        leader.runtimes,
        leader.config,
        Lease(engine, lease.name),
    )
    standing_by = asyncio.create_task(standby.run())
    try:
        who = await team(authz, admin_key)
        name = await approved_model(authz, catalog, approval, admin_key, who)

        async def ready_endpoint() -> dict[str, object]:
            decided = await request_endpoint(approval, admin_key, who, name, "kubernetes", gpus=1)
            found = await endpoint_of_request(inference, who.dev, who.project, decided["id"])
            return await wait_status(inference, who.dev, who.project, found["id"], "ready")

        first = await ready_endpoint()
        assert standby.lease is not None and not standby.lease.leading and not standby.workers

        # The leader's process dies: its reconciler stops, its database session ends.
        [running] = [t for t in ctx.tasks if t.get_name() == "inference-reconciler"]
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await leader._follow()  # its workers die with it; the runtime's objects stay
        assert lease._connection is not None
        pid = await lease._connection.scalar(text("SELECT pg_backend_pid()"))
        async with engine.connect() as admin:
            await admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})

        await eventually(
            lambda: asyncio.sleep(0, standby.lease is not None and standby.lease.leading),
            what="the standby to lead",
        )
        second = await ready_endpoint()
        again = await wait_status(inference, who.dev, who.project, str(first["id"]), "ready")
        assert again["upstream_url"] == first["upstream_url"]  # not orphaned, not re-made
        namespace = f"steward-{who.project}"
        names = sorted(
            key[4]
            for key in double.objects
            if key[2] == namespace and key[3] == "inferenceservices"
        )
        assert len(names) == len(set(names)) == 2, names  # one each, none twice
        assert set(standby.workers) >= {str(first["id"]), str(second["id"])}
    finally:
        await standby.close()
        standing_by.cancel()
        await asyncio.gather(standing_by, return_exceptions=True)
        assert standby.lease is not None
        await standby.lease.release()
        await engine.dispose()
