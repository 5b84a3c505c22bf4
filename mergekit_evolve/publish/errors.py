"""The one error type of the publishing step: its message says what failed and what to do."""


class PublishError(RuntimeError):
    pass
