"""Type stubs for tether's Python package (the classes live in ``tether._native``, a
Rust extension module; ``EngineError`` in ``tether._errors``)."""

from typing import Any, AsyncIterator, Awaitable, Callable, Literal, Protocol, Sequence, final

__all__ = [
    "Adapter",
    "Cause",
    "FinishReason",
    "Mode",
    "Chunk",
    "Context",
    "Engine",
    "EngineError",
    "GenerateContext",
    "Record",
    "Request",
    "ResponseStream",
    "run_conformance",
    "run_runtime_conformance",
]

FinishReason = Literal["eos", "length", "stop", "cancelled", "content_filter", "error"]
Cause = Literal["caller", "client_disconnect", "shutdown", "timeout"]
Mode = Literal["agg", "prefill", "decode"]

class EngineError(Exception):
    """A typed engine error. ``kind`` is one of tether's error kinds: ``"Unknown"``,
    ``"InvalidArgument"``, ``"CannotConnect"``, ``"Disconnected"``,
    ``"ConnectionTimeout"``, ``"ResponseTimeout"``, ``"FirstTokenTimeout"``,
    ``"InterTokenTimeout"``, ``"Cancelled"``, ``"ResourceExhausted"``, ``"Unavailable"``,
    or ``"Backend"`` + a backend kind (``"BackendStreamIncomplete"``, ...).

    Raised by an engine, it ends the request with an error of that kind (any other
    exception becomes ``"BackendUnknown"``). ``Adapter.generate`` raises it for a
    setup error."""

    message: str
    kind: str
    def __init__(self, message: str, kind: str = "Unknown") -> None: ...

@final
class Request:
    """A generation request. Submitted requests are copied (the caller may reuse one);
    the engine receives the driver's copy."""

    def __new__(
        cls,
        token_ids: Sequence[int],
        *,
        id: str = ...,
        model: str = ...,
        max_tokens: int | None = None,
        min_tokens: int | None = None,
        stop_token_ids: Sequence[int] = ...,
        ignore_eos: bool = False,
        eos_token_ids: Sequence[int] = ...,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        annotations: Sequence[str] = ...,
    ) -> Request: ...
    id: str
    @property
    def model(self) -> str: ...
    @property
    def token_ids(self) -> list[int]:
        """The prompt (a new list on every read)."""
    @property
    def max_tokens(self) -> int | None: ...
    @property
    def min_tokens(self) -> int | None: ...
    @property
    def stop_token_ids(self) -> list[int]: ...
    @property
    def ignore_eos(self) -> bool: ...
    @property
    def eos_token_ids(self) -> list[int]: ...
    @property
    def temperature(self) -> float | None: ...
    @property
    def top_p(self) -> float | None: ...
    @property
    def top_k(self) -> int | None: ...
    @property
    def seed(self) -> int | None: ...
    @property
    def annotations(self) -> list[str]: ...

@final
class Chunk:
    """One piece of a response. A chunk with a ``finish_reason`` is the terminal: the
    last one of its stream. An engine yields these; a consumer reads them."""

    def __new__(
        cls,
        token_ids: Sequence[int] = ...,
        *,
        text: str | None = None,
        finish_reason: FinishReason | None = None,
        error: str | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        index: int = 0,
    ) -> Chunk: ...
    @property
    def token_ids(self) -> list[int]:
        """The tokens (a new list on every read)."""
    @property
    def text(self) -> str | None: ...
    @property
    def finish_reason(self) -> FinishReason | None: ...
    @property
    def error(self) -> str | None:
        """On an error terminal: ``"kind: message"``."""
    @property
    def error_kind(self) -> str | None:
        """On an error terminal made by tether: its kind (``"FirstTokenTimeout"``, ...)."""
    @property
    def prompt_tokens(self) -> int | None: ...
    @property
    def completion_tokens(self) -> int | None: ...
    @property
    def index(self) -> int: ...
    @property
    def is_terminal(self) -> bool: ...

@final
class Context:
    """A request's cancellation handle: stop it (graceful) or kill it (immediate) from
    anywhere. Forward-only: live, stopped, killed; the first cause wins."""

    def __new__(cls, id: str | None = None) -> Context:
        """``id`` defaults to a fresh uuid4 hex."""
    @property
    def id(self) -> str: ...
    def stop(self, cause: Cause = "caller") -> None:
        """Graceful: the engine is aborted and finishes soon with its own terminal."""
    def kill(self, cause: Cause = "caller") -> None:
        """Immediate: the stream yields a ``cancelled`` terminal at its next read."""
    def is_stopped(self) -> bool:
        """True after ``stop`` or ``kill``."""
    def is_killed(self) -> bool: ...
    @property
    def cause(self) -> Cause | None: ...
    def stopped(self) -> Awaitable[None]:
        """Resolves once stopped or killed (cancelling it leaves nothing behind)."""
    def killed(self) -> Awaitable[None]: ...
    @property
    def waiters(self) -> int:
        """``stopped()``/``killed()`` waits parked on this context (a cancelled one
        leaves nothing behind)."""
    def link_child(self, child: Context) -> None:
        """Stop or kill ``child`` whenever this context is (at once if it already is)."""

