"""The import rules of docs/architecture.md, enforced: every module of app/ and models/ is parsed (AST,
no import executed) and every import statement in it is checked, module-level or inside a function
(the lazy imports are where layering breaks quietly).

The rules:
1. Data moves one way. Each module belongs to a layer (LAYERS, lowest first); a module may import
   the kernel and any layer below its own, never one above. Packages of one layer may not import
   each other, except in a layer marked `mutual` (packages due to be merged into one).
2. `models/` (the torch trainer) is a leaf: it imports nothing of `app/`. The typed training
   spec it shares with the service lives in `models/spec.py` (pydantic only), which `app/` imports.
3. The kernel (settings, errors, privacy, db, audit, context) imports no layer at all.
4. The transport (dicom, dicomweb) does not touch the database: no app.db, app.audit, app.context.
   What it needs of the index or the node records (a sink, a node lookup, recorders) it is handed.

An import that breaks a rule and is not in ALLOWED fails this test, with file, line and rule.
An entry of ALLOWED that no longer occurs fails it too: fixing an exception means deleting it here,
so the list only shrinks. A new package must be placed in LAYERS (an unplaced module fails).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# modules every layer may import (and that import no layer): the process's foundations
KERNEL = ("app", "app.errors", "app.config", "app.tokens", "app.privacy", "app.db", "app.audit", "app.context",
          "app.retry", "app.jobs")

# rule 4: these packages may not import those
DB_FREE = ("app.store", "app.dicom", "app.dicomweb")
DB_MODULES = ("app.db", "app.audit", "app.context")

# (layer name, module prefixes, mutual) - lowest first. A module's layer is its longest matching prefix.
LAYERS: list[tuple[str, tuple[str, ...], bool]] = [
    ("store", ("app.store",), False),  # the UID-keyed Part-10 file store: pydicom only, knows nothing else
    ("dicom", ("app.dicom",), False),  # pynetdicom: contexts, queries, SCU, the Storage SCP; no DB
    ("dicomweb", ("app.dicomweb",), False),  # QIDO/WADO client and Part 10 ingest over HTTP
    ("index", ("app.index",), False),  # extract (Dataset -> record), ingest, the store->index sink
    ("labels", ("app.labels",), False),  # rules + engine; the labeler handed to the index
    # PACS nodes: records, etiquette policy, probe, the pseudonymous C-FIND rules (one package to be: app/nodes)
    ("nodes", ("app.policy", "app.probe", "app.retrievals.nodes", "app.find_policy"), True),
    ("retrievals", ("app.retrievals",), False),  # expected listing, plan, runner, leases
    ("worklists", ("app.worklists",), False),  # accession lists resolved against a PACS
    ("cohorts", ("app.cohorts",), False),  # selection, split, snapshots, pulls
    ("models", ("models",), False),  # the torch trainer (a leaf, rule 2)
    ("products", ("app.exports", "app.training"), False),  # what is made from a cohort
    ("tools", ("app.synth", "app.devtools"), False),  # phantoms and test peers: used by entry points only
    # composition (wiring, which job kind runs which stage's function) and the front ends
    ("entry", ("app.wiring", "app.jobs.kinds", "app.jobs.worker", "app.api", "app.web", "app.cli", "app.demo"), True),
]

# The exceptions that remain (importer module, imported module) -> why, and what removes it.
# Keep in step with docs/architecture.md "Known exceptions".
ALLOWED: dict[tuple[str, str], str] = {
    # index -> labels: the displayed age uses the labeler's plausibility rules
    ("app.index.extract", "app.labels.engine"): "age_years: move the pure age parsing into index/extract",
    # the node records (nodes layer) take their pydantic schemas from the retrievals package
    ("app.retrievals.nodes", "app.retrievals.schemas"): "move NodeIn/NodeOut next to the node records",
    # kernel -> composition: the job registry loads the built-in kinds (which name stage functions) on first use
    ("app.jobs.handlers", "app.jobs.kinds"): "let the worker's and the API's wiring import app.jobs.kinds",
}


@dataclass(frozen=True)
class Import:
    importer: str
    target: str
    path: Path
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    mods = {}
    for top in ("app", "models"):
        for p in sorted((ROOT / top).rglob("*.py")):
            mods[module_name(p)] = p
    return mods


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import of a project module in this file, at any depth (functions, methods, try blocks)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from app import audit` imports the module app.audit, not the package app
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        else:
            continue
        for t in dict.fromkeys(targets):
            if t.split(".")[0] in ("app", "models"):
                out.append(Import(name, t, path, node.lineno))
    return out


def _prefix_match(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def is_kernel(module: str) -> bool:
    """In the kernel, unless a layer claims it by a longer prefix (app.jobs.kinds is composition)."""
    if module == "app":
        return True
    k = max((len(p) for p in KERNEL if p != "app" and _prefix_match(module, p)), default=0)
    placed = layer_of(module)
    return k > 0 and (placed is None or len(placed[1]) < k)


def layer_of(module: str) -> tuple[int, str] | None:
    """(layer index, package prefix) by the longest matching prefix; None for the kernel or unplaced."""
    best: tuple[int, int, str] | None = None
    for i, (_name, prefixes, _mutual) in enumerate(LAYERS):
        for p in prefixes:
            if _prefix_match(module, p) and (best is None or len(p) > best[1]):
                best = (i, len(p), p)
    return None if best is None else (best[0], best[2])


def violation(imp: Import) -> str | None:
    """Which rule `imp` breaks (None: allowed by the rules)."""
    src, dst = imp.importer, imp.target
    if src.split(".")[0] == "models":
        if dst.split(".")[0] == "app":
            return "models/ is a leaf: it imports nothing of app/ (the shared spec is models/spec.py)"
        return None
    if is_kernel(src):
        if dst.split(".")[0] == "models" or not is_kernel(dst):
            return f"the kernel imports no layer ({dst})"
        return None
    if any(_prefix_match(src, p) for p in DB_FREE) and any(_prefix_match(dst, p) for p in DB_MODULES):
        return f"the transport ({src.split('.')[1]}) does not touch the database ({dst}): it is handed what it needs"
    if is_kernel(dst):
        return None
    a, b = layer_of(src), layer_of(dst)
    if a is None or b is None:
        return None  # reported by test_every_module_is_placed
    if a[0] < b[0]:
        return f"layer '{LAYERS[a[0]][0]}' imports the later layer '{LAYERS[b[0]][0]}'"
    if a[0] == b[0] and a[1] != b[1] and not LAYERS[a[0]][2]:
        return f"'{a[1]}' and '{b[1]}' are siblings in layer '{LAYERS[a[0]][0]}': neither imports the other"
    return None


@pytest.fixture(scope="module")
def graph() -> list[Import]:
    modules = all_modules()
    out: list[Import] = []
    for name, path in modules.items():
        out.extend(imports_of(name, path, modules))
    return out


def test_every_module_is_placed() -> None:
    unplaced = [m for m in all_modules() if not is_kernel(m) and layer_of(m) is None]
    assert not unplaced, f"place these modules in a layer of tests/test_architecture.py LAYERS: {unplaced}"


def test_no_new_import_violations(graph: list[Import]) -> None:
    bad = []
    for imp in graph:
        why = violation(imp)
        if why and (imp.importer, imp.target) not in ALLOWED:
            bad.append(f"{imp.path.relative_to(ROOT)}:{imp.line}: {imp.importer} -> {imp.target}: {why}")
    assert not bad, "imports that break docs/architecture.md's rules:\n" + "\n".join(sorted(bad))


def test_allowlist_has_no_stale_entries(graph: list[Import]) -> None:
    """An exception that was fixed must leave ALLOWED (and docs/architecture.md's list)."""
    seen = {(i.importer, i.target) for i in graph if violation(i)}
    stale = sorted(set(ALLOWED) - seen)
    assert not stale, f"these exceptions no longer occur: delete them from ALLOWED: {stale}"


@pytest.mark.parametrize("importer,target,rule", [
    ("app.dicom.scu", "app.retrievals.runner", "later layer"),
    ("app.index.ingest", "app.cohorts.service", "later layer"),
    ("app.retrievals.runner", "app.cohorts.builder", "later layer"),
    ("app.policy.governor", "app.retrievals.runner", "later layer"),  # the cycle that was: etiquette is a gate
    ("models.engine", "app.db.models", "leaf"),
    ("models.run", "app.training.jobs", "leaf"),
    ("app.config", "app.store", "kernel"),
    ("app.exports.service", "app.training.jobs", "siblings"),
    ("app.dicom.scp", "app.db.models", "database"),
    ("app.dicom.scp", "app.index.sink", "later layer"),
    ("app.jobs.queue", "app.retrievals.service", "kernel"),
    ("app.dicomweb.client", "app.audit", "database"),
])
def test_the_lint_catches(importer: str, target: str, rule: str) -> None:
    """The rules themselves: each of these would fail CI."""
    why = violation(Import(importer, target, ROOT, 1))
    assert why is not None and rule in why, why


@pytest.mark.parametrize("importer,target", [
    ("app.index.ingest", "app.store"), ("app.cohorts.service", "app.labels.engine"),
    ("app.retrievals.runner", "app.policy.governor"), ("app.training.jobs", "models.spec"),
    ("app.cli.server", "app.wiring"), ("app.policy.governor", "app.probe.probe"),
    ("app.probe.service", "app.retrievals.nodes"), ("models.run", "models.spec"),
])
def test_the_lint_allows(importer: str, target: str) -> None:
    assert violation(Import(importer, target, ROOT, 1)) is None


def test_lazy_imports_are_seen(tmp_path: Path) -> None:
    """An import inside a function counts like one at the top."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from app.cohorts.service import x\n    return x\n")
    got = imports_of("app.dicom.m", f, {"app.cohorts.service": f})
    assert [(i.target, i.line) for i in got] == [("app.cohorts.service", 2)]
    assert violation(got[0]) is not None


def test_the_training_spec_imports_only_pydantic() -> None:
    """models/spec.py is what app/ imports of models/: it must not drag torch (or app/) along."""
    tree = ast.parse((ROOT / "models" / "spec.py").read_text(encoding="utf-8"))
    tops = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    tops |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert tops <= {"__future__", "json", "pathlib", "typing", "pydantic"}, tops


def test_app_imports_of_models_are_the_spec_or_from_the_products_and_entry_layers(graph: list[Import]) -> None:
    """Below the products layer nothing imports models/ at all; the spec is the shared contract."""
    low = [i for i in graph if i.target.split(".")[0] == "models" and i.importer.split(".")[0] == "app"
           and i.target != "models.spec" and (layer_of(i.importer) or (0, ""))[0] < LAYER_INDEX["products"]]
    assert not low, low


LAYER_INDEX = {name: i for i, (name, _p, _m) in enumerate(LAYERS)}


def _package(module: str) -> str:
    parts = module.split(".")
    return "models" if parts[0] == "models" else ".".join(parts[:2])


if __name__ == "__main__":  # `python tests/test_architecture.py`: the package graph and what breaks the rules
    modules = all_modules()
    edges: dict[str, set[str]] = {}
    found = [i for name, path in modules.items() for i in imports_of(name, path, modules)]
    for i in found:
        a, b = _package(i.importer), _package(i.target)
        if a != b and not is_kernel(i.target):
            edges.setdefault(a, set()).add(b)
    for a in sorted(edges):
        print(f"{a:16} -> {', '.join(sorted(edges[a]))}")
    print()
    for i in found:
        why = violation(i)
        if why:
            tag = "allowed" if (i.importer, i.target) in ALLOWED else "NEW"
            print(f"[{tag}] {i.path.relative_to(ROOT)}:{i.line}: {i.importer} -> {i.target}: {why}")
