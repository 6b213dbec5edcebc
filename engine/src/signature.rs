//! Bundle signatures: ed25519 over the bundle's sha256, in a detached, self-describing text file.
//!
//! A bundle is identified by the sha256 of the whole file (what `sha256sum` prints and what
//! [`crate::bundle::Bundle::parse`] puts in `digest`). A signature binds that digest to a key:
//!
//! ```text
//! livepatch-signature v1
//! algorithm: ed25519
//! key-id: 3f9c0a1b2c3d4e5f
//! bundle-sha256: <64 hex digits>
//! signature: <base64 of the 64-byte ed25519 signature>
//! ```
//!
//! The signed message is [`CONTEXT`] followed by the 32 raw digest bytes, so a livepatch key
//! never signs anything that could be mistaken for another protocol's message, and the
//! signature says which bundle it is for (a signature moved next to another bundle is refused
//! as "for another bundle", before any key is tried).
//!
//! Keys:
//! * the public key file (`PREFIX.pub`) is one line, the base64 of the 32 raw key bytes: the
//!   very text the Helm chart takes in `agent.signatures.trustedKeys[].key`;
//! * the private key file (`PREFIX.key`, mode 0600) is `livepatch-ed25519-private-key v1`, then
//!   `key-id:` and `seed:` (base64 of the 32-byte seed) lines;
//! * the key id is the first 8 bytes of the sha256 of the raw public key, in hex. It only
//!   selects the key to try: the signature check itself is what binds.
//!
//! Verification ([`TrustedKeys::verify`]) uses `verify_strict` (no malleable signatures, no
//! small-order keys) and refuses weak public keys when they are loaded.

use std::{
    fmt, fs,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use base64::{engine::general_purpose::STANDARD as BASE64, Engine as _};
use ed25519_dalek::Signer;
pub use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// First line of a signature file.
pub const SIGNATURE_HEADER: &str = "livepatch-signature v1";
/// First line of a private key file.
pub const PRIVATE_KEY_HEADER: &str = "livepatch-ed25519-private-key v1";
/// The only algorithm.
pub const ALGORITHM: &str = "ed25519";
/// Domain separation: the signed message is this, then the 32 digest bytes.
pub const CONTEXT: &[u8] = b"livepatch-bundle-signature-v1\0";
/// Largest signature or key file read (they are a few hundred bytes).
pub const MAX_FILE: u64 = 4096;
/// Largest number of trusted keys loaded from one directory.
pub const MAX_KEYS: usize = 256;

/// Why a signature or key was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    #[error("malformed signature: {0}")]
    Malformed(String),
    #[error("the signature is for another bundle (sha256 {signed}); this bundle's sha256 is {actual}")]
    OtherBundle { signed: String, actual: String },
    #[error("signed with key {key_id}, which is not a trusted key (trusted: {trusted})")]
    Untrusted { key_id: String, trusted: String },
    #[error("the signature does not verify with trusted key {key_id} ({name}): the bundle or its signature was altered, or it was signed with another key")]
    Invalid { key_id: String, name: String },
    #[error("{path}: {msg}")]
    Key { path: PathBuf, msg: String },
    #[error("{context}: {source}")]
    Io { context: String, #[source] source: std::io::Error },
}

impl SignatureError {
    fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        SignatureError::Io { context: context.into(), source }
    }
}

/// The key id of a public key: the first 8 bytes of sha256(raw key), in hex.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

