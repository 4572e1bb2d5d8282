//! A bounded loopback load test of `tether serve`: a few thousand requests from 32
//! concurrent clients on 127.0.0.1 (streamed and unary, both endpoints), a fifth of
//! them disconnecting mid-stream at a random chunk. At the end nothing is in flight,
//! the engine holds no slot, every abort sent arrived, and the outcome counts add up.

mod serve_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use serve_support::*;
use tether_engines::SimConfig;

const REQUESTS: usize = 2000;
const CLIENTS: usize = 32;

/// xorshift64*: a seeded, dependency-free generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Default)]
struct Tally {
    done_streams: AtomicUsize,
    unary: AtomicUsize,
    disconnects: AtomicUsize,
}

async fn one(t: &TestServer, rng: &mut Rng, tally: &Tally) {
    let kind = rng.below(10);
    let max_tokens = 1 + rng.below(16);
    let chat = rng.below(2) == 0;
    let (path, mut body) = if chat {
        (
            "/v1/chat/completions",
            json!({"model": "sim", "messages": [{"role": "user", "content": format!("q{}", rng.next())}]}),
        )
    } else {
        (
            "/v1/completions",
            json!({"model": "sim", "prompt": format!("p{}", rng.next())}),
        )
    };
    match kind {
        0..=5 => {
            body["max_tokens"] = json!(max_tokens);
            body["stream"] = json!(true);
            let resp = t.post(path, &body).await;
            assert_eq!(resp.status(), 200);
            let events = sse_data(&resp.text().await.unwrap());
            assert_eq!(
                events.iter().filter(|e| *e == "[DONE]").count(),
                1,
                "{events:?}"
            );
            assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
            tally.done_streams.fetch_add(1, Ordering::Relaxed);
        }
        6..=7 => {
            body["max_tokens"] = json!(max_tokens);
            let (status, v) = t.post_raw(path, &body.to_string()).await;
            assert_eq!(status, 200, "{v}");
            assert_eq!(v["usage"]["completion_tokens"], json!(max_tokens));
            tally.unary.fetch_add(1, Ordering::Relaxed);
        }
        _ => {
            // Long enough that the disconnect lands mid-stream.
            body["max_tokens"] = json!(2000);
            body["stream"] = json!(true);
            let resp = t.post(path, &body).await;
            assert_eq!(resp.status(), 200);
            let mut reader = SseReader::new(resp);
            for _ in 0..=rng.below(4) {
                let data = reader.next().await.unwrap();
                assert_ne!(data, "[DONE]");
            }
            drop(reader);
            tally.disconnects.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_load_with_random_disconnects_leaves_nothing_behind() {
    within(Duration::from_secs(120), async {
        let sim = SimConfig {
            decode_step_cost: Duration::from_micros(200),
            ..sim_config()
        };
        let t = Arc::new(start_with(chaos_config(), sim).await);
        let next = Arc::new(AtomicUsize::new(0));
        let tally = Arc::new(Tally::default());
        let mut clients = Vec::new();
        for c in 0..CLIENTS {
            let (t, next, tally) = (t.clone(), next.clone(), tally.clone());
            clients.push(tokio::spawn(async move {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (c as u64 + 1));
                while next.fetch_add(1, Ordering::Relaxed) < REQUESTS {
                    one(&t, &mut rng, &tally).await;
                }
            }));
        }
        for c in clients {
            c.await.unwrap();
        }
        t.settled().await;

        let (streams, unary, disconnects) = (
            tally.done_streams.load(Ordering::Relaxed),
            tally.unary.load(Ordering::Relaxed),
            tally.disconnects.load(Ordering::Relaxed),
        );
        assert_eq!(streams + unary + disconnects, REQUESTS);
        assert!(disconnects > REQUESTS / 10, "{disconnects}");
        let s = t.metrics().await;
        let get = |k: &str| sample(&s, k) as usize;
        let outcome = |o: &str| sum_of(&s, "tether_requests_total", &[&format!("outcome=\"{o}\"")]) as usize;
        let finished = outcome("finished");
        let cancelled = outcome("cancelled");
        assert_eq!(get("tether_requests_in_flight"), 0);
        assert_eq!(get("tether_engine_live_sequences"), 0);
        assert_eq!(get("tether_engine_queue_length"), 0);
        for o in ["failed", "dropped", "timed_out"] {
            assert_eq!(outcome(o), 0, "{o}");
        }
        // Every request ended exactly once; only disconnected ones were cancelled (a
        // disconnect racing the natural end may still finish), each with one abort.
        println!("{REQUESTS} requests: {disconnects} disconnects, {cancelled} cancelled, {finished} finished");
        assert_eq!(finished + cancelled, REQUESTS);
        assert!(cancelled > 0 && cancelled <= disconnects, "{cancelled} of {disconnects}");
        assert_eq!(get("tether_aborts_total"), cancelled);
        // Every cancellation was a client's disconnect, and each one's body was cut.
        let by_disconnect = sum_of(&s, "tether_cancellations_total", &["cause=\"client_disconnect\""]) as usize;
        assert_eq!(by_disconnect, cancelled);
        assert_eq!(sum_of(&s, "tether_cancellations_total", &[]) as usize, cancelled);
        let gone = sum_of(&s, "tether_client_disconnects_total", &[]) as usize;
        assert!(gone >= cancelled && gone <= disconnects, "{gone}: {cancelled} cancelled, {disconnects} disconnects");
        assert_eq!(get("tether_engine_aborts_received_total"), cancelled);
        assert_eq!(t.engine.inner.gauges().late_aborts, 0);
        // Every finished request had a first token; a chat stream cut right after its
        // role chunk may not have had one.
        let ttft = get("tether_time_to_first_token_seconds_count");
        assert!(ttft >= finished && ttft <= REQUESTS, "{ttft}");
        let ok = get("tether_http_responses_total{endpoint=\"/v1/completions\",status=\"200\"}")
            + get("tether_http_responses_total{endpoint=\"/v1/chat/completions\",status=\"200\"}");
        assert_eq!(ok, REQUESTS);
        assert!(!s.keys().any(|k| k.contains("status=\"5") || k.contains("status=\"499\"")));
    })
    .await;
}
