"""Admin commands of the `tierguard` CLI, over the AdminService of a running gateway.

Every command takes `--address HOST:PORT` (default localhost:50051) and an admin
token (`--token` or TIERGUARD_ADMIN_TOKEN); `--tls-ca` (and `--tls-cert` /
`--tls-key` for mutual TLS) to reach a TLS listener.

    tierguard index add TEXT --label risky --category C [--source S] [--reason R]
    tierguard index import FILE [--batch N]       (JSONL or CSV; resumable)
    tierguard index list|search|remove|rollback ...
    tierguard proposals list | accept ID | reject ID
    tierguard policy list | get NAME | set NAME key=value [key=value ...]
    tierguard audit [--limit N]
    tierguard stats
    tierguard replay --policy P --set escalate_at=X [--set block_at=Y]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from gateway._proto.guardrail.v1 import admin_pb2 as apb
from gateway._proto.guardrail.v1 import admin_pb2_grpc as apb_grpc
from gateway._proto.guardrail.v1 import guardrail_pb2 as pb
from gateway.api.convert import CRITIC_MODES as _MODES
from gateway.api.convert import FAIL_MODES as _FAIL
from gateway.api.convert import LABELS as _LABELS

__all__ = ["add_admin_commands", "admin_stub", "bearer", "open_channel", "tls_flags"]


def _connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default="localhost:50051", help="HOST:PORT of the gateway")
    parser.add_argument("--token", default=None, help="admin token (or TIERGUARD_ADMIN_TOKEN)")
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds")
    tls_flags(parser)
    parser.add_argument("--json", action="store_true", help="print JSON")


def tls_flags(parser: argparse.ArgumentParser) -> None:
    """`--tls-ca`, `--tls-cert`, `--tls-key`: what `open_channel` reads, for every client command."""
    parser.add_argument("--tls-ca", type=Path, help="CA bundle to verify a TLS server")
    parser.add_argument("--tls-cert", type=Path, help="client certificate (mutual TLS)")
    parser.add_argument("--tls-key", type=Path, help="client key (mutual TLS)")


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    """A channel to `--address`: TLS when `--tls-ca` or `--tls-cert` is given, else plaintext.

    Raises:
        SystemExit: a certificate file cannot be read, or half a client pair is given.
    """
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("tierguard: --tls-cert and --tls-key go together (mutual TLS)")
    if not (args.tls_ca or args.tls_cert):
        return grpc.insecure_channel(args.address)
    pem: dict[str, bytes | None] = {}
    for flag, path in (("ca", args.tls_ca), ("cert", args.tls_cert), ("key", args.tls_key)):
        try:
            pem[flag] = path.read_bytes() if path else None
        except OSError as exc:
            raise SystemExit(f"tierguard: --tls-{flag} {path}: {exc.strerror or exc}") from None
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pem["ca"], private_key=pem["key"], certificate_chain=pem["cert"]
    )
    return grpc.secure_channel(args.address, credentials)


def bearer(secret: str) -> tuple[tuple[str, str], ...]:
    """Call metadata presenting `secret` (an admin token or a tenant API key)."""
    return (("authorization", f"Bearer {secret}"),)


def add_admin_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the admin command groups on the top-level sub-parsers."""
    index = commands.add_parser("index", help="manage exemplars").add_subparsers(required=True)
    add = index.add_parser("add", help="add one exemplar")
    add.add_argument("text")
    add.add_argument("--label", choices=sorted(_LABELS), required=True)
    add.add_argument("--category", required=True)
    add.add_argument("--source", default="cli")
    add.add_argument("--reason", default="")
    add.set_defaults(func=_index_add)
    imp = index.add_parser("import", help="import JSONL or CSV (text,label,category[,source])")
    imp.add_argument("file", type=Path)
    imp.add_argument("--batch", type=int, default=200, help="exemplars per call (max 1000)")
    imp.add_argument("--source", default="", help="source for rows that have none")
    imp.set_defaults(func=_index_import)
    lst = index.add_parser("list", help="list exemplars")
    lst.add_argument("--label", choices=sorted(_LABELS))
    lst.add_argument("--category", default="")
    lst.add_argument("--source", default="")
    lst.add_argument("--limit", type=int, default=50)
    lst.set_defaults(func=_index_list)
    search = index.add_parser("search", help="nearest exemplars of a text, with similarities")
    search.add_argument("text")
    search.add_argument("--k", type=int, default=10)
    search.add_argument("--policy", default="")
    search.set_defaults(func=_index_search)
    remove = index.add_parser("remove", help="remove an exemplar")
    remove.add_argument("exemplar_id")
    remove.add_argument("--reason", default="")
    remove.set_defaults(func=_index_remove)
    rollback = index.add_parser("rollback", help="restore the exemplar set of an earlier version")
    rollback.add_argument("version", type=int)
    rollback.add_argument("--reason", default="")
    rollback.set_defaults(func=_index_rollback)
    proposals = commands.add_parser("proposals", help="review critic proposals")
    proposal_commands = proposals.add_subparsers(required=True)
    proposal_commands.add_parser("list").set_defaults(func=_proposals_list)
    for verb in ("accept", "reject"):
        review = proposal_commands.add_parser(verb)
        review.add_argument("proposal_id", type=int)
        review.add_argument("--reason", default="")
        review.set_defaults(func=_proposals_review, accept=verb == "accept")
    policy = commands.add_parser("policy", help="view and change policies")
    policy_commands = policy.add_subparsers(required=True)
    policy_commands.add_parser("list").set_defaults(func=_policy_list)
    get = policy_commands.add_parser("get")
    get.add_argument("name")
    get.set_defaults(func=_policy_get)
    set_ = policy_commands.add_parser("set", help="e.g. set default escalate_at=0.55")
    set_.add_argument("name")
    set_.add_argument("changes", nargs="+", metavar="KEY=VALUE")
    set_.set_defaults(func=_policy_set)
    audit = commands.add_parser("audit", help="the audit log, newest first")
    audit.add_argument("--limit", type=int, default=20)
    audit.set_defaults(func=_audit)
    commands.add_parser(
        "stats", help="index size, traffic, escalation rates, critic usage"
    ).set_defaults(func=_stats)
    replay = commands.add_parser(
        "replay", help="what recent traffic would meet under new thresholds"
    )
    replay.add_argument("--policy", required=True)
    replay.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="escalate_at=X or block_at=Y")  # fmt: skip
    replay.add_argument("--limit", type=int, default=10_000)
    replay.set_defaults(func=_replay)
    for parser in _leaf_parsers(
        commands, ("index", "proposals", "policy", "audit", "stats", "replay")
    ):
        _connection_flags(parser)


