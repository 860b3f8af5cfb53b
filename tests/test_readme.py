"""The README's claims that code can check: the family table and the two set-up commands."""

import re
from pathlib import Path

from tests.helpers.families import FAMILIES, UNSUPPORTED

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def block(name: str) -> str:
    match = re.search(f"<!-- {name}:begin -->(.*?)<!-- {name}:end -->", README, re.S)
    assert match, f"README has no {name} block"
    return match.group(1)


def test_family_table_matches_the_tested_families():
    rows = [line.split("|")[1:4] for line in block("families").splitlines() if line.startswith("| ")][2:]
    table = {name.strip(): (status.strip(), note.strip()) for name, status, note in rows}
    expected = {name: ("supported", note) for name, (_, note) in FAMILIES.items()}
    expected |= {name: ("refused at load", "attention outside the generic interface") for name in UNSUPPORTED}
    assert table == expected


def test_setup_is_two_commands_and_ci_runs_them():
    commands = [line for line in block("setup").splitlines() if line and not line.startswith("```")]
    assert len(commands) == 2
    assert "longlora demo" in commands[0] and "torch==2.13.0" in commands[0]
    assert commands[1].startswith("pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "setup:begin" in ci and "bash -euo pipefail -c" in ci


def test_s2_settings_table_lists_every_setting_with_its_default():
    from longlora_plugin import S2Settings

    rows = [line.split("|")[1:3] for line in block("s2-settings").splitlines() if line.startswith("| `")]
    table = {name.strip().strip("`"): default.strip().strip("`") for name, default in rows}
    expected = {S2Settings.config_key(f): repr(getattr(S2Settings(), f)).replace("'", '"') for f in S2Settings.names()}
    assert table == expected
