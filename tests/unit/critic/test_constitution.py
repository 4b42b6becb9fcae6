"""Constitution files: the shipped ones load; bad ones name the file, rule and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from critic.constitution import (
    ConstitutionError,
    Severity,
    Target,
    load_constitution,
    load_constitutions,
)


def test_shipped_constitutions_load_with_inherited_rules() -> None:
    constitutions = load_constitutions()
    assert {"payflow", "general"} <= set(constitutions)
    payflow = constitutions["payflow"]
    own = [r.id for r in payflow.rules if not r.inherited]
    assert own == ["payflow.no-internal-disclosure", "payflow.no-regulated-advice",
                   "payflow.professional-tone"]  # fmt: skip
    assert payflow.rule("base.no-instruction-override") is not None
    assert payflow.rule("base.no-jailbreak").severity is Severity.BLOCK  # type: ignore[union-attr]
    assert all(Target.PROMPT in r.applies_to for r in payflow.rules_for(Target.PROMPT))
    assert payflow.label == "payflow@1.0"
    assert "export" in payflow.safe_reply_for(["payflow.no-internal-disclosure"])


VALID_RULE = "- {id: r1, text: Be nice., severity: revise}"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("version: '1'\nrules:\n  " + VALID_RULE, "'name' is required"),
        ("name: x\nversion: '1'\nrules: []", "'rules' must be a non-empty list"),
        ("name: x\nversion: '1'\nrules:\n  - {id: r1, text: t, severity: maybe}",
         "rule 'r1': field 'severity'"),
        ("name: x\nversion: '1'\nrules:\n  - {id: r1, text: t, patterns: ['(a)\\1']}",
         "rule 'r1': pattern"),
        ("name: x\nversion: '1'\nrules:\n  - {id: r1, text: t, applies_to: [everything]}",
         "rule 'r1': field 'applies_to'"),
        ("name: x\nversion: '1'\nrules:\n  - {id: r1, text: t, detectors: [telepathy]}",
         "rule 'r1': field 'detectors'"),
        ("name: x\nversion: '1'\nrules:\n  - {id: r1, text: t, examples: [{text: hi}]}",
         "rule 'r1': examples[0]"),
        ("name: x\nversion: '1'\nrules:\n  - {id: r1, text: t, colour: red}",
         "rule 'r1': unknown field"),
        ("name: x\nversion: '1'\nrules:\n  " + VALID_RULE + "\n  " + VALID_RULE,
         "'r1' is defined twice"),
        ("name: x\nversion: '1'\nrules:\n  - {id: r1}", "rule 'r1': field 'text'"),
    ],
)  # fmt: skip
def test_bad_files_name_the_rule_and_field(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ConstitutionError) as caught:
        load_constitution(path)
    assert "bad.yaml" in str(caught.value) and message in str(caught.value)
