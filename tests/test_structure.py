"""The project's shape: the CLIs stand on the library, nothing imports them, and the library's
layers import downward only (DESIGN.md: CLIs and bench/ -> engine/ -> lora/, data/ -> model/ ->
kernels/ -> common/)."""
import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLIS = {"train", "predict", "merge", "tour"}
# Each package of the library, by floor: a file may import its own package and lower floors only.
FLOORS = {"common": 0, "kernels": 1, "model": 2, "lora": 3, "data": 3, "engine": 4}


def imported_modules(path: Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            mods.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module.split(".")[0])
    return mods


def test_no_file_imports_a_cli():
    # Tests may drive the CLIs in-process (train.main, predict.main); nothing else may import
    # them: what two programs share belongs to the library (engine/, model/, lora/, data/).
    files = [p for p in REPO.rglob("*.py") if not {".venv", "tests", ".git"} & set(p.relative_to(REPO).parts)]
    assert len(files) > 20
    offenders = [f"{p.relative_to(REPO)} imports {m}" for p in files for m in imported_modules(p) & CLIS]
    assert not offenders, offenders


def test_the_library_imports_downward_only():
    # model/, lora/, data/, kernels/ never import engine/ (nor a CLI); common/ imports nothing of
    # ours; lora/ and data/ stand side by side, neither on the other. Imports inside functions count.
    offenders = []
    for pkg, floor in FLOORS.items():
        files = sorted((REPO / pkg).glob("*.py"))
        assert files, pkg
        for p in files:
            for m in imported_modules(p):
                if m in CLIS or m == "bench" or (m in FLOORS and m != pkg and FLOORS[m] >= floor):
                    offenders.append(f"{p.relative_to(REPO)} imports {m}")
    assert not offenders, offenders


def test_the_layering_check_sees_an_upward_import(tmp_path):
    # The check above must be able to fail: an upward import, inside a function, is found.
    p = tmp_path / "x.py"
    p.write_text("def f():\n    from engine.build import build_model\n    import train\n")
    assert {"engine", "train"} <= imported_modules(p)


def test_nothing_edits_sys_path():
    # Scripts run from the repository root (python train.py, python -m bench.NAME): no path hacks.
    edit = re.compile(r"sys\.path\s*(\.(insert|append|extend)\(|\[[^]]*\]\s*=|=)")
    files = [p for p in REPO.rglob("*.py") if not {".venv", ".git"} & set(p.relative_to(REPO).parts)]
    offenders = [str(p.relative_to(REPO)) for p in files if edit.search(p.read_text(encoding="utf-8"))]
    assert not offenders, offenders
