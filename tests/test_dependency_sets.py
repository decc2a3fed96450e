"""Each install set (requirements/*.txt, compiled from pyproject.toml's extras) provides what its code imports.

The serving set (the Docker image) must run the app, gunicorn and `chestxray predict`/`promote`; the pipeline
set every stage; the dev set (make setup, CI) everything in src/, tests/, bench/ and research/. The code's
imports are read with `ast` (module-level and inside functions), following the project's own imports from
each set's entry points; each third-party module is mapped to the distribution that installed it in this
venv and looked up in the set's lock file. Fast (no imports of the libraries themselves), and strict: a
new import of a library outside a set fails here, not in the image. Pipeline-only code that lives in a
module the app also imports is listed in PIPELINE_ONLY_IN_SERVED_MODULES, with the reason.
"""
from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from functools import cache
from pathlib import Path

import pytest

from helpers import ROOT

SRC = ROOT / "src"
LOCKS = ROOT / "requirements"

# (module, imported library): imported only inside functions that serving never calls.
PIPELINE_ONLY_IN_SERVED_MODULES = {
    ("chestxray.model.onnx_export", "onnx"): "export_onnx(): the export stage writes model.onnx",
    ("chestxray.model.ood", "sklearn"): "OodDetector.fit(): the reference stage fits the detector",
    ("chestxray.evaluation.calibration", "sklearn"): "choose_low_confidence(): the evaluate stage sets the threshold",
}

# Commands a set runs as programs rather than imports: (distribution that installs it, why).
COMMANDS = {
    "serving": [("gunicorn", "the image's CMD, `make app`")],
    "pipeline": [("dvc", "`dvc repro`"), ("tf2onnx", "keras' ONNX export calls it")],
    "dev": [("dvc", "tests run `dvc repro`"), ("gunicorn", "tests serve the app under gunicorn"),
            ("schemathesis", "the hardening tests"), ("tf2onnx", "the export tests"), ("uv", "`make lock`")],
}


def _modules_under(folder: Path, package: str) -> dict[str, Path]:
    found = {}
    for path in folder.rglob("*.py"):
        parts = list(path.relative_to(folder).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join([package, *parts]) if package else ".".join(parts)] = path
    return found


PROJECT = _modules_under(SRC / "chestxray", "chestxray")
# Plain scripts and the test helpers that import each other by bare name (tests/ and bench/ are on sys.path).
LOCAL = {**_modules_under(ROOT / "tests", ""), **{p.stem: p for p in (ROOT / "bench").glob("*.py")}}