def _leaf_parsers(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], names: tuple[str, ...]
) -> Iterator[argparse.ArgumentParser]:
    for name in names:
        parser = commands.choices[name]
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if subs:
            yield from dict.fromkeys(subs[0].choices.values())
        else:
            yield parser


def admin_stub(
    args: argparse.Namespace,
) -> tuple[apb_grpc.AdminServiceStub, tuple[tuple[str, str], ...]]:
    """A stub on `--address` and the metadata carrying the admin token."""
    token = args.token or os.environ.get("TIERGUARD_ADMIN_TOKEN", "")
    if not token:
        raise SystemExit("tierguard: an admin token is needed: --token or TIERGUARD_ADMIN_TOKEN")
    return apb_grpc.AdminServiceStub(open_channel(args)), bearer(token)


def _call(args: argparse.Namespace, method: str, request: Any) -> Any:
    stub, metadata = admin_stub(args)
    try:
        return getattr(stub, method)(request, metadata=metadata, timeout=args.timeout)
    except grpc.RpcError as exc:
        raise SystemExit(f"tierguard: {exc.code().name}: {exc.details()}") from None


def _print(args: argparse.Namespace, message: Any, text: str) -> None:
    if args.json:
        print(json_format.MessageToJson(message, preserving_proto_field_name=True))
    else:
        print(text)


