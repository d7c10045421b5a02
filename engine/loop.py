"""The training loop shared by pretraining and fine-tuning.

The step function is pure and jitted elsewhere; this loop owns the side effects: feeding
batches, fetching metrics every `log_every` steps (the only host syncs), evaluation,
checkpoints, SIGTERM/SIGINT, NaN detection, the progress bar and throughput.
"""

import dataclasses
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np
import tqdm

from engine.errors import ConfigError, NonFiniteLoss, Preempted

# Exit status of a preempted run: EX_TEMPFAIL (sysexits.h, "try again later"). Not 0, so a
# scheduler does not count the run as finished; the generated sbatch script turns it into
# `scontrol requeue` (SLURM's RequeueExit=75 in slurm.conf does the same). A run that ends
# on its own budget (max_runtime, train_tokens) exits 0: it is done, not interrupted.
REQUEUE_EXIT_CODE = 75

# A diverging run's advice, naming the keys of pretraining's config (fine-tuning passes
# its own: its optimizer keys are top-level).
PRETRAIN_NAN_HINT = ('Try a lower optimizer.learning_rate, more warm-up or '
                     'optimizer.max_grad_norm.')


def summarize_sums(records: list[dict], accuracy_key: str = 'accuracy') -> dict:
    """Host-side: per-step sums (loss_sum, correct_sum, weight_sum) of a log interval ->
    weighted mean loss and accuracy, with the last step's lr and grad norm."""
    weight = max(sum(float(r['weight_sum']) for r in records), 1.0)
    return {
        'loss': sum(float(r['loss_sum']) for r in records) / weight,
        accuracy_key: sum(float(r['correct_sum']) for r in records) / weight,
        'learning_rate': float(records[-1]['learning_rate']),
        'grad_norm': float(records[-1]['grad_norm']),
    }


@dataclasses.dataclass
class LoopConfig:
    num_steps: int
    log_every: int
    eval_every: int  # 0: only at the end
    checkpoint_every: int
    tokens_per_step: int
    flops_per_step: float  # model FLOPs of one step, all devices together
    peak_flops: float | None  # all devices together; None (CPU): no MFU is logged
    is_main: bool = True  # only the main process prints and writes metrics
    deadline: float = 0.0  # time.time() at which max_runtime is spent; 0 = no limit
    # Non-finite losses survived by rolling back to the last checkpoint (cb.rollback) and
    # skipping the batches since; the next one stops the run. 0: the first one stops it.
    nan_rollbacks: int = 0
    # Batches skipped by earlier rollbacks (kept in checkpoints): the batch of optimizer
    # step s (1-based) is batch number s + data_offset, i.e. `batches` yields index
    # s - 1 + data_offset for it. 0 when nothing was ever skipped.
    data_offset: int = 0
    # Profiler window (first, last) step: a JAX trace starts before step `first` and stops
    # after step `last`, written to profile_dir (by the main process only). None = off.
    profile: tuple[int, int] | None = None
    profile_dir: str = ''
    # Tokens trained on by the end of step s when steps differ in size (sequence-length
    # phases, batch-size ramp): throughput counts them, and MFU scales flops_per_step (a
    # step of tokens_per_step tokens) by each interval's tokens. None: s * tokens_per_step.
    tokens_at: Callable[[int], int] | None = None
    # What a non-finite loss's error suggests, in this stage's config keys.
    nan_hint: str = PRETRAIN_NAN_HINT


@dataclasses.dataclass
class LoopCallbacks:
    # (state, host batch[, learning rate]) -> (state, metrics)
    step: Callable[..., tuple[Any, dict]]
    evaluate: Callable[[Any], dict]  # state -> {'eval_loss': ..., ...}
    save: Callable[[int, Any], None]  # (step, state) -> None, async
    write: Callable[[int, dict], None]  # (step, metrics) -> None
    summarize: Callable[[list[dict]], dict] = summarize_sums  # host records -> one record
    should_stop: Callable[[], bool] = lambda: False  # asked after each evaluation
    # Raises CheckpointSaveFailed if a save failed. wait=False: only looks whether the
    # background save has finished (asked every step); wait=True: blocks until it has.
    check_saves: Callable[[bool], None] = lambda wait: None
    # (checkpoint step, new data offset) -> (that checkpoint's state, batches from data
    # index step + offset on); saves made after it must record the new offset. Needed
    # only with LoopConfig.nan_rollbacks > 0.
    rollback: Callable[[int, int], tuple[Any, Iterator]] | None = None
    # The host's learning rate for the step after `step` steps (schedule='budget', where it
    # depends on elapsed time), asked right before that step and passed to `step` as its
    # third argument; None: the step computes its own.
    learning_rate: Callable[[int], Any] | None = None


