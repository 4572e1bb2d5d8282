//! [`Ends`]: when a sequence's output ends, by its request's stop conditions: the rule
//! TinyEngine and the llama.cpp engine share (the context's end is each engine's own).

use tether_core::protocol::{FinishReason, Request};

/// A request's stop conditions, as the engine applies them to each emitted token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Ends {
    pub(crate) max_tokens: u32,
    min_tokens: u32,
    stop_token_ids: Vec<u32>,
    /// Empty when the request ignores EOS.
    eos: Vec<u32>,
}

impl Ends {
    /// `request`'s conditions, with `max_tokens` (its own or the engine's default) and
    /// `eos` (the tokens that end with `Eos` unless it ignores them).
    pub(crate) fn of(request: &mut Request, max_tokens: u32, eos: Vec<u32>) -> Ends {
        Ends {
            max_tokens,
            min_tokens: request.stop.min_tokens.unwrap_or(0),
            stop_token_ids: std::mem::take(&mut request.stop.stop_token_ids),
            eos: if request.stop.ignore_eos {
                Vec::new()
            } else {
                eos
            },
        }
    }

    /// Why the output ends after its `emitted`-th token, `token`, if it does: a stop
    /// token (`Stop`) or an EOS token (`Eos`) once `min_tokens` were emitted, else
    /// `max_tokens` reached or the context full (`Length`).
    pub(crate) fn reason(
        &self,
        emitted: u32,
        token: u32,
        context_full: bool,
    ) -> Option<FinishReason> {
        let may_stop = emitted >= self.min_tokens;
        if may_stop && self.stop_token_ids.contains(&token) {
            Some(FinishReason::Stop)
        } else if may_stop && self.eos.contains(&token) {
            Some(FinishReason::Eos)
        } else if emitted >= self.max_tokens || context_full {
            Some(FinishReason::Length)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use tether_core::protocol::StopConditions;

    use super::*;

    fn ends(min_tokens: Option<u32>, ignore_eos: bool) -> Ends {
        let mut stop = StopConditions::default();
        stop.stop_token_ids = vec![5, 7];
        stop.min_tokens = min_tokens;
        stop.ignore_eos = ignore_eos;
        let mut request = Request::new("r", "m", vec![1]).with_stop(stop);
        Ends::of(&mut request, 10, vec![7, 9])
    }

    #[test]
    fn stop_before_eos_both_after_min_tokens_then_length() {
        let e = ends(None, false);
        assert_eq!(e.reason(1, 7, false), Some(FinishReason::Stop), "stop wins");
        assert_eq!(e.reason(1, 9, false), Some(FinishReason::Eos));
        assert_eq!(e.reason(1, 3, false), None);
        assert_eq!(e.reason(1, 3, true), Some(FinishReason::Length));
        assert_eq!(e.reason(10, 3, false), Some(FinishReason::Length));
        let late = ends(Some(3), false);
        assert_eq!(late.reason(2, 5, false), None);
        assert_eq!(late.reason(3, 5, false), Some(FinishReason::Stop));
        assert_eq!(late.reason(2, 9, false), None);
        assert_eq!(late.reason(3, 9, false), Some(FinishReason::Eos));
    }

    #[test]
    fn ignore_eos_keeps_the_stop_tokens() {
        let e = ends(None, true);
        assert_eq!(e.reason(1, 9, false), None);
        assert_eq!(e.reason(1, 5, false), Some(FinishReason::Stop));
    }
}
