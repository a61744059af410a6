//! Incremental Server-Sent Events parser for streamed LLM responses.
//!
//! # Grammar
//!
//! This implements the `text/event-stream` format as the WHATWG HTML Living
//! Standard defines it in §9.2 "Server-sent events": the ABNF of §9.2.5
//! ("Parsing an event stream") and the interpretation rules of §9.2.6
//! ("Interpreting an event stream"):
//!
//! ```text
//! stream        = [ bom ] *event
//! event         = *( comment / field ) end-of-line
//! comment       = colon *any-char end-of-line
//! field         = 1*name-char [ colon [ space ] *any-char ] end-of-line
//! end-of-line   = ( cr lf / cr / lf )
//! ```
//!
//! * A line ends at CRLF, CR or LF. A CR that ends one chunk and an LF that
//!   starts the next are one line ending, not two.
//! * One UTF-8 BOM at the very start of the stream is dropped.
//! * A line that starts with `:` is a comment.
//! * `name:value` drops a single leading space of the value; a line without a
//!   colon is a field whose value is empty.
//! * `data` appends the value and an LF to the data buffer; `event` sets the
//!   event type; `id` sets the id unless the value contains NUL; every other
//!   field name is ignored.
//! * An empty line dispatches: if the data buffer is empty nothing is
//!   dispatched, otherwise its final LF is removed and the event is delivered.
//!   Either way the data buffer and the event type are reset.
//! * At end of input an incomplete block is discarded, never dispatched.
//!
//! # Deviations from the standard, and why
//!
//! * **Bytes, not `str`.** The standard decodes the stream as UTF-8 first. We
//!   never do: the token meter only needs the JSON bytes, validating UTF-8 on
//!   every response would cost time on the request path, and raw capture has to
//!   give back exactly the bytes that arrived, even ill-formed ones. Every byte
//!   the grammar looks at (CR, LF, `:`, space, NUL) is ASCII, and in UTF-8 an
//!   ASCII byte is never part of a multi-byte character, so a chunk that splits
//!   a character cannot confuse the parser.
//! * **`id` is per block.** The standard's "last event ID buffer" survives
//!   from event to event, because a browser resends it on reconnect. A proxy
//!   looks at one block at a time, so [`Event::id`] is the `id` of that block
//!   only; a caller that wants the browser's view keeps the last one itself.
//! * **`retry` is not interpreted.** It only steers a browser's reconnection
//!   delay; nothing here exposes it, so it is skipped like an unknown field.
//!
//! # Bounded memory
//!
//! Envoy hands us a response in chunks of whatever size the network produced,
//! and one parser lives for the whole stream, so the parser must not grow with
//! the stream or with a hostile upstream that never sends a blank line. The
//! limit, [`Limits::max_event_bytes`], is on the input bytes of one block (its
//! lines with their line endings, not counting the blank line that ends it).
//! Counting input bytes rather than bytes held makes the decision depend only
//! on the stream: whatever the chunking and whether or not raw capture is on,
//! the same blocks overflow. When a block overflows, the parser stops holding
//! it: with capture on what it held goes out as [`Item::Spill`], the rest of
//! the block streams out as further spills without being held, and parsing
//! starts again after the block's blank line. The overflowing event is not
//! dispatched, because its data would be incomplete.
//!
//! Without capture the parser keeps no line buffer: the values of `data`,
//! `event` and `id` are copied straight from the chunks into their buffers as
//! the line arrives, so a long line is never held twice. With capture, the
//! block's raw bytes are the only copy: `event`, `id` and a single `data` line
//! are remembered as ranges into them (the usual LLM case, one JSON object per
//! event, is therefore zero-copy), and only an event with several `data` lines
//! has them joined, into a scratch buffer that lives while the callback runs.
//! Buffers grow up to the limit (plus [`HELD_SLACK`]) and no further, and they
//! keep their allocation from one block to the next, so a stream costs a fixed
//! amount of memory and no allocation per event once warmed up.
//!
//! # Raw capture, for rewriting
//!
//! With capture on, every input byte belongs to exactly one item, in order:
//! [`Item::Event`] and [`Item::Other`] carry the raw bytes of their block
//! including its terminating blank line, [`Item::Spill`] carries the bytes of
//! an overflowing block, and [`Parser::take_pending_raw`] returns what is left
//! at the end. A filter that wants to drop or rewrite one event emits its own
//! bytes in place of that item and every other item unchanged: the client then
//! receives the upstream stream byte for byte except where it chose otherwise.
//! Two details keep this exact for any chunking: the BOM is part of the first
//! block's raw bytes, and when a block ends with a CR that ends a chunk, the LF
//! that may follow in the next chunk can no longer join that block (it was
//! already handed out), so it starts the next block's raw bytes. Dropping or
//! keeping that lone LF is harmless: between blocks it is an empty line, which
//! dispatches nothing.

use std::mem;

/// Bytes the parser may hold beyond [`Limits::max_event_bytes`]: a BOM at the
/// start of the stream, or the LF half of a split CRLF, travels with the next
/// block's raw bytes without counting against the limit.
pub const HELD_SLACK: usize = 8;

const BOM: &[u8; 3] = b"\xEF\xBB\xBF";

/// Limits that keep memory constant per stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest block, in input bytes, the parser will hold (its lines and
    /// their line endings, not counting the blank line that ends it).
    pub max_event_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        // Comfortably above the largest single chunk a provider sends (a full
        // tool call or a final usage object) while bounding the worst case.
        Limits {
            max_event_bytes: 1 << 20,
        }
    }
}

/// One dispatched event. Borrowed from the parser's buffers; valid during the callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event<'a> {
    /// Value of the last `event:` line; empty means "message".
    pub event_type: &'a [u8],
    /// Data lines joined with `b'\n'`, without the final newline.
    pub data: &'a [u8],
    /// Value of the last `id:` line in this block, if any.
    pub id: Option<&'a [u8]>,
    /// Exact input bytes of this block incl. its terminating blank line; empty
    /// unless raw capture is on.
    pub raw: &'a [u8],
}

/// What [`Parser::feed`] reports, in stream order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Item<'a> {
    /// A block that ended with a blank line and had at least one data line
    /// (the standard's "dispatch").
    Event(Event<'a>),
    /// A block that ended with a blank line but had no data line (comments
    /// only, or only `event:`/`id:`/`retry:`). The standard does not dispatch
    /// it; it is reported, only when capture is on, so the caller can pass its
    /// bytes through.
    Other {
        /// Exact input bytes of the block incl. its terminating blank line.
        raw: &'a [u8],
    },
    /// Bytes of a block that grew past `max_event_bytes`, to be emitted
    /// unchanged. The block's event is not dispatched. Only reported when
    /// capture is on; [`Parser::overflows`] counts overflows in both modes.
    Spill(&'a [u8]),
}

/// The fields the parser keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Data,
    Event,
    Id,
}

