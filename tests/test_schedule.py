import math

import pytest

from xmei.schedule import linear_warmup_cosine_lr


def lr(step: int) -> float:
    return linear_warmup_cosine_lr(step, total_steps=14, init_lr=1e-3, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=4)


def test_warmup_is_linear_from_warmup_lr_to_init_lr():
    assert [lr(s) for s in range(5)] == pytest.approx([1e-6, 1e-6 + 0.25 * (1e-3 - 1e-6), 1e-6 + 0.5 * (1e-3 - 1e-6),
                                                       1e-6 + 0.75 * (1e-3 - 1e-6), 1e-3])


def test_cosine_decays_to_min_lr_at_the_last_step():
    # after warm-up: 10 steps (4..13), progress k / 9
    expected = [1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * k / 9)) for k in range(10)]
    assert [lr(s) for s in range(4, 14)] == pytest.approx(expected)
    assert lr(13) == pytest.approx(1e-5) and lr(8) < lr(7) < lr(6)
    assert lr(100) == pytest.approx(1e-5)  # past the end it stays at min_lr


def test_no_warmup_and_the_published_flat_case():
    assert linear_warmup_cosine_lr(0, 10, 1e-4, 1e-6, 1e-7, 0) == pytest.approx(1e-4)
    # the published values (init_lr == min_lr == 1e-5) give a flat rate after warm-up: that is the config, not us
    assert linear_warmup_cosine_lr(5000, 9000, 1e-5, 1e-5, 1e-6, 5000) == pytest.approx(1e-5)
    assert linear_warmup_cosine_lr(2500, 9000, 1e-5, 1e-5, 1e-6, 5000) == pytest.approx(5.5e-6)


def test_warmup_as_a_fraction_of_the_run_and_a_warning_for_a_long_fixed_one():
    from xmei.schedule import resolve_warmup

    assert resolve_warmup(0.03, 1000) == (30, None)
    assert resolve_warmup(0, 1000) == (0, None)
    assert resolve_warmup(20, 1000) == (20, None)
    steps, warning = resolve_warmup(5000, 8000)  # the published count on 8 GPUs with the published batch
    assert steps == 5000 and "covers 62% of the run's 8000 optimizer steps" in warning and "0.03" in warning
