//! Decoding that steps aside while the model runs. On a CPU shared with the model, a decoder
//! thread that wakes preempts one of the model's threads, and since each of the model's
//! parallel ops splits its work evenly between the threads, the other one then waits at the
//! op's end: the decoder's time costs the model about twice over. A file's decoding threads
//! can instead wait at each frame while a batch runs ([`ModelGate`]), and decode in the
//! model's gaps. Unlike a lower scheduling priority this needs no privileges to undo, and a
//! waiting thread is not runnable, so the model's threads never share a core with it. Where
//! decoding is the slower stage, waiting would only slow it, so the gate closes only while it
//! is enabled (the runtime enables it while the model is the bottleneck).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Shared between the model's worker and the decoding threads of finite inputs.
#[derive(Clone, Debug, Default)]
pub struct ModelGate(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    enabled: AtomicBool,
    running: Mutex<bool>,
    done: Condvar,
}

impl PartialEq for ModelGate {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// The model runs until this drops.
pub struct Running<'a>(&'a Inner);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if let Ok(mut r) = self.0.running.lock() {
            *r = false;
        }
        self.0.done.notify_all();
    }
}

impl ModelGate {
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks the model as running until the guard drops; while the gate is enabled,
    /// decoders wait meanwhile.
    pub fn running(&self) -> Running<'_> {
        if self.is_enabled() {
            if let Ok(mut r) = self.0.running.lock() {
                *r = true;
            }
        }
        Running(&self.0)
    }

    pub fn is_enabled(&self) -> bool {
        self.0.enabled.load(Ordering::Relaxed)
    }

    /// Enables or disables the gate; disabled, it lets waiting decoders go at their next frame.
    pub fn set_enabled(&self, on: bool) {
        self.0.enabled.store(on, Ordering::Relaxed);
    }

    /// Waits while the model runs, at most `max`; returns how long it waited. Disabled, it
    /// returns at once, without the lock (it runs at every frame).
    pub fn wait(&self, max: Duration) -> Duration {
        if !self.is_enabled() {
            return Duration::ZERO;
        }
        let start = Instant::now();
        let Ok(mut r) = self.0.running.lock() else {
            return Duration::ZERO;
        };
        while *r {
            let left = max.saturating_sub(start.elapsed());
            if left.is_zero() {
                break;
            }
            r = match self.0.done.wait_timeout(r, left) {
                Ok((g, _)) => g,
                Err(_) => break,
            };
        }
        start.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decoder_waits_while_the_model_runs_and_not_otherwise() {
        let gate = ModelGate::new();
        assert!(gate.wait(Duration::from_secs(5)) < Duration::from_secs(1));
        // Disabled (the default), a running model holds no one up.
        let running = gate.running();
        assert!(gate.wait(Duration::from_secs(5)) < Duration::from_secs(1));
        drop(running);
        gate.set_enabled(true);
        let running = gate.running();
        let g = gate.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            tx.send(()).unwrap();
            g.wait(Duration::from_secs(30))
        });
        rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !waiter.is_finished(),
            "the decoder went on while the model ran"
        );
        drop(running);
        assert!(waiter.join().unwrap() < Duration::from_secs(30));
    }

    #[test]
    fn a_wait_never_outlasts_its_limit() {
        let gate = ModelGate::new();
        gate.set_enabled(true);
        let _running = gate.running();
        let waited = gate.wait(Duration::from_millis(50));
        assert!(waited >= Duration::from_millis(50) && waited < Duration::from_secs(5));
    }

    /// A pipeline with a gate delivers no frame while the model runs, and frames at once when
    /// it stops.
    #[test]
    fn a_gated_pipeline_waits_for_the_model() {
        use crate::source::{Input, Pulled, SourceOptions, SourcePipeline};
        let gate = ModelGate::new();
        gate.set_enabled(true);
        let opts = SourceOptions {
            width: 32,
            height: 32,
            fps: None,
            resize: Default::default(),
            rtsp_transport: Default::default(),
            decode_threads: Some(1),
            threads: None,
            gate: Some(gate.clone()),
        };
        let input = Input::parse("test:pattern=ball,frames=50,width=64,height=64").unwrap();
        let running = gate.running();
        let mut p = SourcePipeline::new(&input, &opts).unwrap();
        p.start().unwrap();
        // Shorter than the longest wait (200 ms): nothing gets through.
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(120) {
            match p.pull(Duration::from_millis(20)) {
                Pulled::Idle => {}
                other => panic!("a frame passed the gate: {other:?}"),
            }
        }
        drop(running);
        let mut frames = 0;
        loop {
            match p.pull(Duration::from_secs(10)) {
                Pulled::Frame(_) => frames += 1,
                Pulled::Eos => break,
                other => panic!("{other:?}"),
            }
        }
        p.stop(Duration::from_secs(1));
        assert_eq!(frames, 50);
    }
}