/// sha256 of a whole file's bytes: what a signature binds.
pub fn sha256_of(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// A new private key from the kernel's random source (getrandom(2), through the `getrandom`
/// crate: retried when interrupted, blocks until the pool is initialised).
pub fn generate() -> Result<SigningKey, SignatureError> {
    // Wiped when dropped, on every path: the key holds its own copy.
    let mut seed = Zeroizing::new([0u8; 32]);
    getrandom::fill(seed.as_mut_slice()).map_err(|e| SignatureError::io("getrandom", e.into()))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// The public key file's text: base64 of the 32 raw bytes, one line.
pub fn encode_public_key(key: &VerifyingKey) -> String {
    format!("{}\n", BASE64.encode(key.as_bytes()))
}

/// Parse a public key: one base64 line of 32 bytes (blank lines and `#` comments ignored).
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, String> {
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    let [line] = lines.as_slice() else {
        return Err(format!("expected one line with the base64 of a 32-byte ed25519 public key, found {} lines", lines.len()));
    };
    let raw = BASE64.decode(line).map_err(|e| format!("not base64: {e}"))?;
    let raw: [u8; 32] = raw.try_into().map_err(|v: Vec<u8>| format!("an ed25519 public key is 32 bytes, this is {}", v.len()))?;
    let key = VerifyingKey::from_bytes(&raw).map_err(|_| "not a valid ed25519 public key (not a curve point)".to_string())?;
    if key.is_weak() {
        return Err("a weak (small-order) ed25519 public key; refused".into());
    }
    Ok(key)
}

/// The private key file's text.
pub fn encode_private_key(key: &SigningKey) -> String {
    format!("{PRIVATE_KEY_HEADER}\nkey-id: {}\nseed: {}\n", key_id(&key.verifying_key()), BASE64.encode(key.as_bytes()))
}

/// Parse a private key file's text.
pub fn parse_private_key(text: &str) -> Result<SigningKey, String> {
    let fields = fields(text, PRIVATE_KEY_HEADER, &["key-id", "seed"])?;
    // The decoded bytes and the seed array are wiped when dropped (the decoded Vec too, which
    // a plain `try_into` would free unwiped).
    let decoded = Zeroizing::new(BASE64.decode(&fields[1]).map_err(|e| format!("seed: not base64: {e}"))?);
    let seed: Zeroizing<[u8; 32]> =
        Zeroizing::new(decoded.as_slice().try_into().map_err(|_| format!("seed: an ed25519 seed is 32 bytes, this is {}", decoded.len()))?);
    let key = SigningKey::from_bytes(&seed);
    let id = key_id(&key.verifying_key());
    if fields[0] != id {
        return Err(format!("key-id {} does not match the key (its id is {id}): the file was altered", fields[0]));
    }
    Ok(key)
}

/// Read a small text file (at most [`MAX_FILE`] bytes).
fn read_small(path: &Path, what: &str) -> Result<String, SignatureError> {
    let meta = fs::metadata(path).map_err(|e| SignatureError::io(format!("cannot read {what} {}", path.display()), e))?;
    if !meta.is_file() {
        return Err(SignatureError::Key { path: path.into(), msg: format!("the {what} is not a regular file") });
    }
    if meta.len() > MAX_FILE {
        return Err(SignatureError::Key { path: path.into(), msg: format!("{} bytes; a {what} is at most {MAX_FILE}", meta.len()) });
    }
    let bytes = fs::read(path).map_err(|e| SignatureError::io(format!("cannot read {what} {}", path.display()), e))?;
    String::from_utf8(bytes).map_err(|_| SignatureError::Key { path: path.into(), msg: format!("the {what} is not text") })
}

/// Read a private key file. Returns the key and whether the file is readable by others than its
/// owner (the caller warns).
pub fn read_private_key(path: &Path) -> Result<(SigningKey, bool), SignatureError> {
    let text = read_small(path, "private key")?;
    let open = fs::metadata(path).map(|m| m.permissions().mode() & 0o077 != 0).unwrap_or(false);
    let key = parse_private_key(&text).map_err(|msg| SignatureError::Key { path: path.into(), msg })?;
    Ok((key, open))
}

/// Write a new key pair: `PREFIX.key` (mode 0600) and `PREFIX.pub`. Refuses to overwrite
/// either file. Returns the key and the two paths.
pub fn write_keypair(prefix: &Path) -> Result<(SigningKey, PathBuf, PathBuf), SignatureError> {
    let with = |ext: &str| {
        let mut s = prefix.as_os_str().to_owned();
        s.push(ext);
        PathBuf::from(s)
    };
    let (private, public) = (with(".key"), with(".pub"));
    for p in [&private, &public] {
        if fs::symlink_metadata(p).is_ok() {
            return Err(SignatureError::Key { path: p.clone(), msg: "exists; refusing to overwrite a key".into() });
        }
    }
    let key = generate()?;
    let write = |path: &Path, mode: u32, text: &str| -> Result<(), SignatureError> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .map_err(|e| SignatureError::io(format!("cannot create {}", path.display()), e))?;
        // The mode of create_new is filtered by the umask: set it exactly.
        f.set_permissions(fs::Permissions::from_mode(mode)).map_err(|e| SignatureError::io(format!("chmod {}", path.display()), e))?;
        f.write_all(text.as_bytes()).and_then(|_| f.sync_all()).map_err(|e| SignatureError::io(format!("cannot write {}", path.display()), e))
    };
    write(&private, 0o600, &encode_private_key(&key))?;
    write(&public, 0o644, &encode_public_key(&key.verifying_key()))?;
    Ok((key, private, public))
}

/// A detached signature of one bundle.
#[derive(Clone, PartialEq, Eq)]
pub struct Signature {
    /// Id of the key that made it.
    pub key_id: String,
    /// sha256 of the whole bundle file.
    pub bundle_sha256: [u8; 32],
    pub signature: [u8; 64],
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signature").field("key_id", &self.key_id).field("bundle_sha256", &hex::encode(self.bundle_sha256)).finish_non_exhaustive()
    }
}

