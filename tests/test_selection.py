"""Tests for client selection: permutation passes, idle-only picks, seeding."""

from collections import Counter

import pytest

from afl_flwr.selection import (
    SELECTIONS,
    NodeSelector,
    WithoutReplacement,
    WithReplacement,
    make_selector,
)

# Non-contiguous node ids, as Flower assigns them.
NODES = [101, 205, 333, 412, 578, 690, 777, 881]
SEEDS = [0, 1, 7, 42, 123]
# Chi-square critical value, 9 degrees of freedom, p = 0.001.
CHI2_CRIT_DF9_P001 = 27.877


def _draw(selector: NodeSelector, count: int, idle: list[int] | None = None) -> list:
    """``count`` selections with the given nodes idle (all by default)."""
    idle = NODES if idle is None else idle
    return [selector.select(NODES, idle) for _ in range(count)]


# --- common to every registered selector --------------------------------------


@pytest.mark.parametrize("name", sorted(SELECTIONS))
def test_no_idle_node_returns_none(name: str) -> None:
    # Prepare
    selector = make_selector(name, 0)

    # Execute
    choice = selector.select(NODES, [])

    # Assert
    assert choice is None


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", sorted(SELECTIONS))
def test_only_idle_nodes_are_returned(name: str, seed: int) -> None:
    # Prepare
    selector = make_selector(name, seed)
    idle = [205, 578, 881]

    # Execute
    choices = _draw(selector, 60, idle)

    # Assert
    assert set(choices) == set(idle)


@pytest.mark.parametrize("name", sorted(SELECTIONS))
def test_same_seed_gives_same_sequence(name: str) -> None:
    # Prepare
    first, second = make_selector(name, 3), make_selector(name, 3)

    # Execute
    sequence_a, sequence_b = _draw(first, 50), _draw(second, 50)

    # Assert
    assert sequence_a == sequence_b


@pytest.mark.parametrize("name", sorted(SELECTIONS))
def test_different_seeds_give_different_sequences(name: str) -> None:
    # Prepare
    first, second = make_selector(name, 3), make_selector(name, 4)

    # Execute
    sequence_a, sequence_b = _draw(first, 50), _draw(second, 50)

    # Assert
    assert sequence_a != sequence_b


@pytest.mark.parametrize("name", sorted(SELECTIONS))
def test_make_selector_builds_registered_class(name: str) -> None:
    # Prepare / Execute
    selector = make_selector(name, 0)

    # Assert
    assert type(selector) is SELECTIONS[name]


def test_registry_names() -> None:
    # Prepare / Execute / Assert
    expected = {
        "with-replacement": WithReplacement,
        "without-replacement": WithoutReplacement,
    }
    assert expected == SELECTIONS


def test_make_selector_unknown_name_lists_allowed() -> None:
    # Prepare
    name = "round-robin"

    # Execute
    with pytest.raises(ValueError) as excinfo:
        make_selector(name, 0)

    # Assert
    message = str(excinfo.value)
    assert name in message
    for allowed in SELECTIONS:
        assert allowed in message


# --- WithoutReplacement -------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_without_replacement_passes_are_permutations(seed: int) -> None:
    # Prepare
    selector = WithoutReplacement(seed)
    n = len(NODES)

    # Execute
    choices = _draw(selector, 3 * n)

    # Assert: every node once before any repeats, pass after pass.
    for start in range(0, 3 * n, n):
        assert sorted(choices[start : start + n]) == sorted(NODES)


def test_without_replacement_order_is_random() -> None:
    # Prepare
    selector = WithoutReplacement(0)
    n = len(NODES)

    # Execute
    passes = [tuple(_draw(selector, n)) for _ in range(5)]

    # Assert: not the caller's order, and not the same order every pass.
    assert len(set(passes)) > 1
    assert any(list(p) != NODES for p in passes)


@pytest.mark.parametrize("seed", SEEDS)
def test_without_replacement_skips_permanently_busy_node(seed: int) -> None:
    # Prepare
    busy = 412
    idle = [node for node in NODES if node != busy]
    selector = WithoutReplacement(seed)

    # Execute
    choices = _draw(selector, 3 * len(idle), idle)

    # Assert: never blocks, never returns the busy node, each idle node once
    # per pass.
    assert None not in choices
    assert busy not in choices
    for start in range(0, len(choices), len(idle)):
        assert sorted(choices[start : start + len(idle)]) == sorted(idle)


@pytest.mark.parametrize("seed", SEEDS)
def test_without_replacement_with_nodes_busy_until_pass_ends(seed: int) -> None:
    # Prepare: a picked node stays busy (still training) for the whole pass.
    selector = WithoutReplacement(seed)
    busy: set[int] = set()
    choices = []

    # Execute
    for _ in NODES:
        idle = [node for node in NODES if node not in busy]
        choice = selector.select(NODES, idle)
        choices.append(choice)
        busy.add(choice)
    exhausted = selector.select(NODES, [])

    # Assert
    assert sorted(choices) == sorted(NODES)
    assert exhausted is None


@pytest.mark.parametrize("seed", SEEDS)
def test_without_replacement_node_busy_early_is_served_later_in_pass(
    seed: int,
) -> None:
    # Prepare: find the pass order, then replay with its first node busy.
    n = len(NODES)
    order = _draw(WithoutReplacement(seed), n)
    selector = WithoutReplacement(seed)
    late = order[0]

    # Execute: the first pick happens while `late` is busy.
    first = selector.select(NODES, [node for node in NODES if node != late])
    rest = _draw(selector, n - 1)

    # Assert: `late` is still owed its turn in this pass.
    assert first == order[1]
    assert sorted([first, *rest]) == sorted(NODES)


def test_without_replacement_drops_departed_nodes() -> None:
    # Prepare
    selector = WithoutReplacement(5)
    first = selector.select(NODES, NODES)
    departed = next(node for node in NODES if node != first)
    remaining = [node for node in NODES if node != departed]

    # Execute
    choices = [selector.select(remaining, remaining) for _ in range(20)]

    # Assert
    assert departed not in choices
    assert None not in choices


def test_without_replacement_frequencies_are_exactly_uniform() -> None:
    # Prepare
    selector = WithoutReplacement(9)
    passes = 25

    # Execute
    counts = Counter(_draw(selector, passes * len(NODES)))

    # Assert
    assert counts == dict.fromkeys(NODES, passes)


# --- WithReplacement ----------------------------------------------------------


def test_with_replacement_is_roughly_uniform() -> None:
    # Prepare
    nodes = list(range(10))
    selector = WithReplacement(2024)
    draws = 10_000
    expected = draws / len(nodes)

    # Execute
    counts = Counter(selector.select(nodes, nodes) for _ in range(draws))

    # Assert
    assert set(counts) == set(nodes)
    chi2 = sum((counts[node] - expected) ** 2 / expected for node in nodes)
    assert chi2 < CHI2_CRIT_DF9_P001


def test_with_replacement_repeats_before_covering_all() -> None:
    # Prepare: unlike a permutation pass, independent draws repeat early.
    selector = WithReplacement(0)
    n = len(NODES)

    # Execute
    passes = [_draw(selector, n) for _ in range(10)]

    # Assert
    assert any(len(set(p)) < n for p in passes)
