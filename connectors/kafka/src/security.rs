//! How BitClone9 reaches a secured Kafka cluster (TLS, SASL) and schema registry (HTTPS,
//! basic or bearer auth), and a client context that keeps the brokers' last error so a refused
//! handshake or login is reported by its cause rather than as a timeout.

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// TLS towards the brokers or the registry (the `[kafka.tls]` and `[kafka.schema_registry.tls]`
/// sections as they are). Without `ca_file` the system's roots are trusted.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca_file: Option<PathBuf>,
    /// A client certificate (PEM) and its key (PEM), for servers that ask for one.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The key file's password, when it is encrypted (brokers only).
    pub key_password: Option<String>,
    /// Check that the server's certificate names the host connected to (on unless turned off).
    #[serde(default = "yes")]
    pub verify_hostname: bool,
}

fn yes() -> bool {
    true
}

impl Default for TlsFiles {
    fn default() -> Self {
        Self {
            ca_file: None,
            cert_file: None,
            key_file: None,
            key_password: None,
            verify_hostname: true,
        }
    }
}

impl fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsFiles")
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field(
                "key_password",
                &self.key_password.as_ref().map(|_| "<redacted>"),
            )
            .field("verify_hostname", &self.verify_hostname)
            .finish()
    }
}

/// A SASL login (`PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`).
#[derive(Clone, PartialEq, Eq)]
pub struct SaslLogin {
    pub mechanism: String,
    pub username: String,
    pub password: String,
}

impl fmt::Debug for SaslLogin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SaslLogin")
            .field("mechanism", &self.mechanism)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// TLS and SASL settings every Kafka client of the daemon uses (producers, consumers, admin).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct KafkaSecurity {
    pub tls: Option<TlsFiles>,
    pub sasl: Option<SaslLogin>,
}

impl KafkaSecurity {
    /// librdkafka's `security.protocol` for these settings.
    pub fn protocol(&self) -> &'static str {
        match (&self.tls, &self.sasl) {
            (None, None) => "plaintext",
            (Some(_), None) => "ssl",
            (None, Some(_)) => "sasl_plaintext",
            (Some(_), Some(_)) => "sasl_ssl",
        }
    }

    /// Sets the security properties on a client configuration.
    pub fn apply(&self, cfg: &mut ClientConfig) {
        cfg.set("security.protocol", self.protocol());
        if let Some(tls) = &self.tls {
            let path = |p: &Path| p.to_string_lossy().into_owned();
            if let Some(ca) = &tls.ca_file {
                cfg.set("ssl.ca.location", path(ca));
            }
            if let Some(cert) = &tls.cert_file {
                cfg.set("ssl.certificate.location", path(cert));
            }
            if let Some(key) = &tls.key_file {
                cfg.set("ssl.key.location", path(key));
            }
            if let Some(pw) = &tls.key_password {
                cfg.set("ssl.key.password", pw);
            }
            cfg.set(
                "ssl.endpoint.identification.algorithm",
                if tls.verify_hostname { "https" } else { "none" },
            );
        }
        if let Some(sasl) = &self.sasl {
            cfg.set("sasl.mechanism", &sasl.mechanism)
                .set("sasl.username", &sasl.username)
                .set("sasl.password", &sasl.password);
        }
    }
}

/// How the registry is logged into.
#[derive(Clone, PartialEq, Eq, Default)]
pub enum RegistryAuth {
    #[default]
    None,
    Basic {
        username: String,
        password: String,
    },
    Bearer(String),
}

impl fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegistryAuth::None => write!(f, "None"),
            RegistryAuth::Basic { username, .. } => {
                write!(
                    f,
                    "Basic {{ username: {username:?}, password: <redacted> }}"
                )
            }
            RegistryAuth::Bearer(_) => write!(f, "Bearer(<redacted>)"),
        }
    }
}

/// Login and TLS settings of the schema registry.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RegistryAccess {
    pub auth: RegistryAuth,
    pub tls: Option<TlsFiles>,
}

