//! mone: streaming video analytics with a Mixture-of-Nested-Experts ViViT.
//!
//! - [`model`]: the MoNE-ViViT in candle (config, capacity solver, router/EPR, nested
//!   attention and MLP, the factorized and joint encoders, FLOP counts, model folders), and
//!   the Mobile V-MoE on the same blocks (`model::moe`: per-clip expert MLPs); its fused
//!   kernels for the CPU (`model::kernels`) and for CUDA (`model::cuda`, feature `cuda`).
//! - [`import`] (`mone import-hf`: transformers ViViT/VideoMAE checkpoints as model folders)
//!   and [`infer`] (`mone infer`: logits for a raw input tensor, for parity checks).
//! - [`inputs`] (folders and lists of inputs), `source` (GStreamer; the default feature `gst`),
//!   [`clip`], [`tokenizer`], `runtime`,
//!   [`events`], [`failure`] (error classes), [`segments`] (action segments, pure), `pipeline`,
//!   `cli`: the streaming pipeline from inputs to JSON events; [`sinks`]: alert sinks
//!   (webhook, MQTT) and NATS JetStream with their filters and durable spools; `cluster`:
//!   cameras leased from a KV bucket and file jobs on a work queue (`mone streams`,
//!   `mone submit`, `mone worker`, `mone events`).
//! - [`dataset`] (the procedural motion dataset), [`optim`] (AdamW with saveable state) and
//!   [`train`] (the MoNE and V-MoE training loop with exact-resume checkpoints), and
//!   [`superclass`] (confusion matrix -> clustered super-classes for V-MoE's router): training.
//! - [`eval`] and [`plot`]: `mone eval`, accuracy against compute, and its PNG plot.
//! - [`controller`] (pure: latency profile, slow-down estimate, per-batch capacity, size and
//!   shedding), [`metrics`] (telemetry, Prometheus text) and `http` (the HTTP API): holding a
//!   latency target on live streams.
//! - [`bench`] (model), `bench_pipeline`, `bench_adaptive`, `bench_classify` (batch memory),
//!   [`bench_gemm`] and [`bench_train`] (training memory): the `mone bench` measurements.
//! - [`device`]: choosing the compute device and uploading u8 clips to it; [`redact`]: credentials out of the process's stderr.

pub mod bench;
#[cfg(feature = "gst")]
pub mod bench_adaptive;
#[cfg(feature = "gst")]
pub mod bench_classify;
pub mod bench_gemm;
#[cfg(feature = "gst")]
pub mod bench_pipeline;
pub mod bench_train;
#[cfg(feature = "gst")]
pub mod cli;
pub mod clip;
#[cfg(feature = "gst")]
pub mod cluster;
pub mod controller;
pub mod dataset;
pub mod device;
pub mod eval;
pub mod events;
pub mod failure;
#[cfg(feature = "gst")]
pub mod http;
pub mod import;
pub mod infer;
pub mod inputs;
pub mod metrics;
pub mod model;
pub mod optim;
#[cfg(feature = "gst")]
pub mod pipeline;
pub mod plot;
pub mod redact;
#[cfg(feature = "gst")]
pub mod runtime;
pub mod segments;
pub mod sinks;
#[cfg(feature = "gst")]
pub mod source;
pub mod superclass;
pub mod tokenizer;
pub mod train;
