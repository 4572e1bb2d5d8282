//! Helpers shared by the `tether serve` tests: an in-process server on 127.0.0.1 with
//! an ephemeral port, the `tether serve` binary started the same way, engines that
//! count or fail, an SSE reader and a Prometheus text parser.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tether_cli::serve::{self, ServeConfig, ServedEngine, Server};
use tether_core::engine::{BoxFuture, ChunkStream, EngineConfig, GenerateContext, LlmEngine};
use tether_core::error::{EngineError, ErrorKind};
use tether_core::protocol::{RawTraceLink, Request, TraceLink};
use tether_core::Runtime;
use tether_engines::{SimConfig, SimEngine};

/// Start `tether serve ARGS`; returns the child and the address it says it listens on
/// (its first line on stdout).
pub fn spawn_serve(args: &[&str]) -> (Child, String) {
    spawn_serve_with(args, |_| {})
}

/// [`spawn_serve`] with `RUST_LOG` set to `rust_log` (unset when `None`).
pub fn spawn_serve_logging(args: &[&str], rust_log: Option<&str>) -> (Child, String) {
    spawn_serve_with(args, |cmd| {
        match rust_log {
            Some(filter) => cmd.env("RUST_LOG", filter),
            None => cmd.env_remove("RUST_LOG"),
        };
    })
}

/// [`spawn_serve`] with the command set up by `set_up` first (environment variables).
pub fn spawn_serve_with(args: &[&str], set_up: impl FnOnce(&mut Command)) -> (Child, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tether"));
    cmd.arg("serve")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    set_up(&mut cmd);
    spawned(cmd)
}

/// Start `tether serve ARGS` with its open-file limit (soft and hard) set to `nofile`
/// (through `sh -c 'ulimit -n'`), `RUST_LOG` as in [`spawn_serve_logging`].
pub fn spawn_serve_nofile(nofile: u64, args: &[&str], rust_log: Option<&str>) -> (Child, String) {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!("ulimit -n {nofile} && exec \"$0\" serve \"$@\""))
        .arg(env!("CARGO_BIN_EXE_tether"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match rust_log {
        Some(filter) => cmd.env("RUST_LOG", filter),
        None => cmd.env_remove("RUST_LOG"),
    };
    spawned(cmd)
}

/// Spawn `cmd` (a `tether serve`) and read the address from its first line on stdout.
fn spawned(mut cmd: Command) -> (Child, String) {
    let mut child = cmd.spawn().expect("run tether serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();
    (child, addr)
}

/// SimEngine as the server runs it: ASCII tokens, so a token is a character.
pub fn sim_config() -> SimConfig {
    SimConfig {
        vocab_size: 128,
        ..SimConfig::default()
    }
}

/// A request's migration links as the engine got them: (id, link, malformed link).
pub type Links = (String, Option<TraceLink>, Option<RawTraceLink>);

/// Delegates to a SimEngine, counts `cleanup` calls and keeps each request's migration
/// links.
#[derive(Debug)]
pub struct CountingEngine {
    pub inner: Arc<SimEngine>,
    pub cleanups: AtomicUsize,
    pub links: Mutex<Vec<Links>>,
    /// Each request's id and the client's own id from its metadata.
    pub client_ids: Mutex<Vec<(String, Option<String>)>>,
}

impl LlmEngine for CountingEngine {
    fn start(&self, worker_id: u64) -> BoxFuture<'_, Result<EngineConfig, EngineError>> {
        self.inner.start(worker_id)
    }
    fn generate(
        &self,
        request: Request,
        context: GenerateContext,
    ) -> BoxFuture<'_, Result<ChunkStream, EngineError>> {
        self.links.lock().unwrap().push((
            request.id.clone(),
            request.migration_link,
            request.malformed_migration_link.clone(),
        ));
        let client = context
            .metadata()
            .get(tether_core::engine::Metadata::CLIENT_REQUEST_ID)
            .map(str::to_owned);
        self.client_ids
            .lock()
            .unwrap()
            .push((request.id.clone(), client));
        self.inner.generate(request, context)
    }
    fn abort(&self, context: GenerateContext) -> BoxFuture<'_, ()> {
        self.inner.abort(context)
    }
    fn cleanup(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        self.cleanups.fetch_add(1, Ordering::SeqCst);
        self.inner.cleanup()
    }
}

