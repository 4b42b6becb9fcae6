"""The `tierguard` command line: serve, check, eval.

tierguard serve [--config FILE] [--host H] [--port N] [--data-dir DIR] [--metrics-port N]
                [--store-url postgresql://...] [--workers N]
tierguard check TEXT [--address HOST:PORT] [--policy P] [--json]
                [--api-key KEY] [--tls-ca PEM] [--tls-cert PEM --tls-key PEM]
tierguard eval --data FILE.jsonl [--data ...] [--json] [--policy P]
               [--cross-source [--groups K]] [--adaptation K [--groups G] [--benign-sample N]]

An error the user can fix (a bad flag, configuration or data file, an unknown
policy, a server that is unreachable or says no) is one line on standard
error, `tierguard: ...`, and exit status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from critic.records import CriticRecords
    from gateway.runtime.config import Config, Policy

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tierguard` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    from gateway.cli.log_format import configure_logging

    log_format = args.log_format or os.environ.get("TIERGUARD_LOG_FORMAT", "text")
    if log_format not in ("text", "json"):
        print(f"tierguard: TIERGUARD_LOG_FORMAT must be text or json, not {log_format!r}",
              file=sys.stderr)  # fmt: skip
        return 2
    configure_logging(args.log_level, log_format, worker=getattr(args, "worker_index", None))
    if args.log_level != "debug":  # "Loading faiss with AVX2 support." on every command
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except SystemExit as exc:
        if not isinstance(exc.code, str):
            raise
        # the commands' expected errors, worded for the user: one line, status 2 (as argparse)
        print(" ".join(exc.code.split()), file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    from gateway.cli.admin import add_admin_commands, tls_flags

    parser = argparse.ArgumentParser(prog="tierguard", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument(
        "--log-format", choices=["text", "json"],
        help="log lines as text (default) or JSON objects (or TIERGUARD_LOG_FORMAT)",
    )  # fmt: skip
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gRPC gateway")
    _config_flags(serve)
    serve.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 50051)")
    serve.add_argument("--metrics-port", type=int,
                       help="serve Prometheus /metrics on this port (or TIERGUARD_METRICS_PORT)")  # fmt: skip
    _store_flag(serve)
    serve.add_argument("--workers", type=int, metavar="N",
                       help="serve the port from N processes (1-64; or server.workers), each with "
                            "its own index; more than 1 needs a PostgreSQL --store-url")  # fmt: skip
    # a worker of `serve --workers` (started by the supervisor, never by hand)
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--worker-of", type=int, help=argparse.SUPPRESS)
    serve.set_defaults(func=_serve)

    check = commands.add_parser("check", help="check a prompt against a running gateway")
    check.add_argument("text", help="the prompt to check")
    check.add_argument("--address", default="localhost:50051", help="HOST:PORT of the gateway")
    check.add_argument("--policy", default="", help="policy name (default: the server's)")
    check.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds")
    check.add_argument("--json", action="store_true", help="print the verdict as JSON")
    check.add_argument("--api-key", default=None,
                       help="API key, for a gateway that requires one (or TIERGUARD_API_KEY)")  # fmt: skip
    tls_flags(check)
    check.set_defaults(func=_check)

    evaluate = commands.add_parser("eval", help="measure routing on labelled JSONL, in process")
    _config_flags(evaluate)
    _store_flag(evaluate)
    evaluate.add_argument("--data", action="extend", nargs="+", required=True, type=Path,
                          metavar="FILE", help="labelled JSONL files (repeatable)")  # fmt: skip
    evaluate.add_argument("--policy", default="", help="policy whose thresholds apply")
    evaluate.add_argument("--json", action="store_true", help="print the reports as JSON")
    evaluate.add_argument("--cross-source", action="store_true",
                          help="leave one source (file) out: fit and choose thresholds on the "
                               "other files, score the held-out one; with the Vigil baseline")  # fmt: skip
    evaluate.add_argument("--cache", type=Path, metavar="FILE",
                          help="vector cache for --cross-source (default: DATA_DIR/eval-vectors.npz)")  # fmt: skip
    evaluate.add_argument("--groups", type=int, default=None, metavar="K",
                          help="--cross-source: hold out K groups of sources instead of one "
                               "file at a time (faster, and closer to unseen traffic); "
                               "--adaptation: families are K groups (default 5), 0: one file each")  # fmt: skip
    evaluate.add_argument("--target-escalation", type=float, default=0.03, metavar="RATE",
                          help="--cross-source: escalate_at escalates this share of the training "
                               "files' ordinary benign (default 0.03)")  # fmt: skip
    evaluate.add_argument("--adaptation", type=int, metavar="K",
                          help="add K risky rows of each family as exemplars on a live gateway "
                               "(admin API), score the rest and the other files' benign rows, "
                               "remove them again")  # fmt: skip
    evaluate.add_argument("--benign-sample", type=int, default=3000, metavar="N",
                          help="--adaptation: at most N ordinary and N hard benign rows (seeded "
                               "sample; 0: all)")  # fmt: skip
    evaluate.add_argument("--seed", type=int, default=20261205,
                          help="--adaptation: seed of the exemplar choice and the benign sample")  # fmt: skip
    evaluate.add_argument("--concurrency", type=int, default=16,
                          help="--adaptation: checks in flight")  # fmt: skip
    evaluate.add_argument("--address", default=None, metavar="HOST:PORT",
                          help="--adaptation: use this running gateway (plaintext; its index is "
                               "changed and restored, its logs see the traffic) instead of "
                               "starting one")  # fmt: skip
    evaluate.add_argument("--token", default=None,
                          help="--address: admin token (or TIERGUARD_ADMIN_TOKEN)")  # fmt: skip
    evaluate.set_defaults(func=_eval)

    export = commands.add_parser(
        "export", help="write critic-approved training data as JSONL to standard output"
    )
    export.add_argument("kind", choices=["sft", "preferences"],
                        help="sft: {prompt, response}; preferences: {prompt, chosen, rejected}")  # fmt: skip
    _config_flags(export)
    _store_flag(export)
    export.set_defaults(func=_export)

    usage = commands.add_parser("usage", help="critic calls, tokens and cost recorded so far")
    _config_flags(usage)
    _store_flag(usage)
    usage.add_argument("--policy", default=None, help="one policy only")
    usage.set_defaults(func=_usage)

    calibrate = commands.add_parser(
        "calibrate", help="recommend thresholds for a recall target or an escalation budget"
    )
    _config_flags(calibrate)
    _store_flag(calibrate)
    calibrate.add_argument("--data", action="extend", nargs="+", required=True, type=Path,
                           metavar="FILE", help="labelled JSONL files")  # fmt: skip
    target = calibrate.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-recall", type=float, help="recall on risky to reach, e.g. 0.9")
    target.add_argument("--max-escalation", type=float,
                        help="share of ordinary benign that may be escalated, e.g. 0.03")  # fmt: skip
    calibrate.add_argument("--max-block-benign", type=float, default=0.002,
                           help="share of benign that block_at may block outright")  # fmt: skip
    calibrate.add_argument(
        "--policy", default="", help="the policy to recommend for (and --apply to)"
    )
    calibrate.add_argument(
        "--plot", type=Path, help="write score distributions and the trade-off as PNG"
    )
    calibrate.add_argument("--apply", action="store_true",
                           help="apply the thresholds to --policy on a running gateway (admin API)")  # fmt: skip
    calibrate.add_argument("--address", default="localhost:50051")
    calibrate.add_argument("--token", default=None, help="admin token (or TIERGUARD_ADMIN_TOKEN)")
    calibrate.add_argument("--timeout", type=float, default=30.0)
    tls_flags(calibrate)
    calibrate.set_defaults(func=_calibrate, json=False)

    add_admin_commands(commands)
    return parser


def _config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML config file (or TIERGUARD_CONFIG)")
    parser.add_argument("--data-dir", type=Path, help="where the exemplar store lives")


def _store_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store-url", metavar="URL",
                        help="PostgreSQL database of the stores, postgresql://user@host/dbname "
                             "(or TIERGUARD_STORE_URL; default: SQLite files in the data dir)")  # fmt: skip


def _load(args: argparse.Namespace) -> Config:
    from gateway.runtime.config import ConfigError, load_config

    overrides = {"data_dir": args.data_dir}
    if hasattr(args, "port"):
        overrides |= {"server.port": args.port, "server.host": args.host}
    if hasattr(args, "metrics_port"):
        overrides |= {"metrics.port": args.metrics_port}
    if hasattr(args, "workers"):
        overrides |= {"server.workers": args.workers}
    if hasattr(args, "store_url"):
        overrides |= {"store.url": args.store_url}
    try:
        return load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        raise SystemExit(f"tierguard: bad configuration: {exc}") from None


def _serve(args: argparse.Namespace) -> int:
    from embeddings_index.database import DatabaseError
    from gateway.api.server import ListenError, serve
    from gateway.runtime.app import Gateway
    from gateway.runtime.config import ConfigError
    from gateway.runtime.tracing import configure_from_environment

    config = _load(args)
    if args.worker_index is None and config.server.workers > 1:
        from gateway.cli.workers import supervise

        return supervise(args, config)
    provider = configure_from_environment()  # OTLP export only when OTEL_* asks for it
    try:
        gateway = Gateway.create(config, tracer_provider=provider, worker=args.worker_index)
        asyncio.run(serve(gateway, supervisor_pid=args.worker_of))
    except ConfigError as exc:  # found while starting: a constitution, a TLS file
        where = f"config file {config.source}: " if config.source else ""
        raise SystemExit(f"tierguard: bad configuration: {where}{exc}") from None
    except DatabaseError as exc:  # PostgreSQL unreachable, a data dir that cannot be written
        raise SystemExit(f"tierguard: cannot open the store: {exc}") from None
    except ListenError as exc:  # the port is taken
        raise SystemExit(f"tierguard: {exc}") from None
    finally:
        shutdown = getattr(provider, "shutdown", None)
        if shutdown is not None:
            shutdown()  # flush the spans still queued
    return 0


def _policy_named(config: Config, name: str) -> Policy:
    """The policy `name` (or the default) of `config`, checked before any slow work."""
    policy = config.policy(name or config.default_policy)
    if policy is None:
        raise SystemExit(
            f"tierguard: unknown policy {name!r}; the config defines {sorted(config.policies)}"
        )
    return policy


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Errors of the user's files as one line: an unreadable file, a bad row (ValueError)."""
    try:
        yield
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        raise SystemExit(f"tierguard: {where}{exc.strerror or exc}") from None
    except ValueError as exc:  # read_labelled and the offline router name the file and line
        raise SystemExit(f"tierguard: {exc}") from None