/// Longest field name worth remembering (`event`); any longer name is a field
/// we ignore, so the name never needs more than this fixed buffer.
const NAME_MAX: usize = 5;

/// Receives a field's value as the line arrives. `at` positions are offsets
/// in the raw buffer; only the capture-mode sink uses them.
trait Sink {
    fn begin(&mut self, field: Field, at: usize);
    fn extend(&mut self, field: Field, bytes: &[u8]);
    fn end(&mut self, field: Field, at: usize);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// No byte of the line seen yet; a line ending here is a blank line.
    Start,
    /// Inside the field name, which is in `Line::name`.
    Name,
    /// A comment or an ignored field: the rest of the line does not matter.
    Ignore,
    /// Just after the colon: one space may still have to be dropped.
    Space(Field),
    Value(Field),
}

/// Where the parser is inside the current line. It carries across chunks so
/// that a split anywhere (inside the name, between colon and space, inside
/// the value) is resumed without holding the line.
#[derive(Clone, Copy, Debug)]
struct Line {
    phase: Phase,
    name: [u8; NAME_MAX],
    name_len: usize,
}

impl Line {
    const fn new() -> Self {
        Line {
            phase: Phase::Start,
            name: [0; NAME_MAX],
            name_len: 0,
        }
    }

    fn is_start(&self) -> bool {
        self.phase == Phase::Start
    }

    fn name(&self) -> &[u8] {
        self.name.get(..self.name_len).unwrap_or_default()
    }

    /// Adds `part` to the name; false once the name can no longer be a field
    /// we keep, so the caller stops looking at the line.
    fn push_name(&mut self, part: &[u8]) -> bool {
        let end = self.name_len + part.len();
        let Some(slot) = self.name.get_mut(self.name_len..end) else {
            return false;
        };
        slot.copy_from_slice(part);
        self.name_len = end;
        let name = self.name();
        [&b"data"[..], b"event", b"id"]
            .iter()
            .any(|known| known.starts_with(name))
    }

    fn field(&self) -> Option<Field> {
        match self.name() {
            b"data" => Some(Field::Data),
            b"event" => Some(Field::Event),
            b"id" => Some(Field::Id),
            _ => None,
        }
    }

    /// Consumes `seg`, a piece of the line with no line ending in it, whose
    /// first byte sits at `base` in the raw buffer.
    fn content<S: Sink>(&mut self, seg: &[u8], base: usize, sink: &mut S) {
        let mut i = 0;
        while let Some(&byte) = seg.get(i) {
            match self.phase {
                Phase::Start => {
                    if byte == b':' {
                        self.phase = Phase::Ignore;
                        return;
                    }
                    self.phase = Phase::Name;
                }
                Phase::Name => {
                    // Only look as far as a name we keep could reach: a long
                    // unknown field costs a few bytes of scanning, not its length.
                    let room = NAME_MAX.saturating_sub(self.name_len);
                    let rest = seg.get(i..).unwrap_or_default();
                    let window = rest.get(..room + 1).unwrap_or(rest);
                    match window.iter().position(|&b| b == b':') {
                        Some(colon) => {
                            let name = window.get(..colon).unwrap_or_default();
                            self.phase = match self.push_name(name).then(|| self.field()) {
                                Some(Some(field)) => Phase::Space(field),
                                _ => Phase::Ignore,
                            };
                            i += colon + 1;
                        }
                        None => {
                            if window.len() > room || !self.push_name(window) {
                                self.phase = Phase::Ignore;
                            }
                            return;
                        }
                    }
                }
                Phase::Space(field) => {
                    if byte == b' ' {
                        i += 1;
                    }
                    self.phase = Phase::Value(field);
                    sink.begin(field, base + i);
                }
                Phase::Value(field) => {
                    sink.extend(field, seg.get(i..).unwrap_or_default());
                    return;
                }
                Phase::Ignore => return,
            }
        }
    }

    /// Ends the line at raw offset `at` (where its line ending starts).
    fn end<S: Sink>(&mut self, at: usize, sink: &mut S) {
        let field = match self.phase {
            Phase::Start | Phase::Ignore => None,
            Phase::Name => {
                let field = self.field();
                if let Some(field) = field {
                    sink.begin(field, at);
                }
                field
            }
            Phase::Space(field) => {
                sink.begin(field, at);
                Some(field)
            }
            Phase::Value(field) => Some(field),
        };
        if let Some(field) = field {
            sink.end(field, at);
        }
        *self = Line::new();
    }
}

/// Appends without letting `Vec`'s doubling take the allocation past what a
/// block can need: with a 1 MiB limit, a block of 1 MiB + 1 byte must not
/// leave a 2 MiB buffer behind for the rest of the stream.
fn append(buf: &mut Vec<u8>, bytes: &[u8], ceiling: usize) {
    let need = buf.len().saturating_add(bytes.len());
    if need > buf.capacity() {
        let target = buf.capacity().saturating_mul(2).min(ceiling).max(need);
        buf.reserve_exact(target - buf.len());
    }
    buf.extend_from_slice(bytes);
}

/// Non-capture storage: each value is copied once, from the chunk to here.
#[derive(Debug, Default)]
struct Copied {
    /// The standard's data buffer: every value followed by LF.
    data: Vec<u8>,
    event: Vec<u8>,
    id: Vec<u8>,
    has_id: bool,
    /// The `id` line being read; it only replaces `id` once known to be free
    /// of NUL, because an id with NUL leaves the previous one in force.
    next_id: Vec<u8>,
    ceiling: usize,
}

impl Copied {
    fn clear(&mut self) {
        self.data.clear();
        self.event.clear();
        self.id.clear();
        self.next_id.clear();
        self.has_id = false;
    }

    fn held(&self) -> usize {
        self.data.len() + self.event.len() + self.id.len() + self.next_id.len()
    }
}

impl Sink for Copied {
    fn begin(&mut self, field: Field, _at: usize) {
        match field {
            Field::Data => {}
            Field::Event => self.event.clear(),
            Field::Id => self.next_id.clear(),
        }
    }

    fn extend(&mut self, field: Field, bytes: &[u8]) {
        let buf = match field {
            Field::Data => &mut self.data,
            Field::Event => &mut self.event,
            Field::Id => &mut self.next_id,
        };
        append(buf, bytes, self.ceiling);
    }

    fn end(&mut self, field: Field, _at: usize) {
        match field {
            Field::Data => append(&mut self.data, b"\n", self.ceiling),
            Field::Event => {}
            Field::Id => {
                if !self.next_id.contains(&0) {
                    mem::swap(&mut self.id, &mut self.next_id);
                    self.has_id = true;
                }
                self.next_id.clear();
            }
        }
    }
}

