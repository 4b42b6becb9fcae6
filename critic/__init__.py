"""Tier 2: the constitutional critic and reviser.

Constitutions (`constitutions/*.yaml`) are judged by the LLM critic over any
OpenAI-compatible endpoint (`llm_critic`, `chat`) or, with no endpoint, by the
deterministic local critic (`local_critic`) that enforces only the
machine-checkable rules (`detectors`). `loop` runs critique -> revise ->
re-check; `records` keeps every judgement for export. No gRPC here.
"""
