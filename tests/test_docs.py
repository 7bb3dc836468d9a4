"""Every fenced ``python`` block in README.md and docs/**/*.md runs, so the examples cannot rot.

A block whose fence info string is exactly ``python`` is executed, each in a fresh namespace, in a
temporary working directory, on the CPU. Anything else (``python no-run``, ``bash``, ``toml``, ...)
is left alone: use ``python no-run`` for code that needs a GPU, a shell, a checkpoint or the network.

Blocks may register mixers (docs/mixer_protocol.md does); the registry is restored after each
block so a documentation example never leaks into other tests.
"""

from __future__ import annotations

import os
import re
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,}|~{3,})(?P<info>[^\n`]*)$")


def markdown_files() -> list[Path]:
    files = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
    return [f for f in files if f.is_file()]


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """``(first line number, source)`` of each block fenced as exactly ``python``."""
    blocks: list[tuple[int, str]] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        ticks, info, indent = m["ticks"], m["info"].strip(), len(m["indent"])
        start = i + 1
        i += 1
        body: list[str] = []
        while i < len(lines):
            close = FENCE.match(lines[i])
            if close and close["ticks"][0] == ticks[0] and len(close["ticks"]) >= len(ticks) and not close["info"].strip():
                break
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        else:
            raise AssertionError(f"{path}:{start}: code fence {ticks}{info} is never closed")
        i += 1
        if info == "python":
            blocks.append((start + 1, "\n".join(body) + "\n"))
    return blocks


def fenced_blocks(path: Path, language: str) -> list[tuple[int, str]]:
    """Like :func:`python_blocks` for another fence info string (``toml``, ``bash``)."""
    text = path.read_text(encoding="utf-8")
    pattern = re.compile(r"^```" + re.escape(language) + r"[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
    return [(text[: m.start()].count("\n") + 2, m.group(1)) for m in pattern.finditer(text)]


def collect() -> list:
    params = []
    for path in markdown_files():
        rel = path.relative_to(ROOT).as_posix()
        for line, source in python_blocks(path):
            params.append(pytest.param(path, line, source, id=f"{rel}:{line}"))
    return params


BLOCKS = collect()


def test_docs_have_examples() -> None:
    """The README and the mixer pages must carry runnable examples (guards against a broken extractor)."""
    files = {p.values[0].relative_to(ROOT).as_posix() for p in BLOCKS}
    for required in ("README.md", "docs/mixer_protocol.md", "docs/mixers/attention.md", "docs/mixers/sliding_window.md"):
        assert required in files, f"no runnable ```python block found in {required}"


def test_extractor_skips_no_run(tmp_path: Path) -> None:
    md = tmp_path / "x.md"
    md.write_text("```python\na = 1\n```\n\n```python no-run\nraise SystemExit\n```\n\n````python\nb = '```'\n````\n")
    blocks = python_blocks(md)
    assert [src for _, src in blocks] == ["a = 1\n", "b = '```'\n"]


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from mnemotorch.layers import registry

    saved = dict(registry._MIXERS)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    # Examples are tiny: one thread is fastest, and avoids OpenMP oversubscription (100x slowdowns)
    # when other test processes share the CPU.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        yield tmp_path
    finally:
        registry._MIXERS.clear()
        registry._MIXERS.update(saved)
        torch.set_num_threads(threads)


@pytest.mark.parametrize("path,line,source", BLOCKS)
def test_python_block_runs(path: Path, line: int, source: str, isolated: Path) -> None:
    # Line numbers in tracebacks point into the Markdown file.
    code = compile("\n" * (line - 1) + source, str(path), "exec")
    # A real (temporary) module, as for a script: dataclasses and pickling look classes up in sys.modules.
    module = types.ModuleType("__docs_example__")
    module.__file__ = str(path)
    env_before = dict(os.environ)
    sys.modules[module.__name__] = module
    try:
        exec(code, module.__dict__)
    finally:
        del sys.modules[module.__name__]
        os.environ.clear()
        os.environ.update(env_before)


def test_toml_examples_are_valid_configs() -> None:
    """TOML shown in the training docs must load as a TrainConfig (keys and types checked)."""
    import tomllib

    from mnemotorch.train import config_from_dict

    blocks = fenced_blocks(ROOT / "docs" / "training.md", "toml")
    assert blocks, "docs/training.md has no ```toml example"
    for line, source in blocks:
        try:
            config_from_dict(tomllib.loads(source))
        except Exception as err:  # noqa: BLE001 - re-raised with the location
            raise AssertionError(f"docs/training.md:{line}: {err}") from err


def test_referenced_configs_exist() -> None:
    """Every configs/*.toml or scripts/*.sh named in the docs is in the repository."""
    for path in markdown_files():
        for ref in sorted(set(re.findall(r"\b((?:configs|scripts)/[\w.-]+\.(?:toml|yaml|yml|sh))\b", path.read_text()))):
            assert (ROOT / ref).is_file(), f"{path.relative_to(ROOT)} mentions {ref}, which does not exist"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[|\]\(.*?\)", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def test_relative_links_resolve() -> None:
    """Links between the docs point at files that exist, and at headings that exist."""
    anchors: dict[Path, set[str]] = {}
    for path in markdown_files():
        text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
        anchors[path] = {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}
    for path in markdown_files():
        text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # external
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            assert dest.exists(), f"{path.relative_to(ROOT)}: broken link {target}"
            if anchor and dest.suffix == ".md":
                assert anchor in anchors.get(dest, set()), f"{path.relative_to(ROOT)}: no heading for #{anchor} in {dest.name}"
