//! Decoding in the model's gaps. On a CPU shared with the model, a decoder thread that wakes
//! preempts one of the model's threads, and since each of the model's parallel ops splits its
//! work evenly between the threads, the other one then waits at the op's end: the decoder's
//! time costs the model about twice over. When the model is the bottleneck, files (which need
//! no particular decode rate) can decode at the lowest priority (SCHED_IDLE on Linux) and take
//! only what the model leaves idle. When decoding is the bottleneck that would cost instead
//! (the model's threads then hold the cores while decoders wait), so the runtime lowers a
//! group of decoding threads only once it sees the model fall behind ([`DecodeThreads`]).
//!
//! A thread cannot raise itself out of SCHED_IDLE without privileges, so only threads that
//! end with their pipeline are lowered: the pipeline's streaming threads come from a task pool
//! of its own (GStreamer's shared pool would hand a lowered thread to the next pipeline, a
//! live camera's say), set on each task as it is created.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use gstreamer as gst;
use gstreamer::glib;
use gstreamer::prelude::*;
use gstreamer::subclass::prelude::*;

/// A group of decoding threads that can be lowered together, once: the threads a file's
/// pipelines run on (and its source thread) register while they live.
#[derive(Clone, Debug, Default)]
pub struct DecodeThreads(Arc<Group>);

#[derive(Debug, Default)]
struct Group {
    background: AtomicBool,
    tids: Mutex<Vec<i64>>,
}

impl PartialEq for DecodeThreads {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Registration of the calling thread in a [`DecodeThreads`], until dropped (in that thread).
pub struct Registered {
    group: Arc<Group>,
    tid: i64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Ok(mut t) = self.group.tids.lock() {
            t.retain(|x| *x != self.tid);
        }
    }
}

impl DecodeThreads {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the group has been lowered.
    pub fn is_background(&self) -> bool {
        self.0.background.load(Ordering::Relaxed)
    }

    /// Lowers every registered thread, and every one that registers from now on. Returns how
    /// many were lowered now.
    pub fn set_background(&self) -> usize {
        let Ok(tids) = self.0.tids.lock() else {
            return 0;
        };
        self.0.background.store(true, Ordering::Relaxed);
        tids.iter().filter(|t| lower(**t)).count()
    }

    /// Registers the calling thread (lowered at once if the group is) until the guard drops;
    /// the guard must drop in this thread, before it exits.
    pub fn register_this_thread(&self) -> Registered {
        let tid = this_tid();
        if let Ok(mut t) = self.0.tids.lock() {
            t.push(tid);
            if self.is_background() {
                lower(tid);
            }
        }
        Registered {
            group: self.0.clone(),
            tid,
        }
    }

    /// The registered threads' ids (for tests and diagnostics).
    pub fn thread_ids(&self) -> Vec<i64> {
        self.0.tids.lock().map(|t| t.clone()).unwrap_or_default()
    }

    /// Runs every streaming thread of the pipeline behind `bus` on a fresh thread of this
    /// group: GStreamer posts a stream-status message as it creates each task, from the
    /// creating thread, and a sync handler there can give the task its pool (the way
    /// GStreamer's manual sets thread priorities).
    pub(super) fn adopt_streaming_threads(&self, bus: &gst::Bus) {
        let pool = pool::GroupPool::new(self.clone());
        bus.set_sync_handler(move |_, msg| {
            if let gst::MessageView::StreamStatus(s) = msg.view() {
                if s.get().0 == gst::StreamStatusType::Create {
                    if let Some(task) = s
                        .stream_status_object()
                        .and_then(|v| v.get::<gst::Task>().ok())
                    {
                        task.set_pool(&pool);
                    }
                }
            }
            gst::BusSyncReply::Pass
        });
    }
}

#[cfg(target_os = "linux")]
fn this_tid() -> i64 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) }
}

#[cfg(not(target_os = "linux"))]
fn this_tid() -> i64 {
    0
}

