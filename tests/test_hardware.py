"""MFU only against a stable peak: a chip's spec by device kind or a configured peak; none
on CPU, never from a matmul timed at start-up, and never above 100 %."""

import jax
import pytest

from engine import hardware, loop


@pytest.mark.parametrize('kind, peak', [
    ('NVIDIA H100 80GB HBM3', 989e12),
    ('NVIDIA H100 PCIe', 756e12),  # the longest matching prefix wins
    ('NVIDIA H200', 989e12),
    ('NVIDIA A100-SXM4-40GB', 312e12),
    ('TPU v5 lite', 197e12),
    ('TPU v4', 275e12),
    ('cpu', None),
    ('NVIDIA GeForce RTX 4090', None),
])
def test_known_peaks_by_device_kind(kind, peak):
    assert hardware.known_peak_flops(kind) == peak


def test_no_peak_on_cpu_unless_configured(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError('a training run must not time a matmul for its peak')
    monkeypatch.setattr(hardware, 'measured_matmul_flops', never)
    assert jax.devices()[0].platform == 'cpu'
    assert hardware.peak_flops_per_device() is None
    assert hardware.total_peak_flops() is None
    assert hardware.total_peak_flops(5e12) == 5e12 * jax.device_count()


def _logged(peak_flops, flops_per_step: float) -> list[dict]:
    """Records a 6-step loop on host numbers writes, with that peak and step cost."""
    written = []

    def step(state, batch):
        return state + 1, {'loss_sum': 1.0, 'correct_sum': 0.0, 'weight_sum': 1.0,
                           'learning_rate': 0.1, 'grad_norm': 1.0}
    callbacks = loop.LoopCallbacks(step=step, evaluate=lambda s: {},
                                   save=lambda step, s: None,
                                   write=lambda step, m: written.append(m),
                                   check_saves=lambda wait: None)
    cfg = loop.LoopConfig(num_steps=6, log_every=2, eval_every=0, checkpoint_every=100,
                          tokens_per_step=1, flops_per_step=flops_per_step,
                          peak_flops=peak_flops, is_main=False)
    loop.run_loop(0, ((i, None) for i in range(6)), 0, cfg, callbacks)
    return written


def test_without_a_peak_no_mfu_is_logged_but_speed_is():
    records = _logged(None, 1.0)
    assert records and all('mfu' not in r and r['tokens_per_sec'] > 0 for r in records)


def test_mfu_is_logged_against_a_real_peak_and_within_100_percent():
    records = _logged(1e30, 1e12)
    assert all(0 < r['mfu'] <= 1 for r in records)


def test_an_impossible_mfu_is_said_once_and_never_logged(capsys):
    records = _logged(1.0, 1e12)  # a peak of 1 FLOP/s: every interval would be far over 100 %
    assert records and all('mfu' not in r for r in records)
    err = capsys.readouterr().err
    assert err.count('MFU would be') == 1 and 'peak_flops_per_device' in err
