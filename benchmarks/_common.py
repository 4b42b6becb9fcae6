"""What the benchmark scripts share: the repository on sys.path and their default paths.

Imported first by each script (`from _common import ...`, the scripts' own
directory being on sys.path), so the project's packages import after it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The labelled evaluation data, beside the repository (see its README).
DEFAULT_DATA = ROOT.parent / "shared" / "datasets"
# ONNX exports and servers' data directories, kept between runs.
DEFAULT_WORK_DIR = Path(tempfile.gettempdir()) / "tierguard-bench"
