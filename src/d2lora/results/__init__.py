"""From evaluation scores to the report's figures and tables.

Names are imported on first use, so that importing one submodule does not import matplotlib.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "plot_curves": "figures",
    "init_label": "labels",
    "init_labels": "labels",
    "collect_metrics": "metrics",
    "expand_base_rows": "metrics",
    "read_metrics": "metrics",
    "read_reference": "metrics",
    "spec_cells": "metrics",
    "write_metrics": "metrics",
    "bootstrap_ci": "statistics",
    "holm": "statistics",
    "interval_table": "statistics",
    "load_examples": "statistics",
    "mcnemar_exact": "statistics",
    "mcnemar_test": "statistics",
    "paired_bootstrap": "statistics",
    "read_intervals": "statistics",
    "significance_table": "statistics",
    "write_intervals": "statistics",
    "write_significance": "statistics",
    "comparison_table": "tables",
    "hyperparameter_table": "tables",
    "write_table": "tables",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