/// The message a key signs for a bundle digest.
fn message(bundle_sha256: &[u8; 32]) -> Vec<u8> {
    let mut m = CONTEXT.to_vec();
    m.extend_from_slice(bundle_sha256);
    m
}

/// Sign a bundle digest (the sha256 of the whole bundle file).
pub fn sign(key: &SigningKey, bundle_sha256: &[u8; 32]) -> Signature {
    let sig = key.sign(&message(bundle_sha256));
    Signature { key_id: key_id(&key.verifying_key()), bundle_sha256: *bundle_sha256, signature: sig.to_bytes() }
}

/// `header` then `name: value` lines for exactly `names` (each once, in any order); blank lines
/// and `#` comments are ignored. Returns the values in the order of `names`.
fn fields(text: &str, header: &str, names: &[&str]) -> Result<Vec<String>, String> {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'));
    match lines.next() {
        Some(first) if first == header => {}
        Some(first) => return Err(format!("expected {header:?} on the first line, found {:?}", truncate(first))),
        None => return Err("empty".into()),
    }
    let mut values: Vec<Option<String>> = vec![None; names.len()];
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("expected `name: value`, found {:?}", truncate(line)));
        };
        let (name, value) = (name.trim(), value.trim());
        let Some(i) = names.iter().position(|n| *n == name) else {
            return Err(format!("unknown field {:?}", truncate(name)));
        };
        if values[i].replace(value.to_string()).is_some() {
            return Err(format!("field {name:?} appears twice"));
        }
    }
    names.iter().zip(values).map(|(n, v)| v.ok_or_else(|| format!("field {n:?} is missing"))).collect()
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

impl Signature {
    /// The signature file's text.
    pub fn to_text(&self) -> String {
        format!(
            "{SIGNATURE_HEADER}\nalgorithm: {ALGORITHM}\nkey-id: {}\nbundle-sha256: {}\nsignature: {}\n",
            self.key_id,
            hex::encode(self.bundle_sha256),
            BASE64.encode(self.signature)
        )
    }

    /// Parse a signature file (at most [`MAX_FILE`] bytes of UTF-8 text).
    pub fn parse(bytes: &[u8]) -> Result<Signature, SignatureError> {
        let bad = |m: String| SignatureError::Malformed(m);
        if bytes.len() as u64 > MAX_FILE {
            return Err(bad(format!("{} bytes; a signature file is at most {MAX_FILE}", bytes.len())));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| bad("not text".into()))?;
        let f = fields(text, SIGNATURE_HEADER, &["algorithm", "key-id", "bundle-sha256", "signature"]).map_err(bad)?;
        if f[0] != ALGORITHM {
            return Err(bad(format!("algorithm {:?} is not supported (only {ALGORITHM})", truncate(&f[0]))));
        }
        let key_id = f[1].to_ascii_lowercase();
        if key_id.len() != 16 || !key_id.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad("key-id: expected 16 hex digits".into()));
        }
        let digest = hex::decode(&f[2]).ok().and_then(|d| <[u8; 32]>::try_from(d).ok()).ok_or_else(|| bad("bundle-sha256: expected 64 hex digits".into()))?;
        let sig = BASE64.decode(&f[3]).map_err(|e| bad(format!("signature: not base64: {e}")))?;
        let signature: [u8; 64] = sig.try_into().map_err(|v: Vec<u8>| bad(format!("signature: an ed25519 signature is 64 bytes, this is {}", v.len())))?;
        Ok(Signature { key_id, bundle_sha256: digest, signature })
    }
}

