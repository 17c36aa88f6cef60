//! Kernel module lookup and dependency resolution without `modules.dep`.
//!
//! Debian's kernel package ships the modules but not `modules.dep` (depmod
//! runs at install time), so dependencies are read from each module's own
//! `.modinfo` ELF section (`depends=a,b`), which is what depmod reads too.
//! Modules may be plain `.ko`, `.ko.xz` or `.ko.zst`; compressed ones are
//! unpacked with the `xz`/`zstd` command-line tools (busybox `insmod`
//! wants plain ELF).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Deepest dependency chain accepted: real chains are < 10 long; a longer
/// one means a cycle the visited-set missed or a corrupt module.
pub const MAX_DEPTH: usize = 64;

/// Errors of module resolution.
#[derive(Debug, thiserror::Error)]
pub enum KmodError {
    /// Reading the module tree failed.
    #[error("cannot read {path}")]
    Io {
        /// Path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The module is not an ELF64 little-endian object or is truncated.
    #[error("{name} is not a valid ELF64 module ({what})")]
    BadElf {
        /// Module name.
        name: String,
        /// What was wrong.
        what: &'static str,
    },
    /// A required module is neither a file nor built in.
    #[error("module {name} not found (needed by {needed_by})")]
    Missing {
        /// Module name.
        name: String,
        /// Who needs it.
        needed_by: String,
    },
    /// Decompression failed or the tool is missing.
    #[error("cannot decompress {path} with {tool}: {detail}")]
    Decompress {
        /// Module file.
        path: PathBuf,
        /// Tool used.
        tool: &'static str,
        /// What happened.
        detail: String,
    },
    /// The dependency chain is too deep (likely a cycle).
    #[error("dependency chain too deep at {name}")]
    TooDeep {
        /// Module where it happened.
        name: String,
    },
}

/// Canonical module name: the kernel treats `-` and `_` alike.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// Module name of a file path (`.../virtio-rng.ko.xz` -> `virtio_rng`).
pub fn module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = file
        .strip_suffix(".ko")
        .or_else(|| file.strip_suffix(".ko.xz"))
        .or_else(|| file.strip_suffix(".ko.zst"))
        .or_else(|| file.strip_suffix(".ko.gz"))?;
    Some(normalize(stem))
}

fn rd_u16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn rd_u32(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn rd_u64(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// The `key=value` entries of an ELF64 module's `.modinfo` section.
pub fn modinfo(name: &str, elf: &[u8]) -> Result<Vec<(String, String)>, KmodError> {
    let bad = |what| KmodError::BadElf {
        name: name.to_string(),
        what,
    };
    if elf.get(..4) != Some(b"\x7fELF") {
        return Err(bad("no ELF magic"));
    }
    if elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err(bad("not ELF64 little-endian"));
    }
    let shoff = rd_u64(elf, 0x28).ok_or(bad("truncated header"))?;
    let shentsize = usize::from(rd_u16(elf, 0x3a).ok_or(bad("truncated header"))?);
    let shnum = usize::from(rd_u16(elf, 0x3c).ok_or(bad("truncated header"))?);
    let shstrndx = usize::from(rd_u16(elf, 0x3e).ok_or(bad("truncated header"))?);
    if shentsize < 64 || shstrndx >= shnum {
        return Err(bad("bad section header table"));
    }
    let shoff = usize::try_from(shoff).map_err(|_| bad("bad section offset"))?;
    let section = |i: usize| -> Option<(u32, usize, usize)> {
        let base = shoff.checked_add(i.checked_mul(shentsize)?)?;
        let name = rd_u32(elf, base)?;
        let off = usize::try_from(rd_u64(elf, base + 24)?).ok()?;
        let size = usize::try_from(rd_u64(elf, base + 32)?).ok()?;
        elf.get(off..off.checked_add(size)?)?;
        Some((name, off, size))
    };
    let (_, str_off, str_size) = section(shstrndx).ok_or(bad("bad string table"))?;
    let strtab = &elf[str_off..str_off + str_size];
    for i in 0..shnum {
        let (name_off, off, size) = section(i).ok_or(bad("bad section header"))?;
        let sec_name = strtab
            .get(name_off as usize..)
            .and_then(|s| s.split(|b| *b == 0).next())
            .unwrap_or_default();
        if sec_name == b".modinfo" {
            return Ok(elf[off..off + size]
                .split(|b| *b == 0)
                .filter_map(|kv| {
                    let kv = String::from_utf8_lossy(kv);
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_string(), v.to_string()))
                })
                .collect());
        }
    }
    Err(bad("no .modinfo section"))
}

