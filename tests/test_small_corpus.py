"""The small-corpus rule (data.small_corpus_mb, pretrain/small_corpus.py): a small corpus
of the user's text files continues the general encoder with the measured settings; the
demo, named corpora, mixtures, large corpora, explicit init_from and `=0` resolve as before."""

import json
import pathlib

import pytest

import launch
from configs.pretrain import get_config
from engine import resume_check
from engine.errors import ConfigError
from models.config import RUNTIME_FIELDS
from pretrain import small_corpus
from tests.helpers import read_metrics, tiny_args

CHANGED = {'init_from', 'data.small_corpus_choice', 'num_train_steps', 'optimizer.learning_rate',
           'optimizer.warmup_steps', 'masking.mask_rate', 'optimizer.schedule'}


def _flat(cfg) -> dict:
    return resume_check.flatten(resume_check.as_json(cfg.to_dict()))


def _resolve(cfg, workdir, build=None) -> tuple[object, list[str]]:
    lines = []

    def no_build(config, path):
        raise AssertionError(f'unexpected build of {path}')
    out = small_corpus.resolve(cfg, str(workdir), build or no_build, lines.append)
    return out, lines


def _encoder_dir(root: pathlib.Path, arg: str) -> str:
    """What the rule reads of an encoder (config.json, a tokenizer, a finished checkpoint's
    directory); no weights: resolving never loads them."""
    cfg = get_config(arg)
    (root / 'checkpoints' / str(cfg.num_train_steps)).mkdir(parents=True)
    (root / 'spm.model').write_bytes(b'')
    (root / 'config.json').write_text(json.dumps(resume_check.as_json(cfg.to_dict())))
    return str(root)


@pytest.fixture
def encoder(tmp_path) -> str:
    return _encoder_dir(tmp_path / 'encoder', 'tiny,steps=10')


