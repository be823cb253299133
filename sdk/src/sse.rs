//! Server-sent events (the `text/event-stream` format) read from a response
//! body as the bytes arrive.
//!
//! Parsing is done by the `eventsource-stream` crate, which follows the
//! WHATWG event-stream rules (`event:`/`data:`/`id:` fields, multi-line
//! `data`, comments, CR/LF/CRLF line ends) and carries UTF-8 characters
//! split across chunks. [`SseFeed`] finds where the last complete event in
//! the bytes so far ends (a blank line), hands everything before it to that
//! parser, and keeps only the rest: a [`Decoder`](crate::provider::Decoder)
//! keeps it between steps. [`SseReader`] pulls a body through one, for a
//! provider that reads its own response.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use eventsource_stream::Eventsource;
use futures_core::Stream;
use serde::{Deserialize, Serialize};

use crate::http::{Body, Response};

/// Bytes asked of the host per read; a chunk holds whatever has arrived.
const CHUNK: u32 = 64 * 1024;

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field; `message` when the server sent none.
    pub event: String,
    /// The `data:` lines joined by `\n`.
    pub data: String,
    /// The last `id:` seen.
    pub id: String,
}

/// Why an event stream could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseError {
    /// The connection broke mid-body (the text says how).
    Broken(String),
    /// The bytes are not a valid event stream (for example, invalid UTF-8).
    Malformed(String),
}

impl std::fmt::Display for SseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SseError::Broken(why) => write!(f, "the event stream broke off: {why}"),
            SseError::Malformed(why) => write!(f, "malformed event stream: {why}"),
        }
    }
}

/// Reads server-sent events from a response body, one at a time.
pub struct SseReader {
    body: Option<Body>,
    feed: SseFeed,
    ready: VecDeque<SseEvent>,
}

impl SseReader {
    /// Starts reading `response`'s body as an event stream.
    pub fn new(response: Response) -> Self {
        SseReader { body: Some(response.body), feed: SseFeed::new(), ready: VecDeque::new() }
    }

    /// The next event; `Ok(None)` once the body has ended. An event not
    /// closed by a blank line when the body ends is dropped, as the spec
    /// says: protocols that need a clean end must check for their own
    /// final event (Anthropic's `message_stop`, OpenAI's `[DONE]`).
    pub fn next(&mut self) -> Result<Option<SseEvent>, SseError> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Ok(Some(event));
            }
            let Some(body) = &self.body else { return Ok(None) };
            match body.read(CHUNK) {
                Ok(Some(chunk)) => self.ready.extend(self.feed.push(&chunk)?),
                Ok(None) => self.body = None,
                Err(err) => {
                    self.body = None;
                    return Err(SseError::Broken(err.describe()));
                }
            }
        }
    }
}

/// An event stream read in pieces, for a [`Decoder`](crate::provider::Decoder):
/// [`SseFeed::push`] takes the bytes of one step and returns the events
/// they complete. It is serializable and holds only the bytes after the
/// last complete event, the last event id and four flags, so it travels in
/// a decoder's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SseFeed {
    /// The bytes after the last complete event.
    tail: Vec<u8>,
    /// How much of `tail` has been searched for an event's end.
    scanned: usize,
    /// Whether `tail[scanned]` begins a line.
    line_start: bool,
    /// The bytes so far ended in CR, kept as LF: an LF that comes first in
    /// the next piece is the rest of that line end (a CRLF).
    skip_lf: bool,
    /// Whether the stream's start has been parsed: a byte-order mark is
    /// stripped there only.
    started: bool,
    /// The `id` of the last event handed out, which later events keep
    /// until an `id:` field changes it.
    last_id: String,
}

impl Default for SseFeed {
    fn default() -> Self {
        SseFeed { tail: Vec::new(), scanned: 0, line_start: true, skip_lf: false, started: false, last_id: String::new() }
    }
}

impl SseFeed {
    /// An empty feed, at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the bytes that arrived; returns the events they complete. An
    /// event still open when the body ends is dropped, as the spec says.
    pub fn push(&mut self, mut bytes: &[u8]) -> Result<Vec<SseEvent>, SseError> {
        if self.skip_lf && !bytes.is_empty() {
            self.skip_lf = false;
            if bytes[0] == b'\n' {
                bytes = &bytes[1..];
            }
        }
        self.tail.extend_from_slice(bytes);
        let Some(end) = self.scan() else { return Ok(Vec::new()) };
        let piece: Vec<u8> = self.tail.drain(..end).collect();
        self.scanned -= end;
        // The stream's one byte-order mark is stripped here. The parser
        // always starts on an `id:` line (the last event's id, which the
        // piece's events keep until they set another), so it never sees a
        // mark first: it would strip one at the start of every piece, and
        // it slices one it strips at a byte that is not a character's
        // boundary (a panic, in eventsource-stream 0.2.3).
        let mut body = &piece[..];
        if !self.started {
            self.started = true;
            body = body.strip_prefix(b"\xef\xbb\xbf").unwrap_or(body);
        }
        let lead = format!("id: {}\n", self.last_id);
        let events = parse([lead.as_bytes(), body])?;
        if let Some(last) = events.last() {
            self.last_id.clone_from(&last.id);
        }
        Ok(events)
    }

