//! Stop strings: OpenAI's `stop`, matched on the decoded text as it streams
//! ([`StopMatcher`]).
//!
//! Owns the matching only: text goes in chunk by chunk, text that can no longer be
//! part of a match comes out, and the first match ends it. Ending the request is the
//! handlers' job (through the adapter's early finish, SPEC rule 12).
//!
//! # Semantics (those of OpenAI and vLLM)
//! - A stop string matches anywhere in the generated text, across chunk boundaries.
//! - The request ends at the first stop string to be completed (the one whose last
//!   byte comes first; of two completed by the same byte, the one starting first).
//! - The returned text ends right before that match: the stop string and anything
//!   after it are not returned.
//! - Text that may still become the start of a match is held back until it is clear
//!   either way, so nothing is ever sent and then taken back: at most the length of
//!   the longest stop string minus one byte is held at any time. A stream that ends
//!   without a match gets its held text with its last chunk.
//!
//! Each stop string runs as a Knuth-Morris-Pratt automaton over the UTF-8 bytes, so a
//! chunk costs time linear in its length whatever the stop strings are. Stop strings
//! and text are both valid UTF-8, so every match and every held-back suffix starts on
//! a character boundary.

/// One stop string's automaton: how much of it the text seen so far ends with.
#[derive(Clone, Debug)]
struct Automaton {
    pattern: Box<[u8]>,
    /// `fallback[i]`: the length of the longest proper prefix of `pattern[..=i]`
    /// that is also a suffix of it.
    fallback: Box<[usize]>,
    /// Bytes of `pattern` matched by the end of the text seen so far.
    matched: usize,
}

impl Automaton {
    fn new(pattern: &str) -> Automaton {
        let pattern: Box<[u8]> = pattern.as_bytes().into();
        let mut fallback = vec![0; pattern.len()];
        let mut k = 0;
        for i in 1..pattern.len() {
            while k > 0 && pattern[i] != pattern[k] {
                k = fallback[k - 1];
            }
            if pattern[i] == pattern[k] {
                k += 1;
            }
            fallback[i] = k;
        }
        Automaton {
            pattern,
            fallback: fallback.into(),
            matched: 0,
        }
    }

    /// Take one byte of text; `true` when the whole pattern was just matched.
    fn step(&mut self, byte: u8) -> bool {
        let mut k = self.matched;
        while k > 0 && self.pattern[k] != byte {
            k = self.fallback[k - 1];
        }
        if self.pattern[k] == byte {
            k += 1;
        }
        self.matched = k;
        k == self.pattern.len()
    }
}

/// What [`StopMatcher::push`] made of a piece of text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Matched {
    /// The text to send now: everything that can no longer be part of a match, or,
    /// after a match, everything before it.
    pub(crate) text: String,
    /// A stop string matched: the request must end here, and nothing after `text` is
    /// ever returned.
    pub(crate) stopped: bool,
}

/// Matches a request's stop strings on its decoded text (see the [module docs](self)).
#[derive(Clone, Debug)]
pub(crate) struct StopMatcher {
    automata: Vec<Automaton>,
    /// Text seen and not yet returned: a suffix that may begin a match.
    held: String,
    /// A stop string matched; everything after it is dropped.
    stopped: bool,
}

impl StopMatcher {
    /// A matcher for `stops` (non-empty strings), or `None` when there are none.
    pub(crate) fn new(stops: &[String]) -> Option<StopMatcher> {
        if stops.is_empty() {
            return None;
        }
        Some(StopMatcher {
            automata: stops
                .iter()
                .filter(|s| !s.is_empty())
                .map(|s| Automaton::new(s))
                .collect(),
            held: String::new(),
            stopped: false,
        })
    }

    /// Whether a stop string matched.
    pub(crate) fn stopped(&self) -> bool {
        self.stopped
    }

    /// Take the next piece of decoded text.
    pub(crate) fn push(&mut self, text: &str) -> Matched {
        if self.stopped {
            return Matched {
                text: String::new(),
                stopped: true,
            };
        }
        let mut end = None;
        for (i, &byte) in text.as_bytes().iter().enumerate() {
            // Every automaton takes every byte up to the match (a later chunk would
            // otherwise see stale states); the one matched first, starting first, wins.
            let mut start = None;
            for a in &mut self.automata {
                if a.step(byte) {
                    let s = self.held.len() + i + 1 - a.pattern.len();
                    start = Some(start.map_or(s, |t: usize| t.min(s)));
                }
            }
            if let Some(s) = start {
                end = Some(s);
                break;
            }
        }
        self.held.push_str(text);
        match end {
            Some(start) => {
                self.stopped = true;
                let mut out = std::mem::take(&mut self.held);
                out.truncate(floor_boundary(&out, start));
                Matched {
                    text: out,
                    stopped: true,
                }
            }
            None => {
                let hold = self.automata.iter().map(|a| a.matched).max().unwrap_or(0);
                let cut = floor_boundary(&self.held, self.held.len() - hold.min(self.held.len()));
                let rest = self.held.split_off(cut);
                Matched {
                    text: std::mem::replace(&mut self.held, rest),
                    stopped: false,
                }
            }
        }
    }