/// Starts fine and refuses every request.
#[derive(Debug)]
pub struct BrokenEngine;

impl LlmEngine for BrokenEngine {
    fn start(&self, worker_id: u64) -> BoxFuture<'_, Result<EngineConfig, EngineError>> {
        Box::pin(async move {
            Ok(EngineConfig::new("broken".to_owned(), worker_id).with_max_concurrency(None))
        })
    }
    fn generate(
        &self,
        _: Request,
        _: GenerateContext,
    ) -> BoxFuture<'_, Result<ChunkStream, EngineError>> {
        Box::pin(async {
            Err(EngineError::new(
                ErrorKind::Unavailable,
                "the engine is down",
            ))
        })
    }
    fn cleanup(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async { Ok(()) })
    }
}

/// Model `sim`; every `generate` hangs in its setup (never returns a stream) until it
/// is dropped. Counts the setups entered and the aborts received.
#[derive(Debug, Default)]
pub struct StuckSetupEngine {
    pub setups: AtomicUsize,
    pub aborts: AtomicUsize,
}

impl LlmEngine for StuckSetupEngine {
    fn start(&self, worker_id: u64) -> BoxFuture<'_, Result<EngineConfig, EngineError>> {
        Box::pin(async move {
            Ok(EngineConfig::new("sim".to_owned(), worker_id).with_max_concurrency(None))
        })
    }
    fn generate(
        &self,
        _: Request,
        _: GenerateContext,
    ) -> BoxFuture<'_, Result<ChunkStream, EngineError>> {
        Box::pin(async {
            self.setups.fetch_add(1, Ordering::SeqCst);
            std::future::pending().await
        })
    }
    fn abort(&self, _: GenerateContext) -> BoxFuture<'_, ()> {
        Box::pin(async {
            self.aborts.fetch_add(1, Ordering::SeqCst);
        })
    }
    fn cleanup(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async { Ok(()) })
    }
}

/// A server under test.
pub struct TestServer {
    pub server: Server,
    pub base: String,
    pub engine: Arc<CountingEngine>,
    pub client: reqwest::Client,
}

pub async fn start_with(config: ServeConfig, sim: SimConfig) -> TestServer {
    let runtime: Arc<dyn Runtime> = Arc::new(tether_tokio::TokioRuntime::current());
    start_on(config, sim, runtime).await
}

pub async fn start_on(
    config: ServeConfig,
    sim: SimConfig,
    runtime: Arc<dyn Runtime>,
) -> TestServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    start_listening(config, sim, runtime, listener).await
}

/// [`start_on`] on `listener` (one whose accepted sockets inherit its options).
pub async fn start_listening(
    config: ServeConfig,
    sim: SimConfig,
    runtime: Arc<dyn Runtime>,
    listener: tokio::net::TcpListener,
) -> TestServer {
    let sim = Arc::new(SimEngine::new(sim, runtime.clone()));
    let ServedEngine {
        gauges,
        alive,
        tokenizer,
        ..
    } = ServedEngine::sim(sim.clone());
    let engine = Arc::new(CountingEngine {
        inner: sim,
        cleanups: AtomicUsize::new(0),
        links: Mutex::default(),
        client_ids: Mutex::default(),
    });
    let served = ServedEngine {
        engine: engine.clone(),
        gauges,
        alive,
        tokenizer,
    };
    let server = serve::start(served, runtime, listener, config)
        .await
        .unwrap();
    let base = format!("http://{}", server.local_addr());
    TestServer {
        server,
        base,
        engine,
        client: reqwest::Client::new(),
    }
}

pub async fn start() -> TestServer {
    start_with(ServeConfig::default(), sim_config()).await
}