    /// Searches the new bytes for blank lines (an event's end); returns the
    /// end of the last one.
    fn scan(&mut self) -> Option<usize> {
        let mut end = None;
        let mut i = self.scanned;
        while i < self.tail.len() {
            match self.tail[i] {
                b'\r' | b'\n' => {
                    // A CR that is not the start of a CRLF is kept as LF,
                    // which says the same. The parser then never meets a
                    // CR it must wait on (a final one may start a CRLF),
                    // nor a CR that the next piece's LF would join.
                    let next = match (self.tail[i], self.tail.get(i + 1).copied()) {
                        (b'\r', Some(b'\n')) => i + 2,
                        (b'\r', following) => {
                            self.tail[i] = b'\n';
                            self.skip_lf = following.is_none();
                            i + 1
                        }
                        _ => i + 1,
                    };
                    if self.line_start {
                        end = Some(next);
                    }
                    self.line_start = true;
                    i = next;
                }
                _ => {
                    self.line_start = false;
                    // Straight to the line's end.
                    i += self.tail[i..].iter().position(|&b| b == b'\r' || b == b'\n').unwrap_or(self.tail.len() - i);
                }
            }
        }
        self.scanned = i;
        end
    }
}

/// The events in pieces of a stream that end at an event's end.
fn parse<const N: usize>(pieces: [&[u8]; N]) -> Result<Vec<SseEvent>, SseError> {
    let source = Pieces(pieces.into_iter());
    let mut events = Box::pin(source.eventsource());
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Vec::new();
    loop {
        match events.as_mut().poll_next(&mut cx) {
            Poll::Ready(Some(Ok(event))) => out.push(SseEvent { event: event.event, data: event.data, id: event.id }),
            Poll::Ready(Some(Err(err))) => return Err(SseError::Malformed(err.to_string())),
            Poll::Ready(None) => return Ok(out),
            Poll::Pending => return Err(SseError::Malformed("the event-stream parser stalled".into())),
        }
    }
}

/// Byte slices as an always-ready stream.
struct Pieces<I>(I);

impl<'a, I: Iterator<Item = &'a [u8]> + Unpin> Stream for Pieces<I> {
    type Item = Result<&'a [u8], std::convert::Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Poll::Ready(self.0.next().map(Ok))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(feed: &mut SseFeed, pieces: &[&[u8]]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for piece in pieces {
            out.extend(feed.push(piece).unwrap().into_iter().map(|e| (e.event, e.data)));
        }
        out
    }

    /// Every way of cutting the stream gives the same events as the
    /// parser reading it whole, with every line ending the spec allows.
    #[test]
    fn events_are_the_same_wherever_the_stream_is_cut() {
        let streams: [&[u8]; 4] = [
            b"event: a\ndata: one\n\n: comment\ndata: tw\xc3\xb6\ndata: lines\n\nevent: c\ndata: {}\n\n",
            b"event: a\r\ndata: one\r\n\r\ndata: tw\xc3\xb6\r\ndata: lines\r\n\r\nevent: c\r\ndata: {}\r\n\r\n",
            b"event: a\rdata: one\r\rdata: tw\xc3\xb6\rdata: lines\r\revent: c\rdata: {}\r\r",
            b"\xef\xbb\xbfevent: a\ndata: one\r\n\rdata: tw\xc3\xb6\r\ndata: lines\n\r\nevent: c\rdata: {}\n\n",
        ];
        let want = vec![
            ("a".to_string(), "one".to_string()),
            ("message".to_string(), "tw\u{f6}\nlines".to_string()),
            ("c".to_string(), "{}".to_string()),
        ];
        for stream in streams {
            assert_eq!(all(&mut SseFeed::new(), &[stream]), want, "{stream:?} whole");
            for a in 0..=stream.len() {
                for b in a..=stream.len() {
                    // Kept as bytes between the pieces, as a decoder is.
                    let mut feed = SseFeed::new();
                    let mut got = all(&mut feed, &[&stream[..a]]);
                    let mut feed: SseFeed = serde_json::from_str(&serde_json::to_string(&feed).unwrap()).unwrap();
                    got.extend(all(&mut feed, &[&stream[a..b], &stream[b..]]));
                    assert_eq!(got, want, "{stream:?} cut at {a} and {b}");
                }
            }
        }
    }

    #[test]
    fn an_open_event_waits_and_only_its_bytes_are_kept() {
        let mut feed = SseFeed::new();
        assert!(feed.push(b"data: first\n\ndata: sec").unwrap().len() == 1);
        assert_eq!(feed.tail, b"data: sec");
        assert!(feed.push(b"ond\n").unwrap().is_empty(), "not closed by a blank line yet");
        let events = feed.push(b"\n").unwrap();
        assert_eq!(events[0].data, "second");
        assert!(feed.tail.is_empty());
    }

    #[test]
    fn a_mark_after_the_start_is_not_stripped() {
        let mut feed = SseFeed::new();
        feed.push(b"data: a\n\n").unwrap();
        // A field named with a mark in front is not `data`: ignored.
        assert!(feed.push(b"\xef\xbb\xbfdata: b\n\n").unwrap().is_empty());
    }

    #[test]
    fn the_last_event_id_carries_over_from_step_to_step() {
        let mut feed = SseFeed::new();
        assert_eq!(feed.push(b"id: 7\ndata: a\n\n").unwrap()[0].id, "7");
        let mut feed: SseFeed = serde_json::from_str(&serde_json::to_string(&feed).unwrap()).unwrap();
        let ids: Vec<String> = feed.push(b"data: b\n\nid: 9\ndata: c\n\n").unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(ids, ["7", "9"]);
    }

    #[test]
    fn invalid_utf8_is_malformed() {
        let err = SseFeed::new().push(b"data: \xff\n\n").unwrap_err();
        assert!(matches!(err, SseError::Malformed(_)), "{err:?}");
    }
}
