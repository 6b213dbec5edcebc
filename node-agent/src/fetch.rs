//! Fetch a patch bundle from where the task says (a ConfigMap or Secret key in the task's own
//! namespace, or an https URL), refuse it unless its sha256 is the one in the spec, check its
//! signature, and parse it.
//!
//! Signatures ([`livepatch::signature`]): the detached signature sits next to the bundle, under
//! the key `<key>.sig` of the same ConfigMap or Secret, or at `<url>.sig`. A signature that is
//! there must verify with a trusted key, whatever the policy; with `required` a bundle without
//! one is refused too. All of it happens before the bundle reader sees the bytes, and so before
//! any process is looked at.
//!
//! Limits: at most `max_bytes` (default 16 MiB) are read from any source; an URL must be https
//! (no redirects are followed, the answer must be `200`), and the whole download must finish
//! within `url_timeout`. Parsed bundles are cached by (namespace, source, digest), so the tasks
//! of one `LivePatch` on a node fetch once, and a namespace never gets a bundle it could not
//! read itself.

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::{client::legacy::Client as HttpClient, rt::TokioExecutor};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Api, Client};
use livepatch::{
    bundle::Bundle,
    signature::{self, SignatureError, TrustedKeys},
};
use livepatch_api::{PatchBundle, Reason};
use sha2::{Digest, Sha256};

/// Default size limit of a bundle.
pub const DEFAULT_MAX_BYTES: usize = 16 << 20;
/// How many parsed bundles are kept.
const CACHE_ENTRIES: usize = 16;

