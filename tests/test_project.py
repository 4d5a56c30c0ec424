"""Project-wide promises a new user meets first: requirements.txt lists exactly what the code imports,
every script refuses abbreviated flags, and git ignores what the README's commands create."""
import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

# Requirements that no module imports, and why they are required all the same.
NOT_IMPORTED = {"accelerate": "diffusers loads the VAE with it (without it: a 5-line warning at every load)"}
SCRIPTS = ["train.py", "sample.py", "sample_ddp.py", "extract_features.py", "evaluate.py", "export_digits.py",
           "make_reference.py"]


def normalized(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): torch_fidelity == torch-fidelity."""
    return re.sub(r"[-_.]+", "-", name).lower()


def required_distributions() -> set:
    names = set()
    with open(os.path.join(REPO, "requirements.txt")) as handle:
        for line in handle:
            line = line.split("#", 1)[0].strip()
            if line:
                names.add(normalized(re.split(r"[<>=!~\[;\s]", line, maxsplit=1)[0]))
    return names


def python_files() -> list:
    """Every .py file of the repository (not hidden folders, caches or virtual environments)."""
    found = []
    for folder, subfolders, names in os.walk(REPO):
        subfolders[:] = [name for name in subfolders if not name.startswith((".", "__pycache__"))
                         and not os.path.exists(os.path.join(folder, name, "pyvenv.cfg"))]
        found += [os.path.join(folder, name) for name in names if name.endswith(".py")]
    return found


def imported_top_level_names(paths: list) -> dict:
    """Top-level module name -> the files importing it (absolute imports anywhere in a file, lazy ones too)."""
    imports = {}
    for path in paths:
        with open(path) as handle:
            tree = ast.parse(handle.read(), filename=path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                imports.setdefault(name.split(".")[0], set()).add(os.path.relpath(path, REPO))
    return imports


def test_requirements_are_what_the_code_imports():
    paths = python_files()
    local = {os.path.splitext(os.path.basename(path))[0] for path in paths}
    local |= {part for path in paths for part in os.path.relpath(os.path.dirname(path), REPO).split(os.sep)}  # packages
    third_party = {name: files for name, files in imported_top_level_names(paths).items()
                   if name not in sys.stdlib_module_names and name not in local}
    providers = importlib.metadata.packages_distributions()
    unknown = sorted(name for name in third_party if name not in providers)
    assert not unknown, f"imported, but no installed distribution provides: {unknown}"
    imported = {normalized(dist): name for name in third_party for dist in providers[name]}
    required = required_distributions()
    missing = {dist: sorted(third_party[name]) for dist, name in imported.items() if dist not in required}
    assert not missing, f"imported but not in requirements.txt: {missing}"
    unused = required - set(imported) - set(NOT_IMPORTED)
    assert not unused, f"in requirements.txt but imported nowhere: {sorted(unused)}"
    assert set(NOT_IMPORTED) <= required


@pytest.mark.parametrize("script, argv, abbreviation", [
    ("evaluate", ["ref.npz", "--inc", "w.pth"], "--inc"),
    ("evaluate", ["ref.npz", "--metric", "fid"], "--metric"),
    ("sample", ["ODE", "--num-samp", "5"], "--num-samp"),
    ("sample_ddp", ["ODE", "--per-proc", "5"], "--per-proc"),
    ("train", ["--data-path", "d", "--max-step", "5"], "--max-step"),
    ("extract_features", ["--data-path", "d", "--features-path", "f", "--block", "4"], "--block"),
])
def test_every_script_refuses_abbreviated_flags(script, argv, abbreviation, capsys):
    module = __import__(script)
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    assert exit_info.value.code == 2
    assert f"unrecognized arguments: {abbreviation}" in capsys.readouterr().err


def test_git_ignores_what_the_readmes_commands_create(tmp_path):
    if shutil.which("git") is None or not os.path.isdir(os.path.join(REPO, ".git")) and \
            not os.path.isfile(os.path.join(REPO, ".git")):
        pytest.skip("not a git checkout")
    created = ["results/000-custom-d4-w64-p2-Linear-velocity-None/checkpoints/0001000.pt",
               "results/000-custom-d4-w64-p2-Linear-velocity-None/latest.txt",
               "samples/custom-d4-w64-p2-0001000-abcdef12-8px.npz", "samples/x/000000.png",
               "pretrained_models/SiT-XL-2-256x256.pt", "data/digits/class00/0000.png", "sample.png",
               "sample.labels.txt", "wandb/offline-run-1/files", "features/mean.npy", "metrics.json", "out/grid.png",
               "VIRTUAL_imagenet256_labeled.npz", "digits.png", "digits.labels.txt"]
    result = subprocess.run(["git", "check-ignore", "--no-index", "-v", *created], cwd=REPO, capture_output=True,
                            text=True)
    ignored = {line.split("\t")[-1] for line in result.stdout.splitlines()}
    assert sorted(set(created) - ignored) == []
    kept = subprocess.run(["git", "check-ignore", "--no-index", "tests/fixtures/parity.pt", "README.md",
                           "docs/digits_grid.png"], cwd=REPO, capture_output=True, text=True)
    assert kept.stdout == ""
