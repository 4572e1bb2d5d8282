//! Rules 1 to 5 of SPEC.md section 4 on both runtimes: abort at most once and never
//! after the end, the decode-mode deferral, token-less chunks, consumer drops, stop and
//! kill. Every scenario asserts the exact items, the exact record and the exact number
//! of aborts (decided, via the observer, and entered, via the engine).

mod abort_task;
mod deferral;
mod drops;
mod forwarding;
mod stop_kill;

use std::time::Duration;

use tether_core::{AdapterConfig, Chunk, FinishReason, Mode};
use tether_tests::{data, on_both_runtimes};

use abort_task::*;
use deferral::*;
use drops::*;
use forwarding::*;
use stop_kill::*;

const HOUR: Duration = Duration::from_secs(3600);

fn decode(deferral_deadline: Duration) -> AdapterConfig {
    AdapterConfig::default()
        .mode(Mode::Decode)
        .deferral_deadline(deferral_deadline)
}

fn tokens(t: &[u32]) -> tether_core::Annotated<Chunk> {
    data(Chunk::tokens(t.to_vec()))
}

fn terminal(reason: FinishReason) -> tether_core::Annotated<Chunk> {
    data(Chunk::terminal(reason))
}

on_both_runtimes!(
    happy_path_forwards_chunks_then_terminal_without_spawns_or_timers,
    timeouts_create_a_timer_only_when_the_consumer_waits,
    terminal_chunk_with_tokens_is_forwarded_and_counted,
    stop_before_terminal_aborts_once_and_chunks_flow_to_engine_terminal,
    stop_answered_by_engine_cancelled_terminal_records_cancelled,
    stop_then_engine_ends_without_terminal_synthesizes_cancelled,
    kill_yields_cancelled_at_next_poll_and_aborts_once,
    kill_wakes_a_pending_consumer,
    kill_before_queued_final_chunk_is_polled_wins_with_one_terminal,
    final_chunk_consumed_before_kill_finishes_without_abort,
    kill_inside_engine_poll_racing_final_chunk_yields_one_terminal,
    stop_then_kill_aborts_once,
    stop_after_terminal_does_not_abort,
    a_grace_ends_with_its_request,
    context_killed_before_generate_yields_cancelled,
    context_stopped_before_generate_aborts_once_and_keeps_flowing,
    tokenless_chunks_are_not_the_first_token,
    decode_stop_before_first_token_defers_abort_until_token,
    decode_stop_before_first_token_defers_abort_until_hint,
    decode_stop_before_first_token_defers_abort_until_in_stream_hint,
    decode_stop_before_first_token_aborts_at_deferral_deadline,
    decode_kill_before_first_token_cancels_now_and_aborts_on_hint,
    decode_kill_before_first_token_aborts_at_deadline_after_stream_ended,
    decode_engine_terminal_discards_deferred_abort,
    a_deferrals_watchdog_ends_with_its_request,
    decode_drop_before_first_token_aborts_at_the_deadline,
    decode_drop_before_first_token_aborts_at_the_drained_first_token,
    decode_drop_then_engine_end_discards_the_abort,
    decode_stop_then_drop_before_first_token_aborts_at_the_deadline,
    drop_before_terminal_aborts_once_and_records_dropped,
    drop_before_first_poll_aborts_once,
    drop_after_stop_does_not_abort_twice,
    drop_after_terminal_does_nothing,
    the_abort_task_is_started_once_for_every_stop,
    a_burst_of_stops_is_carried_out_by_the_one_task,
    a_pending_abort_does_not_hold_up_the_next,
    an_abort_panic_leaves_the_abort_task_running,
    the_abort_task_ends_with_its_adapter,
    aborts_not_yet_carried_out_are_counted,
);
