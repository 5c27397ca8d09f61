"""The Space's entry point run in a process of its own on a free loopback port, for soak tests and benchmarks."""

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve_space(app: str, model_dir: str, log_path: str, env: dict | None = None, startup_timeout: float = 300.0):
    """
    `python app --model model_dir --host 127.0.0.1 --port <free port>` (the Space's `spaces_demo/app.py`), offline and
    without analytics, its output in `log_path`, the folder above `app` on its `PYTHONPATH`; `env` adds variables.
    Yields `(url, pid)` once the page answers; raises `RuntimeError` (with the end of the log) if the process exits
    or does not answer within `startup_timeout` seconds. The process is terminated (killed after 30 s) on exit.
    """
    import httpx

    port = free_port()
    variables = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    variables["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(app))),
                                              os.environ.get("PYTHONPATH", "")])
    variables.update(env or {})
    log = open(log_path, "w")
    process = subprocess.Popen(
        [sys.executable, app, "--model", model_dir, "--host", "127.0.0.1", "--port", str(port)],
        env=variables, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                with open(log_path, encoding="utf-8", errors="replace") as handle:
                    tail = handle.read()[-2000:]
                raise RuntimeError(f"the Space exited ({process.returncode}); the end of {log_path}:\n{tail}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Space did not start within {startup_timeout:g} s; see {log_path}")
            time.sleep(0.5)
        yield url, process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


__all__ = ["free_port", "serve_space"]
