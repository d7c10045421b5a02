"""Command-line entry: `python launch.py SUBCOMMAND --config FILE:ARG --workdir DIR [--config.k=v]`.

Subcommands:
  pretrain   masked-LM pretraining (resumes from WORKDIR's latest checkpoint if any)

Examples:
  python launch.py pretrain --config configs/pretrain.py:tiny --workdir runs/tiny
  python launch.py pretrain --config configs/pretrain.py:mini --workdir runs/mini \\
      --config.num_train_steps=2000 --config.mesh.shape='(2,4)'
"""

import argparse
import sys

from engine.config_cli import ConfigError, apply_overrides, load_config, split_config_args

DEFAULT_CONFIGS = {'pretrain': 'configs/pretrain.py:tiny'}


def _pretrain(config, workdir: str) -> None:
    from pretrain import train  # imported late so `--help` and config errors stay instant
    train.run(config, workdir)


COMMANDS = {'pretrain': _pretrain}


def parse(argv: list[str]):
    """Returns (command function, resolved config, workdir)."""
    spec, overrides, rest = split_config_args(argv)
    parser = argparse.ArgumentParser(
        prog='launch.py', description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument('command', choices=sorted(COMMANDS))
    parser.add_argument('--workdir', required=True, help='run directory (created if missing)')
    args = parser.parse_args(rest)
    config = load_config(spec or DEFAULT_CONFIGS[args.command])
    apply_overrides(config, overrides)
    return COMMANDS[args.command], config, args.workdir


def main(argv: list[str]) -> int:
    try:
        command, config, workdir = parse(argv)
        command(config, workdir)
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
