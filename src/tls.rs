//! TLS at the bridge (OCPP security profiles 2 and 3) and towards a `wss://` SteVe.
//!
//! The server certificate is re-read on SIGHUP without dropping connected chargers: new
//! handshakes use the new acceptor, live sessions keep theirs. With `client_ca_file` (profile 3)
//! a charger must present a certificate signed by that CA whose subject CN is its chargeBoxId;
//! SteVe then no longer sees the certificate, only the relayed connection.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// `[proxy.tls]`: the listener's certificate, and optionally the CA of charger certificates.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Security profile 3: chargers must present a certificate from this CA (PEM) whose subject
    /// CN is their chargeBoxId.
    pub client_ca_file: Option<PathBuf>,
}

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {path}: {reason}")]
    File {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client CA: {0}")]
    ClientVerifier(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_error = |reason: String| TlsError::File {
        what,
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(file_error("no PEM certificate in it".into()));
    }
    Ok(certs)
}

fn roots(what: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(what, path)? {
        roots.add(cert).map_err(|e| TlsError::File {
            what,
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// Builds the listener's TLS configuration (TLS 1.2 and 1.3 only).
pub fn server_config(tls: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = certificates("proxy.tls.cert_file", &tls.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&tls.key_file).map_err(|e| TlsError::File {
        what: "proxy.tls.key_file",
        path: tls.key_file.display().to_string(),
        reason: e.to_string(),
    })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let builder = match &tls.client_ca_file {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots("proxy.tls.client_ca_file", ca)?),
                provider(),
            )
            .build()
            .map_err(|e| TlsError::ClientVerifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(builder.with_single_cert(certs, key)?))
}

/// The TLS client configuration for a `wss://` SteVe: the system's roots plus `extra_ca`.
pub fn client_config(extra_ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut store = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    store.add_parsable_certificates(native.certs);
    if let Some(ca) = extra_ca {
        for cert in certificates("proxy.upstream_ca_file", ca)? {
            store.add(cert).map_err(|e| TlsError::File {
                what: "proxy.upstream_ca_file",
                path: ca.display().to_string(),
                reason: e.to_string(),
            })?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(store)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The listener's acceptor, swappable on SIGHUP.
pub struct ReloadableAcceptor {
    config: TlsConfig,
    current: RwLock<TlsAcceptor>,
}

impl ReloadableAcceptor {
    /// Loads the certificate and key named by `config`.
    pub fn new(config: TlsConfig) -> Result<Self, TlsError> {
        let acceptor = TlsAcceptor::from(server_config(&config)?);
        Ok(ReloadableAcceptor {
            config,
            current: RwLock::new(acceptor),
        })
    }

    /// The acceptor for a new connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-reads the files; on error the previous certificate stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let acceptor = TlsAcceptor::from(server_config(&self.config)?);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = acceptor;
        Ok(())
    }

    /// Whether chargers must present a client certificate (profile 3).
    pub fn requires_client_certificate(&self) -> bool {
        self.config.client_ca_file.is_some()
    }
}

/// The subject common name of a (verified) client certificate: the chargeBoxId it may use.
pub fn subject_common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}
