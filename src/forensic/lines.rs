//! Chain files read a line at a time, in bounded memory.
//!
//! A chain file may be as large as the rotation size (`KVH_LOG_MAX_BYTES`, up to 1 GiB), and
//! a file planted in a log directory larger still. Verification, crash recovery and
//! `prune-log` read such files through [`Lines`], which holds one line at a time: a reader
//! needs memory for the longest record, not for the file. A line longer than any record
//! ([`MAX_LINE_BYTES`]) is measured and skipped, never held.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;

use sha2::{Digest, Sha256};

use super::{files, MAX_FIELD_BYTES};

/// Longest line a reader holds. A record is a few hundred bytes, a `kv_scrub` record naming
/// its 1024 block ids (`KV_LOGGED_IDS`) about 13 KiB, and the writer keeps every field within
/// [`MAX_FIELD_BYTES`]; but an earlier version wrote the JSON an engine handed it (an
/// anomaly's detail, a summary's counters) whole, whatever its size, and those records must
/// still verify. A line longer than this is not a record, whatever else it is.
pub const MAX_LINE_BYTES: usize = 64 << 20;

// A record of today's writer, its largest field and its other fields, fits with room to spare.
const _: () = assert!(MAX_LINE_BYTES >= 4 * MAX_FIELD_BYTES);

/// How much of the file is read at once: large enough that the system calls do not show
/// next to the hashing of the records.
const READ_CHUNK: usize = 64 * 1024;

/// One line of a chain file, as [`Lines::next_line`] returns it.
#[derive(Debug, PartialEq, Eq)]
pub enum Line<'a> {
    /// A complete line, without its newline.
    Whole(&'a [u8]),
    /// The bytes after the file's last newline: a record its writer was cut off in, or
    /// bytes appended by someone else.
    Torn(&'a [u8]),
    /// A line longer than the reader holds ([`MAX_LINE_BYTES`], or less: [`Lines::with_max_line`]), complete (`ended`) or the file's torn end:
    /// its length, without the newline. Its bytes were not kept.
    Overlong { len: u64, ended: bool },
}

impl Line<'_> {
    /// The bytes of the file the line spans, its newline included.
    pub fn bytes(&self) -> u64 {
        match self {
            Line::Whole(l) => l.len() as u64 + 1,
            Line::Torn(l) => l.len() as u64,
            Line::Overlong { len, ended } => len + u64::from(*ended),
        }
    }
}

/// The lines of a chain file, read in order through a buffer: memory for one line
/// ([`MAX_LINE_BYTES`] at most) and one buffer, whatever the file's size.
pub struct Lines<R> {
    reader: BufReader<io::Take<R>>,
    /// The line being returned.
    line: Vec<u8>,
    /// SHA-256 of every byte read, when asked for ([`Lines::hashing`]).
    digest: Option<Sha256>,
    /// Bytes read so far.
    read: u64,
    /// Most bytes the file may hold: one that grows beyond it while read is refused.
    cap: u64,
    /// Longest line held ([`MAX_LINE_BYTES`] unless [`Lines::with_max_line`] set it).
    max_line: usize,
    /// Bytes of the buffer the line returned last occupies when it was returned in place:
    /// consumed at the next call.
    unconsumed: usize,
}

impl Lines<File> {
    /// Opens the chain file at `path` as [`files::open_regular`] does (no symlink followed, no
    /// FIFO waited for, a regular file of at most [`files::MAX_READ_BYTES`]).
    pub fn open(path: &Path) -> io::Result<Self> {
        let (file, _) = files::open_regular(path, files::MAX_READ_BYTES)?;
        Ok(Lines::new(file, files::MAX_READ_BYTES))
    }
}

impl<R: Read> Lines<R> {
    /// Reads the lines of `reader`, which must hold at most `cap` bytes: the read fails once
    /// more come (a file that grew since its size was checked).
    pub fn new(reader: R, cap: u64) -> Self {
        Lines {
            reader: BufReader::with_capacity(READ_CHUNK, reader.take(cap.saturating_add(1))),
            line: Vec::new(),
            digest: None,
            read: 0,
            cap,
            max_line: MAX_LINE_BYTES,
            unconsumed: 0,
        }
    }

    /// Holds lines of at most `max_line` bytes (fewer than [`MAX_LINE_BYTES`]: a reader that
    /// needs less memory, or less than a record of an earlier version); longer ones are
    /// [`Line::Overlong`].
    pub fn with_max_line(mut self, max_line: usize) -> Self {
        self.max_line = max_line.min(MAX_LINE_BYTES);
        self
    }