    /// The end of the stream without a match: the text still held back (empty after
    /// a match).
    pub(crate) fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// The largest character boundary of `s` at or below `at`. Matches and held suffixes
/// start on boundaries (see the module docs); this keeps a slip from ever panicking.
fn floor_boundary(s: &str, mut at: usize) -> usize {
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        let stops: Vec<String> = stops.iter().map(|s| (*s).to_owned()).collect();
        StopMatcher::new(&stops).expect("stop strings")
    }

    /// Feed `pieces` in order; the text returned and whether it stopped.
    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = matcher(stops);
        let mut out = String::new();
        for p in pieces {
            let r = m.push(p);
            out.push_str(&r.text);
            if r.stopped {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    /// Every way of cutting `text` into two and three pieces gives the same answer as
    /// one piece, at every byte position a cut can go (char boundaries).
    fn same_for_every_split(stops: &[&str], text: &str, expected: (&str, bool)) {
        let expected = (expected.0.to_owned(), expected.1);
        assert_eq!(run(stops, &[text]), expected, "whole {text:?}");
        let cuts: Vec<usize> = (0..=text.len())
            .filter(|&i| text.is_char_boundary(i))
            .collect();
        for &a in &cuts {
            for &b in cuts.iter().filter(|&&b| b >= a) {
                let pieces = [&text[..a], &text[a..b], &text[b..]];
                assert_eq!(run(stops, &pieces), expected, "{pieces:?}");
            }
        }
    }

    #[test]
    fn no_stop_strings_no_matcher() {
        assert!(StopMatcher::new(&[]).is_none());
    }

    #[test]
    fn the_stop_string_and_what_follows_are_not_returned() {
        same_for_every_split(&["STOP"], "hello STOP world", ("hello ", true));
        same_for_every_split(&["\n\n"], "a\nb\n\nc", ("a\nb", true));
        same_for_every_split(&["x"], "x", ("", true));
    }

    #[test]
    fn text_without_a_match_comes_back_whole() {
        same_for_every_split(&["STOP"], "STO STOPPEX", ("STO ", true));
        same_for_every_split(&["STOP"], "ST OP STO", ("ST OP STO", false));
        same_for_every_split(&["abcabd"], "abcabcabd!", ("abc", true));
        same_for_every_split(&["aab"], "aaaaab", ("aaa", true));
    }

    #[test]
    fn multi_byte_stop_strings_match_across_chunks() {
        same_for_every_split(&["🦀", "終わり"], "crab 🦀 walk", ("crab ", true));
        same_for_every_split(&["終わり"], "物語の終わりです", ("物語の", true));
        same_for_every_split(&["é"], "café au lait", ("caf", true));
        same_for_every_split(&["éé"], "caé é", ("caé é", false));
    }

    #[test]
    fn the_first_completed_match_wins() {
        // "bc" completes before "abcd" could.
        same_for_every_split(&["abcd", "bc"], "xabcd", ("xa", true));
        // Both complete at the same byte: the one starting first wins.
        same_for_every_split(&["cd", "abcd"], "xabcd", ("x", true));
        same_for_every_split(&["a", "b", "c", "d"], "zzdcba", ("zz", true));
    }

    #[test]
    fn only_a_possible_match_start_is_held_back() {
        let mut m = matcher(&["STOP"]);
        assert_eq!(m.push("abc ST").text, "abc ");
        assert_eq!(m.push("O").text, "");
        // "STOX": no match can start in it any more.
        assert_eq!(
            m.push("X"),
            Matched {
                text: "STOX".into(),
                stopped: false
            }
        );
        assert_eq!(m.push("SS").text, "S");
        assert_eq!(m.finish(), "S");
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn nothing_comes_out_after_a_match() {
        let mut m = matcher(&["!"]);
        assert_eq!(
            m.push("hi! there"),
            Matched {
                text: "hi".into(),
                stopped: true
            }
        );
        assert!(m.stopped());
        assert_eq!(
            m.push("more"),
            Matched {
                text: String::new(),
                stopped: true
            }
        );
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn long_stop_strings_are_held_only_while_they_may_match() {
        let stop = "a".repeat(1000) + "b";
        let mut m = matcher(&[&stop]);
        let mut out = String::new();
        for _ in 0..1500 {
            out.push_str(&m.push("a").text);
        }
        // The last 1 000 bytes are held: they may still begin the stop string.
        assert_eq!(out, "a".repeat(500));
        // The match starts at byte 500: nothing more is returned.
        assert_eq!(m.push("b").text, "");
        assert!(m.stopped());
        let mut m = matcher(&[&stop]);
        assert_eq!(m.push(&"a".repeat(1500)).text, "a".repeat(500));
        assert_eq!(m.push("c").text, "a".repeat(1000) + "c");
    }
}