def _index_add(args: argparse.Namespace) -> int:
    exemplar = apb.Exemplar(text=args.text, label=_LABELS[args.label], category=args.category,
                            source=args.source, reason=args.reason)  # fmt: skip
    reply = _call(args, "AddExemplars", apb.AddExemplarsRequest(exemplars=[exemplar]))
    result = reply.results[0]
    status = apb.AddStatus.Name(result.status).removeprefix("ADD_STATUS_").lower()
    _print(args, reply, f"{status}: {result.exemplar_id} (index version {reply.index_version})")
    return 0


def _read_rows(path: Path, default_source: str) -> list[apb.Exemplar]:
    rows: list[dict[str, str]] = []
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    else:
        for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise SystemExit(f"tierguard: {path}:{number}: not JSON: {exc}") from None
    exemplars = []
    for number, row in enumerate(rows, start=1):
        label = str(row.get("label", "")).lower()
        if label not in _LABELS or not row.get("text") or not row.get("category"):
            raise SystemExit(
                f"tierguard: {path} row {number}: needs text, label (risky|benign), category"
            )
        exemplars.append(apb.Exemplar(
            text=str(row["text"]), label=_LABELS[label], category=str(row["category"]),
            source=str(row.get("source") or default_source or path.name),
            reason=str(row.get("reason") or f"imported from {path.name}"),
        ))  # fmt: skip
    return exemplars


