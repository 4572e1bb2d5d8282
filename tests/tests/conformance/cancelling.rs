//! `cancelling_context`: a context that stops itself on a runtime's clock, from a task
//! it spawns there.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tether_core::conformance::cancelling_context;
use tether_core::drive::CountingRuntime;
use tether_core::{Cause, Runtime};
use tether_smol::SmolRuntime;
use tether_tokio::TokioRuntime;

#[tokio::test(start_paused = true)]
async fn cancelling_context_stops_exactly_after_the_delay_on_tokio() {
    let runtime = CountingRuntime::new(TokioRuntime::current());
    let before = tokio::time::Instant::now();
    let context = cancelling_context(&runtime, "request", Duration::from_secs(5));
    assert_eq!(context.id(), "request");
    assert_eq!(runtime.spawned(), 1);

    tokio::time::sleep(Duration::from_millis(4_999)).await;
    assert_eq!(context.cause(), None);

    context.stopped().await;
    assert_eq!(before.elapsed(), Duration::from_secs(5));
    assert_eq!(context.cause(), Some(Cause::Caller));
    assert!(!context.is_killed());
    runtime.until_idle().await;
    assert_eq!(runtime.live(), 0);
}

#[test]
fn cancelling_context_stops_after_the_delay_on_smol() {
    let runtime = SmolRuntime::global();
    let after = Duration::from_millis(20);
    let created = runtime.now();
    let context = cancelling_context(&runtime, "request", after);
    smol::block_on(context.stopped());
    // The stop comes from a runtime timer, and a timer never fires early.
    assert!(runtime.now() >= created + after);
    assert_eq!(context.cause(), Some(Cause::Caller));
}

#[tokio::test(start_paused = true)]
async fn cancelling_context_past_the_end_of_the_clock_never_stops() {
    let runtime = CountingRuntime::new(TokioRuntime::current());
    let context = cancelling_context(&runtime, "forever", Duration::MAX);
    assert_eq!(runtime.spawned(), 0);
    tokio::time::sleep(Duration::from_secs(365 * 24 * 3600)).await;
    assert_eq!(context.cause(), None);
}

/// The timer task holds the context weakly: dropping the last handle frees it (and the
/// listener it owns) at once, not when the timer fires an hour later.
#[tokio::test(start_paused = true)]
async fn cancelling_context_does_not_keep_a_dropped_context_alive() {
    struct SetOnDrop(Arc<AtomicBool>);
    impl Drop for SetOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let runtime = CountingRuntime::new(TokioRuntime::current());
    let context = cancelling_context(&runtime, "gone", Duration::from_secs(3600));
    let freed = Arc::new(AtomicBool::new(false));
    let guard = SetOnDrop(Arc::clone(&freed));
    context.add_listener(move |_| {
        let _owned = &guard;
    });
    drop(context);
    assert!(freed.load(Ordering::SeqCst));
    assert_eq!(runtime.live(), 1);
    runtime.until_idle().await;
    assert_eq!(runtime.live(), 0);
}
