"""benchmark_v2's default row: it is the app's defaults, with equal work, marked."""

import importlib.util
import json
from pathlib import Path

import pytest

from afl_flwr.config import AppConfig

REPO = Path(__file__).resolve().parents[1]


def _bench():
    path = REPO / "benchmarks" / "benchmark_v2.py"
    spec = importlib.util.spec_from_file_location("benchmark_v2_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_default_row_runs_the_apps_defaults_with_equal_work():
    bench = _bench()
    size = bench.SIZES["quick"]
    jobs = bench.make_jobs(
        size, {"clock": "virtual"}, Path("/tmp/unused"), methods=["Default", "FedBuff"]
    )
    default = next(j for j in jobs if j["method"] == "Default")["overrides"]
    fedbuff = next(j for j in jobs if j["method"] == "FedBuff")["overrides"]
    cfg, app = AppConfig.from_run_config(default), AppConfig()
    # Every rule setting is the app's own default ...
    for key in (
        "aggregation",
        "buffer_size",
        "server_lr",
        "staleness_fn",
        "staleness_a",
        "staleness_b",
        "max_staleness",
        "lr_delay_alpha",
        "mixing_rate",
        "rule_settings",
    ):
        assert getattr(cfg, key) == getattr(app, key), key
    # ... and the client work equals the other methods'
    k = AppConfig.from_run_config(fedbuff).effective_buffer_size
    assert cfg.num_server_rounds * cfg.effective_buffer_size == (
        fedbuff["num-server-rounds"] * k
    )
    assert cfg.eval_every * cfg.effective_buffer_size == fedbuff["eval-every"] * k


def test_an_unbuffered_candidate_gets_one_version_per_update():
    # FedAsync merges every update: the same client work is versions x K
    # updates of the buffered rules, one version each.
    bench = _bench()
    size = bench.SIZES["quick"]
    updates = size.versions * int(size.base["buffer-size"])
    jobs = bench.make_jobs(
        size,
        {"clock": "virtual"},
        Path("/tmp/unused"),
        methods=["candidate: fedasync a=0.5", "FedAsync"],
    )
    candidate = next(j for j in jobs if j["method"].startswith("candidate"))
    reference = next(j for j in jobs if j["method"] == "FedAsync")
    cfg = AppConfig.from_run_config(candidate["overrides"])
    assert cfg.aggregation == "fedasync"
    assert cfg.num_server_rounds == updates
    assert cfg.num_server_rounds == reference["overrides"]["num-server-rounds"]
    assert cfg.eval_every == reference["overrides"]["eval-every"]


def test_the_json_marks_the_default_method(tmp_path):
    bench = _bench()
    size = bench.SIZES["quick"]
    records = [
        {
            "alpha": 0.5,
            "scenario": bench.STRAGGLERS,
            "method": method,
            "seed": seed,
            "evals": [[0, 0.0, 0.1], [10, 5.0, acc]],
            "rate": 1.0,
            "rate_bound": 2.0,
            "mean_staleness": 0.0,
            "dropped": 0,
            "wall_s": 1.0,
        }
        for method, acc in (("FedAvg", 0.8), ("Default", 0.7))
        for seed in (0, 1)
    ]
    bench.report(records, "quick", size, tmp_path, wall=None)
    data = json.loads((tmp_path / "benchmark_v2.json").read_text())
    assert data["default_method"] == "Default"
    assert data["default_method"] in next(iter(data["cells"].values()))["methods"]
    assert data["default_rule"]["aggregation"] == AppConfig().aggregation


def test_the_default_rows_cache_follows_the_apps_defaults(monkeypatch):
    # Prepare: the jobs' cache files under the app's defaults
    bench = _bench()
    size = bench.SIZES["quick"]
    methods = ("Default", "FedBuff")

    def caches():
        jobs = bench.make_jobs(size, {}, Path("/tmp/unused"), methods=methods)
        return {m: [j["cache"] for j in jobs if j["method"] == m] for m in methods}

    before = caches()

    # Execute: a changed app default (the Default row's overrides stay the same)
    resolved = AppConfig.to_run_config
    monkeypatch.setattr(
        AppConfig,
        "to_run_config",
        lambda self: {**resolved(self), "fedbuff-server-momentum": 0.5},
    )
    after = caches()

    # Assert: every Default run is keyed anew (a cached run is not reused);
    # methods that spell out their settings keep their cache
    assert not set(before["Default"]) & set(after["Default"])
    assert before["FedBuff"] == after["FedBuff"]


def _tuning_records(bench, times_and_accs):
    """Records of every tuning cell and seed: method -> (sim time, accuracy)."""
    return [
        {
            "alpha": alpha,
            "scenario": scenario,
            "method": method,
            "seed": seed,
            "evals": [[0, 0.0, 0.1], [10, t, acc]],
            "rate": 1.0,
            "rate_bound": 2.0,
            "mean_staleness": 0.0,
            "dropped": 0,
            "wall_s": 1.0,
        }
        for alpha in (0.1, 0.5)
        for scenario in bench.SCENARIOS
        for seed in bench.TUNE_SEEDS
        for method, (t, acc) in times_and_accs.items()
    ]


def test_a_later_tuning_round_ranks_only_its_candidates_by_the_fixed_rule(
    tmp_path, monkeypatch
):
    # Prepare: FedAvg reaches its target (0.72) at t = 10; "A" is 1 pp below
    # FedAvg at 5x, "B" 5 pp below at 10x, so the rule picks A (both eligible)
    bench = _bench()
    a, b = "fedbuff K=C/2 a=1", "ca2fl K=C/2 eta=0.3"
    asked = []

    def fake_run_all(jobs, workers):
        asked.extend(sorted({j["method"] for j in jobs}))
        return _tuning_records(
            bench,
            {
                "FedAvg": (10.0, 0.80),
                f"candidate: {a}": (2.0, 0.79),
                f"candidate: {b}": (1.0, 0.75),
            },
        )

    monkeypatch.setattr(bench, "run_all", fake_run_all)
    out = tmp_path / "runs"

    # Execute
    text = bench.tune_default({}, out, workers=1, names=[a, b])

    # Assert: only the named candidates ran, each row as the rule computes it
    assert asked == sorted(["FedAvg", f"candidate: {a}", f"candidate: {b}"])
    assert f"| {a} | -1.0 pp / 5.00x" in text
    assert f"| {b} | -5.0 pp / 10.00x" in text
    assert f"Chosen: **{a}**" in text
    assert f"--candidates '{a}' '{b}'" in text
    [report] = tmp_path.glob("benchmark_v2_default_tuning_*.json")
    data = json.loads(report.read_text())
    assert data["chosen"] == a and sorted(data["candidates"]) == sorted([a, b])


def test_an_unknown_tuning_candidate_is_refused_before_any_run(monkeypatch):
    bench = _bench()
    monkeypatch.setattr(bench, "run_all", lambda *a: pytest.fail("ran"))
    with pytest.raises(ValueError, match="Unknown candidate 'nope'; known: fedbuff"):
        bench.tune_default({}, Path("/tmp/unused"), workers=1, names=["nope"])
