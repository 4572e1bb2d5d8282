"""The cross-runtime scenarios of ``tests/tests/lifecycle`` and ``failures.rs``, ported
to asyncio: the same names, the same assertions, on a Python engine. Each runs on
asyncio, asyncio with a virtual clock, and uvloop (``conftest.py``)."""

from __future__ import annotations

import asyncio

import pytest

import tether
from script import Harness, collect, settle, terminal, tokens

#: A deferral deadline or timeout that must not fire in the test.
HOUR = 3600.0
#: A short deadline that must fire (real time on asyncio and uvloop, none on virtual).
SHORT = 0.05


# -- forwarding ---------------------------------------------------------------------


def test_happy_path_forwards_chunks_then_terminal(run):
    async def main():
        h = Harness()
        s, script, _ = await h.start("r")
        script.tokens(1).tokens(2, 3).terminal("eos")
        assert await collect(s) == [tokens(1), tokens(2, 3), terminal("eos")]
        rec = h.records.one("r")
        assert (rec.outcome, rec.finish_reason, rec.abort) == ("finished", "eos", "not_needed")
        assert rec.output_tokens == 3
        await h.clean()
        assert (script.aborts, script.generates, script.closed) == (0, 1, True)

    run(main())


def test_terminal_chunk_with_tokens_is_forwarded_and_counted(run):
    async def main():
        h = Harness()
        s, script, _ = await h.start("r")
        script.tokens(1).terminal("length", 2, 3)
        assert await collect(s) == [tokens(1), terminal("length", 2, 3)]
        rec = h.records.one("r")
        assert (rec.outcome, rec.finish_reason, rec.output_tokens) == ("finished", "length", 3)
        await h.clean()

    run(main())


def test_tokenless_chunks_are_not_the_first_token(run):
    async def main():
        h = Harness(mode="decode", deferral_deadline=HOUR)
        s, script, ctx = await h.start("r")
        script.empty()
        assert await s.__anext__() == tokens()
        ctx.stop()
        # The handshake was no first token: the abort stays deferred.
        await asyncio.sleep(0)
        assert script.aborts == 0
        script.tokens(7)
        assert await s.__anext__() == tokens(7)
        await settle(lambda: script.aborts == 1)
        script.terminal("cancelled")
        assert await collect(s) == [terminal("cancelled")]
        rec = h.records.one("r")
        assert (rec.outcome, rec.abort, rec.output_tokens) == ("cancelled", "sent", 1)
        await h.clean()

    run(main())


# -- stop and kill -------------------------------------------------------------------


def test_stop_before_terminal_aborts_once_and_chunks_flow_to_engine_terminal(run):
    async def main():
        h = Harness()
        s, script, ctx = await h.start("r")
        script.tokens(1)
        assert await s.__anext__() == tokens(1)
        ctx.stop()
        await settle(lambda: script.aborts == 1)
        # A stop is graceful: the engine's chunks keep flowing to its own terminal.
        script.tokens(2).terminal("cancelled")
        assert await collect(s) == [tokens(2), terminal("cancelled")]
        rec = h.records.one("r")
        assert (rec.outcome, rec.abort, rec.output_tokens, rec.cause) == ("cancelled", "sent", 2, "caller")
        await h.clean()
        assert script.aborts == 1

    run(main())


def test_stop_then_engine_ends_without_terminal_synthesizes_cancelled(run):
    async def main():
        h = Harness()
        s, script, ctx = await h.start("r")
        ctx.stop()
        await settle(lambda: script.aborts == 1)
        script.end()
        assert await collect(s) == [terminal("cancelled")]
        assert h.records.one("r").outcome == "cancelled"
        await h.clean()

    run(main())


def test_kill_yields_cancelled_at_next_poll_and_aborts_once(run):
    async def main():
        h = Harness()
        s, script, ctx = await h.start("r")
        script.tokens(1)
        assert await s.__anext__() == tokens(1)
        script.tokens(2).tokens(3)
        ctx.kill()
        assert await s.__anext__() == terminal("cancelled")
        with pytest.raises(StopAsyncIteration):
            await s.__anext__()
        rec = h.records.one("r")
        assert (rec.outcome, rec.output_tokens, rec.abort) == ("cancelled", 1, "sent")
        await h.clean()
        assert script.aborts == 1
        # At most the one item the pump pulled ahead was taken from the engine.
        assert script.queued() >= 1

    run(main())


