use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Activations of tens of megabytes are freed and allocated again in every layer. Handing them
/// back to the OS (glibc's mmap threshold, jemalloc's default decay) makes every forward
/// page-fault them in anew, about 25 ms per 38 MB buffer here; keeping freed pages for reuse
/// costs only the peak working set, which the process needs anyway.
#[export_name = "_rjem_malloc_conf"]
pub static MALLOC_CONF: &[u8; 47] = b"thp:always,dirty_decay_ms:-1,muzzy_decay_ms:-1\0";

/// Training with the nested widths frees and allocates activations of many sizes (four
/// forwards a step); never purging them let the freed-but-unreusable pages grow the process by
/// tens of MB a step (5.3 GB after 70 steps, measured). Training purges pages unused for
/// `ms` instead; RSS then stays flat.
fn purge_after(ms: isize) {
    // (An arena not created yet takes the `arenas.*` default and refuses its own setting.)
    let set = |name: String, quiet: bool| {
        let c = format!("{name}\0");
        let mut v = ms;
        // SAFETY: a NUL-terminated name and a value of the ssize_t type these controls take.
        let rc = unsafe {
            tikv_jemalloc_sys::mallctl(
                c.as_ptr().cast(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                (&mut v as *mut isize).cast(),
                std::mem::size_of::<isize>(),
            )
        };
        if rc != 0 && !quiet {
            eprintln!("warning: cannot set the allocator's {name} (error {rc})");
        }
    };
    let mut narenas: u32 = 0;
    let mut len = std::mem::size_of::<u32>();
    // SAFETY: reads an unsigned into a buffer of that size.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            c"arenas.narenas".as_ptr(),
            (&mut narenas as *mut u32).cast(),
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    if rc != 0 {
        eprintln!("warning: cannot read the allocator's arena count (error {rc})");
    }
    set("arenas.dirty_decay_ms".into(), false);
    set("arenas.muzzy_decay_ms".into(), false);
    for i in 0..narenas {
        set(format!("arena.{i}.dirty_decay_ms"), true);
        set(format!("arena.{i}.muzzy_decay_ms"), true);
    }
}

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
    /// Classify video files or streams as fast as the machine allows; events as JSON Lines.
    #[cfg(feature = "gst")]
    Classify(mone::cli::ClassifyArgs),
    /// Run a long-lived multi-stream pipeline described by a TOML file.
    #[cfg(feature = "gst")]
    Run {
        /// Pipeline config (see docs/pipelines.md).
        config: std::path::PathBuf,
    },
    /// Queue file jobs on NATS JetStream for `mone worker`s.
    #[cfg(feature = "gst")]
    Submit(mone::cli::cluster::SubmitArgs),
    /// Lease cameras and pull file jobs from NATS JetStream; publish their events there.
    #[cfg(feature = "gst")]
    Worker(mone::cli::cluster::WorkerArgs),
    /// The cameras the cluster's workers lease (a KV bucket on NATS JetStream).
    #[cfg(feature = "gst")]
    #[command(subcommand)]
    Streams(mone::cli::cluster::StreamsCommand),
    /// Print the events stream on NATS JetStream as JSON Lines.
    #[cfg(feature = "gst")]
    Events(mone::cli::cluster::EventsArgs),
    /// Model folders.
    #[cfg(feature = "gst")]
    #[command(subcommand)]
    Model(ModelCommand),
    /// The procedural motion-action dataset.
    #[cfg(feature = "gst")]
    #[command(subcommand)]
    Dataset(DatasetCommand),
    /// Encode a test-pattern video (for demos and benchmarks).
    #[cfg(feature = "gst")]
    SampleVideo(mone::cli::SampleVideoArgs),
    /// Train a MoNE-ViViT on the procedural motion dataset (resumes from --out).
    Train(Box<mone::train::TrainArgs>),
    /// Accuracy against compute: MoNE at several capacities, random router, baselines, plot.
    #[cfg(feature = "gst")]
    Eval(mone::eval::EvalArgs),
    /// Draw which tubelets of a clip went to which nested expert (the router's importance map).
    #[cfg(feature = "gst")]
    Explain(mone::cli::ExplainArgs),
    /// Import a HuggingFace transformers ViViT or VideoMAE video classifier (a local folder
    /// with config.json and model.safetensors) as a model folder.
    ImportHf(ImportHfArgs),
    /// Run a model on a raw input tensor from a safetensors file and print the logits.
    Infer(mone::infer::InferArgs),
    /// Measure the model and the pipeline.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Print a model preset's config (JSON) and its compute per clip.
    Config {
        /// Preset name (vivit-fe-b16, vivit-fe-s16, vivit-fe-motion, vivit-fe-tiny, vivit-b16,
        /// vivit-joint-motion, vivit-joint-tiny).
        preset: String,
    },
}

#[derive(clap::Args)]
struct ImportHfArgs {
    /// The checkpoint folder (config.json, model.safetensors, preprocessor_config.json).
    src: std::path::PathBuf,
    /// The model folder to write.
    #[arg(long)]
    out: std::path::PathBuf,
    /// Nested experts for MoNE (fewer when the width does not halve that often).
    #[arg(long, default_value_t = 4)]
    experts: usize,
}