/// Dependencies listed in a module's `.modinfo` (`depends=`).
pub fn depends(name: &str, elf: &[u8]) -> Result<Vec<String>, KmodError> {
    Ok(modinfo(name, elf)?
        .into_iter()
        .filter(|(k, _)| k == "depends")
        .flat_map(|(_, v)| {
            v.split(',')
                .filter(|d| !d.is_empty())
                .map(normalize)
                .collect::<Vec<_>>()
        })
        .collect())
}

/// A resolved module, decompressed.
#[derive(Debug, Clone)]
pub struct Module {
    /// Canonical name.
    pub name: String,
    /// Source file in the module tree.
    pub source: PathBuf,
    /// Plain ELF bytes.
    pub data: Vec<u8>,
}

/// Index of a `lib/modules/<version>` tree.
#[derive(Debug)]
pub struct ModuleTree {
    files: HashMap<String, PathBuf>,
    builtin: HashSet<String>,
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), KmodError> {
    let io = |source| KmodError::Io {
        path: dir.to_path_buf(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let ft = entry.file_type().map_err(io)?;
        if ft.is_dir() {
            walk(&entry.path(), out)?;
        } else if ft.is_file() {
            out.push(entry.path());
        }
    }
    Ok(())
}

impl ModuleTree {
    /// Index the tree at `dir` (`.../lib/modules/<version>`).
    pub fn scan(dir: &Path) -> Result<Self, KmodError> {
        let mut paths = Vec::new();
        walk(dir, &mut paths)?;
        paths.sort();
        let mut files = HashMap::new();
        for p in paths {
            if let Some(name) = module_name(&p) {
                files.entry(name).or_insert(p);
            }
        }
        // modules.builtin lists `kernel/drivers/.../name.ko` for =y
        // modules: those need no file and satisfy dependencies.
        let builtin = std::fs::read_to_string(dir.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| module_name(Path::new(l)))
            .collect();
        Ok(Self { files, builtin })
    }

    /// Whether `name` is built into the kernel.
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&normalize(name))
    }

    /// Whether `name` exists as a module file.
    pub fn has_file(&self, name: &str) -> bool {
        self.files.contains_key(&normalize(name))
    }

    /// Decompressed bytes of module `name`'s file.
    pub fn load(&self, name: &str) -> Result<Module, KmodError> {
        let name = normalize(name);
        let path = self.files.get(&name).ok_or_else(|| KmodError::Missing {
            name: name.clone(),
            needed_by: "request".into(),
        })?;
        let file = path.to_string_lossy();
        let data = if file.ends_with(".ko") {
            std::fs::read(path).map_err(|source| KmodError::Io {
                path: path.clone(),
                source,
            })?
        } else {
            let tool = if file.ends_with(".xz") {
                "xz"
            } else if file.ends_with(".zst") {
                "zstd"
            } else {
                "gzip"
            };
            let out = Command::new(tool)
                .arg("-dc")
                .arg(path)
                .output()
                .map_err(|e| KmodError::Decompress {
                    path: path.clone(),
                    tool,
                    detail: e.to_string(),
                })?;
            if !out.status.success() {
                return Err(KmodError::Decompress {
                    path: path.clone(),
                    tool,
                    detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                });
            }
            out.stdout
        };
        Ok(Module {
            name,
            source: path.clone(),
            data,
        })
    }

    /// Resolve `required` (error if missing and not built in) and
    /// `optional` (skipped if absent) with all their dependencies, in load
    /// order: every module comes after its dependencies.
    pub fn resolve(&self, required: &[&str], optional: &[&str]) -> Result<Vec<Module>, KmodError> {
        let mut order = Vec::new();
        let mut done = HashSet::new();
        for name in required {
            self.visit(&normalize(name), "request", 0, &mut done, &mut order)?;
        }
        for name in optional {
            let n = normalize(name);
            if self.has_file(&n) {
                self.visit(&n, "request", 0, &mut done, &mut order)?;
            }
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        needed_by: &str,
        depth: usize,
        done: &mut HashSet<String>,
        order: &mut Vec<Module>,
    ) -> Result<(), KmodError> {
        if depth > MAX_DEPTH {
            return Err(KmodError::TooDeep {
                name: name.to_string(),
            });
        }
        if done.contains(name) {
            return Ok(());
        }
        done.insert(name.to_string());
        if !self.has_file(name) {
            if self.is_builtin(name) {
                return Ok(());
            }
            return Err(KmodError::Missing {
                name: name.to_string(),
                needed_by: needed_by.to_string(),
            });
        }
        let module = self.load(name)?;
        for dep in depends(name, &module.data)? {
            self.visit(&dep, name, depth + 1, done, order)?;
        }
        tracing::debug!(module = name, "resolved kernel module");
        order.push(module);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 object with a `.modinfo` section.
    fn fake_module(modinfo: &[u8]) -> Vec<u8> {
        let shstr = b"\0.modinfo\0.shstrtab\0";
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        let modinfo_off = elf.len();
        elf.extend_from_slice(modinfo);
        let shstr_off = elf.len();
        elf.extend_from_slice(shstr);
        while elf.len() % 8 != 0 {
            elf.push(0);
        }
        let shoff = elf.len();
        let mut sh = |name: u32, off: usize, size: usize| {
            let mut s = [0u8; 64];
            s[0..4].copy_from_slice(&name.to_le_bytes());
            s[24..32].copy_from_slice(&(off as u64).to_le_bytes());
            s[32..40].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&s);
        };
        sh(0, 0, 0);
        sh(1, modinfo_off, modinfo.len());
        sh(10, shstr_off, shstr.len());
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
        elf
    }

    #[test]
    fn parses_modinfo() {
        let elf = fake_module(b"license=GPL\0depends=virtio,virtio-ring\0vermagic=6.1\0");
        assert_eq!(depends("m", &elf).unwrap(), ["virtio", "virtio_ring"]);
        let none = fake_module(b"depends=\0");
        assert!(depends("m", &none).unwrap().is_empty());
        assert!(modinfo("m", b"not elf").is_err());
        assert!(modinfo("m", &elf[..100]).is_err());
    }

    #[test]
    fn resolves_in_dependency_order() {
        let dir = std::env::temp_dir().join(format!("godwit-kmod-{}", std::process::id()));
        let k = dir.join("kernel/drivers");
        std::fs::create_dir_all(&k).unwrap();
        std::fs::write(k.join("a.ko"), fake_module(b"depends=b,c\0")).unwrap();
        std::fs::write(k.join("b.ko"), fake_module(b"depends=c,builtin_one\0")).unwrap();
        std::fs::write(k.join("c.ko"), fake_module(b"depends=\0")).unwrap();
        std::fs::write(k.join("bad-dep.ko"), fake_module(b"depends=ghost\0")).unwrap();
        std::fs::write(
            dir.join("modules.builtin"),
            "kernel/drivers/builtin_one.ko\nkernel/x/builtin-two.ko\n",
        )
        .unwrap();
        let t = ModuleTree::scan(&dir).unwrap();
        let names: Vec<String> = t
            .resolve(&["a", "builtin_two"], &["nope"])
            .unwrap()
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(names, ["c", "b", "a"]);
        assert!(matches!(
            t.resolve(&["bad_dep"], &[]),
            Err(KmodError::Missing { name, needed_by }) if name == "ghost" && needed_by == "bad_dep"
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
