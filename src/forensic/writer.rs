//! The chain writer: owns the active file, the chain head and the epoch key, and runs on
//! its own thread so that producers never wait on disk.
//!
//! Records are sealed into a buffer and written in batches. The chain head only advances
//! when a batch reaches the file: if a write fails, the file is cut back to its last good
//! length, the batch is counted as lost, and the next successful batch starts with a `lost`
//! record that says what was lost. Rotation happens only between batches.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Map, Value};
use sha2::Digest;

use super::checkpoint::{self, Checkpoint};
use super::keys::{self, EpochKey, HeldSigningKey};
use super::record::{self, hex, Field, Fields, Header, GENESIS_PREV};
use super::{files, lock, recovery, unix_nanos, ForensicError, Msg, Shared, StartInfo};
use crate::config::{FsyncPolicy, LogConfig};
use crate::fork_closed::ForkClosed;

/// Largest number of queued messages handled before the buffer is written.
const BATCH: usize = 4096;

/// How long the writer waits for a message before it does what is due anyway.
const TICK: Duration = Duration::from_millis(50);

/// How often the writer checks that the log directory still holds its active file.
const FILE_CHECK_EVERY: Duration = Duration::from_secs(1);
/// How often the writer measures the room left on the log's file system (one `fstatvfs`).
const ROOM_MEASURE_EVERY: Duration = Duration::from_secs(1);

/// What was lost since the last successful write.
#[derive(Default)]
struct Lost {
    records: u64,
    bytes: u64,
    kinds: BTreeMap<String, u64>,
    since_ts: u64,
    error: String,
}

pub(crate) struct ChainWriter {
    dir: PathBuf,
    /// The directory `dir` named when the writer opened, held open: files are made in it.
    log_dir: files::LogDir,
    chain: String,
    index: u64,
    /// Locked (`flock`) for the writer's life; closed in a forked child (`fork_closed`), whose
    /// copy would keep the lock, and so the chain from crash recovery, after this process died.
    file: ForkClosed<File>,
    /// Bytes of the active file known to be written.
    file_len: u64,
    /// How far the active file's disk space is allocated ahead of its end (`make_room`):
    /// an offset, 0 when nothing is known allocated.
    reserved_to: u64,
    max_bytes: u64,
    key: Option<EpochKey>,
    /// The id of the chain's HMAC secret, written into every checkpoint.
    key_id: Option<String>,
    signing: Option<HeldSigningKey>,
    /// The checkpoint directory held open from its check on, when checkpoints are signed:
    /// they are written relative to it.
    ckpt: Option<files::LogDir>,
    fsync: FsyncPolicy,
    fsync_every: Duration,
    summary_every: Duration,
    ckpt_every_records: u64,
    ckpt_every: Duration,
    /// Head of the chain including buffered records.
    seq: u64,
    prev: [u8; 32],
    /// Head as of the last successful write.
    committed_seq: u64,
    committed_prev: [u8; 32],
    buf: Vec<u8>,
    buf_kinds: Vec<&'static str>,
    /// The record being sealed while the buffer is written to make room for it (its kind and
    /// length): in neither the queue nor the buffer, for a writer that unwinds to count.
    sealing: Option<(&'static str, u64)>,
    lost: Option<Lost>,
    /// Whether `lost` is already described by a record in `buf`.
    lost_in_buf: bool,
    /// The start-up error the `stop` record carries, when the process's start-up failed
    /// after the log opened.
    start_failed: Option<String>,
    /// Set while [`ChainWriter::finish`] writes the last records: a failed write then does
    /// not count the `stop` record as lost, since it is sealed again for the next try.
    finishing: bool,
    /// The length of the `stop` record the last failed write missed (counted in `bytes_lost`
    /// when no try writes it).
    unwritten_stop_bytes: u64,
    dirty_since_sync: bool,
    /// An fsync of this chain failed. After a failed fsync the kernel may have dropped the
    /// dirty pages and a later fsync can succeed without them, so no record written before
    /// it can be proven durable: no checkpoint is signed for this chain from then on.
    fsync_failed: bool,
    last_sync: Instant,
    last_summary: Option<Instant>,
    records_since_ckpt: u64,
    last_ckpt: Instant,
    /// While writes fail: when a buffer holding nothing new is next tried, and the wait
    /// after that try fails (see [`WriteRetry`]).
    write_retry: WriteRetry,
    /// After a failed rotation (a full disk): when the next is tried. Until then the chain
    /// stays in its file, and a record that would overflow it goes in all the same (or is
    /// refused, as the disk would refuse it), without the file system calls (and the error)
    /// of a try per record.
    rotate_retry: WriteRetry,
    /// When [`ChainWriter::check_file_in_place`] last looked.
    last_file_check: Instant,
    last_room_measure: Instant,
    /// The directory no longer names the active file, and no rotation away from it has
    /// succeeded yet: writes to it fail, and their records are counted lost.
    file_gone: bool,
    /// Whether the directory's names can be checked against the active file: not where the
    /// file just opened, still linked, already differs from its name (a file system whose
    /// inode numbers do not stay put), which would otherwise rotate the file at every check.
    check_files: bool,
    shared: Arc<Shared>,
}

/// Backs off the writes that hold nothing new while writes keep failing (a full disk): the
/// records a failed write leaves to be rebuilt, an idle log's `lost` record and a new
/// file's `rotate` link; and, apart, the rotations that keep failing. Each failed try
/// doubles the wait before the next, from [`WriteRetry::FIRST`] up to [`WriteRetry::MAX`],
/// so that `write_errors` grows with the events a full disk costs rather than with the
/// writer's ticks. A record emitted meanwhile is written at once, the rebuilt ones before
/// it; a successful write (for rotations, a successful rotation) starts the waits again
/// from the first.
#[derive(Debug, Clone, Copy)]
struct WriteRetry {
    not_before: Option<Instant>,
    wait: Duration,
}

impl WriteRetry {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(2);

    fn new() -> Self {
        WriteRetry {
            not_before: None,
            wait: Self::FIRST,
        }
    }

    fn may_try(&self, now: Instant) -> bool {
        self.not_before.is_none_or(|t| now >= t)
    }

    fn failed(&mut self, now: Instant) {
        self.not_before = Some(now + self.wait);
        self.wait = (self.wait * 2).min(Self::MAX);
    }
}

impl ChainWriter {
    /// Opens the directory, continues a crashed chain or starts a new one, and writes (and
    /// flushes) its first record so that configuration and disk problems surface at open.
    pub fn open(
        cfg: &LogConfig,
        start: &StartInfo,
        mut key: Option<EpochKey>,
        shared: Arc<Shared>,
    ) -> Result<Self, ForensicError> {
        let dir = cfg
            .dir
            .clone()
            .ok_or_else(|| ForensicError::Io("KVH_LOG_DIR is not set".into()))?;
        // Everything that can refuse the start-up without making anything is asked first (the
        // keys, a checkpoint directory that cannot be one): a refused start leaves no empty
        // log directory behind.
        let signing = cfg
            .signing_key_file
            .as_deref()
            .map(|p| keys::read_signing_key(p).and_then(HeldSigningKey::hold))
            .transpose()
            .map_err(|e| keys::in_setting("KVH_SIGNING_KEY_FILE", e))?;
        // The key is at epoch 0 until recovery ratchets it, below.
        if let (Some(key), Some(signing)) = (&key, &signing) {
            key.refuse_as_signing_key(&signing.verifying_key())?;
        }
        const CKPT_DIR: &str = "checkpoint directory (KVH_CHECKPOINT_DIR)";
        if let (Some(_), Some(c)) = (&signing, &cfg.checkpoint_dir) {
            files::inspect_dir(c, CKPT_DIR)?;
        }
        files::prepare_dir(&dir, "log directory")?;
        // Held from here on: every file the writer makes is made in the directory checked now.
        let log_dir = files::LogDir::open(&dir)?;
        let ckpt_dir = cfg.checkpoint_dir.clone().unwrap_or_else(|| dir.clone());
        let ckpt = match signing {
            Some(_) => {
                let what = if cfg.checkpoint_dir.is_some() {
                    let what = CKPT_DIR;
                    files::prepare_dir(&ckpt_dir, what)?;
                    what
                } else {
                    "log directory (where the signed checkpoints go)"
                };
                // Before any chain file is made: a start-up that failed at its first
                // checkpoint would leave a chain without one.
                files::check_renames(&ckpt_dir, what, "each signed checkpoint")?;
                Some(files::LogDir::open(&ckpt_dir)?)
            }
            None => None,
        };
        // Taken at epoch 0, before recovery ratchets the key to a crashed chain's epoch.
        let key_id = key.as_ref().map(EpochKey::key_id);
        let verifying = signing.as_ref().map(HeldSigningKey::verifying_key);
        let adopted = recovery::adopt(&dir, &ckpt_dir, key.as_mut(), verifying.as_ref())?;
        let now = SystemTime::now();
        let (chain, index, file, file_len, next_seq, prev) = match &adopted {
            Some(a) => (
                a.chain.clone(),
                a.index,
                ForkClosed::open(|| a.file.try_clone())
                    .map_err(|e| files::io_err(&a.path, "dup", e))?,
                a.len,
                a.last_seq + 1,
                a.last_hash,
            ),
            None => {
                let chain = format!("p{}-t{}", start.pid, unix_nanos(now));
                let file = log_dir.create_file(&files::file_name(&chain, 0))?;
                log_dir
                    .sync()
                    .map_err(|e| files::io_err(&dir, "fsync", e))?;
                (chain, 0, file, 0, 0, GENESIS_PREV)
            }
        };
        let mut w = ChainWriter {
            dir,
            log_dir,
            chain,
            index,
            file,
            file_len,
            reserved_to: 0,
            // Within the file size limit from the first record: a chain taken over whose file
            // ends within `FINAL_ROOM` of the limit (as files this writer rotates do) goes on
            // in a new file, rather than fail every start-up on a file it may not grow.
            max_bytes: within_file_size_limit(cfg.max_bytes.max(4096)),
            key,
            key_id,
            signing,
            ckpt,
            fsync: cfg.fsync,
            fsync_every: Duration::from_millis(cfg.fsync_interval_ms),
            summary_every: Duration::from_millis(cfg.summary_interval_ms),
            ckpt_every_records: cfg.checkpoint_every_records,
            ckpt_every: Duration::from_millis(cfg.checkpoint_interval_ms),
            seq: next_seq,
            prev,
            committed_seq: next_seq,
            committed_prev: prev,
            buf: Vec::with_capacity(1 << 16),
            buf_kinds: Vec::new(),
            sealing: None,
            lost: None,
            lost_in_buf: false,
            start_failed: None,
            finishing: false,
            unwritten_stop_bytes: 0,
            dirty_since_sync: false,
            fsync_failed: false,
            last_sync: Instant::now(),
            last_summary: None,
            records_since_ckpt: 0,
            last_ckpt: Instant::now(),
            write_retry: WriteRetry::new(),
            rotate_retry: WriteRetry::new(),
            last_file_check: Instant::now(),
            last_room_measure: Instant::now(),
            file_gone: false,
            check_files: true,
            shared,
        };
        // Whether inode numbers stay put is told right after the file was opened by its name:
        // by recovery for a file it took over (which it then reads for a while), here for a
        // file just created.
        w.check_files = match &adopted {
            Some(a) => !a.inodes_unreliable,
            None => !w.name_names_another_file(&files::file_name(&w.chain, w.index)),
        };
        *lock(&w.shared.chain) = Some(w.chain.clone());
        *lock(&w.shared.current_file) = Some(files::file_name(&w.chain, w.index));
        let mut fields = start_fields(start);
        w.name_signer(&mut fields);
        // A continuation over a torn tail stays in the torn file, full or not (the next
        // record rotates): a rotation would have to cut the tail before its records could be
        // written, and a start-up that then failed would leave nothing that counts it.
        let torn_tail = adopted.as_ref().map_or(&[][..], |a| &a.torn_tail[..]);
        let rotation = if torn_tail.is_empty() {
            Rotation::Allowed
        } else {
            Rotation::Done
        };
        let ts = unix_nanos(now);
        let mut rotation = rotation;
        if let Some(prev_file) = adopted.as_ref().and_then(|a| a.link_from.clone()) {
            let mut f = Map::new();
            f.insert("prev_file".into(), prev_file.into());
            f.insert("prev_seq".into(), w.seq.saturating_sub(1).into());
            w.name_signer(&mut f);
            w.seal_into_buffer("rotate", record::fields_from_map(f), ts, rotation);
            // The `recovery` record follows its `rotate` in the same file, full or not: the
            // record it names as the crashed chain's last is then the one before that
            // `rotate`, which verification holds it to.
            rotation = Rotation::Done;
        }
        let kind = match &adopted {
            Some(a) => {
                fields.insert("torn_bytes".into(), a.torn_tail.len().into());
                // The bytes themselves are replaced: their digest lets a copy shipped off the
                // node before the crash (a log shipper's) be matched to what was there.
                let digest = sha2::Sha256::digest(&a.torn_tail);
                fields.insert("torn_sha256".into(), hex(&digest).into());
                fields.insert("last_good_seq".into(), a.last_seq.into());
                fields.insert("last_good_hash".into(), hex(&a.last_hash).into());
                "recovery"
            }
            None => "start",
        };
        w.seal_into_buffer(kind, record::fields_from_map(fields), ts, rotation);
        let written = if !torn_tail.is_empty() {
            w.write_over_torn_tail(torn_tail)
        } else if adopted.is_some() {
            // Room first: records that landed in part after the chain's clean end are cut
            // below, except from an append-only file, which refuses any cut.
            let room = files::reserve(&w.file, w.file_len, w.buf.len() as u64);
            room.and_then(|()| w.write_buffer())
        } else {
            w.write_buffer()
        };
        // Errors name the file: the log, checkpoint and key files may be on different volumes.
        let path = w.dir.join(files::file_name(&w.chain, w.index));
        if let Err(e) = written {
            if adopted.is_none() {
                w.remove_new_chain();
            } else if torn_tail.is_empty() {
                // Part of the records may have landed after the chain's clean end: cut, or
                // the next start-up would count them as torn bytes of the crash. (A torn
                // tail was put back where it was.)
                let _ = w.cut_torn_tail();
            }
            return Err(files::io_err(
                &path,
                &format!("cannot write the {kind} record"),
                e,
            ));
        }
        if kind == "start" {
            // A failed fsync stops checkpoints for good (`on_fsync_error`): a new chain would
            // then never get its first one, and with a pinned key it could never verify.
            // Start-up fails instead, as when the record cannot be written.
            if let Err(e) = w.sync_with_faults() {
                w.remove_new_chain();
                return Err(files::io_err(&path, "cannot sync the start record", e));
            }
            w.dirty_since_sync = false;
            w.last_sync = Instant::now();
        } else {
            w.sync();
        }
        // A chain is covered by a signed checkpoint from its first record on: a process that
        // dies before the first periodic one must not leave a chain whose end cannot be
        // checked (which verification, with a pinned key, rightly reports as a failure). For
        // a new chain, a checkpoint directory that takes none fails start-up, as a start
        // record that cannot be synced does: the chain could never verify against the pinned
        // key. A recovered chain has its earlier checkpoints, and goes on without new ones,
        // as after any failed fsync (the failure is counted and kept in `last_error`).
        let checkpointed = w.checkpoint_now();
        if let (Err(e), "start") = (checkpointed, kind) {
            w.remove_new_chain();
            return Err(ForensicError::Io(format!(
                "cannot write the first signed checkpoint: {e}"
            )));
        }
        w.measure_room();
        Ok(w)
    }

