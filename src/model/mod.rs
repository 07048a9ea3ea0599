//! The MoNE-ViViT model: config, capacity solver, router and EPR, nested attention and MLP,
//! the factorized-encoder and joint video models, FLOP counts and model folders; and the
//! Mobile V-MoE (`moe`: per-clip expert MLPs in the last temporal layers) on the same blocks.

pub mod attention;
pub mod block;
pub mod capacity;
pub mod config;
pub mod cuda;
pub mod embedding;
pub mod flops;
pub mod io;
pub mod kernels;
pub mod locate;
pub mod mlp;
pub mod moe;
pub mod nested;
pub mod profile;
pub mod rewire;
pub mod router;
pub mod vivit;

use std::path::PathBuf;

pub use config::{Activation, Config, MoeConfig, Pooling};
pub use io::{
    convert_model, load_model_dir, load_model_dir_as, random_model, save_model_dir, LoadedModel,
};
pub use vivit::{ForwardOptions, ForwardOutput, MoneVivit, Routing};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("invalid capacity: {0}")]
    Capacity(String),
    #[error("weights {path}: {message}")]
    Weights { path: PathBuf, message: String },
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: malformed JSON: {error}")]
    Json {
        path: PathBuf,
        error: serde_json::Error,
    },
    #[error("labels: {0}")]
    Labels(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
