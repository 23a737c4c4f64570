"""Running the agent as a process: bind, serve, and on SIGTERM drain then exit 0.

Importing this module is torch-free: ``run`` sets torch's threads (``zimage_edge.cpu``) before
``serve`` imports the app and the model stack, so nothing has started torch's thread pools yet
(``torch.set_num_interop_threads`` only works before that) and anything read from the environment when
torch loads (OpenMP's variables) can still be set by the policy.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from edge_agent.http_server import AgentRunner
from edge_agent.logs import configure_logging
from edge_agent.settings import AgentSettings
from zimage_edge.cpu import ThreadDecision, configure_threads

log = logging.getLogger(__name__)

# After the drain, connections still open get this long to finish writing their answers.
SHUTDOWN_TIMEOUT_S = 5.0


async def serve(settings: AgentSettings, cpu: ThreadDecision | None = None) -> int:
    """Serve until SIGTERM/SIGINT; returns the process exit status. ``cpu``: the thread policy applied."""
    from edge_agent.app import create_app
    from edge_agent.keys import STATE
    from edge_agent.swap import drain

    app = create_app(settings, cpu=cpu)
    # AgentRunner is web.AppRunner with the HTTP time limits (settings.http): head, keep-alive, linger.
    runner = AgentRunner(app, http=settings.http, handle_signals=False, handler_cancellation=True, access_log=None,
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


def apply_cpu_policy(settings: AgentSettings) -> ThreadDecision:
    """Set torch's threads from ``settings.cpu`` and the CPU this process has; log the choice."""
    decision = configure_threads(settings.cpu)
    log.info("cpu_threads", extra={"event": "cpu_threads", **decision.to_dict()})
    return decision


def run(settings: AgentSettings) -> int:
    configure_logging(settings.log_level)
    cpu = apply_cpu_policy(settings)  # before the model loads, and before torch is imported
    return asyncio.run(serve(settings, cpu))
