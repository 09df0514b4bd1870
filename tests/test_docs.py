"""The documentation cannot drift: docs/configuration.md is generated from config.py, links
between the pages resolve, the README's module map names every module, and the command blocks
marked runnable are well formed (tests/test_readme.py runs them)."""

import re
import subprocess
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest

from support import ROOT

from msmoe_jax import config_docs

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


# ---------------------------------------------------------------------------------------------
# Markdown helpers (tests/test_readme.py uses these too)


@dataclass
class Block:
    """A fenced code block: where it starts (the fence's line, 1-based), its info string, its
    text, and the ``<!-- runnable[: words] -->`` marker on the line before, if any."""

    page: Path
    line: int
    info: str
    text: str
    marker: set | None  # None: not runnable; else the words after "runnable:"

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


MARKER = re.compile(r"^<!--\s*runnable(?::\s*([\w\s-]*))?\s*-->\s*$")


def fenced_blocks(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(.*)$", lines[i])
        if not m:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and lines[i] != "```":
            body.append(lines[i])
            i += 1
        marker = None
        prev = lines[start - 1] if start else ""
        mm = MARKER.match(prev)
        if mm:
            marker = set((mm.group(1) or "").split())
        blocks.append(Block(page, start + 1, m.group(1).strip(), "\n".join(body) + "\n", marker))
        i += 1
    return blocks


def runnable_blocks() -> list[tuple[Block, Block | None]]:
    """Every marked block with the fenced block right after it (its expected output, for the
    ``output`` and ``errors`` variants), if only blank lines separate them."""
    out = []
    for page in PAGES:
        blocks = fenced_blocks(page)
        lines = page.read_text().splitlines()
        for k, b in enumerate(blocks):
            if b.marker is None:
                continue
            nxt = None
            if k + 1 < len(blocks):
                end = b.line + b.text.count("\n")  # the closing fence, 0-based
                between = lines[end + 1:blocks[k + 1].line - 1]
                if all(not s.strip() for s in between):
                    nxt = blocks[k + 1]
            out.append((b, nxt))
    return out


def commands(text: str) -> list[str]:
    """The commands of a block: backslash continuations joined; blank and comment lines out."""
    out, current = [], ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        line = current + line
        current = ""
        if line.strip() and not line.lstrip().startswith("#"):
            out.append(line.strip())
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code:
            continue
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def links(page: Path) -> list[tuple[int, str]]:
    """(line, target) of every markdown link outside code blocks and inline code."""
    out, in_code = [], False
    for n, line in enumerate(page.read_text().splitlines(), 1):
        if line.startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            continue
        line = re.sub(r"`[^`]*`", "", line)
        out += [(n, t) for t in re.findall(r"\]\(([^)\s]+)\)", line)]
    return out


# ---------------------------------------------------------------------------------------------
# The generated config reference


def test_configuration_md_is_generated_from_config_py():
    current = config_docs.DOC_PATH.read_text() if config_docs.DOC_PATH.is_file() else ""
    assert current == config_docs.render(), (
        f"docs/configuration.md is out of date with msmoe_jax/config.py; regenerate it with "
        f"`{config_docs.REGENERATE}` and commit the result")


def test_every_config_field_has_a_row():
    import dataclasses

    from msmoe_jax.config import Config

    text = config_docs.render()
    for section in dataclasses.fields(Config):
        value = getattr(Config(), section.name)
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                assert f"| `{section.name}.{f.name}` |" in text
        else:
            assert f"| `{section.name}` |" in text


def test_field_comments_are_read_from_the_source():
    from msmoe_jax.config import ModelConfig, ParallelConfig

    model = config_docs.field_comments(ModelConfig)
    assert model["d_ff"] == (None, "width of the dense FFN layers")  # same line
    assert model["num_experts"] == ("MoE", "")  # a heading above, no description
    assert model["shared_expert_gate"][1].startswith("Scale the shared experts' output")  # above
    parallel = config_docs.field_comments(ParallelConfig)
    assert parallel["expert_data"] == ("Expert view", "replicas of the experts")
    assert parallel["data"][0] == "Attention view"
    hints = typing.get_type_hints(ParallelConfig)
    assert config_docs.type_name(hints["buffer_factor"]) == "float | 'worst_case'"
    assert config_docs.type_name(hints["devices"]) == "int | null"


def test_the_generator_imports_no_jax():
    code = ("import sys, msmoe_jax.config_docs as d; d.render(); "
            "bad = [m for m in sys.modules if m == 'jax' or m.startswith('jax.')]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------------------------
# Links and the module map


def test_links_between_pages_resolve():
    broken = []
    for page in PAGES:
        for line, target in links(page):
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}:{line}: {target}"
            if not dest.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{where} (no heading #{anchor})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_readme_module_map_names_every_module():
    readme = (ROOT / "README.md").read_text()
    arch = readme[readme.index("## Architecture"):]
    arch = arch[:arch.index("\n## ", 1)]
    package = ROOT / "msmoe_jax"
    names = [p.name for p in package.glob("*.py") if p.name != "__init__.py"]
    names += [p.name + "/" for p in package.iterdir() if p.is_dir() and
              (p / "__init__.py").exists()]
    missing = [n for n in sorted(names) if n not in arch]
    assert not missing, f"README.md's Architecture section does not name {missing}"


# ---------------------------------------------------------------------------------------------
# Runnable blocks are well formed (tests/test_readme.py runs them)

VARIANTS = {"output", "errors", "h100"}


def test_runnable_blocks_are_well_formed():
    blocks = runnable_blocks()
    assert blocks, "no <!-- runnable --> blocks found"
    problems = []
    for b, nxt in blocks:
        where = b.id
        if b.info != "bash":
            problems.append(f"{where}: a runnable block must be ```bash")
        if b.marker - VARIANTS:
            problems.append(f"{where}: unknown variant(s) {sorted(b.marker - VARIANTS)}")
        for cmd in commands(b.text):
            if re.search(r"\bpip install\b|\bpytest\b|msmoe_jax\.convert\b", cmd):
                problems.append(f"{where}: not runnable here: {cmd}")
            trains = re.search(r"\btrain\.py\b", cmd) and not re.search(
                r"--help|--print-config", cmd)
            if trains and "errors" not in b.marker:
                if "run.dir=$RUN_DIR/" not in cmd:
                    problems.append(f"{where}: a training command must write under "
                                    f"--set run.dir=$RUN_DIR/...: {cmd}")
                steps = re.search(r"train\.steps=(\d+)", cmd)
                if not steps or int(steps.group(1)) > 10:
                    problems.append(f"{where}: set a small train.steps (<= 10): {cmd}")
        if b.marker & {"output", "errors"} and nxt is None:
            problems.append(f"{where}: expects the output block right after it")
        if "errors" in b.marker and nxt is not None:
            expected = [s for s in nxt.text.splitlines() if s.strip()]
            if len(expected) != len(commands(b.text)):
                problems.append(f"{where}: {len(commands(b.text))} commands but "
                                f"{len(expected)} error lines")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_markers_sit_right_above_a_fence(page):
    lines = page.read_text().splitlines()
    for n, line in enumerate(lines):
        if "runnable" in line and line.startswith("<!--"):
            assert MARKER.match(line), f"{page.name}:{n + 1}: malformed marker {line!r}"
            assert n + 1 < len(lines) and lines[n + 1].startswith("```"), (
                f"{page.name}:{n + 1}: the marker must be on the line before a ``` fence")
