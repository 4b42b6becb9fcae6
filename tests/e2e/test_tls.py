"""TLS and mutual TLS listeners, with certificates made by openssl for the test."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from embeddings_index.embedder import SentenceTransformerEmbedder
from gateway._proto.guardrail.v1 import guardrail_pb2 as pb
from gateway._proto.guardrail.v1 import guardrail_pb2_grpc as pb_grpc
from gateway.api.server import RunningServer, start_server
from gateway.runtime.app import Gateway
from tests.conftest import make_config

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
            "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))  # fmt: skip
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))  # fmt: skip
        openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"),
                "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
                "-extfile", str(d / "san.cnf"), "-out", str(d / f"{name}.pem"))  # fmt: skip
    return d


async def tls_server(data_dir: Path, embedder: SentenceTransformerEmbedder, pki: Path,
                     *, mutual: bool) -> RunningServer:  # fmt: skip
    base = make_config(data_dir)
    server = replace(base.server, tls_cert_file=pki / "server.pem", tls_key_file=pki / "server.key",
                     tls_client_ca_file=pki / "ca.pem" if mutual else None)  # fmt: skip
    gateway = Gateway.create(replace(base, server=server), embedder=embedder)
    return await start_server(gateway, port=0)


@pytest.fixture
async def tls(
    data_dir: Path, embedder: SentenceTransformerEmbedder, pki: Path
) -> AsyncIterator[RunningServer]:
    running = await tls_server(data_dir, embedder, pki, mutual=False)
    yield running
    await running.stop(grace_seconds=0)


@pytest.fixture
async def mtls(
    data_dir: Path, embedder: SentenceTransformerEmbedder, pki: Path
) -> AsyncIterator[RunningServer]:
    running = await tls_server(data_dir, embedder, pki, mutual=True)
    yield running
    await running.stop(grace_seconds=0)


async def check_over(port: int, credentials: grpc.ChannelCredentials) -> pb.Verdict:
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        stub = pb_grpc.GuardrailServiceStub(channel)
        reply = await stub.CheckPrompt(
            pb.CheckPromptRequest(text="How do I reset my password?"), timeout=10
        )
    return reply.verdict


async def test_tls_serves_clients_that_trust_the_ca(tls: RunningServer, pki: Path) -> None:
    verdict = await check_over(
        tls.port, grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes())
    )
    assert verdict.decision == pb.DECISION_ALLOW
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tls.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await pb_grpc.GuardrailServiceStub(channel).CheckPrompt(
                pb.CheckPromptRequest(text="hi"), timeout=5
            )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # plaintext cannot talk to TLS


async def test_mutual_tls_requires_a_client_certificate(mtls: RunningServer, pki: Path) -> None:
    with_cert = grpc.ssl_channel_credentials(
        (pki / "ca.pem").read_bytes(),
        (pki / "client.key").read_bytes(),
        (pki / "client.pem").read_bytes(),
    )
    assert (await check_over(mtls.port, with_cert)).decision == pb.DECISION_ALLOW
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await check_over(mtls.port, grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes()))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
