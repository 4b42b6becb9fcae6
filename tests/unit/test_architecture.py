"""The layout is the architecture: only gateway/ speaks gRPC; generated code is current."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(package: str) -> set[str]:
    modules = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules.add(node.module.split(".")[0])
    return modules


@pytest.mark.parametrize("package", ["router", "critic", "embeddings_index"])
def test_core_packages_never_import_grpc_or_the_gateway(package: str) -> None:
    forbidden = {"grpc", "grpc_health", "grpc_reflection", "grpc_status", "gateway", "google"}
    assert imported_modules(package) & forbidden == set()


def test_embeddings_index_does_not_depend_on_router_or_critic() -> None:
    assert imported_modules("embeddings_index") & {"router", "critic"} == set()


def test_generated_protobuf_code_is_current() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
