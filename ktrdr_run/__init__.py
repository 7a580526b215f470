"""ktrdr-run's client side: the Python client API and the ``ktrdr-run`` command line.

``from ktrdr_run import Client`` (async) or ``SyncClient`` (blocking, for notebooks).
"""

from ktrdr_run.client import Client, Op
from ktrdr_run.errors import ClientError, KtrdrError
from ktrdr_run.sync import SyncClient, SyncOp

__all__ = ["Client", "ClientError", "KtrdrError", "Op", "SyncClient", "SyncOp"]
