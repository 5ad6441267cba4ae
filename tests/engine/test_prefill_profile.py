"""PrefillProfile: learnt from iterations, never before; persisted under EMBER_HOME."""

from __future__ import annotations

import pytest

from ember.engine.prefill_profile import PrefillProfile, profile_path


def test_no_prediction_before_measurements_then_a_fit_of_the_measured_costs() -> None:
    p = PrefillProfile()
    assert p.predict_prefill(500) == 0.0 and not p.ready and p.decode_iteration_s is None
    for n in (16, 64, 256, 1024):  # 2 ms + 10 us a token + 1 ns a query-key pair
        p.observe([n], [0], 0.002 + 1e-5 * n + 1e-9 * n * n)
    assert p.ready
    assert p.predict_prefill(512) == pytest.approx(0.002 + 1e-5 * 512 + 1e-9 * 512 * 512, rel=0.05)
    assert p.predict_prefill(2048) > p.predict_prefill(512)


def test_decode_iterations_give_the_decode_time_and_costs_stay_non_negative() -> None:
    p = PrefillProfile()
    for _ in range(5):
        p.observe([1] * 8, [100] * 8, 0.03)
    assert p.decode_iteration_s == pytest.approx(0.03)
    assert p.predict_prefill(1) >= 0 and p.predict_prefill(1000) >= p.predict_prefill(10)


def test_the_profile_is_saved_under_ember_home_and_reloaded() -> None:
    path = profile_path("tiny-abc", "cpu", "float32")
    assert path.parent.name == "profiles"
    p = PrefillProfile.for_model("tiny-abc", "cpu", "float32")
    for n in (10, 100, 1000):
        p.observe([n], [0], n * 1e-4)
    p.observe([1, 1], [5, 5], 0.01)
    p.save()
    q = PrefillProfile.for_model("tiny-abc", "cpu", "float32")
    assert q.ready and q.predict_prefill(300) == pytest.approx(p.predict_prefill(300))
    assert q.decode_iteration_s == pytest.approx(0.01)
    assert not PrefillProfile.for_model("tiny-abc", "cpu", "bfloat16").ready  # per dtype


def test_a_damaged_profile_file_is_ignored() -> None:
    path = profile_path("broken", "cpu", "float32")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    assert not PrefillProfile(path).ready


def test_a_copy_predicts_the_same_learns_apart_and_saves_nothing() -> None:
    p = PrefillProfile.for_model("copied", "cpu", "float32")
    for n in (10, 100, 1000):
        p.observe([n], [0], n * 1e-4)
    twin = p.copy()
    assert twin.path is None and twin.predict_prefill(300) == pytest.approx(p.predict_prefill(300))
    for _ in range(20):
        twin.observe([500], [0], 5.0)  # a slow spell seen only by the copy
    assert twin.predict_prefill(500) > 2 * p.predict_prefill(500)
    twin.save()
    saved = PrefillProfile.for_model("copied", "cpu", "float32")  # what p saved, not the copy
    assert saved.predict_prefill(500) == pytest.approx(p.predict_prefill(500))
