//! Debian package handling through the system's own tools: `apt-cache`
//! to resolve candidate versions, `apt-get download` to fetch `.deb`s
//! (verified by apt against the signed lists), `dpkg-deb -x` to unpack.
//!
//! `apt-get update` is run only when a lookup or download fails, since the
//! lists may simply be missing on a fresh machine.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Errors of the package step.
#[derive(Debug, thiserror::Error)]
pub enum AptError {
    /// A tool could not be run or failed.
    #[error("`{cmd}` failed: {detail}")]
    Tool {
        /// Command line.
        cmd: String,
        /// stderr or the spawn error.
        detail: String,
    },
    /// apt knows no candidate for the package.
    #[error("no installable candidate for package {name}")]
    NoCandidate {
        /// Package name.
        name: String,
    },
    /// A filesystem operation failed.
    #[error("cannot access {path}")]
    Io {
        /// Path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

/// A package resolved to an exact version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageRef {
    /// Package name.
    pub name: String,
    /// Exact version.
    pub version: String,
    /// Dependency names (first alternative of each, without versions).
    pub depends: Vec<String>,
}

fn run(cmd: &mut Command) -> Result<Vec<u8>, AptError> {
    let line = format!("{cmd:?}").replace('"', "");
    let out = cmd.output().map_err(|e| AptError::Tool {
        cmd: line.clone(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(AptError::Tool {
            cmd: line,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

/// Parse one `apt-cache show --no-all-versions` stanza.
pub fn parse_show(name: &str, text: &str) -> Option<PackageRef> {
    let mut version = None;
    let mut depends = Vec::new();
    for line in text.lines() {
        if line.is_empty() && version.is_some() {
            break; // Only the first stanza.
        }
        if let Some(v) = line.strip_prefix("Version: ") {
            version = Some(v.trim().to_string());
        } else if let Some(d) = line.strip_prefix("Depends: ") {
            depends = d
                .split(',')
                .filter_map(|alt| {
                    let first = alt.split('|').next()?.trim();
                    let name = first.split([' ', '(', ':']).next()?.trim();
                    (!name.is_empty()).then(|| name.to_string())
                })
                .collect();
        }
    }
    Some(PackageRef {
        name: name.to_string(),
        version: version?,
        depends,
    })
}

/// Candidate version of `name` (no update attempted).
fn candidate_once(name: &str) -> Result<PackageRef, AptError> {
    let out = run(Command::new("apt-cache")
        .args(["show", "--no-all-versions"])
        .arg(name))?;
    parse_show(name, &String::from_utf8_lossy(&out)).ok_or_else(|| AptError::NoCandidate {
        name: name.to_string(),
    })
}

/// Refresh the package lists.
pub fn update() -> Result<(), AptError> {
    tracing::info!("running apt-get update");
    run(Command::new("apt-get").args(["update", "-q"]))?;
    Ok(())
}

/// Candidate version of `name`; runs `apt-get update` once if apt does
/// not know the package.
pub fn candidate(name: &str) -> Result<PackageRef, AptError> {
    match candidate_once(name) {
        Ok(p) => Ok(p),
        Err(first) => {
            tracing::debug!(package = name, cause = %first, "lookup failed, updating lists");
            update()?;
            candidate_once(name)
        }
    }
}

/// Resolve a kernel package: a metapackage such as `linux-image-amd64`
/// becomes the real `linux-image-<version>-<flavour>` it depends on; a
/// real image package resolves to itself.
pub fn resolve_kernel(name: &str) -> Result<PackageRef, AptError> {
    let pkg = candidate(name)?;
    match pkg
        .depends
        .iter()
        .find(|d| d.starts_with("linux-image-") && !d.ends_with("-unsigned"))
    {
        Some(real) => candidate(real),
        None => Ok(pkg),
    }
}

/// Kernel release of a real image package (`linux-image-6.1.0-56-amd64`
/// -> `6.1.0-56-amd64`).
pub fn kernel_release(package: &str) -> Option<&str> {
    package.strip_prefix("linux-image-")
}

/// The cached `.deb` of `pkg` in `debs_dir`, downloading it if needed.
pub fn fetch(pkg: &PackageRef, debs_dir: &Path) -> Result<PathBuf, AptError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AptError::Io { path, source }
    };
    // Epochs (`1:1.35`) appear as `%3a` in apt's file names; we name the
    // cached file ourselves to avoid depending on that.
    let file = debs_dir.join(format!(
        "{}_{}.deb",
        pkg.name,
        pkg.version.replace(':', "%3a")
    ));
    if file.is_file() {
        return Ok(file);
    }
    std::fs::create_dir_all(debs_dir).map_err(io(debs_dir))?;
    let dl = debs_dir.join(format!("dl-{}", std::process::id()));
    std::fs::create_dir_all(&dl).map_err(io(&dl))?;
    let spec = format!("{}={}", pkg.name, pkg.version);
    tracing::info!(package = %spec, "downloading");
    let download = || {
        run(Command::new("apt-get")
            .args(["download", "-q"])
            .arg(&spec)
            .current_dir(&dl))
    };
    if let Err(first) = download() {
        tracing::debug!(cause = %first, "download failed, updating lists");
        update()?;
        download()?;
    }
    let got = std::fs::read_dir(&dl)
        .map_err(io(&dl))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| AptError::Tool {
            cmd: format!("apt-get download {spec}"),
            detail: "no .deb file was produced".into(),
        })?;
    std::fs::rename(&got, &file).map_err(io(&file))?;
    let _ = std::fs::remove_dir_all(&dl);
    Ok(file)
}

/// Unpack a `.deb`'s data into `dest`.
pub fn extract(deb: &Path, dest: &Path) -> Result<(), AptError> {
    std::fs::create_dir_all(dest).map_err(|source| AptError::Io {
        path: dest.to_path_buf(),
        source,
    })?;
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dest))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_show_output() {
        let text = "Package: linux-image-amd64\nSource: linux-signed-amd64 (6.1.192+2)\n\
                    Version: 6.1.192-2\nDepends: linux-image-6.1.0-56-amd64 (= 6.1.192-2), \
                    foo:any | bar\nDescription: x\n\nPackage: other\nVersion: 9\n";
        let p = parse_show("linux-image-amd64", text).unwrap();
        assert_eq!(p.version, "6.1.192-2");
        assert_eq!(p.depends, ["linux-image-6.1.0-56-amd64", "foo"]);
        assert!(parse_show("x", "Package: x\n").is_none());
        assert_eq!(
            kernel_release("linux-image-6.1.0-56-amd64"),
            Some("6.1.0-56-amd64")
        );
    }
}
