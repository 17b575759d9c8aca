"""Docs come from the code: generated tables current, pyproject matches AppConfig."""

import tomllib

import pytest

from afl_flwr.config import AppConfig
from afl_flwr.reference import DOCS, GENERATORS, render, stale_files


def test_every_generated_block_in_docs_is_current():
    stale = stale_files(DOCS)
    assert not stale, (
        f"{[str(p) for p in stale]} out of date: run python -m afl_flwr.reference "
        "--write"
    )


def test_every_generator_has_a_block_in_the_docs():
    text = "".join(p.read_text() for p in DOCS.glob("*.md"))
    for name in GENERATORS:
        assert f"<!-- generated: {name} -->" in text


def test_a_stale_block_is_detected_and_rewritten():
    # Prepare: a block whose body is wrong
    text = "x\n<!-- generated: run-config -->\n| stale |\n<!-- end: run-config -->\ny\n"

    # Execute
    rendered = render(text)

    # Assert: the stale row is gone, every key of AppConfig is listed
    assert "| stale |" not in rendered
    for key in AppConfig.run_config_fields():
        assert f"| `{key}` |" in rendered
    assert rendered.startswith("x\n") and rendered.endswith("y\n")


def test_unknown_block_names_are_refused():
    with pytest.raises(ValueError, match="unknown generated block"):
        render("<!-- generated: nope -->\n<!-- end: nope -->")


def test_pyproject_lists_every_key_with_the_code_default():
    # Flower's flwr run drops keys pyproject does not declare; every key must be there
    pyproject = tomllib.loads((DOCS.parent / "pyproject.toml").read_text())
    declared = pyproject["tool"]["flwr"]["app"]["config"]
    assert declared == AppConfig().to_run_config()


def test_the_readme_quick_start_is_what_ci_and_make_run():
    repo = DOCS.parent
    readme = (repo / "README.md").read_text()
    makefile = (repo / "Makefile").read_text()
    ci = (repo / ".ci" / "run").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "make run" in quick and "make test" in quick
    # CI calls exactly the README's test command, which is the Makefile's
    assert "\nmake test || exit 1\n" in ci
    assert "`ruff check . && mypy afl_flwr && pytest`" in quick
    test_target = makefile.split("\ntest: setup\n", 1)[1].splitlines()[0].strip()
    assert test_target == "ruff check . && mypy afl_flwr && pytest"


def test_the_readme_is_a_quick_start_and_guide_of_at_most_300_lines():
    readme = (DOCS.parent / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for link in ("docs/configuration.md", "docs/strategy.md", "docs/benchmarks.md"):
        assert f"]({link}" in readme
        assert (DOCS.parent / link).exists()


def test_relative_links_in_the_readme_and_docs_point_to_files():
    import re

    repo = DOCS.parent
    broken = []
    for page in [repo / "README.md", *sorted(DOCS.glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://", "#", "mailto:")):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                broken.append(f"{page.name}: {target}")
    assert not broken


def test_the_readme_strategy_snippet_builds():
    from afl_flwr.strategy import StalenessAwareAsyncStrategy

    readme = (DOCS.parent / "README.md").read_text()
    snippet = readme.split("```python\nStalenessAwareAsyncStrategy(", 1)[1]
    snippet = "StalenessAwareAsyncStrategy(" + snippet.split("```", 1)[0]
    strategy = eval(
        snippet, {"StalenessAwareAsyncStrategy": StalenessAwareAsyncStrategy}
    )
    assert strategy.aggregator.buffer_size == 10


def markdown_tables(text: str) -> list[str]:
    """The markdown tables in ``text``, each as its block of ``|`` lines."""
    tables, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append(line)
        elif block:
            tables.append("\n".join(block))
            block = []
    return tables


def test_the_deployment_pages_tables_are_the_benchmarks_own():
    # Every table of the benchmark's report is in docs/deployment.md as written.
    report = (DOCS.parent / "benchmarks" / "results" / "deployment.md").read_text()
    page = (DOCS / "deployment.md").read_text()
    tables = markdown_tables(report)
    assert len(tables) >= 5
    missing = [t.splitlines()[0] for t in tables if t not in page]
    assert not missing
