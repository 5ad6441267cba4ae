"""Every command block of README.md runs, at a tiny size.

Each fenced block tagged `bash` or `python` is run as a user would run it: from the
repository root, with `.venv/bin` first on PATH (plain `ember`, `python`), in a fresh
EMBER_HOME, and must exit 0. `README_TMP` names a scratch directory for the block.
Blocks tagged `text` are output, not run; every other fence (none, `sh`, ...) is an
error, so a new command cannot escape this test by its tag.

An HTML comment ending on the line just before a block says how to run it, with
directives separated by `;`:

    <!-- readme-test: skip (REASON) -->
        not run; the reason is required and is the skip's message. For installs,
        `ray start`, whole-suite runs, peers that are optional: nothing else.
    <!-- readme-test: needs-server -->
        `ember serve` (the real SmolLM2) runs for the module on a free port; the
        block's `127.0.0.1:8000` / `localhost:8000` become its address and EMBER_URL
        points at it.
    <!-- readme-test: needs-model -->
        SmolLM2 is already in the block's store (as after the README's first
        `ember serve`), linked from the session's import.
    <!-- readme-test: with --flag VALUE --other VALUE --switch -->
        shrink the block: each flag's value in the block is replaced, or the flag is
        appended to the block's (single) command when it is not there. Values are
        pasted into the script as written, so "$README_TMP/x" works.
    <!-- readme-test: expect TEXT -->
        the block's standard output must contain TEXT.
    <!-- readme-test: instead (REASON)
    COMMANDS
    -->
        run COMMANDS (bash) in place of the block: for a synopsis with placeholders.
        Must be the last directive; the commands take the lines up to `-->`.

Without a comment a block runs as written. The directives are checked by the fast
tests at the bottom; running the blocks is slow (the real model, servers).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUN = {"bash", "python"}
NOT_RUN = {"text"}
DEFAULT_ADDRESSES = ("127.0.0.1:8000", "localhost:8000")
_DIRECTIVE = re.compile(r"<!--\s*readme-test:(.*?)-->", re.S)


class ReadmeTestError(ValueError):
    """A README block or its readme-test comment does not follow the convention."""


@dataclass
class Block:
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    skip: str | None = None
    needs_server: bool = False
    needs_model: bool = False
    flags: list[tuple[str, str | None]] = field(default_factory=list)
    expect: list[str] = field(default_factory=list)
    instead: str | None = None

    @property
    def id(self) -> str:
        return f"line{self.line}-{self.lang}"


def _apply_directives(block: Block, text: str) -> None:
    head, _, body = text.partition("\n")
    parts = [p.strip() for p in re.split(r";(?![^()]*\))", head) if p.strip()]  # not inside (...)
    for i, part in enumerate(parts):
        word, _, rest = part.partition(" ")
        reason = re.fullmatch(r"\((.+)\)", rest.strip())
        if word == "skip":
            if reason is None:
                raise ReadmeTestError(f"line {block.line}: skip needs a reason in parentheses")
            block.skip = reason[1]
        elif word == "instead":
            if reason is None or i != len(parts) - 1 or not body.strip():
                raise ReadmeTestError(
                    f"line {block.line}: 'instead (REASON)' comes last, its commands on the next lines"
                )
            block.instead = body.strip("\n") + "\n"
        elif word in ("needs-server", "needs-model") and not rest:
            setattr(block, word.replace("-", "_"), True)
        elif word == "with" and rest:
            block.flags += _flag_pairs(rest, block.line)
        elif word == "expect" and rest:
            block.expect.append(rest.strip())
        else:
            raise ReadmeTestError(f"line {block.line}: unknown readme-test directive {part!r}")
    if body.strip() and block.instead is None:
        raise ReadmeTestError(f"line {block.line}: only 'instead' takes lines after the first")


def _flag_pairs(text: str, line: int) -> list[tuple[str, str | None]]:
    words = shlex.split(text, posix=False)  # keeps quotes: values are pasted into a script
    pairs: list[tuple[str, str | None]] = []
    for i, word in enumerate(words):
        if word.startswith("--"):
            value = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else None
            pairs.append((word, value))
        elif i == 0 or not words[i - 1].startswith("--"):
            raise ReadmeTestError(f"line {line}: 'with' takes --flag [VALUE] pairs, not {word!r}")
    return pairs


def parse_readme(text: str) -> list[Block]:
    """The fenced blocks of a README, with their readme-test directives."""
    lines = text.splitlines()
    blocks, i, used = [], 0, set()
    while i < len(lines):
        fence = re.match(r"^```(\S*)\s*$", lines[i])
        if fence is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        if end is None:
            raise ReadmeTestError(f"line {i + 1}: a code block is never closed")
        block = Block(i + 1, fence[1], "\n".join(lines[i + 1 : end]) + "\n")
        if block.lang not in RUN | NOT_RUN:
            raise ReadmeTestError(f"line {i + 1}: tag the block bash or python (run) or text (not run)")
        before = "\n".join(lines[:i])
        comment = list(_DIRECTIVE.finditer(before))
        if comment and before.rstrip().endswith(comment[-1][0]) and lines[i - 1].rstrip().endswith("-->"):
            _apply_directives(block, comment[-1][1].strip())
            used.add(comment[-1].start())
        blocks.append(block)
        i = end + 1
    stray = [m for m in _DIRECTIVE.finditer(text) if m.start() not in used]
    if stray:
        where = text[: stray[0].start()].count("\n") + 1
        raise ReadmeTestError(f"line {where}: a readme-test comment must end on the line before a block")
    return blocks


def with_flags(code: str, flags: list[tuple[str, str | None]]) -> str:
    """`code` with each flag's value replaced, or the flag appended to its one command."""
    for flag, value in flags:
        new = flag if value is None else f"{flag} {value}"
        pattern = rf"{re.escape(flag)}(?=\s|$)" if value is None else rf"{re.escape(flag)}\s+(?!-)\S+"
        code, found = re.subn(pattern, lambda _: new, code)  # noqa: B023 (used at once)
        if found:
            continue
        commands = [ln for ln in code.splitlines() if ln.strip() and not ln.rstrip().endswith("\\")]
        if len(commands) != 1:
            raise ReadmeTestError(f"cannot append {flag}: the block is not one command")
        code = code.rstrip("\n") + f" {new}\n"
    return code


