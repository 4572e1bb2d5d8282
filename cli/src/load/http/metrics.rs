//! The server's `/metrics`, as `tether load --url` reads it: a small Prometheus /
//! OpenMetrics text parser, metric selectors (`name` or `name{label="value",...}`,
//! summed over every series that carries those labels), and the presets naming the
//! metrics of `tether serve`, vLLM and SGLang.
//!
//! Owns parsing and naming only; which checks hold is the `check` module's business.

use std::fmt;

use serde::Serialize;

/// One parsed sample: its metric name, its labels and its value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The sample's name (with any `_total` suffix as written).
    pub name: String,
    /// Its labels, as written.
    pub labels: Vec<(String, String)>,
    /// Its value.
    pub value: f64,
}

/// Parse the text exposition: every sample line (comments and blank lines skipped).
/// Lines that are not `series value [timestamp]` are an error naming the line.
pub fn parse(text: &str) -> Result<Vec<Sample>, String> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(parse_line(line).ok_or_else(|| format!("malformed metrics line `{line}`"))?);
    }
    Ok(out)
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name, labels, rest) = match line.find('{') {
        Some(open) if line[..open].find(' ').is_none() => {
            let close = open + closing_brace(&line[open..])?;
            let labels = parse_labels(&line[open + 1..close])?;
            (&line[..open], labels, &line[close + 1..])
        }
        _ => {
            let (name, rest) = line.split_once(' ')?;
            (name, Vec::new(), rest)
        }
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
    valid.then(|| Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// The offset of the `}` closing the label set that starts `s` (quotes respected).
fn closing_brace(s: &str) -> Option<usize> {
    let (mut quoted, mut escaped) = (false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

/// `k="v",k2="v2"` (a trailing comma allowed) into pairs, escapes undone.
fn parse_labels(body: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut rest = body.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let after = after.trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        out.push((key.trim().to_owned(), value));
        rest = after[end + 1..].trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
    Some(out)
}

/// A metric to read: a name and the labels its series must carry. Its value in a
/// scrape is the sum over every matching series; a name with no series is absent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Selector {
    /// The sample name (`tether_aborts_total`).
    pub name: String,
    /// Labels every summed series must carry.
    pub labels: Vec<(String, String)>,
}

impl Selector {
    /// Parse `name` or `name{label="value",...}`.
    pub fn parse(spec: &str) -> Result<Selector, String> {
        let spec = spec.trim();
        let bad = || format!("`{spec}` is not a metric (name or name{{label=\"value\",...}})");
        let (name, labels) = match spec.split_once('{') {
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').ok_or_else(bad)?;
                (name, parse_labels(body).ok_or_else(bad)?)
            }
            None => (spec, Vec::new()),
        };
        let valid = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
        if !valid {
            return Err(bad());
        }
        Ok(Selector {
            name: name.to_owned(),
            labels,
        })
    }

    /// The sum of the matching samples, `None` when no sample matches.
    pub fn value(&self, samples: &[Sample]) -> Option<f64> {
        let mut found = None;
        for s in samples.iter().filter(|s| s.name == self.name) {
            if self
                .labels
                .iter()
                .all(|want| s.labels.iter().any(|have| have == want))
            {
                *found.get_or_insert(0.0) += s.value;
            }
        }
        found
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if !self.labels.is_empty() {
            let labels: Vec<String> = self
                .labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{v}\""))
                .collect();
            write!(f, "{{{}}}", labels.join(","))?;
        }
        Ok(())
    }
}

/// The servers whose metric names `tether load --url` knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// `tether serve`: every check.
    Tether,
    /// vLLM: the in-flight gauge (running plus waiting); no cancellation counter.
    Vllm,
    /// SGLang: the in-flight gauge (running plus queued); no cancellation counter.
    Sglang,
}

/// The metrics the checks read; `None` (or an empty in-flight list) makes a check
/// "not available".
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MetricNames {
    /// Requests in flight, summed over these (running plus queued, for example).
    pub in_flight: Vec<Selector>,
    /// Requests the server ended, every outcome.
    pub requests: Option<Selector>,
    /// Requests the server finished normally.
    pub finished: Option<Selector>,
    /// Requests the server cancelled because their client disconnected.
    pub cancellations: Option<Selector>,
    /// Requests the server cancelled on a timeout of its own.
    pub timeouts: Option<Selector>,
    /// Engine aborts the server sent.
    pub aborts: Option<Selector>,
}

