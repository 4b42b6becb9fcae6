"""OpenTelemetry traces: a span per request and per stage, in the caller's trace.

The gRPC instrumentation (in `gateway.api.server`) opens the request's span
and continues the caller's W3C `traceparent`; the checks add a span for the
router (with a child per tier-0/tier-1 stage), the critic and the upstream
model. The stage spans are laid end to end from the durations the router
measures (its stages run one after the other), so they show where time went
without the router knowing of OpenTelemetry.

Nothing is exported unless `OTEL_EXPORTER_OTLP_ENDPOINT` is set
(`configure_from_environment`, called by `tierguard serve`); without it the
spans are not recorded at all. Span attributes never hold texts or tokens.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.trace import Span, Tracer, TracerProvider

from router.router import Timings

__all__ = [
    "add_stage_spans", "configure_from_environment", "current_span", "now_ns", "span", "tracer_for",
]  # fmt: skip


def configure_from_environment(environ: Mapping[str, str] | None = None) -> TracerProvider | None:
    """With `OTEL_EXPORTER_OTLP_ENDPOINT` set: an SDK tracer provider exporting over OTLP
    (service name `OTEL_SERVICE_NAME`, default "tierguard"), made the global one.
    Else None: nothing is recorded or exported."""
    env = os.environ if environ is None else environ
    if not env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({SERVICE_NAME: env.get("OTEL_SERVICE_NAME") or "tierguard"})
    provider = SdkTracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


def tracer_for(provider: TracerProvider | None) -> Tracer:
    """The gateway's tracer from `provider` (None: the global provider)."""
    return trace.get_tracer("tierguard", tracer_provider=provider)


@contextmanager
def span(tracer: Tracer, name: str, **attributes: str | int | float | bool) -> Iterator[Span]:
    """A child span of the current one for the duration of the block."""
    with tracer.start_as_current_span(f"tierguard.{name}", attributes=attributes) as opened:
        yield opened


def add_stage_spans(tracer: Tracer, start_ns: int, timings: Timings) -> None:
    """Children of the current span for the router's stages, end to end from `start_ns`."""
    if not trace.get_current_span().is_recording():
        return
    at = start_ns
    for stage, ms in timings.stages():
        if ms <= 0:
            continue
        end = at + int(ms * 1e6)
        tracer.start_span(f"tierguard.{stage}", start_time=at).end(end_time=end)
        at = end


def current_span() -> Span:
    """The request's span (non-recording when tracing is off)."""
    return trace.get_current_span()


def now_ns() -> int:
    """The clock spans use."""
    return time.time_ns()
