//! rustls configuration for agent-to-agent QUIC: TLS 1.3 only, ALPN
//! `godwit/1`, mutual authentication by pinned certificate fingerprint.
//!
//! This module owns the two certificate verifiers:
//! - [`PinnedClientVerifier`] (server side) requires a client certificate and
//!   accepts it only if its SHA-256 fingerprint is in the shared [`PeerSet`];
//! - [`PinnedServerVerifier`] (client side) accepts the server certificate
//!   only if it is exactly the one pinned for the peer being dialled.
//!
//! Pinning replaces the chain-of-trust check, not the handshake check: both
//! verifiers still verify the TLS 1.3 `CertificateVerify` signature with
//! ring's algorithms, which proves the peer holds the certificate's private
//! key. Validity dates and names are deliberately ignored — the pin is the
//! trust anchor, and agents on hosts with bad clocks must still talk.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::identity::{Fingerprint, Identity, IdentityError};
use crate::peers::PeerSet;

/// ALPN protocol id; bump the suffix on an incompatible wire change so old
/// and new agents fail the handshake cleanly instead of misparsing streams.
pub const ALPN: &[u8] = b"godwit/1";

/// Errors from building the TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The local identity cannot be used by rustls.
    #[error("local identity is unusable")]
    Identity(#[from] IdentityError),
    /// rustls rejected the configuration.
    #[error("building the rustls configuration")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server-side TLS config: presents `identity`, requires a client
/// certificate pinned in `peers`.
pub fn server_config(
    identity: &Identity,
    peers: &PeerSet,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let verifier = PinnedClientVerifier {
        peers: peers.clone(),
        algorithms: provider.signature_verification_algorithms,
    };
    let certified = identity.certified_key()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// Client-side TLS config for dialling peer `peer`, whose certificate must
/// have fingerprint `expected`; presents `identity` as client certificate.
pub fn client_config(
    identity: &Identity,
    peer: &str,
    expected: Fingerprint,
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = PinnedServerVerifier {
        peer: peer.to_owned(),
        expected,
        algorithms: provider.signature_verification_algorithms,
    };
    let certified = identity.certified_key()?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// The error both verifiers return for a certificate that is not pinned.
/// `ApplicationVerificationFailure` maps to the `access_denied` alert, which
/// is what the peer sees in its CONNECTION_CLOSE.
fn not_pinned() -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
}

fn no_tls12() -> rustls::Error {
    // Unreachable in practice: both configs only enable TLS 1.3.
    rustls::Error::General("TLS 1.2 is not supported by godwit".into())
}

/// Server-side verifier: the client certificate must be pinned in the peer set.
#[derive(Debug)]
pub struct PinnedClientVerifier {
    peers: PeerSet,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for PinnedClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No CA to hint at: the pin is the trust anchor.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let fingerprint = Fingerprint::of_der(end_entity);
        match self.peers.name_of(&fingerprint) {
            Some(peer) => {
                tracing::debug!(%peer, %fingerprint, "client certificate is pinned");
                Ok(ClientCertVerified::assertion())
            }
            None => {
                tracing::warn!(%fingerprint, "refusing client with unpinned certificate");
                Err(not_pinned())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Client-side verifier: the server certificate must be the one pinned for
/// the peer being dialled.
#[derive(Debug)]
pub struct PinnedServerVerifier {
    peer: String,
    expected: Fingerprint,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fingerprint = Fingerprint::of_der(end_entity);
        if fingerprint == self.expected {
            Ok(ServerCertVerified::assertion())
        } else {
            tracing::warn!(peer = %self.peer, %fingerprint, expected = %self.expected,
                "refusing server whose certificate is not the pinned one");
            Err(not_pinned())
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_verifier_accepts_only_pinned_certificates() {
        let good = Identity::generate("good").expect("generate");
        let bad = Identity::generate("bad").expect("generate");
        let peers = PeerSet::new();
        peers.insert("good", good.fingerprint()).expect("insert");
        let v = PinnedClientVerifier {
            peers: peers.clone(),
            algorithms: provider().signature_verification_algorithms,
        };
        assert!(v.client_auth_mandatory());
        let now = UnixTime::now();
        assert!(v.verify_client_cert(good.cert_der(), &[], now).is_ok());
        assert!(v.verify_client_cert(bad.cert_der(), &[], now).is_err());
        // Runtime update is seen by the live verifier.
        peers.insert("bad", bad.fingerprint()).expect("insert");
        assert!(v.verify_client_cert(bad.cert_der(), &[], now).is_ok());
    }

    #[test]
    fn server_verifier_accepts_only_the_expected_pin() {
        let good = Identity::generate("good").expect("generate");
        let bad = Identity::generate("good").expect("generate");
        let v = PinnedServerVerifier {
            peer: "good".into(),
            expected: good.fingerprint(),
            algorithms: provider().signature_verification_algorithms,
        };
        let name = ServerName::try_from("good.godwit").expect("name");
        let now = UnixTime::now();
        assert!(v
            .verify_server_cert(good.cert_der(), &[], &name, &[], now)
            .is_ok());
        assert!(v
            .verify_server_cert(bad.cert_der(), &[], &name, &[], now)
            .is_err());
    }

    #[test]
    fn configs_build_and_are_quic_compatible() {
        let id = Identity::generate("a").expect("generate");
        let server = server_config(&id, &PeerSet::new()).expect("server");
        let client = client_config(&id, "b", id.fingerprint()).expect("client");
        assert!(quinn::crypto::rustls::QuicServerConfig::try_from(server).is_ok());
        assert!(quinn::crypto::rustls::QuicClientConfig::try_from(client).is_ok());
    }
}
