//! The webhook's serving certificate. The API server only calls admission webhooks over
//! HTTPS with a certificate it trusts (the configuration's `caBundle`).
//!
//! Two ways to get one:
//! - **Files** (`--tls-cert-file`, `--tls-key-file`), e.g. a cert-manager Secret
//!   mounted into the pod; whoever issues them also fills in the `caBundle`. Files are
//!   re-read every [`REFRESH`], so a renewed Secret is picked up without a restart.
//! - **Self-managed** (the default): a Secret (`tls.crt`, `tls.key`, `ca.crt`,
//!   `ca.key`) holds a CA valid for ten years and a serving certificate valid for one,
//!   for the Service's DNS names plus `--tls-san`. The first replica to start creates
//!   it (the others lose the create race and read it); every replica writes the CA into
//!   the `caBundle` of the MutatingWebhookConfiguration (pod affinity) and the
//!   ValidatingWebhookConfiguration (node agents' writes, [`super::agents`]). A serving certificate with less
//!   than [`RENEW_BEFORE_DAYS`] left, or without a requested name, is re-issued by
//!   the same CA (so the `caBundle` does not change) and picked up by every replica at
//!   its next refresh. Deleting the Secret rotates the CA too, at the next refresh.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use tokio_rustls::rustls::crypto::ring::{default_provider, sign::any_supported_type};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, ServerConfig};

use crate::error::{Error, Result};

/// How often the certificate source is looked at again.
pub const REFRESH: Duration = Duration::from_secs(6 * 3600);
/// A serving certificate closer than this to its end is re-issued.
pub const RENEW_BEFORE_DAYS: i64 = 30;
/// Secret annotation: the serving certificate's end (unix seconds).
const NOT_AFTER: &str = "localnfs.io/not-after";
/// Secret annotation: the names the serving certificate covers, comma-separated.
const NAMES: &str = "localnfs.io/names";

/// A serving certificate with its key and the CA that signed it, all PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bundle {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
    pub ca_key_pem: String,
    /// Unix seconds.
    pub not_after: i64,
    pub names: Vec<String>,
}

fn tls_err(what: &str) -> impl Fn(rcgen::Error) -> Error + '_ {
    move |e| Error::Tls(format!("{what}: {e}"))
}

/// The CA's parameters. Always the same, so the CA key alone re-creates the issuer.
fn ca_params() -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(tls_err("CA parameters"))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "localnfs scheduler helper CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2036, 1, 1);
    Ok(p)
}

/// An existing CA: its certificate and key, PEM.
#[derive(Clone, Copy, Debug)]
pub struct Ca<'a> {
    pub cert_pem: &'a str,
    pub key_pem: &'a str,
}

/// Issues a serving certificate for `names` (DNS names or IP addresses), valid from
/// `now` for a year, signed by `ca` or by a new CA.
pub fn issue(names: &[String], ca: Option<Ca<'_>>, now: i64) -> Result<Bundle> {
    let (ca_key, ca_pem) = match ca {
        Some(ca) => (
            KeyPair::from_pem(ca.key_pem).map_err(tls_err("read the CA key"))?,
            ca.cert_pem.to_owned(),
        ),
        None => {
            let key = KeyPair::generate().map_err(tls_err("generate the CA key"))?;
            let cert = ca_params()?
                .self_signed(&key)
                .map_err(tls_err("sign the CA"))?;
            (key, cert.pem())
        }
    };
    let issuer = Issuer::new(ca_params()?, &ca_key);
    let mut p = CertificateParams::new(names.to_vec()).map_err(tls_err("certificate names"))?;
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    p.distinguished_name = dn;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let start = time::OffsetDateTime::from_unix_timestamp(now - 3600)
        .map_err(|e| Error::Tls(format!("clock: {e}")))?;
    let end = start + time::Duration::days(366);
    p.not_before = start;
    p.not_after = end;
    let key = KeyPair::generate().map_err(tls_err("generate the serving key"))?;
    let cert = p
        .signed_by(&key, &issuer)
        .map_err(tls_err("sign the serving certificate"))?;
    Ok(Bundle {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        ca_pem,
        ca_key_pem: ca_key.serialize_pem(),
        not_after: end.unix_timestamp(),
        names: names.to_vec(),
    })
}

/// Whether `bundle` still serves `names` at `now` with time to spare.
pub fn still_good(bundle: &Bundle, names: &[String], now: i64) -> bool {
    bundle.not_after - now > RENEW_BEFORE_DAYS * 86_400
        && names.iter().all(|n| bundle.names.contains(n))
}

/// The names a Service's certificate needs.
pub fn service_names(service: &str, namespace: &str, extra: &[String]) -> Vec<String> {
    let mut names = vec![
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
        format!("{service}.{namespace}"),
        service.to_owned(),
    ];
    names.extend(extra.iter().cloned());
    names
}

