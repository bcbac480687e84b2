//! The FastCGI record protocol (the responder role), as far as a client needs it:
//! writing one request (BEGIN_REQUEST with keep-alive, PARAMS, STDIN) and reading
//! its response (STDOUT, STDERR, END_REQUEST), then splitting CGI output into a
//! status, headers and a body.
//!
//! One request per connection at a time, request id 1: PHP-FPM does not multiplex.
//! Nothing here panics on what a peer sends: every length is checked.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const VERSION: u8 = 1;
const BEGIN_REQUEST: u8 = 1;
const END_REQUEST: u8 = 3;
const PARAMS: u8 = 4;
const STDIN: u8 = 5;
const STDOUT: u8 = 6;
const STDERR: u8 = 7;
const RESPONDER: u16 = 1;
const KEEP_CONN: u8 = 1;
const REQUEST_ID: u16 = 1;
/// Most content bytes of one record.
const MAX_CONTENT: usize = 0xFFFF;

/// Append one record of `kind` carrying `content` (at most [`MAX_CONTENT`] bytes),
/// padded to a multiple of 8 as the specification recommends.
fn record(out: &mut Vec<u8>, kind: u8, content: &[u8]) {
    let len = content.len().min(MAX_CONTENT);
    let padding = (8 - len % 8) % 8;
    out.extend_from_slice(&[VERSION, kind]);
    out.extend_from_slice(&REQUEST_ID.to_be_bytes());
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(&[padding as u8, 0]);
    out.extend_from_slice(&content[..len]);
    out.extend(std::iter::repeat_n(0u8, padding));
}

/// A stream's records: `data` cut into records, then the empty record that ends it.
fn stream(out: &mut Vec<u8>, kind: u8, data: &[u8]) {
    for chunk in data.chunks(MAX_CONTENT) {
        record(out, kind, chunk);
    }
    record(out, kind, &[]);
}

/// A name-value pair's length: one byte below 128, else four with the high bit set.
fn length(out: &mut Vec<u8>, len: usize) {
    if len < 128 {
        out.push(len as u8);
    } else {
        out.extend_from_slice(&((len as u32 & 0x7FFF_FFFF) | 0x8000_0000).to_be_bytes());
    }
}

/// Every byte of one request: begin (keep the connection), the params, the body.
pub fn request<'a>(params: impl IntoIterator<Item = (&'a [u8], &'a [u8])>, body: &[u8]) -> Vec<u8> {
    let mut pairs = Vec::new();
    for (name, value) in params {
        length(&mut pairs, name.len());
        length(&mut pairs, value.len());
        pairs.extend_from_slice(name);
        pairs.extend_from_slice(value);
    }
    let mut out = Vec::with_capacity(pairs.len() + body.len() + 64);
    let mut begin = RESPONDER.to_be_bytes().to_vec();
    begin.extend_from_slice(&[KEEP_CONN, 0, 0, 0, 0, 0]);
    record(&mut out, BEGIN_REQUEST, &begin);
    stream(&mut out, PARAMS, &pairs);
    stream(&mut out, STDIN, body);
    out
}

/// What came back for one request.
#[derive(Debug, Default)]
pub struct Response {
    /// The CGI output (headers, blank line, body), at most `stdout_cap` bytes of it.
    pub stdout: Vec<u8>,
    /// Every STDERR record's text, in order (PHP's error_log, warnings, fatals).
    pub stderr: Vec<String>,
    /// FCGI_END_REQUEST's protocol status: 0 complete, 1 cannot multiplex,
    /// 2 overloaded, 3 unknown role.
    pub protocol_status: u8,
    pub app_status: u32,
}

/// Why a response could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The connection ended (EOF or reset). `received` tells whether any byte of the
    /// response had arrived: none on a reused connection means the peer had closed it
    /// before reading this request (a recycled PHP-FPM worker), so it can be sent again.
    #[error("connection closed after {received} response bytes: {source}")]
    Closed { received: usize, source: std::io::Error },
    #[error("not a FastCGI response: {0}")]
    Protocol(String),
}