/// The config tests that inject faults use.
pub fn chaos_config() -> ServeConfig {
    ServeConfig {
        allow_chaos: true,
        max_tokens_limit: 100_000,
        ..ServeConfig::default()
    }
}

impl TestServer {
    pub async fn post(&self, path: &str, body: &serde_json::Value) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    }

    pub async fn post_raw(&self, path: &str, body: &str) -> (u16, serde_json::Value) {
        let resp = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        )
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let resp = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }

    /// Scrape and parse `/metrics`.
    pub async fn metrics(&self) -> Samples {
        let (status, text) = self.get("/metrics").await;
        assert_eq!(status, 200);
        parse_prometheus(&text)
    }

    /// Wait (bounded) until nothing is in flight, the engine holds no slot and every
    /// abort sent arrived.
    pub async fn settled(&self) {
        let m = self.server.metrics().clone();
        let engine = self.engine.inner.clone();
        let ok = eventually(Duration::from_secs(10), || {
            let g = engine.gauges();
            m.in_flight() == 0
                && g.live_slots == 0
                && g.queue_len == 0
                && g.aborts_received == m.aborts()
        })
        .await;
        assert!(
            ok,
            "not settled: in flight {}, engine {:?}",
            m.in_flight(),
            engine.gauges()
        );
    }
}

/// Poll `done` every millisecond until it holds or `limit` passed.
pub async fn eventually(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// One SSE event's data (events without data, like keep-alive comments, are skipped).
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| {
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
                .collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

/// Reads SSE events off a streaming response, one at a time.
pub struct SseReader {
    body: Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<axum::body::Bytes>> + Send>>,
    buf: Vec<u8>,
}

impl SseReader {
    pub fn new(resp: reqwest::Response) -> SseReader {
        SseReader {
            body: Box::pin(resp.bytes_stream()),
            buf: Vec::new(),
        }
    }

    /// The next event's data, `None` at the end of the body.
    pub async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = self.buf.drain(..i + 2).collect();
                if let Some(data) = sse_data(std::str::from_utf8(&event).unwrap()).pop() {
                    return Some(data);
                }
                continue;
            }
            match self.body.next().await {
                Some(Ok(bytes)) => self.buf.extend_from_slice(&bytes),
                Some(Err(e)) => panic!("body error: {e}"),
                None => return None,
            }
        }
    }
}

pub type Samples = BTreeMap<String, f64>;

/// Parse Prometheus/OpenMetrics text into `name{k="v",...}` (labels sorted) → value,
/// checking the format on the way: every sample belongs to a declared family, values
/// are numbers, the exposition ends with `# EOF`.
pub fn parse_prometheus(text: &str) -> Samples {
    let mut families: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Samples::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "no # EOF");
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            assert!(
                [
                    "counter",
                    "gauge",
                    "histogram",
                    "summary",
                    "info",
                    "stateset",
                    "unknown",
                    "gaugehistogram"
                ]
                .contains(&kind),
                "bad type in {line}"
            );
            families.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        if line.starts_with("# HELP ") || line.starts_with("# UNIT ") {
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment {line}");
        let (series, value) = line.rsplit_once(' ').expect("sample: series value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("labels end with }");
                let mut labels: Vec<String> = split_labels(body);
                labels.sort();
                (name.to_owned(), labels)
            }
            None => (series.to_owned(), Vec::new()),
        };
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name {name}"
        );
        let family = ["_total", "_bucket", "_count", "_sum", "_created", "_info"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| families.contains_key(*f)))
            .unwrap_or(&name);
        assert!(families.contains_key(family), "sample {name} has no # TYPE");
        let key = if labels.is_empty() {
            name
        } else {
            format!("{name}{{{}}}", labels.join(","))
        };
        assert!(
            samples.insert(key.clone(), value).is_none(),
            "duplicate series {key}"
        );
    }
    samples
}