/// Capture storage: the raw buffer already holds every value, so only where
/// they are is recorded.
#[derive(Clone, Copy, Debug, Default)]
struct Spans {
    event: (usize, usize),
    id: Option<(usize, usize)>,
    id_start: usize,
    id_has_nul: bool,
    /// The first data value; with more than one data line the values are
    /// joined at dispatch instead.
    data: (usize, usize),
    data_lines: usize,
}

impl Sink for Spans {
    fn begin(&mut self, field: Field, at: usize) {
        match field {
            Field::Data => {
                if self.data_lines == 0 {
                    self.data.0 = at;
                }
            }
            Field::Event => self.event.0 = at,
            Field::Id => {
                self.id_start = at;
                self.id_has_nul = false;
            }
        }
    }

    fn extend(&mut self, field: Field, bytes: &[u8]) {
        if field == Field::Id && bytes.contains(&0) {
            self.id_has_nul = true;
        }
    }

    fn end(&mut self, field: Field, at: usize) {
        match field {
            Field::Data => {
                if self.data_lines == 0 {
                    self.data.1 = at;
                }
                self.data_lines += 1;
            }
            Field::Event => self.event.1 = at,
            Field::Id => {
                if !self.id_has_nul {
                    self.id = Some((self.id_start, at));
                }
            }
        }
    }
}

/// Collects only the data values, for joining a multi-line event's data
/// from its raw bytes.
struct DataJoin<'a> {
    out: &'a mut Vec<u8>,
    ceiling: usize,
}

impl Sink for DataJoin<'_> {
    fn begin(&mut self, _field: Field, _at: usize) {}

    fn extend(&mut self, field: Field, bytes: &[u8]) {
        if field == Field::Data {
            append(self.out, bytes, self.ceiling);
        }
    }

    fn end(&mut self, field: Field, _at: usize) {
        if field == Field::Data {
            append(self.out, b"\n", self.ceiling);
        }
    }
}

/// Index of the first CR or LF (this loop sees every byte of every
/// response; memchr's search takes the module's SIMD path).
fn find_eol(hay: &[u8]) -> Option<usize> {
    memchr::memchr2(b'\r', b'\n', hay)
}

/// Length of the line ending at `eol`, and whether it is a CR that ends the
/// slice (so an LF at the start of the next chunk still belongs to it).
fn eol_len(bytes: &[u8], eol: usize) -> (usize, bool) {
    match (bytes.get(eol), bytes.get(eol + 1)) {
        (Some(b'\r'), Some(b'\n')) => (2, false),
        (Some(b'\r'), None) => (1, true),
        _ => (1, false),
    }
}