type Https = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// Why a bundle was not obtained.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{kind} {namespace}/{name} not found")]
    NotFound { kind: &'static str, namespace: String, name: String },
    #[error("{kind} {namespace}/{name} has no key {key:?}")]
    MissingKey { kind: &'static str, namespace: String, name: String, key: String },
    #[error("the bundle is {size} bytes or more, over the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("sha256 mismatch: the spec requires {expected}, the bundle fetched from {source_name} hashes to {actual}; refusing it")]
    DigestMismatch { expected: String, actual: String, source_name: String },
    #[error("the bundle URL must be https: {0}")]
    NotHttps(String),
    #[error("downloading {url}: {message}")]
    Http { url: String, message: String },
    #[error("the bundle spec names no source (configMapRef, secretRef or url)")]
    NoSource,
    #[error("reading the bundle source: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Bundle(#[from] livepatch::Error),
    #[error("the bundle from {source_name} is not signed (no {sig_source}) and this agent requires signed bundles (--require-signature): sign it with `livepatch sign` and store the signature there")]
    Unsigned { source_name: String, sig_source: String },
    #[error("the signature {sig_source} was refused: {error}")]
    Signature { sig_source: String, error: SignatureError },
}

impl FetchError {
    /// The reason for the task status.
    pub fn reason(&self) -> Reason {
        match self {
            FetchError::DigestMismatch { .. } => Reason::BundleDigestMismatch,
            FetchError::TooLarge { .. } => Reason::BundleTooLarge,
            FetchError::Bundle(_) => Reason::BundleInvalid,
            FetchError::Unsigned { .. } => Reason::BundleUnsigned,
            FetchError::Signature { error: SignatureError::Untrusted { .. }, .. } => Reason::BundleSignerUntrusted,
            FetchError::Signature { .. } => Reason::BundleSignatureInvalid,
            _ => Reason::BundleUnavailable,
        }
    }

    /// A refusal by the signature policy (the bundle itself was obtained).
    pub fn is_signature(&self) -> bool {
        matches!(self, FetchError::Unsigned { .. } | FetchError::Signature { .. })
    }

    /// Trying again does not help: the signature there does not verify (the bytes are pinned by
    /// the spec's sha256, the trusted keys by the agent's start).
    pub fn is_final(&self) -> bool {
        matches!(self, FetchError::Signature { .. })
    }
}

/// Which bundles are accepted, by signature.
#[derive(Clone, Debug, Default)]
pub struct Signatures {
    /// The keys a signature must verify with.
    pub trusted: TrustedKeys,
    /// Refuse bundles without a signature.
    pub required: bool,
}

/// The signature policy of the agent's flags (`--trusted-keys-dir`, `--require-signature`). A
/// key directory that cannot be read, an invalid key, or enforcement without any key is an error
/// (the agent does not start).
pub fn signature_policy(dir: Option<&Path>, required: bool) -> anyhow::Result<Signatures> {
    let trusted = match dir {
        Some(dir) => TrustedKeys::load(dir).map_err(|e| anyhow::anyhow!("--trusted-keys-dir: {e}"))?,
        None => TrustedKeys::default(),
    };
    if required && trusted.is_empty() {
        anyhow::bail!(
            "--require-signature needs at least one trusted key (--trusted-keys-dir with *.pub files{}); without one every bundle would be refused",
            dir.map(|d| format!(", {} has none", d.display())).unwrap_or_default()
        );
    }
    tracing::info!(required, trusted = %trusted.ids(), "bundle signatures");
    if !required && !trusted.is_empty() {
        tracing::warn!("trusted keys are configured but signatures are not required: unsigned bundles are accepted (--require-signature)");
    }
    Ok(Signatures { trusted, required })
}

/// Check the signature policy for `bytes` (the bundle, already size- and digest-checked).
/// `sig`: the signature found next to it, if any. Returns the signing key, if signed.
pub fn check_signature(policy: &Signatures, bytes: &[u8], sig: Option<&[u8]>, source: &str, sig_source: &str) -> Result<Option<signature::Verified>, FetchError> {
    match sig {
        None if policy.required => Err(FetchError::Unsigned { source_name: source.into(), sig_source: sig_source.into() }),
        None => Ok(None),
        Some(sig) => policy
            .trusted
            .verify_bundle(bytes, sig)
            .map(Some)
            .map_err(|error| FetchError::Signature { sig_source: sig_source.into(), error }),
    }
}

/// Where bundles come from.
pub struct Fetcher {
    client: Client,
    https: HttpClient<Https, Empty<Bytes>>,
    pub max_bytes: usize,
    pub url_timeout: Duration,
    /// The signature policy.
    pub signatures: Signatures,
    cache: Mutex<Vec<(String, Arc<Bundle>)>>,
}

/// The TLS client configuration: the system's trust roots, plus the PEM certificates of
/// `extra_ca` (for a private bundle server).
pub fn tls_config(extra_ca: Option<&Path>) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(native_roots());
    if let Some(path) = extra_ca {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| anyhow::anyhow!("reading CA file {}: {e}", path.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("parsing CA file {}: {e}", path.display()))?;
        if certs.is_empty() {
            anyhow::bail!("CA file {} holds no certificate", path.display());
        }
        for cert in certs {
            roots.add(cert)?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The system trust roots (empty when the image has none).
fn native_roots() -> Vec<rustls::pki_types::CertificateDer<'static>> {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::debug!(error = %e, "loading the system trust roots");
    }
    found.certs
}

impl Fetcher {
    pub fn new(client: Client, tls: rustls::ClientConfig) -> Self {
        let connector = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_only().enable_http1().build();
        Self {
            client,
            https: HttpClient::builder(TokioExecutor::new()).build(connector),
            max_bytes: DEFAULT_MAX_BYTES,
            url_timeout: Duration::from_secs(60),
            signatures: Signatures::default(),
            cache: Mutex::new(Vec::new()),
        }
    }

    /// The bundle of `spec` for a task in `namespace`: digest-checked, signature-checked (the
    /// cache holds only bundles that passed both), parsed.
    pub async fn fetch(&self, namespace: &str, spec: &PatchBundle) -> Result<Arc<Bundle>, FetchError> {
        let expected = spec.sha256.to_ascii_lowercase();
        let source = source_name(namespace, spec)?;
        let key = format!("{source}@{expected}");
        if let Some(hit) = self.cache.lock().unwrap().iter().find(|(k, _)| *k == key) {
            return Ok(hit.1.clone());
        }
        // The bundle, and the signature of a ConfigMap or Secret (read in the same object).
        let (bytes, sig) = match (&spec.config_map_ref, &spec.secret_ref, &spec.url) {
            (Some(r), _, _) => {
                let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
                let cm = api.get_opt(&r.name).await?.ok_or_else(|| FetchError::NotFound {
                    kind: "ConfigMap",
                    namespace: namespace.into(),
                    name: r.name.clone(),
                })?;
                let get = |key: &str| {
                    let binary = cm.binary_data.as_ref().and_then(|d| d.get(key)).map(|b| b.0.clone());
                    binary.or_else(|| cm.data.as_ref().and_then(|d| d.get(key)).map(|s| s.clone().into_bytes()))
                };
                let bytes = get(&r.key).ok_or_else(|| FetchError::MissingKey {
                    kind: "ConfigMap",
                    namespace: namespace.into(),
                    name: r.name.clone(),
                    key: r.key.clone(),
                })?;
                (bytes, get(&format!("{}.sig", r.key)))
            }
            (None, Some(r), _) => {
                let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
                let secret = api.get_opt(&r.name).await?.ok_or_else(|| FetchError::NotFound {
                    kind: "Secret",
                    namespace: namespace.into(),
                    name: r.name.clone(),
                })?;
                let get = |key: &str| secret.data.as_ref().and_then(|d| d.get(key)).map(|b| b.0.clone());
                let bytes = get(&r.key).ok_or_else(|| FetchError::MissingKey {
                    kind: "Secret",
                    namespace: namespace.into(),
                    name: r.name.clone(),
                    key: r.key.clone(),
                })?;
                (bytes, get(&format!("{}.sig", r.key)))
            }
            (None, None, Some(url)) => (self.download(url).await?, None),
            (None, None, None) => return Err(FetchError::NoSource),
        };
        check_digest(&bytes, &expected, &source, self.max_bytes)?;
        let sig_source = sig_source_name(namespace, spec)?;
        let sig = match &spec.url {
            // Only once the bundle is the one the spec pins.
            Some(url) if spec.config_map_ref.is_none() && spec.secret_ref.is_none() => {
                match self.get(&format!("{url}.sig"), signature::MAX_FILE as usize, true).await {
                    Err(FetchError::TooLarge { size, limit }) => {
                        let error = SignatureError::Malformed(format!("{size} bytes or more; a signature file is at most {limit}"));
                        return Err(FetchError::Signature { sig_source, error });
                    }
                    other => other?,
                }
            }
            _ => sig,
        };
        if let Some(signed) = check_signature(&self.signatures, &bytes, sig.as_deref(), &source, &sig_source)? {
            tracing::info!(source = %source, key_id = %signed.key_id, key = %signed.key_name, "bundle signature verified");
        }
        let bundle = Arc::new(Bundle::parse(&bytes)?);
        let mut cache = self.cache.lock().unwrap();
        if cache.len() >= CACHE_ENTRIES {
            cache.remove(0);
        }
        cache.push((key, bundle.clone()));
        Ok(bundle)
    }

    /// GET an https URL, at most `max_bytes`, within `url_timeout`.
    async fn download(&self, url: &str) -> Result<Vec<u8>, FetchError> {
        Ok(self.get(url, self.max_bytes, false).await?.expect("a missing file is an error here"))
    }

    /// GET an https URL, at most `limit` bytes, within `url_timeout`; `missing_ok`: a `404` is
    /// `None`.
    async fn get(&self, url: &str, limit: usize, missing_ok: bool) -> Result<Option<Vec<u8>>, FetchError> {
        let uri: hyper::Uri = url.parse().map_err(|_| FetchError::NotHttps(url.into()))?;
        if uri.scheme_str() != Some("https") || uri.host().is_none() {
            return Err(FetchError::NotHttps(url.into()));
        }
        let http = |message: String| FetchError::Http { url: url.into(), message };
        let work = async {
            let response = self.https.get(uri).await.map_err(|e| http(format!("{e} ({e:?})")))?;
            if missing_ok && response.status() == hyper::StatusCode::NOT_FOUND {
                return Ok(None);
            }
            if response.status() != hyper::StatusCode::OK {
                return Err(http(format!("the server answered {}", response.status())));
            }
            if let Some(len) = response.headers().get(hyper::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok()) {
                if len > limit {
                    return Err(FetchError::TooLarge { size: len, limit });
                }
            }
            let mut body = response.into_body();
            let mut out = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| http(e.to_string()))?;
                if let Some(data) = frame.data_ref() {
                    if out.len() + data.len() > limit {
                        return Err(FetchError::TooLarge { size: out.len() + data.len(), limit });
                    }
                    out.extend_from_slice(data);
                }
            }
            Ok(Some(out))
        };
        tokio::time::timeout(self.url_timeout, work)
            .await
            .map_err(|_| http(format!("no complete answer within {} s", self.url_timeout.as_secs())))?
    }
}

