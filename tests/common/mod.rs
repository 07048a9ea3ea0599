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

/// Weights with a large spread, so that nested slicing changes the output visibly.
pub fn weights(
    cfg: &mone::model::Config,
    seed: u64,
    alpha: f32,
) -> std::collections::HashMap<String, candle_core::Tensor> {
    let mut state = seed;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as f64 / (1u64 << 31) as f64) as f32 * 2.0 - 1.0
    };
    let mut m = std::collections::HashMap::new();
    for (name, shape) in cfg.expected_tensors() {
        let n: usize = shape.iter().product();
        let vals: Vec<f32> = if name.ends_with("norm1.weight")
            || name.ends_with("norm2.weight")
            || name.ends_with("norm.weight")
        {
            (0..n).map(|_| 1.0 + 0.2 * next()).collect()
        } else if name == "router.alpha" {
            vec![alpha]
        } else if name == "router.weight" {
            (0..n).map(|_| 2.0 * next()).collect()
        } else {
            let fan_in = if shape.len() >= 2 {
                shape[1..].iter().product::<usize>() as f32
            } else {
                4.0
            };
            (0..n).map(|_| next() * 1.5 / fan_in.sqrt()).collect()
        };
        m.insert(
            name,
            candle_core::Tensor::from_vec(vals, shape, &candle_core::Device::Cpu).unwrap(),
        );
    }
    m
}
