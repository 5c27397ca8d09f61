"""Serving EchoX to many listeners at once: `EchoXServer` (see server.py)."""

from .errors import (
    EchoXInputError,
    EchoXRequestCancelled,
    EchoXServerBusy,
    EchoXServerClosed,
)
from .request import EchoXAnswer, EchoXRequest
from .server import EchoXServer

__all__ = [
    "EchoXAnswer",
    "EchoXInputError",
    "EchoXRequest",
    "EchoXRequestCancelled",
    "EchoXServer",
    "EchoXServerBusy",
    "EchoXServerClosed",
]
