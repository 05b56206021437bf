//! The little HTTP client the adapter needs beside bollard: one GET over a
//! Unix socket connection of its own, HTTP/1.0 so the body is simply
//! everything after the headers (chunked answers are undone too), for the
//! reads whose answers bollard's typed models reject (see the
//! [parent module](super)); and one POST whose answer is read line by line
//! as it arrives, for the pull's progress stream.
//!
//! Header values given to [`post_streaming`] never appear in an error: they
//! may be registry credentials.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use podfleet_core::runtime::{RuntimeError, RuntimeErrorKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// GETs `path_and_query` over a connection of its own: HTTP/1.0, so the
/// body is simply everything after the headers.
pub(super) async fn get(
    socket: &Path,
    path_and_query: &str,
    timeout: Duration,
) -> Result<HttpResponse, RuntimeError> {
    let request = format!(
        "GET {path_and_query} HTTP/1.0\r\nHost: localhost\r\nAccept: application/json\r\n\r\n"
    );
    let exchange = async {
        let mut stream = UnixStream::connect(socket).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let unavailable = |why: String| {
        RuntimeError::new(
            RuntimeErrorKind::Unavailable,
            format!("GET {path_and_query} on {}: {why}", socket.display()),
        )
    };
    let response = match tokio::time::timeout(timeout, exchange).await {
        Err(_elapsed) => return Err(unavailable("no answer in time".to_owned())),
        Ok(Err(e)) => return Err(unavailable(e.to_string())),
        Ok(Ok(response)) => response,
    };
    parse_http_response(&response).map_err(unavailable)
}

/// POSTs an empty body to `path_and_query` over a connection of its own,
/// with `headers` besides the usual ones, and returns once the answer's
/// headers have arrived. `timeout` bounds the connect, the request and the
/// answer's headers, not the body: read that with
/// [`StreamingResponse::next_line`], for as long as it takes.
///
/// # Errors
///
/// [`RuntimeErrorKind::Unavailable`], naming the path and the socket (never
/// a header).
pub(super) async fn post_streaming(
    socket: &Path,
    path_and_query: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<StreamingResponse, RuntimeError> {
    let mut request = format!(
        "POST {path_and_query} HTTP/1.0\r\nHost: localhost\r\nAccept: application/json\r\nContent-Length: 0\r\n"
    );
    for (name, value) in headers {
        let _ = write!(request, "{name}: {value}\r\n");
    }
    request.push_str("\r\n");
    let unavailable = |why: String| {
        RuntimeError::new(
            RuntimeErrorKind::Unavailable,
            format!("POST {path_and_query} on {}: {why}", socket.display()),
        )
    };
    let exchange = async {
        let mut stream = UnixStream::connect(socket).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut received = Vec::new();
        let mut buffer = [0_u8; 8192];
        loop {
            if let Some(end) = find(&received, b"\r\n\r\n") {
                return Ok((stream, received, end));
            }
            let read = stream.read(&mut buffer).await?;
            if read == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the connection closed before the answer's headers",
                ));
            }
            received.extend_from_slice(buffer.get(..read).unwrap_or_default());
        }
    };
    let (mut stream, received, head_end) = match tokio::time::timeout(timeout, exchange).await {
        Err(_elapsed) => return Err(unavailable("no answer in time".to_owned())),
        Ok(Err(e)) => return Err(unavailable(e.to_string())),
        Ok(Ok(answer)) => answer,
    };
    let head = received.get(..head_end + 4).unwrap_or_default();
    let HttpResponse {
        status, headers, ..
    } = parse_http_response(head).map_err(unavailable)?;
    let mut response = StreamingResponse {
        status,
        pending: received.get(head_end + 4..).unwrap_or_default().to_vec(),
        stream: None,
    };
    let chunked = headers.iter().any(|(name, value)| {
        name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        // HTTP/1.0 answers are not chunked (Go's server, podman's and
        // Docker's, keeps to that); should one be, it is read whole.
        let mut rest = std::mem::take(&mut response.pending);
        stream
            .read_to_end(&mut rest)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        response.pending = dechunk(&rest).map_err(unavailable)?;
    } else {
        response.stream = Some(stream);
    }
    Ok(response)
}

/// An answer whose body is read as it arrives.
#[derive(Debug)]
pub(super) struct StreamingResponse {
    pub(super) status: u16,
    /// Received, not yet returned.
    pending: Vec<u8>,
    /// `None` once the server closed it.
    stream: Option<UnixStream>,
}

