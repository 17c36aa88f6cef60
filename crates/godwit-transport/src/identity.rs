//! Agent identity: a self-signed certificate, its private key, and the
//! certificate fingerprint peers pin.
//!
//! This module owns key generation (rcgen, ECDSA P-256), the on-disk layout
//! (`cert.pem` + `key.pem` in one directory, key mode 0600) and the
//! [`Fingerprint`] type (SHA-256 of the DER certificate). There is no CA: trust
//! is the fingerprint itself, so certificate validity dates and names are not
//! checked anywhere — they only make the certificate readable to a human.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

/// File name of the PEM certificate inside an identity directory.
pub const CERT_FILE: &str = "cert.pem";
/// File name of the PEM private key inside an identity directory.
pub const KEY_FILE: &str = "key.pem";
/// Suffix appended to the agent name to form the certificate CN and DNS SAN.
/// Purely informative: peers authenticate by fingerprint, never by name.
pub const NAME_SUFFIX: &str = ".godwit";
/// Length of a SHA-256 digest; the fingerprint is exactly this many bytes.
pub const FINGERPRINT_LEN: usize = 32;
/// Permission bits the key file is created with: owner read/write only, like
/// an ssh private key.
pub const KEY_FILE_MODE: u32 = 0o600;

/// Errors from creating, saving or loading an [`Identity`].
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// rcgen could not build the key pair or certificate.
    #[error("generating a self-signed certificate for {name:?}")]
    Generate {
        /// Agent name the certificate was for.
        name: String,
        /// Underlying rcgen error.
        #[source]
        source: rcgen::Error,
    },
    /// A file could not be read, written or inspected.
    #[error("accessing {path}")]
    Io {
        /// File or directory involved.
        path: PathBuf,
        /// Underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file did not contain the expected object.
    #[error("parsing {what} PEM from {path}")]
    Pem {
        /// "certificate" or "private key".
        what: &'static str,
        /// File involved.
        path: PathBuf,
        /// Underlying PEM error.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// The key file can be read by other users; refuse it like ssh does.
    #[error("private key {path} is readable by other users (mode {mode:o}); run chmod 600 on it")]
    InsecureKeyPermissions {
        /// Key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The private key is of a type rustls/ring cannot sign with, or does not
    /// match the certificate.
    #[error("private key is unusable with its certificate")]
    Key(#[source] rustls::Error),
}

/// This agent's certificate and private key.
pub struct Identity {
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

impl Identity {
    /// Generates a fresh ECDSA P-256 key and a self-signed certificate with
    /// CN and DNS SAN `"<name>.godwit"`.
    ///
    /// P-256 rather than Ed25519 because every rustls/ring build verifies it
    /// and it is what hardware tokens support, should keys move there later.
    pub fn generate(name: &str) -> Result<Identity, IdentityError> {
        let generate_err = |source| IdentityError::Generate {
            name: name.to_owned(),
            source,
        };
        let dns = format!("{name}{NAME_SUFFIX}");
        let key_pair =
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(generate_err)?;
        let mut params = rcgen::CertificateParams::new(vec![dns.clone()]).map_err(generate_err)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, dns);
        let cert = params.self_signed(&key_pair).map_err(generate_err)?;
        let key = PrivateKeyDer::Pkcs8(key_pair.serialize_der().into());
        Ok(Identity {
            cert: cert.der().clone(),
            key,
        })
    }

    /// Builds an identity from PEM text (certificate, private key).
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Identity, IdentityError> {
        let pem_err = |what, source| IdentityError::Pem {
            what,
            path: PathBuf::from("<memory>"),
            source,
        };
        let cert =
            CertificateDer::from_pem_slice(cert_pem).map_err(|e| pem_err("certificate", e))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| pem_err("private key", e))?;
        let identity = Identity { cert, key };
        identity.check_key()?;
        Ok(identity)
    }

    /// Writes `cert.pem` and `key.pem` into `dir` (created if missing). The
    /// key file is created with mode 0600 before any key byte is written.
    pub fn save(&self, dir: &Path) -> Result<(), IdentityError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| IdentityError::Io { path, source }
        };
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let cert_path = dir.join(CERT_FILE);
        fs::write(&cert_path, pem_encode("CERTIFICATE", &self.cert)).map_err(io_err(&cert_path))?;

        let key_path = dir.join(KEY_FILE);
        let label = match &self.key {
            PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
            PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
            _ => "PRIVATE KEY",
        };
        let mut options = fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(KEY_FILE_MODE);
        }
        let mut file = options.open(&key_path).map_err(io_err(&key_path))?;
        // An existing file keeps its old mode through `open`; force it down
        // before writing the secret.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(fs::Permissions::from_mode(KEY_FILE_MODE))
                .map_err(io_err(&key_path))?;
        }
        file.write_all(pem_encode(label, self.key.secret_der()).as_bytes())
            .map_err(io_err(&key_path))?;
        file.sync_all().map_err(io_err(&key_path))?;
        Ok(())
    }

    /// Loads `cert.pem` and `key.pem` from `dir`.
    ///
    /// Refuses a key readable by "other" users; a group-readable key only
    /// logs a warning, since some deployments share a service group.
    pub fn load(dir: &Path) -> Result<Identity, IdentityError> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| IdentityError::Io { path, source }
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&key_path)
                .map_err(io_err(&key_path))?
                .permissions()
                .mode()
                & 0o777;
            if mode & 0o007 != 0 {
                return Err(IdentityError::InsecureKeyPermissions {
                    path: key_path,
                    mode,
                });
            }
            if mode & 0o070 != 0 {
                tracing::warn!(path = %key_path.display(), mode = format_args!("{mode:o}"),
                    "private key is group-accessible");
            }
        }
        let cert_pem = fs::read(&cert_path).map_err(io_err(&cert_path))?;
        let key_pem = fs::read(&key_path).map_err(io_err(&key_path))?;
        let cert =
            CertificateDer::from_pem_slice(&cert_pem).map_err(|source| IdentityError::Pem {
                what: "certificate",
                path: cert_path.clone(),
                source,
            })?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|source| IdentityError::Pem {
            what: "private key",
            path: key_path.clone(),
            source,
        })?;
        let identity = Identity { cert, key };
        identity.check_key()?;
        Ok(identity)
    }

    /// SHA-256 fingerprint of the DER certificate: what peers pin.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of_der(&self.cert)
    }

    /// The DER certificate.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The certificate as PEM text.
    pub fn cert_pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.cert)
    }

    /// The rustls view of this identity (certificate chain + signing key).
    pub(crate) fn certified_key(
        &self,
    ) -> Result<std::sync::Arc<rustls::sign::CertifiedKey>, IdentityError> {
        let signer = rustls::crypto::ring::sign::any_supported_type(&self.key)
            .map_err(IdentityError::Key)?;
        let certified = rustls::sign::CertifiedKey::new(vec![self.cert.clone()], signer);
        certified.keys_match().map_err(IdentityError::Key)?;
        Ok(std::sync::Arc::new(certified))
    }

    fn check_key(&self) -> Result<(), IdentityError> {
        self.certified_key().map(|_| ())
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            cert: self.cert.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    // Standard base64 with 64-column lines (RFC 7468). Small enough to not
    // warrant a dependency.
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 0x3f) as usize]));
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        // Invariant: base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// SHA-256 of a DER certificate, shown as 64 lowercase hex digits.
///
/// Parsing also accepts upper case and colon-separated pairs
/// (`AB:CD:...`, as `openssl x509 -fingerprint -sha256` prints), and an
/// optional `sha256:` prefix.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint([u8; FINGERPRINT_LEN]);

