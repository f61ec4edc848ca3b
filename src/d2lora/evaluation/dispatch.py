"""Where an evaluate job runs its cell: in its own process, or in the machine's cell server
(`evaluation.server`, d2lora.cell_server). Either way the same `evaluate_cell` writes the same files."""

from __future__ import annotations

from collections.abc import Mapping

from d2lora import cell_server
from d2lora.settings import EvaluationServer


def evaluate_cell_job(*, server: EvaluationServer | Mapping | None, log_path, **arguments) -> dict:
    """d2lora.evaluation.run.evaluate_cell(**arguments), here or in the cell server; its record
    either way. With the server the job itself imports no torch: that is the start-up it saves."""
    server = EvaluationServer.of(server, "evaluation.server")
    if not server.enabled:
        # torch, transformers and peft: imported only where the cell runs
        from d2lora.evaluation.run import evaluate_cell

        return evaluate_cell(**arguments)
    return cell_server.call(
        "evaluate_cell",
        arguments,
        log_path=log_path,
        idle_seconds=server.idle_seconds,
        keep_base_weights=server.keep_base_weights,
    )
