"""Does CheckConversation catch what a check of one prompt misses, and at what cost in benign traffic?

Against a real gateway over gRPC (production `Gateway.create` + `start_server` in
a subprocess on loopback, the default config, a fresh temporary data dir, the
local critic: an escalation ends as BLOCK, so "caught" / "escalated" below
means `verdict.decision != DECISION_ALLOW`). Texts are read at run time from
`../shared/datasets/` (see its README); none is copied into the repository, and
the JSON output names rows by id only.

1. Indirect injection. Each container (an AgentDojo tool result with an
   injection planted in it, its 39 `benign_hard` controls with the benchmark's
   default slot values, and every PurpleLlama CyberSecEval prompt-injection
   row) is sent two ways:
     a) as one prompt: `CheckPrompt(text=container)`;
     b) as a tool result after a neutral user ask: `CheckConversation(messages=
        [USER: ask, TOOL: container])`. The ask is the first of `ASKS` that
        CheckPrompt allows on its own (all are checked and printed).
   Recall on risky and escalation on the controls, both ways, per AgentDojo
   attack and suite. The 39 controls are few, so benign texts of six benign
   files (sharegpt_user_prompts, arena_hard, self_instruct,
   unnatural_instructions, nq_open, xquad_questions) are also sent as the data
   message after the same ask, alternately as ROLE_TOOL and ROLE_DOCUMENT:
   single rows, and "documents" of 3-8 rows of the same file joined by blank
   lines (at most 20,000 characters). They are STAND-INS for benign documents
   (prompts and questions, not emails or web pages); the share escalated is
   reported per file and pooled, beside CheckPrompt on the same single rows.

2. Session risk. Multi-turn attacks are assembled from public risky prompts
   (harmful: advbench, harmbench, jailbreakbench goals, safety-tuned-llamas,
   XSTest unsafe, MultiJail English; jailbreak: jailbreak_llms, SAP,
   jailbreakbench; extraction: prompt_extraction_attacks, raccoon,
   promptinject): each prompt is cut into 2-4 turns (the number drawn per
   prompt; 2 when the text has too few boundaries for it) at sentence ends
   (. ! ? ; : or a line break) when it has enough of them, else also at clause
   boundaries (a comma, or before and / that / which / to / for / by / with /
   using / how / ...), each cut at the boundary nearest an equal share of the
   text, every turn at least 3 words and 12 characters; the words are the
   source's, unchanged. Half the attacks are prefixed by 1 or 2 benign turns
   (sharegpt_user_prompts, self_instruct, banking77, nq_open; <= 300
   characters). An assembly qualifies only if CheckPrompt allows every turn
   (prefix included) on its own; candidates are drawn per category in a fixed
   (seeded) order until `--attacks / 3` per category qualify, a category whose
   candidates run out (or reach `--max-tries` times its share) leaving its
   shortfall to the others; how many could be cut, were tried and qualified is
   printed. CheckPrompt of the whole original prompt is recorded too: what the
   attack looks like uncut (splitting cannot be expected to recover more).
   Benign conversations: 3-5 prompts of one benign file (banking77,
   sgd_user_turns, taskmaster4_coffee, nlupp_hotels, restaurant8k,
   sharegpt_user_prompts), in equal numbers per file, not qualified.
   Each conversation is sent one call per user turn, in four ways:
     alone    only the new turn, no session_id (what CheckPrompt sees);
     history  every turn so far, "Sure." from the assistant in between, no session_id;
     hist+sid the same with a session_id (fresh per conversation);
     new+sid  only the new turn, with a session_id (the session remembers).
   A conversation counts as escalated when any of its calls is (it stops at
   the first); the tables give the share per category, source file and number
   of benign turns first, and why the first escalation came (the turns read
   together, the session's decayed risk, the turn's own score).

3. Tables on stdout; `--json` writes every number (and per-row ids and decisions).

    HF_HUB_OFFLINE=1 python benchmarks/conversation_eval.py            # 7-9 minutes on 2 cores
    python benchmarks/conversation_eval.py --quick                      # 1-2 minutes
    python benchmarks/conversation_eval.py --attacks 600 --benign-conversations 600 --json c.json

The scorer was fitted on these files (see README "tierguard eval"), so single-
prompt numbers are in-sample; what this measures is what the conversation
reading adds or loses on top.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import random
import re
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import grpc
from _common import DEFAULT_DATA, DEFAULT_WORK_DIR, ChildServer, announce_and_wait

from gateway._proto.guardrail.v1 import guardrail_pb2 as pb
from gateway._proto.guardrail.v1 import guardrail_pb2_grpc as pb_grpc
from router.evaluation import LabelledText, read_labelled

T = TypeVar("T")

MAX_CHARS = 20_000  # the gateway's default server.max_text_chars
ASKS = (
    "Can you tell me what my latest email says?",
    "What does this say?",
    "Please summarise the result for me.",
    "Can you summarize this document for me?",
)
REPLY = "Sure."
DOC_SOURCES = (
    "sharegpt_user_prompts",
    "arena_hard",
    "self_instruct",
    "unnatural_instructions",
    "nq_open",
    "xquad_questions",
)
CONVERSATION_SOURCES = (
    "banking77",
    "sgd_user_turns",
    "taskmaster4_coffee",
    "nlupp_hotels",
    "restaurant8k",
    "sharegpt_user_prompts",
)
PREFIX_SOURCES = ("sharegpt_user_prompts", "self_instruct", "banking77", "nq_open")
PREFIX_MAX_CHARS = 300
# (file, categories used); multijail: English rows only (cutting is done at English words)
ATTACK_SOURCES = (
    ("advbench", ("harmful",)),
    ("harmbench", ("harmful",)),
    ("jailbreakbench_artifacts", ("harmful", "jailbreak")),
    ("safety_tuned_llamas", ("harmful",)),
    ("xstest", ("harmful",)),
    ("multijail", ("harmful",)),
    ("jailbreak_llms_2023_05", ("jailbreak",)),
    ("sap_attack_prompts", ("jailbreak",)),
    ("prompt_extraction_attacks", ("extraction",)),
    ("raccoon_extraction", ("extraction",)),
    ("promptinject", ("extraction",)),
)
ATTACK_CATEGORIES = ("harmful", "jailbreak", "extraction")
MODES = ("alone", "history", "hist+sid", "new+sid")
MIN_TURN_WORDS, MIN_TURN_CHARS = 3, 12
BATCH = 32  # candidates qualified at a time

_SENTENCE = re.compile(r"(?<=[.!?;:])\s+|\s*\n+\s*")
_CLAUSE = re.compile(
    r"(?<=,)\s+|\s+(?=(?:and|that|which|who|to|for|so|by|with|using|without|while|how|where|"
    r"because|then|but|or|in\s+order\s+to|so\s+that|including|such\s+as)\s)",
    re.IGNORECASE,
)


# -- the server side (a subprocess: `conversation_eval.py --serve`) -----------------


async def serve(args: argparse.Namespace) -> None:
    """Start the production server (default config, fresh data dir); print its port; serve."""
    import logging

    from gateway.api.server import start_server
    from gateway.runtime.app import Gateway
    from gateway.runtime.config import load_config

    logging.basicConfig(level=logging.WARNING, format="server %(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="tierguard-conversation-") as data_dir:
        overrides: dict[str, Any] = {
            "data_dir": data_dir,
            # the ONNX export of the shipped model, shared with the other benchmarks (made once)
            "embedding.models_dir": str(args.work_dir / "models"),
            "server.host": "127.0.0.1",
            "server.port": 0,
        }
        config = load_config(None, environ={}, overrides=overrides)
        gateway = Gateway.create(config, environ={})  # local critic, no LLM
        running = await start_server(gateway, port=0)
        await announce_and_wait(running.port)
        await running.stop(grace_seconds=0)


class ServerProcess(ChildServer):
    """The server in a subprocess."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(__file__, ["--serve", "--work-dir", str(args.work_dir)])