def script(block: Block, url: str | None) -> str:
    """What runs for `block`: its code (or its replacement), shrunk and pointed at `url`."""
    code = block.instead if block.instead is not None else block.code
    code = with_flags(code, block.flags)
    if url is not None:
        for address in DEFAULT_ADDRESSES:
            code = code.replace(f"http://{address}", url)
    return code


def _readme_blocks() -> tuple[list[Block], ReadmeTestError | None]:
    try:
        return parse_readme(README.read_text()), None
    except ReadmeTestError as e:  # reported by the convention test, not as a collection error
        return [], e


BLOCKS, README_ERROR = _readme_blocks()


# -- running the blocks (slow) -----------------------------------------------------------


def link_default_model(checkpoint: Path, home: Path) -> None:
    """Put SmolLM2 in `home`'s store without copying it (hard links)."""
    from ember.store.importer import DEFAULT_MODEL_NAME
    from ember.store.local import LocalStore

    store = LocalStore(home)
    shutil.copytree(checkpoint, store.path_for(DEFAULT_MODEL_NAME), copy_function=os.link)
    store.register(DEFAULT_MODEL_NAME)


@pytest.fixture(scope="module")
def readme_server(smollm2_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`ember serve` with the real SmolLM2 for the blocks that talk to a server."""
    from tests.server.serve_process import start_server, stop_server

    home = tmp_path_factory.mktemp("readme-server-home")
    link_default_model(smollm2_checkpoint, home)
    server = start_server(home)
    try:
        yield server.url
    finally:
        stop_server(server)


def _block_env(tmp_path: Path, url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("EMBER_API_KEY", "EMBER_REGISTRY", "EMBER_URL")}
    env["PATH"] = os.pathsep.join(
        [str(ROOT / ".venv" / "bin"), str(Path(sys.executable).parent), env["PATH"]]
    )
    env["EMBER_HOME"] = str(tmp_path / "home")
    env["README_TMP"] = str(tmp_path / "tmp")
    if url is not None:
        env["EMBER_URL"] = url
    return env


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang in RUN], ids=lambda b: b.id)
def test_readme_block_runs(block: Block, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if block.skip is not None:
        pytest.skip(block.skip)
    url = request.getfixturevalue("readme_server") if block.needs_server else None
    env = _block_env(tmp_path, url)
    (tmp_path / "tmp").mkdir()
    if block.needs_model:
        link_default_model(request.getfixturevalue("smollm2_checkpoint"), tmp_path / "home")
    path = tmp_path / ("block.py" if block.lang == "python" and block.instead is None else "block.sh")
    path.write_text(script(block, url))
    python = shutil.which("python", path=env["PATH"]) or sys.executable
    argv = [python, str(path)] if path.suffix == ".py" else ["bash", "-eo", "pipefail", str(path)]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=800)
    report = (
        f"README.md line {block.line}:\n{path.read_text()}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    )
    assert done.returncode == 0, report
    for text in block.expect:
        assert text in done.stdout, report


# -- the convention itself (fast) --------------------------------------------------------


def test_the_readme_follows_the_convention() -> None:
    if README_ERROR is not None:
        raise README_ERROR
    runnable = [b for b in BLOCKS if b.lang in RUN]
    assert runnable and all(b.skip or b.code.strip() for b in runnable)
    for b in runnable:  # every shrink applies to its block
        script(b, "http://127.0.0.1:1")


def test_directives_are_read_and_checked() -> None:
    text = (
        "<!-- readme-test: needs-server; with --n 2 --fast; expect Paris -->\n```bash\nrun --n 50\n```\n"
        "```text\noutput\n```\n"
        "<!-- readme-test: instead (placeholders)\nember store ls\n-->\n"
        "```bash\nember store ls [--json]\n```\n"
    )
    first, out, synopsis = parse_readme(text)
    assert first.needs_server and first.expect == ["Paris"]
    assert first.flags == [("--n", "2"), ("--fast", None)]
    assert script(first, None) == "run --n 2 --fast\n" and out.lang == "text"
    assert script(synopsis, None) == "ember store ls\n"
    bad = {
        "<!-- readme-test: skip -->\n```bash\nx\n```\n": "reason",
        "<!-- readme-test: frobnicate -->\n```bash\nx\n```\n": "unknown",
        "```sh\nx\n```\n": "tag the block",
        "<!-- readme-test: skip (why) -->\n\ntext\n```bash\nx\n```\n": "line before a block",
        "<!-- readme-test: with --x 1 -->\n```bash\na\nb\n```\n": "not one command",
    }
    for text, message in bad.items():
        with pytest.raises(ReadmeTestError, match=message):
            for b in parse_readme(text):
                script(b, None)


def test_with_flags_replaces_values_and_keeps_quotes() -> None:
    code = "ember bench serve --dataset trace:x.csv \\\n  --num-prompts 50 --save-result\n"
    got = with_flags(code, [("--num-prompts", "2"), ("--result-dir", '"$README_TMP/r"')])
    tail = '  --num-prompts 2 --save-result --result-dir "$README_TMP/r"\n'
    assert got == "ember bench serve --dataset trace:x.csv \\\n" + tail
