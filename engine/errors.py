"""The errors a run can end with, in one place; launch.py turns each into its exit line.

ConfigError is a user's mistake (one line, exit 2); Preempted is a saved, resumable stop
(exit 75); the others are failures that keep the last good checkpoint.
"""


class ConfigError(ValueError):
    """A user error in the config or the command line; shown as one line, exit code 2."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or Inf; the run stops without saving the bad state."""


class Preempted(Exception):
    """SIGTERM or SIGINT arrived; a checkpoint of the step reached was written."""


class CheckpointSaveFailed(RuntimeError):
    """A checkpoint could not be written (disk full, permissions, ...): the run stops there,
    the checkpoints written before it left as they were. Raised by engine.checkpoint."""


class PeerFailed(RuntimeError):
    """Another process of this run failed; the error itself is in that process's log."""
