"""The reconciler: makes each runtime match the endpoints table, and reports back.

The table says what should run (``provisioning``/``ready``) and what should be gone (``failed``,
``stopped``, ``deleting`` not yet released). One worker per running endpoint provisions it and
follows its runtime's ``watch``; what it sees becomes a status change through ``domain``. The
loop wakes on every commit that changed an endpoint, and on a timer as a safety net (and to
pick up work after a restart).

One inference process drives the runtimes: the local runtime's processes belong to this host,
and two reconcilers would fight over them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs.common.db import utcnow
from libs.common.lease import Lease
from libs.common.outbox import Outbox
from libs.common.uow import UnitOfWork
from services.inference import domain
from services.inference import repository as repo
from services.inference.config import InferenceConfig
from services.inference.models import Endpoint
from services.inference.runtimes.base import EndpointSpec, Runtime, RuntimeFailure, RuntimeStatus

log = logging.getLogger("steward.inference.reconciler")

RESTARTED = "the inference service restarted; starting the local server again"
STOPPED = "the inference service stopped, and its local servers with it"


def spec_of(endpoint: Endpoint) -> EndpointSpec:
    return EndpointSpec(
        endpoint_id=endpoint.id,
        project=endpoint.project,
        runtime_name=endpoint.runtime_name,
        asset_name=endpoint.asset_name,
        version=endpoint.version,
        source_uri=endpoint.source_uri,
        served_model_name=endpoint.served_model_name,
        replicas=endpoint.replicas,
        gpus=endpoint.gpus,
        gpu_type=endpoint.gpu_type,
        profile=endpoint.profile,
        owner=endpoint.owner,
        request_id=endpoint.request_id,
        upstream_url=endpoint.upstream_url if endpoint.runtime == "external" else None,
        sealed_credential=endpoint.upstream_credential,
        asset_kind=endpoint.asset_kind,
        package=endpoint.package,
        sealed_environment=endpoint.sealed_environment,
    )


@dataclass
class Worker:
    runtime: Runtime
    spec: EndpointSpec
    replicas: int
    task: asyncio.Task[None]


class Reconciler:
    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        outbox: Outbox,
        runtimes: dict[str, Runtime],
        config: InferenceConfig,
        lease: Lease | None = None,
    ) -> None:
        self.sessionmaker = sessionmaker
        # With several inference replicas only the lease's holder reconciles; None: this one.
        self.lease = lease
        self.outbox = outbox
        self.runtimes = runtimes
        self.config = config
        self.workers: dict[str, Worker] = {}
        self.cleaning: dict[str, asyncio.Task[None]] = {}
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._reports: set[asyncio.Future[None]] = set()
        self._wake = asyncio.Event()
        self._closed = False

    # -- signals -----------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def wake_on_commit(self, session: AsyncSession) -> None:
        """Reconcile as soon as this transaction commits (not before: the rows are not there)."""
        sa_event.listen(session.sync_session, "after_commit", self._on_commit, once=True)

    def _on_commit(self, _session: Any) -> None:
        self._wake.set()

    # -- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.reconcile_seconds)
            self._wake.clear()
            try:
                if self.lease is not None and not await self.lease.hold():
                    await self._follow()
                    continue
                await self.reconcile_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconciling endpoints failed; will retry")

    async def reconcile_once(self) -> None:
        if self._closed:
            return
        async with self.sessionmaker() as session:
            endpoints = await repo.to_reconcile(session)
        listed = set()
        deadline = utcnow() - timedelta(seconds=self.config.provision_timeout_seconds)
        for endpoint in endpoints:
            listed.add(endpoint.id)
            runtime = self.runtimes.get(endpoint.runtime)
            if runtime is None:
                await self._report(
                    endpoint.id,
                    RuntimeStatus("failed", reason=f"no runtime {endpoint.runtime!r} here"),
                )
                continue
            if endpoint.status in ("provisioning", "ready"):
                if endpoint.status == "provisioning" and endpoint.status_changed_at < deadline:
                    timeout = self.config.provision_timeout_seconds
                    await self._report(
                        endpoint.id,
                        RuntimeStatus("failed", reason=f"not ready after {timeout:g}s"),
                    )
                    continue
                self._keep_running(endpoint, runtime)
            else:
                self._release(endpoint, runtime)
        for endpoint_id in [i for i in self.workers if i not in listed]:
            self._retire(self.workers.pop(endpoint_id).task)
        for endpoint_id in [i for i, t in self.cleaning.items() if t.done() and i not in listed]:
            del self.cleaning[endpoint_id]

    def _keep_running(self, endpoint: Endpoint, runtime: Runtime) -> None:
        worker = self.workers.get(endpoint.id)
        if worker is None or worker.task.done():
            cleaning = self.cleaning.get(endpoint.id)
            if cleaning is not None and not cleaning.done():
                return  # started again while its old resources are still going: next pass
            spec = spec_of(endpoint)
            # A local endpoint that is "ready" without a worker ran under an earlier process of
            # this service: its server went with it, so its route must go until it is back.
            stale = endpoint.status == "ready" and runtime.name == "local"
            task = asyncio.create_task(
                self._drive(runtime, spec, stale=stale), name=f"endpoint-{endpoint.id}"
            )
            self.workers[endpoint.id] = Worker(runtime, spec, endpoint.replicas, task)
        elif worker.replicas != endpoint.replicas:
            worker.replicas = endpoint.replicas
            self._side(self._scale(worker, endpoint.replicas))

    def _release(self, endpoint: Endpoint, runtime: Runtime) -> None:
        worker = self.workers.pop(endpoint.id, None)
        if worker is not None:
            worker.task.cancel()
        cleaning = self.cleaning.get(endpoint.id)
        if cleaning is None or cleaning.done():
            task = asyncio.create_task(
                self._clean(runtime, spec_of(endpoint), worker), name=f"release-{endpoint.id}"
            )
            self.cleaning[endpoint.id] = task

    def _side(self, coro: Any) -> None:
        self._track(asyncio.create_task(coro))

    def _retire(self, task: asyncio.Task[None]) -> None:
        """Cancel a worker and keep it tracked until it has finished: a cancelled worker may
        still be finishing a shielded report, which ``close`` must wait for."""
        task.cancel()
        self._track(task)

    def _track(self, task: asyncio.Task[None]) -> None:
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    # -- per endpoint ------------------------------------------------------------------------

    async def _drive(self, runtime: Runtime, spec: EndpointSpec, *, stale: bool = False) -> None:
        """Provision and follow one endpoint until it fails or the worker is cancelled."""
        if stale:
            await self._report(spec.endpoint_id, RuntimeStatus("pending", reason=RESTARTED))
        attempt = 0
        while True:
            try:
                await runtime.provision(spec)
                last: RuntimeStatus | None = None
                # Closed here, on cancel too: a watch left to the garbage collector is closed
                # later, mid-request, and its HTTP stream with it.
                async with contextlib.aclosing(runtime.watch(spec)) as statuses:
                    async for status in statuses:
                        attempt = 0
                        if status != last:
                            last = status
                            await self._report(spec.endpoint_id, status)
                        if status.state == "failed":
                            return
                return
            except asyncio.CancelledError:
                raise
            except RuntimeFailure as failure:
                await self._report(spec.endpoint_id, RuntimeStatus("failed", reason=failure.reason))
                return
            except Exception as exc:
                attempt += 1
                delay = min(0.5 * 2**attempt, 30.0)
                log.warning(
                    "runtime error; retrying",
                    extra={"endpoint_id": spec.endpoint_id, "error": repr(exc)},
                )
                # The runtime's API failed, not (as far as anyone knows) the server: a ready
                # endpoint keeps its route; a provisioning one says why it is waiting.
                await self._report(
                    spec.endpoint_id,
                    RuntimeStatus("pending", reason=f"{runtime.name} runtime error: {exc!r}"[:500]),
                    note_only=True,
                )
                await asyncio.sleep(delay)

    async def _scale(self, worker: Worker, replicas: int) -> None:
        """Apply a new replica count; the endpoint keeps serving at the old one meanwhile."""
        try:
            await worker.runtime.scale(worker.spec, replicas)
        except RuntimeFailure as failure:
            await self._report(worker.spec.endpoint_id, RuntimeStatus("failed", failure.reason))
        except Exception as exc:
            log.warning(
                "scaling failed; will retry",
                extra={"endpoint_id": worker.spec.endpoint_id, "error": repr(exc)},
            )
            await asyncio.sleep(5.0)
            worker.replicas = -1  # differs from the table: the next pass tries again

    async def _clean(self, runtime: Runtime, spec: EndpointSpec, worker: Worker | None) -> None:
        if worker is not None:
            worker.task.cancel()
            await asyncio.gather(worker.task, return_exceptions=True)
        attempt = 0
        while True:
            try:
                await runtime.delete(spec)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempt += 1
                log.warning(
                    "releasing the runtime failed; retrying",
                    extra={"endpoint_id": spec.endpoint_id, "error": repr(exc)},
                )
                await asyncio.sleep(min(0.5 * 2**attempt, 30.0))
        async with self.sessionmaker() as session, session.begin():
            endpoint = await repo.endpoint_for_update(session, spec.endpoint_id)
            if endpoint is not None:
                await domain.runtime_released(self._uow(session), endpoint)

    def _uow(self, session: AsyncSession) -> UnitOfWork:
        return UnitOfWork(session=session, outbox=self.outbox, actor=domain.SYSTEM)

    async def _report(
        self, endpoint_id: str, status: RuntimeStatus, *, note_only: bool = False
    ) -> None:
        """Record what a runtime reported. Shielded: a worker cancelled mid-transaction (its
        endpoint was just deleted) must not leave a row lock behind in a half-closed connection;
        the domain ignores a report that no longer applies."""
        task = asyncio.ensure_future(self._apply(endpoint_id, status, note_only=note_only))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)
        await asyncio.shield(task)

    async def _apply(
        self, endpoint_id: str, status: RuntimeStatus, *, note_only: bool = False
    ) -> None:
        async with self.sessionmaker() as session, session.begin():
            endpoint = await repo.endpoint_for_update(session, endpoint_id)
            if endpoint is None:
                return
            uow = self._uow(session)
            if note_only:
                if endpoint.status == "provisioning":
                    await domain.runtime_pending(uow, endpoint, status.reason)
            elif status.state == "ready":
                await domain.runtime_ready(uow, endpoint, status.url, status.urls)
            elif status.state == "failed":
                await domain.runtime_failed(uow, endpoint, status.reason)
                self.wake_on_commit(session)
            else:
                await domain.runtime_pending(uow, endpoint, status.reason)

    async def _follow(self) -> None:
        """Another replica leads: what this one ran is its to run now. The workers stop; the
        runtimes' resources stay (the leader finds them), local servers stop with their
        workers (they belong to the process that started them)."""
        if not self.workers and not self.cleaning:
            return
        stopped = await self._stop_tasks()
        log.warning("not leading any more: reconciling stopped here", extra={"stopped": stopped})

    async def _stop_tasks(self, *more: asyncio.Task[None]) -> int:
        """Cancel every worker and clean-up (and ``more``), and wait for them to end."""
        tasks = [w.task for w in self.workers.values()] + [*self.cleaning.values(), *more]
        self.workers.clear()
        self.cleaning.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return len(tasks)

    async def close(self) -> None:
        """Stop every worker (a local server stops with its worker) and pending clean-up."""
        self._closed = True
        local = [i for i, w in self.workers.items() if w.runtime.name == "local"]
        await self._stop_tasks(*self._side_tasks)
        # Reports in flight are short transactions: let them finish before the engine goes.
        await asyncio.gather(*self._reports, return_exceptions=True)
        # Local servers stop with this process: their routes go now, not at the next start.
        for endpoint_id in local:
            with contextlib.suppress(Exception):
                await self._apply(endpoint_id, RuntimeStatus("pending", reason=STOPPED))
