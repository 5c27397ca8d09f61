"""What a request to an `EchoXServer` can fail with, besides a failure inside the model."""


class EchoXServerBusy(RuntimeError):
    """
    Raised by `EchoXServer.submit` when the server holds as many requests as it takes (`max_batch_size` being
    answered plus `max_queue_size` waiting): try again once some have been answered.
    """


class EchoXServerClosed(RuntimeError):
    """Raised by `EchoXServer.submit` after `close`, and by the requests that `close` ended unanswered."""


class EchoXRequestCancelled(RuntimeError):
    """Raised by `EchoXRequest.result` for a request that was cancelled (`cancel`, or its handle was dropped)."""


class EchoXInputError(ValueError):
    """
    A request's input was refused (audio the processor cannot use: too long, empty, not audio, NaN samples...). Only
    that request fails; the message names the problem.
    """
