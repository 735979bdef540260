"""Extract the README's walk-through into one bash script (used by test_readme_walkthrough.py)."""

from __future__ import annotations

import re
from pathlib import Path

BLOCK = re.compile(r"<!-- walkthrough(?P<bg>: background)? -->\s*\n```bash\n(?P<code>.*?)```", re.S)


def blocks(readme: Path) -> list[tuple[bool, str]]:
    """(background?, code) for every block marked `<!-- walkthrough -->` / `<!-- walkthrough: background -->`."""
    return [(bool(m.group("bg")), m.group("code")) for m in BLOCK.finditer(readme.read_text())]


def script(readme: Path) -> str:
    """The blocks in order, as they are; a background block (a terminal of its own in the README) runs
    with `&`, its output in bg-N.log."""
    # -e: a failing command ends the walk-through; no pipefail: `... | head` is how a reader shortens output
    out = ["set -eu"]
    for n, (bg, code) in enumerate(blocks(readme)):
        out.append(f"# ---- README block {n}{' (background)' if bg else ''}")
        out.append(f"( {code.strip()}\n) > bg-{n}.log 2>&1 &" if bg else code.rstrip())
    return "\n".join(out) + "\n"