    /// The writer thread's loop; returns after a stop request or when every producer is gone.
    pub fn run(mut self, rx: Receiver<Box<Msg>>) {
        // Records taken from the queue, for `flush` to wait on.
        let mut handled = 0u64;
        loop {
            let stop = self.round(&rx, &mut handled);
            // The round's MACs (and a ratchet) left the key in dead frames below this one
            // (`key_memory`): cleared before the thread waits, where it spends its time.
            super::key_memory::clear_stack();
            if stop {
                // The `stop` record is sealed too; the thread's stack outlives it (glibc
                // keeps an exited thread's stack for the next thread).
                super::key_memory::with_stack_cleared(|| self.finish());
                return;
            }
        }
    }

    /// One round: waits up to a tick for a message, handles it and up to [`BATCH`] more,
    /// then does what is due. Returns whether the writer is to stop. Never inlined, so that
    /// its frames (and the MACs computed in them) lie below `run`'s, where
    /// `key_memory::clear_stack` reaches.
    #[inline(never)]
    fn round(&mut self, rx: &Receiver<Box<Msg>>, handled: &mut u64) -> bool {
        let mut stop = false;
        let next = rx.recv_timeout(TICK);
        // Before anything of the round is handled: what was queued or put in the summary
        // slot before a flush that saw the round's number lower is handled in it.
        let round = self.shared.begin_round();
        match next {
            Ok(m) => *handled += self.handle(*m),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => stop = true,
        }
        let mut n = 0;
        while !stop && n < BATCH {
            match rx.try_recv() {
                Ok(m) => {
                    *handled += self.handle(*m);
                    self.maybe_checkpoint();
                }
                Err(_) => break,
            }
            n += 1;
        }
        // Looked at after each batch: producers that keep the queue full cannot hold it off.
        if let Some(request) = self.shared.take_stop_request() {
            self.start_failed = request.start_failed.map(|e| bounded_text(&e));
            stop = true;
        }
        if stop {
            // Producers that raced with `stop` queued before it was seen: keep them, written
            // a batch at a time, as in a round (while writes back off, records that would
            // rotate a full file join the batch: one batch, not the whole queue, goes past
            // the file's size when the write succeeds).
            let mut drained = 0;
            while let Ok(m) = rx.try_recv() {
                *handled += self.handle(*m);
                drained += 1;
                if drained % BATCH == 0 {
                    let _ = self.flush();
                }
            }
            // Before the last summary and records are written: not into a file removed
            // within the last check's second (they are counted lost instead, or go into
            // the next file).
            self.check_file_now();
        }
        self.maybe_summary(stop);
        let _ = self.flush();
        self.shared.round_done(round, *handled);
        if !stop {
            self.maybe_sync();
            self.check_file_in_place();
            self.maybe_checkpoint();
            self.maybe_measure_room();
        }
        stop
    }

    /// Every [`ROOM_MEASURE_EVERY`]: the room left on the log directory's file system, for
    /// the stats (`kvh_log_free_bytes`), so that a volume filling up is seen before records
    /// are lost. A failed measure keeps the last one.
    fn maybe_measure_room(&mut self) {
        if self.last_room_measure.elapsed() < ROOM_MEASURE_EVERY {
            return;
        }
        self.measure_room();
    }

    fn measure_room(&mut self) {
        self.last_room_measure = Instant::now();
        if let Ok(room) = self.log_dir.free_space() {
            self.shared.free_bytes.set(room.bytes);
        }
    }

    /// Every [`FILE_CHECK_EVERY`]: when the directory no longer holds the active file
    /// (removed, or another file renamed over it), the records written to it are in a file no
    /// reader can open, and every later one would be. From then on writes to it fail (the
    /// records are counted lost, and a `lost` record describes them) until the chain goes on
    /// in its next file, whose `rotate` record names the missing one: verification reports the
    /// gap, as it does any deleted file. Counted as a write error and said once per file.
    fn check_file_in_place(&mut self) {
        if !self.check_files || self.last_file_check.elapsed() < FILE_CHECK_EVERY {
            return;
        }
        self.check_file_now();
    }

    /// [`ChainWriter::check_file_in_place`] without waiting for its interval: also at `stop`,
    /// so that a process stopping within a second of its file's removal does not write its
    /// last records, `stop` included, into the removed file unseen.
    fn check_file_now(&mut self) {
        if !self.check_files {
            return;
        }
        self.last_file_check = Instant::now();
        if !self.file_gone {
            let name = files::file_name(&self.chain, self.index);
            if !self.file_missing(&name) {
                return;
            }
            self.file_gone = true;
            let msg = format!(
                "{name}: removed from the log directory or replaced while in use; its records \
                 are no longer there, and records are lost until the chain goes on in a new file"
            );
            self.shared.write_errors.fetch_add(1, Ordering::Relaxed);
            *lock(&self.shared.last_error) = Some(msg.clone());
            crate::say(format_args!(
                "kvhygiene: forensic log {}: {msg}",
                self.dir.display()
            ));
        }
        self.leave_gone_file();
    }

    /// Rotates away from the active file found gone ([`ChainWriter::file_gone`]), once no
    /// record but rebuilt ones (a `lost` record, a fresh file's link) waits in the buffer:
    /// those were sealed for the gone file, and are dropped to be rebuilt after the rotation.
    /// A failed rotation (no directory left, the next name taken) is counted by `rotate`, and
    /// tried again at the next check; meanwhile writes keep failing.
    fn leave_gone_file(&mut self) {
        if !self.file_gone || self.holds_new_records() {
            return;
        }
        self.buf.clear();
        self.buf_kinds.clear();
        self.lost_in_buf = false;
        self.seq = self.committed_seq;
        self.prev = self.committed_prev;
        // `rotate` clears `file_gone` when it succeeds.
        let _ = self.rotate(unix_nanos(SystemTime::now()));
    }

    /// Whether the active file, still linked, is not the file its name opens: the sign, just
    /// after it was opened, of a file system whose inode numbers do not stay put. A file that
    /// was removed (no link left, or its name gone) is not: it is what the checks are for,
    /// and the first one moves the chain on (a removal while recovery took the file over).
    fn name_names_another_file(&self, name: &str) -> bool {
        use std::os::unix::fs::MetadataExt;
        match self.file.metadata() {
            Ok(own) if own.nlink() > 0 => {
                matches!(self.log_dir.identity(name), Ok(id) if id != (own.dev(), own.ino()))
            }
            _ => false,
        }
    }

    /// Whether the directory no longer names the active file: it has no link left, or its
    /// name is missing or names another file. An error other than a missing name (the
    /// directory unreadable for a moment) is not taken for one.
    fn file_missing(&self, name: &str) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Ok(own) = self.file.metadata() else {
            return false;
        };
        if own.nlink() == 0 {
            return true;
        }
        match self.log_dir.identity(name) {
            Ok(id) => id != (own.dev(), own.ino()),
            Err(e) => e.kind() == io::ErrorKind::NotFound,
        }
    }

    /// Seals a queued record into the buffer; returns how many records the message carried.
    fn handle(&mut self, m: Msg) -> u64 {
        match m {
            Msg::Event(queued) => {
                if let Some(e) = queued.take() {
                    let (kind, fields) = super::event_fields(&e);
                    self.append(kind, fields, unix_nanos(e.at));
                }
                1
            }
            Msg::Anomaly(queued) => {
                if let Some((detail, ctx, ts)) = queued.take() {
                    let mut f = Vec::with_capacity(4);
                    super::context_fields(&ctx, &mut f);
                    let detail = Field::from(record::sanitize(detail, 0));
                    f.push((Cow::Borrowed("detail"), detail));
                    self.append("anomaly", f, ts);
                }
                1
            }
            Msg::Wake => 0,
        }
    }

    /// Seals a record into the buffer, rotating first when it would overflow the file.
    fn append(&mut self, kind: &'static str, fields: Fields<'_>, ts: u64) {
        if self.lost.is_some() && !self.lost_in_buf {
            self.append_lost_record(ts, Rotation::Allowed);
        }
        self.append_raw(kind, fields, ts);
    }

