//! Server-sent events (the `text/event-stream` format) read from a response
//! body as the bytes arrive.
//!
//! Parsing is done by the `eventsource-stream` crate, which follows the
//! WHATWG event-stream rules (`event:`/`data:`/`id:` fields, multi-line
//! `data`, comments, CR/LF/CRLF line ends, a leading BOM) and carries UTF-8
//! characters split across chunks. It is written as an async `Stream` over
//! a stream of byte chunks; a plugin is synchronous, so the source stream
//! here *blocks* in `poll_next` on the host's `body.read` and is therefore
//! always ready. Polling with a no-op waker then never sees `Pending`, and
//! no executor is needed: each call to [`SseReader::next`] reads exactly as
//! many chunks as it takes to complete one event.

use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use eventsource_stream::{EventStream, EventStreamError, Eventsource};
use futures_core::Stream;

use crate::http::{Body, HttpError, Response};

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
    events: Pin<Box<EventStream<BlockingChunks>>>,
}

impl SseReader {
    /// Starts reading `response`'s body as an event stream.
    pub fn new(response: Response) -> Self {
        let chunks = BlockingChunks { body: Some(response.body) };
        SseReader { events: Box::pin(chunks.eventsource()) }
    }

    /// The next event; `Ok(None)` once the body has ended. An event not
    /// closed by a blank line when the body ends is dropped, as the spec
    /// says: protocols that need a clean end must check for their own
    /// final event (Anthropic's `message_stop`, OpenAI's `[DONE]`).
    pub fn next(&mut self) -> Result<Option<SseEvent>, SseError> {
        let mut cx = Context::from_waker(Waker::noop());
        match self.events.as_mut().poll_next(&mut cx) {
            Poll::Ready(Some(Ok(event))) => Ok(Some(SseEvent { event: event.event, data: event.data, id: event.id })),
            Poll::Ready(Some(Err(EventStreamError::Transport(err)))) => Err(SseError::Broken(err.describe())),
            Poll::Ready(Some(Err(err))) => Err(SseError::Malformed(err.to_string())),
            Poll::Ready(None) => Ok(None),
            // The source blocks instead of returning `Pending`, so the parser
            // cannot either; this arm only guards against a change there.
            Poll::Pending => Err(SseError::Malformed("the event-stream parser stalled".into())),
        }
    }
}

/// The body as an always-ready stream of chunks: `poll_next` blocks on the
/// host until the next chunk (or the end) arrives.
struct BlockingChunks {
    body: Option<Body>,
}

impl Stream for BlockingChunks {
    type Item = Result<Vec<u8>, HttpError>;

    fn poll_next(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let Some(body) = self.body.as_ref() else { return Poll::Ready(None) };
        match body.read(CHUNK) {
            Ok(Some(chunk)) => Poll::Ready(Some(Ok(chunk))),
            Ok(None) => {
                self.body = None;
                Poll::Ready(None)
            }
            Err(err) => {
                self.body = None;
                Poll::Ready(Some(Err(err)))
            }
        }
    }
}
