//! [`cancelling_context`]: a [`Context`] that stops itself on a runtime's clock, for an
//! engine author's own cancellation tests. Owns one spawned timer task per context; it
//! must not touch the kit's checks.

use std::future::poll_fn;
use std::time::Duration;

use crate::context::Context;
use crate::drive::{AsyncTimer, Runtime};

/// A live [`Context`] named `id` that [stops](Context::stop) itself (with
/// [`Cause::Caller`](crate::Cause::Caller)) once `after` has passed on `runtime`'s clock.
///
/// It spawns one task on `runtime` that waits on a timer from
/// [`Runtime::sleep_until`] and then stops the context, so the stop comes from another
/// task, as a client's would, and a paused tokio clock moves it without real waiting.
/// The task holds the context only weakly (through [`Context::link_child`]): dropping
/// every clone of the returned context frees it, and the stop then does nothing. An
/// `after` too long for the clock to represent gives a context that never stops itself.
///
/// # Example
///
/// An engine's own test: a request stopped after 50 ms ends with `Cancelled`.
///
/// ```no_run
/// use std::sync::Arc;
/// use std::time::Duration;
/// use tether_core::conformance::cancelling_context;
/// use tether_core::{FinishReason, GenerateContext, LlmEngine, Request, Runtime};
///
/// async fn stops(engine: Arc<dyn LlmEngine>, runtime: &dyn Runtime) {
///     let context = cancelling_context(runtime, "stopped-later", Duration::from_millis(50));
///     let request = Request::new("stopped-later", "my-model", vec![1, 2, 3]).with_max_tokens(10_000);
///     let gctx = GenerateContext::new(context, "stopped-later");
///     let mut stream = engine.generate(request, gctx).await.expect("setup");
///     let mut last = None;
///     while let Some(item) = std::future::poll_fn(|cx| stream.as_mut().poll_next(cx)).await {
///         last = item.expect("no error items").finish_reason;
///     }
///     assert_eq!(last, Some(FinishReason::Cancelled));
/// }
/// ```
pub fn cancelling_context(
    runtime: &dyn Runtime,
    id: impl Into<std::sync::Arc<str>>,
    after: Duration,
) -> Context {
    let context = Context::new(id);
    let Some(deadline) = runtime.now().checked_add(after) else {
        return context;
    };
    // The task owns this parent, not the request's context: a child is linked weakly.
    let stopper = Context::new(format!("{}-stopper", context.id()));
    stopper.link_child(&context);
    let mut timer = runtime.sleep_until(deadline);
    runtime.spawn(Box::pin(async move {
        poll_fn(|cx| AsyncTimer::poll(timer.as_mut(), cx)).await;
        stopper.stop();
    }));
    context
}
