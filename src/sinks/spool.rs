//! A durable per-sink queue: events are appended as JSON lines to `events.jsonl` and a sink's
//! delivery thread reads them in order, recording in `acked` the byte offset up to which its
//! receiver has confirmed them. A restart resumes at that offset, so an outage (of the receiver,
//! or of mone itself) loses nothing; an event whose delivery was under way may be delivered
//! twice, never out of order. Appends reach the kernel at once (they survive mone being
//! killed) and are fsynced at close. When the reader has caught up, the file is truncated.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Truncate once the reader has caught up and the file holds at least this much.
const COMPACT_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {dir}: {source}")]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("spool {0} is in use by another mone process")]
    Locked(PathBuf),
    #[error("spool {dir}: acked offset {acked} is past the end of the file ({len} bytes)")]
    Corrupt { dir: PathBuf, acked: u64, len: u64 },
}

struct State {
    file: File,
    /// Bytes in the data file.
    len: u64,
    /// Bytes confirmed by the receiver.
    acked: u64,
    closing: bool,
    /// Events refused, or evicted, because the spool was full.
    dropped: u64,
    /// Of those, evicted after they were appended.
    evicted: u64,
    /// Events appended since open, plus those found undelivered at open.
    appended: u64,
}

/// What a full spool does with one more event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Refuse the new event (files: the worker stops taking jobs before this happens).
    #[default]
    DropNewest,
    /// Evict the oldest undelivered events to make room (live streams: recent events are
    /// worth more than stale ones).
    DropOldest,
}

pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    when_full: WhenFull,
    state: Mutex<State>,
    more: Condvar,
    _lock: File,
}

/// One spooled event: its JSON line and the offset just past it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub line: String,
    pub end: u64,
}

