"""The documentation cannot drift from the CLI: every `fedgen` command the README and docs/ show is parsed by the
real command line, and the blocks marked `<!-- docs-test: run -->` are run, in order, as a newcomer would."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer

from fedgen.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = re.compile(r"<!--\s*docs-test:\s*(\w+)\s*-->")


def blocks(page: Path) -> list[tuple[str | None, list[str]]]:
    """(marker, lines) of every fenced shell block of a page (not ```text, ```toml or ```json); the marker is a
    `docs-test` comment right above it."""
    out, lines, i = [], page.read_text().splitlines(), 0
    while i < len(lines):
        if lines[i].startswith("```"):
            above = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            mark = MARK.fullmatch(above.strip())
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            if lines[i][3:].strip() not in ("text", "toml", "json"):  # output and files are not commands
                out.append((mark.group(1) if mark else None, lines[i + 1:end]))
            i = end
        i += 1
    return out


def commands(lines: list[str]) -> list[str]:
    """The `fedgen ...` command lines of a block (backslash continuations joined)."""
    found, pending = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = pending + line, ""
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # not a shell line (TOML, a table, output)
            continue
        if words and words[0] in ("fedgen", ".venv/bin/fedgen"):
            found.append(line)
    return found


def argv(line: str) -> list[str]:
    """The arguments of a command line, up to a shell redirection or pipe."""
    words = shlex.split(line, comments=True)[1:]
    cut = next((k for k, w in enumerate(words) if w in (">", ">>", "|", "&&", ";", "2>&1")), len(words))
    return words[:cut]


def parse(args: list[str]) -> None:
    """What click does before it runs a command: every option must exist and every value have its type."""
    command: click.Command = typer.main.get_command(app)
    ctx = command.make_context("fedgen", list(args))
    while isinstance(command, click.Group) and ctx.protected_args + ctx.args:
        name, command, rest = command.resolve_command(ctx, ctx.protected_args + ctx.args)
        ctx = command.make_context(name, rest, parent=ctx)


DOCUMENTED = [(page.relative_to(ROOT), line) for page in PAGES for mark, block in blocks(page)
              if mark != "skip" for line in commands(block)]


def test_the_docs_show_commands():
    assert len(DOCUMENTED) >= 30
    assert {str(page) for page, _ in DOCUMENTED} >= {"README.md", "docs/flower.md", "docs/privacy.md"}


@pytest.mark.parametrize(("page", "line"), DOCUMENTED, ids=[f"{p}:{line[:60]}" for p, line in DOCUMENTED])
def test_every_documented_command_parses(page, line):
    args = argv(line)
    if "--version" in args or "--help" in args:  # eager options exit while parsing
        return
    try:
        parse(args)
    except click.UsageError as exc:
        pytest.fail(f"{page}: `{line}` does not parse: {exc.format_message()}")


RUN_BLOCKS = [(page.relative_to(ROOT), block) for page in PAGES for mark, block in blocks(page) if mark == "run"]


def test_the_walkthrough_runs_and_smoke_draws_recognisable_digits(tmp_path):
    """Every command of the `run` blocks, in page order, in one fresh folder, through a shell and the installed
    `fedgen` command. The README promises that `smoke` draws digits its classifier recognises (86% measured on 400
    samples; noise is 10%): below 50% in that evaluation, the first look would not show that fedgen works."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "FEDGEN_CACHE": str(tmp_path / "cache")}
    env.pop("FEDGEN_DATA", None)
    ran = []
    for page, block in RUN_BLOCKS:
        for line in commands(block):
            done = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=600)
            assert done.returncode == 0, f"{page}: `{line}` failed:\n{done.stdout}\n{done.stderr}"
            assert "Traceback" not in done.stderr, f"{page}: `{line}`:\n{done.stderr}"
            ran.append(line)
    assert any("train --preset smoke" in line for line in ran) and any("evaluate runs/smoke" in line for line in ran)
    assert (tmp_path / "runs" / "smoke" / "samples" / "final.png").exists()
    records = [json.loads(r) for r in (tmp_path / "runs" / "smoke" / "metrics.jsonl").read_text().splitlines()]
    evaluation = next(r for r in records if r.get("event") == "evaluate")
    assert evaluation["generated"] == 400 and evaluation["label_agreement_domain"] > 0.5
