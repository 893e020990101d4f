"""``python -m gateway``: the proxy and the admin API, on uvloop with httptools; with
``STEWARD_GATEWAY_WORKERS`` above 1, a supervisor of that many such processes."""

from __future__ import annotations

import sys

import uvloop

from gateway.app import serve
from libs.common.observability import configure_logging, configure_metrics, configure_tracing
from libs.common.settings import Settings


def main() -> None:
    settings = Settings()
    configure_logging(settings.log_level)
    if settings.gateway_workers > 1 and settings.gateway_worker is None:
        from gateway.workers import supervise

        sys.exit(supervise(settings))
    configure_tracing("gateway", settings.otel_exporter_otlp_endpoint)
    configure_metrics(
        "gateway",
        settings.otel_exporter_otlp_endpoint,
        settings.otel_metric_export_interval_seconds,
    )
    uvloop.run(serve(settings))


if __name__ == "__main__":
    main()
