"""The wheel carries every package and the shipped recipes, so recipes are found by name there."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_holds_every_package_and_the_recipes(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--quiet", "--wheel-dir", str(tmp_path), str(REPO)], check=True,
                   capture_output=True)
    (wheel,) = tmp_path.glob("infinitrain-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {path.parent.relative_to(REPO).as_posix()
                for path in (REPO / "infinitrain").rglob("__init__.py")}
    missing = sorted(p for p in packages if f"{p}/__init__.py" not in names)
    assert not missing, f"add these to [tool.setuptools] packages in pyproject.toml: {missing}"
    recipes = {f"infinitrain/recipes/{path.name}" for path in (REPO / "recipes").glob("*.yaml")}
    assert recipes and recipes <= names
