"""The README and docs/ stay short, generated where they can be, and point at what exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ops import config_doc

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
DOCS = sorted((REPO_ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS, REPO_ROOT / "docker" / "README.md"]

README_MAX_LINES = 300
# Repository folders whose paths, written in backticks, must name a file or folder here.
CHECKED_PREFIXES = ("pipeline_lib/", "tasks/", "flows/", "ops/", "bench/", "tests/", "docker/")
# Paths the docs name that exist only once something has run or been set up: they are
# made at run time or by hand and are git-ignored, so a clean checkout lacks them.
CREATED_AT_RUN_TIME = {
    "docker/.env",  # copied from docker/.env.example by whoever runs the stack
    "docker/local/wheels/",  # the docker smoke hard-links /opt/wheels there
    "docker/local/ca-certificates.crt",  # an optional CA bundle, put there by hand
}

FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
# [text](target) and ![alt](target), the target up to whitespace or ')'.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose(page: Path) -> str:
    """The page without its fenced code blocks (shell sessions, diagrams)."""
    return FENCE.sub("", page.read_text())


def relative_links(page: Path) -> list[str]:
    """Targets of the page's markdown links that point into the repository."""
    targets = LINK.findall(prose(page))
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def repo_paths(page: Path) -> list[str]:
    """Repository paths the page writes in backticks, e.g. `pipeline_lib/grpo.py`."""
    paths = []
    for code in INLINE_CODE.findall(prose(page)):
        for word in code.split():
            word = word.split(":")[0].rstrip(".,;)")  # `flows/pipeline.py:pipeline`
            if word.startswith(CHECKED_PREFIXES):
                paths.append(word)
    return paths


def exists(path: str) -> bool:
    """A path exists in the working tree; a placeholder (`<strategy>`) or a glob
    (`docker/Dockerfile.*`) counts when its fixed part does."""
    fixed = re.split(r"[<*\[]", path)[0]
    if fixed != path:
        return any(REPO_ROOT.glob(fixed + "*"))
    return (REPO_ROOT / path).exists()


def test_configuration_doc_is_generated_from_the_params_models():
    """docs/configuration.md is exactly what `python -m ops.config_doc` writes (`make docs`)."""
    assert (REPO_ROOT / "docs" / "configuration.md").read_text() == config_doc.render()


def test_configuration_doc_names_every_section_and_key():
    text = config_doc.render()
    for section in config_doc.SECTION_ORDER:
        assert f"## `{section}`" in text
    for key in (
        "prepare.synthetic.train_prompts",
        "bootstrap.sft.target_accuracy",
        "train.allocation_rules",
        "compare.seeds",
        "tracking.uri",
        "seed",
    ):
        assert f"| `{key}` |" in text, key


def test_readme_is_at_most_300_lines():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/"


def anchors(page: Path) -> set[str]:
    """The heading anchors GitHub makes of a page: lower case, punctuation dropped,
    spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", prose(page), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_every_relative_link_points_at_an_existing_file(page):
    """A link into the repository names a file that exists and, with `#...`, a heading of it."""
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        linked = page.parent / path if path else page
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(target)
    assert not broken, f"{page.name} has broken links: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_every_repository_path_in_backticks_exists(page):
    """A path the docs name (`pipeline_lib/...`, `ops/...`, `tests/...`) is in the working
    tree, so a move that forgets the docs fails here."""
    missing = sorted(
        {p for p in repo_paths(page) if p not in CREATED_AT_RUN_TIME and not exists(p)}
    )
    assert not missing, f"{page.name} names paths that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_every_python_m_command_names_a_module_here(page):
    """`python -m ops.results`, `python -m bench.trl`, ... (code blocks included) name a
    module of this repository: no command still points at a moved script."""
    command = r"python -m ((?:ops|bench|flows|tasks|pipeline_lib)(?:\.\w+)+)"
    modules = re.findall(command, page.read_text())
    missing = sorted(
        {m for m in modules if not (REPO_ROOT / (m.replace(".", "/") + ".py")).exists()}
    )
    assert not missing, f"{page.name} runs modules that do not exist: {missing}"


def test_the_link_and_path_finders_read_markdown_as_written(tmp_path):
    page = tmp_path / "sample.md"
    page.write_text(
        "See [a](docs/pipeline.md#x), ![i](docs/images/p.png), [w](https://x.org), [h](#top).\n"
        "Code `flows/pipeline.py:pipeline` and `python -m ops.results`, `tests/gpu/`.\n"
        "```bash\nls `tasks/not_checked.py`\n```\n"
    )
    assert relative_links(page) == ["docs/pipeline.md#x", "docs/images/p.png", "#top"]
    assert repo_paths(page) == ["flows/pipeline.py", "tests/gpu/"]