def test_kill_wakes_a_pending_consumer(run):
    async def main():
        h = Harness()
        s, script, ctx = await h.start("r")
        reader = asyncio.ensure_future(s.__anext__())
        await asyncio.sleep(0)
        assert not reader.done()
        ctx.kill()
        assert await reader == terminal("cancelled")
        assert h.records.one("r").outcome == "cancelled"
        await h.clean()
        assert script.aborts == 1

    run(main())


def test_stop_then_kill_aborts_once(run):
    async def main():
        h = Harness()
        s, script, ctx = await h.start("r")
        ctx.stop()
        await settle(lambda: script.aborts == 1)
        ctx.kill()
        assert await collect(s) == [terminal("cancelled")]
        await h.clean()
        assert script.aborts == 1
        assert h.records.one("r").outcome == "cancelled"

    run(main())


def test_stop_after_terminal_does_not_abort(run):
    async def main():
        h = Harness()
        s, script, ctx = await h.start("r")
        script.terminal("eos", 4)
        assert await collect(s) == [terminal("eos", 4)]
        ctx.stop()
        ctx.kill()
        await h.clean()
        assert script.aborts == 0
        assert h.records.one("r").outcome == "finished"

    run(main())


def test_context_killed_before_generate_yields_cancelled(run):
    async def main():
        h = Harness()
        ctx = tether.Context("r")
        ctx.kill()
        s = await h.adapter.generate(tether.Request([1], id="r"), ctx)
        assert await collect(s) == [terminal("cancelled")]
        assert h.records.one("r").outcome == "cancelled"
        await h.clean()
        # The engine did get the request, so it is told to drop it, once.
        assert h.engine.script("r").aborts == 1
        assert h.records.one("r").output_tokens == 0

    run(main())


def test_a_parent_kill_reaches_a_linked_child_request(run):
    async def main():
        h = Harness()
        parent = tether.Context("router")
        s, script, ctx = await h.start("r")
        parent.link_child(ctx)
        parent.kill()
        assert ctx.is_killed()
        assert await collect(s) == [terminal("cancelled")]
        await h.clean()
        assert script.aborts == 1

    run(main())


# -- drops ---------------------------------------------------------------------------


def test_drop_before_terminal_aborts_once_and_records_dropped(run):
    async def main():
        h = Harness()
        s, script, _ = await h.start("r")
        script.tokens(1)
        assert await s.__anext__() == tokens(1)
        del s
        await h.clean()
        assert script.aborts == 1
        rec = h.records.one("r")
        assert (rec.outcome, rec.abort, rec.output_tokens) == ("dropped", "sent", 1)

    run(main())


def test_drop_after_terminal_does_nothing(run):
    async def main():
        h = Harness()
        s, script, _ = await h.start("r")
        script.terminal("length", 1)
        assert await collect(s) == [terminal("length", 1)]
        del s
        await h.clean()
        assert script.aborts == 0
        assert h.records.one("r").outcome == "finished"

    run(main())


def test_kill_on_drop_records_cancelled_with_cause_client_disconnect(run):
    async def main():
        h = Harness(kill_on_drop=True)
        s, script, ctx = await h.start("r")
        script.tokens(1)
        assert await s.__anext__() == tokens(1)
        s.close()
        assert ctx.is_killed()
        await h.clean()
        rec = h.records.one("r")
        assert (rec.outcome, rec.cause, rec.abort) == ("cancelled", "client_disconnect", "sent")
        assert script.aborts == 1

    run(main())


# -- decode mode: the deferred abort (rule 2) ------------------------------------------


