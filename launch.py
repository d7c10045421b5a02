"""Command-line entry: `python launch.py SUBCOMMAND ...`.

Subcommands:
  prepare    train the tokenizer and prepare the corpus (pretrain runs it when needed)
  pretrain   masked-LM pretraining (resumes from WORKDIR's latest checkpoint if any)
  finetune   fine-tune a pretraining run's encoder on a classification/regression task,
             tags per word, extractive QA, or contrastively into sentence embeddings
  predict    class probabilities (labels per word, answers) of a fine-tuned run, as JSONL
  embed      sentence embeddings of any run's encoder for new text (.npy + ids, or JSONL)
  evaluate   fine-tune tasks x variants x seeds; mean ± std tables (pretrained vs scratch)
  search     hyper-parameter search over fine-tuning configs (optuna; resumes from study.db)
  pseudolabel  fine-tune, pseudo-label unlabelled text above a confidence threshold, retrain
  export     a workdir -> a Hugging Face transformers BERT directory (parity-checked)
  import     a Hugging Face BERT/RoBERTa/DistilBERT/ELECTRA directory -> a workdir
  plot       overlay the curves of several runs (each run also draws its own curves.png)

Examples:
  python launch.py pretrain --config configs/pretrain.py:tiny --workdir runs/tiny
  python launch.py pretrain --config configs/pretrain.py:mini --workdir runs/mini \\
      --config.num_train_steps=2000 --config.mesh.shape='(2,4)'
  python launch.py finetune --config configs/finetune.py:sentiment --workdir runs/ft \\
      --config.init_from=runs/tiny
  python launch.py predict --workdir runs/ft --input reviews.txt --output predictions.jsonl
  python launch.py embed --workdir runs/tiny --input sentences.txt --output vectors.npy
  python launch.py pretrain --config configs/pretrain.py:large --workdir gs://bucket/run \\
      --config.mesh.shape='(16,16)' --dry-run
  python launch.py tpu --name my-v5e-64 --zone us-central2-b -- pretrain \\
      --config configs/pretrain.py:base --workdir gs://my-bucket/runs/base
  python launch.py slurm --nodes 4 --gpus-per-node 8 --submit -- pretrain \\
      --config configs/pretrain.py:base --workdir /shared/runs/base
  python launch.py export --workdir runs/tiny --output hf/tiny
  python launch.py import --hf-dir hf/tiny --workdir runs/from_hf
  python launch.py evaluate --config configs/suite.py:demo --workdir runs/eval \\
      --config.init_from=runs/tiny
  python launch.py search --config configs/search.py:demo --workdir runs/search \\
      --config.init_from=runs/tiny --config.sampler=random
  python launch.py pseudolabel --config configs/pseudolabel.py:demo --workdir runs/pl \\
      --config.init_from=runs/tiny

`--config FILE:ARG` and `--config.KEY=VALUE` overrides apply to the subcommands that take a
config; anything after a bare `--` is passed through untouched (to `args.passthrough`).
"""

import argparse
import json
import logging
import os
import pathlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

from engine import cli_args
from engine.config_cli import apply_overrides, config_to_json, load_config, split_config_args
from engine.errors import ConfigError


def _pretrain(config, args) -> None:
    _check_compile_for(args)
    if args.dry_run:
        from pretrain import dry_run
        dry_run.run(config, args.config_spec, args.compile_for)
        return
    from engine import distributed
    distributed.initialize(args)  # before anything touches a device
    from pretrain import train  # imported late so `--help` and config errors stay instant
    train.run(config, args.workdir)


def _prepare(config, args) -> None:
    from engine import distributed
    distributed.initialize(args)
    from pretrain import train
    train.prepare_only(config, args.workdir, beam_options=args.passthrough if args.beam else None)


def _finetune(config, args) -> None:
    _check_compile_for(args)
    if args.dry_run:
        from finetune import dry_run
        dry_run.run(config, args.config_spec, args.compile_for)
        return
    from engine import distributed
    distributed.initialize(args)
    from finetune import train
    train.run(config, args.workdir)


