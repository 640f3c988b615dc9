//! The CLI commands that talk to a running agent over its HTTP endpoint
//! ([`crate::agent_http`]): `collector events` (tails `/api/v1/events`, one JSON line per
//! event, until the agent stops or the reader goes away), `collector stats proxy|dns` (the
//! JSON API as a table, or as JSON) and `collector top`.

use std::io::Write;

use anyhow::Context as _;
use serde_json::Value;

use crate::{
    agent_http::{Endpoint, ReadFailure},
    output,
};

/// Streams the agent's events to stdout, as they come.
pub fn events(agent: &Endpoint) -> anyhow::Result<()> {
    let mut answer = agent.get("/api/v1/events", Some("application/x-ndjson"))?;
    // The agent sends a heartbeat line on a quiet stream: three missed mean it is stopped,
    // frozen or cut off, and a tail under a supervisor had better end and say so.
    let silence = 3 * crate::event_stream::HEARTBEAT_INTERVAL;
    // A chunked stream ends with its last chunk when the agent stops; one cut off before
    // it is an agent that died (killed, crashed) or a connection lost.
    let marks_its_end = answer.chunked();
    let mut out = Lines::new(std::io::stdout().lock());
    loop {
        let bytes = match answer.next(silence) {
            Ok(Some(bytes)) => bytes,
            // Cut after the agent's end line (its last chunk held up past the stop's grace):
            // everything was sent.
            Err(ReadFailure::Closed(_) | ReadFailure::Reset(_)) if out.ended => {
                return out.finish();
            }
            Err(ReadFailure::Closed(err) | ReadFailure::Reset(err)) if marks_its_end => {
                return Err(anyhow::anyhow!(
                    "the event stream from the collector at {} was cut off before its end: {} \
                     ({err:#})",
                    agent.addr(),
                    CUT_OFF_CAUSES
                ));
            }
            // The body's end, or the connection's close for a body that ends with it: what
            // was sent has been written.
            Ok(None) | Err(ReadFailure::Closed(_)) => break,
            Err(ReadFailure::Silent) => anyhow::bail!(
                "nothing from the collector at {} for {} s, not even its heartbeat (one every \
                 {} s): it is stopped, frozen or cut off",
                agent.addr(),
                silence.as_secs(),
                crate::event_stream::HEARTBEAT_INTERVAL.as_secs()
            ),
            Err(ReadFailure::Reset(err) | ReadFailure::Failed(err)) => {
                return Err(err.context("reading the event stream"));
            }
        };
        if !out.forward(&bytes)? {
            return Ok(());
        }
    }
    let cut = || {
        format!(
            "the event stream from the collector at {} was cut off: {CUT_OFF_CAUSES}",
            agent.addr()
        )
    };
    out.finish().with_context(cut)?;
    // Only the agent's `end` line says it stopped cleanly: one stopping on an error ends its
    // streams without it, and without chunked framing (an HTTP/1.0 proxy in between) a
    // connection closed under the stream ends the body too.
    anyhow::ensure!(
        out.ended,
        "{}",
        if marks_its_end {
            format!(
                "the event stream from the collector at {} ended without its end line: the \
                 agent stopped on an error, or no longer admits the credentials it was opened \
                 with (its log says which)",
                agent.addr()
            )
        } else {
            format!("{}: no end line", cut())
        }
    );
    Ok(())
}

/// Why an event stream ends before its `end` line, as far as the reader can tell.
const CUT_OFF_CAUSES: &str = "the agent was killed or crashed, the connection was lost, or \
                              this reader stopped reading (a paused pager, a stuck pipe) for the \
                              60 s after which the agent lets a reader go";

/// Standard output for the stream's lines, written whole: a stream cut inside a line leaves
/// no half line for `| jq` to choke on.
struct Lines<W> {
    out: W,
    /// The start of a line whose end has not come yet.
    pending: Vec<u8>,
    /// The last whole line was the agent's `end` line.
    ended: bool,
}

/// The agent's last line of a stream it ends (`StreamEvent::End`, its tag first).
const END_LINE_START: &[u8] = br#"{"event":"end""#;

impl<W: Write> Lines<W> {
    const fn new(out: W) -> Self {
        Self {
            out,
            pending: Vec::new(),
            ended: false,
        }
    }

    /// Writes the lines `bytes` completes at once; `false` once the reader has gone (a
    /// closed pipe, as under `| head`), which ends a tail without an error.
    fn forward(&mut self, bytes: &[u8]) -> anyhow::Result<bool> {
        let Some(last) = bytes.iter().rposition(|&byte| byte == b'\n') else {
            self.pending.extend_from_slice(bytes);
            return Ok(true);
        };
        self.ended = match bytes[..last].iter().rposition(|&byte| byte == b'\n') {
            Some(before) => bytes[before + 1..last].starts_with(END_LINE_START),
            None => [self.pending.as_slice(), &bytes[..last]]
                .concat()
                .starts_with(END_LINE_START),
        };
        let written = self
            .out
            .write_all(&self.pending)
            .and_then(|()| self.out.write_all(&bytes[..=last]))
            .and_then(|()| self.out.flush());
        self.pending.clear();
        self.pending.extend_from_slice(&bytes[last + 1..]);
        match written {
            Ok(()) => Ok(true),
            Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
            Err(err) => Err(anyhow::Error::new(err).context("writing to standard output")),
        }
    }

