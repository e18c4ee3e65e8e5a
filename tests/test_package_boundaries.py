"""What the packages may take from each other: no package imports another's private names, `mil`
never imports clip or vlm, and the helpers two packages share have one implementation."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("wsi", "mil", "clip", "vlm")


def _imports(pkg: str):
    for path in sorted((ROOT / pkg).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                yield path, node.module, [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                for a in node.names:
                    yield path, a.name, []


def test_no_package_imports_another_packages_private_names():
    bad = []
    for pkg in PACKAGES:
        for path, module, names in _imports(pkg):
            other = module.split(".")[0]
            if other in PACKAGES and other != pkg:
                private = [p for p in module.split(".") + names if p.startswith("_") and not p.startswith("__")]
                if private:
                    bad.append(f"{path.relative_to(ROOT)}: {module} {private}")
    assert not bad, bad


def test_mil_never_imports_clip_or_vlm():
    bad = [f"{p.relative_to(ROOT)}: {m}" for p, m, _ in _imports("mil") if m.split(".")[0] in ("clip", "vlm")]
    assert not bad, bad


def _sources():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), path.read_text()


def test_one_auc_and_one_l2_normalisation():
    """AUC is computed by wsi.metrics only; numpy vectors are L2-normalised by sklearn's `normalize`
    (torch tensors inside models keep F.normalize), not by copies of the division."""
    auc = [p for p, src in _sources() if "roc_auc_score" in src]
    assert auc == ["wsi/metrics.py"], auc
    copies = [p for p, src in _sources() if "np.maximum(np.linalg.norm(" in src]
    assert not copies, copies