def _predict(config, args) -> None:
    from finetune import predict, span_predict
    if span_predict.is_span_run(args.workdir):  # labels per word, or answers
        span_predict.run(args.workdir, args.input, args.output)
    else:
        predict.run(args.workdir, args.input, args.output)


def _embed(config, args) -> None:
    from finetune import embed_cmd
    embed_cmd.run(args.workdir, args.input, args.output, step=args.step,
                  batch_size=args.batch_size, text_column=args.text_column, mesh=args.mesh)


def _evaluate(config, args) -> None:
    from studies import suite
    suite.run(config, args.workdir)


def _search(config, args) -> None:
    from studies import search  # imports optuna only here
    search.run(config, args.workdir)


def _pseudolabel(config, args) -> None:
    from studies import pseudolabel
    pseudolabel.run(config, args.workdir)


def _check_compile_for(args) -> None:
    if args.compile_for and not args.dry_run:
        raise ConfigError('--compile-for: needs --dry-run (it compiles, it does not run)')


def _tpu(config, args) -> None:
    import shlex
    import subprocess

    from engine import cluster
    parse(args.passthrough)  # a misspelt key fails here, not on every host
    try:
        command = cluster.tpu_command(args.name, args.zone, args.passthrough, args.remote_dir,
                                      args.project, cluster.pinned_jax_version())
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(shlex.join(command), flush=True)
    if args.execute:
        subprocess.run(command, check=True)


def _slurm(config, args) -> None:
    import pathlib
    import subprocess

    from engine import cluster
    parse(args.passthrough)
    try:
        script = cluster.sbatch_script(args.passthrough, args.nodes, args.gpus_per_node,
                                       args.job_name, args.time, str(pathlib.Path.cwd()),
                                       args.partition)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    pathlib.Path(args.script).write_text(script)
    print(f'wrote {args.script}:\n{script}', end='', flush=True)
    if args.submit:
        subprocess.run(['sbatch', args.script], check=True)


def _export(config, args) -> None:
    from convert import export
    export.run(args.workdir, args.output, args.step, check=not args.no_verify)


def _import(config, args) -> None:
    from convert import importer
    importer.run(args.hf_dir, args.workdir, args.step)


def _plot(config, args) -> None:
    from engine import curves, extras
    extras.require('matplotlib', 'launch.py plot')
    keys = [k.strip() for k in args.keys.split(',') if k.strip()]
    try:
        output = curves.draw_overlay(args.workdirs, args.output, keys)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(f'wrote {output}')


# How a command writes a path argument: INTO the folder it names (created if missing), or
# BESIDE it (a file or folder made as a temporary in its parent, then renamed).
INTO, BESIDE = 'into', 'beside'


@dataclass(frozen=True)
class Command:
    run: Callable  # run(config or None, args)
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    default_config: str = ''  # '' = the command takes no --config
    docs: str = ''  # the docs page that explains it
    main_keys: tuple[str, ...] = ()  # the keys a user sets first, shown with defaults in --help
    writes: tuple[tuple[str, str], ...] = ()  # (args attribute, INTO or BESIDE)


WORKDIR = (('workdir', INTO),)


PRETRAIN_KEYS = ('data.train_files', 'num_train_steps', 'batch_size', 'seq_len',
                 'model.num_layers', 'model.hidden_size', 'optimizer.learning_rate',
                 'mesh.shape', 'init_from')
