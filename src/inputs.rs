//! The inputs of a batch run: paths, URIs and `test:` sources as given, folders searched
//! recursively for video files (in a stable order: names sorted, depth first), and list files
//! (one input per line, `-` for stdin). Repeats are dropped, so a file listed twice runs once.

use std::collections::HashSet;
use std::io::BufRead;
use std::path::{Path, PathBuf};

/// File extensions taken from a folder (lower case).
pub const VIDEO_EXTENSIONS: &[&str] = &[
    "mp4", "m4v", "mov", "mkv", "webm", "avi", "ts", "mts", "m2ts", "mpg", "mpeg", "flv", "wmv",
    "ogv", "3gp", "mxf", "mjpeg", "mjpg", "y4m", "h264", "h265", "hevc",
];

#[derive(Debug, thiserror::Error)]
pub enum InputsError {
    #[error("cannot read the input list {path}: {error}")]
    List { path: String, error: std::io::Error },
    #[error("cannot read the folder {path}: {error}")]
    Folder {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("no inputs: give files, folders, URIs or --from-file")]
    Empty,
}

fn is_video(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| VIDEO_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Video files under `dir`, sorted by name at every level, depth first. Symlinked folders are
/// not followed (a loop would never end); symlinked files are.
fn walk(dir: &Path, out: &mut Vec<String>) -> Result<(), InputsError> {
    let err = |error| InputsError::Folder {
        path: dir.to_path_buf(),
        error,
    };
    let mut entries: Vec<(PathBuf, bool)> = std::fs::read_dir(dir)
        .map_err(err)?
        .filter_map(|e| e.ok())
        .map(|e| {
            let real_dir = e.file_type().is_ok_and(|t| t.is_dir());
            (e.path(), real_dir)
        })
        .collect();
    entries.sort();
    for (path, is_dir) in entries {
        if is_dir {
            walk(&path, out)?;
        } else if is_video(&path) && path.is_file() {
            out.push(path.display().to_string());
        }
    }
    Ok(())
}

/// Read a list: one input per line; blank lines and lines starting with `#` are skipped.
fn read_list(list: &str) -> Result<Vec<String>, InputsError> {
    let err = |error| InputsError::List {
        path: list.to_string(),
        error,
    };
    let reader: Box<dyn BufRead> = if list == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(list).map_err(err)?,
        ))
    };
    let mut out = Vec::new();
    for line in reader.lines() {
        let line = line.map_err(err)?;
        let t = line.trim();
        if !t.is_empty() && !t.starts_with('#') {
            out.push(t.to_string());
        }
    }
    Ok(out)
}

/// Every input in order: `inputs`, then the list's lines; folders expanded. A path that does
/// not exist is kept (the run reports it as `not_found` and goes on).
pub fn expand(inputs: &[String], from_file: Option<&str>) -> Result<Vec<String>, InputsError> {
    let mut given: Vec<String> = inputs.to_vec();
    if let Some(list) = from_file {
        given.extend(read_list(list)?);
    }
    let mut out = Vec::with_capacity(given.len());
    let mut seen = HashSet::new();
    for g in given {
        let p = Path::new(&g);
        let mut found = Vec::new();
        if !g.contains("://") && !g.starts_with("test:") && p.is_dir() {
            walk(p, &mut found)?;
        } else {
            found.push(g);
        }
        for f in found {
            if seen.insert(f.clone()) {
                out.push(f);
            }
        }
    }
    if out.is_empty() {
        return Err(InputsError::Empty);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_expand_in_a_stable_order_and_lists_add_inputs() {
        let d = std::env::temp_dir().join(format!("mone-inputs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("b/deeper")).unwrap();
        std::fs::create_dir_all(d.join("a")).unwrap();
        for f in [
            "b/2.mp4",
            "b/deeper/1.MKV",
            "a/z.webm",
            "a/notes.txt",
            "c.avi",
        ] {
            std::fs::write(d.join(f), b"x").unwrap();
        }
        let s = |p: &str| d.join(p).display().to_string();
        let got = expand(&[d.display().to_string()], None).unwrap();
        assert_eq!(
            got,
            [s("a/z.webm"), s("b/2.mp4"), s("b/deeper/1.MKV"), s("c.avi")]
        );
        let list = d.join("list.txt");
        std::fs::write(
            &list,
            format!(
                "# inputs\n\n{}\nrtsp://cam/x\n  {}  \n/no/such.mp4\n",
                s("c.avi"),
                s("a")
            ),
        )
        .unwrap();
        let got = expand(
            &["test:pattern=ball".into()],
            Some(&list.display().to_string()),
        )
        .unwrap();
        // c.avi once, though listed twice.
        assert_eq!(
            got,
            [
                "test:pattern=ball".to_string(),
                s("c.avi"),
                "rtsp://cam/x".into(),
                s("a/z.webm"),
                "/no/such.mp4".into()
            ]
        );
        assert!(matches!(
            expand(&[], Some("/no/such/list")),
            Err(InputsError::List { .. })
        ));
        std::fs::create_dir_all(d.join("empty")).unwrap();
        assert!(matches!(
            expand(&[s("empty")], None),
            Err(InputsError::Empty)
        ));
        std::fs::remove_dir_all(&d).ok();
    }
}