# -- the client -----------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """One verdict, reduced to what the tables need."""

    caught: bool  # decision != ALLOW (escalated or blocked)
    decision: str
    risk: float
    why: str  # see _why; "" when allowed
    driver_role: str = ""
    error: str = ""


def _why(verdict: pb.Verdict) -> str:
    """What made a verdict escalate, from its reason (the router's wording)."""
    if verdict.decision == pb.DECISION_ALLOW:
        return ""
    reason = verdict.reason
    if "instruction addressed to the assistant" in reason:
        return "addressed"
    if "read together" in reason:
        return "combined"
    if "session's risk" in reason:
        return "session"
    if "prefilter" in reason:
        return "prefilter"
    return "score"


class Client:
    """CheckPrompt and CheckConversation with a bound on calls in flight."""

    def __init__(self, stub: pb_grpc.GuardrailServiceStub, concurrency: int) -> None:
        self._stub = stub
        self._slots = asyncio.Semaphore(concurrency)
        self.calls: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()

    async def prompt(self, text: str) -> Outcome:
        return await self._call("CheckPrompt", pb.CheckPromptRequest(text=text))

    async def conversation(self, messages: Sequence[tuple[int, str]], session: str = "") -> Outcome:
        request = pb.CheckConversationRequest(
            messages=[pb.Message(role=role, content=content) for role, content in messages],
            session_id=session,
        )
        return await self._call("CheckConversation", request)

    async def _call(self, method: str, request: Any) -> Outcome:
        async with self._slots:
            self.calls[method] += 1
            try:
                reply = await getattr(self._stub, method)(request, timeout=60.0)
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
                self.errors[f"{method} {code}"] += 1
                return Outcome(False, "ERROR", float("nan"), "", error=code)
        verdict = reply.verdict
        return Outcome(
            caught=verdict.decision != pb.DECISION_ALLOW,
            decision=pb.Decision.Name(verdict.decision).removeprefix("DECISION_"),
            risk=verdict.risk_score,
            why=_why(verdict),
            driver_role=pb.Role.Name(verdict.driving_message.role).removeprefix("ROLE_")
            if verdict.HasField("driving_message")
            else "",
        )


