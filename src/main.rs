use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Activations of tens of megabytes are freed and allocated again in every layer. Handing them
/// back to the OS (glibc's mmap threshold, jemalloc's default decay) makes every forward
/// page-fault them in anew, about 25 ms per 38 MB buffer here; keeping freed pages for reuse
/// costs only the peak working set, which the process needs anyway.
#[export_name = "_rjem_malloc_conf"]
pub static MALLOC_CONF: &[u8; 36] = b"dirty_decay_ms:-1,muzzy_decay_ms:-1\0";

#[derive(Parser)]
#[command(
    name = "mone",
    version,
    about = "Streaming video action recognition with a Mixture-of-Nested-Experts ViViT"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure the model and the pipeline.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Print a model preset's config (JSON) and its compute per clip.
    Config {
        /// Preset name (vivit-fe-b16, vivit-fe-s16, vivit-fe-tiny).
        preset: String,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Latency and clips/s of MoNE at every capacity against the dense forward.
    Model(mone::bench::ModelBenchArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench(BenchCommand::Model(args)) => mone::bench::run_model_bench(&args),
        Command::Config { preset } => {
            let cfg = mone::model::Config::preset(&preset)?;
            println!("{}", serde_json::to_string_pretty(&cfg)?);
            for e_c in [None, Some(1.0), Some(0.5), Some(0.3)] {
                let m = mone::model::flops::macs(&cfg, e_c)?;
                let name = e_c.map_or("dense".to_string(), |c| format!("e_c {c}"));
                eprintln!("{name:>9}: {:.2} GMACs per clip", m.gmacs());
            }
            Ok(())
        }
    }
}
