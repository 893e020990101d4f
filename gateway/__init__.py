"""The Steward gateway: every client call goes through here (DESIGN §8).

``python -m gateway`` serves the proxy (``/v1``, ``/mcp``, ``/api``, Kong routes) on
``STEWARD_GATEWAY_PROXY_PORT`` and a Kong-compatible admin API on ``STEWARD_GATEWAY_ADMIN_PORT``.
Authentication and authorisation are local: replicas of authz and the catalog fed by snapshots
and events, so no request waits on another service.
"""