    /// Also computes the SHA-256 of every byte read ([`Lines::sha256`]).
    pub fn hashing(mut self) -> Self {
        self.digest = Some(Sha256::new());
        self
    }

    /// The reader the lines are read from.
    pub fn get_ref(&self) -> &R {
        self.reader.get_ref().get_ref()
    }

    /// Bytes read so far: the file's length once [`Lines::next_line`] returned `None`.
    pub fn bytes_read(&self) -> u64 {
        self.read
    }

    /// The SHA-256 of the bytes read so far, when [`Lines::hashing`] asked for it: the
    /// file's, once [`Lines::next_line`] returned `None`.
    pub fn sha256(&self) -> Option<[u8; 32]> {
        self.digest.clone().map(|d| d.finalize().into())
    }

    /// The next line, or `None` at the end of the file.
    pub fn next_line(&mut self) -> io::Result<Option<Line<'_>>> {
        self.reader.consume(std::mem::take(&mut self.unconsumed));
        if let Some(end) = self.whole_line_buffered()? {
            return Ok(Some(Line::Whole(&self.reader.buffer()[..end])));
        }
        self.next_line_copied()
    }

    /// When the next line lies whole in the buffer, as most do (a buffer holds many records),
    /// counts it read and returns its length without its newline: it is returned in place,
    /// not copied, and consumed at the next call. `None` for a line the buffer does not hold
    /// whole, and at the end of the file.
    fn whole_line_buffered(&mut self) -> io::Result<Option<usize>> {
        let chunk = match self.reader.fill_buf() {
            Ok(chunk) => chunk,
            // Left to the copying path, which tries again.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(end) = chunk.iter().position(|&b| b == b'\n') else {
            return Ok(None);
        };
        if end > self.max_line {
            return Ok(None); // measured, not held, by the copying path
        }
        count(&mut self.read, self.cap, &mut self.digest, &chunk[..=end])?;
        self.unconsumed = end + 1;
        Ok(Some(end))
    }

    /// The next line, gathered from as many buffers as it spans into `line` (or, past
    /// `max_line`, only measured).
    fn next_line_copied(&mut self) -> io::Result<Option<Line<'_>>> {
        self.line.clear();
        // Length of the line so far; once past `max_line`, its bytes are dropped.
        let mut len = 0u64;
        let mut overlong = false;
        loop {
            let chunk = match self.reader.fill_buf() {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if chunk.is_empty() {
                return Ok(match (len, overlong) {
                    (0, _) => None,
                    (len, true) => Some(Line::Overlong { len, ended: false }),
                    (_, false) => Some(Line::Torn(&self.line)),
                });
            }
            let newline = chunk.iter().position(|&b| b == b'\n');
            let taken = newline.map_or(chunk.len(), |i| i + 1);
            let body = &chunk[..newline.unwrap_or(taken)];
            count(&mut self.read, self.cap, &mut self.digest, &chunk[..taken])?;
            len += body.len() as u64;
            if len > self.max_line as u64 {
                overlong = true;
                self.line = Vec::new();
            } else {
                self.line.extend_from_slice(body);
            }
            self.reader.consume(taken);
            if newline.is_some() {
                return Ok(Some(if overlong {
                    Line::Overlong { len, ended: true }
                } else {
                    Line::Whole(&self.line)
                }));
            }
        }
    }
}

