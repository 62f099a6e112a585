"""The layering of the code (pyproject.toml, [tool.importlinter]) holds, and
covers every module: a new module must be given its place."""

import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

import watcher
import watcher.catalog

ROOT = Path(__file__).resolve().parent.parent


def contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def layer_modules(contract: dict) -> set[str]:
    return {name.strip() for layer in contract["layers"] for name in layer.replace(":", "|").split("|")}


def test_no_module_imports_from_a_layer_above_its_own():
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_every_module_has_its_place_in_the_layers():
    main, catalog = contracts()
    placed = layer_modules(main)
    for info in pkgutil.walk_packages(watcher.__path__, "watcher."):
        assert any(info.name == p or info.name.startswith(p + ".") for p in placed), \
            f"{info.name} is in no layer of pyproject.toml's first import contract"
    inside = layer_modules(catalog)
    for info in pkgutil.iter_modules(watcher.catalog.__path__, "watcher.catalog."):
        assert info.name in inside, f"{info.name} is in no layer of the catalog's import contract"
