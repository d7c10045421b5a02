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
"""

import argparse
import sys

from engine.config_cli import ConfigError, apply_overrides, load_config, split_config_args

DEFAULT_CONFIGS = {'pretrain': 'configs/pretrain.py:tiny',
                   'finetune': 'configs/finetune.py:sentiment'}


def _pretrain(config, args) -> None:
    from pretrain import train  # imported late so `--help` and config errors stay instant
    train.run(config, args.workdir)


def _finetune(config, args) -> None:
    from finetune import train
    train.run(config, args.workdir)


def _predict(config, args) -> None:
    from finetune import predict
    predict.run(args.workdir, args.input, args.output)


COMMANDS = {'pretrain': _pretrain, 'finetune': _finetune, 'predict': _predict}


def parse(argv: list[str]):
    """Returns (command function, resolved config or None, parsed args)."""
    spec, overrides, rest = split_config_args(argv)
    parser = argparse.ArgumentParser(
        prog='launch.py', description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument('command', choices=sorted(COMMANDS))
    parser.add_argument('--workdir', required=True, help='run directory (created if missing)')
    parser.add_argument('--input', help='predict: a text file (one text a line), CSV or JSONL')
    parser.add_argument('--output', default='', help='predict: JSONL path (default: stdout)')
    args = parser.parse_args(rest)
    if args.command == 'predict':
        if not args.input:
            raise ConfigError('--input: predict needs a file of texts')
        return COMMANDS[args.command], None, args
    config = load_config(spec or DEFAULT_CONFIGS[args.command])
    apply_overrides(config, overrides)
    return COMMANDS[args.command], config, args


def main(argv: list[str]) -> int:
    try:
        command, config, args = parse(argv)
        command(config, args)
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