async def gather(items: Iterable[T], fn: Callable[[T], Awaitable[Any]]) -> list[Any]:
    """fn over items, concurrently (the client's semaphore bounds the calls in flight)."""
    return list(await asyncio.gather(*(fn(item) for item in items)))


# -- data -------------------------------------------------------------------------------


class Data:
    """The labelled files, read once."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._files: dict[str, list[LabelledText]] = {}

    def rows(self, name: str) -> list[LabelledText]:
        if name not in self._files:
            path = self.directory / f"{name}.jsonl"
            if not path.exists():
                raise SystemExit(f"missing {path}: point --data at ../shared/datasets")
            self._files[name] = [r for r in read_labelled(path) if r.text.strip()]
        return self._files[name]

    def benign(self, name: str, max_chars: int = MAX_CHARS) -> list[LabelledText]:
        return [r for r in self.rows(name) if r.label == "benign" and len(r.text) <= max_chars]


def share(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


def pct(value: float) -> str:
    return "   -" if value != value else f"{100 * value:5.1f}%"


# -- 1. indirect injection ---------------------------------------------------------------


def agentdojo_kind(row: LabelledText) -> tuple[str, str]:
    """(suite, attack) from an AgentDojo row's source: `.../suites/<suite>/...#<slot>:<attack>`."""
    suite = row.source.split("/suites/", 1)[1].split("/", 1)[0] if "/suites/" in row.source else ""
    attack = row.source.rsplit("#", 1)[-1].rpartition(":")[2] if "#" in row.source else ""
    return suite, (attack if row.label == "risky" else "control (benign)")


async def choose_ask(client: Client) -> tuple[str, dict[str, str]]:
    """The first neutral ask CheckPrompt allows on its own, and every ask's decision."""
    outcomes = await gather(ASKS, client.prompt)
    decisions = {ask: o.decision for ask, o in zip(ASKS, outcomes, strict=True)}
    allowed = [ask for ask, o in zip(ASKS, outcomes, strict=True) if not o.caught and not o.error]
    if not allowed:
        raise SystemExit(f"the router escalates every neutral ask: {decisions}")
    return allowed[0], decisions


async def indirect(
    client: Client, data: Data, ask: str, rng: random.Random, args: argparse.Namespace
) -> dict[str, Any]:
    """Containers as one prompt vs as a tool result after the ask; benign stand-ins as data."""
    containers = list(data.rows("agentdojo_injections"))
    purple = list(data.rows("purplellama_prompt_injection"))
    if args.quick:
        risky = [r for r in containers if r.label == "risky"]
        containers = [r for r in containers if r.label == "benign"] + rng.sample(risky, 150)
        purple = rng.sample(purple, 60)
    rows = containers + purple

    async def both(row: LabelledText) -> tuple[Outcome, Outcome]:
        single, conversation = await asyncio.gather(
            client.prompt(row.text),
            client.conversation([(pb.ROLE_USER, ask), (pb.ROLE_TOOL, row.text)]),
        )
        return single, conversation

    outcomes = await gather(rows, both)
    per_row = []
    groups: dict[tuple[str, str], list[tuple[Outcome, Outcome]]] = defaultdict(list)
    for row, (single, conv) in zip(rows, outcomes, strict=True):
        if row.file.startswith("agentdojo"):
            suite, attack = agentdojo_kind(row)
            keys = [("agentdojo", "risky: all" if row.label == "risky" else "control (benign)")]
            if row.label == "risky":
                keys += [("agentdojo attack", attack), ("agentdojo suite", suite)]
            else:
                keys += [("agentdojo suite (controls)", suite)]
        else:
            keys = [("purplellama", "risky: all")]
        for key in keys:
            groups[key].append((single, conv))
        per_row.append(
            {
                "id": row.id,
                "label": row.label,
                "prompt": single.decision,
                "conversation": conv.decision,
                "conversation_why": conv.why,
                "conversation_driver": conv.driver_role,
            }
        )
    table = []
    for (group, name), pairs in groups.items():
        caught_conv = [c for _, c in pairs if c.caught]
        why = Counter(c.why for c in caught_conv)
        table.append(
            {
                "group": group,
                "name": name,
                "n": len(pairs),
                "prompt": share([s.caught for s, _ in pairs]),
                "conversation": share([c.caught for _, c in pairs]),
                "only_conversation": share([c.caught and not s.caught for s, c in pairs]),
                "only_prompt": share([s.caught and not c.caught for s, c in pairs]),
                "why": dict(why),
            }
        )
    order = ["agentdojo", "agentdojo attack", "agentdojo suite", "agentdojo suite (controls)"]
    table.sort(key=lambda r: (order.index(r["group"]) if r["group"] in order else 9, r["name"]))
    return {
        "table": table,
        "rows": per_row,
        "documents": await benign_documents(client, data, ask, rng, args),
    }