    fn append_raw(&mut self, kind: &'static str, fields: Fields<'_>, ts: u64) {
        self.seal_into_buffer(kind, fields, ts, Rotation::Allowed);
    }

    /// Seals a record on the current head into the buffer. With `Rotation::Allowed`, a
    /// record that would overflow the file first has the buffer written and the file
    /// rotated, and is sealed again in the next epoch: once, so a record larger than a whole
    /// file is written in a file of its own instead of rotating for ever.
    fn seal_into_buffer(
        &mut self,
        kind: &'static str,
        fields: Fields<'_>,
        ts: u64,
        rotation: Rotation,
    ) {
        let h = Header {
            seq: self.seq,
            ts,
            kind,
            chain: &self.chain,
            epoch: self.index,
            prev: &self.prev,
        };
        let mut fields = fields;
        bound_fields(&mut fields);
        let sealed = record::seal_fields(&h, fields, self.key.as_ref());
        let projected = self.file_len + (self.buf.len() + sealed.line.len()) as u64;
        if rotation == Rotation::Allowed
            && projected > self.max_bytes
            && self.file_len + self.buf.len() as u64 > 0
            && !self.backing_off()
        {
            self.sealing = Some((kind, sealed.line.len() as u64));
            let written = self.flush();
            let rotated = written.is_ok() && self.rotate(ts).is_ok();
            self.sealing = None;
            if written.is_err() {
                return self.reseal_after_write_error(kind, &sealed.line, ts);
            }
            if rotated {
                // Re-sealed after rotating: the record then belongs to the next epoch. A
                // `stop` record's totals are taken again: they count the new file's `rotate`.
                let fields = if kind == "stop" {
                    self.stop_fields()
                } else {
                    rebuild_fields(&sealed.line)
                };
                return self.seal_into_buffer(
                    kind,
                    record::fields_from_map(fields),
                    ts,
                    Rotation::Done,
                );
            }
            // Not rotated: the head has not moved, so the record stays sealed as it is, in
            // this file.
        }
        self.buf.extend_from_slice(&sealed.line);
        self.buf_kinds.push(kind);
        self.seq += 1;
        self.prev = sealed.hash;
    }

    /// Whether writes keep failing and the next try is not due ([`WriteRetry`]). A record
    /// that would rotate the file meanwhile is sealed into the buffer, in this file, and
    /// written (or counted lost) with the round's batch (at most [`BATCH`] records past the
    /// file's size, when that write succeeds): a write and a rotation tried for each record
    /// (a file at its size limit on a full disk) would take the file system's time per
    /// record, producers would wait on a full queue at that pace, and a backlog at stop
    /// would outlast the stop's wait, leaving the chain without its `lost` and `stop`
    /// records.
    fn backing_off(&self) -> bool {
        self.lost.is_some() && !self.write_retry.may_try(Instant::now())
    }

    /// The write before a rotation failed: the head went back to the last record on disk and
    /// the buffered records were counted as lost, so `line`, sealed on the head that was
    /// discarded, would not link. It is sealed again on the head now, after the `lost` record
    /// that describes the loss, in this file: no rotation is tried until a write succeeds
    /// (each failed write would otherwise add a level of recursion).
    #[cold]
    fn reseal_after_write_error(&mut self, kind: &'static str, line: &[u8], ts: u64) {
        if self.lost.is_some() && !self.lost_in_buf {
            self.append_lost_record(ts, Rotation::Done);
        }
        // Records of totals are rebuilt, not repeated: a `lost` record from the losses so far
        // (this one included), a `stop` record from the counts now.
        match kind {
            "lost" => {}
            "stop" => {
                let fields = record::fields_from_map(self.stop_fields());
                self.seal_into_buffer(kind, fields, ts, Rotation::Done);
            }
            _ => {
                let fields = record::fields_from_map(rebuild_fields(line));
                self.seal_into_buffer(kind, fields, ts, Rotation::Done);
            }
        }
    }

    fn append_lost_record(&mut self, ts: u64, rotation: Rotation) {
        let Some(l) = &self.lost else { return };
        let mut f = Map::new();
        f.insert("records_lost".into(), l.records.into());
        f.insert("bytes_lost".into(), l.bytes.into());
        let kinds: Map<String, Value> = l
            .kinds
            .iter()
            .map(|(k, n)| (k.clone(), Value::from(*n)))
            .collect();
        f.insert("lost_kinds".into(), Value::Object(kinds));
        f.insert("since_ts".into(), l.since_ts.into());
        f.insert("error".into(), l.error.clone().into());
        self.lost_in_buf = true;
        self.seal_into_buffer("lost", record::fields_from_map(f), ts, rotation);
    }

