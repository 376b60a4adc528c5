"""Streaming pieces every surface shares: the one incremental detokeniser and the one
thread -> asyncio bridge.

The model runs in worker threads (an asyncio server's event loop must stay free meanwhile);
`LoopChannel` carries a worker's events to a consumer on its event loop, and `aiter_in_thread`
turns a blocking iterator into an async one over such a channel.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextvars import copy_context
from typing import Any, TypeVar

T = TypeVar("T")


class Detokenizer:
    """Incremental decoding whose pieces concatenate to `decode(ids, skip_special_tokens=True).strip()`,
    the text `Generator.generate` returns.

    Each step decodes only a short window (the previous piece's tokens plus the new ones) and
    emits the difference: decoding a window alone can drop a leading space (SentencePiece) or
    split a character, but both the window with and without the new tokens have the same
    start, so their difference is exact. Nothing is emitted while the text ends in an
    incomplete multi-byte character (U+FFFD), and leading/trailing whitespace is held back,
    as `.strip()` would remove it.
    """

    def __init__(self, tokenizer, stop_ids: set[int]):
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # tokens up to here have been emitted
        self.sent = ""
        self._held = ""  # whitespace that .strip() would drop if nothing follows it

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        if token in self.stop_ids:
            return ""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd") or not now.startswith(before):
            return ""  # no new text yet, or a character still incomplete
        self.prefix, self.read = self.read, len(self.ids)
        return self._strip(now[len(before):])

    def _strip(self, text: str) -> str:
        if not self.sent:
            text = text.lstrip()
        text = self._held + text
        body = text.rstrip()
        self._held = text[len(body):]
        self.sent += body
        return body

    def finish(self) -> str:
        """What the windows have not emitted yet (a trailing incomplete character, say)."""
        full = self._decode(self.ids).strip()
        if not full.startswith(self.sent):  # cannot happen with byte-level or SentencePiece tokenizers
            return ""
        rest, self.sent = full[len(self.sent):], full
        return rest


class LoopChannel:
    """Events (kind, payload) posted from any thread, received on one event loop, in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self._loop = loop or asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.closed = threading.Event()  # set when the loop is gone: nobody is listening any more

    def post(self, kind: str, payload: Any = None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (kind, payload))
        except RuntimeError:  # the consumer's loop is closed
            self.closed.set()

    async def get(self) -> tuple[str, Any]:
        return await self._queue.get()


async def aiter_in_thread(make_iterator: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
    """Run a blocking iterator in a worker thread; its items reach the event loop through a queue.

    The loop stays free while the model runs. If the consumer stops early (break, cancellation),
    the worker is told to stop after its current item and the iterator is closed in the worker.
    """
    loop = asyncio.get_running_loop()
    channel = LoopChannel(loop)
    stop = channel.closed  # also set when the consumer stops early
    post = channel.post

    def work() -> None:
        try:
            it = make_iterator()
            try:
                for item in it:
                    post("item", item)
                    if stop.is_set():
                        break
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()
        except BaseException as e:  # handed to the consumer, raised there
            post("error", e)
            return
        post("done", None)

    # copy_context: callbacks and tracing read context variables set by the caller.
    worker = loop.run_in_executor(None, copy_context().run, work)
    try:
        while True:
            kind, value = await channel.get()
            if kind == "item":
                yield value
            elif kind == "error":
                raise value
            else:
                return
    finally:
        stop.set()
        await asyncio.shield(worker)  # never leave a thread running the model behind
