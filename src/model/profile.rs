//! Opt-in wall-clock accounting of where a forward spends its time (for `mone bench`).
//! Off by default; when off a scope costs one relaxed atomic load. On a GPU, whose work is
//! asynchronous, each scope synchronizes the device at its start and end (slower, but the
//! time lands in the right part).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use candle_core::Device;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    // The discriminants index NANOS and PARTS.
    Embedding,
    Routing,
    Norm,
    /// The nested linear layers (QKV, attention out, fc1, fc2): the parts that shrink with e_c.
    Qkv,
    Proj,
    Fc1,
    Fc2,
    /// The attention's two GEMMs (Q K^T and P V); on the fused CPU path the op's wall time is
    /// split between this and `Softmax` by the threads' measured time in each.
    Attention,
    Softmax,
    Activation,
    /// Pooling, temporal transformer, head.
    Rest,
}

pub const PARTS: [Part; 11] = [
    Part::Embedding,
    Part::Routing,
    Part::Norm,
    Part::Qkv,
    Part::Proj,
    Part::Fc1,
    Part::Fc2,
    Part::Attention,
    Part::Softmax,
    Part::Activation,
    Part::Rest,
];

static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; PARTS.len()] = [const { AtomicU64::new(0) }; PARTS.len()];

static SYNC: Mutex<Option<Device>> = Mutex::new(None);

pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Profile work on `device`: a GPU is synchronized around every scope.
pub fn enable_on(device: &Device) {
    if let Ok(mut s) = SYNC.lock() {
        *s = (!device.is_cpu()).then(|| device.clone());
    }
    enable(true);
}

fn sync() {
    if let Ok(s) = SYNC.lock() {
        if let Some(d) = s.as_ref() {
            // A failed synchronize surfaces at the next real op.
            let _ = d.synchronize();
        }
    }
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Adds time that an op measured itself.
pub fn add(part: Part, nanos: u64) {
    if enabled() {
        NANOS[part as usize].fetch_add(nanos, Ordering::Relaxed);
    }
}

pub fn reset() {
    NANOS.iter().for_each(|n| n.store(0, Ordering::Relaxed));
}

/// Seconds per part since the last reset.
pub fn snapshot() -> Vec<(Part, f64)> {
    PARTS
        .iter()
        .map(|&p| (p, NANOS[p as usize].load(Ordering::Relaxed) as f64 * 1e-9))
        .collect()
}

pub struct Scope(Option<(Part, Instant)>);

pub fn scope(part: Part) -> Scope {
    Scope(ENABLED.load(Ordering::Relaxed).then(|| {
        sync();
        (part, Instant::now())
    }))
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some((p, t)) = self.0 {
            sync();
            NANOS[p as usize].fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
    }
}
