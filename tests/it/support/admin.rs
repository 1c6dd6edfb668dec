//! The bridge's admin endpoints from the outside: a bare HTTP/1.1 GET and a small parser of the
//! Prometheus text exposition format, so tests read `/metrics` as an operator's scraper would.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one admin request may take.
const REQUEST_LIMIT: Duration = Duration::from_secs(5);

/// `GET path` on `addr`; returns the status code and the body.
pub async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect to admin");
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("send admin request");
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .await
            .expect("read admin response");
        raw
    };
    let raw = super::within(REQUEST_LIMIT, "admin request", exchange).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("admin answer without a head/body split: {text:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("admin answer without a status: {head:?}"));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// `/readyz`: the status and the parsed JSON body.
pub async fn readyz(addr: SocketAddr) -> (u16, serde_json::Value) {
    let (status, body) = get(addr, "/readyz").await;
    let json = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("/readyz body is not JSON ({e}): {body:?}"));
    (status, json)
}

/// Reads `/readyz` every 100 ms until `done` holds for its answer or `limit` passes; the last
/// answer either way (the caller asserts on it).
pub async fn readyz_until(
    addr: SocketAddr,
    limit: std::time::Duration,
    done: impl Fn(u16, &serde_json::Value) -> bool,
) -> (u16, serde_json::Value) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let (status, body) = readyz(addr).await;
        if done(status, &body) || std::time::Instant::now() >= deadline {
            return (status, body);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Scrapes `/metrics` and parses it.
pub async fn scrape(addr: SocketAddr) -> Metrics {
    let (status, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200, "/metrics answered {status}: {body}");
    Metrics::parse(&body)
}

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed scrape.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub samples: Vec<Sample>,
    /// The text as scraped, for failure messages.
    pub text: String,
}

impl Metrics {
    /// Parses the text format; panics on a line that is neither a comment nor a sample.
    pub fn parse(text: &str) -> Metrics {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(|line| parse_sample(line).unwrap_or_else(|| panic!("bad metrics line {line:?}")))
            .collect();
        Metrics {
            samples,
            text: text.to_owned(),
        }
    }

    /// Samples named `name` whose labels include every pair of `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The sum of the samples [`Self::matching`]; 0 when there are none (a counter never
    /// incremented is not exported).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// The value of the one sample named `name` with `labels`, if exported.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<_> = self.matching(name, labels).collect();
        assert!(
            found.len() <= 1,
            "{name}{labels:?} matches {} samples: {found:?}",
            found.len()
        );
        found.first().map(|s| s.value)
    }

    /// Whether any sample is named `name`.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }

    /// The distinct values of label `label` among samples named `name`.
    pub fn label_values(&self, name: &str, label: &str) -> Vec<String> {
        let mut values: Vec<String> = self
            .samples
            .iter()
            .filter(|s| s.name == name)
            .filter_map(|s| s.labels.get(label).cloned())
            .collect();
        values.sort();
        values.dedup();
        values
    }
}

fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(after_brace)?;
        labels = parsed;
        rest = after;
    }
    // `value [timestamp]`
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// Parses `k="v",k2="v2"}` (escapes `\\`, `\"`, `\n`); returns the labels and what follows `}`.
fn parse_labels(mut text: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        text = text.trim_start_matches([' ', ',']);
        if let Some(after) = text.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, after_key) = text.split_once('=')?;
        let mut chars = after_key.strip_prefix('"')?.char_indices();
        let mut value = String::new();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        };
        labels.insert(key.trim().to_owned(), value);
        text = &after_key[1 + end + 1..];
    }
}

#[test]
fn the_parser_reads_labels_escapes_and_special_values() {
    let text = "# HELP x y\n# TYPE a counter\na_total{k=\"v\",q=\"say \\\"hi\\\"\\n\"} 3\nb 1.5\nc_bucket{le=\"+Inf\"} 7 1700000000\nd -Inf\n";
    let metrics = Metrics::parse(text);
    assert_eq!(metrics.get("a_total", &[("k", "v")]), Some(3.0));
    assert_eq!(
        metrics.label_values("a_total", "q"),
        vec!["say \"hi\"\n".to_string()]
    );
    assert_eq!(metrics.get("b", &[]), Some(1.5));
    assert_eq!(metrics.get("c_bucket", &[("le", "+Inf")]), Some(7.0));
    assert_eq!(metrics.get("d", &[]), Some(f64::NEG_INFINITY));
    assert_eq!(metrics.sum("missing", &[]), 0.0);
}
