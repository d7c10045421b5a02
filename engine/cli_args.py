"""The flags of each `launch.py` subcommand: one `*_arguments(parser)` a command (launch.py's
COMMANDS table names them); the entry functions that read them stay in launch.py."""

import argparse


def prepare_arguments(parser: argparse.ArgumentParser) -> None:
    train_arguments(parser)
    parser.add_argument('--beam', action='store_true',
                        help='prepare with an Apache Beam pipeline (optional extra); Beam '
                             "options follow a bare '--', e.g. -- --runner=DataflowRunner")


def embed_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--workdir', required=True,
                        help='a pretraining, embedding or other fine-tuning run')
    parser.add_argument('--input', required=True,
                        help='a text file (one text a line), CSV, TSV or JSONL')
    parser.add_argument('--output', required=True,
                        help='OUT.npy (+ OUT.ids.txt beside it) or OUT.jsonl')
    parser.add_argument('--step', type=int, default=None,
                        help="checkpoint step (default: the latest; a fine-tuning run's best)")
    parser.add_argument('--batch-size', type=int, default=64, help='texts per forward pass')
    parser.add_argument('--text-column', default='text', help='the column of CSV/JSONL input')
    parser.add_argument('--mesh', default='(-1,)',
                        help="device mesh shape over (data, fsdp, tensor), e.g. '(2,4)'")


def workdir_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--workdir', required=True, help='run directory (created if missing)')


def train_arguments(parser: argparse.ArgumentParser) -> None:
    workdir_arguments(parser)
    from engine import cluster
    cluster.add_process_arguments(parser)


def pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    train_arguments(parser)
    dry_run_arguments(parser)


def finetune_arguments(parser: argparse.ArgumentParser) -> None:
    train_arguments(parser)
    dry_run_arguments(parser)


def dry_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--dry-run', action='store_true',
                        help='print the resolved config, mesh, shardings, parameter count, '
                             'FLOPs and memory per device, then exit (nothing is allocated)')
    compile_for_argument(parser)


def compile_for_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--compile-for', default='', metavar='TOPOLOGY',
                        help='with --dry-run: compile the train step for a TPU slice here '
                             '(needs libtpu), e.g. v5e:2x4, v5e:16x16, v4:2x2x4; prints HBM '
                             'per device, fits or not (exit code 2 if not), compiled FLOPs '
                             "and the compiler's estimated step time")


def tpu_arguments(parser: argparse.ArgumentParser) -> None:
    from engine import cluster
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = cluster.tpu_epilog()
    parser.add_argument('--name', required=True, help='TPU VM name')
    parser.add_argument('--zone', required=True)
    parser.add_argument('--project', default='', help='default: gcloud\'s configured project')
    parser.add_argument('--remote-dir', default='~/bertjax',
                        help='where this repository is on every worker')
    parser.add_argument('--execute', action='store_true', help='run it (default: print it)')


def slurm_arguments(parser: argparse.ArgumentParser) -> None:
    from engine import cluster
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = cluster.slurm_epilog()
    parser.add_argument('--nodes', type=int, required=True)
    parser.add_argument('--gpus-per-node', type=int, default=8)
    parser.add_argument('--time', default='', help='time limit, e.g. 24:00:00')
    parser.add_argument('--partition', default='')
    parser.add_argument('--job-name', default='bert')
    parser.add_argument('--script', default='launch.sbatch', help='where to write the script')
    parser.add_argument('--submit', action='store_true', help='also run sbatch on it')


def plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('workdirs', nargs='+', metavar='WORKDIR', help='runs to overlay')
    parser.add_argument('--output', default='curves.png', help='the picture to write')
    parser.add_argument('--keys', default='loss,eval_loss',
                        help='metrics.jsonl keys, one panel each (e.g. loss,eval_accuracy)')


def export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--workdir', required=True, help='a pretraining or fine-tuning run')
    parser.add_argument('--output', required=True, help='directory to create')
    parser.add_argument('--step', type=int, default=None,
                        help="checkpoint step (default: the latest; a fine-tuning run's best)")
    parser.add_argument('--no-verify', action='store_true',
                        help='skip loading the result with transformers to compare logits')


def import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--hf-dir', required=True,
                        help='a local Hugging Face BERT directory (config.json, weights, '
                             'vocab.txt or a sentencepiece/tokenizer file)')
    parser.add_argument('--workdir', required=True, help='run directory to create')
    parser.add_argument('--step', type=int, default=None,
                        help='use the checkpoint-STEP subdirectory of --hf-dir (Trainer '
                             'output); default: --hf-dir itself, else its latest checkpoint-*')


def predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--workdir', required=True, help='a fine-tuning run directory')
    parser.add_argument('--input', required=True,
                        help='a text file (one text a line), CSV or JSONL')
    parser.add_argument('--output', default='', help='JSONL path (default: stdout)')
