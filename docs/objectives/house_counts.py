"""The numbers the objectives issue closed with, for any checkout: modules and lines of src/diffusion, the depth of
its import graph (the longest chain of modules importing modules of the package, a module with none at level 1),
and how many modules write each score's name as a string.

    python docs/objectives/house_counts.py [SRC]      # SRC: a src/diffusion folder (default: this checkout's)
"""

import ast
import re
import sys
from functools import cache
from pathlib import Path

SRC = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "src" / "diffusion"
SCORE_NAMES = ("fid", "kid", "precision", "recall", "is")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def imports(name: str) -> set[str]:
    """The package's modules this module imports (anywhere in it; `from a import b` counts a.b if it is a module)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name}
    return found


@cache
def level(name: str, seen: tuple = ()) -> int:
    deps = [d for d in imports(name) if d not in seen and not MODULES[d].name == "__init__.py"]
    return 1 + max((level(d, (*seen, name)) for d in deps), default=0)


def main() -> None:
    files = [p for p in SRC.rglob("*.py")]
    lines = sum(len(p.read_text().splitlines()) for p in files)
    depth = max(level(n) for n in MODULES if MODULES[n].name != "__init__.py")
    print(f"{SRC}: {len(files)} Python files, {lines:,} lines, import levels {depth}")
    for score in SCORE_NAMES:
        pattern = re.compile(rf"[\"']{score}(_(train|val|test|std))?[\"']")
        where = sorted(str(p.relative_to(SRC)) for p in files if pattern.search(p.read_text()))
        print(f"  score {score!r} written as a string in {len(where)} modules: {', '.join(where)}")


if __name__ == "__main__":
    main()
