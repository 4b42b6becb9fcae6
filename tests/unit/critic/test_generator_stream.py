"""Generator.generate_stream: the real `openai` client streaming from the fake server.

No mocks: the fake answers `stream=True` calls with Server-Sent Events in
OpenAI's shape, so the SDK's own SSE parsing and the deadline handling run.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from critic.chat import LLMSettings
from critic.generator import Generator
from critic.types import CriticUnavailable, Deadline
from tests.fakes.openai_server import FakeOpenAI, completion, http_error, slow, streamed


def settings(fake: FakeOpenAI, **changes: object) -> LLMSettings:
    """Generator settings pointing at the fake, with short backoffs."""
    values: dict[str, object] = {
        "model": "fake-generator", "base_url": fake.base_url, "api_key": "test-key",
        "call_timeout_s": 5.0, "max_retries": 1, "backoff_base_s": 0.01, "backoff_max_s": 0.02,
    }  # fmt: skip
    values.update(changes)
    return LLMSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
async def generator(fake_llm: FakeOpenAI) -> AsyncIterator[Generator]:
    gen = Generator(settings(fake_llm))
    yield gen
    await gen.aclose()


async def test_yields_the_scripted_deltas_in_order_and_reports_usage(
    fake_llm: FakeOpenAI, generator: Generator
) -> None:
    fake_llm.script(streamed(["Hel", "lo ", "world"]))
    stream = generator.generate_stream("say hello", Deadline(5))
    assert stream.usage is None  # not until the stream has ended
    pieces = [piece async for piece in stream]
    assert pieces == ["Hel", "lo ", "world"]
    usage = stream.usage
    assert usage is not None
    assert (usage.calls, usage.prompt_tokens, usage.completion_tokens) == (1, 120, 40)
    assert usage.cost_usd == pytest.approx((120 * 0.15 + 40 * 0.60) / 1e6)
    request = fake_llm.requests[0]
    assert request["stream"] is True and request["stream_options"] == {"include_usage": True}
    assert request["model"] == "fake-generator"
    assert request["messages"][-1] == {"role": "user", "content": "say hello"}


async def test_an_ordinary_completion_streams_as_one_delta(
    fake_llm: FakeOpenAI, generator: Generator
) -> None:
    fake_llm.script(completion("All in one go.", tokens=(7, 3)))
    async with generator.generate_stream("hi", Deadline(5)) as stream:
        assert [piece async for piece in stream] == ["All in one go."]
    assert stream.usage is not None
    assert (stream.usage.prompt_tokens, stream.usage.completion_tokens) == (7, 3)


async def test_server_error_before_the_first_chunk_raises(fake_llm: FakeOpenAI) -> None:
    fake_llm.script(http_error(500), http_error(503))  # the call and its one retry
    gen = Generator(settings(fake_llm))
    try:
        with pytest.raises(CriticUnavailable) as caught:
            async for _ in gen.generate_stream("hi", Deadline(5)):
                pass
    finally:
        await gen.aclose()
    assert caught.value.reason == "server_error"
    assert fake_llm.calls == 2


async def test_a_failure_before_the_first_chunk_is_retried(
    fake_llm: FakeOpenAI, generator: Generator
) -> None:
    fake_llm.script(http_error(502), streamed(["second ", "try"]))
    pieces = [piece async for piece in generator.generate_stream("hi", Deadline(5))]
    assert pieces == ["second ", "try"]
    assert fake_llm.calls == 2


async def test_a_stream_slower_than_the_deadline_raises(
    fake_llm: FakeOpenAI, generator: Generator
) -> None:
    fake_llm.script(streamed(["one ", "two ", "three"], delay_s=0.4))
    pieces: list[str] = []
    started = time.monotonic()
    with pytest.raises(CriticUnavailable) as caught:
        async for piece in generator.generate_stream("hi", Deadline(0.6)):
            pieces.append(piece)
    assert caught.value.reason in {"deadline", "timeout"}
    assert time.monotonic() - started < 1.5  # cut at the deadline, not at the stream's end
    assert pieces == ["one ", "two "]  # at 0 s and 0.4 s; "three" would come at 0.8 s
    assert fake_llm.calls == 1  # no retry: it would repeat text already yielded


async def test_a_deadline_shorter_than_a_slow_start_raises(
    fake_llm: FakeOpenAI, generator: Generator
) -> None:
    fake_llm.script(slow(2.0, streamed(["late"])))
    with pytest.raises(CriticUnavailable) as caught:
        async for _ in generator.generate_stream("hi", Deadline(0.3)):
            pass
    assert caught.value.reason in {"deadline", "timeout"}
    assert fake_llm.calls == 1


async def test_a_stall_after_the_first_chunk_is_not_retried(fake_llm: FakeOpenAI) -> None:
    # The read timeout (call_timeout_s) fires mid-stream while the deadline has
    # time to spare: a retry is allowed by the settings but would repeat text.
    fake_llm.script(streamed(["first ", "never"], delay_s=0.5))
    gen = Generator(settings(fake_llm, call_timeout_s=0.25))
    pieces: list[str] = []
    try:
        with pytest.raises(CriticUnavailable) as caught:
            async for piece in gen.generate_stream("hi", Deadline(5)):
                pieces.append(piece)
    finally:
        await gen.aclose()
    assert caught.value.reason == "timeout"
    assert pieces == ["first "]
    assert fake_llm.calls == 1


async def test_stopping_early_releases_the_stream(
    fake_llm: FakeOpenAI, generator: Generator
) -> None:
    fake_llm.script(streamed(["a", "b", "c"]), completion("after"))
    async with generator.generate_stream("hi", Deadline(5)) as stream:
        async for piece in stream:
            assert piece == "a"
            break
    assert stream.usage is None  # it did not end normally
    text, _ = await generator.generate("again", Deadline(5))  # the client still works
    assert text == "after"
