"""Cluster launch text (TPU gcloud command, sbatch script), process detection, gs:// paths."""

import argparse
import shlex
import subprocess

import pytest

import launch
from engine import cluster, distributed
from engine.errors import ConfigError
from engine.paths import absolute_path

# A sample run whose overrides need quoting: a space, a single quote, a double quote.
RUN = ['pretrain', '--config', 'configs/pretrain.py:base', '--workdir', 'gs://bucket/my run',
       "--config.data.train_files=/data/it's here/*.txt", '--config.mesh.shape=(16, 4)',
       '--config.data.tokenizer_type="bpe"']


def test_tpu_command_runs_the_same_argv_on_every_worker(capsys):
    assert launch.main(['tpu', '--name', 'my-v5e-64', '--zone', 'us-central2-b', '--', *RUN]) == 0
    line = capsys.readouterr().out.strip()
    words = shlex.split(line)  # what the user's shell passes to gcloud
    assert words[:8] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-v5e-64',
                         '--zone=us-central2-b', '--worker=all']
    assert words[8].startswith('--command=') and len(words) == 9
    remote = shlex.split(words[8][len('--command='):])  # what each worker's shell runs
    first_and = remote.index('&&')
    assert remote[:first_and] == ['cd', '~/bertjax']
    install = remote[first_and + 1:remote.index('&&', first_and + 1)]
    assert install == ['python3', '-m', 'pip', 'install', '-q', '-r', 'requirements.txt',
                       f'jax[tpu]=={cluster.pinned_jax_version()}']
    last_and = len(remote) - 1 - remote[::-1].index('&&')
    assert remote[last_and + 1:] == ['python3', 'launch.py', *RUN]


def test_sbatch_script_text(tmp_path, capsys):
    script = tmp_path / 'run.sbatch'
    argv = ['slurm', '--nodes', '4', '--gpus-per-node', '8', '--time', '24:00:00',
            '--script', str(script), '--', *RUN]
    assert launch.main(argv) == 0
    text = script.read_text()
    assert text in capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0] == '#!/bin/bash'
    for expected in ('#SBATCH --nodes=4', '#SBATCH --ntasks-per-node=1',
                     '#SBATCH --gpus-per-node=8', '#SBATCH --time=24:00:00'):
        assert expected in lines
    assert any(line.startswith('#SBATCH --requeue') for line in lines)
    assert any(line.startswith('#SBATCH --signal=TERM@120') for line in lines)
    srun = next(line for line in lines if line.startswith('srun '))
    assert shlex.split(srun) == ['srun', 'python3', 'launch.py', *RUN]
    assert 'if [ "$status" -eq 75 ]; then' in lines
    assert '  scontrol requeue "$SLURM_JOB_ID"' in lines
    subprocess.run(['bash', '-n', str(script)], check=True)  # valid shell


@pytest.mark.parametrize('flag, value', [
    ('--job-name', 'bert\n#!/bin/sh\ntouch /tmp/owned'), ('--job-name', 'a b'),
    ('--time', '24:00:00\nrm -rf ~'), ('--time', '1h'), ('--partition', 'gpu;reboot'),
])
def test_sbatch_header_values_cannot_inject_shell(tmp_path, capsys, flag, value):
    script = tmp_path / 'never.sbatch'
    assert launch.main(['slurm', '--nodes', '2', flag, value, '--script', str(script),
                        '--', *RUN]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'error: {flag} ') and err.count('\n') == 1 and not script.exists()


def test_sbatch_header_values_in_slurm_formats_are_kept(tmp_path):
    script = tmp_path / 'ok.sbatch'
    assert launch.main(['slurm', '--nodes', '2', '--job-name', 'bert-base_v2.1', '--time',
                        '2-00:00:00', '--partition', 'gpu,gpu-long', '--script', str(script),
                        '--', *RUN]) == 0
    lines = script.read_text().splitlines()
    assert {'#SBATCH --job-name=bert-base_v2.1', '#SBATCH --time=2-00:00:00',
            '#SBATCH --partition=gpu,gpu-long'} <= set(lines)


@pytest.mark.parametrize('run, message', [
    (['predict', '--workdir', 'x', '--input', 'y'], 'after --, give the run to start'),
    (['pretrain', '--workdir', 'x', '--config.model.num_layer=3'], "did you mean"),
])
def test_bad_runs_fail_before_anything_is_generated(tmp_path, capsys, run, message):
    script = tmp_path / 'never.sbatch'
    assert launch.main(['slurm', '--nodes', '2', '--script', str(script), '--', *run]) == 2
    assert message in capsys.readouterr().err and not script.exists()
    assert launch.main(['tpu', '--name', 'n', '--zone', 'z', '--', *run]) == 2


@pytest.mark.parametrize('command, shown', [('tpu', 'gcloud compute tpus tpu-vm ssh my-v5e-64'),
                                            ('slurm', '#SBATCH --nodes=4')])
def test_help_shows_a_generated_example(capsys, command, shown):
    with pytest.raises(SystemExit):
        launch.main([command, '--help'])
    assert shown in capsys.readouterr().out


@pytest.mark.parametrize('environ, mode', [
    ({}, 'single'),
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1'}, 'single'),
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4'}, 'slurm'),
    ({'TPU_WORKER_HOSTNAMES': 'a,b'}, 'tpu'),
])
def test_automatic_mode(environ, mode):
    assert distributed.detect(environ) == mode


def test_explicit_flags_go_together():
    ns = argparse.Namespace
    assert distributed.explicit_settings(ns(coordinator='', num_processes=0,
                                            process_id=-1)) is None
    assert distributed.explicit_settings(ns(coordinator='h:1', num_processes=2,
                                            process_id=1)) == ('h:1', 2, 1)
    with pytest.raises(ConfigError, match='go together'):
        distributed.explicit_settings(ns(coordinator='h:1', num_processes=0, process_id=-1))
    with pytest.raises(ConfigError, match='not in'):
        distributed.explicit_settings(ns(coordinator='h:1', num_processes=2, process_id=2))


def test_cloud_workdirs_pass_through_unchanged(tmp_path, monkeypatch):
    path = absolute_path('gs://bucket/runs/base')
    assert str(path) == 'gs://bucket/runs/base'
    assert str(path / 'checkpoints') == 'gs://bucket/runs/base/checkpoints'
    monkeypatch.chdir(tmp_path)
    assert str(absolute_path('runs/x')) == str(tmp_path / 'runs' / 'x')
