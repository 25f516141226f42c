"""Ignite/MONAI event handlers the bundles attach (``attach(engine)``), one per file."""

from .metrics_csv import MetricsCSV, read_metrics_csv

__all__ = ["MetricsCSV", "read_metrics_csv"]