/// Counts `bytes` read (`read`, at most `cap`) and hashes them when `digest` is kept. The
/// fields are passed apart so that a caller may still hold the buffer `bytes` lies in.
fn count(read: &mut u64, cap: u64, digest: &mut Option<Sha256>, bytes: &[u8]) -> io::Result<()> {
    *read += bytes.len() as u64;
    if *read > cap {
        return Err(io::Error::other(format!(
            "grew beyond the {cap}-byte limit while read"
        )));
    }
    if let Some(d) = digest {
        d.update(bytes);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every line of `bytes` as an owned value, with the reader's byte count and hash.
    fn all(bytes: &[u8], cap: u64) -> io::Result<(Vec<String>, u64, Option<[u8; 32]>)> {
        let mut lines = Lines::new(bytes, cap).hashing();
        let mut out = Vec::new();
        while let Some(line) = lines.next_line()? {
            out.push(match line {
                Line::Whole(l) => format!("whole {}", String::from_utf8_lossy(l)),
                Line::Torn(l) => format!("torn {}", String::from_utf8_lossy(l)),
                Line::Overlong { len, ended } => format!("overlong {len} {ended}"),
            });
        }
        Ok((out, lines.bytes_read(), lines.sha256()))
    }

    #[test]
    fn whole_lines_then_the_torn_end() {
        let (lines, read, sha) = all(b"a\n\nbc\nd", 100).unwrap();
        assert_eq!(lines, ["whole a", "whole ", "whole bc", "torn d"]);
        assert_eq!(read, 7);
        assert_eq!(sha, Some(Sha256::digest(b"a\n\nbc\nd").into()));
        let (lines, read, _) = all(b"a\n", 100).unwrap();
        assert_eq!((lines, read), (vec!["whole a".to_string()], 2));
        assert!(all(b"", 100).unwrap().0.is_empty());
    }

    #[test]
    fn a_line_across_many_buffers_is_returned_whole() {
        let long = vec![b'x'; 3 * READ_CHUNK + 17];
        let mut file = long.clone();
        file.extend_from_slice(b"\nshort\n");
        let mut lines = Lines::new(&file[..], u64::MAX);
        assert_eq!(lines.next_line().unwrap(), Some(Line::Whole(&long[..])));
        assert_eq!(lines.next_line().unwrap(), Some(Line::Whole(&b"short"[..])));
        assert_eq!(lines.next_line().unwrap(), None);
    }

    /// A line limit larger than the buffer, as MAX_LINE_BYTES is, but small enough for a test.
    const LIMIT: usize = 3 * READ_CHUNK;

    #[test]
    fn a_line_longer_than_any_record_is_measured_not_held() {
        let mut file = vec![b'x'; 3 * LIMIT + 1];
        file.extend_from_slice(b"\nok\n");
        file.extend(std::iter::repeat_n(b'y', LIMIT + 5));
        let mut lines = Lines::new(&file[..], u64::MAX)
            .with_max_line(LIMIT)
            .hashing();
        let first = lines.next_line().unwrap();
        let want = 3 * LIMIT as u64 + 1;
        assert_eq!(
            first,
            Some(Line::Overlong {
                len: want,
                ended: true
            })
        );
        // Held whole, the line would have needed three times the limit.
        assert!(lines.line.capacity() <= LIMIT + READ_CHUNK);
        assert_eq!(lines.next_line().unwrap(), Some(Line::Whole(&b"ok"[..])));
        assert_eq!(
            lines.next_line().unwrap(),
            Some(Line::Overlong {
                len: LIMIT as u64 + 5,
                ended: false
            })
        );
        assert_eq!(lines.next_line().unwrap(), None);
        assert_eq!(lines.bytes_read(), file.len() as u64);
        assert_eq!(lines.sha256(), Some(Sha256::digest(&file).into()));
    }

    #[test]
    fn a_line_of_exactly_the_limit_is_held_and_one_more_byte_is_not() {
        // Limits above the buffer's size (lines gathered across buffers) and below it (lines
        // returned in place from the buffer).
        for limit in [LIMIT, 100] {
            let mut file = vec![b'x'; limit];
            file.push(b'\n');
            file.extend(std::iter::repeat_n(b'z', limit + 1));
            file.push(b'\n');
            let mut lines = Lines::new(&file[..], u64::MAX).with_max_line(limit);
            assert_eq!(
                lines.next_line().unwrap(),
                Some(Line::Whole(&file[..limit])),
                "limit {limit}"
            );
            assert_eq!(
                lines.next_line().unwrap(),
                Some(Line::Overlong {
                    len: limit as u64 + 1,
                    ended: true
                }),
                "limit {limit}"
            );
            assert_eq!(lines.next_line().unwrap(), None);
        }
    }

    #[test]
    fn with_max_line_never_raises_the_limit() {
        let lines = Lines::new(&b""[..], 0).with_max_line(usize::MAX);
        assert_eq!(lines.max_line, MAX_LINE_BYTES);
    }

    #[test]
    fn a_file_that_grew_beyond_its_cap_is_refused() {
        let err = all(b"a\nb\nc\n", 4).unwrap_err();
        assert!(
            err.to_string().contains("grew beyond the 4-byte limit"),
            "{err}"
        );
        assert_eq!(all(b"a\nb\n", 4).unwrap().1, 4);
    }

    #[test]
    fn open_refuses_what_is_not_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, b"x\n").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(Lines::open(&link).is_err());
        assert!(Lines::open(dir.path()).is_err());
        let mut lines = Lines::open(&target).unwrap();
        assert_eq!(lines.next_line().unwrap(), Some(Line::Whole(&b"x"[..])));
    }
}
