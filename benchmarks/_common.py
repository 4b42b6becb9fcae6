"""What the benchmark scripts share: the repository on sys.path and their default paths.

Imported first by each script (`from _common import ...`, the scripts' own
directory being on sys.path), so the project's packages import after it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The labelled evaluation data, beside the repository (see its README).
DEFAULT_DATA = ROOT.parent / "shared" / "datasets"
# ONNX exports and servers' data directories, kept between runs.
DEFAULT_WORK_DIR = Path(tempfile.gettempdir()) / "tierguard-bench"


async def announce_and_wait(*ports: object) -> None:
    """In a benchmark's child: print `READY <ports>` (what `ChildServer` waits for),
    then wait for SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print("READY " + " ".join(str(port) for port in ports), flush=True)
    await stop.wait()


class ChildServer:
    """A benchmark's server in a subprocess of its own script, and its CPU time.

    The child prints one line `READY <port> [<port> ...]` once it listens and
    stops on SIGTERM; its further output is drained so it never blocks.
    """

    def __init__(self, script: str, arguments: Sequence[str]) -> None:
        command = [sys.executable, str(Path(script).resolve()), *arguments]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("READY"):
            self.proc.kill()
            raise RuntimeError(f"the server did not start (exit {self.proc.wait()})")
        self.ports = [int(port) for port in line.split()[1:]]
        self.port = self.ports[0]
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def cpu_seconds(self) -> float:
        """User and system CPU seconds of the child so far (NaN once it is gone)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
