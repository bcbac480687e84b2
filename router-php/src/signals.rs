//! SIGTERM and SIGINT during `run()`: noted, so the run loop stops fetching and
//! drains, instead of the process dying with messages in hand. SIGHUP: noted, so the
//! run loop reloads the config between batches. The previous handlers (PHP's
//! default, or pcntl's) come back when the run ends.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

static CAUGHT: AtomicI32 = AtomicI32::new(0);
static HANGUP: AtomicBool = AtomicBool::new(false);
const SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

extern "C" fn note(signal: libc::c_int) {
    // Async-signal-safe: one atomic store.
    if signal == libc::SIGHUP {
        HANGUP.store(true, Ordering::SeqCst);
    } else {
        CAUGHT.store(signal, Ordering::SeqCst);
    }
}

/// Our handlers, installed while it lives.
pub struct Caught {
    previous: Vec<(libc::c_int, libc::sigaction)>,
}

/// Install the handlers (runtime threads block every signal, so they run on the PHP
/// thread).
pub fn catch() -> Caught {
    CAUGHT.store(0, Ordering::SeqCst);
    HANGUP.store(false, Ordering::SeqCst);
    let mut previous = Vec::new();
    for signal in SIGNALS {
        // SAFETY: a zeroed sigaction is a valid value; the handler only stores to an
        // atomic; `old` receives the action we restore on drop.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = note as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(signal, &action, &mut old) == 0 {
                previous.push((signal, old));
            }
        }
    }
    Caught { previous }
}

impl Caught {
    /// The signal that came, if one did.
    pub fn signal(&self) -> Option<i32> {
        match CAUGHT.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s),
        }
    }

    /// Whether SIGHUP came since the last call.
    pub fn take_hangup(&self) -> bool {
        HANGUP.swap(false, Ordering::SeqCst)
    }
}

impl Drop for Caught {
    fn drop(&mut self) {
        for (signal, old) in &self.previous {
            // SAFETY: restoring the action sigaction gave us.
            unsafe {
                libc::sigaction(*signal, old, std::ptr::null_mut());
            }
        }
    }
}