COMMANDS = {
    'pretrain': Command(_pretrain, 'masked-LM pretraining', cli_args.pretrain_arguments,
                        'configs/pretrain.py:tiny', 'docs/pretraining.md', PRETRAIN_KEYS,
                        writes=WORKDIR),
    'prepare': Command(_prepare, 'tokenizer + corpus preparation only (pretrain does it when '
                       'needed): parallel, resumable, packed array_record shards',
                       cli_args.prepare_arguments, 'configs/pretrain.py:tiny', 'docs/data.md',
                       ('data.train_files', 'seq_len', 'model.vocab_size', 'data.workers'),
                       writes=WORKDIR),
    'finetune': Command(_finetune, 'fine-tune on a classification/regression task',
                        cli_args.finetune_arguments, 'configs/finetune.py:sentiment',
                        'docs/finetuning.md',
                        ('init_from', 'data.train_file', 'data.text_column',
                         'data.label_column', 'task', 'num_epochs', 'learning_rate',
                         'batch_size', 'seq_len', 'metric', 'freeze'),
                        writes=WORKDIR),
    'predict': Command(_predict, 'predict with a fine-tuned run', cli_args.predict_arguments,
                       docs='docs/finetuning.md', writes=(('output', BESIDE),)),
    'embed': Command(_embed, 'sentence embeddings of a run for new text', cli_args.embed_arguments,
                     docs='docs/embeddings.md', writes=(('output', BESIDE),)),
    'export': Command(_export, 'export to Hugging Face transformers', cli_args.export_arguments,
                      docs='docs/huggingface.md', writes=(('output', BESIDE),)),
    'import': Command(_import, 'import a Hugging Face BERT, RoBERTa, DistilBERT, ELECTRA',
                      cli_args.import_arguments,
                      docs='docs/huggingface.md', writes=(('workdir', BESIDE),)),
    'evaluate': Command(_evaluate, 'multi-seed fine-tuning suite: mean ± std tables',
                        cli_args.workdir_arguments, 'configs/suite.py:demo', 'docs/finetuning.md',
                        ('init_from', 'seeds', 'baselines'), writes=WORKDIR),
    'search': Command(_search, 'hyper-parameter search (optuna TPE or random), resumable',
                      cli_args.workdir_arguments, 'configs/search.py:demo', 'docs/search.md',
                      ('init_from', 'sampler', 'num_trials', 'pruner'), writes=WORKDIR),
    'pseudolabel': Command(_pseudolabel, 'self-training: fine-tune, pseudo-label an unlabelled '
                           'pool above a confidence threshold, retrain', cli_args.workdir_arguments,
                           'configs/pseudolabel.py:demo', 'docs/pseudolabel.md',
                           ('init_from', 'unlabeled_file', 'threshold', 'rounds'),
                           writes=WORKDIR),
    'plot': Command(_plot, "overlay several runs' curves (metrics.jsonl) in one picture",
                    cli_args.plot_arguments, docs='docs/observability.md',
                    writes=(('output', BESIDE),)),
    'tpu': Command(_tpu, 'print/run the gcloud command starting a run on every TPU VM worker',
                   cli_args.tpu_arguments, docs='docs/clusters.md'),
    'slurm': Command(_slurm, 'write/submit an sbatch script starting a run on SLURM',
                     cli_args.slurm_arguments, docs='docs/clusters.md',
                     writes=(('script', BESIDE),)),
}


def help_epilog(command: Command) -> str:
    """What `SUBCOMMAND --help` adds below the flags: the config family, its main keys with
    their defaults, and the docs page."""
    lines = []
    if command.default_config:
        family = command.default_config.partition(':')[0]
        config = load_config(command.default_config)
        lines += [f'config family: {family} (--config {family}:ARG; its docstring lists ARGs)',
                  f'main keys, with the defaults of {command.default_config}:']
        for key in command.main_keys:
            value = config
            for part in key.split('.'):
                value = value[part]
            lines.append(f'  --config.{key}={value!r}')
        lines.append('every key and value: add --print-config')
    if command.docs:
        lines.append(f'docs: {command.docs}')
    return '\n'.join(lines)


# `bertjax` when run as the console command, else `launch.py`.
PROG = 'bertjax' if pathlib.Path(sys.argv[0]).name == 'bertjax' else 'launch.py'


class OptionalArgumentsParser(argparse.ArgumentParser):
    """For --print-config: no argument is required (e.g. `finetune --print-config` needs no
    --workdir)."""

    def add_argument(self, *args, **kwargs):
        kwargs.pop('required', None)
        return super().add_argument(*args, **kwargs)


