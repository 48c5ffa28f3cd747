//! Pinned-key authentication for TLS 1.3 (as used by QUIC).
//!
//! Each side presents a self-signed certificate made at start-up from its host key. The
//! verifiers ignore names, dates and issuers: they accept a peer exactly when the certificate's
//! SubjectPublicKeyInfo is an Ed25519 key in the pin set and the handshake signature verifies
//! under it. That is the "self-signed certificate whose key is pinned" of DESIGN.md; there is
//! no CA and no trust on first use. Every refusal returns the same TLS error, whatever its
//! cause, and no key material is logged.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::keys::{PrivateKey, PublicKey};

/// The ALPN protocol of the sentry tunnel over QUIC, version 1.
pub(crate) const ALPN: &[u8] = b"sentry-relay/1";
/// The ALPN protocol of the sentry tunnel over TCP+TLS, version 1. Distinct from QUIC's, so
/// neither listener ever mistakes the other's peer for its own.
pub(crate) const TLS_ALPN: &[u8] = b"sentry-relay-tls/1";
/// The server name the agent sends; verifiers ignore it, rustls requires one.
pub const SERVER_NAME: &str = "sentry";

/// The one crypto provider of the project: ring.
#[must_use]
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The sentry's TLS 1.3 settings: its identity, client certificates checked against the pinned
/// agent keys (key → name), and `alpn` as the one protocol.
pub(crate) fn server_tls(
    key: &PrivateKey,
    agents: HashMap<PublicKey, String>,
    alpn: &[u8],
) -> Result<rustls::ServerConfig, IdentityError> {
    let id = Identity::new(key)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| IdentityError(e.to_string()))?
        .with_client_cert_verifier(Arc::new(AgentVerifier::new(agents)))
        .with_single_cert(vec![id.cert], id.key)
        .map_err(|e| IdentityError(e.to_string()))?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

/// The agent's TLS 1.3 settings toward a sentry whose key is `pin`.
pub(crate) fn client_tls(
    key: &PrivateKey,
    pin: PublicKey,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, IdentityError> {
    let id = Identity::new(key)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| IdentityError(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SentryVerifier::new(pin)))
        .with_client_auth_cert(vec![id.cert], id.key)
        .map_err(|e| IdentityError(e.to_string()))?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

/// A host's TLS identity: a self-signed certificate around its key.
#[derive(Debug)]
pub(crate) struct Identity {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
}

/// Why an identity could not be built.
#[derive(Debug, thiserror::Error)]
#[error("building the TLS identity: {0}")]
pub struct IdentityError(String);

impl Identity {
    /// Wrap `key` in a fresh self-signed certificate.
    pub fn new(key: &PrivateKey) -> Result<Self, IdentityError> {
        let pkcs8 = PrivatePkcs8KeyDer::from(key.pkcs8_der());
        let pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_ED25519)
            .map_err(|e| IdentityError(e.to_string()))?;
        let params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_owned()])
            .map_err(|e| IdentityError(e.to_string()))?;
        let cert = params
            .self_signed(&pair)
            .map_err(|e| IdentityError(e.to_string()))?;
        Ok(Self {
            cert: cert.der().clone(),
            key: PrivateKeyDer::Pkcs8(pkcs8),
        })
    }
}

/// The pinned key inside a peer certificate, if it is an Ed25519 certificate we can parse.
#[must_use]
pub fn peer_key(cert: &CertificateDer<'_>) -> Option<PublicKey> {
    let parsed = ParsedCertificate::try_from(cert).ok()?;
    PublicKey::from_spki_der(parsed.subject_public_key_info().as_ref())
}

fn refused() -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// The signature checks both verifiers share: TLS 1.3 only, Ed25519 only, with the verifier's
/// `algorithms`.
macro_rules! pinned_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Err(refused()) // TLS 1.3 only.
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(message, cert, dss, &self.algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            vec![SignatureScheme::ED25519]
        }
    };
}

/// The sentry's check of agents: the client certificate must carry a pinned agent key.
#[derive(Debug)]
pub(crate) struct AgentVerifier {
    /// Pinned agent keys and the names they map to.
    pins: HashMap<PublicKey, String>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl AgentVerifier {
    #[must_use]
    pub fn new(pins: HashMap<PublicKey, String>) -> Self {
        Self {
            pins,
            algorithms: algorithms(),
        }
    }
}

impl ClientCertVerifier for AgentVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match peer_key(end_entity) {
            Some(key) if self.pins.contains_key(&key) => Ok(ClientCertVerified::assertion()),
            _ => Err(refused()),
        }
    }

    pinned_signatures!();
}

/// The agent's check of a sentry: the server certificate must carry exactly the pinned key.
#[derive(Debug)]
pub(crate) struct SentryVerifier {
    pin: PublicKey,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SentryVerifier {
    #[must_use]
    pub fn new(pin: PublicKey) -> Self {
        Self {
            pin,
            algorithms: algorithms(),
        }
    }
}

impl ServerCertVerifier for SentryVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match peer_key(end_entity) {
            Some(key) if key == self.pin => Ok(ServerCertVerified::assertion()),
            _ => Err(refused()),
        }
    }

    pinned_signatures!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_carries_the_host_key() {
        let key = PrivateKey::generate().unwrap();
        let id = Identity::new(&key).unwrap();
        assert_eq!(peer_key(&id.cert), Some(key.public_key()));
    }

    #[test]
    fn verifiers_accept_only_pinned_keys() {
        let key = PrivateKey::generate().unwrap();
        let other = PrivateKey::generate().unwrap();
        let cert = Identity::new(&key).unwrap().cert;
        let now = UnixTime::now();
        let name = ServerName::try_from(SERVER_NAME).unwrap();
        let ok = SentryVerifier::new(key.public_key());
        assert!(ok.verify_server_cert(&cert, &[], &name, &[], now).is_ok());
        let wrong = SentryVerifier::new(other.public_key());
        assert!(
            wrong
                .verify_server_cert(&cert, &[], &name, &[], now)
                .is_err()
        );
        let agents = AgentVerifier::new(HashMap::from([(other.public_key(), "a".to_owned())]));
        assert!(agents.verify_client_cert(&cert, &[], now).is_err());
        let agents = AgentVerifier::new(HashMap::from([(key.public_key(), "a".to_owned())]));
        assert!(agents.verify_client_cert(&cert, &[], now).is_ok());
        assert!(
            agents
                .verify_client_cert(&CertificateDer::from(vec![0x30, 0]), &[], now)
                .is_err()
        );
    }
}