fn sel(spec: &str) -> Selector {
    Selector::parse(spec).expect("preset metric names are valid")
}

impl Preset {
    /// The preset's metric names.
    pub fn names(self) -> MetricNames {
        match self {
            Preset::Tether => MetricNames {
                in_flight: vec![sel("tether_requests_in_flight")],
                requests: Some(sel("tether_requests_total")),
                finished: Some(sel("tether_requests_total{outcome=\"finished\"}")),
                cancellations: Some(sel(
                    "tether_cancellations_total{cause=\"client_disconnect\"}",
                )),
                timeouts: Some(sel("tether_cancellations_total{cause=\"timeout\"}")),
                aborts: Some(sel("tether_aborts_total")),
            },
            Preset::Vllm => MetricNames {
                in_flight: vec![
                    sel("vllm:num_requests_running"),
                    sel("vllm:num_requests_waiting"),
                ],
                ..MetricNames::default()
            },
            Preset::Sglang => MetricNames {
                in_flight: vec![sel("sglang:num_running_reqs"), sel("sglang:num_queue_reqs")],
                ..MetricNames::default()
            },
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Preset::Tether => "tether",
            Preset::Vllm => "vllm",
            Preset::Sglang => "sglang",
        })
    }
}

/// The values of [`MetricNames`] in one scrape (`None`: the metric was absent).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Values {
    /// Sum of the in-flight metrics present (`None` when none is).
    pub in_flight: Option<f64>,
    /// See [`MetricNames::requests`].
    pub requests: Option<f64>,
    /// See [`MetricNames::finished`].
    pub finished: Option<f64>,
    /// See [`MetricNames::cancellations`].
    pub cancellations: Option<f64>,
    /// See [`MetricNames::timeouts`].
    pub timeouts: Option<f64>,
    /// See [`MetricNames::aborts`].
    pub aborts: Option<f64>,
}

impl MetricNames {
    /// Read every named metric off `samples`.
    pub fn values(&self, samples: &[Sample]) -> Values {
        let get = |s: &Option<Selector>| s.as_ref().and_then(|s| s.value(samples));
        let in_flight = self
            .in_flight
            .iter()
            .filter_map(|s| s.value(samples))
            .reduce(|a, b| a + b);
        Values {
            in_flight,
            requests: get(&self.requests),
            finished: get(&self.finished),
            cancellations: get(&self.cancellations),
            timeouts: get(&self.timeouts),
            aborts: get(&self.aborts),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP x y\n# TYPE tether_aborts counter\ntether_aborts_total 7\n\
        tether_cancellations_total{cause=\"client_disconnect\",endpoint=\"chat\",stream=\"true\"} 3\n\
        tether_cancellations_total{cause=\"client_disconnect\",endpoint=\"completions\",stream=\"false\"} 2\n\
        tether_cancellations_total{cause=\"timeout\",endpoint=\"chat\",stream=\"true\"} 1\n\
        weird{path=\"a,b}\\\"c\"} 1.5 1700000000\n\
        vllm:num_requests_running{model_name=\"m\"} 4\n# EOF\n";

    #[test]
    fn selectors_sum_over_matching_series() {
        let samples = parse(TEXT).unwrap();
        let v = |spec: &str| Selector::parse(spec).unwrap().value(&samples);
        assert_eq!(v("tether_aborts_total"), Some(7.0));
        assert_eq!(v("tether_cancellations_total"), Some(6.0));
        assert_eq!(
            v("tether_cancellations_total{cause=\"client_disconnect\"}"),
            Some(5.0)
        );
        assert_eq!(
            v("tether_cancellations_total{cause=\"client_disconnect\",endpoint=\"chat\"}"),
            Some(3.0)
        );
        assert_eq!(v("tether_cancellations_total{cause=\"shutdown\"}"), None);
        assert_eq!(v("weird{path=\"a,b}\\\"c\"}"), Some(1.5));
        assert_eq!(v("vllm:num_requests_running"), Some(4.0));
        assert_eq!(v("absent"), None);
    }

    #[test]
    fn malformed_input_is_refused() {
        assert!(parse("metric_without_value\n").is_err());
        assert!(parse("m{a=\"1\" 2\n").is_err());
        assert!(parse("m nan-ish\n").is_err());
        assert!(Selector::parse("m{a=1}").is_err());
        assert!(Selector::parse("bad name").is_err());
        assert_eq!(
            Selector::parse("m{a=\"1\"}").unwrap().to_string(),
            "m{a=\"1\"}"
        );
    }
}