/// SCHED_IDLE for thread `tid` of this process; false where the OS refused.
#[cfg(target_os = "linux")]
fn lower(tid: i64) -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` outlives the call; a thread that has exited gives ESRCH.
    unsafe { libc::sched_setscheduler(tid as libc::pid_t, libc::SCHED_IDLE, &param) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn lower(_tid: i64) -> bool {
    false
}

/// The scheduling policy of thread `tid` is SCHED_IDLE.
#[cfg(target_os = "linux")]
pub fn is_lowered(tid: i64) -> bool {
    // SAFETY: a plain query.
    unsafe { libc::sched_getscheduler(tid as libc::pid_t) == libc::SCHED_IDLE }
}

#[cfg(not(target_os = "linux"))]
pub fn is_lowered(_tid: i64) -> bool {
    false
}

mod pool {
    use super::*;

    glib::wrapper! {
        /// A task pool that runs each task on a new thread registered in a [`DecodeThreads`].
        pub struct GroupPool(ObjectSubclass<imp::GroupPool>) @extends gst::TaskPool, gst::Object;
    }

    impl GroupPool {
        pub fn new(group: DecodeThreads) -> Self {
            let p: Self = glib::Object::new();
            if let Ok(mut g) = p.imp().group.lock() {
                *g = group;
            }
            p
        }
    }

    mod imp {
        use super::*;

        #[derive(Default)]
        pub struct GroupPool {
            pub(super) group: Mutex<DecodeThreads>,
        }

        #[glib::object_subclass]
        impl ObjectSubclass for GroupPool {
            const NAME: &'static str = "MoneGroupPool";
            type Type = super::GroupPool;
            type ParentType = gst::TaskPool;
        }

        impl ObjectImpl for GroupPool {}
        impl GstObjectImpl for GroupPool {}

        impl TaskPoolImpl for GroupPool {
            type Handle = Handle;

            fn push(
                &self,
                func: gst::subclass::TaskPoolFunction,
            ) -> Result<Option<Handle>, glib::Error> {
                let group = self.group.lock().map(|g| g.clone()).unwrap_or_default();
                std::thread::Builder::new()
                    .name("decode".into())
                    .spawn(move || {
                        let _r = group.register_this_thread();
                        func.call();
                    })
                    .map(|h| Some(Handle(h)))
                    .map_err(|e| {
                        glib::Error::new(gst::CoreError::Thread, &format!("no thread: {e}"))
                    })
            }
        }

        pub struct Handle(std::thread::JoinHandle<()>);

        impl gst::TaskHandle for Handle {
            fn join(self) {
                let _ = self.0.join();
            }
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::source::{
        write_test_video, Input, Pulled, Resize, RtspTransport, SourceOptions, SourcePipeline,
    };

    fn open(uri: &str, threads: Option<DecodeThreads>) -> SourcePipeline {
        let opts = SourceOptions {
            width: 32,
            height: 32,
            fps: None,
            resize: Resize::default(),
            rtsp_transport: RtspTransport::default(),
            decode_threads: Some(1),
            threads,
            gate: None,
        };
        let p = SourcePipeline::new(&Input::Uri(uri.into()), &opts).unwrap();
        p.start().unwrap();
        p
    }

    fn pull(p: &mut SourcePipeline) -> bool {
        match p.pull(Duration::from_secs(10)) {
            Pulled::Frame(_) => true,
            Pulled::Eos => false,
            Pulled::Idle => panic!("no frame within 10 s"),
            Pulled::Error(e) => panic!("{e:?}"),
        }
    }

    /// A lowered group's streaming threads run at SCHED_IDLE and still decode every frame; a
    /// group never lowered, and a pipeline on GStreamer's own pool, keep the normal policy;
    /// the threads leave their group when the pipeline stops.
    #[test]
    fn only_the_lowered_groups_threads_run_at_idle_priority() {
        let dir = std::env::temp_dir().join(format!("mone-priority-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ball.mp4");
        write_test_video(&path, "ball", 48, 16, 96, 96, "mp4").unwrap();
        let uri = format!("file://{}", path.display());
        let (lowered, normal) = (DecodeThreads::new(), DecodeThreads::new());
        let mut pipes = [
            open(&uri, Some(lowered.clone())),
            open(&uri, Some(normal.clone())),
            open(&uri, None),
        ];
        let mut frames = [0usize; 3];
        for (p, n) in pipes.iter_mut().zip(&mut frames) {
            assert!(pull(p));
            *n += 1;
        }
        assert!(!lowered.is_background());
        assert!(lowered.set_background() >= 1);
        assert!(lowered.is_background());
        let ids = lowered.thread_ids();
        assert!(
            !ids.is_empty() && ids.iter().all(|t| is_lowered(*t)),
            "{ids:?}"
        );
        let ids = normal.thread_ids();
        assert!(
            !ids.is_empty() && !ids.iter().any(|t| is_lowered(*t)),
            "{ids:?}"
        );
        assert!(!is_lowered(this_tid()));
        // A thread that joins a lowered group is lowered as it registers.
        let late = lowered.clone();
        assert!(std::thread::spawn(move || {
            let _r = late.register_this_thread();
            is_lowered(this_tid())
        })
        .join()
        .unwrap());
        for (p, n) in pipes.iter_mut().zip(&mut frames) {
            while pull(p) {
                *n += 1;
            }
        }
        assert_eq!(frames, [48; 3]);
        for p in pipes {
            p.stop(Duration::from_secs(2));
        }
        assert_eq!(lowered.thread_ids(), Vec::<i64>::new());
        assert_eq!(normal.thread_ids(), Vec::<i64>::new());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
