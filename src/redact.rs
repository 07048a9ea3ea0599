//! Redaction of the process's own stderr. GStreamer's warnings and the C libraries under it
//! (libdvdread, libsrt, ...) write to file descriptor 2 themselves, quoting URIs with their
//! credentials; [`redact_stderr`] routes fd 2 through a pipe whose reader passes every line
//! through [`crate::events::redact_text`]. On a terminal stderr is left alone: the progress bar
//! needs it, and its reader typed the URI.

use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::thread::JoinHandle;

/// Restores fd 2 and drains the pipe when dropped.
pub struct StderrGuard {
    saved: i32,
    thread: Option<JoinHandle<()>>,
}

/// Redact everything written to stderr from now on (None on a terminal).
pub fn redact_stderr() -> std::io::Result<Option<StderrGuard>> {
    if std::io::stderr().is_terminal() {
        return Ok(None);
    }
    let (reader, writer) = std::io::pipe()?;
    // SAFETY: dup/dup2 on descriptors this process owns; `saved` is a new descriptor.
    let saved = unsafe { libc::dup(2) };
    if saved < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::dup2(writer.as_raw_fd(), 2) } < 0 {
        let e = std::io::Error::last_os_error();
        // SAFETY: closing the descriptor dup returned.
        unsafe { libc::close(saved) };
        return Err(e);
    }
    drop(writer);
    // SAFETY: a second copy of the real stderr, owned by the reader thread.
    let real_fd = unsafe { libc::dup(saved) };
    if real_fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `real_fd` is ours and open.
    let mut real = unsafe { File::from_raw_fd(real_fd) };
    let thread = std::thread::Builder::new()
        .name("stderr-redact".into())
        .spawn(move || {
            let mut r = BufReader::new(reader);
            let mut line = Vec::new();
            while let Ok(n) = r.read_until(b'\n', &mut line) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&line);
                let _ = real.write_all(crate::events::redact_text(&text).as_bytes());
                let _ = real.flush();
                line.clear();
            }
        })?;
    Ok(Some(StderrGuard {
        saved,
        thread: Some(thread),
    }))
}

impl Drop for StderrGuard {
    fn drop(&mut self) {
        // Putting the real stderr back closes the pipe's last writer: the reader drains and ends.
        // SAFETY: `saved` is the descriptor dup returned.
        unsafe {
            libc::dup2(self.saved, 2);
            libc::close(self.saved);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