@final
class GenerateContext:
    """What an engine's ``generate`` and ``abort`` receive."""

    @property
    def request_id(self) -> str: ...
    @property
    def context(self) -> Context: ...
    @property
    def metadata(self) -> list[tuple[str, str]]: ...
    def notify_first_token(self) -> None:
        """The first token exists (a KV transfer completed) though no chunk carries it
        yet: in decode mode a deferred abort may be sent now. Idempotent."""
    def notify_scheduled(self) -> None:
        """The request left the engine's queue. Idempotent."""
    def is_stopped(self) -> bool: ...
    def is_killed(self) -> bool: ...
    def stopped(self) -> Awaitable[None]: ...
    def killed(self) -> Awaitable[None]: ...

class Engine(Protocol):
    """What an ``Adapter`` drives. ``generate`` runs in an ``asyncio.Task`` of its own
    per request (named ``tether:<request id>``), so ``asyncio.current_task()`` and
    ``asyncio.timeout()`` work in it; ``abort`` runs in a task named
    ``tether:abort:<request id>``, at most once per request and never after the
    engine's terminal was read. ``start(worker_id)`` (returning the model name) and
    ``cleanup()`` are optional coroutines; without ``start`` the model is the
    engine's ``model`` attribute or its class name."""

    def generate(self, request: Request, ctx: GenerateContext) -> AsyncIterator[Chunk]: ...
    async def abort(self, ctx: GenerateContext) -> None: ...

@final
class Record:
    """What happened to one request: exactly one per request."""

    @property
    def request_id(self) -> str: ...
    @property
    def outcome(self) -> Literal["finished", "cancelled", "failed", "dropped", "timed_out"]: ...
    @property
    def finish_reason(self) -> FinishReason | None:
        """For ``finished``."""
    @property
    def error_kind(self) -> str | None:
        """For ``failed``."""
    @property
    def cause(self) -> Cause | None: ...
    @property
    def abort(self) -> Literal["not_needed", "deferred", "sent", "discarded"]:
        """The abort's state when the record was made (``deferred``: owed, sent later)."""
    @property
    def ttft(self) -> float | None:
        """Seconds to the first token."""
    @property
    def output_tokens(self) -> int: ...
    @property
    def itl_count(self) -> int: ...
    @property
    def itl_avg_ms(self) -> float: ...
    @property
    def itl_p99_ms(self) -> float: ...

@final
class ResponseStream:
    """One request's chunks: an async iterator that ends after exactly one terminal.

    Cancelling a pending read (the consumer's task was cancelled, or an
    ``asyncio.timeout`` around it expired) kills the request and ends the stream.
    Dropping the stream before its terminal records ``dropped`` and aborts the
    engine (with ``kill_on_drop``: a kill with cause ``client_disconnect``). Read it
    from the loop's thread, one read at a time."""

    def __aiter__(self) -> ResponseStream: ...
    def __anext__(self) -> Awaitable[Chunk]: ...
    @property
    def request_id(self) -> str: ...
    @property
    def context(self) -> Context: ...
    def finish(self, reason: FinishReason = "stop") -> bool:
        """End now with ``reason`` (a stop string matched): the next item is that
        terminal, the engine is aborted once, the outcome is ``finished``. ``False``
        when the request is already over or a terminal is already owed."""
    def set_kill_on_drop(self, on: bool) -> None: ...
    @property
    def record(self) -> Record | None:
        """Once the stream's terminal was read (for a stream closed before it, the
        record goes to the adapter's observer only)."""
    def close(self) -> None:
        """Drop the stream now (what garbage collection would do)."""
    async def aclose(self) -> None: ...

@final
class Adapter:
    """Drives one engine on the event loop it is first used on."""

    def __new__(
        cls,
        engine: Engine,
        *,
        mode: Mode = "agg",
        deferral_deadline: float = 30.0,
        cancel_grace: float | None = None,
        first_token_timeout: float | None = None,
        inter_token_timeout: float | None = None,
        kill_on_drop: bool = False,
        observer: Callable[[Record], Any] | None = None,
        buffer: int = 16,
    ) -> Adapter:
        """Times are seconds. ``observer`` is called with each request's record, where
        the request ends (keep it short; its exceptions are reported, not raised).
        ``buffer``: how many chunks the engine's task may run ahead of the reader
        (it waits when that many are unread: backpressure; 1 makes every chunk a
        round trip between the two tasks)."""
    async def start(self, worker_id: int = 0) -> str:
        """Start the engine; returns its model name."""
    async def cleanup(self) -> None: ...
    async def generate(
        self,
        request: Request,
        context: Context | None = None,
        *,
        kill_on_drop: bool | None = None,
    ) -> ResponseStream:
        """Start ``request`` under ``context`` (a new one named after the request id
        when ``None``). Raises ``EngineError`` for a setup error."""
    @property
    def background_tasks(self) -> int: ...
    @property
    def unfinished_aborts(self) -> int: ...

async def run_runtime_conformance() -> int:
    """Check the asyncio runtime on the running loop against tether's timer and spawn
    contract; returns the number of checks passed (raises ``AssertionError``)."""

async def run_conformance(
    factory: Callable[[], Engine], *, start_timeout: float = 10.0, check_timeout: float = 10.0
) -> int:
    """tether's conformance kit against engines made by ``factory``, on the running
    loop; returns the number of checks passed (raises ``AssertionError``)."""