def _text(path: pathlib.Path, size: int) -> str:
    """A text file of exactly `size` bytes; its path."""
    line = 'the red cat sat on the mat .\n'
    path.write_text((line * (size // len(line) + 1))[:size - 1] + '\n')
    return str(path)


@pytest.mark.parametrize('arg', ['tiny', 'tiny,recipe=modern,data=general', 'mini,data=pydocs',
                                 'tiny,recipe=modern,data=tasks'])
def test_the_demo_and_named_corpora_resolve_unchanged(tmp_path, arg):
    cfg = get_config(arg)
    out, lines = _resolve(cfg, tmp_path / 'run')
    assert _flat(out) == _flat(get_config(arg)) and lines == []
    assert out.data.small_corpus_choice == '' and out.init_from == ''


def test_a_mixture_and_an_hf_dataset_resolve_unchanged(tmp_path):
    cfg = get_config('tiny')
    cfg.data.sources.mine = _text(tmp_path / 'mine.txt', 1000)
    cfg.data.mixture = 'general:1,mine:1'
    assert _flat(_resolve(cfg, tmp_path / 'run')[0]) == _flat(cfg)
    cfg = get_config('tiny')
    cfg.data.train_files = 'hf:some/dataset'
    assert _flat(_resolve(cfg, tmp_path / 'run')[0]) == _flat(cfg)


def test_the_threshold_boundary_and_what_a_small_corpus_becomes(tmp_path, encoder):
    cfg = get_config('tiny')
    cfg.data.train_files = _text(tmp_path / 'mine.txt', 300_000)
    cfg.data.small_corpus_encoder = encoder
    mb = 300_000 / small_corpus.MB
    cfg.data.small_corpus_mb = mb  # as large as the threshold: large, trained as configured
    assert _flat(_resolve(cfg, tmp_path / 'run')[0]) == _flat(cfg)
    cfg.data.small_corpus_mb = mb * 1.001
    out, lines = _resolve(cfg, tmp_path / 'run')
    saved = json.loads((pathlib.Path(encoder) / 'config.json').read_text())
    assert out.init_from == encoder and out.data.small_corpus_choice == 'general_encoder'
    assert (out.num_train_steps, out.optimizer.learning_rate, out.optimizer.warmup_steps) == (
        300, 1e-3, 30)
    assert out.masking.mask_rate == saved['masking']['mask_rate']
    assert out.optimizer.schedule == saved['optimizer']['schedule']
    before, after = _flat(cfg), _flat(out)
    assert {k for k in before if before[k] != after[k]} <= CHANGED
    assert len(lines) == 1 and '--config.data.small_corpus_mb=0 turns this off' in lines[0]
    assert f'0.29 MB of text < data.small_corpus_mb={mb * 1.001:g}' in lines[0]
    assert cfg.init_from == '' and cfg.num_train_steps == 700  # the given config is left alone


def test_the_rule_resolves_to_the_measured_continued_run(tmp_path):
    """The README's one command (plain `tiny`) becomes docs/benchmark.md's measured
    continued run (`tiny,recipe=modern` + init_from + 300 steps, lr 1e-3, warm-up 30) key for
    key, but for the model (init_from's, for both) and the recorded choice."""
    encoder = _encoder_dir(tmp_path / 'general', small_corpus.GENERAL_ENCODER)
    files = _text(tmp_path / 'mine.txt', 1000)
    cfg = get_config('tiny')
    cfg.data.train_files, cfg.data.small_corpus_encoder = files, encoder
    out = _flat(_resolve(cfg, tmp_path / 'run')[0])
    docs = get_config('tiny,recipe=modern')
    docs.init_from, docs.data.train_files, docs.num_train_steps = encoder, files, 300
    docs.optimizer.learning_rate, docs.optimizer.warmup_steps = 1e-3, 30
    docs.data.small_corpus_encoder = encoder
    docs = _flat(docs)
    differ = {k for k in out.keys() | docs.keys() if out.get(k) != docs.get(k)}
    # init_from's architecture replaces both model sections but for the run's own fields.
    from_encoder = {k for k in differ if k.startswith('model.')
                    and k.removeprefix('model.') not in RUNTIME_FIELDS}
    assert differ - from_encoder == {'data.small_corpus_choice'}


def test_off_and_an_explicit_init_from_resolve_unchanged(tmp_path, encoder):
    cfg = get_config('tiny')
    cfg.data.train_files = _text(tmp_path / 'mine.txt', 1000)
    cfg.data.small_corpus_encoder = encoder
    cfg.data.small_corpus_mb = 0.0
    assert _flat(_resolve(cfg, tmp_path / 'run')[0]) == _flat(cfg)
    cfg.data.small_corpus_mb = 25.0
    cfg.init_from = encoder  # the user's own continued run: their settings
    out, lines = _resolve(cfg, tmp_path / 'run')
    assert _flat(out) == _flat(cfg) and out.num_train_steps == 700 and lines == []


def test_bad_keys_are_one_line_errors(tmp_path):
    cfg = get_config('tiny')
    cfg.data.train_files = _text(tmp_path / 'mine.txt', 1000)
    cfg.data.small_corpus_encoder = str(tmp_path / 'missing')
    with pytest.raises(ConfigError, match=r"^data.small_corpus_encoder: '.*missing' is no "
                                          r'directory; build it with `launch.py pretrain '
                                          r'--config configs/pretrain.py:tiny,recipe=modern,'):
        _resolve(cfg, tmp_path / 'run')
    (tmp_path / 'empty').mkdir()
    cfg.data.small_corpus_encoder = str(tmp_path / 'empty')
    with pytest.raises(ConfigError, match='not a pretraining workdir'):
        _resolve(cfg, tmp_path / 'run')
    cfg.data.small_corpus_encoder, cfg.data.small_corpus_mb = '', -1.0
    with pytest.raises(ConfigError, match=r'^data.small_corpus_mb: must be >= 0'):
        _resolve(cfg, tmp_path / 'run')
    cfg.data.small_corpus_mb, cfg.data.small_corpus_choice = 25.0, 'general_encoder'
    with pytest.raises(ConfigError, match=r'^data.small_corpus_choice: .* written by the run'):
        _resolve(cfg, tmp_path / 'run')


def test_a_missing_named_encoder_from_the_command_line(tmp_path, capsys, corpus):
    workdir = tmp_path / 'run'
    argv = ['pretrain', '--workdir', str(workdir), *tiny_args(
        corpus, 2, '--config.data.small_corpus_mb=25',
        f'--config.data.small_corpus_encoder={tmp_path / "nope"}')]
    assert launch.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: data.small_corpus_encoder: ') and err.count('\n') == 1
    assert not workdir.exists()


def test_the_cache_encoder_is_built_once(tmp_path, monkeypatch):
    monkeypatch.setenv('BERTJAX_CACHE', str(tmp_path / 'cache'))
    cfg = get_config('tiny')
    cfg.data.train_files = _text(tmp_path / 'mine.txt', 1000)
    built = []

    def build(config, path):  # stands in for the 25-minute run: a finished encoder
        built.append((_flat(config), path))
        _encoder_dir(pathlib.Path(path), small_corpus.GENERAL_ENCODER)
    out, lines = _resolve(cfg, tmp_path / 'run', build)
    cache = str(tmp_path / 'cache' / 'encoders' / small_corpus.CACHE_NAME)
    assert built == [(_flat(get_config(small_corpus.GENERAL_ENCODER)), cache)]
    assert out.init_from == cache and 'building it once now' in lines[0]
    out, lines = _resolve(cfg, tmp_path / 'run2')  # no build: it is there
    assert out.init_from == cache and 'building' not in lines[0]


def test_a_bad_key_is_one_line_before_the_cache_encoder_is_built(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('BERTJAX_CACHE', str(tmp_path / 'cache'))
    argv = ['pretrain', '--workdir', str(tmp_path / 'run'), '--config.batch_size=0',
            f'--config.data.train_files={_text(tmp_path / "mine.txt", 1000)}']
    assert launch.main(argv) == 2
    out, err = capsys.readouterr()
    assert 'building it once now' in out  # the choice, then the user's own config's error
    assert err == 'error: batch_size: must be >= 1, got 0\n'
    assert not (tmp_path / 'cache' / 'encoders').exists() and not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_a_small_corpus_run_records_its_choice_and_resumes(tmp_path, capsys, corpus,
                                                           pretrained_run):
    workdir = tmp_path / 'run'
    args = tiny_args(corpus, 4, '--config.data.small_corpus_mb=25',
                     f'--config.data.small_corpus_encoder={pretrained_run}')
    stop = ['--config.train_tokens=' + str(16 * 32 * 150)]  # a budget: ends at step 150
    assert launch.main(['pretrain', '--workdir', str(workdir), *args, *stop]) == 0
    out = capsys.readouterr().out
    assert out.count('small corpus: ') == 1 and 'starting from init_from' in out
    saved = json.loads((workdir / 'config.json').read_text())
    assert saved['data']['small_corpus_choice'] == 'general_encoder'
    assert saved['init_from'] == pretrained_run and saved['num_train_steps'] == 300
    assert saved['optimizer']['learning_rate'] == 1e-3
    assert read_metrics(workdir)[-1]['step'] == 150
    assert launch.main(['pretrain', '--workdir', str(workdir), *args]) == 0
    assert 'resuming from step 150' in capsys.readouterr().out
    assert read_metrics(workdir)[-1]['step'] == 300
    # Turned off on resume: the recorded choice is compared, one line, nothing written.
    before = (workdir / 'metrics.jsonl').read_bytes()
    assert launch.main(['pretrain', '--workdir', str(workdir), *args,
                        '--config.data.small_corpus_mb=0']) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: data.small_corpus_choice: the run in ') and err.count('\n') == 1
    assert (workdir / 'metrics.jsonl').read_bytes() == before


@pytest.mark.slow
def test_a_workdir_from_before_the_rule_resumes_without_it(tmp_path, capsys, corpus,
                                                           encoder):
    workdir = tmp_path / 'old'
    args = tiny_args(corpus, 4)  # from scratch (small_corpus_mb=0)
    assert launch.main(['pretrain', '--workdir', str(workdir), *args,
                        f'--config.train_tokens={16 * 32 * 2}']) == 0
    config = json.loads((workdir / 'config.json').read_text())
    for key in ('small_corpus_mb', 'small_corpus_encoder', 'small_corpus_choice'):
        del config['data'][key]  # as written before the keys existed
    (workdir / 'config.json').write_text(json.dumps(config))
    capsys.readouterr()
    assert launch.main(['pretrain', '--workdir', str(workdir), *args,  # today's default
                        '--config.data.small_corpus_mb=25',
                        f'--config.data.small_corpus_encoder={encoder}']) == 0
    out = capsys.readouterr().out
    assert 'resuming from step 2' in out and 'small corpus' not in out
    assert read_metrics(workdir)[-1]['step'] == 4
