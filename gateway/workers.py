"""``STEWARD_GATEWAY_WORKERS=N``: N gateway processes on one host, one per core.

Python runs one core per process; a host with several cores runs several workers, all accepting
on the proxy port (SO_REUSEPORT: the kernel spreads connections over them). Each worker is a
gateway replica of its own: its gateway id and quota ledger, its journal and spool under
``data_dir/gateway/worker-<i>``, its admin API (``/metrics``, ``/readyz``) on
``gateway_admin_port + i``. Quotas hold across workers exactly as across replicas: each counts
its own calls itself and the others' through metering (docs/reference.md, "Worst-case
overshoot"). Kong's declarative config is for all when given as a file
(``STEWARD_GATEWAY_KONG_CONFIG``); one posted to a worker's admin API reaches that worker only.
This process only supervises: it starts the workers, starts again one that dies
(its journal then meters the calls it had in flight), and passes SIGTERM/SIGINT on to all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from types import FrameType

from libs.common.settings import Settings

log = logging.getLogger("steward.gateway.workers")

# A worker that dies sooner than this after its start is crashing: wait before the next start.
CRASH_SECONDS = 5.0
MAX_BACKOFF_SECONDS = 10.0


def _start(index: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "STEWARD_GATEWAY_WORKER": str(index)}
    return subprocess.Popen([sys.executable, "-m", "gateway"], env=env)


def supervise(settings: Settings) -> int:
    """Run ``settings.gateway_workers`` workers until a signal stops them; the exit code."""
    workers = {i: _start(i) for i in range(settings.gateway_workers)}
    started = dict.fromkeys(workers, time.monotonic())
    crashes = dict.fromkeys(workers, 0)
    stopping = False
    log.info("gateway workers started", extra={"workers": len(workers)})

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        # os.kill, not Popen.send_signal: that polls, and a child reaped there would never
        # reach the os.wait below.
        for worker in workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    failed = False
    while workers:
        pid, status = os.wait()
        index = next((i for i, w in workers.items() if w.pid == pid), None)
        if index is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        workers[index].returncode = code
        if stopping:
            failed = failed or code != 0
            del workers[index]
            continue
        crashes[index] = (
            crashes[index] + 1 if time.monotonic() - started[index] < CRASH_SECONDS else 0
        )
        delay = min(0.1 * 2 ** crashes[index], MAX_BACKOFF_SECONDS) if crashes[index] else 0.0
        log.warning(
            "gateway worker exited; starting it again",
            extra={"worker": index, "code": code, "delay_seconds": delay},
        )
        time.sleep(delay)
        if not stopping:
            workers[index] = _start(index)
            started[index] = time.monotonic()
    return 1 if failed else 0