def _check(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf import json_format

    from gateway._proto.guardrail.v1 import guardrail_pb2 as pb
    from gateway._proto.guardrail.v1 import guardrail_pb2_grpc as pb_grpc
    from gateway.cli.admin import bearer, open_channel

    key = args.api_key or os.environ.get("TIERGUARD_API_KEY", "")
    with open_channel(args) as channel:
        stub = pb_grpc.GuardrailServiceStub(channel)
        try:
            response = stub.CheckPrompt(
                pb.CheckPromptRequest(text=args.text, policy=args.policy),
                timeout=args.timeout,
                metadata=bearer(key) if key else None,
            )
        except grpc.RpcError as exc:
            raise SystemExit(f"tierguard: {exc.code().name}: {exc.details()}") from None
    verdict = response.verdict
    if args.json:
        print(json_format.MessageToJson(verdict, preserving_proto_field_name=True))
        return 0
    print(f"decision:   {pb.Decision.Name(verdict.decision)}")
    print(f"decided by: {pb.Tier.Name(verdict.decided_by)}")
    print(f"risk score: {verdict.risk_score:.3f} (escalate_at {verdict.thresholds.escalate_at}, "
          f"block_at {verdict.thresholds.block_at})")  # fmt: skip
    fallback = "  (fallback applied)" if verdict.fallback_applied else ""
    print(f"escalated:  {verdict.escalated}{fallback}")
    print(f"reason:     {verdict.reason}")
    for hit in verdict.prefilter_hits:
        print(f"  rule   {hit.rule_id} ({hit.category}, weight {hit.weight:.2f})")
    for match in verdict.nearest_exemplars[:5]:
        similarity = f" sim {match.similarity:.3f}" if match.similarity_exposed else ""
        label = pb.Label.Name(match.label)
        print(f"  near   {match.exemplar_id} [{label}/{match.category}]{similarity}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from gateway.offline.evaluate import evaluate_cross_source, evaluate_files, format_reports
    from router.cross_source import format_cross_source

    config = _load(args)
    if args.adaptation is not None:
        return _adaptation(args, config)
    _policy_named(config, args.policy)
    if args.cross_source:
        with _user_errors():
            result = evaluate_cross_source(
                config, args.data, policy_name=args.policy, cache_path=args.cache,
                target=args.target_escalation, groups=args.groups or 0,
            )  # fmt: skip
        print(json.dumps(result.as_dict(), indent=1) if args.json else format_cross_source(result))
        return 0
    with _user_errors():
        reports = evaluate_files(config, args.data, policy_name=args.policy)
    if args.json:
        print(json.dumps({k: [r.as_dict() for r in v] for k, v in reports.items()}, indent=1))
    else:
        print(format_reports(reports))
    return 0


def _adaptation(args: argparse.Namespace, config: Config) -> int:
    """`eval --adaptation K`: exemplars added through a live gateway's admin API."""
    from gateway.cli.adaptation import adapt
    from gateway.offline.adaptation import format_adaptation
    from router.evaluation import read_labelled

    if args.cross_source:
        raise SystemExit("tierguard: --adaptation and --cross-source are separate runs")
    if args.store_url:
        raise SystemExit("tierguard: --adaptation starts a gateway of its own on a fresh data "
                         "directory; --store-url does not apply (use --address for another)")  # fmt: skip
    if not 1 <= args.adaptation <= 1000:
        raise SystemExit("tierguard: --adaptation K: from 1 to 1000 exemplars per family")
    if args.concurrency < 1:
        raise SystemExit("tierguard: --concurrency: at least 1")
    if args.groups is None:
        args.groups = 5
    if args.address is None:  # the child gateway's policies are the config's
        _policy_named(config, args.policy)
    with _user_errors():
        rows = [row for path in args.data for row in read_labelled(path)]
        result = adapt(args, config, rows)
    print(json.dumps(result.as_dict(), indent=1) if args.json else format_adaptation(result))
    return 0


def _records(args: argparse.Namespace) -> CriticRecords:
    from critic.records import CriticRecords
    from embeddings_index.database import DatabaseError, Storage

    config = _load(args)
    path = config.data_dir / "critic.sqlite3"
    if config.store.url is None and not path.is_file():
        raise SystemExit(f"tierguard: no critic records at {path} (check --data-dir)")
    try:
        return CriticRecords(Storage(config.store.url, config.data_dir).open("critic"))
    except DatabaseError as exc:
        raise SystemExit(f"tierguard: cannot open the critic records: {exc}") from None


def _export(args: argparse.Namespace) -> int:
    records = _records(args)
    pairs = records.sft_pairs() if args.kind == "sft" else records.preference_pairs()
    for pair in pairs:
        sys.stdout.write(json.dumps(pair, ensure_ascii=False) + "\n")
    return 0


def _usage(args: argparse.Namespace) -> int:
    totals = _records(args).usage(policy=args.policy)
    print(json.dumps(dataclasses.asdict(totals), indent=1))
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from gateway.offline.calibrate import calibrate, plot_calibration
    from gateway.offline.evaluate import OfflineRouter, format_reports
    from router.evaluation import read_labelled

    config = _load(args)
    if args.plot:  # before the slow part, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit(
                "tierguard: --plot needs matplotlib: pip install 'tierguard[plot]'"
            ) from None
    policy = _policy_named(config, args.policy)
    with _user_errors():
        rows = [row for path in args.data for row in read_labelled(path)]
        offline = OfflineRouter.create(config)
    results = offline.route_rows(rows, policy_name=policy.name)
    scores = [r.risk_score for r in results]
    hits = [r.hits for r in results]
    try:
        result = calibrate(rows, scores, hits, target_recall=args.target_recall,
                           max_escalation=args.max_escalation,
                           max_block_benign=args.max_block_benign)  # fmt: skip
    except ValueError as exc:
        raise SystemExit(f"tierguard: {exc}") from None
    t = result.thresholds
    print(f"target: {result.target}")
    print(f"recommended: escalate_at {t.escalate_at:.4f}, block_at {t.block_at:.4f}\n")
    print(format_reports({"category": result.by_category, "overall": [result.overall]}))
    print(f"policy snippet (config file):\n  policies:\n    {policy.name}:\n"
          f"      escalate_at: {t.escalate_at:.4f}\n      block_at: {t.block_at:.4f}")  # fmt: skip
    if args.plot:
        try:
            plot_calibration(rows, scores, result, args.plot)
        except (RuntimeError, OSError) as exc:  # no matplotlib; the PNG cannot be written
            raise SystemExit(f"tierguard: --plot {args.plot}: {exc}") from None
        print(f"\nwrote {args.plot}")
    if args.apply:
        import grpc
        from google.protobuf.field_mask_pb2 import FieldMask

        from gateway._proto.guardrail.v1 import admin_pb2 as apb
        from gateway.cli.admin import admin_stub

        stub, metadata = admin_stub(args)
        request = apb.UpdatePolicyRequest(
            policy=apb.Policy(name=policy.name, escalate_at=t.escalate_at, block_at=t.block_at),
            update_mask=FieldMask(paths=["escalate_at", "block_at"]),
        )
        try:
            reply = stub.UpdatePolicy(request, metadata=metadata, timeout=args.timeout)
        except grpc.RpcError as exc:
            raise SystemExit(f"tierguard: --apply: {exc.code().name}: {exc.details()}") from None
        print(f"applied to policy {reply.policy.name} on {args.address}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
