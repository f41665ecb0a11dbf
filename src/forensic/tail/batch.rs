//! A chain's new records in bounded memory. A reading of them ([`Scout`]) keeps their lines
//! only while they fit in [`HOLD_BYTES`]; past that it keeps where each batch of about that
//! size ends (its last record's seq and hash), and the records are read again batch by batch
//! ([`Batches`]), each written only once its last record hashes to the one the first reading
//! found there, which that reading had followed, record by record, to the end it vouched for
//! (the verified head, or the end of the walk from the last record passed on). A backlog of
//! any length then costs a batch of memory, not the backlog: a tail restarted after an outage
//! catches up within the memory a sidecar is given.

use std::collections::VecDeque;
use std::io::Write;

use super::{pass_on, save_state, say_gap, Pass, PassError, Position, State, Stop};

/// Most bytes of record lines (with their positions) a reading holds for the chains of one
/// pass, and the size of a batch read again: a batch is one record larger at most.
pub(super) const HOLD_BYTES: usize = 8 << 20;

/// What holding one record's position beside its line costs, about.
const PER_RECORD: usize = 160;

/// Seqs after the position that `prune-log` moved before they were passed on.
pub(super) type Gap = Option<(u64, u64)>;

/// Receives the records a reading finds, in order.
pub(super) trait Take {
    /// Takes record `line` (without its newline), with the position just past it and the
    /// gap before the first record read; `false` stops the reading: it is done again later.
    fn take(&mut self, line: Vec<u8>, at: Position, gap: Gap) -> bool;
}

/// The bytes a record takes in a batch: its line and its position. Counted the same way in
/// both readings, so that a batch read again is held to the size the first reading found.
fn batch_bytes(line: &[u8]) -> usize {
    line.len() + PER_RECORD
}

/// Where a batch ends: its last record, and the bytes of its records.
#[derive(Clone, Debug)]
pub(super) struct End {
    pub(super) at: Position,
    bytes: usize,
}

/// The records of a chain after its position, as a first reading found them.
pub(super) struct NewRecords {
    /// Each record line and the position just past it; `None` when there were more than the
    /// reading could hold: they are read again, a batch at a time ([`Batches`]).
    pub(super) lines: Option<Vec<(Vec<u8>, Position)>>,
    /// Where each batch ends, the last one at `to` (none when there was no record).
    pub(super) ends: Vec<End>,
    pub(super) to: Position,
    /// Seqs after the position that `prune-log` moved away before they were passed on.
    pub(super) gap: Gap,
    /// The file the reading started in.
    pub(super) start_file: u64,
}

impl NewRecords {
    /// Whether the reading found no record after the position.
    pub(super) fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The bytes it holds.
    pub(super) fn held(&self) -> usize {
        self.lines.as_ref().map_or(0, |l| {
            l.iter().map(|(line, _)| line.capacity() + PER_RECORD).sum()
        })
    }
}

/// A first reading: the lines while they fit in `room` bytes, and where each batch ends.
pub(super) struct Scout {
    lines: Option<Vec<(Vec<u8>, Position)>>,
    held: usize,
    room: usize,
    ends: Vec<End>,
    /// Bytes of the records after the last batch's end.
    open: usize,
    last: Option<Position>,
    /// A batch's size.
    batch: usize,
}

impl Scout {
    /// A reading that holds at most `room` bytes of lines, with batches of [`HOLD_BYTES`].
    pub(super) fn new(room: usize) -> Scout {
        Scout::batched(room, HOLD_BYTES)
    }

    /// A reading that holds at most `room` bytes of lines, with batches of `batch` bytes.
    pub(super) fn batched(room: usize, batch: usize) -> Scout {
        Scout {
            batch,
            lines: Some(Vec::new()),
            held: 0,
            room,
            ends: Vec::new(),
            open: 0,
            last: None,
        }
    }

    /// What the reading found, up to `to`, its last record, after `gap`.
    pub(super) fn finish(mut self, to: Position, gap: Gap, start_file: u64) -> NewRecords {
        if let (Some(at), true) = (self.last.take(), self.open > 0) {
            self.ends.push(End {
                at,
                bytes: self.open,
            });
        }
        NewRecords {
            lines: self.lines,
            ends: self.ends,
            to,
            gap,
            start_file,
        }
    }
}

