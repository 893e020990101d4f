"""Benchmarks, printed as ratios against a baseline measured in the same run.

A package so that ``bench/gateway.py`` (module ``bench.gateway``) does not shadow the ``gateway``
package for mypy.
"""