    /// Writes the buffer. On failure the file is cut back, the head rolled back and the
    /// buffered records counted as lost.
    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        if self.lost.is_some() && !self.holds_new_records() && !self.write_retry.may_try(now) {
            self.drop_rebuilt_records();
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "writes fail: the next try waits",
            ));
        }
        match self.write_buffer() {
            Ok(()) => Ok(()),
            Err(e) => {
                self.write_retry.failed(now);
                self.on_write_error(&e);
                Err(e)
            }
        }
    }

    /// Whether the buffer holds a record that is not rebuilt after a failed write (anything
    /// but the `lost` record and a new file's `rotate` link).
    fn holds_new_records(&self) -> bool {
        let relink = self.at_fresh_file();
        self.buf_kinds
            .iter()
            .any(|&k| !(k == "lost" || (relink && k == "rotate")))
    }

    /// Whether the active file is a rotated one still empty: the next batch written to it
    /// starts with its `rotate` link, which a failed write does not lose but queues again.
    fn at_fresh_file(&self) -> bool {
        self.file_len == 0 && self.index > 0
    }

    /// Backing off ([`WriteRetry`]): the buffer, holding only records that are rebuilt, is
    /// dropped without a write, as a failed write would leave it (the chain back at the last
    /// written record, a new file's `rotate` link queued again).
    #[cold]
    fn drop_rebuilt_records(&mut self) {
        let relink = self.at_fresh_file();
        self.buf.clear();
        self.buf_kinds.clear();
        self.lost_in_buf = false;
        self.seq = self.committed_seq;
        self.prev = self.committed_prev;
        if relink {
            self.append_rotate(unix_nanos(SystemTime::now()));
        }
    }

    fn write_buffer(&mut self) -> io::Result<()> {
        // A failed write may have left part of a line: cut back to the last good byte.
        self.cut_torn_tail()?;
        self.make_room()?;
        self.write_with_faults()?;
        self.commit_written();
        Ok(())
    }

    /// Makes sure the disk has room for the buffer and, after it, for the records that
    /// describe a loss and close the chain (`lost`, `stop`: [`FINAL_ROOM`]), before anything
    /// is written: on a disk that fills, the records that would take that room are refused
    /// (and counted lost, as any failed write's), while the room stays for the records that
    /// say so, which use it. Otherwise a disk full until the process ends would leave the
    /// losses recorded nowhere in the log. The room is allocated ahead by
    /// [`ROOM_AHEAD`] (`fallocate`, keeping the file's size: [`files::reserve`]), so that a
    /// record costs no call; within the file size limit (`RLIMIT_FSIZE`), a write past which
    /// would kill the process (`SIGXFSZ`). A file system without `fallocate` is not asked.
    fn make_room(&mut self) -> io::Result<()> {
        let len = self.buf.len() as u64;
        let needed = self.file_len + len + self.room_to_keep();
        if needed <= self.reserved_to {
            return Ok(());
        }
        let ahead = needed + ROOM_AHEAD;
        if files::reserve(&self.file, self.file_len, ahead - self.file_len).is_ok() {
            self.reserved_to = ahead;
            return Ok(());
        }
        files::reserve(&self.file, self.file_len, needed - self.file_len)?;
        self.reserved_to = needed;
        Ok(())
    }

    /// The room the buffer's records leave free after them on the disk.
    fn room_to_keep(&self) -> u64 {
        if self.holds_records_before_the_last() {
            FINAL_ROOM
        } else if self.finishing {
            0
        } else {
            // An idle log's `lost` record (or a new file's link) before the end of the run
            // goes into the room down to what the last `lost` and `stop` records take: on
            // disk before a crash could take its count with it, and never in their place
            // however long the disk stays full.
            LAST_ROOM
        }
    }

    /// Whether the buffer holds a record other than those that describe a loss and close the
    /// chain (and a new file's `rotate` link, rebuilt after a failed write): such records
    /// leave [`FINAL_ROOM`] free after them, also while the writer finishes.
    fn holds_records_before_the_last(&self) -> bool {
        let relink = self.at_fresh_file();
        self.buf_kinds
            .iter()
            .any(|&k| !(k == "lost" || k == "stop" || (relink && k == "rotate")))
    }

    /// The books after the buffer's records landed in the file, whole.
    fn commit_written(&mut self) {
        self.file_len += self.buf.len() as u64;
        let n = self.buf_kinds.len() as u64;
        self.shared.records_written.fetch_add(n, Ordering::Relaxed);
        self.records_since_ckpt += new_records(&self.buf_kinds);
        self.committed_seq = self.seq;
        self.committed_prev = self.prev;
        self.buf.clear();
        self.buf_kinds.clear();
        if self.lost_in_buf {
            self.lost = None;
            self.lost_in_buf = false;
        }
        self.write_retry = WriteRetry::new();
        self.dirty_since_sync = true;
        if self.fsync == FsyncPolicy::Always {
            self.sync();
        }
    }

    /// Writes a continued chain's first records (its `rotate` and `recovery` records) over
    /// the torn tail the crash left, rather than cutting the tail and appending: writing
    /// within the file's length needs no room a full disk (or a file size limit) refuses, and
    /// a write that fails puts the torn bytes back where they were, so the next start-up
    /// still finds and counts them. Records longer than the tail extend the file past it.
    #[cold]
    fn write_over_torn_tail(&mut self, torn: &[u8]) -> io::Result<()> {
        files::set_append(&self.file, false)?;
        let written = self.overwrite_torn_tail(torn);
        let appending = files::set_append(&self.file, true);
        written?;
        appending?;
        self.commit_written();
        Ok(())
    }

    fn overwrite_torn_tail(&self, torn: &[u8]) -> io::Result<()> {
        let at = self.file_len;
        // Within the file size limit and with the disk's room for the part past the tail,
        // or not at all: the file is then as it was.
        files::reserve(&self.file, at, self.buf.len() as u64)?;
        let (landed, written) = write_counted_at(&self.file, &self.buf, at);
        let written = written.and_then(|()| {
            if self.buf.len() < torn.len() {
                self.file.set_len(at + self.buf.len() as u64)
            } else {
                Ok(())
            }
        });
        let Err(e) = written else {
            return Ok(());
        };
        if landed == 0 {
            return Err(e); // the file is as it was
        }
        // The part of the records that landed stands in the torn bytes' place, and a longer
        // write may have grown the file past them: both undone within the file's length.
        let restored = self
            .file
            .write_all_at(&torn[..landed.min(torn.len())], at)
            .and_then(|()| self.file.set_len(at + torn.len() as u64));
        match restored {
            Ok(()) => Err(e),
            Err(r) => Err(io::Error::new(
                e.kind(),
                format!(
                    "{e}; the {} torn bytes the crash left, written over in part, could not \
                     be put back ({r})",
                    torn.len()
                ),
            )),
        }
    }

    /// Cuts the bytes a failed write left after the last whole record, when it left any. A
    /// file without such bytes is not touched: an append-only file (`chattr +a`) refuses
    /// any truncation, even to its own length, and must still take the next write.
    fn cut_torn_tail(&mut self) -> io::Result<()> {
        let on_disk = self.file.metadata()?.len();
        if on_disk > self.file_len {
            // A cut frees the blocks allocated past the new end too.
            self.reserved_to = 0;
            self.file.set_len(self.file_len)?;
        }
        Ok(())
    }

    fn write_with_faults(&mut self) -> io::Result<()> {
        if self.file_gone {
            // Written, the records would be in a file no reader can open.
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "the file was removed from the log directory or replaced while in use",
            ));
        }
        let armed = self
            .shared
            .injected_faults
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if armed {
            let half = self.buf.len() / 2;
            self.file.write_all(&self.buf[..half])?;
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        if self.shared.injected_panic.swap(false, Ordering::SeqCst) {
            panic!("injected panic in the forensic log's writer");
        }
        self.file.write_all(&self.buf)
    }

    /// The buffered records, each with its line's length (newline included).
    fn buffered_records(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        let mut lines = self.buf.split(|&b| b == b'\n');
        self.buf_kinds
            .iter()
            .map(move |&kind| (kind, lines.next().map_or(0, |l| l.len() as u64 + 1)))
    }

    #[cold]
    fn on_write_error(&mut self, e: &io::Error) {
        self.keep_landed_records();
        // A batch written to a fresh file starts with its `rotate` record; it is re-queued
        // below rather than lost, so the file still starts with the link to its predecessor.
        let relink = self.at_fresh_file();
        let s = &self.shared;
        s.write_errors.fetch_add(1, Ordering::Relaxed);
        let msg = format!(
            "{}: write failed: {e}",
            files::file_name(&self.chain, self.index)
        );
        *lock(&s.last_error) = Some(msg.clone());
        // The records the write lost: not those rebuilt next time (the description of earlier
        // losses, the link, and, while the writer finishes, the `stop` record, sealed again
        // from the totals then).
        let mut missed: Vec<(&'static str, u64)> = Vec::new();
        let buffered: Vec<_> = self.buffered_records().collect();
        self.buf_kinds.clear();
        for (kind, len) in buffered {
            if self.finishing && kind == "stop" {
                self.unwritten_stop_bytes = len;
            } else if !(kind == "lost" || (relink && kind == "rotate")) {
                missed.push((kind, len));
            }
        }
        // A loss to describe: this write's, or one not yet recorded. A failed write that
        // missed only rebuilt records starts none (each try at stop would add a `lost`
        // record that says nothing was lost).
        if !missed.is_empty() || self.lost.is_some() {
            let lost = self.lost.get_or_insert_with(|| Lost {
                since_ts: unix_nanos(SystemTime::now()),
                ..Default::default()
            });
            lost.error = msg;
            for (kind, len) in missed {
                lost.records += 1;
                lost.bytes += len;
                *lost.kinds.entry(kind.to_string()).or_default() += 1;
                s.records_lost.fetch_add(1, Ordering::Relaxed);
                s.bytes_lost.fetch_add(len, Ordering::Relaxed);
            }
        }
        self.buf.clear();
        self.lost_in_buf = false;
        self.seq = self.committed_seq;
        self.prev = self.committed_prev;
        if relink {
            self.append_rotate(unix_nanos(SystemTime::now()));
        }
    }

    /// After a failed write: the whole records of the batch that reached the file before the
    /// failure (a write that ran out of space part way) are kept as written, and the chain
    /// goes on after them. A reader may already have verified and passed them on (`kvh
    /// tail-log`): cutting them and writing other records at their seqs would read as a
    /// rewritten chain. Only bytes that match the buffer are taken, and only whole lines;
    /// anything else after the last of them is cut at the next write, as before.
    fn keep_landed_records(&mut self) {
        let Ok(on_disk) = self.file.metadata().map(|m| m.len()) else {
            return;
        };
        let landed = on_disk
            .saturating_sub(self.file_len)
            .min(self.buf.len() as u64) as usize;
        let Some(end) = self.buf[..landed]
            .iter()
            .rposition(|&b| b == b'\n')
            .map(|i| i + 1)
        else {
            return;
        };
        // The log file is open for appending only: read it back through its name.
        let name = files::file_name(&self.chain, self.index);
        let mut back = vec![0u8; end];
        let read = self
            .log_dir
            .open_read(&name)
            .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut back, self.file_len));
        if read.is_err() || back[..] != self.buf[..end] {
            return;
        }
        let lines = self.buf[..end].iter().filter(|&&b| b == b'\n').count();
        let last = self.buf[..end - 1]
            .rsplit(|&b| b == b'\n')
            .next()
            .and_then(|l| super::scan::scan(l).ok())
            .and_then(|r| Some((r.seq?, record::parse_hash(r.hash)?)));
        let Some((seq, hash)) = last else {
            return;
        };
        self.file_len += end as u64;
        self.committed_seq = seq + 1;
        self.committed_prev = hash;
        self.shared
            .records_written
            .fetch_add(lines as u64, Ordering::Relaxed);
        self.records_since_ckpt += lines as u64;
        self.dirty_since_sync = true;
        for kind in self.buf_kinds.drain(..lines) {
            if kind == "lost" {
                // The description of the earlier losses is in the file.
                self.lost = None;
                self.lost_in_buf = false;
            }
        }
        self.buf.drain(..end);
    }

    /// The first record of a file after the first: links it to the previous file's head.
    fn append_rotate(&mut self, ts: u64) {
        let mut f = Map::new();
        f.insert(
            "prev_file".into(),
            files::file_name(&self.chain, self.index.saturating_sub(1)).into(),
        );
        f.insert("prev_seq".into(), self.seq.saturating_sub(1).into());
        self.name_signer(&mut f);
        self.append_raw("rotate", record::fields_from_map(f), ts);
    }

    /// Adds `signer`, the public key this writer signs checkpoints with, to the fields of a
    /// record that opens a run or a file (`start`, `recovery`, `rotate`) or notes a
    /// checkpoint: every file, and every run, names the key its checkpoints must carry, so a
    /// checkpoint signed by another key a verifier takes (a retired one) matches none.
    fn name_signer(&self, f: &mut Map<String, Value>) {
        if let Some(k) = &self.signing {
            f.insert("signer".into(), hex(k.verifying_key().as_bytes()).into());
        }
    }

    /// Starts the next file ([`ChainWriter::rotate_now`]), unless a rotation failed too
    /// recently to try again ([`ChainWriter::rotate_retry`]). It is tried all the same when
    /// the records cannot stay in this file, every record until then being lost: away from a
    /// file found gone, and for a record the file size limit keeps out of it once the disk
    /// has room for a new file again (as last measured: a full disk still waits).
    fn rotate(&mut self, ts: u64) -> Result<(), ForensicError> {
        let now = Instant::now();
        let cannot_stay =
            self.file_gone || (self.past_file_size_limit() && self.disk_has_room_for_a_file());
        if !cannot_stay && !self.rotate_retry.may_try(now) {
            return Err(ForensicError::Io(
                "the last rotation failed: the next try waits".into(),
            ));
        }
        let rotated = self.rotate_now(ts);
        match rotated {
            Ok(()) => self.rotate_retry = WriteRetry::new(),
            Err(_) => self.rotate_retry.failed(now),
        }
        rotated
    }

    /// Whether the buffer and the record being sealed, with the room kept after them, would
    /// take this file past the file size limit (`RLIMIT_FSIZE`): written here, they would be
    /// refused.
    fn past_file_size_limit(&self) -> bool {
        let pending = self.buf.len() as u64 + self.sealing.map_or(0, |(_, len)| len);
        files::file_size_limit().is_some_and(|limit| self.file_len + pending + FINAL_ROOM > limit)
    }

    /// Whether the room last measured on the log's file system ([`ChainWriter::measure_room`])
    /// holds what a new file is given.
    fn disk_has_room_for_a_file(&self) -> bool {
        self.shared
            .free_bytes
            .get()
            .is_some_and(|room| room >= ROTATE_ROOM + FINAL_ROOM)
    }

    /// Starts the next file: create (locked) before the old one is released, ratchet the
    /// key, fsync the directory, then link the new file to the old one.
    fn rotate_now(&mut self, ts: u64) -> Result<(), ForensicError> {
        // A failed write may have left part of a line, which a write cuts before it appends;
        // a file rotated with nothing buffered is never written again, so it is cut here, or
        // not rotated (a rotated file must end with its last record).
        if let Err(e) = self.cut_torn_tail() {
            let path = self.dir.join(files::file_name(&self.chain, self.index));
            let e = files::io_err(&path, "cannot cut a failed write", e);
            self.shared.write_errors.fetch_add(1, Ordering::Relaxed);
            *lock(&self.shared.last_error) = Some(e.to_string());
            return Err(e);
        }
        if self.fsync != FsyncPolicy::Never {
            self.sync();
        }
        let next = files::file_name(&self.chain, self.index + 1);
        let file = match self.log_dir.create_file(&next) {
            Ok(f) => f,
            Err(e) => {
                self.shared.write_errors.fetch_add(1, Ordering::Relaxed);
                *lock(&self.shared.last_error) = Some(e.to_string());
                return Err(e);
            }
        };
        // The new file must hold its `rotate` link and the records that close the chain
        // before the chain moves there (`make_room`): on a disk too full for that, it stays
        // in this file, whose room is kept, and the new file goes.
        let room = ROTATE_ROOM + FINAL_ROOM;
        if let Err(e) = files::reserve(&file, 0, room) {
            drop(file);
            let _ = self.log_dir.remove(&next);
            let e = files::io_err(&self.dir.join(&next), "no room for the next file", e);
            self.shared.write_errors.fetch_add(1, Ordering::Relaxed);
            *lock(&self.shared.last_error) = Some(e.to_string());
            return Err(e);
        }
        self.give_back_room();
        self.file = file; // the old file (and its lock) is released here
        self.index += 1;
        self.file_len = 0;
        self.reserved_to = room;
        // Whatever rotated (the check, or a record that did not fit), the chain has left a
        // file found gone.
        if std::mem::take(&mut self.file_gone) {
            crate::say(format_args!(
                "kvhygiene: forensic log {}: the chain goes on in {}",
                self.dir.display(),
                files::file_name(&self.chain, self.index)
            ));
        }
        if let Some(k) = self.key.as_mut() {
            k.ratchet();
        }
        // The new file's entry must be durable as its records are: a failed directory fsync
        // is an fsync failure (counted, and no checkpoint vouches for the chain after it).
        if let Err(e) = self.sync_dir_with_faults() {
            self.on_fsync_error(&e);
        }
        *lock(&self.shared.current_file) = Some(files::file_name(&self.chain, self.index));
        self.append_rotate(ts);
        Ok(())
    }

    fn maybe_summary(&mut self, force: bool) {
        let due = force
            || self
                .last_summary
                .is_none_or(|t| t.elapsed() >= self.summary_every);
        if !due {
            return;
        }
        let Some(counters) = ({
            let mut slot = lock(&self.shared.summary);
            // The last drain, at stop: a summary put after it could never be written.
            slot.closed |= force;
            slot.counters.take()
        }) else {
            return;
        };
        let mut f = Map::new();
        f.insert("counters".into(), record::sanitize(counters, 0));
        self.last_summary = Some(Instant::now());
        self.append(
            "summary",
            record::fields_from_map(f),
            unix_nanos(SystemTime::now()),
        );
    }

    /// fsyncs the active file; a failure is a (sticky) write error, see `fsync_failed`.
    fn sync(&mut self) {
        match self.sync_with_faults() {
            Ok(()) => {
                self.dirty_since_sync = false;
                self.last_sync = Instant::now();
            }
            Err(e) => self.on_fsync_error(&e),
        }
    }

    /// Removes file 0 of a chain whose start failed: it holds no record that counts (none, part
    /// of one, or one that is not durable), and left behind it would be a chain that no process
    /// continues and no verification accepts, which would also keep prune-log from freeing
    /// the disk. Its checkpoint goes too, when one was installed before the start failed (the
    /// directory's fsync after the rename): left, it would name a chain whose files are gone,
    /// which verification reports as files deleted. The chain is this process's own (its id
    /// names the process and the time it started), so no other writer's checkpoint is at
    /// that name.
    fn remove_new_chain(&self) {
        if let Some(ckpt) = &self.ckpt {
            if ckpt.remove(&checkpoint::file_name_of(&self.chain)).is_ok() {
                let _ = ckpt.sync();
            }
        }
        let _ = self.log_dir.remove(&files::file_name(&self.chain, 0));
        let _ = self.log_dir.sync();
    }

    fn sync_with_faults(&mut self) -> io::Result<()> {
        let armed = self
            .shared
            .injected_fsync_faults
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if armed {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.file.sync_data()
    }

    fn sync_dir_with_faults(&self) -> io::Result<()> {
        let armed = self
            .shared
            .injected_dir_fsync_faults
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if armed {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.log_dir.sync()
    }

    #[cold]
    fn on_fsync_error(&mut self, e: &io::Error) {
        self.fsync_failed = true;
        self.shared.write_errors.fetch_add(1, Ordering::Relaxed);
        *lock(&self.shared.last_error) = Some(format!(
            "{}: fsync failed: {e}; no further checkpoints are signed for this chain",
            files::file_name(&self.chain, self.index)
        ));
    }

    fn maybe_sync(&mut self) {
        if self.fsync == FsyncPolicy::Interval
            && self.dirty_since_sync
            && self.last_sync.elapsed() >= self.fsync_every
        {
            self.sync();
        }
    }

    fn maybe_checkpoint(&mut self) {
        if self.signing.is_none() {
            return;
        }
        if self.file_gone {
            // Writes to the gone file fail, as on a full disk: what was written is signed when
            // a checkpoint is due, but no `checkpoint` record is appended (it would be lost).
            if !self.fsync_failed && self.checkpoint_due(self.records_since_ckpt) {
                let _ = self.checkpoint();
            }
            return;
        }
        if self.lost.is_some() && !self.lost_in_buf && !self.holds_new_records() {
            // A loss not yet recorded, on an otherwise idle log (nothing buffered but, after a
            // rotation, the new file's `rotate` link): its `lost` record is written alone (a
            // failed write loses nothing more: it is rebuilt), and, once written, it is a new
            // record the next checkpoint covers. A checkpoint appended with it now would only
            // be lost too while writes fail.
            // (`flush` backs off such a write too; asking first spares sealing the record
            // only to drop it.)
            let written = self.write_retry.may_try(Instant::now()) && {
                self.append_lost_record(unix_nanos(SystemTime::now()), Rotation::Allowed);
                self.flush().is_ok()
            };
            if !written {
                // Writes still fail (or failed too recently to try again). The records
                // already written are signed when a checkpoint is due (the checkpoint
                // directory may be on another disk), but no `checkpoint` record is appended:
                // it would be lost as well.
                if !self.fsync_failed && self.checkpoint_due(self.records_since_ckpt) {
                    let _ = self.checkpoint();
                }
                return;
            }
        }
        // After a failed fsync no checkpoint is signed (see `checkpoint`): one due then would
        // stay due, and every record would be written and fsynced on its own. (The idle
        // `lost` record above is written all the same: it is the loss's only record.)
        if self.fsync_failed {
            return;
        }
        let pending = self.records_since_ckpt + new_records(&self.buf_kinds);
        if self.checkpoint_due(pending) {
            // A failure is counted and kept in `last_error` by `checkpoint`.
            let _ = self.checkpoint_now();
        }
    }

    /// Whether `pending` new records make a checkpoint due, by count or by time.
    fn checkpoint_due(&self, pending: u64) -> bool {
        if pending == 0 {
            return false;
        }
        let by_count = self.ckpt_every_records > 0 && pending >= self.ckpt_every_records;
        let by_time =
            self.ckpt_every > Duration::ZERO && self.last_ckpt.elapsed() >= self.ckpt_every;
        by_count || by_time
    }

    /// Signs a checkpoint of what is written so far and records it in the chain (when
    /// checkpoints are configured); `Err` says why none could be written.
    fn checkpoint_now(&mut self) -> Result<(), String> {
        if self.signing.is_none() {
            return Ok(());
        }
        self.flush()
            .map_err(|e| format!("the records it would cover could not be written: {e}"))?;
        let Some(c) = self.checkpoint() else {
            // `checkpoint` says why in `last_error`: the checkpoint file, or a failed fsync.
            return Err(lock(&self.shared.last_error)
                .clone()
                .unwrap_or_else(|| "the log could not be synced".into()));
        };
        let mut f = Map::new();
        f.insert("ckpt_seq".into(), c.seq.into());
        f.insert("ckpt_file".into(), c.file.into());
        self.name_signer(&mut f);
        self.append("checkpoint", record::fields_from_map(f), c.ts);
        let _ = self.flush();
        Ok(())
    }

    /// Signs the committed head. The file is fsynced first (unless the policy is `never`) so
    /// a checkpoint never covers records a power failure could take back.
    fn checkpoint(&mut self) -> Option<Checkpoint> {
        if self.signing.is_none() || self.committed_seq == 0 {
            return None;
        }
        if self.fsync != FsyncPolicy::Never {
            self.sync();
        }
        if self.fsync_failed {
            return None;
        }
        let c = Checkpoint {
            chain: self.chain.clone(),
            seq: self.committed_seq - 1,
            hash: self.committed_prev,
            // The file holding record `seq`: the previous one while the active file, just
            // rotated, holds nothing yet (its first write failed).
            file: files::file_name(&self.chain, self.index - u64::from(self.at_fresh_file())),
            ts: unix_nanos(SystemTime::now()),
            key_id: self.key_id.clone(),
            public_key: None,
        };
        self.records_since_ckpt = 0;
        self.last_ckpt = Instant::now();
        let (key, dir) = (self.signing.as_ref()?, self.ckpt.as_ref()?);
        match key.with_key(|k| checkpoint::write_in(dir, k, &c)) {
            Ok(()) => Some(c),
            Err(e) => {
                self.shared.write_errors.fetch_add(1, Ordering::Relaxed);
                *lock(&self.shared.last_error) = Some(e.to_string());
                None
            }
        }
    }

    /// The fields of the `stop` record: the chain's totals as they are now. The records sealed
    /// into the buffer are counted as written: they go to the file in the write that carries
    /// the `stop` record, before it, or are lost with it.
    fn stop_fields(&self) -> Map<String, Value> {
        let buffered = self.buf_kinds.len() as u64;
        let mut f = Map::new();
        f.insert(
            "records_written".into(),
            (self.shared.records_written.load(Ordering::Relaxed) + buffered).into(),
        );
        f.insert(
            "records_lost".into(),
            self.shared.records_lost.load(Ordering::Relaxed).into(),
        );
        if let Some(e) = &self.start_failed {
            f.insert("start_failed".into(), e.as_str().into());
        }
        f
    }

    /// `stop` record, flush, fsync, final checkpoint. A write that fails is tried again, with
    /// the usual backoff, for [`FINISH_RETRY`]: a chain left without its `stop` record reads
    /// as a crash, and the losses only the `lost` and `stop` records carry would be recorded
    /// nowhere.
    fn finish(&mut self) {
        self.check_file_now();
        self.finishing = true;
        // Its own backoffs, from the first step: earlier failures may have taken the shared
        // ones to their longest wait, which would leave no second try before the deadline.
        self.write_retry = WriteRetry::new();
        self.rotate_retry = WriteRetry::new();
        let deadline = Instant::now() + FINISH_RETRY;
        loop {
            let ts = unix_nanos(SystemTime::now());
            // The `lost` record of earlier failed writes goes before the `stop` record and
            // is one of the records it counts.
            if self.lost.is_some() && !self.lost_in_buf {
                self.append_lost_record(ts, Rotation::Allowed);
            }
            let f = self.stop_fields();
            self.append("stop", record::fields_from_map(f), ts);
            if self.flush().is_ok() {
                break;
            }
            self.leave_gone_file();
            let now = Instant::now();
            let next = self.write_retry.not_before.unwrap_or(now).max(now);
            if next >= deadline {
                // The `stop` record is lost after all (the failed writes did not count it),
                // and what the last write left after the last whole record is cut.
                self.shared.records_lost.fetch_add(1, Ordering::Relaxed);
                let bytes = self.unwritten_stop_bytes;
                self.shared.bytes_lost.fetch_add(bytes, Ordering::Relaxed);
                let _ = self.cut_torn_tail();
                break;
            }
            std::thread::sleep(next - now);
        }
        self.finishing = false;
        self.sync();
        let _ = self.checkpoint();
        self.give_back_room();
    }

    /// Frees the disk space allocated ahead past the end of a file the chain leaves (at a
    /// rotation, once the next file has its room; at stop): kept, it would stay taken, up to
    /// [`ROOM_AHEAD`] and [`FINAL_ROOM`] a file, for as long as the file is kept. A file cut
    /// to its own length keeps no block past it (ext4 and XFS free them). An
    /// append-only or immutable file refuses the cut (EPERM) and keeps the blocks. A file
    /// of another length than the writer's records (cut short from outside) is left as it
    /// is: the cut would take what is after `file_len`, or pad it with zeros up to there.
    fn give_back_room(&mut self) {
        let reserved = std::mem::take(&mut self.reserved_to) > self.file_len;
        if reserved && self.file.metadata().is_ok_and(|m| m.len() == self.file_len) {
            let _ = self.file.set_len(self.file_len);
        }
    }
}

/// Room kept free after the records written, for the `lost` and `stop` records that describe
/// a loss and close the chain (each well under 1 KiB: their fields are counts and names).
const FINAL_ROOM: u64 = 4096;

/// The part of [`FINAL_ROOM`] that an idle log's `lost` records leave free, before the end of
/// the run: the last `lost` record and the `stop` record at their largest (every record kind
/// lost, a `start_failed` text of [`START_FAILED_BYTES`], counts of 20 digits) take about
/// 2.7 KiB, MACs included (`the_last_lost_and_stop_records_fit_in_the_room_left_for_them`).
const LAST_ROOM: u64 = 3072;

/// Room a new file is given for its `rotate` link (a few hundred bytes) before the chain
/// moves there.
const ROTATE_ROOM: u64 = 1024;

/// How far ahead of the records written the disk space is allocated, so that a record costs
/// no `fallocate` call: a file keeps at most this much unused past its end.
const ROOM_AHEAD: u64 = 64 << 10;

/// The smallest file size limit (`RLIMIT_FSIZE`) under which the writer keeps every record:
/// a file of the smallest rotation size (4 KiB) with the 4 KiB kept after the records for
/// those that close the chain. Under a smaller one it loses records, and under one of 4 KiB
/// or less its start record fails (`kvh preflight` fails it).
pub const MIN_FILE_SIZE_LIMIT: u64 = 4096 + FINAL_ROOM;

/// `max_bytes`, lowered to leave [`FINAL_ROOM`] within the process's file size limit
/// (`RLIMIT_FSIZE`, `ulimit -f`) when that is lower: a write past the limit kills the process
/// (`SIGXFSZ`), and one refused before it would leave the file never rotated, every later
/// record lost. Not below 4096, the smallest file size taken; under a limit that low, writes
/// are refused ([`files::reserve`]) and counted lost.
fn within_file_size_limit(max_bytes: u64) -> u64 {
    match files::file_size_limit() {
        Some(limit) => max_bytes.min(limit.saturating_sub(FINAL_ROOM).max(4096)),
        None => max_bytes,
    }
}

/// How long the writer's last writes (`lost` and `stop` records) are tried again at `stop`
/// when they fail: a few backoff rounds, well inside the time `stop` waits for the writer.
const FINISH_RETRY: Duration = Duration::from_secs(2);

/// Keeps every field of a record within [`super::MAX_FIELD_BYTES`] as written: a longer text
/// (measured escaped, as the line holds it: a control byte takes six) becomes a text giving
/// its size and SHA-256, longer JSON (canonical form) an object giving them. The header
/// fields, added at sealing, are short.
fn bound_fields(fields: &mut Fields<'_>) {
    const LIMIT: usize = super::MAX_FIELD_BYTES;
    for (_, field) in fields.iter_mut() {
        match field {
            Field::S(text) if longer_than_written(text, LIMIT) => {
                let text = format!(
                    "omitted: a text of {} bytes, {} as written, longer than the {LIMIT}-byte \
                     limit of a field; sha256 of the text {}",
                    text.len(),
                    record::string_len(text),
                    hex(&sha2::Sha256::digest(text.as_bytes()))
                );
                *field = Field::S(Cow::Owned(text));
            }
            Field::Json(value) => {
                let mut canonical = Vec::new();
                // JSON that does not canonicalise is left to the sealing, which handles it.
                if record::write_canonical(value, &mut canonical).is_ok() && canonical.len() > LIMIT
                {
                    *field = Field::Json(serde_json::json!({
                        "omitted": format!("longer than the {LIMIT}-byte limit of a field"),
                        "bytes": canonical.len(),
                        "sha256": hex(&sha2::Sha256::digest(&canonical)),
                    }));
                }
            }
            _ => {}
        }
    }
}

/// Whether `text`, escaped as the line holds it ([`record::string_len`]), is longer than
/// `limit`. A text whose every byte could take six without passing it is not walked: every
/// record's texts pass here, and nearly all are ids of a few dozen bytes.
fn longer_than_written(text: &str, limit: usize) -> bool {
    text.len().saturating_mul(6).saturating_add(2) > limit && record::string_len(text) > limit
}

/// Bytes of a start-up error kept in a `stop` record, as the line holds it (escaped): far
/// more than any error message, few enough that the `stop` record and a `lost` record still
/// fit in the [`FINAL_ROOM`] kept for them.
const START_FAILED_BYTES: usize = 1024;

/// `text` cut, at a character's end, to at most [`START_FAILED_BYTES`] escaped bytes.
fn bounded_text(text: &str) -> String {
    let mut written = 0;
    let mut end = 0;
    for (at, c) in text.char_indices() {
        let next = at + c.len_utf8();
        // Quotes aside: a character's bytes take what they take escaped.
        written += record::string_len(&text[at..next]) - 2;
        if written > START_FAILED_BYTES {
            break;
        }
        end = next;
    }
    text[..end].to_string()
}

/// Whether sealing a record may rotate the file first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rotation {
    Allowed,
    /// Already rotated for this record, a write just failed, or the record is one of a
    /// continuation written over a torn tail: it goes in this file.
    Done,
}