/// A rustls key from PEM text.
pub fn certified_key(cert_pem: &str, key_pem: &str) -> Result<CertifiedKey> {
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("read the certificate: {e}")))?;
    if certs.is_empty() {
        return Err(Error::Tls(
            "the certificate file holds no certificate".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| Error::Tls(format!("read the private key: {e}")))?;
    let signing = any_supported_type(&key).map_err(|e| Error::Tls(format!("private key: {e}")))?;
    Ok(CertifiedKey::new(certs, signing))
}

/// The serving certificate, swappable while connections come and go.
#[derive(Debug)]
pub struct Resolver(RwLock<Arc<CertifiedKey>>);

impl Resolver {
    pub fn new(key: CertifiedKey) -> Arc<Self> {
        Arc::new(Self(RwLock::new(Arc::new(key))))
    }

    /// Serves `key` from the next handshake on.
    pub fn set(&self, key: CertifiedKey) {
        match self.0.write() {
            Ok(mut k) => *k = Arc::new(key),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(key),
        }
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(match self.0.read() {
            Ok(k) => k.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        })
    }
}

/// A TLS server configuration (TLS 1.2 and 1.3, HTTP/1.1) serving `resolver`'s key.
pub fn server_config(resolver: Arc<Resolver>) -> Result<Arc<ServerConfig>> {
    let mut config = ServerConfig::builder_with_provider(Arc::new(default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e: rustls::Error| Error::Tls(format!("TLS versions: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Reads a certificate and key from files.
pub fn load_files(cert: &Path, key: &Path) -> Result<CertifiedKey> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|source| Error::ReadFile {
            path: p.to_path_buf(),
            source,
        })
    };
    certified_key(&read(cert)?, &read(key)?)
}

/// Where the serving certificate comes from.
#[derive(Clone, Debug)]
pub enum Source {
    Files { cert: PathBuf, key: PathBuf },
    Secret(Box<SecretSource>),
}

/// The self-managed certificate's Secret and the configuration to trust it in.
#[derive(Clone, Debug)]
pub struct SecretSource {
    pub secrets: Api<Secret>,
    pub name: String,
    pub names: Vec<String>,
    /// Webhook configurations whose `caBundle` we fill in.
    pub webhook_configs: Vec<WebhookConfig>,
}

/// A webhook configuration (API and name) that calls the helper.
#[derive(Clone, Debug)]
pub enum WebhookConfig {
    Mutating(Api<MutatingWebhookConfiguration>, String),
    Validating(Api<ValidatingWebhookConfiguration>, String),
}

impl Source {
    /// The current certificate, issuing or renewing it when self-managed.
    pub async fn current(&self) -> Result<CertifiedKey> {
        match self {
            Source::Files { cert, key } => load_files(cert, key),
            Source::Secret(s) => {
                let bundle = s.ensure().await?;
                s.trust(&bundle.ca_pem).await?;
                certified_key(&bundle.cert_pem, &bundle.key_pem)
            }
        }
    }
}

fn from_secret(secret: &Secret) -> Option<Bundle> {
    let data = secret.data.as_ref()?;
    let text = |k: &str| {
        data.get(k)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
    };
    let ann = secret.metadata.annotations.as_ref()?;
    Some(Bundle {
        cert_pem: text("tls.crt")?,
        key_pem: text("tls.key")?,
        ca_pem: text("ca.crt")?,
        ca_key_pem: text("ca.key")?,
        not_after: ann.get(NOT_AFTER)?.parse().ok()?,
        names: ann.get(NAMES)?.split(',').map(str::to_owned).collect(),
    })
}

fn to_secret(name: &str, b: &Bundle) -> Secret {
    let data: BTreeMap<String, ByteString> = [
        ("tls.crt", &b.cert_pem),
        ("tls.key", &b.key_pem),
        ("ca.crt", &b.ca_pem),
        ("ca.key", &b.ca_key_pem),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), ByteString(v.clone().into_bytes())))
    .collect();
    let mut s = Secret {
        data: Some(data),
        type_: Some("kubernetes.io/tls".into()),
        ..Secret::default()
    };
    s.metadata.name = Some(name.to_owned());
    s.metadata.annotations = Some(
        [
            (NOT_AFTER.to_owned(), b.not_after.to_string()),
            (NAMES.to_owned(), b.names.join(",")),
        ]
        .into(),
    );
    s
}

impl SecretSource {
    /// Reads the Secret, creating or renewing it as needed.
    async fn ensure(&self) -> Result<Bundle> {
        let now = crate::objects::agents::unix_now();
        for _ in 0..5 {
            let existing = self
                .secrets
                .get_opt(&self.name)
                .await
                .map_err(Error::kube(format!("read Secret {}", self.name)))?;
            let known = existing.as_ref().and_then(from_secret);
            if let Some(b) = &known
                && still_good(b, &self.names, now)
            {
                return Ok(b.clone());
            }
            let ca = known.as_ref().map(|b| Ca {
                cert_pem: &b.ca_pem,
                key_pem: &b.ca_key_pem,
            });
            let fresh = issue(&self.names, ca, now)?;
            let mut secret = to_secret(&self.name, &fresh);
            let written = match existing {
                None => self.secrets.create(&PostParams::default(), &secret).await,
                Some(old) => {
                    // Replace with the read resourceVersion: a replica that renewed
                    // first wins, we re-read and use its certificate.
                    secret.metadata.resource_version = old.metadata.resource_version;
                    self.secrets
                        .replace(&self.name, &PostParams::default(), &secret)
                        .await
                }
            };
            match written.map_err(Error::kube(format!("write Secret {}", self.name))) {
                Ok(_) => {
                    tracing::info!(secret = %self.name, not_after = fresh.not_after, "issued the webhook serving certificate");
                    return Ok(fresh);
                }
                Err(e) if crate::kubeclient::lost_race(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::Tls(format!(
            "Secret {} kept changing while we tried to write it",
            self.name
        )))
    }

    /// Writes the CA into every webhook of each configuration.
    async fn trust(&self, ca_pem: &str) -> Result<()> {
        let bundle = ByteString(ca_pem.as_bytes().to_vec());
        for config in &self.webhook_configs {
            match config {
                WebhookConfig::Mutating(api, name) => trust_in(api, name, &bundle).await?,
                WebhookConfig::Validating(api, name) => trust_in(api, name, &bundle).await?,
            }
        }
        Ok(())
    }
}

/// Writes `bundle` into the `caBundle` of every webhook of configuration `name` (either
/// kind: both list `webhooks` with a `name` and a `clientConfig`) that lacks it.
async fn trust_in<K>(api: &Api<K>, name: &str, bundle: &ByteString) -> Result<()>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let kind = K::kind(&());
    let Some(config) = api
        .get_opt(name)
        .await
        .map_err(Error::kube(format!("read {kind} {name}")))?
    else {
        tracing::warn!(%kind, %name, "webhook configuration not found; the API server will not call us");
        return Ok(());
    };
    let config = serde_json::to_value(&config)
        .map_err(|e| Error::BuildObject(format!("{kind} {name}: {e}")))?;
    let want =
        serde_json::to_value(bundle).map_err(|e| Error::BuildObject(format!("caBundle: {e}")))?;
    let ops: Vec<serde_json::Value> = config["webhooks"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .filter(|(_, w)| w["clientConfig"]["caBundle"] != want)
        .flat_map(|(i, w)| {
            [
                // The test guards against the list changing under us.
                serde_json::json!({"op": "test", "path": format!("/webhooks/{i}/name"), "value": w["name"]}),
                serde_json::json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": bundle}),
            ]
        })
        .collect();
    if ops.is_empty() {
        return Ok(());
    }
    let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(ops))
        .map_err(|e| Error::BuildObject(format!("caBundle patch: {e}")))?;
    api.patch(name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await
        .map_err(Error::kube(format!("write the caBundle of {kind} {name}")))?;
    tracing::info!(%kind, %name, "wrote the CA into the webhook configuration");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_load_and_renew_under_the_same_ca() {
        let names = service_names(
            "localnfs-scheduler",
            "localnfs-system",
            &["127.0.0.1".into()],
        );
        let now = 1_800_000_000;
        let first = issue(&names, None, now).expect("issue");
        assert!(still_good(&first, &names, now));
        assert!(
            !still_good(&first, &names, first.not_after - 86_400),
            "renew near the end"
        );
        assert!(
            !still_good(&first, &["other.example".into()], now),
            "renew when a name is missing"
        );
        certified_key(&first.cert_pem, &first.key_pem).expect("rustls loads it");
        let ca = Ca {
            cert_pem: &first.ca_pem,
            key_pem: &first.ca_key_pem,
        };
        let renewed = issue(&names, Some(ca), now).expect("renew");
        assert_eq!(
            renewed.ca_pem, first.ca_pem,
            "same CA, so the caBundle stays"
        );
        assert_ne!(renewed.cert_pem, first.cert_pem);
        let back = from_secret(&to_secret("s", &renewed)).expect("round trip");
        assert_eq!(back, renewed);
    }

    #[test]
    fn bad_pem_is_an_error_not_a_panic() {
        assert!(certified_key("not pem", "not pem").is_err());
    }
}
