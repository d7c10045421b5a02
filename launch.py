"""Command-line entry: `python launch.py SUBCOMMAND ...`.

Subcommands:
  pretrain   masked-LM pretraining (resumes from WORKDIR's latest checkpoint if any)
  finetune   fine-tune a pretraining run's encoder on a classification/regression task
  predict    class probabilities of a fine-tuned run for new text, as JSONL

Examples:
  python launch.py pretrain --config configs/pretrain.py:tiny --workdir runs/tiny
  python launch.py pretrain --config configs/pretrain.py:mini --workdir runs/mini \\
      --config.num_train_steps=2000 --config.mesh.shape='(2,4)'
  python launch.py finetune --config configs/finetune.py:sentiment --workdir runs/ft \\
      --config.init_from=runs/tiny
  python launch.py predict --workdir runs/ft --input reviews.txt --output predictions.jsonl

`--config FILE:ARG` and `--config.KEY=VALUE` overrides apply to the subcommands that take a
config; anything after a bare `--` is passed through untouched (to `args.passthrough`).
"""

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

from engine.config_cli import ConfigError, apply_overrides, load_config, split_config_args


def _pretrain(config, args) -> None:
    from pretrain import train  # imported late so `--help` and config errors stay instant
    train.run(config, args.workdir)


def _finetune(config, args) -> None:
    from finetune import train
    train.run(config, args.workdir)


def _predict(config, args) -> None:
    from finetune import predict
    predict.run(args.workdir, args.input, args.output)


def _workdir_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--workdir', required=True, help='run directory (created if missing)')


def _predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--workdir', required=True, help='a fine-tuning run directory')
    parser.add_argument('--input', required=True,
                        help='a text file (one text a line), CSV or JSONL')
    parser.add_argument('--output', default='', help='JSONL path (default: stdout)')


@dataclass(frozen=True)
class Command:
    run: Callable  # run(config or None, args)
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    default_config: str = ''  # '' = the command takes no --config


COMMANDS = {
    'pretrain': Command(_pretrain, 'masked-LM pretraining', _workdir_arguments,
                        'configs/pretrain.py:tiny'),
    'finetune': Command(_finetune, 'fine-tune on a classification/regression task',
                        _workdir_arguments, 'configs/finetune.py:sentiment'),
    'predict': Command(_predict, 'predict with a fine-tuned run', _predict_arguments),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='launch.py', description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    commands = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.help)
        if command.default_config:
            sub.add_argument('--config', metavar='FILE:ARG',
                             help=f'config (default {command.default_config}); '
                                  'override keys with --config.KEY=VALUE')
        command.add_arguments(sub)
    return parser


def parse(argv: list[str]):
    """Returns (Command, resolved config or None, parsed args)."""
    passthrough: list[str] = []
    if '--' in argv:
        cut = argv.index('--')
        argv, passthrough = argv[:cut], argv[cut + 1:]
    spec, overrides, rest = split_config_args(argv)
    args = _parser().parse_args(rest)
    args.passthrough = passthrough
    command = COMMANDS[args.command]
    if not command.default_config:
        if spec or overrides:
            raise ConfigError(f'{args.command} takes no --config')
        return command, None, args
    config = load_config(spec or command.default_config)
    apply_overrides(config, overrides)
    return command, config, args


def main(argv: list[str]) -> int:
    try:
        command, config, args = parse(argv)
        command.run(config, args)
    except ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except Exception as e:  # the loop's own stop reasons: one clear line, no traceback
        from engine.loop import NonFiniteLoss, Preempted
        if isinstance(e, Preempted):
            print(str(e), file=sys.stderr)
            return 0
        if isinstance(e, NonFiniteLoss):
            print(f'error: {e}', file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
