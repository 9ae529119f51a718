"""The worker's HTTP surface: probes, Prometheus metrics (and the query API)."""
