"""The upstream generator: the application's own model, for the Generate RPC.

Any OpenAI-compatible endpoint, configured apart from the critic's. It
answers the user's prompt with plain text; the gateway then checks the answer.
`generate` returns the whole answer; `generate_stream` yields it as it is written.
"""

from __future__ import annotations

import openai

from critic.chat import ChatEndpoint, ChatStream, LLMSettings
from critic.types import Deadline, Usage

__all__ = ["ChatStream", "Generator"]


class Generator:
    """Drafts answers with an upstream model.

    Args:
        settings: Endpoint, model and pacing.
        system_prompt: The application's instructions to its model.
    """

    def __init__(
        self,
        settings: LLMSettings,
        *,
        system_prompt: str = "You are a helpful assistant.",
        client: openai.AsyncOpenAI | None = None,
    ) -> None:
        self._endpoint = ChatEndpoint(settings, client=client)
        self._system_prompt = system_prompt

    @property
    def system_prompt(self) -> str:
        """The application's instructions to its model (a stream check compares against it)."""
        return self._system_prompt

    @property
    def model(self) -> str:
        """The upstream model's name."""
        return self._endpoint.settings.model

    async def generate(self, prompt: str, deadline: Deadline) -> tuple[str, Usage]:
        """The model's draft answer to `prompt`.

        Raises:
            CriticUnavailable: the model could not answer before the deadline.
        """
        return await self._endpoint.complete(self._messages(prompt), deadline, temperature=0.7)

    def generate_stream(self, prompt: str, deadline: Deadline) -> ChatStream:
        """The model's answer to `prompt`, streamed: `async for delta in ...`.

        Yields the non-empty content deltas in order; once the stream has ended,
        the returned object's `usage` holds the calls, tokens and cost (it is per
        stream, so concurrent requests on one generator cannot mix them). The
        deadline bounds the whole stream; failures before the first delta are
        retried, later ones are not (a retry would repeat text).

        Raises (while iterating):
            CriticUnavailable: the model could not answer before the deadline.
        """
        return self._endpoint.stream(self._messages(prompt), deadline, temperature=0.7)

    def _messages(self, prompt: str) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": self._system_prompt},
            {"role": "user", "content": prompt},
        ]

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._endpoint.aclose()