fn io(dir: &Path) -> impl Fn(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        dir: dir.to_path_buf(),
        source,
    }
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, holding an exclusive lock on it while it lives.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, SpoolError> {
        Self::open_with(dir, max_bytes, WhenFull::DropNewest)
    }

    pub fn open_with(dir: &Path, max_bytes: u64, when_full: WhenFull) -> Result<Self, SpoolError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))
            .map_err(io(dir))?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(SpoolError::Locked(dir.to_path_buf()));
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(dir.join("events.jsonl"))
            .map_err(io(dir))?;
        let mut len = file.metadata().map_err(io(dir))?.len();
        let acked = match std::fs::read_to_string(dir.join("acked")) {
            Ok(s) => s.trim().parse::<u64>().unwrap_or(0),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io(dir)(e)),
        };
        if acked > len {
            return Err(SpoolError::Corrupt {
                dir: dir.to_path_buf(),
                acked,
                len,
            });
        }
        // A line cut short by a crash mid-append is dropped: everything before it is whole.
        let tail = complete_prefix(&file, acked, len).map_err(io(dir))?;
        if tail < len {
            file.set_len(tail).map_err(io(dir))?;
            len = tail;
        }
        let mut spool = Self {
            dir: dir.to_path_buf(),
            max_bytes,
            when_full,
            state: Mutex::new(State {
                file,
                len,
                acked,
                closing: false,
                dropped: 0,
                evicted: 0,
                appended: 0,
            }),
            more: Condvar::new(),
            _lock: lock,
        };
        let pending = spool.pending();
        spool
            .state
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .appended = pending;
        Ok(spool)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends one event (a JSON line without its newline). When the undelivered events
    /// already fill `max_bytes`: with [`WhenFull::DropNewest`] returns false, counting it as
    /// dropped; with [`WhenFull::DropOldest`] evicts (and counts) the oldest until it fits.
    pub fn append(&self, line: &str) -> Result<bool, SpoolError> {
        let mut st = self.lock();
        let n = line.len() as u64 + 1;
        if st.len - st.acked + n > self.max_bytes {
            if self.when_full == WhenFull::DropNewest || n > self.max_bytes {
                st.dropped += 1;
                return Ok(false);
            }
            let mut r = BufReader::new(st.file.try_clone().map_err(io(&self.dir))?);
            r.seek(SeekFrom::Start(st.acked)).map_err(io(&self.dir))?;
            let mut skip = Vec::new();
            while st.len - st.acked + n > self.max_bytes {
                skip.clear();
                let got = r.read_until(b'\n', &mut skip).map_err(io(&self.dir))?;
                if got == 0 {
                    break;
                }
                st.acked += got as u64;
                st.dropped += 1;
                st.evicted += 1;
            }
            write_atomic(&self.dir.join("acked"), st.acked.to_string().as_bytes())
                .map_err(io(&self.dir))?;
        }
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        st.file.write_all(&buf).map_err(io(&self.dir))?;
        st.len += n;
        st.appended += 1;
        self.more.notify_all();
        Ok(true)
    }

    /// The next event at or after `pos`, waiting up to `wait` for one; None when there is none
    /// yet (or the spool is closing and empty past `pos`).
    pub fn next(&self, pos: u64, wait: Duration) -> Result<Option<Entry>, SpoolError> {
        let st = self.lock();
        let (st, _) = self
            .more
            .wait_timeout_while(st, wait, |s| s.len <= pos && !s.closing)
            .unwrap_or_else(|p| p.into_inner());
        if st.len <= pos {
            return Ok(None);
        }
        let mut r = BufReader::new(st.file.try_clone().map_err(io(&self.dir))?);
        r.seek(SeekFrom::Start(pos)).map_err(io(&self.dir))?;
        let mut line = String::new();
        let got = r
            .take(st.len - pos)
            .read_line(&mut line)
            .map_err(io(&self.dir))?;
        if got == 0 || !line.ends_with('\n') {
            return Ok(None);
        }
        line.pop();
        Ok(Some(Entry {
            line,
            end: pos + got as u64,
        }))
    }

    /// Where delivery resumes.
    pub fn acked(&self) -> u64 {
        self.lock().acked
    }

    /// Records that everything before `end` was delivered; truncates the file when nothing is
    /// left. Returns the offset delivery goes on from (0 after a truncation).
    pub fn ack(&self, end: u64) -> Result<u64, SpoolError> {
        let mut st = self.lock();
        // Never backwards: eviction may have moved past what the reader was delivering.
        st.acked = end.min(st.len).max(st.acked);
        if st.acked == st.len && st.len >= COMPACT_BYTES {
            st.file.set_len(0).map_err(io(&self.dir))?;
            st.len = 0;
            st.acked = 0;
        }
        write_atomic(&self.dir.join("acked"), st.acked.to_string().as_bytes())
            .map_err(io(&self.dir))?;
        Ok(st.acked)
    }

    /// Undelivered events (counted by lines; reads the undelivered part of the file).
    pub fn pending(&self) -> u64 {
        let st = self.lock();
        let Ok(f) = st.file.try_clone() else { return 0 };
        let mut r = BufReader::new(f);
        if r.seek(SeekFrom::Start(st.acked)).is_err() {
            return 0;
        }
        r.take(st.len - st.acked)
            .split(b'\n')
            .filter(|l| l.as_ref().is_ok_and(|l| !l.is_empty()))
            .count() as u64
    }

    /// How full the spool is: undelivered bytes over `max_bytes`.
    pub fn fill(&self) -> f64 {
        let st = self.lock();
        (st.len - st.acked) as f64 / self.max_bytes.max(1) as f64
    }

    pub fn appended(&self) -> u64 {
        self.lock().appended
    }

    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    pub fn evicted(&self) -> u64 {
        self.lock().evicted
    }

    /// Wakes a reader waiting in `next` so that it can see the spool is closing.
    pub fn close(&self) {
        let mut st = self.lock();
        st.closing = true;
        let _ = st.file.sync_all();
        self.more.notify_all();
    }
}

/// The end of the last complete line in [from, len).
fn complete_prefix(f: &File, from: u64, len: u64) -> std::io::Result<u64> {
    if len == from {
        return Ok(len);
    }
    let mut r = BufReader::new(f.try_clone()?);
    r.seek(SeekFrom::Start(from))?;
    let mut end = from;
    let mut pos = from;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = r.read_until(b'\n', &mut buf)?;
        if n == 0 {
            return Ok(end);
        }
        pos += n as u64;
        if buf.ends_with(b"\n") {
            end = pos;
        }
    }
}

fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)?;
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mone-spool-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn drain(s: &Spool, mut pos: u64) -> (Vec<String>, u64) {
        let mut out = Vec::new();
        while let Some(e) = s.next(pos, Duration::ZERO).unwrap() {
            out.push(e.line);
            pos = e.end;
        }
        (out, pos)
    }

    #[test]
    fn a_full_drop_oldest_spool_evicts_the_oldest_and_a_drop_newest_one_refuses() {
        let line = |i: usize| format!("{{\"i\":{i:03}}}");
        // Each line is 10 bytes with its newline: 5 fit in 50.
        let d = tmp("evict");
        let s = Spool::open_with(&d, 50, WhenFull::DropOldest).unwrap();
        let first = s.next(0, Duration::ZERO).unwrap();
        assert!(first.is_none());
        for i in 0..8 {
            assert!(s.append(&line(i)).unwrap());
        }
        assert_eq!(s.dropped(), 3);
        let (got, _) = drain(&s, s.acked());
        assert_eq!(got, (3..8).map(line).collect::<Vec<_>>());
        // A reader's ack from before the eviction does not move delivery backwards.
        assert_eq!(s.ack(10).unwrap(), 30);
        drop(s);
        let s = Spool::open(&d, 50).unwrap();
        assert_eq!(drain(&s, s.acked()).0, (3..8).map(line).collect::<Vec<_>>());
        drop(s);
        let d = tmp("refuse");
        let s = Spool::open(&d, 50).unwrap();
        let kept: Vec<bool> = (0..8).map(|i| s.append(&line(i)).unwrap()).collect();
        assert_eq!(kept, [true, true, true, true, true, false, false, false]);
        assert_eq!(drain(&s, 0).0, (0..5).map(line).collect::<Vec<_>>());
    }

    #[test]
    fn resumes_after_the_last_ack_across_reopen() {
        let d = tmp("resume");
        {
            let s = Spool::open(&d, 1 << 20).unwrap();
            for i in 0..5 {
                assert!(s.append(&format!("{{\"i\":{i}}}")).unwrap());
            }
            let a = s.next(0, Duration::ZERO).unwrap().unwrap();
            let b = s.next(a.end, Duration::ZERO).unwrap().unwrap();
            assert_eq!(b.line, "{\"i\":1}");
            s.ack(b.end).unwrap();
            assert_eq!(s.pending(), 3);
        }
        let s = Spool::open(&d, 1 << 20).unwrap();
        let (lines, _) = drain(&s, s.acked());
        assert_eq!(lines, ["{\"i\":2}", "{\"i\":3}", "{\"i\":4}"]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_torn_last_line_is_dropped_on_open() {
        let d = tmp("torn");
        {
            let s = Spool::open(&d, 1 << 20).unwrap();
            s.append("{\"a\":1}").unwrap();
        }
        let mut f = OpenOptions::new()
            .append(true)
            .open(d.join("events.jsonl"))
            .unwrap();
        f.write_all(b"{\"b\":").unwrap();
        drop(f);
        let s = Spool::open(&d, 1 << 20).unwrap();
        let (lines, _) = drain(&s, 0);
        assert_eq!(lines, ["{\"a\":1}"]);
        s.append("{\"c\":3}").unwrap();
        assert_eq!(drain(&s, 0).0, ["{\"a\":1}", "{\"c\":3}"]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn full_spool_drops_and_counts_then_accepts_after_ack() {
        let d = tmp("full");
        let s = Spool::open(&d, 20).unwrap();
        assert!(s.append("0123456789").unwrap());
        assert!((s.fill() - 11.0 / 20.0).abs() < 1e-9);
        assert!(!s.append("0123456789").unwrap());
        assert_eq!(s.dropped(), 1);
        let e = s.next(0, Duration::ZERO).unwrap().unwrap();
        s.ack(e.end).unwrap();
        assert!(s.append("0123456789").unwrap());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_second_process_cannot_share_it_and_a_reader_wakes_on_append() {
        let d = tmp("lock");
        let s = std::sync::Arc::new(Spool::open(&d, 1 << 20).unwrap());
        assert!(matches!(
            Spool::open(&d, 1 << 20),
            Err(SpoolError::Locked(_))
        ));
        let r = s.clone();
        let t = std::thread::spawn(move || r.next(0, Duration::from_secs(10)).unwrap());
        std::thread::sleep(Duration::from_millis(50));
        s.append("x").unwrap();
        assert_eq!(t.join().unwrap().unwrap().line, "x");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn compaction_truncates_once_caught_up() {
        let d = tmp("compact");
        let s = Spool::open(&d, 8 << 20).unwrap();
        let line = "y".repeat(1000);
        for _ in 0..1100 {
            s.append(&line).unwrap();
        }
        let (lines, end) = drain(&s, 0);
        assert_eq!(lines.len(), 1100);
        assert_eq!(s.ack(end).unwrap(), 0);
        assert_eq!(std::fs::metadata(d.join("events.jsonl")).unwrap().len(), 0);
        s.append("z").unwrap();
        assert_eq!(drain(&s, 0).0, ["z"]);
        let _ = std::fs::remove_dir_all(&d);
    }
}
