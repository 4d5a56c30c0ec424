"""The documentation runs: every command block of README.md and docs/*.md marked runnable (opened with
three backticks and `bash test`) runs, in order, in one temporary folder (README.md first, then docs/*.md
by name, so the pages may use what the quick start made), at the size it is written at, except the one
stated substitution below; then the command the quick start's train.py printed at its end runs as
printed. Every relative link of these pages points at an existing file (and heading)."""
import glob
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

RUNNABLE = "```bash test"
# The README's quick start, as the test runs it: its only change (1000 steps take minutes on 2 cores).
QUICK_START_SUBSTITUTION = ("--max-steps 1000", "--max-steps 20")
# Pages other branches write; a link to one of them may point nowhere until they are merged.
PENDING_PAGES = {"docs/speed.md", "docs/meanflow.md", "docs/backbones.md", "docs/latent_spaces.md",
                 "docs/latent_statistics.md"}
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HINT = re.compile(r"sample it with `(python sample\.py [^`]+)`")


def pages() -> list:
    """README.md, then docs/*.md by name (repository-relative paths)."""
    return ["README.md"] + sorted(os.path.relpath(path, REPO) for path in glob.glob(os.path.join(REPO, "docs", "*.md")))


def fenced_blocks(page: str) -> list:
    """(info string, first line number, text) of every fenced block of a page."""
    blocks, info, start, lines = [], None, 0, []
    with open(os.path.join(REPO, page)) as handle:
        for number, line in enumerate(handle, 1):
            line = line.rstrip("\n")
            if info is None and line.startswith("```"):
                info, start, lines = line[3:], number, []
            elif info is not None and line == "```":
                blocks.append((info, start, "\n".join(lines)))
                info = None
            elif info is not None:
                lines.append(line)
    assert info is None, f"{page}: the block opened at line {start} is never closed"
    return blocks


def runnable_blocks() -> list:
    """(page, line, command text) of every `bash test` block, in the order they run."""
    return [(page, start, text) for page in pages() for info, start, text in fenced_blocks(page)
            if "```" + info == RUNNABLE]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: str) -> set:
    """The anchors of a page's headings (outside fenced blocks)."""
    found, fenced = set(), False
    with open(os.path.join(REPO, page)) as handle:
        for line in handle:
            fenced = fenced != line.startswith("```")
            if not fenced and line.startswith("#"):
                found.add(slug(line.lstrip("#")))
    return found


def test_every_relative_link_points_at_an_existing_file_and_heading():
    broken = []
    for page in pages():
        with open(os.path.join(REPO, page)) as handle:
            text = re.sub(r"```.*?```", "", handle.read(), flags=re.S)  # links inside code are code
        for target in LINK.findall(text):
            if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
                continue
            path, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if resolved in PENDING_PAGES and not os.path.exists(os.path.join(REPO, resolved)):
                continue
            if not os.path.exists(os.path.join(REPO, resolved)):
                broken.append(f"{page}: {target} (no file {resolved})")
            elif anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
                broken.append(f"{page}: {target} (no heading #{anchor} in {resolved})")
    assert not broken, "\n".join(broken)


def test_the_runnable_blocks_are_found_and_the_quick_start_is_one_of_them():
    blocks = runnable_blocks()
    readme = [text for page, _, text in blocks if page == "README.md"]
    assert len(readme) == 1 and readme[0].startswith("python export_digits.py data/digits")
    assert readme[0].count(QUICK_START_SUBSTITUTION[0]) == 1  # the substitution the test states applies
    assert {page for page, _, _ in blocks} >= {"README.md", "docs/training.md", "docs/sampling.md",
                                               "docs/evaluation.md", "docs/install.md"}


def run_block(text: str, folder: str, environment: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-euo", "pipefail", "-c", text], cwd=folder, env=environment, text=True,
                          capture_output=True, timeout=900)


@pytest.mark.slow
def test_every_runnable_block_runs_and_so_does_the_hint_train_py_prints(tmp_path):
    bin_folder, folder = tmp_path / "bin", tmp_path / "work"
    os.makedirs(bin_folder)
    os.makedirs(folder)
    os.symlink(sys.executable, bin_folder / "python")  # `python` is this interpreter
    for entry in glob.glob(os.path.join(REPO, "*.py")) + [os.path.join(REPO, "configs")]:
        os.symlink(entry, folder / os.path.basename(entry))  # the scripts as in a clone, run from its root
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    environment.update(PATH=f"{bin_folder}{os.pathsep}{environment.get('PATH', '')}", PYTHONPATH=REPO,
                       OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    hint = None
    for page, line, text in runnable_blocks():
        if page == "README.md":
            text = text.replace(*QUICK_START_SUBSTITUTION)
        result = run_block(text, str(folder), environment)
        assert result.returncode == 0, f"{page}:{line} exit {result.returncode}\n{result.stdout[-2000:]}\n" \
                                       f"{result.stderr[-3000:]}"
        if page == "README.md":
            hint = HINT.search(result.stdout + result.stderr)
    assert hint is not None, "train.py printed no sampling hint"
    # the hint as printed: a 10-class model, so it names some of its classes (ImageNet's would fail)
    assert hint.group(1) == "python sample.py ODE --ckpt results/000-custom-d4-w64-p2-Linear-velocity-None " \
                            "--class-labels 0,1,2,3,4,5,6,7"
    for name in ("sample.png", "sample.labels.txt"):  # a page's block may have written them
        if os.path.exists(folder / name):
            os.remove(folder / name)
    result = run_block(hint.group(1), str(folder), environment)
    assert result.returncode == 0, f"the hint exit {result.returncode}\n{result.stderr[-3000:]}"
    assert (folder / "sample.labels.txt").read_text().split() == [str(label) for label in range(8)]
    assert os.path.getsize(folder / "sample.png") > 0
