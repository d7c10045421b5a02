"""Cluster launch files, generated in one place: the TPU VM `gcloud ... ssh --worker=all`
command and the SLURM sbatch script. Pure text (no JAX import), so `--help` stays instant.

Both start the same `launch.py pretrain|finetune ...` command on every host: one process
per TPU VM worker, or one SLURM task per node owning all of the node's GPUs (one process
per host is what `jax.distributed.initialize()` expects on TPU and the simplest on GPU:
fewer processes, the local GPUs in one address space). Each process finds the others by
itself (engine/distributed.py); arguments are quoted with shlex, so overrides with spaces
or quotes arrive unchanged.

Preemption: the run saves on SIGTERM and exits with status 75 (engine.loop.
REQUEUE_EXIT_CODE). The sbatch script asks SLURM for SIGTERM 120 s before the time
limit (`--signal=TERM@120`, sent to the tasks, not the batch shell) and requeues the job
itself (`scontrol requeue`, allowed by `--requeue`) when the run exits with 75; a
preemption by the scheduler (PreemptMode=REQUEUE) requeues without it. The requeued job
runs the same command, which resumes from the workdir's latest checkpoint.
"""

import argparse
import pathlib
import re
import shlex
import tomllib
from collections.abc import Sequence

REQUEUE_EXIT_CODE = 75  # engine.loop.REQUEUE_EXIT_CODE (kept import-free here)
TRAINING_COMMANDS = ('pretrain', 'finetune')
JAX_PIN = re.compile(r'^jax==(\S+)$')


def add_process_arguments(parser: argparse.ArgumentParser) -> None:
    """Explicit multi-process flags of a training subcommand (engine/distributed.py)."""
    group = parser.add_argument_group(
        'multi-process', 'default: automatic on TPU VMs and multi-task SLURM steps, '
        'else one process; or give all three')
    group.add_argument('--coordinator', default='', metavar='HOST:PORT',
                       help="process 0's address, reachable from every process")
    group.add_argument('--num-processes', type=int, default=0, metavar='N')
    group.add_argument('--process-id', type=int, default=-1, metavar='I')


def check_run_command(argv: Sequence[str]) -> None:
    """The command to start on the cluster: a training subcommand."""
    if not argv or argv[0] not in TRAINING_COMMANDS:
        raise ValueError(f'after --, give the run to start: one of {list(TRAINING_COMMANDS)} '
                         'and its arguments, e.g. -- pretrain --config ... --workdir DIR')


def tpu_command(name: str, zone: str, argv: Sequence[str], remote_dir: str = '~/bertjax',
                project: str = '', jax_version: str = '') -> list[str]:
    """`gcloud compute tpus tpu-vm ssh NAME --worker=all --command=...` as an argv list.

    On every worker: cd to the code (copied there beforehand), install requirements.txt
    plus the TPU build of the pinned JAX, start `launch.py ARGV`.
    """
    check_run_command(argv)
    tpu_jax = f'jax[tpu]=={jax_version}' if jax_version else 'jax[tpu]'
    remote = ' && '.join([
        f'cd {_remote_path(remote_dir)}',
        f'python3 -m pip install -q -r requirements.txt {shlex.quote(tpu_jax)}',
        shlex.join(['python3', 'launch.py', *argv]),
    ])
    command = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', name, f'--zone={zone}']
    if project:
        command.append(f'--project={project}')
    return command + ['--worker=all', f'--command={remote}']


def _remote_path(path: str) -> str:
    """Quoted, except a leading ~/ that the remote shell must expand."""
    if path.startswith('~/'):
        return '~/' + shlex.quote(path[2:])
    return shlex.quote(path)


# What an #SBATCH header value may hold: a newline or a space would end the header line
# and run the rest as shell (or drop --requeue/--signal after it).
HEADER_VALUES = {'--job-name': re.compile(r'[A-Za-z0-9._-]+'),
                 '--time': re.compile(r'[0-9]+(-[0-9]+)?(:[0-9]+){0,2}'),
                 '--partition': re.compile(r'[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*')}


