"""The package layout follows the data flow, and the light entry points stay light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
LOWER = ("data", "retrieval", "lm", "softprompts")  # the parts the request path is built from
MIDDLE = ("serving", "training", "evaluation")
TOP = ("cli", "langchain")
TOP_LEVEL_MODULES = {"__init__.py", "atomic.py", "config.py", "errors.py", "names.py"}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def _package_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "ragpt_service":
        return "ragpt_service"
    return parts[1] if parts[0] == "ragpt" and len(parts) > 1 else None


def test_pyproject_installs_every_package_and_no_generic_services_package():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    found = {".".join(p.relative_to(ROOT).parent.parts) for p in (ROOT / "ragpt").rglob("__init__.py")}
    assert set(cfg["packages"]) == found | {"ragpt_service"}
    assert "services" not in cfg["packages"]
    assert cfg["package-dir"] == {"ragpt_service": "services"}


def test_ragpt_top_level_holds_only_the_shared_basics():
    modules = {p.name for p in (ROOT / "ragpt").glob("*.py")}
    assert modules == TOP_LEVEL_MODULES


@pytest.mark.parametrize("package", LOWER + MIDDLE)
def test_dependencies_point_one_way(package):
    """data/retrieval/lm/softprompts never import the layers built on them; the middle layer never
    imports the command line, LangChain or the HTTP app."""
    forbidden = set(MIDDLE + TOP + ("ragpt_service",)) if package in LOWER else set(TOP + ("ragpt_service",))
    for path in (ROOT / "ragpt" / package).rglob("*.py"):
        bad = {m for m in _imports(path) if _package_of(m) in forbidden}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_http_app_is_built_on_the_serving_layer():
    """services/ prepares and finishes requests only through ragpt.serving; besides it, it uses the
    parts serving is made of (models, index, router, registry), never training, evaluation or the CLI."""
    allowed = {"serving", "config", "errors", "names", "softprompts", "retrieval", "lm"}
    for path in (ROOT / "services").glob("*.py"):
        used = {_package_of(m) for m in _imports(path)} - {None, "ragpt_service"}
        assert used <= allowed, f"{path.name} imports from {sorted(used - allowed)}"


def test_import_ragpt_and_help_do_not_load_torch_or_faiss():
    code = ("import sys, ragpt\n"
            "from ragpt.cli.main import app\n"
            "from typer.testing import CliRunner\n"
            "r = CliRunner().invoke(app, ['--help'])\n"
            "assert r.exit_code == 0, r.output\n"
            "heavy = ('torch', 'faiss', 'transformers', 'sentence_transformers')\n"
            "heavy = sorted(m for m in heavy if m in sys.modules)\n"
            "print(','.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