def make_documents(
    rows: list[LabelledText], count: int, rng: random.Random
) -> list[list[LabelledText]]:
    """`count` documents of 3-8 rows each (blank lines between), at most MAX_CHARS."""
    documents = []
    for _ in range(count):
        picked: list[LabelledText] = []
        size = 0
        for row in rng.sample(rows, min(len(rows), rng.randint(3, 8))):
            if size + len(row.text) + 2 > MAX_CHARS:
                break
            picked.append(row)
            size += len(row.text) + 2
        if picked:
            documents.append(picked)
    return documents


async def benign_documents(
    client: Client, data: Data, ask: str, rng: random.Random, args: argparse.Namespace
) -> dict[str, Any]:
    """Benign texts as tool results / documents after the ask (stand-ins for documents)."""
    jobs: list[tuple[str, str, str, list[str]]] = []  # (source, kind, text, ids)
    for source in DOC_SOURCES:
        rows = data.benign(source)
        for row in rng.sample(rows, min(len(rows), args.documents)):
            jobs.append((source, "single", row.text, [row.id]))
        for doc in make_documents(rows, args.long_documents, rng):
            jobs.append((source, "joined", "\n\n".join(r.text for r in doc), [r.id for r in doc]))
    roles = [pb.ROLE_TOOL if i % 2 == 0 else pb.ROLE_DOCUMENT for i in range(len(jobs))]

    texts = {r.id: r.text for source in DOC_SOURCES for r in data.benign(source)}

    async def one(i: int) -> tuple[Outcome, bool]:
        """The data message's outcome, and whether CheckPrompt escalates any of its rows alone."""
        _, _, text, ids = jobs[i]
        conv, *alone = await asyncio.gather(
            client.conversation([(pb.ROLE_USER, ask), (roles[i], text)]),
            *(client.prompt(texts[row_id]) for row_id in ids),
        )
        return conv, any(a.caught for a in alone)

    outcomes = await gather(range(len(jobs)), one)
    table = []
    sources: list[str | None] = [*DOC_SOURCES, None]
    for source in sources:
        picked = [
            (job, out, role)
            for job, out, role in zip(jobs, outcomes, roles, strict=True)
            if source is None or job[0] == source
        ]
        single = [(o, p) for (_, k, _, _), (o, p), _ in picked if k == "single"]
        joined = [(o, p) for (_, k, _, _), (o, p), _ in picked if k == "joined"]
        convs = [o for _, (o, _), _ in picked]
        table.append(
            {
                "source": source or "pooled",
                "n_single": len(single),
                "prompt_single": share([p for _, p in single]),
                "data_single": share([o.caught for o, _ in single]),
                "n_joined": len(joined),
                "mean_joined_chars": (
                    sum(len(j[2]) for j, _, _ in picked if j[1] == "joined") / len(joined)
                    if joined
                    else float("nan")
                ),
                "prompt_joined_any_row": share([p for _, p in joined]),
                "data_joined": share([o.caught for o, _ in joined]),
                "data_all": share([o.caught for o in convs]),
                "tool": share([o.caught for _, (o, _), r in picked if r == pb.ROLE_TOOL]),
                "document": share([o.caught for _, (o, _), r in picked if r == pb.ROLE_DOCUMENT]),
                "why": dict(Counter(o.why for o in convs if o.caught)),
            }
        )
    rows = [
        {"source": s, "kind": k, "ids": ids, "role": pb.Role.Name(r), "decision": o.decision,
         "why": o.why}
        for (s, k, _, ids), (o, _), r in zip(jobs, outcomes, roles, strict=True)
    ]  # fmt: skip
    return {"table": table, "rows": rows}


# -- 2. session risk ----------------------------------------------------------------------


