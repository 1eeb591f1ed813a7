"""huggingface_hub's HTTP client with every network wait bounded by `watch.timeout_s`.

A client-wide default timeout is not enough: huggingface_hub 2.4's pagination (listing and
tree calls) passes `timeout=None` itself, which overrides it. So the client factory
(`huggingface_hub.set_client_factory`, the client's own way to configure its httpx client)
installs a client whose `send` caps each request's connect, read, write and pool timeouts at the
bound, whatever the caller asked for. A request that waits that long ends the poll at once as
HubUnreachableError (exit 75) instead of an httpx TimeoutException, which the client would retry
five times with backoff (6 x timeout + 23 s per call; its file downloads resume five times):
a stalled Hub must not hold a cron job. The bound is per wait (connecting, each read), so a
large download that keeps arriving is not cut off.
"""

from __future__ import annotations

from typing import Any, Iterator

import httpx2

from sasgate.errors import HubUnreachableError


def _stalled(request: httpx2.Request, bound: float, exc: BaseException) -> HubUnreachableError:
    return HubUnreachableError(f"{request.method} {request.url}: no answer within watch.timeout_s = {bound:g} s "
                               f"({type(exc).__name__}); not retried, the next poll tries again")


class _BoundedStream(httpx2.SyncByteStream):
    """A response body whose stalls end the poll (streamed downloads read the body after `send`)."""

    def __init__(self, inner: httpx2.SyncByteStream, request: httpx2.Request, bound: float):
        self.inner, self.request, self.bound = inner, request, bound

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self.inner
        except httpx2.TimeoutException as exc:
            raise _stalled(self.request, self.bound, exc) from exc

    def close(self) -> None:
        self.inner.close()


class BoundedClient(httpx2.Client):
    def __init__(self, bound: float, **kwargs: Any):
        super().__init__(timeout=bound, **kwargs)
        self.bound = bound

    def send(self, request: httpx2.Request, **kwargs: Any) -> httpx2.Response:
        asked = request.extensions.get("timeout", {})
        request.extensions = {**request.extensions, "timeout": {
            k: self.bound if asked.get(k) is None else min(asked[k], self.bound)
            for k in ("connect", "read", "write", "pool")}}
        try:
            response = super().send(request, **kwargs)
        except httpx2.TimeoutException as exc:
            raise _stalled(request, self.bound, exc) from exc
        if isinstance(response.stream, httpx2.SyncByteStream):
            response.stream = _BoundedStream(response.stream, request, self.bound)
        return response


def bound_requests(timeout_s: float) -> None:
    """Make every later huggingface_hub request in this process wait at most `timeout_s` per wait."""
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils._http import default_client_factory

    def factory() -> httpx2.Client:
        base = default_client_factory()  # the client's own hooks and redirect policy, kept as they are
        try:
            return BoundedClient(timeout_s, event_hooks=base.event_hooks, follow_redirects=base.follow_redirects)
        finally:
            base.close()

    set_client_factory(factory)