/// A trusted public key and where it came from.
#[derive(Clone, Debug)]
pub struct TrustedKey {
    pub id: String,
    /// The file it was read from (or a name given by the caller).
    pub name: String,
    pub key: VerifyingKey,
}

/// The keys signatures are checked against.
#[derive(Clone, Debug, Default)]
pub struct TrustedKeys {
    keys: Vec<TrustedKey>,
}

/// A signature that verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub key_id: String,
    pub key_name: String,
}

impl TrustedKeys {
    pub fn new(keys: impl IntoIterator<Item = (String, VerifyingKey)>) -> Self {
        TrustedKeys { keys: keys.into_iter().map(|(name, key)| TrustedKey { id: key_id(&key), name, key }).collect() }
    }

    /// Load a key file, or every `*.pub` file of a directory (names starting with `.` skipped,
    /// as the `..data` entries of a mounted ConfigMap). Any unreadable or invalid key file is an
    /// error: a misconfigured key is never skipped silently. An empty directory gives no keys.
    pub fn load(path: &Path) -> Result<TrustedKeys, SignatureError> {
        let meta = fs::metadata(path).map_err(|e| SignatureError::io(format!("cannot read trusted keys {}", path.display()), e))?;
        let files = if meta.is_dir() {
            let mut files = vec![];
            for entry in fs::read_dir(path).map_err(|e| SignatureError::io(format!("cannot list {}", path.display()), e))? {
                let entry = entry.map_err(|e| SignatureError::io(format!("cannot list {}", path.display()), e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') || !name.ends_with(".pub") {
                    continue;
                }
                files.push(entry.path());
            }
            files.sort();
            if files.len() > MAX_KEYS {
                return Err(SignatureError::Key { path: path.into(), msg: format!("{} keys; at most {MAX_KEYS}", files.len()) });
            }
            files
        } else {
            vec![path.to_path_buf()]
        };
        let mut keys = vec![];
        for file in files {
            let text = read_small(&file, "public key")?;
            let key = parse_public_key(&text).map_err(|msg| SignatureError::Key { path: file.clone(), msg })?;
            let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            keys.push(TrustedKey { id: key_id(&key), name, key });
        }
        Ok(TrustedKeys { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn keys(&self) -> &[TrustedKey] {
        &self.keys
    }

    /// The key ids, comma-separated (for messages).
    pub fn ids(&self) -> String {
        if self.keys.is_empty() {
            return "none configured".into();
        }
        self.keys.iter().map(|k| format!("{} ({})", k.id, k.name)).collect::<Vec<_>>().join(", ")
    }

    /// Check the signature file `signature` for a bundle whose whole-file sha256 is
    /// `bundle_sha256`: well-formed, for this bundle, by a trusted key, and valid.
    pub fn verify(&self, bundle_sha256: &[u8; 32], signature: &[u8]) -> Result<Verified, SignatureError> {
        let sig = Signature::parse(signature)?;
        if &sig.bundle_sha256 != bundle_sha256 {
            return Err(SignatureError::OtherBundle { signed: hex::encode(sig.bundle_sha256), actual: hex::encode(bundle_sha256) });
        }
        let candidates: Vec<&TrustedKey> = self.keys.iter().filter(|k| k.id == sig.key_id).collect();
        if candidates.is_empty() {
            return Err(SignatureError::Untrusted { key_id: sig.key_id, trusted: self.ids() });
        }
        let ed = ed25519_dalek::Signature::from_bytes(&sig.signature);
        let msg = message(bundle_sha256);
        for k in &candidates {
            if k.key.verify_strict(&msg, &ed).is_ok() {
                return Ok(Verified { key_id: k.id.clone(), key_name: k.name.clone() });
            }
        }
        Err(SignatureError::Invalid { key_id: sig.key_id, name: candidates[0].name.clone() })
    }

    /// [`TrustedKeys::verify`] for the bytes of a whole bundle file.
    pub fn verify_bundle(&self, bundle: &[u8], signature: &[u8]) -> Result<Verified, SignatureError> {
        self.verify(&sha256_of(bundle), signature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::Bundle;

    /// A real bundle (one replaced function); the signature covers its whole-file sha256.
    fn bundle() -> Vec<u8> {
        let manifest: crate::bundle::Manifest = serde_json::from_value(serde_json::json!({
            "format_version": 1, "arch": "x86_64",
            "target": {"build_id": "ab", "path": null, "pie": true},
            "new_build_id": null, "created_at": 0, "reference_source": "decoded",
            "span": {"lo": 4096, "len": 4096},
            "pieces": [{"name": "price", "kind": "code", "svma": 4096, "len": 16, "blob": 0}],
            "functions": [{"name": "price", "kind": "changed", "old_svma": 8192, "old_size": 16, "old_digest": "00", "new_svma": 4096, "new_size": 16}],
            "fixups": [], "changed_data": []
        }))
        .unwrap();
        Bundle::to_bytes(&manifest, &[0x90; 16])
    }

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn trusted(keys: &[&SigningKey]) -> TrustedKeys {
        TrustedKeys::new(keys.iter().enumerate().map(|(i, k)| (format!("k{i}.pub"), k.verifying_key())))
    }

    fn signed(bytes: &[u8], key: &SigningKey) -> String {
        let digest = Bundle::parse(bytes).unwrap().digest;
        let digest: [u8; 32] = hex::decode(digest).unwrap().try_into().unwrap();
        sign(key, &digest).to_text()
    }

    #[test]
    fn good_signature() {
        let (b, k) = (bundle(), key(1));
        let sig = signed(&b, &k);
        assert!(sig.starts_with("livepatch-signature v1\nalgorithm: ed25519\nkey-id: "), "{sig}");
        let ok = trusted(&[&key(9), &k]).verify_bundle(&b, sig.as_bytes()).unwrap();
        assert_eq!(ok, Verified { key_id: key_id(&k.verifying_key()), key_name: "k1.pub".into() });
        // Comments, blank lines, CRLF and field order do not matter.
        let mut lines: Vec<&str> = sig.lines().collect();
        lines.swap(1, 4);
        let reordered = format!("# made by ci\r\n\r\n{}\r\n", lines.join("\r\n"));
        trusted(&[&k]).verify_bundle(&b, reordered.as_bytes()).unwrap();
        // The digest is the sha256 of the whole file.
        assert_eq!(hex::encode(sha256_of(&b)), Bundle::parse(&b).unwrap().digest);
    }

    #[test]
    fn wrong_key() {
        let (b, k, other) = (bundle(), key(1), key(2));
        // Signed by another key that is trusted too: its own id is used, and it verifies.
        let sig = signed(&b, &other);
        assert!(trusted(&[&k, &other]).verify_bundle(&b, sig.as_bytes()).is_ok());
        // Signed by `other` but claiming `k`'s id: the check with `k` fails.
        let forged = sig.replace(&key_id(&other.verifying_key()), &key_id(&k.verifying_key()));
        match trusted(&[&k]).verify_bundle(&b, forged.as_bytes()) {
            Err(e @ SignatureError::Invalid { .. }) => assert!(e.to_string().contains("does not verify"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tampered_bundle() {
        let (b, k) = (bundle(), key(1));
        let sig = signed(&b, &k);
        let mut tampered = b.clone();
        tampered[40] ^= 1;
        match trusted(&[&k]).verify_bundle(&tampered, sig.as_bytes()) {
            Err(SignatureError::OtherBundle { signed, actual }) => {
                assert_eq!(signed, hex::encode(sha256_of(&b)));
                assert_eq!(actual, hex::encode(sha256_of(&tampered)));
            }
            other => panic!("{other:?}"),
        }
        // The digest line rewritten to the tampered bundle's: the signature no longer verifies.
        let rewritten = sig.replace(&hex::encode(sha256_of(&b)), &hex::encode(sha256_of(&tampered)));
        assert!(matches!(trusted(&[&k]).verify_bundle(&tampered, rewritten.as_bytes()), Err(SignatureError::Invalid { .. })));
        // A flipped bit in the signature itself.
        let s = Signature::parse(sig.as_bytes()).unwrap();
        let mut flipped = s.clone();
        flipped.signature[10] ^= 4;
        assert!(matches!(trusted(&[&k]).verify_bundle(&b, flipped.to_text().as_bytes()), Err(SignatureError::Invalid { .. })));
        // And a signature made without the context prefix (raw digest) is not ours.
        let raw = Signature { signature: k.sign(&s.bundle_sha256).to_bytes(), ..s };
        assert!(matches!(trusted(&[&k]).verify_bundle(&b, raw.to_text().as_bytes()), Err(SignatureError::Invalid { .. })));
    }

    #[test]
    fn garbage_signature() {
        let (b, k) = (bundle(), key(1));
        let t = trusted(&[&k]);
        let good = signed(&b, &k);
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            b"\xff\xfe\x00binary".to_vec(),
            b.clone(),
            "livepatch-signature v2\n".into(),
            good.replace("ed25519", "rsa").into(),
            good.replace("key-id: ", "key-id: zz").into(),
            good.replace("bundle-sha256: ", "bundle-sha256: 00").into(),
            good.replace("signature: ", "signature: !!").into(),
            good.replace("signature: ", "signature: AAAA").into(),
            format!("{good}signature: AAAA\n").into(),
            format!("{good}extra: 1\n").into(),
            good.lines().filter(|l| !l.starts_with("key-id")).collect::<Vec<_>>().join("\n").into(),
            format!("{good}#{}\n", "x".repeat(5000)).into(),
        ];
        for case in cases {
            match t.verify_bundle(&b, &case) {
                Err(SignatureError::Malformed(_)) => {}
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(&case[..case.len().min(80)])),
            }
        }
    }

    #[test]
    fn untrusted_key() {
        let (b, k) = (bundle(), key(1));
        let sig = signed(&b, &k);
        match trusted(&[&key(2), &key(3)]).verify_bundle(&b, sig.as_bytes()) {
            Err(e @ SignatureError::Untrusted { .. }) => {
                let text = e.to_string();
                assert!(text.contains(&key_id(&k.verifying_key())) && text.contains("k0.pub") && text.contains("k1.pub"), "{text}");
            }
            other => panic!("{other:?}"),
        }
        match TrustedKeys::default().verify_bundle(&b, sig.as_bytes()) {
            Err(e @ SignatureError::Untrusted { .. }) => assert!(e.to_string().contains("none configured"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn key_files_round_trip_and_load_from_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("release");
        let (k, private, public) = write_keypair(&prefix).unwrap();
        assert_eq!(fs::metadata(&private).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(matches!(write_keypair(&prefix), Err(SignatureError::Key { .. })), "never overwrites");
        let (read, open) = read_private_key(&private).unwrap();
        assert_eq!(read.to_bytes(), k.to_bytes());
        assert!(!open);
        // The public key file is the chart's value: one base64 line.
        let text = fs::read_to_string(&public).unwrap();
        assert_eq!(text.trim().len(), 44);
        assert_eq!(parse_public_key(&text).unwrap(), k.verifying_key());

        // A directory laid out like a mounted ConfigMap: ..data entries, symbolic links.
        let keys = dir.path().join("trusted");
        fs::create_dir_all(keys.join("..2027_01_01")).unwrap();
        fs::copy(&public, keys.join("..2027_01_01/release.pub")).unwrap();
        std::os::unix::fs::symlink("..2027_01_01", keys.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/release.pub", keys.join("release.pub")).unwrap();
        fs::write(keys.join("README"), "not a key").unwrap();
        let t = TrustedKeys::load(&keys).unwrap();
        assert_eq!(t.keys().len(), 1);
        assert_eq!(t.keys()[0].id, key_id(&k.verifying_key()));
        assert_eq!(t.keys()[0].name, "release.pub");
        assert_eq!(TrustedKeys::load(&public).unwrap().keys().len(), 1);
        assert!(TrustedKeys::load(dir.path().join("empty").as_path()).is_err());
        fs::create_dir(dir.path().join("empty")).unwrap();
        assert!(TrustedKeys::load(&dir.path().join("empty")).unwrap().is_empty());

        // A bad key file is an error, not skipped.
        fs::write(keys.join("bad.pub"), "AAAA\n").unwrap();
        assert!(matches!(TrustedKeys::load(&keys), Err(SignatureError::Key { .. })));
        // A small-order point is refused.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert!(parse_public_key(&BASE64.encode(identity)).unwrap_err().contains("weak"));

        // A private key file whose id line was edited is refused.
        let edited = fs::read_to_string(&private).unwrap().replace("key-id: ", "key-id: 0");
        assert!(parse_private_key(&edited).is_err());
    }
}
