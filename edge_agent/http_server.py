"""The HTTP server under the app: aiohttp's, with time limits on clients that send slowly or not at all.

What aiohttp 3.14 offers and what this adds (``settings.http``):

- ``keepalive_timeout`` (aiohttp's default: an hour) is its only bound on reading a request head. Its
  timer starts on connect and after each answer, arriving bytes do not extend it, and it closes the
  connection only while no complete head is queued. So it bounds idle time and head time together.
- There is no separate header-read timeout. :class:`AgentRequestHandler` adds one: a request head
  must be complete ``header_timeout_s`` after connecting (the first request) or after its first byte
  (later ones); else the client gets a 408 (if it sent part of a head) and the connection closes.
- What aiohttp refuses before the app sees it (a malformed head, broken chunked framing) it answers
  in text or HTML; :class:`AgentRequestHandler` answers in the agent's JSON error shape instead.
- Bodies (``body_timeout_s``) and Server-Sent Events writes (``sse_write_timeout_s``) are bounded
  where they are read and written, in the routes.

aiohttp builds its connection objects in ``web.Server`` with no public way to pick their class, so
:class:`AgentRunner` rebuilds the server it made with the same arguments. ``tests/agent/test_hardening.py``
checks this on the installed aiohttp.
"""

from __future__ import annotations

import asyncio
import json
import logging
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from edge_agent.errors import INTERNAL_MESSAGE, error_body, error_response
from edge_agent.settings import HttpSettings

log = logging.getLogger(__name__)

# After answering a request whose body it did not read to the end (413, 408), aiohttp reads and
# drops the rest for this long, so the client sees the answer before the socket closes. Its default,
# 10 s, lets a client that trickles a body hold the connection 10 s past its 408; on a site network
# 2 s carries any answer.
LINGER_S = 2.0


def _head_timeout_answer(timeout_s: float) -> bytes:
    body = json.dumps(error_body("header_timeout", f"the request head did not arrive within {timeout_s:g} s"))
    head = (
        "HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return (head + body).encode()


class AgentRequestHandler(RequestHandler):
    """aiohttp's connection, closed when a request head takes longer than ``head_timeout_s``, and
    answering what aiohttp itself refuses (a malformed head, broken chunked framing) in JSON."""

    def __init__(self, manager: web.Server, *, head_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout_s = head_timeout_s
        self._head_deadline: asyncio.TimerHandle | None = None
        self._head_begun = False  # part of the awaited head came: the client is owed a 408

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()  # the first request's head is due from the moment the client connects

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._awaiting_head():
            self._head_begun = True
            if self._head_deadline is None:
                self._arm()
        else:  # a head is complete (or a body is arriving): the handler's own limits apply now
            self._disarm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse or serve, as the agent's JSON error."""
        super().handle_error(request, status, exc, message)  # logs; raises if an answer had begun
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "HTTP error"
        # A 5xx text could hold a traceback (debug mode); a parse error's first line names the fault.
        text = INTERNAL_MESSAGE if status >= 500 else (message or phrase).strip().split("\n", 1)[0]
        response = error_response(status, phrase.lower().replace(" ", "_"), text)
        response.force_close()
        return response

    def _awaiting_head(self) -> bool:
        # aiohttp's request loop parks on this future while no complete request head is queued.
        waiter = self._waiter
        return waiter is not None and not waiter.done()

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._head_deadline = loop.call_later(self._head_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None
        self._head_begun = False

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if not self._awaiting_head():
            return  # a request is being served: its head came in time
        transport = self.transport
        if self._head_begun and transport is not None and not transport.is_closing():
            transport.write(_head_timeout_answer(self._head_timeout_s))
        log.debug("header_timeout", extra={"event": "header_timeout", "partial": self._head_begun})
        self.force_close()  # closes after the 408 is flushed


class _DeadlineServer(web.Server):
    """The ``web.Server`` aiohttp built for the app, making :class:`AgentRequestHandler` connections."""

    def __init__(self, built: web.Server, head_timeout_s: float) -> None:
        # The same arguments aiohttp's Application gave the server it built (request handler,
        # factory, cancellation, and the connection options in _kwargs).
        super().__init__(
            built.request_handler,
            request_factory=built.request_factory,
            handler_cancellation=built.handler_cancellation,
            loop=built._loop,
            **built._kwargs,
        )
        self._head_timeout_s = head_timeout_s

    def __call__(self) -> RequestHandler:
        return AgentRequestHandler(self, loop=self._loop, head_timeout_s=self._head_timeout_s, **self._kwargs)


class AgentRunner(web.AppRunner):
    """``web.AppRunner`` with the agent's HTTP time limits (``settings.http``).

    Other arguments are aiohttp's; ``keepalive_timeout`` and ``lingering_time`` default to the agent's.
    """

    def __init__(self, app: web.Application, *, http: HttpSettings, **kwargs: Any) -> None:
        kwargs.setdefault("keepalive_timeout", http.keepalive_timeout_s)
        kwargs.setdefault("lingering_time", LINGER_S)
        super().__init__(app, **kwargs)
        self._head_timeout_s = http.header_timeout_s

    async def _make_server(self) -> web.Server:
        return _DeadlineServer(await super()._make_server(), self._head_timeout_s)