    /// The stream's end: an error if it came inside a line (that part is not written).
    fn finish(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.pending.is_empty(),
            "{} bytes of an unfinished line left out",
            self.pending.len()
        );
        Ok(())
    }
}

fn number(value: &Value) -> f64 {
    value.as_f64().unwrap_or(0.0)
}

/// A figure that may be `null` (nothing to take it from, e.g. no close in the last minute):
/// `-` then, not a zero that reads as a measurement.
fn figure(value: &Value, precision: usize) -> String {
    value
        .as_f64()
        .map_or_else(|| "-".to_owned(), |v| format!("{v:.precision$}"))
}

/// A share (0 to 1) as a percentage, `-` when `null`.
fn percent(value: &Value) -> String {
    value
        .as_f64()
        .map_or_else(|| "-".to_owned(), |v| format!("{:.1} %", v * 100.0))
}

/// Seconds in the unit that reads best (DNS answers take microseconds), `-` when `null`.
fn duration(value: &Value) -> String {
    match value.as_f64() {
        None => "-".to_owned(),
        Some(s) if s < 1e-3 => format!("{:.1} µs", s * 1e6),
        Some(s) if s < 1.0 => format!("{:.2} ms", s * 1e3),
        Some(s) => format!("{s:.3} s"),
    }
}

/// A count as a plain integer: a JSON value's Display ignores the width, and would shift
/// every column after it.
fn count(value: &Value) -> u64 {
    value.as_u64().unwrap_or(0)
}

/// The name column's width: 16, or the longest name's, so that a long name moves the whole
/// column and no figure leaves its heading.
fn name_width(rows: &[Value]) -> usize {
    rows.iter()
        .filter_map(|row| row["name"].as_str())
        .map(|name| name.chars().count())
        .max()
        .unwrap_or(0)
        .max(16)
}

