"""Hardening loose ends: suite names as folders, TensorBoard tags and the lazy tensorboardX
import, launch.py's logging set-up, packaging metadata."""

import json
import subprocess
import sys
import tomllib

import ml_collections
import pytest

import launch
from engine.errors import ConfigError
from engine.metrics_writer import MetricWriter
from studies import suite
from tests.helpers import REPO, tensorboard_events


def test_a_suite_task_named_like_a_path_is_one_line_before_anything_is_written(
        tmp_path, capsys, monkeypatch):
    if '.' in str(tmp_path):  # a '.' would split the override's key elsewhere
        pytest.skip('tmp_path contains a dot')
    monkeypatch.chdir(REPO)
    workdir, outside = tmp_path / 'eval', tmp_path / 'outside'
    argv = ['evaluate', '--config', 'configs/suite.py:demo', '--workdir', str(workdir),
            f'--config.tasks.{outside}=sentiment data.max_train_examples=20 num_epochs=1']
    assert launch.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ''  # no run was started ('[1/N] task / variant / seed ...')
    assert err.count('\n') == 1 and err.startswith(f'error: --config.tasks.{outside}: ')
    assert 'folder' in err
    assert list(tmp_path.iterdir()) == []  # neither the workdir nor the task's folder


@pytest.mark.parametrize('section, name', [
    ('tasks', '..'), ('tasks', '.hidden'), ('tasks', 'a/b'), ('tasks', ''),
    ('variants', '../up'), ('variants', '/abs'), ('variants', 'a\nb')])
def test_task_and_variant_names_must_be_plain_folder_names(section, name):
    # A plain dict: ConfigDict itself refuses dotted keys, the check does not rely on it.
    cfg = {'tasks': {'ok': 'sentiment'}, 'variants': {'pretrained': ''}}
    cfg[section][name] = ''
    with pytest.raises(ConfigError, match=f'--config.{section}.') as e:
        suite.check_names(cfg)
    assert '\n' not in str(e.value)


def test_plain_names_pass():
    cfg = _quick()
    cfg.tasks['My_task-2'] = 'sentiment'
    cfg.variants['probe-v2'] = 'freeze=encoder'
    suite.check_names(cfg)
    suite.check_names({'tasks': {'a.b': ''}, 'variants': {'v1.0': ''}})


def _quick() -> ml_collections.ConfigDict:
    from engine.config_cli import load_config
    return load_config(f'{REPO}/configs/suite.py:quick')


def _event_tags(directory) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from the event files under `directory`."""
    assert sorted(directory.rglob('events.out.tfevents.*'))
    tags: dict[str, list[tuple[int, float]]] = {}
    for event in tensorboard_events(directory):
        for value in event.summary.value:
            tags.setdefault(value.tag, []).append((event.step, value.simple_value))
    return tags


def test_tensorboard_tags_are_grouped_and_metrics_jsonl_keys_kept(tmp_path):
    records = [(1, {'loss': 2.5, 'learning_rate': 1e-3, 'grad_norm': 0.5}),
               (2, {'eval_loss': 2.0, 'eval_mlm_accuracy': 0.25, 'old_eval_loss': 3.0}),
               (3, {'loss': 1.5, 'note': 'text'})]
    writer = MetricWriter(str(tmp_path))
    for step, metrics in records:
        writer.write(step, metrics)
    writer.close()
    lines = [json.loads(x) for x in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    assert lines == [{'step': step, **metrics} for step, metrics in records]
    tags = _event_tags(tmp_path / 'tensorboard')
    assert set(tags) == {'train/loss', 'train/learning_rate', 'train/grad_norm',
                         'eval/loss', 'eval/mlm_accuracy', 'old_eval/loss'}
    assert tags['train/loss'] == [(1, 2.5), (3, 1.5)]
    assert tags['old_eval/loss'] == [(2, 3.0)]


def test_tensorboardx_is_imported_only_by_an_enabled_writer(tmp_path):
    code = ('import sys\n'
            'from engine.metrics_writer import MetricWriter\n'
            'MetricWriter(sys.argv[1], enabled=False)\n'
            "assert 'tensorboardX' not in sys.modules and 'torch' not in sys.modules\n"
            "sys.modules['torch'] = None  # as tests/helpers.launch_command: not needed here\n"
            'MetricWriter(sys.argv[1]).close()\n'
            "assert 'tensorboardX' in sys.modules\n")
    subprocess.run([sys.executable, '-c', code, str(tmp_path)], cwd=REPO, check=True,
                   timeout=120)


def test_launch_configures_logging_and_keeps_libraries_quiet():
    code = ('import logging, launch\n'
            "argv = ['finetune', '--workdir', 'unused', '--config.no_such_key=1']\n"
            'assert launch.main(argv) == 2\n'
            "logging.getLogger('text.prepare').info('ours at info')\n"
            "for name in ('absl', 'jax._src.xla_bridge', 'orbax.checkpoint', 'etils.epath',\n"
            "             'urllib3.connectionpool', 'gcsfs', 'google.auth'):\n"
            "    logging.getLogger(name).info('library noise')\n"
            "logging.getLogger('orbax').warning('library warning')\n")
    proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0].startswith('error: --config.no_such_key: unknown config key')
    assert lines[1:] == ['ours at info', 'library warning']


def test_project_metadata_and_license():
    project = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']
    assert (project['name'], project['version'], project['requires-python']) == (
        'bertjax', '0.1.0', '>=3.11')
    assert project['license'] == {'file': 'LICENSE'}
    text = (REPO / project['license']['file']).read_text()
    assert 'Apache License' in text and 'Version 2.0, January 2004' in text
    assert 'END OF TERMS AND CONDITIONS' in text and 'Copyright 2026 the bertjax authors' in text
    test_extra = project['optional-dependencies']['test']
    assert any(line.startswith('scikit-learn==') for line in test_extra)