/// Writes `buf` at `offset` (`pwrite`, as `write_all_at`), and tells how many of its bytes
/// landed before an error: what a caller undoing a failed write must undo.
fn write_counted_at(file: &File, buf: &[u8], offset: u64) -> (usize, io::Result<()>) {
    let mut landed = 0;
    while landed < buf.len() {
        match file.write_at(&buf[landed..], offset + landed as u64) {
            Ok(0) => return (landed, Err(io::ErrorKind::WriteZero.into())),
            Ok(n) => landed += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (landed, Err(e)),
        }
    }
    (landed, Ok(()))
}

/// The caller fields of a sealed line (to re-seal it in the next epoch).
fn rebuild_fields(line: &[u8]) -> Map<String, Value> {
    match serde_json::from_slice::<Value>(line) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

fn start_fields(s: &StartInfo) -> Map<String, Value> {
    let mut f = Map::new();
    f.insert("config_digest".into(), s.config_digest().into());
    f.insert("version".into(), s.version.clone().into());
    f.insert("pid".into(), s.pid.into());
    f.insert("host".into(), s.host.clone().into());
    f.insert(
        "sample_rule".into(),
        crate::backend::verify::SAMPLE_RULE.into(),
    );
    f
}

/// A writer thread that unwinds (a bug) drops the records sealed into its buffer and not yet
/// written, and the one it was making room for: they are counted lost, as a failed write
/// counts them (invariant 5), but for the description of earlier losses, whose records are
/// counted already, and a fresh file's link. What was still queued is counted by its
/// `Queued` as the queue is dropped.
impl Drop for ChainWriter {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let relink = self.at_fresh_file();
        let s = &self.shared;
        let sealing = self.sealing.into_iter();
        for (kind, len) in self.buffered_records().chain(sealing) {
            if !(kind == "lost" || (relink && kind == "rotate")) {
                s.records_lost.fetch_add(1, Ordering::Relaxed);
                s.bytes_lost.fetch_add(len, Ordering::Relaxed);
            }
        }
        // Its summary would never be written either; a later one is refused, and counted.
        let mut slot = lock(&s.summary);
        slot.closed = true;
        if slot.counters.take().is_some() {
            s.records_lost.fetch_add(1, Ordering::Relaxed);
        }
        drop(slot);
        s.write_errors.fetch_add(1, Ordering::Relaxed);
        *lock(&s.last_error) = Some(
            "the writer thread panicked: records it held unwritten are counted lost, and \
             no later record is written"
                .into(),
        );
    }
}

