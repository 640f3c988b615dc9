//! gzip for the bodies the agent renders whole (`/metrics`, the JSON API), when the request's
//! `Accept-Encoding` takes it, as Prometheus's scrapes do: a node's exposition shrinks about
//! sixfold. Compressed in the handler, under the guard's time limit and permit, into bytes:
//! a compressing layer works while the body is written, so a client that does not read held
//! an encoder (some 256 KiB of zlib state) on top of the body. Never the event stream, whose
//! lines must leave as they come.

use std::io::Write as _;

use axum::{
    http::{HeaderMap, HeaderValue, header},
    response::{IntoResponse, Response},
};
use flate2::{Compression, write::GzEncoder};

use crate::serve::weight;

/// `body`, of `content_type`, gzipped if `request` takes it; `Vary` says the choice
/// depends on the request, for caches between. The bytes sent are trimmed to their length:
/// a rendering grows its buffer by doubling, and an answer held for a reader that does not
/// take it is counted by its length (`unsent_answers`). A fresh buffer's unwritten tail is
/// never resident, but one taken from pages an earlier answer wrote would be, up to twice
/// what is counted.
pub fn respond(request: &HeaderMap, content_type: &'static str, body: Vec<u8>) -> Response {
    let takes_gzip = accepts_gzip(
        request
            .get_all(header::ACCEPT_ENCODING)
            .iter()
            .filter_map(|value| value.to_str().ok()),
    );
    let mut response = match takes_gzip.then(|| compress(&body)) {
        Some(Ok(compressed)) => {
            ([(header::CONTENT_ENCODING, "gzip")], trimmed(compressed)).into_response()
        }
        // Compressing into memory cannot fail short of allocation; the body as it is.
        Some(Err(_)) | None => trimmed(body).into_response(),
    };
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    response
}

/// `bytes` in an allocation of their length.
fn trimmed(mut bytes: Vec<u8>) -> Vec<u8> {
    bytes.shrink_to_fit();
    bytes
}

fn compress(body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut encoder = GzEncoder::new(Vec::with_capacity(body.len() / 4), Compression::default());
    encoder.write_all(body)?;
    encoder.finish()
}

/// Whether the `Accept-Encoding` values take gzip (RFC 9110, 12.5.3): `gzip` (or `x-gzip`)
/// with a quality above 0, or else `*` so. A coding of a quality that does not parse is
/// passed over; none named, none taken (the identity is always acceptable).
fn accepts_gzip<'a>(values: impl Iterator<Item = &'a str>) -> bool {
    let (mut gzip, mut any) = (None, None);
    for coding in values.flat_map(|value| value.split(',')) {
        let mut parts = coding.split(';');
        let name = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
        let Some(quality) = weight(parts) else {
            continue;
        };
        match name.as_str() {
            "gzip" | "x-gzip" => gzip = Some(quality),
            "*" => any = Some(quality),
            _ => {}
        }
    }
    gzip.or(any).is_some_and(|quality| quality > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn takes(value: &str) -> bool {
        accepts_gzip(std::iter::once(value))
    }

    #[test]
    fn gzip_is_taken_as_rfc_9110_weighs_it() {
        for yes in [
            "gzip",
            "GZIP",
            "br, gzip;q=0.5",
            "x-gzip",
            "*",
            "gzip;q=0.001",
            "deflate, gzip ; q=1",
            "*;q=0.5, br",
        ] {
            assert!(takes(yes), "{yes}");
        }
        for no in [
            "",
            "identity",
            "br, deflate",
            "gzip;q=0",
            "gzip;q=0.000",
            "*, gzip;q=0",
            "*;q=0",
            "gzip;q=2",
            // Space around `=` as `Accept` allows it (until 2026-12-07 this one took gzip).
            "gzip; q = 0",
            "gzip;Q=0",
        ] {
            assert!(!takes(no), "{no}");
        }
        // Over several header lines.
        assert!(accepts_gzip(["br", "gzip"].into_iter()));
    }

    #[test]
    fn a_gzipped_answer_reads_back_as_the_body_and_says_how() {
        use std::io::Read as _;
        let body = b"collector_up 1\n".repeat(1000);
        let mut request = HeaderMap::new();
        request.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
        let response = respond(&request, "text/plain", body.clone());
        assert_eq!(response.headers()[header::CONTENT_ENCODING], "gzip");
        assert_eq!(response.headers()[header::VARY], "accept-encoding");
        assert_eq!(response.headers()[header::CONTENT_TYPE], "text/plain");
        let plain = respond(&HeaderMap::new(), "text/plain", body.clone());
        assert_eq!(plain.headers().get(header::CONTENT_ENCODING), None);
        let compressed = compress(&body).unwrap();
        let mut read = Vec::new();
        flate2::read::GzDecoder::new(&compressed[..])
            .read_to_end(&mut read)
            .unwrap();
        assert_eq!(read, body);
        assert!(compressed.len() * 10 < body.len());
    }
}
