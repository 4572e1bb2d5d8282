//! [`Cause`]: why a context was cancelled. Stored next to the level in the context's
//! atomic word, so reading it takes no lock.

use core::fmt;

/// Why a context was cancelled: the first [`Context::stop_with`](super::Context::stop_with) or
/// [`Context::kill_with`](super::Context::kill_with) that moved it off [`Level::Live`](super::Level::Live) sets it, and nothing
/// changes it afterwards ("first cause wins"). A child linked with
/// [`Context::link_child`](super::Context::link_child) inherits the cause of the parent that cancelled it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Cause {
    /// The code holding the context asked ([`Context::stop`](super::Context::stop) and [`Context::kill`](super::Context::kill)).
    Caller,
    /// The client went away (an HTTP edge's disconnect, a kill-on-drop stream).
    ClientDisconnect,
    /// The server is shutting down.
    Shutdown,
    /// A deadline expired (a router's or a client's timeout, or one of tether's own).
    Timeout,
}

impl Cause {
    /// A short lowercase label: `caller`, `client_disconnect`, `shutdown`, `timeout`.
    pub fn label(self) -> &'static str {
        match self {
            Cause::Caller => "caller",
            Cause::ClientDisconnect => "client_disconnect",
            Cause::Shutdown => "shutdown",
            Cause::Timeout => "timeout",
        }
    }

    pub(super) const fn code(self) -> u8 {
        match self {
            Cause::Caller => 0,
            Cause::ClientDisconnect => 1,
            Cause::Shutdown => 2,
            Cause::Timeout => 3,
        }
    }

    pub(super) const fn from_code(v: u8) -> Cause {
        match v {
            0 => Cause::Caller,
            1 => Cause::ClientDisconnect,
            2 => Cause::Shutdown,
            _ => Cause::Timeout,
        }
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

#[cfg(all(test, not(tether_loom)))]
mod tests {
    use super::Cause;
    use crate::context::{Context, Level};

    #[test]
    fn a_live_context_has_no_cause_and_stop_and_kill_say_caller() {
        let ctx = Context::new("r");
        assert_eq!(ctx.cause(), None);
        ctx.stop();
        assert_eq!(ctx.cause(), Some(Cause::Caller));
        let ctx = Context::new("r");
        ctx.kill();
        assert_eq!(
            (ctx.level(), ctx.cause()),
            (Level::Killed, Some(Cause::Caller))
        );
    }

    #[test]
    fn the_first_cause_wins() {
        let ctx = Context::new("r");
        ctx.stop_with(Cause::Timeout);
        ctx.kill_with(Cause::Shutdown);
        ctx.stop_with(Cause::ClientDisconnect);
        assert_eq!(
            (ctx.level(), ctx.cause()),
            (Level::Killed, Some(Cause::Timeout))
        );
    }

    #[test]
    fn children_inherit_the_parents_cause_linked_before_or_after() {
        let root = Context::new("root");
        let before = Context::new("before");
        root.link_child(&before);
        root.kill_with(Cause::Shutdown);
        let after = Context::new("after");
        root.link_child(&after);
        assert_eq!(before.cause(), Some(Cause::Shutdown));
        assert_eq!(after.cause(), Some(Cause::Shutdown));
        assert!(before.is_killed() && after.is_killed());
        // A child cancelled first keeps its own cause.
        let root = Context::new("root");
        let child = Context::new("child");
        root.link_child(&child);
        child.stop_with(Cause::ClientDisconnect);
        root.kill_with(Cause::Shutdown);
        assert_eq!(
            (child.level(), child.cause()),
            (Level::Killed, Some(Cause::ClientDisconnect))
        );
    }

    #[test]
    fn cause_labels() {
        let labels = [
            Cause::Caller,
            Cause::ClientDisconnect,
            Cause::Shutdown,
            Cause::Timeout,
        ]
        .map(|c| c.to_string());
        assert_eq!(
            labels,
            ["caller", "client_disconnect", "shutdown", "timeout"]
        );
    }
}
