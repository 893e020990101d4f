"""``python -m gateway``: the proxy and the admin API, on uvloop with httptools."""

from __future__ import annotations

import uvloop

from gateway.app import serve
from libs.common.observability import configure_logging, configure_metrics, configure_tracing
from libs.common.settings import Settings


def main() -> None:
    settings = Settings()
    configure_logging(settings.log_level)
    configure_tracing("gateway", settings.otel_exporter_otlp_endpoint)
    configure_metrics(
        "gateway",
        settings.otel_exporter_otlp_endpoint,
        settings.otel_metric_export_interval_seconds,
    )
    uvloop.run(serve(settings))


if __name__ == "__main__":
    main()