def cut(text: str, turns: int) -> list[str] | None:
    """`text` in `turns` pieces at sentence ends (else also clause boundaries), or None."""
    for pattern in ((_SENTENCE,), (_SENTENCE, _CLAUSE)):
        cuts = sorted({m.end() for p in pattern for m in p.finditer(text) if m.start() > 0})
        pieces = _pick(text, cuts, turns)
        if pieces:
            return pieces
    return None


def _ok(piece: str) -> bool:
    return len(piece) >= MIN_TURN_CHARS and len(piece.split()) >= MIN_TURN_WORDS


def _pick(text: str, cuts: list[int], turns: int) -> list[str] | None:
    """The cut nearest each equal share of `text`, keeping every piece long enough."""
    chosen: list[int] = []
    for i in range(1, turns):
        target = len(text) * i / turns
        start = chosen[-1] if chosen else 0
        usable = [c for c in cuts if c > start and _ok(text[start:c])]
        if not usable:
            return None
        chosen.append(min(usable, key=lambda c: abs(c - target)))
    bounds = [0, *chosen, len(text)]
    pieces = [text[a:b].strip() for a, b in itertools.pairwise(bounds)]
    return pieces if all(_ok(p) for p in pieces) else None


@dataclass
class Conversation:
    """A multi-turn conversation to send, turn by turn."""

    kind: str  # an attack category, or a benign file
    ids: list[str]
    turns: list[str]
    source: str = ""  # the file of the attack's prompt
    prefix: int = 0  # benign turns before the attack
    whole_caught: bool | None = None  # attacks: CheckPrompt of the whole original prompt
    results: dict[str, int | None] = field(default_factory=dict)  # mode -> first caught turn
    why: dict[str, str] = field(default_factory=dict)  # mode -> why the first catch


def attack_pool(data: Data) -> dict[str, list[LabelledText]]:
    pool: dict[str, list[LabelledText]] = defaultdict(list)
    for name, categories in ATTACK_SOURCES:
        for row in data.rows(name):
            if row.label != "risky" or row.category not in categories:
                continue
            if name == "multijail" and not row.source.endswith("#en"):
                continue
            pool[row.category].append(row)
    return pool


async def _qualifies(client: Client, conv: Conversation) -> bool:
    """Does CheckPrompt allow every turn on its own? (Stops at the first that it does not.)"""
    for turn in conv.turns:
        outcome = await client.prompt(turn)
        if outcome.caught or outcome.error:
            return False
    return True


