"""Reference tables generated from the code: run-config keys, rule settings.

The tables in ``docs/`` between ``<!-- generated: NAME -->`` and
``<!-- end: NAME -->`` markers are written by this module from the declarations
themselves (:class:`~afl_flwr.config.AppConfig`'s fields, each aggregation
rule's ``Settings``, the staleness functions' signatures), so they cannot drift;
``tests/test_reference_docs.py`` fails when a file is out of date::

    python -m afl_flwr.reference --write     # regenerate docs/*.md blocks
    python -m afl_flwr.reference --check     # exit 1 if a block is stale
"""

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from afl_flwr.aggregators import AGGREGATORS, rule_class, setting_keyword
from afl_flwr.config import AppConfig, rule_setting_keys
from afl_flwr.settings import doc_of, kebab
from afl_flwr.staleness import STALENESS_FUNCTIONS, parameter_defaults

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCK = re.compile(
    r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end: (?P=name) -->)",
    re.DOTALL,
)


def toml_value(value: Any) -> str:
    """A default as it is written in a run config (``"async"``, ``true``, ``0.001``)."""
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if value is None:
        return "unset"
    return f"`{value!r}`"


def run_config_table() -> str:
    """Every :class:`AppConfig` key: default and meaning."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    defaults = AppConfig()
    for key, item in AppConfig.run_config_fields().items():
        rows.append(
            f"| `{key}` | {toml_value(getattr(defaults, item.name))} | {doc_of(item)} |"
        )
    return "\n".join(rows) + "\n"


def rule_settings_table() -> str:
    """Every rule's settings: strategy keyword, run-config key, default, meaning."""
    rows = [
        "| rule | strategy keyword | run-config key | default | meaning |",
        "|---|---|---|---|---|",
    ]
    shared_keys = set(AppConfig.run_config_fields())
    rule_keys = set(rule_setting_keys())
    for rule in AGGREGATORS:
        for item in rule_class(rule).setting_fields():
            keyword = setting_keyword(rule, item.name)
            key = kebab(keyword)
            assert key in shared_keys or key in rule_keys, key
            rows.append(
                f"| `{rule}` | `{keyword}` | `{key}` | {toml_value(item.default)} "
                f"| {doc_of(item)} |"
            )
    return "\n".join(rows) + "\n"


def staleness_table() -> str:
    """Each staleness function, its formula and its own default parameters."""
    rows = ["| `staleness-fn` | s(tau) | parameters (defaults) |", "|---|---|---|"]
    for name, fn in sorted(STALENESS_FUNCTIONS.items()):
        formula = (fn.__doc__ or "").strip().splitlines()[0]
        params = ", ".join(
            f"`{k} = {v:g}`" for k, v in parameter_defaults(name).items()
        )
        rows.append(f"| `{name}` | {formula} | {params or 'none'} |")
    overrides = [
        f"`{rule}`: {fn} " + ", ".join(f"`{k} = {v:g}`" for k, v in values.items())
        for rule in AGGREGATORS
        for fn, values in getattr(
            rule_class(rule).Settings, "staleness_defaults", {}
        ).items()
    ]
    if overrides:
        rows += [
            "",
            "Rules' own defaults, where they differ: " + "; ".join(overrides) + ".",
        ]
    return "\n".join(rows) + "\n"


GENERATORS: dict[str, Callable[[], str]] = {
    "run-config": run_config_table,
    "rule-settings": rule_settings_table,
    "staleness-functions": staleness_table,
}


def render(text: str) -> str:
    """``text`` with every generated block replaced by its current content."""

    def fill(match: re.Match[str]) -> str:
        name = match.group("name")
        if name not in GENERATORS:
            raise ValueError(
                f"unknown generated block {name!r}; known: {sorted(GENERATORS)}"
            )
        return f"{match.group(1)}{GENERATORS[name]()}{match.group(4)}"

    return BLOCK.sub(fill, text)


def stale_files(directory: Path = DOCS) -> list[Path]:
    """Files under ``directory`` whose generated blocks are out of date."""
    return [
        p
        for p in sorted(directory.glob("*.md"))
        if render(p.read_text()) != p.read_text()
    ]


def main(argv: list[str] | None = None) -> int:
    """``--write`` regenerates the blocks in ``docs/*.md``; ``--check`` reports."""
    parser = argparse.ArgumentParser(prog="python -m afl_flwr.reference")
    parser.add_argument("--write", action="store_true", help="rewrite stale blocks")
    parser.add_argument("--check", action="store_true", help="exit 1 if any is stale")
    args = parser.parse_args(argv)
    stale = stale_files()
    if args.write:
        for path in stale:
            path.write_text(render(path.read_text()))
            print(f"updated {path}")
        return 0
    for path in stale:
        print(f"out of date: {path} (run python -m afl_flwr.reference --write)")
    return 1 if stale and args.check else 0


__all__ = ["GENERATORS", "main", "render", "stale_files"]

if __name__ == "__main__":
    sys.exit(main())