def _index_import(args: argparse.Namespace) -> int:
    """Batched and resumable: re-running skips what is already in the index (duplicates)."""
    exemplars = _read_rows(args.file, args.source)
    if not 1 <= args.batch <= 1000:
        raise SystemExit("tierguard: --batch must be between 1 and 1000")
    totals = {"added": 0, "duplicate": 0, "near_duplicate": 0}
    for start in range(0, len(exemplars), args.batch):
        batch = exemplars[start : start + args.batch]
        # no request_id: a re-run must report what is already there, and the server's
        # duplicate check makes a retried batch safe anyway
        request = apb.AddExemplarsRequest(exemplars=batch)
        reply = _call(args, "AddExemplars", request)
        for result in reply.results:
            totals[apb.AddStatus.Name(result.status).removeprefix("ADD_STATUS_").lower()] += 1
        done = start + len(batch)
        bar = "#" * (30 * done // len(exemplars))
        print(f"\r[{bar:<30}] {done}/{len(exemplars)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    print(f"added {totals['added']}, already present {totals['duplicate']}, "
          f"near-duplicates skipped {totals['near_duplicate']}")  # fmt: skip
    return 0


def _index_list(args: argparse.Namespace) -> int:
    request = apb.ListExemplarsRequest(
        page_size=min(args.limit, 1000), label=_LABELS.get(args.label or "", pb.LABEL_UNSPECIFIED),
        category=args.category, source=args.source,
    )  # fmt: skip
    reply = _call(args, "ListExemplars", request)
    lines = [f"{e.exemplar_id}\t{pb.Label.Name(e.label)}\t{e.category}\t{e.source}\t{e.text[:80]!r}"
             for e in reply.exemplars]  # fmt: skip
    _print(args, reply, "\n".join(lines) or "(none)")
    return 0


def _index_search(args: argparse.Namespace) -> int:
    reply = _call(
        args,
        "SearchExemplars",
        apb.SearchExemplarsRequest(text=args.text, k=args.k, policy=args.policy),
    )
    verdict = reply.verdict
    lines = [f"risk {verdict.risk_score:.3f} -> {pb.Decision.Name(verdict.decision)} "
             f"(escalated {verdict.escalated}): {verdict.reason}"]  # fmt: skip
    lines += [f"{m.similarity:.3f}  {m.exemplar_id}  [{pb.Label.Name(m.label)}/{m.category}]  {m.text[:80]!r}"
              for m in reply.matches]  # fmt: skip
    _print(args, reply, "\n".join(lines))
    return 0


def _index_remove(args: argparse.Namespace) -> int:
    reply = _call(
        args,
        "DeleteExemplar",
        apb.DeleteExemplarRequest(exemplar_id=args.exemplar_id, reason=args.reason),
    )
    _print(args, reply, f"removed {args.exemplar_id} (index version {reply.index_version})")
    return 0


def _index_rollback(args: argparse.Namespace) -> int:
    reply = _call(
        args, "RollbackIndex", apb.RollbackIndexRequest(to_version=args.version, reason=args.reason)
    )
    _print(
        args,
        reply,
        f"index version {reply.index_version}: removed {reply.removed}, restored {reply.restored}",
    )
    return 0


def _proposals_list(args: argparse.Namespace) -> int:
    """Every pending proposal: follows the pages to the end."""
    reply = apb.ListProposalsResponse()
    request = apb.ListProposalsRequest(page_size=1000)
    while True:
        page = _call(args, "ListProposals", request)
        reply.proposals.extend(page.proposals)
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    lines = [f"{p.proposal_id}\t{pb.Label.Name(p.exemplar.label)}\t{p.exemplar.category}\t"
             f"{p.exemplar.source}\t{p.exemplar.text[:80]!r}" for p in reply.proposals]  # fmt: skip
    _print(args, reply, "\n".join(lines) or "(no pending proposals)")
    return 0


def _proposals_review(args: argparse.Namespace) -> int:
    review = apb.PROPOSAL_REVIEW_ACCEPT if args.accept else apb.PROPOSAL_REVIEW_REJECT
    request = apb.ReviewProposalRequest(
        proposal_id=args.proposal_id, review=review, reason=args.reason
    )
    reply = _call(args, "ReviewProposal", request)
    verb = f"accepted as {reply.exemplar_id}" if args.accept else "rejected"
    _print(args, reply, f"proposal {args.proposal_id} {verb} (index version {reply.index_version})")
    return 0


def _policy_text(policy: apb.Policy) -> str:
    return (
        f"{policy.name} [{_enum_word(apb.PolicyOrigin, policy.policy_origin)}]: escalate_at={policy.escalate_at:g} block_at={policy.block_at:g} "
        f"constitution={policy.constitution} critic_mode={pb.CriticMode.Name(policy.critic_mode).split('_')[-1].lower()} "
        f"fail_mode={pb.FailMode.Name(policy.fail_mode).split('_')[-1].lower()} max_rounds={policy.max_rounds} "
        f"escalation_budget={policy.escalation_budget:g}"
    )


def _policy_list(args: argparse.Namespace) -> int:
    reply = _call(args, "ListPolicies", apb.ListPoliciesRequest())
    lines = [
        _policy_text(p) + ("  (default)" if p.name == reply.default_policy else "")
        for p in reply.policies
    ]
    _print(args, reply, "\n".join(lines))
    return 0


def _policy_get(args: argparse.Namespace) -> int:
    reply = _call(args, "GetPolicy", apb.GetPolicyRequest(name=args.name))
    _print(args, reply, _policy_text(reply.policy))
    return 0


def _policy_set(args: argparse.Namespace) -> int:
    policy = apb.Policy(name=args.name)
    mask = []
    for change in args.changes:
        key, sep, value = change.partition("=")
        if not sep:
            raise SystemExit(f"tierguard: {change!r}: expected KEY=VALUE")
        field = policy.DESCRIPTOR.fields_by_name.get(key)
        if field is None or key in ("name", "policy_origin"):
            raise SystemExit(f"tierguard: {key!r} is not a policy setting")
        try:
            if key == "critic_mode":
                parsed: Any = _MODES[value.lower()]
            elif key == "fail_mode":
                parsed = _FAIL[value.lower()]
            elif field.type == field.TYPE_BOOL:
                parsed = value.lower() in ("1", "true", "yes", "on")
            elif field.type in (field.TYPE_INT32, field.TYPE_INT64):
                parsed = int(value)
            elif field.type == field.TYPE_DOUBLE:
                parsed = float(value)
            else:
                parsed = value
        except (KeyError, ValueError):
            raise SystemExit(f"tierguard: {key}: invalid value {value!r}") from None
        setattr(policy, key, parsed)
        mask.append(key)
    request = apb.UpdatePolicyRequest(policy=policy, update_mask=FieldMask(paths=mask))
    reply = _call(args, "UpdatePolicy", request)
    _print(args, reply, _policy_text(reply.policy))
    return 0


def _audit(args: argparse.Namespace) -> int:
    reply = _call(
        args, "ListAuditEvents", apb.ListAuditEventsRequest(page_size=min(args.limit, 1000))
    )
    lines = []
    for event in reply.events:
        from datetime import UTC

        when = event.event_time.ToDatetime(UTC).isoformat(timespec="seconds")
        action = _enum_word(apb.AuditAction, event.audit_action)
        lines.append(f"{when}  {event.actor}  {action}  {event.target}\n"
                     f"    before: {event.before or '-'}\n    after:  {event.after or '-'}")  # fmt: skip
    _print(args, reply, "\n".join(lines) or "(no events)")
    return 0


def _stats(args: argparse.Namespace) -> int:
    reply = _call(args, "GetStats", apb.GetStatsRequest())
    lines = [f"index version {reply.index_version}, uptime {reply.uptime_s:.0f}s, "
             f"pending proposals {reply.pending_proposals}"]  # fmt: skip
    lines += [f"  {pb.Label.Name(c.label)}/{c.category}: {c.count}" for c in reply.exemplar_counts]
    for t in reply.traffic:
        budget = (
            f" (budget {t.escalation_budget:.3f}{', OVER' if t.over_budget else ''})"
            if t.escalation_budget
            else ""
        )
        lines.append(f"policy {t.policy}: {t.requests} requests, escalation {t.escalation_rate:.3f}{budget}, "
                     f"fallbacks {t.fallbacks}, {_decision_counts(t.decision_counts)}")  # fmt: skip
    u = reply.critic_usage
    lines.append(
        f"critic: {u.calls} calls, {u.prompt_tokens}+{u.completion_tokens} tokens, ${u.cost_usd:.4f}"
    )
    _print(args, reply, "\n".join(lines))
    return 0


def _enum_word(enum: EnumTypeWrapper, value: int) -> str:
    """`POLICY_ORIGIN_ADMIN` -> "admin": the value's name without the enum's prefix."""
    prefix = str(enum.Name(0)).removesuffix("UNSPECIFIED")
    return str(enum.Name(value)).removeprefix(prefix).lower()


def _decision_counts(counts: Any) -> str:
    return ", ".join(
        f"{_enum_word(pb.Tier, c.tier)}/{_enum_word(pb.Decision, c.decision)}: {c.count}"
        for c in counts
    )


def _replay(args: argparse.Namespace) -> int:
    request = apb.ReplayDecisionsRequest(policy=args.policy, limit=args.limit)
    for change in args.set:
        key, _, value = change.partition("=")
        if key not in ("escalate_at", "block_at"):
            raise SystemExit(
                f"tierguard: --set {key}: only escalate_at and block_at can be replayed"
            )
        setattr(request, key, float(value))
    reply = _call(args, "ReplayDecisions", request)
    routes = ("allow", "escalate", "block")
    lines = [f"replayed {reply.replayed} decisions of policy {args.policy} at escalate_at="
             f"{reply.thresholds.escalate_at:g}, block_at={reply.thresholds.block_at:g}"]  # fmt: skip
    before_counts = {_enum_word(pb.Route, c.route): c.count for c in reply.routes_before}
    after_counts = {_enum_word(pb.Route, c.route): c.count for c in reply.routes_after}
    for route in routes:
        before, after = before_counts.get(route, 0), after_counts.get(route, 0)
        lines.append(f"  {route:<8} {before:>8} -> {after:>8}  ({after - before:+d})")
    lines.append(f"  changed: {reply.changed}; critic calls per 1,000 requests: "
                 f"{reply.critic_calls_per_1k_before:.1f} -> {reply.critic_calls_per_1k_after:.1f}")  # fmt: skip
    _print(args, reply, "\n".join(lines))
    return 0
