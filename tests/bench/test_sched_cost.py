"""The replay's cost model: its features, the non-negative fit, its JSON."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest

from ember.bench.sched_cost import CostModel, IterationSample, features
from ember.engine.nnls import nonnegative_lstsq
from ember.errors import InvalidRequestError

TRUE = CostModel((0.012, 3e-4, 0.08, 6e-4, 0.02), swap_bytes_per_s=4e9, kv_bytes_per_token=46080)


def random_batches(n: int, seed: int = 0) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Batches like an engine's: decodes at various contexts, prefill chunks, mixes."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        decodes = rng.choice([0, 1, 4, 16, 32])
        prefills = rng.choice([0, 0, 1, 2]) if decodes else rng.choice([1, 2])
        q = [1] * decodes + [rng.randint(2, 2048) for _ in range(prefills)]
        c = [rng.randint(8, 2048) for _ in range(decodes)] + [
            rng.choice([0, 0, 512]) for _ in range(prefills)
        ]
        out.append((tuple(q), tuple(c)))
    return out


def samples_of(model: CostModel, n: int, noise: float, seed: int = 0) -> list[IterationSample]:
    rng = random.Random(seed + 1)
    return [
        IterationSample(q, c, model.iteration_s(q, c) * (1 + rng.uniform(-noise, noise)))
        for q, c in random_batches(n, seed)
    ]


def test_features_split_prefill_pairs_from_decode_reads() -> None:
    # a prefill chunk of 4 after 2 cached tokens, two decodes at contexts 9 and 19
    assert features([4, 1, 1], [2, 9, 19]) == (1.0, 6.0, 4 * 6 / 1e6, 3.0, 30 / 1e3)


def test_fit_recovers_known_coefficients() -> None:
    fitted = CostModel.fit(samples_of(TRUE, 300, noise=0.0), swap_bytes_per_s=1.0, kv_bytes_per_token=1)
    assert fitted.coef == pytest.approx(TRUE.coef, rel=1e-4)


def test_fit_with_noise_stays_close_and_scores_held_out_iterations() -> None:
    fitted = CostModel.fit(samples_of(TRUE, 400, noise=0.05), swap_bytes_per_s=1.0, kv_bytes_per_token=1)
    assert fitted.coef == pytest.approx(TRUE.coef, rel=0.15)
    err = fitted.errors(samples_of(TRUE, 100, noise=0.05, seed=7))
    assert err.samples == 100 and err.median <= err.p90 <= 0.1


def test_a_plain_fit_keeps_the_total_of_noisy_iterations() -> None:
    rng = random.Random(5)
    noisy = [  # mostly on time, one in ten three times slower: a slow tail
        IterationSample(s.query_lens, s.context_lens, s.seconds * (3.0 if rng.random() < 0.1 else 1.0))
        for s in samples_of(TRUE, 300, noise=0.0)
    ]
    total = sum(s.seconds for s in noisy)

    def predicted(model: CostModel) -> float:
        return sum(model.iteration_s(s.query_lens, s.context_lens) for s in noisy)

    plain = CostModel.fit(noisy, swap_bytes_per_s=1.0, kv_bytes_per_token=1, relative=False)
    relative = CostModel.fit(noisy, swap_bytes_per_s=1.0, kv_bytes_per_token=1)
    assert predicted(plain) == pytest.approx(total, rel=1e-3)
    assert predicted(relative) < 0.95 * total  # it follows the typical iteration


def test_a_cost_the_data_lacks_is_zero_not_negative() -> None:
    truth = CostModel((0.01, 2e-4, 0.05, 0.0, 0.01), swap_bytes_per_s=1.0, kv_bytes_per_token=1)
    fitted = CostModel.fit(samples_of(truth, 300, noise=0.05), swap_bytes_per_s=1.0, kv_bytes_per_token=1)
    assert all(c >= 0 for c in fitted.coef)
    assert fitted.coef[3] < 1e-4  # the per-sequence cost, absent from the data


def _objective(xtx: np.ndarray, xty: np.ndarray, c: np.ndarray) -> float:
    return float(c @ xtx @ c - 2 * xty @ c)  # |Xc - y|^2 less the constant |y|^2


@pytest.mark.parametrize("seed", range(8))
def test_nonnegative_lstsq_is_the_best_feasible_subset_solution(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(40, 4))
    y = x @ rng.normal(size=4) + rng.normal(scale=0.1, size=40)
    xtx, xty = x.T @ x, x.T @ y
    free = (0,) if seed % 2 else ()
    coef = nonnegative_lstsq(xtx, xty, free=free)
    assert all(coef[i] >= 0 for i in range(4) if i not in free)
    best = np.inf
    for r in range(5):
        for subset in itertools.combinations(range(4), r):
            active = sorted(set(subset) | set(free))
            c = np.zeros(4)
            if active:
                c[active] = np.linalg.solve(xtx[np.ix_(active, active)], xty[active])
            if all(c[i] >= 0 for i in range(4) if i not in free):
                best = min(best, _objective(xtx, xty, c))
    assert _objective(xtx, xty, coef) == pytest.approx(best, rel=1e-6, abs=1e-9)


def test_json_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "cost.json"
    TRUE.save(path)
    assert CostModel.load(path) == TRUE


@pytest.mark.parametrize("text", ["[1, 2]", "{}", '{"version": 1, "coef": {}}', "not json"])
def test_a_bad_cost_file_is_a_clear_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "cost.json"
    path.write_text(text)
    with pytest.raises(InvalidRequestError):
        CostModel.load(path)
    with pytest.raises(InvalidRequestError, match="no cost model"):
        CostModel.load(tmp_path / "missing.json")


def test_negative_coefficients_are_refused() -> None:
    with pytest.raises(InvalidRequestError):
        CostModel((0.0, -1.0, 0.0, 0.0, 0.0), swap_bytes_per_s=1.0, kv_bytes_per_token=1)


def test_calibration_times_every_iteration_of_the_grid(
    tiny_llama: tuple[Path, object], tmp_path: Path
) -> None:
    import torch

    from ember.bench.sched_calibrate import Scenario, calibrate
    from ember.engine.loader import read_hf_config
    from ember.engine.model import ModelSpec

    path = tiny_llama[0]
    grid = [
        Scenario("prefill", ((0, 8, 3),)),  # a prefill, then 2 decodes: 3 iterations
        Scenario("decode", ((0, 4, 4), (0, 4, 4), (1, 6, 2))),  # 1 + 3 iterations, one joined
        Scenario("too long for the model", ((0, 300, 2),)),  # 256 positions: left out
    ]
    result = calibrate(str(path), seconds=0, grid=grid)
    assert result.passes == 1 and result.samples == 7
    cost = result.cost
    spec = ModelSpec.from_hf_config(read_hf_config(path))
    assert cost.kv_bytes_per_token == spec.kv_bytes_per_token(torch.float64)
    assert cost.max_position_embeddings == 256 and cost.swap_bytes_per_s > 0
    assert cost.fit_error is not None and cost.fit_error.samples == 1  # the 5th iteration
    cost.save(tmp_path / "cost.json")
    assert CostModel.load(tmp_path / "cost.json") == cost


@pytest.mark.slow  # the whole default grid, on the tiny model
@pytest.mark.timeout(300)
def test_bench_cost_cli_writes_a_cost_model(tiny_llama: tuple[Path, object], tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from ember.cli import app

    out = tmp_path / "cost.json"
    result = CliRunner().invoke(
        app, ["bench", "cost", "--model", str(tiny_llama[0]), "--out", str(out), "--seconds", "0", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == json.loads(out.read_text())
    cost = CostModel.load(out)
    assert cost.fit_error is not None and cost.fit_error.samples > 0
    assert cost.iteration_s([512], [0]) > cost.iteration_s([1], [16]) > 0


def test_bench_cost_cli_refuses_a_bad_model(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ember.cli import app

    result = CliRunner().invoke(
        app, ["bench", "cost", "--model", "no-such-model", "--out", str(tmp_path / "c.json")]
    )
    assert result.exit_code == 1
    assert "error:" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "c.json").exists()
