"""The layout is the architecture.

Only gateway/api (and the clients in gateway/cli) speak gRPC; the runtime the
adapters call never does; offline evaluation needs no server and no runtime;
generated code is current.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(package: str, *, depth: int = 1) -> set[str]:
    """Modules imported anywhere under `package`, cut to their first `depth` parts."""
    modules = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            modules |= {".".join(name.split(".")[:depth]) for name in names}
    return modules


@pytest.mark.parametrize("package", ["router", "critic", "embeddings_index"])
def test_core_packages_never_import_grpc_or_the_gateway(package: str) -> None:
    forbidden = {"grpc", "grpc_health", "grpc_reflection", "grpc_status", "gateway", "google"}
    assert imported_modules(package) & forbidden == set()


GRPC = {"grpc", "grpc_health", "grpc_reflection", "grpc_status", "google"}


def test_the_runtime_never_speaks_grpc() -> None:
    assert imported_modules("gateway/runtime") & GRPC == set()
    assert imported_modules("gateway/runtime", depth=2) & {
        "gateway._proto", "gateway.api", "gateway.cli", "gateway.offline",
    } == set()  # fmt: skip


def test_offline_tools_need_no_server_and_no_runtime() -> None:
    assert imported_modules("gateway/offline") & GRPC == set()
    assert imported_modules("gateway/offline", depth=2) & {
        "gateway._proto", "gateway.api", "gateway.cli",
    } == set()  # fmt: skip
    assert "gateway.runtime.app" not in imported_modules("gateway/offline", depth=3)


def test_the_adapters_do_not_reach_into_the_command_line_or_offline_tools() -> None:
    assert imported_modules("gateway/api", depth=2) & {"gateway.cli", "gateway.offline"} == set()


def test_embeddings_index_does_not_depend_on_router_or_critic() -> None:
    assert imported_modules("embeddings_index") & {"router", "critic"} == set()


def test_generated_protobuf_code_is_current() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
