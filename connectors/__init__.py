"""Connectors: the exporter of one pipeline and the receiver of another (``traces`` -> ``metrics``).

``spanmetrics`` (RED metrics from spans) and ``servicegraph`` (the service graph). Shared
aggregation helpers live in ``connectors.aggregate``. See connectors/README.md.
"""
