"""Which code a benchmark ran: the git commit of the source tree, when it is a checkout.

`ember bench cluster` records it in its JSON and `ember sim --from-bench` compares it
with its own: a control-plane change between a real run and its simulation (a new
placement rule, say) is in the simulated figures and not in the real ones.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1]  # src/ember


def code_commit(source: Path = SOURCE) -> str | None:
    """HEAD's commit, with "+dirty" when tracked files under src/ember differ from it;
    None outside a git checkout (an installed package) or without git."""
    try:
        head = _git(source, "rev-parse", "HEAD")
        dirty = _git(source, "status", "--porcelain", "--untracked-files=no", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head


def _git(source: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(source), *args], capture_output=True, text=True, timeout=10, check=True
    )
    return done.stdout.strip()
