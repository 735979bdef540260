"""Render the PACS conformance matrix (JSON from tests/conformance) into docs/pacs-conformance.md.

    RADCOHORT_CONFORMANCE_OUT=/tmp/conformance.json .venv/bin/python -m pytest -q tests/conformance
    .venv/bin/python bench/conformance_matrix.py /tmp/conformance.json [--doc docs/pacs-conformance.md]

The table replaces what stands between the `<!-- matrix:start -->` and `<!-- matrix:end -->`
markers of the document (printed to stdout with --print).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- matrix:start -->", "<!-- matrix:end -->"
PEERS = ("orthanc", "dcmqrscp", "dcmqrscp-strict", "dcmqrscp-compressed", "qrscp", "badpacs")
MARK = {"pass": "pass", "expected-limitation": "limitation", "fail": "**FAIL**", "error": "**ERROR**",
        "skipped": "skipped"}


def render(data: dict) -> str:
    cells = {(c["peer"], c["scenario"]): c for c in data.get("cells", [])}
    peers = [p for p in PEERS if any(k[0] == p for k in cells)] + sorted({k[0] for k in cells} - set(PEERS))
    scenarios = sorted({k[1] for k in cells})
    lines = [f"Generated {data.get('generated_at', '?')} by `bench/conformance_matrix.py`.", "",
             "| scenario | " + " | ".join(peers) + " |", "|---|" + "---|" * len(peers)]
    for sc in scenarios:
        row = [MARK.get(cells[(p, sc)]["result"], cells[(p, sc)]["result"]) if (p, sc) in cells else "–"
               for p in peers]
        lines.append(f"| {sc} | " + " | ".join(row) + " |")
    notes = [c for c in sorted(cells.values(), key=lambda c: (c["scenario"], c["peer"])) if c["result"] != "pass"]
    if notes:
        lines += ["", "Reasons (every cell that is not a plain pass):", ""]
        for c in notes:
            reason = " ".join(c["reason"].split()).replace("|", "\\|")
            lines.append(f"- {c['scenario']} × {c['peer']} — {MARK.get(c['result'], c['result'])}: {reason}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="JSON written by the suite (RADCOHORT_CONFORMANCE_OUT)")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "pacs-conformance.md")
    ap.add_argument("--print", action="store_true", help="print the table instead of editing the document")
    args = ap.parse_args(argv)
    table = render(json.loads(args.results.read_text()))
    if args.print:
        sys.stdout.write(table)
        return 0
    doc = args.doc.read_text()
    if START not in doc or END not in doc:
        print(f"{args.doc}: no {START} ... {END} markers", file=sys.stderr)
        return 1
    head, rest = doc.split(START, 1)
    _, tail = rest.split(END, 1)
    args.doc.write_text(f"{head}{START}\n{table}{END}{tail}")
    print(f"{args.doc}: matrix updated ({len(table.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