/// A human-readable name of the source, also the cache key's prefix.
fn source_name(namespace: &str, spec: &PatchBundle) -> Result<String, FetchError> {
    match (&spec.config_map_ref, &spec.secret_ref, &spec.url) {
        (Some(r), _, _) => Ok(format!("configmap {namespace}/{} key {}", r.name, r.key)),
        (None, Some(r), _) => Ok(format!("secret {namespace}/{} key {}", r.name, r.key)),
        (None, None, Some(url)) => Ok(format!("{url} (for namespace {namespace})")),
        (None, None, None) => Err(FetchError::NoSource),
    }
}

/// Where the signature of the bundle of `spec` is looked for (for messages).
fn sig_source_name(namespace: &str, spec: &PatchBundle) -> Result<String, FetchError> {
    match (&spec.config_map_ref, &spec.secret_ref, &spec.url) {
        (Some(r), _, _) => Ok(format!("configmap {namespace}/{} key {}.sig", r.name, r.key)),
        (None, Some(r), _) => Ok(format!("secret {namespace}/{} key {}.sig", r.name, r.key)),
        (None, None, Some(url)) => Ok(format!("{url}.sig")),
        (None, None, None) => Err(FetchError::NoSource),
    }
}

/// Whether `bytes` are what `expected` (64 hex digits) names: the sha256 of the whole file (what
/// `sha256sum` prints), or the bundle's own digest (what `livepatch build` and `inspect` print:
/// the sha256 of everything but the 32-byte trailer, which holds that same digest). Either binds
/// every byte of the file. Checked before the bundle reader sees the bytes.
pub fn digest_matches(bytes: &[u8], expected: &str) -> Result<(), String> {
    let expected = expected.to_ascii_lowercase();
    let file = hex::encode(Sha256::digest(bytes));
    if file == expected {
        return Ok(());
    }
    if bytes.len() >= 32 {
        let (body, trailer) = bytes.split_at(bytes.len() - 32);
        if hex::encode(trailer) == expected && hex::encode(Sha256::digest(body)) == expected {
            return Ok(());
        }
    }
    Err(file)
}

/// Size limit, digest check, then parse (no signature policy: see [`check_signature`]).
pub fn verify(bytes: &[u8], expected_sha256: &str, source: &str, max_bytes: usize) -> Result<Bundle, FetchError> {
    check_digest(bytes, expected_sha256, source, max_bytes)?;
    Ok(Bundle::parse(bytes)?)
}

/// Size limit and digest check.
pub fn check_digest(bytes: &[u8], expected_sha256: &str, source: &str, max_bytes: usize) -> Result<(), FetchError> {
    if bytes.len() > max_bytes {
        return Err(FetchError::TooLarge { size: bytes.len(), limit: max_bytes });
    }
    digest_matches(bytes, expected_sha256).map_err(|actual| FetchError::DigestMismatch {
        expected: expected_sha256.into(),
        actual,
        source_name: source.into(),
    })
}

#[cfg(test)]
mod tests;