def _parser(details: bool = False, printing: bool = False) -> argparse.ArgumentParser:
    """The argument parser; `details` (for --help) adds each subcommand's epilog, which
    loads its default config; `printing` (--print-config) requires no argument."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    commands = parser.add_subparsers(
        dest='command', required=True, metavar='COMMAND',
        parser_class=OptionalArgumentsParser if printing else argparse.ArgumentParser)
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.help, description=command.help)
        if command.default_config:
            sub.add_argument('--config', metavar='FILE:ARG',
                             help=f'config (default {command.default_config}); '
                                  'override keys with --config.KEY=VALUE')
        sub.add_argument('--print-config', action='store_true',
                         help='print the config this command would run with (after '
                              'overrides; auto values, 0, are resolved at the start of the '
                              'run and recorded in config.json), then exit')
        command.add_arguments(sub)
        if details:
            sub.formatter_class = argparse.RawDescriptionHelpFormatter
            sub.epilog = '\n\n'.join(e for e in (sub.epilog, help_epilog(command)) if e)
    return parser


def parse(argv: list[str]):
    """Returns (Command, resolved config or None, parsed args)."""
    passthrough: list[str] = []
    if '--' in argv:
        cut = argv.index('--')
        argv, passthrough = argv[:cut], argv[cut + 1:]
    spec, overrides, rest = split_config_args(argv)
    args = _parser(details='-h' in rest or '--help' in rest,
                   printing='--print-config' in rest).parse_args(rest)
    args.passthrough = passthrough
    command = COMMANDS[args.command]
    if not command.default_config:
        if spec or overrides:
            raise ConfigError(f'{args.command} takes no --config')
        return command, None, args
    args.config_spec = spec or command.default_config
    config = load_config(args.config_spec)
    apply_overrides(config, overrides)
    return command, config, args


# Libraries whose INFO lines would bury ours (orbax, grain and tfds log through absl).
QUIET_LOGGERS = ('absl', 'jax', 'orbax', 'etils', 'urllib3', 'gcsfs', 'google')


def _configure_logging() -> None:
    """Our `log.info` lines to stderr, bare; the libraries' only from WARNING up. A root
    logger that already has handlers (a caller's, pytest's) is left as it is."""
    logging.basicConfig(level=logging.INFO, format='%(message)s', stream=sys.stderr)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def check_writable(command: Command, args) -> None:
    """One `error:` line before any work (a prediction computed, a model loaded) when a path
    the command writes is not writable, instead of a PermissionError traceback or lost work."""
    from engine.paths import check_writable as check
    if getattr(args, 'dry_run', False):
        return  # a dry run writes nothing
    for name, how in command.writes:
        value = getattr(args, name)
        if value and value != '-':
            check(value if how == INTO else os.path.dirname(os.path.abspath(value)),
                  '--' + name.replace('_', '-'))


def main(argv: list[str]) -> int:
    _configure_logging()
    try:
        command, config, args = parse(argv)
        if args.print_config:
            print_config(config, args)
            return 0
        check_writable(command, args)
        command.run(config, args)
    except ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside training, or a second Ctrl-C: stopped at once
        print('interrupted (Ctrl-C): stopped at once, nothing saved since the last '
              'checkpoint', file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it
    except Exception as e:  # the loop's own stop reasons: one clear line, no traceback
        from engine import distributed
        from engine.errors import CheckpointSaveFailed, NonFiniteLoss, Preempted
        from engine.loop import REQUEUE_EXIT_CODE
        if isinstance(e, Preempted):  # saved; 75 asks the scheduler to run it again
            print(str(e), file=sys.stderr)
            return REQUEUE_EXIT_CODE
        if isinstance(e, NonFiniteLoss | CheckpointSaveFailed | distributed.PeerFailed):
            print(f'error: {e}', file=sys.stderr)
            return 1
        raise
    return 0


def print_config(config, args) -> None:
    """--print-config: the config as JSON (config.json's format); a command without one
    prints its arguments."""
    if config is not None:
        print(config_to_json(config))
        return
    shown = {k: v for k, v in vars(args).items() if k not in ('print_config', 'passthrough')}
    print(json.dumps(shown, indent=2, sort_keys=True))


def cli() -> None:
    """The `bertjax` console command (pyproject.toml): `bertjax pretrain ...` is
    `python launch.py pretrain ...`."""
    sys.exit(main(sys.argv[1:]))


if __name__ == '__main__':
    cli()
