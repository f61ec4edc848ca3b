"""Where a warmup or adapt job trains its cell: in its own process, or in the machine's cell server
(`training.server`, d2lora.cell_server). Either way the same run_warmup / run_adaptation writes the
same adapter, training record and manifest."""

from __future__ import annotations

from collections.abc import Mapping

from d2lora import cell_server
from d2lora.settings import TrainingServer

TRAINING_FUNCTIONS = ("run_warmup", "run_adaptation")


def train_cell_job(function: str, *, server: TrainingServer | Mapping | None, log_path, **arguments) -> dict:
    """d2lora.training.run.<function>(**arguments), here or in the cell server; its training record
    either way. Paths travel as strings (a request is JSON)."""
    if function not in TRAINING_FUNCTIONS:
        raise ValueError(f"unknown training function {function!r} (known: {', '.join(TRAINING_FUNCTIONS)})")
    server = TrainingServer.of(server, "training.server")
    if not server.enabled:
        # torch, transformers, peft and TRL: imported only where the cell trains
        from d2lora.training import run

        return getattr(run, function)(**arguments)
    return cell_server.call(
        function,
        {key: str(value) if hasattr(value, "__fspath__") else value for key, value in arguments.items()},
        log_path=log_path,
        idle_seconds=server.idle_seconds,
    )
