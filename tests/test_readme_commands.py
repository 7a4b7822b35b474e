"""Every command the README shows refers only to files, tools, flags and config keys that exist, and
the environment they need is activated before the first one that needs it.

Commands are the lines of ```bash blocks (continuations joined) and inline code spans that start
with ``python``, ``deepspeed``, ``bash`` or ``.venv/bin/``. Placeholders in capitals or brackets
(``OUTPUT_DIR``, ``[--tag ...]``) and paths the quickstart creates (``outputs/``) are not files.
"""

import os
import re
import shlex

import pytest

from megakto.config.schema import _leaf_keys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(REPO, "README.md"), encoding="utf-8") as _f:
    README = _f.read()

STARTS = ("python ", "deepspeed ", "bash ", ".venv/bin/", ". .venv/bin/activate")
NEEDS_VENV = ("python ", "deepspeed ")  # bash scripts install or activate the environment themselves
KEYS = {key for key, _, _ in _leaf_keys()}
# Made by the commands themselves (the quickstart's model, data and runs) or by the user.
GENERATED = ("outputs/", "runs/", "data/", "/models/", "bench.json", "pairs.jsonl", "kto.jsonl", "hostfile")


def readme_commands() -> list[tuple[int, str]]:
    """(position in the README, command) in reading order."""
    found = []
    for block in re.finditer(r"```bash\n(.*?)```", README, re.S):
        text = block.group(1).replace("\\\n", " ")
        for i, line in enumerate(text.splitlines()):
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                found.append((block.start() + i, line))  # the block's lines in order
    for span in re.finditer(r"`([^`\n]+(?:\n[^`\n]+)?)`", README):
        text = " ".join(span.group(1).split())
        if text.startswith(STARTS) and not README[max(0, span.start() - 3):span.start()].endswith("``"):
            found.append((span.start(), text))
    return sorted(found)


COMMANDS = readme_commands()


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


def test_the_readme_shows_commands():
    assert len(COMMANDS) >= 15
    assert any(c.startswith("deepspeed --num_gpus 2 launch/train_kto.py") for _, c in COMMANDS)


@pytest.mark.parametrize("command", [c for _, c in COMMANDS])
def test_files_scripts_and_flags_exist(command):
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
        after = words[words.index(script) + 1:]  # flags before the script are the launcher's
        for flag in (w.split("=", 1)[0] for w in after if w.startswith("--")):
            assert f'"{flag}"' in source, f"{command}: {script} has no {flag} flag"


@pytest.mark.parametrize("command", [c for _, c in COMMANDS if "launch/train_kto.py" in c])
def test_config_overrides_are_real_keys(command):
    overrides = [w for w in _words(command) if "=" in w and not w.startswith("-")]
    for override in overrides:
        key = override.split("=", 1)[0]
        assert key in KEYS, f"{command}: {key} is not a config key"


def test_the_environment_is_activated_before_it_is_needed():
    """The first command that needs .venv's python or deepspeed comes after ``. .venv/bin/activate``
    (or calls it through .venv/bin/)."""
    activated = None
    for pos, command in COMMANDS:
        if command.startswith(". .venv/bin/activate"):
            activated = activated or pos
        elif command.startswith(NEEDS_VENV):
            assert activated is not None and activated < pos, (
                f"README: {command!r} needs the environment, but no '. .venv/bin/activate' comes before it")
