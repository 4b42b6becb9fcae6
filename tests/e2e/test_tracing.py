"""Traces: one escalated request shows every stage, in the caller's trace."""

from __future__ import annotations

from pathlib import Path

import grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from embeddings_index.embedder import SentenceTransformerEmbedder
from gateway._proto.guardrail.v1 import guardrail_pb2 as pb
from gateway._proto.guardrail.v1 import guardrail_pb2_grpc as pb_grpc
from gateway.api.server import start_server
from gateway.runtime.app import Gateway
from gateway.runtime.tracing import configure_from_environment
from tests.conftest import make_config

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


async def test_an_escalated_request_is_traced_stage_by_stage_in_the_callers_trace(
    data_dir: Path, embedder: SentenceTransformerEmbedder
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    gateway = Gateway.create(make_config(data_dir), embedder=embedder, tracer_provider=provider)
    running = await start_server(gateway, port=0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            reply = await pb_grpc.GuardrailServiceStub(channel).CheckPrompt(
                pb.CheckPromptRequest(text="What is the capital of France?", policy="critic-all"),
                metadata=[
                    ("traceparent", f"00-{TRACE_ID}-{CALLER_SPAN}-01"),
                    ("x-request-id", "trace-me-1"),
                ],
            )
    finally:
        await running.stop(grace_seconds=0)
    assert reply.verdict.escalated
    spans = exporter.get_finished_spans()
    assert {format(s.context.trace_id, "032x") for s in spans} == {TRACE_ID}
    by_name = {s.name: s for s in spans}
    rpc = by_name["/guardrail.v1.GuardrailService/CheckPrompt"]
    assert rpc.parent is not None and format(rpc.parent.span_id, "016x") == CALLER_SPAN
    assert rpc.attributes is not None and rpc.attributes["tierguard.request_id"] == "trace-me-1"
    for stage in ("route", "normalize", "prefilter", "embed", "search", "critic"):
        assert f"tierguard.{stage}" in by_name, sorted(by_name)
    route = by_name["tierguard.route"]
    assert route.parent is not None and route.parent.span_id == rpc.context.span_id
    embed = by_name["tierguard.embed"]
    assert embed.parent is not None and embed.parent.span_id == route.context.span_id
    assert not any("France" in str(s.attributes) for s in spans)  # no texts in spans


def test_nothing_is_exported_unless_an_otlp_endpoint_is_set() -> None:
    assert configure_from_environment({}) is None