/// Records that make a checkpoint due: every kind but `checkpoint`, whose record notes the
/// checkpoint just signed. Counted, it would make an idle log sign one at every interval (at
/// every record with `checkpoint_every = 1`); the next checkpoint, after new records, covers
/// it, and a `rotate` or `lost` record written with it counts as any other.
fn new_records(kinds: &[&'static str]) -> u64 {
    kinds.iter().filter(|k| **k != "checkpoint").count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::forensic::{verify_all, VerifyOptions};
    use std::path::Path;

    const TS: u64 = 1_700_000_000_000_000_000;

    /// A rotation that failed a moment ago is not tried again at once, unless the record that
    /// asks for it cannot go in the file it is in (the file size limit keeps it out: written
    /// there it would be refused, lost, until the wait is over) and the disk has room again.
    #[test]
    fn a_record_the_file_size_limit_keeps_out_rotates_without_waiting() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let mut w = open(&dir);
        // Far above anything a test writes; only the soft limit changes, and it is put back.
        const LIMIT: u64 = 1 << 40;
        let mut old = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit and setrlimit read and write the rlimit values owned by this
        // frame; the soft limit set stays within the hard one, which is unchanged.
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut old), 0);
            if old.rlim_max != libc::RLIM_INFINITY && old.rlim_max < LIMIT {
                return;
            }
            let soft = libc::rlimit {
                rlim_cur: LIMIT,
                rlim_max: old.rlim_max,
            };
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &soft), 0);
        }
        w.file_len = LIMIT - FINAL_ROOM - 100;
        w.sealing = Some(("quarantine", 100));
        let within = w.past_file_size_limit();
        w.sealing = Some(("quarantine", 101));
        let past = w.past_file_size_limit();
        w.rotate_retry.failed(Instant::now());
        // A disk still full (as last measured): the rotation waits, as any other.
        w.shared.free_bytes.set(Some(ROTATE_ROOM + FINAL_ROOM - 1));
        let waited_while_full = w.rotate(TS).is_err();
        w.shared.free_bytes.set(Some(1 << 30));
        let waited = w.rotate(TS).is_err();
        // SAFETY: as above; the limits read before are put back.
        unsafe {
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &old), 0);
        }
        assert!(!within && past, "within: {within}, past: {past}");
        assert!(
            waited_while_full,
            "a rotation tried again at once on a full disk"
        );
        assert!(!waited, "the rotation waited");
        assert_eq!(w.index, 1);
        w.sealing = None;
        // In the new file, the same wait holds a rotation back.
        w.rotate_retry.failed(Instant::now());
        assert!(w.rotate(TS).is_err(), "a rotation tried again at once");
        w.buf.clear();
        w.buf_kinds.clear();
    }

    /// What each write leaves free after it: [`FINAL_ROOM`] after any record but the last
    /// ones; [`LAST_ROOM`] after an idle log's `lost` record, written before the end of the
    /// run; nothing after the last `lost` and `stop` records, which use the room.
    #[test]
    fn each_write_keeps_the_room_the_records_after_it_need() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let mut w = open(&dir);
        let lost = |w: &mut ChainWriter| {
            w.lost = Some(Lost {
                records: 1,
                ..Default::default()
            });
            w.append_lost_record(TS, Rotation::Done);
        };
        let stop = |w: &mut ChainWriter| {
            let f = w.stop_fields();
            w.seal_into_buffer("stop", record::fields_from_map(f), TS, Rotation::Done);
        };
        lost(&mut w);
        assert_eq!(w.room_to_keep(), LAST_ROOM, "an idle log's lost record");
        small(&mut w, 1);
        assert_eq!(
            w.room_to_keep(),
            FINAL_ROOM,
            "a lost record and the next record"
        );
        w.finishing = true;
        stop(&mut w);
        assert_eq!(
            w.room_to_keep(),
            FINAL_ROOM,
            "records before the stop record"
        );
        w.buf.clear();
        w.buf_kinds.clear();
        lost(&mut w);
        stop(&mut w);
        assert_eq!(w.room_to_keep(), 0, "the last lost and stop records");
        w.buf.clear();
        w.buf_kinds.clear();
        w.finishing = false;
    }

    /// The last `lost` and `stop` records at their largest fit in [`LAST_ROOM`], the room an
    /// idle log's earlier `lost` records leave them.
    #[test]
    fn the_last_lost_and_stop_records_fit_in_the_room_left_for_them() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        // Sealed, as a production log's records are: each carries its MAC.
        let key = EpochKey::from_secret(zeroize::Zeroizing::new(vec![7u8; 32])).unwrap();
        let start = StartInfo::current(Config::default().canonical_json());
        let cfg = test_cfg(&dir);
        let mut w =
            ChainWriter::open(&cfg, &start, Some(key), Arc::new(Shared::default())).unwrap();
        let kinds = [
            "verify_failed",
            "quarantine",
            "release",
            "invalid_free",
            "size_mismatch",
            "ttl_exceeded",
            "ipc_export",
            "policy_violation",
            "kv_scrub",
            "kv_verify_failed",
            "anomaly",
            "summary",
            "checkpoint",
            "process",
            "start",
            "recovery",
            "rotate",
        ];
        w.lost = Some(Lost {
            records: u64::MAX,
            bytes: u64::MAX,
            kinds: kinds.iter().map(|k| (k.to_string(), u64::MAX)).collect(),
            since_ts: u64::MAX,
            error: format!(
                "{}: write failed: the file was removed from the log directory or replaced \
                 while in use",
                files::file_name(&w.chain, u64::MAX)
            ),
        });
        w.start_failed = Some(bounded_text(&"\u{1}".repeat(4 * START_FAILED_BYTES)));
        w.shared
            .records_written
            .store(u64::MAX / 2, Ordering::Relaxed);
        w.shared.records_lost.store(u64::MAX, Ordering::Relaxed);
        w.seq = u64::MAX / 2;
        w.buf.clear();
        w.buf_kinds.clear();
        let ts = u64::MAX;
        w.append_lost_record(ts, Rotation::Done);
        let f = w.stop_fields();
        w.seal_into_buffer("stop", record::fields_from_map(f), ts, Rotation::Done);
        assert_eq!(w.buf_kinds, ["lost", "stop"]);
        assert!(
            w.buf.len() as u64 <= LAST_ROOM,
            "{} bytes: {}",
            w.buf.len(),
            String::from_utf8_lossy(&w.buf)
        );
        w.buf.clear();
        w.buf_kinds.clear();
    }

    /// A start-up error is kept to its bound as the `stop` record writes it, escapes counted,
    /// and cut only at a character's end.
    #[test]
    fn a_start_up_error_is_bounded_by_its_escaped_bytes() {
        let short = "cannot open /dev/nvidia0: \u{1} é";
        assert_eq!(bounded_text(short), short);
        for text in [
            "\u{1}".repeat(START_FAILED_BYTES),
            "é".repeat(START_FAILED_BYTES),
            "x".repeat(START_FAILED_BYTES + 1),
            format!("{}\u{1f}", "x".repeat(START_FAILED_BYTES - 3)),
        ] {
            let kept = bounded_text(&text);
            let written = record::string_len(&kept) - 2;
            assert!(written <= START_FAILED_BYTES, "{written} bytes");
            assert!(
                written > START_FAILED_BYTES - 6,
                "cut short: {written} bytes"
            );
            assert!(text.starts_with(&kept));
        }
    }

    /// The shortcut for short texts gives the answer the walk gives, at the edges of both.
    #[test]
    fn longer_than_written_is_the_escaped_length_compared() {
        let limit = 62;
        for text in [
            "x".repeat(10),
            "\u{1}".repeat(10),
            "x".repeat(60),
            "x".repeat(61),
            "\"".repeat(30),
            "\"".repeat(31),
            format!("{}\u{1f}", "x".repeat(55)),
            format!("{}\u{1f}", "x".repeat(54)),
        ] {
            assert_eq!(
                longer_than_written(&text, limit),
                record::string_len(&text) > limit,
                "{text:?}"
            );
        }
        assert!(!longer_than_written(&"x".repeat(60), limit));
        assert!(longer_than_written(&"\u{1}".repeat(11), limit));
    }

    fn test_cfg(dir: &Path) -> LogConfig {
        LogConfig {
            max_bytes: 1 << 20,
            ..crate::forensic::quiet_test_config(dir)
        }
    }

    /// A log directory in `tmp` and [`test_cfg`] for it, with a signing key made in `tmp`.
    fn signed_test_cfg(tmp: &Path) -> (PathBuf, LogConfig) {
        let dir = tmp.join("log");
        let (key, _) = crate::forensic::cli::keygen(&tmp.join("signer")).unwrap();
        let cfg = LogConfig {
            signing_key_file: Some(key),
            ..test_cfg(&dir)
        };
        (dir, cfg)
    }

    fn open_with(cfg: &LogConfig, shared: Arc<Shared>) -> ChainWriter {
        let start = StartInfo::current(Config::default().canonical_json());
        ChainWriter::open(cfg, &start, None, shared).unwrap()
    }

    fn open(dir: &Path) -> ChainWriter {
        open_with(&test_cfg(dir), Arc::new(Shared::default()))
    }

    /// One small record of a fixed length (for a seq below 10).
    fn small(w: &mut ChainWriter, n: u64) {
        let mut f = Map::new();
        f.insert("n".into(), n.into());
        w.append("quarantine", record::fields_from_map(f), TS);
    }

    /// Appends and writes one small record; returns its length on disk.
    fn small_written(w: &mut ChainWriter, n: u64) -> u64 {
        let before = w.file_len;
        small(w, n);
        w.flush().unwrap();
        w.file_len - before
    }

    fn assert_verifies(dir: &Path) {
        let r = verify_all(dir, &VerifyOptions::default()).unwrap();
        assert!(r.ok(), "{r:?}");
    }

    /// The buffer is written before a rotation. When that write fails, the record that asked
    /// for the rotation is sealed on the rolled-back head (after the `lost` record), not on
    /// the head of the records just lost: the chain verifies.
    #[test]
    fn a_write_error_of_the_batch_before_a_rotation_keeps_the_chain_linked() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let mut w = open(&dir);
        let len = small_written(&mut w, 1);
        // Room for two more small records in this file, not for three.
        w.max_bytes = w.file_len + 2 * len + len / 2;
        w.shared.injected_faults.store(1, Ordering::SeqCst);
        for n in 2..5 {
            small(&mut w, n);
        }
        let _ = w.flush();
        small(&mut w, 5);
        w.finish();
        assert!(w.shared.records_lost.load(Ordering::Relaxed) > 0);
        assert_verifies(&dir);
    }

    /// A failed write can leave part of its batch in the file. Those bytes are cut before
    /// anything else happens to the file, also when the next record rotates to a new file
    /// with nothing buffered: a rotated file ends with the last record written.
    #[test]
    fn a_half_written_batch_is_cut_before_the_file_is_rotated() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let mut w = open(&dir);
        let len = small_written(&mut w, 1);
        // Exactly one more small record fits; the `lost` record describing it does not.
        w.max_bytes = w.file_len + len;
        w.shared.injected_faults.store(1, Ordering::SeqCst);
        small(&mut w, 2);
        assert!(w.flush().is_err());
        let good_len = w.file_len;
        // The back-off's wait over: the next record rotates (rather than joining a batch).
        w.write_retry = WriteRetry::new();
        small(&mut w, 3);
        w.flush().unwrap();
        w.finish();
        assert_verifies(&dir);
        if w.index >= 1 {
            let first = dir.join(files::file_name(&w.chain, 0));
            assert_eq!(std::fs::metadata(&first).unwrap().len(), good_len);
        }
    }

    /// After a failed fsync no checkpoint is signed for the chain, and none is attempted at
    /// every record either: records are still written in batches, and the file is fsynced
    /// no more often than the configured checkpoint cadence asks (here once per 50 records).
    #[test]
    fn after_a_failed_fsync_records_are_not_fsynced_one_by_one() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let (key, _) = crate::forensic::cli::keygen(&tmp.path().join("signer")).unwrap();
        let cfg = LogConfig {
            fsync: FsyncPolicy::Interval,
            fsync_interval_ms: 60_000,
            signing_key_file: Some(key),
            checkpoint_every_records: 50,
            ..test_cfg(&dir)
        };
        let shared = Arc::new(Shared::default());
        let mut w = open_with(&cfg, shared.clone());
        // The fsync of the first record after the start fails.
        shared.injected_fsync_faults.store(1, Ordering::SeqCst);
        small(&mut w, 0);
        w.sync();
        assert!(w.fsync_failed);
        // From here on, each fsync of the log file takes one of these: a count of fsyncs.
        const PLENTY: u32 = 1_000_000;
        shared.injected_fsync_faults.store(PLENTY, Ordering::SeqCst);
        // What the writer thread does with each queued record of a batch.
        for n in 0..200 {
            small(&mut w, n);
            w.maybe_checkpoint();
        }
        let fsyncs = PLENTY - shared.injected_fsync_faults.load(Ordering::SeqCst);
        assert!(fsyncs <= 5, "{fsyncs} fsyncs for 200 records");
    }

    /// A start record that cannot be written (a full volume) fails the start-up with an
    /// error naming the log file, and leaves no file behind.
    #[test]
    fn a_failed_write_of_the_start_record_names_the_file_and_leaves_none() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let shared = Arc::new(Shared::default());
        shared.injected_faults.store(1, Ordering::SeqCst);
        let start = StartInfo::current(Config::default().canonical_json());
        let Err(e) = ChainWriter::open(&test_cfg(&dir), &start, None, shared) else {
            panic!("a chain whose start record was not written was opened");
        };
        let e = e.to_string();
        assert!(e.contains("cannot write the start record"), "{e}");
        assert!(
            e.contains(&dir.display().to_string()) && e.contains(".jsonl"),
            "the error names the file: {e}"
        );
        let left = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(left, 0, "the failed start left files");
    }

    /// A chain is covered by a signed checkpoint from its first record on, so that a
    /// verification with the pinned public key can check its end. When the fsync of the
    /// `start` record fails (after which no checkpoint is signed), the start-up fails, as it
    /// does when the record cannot be written, and removes the file: a passing I/O error at
    /// start-up does not leave a chain that reads as one whose checkpoint was deleted.
    #[test]
    fn a_failed_fsync_of_the_start_record_leaves_no_chain_that_fails_verification() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let (key, public) = crate::forensic::cli::keygen(&tmp.path().join("signer")).unwrap();
        let cfg = LogConfig {
            fsync: FsyncPolicy::Interval,
            signing_key_file: Some(key),
            ..test_cfg(&dir)
        };
        let shared = Arc::new(Shared::default());
        shared.injected_fsync_faults.store(1, Ordering::SeqCst);
        let start = StartInfo::current(Config::default().canonical_json());
        let Err(e) = ChainWriter::open(&cfg, &start, None, shared.clone()) else {
            panic!("a chain whose start record was not synced was opened");
        };
        assert!(
            e.to_string().contains("cannot sync the start record"),
            "{e}"
        );
        assert!(
            e.to_string().contains(&dir.display().to_string()),
            "the error names the file: {e}"
        );
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().ends_with(".jsonl"))
            .collect();
        assert!(left.is_empty(), "the failed start left {left:?}");
        // The next start, whose fsync succeeds, gives a chain that verifies with the key.
        let mut w = ChainWriter::open(&cfg, &start, None, shared).unwrap();
        for n in 0..3 {
            small(&mut w, n);
        }
        w.finish();
        let opts = VerifyOptions {
            public_keys: vec![crate::forensic::keys::read_public_key(&public).unwrap()],
            checkpoints: vec![dir.clone()],
            ..Default::default()
        };
        let r = verify_all(&dir, &opts).unwrap();
        assert!(
            r.ok(),
            "the chain of a process whose first fsync failed: {:?}",
            r.first_problem()
        );
    }

    /// A start-up that fails after its first checkpoint was installed (the checkpoint
    /// directory's fsync) takes back the chain whole: neither file 0 nor the checkpoint is
    /// left, so no verification finds a checkpoint of a chain whose files are gone.
    #[test]
    fn a_new_chain_removed_takes_its_checkpoint_with_it() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, cfg) = signed_test_cfg(tmp.path());
        let w = open_with(&cfg, Arc::new(Shared::default()));
        let names = || -> Vec<String> {
            std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        };
        let ckpt = checkpoint::file_name_of(&w.chain);
        assert!(
            names().contains(&ckpt),
            "no first checkpoint: {:?}",
            names()
        );
        w.remove_new_chain();
        assert!(names().is_empty(), "left behind: {:?}", names());
    }

    /// A failed fsync of the directory at a rotation (the new file's entry may not be
    /// durable) is an fsync failure: counted, named, and no checkpoint is signed for the
    /// chain after it; the records go on being written and the chain verifies.
    #[test]
    fn a_failed_directory_fsync_at_a_rotation_stops_the_checkpoints() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, cfg) = signed_test_cfg(tmp.path());
        let shared = Arc::new(Shared::default());
        let mut w = open_with(&cfg, shared.clone());
        let len = small_written(&mut w, 1);
        assert!(w.checkpoint().is_some(), "a checkpoint before the fault");
        shared.injected_dir_fsync_faults.store(1, Ordering::SeqCst);
        // The next record rotates the file.
        w.max_bytes = w.file_len + len / 2;
        let index = w.index;
        small(&mut w, 2);
        w.flush().unwrap();
        assert_eq!(w.index, index + 1, "the record did not rotate the file");
        assert_eq!(shared.injected_dir_fsync_faults.load(Ordering::SeqCst), 0);
        assert!(w.fsync_failed);
        assert_eq!(shared.write_errors.load(Ordering::Relaxed), 1);
        let error = lock(&shared.last_error).clone().unwrap_or_default();
        assert!(error.contains("fsync failed"), "{error}");
        assert!(
            w.checkpoint().is_none(),
            "a checkpoint after the failed fsync"
        );
        w.max_bytes = 1 << 20;
        small(&mut w, 3);
        w.flush().unwrap();
        w.finish();
        assert_verifies(&dir);
    }

    /// The `stop` record carries the process's totals, `records_lost` among them, which
    /// `kvh evidence` takes as the run's loss. When the write of the batch before it fails
    /// (here as the `stop` record rotates the file), the records of that batch are lost
    /// before the `stop` record reaches the file: its total counts them, as the `lost`
    /// record written before it does.
    #[test]
    fn a_stop_record_sealed_again_after_a_failed_write_counts_the_records_it_lost() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let mut w = open(&dir);
        let len = small_written(&mut w, 1);
        // Room for two more small records in this file, not for the `stop` record after them.
        w.max_bytes = w.file_len + 2 * len + len / 2;
        small(&mut w, 2);
        small(&mut w, 3);
        w.shared.injected_faults.store(1, Ordering::SeqCst);
        w.finish();
        assert_verifies(&dir);
        let lost = w.shared.records_lost.load(Ordering::Relaxed);
        // The fault writes half the batch: its first record reached the file whole and is
        // kept (`keep_landed_records`), the second was lost.
        assert_eq!(lost, 1, "one record of the batch of two was lost");
        let mut records = Vec::new();
        for i in 0..=w.index {
            let text = std::fs::read_to_string(dir.join(files::file_name(&w.chain, i))).unwrap();
            records.extend(
                text.lines()
                    .map(|l| serde_json::from_str::<Value>(l).unwrap()),
            );
        }
        let described: u64 = records
            .iter()
            .filter(|r| r["kind"] == "lost")
            .map(|r| r["records_lost"].as_u64().unwrap())
            .sum();
        assert_eq!(described, lost, "{records:?}");
        let stop = records.last().unwrap();
        assert_eq!(stop["kind"], "stop", "{records:?}");
        assert_eq!(
            stop["records_lost"].as_u64(),
            Some(lost),
            "the stop record's total leaves out the records lost before it: {stop}"
        );
    }

    /// Asserts that the chain ends with a `stop` record just after a `before` record, and that
    /// the stop record's `records_written` is the number of records before it.
    fn assert_stop_counts_the_records_before_it(dir: &Path, w: &ChainWriter, before: &str) {
        let records = records_of(dir, w);
        let kinds: Vec<&str> = records
            .iter()
            .map(|r| r["kind"].as_str().unwrap())
            .collect();
        let stop = records.last().unwrap();
        assert_eq!(stop["kind"], "stop", "{kinds:?}");
        assert_eq!(kinds[kinds.len() - 2], before, "{kinds:?}");
        assert_eq!(
            stop["records_written"].as_u64(),
            Some(records.len() as u64 - 1),
            "records before the stop record: {kinds:?}; the stop record says {stop}"
        );
    }

    /// The `stop` record's `records_written` is the number of records the process wrote
    /// before it. When writes failed before the stop and resume with it, the `lost` record
    /// written just before the `stop` record is one of them, as every earlier record is.
    #[test]
    fn the_stop_records_total_counts_the_lost_record_written_before_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let mut w = open(&dir);
        small_written(&mut w, 1);
        w.shared.injected_faults.store(1, Ordering::SeqCst);
        for n in 2..8 {
            small(&mut w, n);
        }
        assert!(w.flush().is_err());
        w.finish();
        assert_verifies(&dir);
        assert_stop_counts_the_records_before_it(&dir, &w, "lost");
    }

    /// The `stop` record's `records_written` is the number of records the process wrote
    /// before it, also when the `stop` record does not fit in the active file: the new
    /// file's `rotate` record, written just before the `stop` record, is one of them.
    #[test]
    fn the_stop_records_total_counts_the_rotate_record_written_before_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let mut w = open(&dir);
        let len = small_written(&mut w, 1);
        // No room left for the `stop` record in this file: it opens the next one.
        w.max_bytes = w.file_len + len / 2;
        w.finish();
        assert_verifies(&dir);
        assert_eq!(w.index, 1, "the stop record did not rotate the file");
        assert_stop_counts_the_records_before_it(&dir, &w, "rotate");
    }

    /// A write that fails part-way (a disk filling up) can leave whole records of its batch
    /// in the file, each linked to the one before and verifying: a verification (`kvh
    /// verify-log`, the passes of `kvh tail-log`) that reads the file then accepts them as
    /// the chain's records. A record that verified on disk stays the chain's record at its
    /// seq: resuming writes never puts another record, with another hash, at a seq that
    /// verified (which `kvh tail-log` reports as a chain rewritten, i.e. tampering).
    #[test]
    fn records_a_failed_write_left_whole_on_disk_are_never_replaced_by_others() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let mut w = open(&dir);
        small_written(&mut w, 1);
        w.shared.injected_faults.store(1, Ordering::SeqCst);
        for n in 2..8 {
            small(&mut w, n);
        }
        assert!(w.flush().is_err());
        // What a verification sees now: the whole lines of the failed batch verify.
        let r = verify_all(&dir, &VerifyOptions::default()).unwrap();
        assert!(r.ok(), "{r:?}");
        let seen_seq = r.chains[0].last_seq.unwrap();
        let seen_hash = r.chains[0].last_hash.clone().unwrap();
        assert!(
            seen_seq >= 2,
            "the half-written batch left whole records: {r:?}"
        );
        // The disk has room again.
        small(&mut w, 8);
        w.flush().unwrap();
        w.finish();
        assert_verifies(&dir);
        let at_seen = records_of(&dir, &w)
            .into_iter()
            .find(|r| r["seq"].as_u64() == Some(seen_seq))
            .unwrap();
        assert_eq!(
            at_seen["hash"].as_str(),
            Some(seen_hash.as_str()),
            "the record that verified at seq {seen_seq} was replaced by another: {at_seen}"
        );
    }

    /// A checkpoint signs the last record in the file, never one only buffered: here the
    /// first write to a new file failed, and its `rotate` link waits in the buffer to be
    /// written again; the checkpoint signed meanwhile covers the previous file's last record.
    #[test]
    fn a_checkpoint_signed_with_records_buffered_covers_only_the_records_written() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, cfg) = signed_test_cfg(tmp.path());
        let mut w = open_with(&cfg, Arc::new(Shared::default()));
        let len = small_written(&mut w, 1);
        // The next record rotates the file; the write of the new file's first batch fails.
        w.max_bytes = w.file_len + len / 2;
        small(&mut w, 2);
        assert_eq!(w.index, 1, "the record did not rotate the file");
        w.shared.injected_faults.store(1, Ordering::SeqCst);
        assert!(w.flush().is_err());
        assert!(!w.buf.is_empty(), "the `rotate` link is queued again");
        // The new file holds at most part of a line; the previous file ends with the head.
        let text = std::fs::read_to_string(dir.join(files::file_name(&w.chain, 0))).unwrap();
        let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        let c = w.checkpoint().unwrap();
        assert_eq!(Some(c.seq), last["seq"].as_u64(), "{last}");
        assert_eq!(Some(hex(&c.hash).as_str()), last["hash"].as_str(), "{last}");
    }

    /// Sets a file attribute (`chattr +FLAG`) for a test and takes it off when dropped;
    /// `None` where `chattr` cannot set it (not root, or a file system without attributes).
    struct Attr(std::path::PathBuf, &'static str);

    impl Attr {
        fn set(path: &Path, flag: &'static str) -> Option<Attr> {
            let ok = std::process::Command::new("chattr")
                .arg(format!("+{flag}"))
                .arg(path)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                crate::say(format_args!(
                    "skipped: chattr +{flag} is not available here"
                ));
                return None;
            }
            Some(Attr(path.to_path_buf(), flag))
        }
    }

    impl Drop for Attr {
        fn drop(&mut self) {
            let _ = std::process::Command::new("chattr")
                .arg(format!("-{}", self.1))
                .arg(&self.0)
                .status();
        }
    }

    /// An append-only chain file (`chattr +a`, which crash recovery continues by appending
    /// when nothing is torn) accepts appends but refuses every truncation. A failed write that
    /// left nothing torn (here half a batch of two records of one length: exactly the first
    /// record reached the file, and it is kept) needs no cut: once the disk has room again,
    /// the next batch is written, starting with the `lost` record.
    #[test]
    fn an_append_only_file_is_written_again_after_a_failed_write_that_left_nothing_torn() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let mut w = open(&dir);
        small_written(&mut w, 1);
        let path = dir.join(files::file_name(&w.chain, w.index));
        let Some(_attr) = Attr::set(&path, "a") else {
            return;
        };
        w.shared.injected_faults.store(1, Ordering::SeqCst);
        small(&mut w, 2);
        small(&mut w, 3);
        assert!(w.flush().is_err());
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            w.file_len,
            "the failed write left whole records only"
        );
        // The disk has room again.
        small(&mut w, 4);
        let resumed = w.flush();
        assert!(
            resumed.is_ok(),
            "writes never resume on an append-only file: {resumed:?}; last_error {:?}",
            lock(&w.shared.last_error)
        );
    }

    /// What a test does to a writer, one step at a time.
    #[derive(Clone, Debug)]
    enum Step {
        /// A record with a padding field of this many bytes (up to a few files' worth).
        Record(usize),
        /// The next write fails half-way (ENOSPC).
        FailWrite,
        /// Write the buffer (what the writer thread does after each batch).
        Flush,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            6 => (0usize..1200).prop_map(Step::Record),
            1 => (2000usize..9000).prop_map(Step::Record),
            2 => Just(Step::FailWrite),
            3 => Just(Step::Flush),
        ]
    }

    /// Every record in the chain's files, in order.
    fn records_of(dir: &Path, w: &ChainWriter) -> Vec<Value> {
        (0..=w.index)
            .flat_map(|i| {
                let text =
                    std::fs::read_to_string(dir.join(files::file_name(&w.chain, i))).unwrap();
                text.lines()
                    .map(|l| serde_json::from_str::<Value>(l).unwrap())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

        /// Whatever the record sizes (larger than a file too), rotations and failed writes:
        /// the chain verifies, every record is written once, in order, or counted lost, and
        /// the `lost` and `stop` records' totals are the losses.
        #[test]
        fn records_are_written_once_or_counted_lost_and_the_chain_verifies(
            max_bytes in 4096u64..12_000,
            steps in proptest::collection::vec(step(), 1..60),
        ) {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("log");
            let mut w = open(&dir);
            w.max_bytes = max_bytes;
            let mut appended = 0u64;
            for s in &steps {
                match s {
                    Step::Record(pad) => {
                        let mut f = Map::new();
                        f.insert("n".into(), appended.into());
                        f.insert("pad".into(), "x".repeat(*pad).into());
                        w.append("quarantine", record::fields_from_map(f), TS);
                        appended += 1;
                    }
                    Step::FailWrite => w.shared.injected_faults.store(1, Ordering::SeqCst),
                    Step::Flush => {
                        let _ = w.flush();
                    }
                }
            }
            // The last write succeeds: what was lost is described in the files.
            w.shared.injected_faults.store(0, Ordering::SeqCst);
            w.finish();
            let r = verify_all(&dir, &VerifyOptions::default()).unwrap();
            proptest::prop_assert!(r.ok(), "{:?}", r);
            let records = records_of(&dir, &w);
            let written: Vec<u64> = records
                .iter()
                .filter(|r| r["kind"] == "quarantine")
                .map(|r| r["n"].as_u64().unwrap())
                .collect();
            proptest::prop_assert!(written.windows(2).all(|p| p[0] < p[1]), "{:?}", written);
            let lost: u64 = records
                .iter()
                .filter(|r| r["kind"] == "lost")
                .map(|r| r["lost_kinds"]["quarantine"].as_u64().unwrap_or(0))
                .sum();
            proptest::prop_assert_eq!(written.len() as u64 + lost, appended);
            let total_lost = w.shared.records_lost.load(Ordering::Relaxed);
            let stop = records.last().unwrap();
            proptest::prop_assert_eq!(&stop["kind"], "stop");
            proptest::prop_assert_eq!(stop["records_lost"].as_u64(), Some(total_lost));
        }
    }
}