def check_header_value(flag: str, value: str) -> None:
    """A ValueError naming the flag unless `value` is empty or safe in an #SBATCH line."""
    if value and not HEADER_VALUES[flag].fullmatch(value):
        raise ValueError(f'{flag} {value!r}: use letters, digits, . _ - only'
                         + (' (e.g. 24:00:00 or 2-00:00:00)' if flag == '--time' else ''))


def sbatch_script(argv: Sequence[str], nodes: int, gpus_per_node: int, job_name: str = 'bert',
                  time_limit: str = '', workdir_of_code: str = '.', partition: str = '') -> str:
    """An sbatch script starting `launch.py ARGV` as one task per node (see module doc)."""
    check_run_command(argv)
    if nodes < 1 or gpus_per_node < 0:
        raise ValueError(f'--nodes {nodes} / --gpus-per-node {gpus_per_node}: need nodes >= 1')
    for flag, value in (('--job-name', job_name), ('--time', time_limit),
                        ('--partition', partition)):
        check_header_value(flag, value)
    lines = ['#!/bin/bash', f'#SBATCH --job-name={job_name}', f'#SBATCH --nodes={nodes}',
             '#SBATCH --ntasks-per-node=1']
    if gpus_per_node:
        lines.append(f'#SBATCH --gpus-per-node={gpus_per_node}')
    if time_limit:
        lines.append(f'#SBATCH --time={time_limit}')
    if partition:
        lines.append(f'#SBATCH --partition={partition}')
    lines += [
        '#SBATCH --requeue',
        '#SBATCH --signal=TERM@120',
        '#SBATCH --open-mode=append',
        '#SBATCH --output=slurm-%x-%j.out',
        '# --requeue: the job may go back to the queue (after preemption, or below);',
        '# --signal: SIGTERM to the tasks 120 s before the time limit, so the run saves;',
        '# --open-mode=append: a requeued job appends to the same log.',
        '',
        '# One task per node; each finds the others from SLURM_* (jax.distributed).',
        f'cd {shlex.quote(workdir_of_code)}',
        'export PYTHONUNBUFFERED=1',
        'srun ' + shlex.join(['python3', 'launch.py', *argv]),
        'status=$?',
        f'# {REQUEUE_EXIT_CODE}: the run saved a checkpoint on SIGTERM; run it again.',
        f'if [ "$status" -eq {REQUEUE_EXIT_CODE} ]; then',
        '  scontrol requeue "$SLURM_JOB_ID"',
        'fi',
        'exit "$status"',
    ]
    return '\n'.join(lines) + '\n'


def pinned_jax_version() -> str:
    """The `jax==X` pin among pyproject.toml's dependencies ('' if none)."""
    pyproject = pathlib.Path(__file__).resolve().parents[1] / 'pyproject.toml'
    if not pyproject.is_file():
        return ''
    dependencies = tomllib.loads(pyproject.read_text())['project']['dependencies']
    pins = [m.group(1) for m in map(JAX_PIN.match, dependencies) if m]
    return pins[0] if pins else ''


TPU_EXAMPLE = ['pretrain', '--config', 'configs/pretrain.py:base', '--workdir',
               'gs://my-bucket/runs/base',  # every worker reads and writes the bucket
               "--config.mesh.shape=(-1,)"]
SLURM_EXAMPLE = ['pretrain', '--config', 'configs/pretrain.py:base', '--workdir', '/shared/run']


def tpu_epilog() -> str:
    example = tpu_command('my-v5e-64', 'us-central2-b', TPU_EXAMPLE,
                          jax_version=pinned_jax_version())
    return ('example:\n  python launch.py tpu --name my-v5e-64 --zone us-central2-b -- '
            + shlex.join(TPU_EXAMPLE) + '\nprints (and with --execute runs):\n  '
            + shlex.join(example) + '\ncopy the code to every worker first, e.g.\n  '
            'gcloud compute tpus tpu-vm scp --recurse --worker=all --zone=ZONE . NAME:~/bertjax')


def slurm_epilog() -> str:
    return ('example:\n  python launch.py slurm --nodes 4 --gpus-per-node 8 --time 24:00:00 '
            '-- ' + shlex.join(SLURM_EXAMPLE) + '\nwrites (and with --submit submits):\n'
            + sbatch_script(SLURM_EXAMPLE, 4, 8, time_limit='24:00:00'))