def _imports(path: Path) -> list[str]:
    """Absolute dotted names imported anywhere in the file (for `from a import b`: a.b as well as a)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module != "__future__":
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def _third_party(files: list[Path], skip_pipeline_only: bool) -> dict[str, set[str]]:
    """{top-level module or google.x: the files importing it}, following project and local imports."""
    seen, todo, needed = set(), list(files), {}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        module = next((m for m, p in PROJECT.items() if p == path), path.name)
        for name in _imports(path):
            top = name.split(".")[0]
            if name in PROJECT:
                todo.append(PROJECT[name])
            elif top == "chestxray":
                continue  # `from chestxray.x import some_function`: the module x is listed too
            elif name in LOCAL:
                todo.append(LOCAL[name])
            elif top in sys.stdlib_module_names or top in LOCAL:
                continue
            elif skip_pipeline_only and (module, top) in PIPELINE_ONLY_IN_SERVED_MODULES:
                continue
            else:
                # The google namespace is shared by many distributions: keep google.genai, not google.
                key = ".".join(name.split(".")[:2]) if top == "google" else top
                if key != "google":
                    needed.setdefault(key, set()).add(str(path.relative_to(ROOT)))
    return needed


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@cache
def _providers() -> dict[str, list[str]]:
    """{top-level module: the installed distributions that ship it} for this venv."""
    return md.packages_distributions()


def _distributions_of(module: str) -> set[str]:
    """The installed distributions that provide `module` (google.x: those shipping google/x/, not all of google)."""
    top, _, sub = module.partition(".")
    providers = _providers().get(top, [])
    if sub:
        prefix = f"{top}/{sub}/"
        providers = [d for d in providers if any(str(f).startswith(prefix) for f in md.distribution(d).files or ())]
    assert providers, f"{module} is not installed in this venv (make setup installs requirements/dev.txt)"
    return {_normal(d) for d in providers}


def _locked(name: str) -> dict[str, str]:
    """{distribution: version} pinned in requirements/NAME.txt."""
    pins = {}
    for line in (LOCKS / f"{name}.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^]]*\])?==([^\s;]+)", line)
        if match:
            pins[_normal(match.group(1))] = match.group(3)
    return pins


def _entry_files(name: str) -> list[Path]:
    if name == "serving":  # the app (app.py, gunicorn.conf.py), and the `chestxray` command's predict/promote
        return [ROOT / "app.py", ROOT / "gunicorn.conf.py", PROJECT["chestxray.cli"],
                *(p for m, p in PROJECT.items() if m.startswith("chestxray.serving"))]
    if name == "pipeline":  # every stage, main.py (the cli's stage commands import the same modules)
        return [ROOT / "main.py", PROJECT["chestxray.cli"],
                *(p for m, p in PROJECT.items() if m.startswith("chestxray.pipeline"))]
    return [ROOT / "app.py", ROOT / "main.py", ROOT / "gunicorn.conf.py", *PROJECT.values(),
            *(ROOT / "tests").glob("*.py"), *(ROOT / "bench").glob("*.py"), *(ROOT / "research").glob("*.py")]


@pytest.mark.parametrize("name", ["serving", "pipeline", "dev"])
def test_each_lock_provides_every_library_its_code_imports(name):
    locked = _locked(name)
    missing = []
    for module, where in sorted(_third_party(_entry_files(name), skip_pipeline_only=name == "serving").items()):
        dists = _distributions_of(module)
        if not dists & locked.keys():  # mlflow: mlflow, mlflow-skinny and mlflow-tracing all ship it
            missing.append(f"{module} (from {' or '.join(sorted(dists))}; imported by {', '.join(sorted(where)[:3])})")
    for dist, why in COMMANDS[name]:
        if _normal(dist) not in locked:
            missing.append(f"{dist} ({why})")
    assert not missing, (f"requirements/{name}.txt lacks: " + "; ".join(missing)
                         + " -- add it to the right extra in pyproject.toml, then `make lock`")


def test_the_serving_lock_leaves_the_training_tools_out():
    serving = _locked("serving")
    for heavy in ("dvc", "mlflow", "scikit-learn", "pandas", "pyarrow", "matplotlib", "tf2onnx", "onnx", "pytest",
                  "playwright", "schemathesis"):
        assert heavy not in serving, f"{heavy} is in requirements/serving.txt (the image): it belongs elsewhere"


def test_the_locks_agree_with_the_dev_lock_and_this_venv():
    """One version of each distribution across the locks; the venv tests run in is the dev lock."""
    dev = _locked("dev")
    top = [line.split() for line in (ROOT / "requirements.txt").read_text().splitlines() if line[:1] not in ("", "#")]
    assert top == [["-r", "requirements/dev.txt"]], "requirements.txt should be the dev lock"
    for name in ("serving", "pipeline", "gpu", "serving-gpu"):
        for dist, version in _locked(name).items():
            if dist in dev:
                assert version == dev[dist], f"{dist}: {version} in requirements/{name}.txt, {dev[dist]} in dev.txt"
    for name in ("gpu", "serving-gpu"):  # the CUDA build of the very TensorFlow the CPU locks pin
        gpu = _locked(name)
        assert "tensorflow-cpu" not in gpu and gpu["tensorflow"] == dev["tensorflow-cpu"], name
    if not Path(sys.prefix, "pyvenv.cfg").is_file() or "tensorflow" in {_normal(d.metadata["Name"]) for d in
                                                                        md.distributions()}:
        return  # not a venv of ours, or the GPU lock's venv: nothing more to compare
    installed = {_normal(d.metadata["Name"]): d.version for d in md.distributions()}
    stale = [f"{d}=={v} (venv has {installed[d]})" for d, v in dev.items() if d in installed and installed[d] != v]
    assert not stale, "the venv differs from requirements/dev.txt (rerun `make setup`): " + ", ".join(stale)
