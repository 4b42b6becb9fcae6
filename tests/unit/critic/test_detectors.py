"""Output detectors as a table, and redaction."""

from __future__ import annotations

import pytest

from critic.constitution import Target, load_constitutions
from critic.detectors import detect, echoed_spans, redact

PAYFLOW = load_constitutions()["payflow"]
GENERAL = load_constitutions()["general"]


@pytest.mark.parametrize(
    ("text", "detector"),
    [
        ("key: sk-proj-abcdefghijklmnopqrstuvwxyz123456", "secrets.openai_key"),
        ("AKIAABCDEFGHIJKLMNOP", "secrets.aws_access_key"),
        ("token ghp_abcdefghijklmnopqrstuvwxyz0123456789", "secrets.github_token"),
        ("db_password = 'Sup3r$ecret'", "secrets.credential_assignment"),
        ("postgres://app:hunter22@db.internal:5432/pay", "secrets.connection_string"),
        ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----",
         "private_keys.private_key_block"),
        ("create table transactions (id bigint);", "sql_schema.sql_ddl"),
        ("SELECT * FROM information_schema.columns", "sql_schema.schema_listing"),
        ("Sure! My system prompt is: be a helpful bank bot", "system_prompt_echo.prompt_disclosure"),
    ],
)  # fmt: skip
def test_detectors_find_secrets_schemas_and_echoes(text: str, detector: str) -> None:
    assert detector in {h.detector for h in detect(text, PAYFLOW, target=Target.RESPONSE)}


@pytest.mark.parametrize(
    "text",
    [
        "Go to Settings > Security to reset your password: it takes a minute.",
        "Your transactions are listed under Statements; export them as CSV.",
        "I created a table of your spending by month.",
        "A strong password has at least twelve characters.",
    ],
)
def test_ordinary_answers_trigger_nothing(text: str) -> None:
    assert detect(text, PAYFLOW, target=Target.RESPONSE) == []


def test_hits_name_the_rule_that_claims_them() -> None:
    hits = detect("CREATE TABLE t (id int);", PAYFLOW, target=Target.RESPONSE)
    # the built-in schema detector and the rule's own pattern both fire, for the same rule
    assert {h.detector for h in hits} == {
        "sql_schema.sql_ddl",
        "pattern:payflow.no-internal-disclosure",
    }
    assert {h.rule_id for h in hits} == {"payflow.no-internal-disclosure"}
    # general.yaml does not claim schema dumps: the hit names the detector kind
    [unclaimed] = detect("CREATE TABLE t (id int);", GENERAL, target=Target.RESPONSE)
    assert unclaimed.rule_id == "detector.sql_schema"


def test_redaction_takes_the_whole_code_fence_and_merges_overlaps() -> None:
    text = "Here:\n```sql\nCREATE TABLE t (\n id int\n);\n```\nDone."
    hits = detect(text, PAYFLOW, target=Target.RESPONSE)
    assert redact(text, hits) == "Here:\n[redacted]\nDone."


SYSTEM_PROMPT = (
    "You are PayFlow's support assistant. Only discuss PayFlow accounts and cards, never "
    "reveal internal fee tables, and escalate disputes to a human agent."
)


def test_a_response_that_repeats_the_system_prompt_is_an_echo() -> None:
    constitution = load_constitutions()["general"]
    leak = f"Sure! I was told: {SYSTEM_PROMPT.upper()} Hope that helps."
    hits = detect(leak, constitution, target=Target.RESPONSE, system_prompt=SYSTEM_PROMPT)
    echo = [h for h in hits if h.detector == "system_prompt_echo.verbatim"]
    assert echo and leak[echo[0].span[0] : echo[0].span[1]].startswith("YOU ARE PAYFLOW")
    assert not [
        h
        for h in detect(leak, constitution, target=Target.RESPONSE)
        if h.detector == "system_prompt_echo.verbatim"
    ]  # without the system prompt there is nothing to compare with


def test_a_few_shared_words_are_not_an_echo() -> None:
    answer = "PayFlow's support assistant can help: your cards are listed under Accounts."
    assert echoed_spans(answer, SYSTEM_PROMPT) == []
