"""The training errors and the exit codes every trainer ends with (runtime.run_trainer turns them into the
process's exit status and RUN/exit_status.json):

    0    done
    1    diverged (DivergedError: the loss or the gradient norm became NaN/inf), or a write failed
         (a full disk: one `error:` line, the last complete checkpoint untouched)
    2    bad input or an unrecoverable state (TrainingError: one `error:` line that says what to do)
    143  stopped by SIGTERM (StoppedError: a checkpoint at the current step, then a `stopped:` line)
"""
from ground.cli import CommandError


class TrainingError(CommandError):
    """Bad input or an unrecoverable training state. Trainers print it as one `error:` line, exit 2."""


class DivergedError(TrainingError):
    """The loss became NaN/inf. Trainers print it as one `error:` line and exit 1."""

    exit_code = 1


class StoppedError(TrainingError):
    """SIGTERM during training: a checkpoint at the current step is saved. Printed as a `stopped:` line;
    exit 143 (128 + SIGTERM, what a process killed by it reports)."""

    exit_code = 143
