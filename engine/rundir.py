"""The run directory (`--workdir`): the one module that knows its layout.

    WORKDIR/
      config.json      the run's resolved config (written before training starts)
      spm.model        the tokenizer (or wordpiece.json: an imported WordPiece BERT)
      checkpoints/     orbax steps: the train state and a JSON side item (engine.checkpoint)
      metrics.jsonl    one JSON object per logged or evaluated step
      data/            pretraining: the prepared corpus (text/records.py)
      model.json       fine-tuning: the classifier's BertConfig
      task.json        fine-tuning: the task kind and label names
      best/            fine-tuning: the params of the best validation evaluation
      results.json     fine-tuning: final metrics; a run with it is complete
      tensorboard/     TensorBoard event files (and profile/ traces: profile_steps)
      curves.png       loss, eval metrics and learning rate against step ([plots] extra)
      wandb_id.txt     the W&B run id a resumed run continues (wandb.project)
      .lock            the process holding the workdir (engine/lock.py)

Every command reads and writes a workdir through `RunDir`, locally or on gs://.
"""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath

from engine.paths import absolute_path, default_cache_dir, is_remote, write_bytes_atomic

CONFIG_FILENAME = 'config.json'
MODEL_CONFIG_FILENAME = 'model.json'
TASK_FILENAME = 'task.json'
RESULTS_FILENAME = 'results.json'
METRICS_FILENAME = 'metrics.jsonl'
SPM_FILENAME = 'spm.model'
WORDPIECE_FILENAME = 'wordpiece.json'
TOKENIZER_FILENAMES = (SPM_FILENAME, WORDPIECE_FILENAME)
CHECKPOINTS_DIRNAME = 'checkpoints'
BEST_DIRNAME = 'best'
DATA_DIRNAME = 'data'
TENSORBOARD_DIRNAME = 'tensorboard'
CURVES_FILENAME = 'curves.png'
WANDB_ID_FILENAME = 'wandb_id.txt'
LOCK_FILENAME = '.lock'


def config_text(values: dict[str, Any]) -> str:
    """config.json's text of a resolved config's values: stable, human-readable JSON."""
    return json.dumps(values, indent=2, sort_keys=True)


def config_values(text: str) -> dict[str, Any]:
    """The values `config_text` wrote, lists read back as tuples (as the config files write
    them)."""
    def to_tuples(value: Any) -> Any:
        if isinstance(value, list):
            return tuple(to_tuples(v) for v in value)
        if isinstance(value, dict):
            return {k: to_tuples(v) for k, v in value.items()}
        return value
    return to_tuples(json.loads(text))


def step_dirs(directory: epath.Path) -> list[int]:
    """The steps of the finished checkpoints in `directory`, ascending ([] if none)."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def tokenized_data_dir(data_dir: str, workdir: str | os.PathLike) -> str:
    """Where the tokenized corpus is built: `data.data_dir` if set, else WORKDIR/data, or
    for a cloud workdir this host's cache (array_record files are written locally; the
    directory name inside is a hash of the inputs and tokenizer, so runs share it safely)."""
    if data_dir:
        return data_dir
    if is_remote(workdir):
        return os.path.join(default_cache_dir(), 'tokenized')
    return os.path.join(os.fspath(workdir), DATA_DIRNAME)


class RunDir:
    """Typed access to one workdir's files (local path or gs:// URL)."""

    def __init__(self, path: str | epath.Path):
        self.path = absolute_path(path)
        self.config_file = self.path / CONFIG_FILENAME
        self.model_config_file = self.path / MODEL_CONFIG_FILENAME
        self.task_file = self.path / TASK_FILENAME
        self.results_file = self.path / RESULTS_FILENAME
        self.metrics_file = self.path / METRICS_FILENAME
        self.checkpoints = self.path / CHECKPOINTS_DIRNAME
        self.best = self.path / BEST_DIRNAME
        self.tensorboard = self.path / TENSORBOARD_DIRNAME
        self.curves_file = self.path / CURVES_FILENAME
        self.wandb_id_file = self.path / WANDB_ID_FILENAME
        self.lock_file = self.path / LOCK_FILENAME

    def __str__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------ reading
    def tokenizer_file(self) -> str | None:
        """spm.model, or wordpiece.json (an imported WordPiece BERT); None if neither."""
        for name in TOKENIZER_FILENAMES:
            if (self.path / name).exists():
                return str(self.path / name)
        return None

    def read_config(self) -> dict[str, Any]:
        """config.json's values (nested dicts; lists as tuples)."""
        return config_values(self.config_file.read_text())

    def read_model_config(self) -> dict[str, Any]:
        """A fine-tuning run's classifier fields (model.json)."""
        return json.loads(self.model_config_file.read_text())

    def read_task(self) -> dict[str, Any]:
        return json.loads(self.task_file.read_text())

    def read_results(self) -> dict[str, Any] | None:
        """results.json, or None while the run is not complete."""
        return json.loads(self.results_file.read_text()) if self.results_file.exists() else None

    def latest_step(self) -> int | None:
        steps = step_dirs(self.checkpoints)
        return steps[-1] if steps else None

    def best_steps(self) -> list[int]:
        return step_dirs(self.best)

    # ------------------------------------------------------------ writing
    def write_config(self, values: dict[str, Any]) -> None:
        """config.json from a resolved config's values (a ConfigDict's `to_dict()`)."""
        write_bytes_atomic(self.config_file, config_text(values).encode())

    def write_json(self, file: epath.Path, value: Any, indent: int | None = None) -> None:
        """One of this workdir's JSON files (model.json, task.json, results.json)."""
        text = json.dumps(value, indent=indent) + ('\n' if indent else '')
        write_bytes_atomic(file, text.encode())