impl Fingerprint {
    /// Fingerprint of a DER-encoded certificate.
    pub fn of_der(der: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(der).into())
    }

    /// Wraps raw digest bytes.
    pub const fn from_bytes(bytes: [u8; FINGERPRINT_LEN]) -> Fingerprint {
        Fingerprint(bytes)
    }

    /// The raw digest bytes.
    pub fn as_bytes(&self) -> &[u8; FINGERPRINT_LEN] {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// A string that is not a SHA-256 fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid fingerprint {input:?}: expected 64 hex digits (colons allowed)")]
pub struct FingerprintParseError {
    input: String,
}

impl FromStr for Fingerprint {
    type Err = FingerprintParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || FingerprintParseError {
            input: s.to_owned(),
        };
        let trimmed = s.trim();
        let body = trimmed
            .strip_prefix("sha256:")
            .or_else(|| trimmed.strip_prefix("SHA256:"))
            .unwrap_or(trimmed);
        let digits: String = body.chars().filter(|c| *c != ':').collect();
        let mut bytes = [0u8; FINGERPRINT_LEN];
        hex::decode_to_slice(&digits, &mut bytes).map_err(|_| err())?;
        Ok(Fingerprint(bytes))
    }
}

impl serde::Serialize for Fingerprint {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Fingerprint {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_roundtrips_and_accepts_openssl_form() {
        let id = Identity::generate("alpha").expect("generate");
        let fp = id.fingerprint();
        let shown = fp.to_string();
        assert_eq!(shown.len(), 64);
        assert!(shown
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(shown.parse::<Fingerprint>(), Ok(fp));
        let openssl: Vec<String> = fp.as_bytes().iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(openssl.join(":").parse::<Fingerprint>(), Ok(fp));
        assert_eq!(format!("sha256:{fp}").parse::<Fingerprint>(), Ok(fp));
        assert!("abcd".parse::<Fingerprint>().is_err());
        assert!(format!("zz{}", &shown[2..]).parse::<Fingerprint>().is_err());
        assert!(format!("{shown}00").parse::<Fingerprint>().is_err());
    }