impl Take for Scout {
    fn take(&mut self, line: Vec<u8>, at: Position, _gap: Gap) -> bool {
        self.open += batch_bytes(&line);
        let held = line.capacity() + PER_RECORD;
        if self.held.saturating_add(held) > self.room {
            // More than can be held: none is, they are all read again in batches.
            self.lines = None;
        }
        if let Some(lines) = self.lines.as_mut() {
            self.held += held;
            lines.push((line, at.clone()));
        }
        if self.open >= self.batch {
            self.ends.push(End {
                at,
                bytes: self.open,
            });
            self.open = 0;
            self.last = None;
        } else {
            self.last = Some(at);
        }
        true
    }
}

/// A second reading, after a [`Scout`] that could not hold the lines: each batch is written
/// (and, with `--state`, saved) once its last record has the seq and hash the first reading
/// found there; any difference stops it, with what was written before passed on.
pub(super) struct Batches<'a, W: Write> {
    out: &'a mut W,
    chain: &'a str,
    how: &'a Pass<'a>,
    state: &'a mut State,
    ends: VecDeque<End>,
    gap: Gap,
    said_gap: bool,
    batch: Vec<(Vec<u8>, Position)>,
    bytes: usize,
    /// A write or a save that failed: the reading stopped there.
    failed: Option<PassError>,
    wrote: bool,
}

impl<'a, W: Write> Batches<'a, W> {
    /// Writes the records of `chain` that `first` found, as a reading from the same position
    /// takes them, to `out`, moving the chain's position in `state` past each.
    pub(super) fn new(
        out: &'a mut W,
        chain: &'a str,
        how: &'a Pass<'a>,
        state: &'a mut State,
        first: NewRecords,
    ) -> Self {
        Batches {
            out,
            chain,
            how,
            state,
            ends: first.ends.into(),
            gap: first.gap,
            said_gap: false,
            batch: Vec::new(),
            bytes: 0,
            failed: None,
            wrote: false,
        }
    }

    /// The reading is over (`reached`: it reached its end without stopping): whether every
    /// batch was written, or the error that stopped it. Also whether any was written.
    pub(super) fn finish(self, reached: bool) -> Result<(bool, bool), PassError> {
        match self.failed {
            Some(e) => Err(e),
            None => Ok((reached && self.ends.is_empty(), self.wrote)),
        }
    }

    /// Writes the batch read (after the gap line, before the first), then saves the state:
    /// a run killed later goes on from here instead of the whole backlog again.
    fn write(&mut self) -> Result<(), PassError> {
        if let (Some((first, last)), false) = (self.gap, self.said_gap) {
            say_gap(self.out, self.chain, first, last)?;
        }
        self.said_gap = true;
        let batch = std::mem::take(&mut self.batch);
        pass_on(
            self.out,
            self.chain,
            batch,
            self.how.security_only,
            self.state,
        )?;
        self.wrote = true;
        if let Some(path) = self.how.state_file {
            save_state(path, self.state).map_err(|e| PassError::Stop(Stop::Error(e)))?;
        }
        Ok(())
    }
}

impl<W: Write> Take for Batches<'_, W> {
    fn take(&mut self, line: Vec<u8>, at: Position, gap: Gap) -> bool {
        // The gap is said before the first batch: it must be the one the first reading found.
        if !self.said_gap && self.batch.is_empty() && gap != self.gap {
            return false;
        }
        let Some(end) = self.ends.front() else {
            return false;
        };
        // Held to the first reading's batch: the memory, and the records, are those it had.
        self.bytes += batch_bytes(&line);
        if self.bytes > end.bytes || at.seq > end.at.seq {
            return false;
        }
        let at_end = at.seq == end.at.seq;
        if at_end && at.hash != end.at.hash {
            return false;
        }
        self.batch.push((line, at));
        if at_end {
            self.ends.pop_front();
            self.bytes = 0;
            if let Err(e) = self.write() {
                self.failed = Some(e);
                return false;
            }
        }
        true
    }
}
