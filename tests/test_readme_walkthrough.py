"""The README walkthrough, executed as written against a real `rxverify up` (shrunk through RXVERIFY_ settings).

The bash block is taken from README.md itself and run by bash with only RXVERIFY_DATA_DIR and RXVERIFY_PORT
set (the parameters it documents). The test adds one marker line before each numbered step, so that each
step's output can be checked, and changes none of the commands.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.commands.up import read_keys
from app.orm import Role
from tests.app.up_process import free_port, start_up, up_env

ROOT = Path(__file__).resolve().parents[1]
MARKER = "@@walkthrough-step"


def walkthrough_block() -> str:
    """The first bash block of the README's Walkthrough section."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Walkthrough\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    assert match is not None, "the Walkthrough section has no bash block"
    return match.group(1)


def with_step_markers(block: str) -> str:
    """The block with a marker line before each `# N.` comment (step 0 is the set-up before step 1).

    The marker starts with a newline: curl prints a body without one.
    """
    lines = [f"printf '\\n{MARKER} %s\\n' 0"]
    for line in block.splitlines():
        step = re.match(r"# (\d+)\. ", line)
        if step:
            lines.append(f"printf '\\n{MARKER} %s\\n' {step.group(1)}")
        lines.append(line)
    return "\n".join(lines) + "\n"


def split_steps(output: str) -> dict[int, str]:
    """Output per step number."""
    parts = re.split(rf"^{MARKER} (\d+)$", output, flags=re.MULTILINE)
    return {int(number): text for number, text in zip(parts[1::2], parts[2::2], strict=True)}


def first_json(text: str) -> Any:
    """The first JSON value in text (after any headers or other lines)."""
    start = min(i for i in (text.find("{"), text.find("[")) if i >= 0)
    return json.JSONDecoder().raw_decode(text[start:])[0]


def test_the_walkthrough_block_is_found_and_has_its_steps() -> None:
    block = walkthrough_block()
    assert set(split_steps(subprocess.run(["bash", "-c", with_step_markers("true")], capture_output=True,
                                          text=True).stdout)) == {0}
    assert [int(n) for n in re.findall(r"^# (\d+)\. ", block, flags=re.MULTILINE)] == [1, 2, 3, 4, 5, 6, 7]
    assert "demo-keys.env" in block and '"dataset": "demo"' in block


@pytest.mark.slow
def test_the_readme_walkthrough_runs_as_written(tmp_path: Path) -> None:
    data_dir, port = tmp_path / "var", free_port()
    env = up_env(data_dir, port)
    server = start_up(env, logs_dir=tmp_path)
    try:
        server.wait_ready(timeout_s=240)
        shell = {name: value for name, value in env.items() if not name.startswith("RXVERIFY_")}
        shell.update(RXVERIFY_DATA_DIR=str(data_dir), RXVERIFY_PORT=str(port))
        workdir = tmp_path / "shell"
        workdir.mkdir()
        run = subprocess.run(["bash", "-e", "-c", with_step_markers(walkthrough_block())], cwd=workdir, env=shell,
                             capture_output=True, text=True, timeout=420)
        assert run.returncode == 0, f"{run.stdout[-4000:]}\n{run.stderr[-4000:]}\n{server.logs()}"
        steps = split_steps(run.stdout)
        assert set(steps) == {0, 1, 2, 3, 4, 5, 6, 7}, run.stdout[-3000:]

        verdict = first_json(steps[1])
        assert verdict["verdict"] in ("match", "mismatch", "review") and verdict["model_version"] == 1
        assert verdict["prescribed_ndc"] == "50111-0434" and verdict["prescribed_ndc_input"] == "50111-434-01"
        assert set(verdict) >= {"reason", "predicted_ndc", "expected_accept_cost", "conformal_set"}

        assert '"version": 1' in steps[3] and "\nHTTP 201\n" in steps[3]
        activated = json.loads(steps[3].rstrip().splitlines()[-1])
        assert activated["version"] == 2 and activated["active"] is True

        assert re.search(r"^HTTP/1\.1 202 ", steps[4], flags=re.MULTILINE), steps[4]
        assert re.search(r"^location: /v1/admin/training-jobs/1\r?$", steps[4], flags=re.MULTILINE | re.IGNORECASE)
        polls = [line for line in steps[4].splitlines() if line.split(" ")[0] in ("queued", "running", "succeeded",
                                                                                   "failed", "cancelled")]
        assert polls and polls[-1].startswith("succeeded done"), steps[4][-2000:]

        assert "model 2 against its parent 1 on the validation split" in steps[5], steps[5]
        assert re.search(r"^  Total cost +parent +[\d.]+ +candidate +[\d.]+$", steps[5], flags=re.MULTILINE), steps[5]
        assert re.search(r"^  Other pairs +parent +\d+ +candidate +\d+$", steps[5], flags=re.MULTILINE), steps[5]

        promote_body, status = steps[6].rstrip().rsplit("\nHTTP ", 1)
        promoted = first_json(promote_body)
        keys = read_keys(data_dir / "keys" / "demo-keys.env")
        listed = httpx.get(f"{server.url}/v1/admin/models/2", timeout=10,
                           headers={"X-API-Key": keys[Role.PHARMACIST]}).json()
        if status == "200":
            assert promoted["active_model_version"] == 2 and promoted["promotion"]["gate"]["passed"] is True
            assert listed["active"] is True and '"model_version": 2' in steps[7]
        else:  # the gate refused honestly: every failed check with its numbers, and model 1 still serves
            assert status == "409" and promoted["type"].endswith("promotion-gate-failed"), steps[6]
            assert promoted["failed_checks"] and promoted["gate"]["passed"] is False
            assert listed["active"] is False and '"model_version": 1' in steps[7]
    finally:
        code = server.interrupt()
    assert code == 0, server.logs()
