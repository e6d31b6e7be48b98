"""The README stays true: every setting is documented, and its two commands exist."""

from __future__ import annotations

import re
from pathlib import Path

from app.config import Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_configuration_table() -> None:
    documented = set(re.findall(r"^\| `RXVERIFY_([A-Z0-9_]+)` \|", README, flags=re.MULTILINE))
    fields = {name.upper() for name in Settings.model_fields}
    assert fields - documented == set(), "settings missing from README's configuration table"
    assert documented - fields == set(), "README documents settings that do not exist"


def test_readme_commands_are_make_targets() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for target in ("run", "test"):
        assert f"make {target}" in README
        assert re.search(rf"^{target}:", makefile, flags=re.MULTILINE)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_cli_commands_exist() -> None:
    from app.cli import build_parser

    parser = build_parser()
    for line in re.findall(r"\.venv/bin/rxverify ([a-z][a-z-]*(?: [a-z][a-z-]*)?)", README):
        words = line.split()
        try:
            parser.parse_args([*words, "--help"])
        except SystemExit as exit_:
            assert exit_.code == 0, f"`rxverify {line}` is not a command"