fn split_labels(body: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_quotes = false;
    let mut escaped = false;
    for c in body.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => in_quotes = !in_quotes,
            ',' if !in_quotes => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    for l in &out {
        let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("bad label {l}"));
        assert!(
            !k.is_empty() && v.starts_with('"') && v.ends_with('"'),
            "bad label {l}"
        );
    }
    out
}

/// A sample's value, 0 if absent.
pub fn sample(samples: &Samples, key: &str) -> f64 {
    samples.get(key).copied().unwrap_or(0.0)
}

/// The sum of the samples of `name` that carry every label of `labels` (`k="v"` each).
pub fn sum_of(samples: &Samples, name: &str, labels: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(key, _)| {
            let (series, rest) = key.split_once('{').unwrap_or((key.as_str(), "}"));
            let have: Vec<&str> = rest.trim_end_matches('}').split(',').collect();
            series == name && labels.iter().all(|l| have.contains(l))
        })
        .map(|(_, v)| v)
        .sum()
}

/// The sample lines of the exposition `text` for the series `name` (exactly: `name`
/// then `{` or a space), sorted, without the zero ones if `nonzero`.
pub fn lines_of(text: &str, name: &str, nonzero: bool) -> Vec<String> {
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| !nonzero || !l.ends_with(" 0"))
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines
}

/// `lines` as owned strings, sorted (to compare with [`lines_of`]).
pub fn sorted(lines: &[&str]) -> Vec<String> {
    let mut lines: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
    lines.sort();
    lines
}

/// Run `f` with a deadline: a test that hangs fails instead.
pub async fn within<T>(limit: Duration, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, f).await.expect("timed out")
}

/// `text` with every request id (`cmpl-`, `chatcmpl-`, `health-` then a 16-hex-digit
/// nonce and a hex counter) shortened to its kind and counter (`cmpl-1`), so tests can
/// name ids without knowing the server's random nonce. Checks the nonce's shape.
pub fn short_ids(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    'scan: while !rest.is_empty() {
        for kind in ["chatcmpl-", "cmpl-", "health-"] {
            let after_word = out
                .chars()
                .last()
                .is_none_or(|c| !c.is_ascii_alphanumeric());
            if after_word && rest.starts_with(kind) {
                let tail = &rest[kind.len()..];
                let hex = tail.bytes().take_while(u8::is_ascii_hexdigit).count();
                if hex > 16 {
                    out.push_str(kind);
                    out.push_str(&tail[16..hex]);
                    rest = &tail[hex..];
                    continue 'scan;
                }
            }
        }
        let c = rest.chars().next().expect("not empty");
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// The request id's kind and counter (`("cmpl", 1)` for `cmpl-<nonce>1`), and its nonce.
pub fn id_parts(id: &str) -> (String, u64, String) {
    let (kind, tail) = id.split_once('-').unwrap_or_else(|| panic!("an id: {id}"));
    assert!(
        tail.len() > 16 && tail.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    let n = u64::from_str_radix(&tail[16..], 16).unwrap();
    (kind.to_owned(), n, tail[..16].to_owned())
}

/// Serve `engine` with `config` on 127.0.0.1 (a free port), the adapter on the current
/// tokio runtime.
pub async fn serve_engine(engine: ServedEngine, config: ServeConfig) -> Server {
    let runtime: Arc<dyn Runtime> = Arc::new(tether_tokio::TokioRuntime::current());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    serve::start(engine, runtime, listener, config)
        .await
        .unwrap()
}

/// Send signal `name` (`TERM`, `INT`, ...) to the child.
pub fn signal(child: &Child, name: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{name} failed");
}

/// Wait (at most `limit`) for the child to exit; kill it and fail the test otherwise.
pub fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("tether serve did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGTERM the child, wait (at most `limit`) for it to exit 0, and return its stderr.
pub fn stop_serve(mut child: Child, limit: Duration) -> String {
    signal(&child, "TERM");
    let status = wait_exit(&mut child, limit);
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    stderr
}

/// Run the `tether` binary with `args` to its end.
pub fn tether(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(args)
        .output()
        .expect("run tether")
}

/// A finished run's stderr, as text.
pub fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