/// `/api/v1/proxy` as a table: one line per route, then the routes' server names, then the
/// totals. Where routes share ports by server name, an AWAITING column after ACTIVE: the
/// connections waiting for their ClientHello in each fallback route (`-` in the others),
/// which no other column counts yet.
#[must_use]
pub fn proxy_table(json: &Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let routes = json["routes"].as_array().map_or(&[][..], Vec::as_slice);
    let by_name = routes
        .iter()
        .any(|route| route.get("awaitingServerName").is_some());
    let awaiting = |cell: &dyn std::fmt::Display| {
        if by_name {
            format!(" {cell:>8}")
        } else {
            String::new()
        }
    };
    let width = name_width(routes);
    let _ = writeln!(
        out,
        "{:<width$} {:<9} {:>8}{} {:>10} {:>10} {:>9} {:>12} {:>12} {:>10}",
        "ROUTE",
        "TYPE",
        "ACTIVE",
        awaiting(&"AWAITING"),
        "OPENED",
        "CLOSED",
        "CONN/S",
        "IN B/S",
        "OUT B/S",
        "P50 S 1M"
    );
    for route in routes {
        let waiting = route["awaitingServerName"]
            .as_u64()
            .map_or_else(|| "-".to_owned(), |n| n.to_string());
        let _ = writeln!(
            out,
            "{:<width$} {:<9} {:>8}{} {:>10} {:>10} {:>9.1} {:>12} {:>12} {:>10}",
            route["name"].as_str().unwrap_or(""),
            route["type"].as_str().unwrap_or(""),
            count(&route["active"]),
            awaiting(&waiting),
            count(&route["opened"]),
            count(&route["closed"]),
            number(&route["connectionsPerSecond"]["instant"]),
            // `-` on a route with server names: its live bytes are not told apart.
            figure(&route["throughput"]["bytesIn"]["instant"], 0),
            figure(&route["throughput"]["bytesOut"]["instant"], 0),
            figure(&route["duration"]["p50"], 4),
        );
    }
    for route in routes {
        let names: Vec<&str> = route["serverNames"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if !names.is_empty() {
            let _ = writeln!(
                out,
                "  {} by server name: {}",
                route["name"].as_str().unwrap_or(""),
                names.join(", ")
            );
        }
    }
    let _ = writeln!(
        out,
        "total: {} active, {} connections, {:.1} new/s",
        count(&json["activeConnections"]),
        count(&json["totalConnections"]),
        number(&json["requestsPerSecond"])
    );
    upstream_table(&mut out, json);
    out
}

/// The `upstreams` of `/api/v1/proxy` as a table after the routes' totals, which leave
/// them out; nothing when there are none (or the agent is older than upstreams).
fn upstream_table(out: &mut String, json: &Value) {
    use std::fmt::Write as _;
    let Some(upstreams) = json["upstreams"].as_array().filter(|u| !u.is_empty()) else {
        return;
    };
    let width = name_width(upstreams);
    let ports_of = |upstream: &Value| {
        upstream["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    // As wide as the widest cell: a few ports, or the bytes of a long run (totals since the
    // start), pushed every figure after them out from under its heading.
    let widest = |cell: &dyn Fn(&Value) -> usize, heading: usize| {
        upstreams.iter().map(cell).max().unwrap_or(0).max(heading)
    };
    let ports_width = widest(&|upstream| ports_of(upstream).len(), 11);
    let bytes_width = widest(
        &|upstream| {
            count(&upstream["bytesIn"])
                .to_string()
                .len()
                .max(count(&upstream["bytesOut"]).to_string().len())
        },
        12,
    );
    let _ = writeln!(
        out,
        "\n{:<width$} {:<ports_width$} {:>8} {:>10} {:>10} {:>10} {:>8} {:>7} {:>bytes_width$} {:>bytes_width$} {:>10} {:>10}",
        "UPSTREAM",
        "PORTS",
        "ACTIVE",
        "CONNECTING",
        "OPENED",
        "CLOSED",
        "FAILED",
        "FAIL %",
        "IN BYTES",
        "OUT BYTES",
        "P50 S 1M",
        "P99 S 1M"
    );
    for upstream in upstreams {
        let _ = writeln!(
            out,
            "{:<width$} {:<ports_width$} {:>8} {:>10} {:>10} {:>10} {:>8} {:>7} {:>bytes_width$} {:>bytes_width$} {:>10} {:>10}",
            upstream["name"].as_str().unwrap_or(""),
            ports_of(upstream),
            count(&upstream["active"]),
            count(&upstream["connectsInProgress"]),
            count(&upstream["opened"]),
            count(&upstream["closed"]),
            count(&upstream["connectFailures"]),
            percent(&failed_share(upstream)),
            count(&upstream["bytesIn"]),
            count(&upstream["bytesOut"]),
            figure(&upstream["duration"]["p50"], 4),
            figure(&upstream["duration"]["p99"], 4),
        );
    }
}

/// The share of an upstream's connects since the start that failed (of those that either
/// completed their handshake or failed); `null` before the first.
fn failed_share(upstream: &Value) -> Value {
    let failed = count(&upstream["connectFailures"]);
    let connects = count(&upstream["opened"]) + failed;
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let share = (connects > 0).then(|| failed as f64 / connects as f64);
    Value::from(share)
}

/// Figures are said to be stale at this many poll intervals old (and 3 s at the least):
/// between polls they age by up to one.
const STALE_AFTER_POLLS: f64 = 2.5;
const STALE_AFTER_AT_LEAST_MS: f64 = 3_000.0;

/// What a table's figures are worth, said above them (nothing when all is well): none yet
/// (an agent that has not finished its first poll answers with empty figures), how old
/// they are when the polls have stopped moving them (a poll that cannot read the kernel
/// keeps the last figures, rates included), and each source that is down, with its error.
/// The age is the agent's own (`ageMs`), so that neither a remote agent's clock nor this
/// one's skews it; from an agent too old to send it, the read's `timestamp` against `now_ms`.
#[must_use]
pub fn freshness(json: &Value, now_ms: u64) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let interval_ms = json["pollIntervalMs"].as_f64().unwrap_or(1_000.0);
    let stale_ms = (interval_ms * STALE_AFTER_POLLS).max(STALE_AFTER_AT_LEAST_MS);
    let read_at = json["timestamp"].as_u64().unwrap_or(0);
    #[expect(clippy::cast_precision_loss, reason = "milliseconds far below 2^52")]
    let age_ms = json["ageMs"].as_f64().or_else(|| {
        json.get("ageMs")
            .is_none()
            .then(|| now_ms.saturating_sub(read_at) as f64)
    });
    if read_at == 0 {
        let _ = writeln!(
            out,
            "no poll has finished yet (the agent is starting): every figure below is empty"
        );
    } else if let Some(age_ms) = age_ms.filter(|age| *age >= stale_ms) {
        let _ = writeln!(
            out,
            "figures as read {:.0} s ago (polls every {} s): the agent's polls have not moved \
             them since",
            age_ms / 1000.0,
            interval_ms / 1000.0
        );
    }
    for (name, source) in json["sources"].as_object().into_iter().flatten() {
        if source["up"] == false {
            let why = source["lastError"].as_str().unwrap_or("no error recorded");
            let _ = writeln!(out, "source {name} is down: {why}");
        }
    }
    if !out.is_empty() {
        out.push('\n');
    }
    out
}

/// The last minute's DNS latency (`/api/v1/dns`' `latency`) in a line.
fn latency_line(latency: &Value) -> String {
    // Given up after 10 s without an answer: in the quantiles, at 10 s.
    let given_up = match latency["givenUp"].as_u64() {
        Some(n) if n > 0 => format!(", {n} given up"),
        _ => String::new(),
    };
    format!(
        "latency: p50 {}, p99 {} ({} answered in the last minute{given_up})",
        duration(&latency["p50"]),
        duration(&latency["p99"]),
        count(&latency["count"])
    )
}

/// `/api/v1/dns` as a few readable lines.
#[must_use]
pub fn dns_table(json: &Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if json["enabled"] == false {
        let _ = writeln!(out, "DNS counting is off ([dns] enabled = false)");
        return out;
    }
    // `-` for none seen yet, as for a rate of nothing.
    let pairs = |value: &Value| -> String {
        value.as_object().filter(|map| !map.is_empty()).map_or_else(
            || "-".to_owned(),
            |map| {
                map.iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        )
    };
    let _ = writeln!(
        out,
        "queries {} ({:.1}/s), responses {} since the start; error rate {}, unanswered {} \
         (last minute)",
        count(&json["totalQueries"]),
        number(&json["queriesPerSecond"]),
        count(&json["totalResponses"]),
        percent(&json["errorRate"]),
        percent(&json["unansweredRate"])
    );
    let matching = json["matchResponses"] != false;
    // With `[dns] match_every` above 1, the matched figures count a sample: say of what.
    let sample = match json["matchEvery"].as_u64() {
        Some(every) if every > 1 => format!(" (one query in {every} matched)"),
        _ => String::new(),
    };
    if matching {
        let _ = writeln!(
            out,
            "cache since the start: {} hits, {} misses; hit rate {} (last minute){sample}",
            count(&json["cacheStats"]["hits"]),
            count(&json["cacheStats"]["misses"]),
            percent(&json["cacheStats"]["hitRate"])
        );
        if json["cacheStats"]["undecided"]
            .as_u64()
            .is_some_and(|n| n > 0)
        {
            let _ = writeln!(
                out,
                "cache: {} undecided (answers relayed from a server behind a DNAT, whose \
                 upstream queries are not seen here, or without a question)",
                count(&json["cacheStats"]["undecided"])
            );
        }
    }
    // Since the start, as the counts above: a spike of the last minute is in the rates.
    let _ = writeln!(
        out,
        "types since the start: {}",
        pairs(&json["queryTypeBreakdown"])
    );
    // Classes only where a query was not IN: a CH `version.bind` probe, say.
    if json["queryClassBreakdown"]
        .as_object()
        .is_some_and(|classes| classes.keys().any(|class| class != "IN"))
    {
        let _ = writeln!(
            out,
            "classes since the start: {}",
            pairs(&json["queryClassBreakdown"])
        );
    }
    let _ = writeln!(
        out,
        "codes since the start: {}",
        pairs(&json["responseCodes"])
    );
    if matching {
        let _ = writeln!(out, "{}{sample}", latency_line(&json["latency"]));
    } else {
        let _ = writeln!(
            out,
            "cache and latency: not measured ([dns] match_responses = false)"
        );
    }
    if let Some(seconds) = json["topDomainsRecentSeconds"].as_f64() {
        let span = if seconds < 120.0 {
            format!("{seconds:.0} s")
        } else {
            format!("{:.0} min", seconds / 60.0)
        };
        let _ = writeln!(out, "top domains, last {span}:");
        list_domains(&mut out, &json["topDomainsRecent"]);
    }
    let _ = writeln!(out, "top domains since the start:");
    list_domains(&mut out, &json["topDomains"]);
    out
}

/// The first ten of a JSON list of domains, one a line; `(none)` for none, so that a heading
/// does not stand over nothing, or over the next heading.
fn list_domains(out: &mut String, domains: &Value) {
    use std::fmt::Write as _;
    let domains = domains.as_array().map_or(&[][..], Vec::as_slice);
    if domains.is_empty() {
        out.push_str("  (none)\n");
    }
    for domain in domains.iter().take(10) {
        // Past the tracked set a count may be short by its inherited count: say by how much.
        let undercount = match count(&domain["maxUndercount"]) {
            0 => String::new(),
            more => format!("  (up to {more} more)"),
        };
        let _ = writeln!(
            out,
            "  {:>10}  {}{undercount}",
            count(&domain["count"]),
            domain["domain"].as_str().unwrap_or("")
        );
    }
}

/// Clears the screen and homes the cursor, like watch(1).
const CLEAR: &str = "\x1b[2J\x1b[H";

/// How `refresh` shows each refresh.
#[derive(Clone, Copy)]
enum Refreshes {
    /// Tables: on a cleared screen on a terminal, one after another (a blank line between)
    /// into a file or a pipe.
    Tables,
    /// One JSON document a line, nothing else on standard output.
    JsonLines,
}

/// Shows `fetch`'s text every second. The first failure ends it (a wrong address or
/// credentials); a later one, such as the agent restarting, is shown in place of the figures
/// on a terminal, and on standard error otherwise (a reader of JSON lines, `jq` say, would
/// stop at a line of text), and tried again a second later.
fn refresh(
    agent: &Endpoint,
    refreshes: Refreshes,
    mut fetch: impl FnMut() -> anyhow::Result<String>,
) -> anyhow::Result<()> {
    use std::io::IsTerminal as _;
    let screen = matches!(refreshes, Refreshes::Tables) && std::io::stdout().is_terminal();
    let mut shown = false;
    let mut due = std::time::Instant::now();
    loop {
        let text = match fetch() {
            Ok(text) => Some(text),
            Err(err) if !shown => return Err(err),
            Err(err) => {
                let failure = format!(
                    "the collector at {} did not answer: {err:#}\ntrying again every second \
                     (Ctrl-C to stop)\n",
                    agent.addr()
                );
                if screen {
                    Some(failure)
                } else if output::reader_gone() {
                    return Err(output::ReaderGone.into());
                } else {
                    let _ = write!(std::io::stderr(), "{failure}");
                    None
                }
            }
        };
        if let Some(text) = text {
            let separate = shown && matches!(refreshes, Refreshes::Tables);
            output::write(|out| {
                if screen {
                    write!(out, "{CLEAR}")?;
                } else if separate {
                    writeln!(out)?;
                }
                write!(out, "{text}")
            })?;
            shown = true;
        }
        crate::clock::sleep_until_due(&mut due, std::time::Duration::from_secs(1));
    }
}

/// `collector stats proxy|dns`: once, or every second with `watch`.
pub fn stats(agent: &Endpoint, dns: bool, json: bool, watch: bool) -> anyhow::Result<()> {
    let path = if dns { "/api/v1/dns" } else { "/api/v1/proxy" };
    let fetch = || -> anyhow::Result<String> {
        let value = agent.get_json(path)?;
        Ok(if json {
            format!("{value}\n")
        } else {
            let table = if dns {
                dns_table(&value)
            } else {
                proxy_table(&value)
            };
            freshness(&value, crate::clock::unix_ms()) + &table
        })
    };
    if watch {
        let refreshes = if json {
            Refreshes::JsonLines
        } else {
            Refreshes::Tables
        };
        return refresh(agent, refreshes, fetch);
    }
    let text = fetch()?;
    output::write(|out| write!(out, "{text}"))
}

/// `collector top`: routes and DNS together, refreshed every second (or once).
pub fn top(agent: &Endpoint, once: bool) -> anyhow::Result<()> {
    let fetch = || -> anyhow::Result<String> {
        let proxy = agent.get_json("/api/v1/proxy")?;
        let dns = agent.get_json("/api/v1/dns")?;
        let now_ms = crate::clock::unix_ms();
        // The time of this fetch: a screen that stops changing it is not being refreshed
        // (an agent frozen with its socket open holds each fetch for the read timeout).
        let mut text = format!(
            "collector at {}, {}\n\n{}{}",
            agent.addr(),
            crate::clock::time_of_day_utc(now_ms),
            freshness(&proxy, now_ms),
            proxy_table(&proxy)
        );
        if dns["enabled"] == true {
            text.push('\n');
            text.push_str(&dns_table(&dns));
        }
        Ok(text)
    };
    if !once {
        return refresh(agent, Refreshes::Tables, fetch);
    }
    let text = fetch()?;
    output::write(|out| write!(out, "{text}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_lines_are_written_whole() {
        let mut lines = super::Lines::new(Vec::new());
        assert!(lines.forward(b"{\"a\":1}\n{\"b\"").unwrap());
        assert_eq!(lines.out, b"{\"a\":1}\n");
        assert!(lines.forward(b":2}\n").unwrap());
        assert_eq!(lines.out, b"{\"a\":1}\n{\"b\":2}\n");
        lines.finish().unwrap();
        // Cut inside a line: that part is not written, and the end says so.
        assert!(lines.forward(b"{\"c\"").unwrap());
        assert_eq!(lines.out, b"{\"a\":1}\n{\"b\":2}\n");
        let err = lines.finish().unwrap_err().to_string();
        assert_eq!(err, "4 bytes of an unfinished line left out");
        // The agent's end line, split across reads, is seen as the last.
        let mut lines = super::Lines::new(Vec::new());
        assert!(
            lines
                .forward(b"{\"event\":\"heartbeat\"}\n{\"event\":\"e")
                .unwrap()
        );
        assert!(!lines.ended);
        assert!(lines.forward(b"nd\",\"timestamp\":1}\n").unwrap());
        assert!(lines.ended);
        assert!(lines.forward(b"{\"event\":\"heartbeat\"}\n").unwrap());
        assert!(!lines.ended);
    }

    #[test]
    fn upstreams_follow_the_routes_in_a_table_of_their_own() {
        let snapshot = crate::snapshot::Snapshot::example();
        let mut proxy = serde_json::to_value(crate::api::proxy_stats(&snapshot)).unwrap();
        let table = proxy_table(&proxy);
        let lines: Vec<&str> = table.lines().collect();
        let heading = lines
            .iter()
            .position(|line| line.starts_with("UPSTREAM"))
            .unwrap_or_else(|| panic!("{table}"));
        // After the routes and their totals, which leave the upstreams out.
        assert!(lines[heading - 2].starts_with("total: 2 active, 12 connections"));
        assert_eq!(lines[heading - 1], "", "{table}");
        let app = lines[heading + 1];
        assert_eq!(
            app.split_whitespace().collect::<Vec<_>>(),
            [
                "app", "9000", "2", "1", "4", "3", "2", "33.3", "%", "7000", "600", "0.0008",
                "0.0010"
            ],
            "{table}"
        );
        // Every figure ends where its heading does.
        let header = lines[heading];
        for (heading, value) in [
            ("ACTIVE", " 2"),
            ("CONNECTING", " 1"),
            ("FAILED", " 2"),
            ("FAIL %", "33.3 %"),
            ("OUT BYTES", " 600"),
            ("P99 S 1M", "0.0010"),
        ] {
            let end = header.find(heading).unwrap() + heading.len();
            assert_eq!(&app[end - value.len()..end], value, "{heading}:\n{table}");
        }

        // Several ports; no connect yet, no close in the last minute: `-`, not zeros.
        proxy["upstreams"] = serde_json::json!([{
            "name": "db", "ports": [5432, 5433], "active": 0, "opened": 0, "closed": 0,
            "connectFailures": 0, "bytesIn": 0, "bytesOut": 0,
            "duration": {"count": 0, "p50": null, "p99": null}
        }]);
        let table = proxy_table(&proxy);
        let db = table.lines().find(|line| line.starts_with("db")).unwrap();
        assert_eq!(
            db.split_whitespace().collect::<Vec<_>>(),
            [
                "db",
                "5432,5433",
                "0",
                "0",
                "0",
                "0",
                "0",
                "-",
                "0",
                "0",
                "-",
                "-"
            ],
            "{table}"
        );

        // Three ports and a long run's bytes, wider than their headings: the columns widen,
        // and every figure still ends where its heading does.
        proxy["upstreams"] = serde_json::json!([{
            "name": "db", "ports": [8080, 8081, 8443], "active": 3, "opened": 9, "closed": 6,
            "connectFailures": 0, "bytesIn": 5, "bytesOut": 1_234_567_890_123_u64,
            "duration": {"count": 0, "p50": null, "p99": null}
        }]);
        let table = proxy_table(&proxy);
        let lines: Vec<&str> = table.lines().collect();
        let heading = lines
            .iter()
            .position(|l| l.starts_with("UPSTREAM"))
            .unwrap();
        let (header, db) = (lines[heading], lines[heading + 1]);
        for (heading, value) in [
            ("ACTIVE", " 3"),
            ("IN BYTES", " 5"),
            ("OUT BYTES", " 1234567890123"),
            ("P99 S 1M", " -"),
        ] {
            let end = header.find(heading).unwrap() + heading.len();
            assert_eq!(&db[end - value.len()..end], value, "{heading}:\n{table}");
        }

        // None configured, or an agent older than upstreams: no table at all.
        let routes_only = |proxy: &Value| {
            let table = proxy_table(proxy);
            assert!(!table.contains("UPSTREAM"), "{table}");
            assert!(table.ends_with("new/s\n"), "{table}");
        };
        proxy["upstreams"] = serde_json::json!([]);
        routes_only(&proxy);
        proxy.as_object_mut().unwrap().remove("upstreams");
        routes_only(&proxy);
    }

    #[test]
    fn routes_on_ports_shared_by_server_name_show_their_wait_and_their_names() {
        let snapshot = crate::snapshot::Snapshot::example();
        let mut proxy = serde_json::to_value(crate::api::proxy_stats(&snapshot)).unwrap();
        let table = proxy_table(&proxy);
        let lines: Vec<&str> = table.lines().collect();
        let header = lines[0];
        let row = |name: &str| {
            *lines
                .iter()
                .find(|line| line.starts_with(&format!("{name} ")))
                .unwrap_or_else(|| panic!("no {name} in\n{table}"))
        };
        // After ACTIVE, as CONNECTING is in the upstream table; `-` where a route has none.
        assert!(
            header.starts_with("ROUTE") && header.contains("ACTIVE AWAITING     OPENED"),
            "{table}"
        );
        for (route, value) in [("tls", " 2"), ("api", " -"), ("web", " -")] {
            let end = header.find("AWAITING").unwrap() + "AWAITING".len();
            assert_eq!(
                &row(route)[end - value.len()..end],
                value,
                "{route}:\n{table}"
            );
        }
        // Every figure after it stays under its heading.
        let opened = header.find("OPENED").unwrap() + "OPENED".len();
        assert_eq!(&row("tls")[opened - 2..opened], " 4", "{table}");
        assert!(
            lines.contains(&"  api by server name: api.example.com, *.api.example.com"),
            "{table}"
        );
        assert_eq!(
            lines
                .iter()
                .filter(|line| line.contains("by server name"))
                .count(),
            1,
            "{table}"
        );

        // No route on a shared port (or an agent older than server names): the table as
        // before, without the column or the names.
        proxy["routes"].as_array_mut().unwrap().truncate(1);
        let table = proxy_table(&proxy);
        assert!(
            !table.contains("AWAITING") && !table.contains("server name"),
            "{table}"
        );
        assert!(
            table
                .lines()
                .next()
                .unwrap()
                .starts_with("ROUTE            TYPE        ACTIVE     OPENED"),
            "{table}"
        );
    }

    #[test]
    fn the_proxy_table_shows_the_figures_people_look_for() {
        let proxy = serde_json::json!({
            "activeConnections": 2, "totalConnections": 5, "requestsPerSecond": 1.5,
            "routes": [{"name": "web", "type": "http", "active": 2, "opened": 5, "closed": 3,
                "connectionsPerSecond": {"instant": 1.5},
                "throughput": {"bytesIn": {"instant": 100.0}, "bytesOut": {"instant": 900.0}},
                "duration": {"p50": 0.25}}]
        });
        let table = proxy_table(&proxy);
        let web = table.lines().nth(1).unwrap();
        assert!(web.starts_with("web") && web.contains("http"), "{table}");
        assert!(
            web.split_whitespace().collect::<Vec<_>>()[2..5] == ["2", "5", "3"],
            "{web}"
        );
        assert!(table.contains("total: 2 active, 5 connections"));
        // Every number ends where its heading does.
        let header = table.lines().next().unwrap();
        for (heading, value) in [
            ("ACTIVE", " 2"),
            ("CLOSED", " 3"),
            ("IN B/S", " 100"),
            ("OUT B/S", " 900"),
            ("P50 S 1M", "0.2500"),
        ] {
            let end = header.find(heading).unwrap() + heading.len();
            assert_eq!(&web[end - value.len()..end], value, "{heading}:\n{table}");
        }
        // Also under a name longer than the column.
        let mut long = proxy.clone();
        long["routes"][0]["name"] = "payments-gateway-internal".into();
        let table = proxy_table(&long);
        let (header, row) = (table.lines().next().unwrap(), table.lines().nth(1).unwrap());
        let end = header.find("CLOSED").unwrap() + "CLOSED".len();
        assert_eq!(&row[end - 2..end], " 3", "{table}");
        // Nothing to take a figure from is `-`, not a zero: no close in the last minute, a
        // route with server names' live bytes.
        let idle = serde_json::json!({"routes": [{"name": "web", "duration": {"p50": null},
            "throughput": null}]});
        let web = proxy_table(&idle).lines().nth(1).unwrap().to_owned();
        assert!(
            web.split_whitespace().rev().take(3).all(|f| f == "-"),
            "{web}"
        );
    }

    #[test]
    fn the_latency_line_names_the_queries_given_up() {
        let slow = serde_json::json!({"p50": 0.001, "p99": 10.0, "count": 9, "givenUp": 3});
        assert_eq!(
            latency_line(&slow),
            "latency: p50 1.00 ms, p99 10.000 s (9 answered in the last minute, 3 given up)"
        );
        let none_given_up =
            serde_json::json!({"p50": 0.001, "p99": 0.002, "count": 9, "givenUp": 0});
        assert_eq!(
            latency_line(&none_given_up),
            "latency: p50 1.00 ms, p99 2.00 ms (9 answered in the last minute)"
        );
    }

    #[test]
    fn the_dns_table_shows_the_figures_people_look_for() {
        let dns = serde_json::json!({
            "totalQueries": 9, "queriesPerSecond": 3.0, "totalResponses": 9, "errorRate": 0.0,
            "unansweredRate": 0.25,
            "cacheStats": {"hits": 8, "misses": 1, "hitRate": 0.888},
            "queryTypeBreakdown": {"A": 9}, "responseCodes": {"NOERROR": 9},
            "latency": {"p50": 0.001, "p99": 0.002, "count": 9},
            "topDomains": [{"domain": "example.com", "count": 9}],
            "topDomainsRecent": [{"domain": "example.com", "count": 2}],
            "topDomainsRecentSeconds": 420.0
        });
        let text = dns_table(&dns);
        assert!(
            text.contains("top domains, last 7 min:\n           2  example.com\n"),
            "{text}"
        );
        assert!(
            text.contains("cache since the start: 8 hits, 1 misses; hit rate 88.8 % (last minute)"),
            "{text}"
        );
        assert!(
            text.contains("error rate 0.0 %, unanswered 25.0 %"),
            "{text}"
        );
        assert!(!text.contains("undecided"), "{text}");
        let mut relayed = dns.clone();
        relayed["cacheStats"]["undecided"] = 4.into();
        assert!(
            dns_table(&relayed).contains("cache: 4 undecided (answers relayed"),
            "{text}"
        );
        assert!(
            text.contains("latency: p50 1.00 ms, p99 2.00 ms (9 answered"),
            "{text}"
        );
        assert!(!text.contains("matched"), "{text}");
        assert!(text.contains("types since the start: A 9"));
        // Classes only where one is not IN.
        assert!(!text.contains("classes"), "{text}");
        let mut probed = dns.clone();
        probed["queryClassBreakdown"] = serde_json::json!({"IN": 8, "CH": 1});
        let probed = dns_table(&probed);
        assert!(
            probed.contains("classes since the start: CH 1, IN 8\n"),
            "{probed}"
        );
        let mut quiet = dns.clone();
        quiet["queryTypeBreakdown"] = serde_json::json!({});
        quiet["responseCodes"] = serde_json::json!({});
        let quiet = dns_table(&quiet);
        assert!(
            quiet.contains("types since the start: -\ncodes since the start: -\n"),
            "{quiet}"
        );
        assert!(
            text.contains("top domains since the start:\n           9  example.com"),
            "{text}"
        );

        let unmatched = serde_json::json!({
            "totalQueries": 9, "matchResponses": false, "cacheStats": null, "latency": null,
            "queryTypeBreakdown": {"A": 9}, "responseCodes": {"NOERROR": 9}, "topDomains": []
        });
        let text = dns_table(&unmatched);
        assert!(
            !text.contains("hit rate") && !text.contains("p50"),
            "{text}"
        );
        assert!(text.contains("not measured ([dns] match_responses = false)"));
        // An empty list says so under its heading.
        assert!(
            text.ends_with("top domains since the start:\n  (none)\n"),
            "{text}"
        );

        // Nothing to take a figure from is `-`, not a zero; microseconds read as such; a
        // count that may be short says by how much.
        let idle = serde_json::json!({
            "errorRate": null, "cacheStats": {"hitRate": null},
            "latency": {"p50": 7.8e-6, "p99": null},
            "topDomains": [{"domain": "a.example", "count": 5, "maxUndercount": 410}]
        });
        let text = dns_table(&idle);
        assert!(
            text.contains("rate -, unanswered - (last minute)"),
            "{text}"
        );
        assert!(text.contains("hit rate - (last minute)"), "{text}");
        assert!(text.contains("latency: p50 7.8 µs, p99 -"), "{text}");
        assert!(text.contains("5  a.example  (up to 410 more)"), "{text}");

        let mut sampled = dns;
        sampled["matchEvery"] = 16.into();
        let text = dns_table(&sampled);
        assert!(
            text.contains("hit rate 88.8 % (last minute) (one query in 16 matched)")
                && text.contains("(9 answered in the last minute) (one query in 16 matched)"),
            "{text}"
        );

        // DNS off: said so, not a table of zeros "not measured" for another reason.
        let off = serde_json::json!({
            "enabled": false, "totalQueries": 0, "matchResponses": false,
            "queryTypeBreakdown": {}, "responseCodes": {}, "topDomains": []
        });
        assert_eq!(
            dns_table(&off),
            "DNS counting is off ([dns] enabled = false)\n"
        );
    }

    #[test]
    fn stale_empty_or_partial_figures_are_said_to_be() {
        let now = 1_700_000_010_000;
        let fresh = serde_json::json!({
            "timestamp": 1_700_000_000_000_u64, "ageMs": 900, "pollIntervalMs": 1000,
            "sources": {"ebpf": {"up": true}, "nftables": {"up": true}}
        });
        assert_eq!(freshness(&fresh, now), "");
        // Before a first poll the agent answers with empty figures, read at no time (0 from
        // an agent before 2026-12-05).
        let starting = serde_json::json!({"timestamp": null, "ageMs": null, "sources": {}});
        assert!(
            freshness(&starting, now).starts_with("no poll has finished yet"),
            "{}",
            freshness(&starting, now)
        );
        // 4 s old is fresh at 5 s polls, stale at 1 s polls.
        let slow_polls = serde_json::json!({
            "timestamp": 1_700_000_000_000_u64, "ageMs": 4_000, "pollIntervalMs": 5000
        });
        assert_eq!(freshness(&slow_polls, now), "");
        // A poll that cannot read the kernel keeps the last figures: their age, and why.
        let stuck = serde_json::json!({
            "timestamp": 1_700_000_000_000_u64, "ageMs": 12_400, "pollIntervalMs": 1000,
            "sources": {
                "ebpf": {"up": false, "lastError": "reading CONN_COUNTERS: EBADF"},
                "netlink": {"up": true}
            }
        });
        assert_eq!(
            freshness(&stuck, now),
            "figures as read 12 s ago (polls every 1 s): the agent's polls have not moved them \
             since\nsource ebpf is down: reading CONN_COUNTERS: EBADF\n\n"
        );
        // An agent from before `ageMs`: the read's time against this clock, the interval
        // taken as the default.
        let older = serde_json::json!({"timestamp": now - 5_000});
        assert!(
            freshness(&older, now).starts_with("figures as read 5 s ago"),
            "{}",
            freshness(&older, now)
        );
        assert_eq!(
            freshness(&serde_json::json!({"timestamp": now - 1_000}), now),
            ""
        );
    }
}