#[cfg(feature = "gst")]
#[derive(Subcommand)]
enum ModelCommand {
    /// Write a model folder with random weights (for trying the pipeline; it classifies nothing).
    #[cfg(feature = "gst")]
    Init(mone::cli::InitModelArgs),
    /// Where the default model is looked for, and which one is used.
    #[cfg(feature = "gst")]
    List,
}

#[cfg(feature = "gst")]
#[derive(Subcommand)]
enum DatasetCommand {
    /// Write clips as video files through GStreamer, with a labels CSV.
    Render(mone::cli::DatasetRenderArgs),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Latency and clips/s of MoNE at every capacity against the dense forward.
    Model(mone::bench::ModelBenchArgs),
    /// GFLOP/s of the nested layers' products on one preset's dense and expert-group shapes.
    Gemm(mone::bench_gemm::GemmBenchArgs),
    /// Resident memory and clips/s over training steps of one phase (flat memory check).
    Train(mone::bench_train::TrainBenchArgs),
    /// Frames/s of decode, model and the full pipeline on one long input, in one run.
    #[cfg(feature = "gst")]
    Pipeline(mone::bench_pipeline::PipelineBenchArgs),
    /// Live streams under a latency target with a load step: adaptive vs fixed capacities.
    #[cfg(feature = "gst")]
    Adaptive(mone::bench_adaptive::AdaptiveBenchArgs),
    /// Peak memory and threads of `mone classify` over folders of N videos (bounded --jobs).
    #[cfg(feature = "gst")]
    Classify(mone::bench_classify::ClassifyBenchArgs),
}

fn main() {
    let cli = Cli::parse();
    let guard = mone::redact::redact_stderr().unwrap_or(None);
    let code = match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            2
        }
    };
    drop(guard);
    std::process::exit(code)
}

fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    Ok(match cli.command {
        #[cfg(feature = "gst")]
        Command::Classify(a) => mone::cli::classify(&a)?,
        #[cfg(feature = "gst")]
        Command::Run { config } => mone::cli::run_pipeline(&config)?,
        #[cfg(feature = "gst")]
        Command::Submit(a) => mone::cli::cluster::submit(&a)?,
        #[cfg(feature = "gst")]
        Command::Worker(a) => mone::cli::cluster::worker(&a)?,
        #[cfg(feature = "gst")]
        Command::Events(a) => mone::cli::cluster::events(&a)?,
        #[cfg(feature = "gst")]
        Command::Streams(c) => mone::cli::cluster::streams(&c)?,
        #[cfg(feature = "gst")]
        Command::Model(ModelCommand::Init(a)) => mone::cli::init_model(&a).map(|_| 0)?,
        #[cfg(feature = "gst")]
        Command::Model(ModelCommand::List) => mone::cli::list_models().map(|_| 0)?,
        #[cfg(feature = "gst")]
        Command::Dataset(DatasetCommand::Render(a)) => mone::cli::render_dataset(&a).map(|_| 0)?,
        #[cfg(feature = "gst")]
        Command::SampleVideo(a) => mone::cli::sample_video(&a).map(|_| 0)?,
        #[cfg(feature = "gst")]
        Command::Eval(a) => mone::cli::eval(&a).map(|_| 0)?,
        #[cfg(feature = "gst")]
        Command::Explain(a) => mone::cli::explain(&a).map(|_| 0)?,
        Command::Train(a) => {
            purge_after(1000);
            mone::train::run(&a).map(|_| 0)?
        }
        Command::ImportHf(a) => {
            let r = mone::import::import_hf(&a.src, &a.out, a.experts)?;
            eprintln!(
                "imported {:?}: {} classes, {} frames at {} px, {} tokens per clip, {} experts -> {}",
                r.arch,
                r.labels.len(),
                r.config.frames,
                r.config.image_size,
                r.config.joint_seq_len(),
                r.config.num_experts,
                r.out.display()
            );
            0
        }
        Command::Infer(a) => mone::infer::run(&a).map(|_| 0)?,
        Command::Bench(BenchCommand::Model(a)) => mone::bench::run_model_bench(&a).map(|_| 0)?,
        Command::Bench(BenchCommand::Train(a)) => {
            purge_after(1000);
            mone::bench_train::run_train_bench(&a).map(|_| 0)?
        }
        Command::Bench(BenchCommand::Gemm(a)) => mone::bench_gemm::run_gemm_bench(&a).map(|_| 0)?,
        #[cfg(feature = "gst")]
        Command::Bench(BenchCommand::Pipeline(a)) => {
            mone::bench_pipeline::run_pipeline_bench(&a).map(|_| 0)?
        }
        #[cfg(feature = "gst")]
        Command::Bench(BenchCommand::Classify(a)) => {
            mone::bench_classify::run_classify_bench(&a).map(|_| 0)?
        }
        #[cfg(feature = "gst")]
        Command::Bench(BenchCommand::Adaptive(a)) => {
            mone::bench_adaptive::run_adaptive_bench(&a).map(|_| 0)?
        }
        Command::Config { preset } => mone::bench::print_config(&preset).map(|_| 0)?,
    })
}
