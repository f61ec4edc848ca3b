"""From evaluation scores to the report's figures and tables."""
from d2lora.results.figures import plot_curves
from d2lora.results.metrics import (
    collect_metrics,
    expand_base_rows,
    read_metrics,
    read_reference,
    spec_cells,
    write_metrics,
)
from d2lora.results.tables import comparison_table, hyperparameter_table, write_table

__all__ = [
    "collect_metrics", "comparison_table", "expand_base_rows", "hyperparameter_table", "plot_curves",
    "read_metrics", "read_reference", "spec_cells", "write_metrics", "write_table",
]