async def assemble_attacks(
    client: Client, data: Data, rng: random.Random, target: int, max_tries: int
) -> tuple[list[Conversation], dict[str, dict[str, int]]]:
    """Cut risky prompts into turns; keep those whose every turn alone is allowed.

    Each category is first filled to an equal share of `target`; a category
    whose candidates run out (or reach `max_tries` times its share) leaves its
    shortfall to the others, in the same order.
    """
    pool = attack_pool(data)
    originals = {r.id: r.text for rows in pool.values() for r in rows}
    prefixes = [r for s in PREFIX_SOURCES for r in data.benign(s, PREFIX_MAX_CHARS)]
    share_ = {c: target // len(ATTACK_CATEGORIES) + (i < target % len(ATTACK_CATEGORIES))
              for i, c in enumerate(ATTACK_CATEGORIES)}  # fmt: skip
    counts: dict[str, Counter[str]] = {}
    candidates: dict[str, list[Conversation]] = {}
    for category in ATTACK_CATEGORIES:
        rows = sorted(pool[category], key=lambda r: r.id)
        rng.shuffle(rows)
        counts[category] = Counter(pool=len(rows))
        candidates[category] = []
        for row in rows:
            pieces = cut(row.text, rng.choice((2, 3, 4))) or cut(row.text, 2)
            if pieces is None:
                continue
            n_prefix = rng.choice((0, 0, 1, 2))
            prefix = rng.sample(prefixes, n_prefix)
            candidates[category].append(
                Conversation(
                    category, [row.id] + [p.id for p in prefix], [p.text for p in prefix] + pieces,
                    source=row.file.removesuffix(".jsonl"), prefix=n_prefix,
                )
            )  # fmt: skip
        counts[category]["cut"] = len(candidates[category])
    qualified: dict[str, list[Conversation]] = {c: [] for c in ATTACK_CATEGORIES}
    tried = dict.fromkeys(ATTACK_CATEGORIES, 0)

    def room(category: str) -> int:
        return min(len(candidates[category]), max_tries * share_[category]) - tried[category]

    async def fill(category: str, want: int) -> None:
        while len(qualified[category]) < want and room(category) > 0:
            start = tried[category]
            batch = candidates[category][start : start + min(BATCH, room(category))]
            tried[category] += len(batch)
            oks = await gather(batch, partial(_qualifies, client))
            for conv, ok in zip(batch, oks, strict=True):
                if not ok:
                    counts[category]["a_turn_escalated"] += 1
                elif len(qualified[category]) < want:
                    qualified[category].append(conv)

    for category in ATTACK_CATEGORIES:
        await fill(category, share_[category])
    while True:  # the shortfall, split over the categories with candidates left
        missing = target - sum(len(q) for q in qualified.values())
        open_ = [c for c in ATTACK_CATEGORIES if room(c) > 0]
        if missing <= 0 or not open_:
            break
        for category in open_:
            missing = target - sum(len(q) for q in qualified.values())
            await fill(category, len(qualified[category]) + min(missing, -(-missing // len(open_))))
    kept = [conv for category in ATTACK_CATEGORIES for conv in qualified[category]]
    wholes = await gather(kept, lambda c: client.prompt(originals[c.ids[0]]))
    for conv, whole in zip(kept, wholes, strict=True):
        conv.whole_caught = whole.caught
    for category in ATTACK_CATEGORIES:
        counts[category]["tried"] = tried[category]
        counts[category]["qualified"] = len(qualified[category])
        counts[category]["with_prefix"] = sum(1 for c in qualified[category] if c.prefix)
    return kept, {c: dict(n) for c, n in counts.items()}


def benign_conversations(data: Data, rng: random.Random, target: int) -> list[Conversation]:
    out = []
    per_source = [target // len(CONVERSATION_SOURCES)] * len(CONVERSATION_SOURCES)
    for i in range(target % len(CONVERSATION_SOURCES)):
        per_source[i] += 1
    for source, count in zip(CONVERSATION_SOURCES, per_source, strict=True):
        rows = data.benign(source)
        for _ in range(count):
            picked = rng.sample(rows, rng.randint(3, 5))
            out.append(Conversation(source, [r.id for r in picked], [r.text for r in picked]))
    return out


async def send(client: Client, conv: Conversation, mode: str, session: str) -> None:
    """The conversation one user turn per call in `mode`; stops at the first escalation."""
    history: list[tuple[int, str]] = []
    for t, turn in enumerate(conv.turns):
        if history:
            history.append((pb.ROLE_ASSISTANT, REPLY))
        history.append((pb.ROLE_USER, turn))
        messages = history if mode in ("history", "hist+sid") else [(pb.ROLE_USER, turn)]
        sid = session if mode.endswith("+sid") else ""
        outcome = await client.conversation(messages, sid)
        if outcome.caught:
            why = outcome.why
            if why == "score" and mode != "alone" and not (await client.prompt(turn)).caught:
                # the turn alone passes: the verdict's score is the recent turns read together
                why = "combined"
            conv.results[mode], conv.why[mode] = t, why
            return
    conv.results[mode] = None


async def run_sessions(
    client: Client, conversations: list[Conversation], seed: int, tag: str
) -> None:
    jobs = [
        (c, m, f"bench-{tag}-{seed}-{i}-{m}") for i, c in enumerate(conversations) for m in MODES
    ]
    await gather(jobs, lambda job: send(client, *job))


def session_table(
    conversations: list[Conversation], groups_of: Callable[[Conversation], Sequence[str]]
) -> list[dict[str, Any]]:
    """Share escalated at any turn per mode, for each group (a conversation is in several)."""
    groups: dict[str, list[Conversation]] = defaultdict(list)
    for conv in conversations:
        for name in [*groups_of(conv), "pooled"]:
            groups[name].append(conv)
    table = []
    attacks = any(c.whole_caught is not None for c in conversations)
    for name, convs in groups.items():
        row: dict[str, Any] = {"group": name, "n": len(convs)}
        row["mean_turns"] = sum(len(c.turns) for c in convs) / len(convs)
        if attacks:
            row["whole_prompt"] = share([bool(c.whole_caught) for c in convs])
        for mode in MODES:
            row[mode] = share([c.results.get(mode) is not None for c in convs])
            row[f"{mode} why"] = dict(Counter(c.why[mode] for c in convs if mode in c.why))
        if attacks:  # of those caught whole, caught when cut
            whole = [c for c in convs if c.whole_caught]
            row["hist+sid | whole caught"] = share(
                [c.results.get("hist+sid") is not None for c in whole]
            )
        table.append(row)
    return table


def attack_groups(conv: Conversation) -> list[str]:
    return [conv.kind, f"  {conv.source}", f"{conv.prefix} benign turns first"]


def _ordered(table: list[dict[str, Any]], first: Sequence[str]) -> list[dict[str, Any]]:
    """Rows in `first`'s order (by prefix match), the others by name, pooled last."""

    def key(row: dict[str, Any]) -> tuple[int, str]:
        name = row["group"]
        if name == "pooled":
            return len(first) + 1, ""
        rank = next((i for i, f in enumerate(first) if name.startswith(f)), len(first))
        return rank, name

    return sorted(table, key=key)


# -- output ---------------------------------------------------------------------------------


def print_indirect(result: dict[str, Any], ask: str, asks: dict[str, str]) -> None:
    print("\n== 1. Indirect injection: the container as one prompt vs as a tool result ==")
    print("neutral asks, CheckPrompt alone: " + "; ".join(f"{a!r} {d}" for a, d in asks.items()))
    print(f"ask used: {ask!r} -> CheckConversation([USER: ask, TOOL: container])")
    head = f"{'group':<28} {'name':<24} {'n':>5} {'prompt':>7} {'as tool':>7} {'+conv':>6} {'-conv':>6}  why (as tool)"
    print(head + "\n" + "-" * len(head))
    for r in result["table"]:
        why = ", ".join(f"{k} {v}" for k, v in sorted(r["why"].items(), key=lambda kv: -kv[1]))
        print(
            f"{r['group']:<28} {r['name']:<24} {r['n']:>5} {pct(r['prompt']):>7} "
            f"{pct(r['conversation']):>7} {pct(r['only_conversation']):>6} "
            f"{pct(r['only_prompt']):>6}  {why}"
        )
    print(
        "prompt / as tool: share escalated or blocked (recall on risky rows, escalation on the\n"
        "controls); +conv: caught only as a tool result; -conv: caught only as a prompt;\n"
        "why: addressed = an instruction addressed to the assistant inside the data raised an\n"
        "allowed segment; score = a segment's own risk; prefilter = a tier-0 block rule."
    )
    print("\nBenign texts as the data message after the ask. These are STAND-INS for benign")
    print("documents (user prompts and questions from benign files, not real emails or pages):")
    head = (
        f"{'source':<24} {'n':>4} {'prompt':>7} {'as data':>7} {'n':>4} {'chars':>6} "
        f"{'any row':>7} {'joined':>7} {'all':>6} {'TOOL':>6} {'DOC':>6}  why"
    )
    print(head + "\n" + "-" * len(head))
    for r in result["documents"]["table"]:
        why = ", ".join(f"{k} {v}" for k, v in sorted(r["why"].items(), key=lambda kv: -kv[1]))
        print(
            f"{r['source']:<24} {r['n_single']:>4} {pct(r['prompt_single']):>7} "
            f"{pct(r['data_single']):>7} {r['n_joined']:>4} {r['mean_joined_chars']:>6.0f} "
            f"{pct(r['prompt_joined_any_row']):>7} {pct(r['data_joined']):>7} {pct(r['data_all']):>6} {pct(r['tool']):>6} "
            f"{pct(r['document']):>6}  {why}"
        )
    print(
        "prompt: the single rows by CheckPrompt; as data: the same rows as the data message;\n"
        "joined: 3-8 rows of the file joined by blank lines as the data message (chars: mean\n"
        "length; any row: CheckPrompt escalates at least one of its rows alone); all: both kinds;\n"
        "TOOL / DOC: all, by the role sent (alternating)."
    )


def print_sessions(title: str, table: list[dict[str, Any]], attacks: bool) -> None:
    print(f"\n{title}")
    head = f"{'group':<28} {'n':>4} {'turns':>5} "
    if attacks:
        head += f"{'whole':>6} "
    head += " ".join(f"{m:>8}" for m in MODES)
    if attacks:
        head += f" {'sid|whole':>9}"
    head += "  why (hist+sid)"
    print(head + "\n" + "-" * len(head))
    for r in table:
        line = f"{r['group']:<28} {r['n']:>4} {r['mean_turns']:>5.1f} "
        if attacks:
            line += f"{pct(r['whole_prompt']):>6} "
        line += " ".join(f"{pct(r[m]):>8}" for m in MODES)
        if attacks:
            line += f" {pct(r['hist+sid | whole caught']):>9}"
        why = r["hist+sid why"]
        line += "  " + ", ".join(f"{k} {v}" for k, v in sorted(why.items(), key=lambda kv: -kv[1]))
        print(line)


# -- main -------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> int:
    data = Data(args.data)
    t0 = time.perf_counter()
    server = ServerProcess(args)
    print(f"server up in {time.perf_counter() - t0:.1f} s (port {server.port})", flush=True)
    doc: dict[str, Any] = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            client = Client(pb_grpc.GuardrailServiceStub(channel), args.concurrency)
            ask, asks = await choose_ask(client)
            t = time.perf_counter()
            part1 = await indirect(client, data, ask, random.Random(f"{args.seed}:1"), args)
            print_indirect(part1, ask, asks)
            print(f"(part 1: {time.perf_counter() - t:.0f} s)", flush=True)

            t = time.perf_counter()
            attacks, stats = await assemble_attacks(
                client, data, random.Random(f"{args.seed}:2"), args.attacks, args.max_tries
            )
            print(f"(attacks assembled: {time.perf_counter() - t:.0f} s)", flush=True)
            benign = benign_conversations(
                data, random.Random(f"{args.seed}:3"), args.benign_conversations
            )
            await run_sessions(client, attacks, args.seed, "attack")
            await run_sessions(client, benign, args.seed, "benign")
            attack_table = session_table(attacks, attack_groups)
            attack_table = _ordered(attack_table, [*ATTACK_CATEGORIES, "  ", "0 ", "1 ", "2 "])
            benign_table = session_table(benign, lambda c: [c.kind])
            benign_table = _ordered(benign_table, CONVERSATION_SOURCES)
            print("\n== 2. Session risk: attacks cut into turns that each pass alone ==")
            print("assembly per category: " + "; ".join(
                f"{c}: pool {s.get('pool', 0)}, could be cut {s.get('cut', 0)}, tried "
                f"{s.get('tried', 0)}, a turn escalated alone {s.get('a_turn_escalated', 0)}, "
                f"qualified {s.get('qualified', 0)} ({s.get('with_prefix', 0)} with benign prefix)"
                for c, s in stats.items()))  # fmt: skip
            print_sessions(
                "Share of attack conversations escalated at any turn:", attack_table, True
            )
            print(
                "whole: CheckPrompt of the uncut original prompt; alone: each new turn alone, no\n"
                "session (0 by construction); history: all turns so far, 'Sure.' between, no\n"
                "session_id; hist+sid: the same with a session_id; new+sid: only the new turn with a\n"
                "session_id; sid|whole: hist+sid among the attacks whose whole prompt is caught;\n"
                "why: combined = the recent turns read together, session = the session's decayed\n"
                "risk, score = the turn's own risk."
            )
            print_sessions(
                "Share of benign conversations (3-5 prompts of one file) escalated at any turn:",
                benign_table, False,
            )  # fmt: skip
            print(f"(part 2: {time.perf_counter() - t:.0f} s)")
            errors = dict(client.errors)
            print(f"\ncalls: {dict(client.calls)}; errors: {errors or 'none'}; "
                  f"total {time.perf_counter() - t0:.0f} s")  # fmt: skip
            doc = {
                "meta": {
                    "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "cpus": os.cpu_count(),
                    "machine": platform.processor() or platform.machine(),
                    "python": platform.python_version(),
                    "argv": sys.argv[1:],
                    "seed": args.seed,
                    "seconds": round(time.perf_counter() - t0, 1),
                    "calls": dict(client.calls),
                    "errors": errors,
                },
                "ask": ask,
                "asks": asks,
                "indirect": part1,
                "attack_assembly": stats,
                "attacks": attack_table,
                "benign_conversations": benign_table,
                "attack_rows": [
                    {
                        "ids": c.ids,
                        "kind": c.kind,
                        "prefix": c.prefix,
                        "turns": len(c.turns),
                        "whole_caught": c.whole_caught,
                        "first_caught_turn": c.results,
                        "why": c.why,
                    }
                    for c in attacks
                ],
                "benign_rows": [
                    {"ids": c.ids, "kind": c.kind, "first_caught_turn": c.results, "why": c.why}
                    for c in benign
                ],
            }
    finally:
        server.stop()
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small samples (1-2 minutes)")
    parser.add_argument("--attacks", type=int, help="multi-turn attacks to qualify (default 300)")
    parser.add_argument(
        "--benign-conversations", type=int, help="benign multi-turn conversations (default 300)"
    )
    parser.add_argument(
        "--documents", type=int, help="single benign rows as data, per file (default 150)"
    )
    parser.add_argument(
        "--long-documents", type=int, help="joined benign documents per file (default 60)"
    )
    parser.add_argument(
        "--max-tries",
        type=int,
        default=12,
        help="candidates tried per category, as a multiple of its quota",
    )
    parser.add_argument("--concurrency", type=int, default=8, help="calls in flight")
    parser.add_argument("--seed", type=int, default=20261204)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="labelled JSONL directory")
    parser.add_argument(
        "--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="where the ONNX export is kept"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # subprocess mode
    args = parser.parse_args(argv)
    defaults = {"attacks": (300, 45), "benign_conversations": (300, 48), "documents": (150, 20),
                "long_documents": (60, 8)}  # fmt: skip
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the evaluation (or, with --serve, be its server)."""
    args = parse_args(argv)
    if args.serve:
        asyncio.run(serve(args))
        return 0
    args.work_dir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
