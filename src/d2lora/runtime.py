"""What every workflow script does around its one call: log to the rule's log file, bound threads."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from pathlib import Path


@contextlib.contextmanager
def job(snakemake):
    """Send stdout/stderr (progress bars, warnings, tracebacks) to the rule's log and set thread counts."""
    threads = str(max(1, int(getattr(snakemake, "threads", 1))))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = threads
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    log_path = Path(snakemake.log[0]) if len(snakemake.log) else None
    if log_path is None:
        yield
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", buffering=1, encoding="utf-8") as handle:
        old_out, old_err = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = handle
        logging.basicConfig(stream=handle, level=logging.INFO, force=True)
        try:
            if "torch" in sys.modules or _torch_available():
                import torch

                torch.set_num_threads(int(threads))
            yield
        except BaseException:
            traceback.print_exc(file=handle)
            raise
        finally:
            sys.stdout, sys.stderr = old_out, old_err


def _torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None
