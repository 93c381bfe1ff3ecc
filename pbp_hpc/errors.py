"""The package's own error types: every expected failure is one of these, never a raw traceback;
and the exit codes a run ends with (defined here once; parallel/runtime.py maps errors to them)."""

EXIT_FAILED = 1  # one rank's failure: the world was aborted
EXIT_SETUP = 2  # a bad config, data or checkpoint, or a world that does not match it
EXIT_DIVERGED = 3  # the loss or the parameters stopped being finite
EXIT_STALLED = 4  # a step waited longer than parallel.stall_timeout_s for another rank: the world was aborted
EXIT_STOPPED = 128  # + the signal's number (143: SIGTERM, 138: SIGUSR1): stopped outside the training loop
EXIT_INTERRUPTED = 130  # the shell's code for SIGINT


class PbpError(Exception):
    """Base class: a failure the user can act on, with a message that says how."""


class ConfigError(PbpError):
    """A configuration file or override is unknown, mistyped or impossible."""


class DataError(PbpError):
    """Data files are missing, corrupt or inconsistent."""


class ResultsError(PbpError):
    """A results file is unreadable or of another schema."""


class DivergenceError(PbpError):
    """Training produced a NaN or Inf; the run is not a result."""

    def __init__(self, message: str, epoch: int, step: int):
        super().__init__(message)
        self.epoch = epoch
        self.step = step


class WorldSizeError(PbpError):
    """The MPI world is not the one the run asked for (wrong launcher or plugin)."""


class InjectedFault(PbpError):
    """A test-only fault requested through `debug.fail_rank` / `debug.fail_step`."""


class StallError(PbpError):
    """A step waited longer than parallel.stall_timeout_s for other ranks (one stopped, hung or lost)."""


class Stopped(BaseException):
    """SIGTERM/SIGUSR1 outside the training loop: setup, download, evaluation, writing results.

    A BaseException, as KeyboardInterrupt is, so that no `except Exception` on the way swallows it;
    the entry point ends the run with runtime.EXIT_STOPPED + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum
