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

use super::{files, MAX_CALLER_JSON_BYTES};

/// Longest line a reader holds. A record is a few hundred bytes, a `kv_scrub` record naming
/// its 1024 block ids (`KV_LOGGED_IDS`) about 13 KiB; only the JSON an engine hands the log
/// (an anomaly's detail, a summary's counters) makes one longer, bounded by
/// [`MAX_CALLER_JSON_BYTES`]. A line longer than this is not a record, whatever else it is.
pub const MAX_LINE_BYTES: usize = 4 << 20;

// The largest caller JSON, with its record's other fields, fits with room to spare.
const _: () = assert!(MAX_LINE_BYTES >= 2 * MAX_CALLER_JSON_BYTES);

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
    /// A line longer than [`MAX_LINE_BYTES`], complete (`ended`) or the file's torn end:
    /// its length, without the newline. Its bytes were not kept.
    Overlong { len: u64, ended: bool },
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
        }
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
        self.line.clear();
        // Length of the line so far; once past MAX_LINE_BYTES, its bytes are dropped.
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
            self.read += taken as u64;
            if self.read > self.cap {
                return Err(io::Error::other(format!(
                    "grew beyond the {}-byte limit while read",
                    self.cap
                )));
            }
            if let Some(d) = &mut self.digest {
                d.update(&chunk[..taken]);
            }
            len += body.len() as u64;
            if len > MAX_LINE_BYTES as u64 {
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

    #[test]
    fn a_line_longer_than_any_record_is_measured_not_held() {
        let mut file = vec![b'x'; 3 * MAX_LINE_BYTES + 1];
        file.extend_from_slice(b"\nok\n");
        file.extend(std::iter::repeat_n(b'y', MAX_LINE_BYTES + 5));
        let mut lines = Lines::new(&file[..], u64::MAX).hashing();
        let first = lines.next_line().unwrap();
        let want = 3 * MAX_LINE_BYTES as u64 + 1;
        assert_eq!(
            first,
            Some(Line::Overlong {
                len: want,
                ended: true
            })
        );
        // Held whole, the line would have needed three times the limit.
        assert!(lines.line.capacity() <= MAX_LINE_BYTES + READ_CHUNK);
        assert_eq!(lines.next_line().unwrap(), Some(Line::Whole(&b"ok"[..])));
        assert_eq!(
            lines.next_line().unwrap(),
            Some(Line::Overlong {
                len: MAX_LINE_BYTES as u64 + 5,
                ended: false
            })
        );
        assert_eq!(lines.next_line().unwrap(), None);
        assert_eq!(lines.bytes_read(), file.len() as u64);
        assert_eq!(lines.sha256(), Some(Sha256::digest(&file).into()));
    }

    #[test]
    fn a_line_of_exactly_the_limit_is_held() {
        let mut file = vec![b'x'; MAX_LINE_BYTES];
        file.push(b'\n');
        let mut lines = Lines::new(&file[..], u64::MAX);
        assert_eq!(
            lines.next_line().unwrap(),
            Some(Line::Whole(&file[..MAX_LINE_BYTES]))
        );
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
