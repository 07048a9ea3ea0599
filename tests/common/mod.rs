//! Helpers shared by the integration tests.
#![allow(dead_code)]

#[cfg(feature = "gst")]
pub mod rtsp;

/// A Debian tool on PATH or in /usr/sbin (where mosquitto and nats-server go, which is not on
/// every user's PATH).
pub fn system_tool(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([std::path::PathBuf::from("/usr/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A port nothing listens on once this returns.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}
