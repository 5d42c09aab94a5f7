"""The one exception type users see: a clear, single-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user (flags, files, data). The CLI prints `error: <message>` and exits 2."""

    exit_code = 2


class TrainingStopped(Exception):
    """Training stopped early on purpose (signal, non-finite loss, loss spikes); work was saved."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