/// Runs `line` over bytes made only of complete lines.
fn scan_lines<S: Sink>(mut bytes: &[u8], line: &mut Line, sink: &mut S) {
    while let Some(eol) = find_eol(bytes) {
        line.content(bytes.get(..eol).unwrap_or_default(), 0, sink);
        line.end(0, sink);
        let (len, _) = eol_len(bytes, eol);
        bytes = bytes.get(eol + len..).unwrap_or_default();
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bom {
    /// Nothing decided yet; this many bytes of a BOM have arrived and are held.
    Pending(usize),
    Done,
}

/// A CR ended the previous chunk; an LF at the start of the next one is the
/// second half of the same line ending.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PendingCr {
    No,
    /// The CR ended a line inside a block (or inside a block being spilled).
    InBlock,
    /// The CR ended a block's blank line; the block is already handed out.
    AfterBlock,
}

/// Incremental SSE parser for one stream.
#[derive(Debug)]
pub struct Parser {
    max: usize,
    ceiling: usize,
    capture: bool,
    bom: Bom,
    cr: PendingCr,
    line: Line,
    /// Input bytes of the current block so far, as the limit counts them.
    block_len: usize,
    /// The current block overflowed: pass it through until its blank line.
    skipping: bool,
    /// While skipping: no byte of the current line seen yet.
    skip_line_empty: bool,
    /// Capture mode: the current block's raw bytes.
    raw: Vec<u8>,
    spans: Spans,
    copied: Copied,
    /// Capture mode: a multi-line event's joined data, during its callback.
    scratch: Vec<u8>,
    overflows: u64,
}

impl Parser {
    /// A parser for one stream. With `capture_raw` it keeps each block's
    /// exact bytes and reports every byte through some [`Item`].
    pub fn new(limits: Limits, capture_raw: bool) -> Parser {
        let ceiling = limits.max_event_bytes.saturating_add(HELD_SLACK);
        Parser {
            max: limits.max_event_bytes,
            ceiling,
            capture: capture_raw,
            bom: Bom::Pending(0),
            cr: PendingCr::No,
            line: Line::new(),
            block_len: 0,
            skipping: false,
            skip_line_empty: false,
            raw: Vec::new(),
            spans: Spans::default(),
            copied: Copied {
                ceiling,
                ..Copied::default()
            },
            scratch: Vec::new(),
            overflows: 0,
        }
    }

    /// Feed the next chunk; `on_item` is called for each complete item, in stream order.
    pub fn feed(&mut self, chunk: &[u8], mut on_item: impl FnMut(Item<'_>)) {
        let mut chunk = chunk;
        if let Bom::Pending(held) = self.bom {
            let wanted = BOM.get(held..).unwrap_or_default();
            let seen = chunk.len().min(wanted.len());
            if chunk.get(..seen) == wanted.get(..seen) {
                if seen < wanted.len() {
                    // Still a possible BOM: hold the bytes until it is decided.
                    self.bom = Bom::Pending(held + seen);
                    return;
                }
                self.bom = Bom::Done;
                self.keep_raw(BOM);
                chunk = chunk.get(seen..).unwrap_or_default();
            } else {
                // Not a BOM after all: the held bytes start the first line.
                self.bom = Bom::Done;
                self.feed_body(BOM.get(..held).unwrap_or_default(), &mut on_item);
            }
        }
        self.feed_body(chunk, &mut on_item);
    }

    /// Raw bytes of the incomplete block held over (capture mode), e.g. to
    /// flush them unchanged at end of stream. Empty without capture.
    ///
    /// The parser gives up that block: as the bytes are gone it can no longer
    /// dispatch it, so if the stream goes on, the rest of the block comes out
    /// as [`Item::Spill`] (not counted as an overflow) and parsing resumes
    /// after its blank line. Concatenating the items still gives the input.
    pub fn take_pending_raw(&mut self) -> Vec<u8> {
        if !self.capture {
            return Vec::new();
        }
        if let Bom::Pending(held) = self.bom {
            if held == 0 {
                return Vec::new();
            }
            self.bom = Bom::Done;
            self.skipping = true;
            self.skip_line_empty = false;
            return BOM.get(..held).unwrap_or_default().to_vec();
        }
        let started = self.block_len > 0;
        let line_empty = self.line.is_start();
        let raw = mem::take(&mut self.raw);
        self.reset_block();
        if started {
            self.skipping = true;
            self.skip_line_empty = line_empty;
        }
        raw
    }

    /// Bytes currently held (for tests of the memory bound). Never more than
    /// `max_event_bytes + HELD_SLACK` between calls to [`Parser::feed`].
    pub fn held_bytes(&self) -> usize {
        let bom = match self.bom {
            Bom::Pending(held) => held,
            Bom::Done => 0,
        };
        bom + self.raw.len() + self.copied.held() + self.scratch.len()
    }

    /// How many blocks overflowed the limit so far.
    pub fn overflows(&self) -> u64 {
        self.overflows
    }

    fn feed_body<F: FnMut(Item<'_>)>(&mut self, chunk: &[u8], on_item: &mut F) {
        if chunk.is_empty() {
            // Keep a pending CR for the chunk that has bytes.
            return;
        }
        let mut pos = self.finish_crlf(chunk, on_item);
        while pos < chunk.len() {
            pos = if self.skipping {
                self.skip(chunk, pos, on_item)
            } else {
                self.parse(chunk, pos, on_item)
            };
        }
    }

    /// Gives an LF that completes the previous chunk's CR to whoever owns that
    /// line ending; returns how many bytes of `chunk` it took.
    fn finish_crlf<F: FnMut(Item<'_>)>(&mut self, chunk: &[u8], on_item: &mut F) -> usize {
        let cr = mem::replace(&mut self.cr, PendingCr::No);
        let Some(lf) = chunk.get(..1).filter(|first| first == b"\n") else {
            return 0;
        };
        match cr {
            PendingCr::No => return 0,
            // Not counted: unsplit, this LF would have been in the previous
            // block, so counting it here would make the limit chunk-dependent.
            PendingCr::AfterBlock => self.keep_raw(lf),
            PendingCr::InBlock => {
                if !self.skipping && self.admit(1, on_item) {
                    self.keep_raw(lf);
                } else {
                    self.spill(lf, on_item);
                }
            }
        }
        1
    }

    /// Parses one line, or the partial line that ends the chunk, starting at
    /// `pos`; returns where it stopped. Returns `pos` itself if the line
    /// overflowed the block, for `skip` to take over.
    fn parse<F: FnMut(Item<'_>)>(&mut self, chunk: &[u8], pos: usize, on_item: &mut F) -> usize {
        let rest = chunk.get(pos..).unwrap_or_default();
        let Some(eol) = find_eol(rest) else {
            if !self.admit(rest.len(), on_item) {
                return pos;
            }
            let base = self.raw.len();
            self.keep_raw(rest);
            self.line_content(rest, base);
            return chunk.len();
        };
        let (eol_len, cr_at_end) = eol_len(rest, eol);
        let line = rest.get(..eol + eol_len).unwrap_or_default();
        if eol == 0 && self.line.is_start() {
            let term_start = self.raw.len();
            self.keep_raw(line);
            self.cr = if cr_at_end {
                PendingCr::AfterBlock
            } else {
                PendingCr::No
            };
            self.dispatch(term_start, on_item);
            return pos + line.len();
        }
        if !self.admit(line.len(), on_item) {
            return pos;
        }
        let base = self.raw.len();
        self.keep_raw(line);
        self.line_content(rest.get(..eol).unwrap_or_default(), base);
        if self.capture {
            self.line.end(base + eol, &mut self.spans);
        } else {
            self.line.end(base + eol, &mut self.copied);
        }
        if cr_at_end {
            self.cr = PendingCr::InBlock;
        }
        pos + line.len()
    }

    /// Passes an overflowed block through, from `pos` up to and including its
    /// blank line, without holding any of it; returns where it stopped.
    fn skip<F: FnMut(Item<'_>)>(&mut self, chunk: &[u8], pos: usize, on_item: &mut F) -> usize {
        let mut at = pos;
        let mut line_empty = self.skip_line_empty;
        while let Some(eol) = find_eol(chunk.get(at..).unwrap_or_default()) {
            let (eol_len, cr_at_end) = eol_len(chunk, at + eol);
            let next = at + eol + eol_len;
            if eol == 0 && line_empty {
                self.skipping = false;
                self.cr = if cr_at_end {
                    PendingCr::AfterBlock
                } else {
                    PendingCr::No
                };
                self.spill(chunk.get(pos..next).unwrap_or_default(), on_item);
                return next;
            }
            if cr_at_end {
                self.cr = PendingCr::InBlock;
            }
            line_empty = true;
            at = next;
        }
        self.skip_line_empty = line_empty && at == chunk.len();
        self.spill(chunk.get(pos..).unwrap_or_default(), on_item);
        chunk.len()
    }

    fn line_content(&mut self, seg: &[u8], base: usize) {
        if self.capture {
            self.line.content(seg, base, &mut self.spans);
        } else {
            self.line.content(seg, base, &mut self.copied);
        }
    }

    /// Counts `n` more bytes against the block; on overflow hands out what
    /// was held and switches to skipping.
    fn admit<F: FnMut(Item<'_>)>(&mut self, n: usize, on_item: &mut F) -> bool {
        let len = self.block_len.saturating_add(n);
        if len <= self.max {
            self.block_len = len;
            return true;
        }
        self.overflows += 1;
        self.skip_line_empty = self.line.is_start();
        self.skipping = true;
        if !self.raw.is_empty() {
            self.spill_raw(on_item);
        }
        self.reset_block();
        false
    }

    fn dispatch<F: FnMut(Item<'_>)>(&mut self, term_start: usize, on_item: &mut F) {
        if self.capture {
            let spans = self.spans;
            let raw = self.raw.as_slice();
            let span = |(start, end): (usize, usize)| raw.get(start..end).unwrap_or_default();
            if spans.data_lines == 0 {
                on_item(Item::Other { raw });
            } else {
                let data = if spans.data_lines == 1 {
                    span(spans.data)
                } else {
                    self.scratch.clear();
                    let mut line = Line {
                        phase: Phase::Value(Field::Data),
                        ..Line::new()
                    };
                    let mut join = DataJoin {
                        out: &mut self.scratch,
                        ceiling: self.ceiling,
                    };
                    scan_lines(span((spans.data.0, term_start)), &mut line, &mut join);
                    self.scratch.pop();
                    self.scratch.as_slice()
                };
                on_item(Item::Event(Event {
                    event_type: span(spans.event),
                    data,
                    id: spans.id.map(span),
                    raw,
                }));
            }
        } else if let Some((_, data)) = self.copied.data.split_last() {
            let copied = &self.copied;
            on_item(Item::Event(Event {
                event_type: &copied.event,
                data,
                id: copied.has_id.then_some(copied.id.as_slice()),
                raw: &[],
            }));
        }
        self.reset_block();
    }

    fn reset_block(&mut self) {
        self.raw.clear();
        self.scratch.clear();
        self.spans = Spans::default();
        self.copied.clear();
        self.block_len = 0;
        self.line = Line::new();
    }

    fn keep_raw(&mut self, bytes: &[u8]) {
        if self.capture {
            append(&mut self.raw, bytes, self.ceiling);
        }
    }

    fn spill<F: FnMut(Item<'_>)>(&self, bytes: &[u8], on_item: &mut F) {
        if self.capture && !bytes.is_empty() {
            on_item(Item::Spill(bytes));
        }
    }

    fn spill_raw<F: FnMut(Item<'_>)>(&self, on_item: &mut F) {
        self.spill(&self.raw, on_item);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::{select, Index};

    #[derive(Clone, Debug, PartialEq, Eq)]
    struct Ev {
        ty: Vec<u8>,
        data: Vec<u8>,
        id: Option<Vec<u8>>,
    }

    fn ev(ty: &str, data: &str, id: Option<&str>) -> Ev {
        Ev {
            ty: ty.into(),
            data: data.into(),
            id: id.map(Into::into),
        }
    }

    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Got {
        Event(Ev, Vec<u8>),
        Other(Vec<u8>),
        Spill(Vec<u8>),
    }

    impl Got {
        fn raw(&self) -> &[u8] {
            match self {
                Got::Event(_, raw) | Got::Other(raw) | Got::Spill(raw) => raw,
            }
        }
    }

    fn own(item: Item<'_>) -> Got {
        match item {
            Item::Event(e) => Got::Event(
                Ev {
                    ty: e.event_type.to_vec(),
                    data: e.data.to_vec(),
                    id: e.id.map(<[u8]>::to_vec),
                },
                e.raw.to_vec(),
            ),
            Item::Other { raw } => Got::Other(raw.to_vec()),
            Item::Spill(raw) => Got::Spill(raw.to_vec()),
        }
    }

    struct Run {
        items: Vec<Got>,
        pending: Vec<u8>,
        overflows: u64,
    }

    impl Run {
        fn events(&self) -> Vec<Ev> {
            self.items
                .iter()
                .filter_map(|g| match g {
                    Got::Event(e, _) => Some(e.clone()),
                    _ => None,
                })
                .collect()
        }

        fn concat(&self) -> Vec<u8> {
            let mut out: Vec<u8> = self.items.iter().flat_map(|g| g.raw().to_vec()).collect();
            out.extend_from_slice(&self.pending);
            out
        }
    }

    /// Feeds `pieces` in order, checking the memory bound after every feed.
    fn run_pieces<'a>(
        pieces: impl IntoIterator<Item = &'a [u8]>,
        max: usize,
        capture: bool,
    ) -> Run {
        let mut parser = Parser::new(
            Limits {
                max_event_bytes: max,
            },
            capture,
        );
        let mut items = Vec::new();
        for piece in pieces {
            parser.feed(piece, |item| items.push(own(item)));
            assert!(
                parser.held_bytes() <= max + HELD_SLACK,
                "held {} > {max} + slack",
                parser.held_bytes()
            );
        }
        let overflows = parser.overflows();
        let pending = parser.take_pending_raw();
        Run {
            items,
            pending,
            overflows,
        }
    }

    fn run_cuts(input: &[u8], cuts: &[usize], max: usize, capture: bool) -> Run {
        let mut cuts: Vec<usize> = cuts.iter().map(|&c| c.min(input.len())).collect();
        cuts.sort_unstable();
        let mut pieces = Vec::new();
        let mut start = 0;
        for cut in cuts.into_iter().chain([input.len()]) {
            pieces.push(&input[start..cut]);
            start = cut;
        }
        run_pieces(pieces, max, capture)
    }

    fn run_whole(input: &[u8], max: usize, capture: bool) -> Run {
        run_pieces([input], max, capture)
    }

    fn run_bytewise(input: &[u8], max: usize, capture: bool) -> Run {
        run_pieces(input.chunks(1), max, capture)
    }

    /// The standard transcribed as plainly as possible over the whole input,
    /// plus the limit rule: a block whose bytes before its blank line exceed
    /// `max` is not dispatched and counts as an overflow.
    fn reference(input: &[u8], max: usize) -> (Vec<Ev>, u64) {
        let body = input.strip_prefix(&BOM[..]).unwrap_or(input);
        let (mut events, mut overflows) = (Vec::new(), 0);
        let (mut data, mut ty, mut id) = (Vec::new(), Vec::new(), None);
        let (mut block_start, mut i) = (0, 0);
        while let Some(off) = body[i..].iter().position(|&b| b == b'\r' || b == b'\n') {
            let eol = i + off;
            let line = &body[i..eol];
            let next = if body[eol] == b'\r' && body.get(eol + 1) == Some(&b'\n') {
                eol + 2
            } else {
                eol + 1
            };
            if line.is_empty() {
                if eol - block_start > max {
                    overflows += 1;
                } else if data.pop().is_some() {
                    events.push(Ev {
                        ty: ty.clone(),
                        data: data.clone(),
                        id: id.clone(),
                    });
                }
                data.clear();
                ty.clear();
                id = None;
                block_start = next;
            } else if line[0] != b':' {
                let (name, value) = match line.iter().position(|&b| b == b':') {
                    Some(c) => {
                        let v = &line[c + 1..];
                        (&line[..c], v.strip_prefix(b" ").unwrap_or(v))
                    }
                    None => (line, &b""[..]),
                };
                match name {
                    b"data" => {
                        data.extend_from_slice(value);
                        data.push(b'\n');
                    }
                    b"event" => ty = value.to_vec(),
                    b"id" if !value.contains(&0) => id = Some(value.to_vec()),
                    _ => {}
                }
            }
            i = next;
        }
        if body.len() - block_start > max {
            overflows += 1;
        }
        (events, overflows)
    }

    const OPENAI: &str = "data: {\"id\":\"c1\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n\
        data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2}}\n\n\
        data: [DONE]\n\n";

    const ANTHROPIC: &str = "event: message_start\r\n\
        data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25}}}\r\n\r\n\
        event: ping\r\ndata: {\"type\": \"ping\"}\r\n\r\n\
        event: content_block_delta\r\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"é漢🦀\"}}\r\n\r\n\
        event: message_delta\r\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\r\n\r\n\
        event: message_stop\r\ndata: {\"type\":\"message_stop\"}\r\n\r\n";

    const RESPONSES: &str = "event: response.created\ndata: {\"type\":\"response.created\"}\n\n\
        : keep-alive\n\n\
        event: response.output_text.delta\ndata: {\"delta\":\"a\"}\n\n\
        event: response.completed\ndata: {\"response\":{\"usage\":{\"total_tokens\":3}}}\n\n";

    struct Case {
        name: &'static str,
        input: &'static str,
        expect: &'static [(&'static str, &'static str, Option<&'static str>)],
    }

    const CASES: &[Case] = &[
        Case { name: "lf", input: "data: a\n\n", expect: &[("", "a", None)] },
        Case { name: "crlf", input: "data: a\r\n\r\n", expect: &[("", "a", None)] },
        Case { name: "cr", input: "data: a\r\r", expect: &[("", "a", None)] },
        Case { name: "mixed endings", input: "event: x\rdata: 1\r\ndata: 2\n\r\n", expect: &[("x", "1\n2", None)] },
        Case { name: "cr then lf is one ending", input: "data: a\r\ndata: b\r\n\r\n", expect: &[("", "a\nb", None)] },
        Case { name: "lf then cr is two endings", input: "data: a\n\rdata: b\n\n", expect: &[("", "a", None), ("", "b", None)] },
        Case { name: "bom", input: "\u{FEFF}data: a\n\n", expect: &[("", "a", None)] },
        Case { name: "only one bom dropped", input: "\u{FEFF}\u{FEFF}data: a\n\ndata: b\n\n", expect: &[("", "b", None)] },
        Case { name: "bom bytes later are content", input: "data: \u{FEFF}\n\n", expect: &[("", "\u{FEFF}", None)] },
        Case { name: "comments", input: ": hi\ndata: a\n: mid\n\n", expect: &[("", "a", None)] },
        Case { name: "comment-only block", input: ": ping\n\n", expect: &[] },
        Case { name: "data without colon", input: "data\n\n", expect: &[("", "", None)] },
        Case { name: "no space", input: "data:a\n\n", expect: &[("", "a", None)] },
        Case { name: "one space removed", input: "data: a\n\n", expect: &[("", "a", None)] },
        Case { name: "only one of two spaces removed", input: "data:  a\n\n", expect: &[("", " a", None)] },
        Case { name: "tab kept", input: "data:\ta\n\n", expect: &[("", "\ta", None)] },
        Case { name: "space only", input: "data: \n\n", expect: &[("", "", None)] },
        Case { name: "colon in value", input: "data: {\"a\":1}\n\n", expect: &[("", "{\"a\":1}", None)] },
        Case { name: "multi-line data", input: "data: a\ndata:\ndata: b\n\n", expect: &[("", "a\n\nb", None)] },
        Case { name: "event type resets", input: "event: foo\ndata: 1\n\ndata: 2\n\n", expect: &[("foo", "1", None), ("", "2", None)] },
        Case { name: "event without data resets", input: "event: foo\n\ndata: 2\n\n", expect: &[("", "2", None)] },
        Case { name: "last event wins", input: "event: a\nevent: b\ndata: x\n\n", expect: &[("b", "x", None)] },
        Case { name: "empty event", input: "event: a\nevent\ndata: x\n\n", expect: &[("", "x", None)] },
        Case { name: "id", input: "id: 7\ndata: x\n\n", expect: &[("", "x", Some("7"))] },
        Case { name: "empty id", input: "id\ndata: x\n\n", expect: &[("", "x", Some(""))] },
        Case { name: "id with nul ignored", input: "id: 1\nid: 2\0x\ndata: x\n\n", expect: &[("", "x", Some("1"))] },
        Case { name: "id is per block", input: "id: 1\ndata: a\n\ndata: b\n\n", expect: &[("", "a", Some("1")), ("", "b", None)] },
        Case { name: "retry ignored", input: "retry: 10\ndata: a\nretry: x\n\n", expect: &[("", "a", None)] },
        Case { name: "unknown fields ignored", input: "foo: x\nData: y\ndata : z\ndat: w\ndataa: v\neventx: u\ndata: a\n\n", expect: &[("", "a", None)] },
        Case { name: "field names are exact", input: "Data: y\n\n", expect: &[] },
        Case { name: "blank line runs", input: "\n\r\n\rdata: a\n\n\n\n", expect: &[("", "a", None)] },
        Case { name: "utf-8", input: "data: héllo 漢 🦀\n\n", expect: &[("", "héllo 漢 🦀", None)] },
        Case { name: "incomplete block not dispatched", input: "data: a\n\ndata: b\n", expect: &[("", "a", None)] },
        Case { name: "incomplete line not dispatched", input: "data: a\n\ndata: b", expect: &[("", "a", None)] },
        Case { name: "empty input", input: "", expect: &[] },
        Case {
            name: "openai",
            input: OPENAI,
            expect: &[
                ("", "{\"id\":\"c1\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}", None),
                ("", "{\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2}}", None),
                ("", "[DONE]", None),
            ],
        },
        Case {
            name: "anthropic",
            input: ANTHROPIC,
            expect: &[
                ("message_start", "{\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25}}}", None),
                ("ping", "{\"type\": \"ping\"}", None),
                ("content_block_delta", "{\"type\":\"content_block_delta\",\"delta\":{\"text\":\"é漢🦀\"}}", None),
                ("message_delta", "{\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}", None),
                ("message_stop", "{\"type\":\"message_stop\"}", None),
            ],
        },
        Case {
            name: "openai responses",
            input: RESPONSES,
            expect: &[
                ("response.created", "{\"type\":\"response.created\"}", None),
                ("response.output_text.delta", "{\"delta\":\"a\"}", None),
                ("response.completed", "{\"response\":{\"usage\":{\"total_tokens\":3}}}", None),
            ],
        },
    ];

    #[test]
    fn grammar_cases_for_every_split_and_mode() {
        for case in CASES {
            let input = case.input.as_bytes();
            let expect: Vec<Ev> = case.expect.iter().map(|&(t, d, i)| ev(t, d, i)).collect();
            assert_eq!(
                reference(input, usize::MAX).0,
                expect,
                "reference disagrees: {}",
                case.name
            );
            for capture in [false, true] {
                let whole = run_whole(input, 1 << 20, capture);
                assert_eq!(
                    whole.events(),
                    expect,
                    "{} whole, capture={capture}",
                    case.name
                );
                let bytewise = run_bytewise(input, 1 << 20, capture);
                assert_eq!(
                    bytewise.events(),
                    expect,
                    "{} bytewise, capture={capture}",
                    case.name
                );
                for cut in 0..=input.len() {
                    let split = run_cuts(input, &[cut], 1 << 20, capture);
                    assert_eq!(
                        split.events(),
                        expect,
                        "{} split at {cut}, capture={capture}",
                        case.name
                    );
                    if capture {
                        assert_eq!(split.concat(), input, "{} split at {cut}", case.name);
                    }
                }
            }
        }
    }

    #[test]
    fn cr_lf_split_across_chunks_is_one_line_ending() {
        let run = run_pieces(
            [&b"data: a\r"[..], b"\n", b"data: b\r", b"\n\r", b"\n"],
            1 << 20,
            true,
        );
        assert_eq!(
            run.items,
            vec![Got::Event(
                ev("", "a\nb", None),
                b"data: a\r\ndata: b\r\n\r".to_vec()
            )]
        );
        // The LF after the blank line's CR arrived after the event was handed
        // out; it is held as the start of the next block.
        assert_eq!(run.pending, b"\n");
        // Empty chunks in between must not forget the pending CR.
        let run = run_pieces([&b"data: a\r"[..], b"", b"\n", b"", b"\n"], 1 << 20, false);
        assert_eq!(run.events(), vec![ev("", "a", None)]);
    }

    #[test]
    fn capture_reports_each_block_with_its_raw_bytes() {
        struct RawCase {
            input: &'static [u8],
            items: &'static [(&'static str, &'static [u8])],
            pending: &'static [u8],
        }
        // ("event", raw) for an Event with data "x"; ("other", raw); ("spill", raw).
        let cases = [
            RawCase {
                input: b": ping\n\ndata: x\n\n",
                items: &[("other", b": ping\n\n"), ("event", b"data: x\n\n")],
                pending: b"",
            },
            RawCase {
                input: b"\xEF\xBB\xBFdata: x\r\n\r\n\n",
                items: &[("event", b"\xEF\xBB\xBFdata: x\r\n\r\n"), ("other", b"\n")],
                pending: b"",
            },
            RawCase {
                input: b"event: e\n\ndata: x\n\ndata: y",
                items: &[("other", b"event: e\n\n"), ("event", b"data: x\n\n")],
                pending: b"data: y",
            },
            RawCase {
                input: b"\xEF\xBB\xBF",
                items: &[],
                pending: b"\xEF\xBB\xBF",
            },
            RawCase {
                input: b"\xEF",
                items: &[],
                pending: b"\xEF",
            },
        ];
        for case in cases {
            let run = run_whole(case.input, 1 << 20, true);
            let want: Vec<Got> = case
                .items
                .iter()
                .map(|&(kind, raw)| match kind {
                    "event" => Got::Event(ev("", "x", None), raw.to_vec()),
                    "other" => Got::Other(raw.to_vec()),
                    _ => Got::Spill(raw.to_vec()),
                })
                .collect();
            assert_eq!(run.items, want, "{:?}", case.input);
            assert_eq!(run.pending, case.pending, "{:?}", case.input);
        }
    }

    #[test]
    fn partial_bom_is_held_then_decided() {
        let bom_split = run_pieces([&b"\xEF"[..], b"\xBB", b"\xBFdata: a\n\n"], 1 << 20, true);
        assert_eq!(bom_split.events(), vec![ev("", "a", None)]);
        assert_eq!(bom_split.concat(), b"\xEF\xBB\xBFdata: a\n\n");
        // Two BOM bytes then something else: they were the start of a field name.
        let not_bom = run_pieces([&b"\xEF\xBB"[..], b"data: a\n\ndata: b\n\n"], 1 << 20, true);
        assert_eq!(not_bom.events(), vec![ev("", "b", None)]);
        assert_eq!(not_bom.concat(), b"\xEF\xBBdata: a\n\ndata: b\n\n");
    }

    #[test]
    fn overflow_spills_the_block_and_resyncs_at_its_blank_line() {
        let input = b"data: ok\n\ndata: 0123456789\ndata: more\n\ndata: next\n\n";
        for capture in [false, true] {
            let run = run_whole(input, 12, capture);
            assert_eq!(run.events(), vec![ev("", "ok", None), ev("", "next", None)]);
            assert_eq!(run.overflows, 1);
            if capture {
                assert_eq!(run.concat(), input);
                let spilled: Vec<u8> = run
                    .items
                    .iter()
                    .filter(|g| matches!(g, Got::Spill(_)))
                    .flat_map(|g| g.raw().to_vec())
                    .collect();
                assert_eq!(spilled, b"data: 0123456789\ndata: more\n\n");
            }
        }
    }

    #[test]
    fn take_pending_raw_gives_up_the_block() {
        let mut parser = Parser::new(Limits::default(), true);
        let mut items = Vec::new();
        parser.feed(b"data: a\n\ndata: b", |i| items.push(own(i)));
        assert_eq!(parser.take_pending_raw(), b"data: b");
        assert_eq!(parser.held_bytes(), 0);
        parser.feed(b"c\n\ndata: d\n\n", |i| items.push(own(i)));
        assert_eq!(
            items,
            vec![
                Got::Event(ev("", "a", None), b"data: a\n\n".to_vec()),
                Got::Spill(b"c\n\n".to_vec()),
                Got::Event(ev("", "d", None), b"data: d\n\n".to_vec()),
            ]
        );
        assert_eq!(parser.overflows(), 0);
        assert!(Parser::new(Limits::default(), false)
            .take_pending_raw()
            .is_empty());
    }

    #[test]
    fn ten_megabytes_of_one_data_line_stay_bounded() {
        const LIMIT: usize = 64 << 10;
        const TOTAL: usize = 10 << 20;
        let filler = vec![b'x'; 16 << 10];
        for capture in [false, true] {
            let mut parser = Parser::new(
                Limits {
                    max_event_bytes: LIMIT,
                },
                capture,
            );
            let (mut spilled, mut events) = (0, Vec::new());
            let mut on_item = |item: Item<'_>| match item {
                Item::Spill(bytes) => spilled += bytes.len(),
                other => events.push(own(other)),
            };
            parser.feed(b"data: ", &mut on_item);
            let mut fed = 6;
            while fed < TOTAL {
                parser.feed(&filler, &mut on_item);
                fed += filler.len();
                assert!(parser.held_bytes() <= LIMIT + HELD_SLACK);
                assert!(parser.raw.capacity() <= LIMIT + HELD_SLACK);
                assert!(parser.copied.data.capacity() <= LIMIT + HELD_SLACK);
            }
            assert_eq!(parser.overflows(), 1);
            // Ends the long line, then its block; the next event is parsed.
            parser.feed(b"\n\ndata: after\n\n", &mut on_item);
            assert_eq!(parser.held_bytes(), 0);
            let raw = if capture {
                b"data: after\n\n".to_vec()
            } else {
                Vec::new()
            };
            assert_eq!(events, vec![Got::Event(ev("", "after", None), raw)]);
            assert_eq!(spilled, if capture { fed + 2 } else { 0 });
        }
    }

    #[test]
    fn find_eol_matches_a_plain_search() {
        let mut hay = vec![b'a'; 40];
        assert_eq!(find_eol(&hay), None);
        for at in 0..hay.len() {
            for byte in [b'\r', b'\n'] {
                hay[at] = byte;
                assert_eq!(find_eol(&hay), Some(at));
                // A second ending further on must not win.
                if at + 3 < hay.len() {
                    hay[at + 3] = b'\n';
                    assert_eq!(find_eol(&hay), Some(at));
                    hay[at + 3] = b'a';
                }
                hay[at] = b'a';
            }
        }
        // Bytes that differ from CR/LF by one bit, or are 0x80 above them.
        let near: Vec<u8> = [0x0B, 0x0C, 0x0E, 0x8A, 0x8D, 0x00, 0xFF, 0x09].repeat(3);
        assert_eq!(find_eol(&near), None);
    }

    // ---- generated streams ----

    fn value() -> impl Strategy<Value = Vec<u8>> {
        let pieces: Vec<&'static [u8]> = vec![
            b"a",
            b"Z",
            b"7",
            b" ",
            b":",
            b"{\"k\":\"v\"}",
            "é".as_bytes(),
            "漢".as_bytes(),
            "🦀".as_bytes(),
            b"\0",
            b"\t",
            b"[DONE]",
            b"\xFF",
        ];
        prop::collection::vec(select(pieces), 0..6).prop_map(|parts| parts.concat())
    }

    fn line() -> impl Strategy<Value = Vec<u8>> {
        let space = select(vec![&b""[..], b" ", b"  "]);
        let event_type = select(vec![&b"message_start"[..], b"delta", b"", "é".as_bytes()]);
        let odd = select(vec![
            &b"data"[..],
            b"event",
            b"id",
            b"foo: x",
            b"Data: x",
            b"data : x",
            b"dat",
            b"eventx: y",
            b"retry: 100",
            b"retry: x1",
            b":",
        ]);
        prop_oneof![
            5 => (space.clone(), value()).prop_map(|(s, v)| [&b"data:"[..], s, &v].concat()),
            2 => (space.clone(), event_type).prop_map(|(s, t)| [&b"event:"[..], s, t].concat()),
            1 => (space, value()).prop_map(|(s, v)| [&b"id:"[..], s, &v].concat()),
            1 => value().prop_map(|v| [&b": "[..], &v].concat()),
            2 => odd.prop_map(<[u8]>::to_vec),
        ]
    }

    fn eol() -> impl Strategy<Value = &'static [u8]> {
        select(vec![&b"\n"[..], b"\r\n", b"\r"])
    }

    fn stream() -> impl Strategy<Value = Vec<u8>> {
        let block = (prop::collection::vec((line(), eol()), 0..5), eol());
        (
            any::<bool>(),
            prop::collection::vec(block, 0..8),
            prop::collection::vec((line(), eol()), 0..3),
            prop::option::of(line()),
        )
            .prop_map(|(bom, blocks, tail, partial)| {
                let mut out = Vec::new();
                if bom {
                    out.extend_from_slice(BOM);
                }
                for (lines, end) in blocks {
                    for (l, e) in lines {
                        out.extend_from_slice(&l);
                        out.extend_from_slice(e);
                    }
                    out.extend_from_slice(end);
                }
                for (l, e) in tail {
                    out.extend_from_slice(&l);
                    out.extend_from_slice(e);
                }
                out.extend(partial.unwrap_or_default());
                out
            })
    }

    fn cuts(len: usize, picks: &[Index]) -> Vec<usize> {
        picks.iter().map(|p| p.index(len + 1)).collect()
    }

    /// Limits from "everything overflows" through "some blocks do" to "none do".
    fn limit() -> impl Strategy<Value = usize> {
        prop_oneof![0..80usize, Just(1 << 20)]
    }

    proptest! {
        #[test]
        fn any_chunking_matches_whole_and_the_standard(
            input in stream(),
            picks in prop::collection::vec(any::<Index>(), 0..12),
            max in limit(),
        ) {
            let (expect, overflows) = reference(&input, max);
            let cuts = cuts(input.len(), &picks);
            for capture in [false, true] {
                let whole = run_whole(&input, max, capture);
                let chunked = run_cuts(&input, &cuts, max, capture);
                prop_assert_eq!(&whole.events(), &expect);
                prop_assert_eq!(&chunked.events(), &expect);
                prop_assert_eq!(whole.overflows, overflows);
                prop_assert_eq!(chunked.overflows, overflows);
            }
        }

        #[test]
        fn byte_at_a_time_matches_whole(input in stream(), max in limit()) {
            for capture in [false, true] {
                let whole = run_whole(&input, max, capture);
                let bytewise = run_bytewise(&input, max, capture);
                prop_assert_eq!(bytewise.events(), whole.events());
                prop_assert_eq!(bytewise.overflows, whole.overflows);
            }
        }

        #[test]
        fn capture_items_concatenate_to_the_input(
            input in stream(),
            picks in prop::collection::vec(any::<Index>(), 0..12),
            max in limit(),
        ) {
            let run = run_cuts(&input, &cuts(input.len(), &picks), max, true);
            prop_assert_eq!(run.concat(), input);
            // Each block's raw bytes stand on their own: parsed alone they give
            // back that block's event, or nothing for an Other.
            for item in &run.items {
                match item {
                    Got::Event(e, raw) => prop_assert_eq!(reference(raw, usize::MAX).0, vec![e.clone()]),
                    Got::Other(raw) => prop_assert_eq!(reference(raw, usize::MAX).0, vec![]),
                    Got::Spill(_) => {}
                }
            }
        }

        #[test]
        fn held_bytes_stay_within_the_limit(
            input in stream(),
            picks in prop::collection::vec(any::<Index>(), 0..12),
            max in 0..64usize,
            capture in any::<bool>(),
        ) {
            // run_pieces asserts the bound after every feed.
            run_cuts(&input, &cuts(input.len(), &picks), max, capture);
            run_bytewise(&input, max, capture);
        }

        #[test]
        fn find_eol_agrees_with_position(hay in prop::collection::vec(
            select(vec![b'a', b'\r', b'\n', 0x0B, 0x8A, 0x8D, 0x00, 0xFF]), 0..40)
        ) {
            prop_assert_eq!(find_eol(&hay), hay.iter().position(|&b| b == b'\r' || b == b'\n'));
        }
    }
}
