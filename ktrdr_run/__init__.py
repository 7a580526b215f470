"""ktrdr-run's client side: the Python client API and the ``ktrdr-run`` command line.

``from ktrdr_run import Client`` (async) or ``SyncClient`` (blocking, for notebooks). The
events an op's ``events()`` yields and its ``OpRecord`` are re-exported here.
"""

from ktrdr_run.client import Client, Op
from ktrdr_run.errors import ClientError, KtrdrError
from ktrdr_run.sync import SyncClient, SyncOp
from runner.protocol import (
    CancelAckEvent,
    ErrorEvent,
    Event,
    LogEvent,
    OpRecord,
    ProgressEvent,
    ResultEvent,
    StatusEvent,
)

__all__ = [
    "CancelAckEvent",
    "Client",
    "ClientError",
    "ErrorEvent",
    "Event",
    "KtrdrError",
    "LogEvent",
    "Op",
    "OpRecord",
    "ProgressEvent",
    "ResultEvent",
    "StatusEvent",
    "SyncClient",
    "SyncOp",
]