    #[test]
    fn fingerprint_serde_is_a_string() {
        let fp = Identity::generate("a").expect("generate").fingerprint();
        let json = serde_json::to_string(&fp).expect("ser");
        assert_eq!(json, format!("\"{fp}\""));
        let back: Fingerprint = serde_json::from_str(&json).expect("de");
        assert_eq!(back, fp);
    }

    #[test]
    fn save_load_roundtrip_with_private_key_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = Identity::generate("node-1").expect("generate");
        id.save(dir.path()).expect("save");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.path().join(KEY_FILE))
                .expect("stat")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, KEY_FILE_MODE);
        }
        let loaded = Identity::load(dir.path()).expect("load");
        assert_eq!(loaded.fingerprint(), id.fingerprint());
        // The PEM we write is readable by the PEM parser (and thus openssl).
        let again = Identity::from_pem(
            id.cert_pem().as_bytes(),
            &fs::read(dir.path().join(KEY_FILE)).expect("read key"),
        )
        .expect("from_pem");
        assert_eq!(again.fingerprint(), id.fingerprint());
    }

    #[cfg(unix)]
    #[test]
    fn world_readable_key_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        Identity::generate("x")
            .expect("generate")
            .save(dir.path())
            .expect("save");
        let key = dir.path().join(KEY_FILE);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(
            Identity::load(dir.path()),
            Err(IdentityError::InsecureKeyPermissions { mode: 0o644, .. })
        ));
    }

    #[test]
    fn mismatched_key_is_refused() {
        let a = Identity::generate("a").expect("generate");
        let b = Identity::generate("b").expect("generate");
        let b_key = pem_encode("PRIVATE KEY", b.key.secret_der());
        assert!(matches!(
            Identity::from_pem(a.cert_pem().as_bytes(), b_key.as_bytes()),
            Err(IdentityError::Key(_))
        ));
    }
}
