"""Prometheus metrics of the CA and the node (docs/metrics.md).

- :mod:`trustmesh.metrics.exposition`: what both share: the text exposition as an
  aiohttp response, the listeners' limit counters, and :class:`MetricsServer`, the
  plain-HTTP ``/metrics`` port (``--metrics HOST:PORT``) for a local scraper.
- :mod:`trustmesh.metrics.node`: a node's metrics, read from the counters the node
  keeps anyway (gossip engine, core, bundle agent, listeners) at scrape time.
- :mod:`trustmesh.metrics.ca`: the CA's: requests, enrollments and rotations by
  outcome, the CRL, certificate expiry.

Every instance has its own ``CollectorRegistry`` (never the process-wide default): a
test, a demo or a benchmark runs several nodes and a CA in one process.
"""
