//! Digest and size checks, and the https download against a local TLS server (a certificate made
//! with openssl for 127.0.0.1, trusted through the extra CA file).

use super::*;
use std::{path::PathBuf, process::Command};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn sample() -> Vec<u8> {
    // Any bytes with a bundle-style trailer (sha256 of the body) for the digest rules.
    let body = b"LPBUNDLE-ish body".to_vec();
    let mut out = body.clone();
    out.extend_from_slice(&Sha256::digest(&body));
    out
}

#[test]
fn both_digest_forms_bind_the_content() {
    let bytes = sample();
    let file = hex::encode(Sha256::digest(&bytes));
    let own = hex::encode(&bytes[bytes.len() - 32..]);
    assert_eq!(digest_matches(&bytes, &file), Ok(()));
    assert_eq!(digest_matches(&bytes, &own.to_uppercase()), Ok(()));
    assert_eq!(digest_matches(&bytes, &"0".repeat(64)), Err(file.clone()));
    // A trailer that names the spec's digest but does not hash the body is refused.
    let mut forged = bytes.clone();
    forged[0] ^= 1;
    assert!(digest_matches(&forged, &own).is_err());
    assert!(digest_matches(&[], &file).is_err());
}

#[test]
fn verify_refuses_before_parsing() {
    let bytes = sample();
    let file = hex::encode(Sha256::digest(&bytes));
    match verify(&bytes, &"a".repeat(64), "configmap shop/x key y", 1 << 20) {
        Err(e @ FetchError::DigestMismatch { .. }) => {
            assert_eq!(e.reason(), Reason::BundleDigestMismatch);
            assert!(e.to_string().contains(&file) && e.to_string().contains("configmap shop/x key y"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(verify(&bytes, &file, "s", 8), Err(FetchError::TooLarge { limit: 8, .. })));
    // The digest matches, the content is no bundle: the bundle reader refuses it.
    assert!(matches!(verify(&bytes, &file, "s", 1 << 20), Err(FetchError::Bundle(_))));
}

/// A self-signed certificate for 127.0.0.1 (openssl), and a TLS server answering every
/// connection with `response`, except requests for `*.sig`, answered with `sig_response`
/// (`404` with [`Server::start`]).
struct Server {
    dir: tempfile::TempDir,
    port: u16,
}

impl Server {
    async fn start(response: Vec<u8>) -> Server {
        Server::start_with(response, http_response("404 Not Found", b"")).await
    }

    async fn start_with(response: Vec<u8>, sig_response: Vec<u8>) -> Server {
        use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
        let dir = tempfile::tempdir().unwrap();
        // A CA, and a server certificate for 127.0.0.1 signed by it (webpki refuses a
        // self-signed certificate used as the server's own).
        let script = r#"set -e
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=livepatch-test-ca \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign -keyout ca.key -out ca.pem
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 -keyout key.pem -out leaf.csr
printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > leaf.ext
openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile leaf.ext -out cert.pem
"#;
        let st = Command::new("bash").arg("-c").arg(script).current_dir(dir.path()).output().expect("bash and openssl (scripts/setup.sh installs openssl)");
        assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.path().join("cert.pem")).unwrap().map(|c| c.unwrap()).collect();
        let key = PrivateKeyDer::from_pem_file(dir.path().join("key.pem")).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let (response, sig_response) = (response.clone(), sig_response.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                    let mut buf = vec![0u8; 4096];
                    let n = tls.read(&mut buf).await.unwrap_or(0);
                    let line = String::from_utf8_lossy(&buf[..n]).lines().next().unwrap_or("").to_string();
                    let answer = if line.contains(".sig ") { sig_response } else { response };
                    let _ = tls.write_all(&answer).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        Server { dir, port }
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}/fix.lpatch", self.port)
    }
}

fn http_response(status: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len()).into_bytes();
    r.extend_from_slice(body);
    r
}

fn fetcher(ca: Option<&std::path::Path>) -> Fetcher {
    // The kube client is never used for URL sources.
    let (client, _handle) = livepatch_testkit::mock_api::client();
    let mut f = Fetcher::new(client, tls_config(ca).unwrap());
    f.url_timeout = Duration::from_secs(10);
    f
}

fn url_spec(url: &str, sha256: &str) -> PatchBundle {
    PatchBundle { config_map_ref: None, secret_ref: None, url: Some(url.into()), sha256: sha256.into() }
}

#[tokio::test]
async fn https_download_is_verified() {
    let bytes = sample();
    let sha = hex::encode(Sha256::digest(&bytes));
    let server = Server::start(http_response("200 OK", &bytes)).await;
    let f = fetcher(Some(&server.ca()));
    // The content arrives and passes the digest check; it is no real bundle, so the reader
    // refuses it: proof that the bytes were downloaded in full.
    match f.download(&server.url()).await {
        Ok(got) => assert_eq!(got, bytes),
        Err(e) => panic!("{e}"),
    }
    assert!(matches!(f.fetch("shop", &url_spec(&server.url(), &sha)).await, Err(FetchError::Bundle(_))));
    assert!(matches!(f.fetch("shop", &url_spec(&server.url(), &"b".repeat(64))).await, Err(FetchError::DigestMismatch { .. })));

    // Over the size limit (announced length, and streamed).
    let mut small = fetcher(Some(&server.ca()));
    small.max_bytes = 10;
    assert!(matches!(small.download(&server.url()).await, Err(FetchError::TooLarge { .. })));

    // Without the CA the server is not trusted.
    let untrusted = fetcher(None);
    match untrusted.download(&server.url()).await {
        Err(FetchError::Http { message, .. }) => assert!(message.to_lowercase().contains("certificate") || message.contains("invalid peer"), "{message}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn only_https_and_only_200() {
    let f = fetcher(None);
    for url in ["http://127.0.0.1:1/x", "ftp://h/x", "https:///x", "not a url"] {
        assert!(matches!(f.download(url).await, Err(FetchError::NotHttps(_))), "{url}");
    }
    let server = Server::start(http_response("302 Found", b"")).await;
    let f = fetcher(Some(&server.ca()));
    match f.download(&server.url()).await {
        Err(FetchError::Http { message, .. }) => assert!(message.contains("302"), "{message}"),
        other => panic!("{other:?}"),
    }
}

/// A real bundle (the controller tests' one), its signature by `key`, and a policy.
fn signed_bundle(key: &signature::SigningKey) -> (Vec<u8>, String) {
    let bytes = crate::controller::tests::bundle_bytes("ab");
    let sig = signature::sign(key, &signature::sha256_of(&bytes)).to_text();
    (bytes, sig)
}

fn policy(keys: &[&signature::SigningKey], required: bool) -> Signatures {
    Signatures { trusted: TrustedKeys::new(keys.iter().map(|k| ("release.pub".to_string(), k.verifying_key()))), required }
}

#[test]
fn the_signature_policy() {
    let (k, other) = (signature::generate().unwrap(), signature::generate().unwrap());
    let (bytes, sig) = signed_bundle(&k);
    let check = |p: &Signatures, sig: Option<&str>| check_signature(p, &bytes, sig.map(str::as_bytes), "configmap shop/fix key b", "configmap shop/fix key b.sig");
    // Signed by a trusted key: accepted, with or without enforcement.
    for required in [true, false] {
        let ok = check(&policy(&[&other, &k], required), Some(&sig)).unwrap().expect("verified");
        assert_eq!(ok.key_id, signature::key_id(&k.verifying_key()));
    }
    // Unsigned: refused only with enforcement.
    match check(&policy(&[&k], true), None) {
        Err(e @ FetchError::Unsigned { .. }) => {
            assert_eq!(e.reason(), Reason::BundleUnsigned);
            assert!(e.is_signature() && !e.is_final());
            assert!(e.to_string().contains("configmap shop/fix key b.sig") && e.to_string().contains("--require-signature"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(check(&policy(&[&k], false), None).unwrap(), None);
    assert_eq!(check(&Signatures::default(), None).unwrap(), None);
    // A signature that is there must verify, enforcement or not, keys or not.
    for p in [policy(&[&other], true), policy(&[&other], false), Signatures::default()] {
        let e = check(&p, Some(&sig)).unwrap_err();
        assert_eq!(e.reason(), Reason::BundleSignerUntrusted, "{e}");
        assert!(e.is_final());
    }
    for p in [policy(&[&k], true), policy(&[&k], false)] {
        assert_eq!(check(&p, Some("garbage")).unwrap_err().reason(), Reason::BundleSignatureInvalid);
        let (_, for_another) = signed_bundle(&k);
        let another = for_another.replace(&hex::encode(signature::sha256_of(&bytes)), &"ab".repeat(32));
        let e = check(&p, Some(&another)).unwrap_err();
        assert_eq!(e.reason(), Reason::BundleSignatureInvalid);
        assert!(e.to_string().contains("another bundle"), "{e}");
    }
}

#[tokio::test]
async fn url_bundles_are_signed_at_url_dot_sig() {
    let (k, other) = (signature::generate().unwrap(), signature::generate().unwrap());
    let (bytes, sig) = signed_bundle(&k);
    let sha = hex::encode(Sha256::digest(&bytes));

    // The signature is downloaded from <url>.sig and checked.
    let server = Server::start_with(http_response("200 OK", &bytes), http_response("200 OK", sig.as_bytes())).await;
    let mut f = fetcher(Some(&server.ca()));
    f.signatures = policy(&[&k], true);
    let b = f.fetch("shop", &url_spec(&server.url(), &sha)).await.unwrap();
    assert_eq!(b.digest, sha);
    let mut f = fetcher(Some(&server.ca()));
    f.signatures = policy(&[&other], false);
    let e = f.fetch("shop", &url_spec(&server.url(), &sha)).await.unwrap_err();
    assert_eq!(e.reason(), Reason::BundleSignerUntrusted);
    assert!(e.to_string().contains(&format!("{}.sig", server.url())), "{e}");

    // No signature (404): refused only with enforcement.
    let server = Server::start(http_response("200 OK", &bytes)).await;
    let mut f = fetcher(Some(&server.ca()));
    f.signatures = policy(&[&k], true);
    assert_eq!(f.fetch("shop", &url_spec(&server.url(), &sha)).await.unwrap_err().reason(), Reason::BundleUnsigned);
    f.signatures.required = false;
    assert!(f.fetch("shop", &url_spec(&server.url(), &sha)).await.is_ok());

    // Another answer for the signature is not "unsigned": the bundle is unavailable for now.
    let server = Server::start_with(http_response("200 OK", &bytes), http_response("503 Service Unavailable", b"")).await;
    let f = fetcher(Some(&server.ca()));
    assert_eq!(f.fetch("shop", &url_spec(&server.url(), &sha)).await.unwrap_err().reason(), Reason::BundleUnavailable);
    // An oversized signature is a malformed one.
    let server = Server::start_with(http_response("200 OK", &bytes), http_response("200 OK", &[b'x'; 5000])).await;
    let f = fetcher(Some(&server.ca()));
    assert_eq!(f.fetch("shop", &url_spec(&server.url(), &sha)).await.unwrap_err().reason(), Reason::BundleSignatureInvalid);
}

#[test]
fn the_policy_of_the_flags() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    // No flags: nothing trusted, nothing required. Enforcement without a key: refused.
    let p = signature_policy(None, false).unwrap();
    assert!(p.trusted.is_empty() && !p.required);
    assert!(signature_policy(None, true).unwrap_err().to_string().contains("needs at least one trusted key"));
    assert!(signature_policy(Some(&keys), true).unwrap_err().to_string().contains("has none"));
    // A key written by `livepatch keygen`.
    let (k, _, public) = signature::write_keypair(&dir.path().join("release")).unwrap();
    std::fs::copy(&public, keys.join("release.pub")).unwrap();
    let p = signature_policy(Some(&keys), true).unwrap();
    assert!(p.required);
    assert_eq!(p.trusted.keys()[0].id, signature::key_id(&k.verifying_key()));
    // A broken key or a missing directory stops the agent.
    std::fs::write(keys.join("broken.pub"), "not base64!\n").unwrap();
    assert!(signature_policy(Some(&keys), false).unwrap_err().to_string().contains("broken.pub"));
    assert!(signature_policy(Some(&dir.path().join("nope")), false).is_err());
}
