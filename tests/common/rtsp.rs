//! An RTSP server on 127.0.0.1 for the tests, optionally asking for credentials.

use gstreamer as gst;
use gstreamer_rtsp_server as rtsp_server;
use rtsp_server::prelude::*;

/// An RTSP server on 127.0.0.1 with its own GLib main loop thread.
pub struct Server {
    server: rtsp_server::RTSPServer,
    source: Option<gst::glib::SourceId>,
    main_loop: gst::glib::MainLoop,
    ctx: gst::glib::MainContext,
    thread: Option<std::thread::JoinHandle<()>>,
    pub port: i32,
}

impl Server {
    pub fn start(port: i32) -> Server {
        Self::start_with(port, None)
    }

    /// A server that admits only `user:password` (HTTP Basic).
    pub fn start_with(port: i32, credentials: Option<(&str, &str)>) -> Server {
        Self::start_full(port, credentials, None)
    }

    /// A server whose clock, and so the NTP times of its RTCP sender reports, runs
    /// `offset_s` seconds off the real time.
    pub fn start_with_clock_offset(port: i32, offset_s: i64) -> Server {
        Self::start_full(port, None, Some(offset_s))
    }

    fn start_full(port: i32, credentials: Option<(&str, &str)>, offset_s: Option<i64>) -> Server {
        gst::init().unwrap();
        let ctx = gst::glib::MainContext::new();
        let main_loop = gst::glib::MainLoop::new(Some(&ctx), false);
        let server = rtsp_server::RTSPServer::new();
        server.set_address("127.0.0.1");
        server.set_service(&port.to_string());
        let factory = rtsp_server::RTSPMediaFactory::new();
        factory.set_launch(
            "( videotestsrc is-live=true pattern=ball ! video/x-raw,width=160,height=120,framerate=25/1 ! \
             x264enc tune=zerolatency speed-preset=ultrafast key-int-max=10 ! rtph264pay name=pay0 pt=96 )",
        );
        factory.set_shared(true);
        if let Some(off) = offset_s {
            // A realtime clock shifted by the offset; with ntp-time-source = clock-time the
            // sender reports carry the pipeline clock's time as NTP time (since 1900), so the
            // clock also runs 70 years ahead of Unix time.
            let clock = gst::glib::Object::builder::<gst::SystemClock>()
                .property("clock-type", gst::ClockType::Realtime)
                .build();
            let internal = clock.internal_time();
            let shifted = internal.nseconds() as i64 + (2_208_988_800 + off) * 1_000_000_000;
            clock.set_calibration(
                internal,
                gst::ClockTime::from_nseconds(shifted as u64),
                1,
                1,
            );
            factory.set_clock(Some(&clock));
            factory.connect_media_configure(|_, media| {
                let Some(pipeline) = media.element().parent() else {
                    return;
                };
                if let Ok(bin) = pipeline.downcast::<gst::Bin>() {
                    bin.connect_element_added(|_, el| {
                        if el.factory().is_some_and(|f| f.name() == "rtpbin") {
                            el.set_property_from_str("ntp-time-source", "clock-time");
                        }
                    });
                }
            });
        }
        if let Some((user, password)) = credentials {
            let auth = rtsp_server::RTSPAuth::new();
            let token = rtsp_server::RTSPToken::builder()
                .field(rtsp_server::RTSP_TOKEN_MEDIA_FACTORY_ROLE, "user")
                .build();
            let basic = rtsp_server::RTSPAuth::make_basic(user, password);
            auth.add_basic(basic.as_str(), &token);
            server.set_auth(Some(&auth));
            factory.add_role_from_structure(
                &gst::Structure::builder("user")
                    .field(rtsp_server::RTSP_PERM_MEDIA_FACTORY_ACCESS, true)
                    .field(rtsp_server::RTSP_PERM_MEDIA_FACTORY_CONSTRUCT, true)
                    .build(),
            );
        }
        server.mount_points().unwrap().add_factory("/cam", factory);
        let source = server.attach(Some(&ctx)).unwrap();
        let port = server.bound_port();
        let (ml, c) = (main_loop.clone(), ctx.clone());
        let thread = std::thread::spawn(move || {
            let _guard = c.acquire().unwrap();
            ml.run();
        });
        Server {
            server,
            source: Some(source),
            main_loop,
            ctx,
            thread: Some(thread),
            port,
        }
    }

    pub fn url(&self) -> String {
        format!("rtsp://127.0.0.1:{}/cam", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Stop listening (the source lives on our own context, not the default one).
        if let Some(id) = self.source.take() {
            if let Some(src) = self.ctx.find_source_by_id(&id) {
                src.destroy();
            }
        }
        // Close the sessions of connected clients too.
        self.server
            .client_filter(Some(&mut |_, _| rtsp_server::RTSPFilterResult::Remove));
        self.main_loop.quit();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
