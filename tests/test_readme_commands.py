"""Every command the README and the ``docs/`` pages show refers only to files, tools, flags and config
keys that exist, and the environment they need is activated before the first one that needs it, on
each page on its own: a reader who lands on a docs page from a link has not read the README's
activation line, so a page whose commands need ``.venv`` says ``. .venv/bin/activate`` itself.

Commands are the lines of ```bash blocks (continuations joined) and inline code spans that start
with ``python``, ``deepspeed``, ``bash`` or ``.venv/bin/``. Placeholders in capitals or brackets
(``OUTPUT_DIR``, ``[--tag ...]``) and paths the quickstart creates (``outputs/``) are not files.
"""

import glob
import os
import re
import shlex

import pytest

from megakto.config.schema import _leaf_keys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))


def _read(page: str) -> str:
    with open(os.path.join(REPO, page), encoding="utf-8") as f:
        return f.read()


TEXT = {page: _read(page) for page in PAGES}

STARTS = ("python ", "deepspeed ", "bash ", ".venv/bin/", ". .venv/bin/activate")
NEEDS_VENV = ("python ", "deepspeed ")  # bash scripts install or activate the environment themselves
KEYS = {key for key, _, _ in _leaf_keys()}
# Made by the commands themselves (the quickstart's model, data and runs) or by the user.
GENERATED = ("outputs/", "runs/", "data/", "/models/", "bench.json", "pairs.jsonl", "kto.jsonl", "hostfile")


def page_commands(page: str) -> list[tuple[int, str]]:
    """(position in the page, command) in reading order."""
    text_of_page = TEXT[page]
    found = []
    for block in re.finditer(r"```bash\n(.*?)```", text_of_page, re.S):
        text = block.group(1).replace("\\\n", " ")
        for i, line in enumerate(text.splitlines()):
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                found.append((block.start() + i, line))  # the block's lines in order
    for span in re.finditer(r"`([^`\n]+(?:\n[^`\n]+)?)`", text_of_page):
        text = " ".join(span.group(1).split())
        if text.startswith(STARTS) and not text_of_page[max(0, span.start() - 3):span.start()].endswith("``"):
            found.append((span.start(), text))
    return sorted(found)


PAGE_COMMANDS = {page: page_commands(page) for page in PAGES}
COMMANDS = [(page, pos, c) for page in PAGES for pos, c in PAGE_COMMANDS[page]]


def _words(command: str) -> list[str]:
    command = command.replace("[", " ").replace("]", " ")  # optional parts: [--tag step-00000100]
    return [w for w in shlex.split(command) if w]


def _is_placeholder(word: str) -> bool:
    return bool(re.fullmatch(r"[A-Z_]+(/[A-Za-z_./-]*)?", word)) or word.startswith(GENERATED)


def _script(words: list[str]) -> str | None:
    for w in words:
        if w.endswith((".py", ".sh")) and not w.startswith("-"):
            return w
    return None


def test_the_pages_show_commands():
    assert "docs/config.md" in PAGES and "docs/parallel.md" in PAGES
    assert len(COMMANDS) >= 15
    assert any(c.startswith("deepspeed --num_gpus 2 launch/train_kto.py") for _, c in PAGE_COMMANDS["README.md"])
    assert "python -m pytest -q tests" in [c for _, c in PAGE_COMMANDS["README.md"]]  # the one .ci/run runs


@pytest.mark.parametrize("page,command", [(page, c) for page, _, c in COMMANDS])
def test_files_scripts_and_flags_exist(page, command):
    words = _words(command)
    if words[:2] == [".", ".venv/bin/activate"]:
        return  # made by tools/install.sh (launch/demo.sh and .ci/run call it)
    for w in words:
        if "=" in w:
            continue  # a config override (test_config_overrides_are_real_keys) or --flag=value
        if "/" in w and not w.startswith(("-", ".venv/", "/")) and not _is_placeholder(w):
            assert os.path.exists(os.path.join(REPO, w)), f"{command}: {w} does not exist"
    script = _script(words)
    if script and script.endswith(".py") and script.startswith(("tools/", "launch/")):
        with open(os.path.join(REPO, script), encoding="utf-8") as f:
            source = f.read()
        # Flags the tool's own private helpers define (tools/bench.py's model shape: tools/_bench_workload.py).
        for helper in re.findall(r"^from (_[a-z]\w*) import", source, re.M):
            with open(os.path.join(REPO, os.path.dirname(script), f"{helper}.py"), encoding="utf-8") as f:
                source += f.read()
        after = words[words.index(script) + 1:]  # flags before the script are the launcher's
        for flag in (w.split("=", 1)[0] for w in after if w.startswith("--")):
            assert f'"{flag}"' in source, f"{command}: {script} has no {flag} flag"


@pytest.mark.parametrize("page,command", [(page, c) for page, _, c in COMMANDS if "launch/train_kto.py" in c])
def test_config_overrides_are_real_keys(page, command):
    overrides = [w for w in _words(command) if "=" in w and not w.startswith("-")]
    for override in overrides:
        key = override.split("=", 1)[0]
        assert key in KEYS, f"{command}: {key} is not a config key"


@pytest.mark.parametrize("page", PAGES)
def test_the_environment_is_activated_before_it_is_needed(page):
    """On each page, the first command that needs .venv's python or deepspeed comes after
    ``. .venv/bin/activate`` on that page (or calls it through .venv/bin/)."""
    activated = None
    for pos, command in PAGE_COMMANDS[page]:
        if command.startswith(". .venv/bin/activate"):
            activated = activated or pos
        elif command.startswith(NEEDS_VENV):
            assert activated is not None and activated < pos, (
                f"{page}: {command!r} needs the environment, but no '. .venv/bin/activate' comes before it")


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    for heading in re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", text, flags=re.S), re.M):
        found.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return found


@pytest.mark.parametrize("page", PAGES)
def test_links_between_pages_resolve(page):
    """Every relative link names a file that exists and, with a #fragment, a heading of that file."""
    for target in re.findall(r"\]\(([^)\s]+)\)", TEXT[page]):
        if re.match(r"[a-z]+:", target):
            continue  # a URL
        path, _, fragment = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        assert os.path.exists(os.path.join(REPO, linked)), f"{page}: link {target} names no file"
        if fragment and linked.endswith(".md"):
            assert fragment in _anchors(_read(linked)), f"{page}: link {target}: {linked} has no such heading"