/// Read records until END_REQUEST. Output past `stdout_cap` bytes is read and dropped
/// (the connection stays usable; memory stays bounded).
pub async fn read_response<R: AsyncRead + Unpin>(io: &mut R, stdout_cap: usize) -> Result<Response, ReadError> {
    let mut response = Response::default();
    let mut received = 0usize;
    // Grown to the largest record seen (at most 64 KiB + padding), not zeroed up front.
    let mut content = Vec::new();
    loop {
        let mut header = [0u8; 8];
        io.read_exact(&mut header).await.map_err(|source| ReadError::Closed { received, source })?;
        received += 8;
        if header[0] != VERSION {
            return Err(ReadError::Protocol(format!("record version {}", header[0])));
        }
        let kind = header[1];
        let id = u16::from_be_bytes([header[2], header[3]]);
        let len = usize::from(u16::from_be_bytes([header[4], header[5]]));
        let total = len + usize::from(header[6]);
        if content.len() < total {
            content.resize(total, 0);
        }
        let buf = &mut content[..total];
        io.read_exact(buf).await.map_err(|source| ReadError::Closed { received, source })?;
        received += total;
        let data = &buf[..len];
        if id != REQUEST_ID {
            return Err(ReadError::Protocol(format!("record for request {id}, not {REQUEST_ID}")));
        }
        match kind {
            STDOUT => {
                let room = stdout_cap.saturating_sub(response.stdout.len());
                response.stdout.extend_from_slice(&data[..data.len().min(room)]);
            }
            STDERR if !data.is_empty() => response.stderr.push(String::from_utf8_lossy(data).into_owned()),
            STDERR => {}
            END_REQUEST => {
                if data.len() < 8 {
                    return Err(ReadError::Protocol(format!("END_REQUEST of {} bytes", data.len())));
                }
                response.app_status = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                response.protocol_status = data[4];
                return Ok(response);
            }
            other => return Err(ReadError::Protocol(format!("unexpected record type {other}"))),
        }
    }
}

/// Send one request and read its response.
pub async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    request: &[u8],
    stdout_cap: usize,
) -> Result<Response, ReadError> {
    io.write_all(request).await.map_err(|source| ReadError::Closed { received: 0, source })?;
    io.flush().await.map_err(|source| ReadError::Closed { received: 0, source })?;
    read_response(io, stdout_cap).await
}

/// CGI output split: the status (`Status:` header, else 200), the headers, the body.
#[derive(Debug, PartialEq, Eq)]
pub struct CgiOutput<'a> {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: &'a [u8],
}

