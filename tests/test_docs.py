"""The README and docs/ as a user meets them: links and named files that exist, commands that run as written
(each script's --help takes every flag the command gives it), and performance figures that match the benchmark's
JSON."""
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
REPO_PATH = re.compile(r"^(?:(?:src|tests|benchmarks|scripts|docs)/[\w./-]+|[\w-]+\.(?:py|sh|txt))$")


def _read(path):
    with open(path) as f:
        return f.read()


def _slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path):
    return {_slug(line.lstrip("#")) for line in _read(path).splitlines() if line.startswith("#")}


def _commands(text):
    """The shell commands of a document's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.extend(part.strip() for part in line.split("&&"))
    return commands


@pytest.mark.quick
@pytest.mark.parametrize("doc", DOCS, ids=lambda p: os.path.relpath(p, ROOT))
def test_links_and_named_files_exist(doc):
    text = _read(doc)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        path = os.path.normpath(os.path.join(os.path.dirname(doc), file)) if file else doc
        assert os.path.exists(path), f"{os.path.relpath(doc, ROOT)} links to a missing {target}"
        if anchor:
            assert anchor in _anchors(path), f"{os.path.relpath(doc, ROOT)}: no heading for {target}"
    for name in re.findall(r"`([^`\s]+)`", text):
        if REPO_PATH.match(name):
            # a bare file name (`run_train.sh`) is the repository's file of that name, wherever it lies
            found = os.path.exists(os.path.join(ROOT, name)) or "/" not in name and glob.glob(
                os.path.join(ROOT, "**", name), recursive=True)
            assert found, f"{os.path.relpath(doc, ROOT)} names a missing {name}"


def _script_commands():
    """(document, command, script, the flags given to the script) for every `python X.py ...` of the docs."""
    found = []
    for doc in DOCS:
        for command in _commands(_read(doc)):
            words = shlex.split(command)
            if len(words) < 2 or words[0] != "python" or not words[1].endswith(".py"):
                continue
            # flags up to the next script (src/launch.py ... train.py --run_distribute: those are train.py's)
            given = []
            for word in words[2:]:
                if word.endswith(".py"):
                    break
                if word.startswith("--"):
                    given.append(word.split("=", 1)[0])
            found.append((os.path.relpath(doc, ROOT), command, words[1], given))
    return found


def test_every_documented_command_runs_as_written():
    """Each script a command names exists and its --help takes every flag the command gives it; the shell
    scripts and requirement files the commands name exist."""
    helps = {}
    commands = _script_commands()
    assert len(commands) >= 10  # the README's workflow alone has more
    for doc, command, script, given in commands:
        path = os.path.join(ROOT, script)
        assert os.path.isfile(path), f"{doc}: {command}: no {script}"
        if script not in helps:
            shown = subprocess.run([sys.executable, path, "--help"], cwd=ROOT, capture_output=True, text=True,
                                   timeout=300)
            assert shown.returncode == 0, f"{script} --help: {shown.stderr[-2000:]}"
            helps[script] = set(re.findall(r"--[\w-]+", shown.stdout))
        unknown = [flag for flag in given if flag not in helps[script]]
        assert not unknown, f"{doc}: {command}: {script} takes no {unknown}"
    for doc in DOCS:
        for command in _commands(_read(doc)):
            words = shlex.split(command)
            if words[:1] == ["bash"] and words[1].startswith("scripts/"):
                assert os.path.isfile(os.path.join(ROOT, words[1])), f"{doc}: {command}"
            if words[:3] == ["pip", "install", "-r"]:
                assert os.path.isfile(os.path.join(ROOT, words[3])), f"{doc}: {command}"


@pytest.mark.quick
def test_performance_figures_match_the_benchmark_json():
    checked = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "tables.py"), "--check"],
                             capture_output=True, text=True, timeout=300)
    assert checked.returncode == 0, checked.stdout + checked.stderr
