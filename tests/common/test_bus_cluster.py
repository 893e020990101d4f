"""The bus on a NATS cluster: ``STEWARD_NATS_URL`` may list servers, and streams and buckets are
kept by ``STEWARD_NATS_REPLICAS`` of them (the 3-node cluster itself runs in
tests/e2e/test_scale_out.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from libs.common.bus import Bus
from libs.common.settings import Settings


def test_a_cluster_url_lists_its_servers_and_the_bus_connects_to_any() -> None:
    settings = Settings(nats_url="nats://n1:4222, nats://n2:4222,nats://n3:4222", nats_replicas=3)
    bus = Bus.from_settings(settings, name="t")
    assert bus.servers == ["nats://n1:4222", "nats://n2:4222", "nats://n3:4222"]
    assert bus.replicas == 3


@pytest.mark.parametrize(
    ("values", "field"),
    [({"nats_url": " , "}, "nats_url"), ({"nats_replicas": 0}, "nats_replicas")],
)
def test_a_url_without_a_server_or_no_replica_is_refused_at_start(
    values: dict[str, object], field: str
) -> None:
    with pytest.raises(ValidationError, match=field):
        Settings(**values)  # type: ignore[arg-type]