def test_decode_stop_before_first_token_defers_abort_until_token(run):
    async def main():
        h = Harness(mode="decode", deferral_deadline=HOUR)
        s, script, ctx = await h.start("r")
        ctx.stop()
        for _ in range(10):
            await asyncio.sleep(0)
        assert script.aborts == 0
        script.tokens(5)
        assert await s.__anext__() == tokens(5)
        await settle(lambda: script.aborts == 1)
        script.tokens(6).terminal("cancelled")
        assert await collect(s) == [tokens(6), terminal("cancelled")]
        rec = h.records.one("r")
        assert (rec.outcome, rec.abort) == ("cancelled", "sent")
        await h.clean()

    run(main())


def test_decode_stop_before_first_token_defers_abort_until_hint(run):
    async def main():
        h = Harness(mode="decode", deferral_deadline=HOUR)
        s, script, ctx = await h.start("r")
        ctx.stop()
        await settle(lambda: script.ctx is not None)
        assert script.aborts == 0
        # The KV transfer completed: no token yet, but the abort may go.
        script.hint()
        await settle(lambda: script.aborts == 1)
        script.end()
        assert await collect(s) == [terminal("cancelled")]
        assert h.records.one("r").abort == "sent"
        await h.clean()

    run(main())


def test_decode_stop_before_first_token_aborts_at_deferral_deadline(run):
    async def main():
        h = Harness(mode="decode", deferral_deadline=SHORT)
        s, script, ctx = await h.start("r")
        loop = asyncio.get_running_loop()
        stopped_at = loop.time()
        ctx.stop()
        # Nobody reads the stream: the deadline fires on its own (rule 11).
        await settle(lambda: script.aborts == 1)
        assert loop.time() - stopped_at >= SHORT - 1e-9  # float subtraction of two clock readings
        script.end()
        assert await collect(s) == [terminal("cancelled")]
        assert h.records.one("r").abort == "sent"
        await h.clean()

    run(main())


def test_decode_engine_terminal_discards_deferred_abort(run):
    async def main():
        h = Harness(mode="decode", deferral_deadline=HOUR)
        s, script, ctx = await h.start("r")
        ctx.stop()
        script.end()
        assert await collect(s) == [terminal("cancelled")]
        rec = h.records.one("r")
        assert (rec.outcome, rec.abort) == ("cancelled", "discarded")
        await h.clean()
        assert script.aborts == 0

    run(main())


def test_decode_drop_before_first_token_aborts_at_the_deadline_then_closes_the_generator(run):
    async def main():
        h = Harness(mode="decode", deferral_deadline=SHORT)
        s, script, _ = await h.start("r")
        await settle(lambda: script.ctx is not None)
        del s
        # The engine is mid KV transfer: its generator stays open until the abort goes.
        for _ in range(10):
            await asyncio.sleep(0)
        assert (script.aborts, script.closed) == (0, False)
        await settle(lambda: script.closed)
        assert (script.aborts, script.aborts_when_closed) == (1, 1)
        # The record was made at the drop, while the abort was owed.
        rec = h.records.one("r")
        assert (rec.outcome, rec.abort) == ("dropped", "deferred")
        await h.clean()

    run(main())


def test_decode_drop_before_first_token_aborts_at_the_drained_first_token(run):
    async def main():
        h = Harness(mode="decode", deferral_deadline=HOUR)
        s, script, _ = await h.start("r")
        del s
        for _ in range(10):
            await asyncio.sleep(0)
        assert script.aborts == 0
        # The driver drains the engine off the consumer's path: the token sends the abort.
        script.tokens(9)
        await settle(lambda: script.closed)
        assert (script.aborts, script.aborts_when_closed) == (1, 1)
        assert h.records.one("r").outcome == "dropped"
        await h.clean()

    run(main())


# -- failures ------------------------------------------------------------------------


def test_engine_ends_without_terminal_synthesizes_stream_incomplete(run):
    async def main():
        h = Harness()
        s, script, _ = await h.start("r")
        script.tokens(1).end()
        out = await collect(s)
        assert out[:1] == [tokens(1)]
        assert len(out) == 2 and out[1].finish_reason == "error"
        assert out[1].error_kind == "BackendStreamIncomplete"
        rec = h.records.one("r")
        assert (rec.outcome, rec.error_kind) == ("failed", "BackendStreamIncomplete")
        await h.clean()
        assert script.aborts == 0

    run(main())


