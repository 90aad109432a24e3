//! A deadline on calls that block inside a library and cannot be interrupted (NCCL joining a
//! communicator, ending a group): when one outlasts it, the process ends with a one-line message
//! (and `mpirun` then ends the job), since every other rank may be waiting on this one.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The deadline of the call being watched and the message for when it passes; `None`: idle.
type Armed = Arc<(Mutex<Option<(Instant, String)>>, Condvar)>;

/// Ends the process with a one-line message when a call outlasts its deadline.
pub struct Watchdog {
    armed: Armed,
}

impl Watchdog {
    pub fn new() -> Self {
        let armed: Armed = Arc::default();
        let watched = Arc::downgrade(&armed);
        std::thread::Builder::new()
            .name("betadpo-nccl-watchdog".into())
            .spawn(move || loop {
                // ends with the Watchdog: the last strong reference
                let Some(state) = watched.upgrade() else { return };
                let (lock, cv) = &*state;
                let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
                let wait = match &*guard {
                    Some((deadline, what)) if Instant::now() >= *deadline => {
                        let line = format!("error: {what}\n");
                        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
                        std::process::exit(1);
                    }
                    Some((deadline, _)) => *deadline - Instant::now(),
                    None => Duration::from_millis(500),
                };
                drop(cv.wait_timeout(guard, wait));
            })
            .expect("spawning the NCCL watchdog thread");
        Watchdog { armed }
    }

    /// Runs `call`, ending the process with `what` if it takes longer than `timeout`.
    pub fn within<T>(&self, timeout: Duration, what: impl Into<String>, call: impl FnOnce() -> T) -> T {
        let (lock, cv) = &*self.armed;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now() + timeout, what.into()));
        cv.notify_one();
        let out = call();
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = None;
        out
    }
}
