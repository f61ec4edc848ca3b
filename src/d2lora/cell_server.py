"""One process serving several evaluation cells (`evaluation.server`), and training cells
(`training.server`, d2lora.training.dispatch) alike.

Every workflow job is a new process, so each evaluation used to pay Python's imports (torch,
transformers, peft), the CUDA context and, with a compiled decoding step, torch.compile's in-memory
caches before its first token. With the server on, the evaluate job stays a job (its own outputs,
log, manifest and Snakemake's reruns of only what changed) but hands its cell to a long-lived
process on the same machine that has paid all of that once; the job waits for the answer.

- One server per host, SLURM job, CUDA_VISIBLE_DEVICES, Python interpreter and version of this
  package's code (a hash of its source files): jobs that would share a GPU share a server, and
  editing the code starts a new one instead of serving with the old. A server serves one cell at
  a time; jobs that run at the same time each get a server of their own (a slot), so no job waits
  for another's cell and the jobs run as concurrently as without servers.
- A request runs as the job would run it: in the job's folder, with the job's environment (config
  hash, token names, thread counts, torch.compile's cache folder), writing the job's log (secrets
  redacted). The model is loaded per request and freed after it, so the server holds no GPU memory
  between cells beyond the CUDA context; with `keep_base_weights` it keeps the base checkpoint's
  weights in host memory and builds the next cells' models from them (d2lora.base_weights).
- The job that finds its slot without a server starts one, and the server leaves after
  `idle_seconds` without a request. If the job ends while its cell is running (cancelled, out of
  time), the server ends at once: nothing is written after Snakemake has given up on the job.
- Only the functions in FUNCTIONS can be called.

On SLURM every job is its own allocation and its processes end with it, so a server outlives one
job only when Snakemake runs several evaluations in one allocation (job groups, docs/cluster.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import importlib
import json
import os
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from d2lora.runtime import output_to_log

# name -> (module, function): what a client may ask the server to run
FUNCTIONS = {
    "evaluate_cell": ("d2lora.evaluation.run", "evaluate_cell"),
    "run_warmup": ("d2lora.training.run", "run_warmup"),
    "run_adaptation": ("d2lora.training.run", "run_adaptation"),
}
SERVER_DIR_ENV = "D2LORA_SERVER_DIR"
PACKAGE_DIR = Path(__file__).resolve().parent
# How often the server checks that the job it serves is still there.
CLIENT_CHECK_SECONDS = 1.0
# Servers per key at most: one per evaluate job running at the same time on one machine.
MAX_SLOTS = 64


class CellServerError(RuntimeError):
    """The server could not be started, or the cell failed in it (its traceback is in the job's log)."""


def server_dir() -> Path:
    """Where sockets, locks and server logs live: $D2LORA_SERVER_DIR, else a private folder in /tmp
    (node-local on a cluster, as a server is)."""
    folder = Path(os.environ.get(SERVER_DIR_ENV) or Path(tempfile.gettempdir()) / f"d2lora-servers-{os.getuid()}")
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if folder.stat().st_uid != os.getuid():
        raise CellServerError(f"{folder} belongs to another user; set {SERVER_DIR_ENV} to a folder of your own")
    return folder


def code_fingerprint() -> str:
    """sha256 over this package's source files: a server runs only the code its clients run."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE_DIR)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def server_key() -> str:
    """Which server a job uses. SLURM's job id keeps allocations apart: with each job's GPU shown to
    it as device 0, two jobs on one node see the same CUDA_VISIBLE_DEVICES, and a job's processes
    end with it."""
    parts = [
        socket.gethostname(),
        os.environ.get("SLURM_JOB_ID", ""),
        os.environ.get("CUDA_VISIBLE_DEVICES", "<all>"),
        sys.executable,
        code_fingerprint(),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


# ----------------------------------------------------------------------------------------- client


def call(
    function: str,
    kwargs: dict,
    *,
    log_path,
    idle_seconds: int,
    start_timeout: float = 600.0,
    keep_base_weights: bool = False,
) -> Any:
    """Run FUNCTIONS[function](**kwargs) in a server of this machine (started if none is free) and
    return its result. kwargs and the result travel as JSON. The server writes the cell's output
    into `log_path` (appending). `keep_base_weights`: the server keeps the base checkpoint's weights
    in host memory for its next cells (d2lora.base_weights)."""
    if function not in FUNCTIONS:
        raise ValueError(f"unknown server function {function!r} (known: {', '.join(FUNCTIONS)})")
    request = {
        "function": function,
        "kwargs": kwargs,
        "cwd": os.getcwd(),
        "env": dict(os.environ),
        "log": str(Path(log_path).resolve()) if log_path else None,
        "client_pid": os.getpid(),
        "keep_base_weights": bool(keep_base_weights),
    }
    payload = (json.dumps(request) + "\n").encode()
    with _claim_slot(server_dir() / server_key()) as paths:
        conn = _connect(paths["sock"]) or _start(paths, idle_seconds, start_timeout)
        with conn, conn.makefile("rb") as replies:
            conn.sendall(payload)
            accepted = replies.readline()
            if not accepted:
                raise CellServerError(f"the cell server closed without taking the request; its log: {paths['log']}")
            pid, served = json.loads(accepted)["accepted"], json.loads(accepted)["request"]
            print(f"cell server: pid {pid} on {socket.gethostname()}, request {served} (its log: {paths['log']})")
            reply = replies.readline()
    if not reply:
        raise CellServerError(f"the cell server (pid {pid}) ended during the request; its log: {paths['log']}")
    answer = json.loads(reply)
    if not answer["ok"]:
        raise CellServerError(f"{function} failed in the cell server (pid {pid}): {answer['error']}")
    return answer["result"]


@contextlib.contextmanager
def _claim_slot(stem: Path):
    """The first server slot no other job holds, held until the request is answered: jobs that run
    at the same time get servers of their own (as many as run at once), never wait for each
    other's cells. A slot is an flock, so a job that dies releases it."""
    for slot in range(MAX_SLOTS):
        paths = {name: Path(f"{stem}.{slot}.{name}") for name in ("sock", "claim", "log")}
        handle = open(paths["claim"], "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        try:
            yield paths
            return
        finally:
            handle.close()  # releases the flock
    raise CellServerError(f"all {MAX_SLOTS} cell-server slots of {stem} are in use")


def _connect(path: Path) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
        return conn
    except (FileNotFoundError, ConnectionRefusedError):
        conn.close()
        return None


def _start(paths: dict[str, Path], idle_seconds: int, start_timeout: float) -> socket.socket:
    """Start the slot's server (the caller holds the slot) and connect once it listens."""
    paths["sock"].unlink(missing_ok=True)  # a dead server's socket
    with open(paths["log"], "a") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "d2lora.cell_server", str(paths["sock"]), str(paths["claim"]), str(idle_seconds)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=paths["sock"].parent,
            start_new_session=True,  # not killed with the job's process group; it leaves when idle
        )
    deadline = time.monotonic() + start_timeout
    while time.monotonic() < deadline:
        conn = _connect(paths["sock"])
        if conn is not None:
            process.returncode = 0  # detached on purpose: no "still running" warning when this job ends
            return conn
        if process.poll() is not None:
            raise CellServerError(
                f"the cell server exited with {process.returncode} while starting; its log: {paths['log']}"
            )
        time.sleep(0.1)
    process.kill()
    raise CellServerError(f"the cell server did not listen within {start_timeout:.0f} s; its log: {paths['log']}")


# ----------------------------------------------------------------------------------------- server


class _Server(socketserver.UnixStreamServer):
    def __init__(self, path: str, idle_seconds: int):
        super().__init__(path, _Handler)
        self.timeout = idle_seconds
        self.path_inode = os.stat(path).st_ino  # to unlink only our own socket file when leaving
        self.requests_served = 0
        self.idle = False
        self.broken = False  # a CUDA error leaves the context unusable: leave after answering

    def handle_timeout(self) -> None:
        self.idle = True


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        request = json.loads(self.rfile.readline())
        self.server.requests_served += 1
        self.wfile.write(
            (json.dumps({"accepted": os.getpid(), "request": self.server.requests_served}) + "\n").encode()
        )
        self.wfile.flush()
        stop_watching = _watch_client(int(request["client_pid"]))
        started = time.perf_counter()
        try:
            answer = {"ok": True, "result": _run(request)}
        except Exception as error:  # the cell's failure is the job's, not the server's
            answer = {"ok": False, "error": f"{type(error).__name__}: {error}"}
            self.server.broken = "CUDA error" in str(error)
        finally:
            stop_watching.set()
        # logged before the answer goes out: the job may read the server's log as soon as it has it
        print(
            f"cell server: request {self.server.requests_served} ({request['log']}) "
            f"{'done' if answer['ok'] else 'failed'} in {time.perf_counter() - started:.1f} s; "
            f"{_device_memory_left()} left allocated",
            flush=True,
        )
        self.wfile.write((json.dumps(answer) + "\n").encode())


def _device_memory_left() -> str:
    """What the server still holds on the GPU after a cell: the model should be gone."""
    import torch  # the server's, as in _as_job

    if not torch.cuda.is_available():
        return "no GPU memory"
    return f"{torch.cuda.memory_allocated() / 2**20:.0f} MiB of GPU memory"


def _watch_client(pid: int) -> threading.Event:
    """End the server if the job it serves is gone: its outputs are no longer wanted."""
    done = threading.Event()

    def watch():
        while not done.wait(CLIENT_CHECK_SECONDS):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                print(f"cell server: the job (pid {pid}) ended mid-request; leaving", file=sys.__stderr__, flush=True)
                os._exit(3)
            except PermissionError:
                pass  # alive, another user's (cannot happen with the private folder)

    threading.Thread(target=watch, daemon=True).start()
    return done


def _run(request: dict) -> Any:
    # base_weights: the server's side only (the client job never loads a model)
    from d2lora import base_weights

    module, name = FUNCTIONS[request["function"]]
    function = getattr(importlib.import_module(module), name)
    with _as_job(request), base_weights.keeping(request["keep_base_weights"]):
        return function(**request["kwargs"])


@contextlib.contextmanager
def _as_job(request: dict):
    """The job's folder, environment, thread count and log for the request; the model's memory
    back after it."""
    # torch: the server's; the client job, which this module keeps light, never imports it
    import torch

    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    try:
        # after the job's environment: it names the secrets to redact
        with output_to_log(request["log"] or os.devnull, "a"):
            yield
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def serve(socket_path: str, claim_path: str, idle_seconds: int) -> None:
    started = time.perf_counter()
    for module, _ in FUNCTIONS.values():
        importlib.import_module(module)
    import torch  # already imported by the modules above; the client job never imports it

    if torch.cuda.is_available():
        torch.cuda.init()
    server = _Server(socket_path, idle_seconds)
    print(f"cell server: pid {os.getpid()} ready in {time.perf_counter() - started:.1f} s at {socket_path}", flush=True)
    with server, open(claim_path, "a") as claim:
        while True:
            server.handle_request()
            if server.broken:
                print(f"cell server: pid {os.getpid()} leaving after a CUDA error", flush=True)
                return  # its socket is left behind: the next job finds no one there and starts a server
            if not server.idle:
                continue
            server.idle = False
            # Leave only with the slot claimed, so that no job is connecting to a closing socket.
            try:
                fcntl.flock(claim, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a job holds the slot: its request is on the way
            with contextlib.suppress(FileNotFoundError):
                if os.stat(socket_path).st_ino == server.path_inode:
                    os.unlink(socket_path)
            break
    print(
        f"cell server: pid {os.getpid()} idle for {idle_seconds} s after {server.requests_served} request(s); leaving",
        flush=True,
    )


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2], int(sys.argv[3]))
