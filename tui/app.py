"""``ktrdr-run dashboard``: every op and host, live, in a Textual app.

The dashboard reads only NATS, through the client API: the ``ktrdr_ops`` KV watch for
the table, an op's event stream for its detail, the hosts snapshot every few seconds. It
acts only by publishing what the CLI publishes (a cancel request). When the connection
drops it says so; when it is back it resyncs (the watch starts over and its first batch
replaces the table).

    async with dashboard(config) as app:     # a connected Client behind the app
        await app.run_async()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator

from textual import on, work
from textual.app import App
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.timer import Timer

from discovery.config import redact_url
from dispatcher.config import Config
from dispatcher.errors import NatsUnavailable
from runner.protocol import OpRecord
from tui.confirm import ConfirmCancel
from tui.detail import OpDetailScreen
from tui.help import HelpScreen
from tui.hosts import HostsPanel
from tui.main_screen import OpsScreen
from tui.messages import ConnectionChanged, HostsUpdated, OpsBatch, RecordChanged
from tui.ops_table import OpsTable
from tui.source import DashboardSource

log = logging.getLogger("ktrdr.tui")

HOSTS_INTERVAL_S = 2.0
HOSTS_TIMEOUT_S = 5.0
RETRY_S = 1.0
#: How long changes from the watch are gathered before the table shows them: every
#: change of a cell makes the table draw all its visible rows again, so a flood of
#: progress updates is drawn at most this often (5 frames a second).
UPDATE_BATCH_S = 0.2


class DashboardApp(App[int]):
    """The dashboard over a :class:`DashboardSource` (a connected Client, or a stand-in
    with fixed data). ``clock`` gives the time now, so elapsed times can be pinned."""

    CSS_PATH = "dashboard.tcss"
    TITLE = "ktrdr-run dashboard"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help"),
    ]

    def __init__(
        self,
        source: DashboardSource,
        *,
        read_only: bool = False,
        clock: Callable[[], float] = time.time,
        server: str = "",
        hosts_interval_s: float = HOSTS_INTERVAL_S,
    ) -> None:
        super().__init__()
        self.source = source
        self.read_only = read_only
        self.clock = clock
        self.server = server
        self.hosts_interval_s = hosts_interval_s
        self.connected = source.connected
        #: How many times the table was (re)loaded from a full batch: 1, then +1 per resync.
        self.loads = 0
        self._changes: dict[str, OpRecord] = {}
        self._changes_timer: Timer | None = None
        self.main_screen = OpsScreen(clock=clock, read_only=read_only)

    # -- wiring ----------------------------------------------------------------------

    @property
    def ops_table(self) -> OpsTable:
        """The ops table (on the main screen, whatever screen is on top)."""
        return self.main_screen.query_one(OpsTable)

    @property
    def hosts_panel(self) -> HostsPanel:
        """The hosts panel."""
        return self.main_screen.query_one(HostsPanel)

    async def on_mount(self) -> None:
        # the streams start at once; what they post is handled once this handler has
        # returned, so the main screen's widgets exist by then
        self.stream_ops()
        self.poll_hosts()
        await self.push_screen(self.main_screen)
        self.set_interval(1.0, self._check_connection)

    async def nats_disconnected(self) -> None:
        """The Client's ``on_disconnected`` callback."""
        self.post_message(ConnectionChanged(False))

    async def nats_reconnected(self) -> None:
        """The Client's ``on_reconnected`` callback."""
        self.post_message(ConnectionChanged(True))

    def _check_connection(self) -> None:
        """Catch a change the callbacks did not report (or not yet)."""
        if self.source.connected != self.connected:
            self.post_message(ConnectionChanged(self.source.connected))

    # -- workers ---------------------------------------------------------------------

    @work(exclusive=True, group="ops-watch", exit_on_error=False)
    async def stream_ops(self) -> None:
        """Feed the table from the KV watch: the first batch replaces the table, then
        every change; the watch starts over after an error (and after a reconnect)."""
        while True:
            try:
                initial = True
                async for batch in self.source.watch_ops():
                    if initial:
                        self._changes.clear()  # older than the full set that replaces them
                        self.post_message(OpsBatch(batch, initial=True))
                        initial = False
                    else:
                        self._gather_changes(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - logged, then retried
                log.warning("op watch: %s", exc)
            await asyncio.sleep(RETRY_S)

    def _gather_changes(self, records: list[OpRecord]) -> None:
        """Gather changes for up to ``UPDATE_BATCH_S`` (the newest record of each op wins),
        so a flood of progress updates costs one table update per batch, not per record."""
        for record in records:
            self._changes[record.op_id] = record
        if self._changes_timer is None:
            self._changes_timer = self.set_timer(UPDATE_BATCH_S, self._flush_changes)

    def _flush_changes(self) -> None:
        self._changes_timer = None
        if self._changes:
            records, self._changes = list(self._changes.values()), {}
            self.post_message(OpsBatch(records, initial=False))

    @work(exclusive=True, group="hosts", exit_on_error=False)
    async def poll_hosts(self) -> None:
        """Read the hosts snapshot every ``hosts_interval_s`` while connected."""
        while True:
            if self.source.connected:
                try:
                    hosts = await asyncio.wait_for(self.source.hosts(), HOSTS_TIMEOUT_S)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - logged, then tried again
                    log.warning("hosts: %s", exc)
                else:
                    self.post_message(HostsUpdated(hosts))
            await asyncio.sleep(self.hosts_interval_s)

    @work(group="cancel", exit_on_error=False)
    async def publish_cancel(self, op_id: str) -> None:
        """Publish the cancel request (what ``ktrdr-run ops cancel`` publishes)."""
        try:
            await self.source.cancel(op_id, "cancelled from the dashboard")
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self.notify(f"cancel of {op_id} failed: {exc}", severity="error")
        else:
            self.notify(f"cancel requested for {op_id}")

    # -- messages --------------------------------------------------------------------

    @on(OpsBatch)
    def ops_batch(self, message: OpsBatch) -> None:
        """Records from the watch: into the table, and to an open detail screen."""
        try:
            table = self.ops_table
        except NoMatches:  # shutting down
            return
        if message.initial:
            self.loads += 1
        table.apply(message.records, initial=message.initial)
        for screen in self.screen_stack:
            if isinstance(screen, OpDetailScreen):
                for record in message.records:
                    if record.op_id == screen.op_id:
                        screen.post_message(RecordChanged(record))

    @on(HostsUpdated)
    def hosts_updated(self, message: HostsUpdated) -> None:
        """A fresh hosts snapshot."""
        try:
            self.hosts_panel.show(message.hosts)
        except NoMatches:  # shutting down
            return

    @on(ConnectionChanged)
    def connection_changed(self, message: ConnectionChanged) -> None:
        """Say it; after a reconnect, resync the table and the open detail."""
        if message.connected == self.connected:
            return
        self.connected = message.connected
        self.main_screen.show_connection(message.connected)
        if message.connected:
            self.stream_ops()  # the first batch of the new watch replaces the table
            self.notify("reconnected to NATS: resynced")
        for screen in self.screen_stack:
            if isinstance(screen, OpDetailScreen):
                screen.post_message(ConnectionChanged(message.connected))

    # -- actions ---------------------------------------------------------------------

    def open_detail(self, op_id: str) -> None:
        """Show one op's detail on top of the table."""
        record = self.ops_table.records.get(op_id)
        if record is not None:
            self.push_screen(OpDetailScreen(record, clock=self.clock))

    def request_cancel(self, op_id: str) -> None:
        """Ask to confirm, then publish a cancel request (not in read-only mode)."""
        if self.read_only:
            self.notify("read-only dashboard (--read-only): cancelling is disabled", severity="warning")
            return
        record = self.ops_table.records.get(op_id)
        if record is None:
            return
        if record.terminal:
            self.notify(f"{op_id} is already {record.state}", severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.publish_cancel(op_id)

        self.push_screen(ConfirmCancel(record), answered)

    def action_help(self) -> None:
        """Show the keys."""
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())


class ConnectionRelay:
    """The Client's connection callbacks, relayed to the app once it exists (the Client
    is made first, the app on top of it)."""

    def __init__(self) -> None:
        self.app: DashboardApp | None = None

    async def disconnected(self) -> None:
        """``on_disconnected``."""
        if self.app is not None:
            await self.app.nats_disconnected()

    async def reconnected(self) -> None:
        """``on_reconnected``."""
        if self.app is not None:
            await self.app.nats_reconnected()


@contextlib.asynccontextmanager
async def dashboard(
    config: Config, *, read_only: bool = False, clock: Callable[[], float] = time.time
) -> AsyncIterator[DashboardApp]:
    """The dashboard app on a connected :class:`ktrdr_run.Client` (closed afterwards).
    Raises the Client's error when NATS cannot be reached."""
    from ktrdr_run.client import Client

    relay = ConnectionRelay()
    client = Client(config, on_disconnected=relay.disconnected, on_reconnected=relay.reconnected)
    async with client:
        app = DashboardApp(client, read_only=read_only, clock=clock, server=redact_url(config.nats.url))
        relay.app = app
        yield app


@contextlib.contextmanager
def _logs_to_textual() -> Iterator[None]:
    """While the app owns the terminal, log records go to Textual's log, not stderr."""
    from textual.logging import TextualHandler

    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = [TextualHandler(stderr=False)]
    try:
        yield
    finally:
        root.handlers = saved


async def run_dashboard(config: Config, *, read_only: bool) -> int:
    """Run the dashboard until the user quits; returns the exit code."""
    try:
        async with dashboard(config, read_only=read_only) as app:
            with _logs_to_textual():
                await app.run_async()
    except NatsUnavailable as exc:
        # the dashboard only reads: it never starts a server of its own
        raise NatsUnavailable(
            f"{exc}; the dashboard watches a running ktrdr-run: start `ktrdr-run dispatcher` (or point "
            "[nats] url at the server it uses)"
        ) from None
    return app.return_code or 0