/// Why registry TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("schema registry TLS: {0}")]
pub struct RegistryTlsError(String);

impl RegistryAccess {
    /// An HTTP client builder trusting the configured CA and presenting the client certificate.
    pub fn client_builder(&self) -> Result<reqwest::ClientBuilder, RegistryTlsError> {
        let mut b = reqwest::Client::builder().tls_backend_native();
        let Some(tls) = &self.tls else {
            return Ok(b);
        };
        let read = |p: &PathBuf, what: &str| {
            std::fs::read(p)
                .map_err(|e| RegistryTlsError(format!("cannot read {what} {}: {e}", p.display())))
        };
        if let Some(ca) = &tls.ca_file {
            let certs =
                reqwest::Certificate::from_pem_bundle(&read(ca, "ca_file")?).map_err(|e| {
                    RegistryTlsError(format!(
                        "ca_file {} holds no PEM certificate: {e}",
                        ca.display()
                    ))
                })?;
            if certs.is_empty() {
                return Err(RegistryTlsError(format!(
                    "ca_file {} holds no PEM certificate",
                    ca.display()
                )));
            }
            b = b.tls_certs_only(certs);
        }
        match (&tls.cert_file, &tls.key_file) {
            (Some(cert), Some(key)) => {
                let identity =
                    reqwest::Identity::from_pkcs8_pem(&read(cert, "cert_file")?, &read(key, "key_file")?)
                        .map_err(|e| {
                            RegistryTlsError(format!(
                                "cert_file {} with key_file {} (an unencrypted PKCS#8 PEM key is needed): {e}",
                                cert.display(),
                                key.display()
                            ))
                        })?;
                b = b.identity(identity);
            }
            (None, None) => {}
            _ => {
                return Err(RegistryTlsError(
                    "cert_file and key_file go together".into(),
                ))
            }
        }
        Ok(b.tls_danger_accept_invalid_hostnames(!tls.verify_hostname))
    }
}

/// A Kafka client context that remembers the last error the brokers reported (a failed TLS
/// handshake, a refused login, all brokers down), so that a failed request can say why.
#[derive(Clone, Default)]
pub struct KafkaContext {
    last_error: Arc<Mutex<Option<String>>>,
}

impl KafkaContext {
    /// The last error reported by librdkafka, if any.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }
}

impl ClientContext for KafkaContext {
    /// librdkafka logs the error itself; this keeps it. "All brokers down" follows every
    /// failed connection and says less than the failure before it, so it never replaces one.
    fn error(&self, error: KafkaError, reason: &str) {
        let generic = error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown);
        if let Ok(mut last) = self.last_error.lock() {
            if !generic || last.is_none() {
                *last = Some(reason.to_string());
            }
        }
    }
}

impl ConsumerContext for KafkaContext {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let s = KafkaSecurity {
            tls: Some(TlsFiles {
                key_password: Some("tls-secret".into()),
                ..TlsFiles::default()
            }),
            sasl: Some(SaslLogin {
                mechanism: "PLAIN".into(),
                username: "u".into(),
                password: "sasl-secret".into(),
            }),
        };
        let r = RegistryAccess {
            auth: RegistryAuth::Basic {
                username: "u".into(),
                password: "reg-secret".into(),
            },
            tls: None,
        };
        let text = format!(
            "{s:?} {r:?} {:?}",
            RegistryAuth::Bearer("tok-secret".into())
        );
        for secret in ["tls-secret", "sasl-secret", "reg-secret", "tok-secret"] {
            assert!(!text.contains(secret), "{text}");
        }
        assert_eq!(s.protocol(), "sasl_ssl");
    }

    #[test]
    fn unreadable_or_empty_ca_files_are_named() {
        let access = RegistryAccess {
            auth: RegistryAuth::None,
            tls: Some(TlsFiles {
                ca_file: Some("/nonexistent/ca.pem".into()),
                verify_hostname: true,
                ..TlsFiles::default()
            }),
        };
        let e = access
            .client_builder()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("cannot read ca_file /nonexistent/ca.pem"), "{e}");
    }
}
