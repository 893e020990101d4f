"""Runtimes: where an endpoint's server runs (KServe, a local process, an external URL)."""