def test_engine_exception_becomes_an_error_terminal(run):
    async def main():
        h = Harness()
        s, script, _ = await h.start("r")
        script.tokens(1).error(ValueError("boom"))
        out = await collect(s)
        assert out[0] == tokens(1)
        assert (out[1].finish_reason, out[1].error_kind) == ("error", "BackendUnknown")
        assert out[1].error == "BackendUnknown: ValueError: boom"
        assert len(out) == 2
        assert h.records.one("r").outcome == "failed"
        await h.clean()
        assert script.aborts == 0

    run(main())


def test_a_typed_engine_error_keeps_its_kind(run):
    async def main():
        h = Harness()
        s, script, _ = await h.start("r")
        script.error(tether.EngineError("no KV blocks left", "ResourceExhausted"))
        out = await collect(s)
        assert [(c.finish_reason, c.error_kind, c.error) for c in out] == [
            ("error", "ResourceExhausted", "ResourceExhausted: no KV blocks left")
        ]
        assert h.records.one("r").error_kind == "ResourceExhausted"
        await h.clean()

    run(main())


def test_setup_error_is_returned_typed_without_abort(run):
    async def main():
        h = Harness(setup_error=tether.EngineError("prompt too long", "InvalidArgument"))
        with pytest.raises(tether.EngineError) as err:
            await h.adapter.generate(tether.Request([1], id="r"), tether.Context("r"))
        assert (err.value.kind, err.value.message) == ("InvalidArgument", "prompt too long")
        assert h.records.one("r").outcome == "failed"
        await h.clean()
        assert h.engine.script("r").aborts == 0

    run(main())


def test_an_early_finish_ends_with_its_reason_and_aborts_once(run):
    async def main():
        h = Harness()
        s, script, _ = await h.start("r")
        script.tokens(1)
        assert await s.__anext__() == tokens(1)
        # A stop string matched in the decoded text (rule 12).
        assert s.finish("stop") is True
        assert await collect(s) == [terminal("stop")]
        assert s.finish("stop") is False
        rec = h.records.one("r")
        assert (rec.outcome, rec.finish_reason, rec.abort) == ("finished", "stop", "sent")
        await h.clean()
        assert script.aborts == 1

    run(main())


# -- timeouts ------------------------------------------------------------------------


def test_first_token_timeout_kills_with_a_typed_terminal(run):
    async def main():
        h = Harness(first_token_timeout=SHORT)
        s, script, _ = await h.start("r")
        out = await collect(s)
        assert [(c.finish_reason, c.error_kind) for c in out] == [("error", "FirstTokenTimeout")]
        rec = h.records.one("r")
        assert (rec.outcome, rec.abort) == ("timed_out", "sent")
        await h.clean()
        assert script.aborts == 1

    run(main())


def test_inter_token_timeout_kills_after_the_last_token(run):
    async def main():
        h = Harness(inter_token_timeout=SHORT)
        s, script, _ = await h.start("r")
        script.tokens(1).tokens(2)
        out = await collect(s)
        assert out[:2] == [tokens(1), tokens(2)]
        assert [(c.finish_reason, c.error_kind) for c in out[2:]] == [("error", "InterTokenTimeout")]
        rec = h.records.one("r")
        assert (rec.outcome, rec.output_tokens) == ("timed_out", 2)
        await h.clean()
        assert script.aborts == 1

    run(main())


def test_cancel_grace_force_terminates_a_stop(run):
    async def main():
        h = Harness(cancel_grace=SHORT)
        s, script, ctx = await h.start("r")
        loop = asyncio.get_running_loop()
        stopped_at = loop.time()
        ctx.stop()
        # The engine ignores the abort and never ends: the grace ends the request.
        assert await collect(s) == [terminal("cancelled")]
        assert loop.time() - stopped_at >= SHORT - 1e-9  # float subtraction of two clock readings
        await h.clean()
        assert script.aborts == 1
        assert h.records.one("r").outcome == "cancelled"

    run(main())
