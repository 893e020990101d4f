"""Event contracts: the CloudEvents envelope, the subjects, and one payload model per subject.

Subjects are written relative to the installation's namespace (``authz.key.created`` is published
as ``steward.authz.key.created``) so that several installations can share one NATS server.
"""

from libs.common.events.envelope import CloudEvent, EventPayload, payload_model
from libs.common.events.streams import STREAMS, stream_for

__all__ = ["STREAMS", "CloudEvent", "EventPayload", "payload_model", "stream_for"]