class SigtermFlag:
    """Turns SIGTERM and SIGINT (Ctrl-C) into a flag the loop checks between steps, so
    either saves a checkpoint and ends the run resumably. Install it before slow set-up
    (data, compilation) so an early signal also ends the run cleanly; whoever installs it
    restores it (also a context manager). A second Ctrl-C interrupts at once, unsaved."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.raised = False
        self.name = 'SIGTERM'  # the signal that raised the flag, for the exit line
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        self.raised, self.name = True, signal.Signals(signum).name
        if signum == signal.SIGINT:  # the next Ctrl-C: KeyboardInterrupt, as ever
            signal.signal(signal.SIGINT, self._previous[signal.SIGINT])

    def restore(self):
        """Puts the previous handlers back (once; later calls do nothing)."""
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def __enter__(self) -> 'SigtermFlag':
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def parse_profile_steps(text: str) -> tuple[int, int] | None:
    """`profile_steps` ('FIRST,LAST', e.g. '10,15'; '' = off) -> (first, last) or None;
    a one-line ConfigError for anything else."""
    if not str(text).strip():
        return None
    try:
        first, last = (int(part) for part in str(text).split(','))
    except ValueError:
        first = last = 0
    if not 1 <= first <= last:
        raise ConfigError(f"profile_steps: expected 'FIRST,LAST' steps with 1 <= FIRST <= LAST "
                          f"(e.g. '10,15'), or '' for off; got {text!r}")
    return first, last


class _Profiler:
    """Starts a JAX trace before step `first` and stops it after step `last` (its device
    work finished), or when the loop ends inside the window."""

    def __init__(self, cfg: LoopConfig):
        self.window = cfg.profile if cfg.is_main and cfg.profile_dir else None
        self.directory, self.active = cfg.profile_dir, False

    def before(self, step: int) -> None:
        """`step`: the 1-based step about to be taken."""
        if self.window and not self.active and self.window[0] <= step <= self.window[1]:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after(self, step: int, outputs: Any) -> None:
        if self.active and step >= self.window[1]:
            jax.block_until_ready(outputs)
            self.stop()

    def stop(self) -> None:
        if self.active:
            self.active = False
            jax.profiler.stop_trace()
            print(f'profile: trace written under {self.directory}', flush=True)


def _first_non_finite(records: list[dict], step: int) -> tuple[int, float] | None:
    """(step, loss) of the first non-finite loss among the records of steps
    step - len(records) + 1 .. step; None if all are finite."""
    for index, record in enumerate(records):
        if not np.isfinite(record['loss_sum']):
            return step - len(records) + 1 + index, float(record['loss_sum'])
    return None


def _non_finite_loss(loss: float, step: int, last_saved: int | None,
                     rollbacks: int, hint: str) -> NonFiniteLoss:
    kept = f'step {last_saved}' if last_saved is not None else 'none yet'
    after = f' after {rollbacks} rollback(s)' if rollbacks else ''
    return NonFiniteLoss(
        f'loss became {loss} by step {step}{after}; stopped without saving this state (last '
        f'good checkpoint: {kept}). {hint}')


def run_loop(state: Any, batches: Iterator[tuple[int, Any]], start_step: int,
             cfg: LoopConfig, cb: LoopCallbacks, sigterm: SigtermFlag | None = None) -> Any:
    """Runs steps start_step+1 .. cfg.num_steps; returns the final state. `sigterm`: the
    caller's flag, which the caller restores (several loops may share it); None: one
    installed for this loop alone."""
    if sigterm is None:
        with SigtermFlag() as own:
            return run_loop(state, batches, start_step, cfg, cb, own)
    if sigterm.raised:
        raise Preempted(f'{sigterm.name} before training started; nothing new to save '
                        f'(latest checkpoint: step {start_step})')
    if start_step >= cfg.num_steps:
        if cfg.is_main:
            print(f'already at step {start_step} of {cfg.num_steps}: nothing to train', flush=True)
        return state
    # A live bar on a terminal; in logs and CI one plain line per log step instead.
    interactive = cfg.is_main and sys.stderr.isatty()
    bar = tqdm.tqdm(total=cfg.num_steps, initial=start_step, disable=not interactive,
                    dynamic_ncols=True, mininterval=1.0, desc='train')
    # pending: this interval's metrics still on device; fetched: on host, not yet logged
    # (a checkpoint step fetches them for the NaN check; they wait for the log step).
    pending, fetched, last_saved = [], [], (start_step or None)
    offset, rollbacks = cfg.data_offset, 0
    timer = _Throughput(cfg)
    batches = _Replaceable(timer.timed(batches))  # host time spent producing batches
    profiler = _Profiler(cfg)
    try:
        for index, batch in batches:  # the data index of the step about to be taken
            step = index - offset  # the optimizer step about to be taken (1-based after)
            profiler.before(step + 1)
            rate = () if cb.learning_rate is None else (cb.learning_rate(step),)
            state, metrics = cb.step(state, batch, *rate)
            pending.append(metrics)
            done = step + 1
            profiler.after(done, metrics)
            bar.update(1)
            if done == start_step + 1:
                jax.block_until_ready(metrics)  # compile time stays out of throughput
                timer.restart(done)
            log_now = done % cfg.log_every == 0 or done == cfg.num_steps
            save_now = done % cfg.checkpoint_every == 0 or done == cfg.num_steps
            preempted, out_of_time = _stop_requests(sigterm, cfg, log_now or save_now)
            if log_now or save_now or preempted:
                records = jax.device_get(pending)
                pending = []
                bad = _first_non_finite(records, done)
                if bad and (rollbacks >= cfg.nan_rollbacks or last_saved is None
                            or cb.rollback is None):
                    raise _non_finite_loss(bad[1], done, last_saved, rollbacks, cfg.nan_hint)
                if bad:
                    rollbacks += 1
                    state, replay, offset = _rollback(bad, last_saved, offset, rollbacks,
                                                      cfg, cb, bar)
                    batches.replace(timer.timed(replay))
                    timer.restart(last_saved)
                    continue  # `fetched` holds only steps up to last_saved: they stay
                fetched += records
                if log_now:
                    _log(done, fetched, timer, cb, bar, cfg.is_main)
                    fetched = []
            stop = False
            if cfg.eval_every and done % cfg.eval_every == 0 or done == cfg.num_steps:
                _evaluate(done, state, cb, bar, cfg.is_main)
                stop = cb.should_stop()
                timer.restart(done)  # evaluation time is not training throughput
            if save_now or preempted or out_of_time or stop:
                cb.save(done, state)
                last_saved = done
            last = preempted or out_of_time or stop or done >= cfg.num_steps
            # A failed background save stops the run within a step of failing (not at the
            # next save); the last one is waited for, so "saved" below is true.
            _check_saves(cb, wait=last, synced=log_now or save_now or last)
            if preempted:
                raise Preempted(f'{sigterm.name}: saved a checkpoint at step {done}; '
                                'run the same command to resume')
            if out_of_time:
                _print(cfg.is_main, f'max_runtime reached: saved a checkpoint at step {done}')
                break
            if done >= cfg.num_steps or stop:
                break
    finally:
        profiler.stop()
        bar.close()
    return state


class _Replaceable:
    """An iterator whose source can be swapped between two `next` calls (a rollback
    restarts the batches elsewhere)."""

    def __init__(self, iterator: Iterator):
        self._iterator = iterator

    def replace(self, iterator: Iterator) -> None:
        self._iterator = iterator

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._iterator)


def _rollback(bad: tuple[int, float], last_saved: int, offset: int, rollbacks: int,
              cfg: LoopConfig, cb: LoopCallbacks, bar) -> tuple[Any, Iterator, int]:
    """Back to the checkpoint of `last_saved`, skipping the batches of the steps after it
    up to the first non-finite one: (its state, the batches from there, the new offset)."""
    step, loss = bad
    # Batch numbers are 1-based like steps: batch n is the one of step n when none is skipped.
    skipped = list(range(last_saved + offset + 1, step + offset + 1))
    offset += step - last_saved
    state, replay = cb.rollback(last_saved, offset)
    bar.n = last_saved
    bar.refresh()
    cb.write(step, {'rollback_to': last_saved, 'skipped_batches': skipped})
    if cfg.is_main:
        bar.write(f'step {step}: loss is {loss}; rolled back to step {last_saved} and skipped '
                  f'batches {skipped[0]}-{skipped[-1]} (rollback {rollbacks} of '
                  f'{cfg.nan_rollbacks})', file=sys.stdout)
    return state, replay, offset


def _stop_requests(sigterm: SigtermFlag, cfg: LoopConfig, synced: bool) -> tuple[bool, bool]:
    """(SIGTERM, out of time), the same on every process.

    One process decides alone, at every step. Several processes must stop at the same
    step (a step is a collective), but SIGTERM may reach them at different steps and
    their clocks differ: they compare flags with one small all-gather at log and
    checkpoint steps only (where the host waits for the device anyway), so a preempted
    multi-host run stops within log_every_steps of the signal.
    """
    flags = (sigterm.raised, bool(cfg.deadline) and time.time() >= cfg.deadline)
    if jax.process_count() == 1:
        return flags
    if not synced:
        return False, False
    from engine.distributed import agree
    return agree(*flags)


def _check_saves(cb: LoopCallbacks, wait: bool, synced: bool) -> None:
    """cb.check_saves after every step of one process; with several, only at log and
    checkpoint steps, which every process reaches (engine.checkpoint's check compares the
    processes there, so that all stop together)."""
    if synced or jax.process_count() == 1:
        cb.check_saves(wait)


def _print(enabled: bool, message: str) -> None:
    if enabled:
        print(message, flush=True)


class _Throughput:
    def __init__(self, cfg: LoopConfig):
        self.cfg = cfg
        self.warned_mfu = False
        self.restart(0)

    def restart(self, step: int) -> None:
        self.step, self.time, self.input_seconds = step, time.perf_counter(), 0.0

    def timed(self, batches: Iterable) -> Iterator:
        """Yields from `batches`, adding the time spent waiting for each to input_seconds."""
        batches = iter(batches)
        while True:
            start = time.perf_counter()
            try:
                item = next(batches)
            except StopIteration:
                return
            self.input_seconds += time.perf_counter() - start
            yield item

    def measure(self, step: int) -> dict:
        now = time.perf_counter()
        steps, seconds = step - self.step, max(now - self.time, 1e-9)
        input_seconds = self.input_seconds
        self.restart(step)
        if steps <= 0:
            return {}
        tokens, full_steps = steps * self.cfg.tokens_per_step, steps
        if self.cfg.tokens_at is not None:
            tokens = self.cfg.tokens_at(step) - self.cfg.tokens_at(step - steps)
            full_steps = tokens / self.cfg.tokens_per_step  # in steps of the flops_per_step size
        measured = {'tokens_per_sec': tokens / seconds,
                    'steps_per_sec': steps / seconds,
                    # Share of wall time the host spent producing batches. Dispatch is
                    # asynchronous, so the device waits for input only as this nears 1.
                    'input_fraction': input_seconds / seconds}
        mfu = self.mfu(full_steps * self.cfg.flops_per_step / seconds)
        if mfu is not None:
            measured['mfu'] = mfu
        return measured

    def mfu(self, flops_per_sec: float) -> float | None:
        """Model FLOPs utilisation against the configured peak; None without a peak, or when
        the figure would pass 100 % (the peak is then wrong: said once, never logged)."""
        if not self.cfg.peak_flops:
            return None
        mfu = flops_per_sec / self.cfg.peak_flops
        if mfu <= 1.0:
            return mfu
        if not self.warned_mfu:
            self.warned_mfu = True
            print(f'warning: MFU would be {100 * mfu:.0f} %: the peak of '
                  f'{self.cfg.peak_flops / 1e12:g} TFLOP/s is too low for this machine; '
                  'MFU is not logged (fix peak_flops_per_device)', file=sys.stderr, flush=True)
        return None


def _log(step: int, records: list[dict], timer: _Throughput, cb: LoopCallbacks, bar,
         is_main: bool) -> None:
    summary = cb.summarize(records)
    summary.update(timer.measure(step))
    cb.write(step, summary)
    accuracy = summary.get('mlm_accuracy', summary.get('accuracy', 0.0))
    postfix = {'loss': f"{summary['loss']:.3f}", 'acc': f'{accuracy:.3f}'}
    if 'tokens_per_sec' in summary:
        postfix['tok/s'] = f"{summary['tokens_per_sec']:,.0f}"
    if 'mfu' in summary:
        postfix['mfu'] = f"{100 * summary['mfu']:.1f}%"
    bar.set_postfix(postfix, refresh=False)
    if bar.disable and is_main:
        print(f'step {step}: ' + ', '.join(f'{k}={v}' for k, v in postfix.items()), flush=True)


def _evaluate(step: int, state: Any, cb: LoopCallbacks, bar, is_main: bool) -> None:
    results = cb.evaluate(state)
    if results:
        cb.write(step, results)
        if is_main:
            bar.write(f'step {step}: ' + ', '.join(f'{k}={v:.4f}' for k, v in results.items()),
                      file=sys.stdout)
