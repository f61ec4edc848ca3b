"""What every workflow script does around its one call: log to the rule's log file, bound threads,
point torch.compile at the config's cache folder (`compile_cache_dir`).

It also exports the config's sha256 (recorded in every result manifest) and the name of the
config's token variable (`hf_token_env`), whose value is then redacted from the log and from
every manifest (d2lora.redaction.redact).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from pathlib import Path

from d2lora.manifests import CONFIG_SHA_ENV, config_sha256
from d2lora.redaction import SECRET_ENVS_VAR, secret_values

COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


@contextlib.contextmanager
def job(snakemake):
    """Send stdout/stderr (progress bars, warnings, tracebacks) to the rule's log and set thread counts."""
    threads = str(max(1, int(getattr(snakemake, "threads", 1))))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = threads
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _export_provenance_settings(getattr(snakemake, "config", None))
    _export_compile_cache(getattr(snakemake, "config", None))
    log_path = Path(snakemake.log[0]) if len(snakemake.log) else None
    if log_path is None:
        yield
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with output_to_log(log_path, "w"):
        # torch reads OMP_NUM_THREADS when it is imported; only an already imported torch needs
        # telling. Importing it here would add seconds to every figure and table job.
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(int(threads))
        yield


@contextlib.contextmanager
def output_to_log(log_path, mode: str):
    """stdout, stderr and logging into `log_path` (token values redacted, so the environment must
    already name them), with the traceback of a failure; the previous streams back after. The job
    wrapper above and the cell server (d2lora.cell_server, a job's cell in a long-lived process)
    both log through it."""
    with open(log_path, mode, buffering=1, encoding="utf-8") as raw:
        handle = RedactingWriter(raw)
        old_out, old_err = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = handle
        logging.basicConfig(stream=handle, level=logging.INFO, force=True)
        try:
            yield
        except BaseException:
            traceback.print_exc(file=handle)
            raise
        finally:
            sys.stdout, sys.stderr = old_out, old_err
            logging.basicConfig(stream=old_err, level=logging.INFO, force=True)


def _export_provenance_settings(config) -> None:
    if not config:
        return
    os.environ[CONFIG_SHA_ENV] = config_sha256(dict(config))
    token_env = config.get("hf_token_env")
    if token_env:
        names = {n for n in os.environ.get(SECRET_ENVS_VAR, "").split(",") if n} | {str(token_env)}
        os.environ[SECRET_ENVS_VAR] = ",".join(sorted(names))


def _export_compile_cache(config) -> None:
    """torch.compile's cache folder from the config; inductor reads the variable when it compiles,
    so setting it after torch is imported is in time."""
    folder = (config or {}).get("compile_cache_dir")
    if folder:
        os.environ[COMPILE_CACHE_ENV] = str(Path(folder).resolve())


class RedactingWriter:
    """A text stream that replaces token values (d2lora.redaction.secret_values) before writing."""

    def __init__(self, stream):
        self._stream = stream
        self._secrets = secret_values()

    def write(self, text: str) -> int:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)
