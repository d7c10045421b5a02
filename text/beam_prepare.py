"""Preparation as an Apache Beam pipeline, for corpora beyond one machine (optional).

    directory, index = run(spec, tokenizer, root)                   # DirectRunner
    run(spec, tokenizer, 'gs://b/prepared', ['--runner=DataflowRunner', ...])

The work is exactly `text.prepare`'s: `make_plan` cuts the same units, each Beam worker
runs `prepare_unit` on whole units (Reshuffle spreads them over workers), and this
process merges the unit summaries with `finalize` once the pipeline is done. Units depend
only on the inputs, so the shards and index.json are byte for byte those of the local
`prepare`, whatever the runner or the number of workers. Units whose summary exists are
not redone, so a failed or cancelled pipeline resumes where it stopped.

On a distributed runner, the inputs, the tokenizer file and ROOT must be readable (ROOT
writable) by every worker, e.g. on gs://, and workers need this project's code
(Beam's --setup_file or a custom container). apache_beam is imported only here.

Why Beam is not in requirements*.txt: apache-beam 2.77.0 needs protobuf<7, and the pinned
sentencepiece 0.2.3 ships a sentencepiece_model_pb2 generated for protobuf>=7.36.1, which
convert/ (Hugging Face tokenizer export/import) loads. Preparation itself never loads it,
so install Beam in an environment of its own (pip resolves it there, to protobuf 6.x).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from etils import epath

from engine.errors import ConfigError
from text import records
from text.formats import BadRecord
from text.prepare import (
    Plan,
    PrepareSpec,
    Settings,
    finalize,
    make_plan,
    pending_units,
    prepare_unit,
)
from text.units import Unit

BEAM_REQUIREMENT = 'apache-beam==2.77.0'

log = logging.getLogger(__name__)


def require_beam():
    """apache_beam, or a one-line ConfigError: Beam is an optional extra."""
    try:
        import apache_beam
    except ImportError:
        raise ConfigError(f"Beam preparation needs Apache Beam: pip install "
                          f"'{BEAM_REQUIREMENT}' (in a separate environment: it needs "
                          f"protobuf<7, see text/beam_prepare.py)") from None
    return apache_beam


def _prepare(unit: Unit, settings: Settings, directory: str) -> dict:
    """One unit on a Beam worker. A module-level function, so Beam pickles it by name."""
    try:
        summary = prepare_unit(unit, settings, directory)
    except BadRecord as e:  # BadLine too: the one-line message of the local path, no traceback
        raise ConfigError(e.message('data.train_files')) from None
    require_beam().metrics.Metrics.counter('prepare', 'units').inc()
    return {'unit': unit.number, 'sequences': {s: summary[s]['sequences']
                                               for s in records.SPLITS}}


def build_pipeline(pipeline: Any, plan: Plan, units: Sequence[Unit] | None = None) -> Any:
    """Adds the preparation of `units` (default: the plan's units not done yet) to
    `pipeline`; returns the PCollection of per-unit counts."""
    beam = require_beam()
    todo = pending_units(plan, plan.units) if units is None else list(units)
    return (pipeline
            | 'Units' >> beam.Create(todo)
            | 'Spread' >> beam.Reshuffle()  # one unit per worker, not fused with Create
            | 'Prepare' >> beam.Map(_prepare, settings=plan.settings,
                                    directory=plan.directory))


def _options(pipeline_options: Any) -> Any:
    """PipelineOptions from options, an argv list, a dict or None (DirectRunner)."""
    from apache_beam.options.pipeline_options import PipelineOptions
    if pipeline_options is None:
        return PipelineOptions(runner='DirectRunner')
    if isinstance(pipeline_options, PipelineOptions):
        return pipeline_options
    if isinstance(pipeline_options, dict):
        return PipelineOptions(**pipeline_options)
    return PipelineOptions(list(pipeline_options))


def run(spec: PrepareSpec, tokenizer, root: str,
        pipeline_options: Any = None) -> tuple[str, records.Index]:
    """Prepares with Beam (or finds it done); (directory, index) as `prepare` returns.

    `pipeline_options`: apache_beam PipelineOptions, an argv list ('--runner=...'), a dict
    of option names, or None for the DirectRunner."""
    beam = require_beam()
    plan = make_plan(spec, tokenizer, root)
    index = records.read_index(plan.directory)
    if index is not None:
        return plan.directory, index
    epath.Path(plan.directory).mkdir(parents=True, exist_ok=True)
    todo = pending_units(plan, plan.units)
    started = time.time()
    if todo:
        with beam.Pipeline(options=_options(pipeline_options)) as pipeline:
            build_pipeline(pipeline, plan, todo)  # runs (and waits) on leaving the block
    index = finalize(plan)
    log.info('prepared %s with Beam (%d of %d units) in %.1fs', plan.directory, len(todo),
             len(plan.units), time.time() - started)
    return plan.directory, index
