"""Running the agent as a process: bind, serve, and on SIGTERM drain then exit 0."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from edge_agent.app import create_app
from edge_agent.keys import STATE
from edge_agent.logs import configure_logging
from edge_agent.settings import AgentSettings
from edge_agent.swap import drain

log = logging.getLogger(__name__)

# After the drain, connections still open get this long to finish writing their answers.
SHUTDOWN_TIMEOUT_S = 5.0


async def serve(settings: AgentSettings) -> int:
    """Serve until SIGTERM/SIGINT; returns the process exit status."""
    app = create_app(settings)
    runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True, access_log=None,
                           shutdown_timeout=SHUTDOWN_TIMEOUT_S)  # fmt: skip
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    port = runner.addresses[0][1] if runner.addresses else settings.port
    log.info("listening", extra={"event": "listening", "host": settings.host, "port": port})
    print(f"listening on http://{settings.host}:{port}", flush=True)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()
    exit_status = 0

    async def drain_then_stop() -> None:
        await drain(app)
        stop.set()

    def on_signal(signum: int) -> None:
        log.info("signal", extra={"event": "signal", "signal": signal.Signals(signum).name})
        if not tasks:
            tasks.add(asyncio.create_task(drain_then_stop(), name="zimage-drain"))

    async def watch_start() -> None:
        nonlocal exit_status
        state = app[STATE]
        await state.warmed.wait()
        if state.failed is not None:
            exit_status = 1
            stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    watcher = asyncio.create_task(watch_start(), name="zimage-start-watch")
    try:
        await stop.wait()
    finally:
        watcher.cancel()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await runner.cleanup()
    log.info("stopped", extra={"event": "stopped", "exit_status": exit_status})
    return exit_status


def run(settings: AgentSettings) -> int:
    configure_logging(settings.log_level)
    return asyncio.run(serve(settings))
