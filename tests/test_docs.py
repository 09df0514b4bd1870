"""The documentation cannot drift: docs/configuration.md is generated from config.py, links
between the pages resolve, the README's module map names every module, and every
``<!-- runnable -->`` marker sits on a fence (tests/test_readme.py runs those blocks)."""

import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from msmoe_jax import config_docs
from support import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


# ---------------------------------------------------------------------------------------------
# Markdown: headings and links


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
    assert model["num_experts"] == ("MoE", "routed experts per MoE layer")  # heading above
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
# Runnable markers (tests/test_readme.py runs the blocks)

MARKER = re.compile(r"^<!--\s*runnable(?::\s*([\w\s-]*))?\s*-->\s*$")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_markers_sit_right_above_a_fence(page):
    lines = page.read_text().splitlines()
    for n, line in enumerate(lines):
        if "runnable" in line and line.startswith("<!--"):
            assert MARKER.match(line), f"{page.name}:{n + 1}: malformed marker {line!r}"
            assert n + 1 < len(lines) and lines[n + 1].startswith("```"), (
                f"{page.name}:{n + 1}: the marker must be on the line before a ``` fence")
