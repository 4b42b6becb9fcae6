"""The upstream generator: the application's own model, for the Generate RPC.

Any OpenAI-compatible endpoint, configured apart from the critic's. It
answers the user's prompt with plain text; the gateway then checks the answer.
"""

from __future__ import annotations

import openai

from critic.chat import ChatEndpoint, LLMSettings
from critic.types import Deadline, Usage

__all__ = ["Generator"]


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
    def model(self) -> str:
        """The upstream model's name."""
        return self._endpoint.settings.model

    async def generate(self, prompt: str, deadline: Deadline) -> tuple[str, Usage]:
        """The model's draft answer to `prompt`.

        Raises:
            CriticUnavailable: the model could not answer before the deadline.
        """
        messages = [
            {"role": "system", "content": self._system_prompt},
            {"role": "user", "content": prompt},
        ]
        return await self._endpoint.complete(messages, deadline, temperature=0.7)

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._endpoint.aclose()
