"""Set-up files stay in step: environment.yml's pip list mirrors pyproject.toml's dependencies."""

from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    assert any(d.startswith("python=3.11") for d in conda) and "pip" in conda
    listed = [p for p in pip if not p.startswith("-e")]
    assert sorted(listed) == sorted(project["dependencies"])
    editable = [p for p in pip if p.startswith("-e")]
    extras = set(project["optional-dependencies"])
    assert editable == [f"-e .[{','.join(sorted(extras))}]"], editable


def test_torch_is_not_pinned():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        if dep.split(">")[0].split("=")[0].split("<")[0] in ("torch", "torchvision"):
            assert "==" not in dep and "<" not in dep, dep


def test_ci_runs_make_test():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
