//! Where the default model is found when no folder is given, in order: `$MONE_MODEL_DIR`;
//! `models/<default>` under the current directory; `$XDG_DATA_HOME/mone/models/<default>`
//! (`~/.local/share/...`); `models/<default>` beside the executable (and one level up, for
//! `target/release/mone`); and last the small shipped model embedded in the binary, unpacked
//! once into the cache (`$XDG_CACHE_HOME/mone/models/`).

use std::path::{Path, PathBuf};

/// The default model's folder name.
pub const DEFAULT_NAME: &str = "mone-vivit-tiny-motion";

const EMBEDDED: [(&str, &[u8]); 3] = [
    (
        "config.json",
        include_bytes!("../../models/mone-vivit-tiny-motion/config.json"),
    ),
    (
        "labels.txt",
        include_bytes!("../../models/mone-vivit-tiny-motion/labels.txt"),
    ),
    (
        "model.safetensors",
        include_bytes!("../../models/mone-vivit-tiny-motion/model.safetensors"),
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum LocateError {
    #[error("no model folder at {0} (it needs config.json, model.safetensors and labels.txt)")]
    Missing(PathBuf),
    #[error("no model found; looked in: {0}")]
    NotFound(String),
    #[error("cannot unpack the embedded model into {0}: {1}")]
    Unpack(PathBuf, std::io::Error),
}

/// A place the default model may be, and whether it is there.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub source: &'static str,
    pub path: PathBuf,
    pub found: bool,
}

fn is_model_dir(p: &Path) -> bool {
    ["config.json", "model.safetensors", "labels.txt"]
        .iter()
        .all(|f| p.join(f).is_file())
}

fn env_dir(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn home() -> Option<PathBuf> {
    env_dir("HOME")
}

fn cache_dir() -> Option<PathBuf> {
    env_dir("XDG_CACHE_HOME")
        .or_else(|| home().map(|h| h.join(".cache")))
        .map(|d| d.join("mone").join("models"))
}

/// Every place looked at, in order (the embedded model last, always found).
pub fn candidates() -> Vec<Candidate> {
    let mut c: Vec<(&'static str, PathBuf)> = Vec::new();
    if let Some(d) = env_dir("MONE_MODEL_DIR") {
        c.push(("$MONE_MODEL_DIR", d));
    }
    c.push((
        "current directory",
        PathBuf::from("models").join(DEFAULT_NAME),
    ));
    if let Some(d) = env_dir("XDG_DATA_HOME").or_else(|| home().map(|h| h.join(".local/share"))) {
        c.push((
            "user data",
            d.join("mone").join("models").join(DEFAULT_NAME),
        ));
    }
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        c.push((
            "beside the executable",
            exe_dir.join("models").join(DEFAULT_NAME),
        ));
        // target/release/mone in a checkout: the repository's models/.
        for up in exe_dir.ancestors().skip(1).take(2) {
            c.push((
                "beside the executable",
                up.join("models").join(DEFAULT_NAME),
            ));
        }
    }
    let mut out: Vec<Candidate> = c
        .into_iter()
        .map(|(source, path)| Candidate {
            source,
            found: is_model_dir(&path),
            path,
        })
        .collect();
    out.push(Candidate {
        source: "embedded in the binary",
        path: embedded_dir().unwrap_or_default(),
        found: true,
    });
    out
}

/// Where the embedded model is unpacked: keyed by a hash of its bytes, so a binary with other
/// weights never reads an old copy.
fn embedded_dir() -> Option<PathBuf> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (_, bytes) in EMBEDDED {
        for b in bytes.iter() {
            h = (h ^ *b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    cache_dir().map(|d| d.join(format!("embedded-{h:016x}")).join(DEFAULT_NAME))
}

fn unpack_embedded() -> Result<PathBuf, LocateError> {
    let dir = embedded_dir().unwrap_or_else(|| {
        std::env::temp_dir()
            .join("mone-embedded")
            .join(DEFAULT_NAME)
    });
    let err = |e| LocateError::Unpack(dir.clone(), e);
    std::fs::create_dir_all(&dir).map_err(err)?;
    for (name, bytes) in EMBEDDED {
        let p = dir.join(name);
        if std::fs::metadata(&p).map(|m| m.len() as usize).ok() != Some(bytes.len()) {
            // Written beside, then renamed: a concurrent start never reads half a file.
            let tmp = dir.join(format!(".{name}.{}", std::process::id()));
            std::fs::write(&tmp, bytes).map_err(err)?;
            std::fs::rename(&tmp, &p).map_err(err)?;
        }
    }
    Ok(dir)
}

/// The model folder to load: `explicit` when given (it must be one), else the first candidate
/// found, else the embedded model. Returns the folder and where it came from.
pub fn resolve(explicit: Option<&Path>) -> Result<(PathBuf, &'static str), LocateError> {
    if let Some(p) = explicit {
        if !is_model_dir(p) {
            return Err(LocateError::Missing(p.to_path_buf()));
        }
        return Ok((p.to_path_buf(), "given"));
    }
    let all = candidates();
    if let Some(c) = all
        .iter()
        .find(|c| c.found && c.source != "embedded in the binary")
    {
        return Ok((c.path.clone(), c.source));
    }
    match unpack_embedded() {
        Ok(d) => Ok((d, "embedded in the binary")),
        Err(e) => Err(LocateError::NotFound(format!(
            "{}; and {e}",
            all.iter()
                .filter(|c| c.source != "embedded in the binary")
                .map(|c| format!("{} ({})", c.path.display(), c.source))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}