impl StreamingResponse {
    /// The next line of the body (without its `\n`), `None` at its end.
    ///
    /// # Errors
    ///
    /// The connection's, when it breaks.
    pub(super) async fn next_line(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        let mut buffer = [0_u8; 8192];
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.pending.drain(..=end).collect();
                line.pop();
                return Ok(Some(line));
            }
            let Some(stream) = &mut self.stream else {
                return Ok((!self.pending.is_empty()).then(|| std::mem::take(&mut self.pending)));
            };
            let read = stream.read(&mut buffer).await?;
            if read == 0 {
                self.stream = None;
            } else {
                self.pending
                    .extend_from_slice(buffer.get(..read).unwrap_or_default());
            }
        }
    }

    /// The rest of the body.
    ///
    /// # Errors
    ///
    /// The connection's, when it breaks.
    pub(super) async fn rest(mut self) -> std::io::Result<Vec<u8>> {
        if let Some(stream) = &mut self.stream {
            stream.read_to_end(&mut self.pending).await?;
        }
        Ok(self.pending)
    }
}

/// A complete HTTP/1.x response.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct HttpResponse {
    pub(super) status: u16,
    /// Names as sent, values trimmed.
    headers: Vec<(String, String)>,
    /// Dechunked when it was sent in chunks.
    pub(super) body: Vec<u8>,
}

impl HttpResponse {
    /// The value of the first header called `name`, whatever its case.
    pub(super) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Splits a complete HTTP/1.x response into its status code, headers and
/// body, undoing chunked transfer encoding.
pub(super) fn parse_http_response(raw: &[u8]) -> Result<HttpResponse, String> {
    let head_end = find(raw, b"\r\n\r\n").ok_or("the answer has no end of headers")?;
    let head = raw.get(..head_end).unwrap_or_default();
    let body = raw.get(head_end + 4..).unwrap_or_default();
    let head = String::from_utf8_lossy(head);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line \"{status_line}\""))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_owned(), value.trim().to_owned()))
        .collect();
    let mut response = HttpResponse {
        status,
        headers,
        body: Vec::new(),
    };
    let chunked = response
        .header("transfer-encoding")
        .is_some_and(|value| value.eq_ignore_ascii_case("chunked"));
    response.body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok(response)
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let truncated = || "truncated chunked body".to_owned();
    let mut body = Vec::new();
    loop {
        let line_end = find(rest, b"\r\n").ok_or_else(truncated)?;
        let size_line = String::from_utf8_lossy(rest.get(..line_end).unwrap_or_default());
        let size_text = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        rest = rest.get(line_end + 2..).ok_or_else(truncated)?;
        if size == 0 {
            return Ok(body);
        }
        body.extend_from_slice(rest.get(..size).ok_or_else(truncated)?);
        rest = rest.get(size + 2..).ok_or_else(truncated)?;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub(super) fn percent_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            let _ = write!(encoded, "%{byte:02X}");
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_chunked_responses_parse() {
        let status_and_body = |raw: &[u8]| {
            parse_http_response(raw)
                .map(|r| (r.status, r.body))
                .unwrap()
        };
        let plain = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n[]";
        assert_eq!(status_and_body(plain), (200, b"[]".to_vec()));
        let chunked =
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n2;x=y\r\n\"}\r\n0\r\n\r\n";
        assert_eq!(status_and_body(chunked), (404, b"{\"a\"}".to_vec()));
        assert!(parse_http_response(b"HTTP/1.0 200 OK\r\n").is_err());
        assert!(parse_http_response(b"garbage\r\n\r\n").is_err());
        let short = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc";
        assert!(parse_http_response(short).is_err());
    }

    #[test]
    fn the_ping_answer_carries_the_api_version() {
        // podman 4.3's answer to GET /_ping, abridged.
        let ping = b"HTTP/1.0 200 OK\r\nApi-Version: 1.41\r\nBuilder-Version: \r\nLibpod-Api-Version: 4.3.1\r\nContent-Length: 2\r\n\r\nOK";
        let response = parse_http_response(ping).unwrap();
        assert_eq!(response.header("API-Version"), Some("1.41"));
        assert_eq!(response.header("builder-version"), Some(""));
        assert_eq!(response.header("Docker-Experimental"), None);
        assert_eq!(response.body, b"OK");
    }

    #[test]
    fn percent_encoding_keeps_unreserved_only() {
        assert_eq!(percent_encode("web_a-1.x~"), "web_a-1.x~");
        assert_eq!(
            percent_encode(r#"{"label":["a=b"]}"#),
            "%7B%22label%22%3A%5B%22a%3Db%22%5D%7D"
        );
    }
}