/// Split CGI output at its blank line (`\r\n\r\n` or `\n\n`). Output without a blank
/// line, or with a `Status:` that is not a number from 100 to 999, is not CGI output.
pub fn parse_cgi(stdout: &[u8]) -> Result<CgiOutput<'_>, String> {
    let crlf = stdout.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, i + 4));
    let lf = stdout.windows(2).position(|w| w == b"\n\n").map(|i| (i, i + 2));
    let (head_end, body_start) = match (crlf, lf) {
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => return Err("no blank line after the CGI headers".into()),
    };
    let head = String::from_utf8_lossy(&stdout[..head_end]);
    let mut status = 200;
    let mut headers = Vec::new();
    for line in head.lines() {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("CGI header line without a colon: {:?}", line.chars().take(80).collect::<String>()));
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("status") {
            let code = value.split_whitespace().next().unwrap_or_default();
            status = match code.parse::<u16>() {
                Ok(n) if (100..=999).contains(&n) => n,
                _ => return Err(format!("Status header {value:?} is not a status code")),
            };
        }
        headers.push((name.to_string(), value.to_string()));
    }
    Ok(CgiOutput { status, headers, body: &stdout[body_start..] })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Read back the records of a request: (type, content) each.
    fn records(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            assert_eq!(bytes[0], VERSION);
            assert_eq!(u16::from_be_bytes([bytes[2], bytes[3]]), REQUEST_ID);
            let len = usize::from(u16::from_be_bytes([bytes[4], bytes[5]]));
            let pad = usize::from(bytes[6]);
            assert_eq!((8 + len + pad) % 8, 0, "records are padded to 8 bytes");
            out.push((bytes[1], bytes[8..8 + len].to_vec()));
            bytes = &bytes[8 + len + pad..];
        }
        out
    }

    #[test]
    fn a_request_is_begin_params_stdin_each_stream_ended_by_an_empty_record() {
        let long = vec![b'v'; 300];
        let params: [(&[u8], &[u8]); 2] = [(b"REQUEST_METHOD", b"POST"), (b"HTTP_X_LONG", &long)];
        let body = vec![7u8; 70_000];
        let recs = records(&request(params, &body));
        let kinds: Vec<u8> = recs.iter().map(|r| r.0).collect();
        assert_eq!(kinds, [BEGIN_REQUEST, PARAMS, PARAMS, STDIN, STDIN, STDIN]);
        assert_eq!(recs[0].1, [0, 1, KEEP_CONN, 0, 0, 0, 0, 0], "responder role, keep the connection");
        let pairs = &recs[1].1;
        assert_eq!(&pairs[..2], &[14, 4]);
        assert_eq!(&pairs[2..20], b"REQUEST_METHODPOST");
        // A value of 300 bytes takes the four-byte length form.
        assert_eq!(&pairs[20..25], &[11, 0x80, 0, 1, 44]);
        assert_eq!(&pairs[25..36], b"HTTP_X_LONG");
        assert_eq!(&pairs[36..], &long[..]);
        assert!(recs[2].1.is_empty());
        assert_eq!(recs[3].1.len() + recs[4].1.len(), 70_000, "the body split at 65535");
        assert!(recs[5].1.is_empty());
    }

    fn response_record(kind: u8, content: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        record(&mut out, kind, content);
        out
    }

    #[tokio::test]
    async fn reads_stdout_and_stderr_until_the_end_record() {
        let mut wire = response_record(STDERR, b"PHP message: oops");
        wire.extend(response_record(STDOUT, b"Status: 503\r\nRetry-After: 2\r\n\r\nbusy"));
        wire.extend(response_record(STDOUT, b" now"));
        wire.extend(response_record(STDOUT, b""));
        wire.extend(response_record(END_REQUEST, &[0, 0, 0, 3, 0, 0, 0, 0]));
        let r = read_response(&mut &wire[..], 1024).await.expect("a response");
        assert_eq!(r.stderr, ["PHP message: oops"]);
        assert_eq!((r.app_status, r.protocol_status), (3, 0));
        let cgi = parse_cgi(&r.stdout).expect("cgi");
        assert_eq!(cgi.status, 503);
        assert_eq!(cgi.body, b"busy now");
        assert!(cgi.headers.contains(&("Retry-After".into(), "2".into())));
        // Past the cap output is dropped, and the end record still read.
        let r = read_response(&mut &wire[..], 5).await.expect("a response");
        assert_eq!(r.stdout, b"Statu");
    }

    #[tokio::test]
    async fn a_cut_or_foreign_stream_is_an_error_not_a_panic() {
        let mut wire = response_record(STDOUT, b"Status: 200\r\n\r\nok");
        let end = response_record(END_REQUEST, &[0, 0, 0, 0, 0, 0, 0, 0]);
        wire.extend(&end[..10]);
        assert!(matches!(
            read_response(&mut &wire[..], 1024).await,
            Err(ReadError::Closed { received, .. }) if received > 0
        ));
        assert!(matches!(read_response(&mut &b""[..], 1024).await, Err(ReadError::Closed { received: 0, .. })));
        let short_end = response_record(END_REQUEST, &[0, 0]);
        assert!(matches!(read_response(&mut &short_end[..], 1024).await, Err(ReadError::Protocol(_))));
        assert!(matches!(read_response(&mut &b"HTTP/1.1 200 OK\r\n"[..], 1024).await, Err(ReadError::Protocol(_))));
        let unknown = response_record(11, b"x");
        assert!(matches!(read_response(&mut &unknown[..], 1024).await, Err(ReadError::Protocol(_))));
    }

    #[test]
    fn cgi_status_defaults_to_200_and_must_be_a_code() {
        let ok = parse_cgi(b"Content-type: text/html; charset=UTF-8\r\n\r\nhello").expect("cgi");
        assert_eq!((ok.status, ok.body), (200, &b"hello"[..]));
        assert_eq!(parse_cgi(b"Status: 500 Internal Server Error\n\n").expect("cgi").status, 500);
        assert_eq!(parse_cgi(b"status: 429\r\n\r\n").expect("cgi").status, 429);
        assert!(parse_cgi(b"Status: soon\r\n\r\n").is_err());
        assert!(parse_cgi(b"no blank line").is_err());
        assert!(parse_cgi(b"garbage line\r\n\r\n").is_err());
    }
}
