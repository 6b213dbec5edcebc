//! `build --emit-manifest`: the Kubernetes objects that roll a bundle out, written next to it.
//!
//! One YAML file with a ConfigMap holding the bundle (`binaryData`) and a `LivePatch` naming it,
//! with the digest and the old build id filled in. Names come from the bundle's file name (or
//! `--name`), never from the time or a hash, so a rebuilt fix replaces the same objects in a
//! GitOps repository; nothing a server generates (uid, status, timestamps) is written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::ByteString;
use livepatch::bundle::Bundle;
use livepatch_api::{KeyRef, LivePatch, LivePatchSpec, PatchBundle, Rollout, Safety, TargetExecutable};

/// What the API server accepts in one ConfigMap: the sum of its keys' values (raw bytes of
/// `binaryData`) must not exceed 1 MiB (`MaxSecretSize` in Kubernetes' validation).
pub const CONFIGMAP_MAX_BYTES: usize = 1024 * 1024;

/// The `build` flags that describe the rollout.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct ManifestArgs {
    /// Also write NAME.yaml next to the bundle: a ConfigMap with the bundle and a LivePatch that
    /// rolls it out (`kubectl apply -f`, or commit it to a GitOps repository).
    #[arg(long)]
    pub emit_manifest: bool,
    /// Name of the LivePatch (and, with `-bundle` appended, of its ConfigMap). Default: the
    /// bundle's file name without its extension.
    #[arg(long, requires = "emit_manifest")]
    pub name: Option<String>,
    /// Namespace of both objects (the namespace of the pods to patch).
    #[arg(long, short = 'n', requires = "emit_manifest")]
    pub namespace: Option<String>,
    /// Which pods: `key=value` labels, comma-separated or repeated (all must match).
    #[arg(long, short = 'l', requires = "emit_manifest")]
    pub selector: Vec<String>,
    /// The container to patch in each pod (default: the pod's default container).
    #[arg(long, requires = "emit_manifest")]
    pub container: Option<String>,
    /// Only processes running this absolute path inside the container.
    #[arg(long = "target-path", requires = "emit_manifest")]
    pub target_path: Option<String>,
    /// Serve the bundle from this https URL instead of a ConfigMap (for bundles over 1 MiB):
    /// the LivePatch names the URL and no ConfigMap is written.
    #[arg(long, requires = "emit_manifest")]
    pub bundle_url: Option<String>,
}

/// The checked rollout description, made before anything is written.
pub struct Plan {
    name: String,
    namespace: String,
    labels: BTreeMap<String, String>,
    container: Option<String>,
    target_path: Option<String>,
    url: Option<String>,
    file: PathBuf,
}

impl ManifestArgs {
    /// Check the flags against the bundle's path; `None` without `--emit-manifest`. Done before
    /// the build so that a typo in a label costs nothing.
    pub fn plan(&self, bundle: &Path) -> anyhow::Result<Option<Plan>> {
        if !self.emit_manifest {
            return Ok(None);
        }
        let stem = bundle.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        let name = match &self.name {
            Some(n) => n.clone(),
            None => dns_label(stem).with_context(|| format!("cannot make a resource name from the bundle's file name {stem:?}: pass --name"))?,
        };
        check_name("--name", &name, 63 - "-bundle".len())?;
        let Some(namespace) = self.namespace.clone() else {
            bail!("--emit-manifest needs --namespace: the namespace of the pods to patch");
        };
        check_name("--namespace", &namespace, 63)?;
        let labels = parse_selector(&self.selector)?;
        if labels.is_empty() {
            bail!("--emit-manifest needs --selector key=value: a LivePatch never targets every pod of a namespace");
        }
        if let Some(c) = &self.container {
            check_name("--container", c, 63)?;
        }
        if let Some(p) = &self.target_path {
            if !p.starts_with('/') {
                bail!("--target-path {p:?} must be an absolute path inside the container");
            }
        }
        if let Some(u) = &self.bundle_url {
            let host = u.strip_prefix("https://").map(|r| r.split(['/', '?', '#']).next().unwrap_or(""));
            if host.is_none_or(str::is_empty) {
                bail!("--bundle-url {u:?} must be an https URL (the agent downloads only over https)");
            }
        }
        let dir = bundle.parent().unwrap_or(Path::new(""));
        Ok(Some(Plan {
            file: dir.join(format!("{name}.yaml")),
            name,
            namespace,
            labels,
            container: self.container.clone(),
            target_path: self.target_path.clone(),
            url: self.bundle_url.clone(),
        }))
    }
}

impl Plan {
    /// Render the objects for the written bundle `b` (whose file is `bytes`); refuses, with the
    /// way out, a bundle a ConfigMap cannot hold.
    pub fn render(&self, b: &Bundle, bytes: &[u8]) -> anyhow::Result<String> {
        let key = "patch.lpatch";
        let (source, config_map) = match &self.url {
            Some(url) => (PatchBundle { config_map_ref: None, secret_ref: None, url: Some(url.clone()), sha256: b.digest.clone() }, None),
            None => {
                fits_configmap(key, bytes.len())?;
                let cm = ConfigMap {
                    metadata: self.meta(format!("{}-bundle", self.name)),
                    binary_data: Some(BTreeMap::from([(key.to_string(), ByteString(bytes.to_vec()))])),
                    ..Default::default()
                };
                let r = KeyRef { name: format!("{}-bundle", self.name), key: key.into() };
                (PatchBundle { config_map_ref: Some(r), secret_ref: None, url: None, sha256: b.digest.clone() }, Some(cm))
            }
        };
        let spec = LivePatchSpec {
            selector: LabelSelector { match_labels: Some(self.labels.clone()), match_expressions: None },
            container: self.container.clone(),
            target: TargetExecutable { build_id: b.manifest.target.build_id.clone(), path: self.target_path.clone() },
            patch: source,
            safety: Safety::default(),
            rollout: Rollout::default(),
        };
        let mut lp = LivePatch::new(&self.name, spec);
        lp.metadata = self.meta(self.name.clone());
        let mut out = format!(
            "# Written by `livepatch build --emit-manifest`: patch {} of build id {} ({}).\n# Apply with `kubectl apply -f {}`.\n",
            b.patch_id(),
            b.manifest.target.build_id,
            b.manifest.functions.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(", "),
            self.file.file_name().map(|f| f.to_string_lossy()).unwrap_or_default()
        );
        if let Some(cm) = config_map {
            out += "---\n";
            out += &yaml(&with_kind(&cm, "v1", "ConfigMap")?)?;
        }
        out += "---\n";
        out += &yaml(&lp)?;
        Ok(out)
    }

    /// Where the manifest goes.
    pub fn file(&self) -> &Path {
        &self.file
    }

    fn meta(&self, name: String) -> ObjectMeta {
        let labels = BTreeMap::from([
            ("app.kubernetes.io/managed-by".to_string(), "livepatch-cli".to_string()),
            ("livepatch.dev/livepatch".to_string(), self.name.clone()),
        ]);
        ObjectMeta { name: Some(name), namespace: Some(self.namespace.clone()), labels: Some(labels), ..Default::default() }
    }
}

/// A ConfigMap holds at most [`CONFIGMAP_MAX_BYTES`] of keys' values; the way out is a URL.
fn fits_configmap(key: &str, len: usize) -> anyhow::Result<()> {
    if len + key.len() > CONFIGMAP_MAX_BYTES {
        bail!(
            "the bundle is {len} bytes, more than a ConfigMap holds ({CONFIGMAP_MAX_BYTES} bytes): serve it over https and pass --bundle-url URL (the LivePatch then names the URL and its sha256)"
        );
    }
    Ok(())
}

/// k8s-openapi's built-in types leave `apiVersion`/`kind` to the client: put them in.
fn with_kind<T: serde::Serialize>(obj: &T, api_version: &str, kind: &str) -> anyhow::Result<serde_json::Value> {
    let mut v = serde_json::to_value(obj)?;
    v["apiVersion"] = api_version.into();
    v["kind"] = kind.into();
    Ok(v)
}

fn yaml<T: serde::Serialize>(v: &T) -> anyhow::Result<String> {
    serde_saphyr::to_string(v).context("rendering YAML")
}

/// `app=cart,tier=web` (flags may repeat) as match labels. Set-based selectors are not taken:
/// write them in the emitted file by hand.
fn parse_selector(items: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    for part in items.iter().flat_map(|s| s.split(',')).map(str::trim).filter(|s| !s.is_empty()) {
        let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) else {
            bail!("--selector {part:?}: want key=value (set-based selectors: edit the emitted file)");
        };
        let (k, v) = (k.trim(), v.trim());
        if k.ends_with('!') || !label_key_ok(k) || !label_value_ok(v) {
            bail!("--selector {part:?}: not a valid label key=value (key: [prefix/]name of letters, digits, '-', '_', '.'; value: at most 63 such characters)");
        }
        if let Some(old) = labels.insert(k.to_string(), v.to_string()) {
            if old != v {
                bail!("--selector gives {k} twice ({old:?} and {v:?})");
            }
        }
    }
    Ok(labels)
}

fn label_name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn label_key_ok(k: &str) -> bool {
    match k.rsplit_once('/') {
        Some((prefix, name)) => prefix.len() <= 253 && dns_subdomain_ok(prefix) && label_name_ok(name),
        None => label_name_ok(k),
    }
}

fn label_value_ok(v: &str) -> bool {
    v.is_empty() || label_name_ok(v)
}

fn dns_subdomain_ok(s: &str) -> bool {
    s.split('.').all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') && !p.starts_with('-') && !p.ends_with('-'))
}

fn check_name(flag: &str, name: &str, max: usize) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= max
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !ok {
        bail!("{flag} {name:?}: want at most {max} lowercase letters, digits and '-', starting and ending with a letter or digit");
    }
    Ok(())
}

/// A file name as a DNS label: lowercase, other characters as '-', trimmed.
fn dns_label(s: &str) -> Option<String> {
    let mapped: String = s.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    let mut out = String::new();
    for c in mapped.chars() {
        if !(c == '-' && out.ends_with('-')) {
            out.push(c);
        }
    }
    let out: String = out.trim_matches('-').chars().take(63 - "-bundle".len()).collect();
    let out = out.trim_end_matches('-').to_string();
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors() {
        let l = parse_selector(&["app=cart,tier==web".into(), " team = pay ".into()]).unwrap();
        assert_eq!(l.into_iter().collect::<Vec<_>>(), [("app".into(), "cart".into()), ("team".into(), "pay".into()), ("tier".into(), "web".into())]);
        assert!(parse_selector(&["example.com/app=x".into()]).is_ok());
        for bad in ["app", "app!=x", "app in (a,b)", "-a=b", "a=b c", "Ex.com/a=b", "a=b,a=c"] {
            assert!(parse_selector(&[bad.into()]).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn configmap_size_limit() {
        assert!(fits_configmap("patch.lpatch", 64 * 1024).is_ok());
        assert!(fits_configmap("patch.lpatch", CONFIGMAP_MAX_BYTES - 12).is_ok());
        let e = fits_configmap("patch.lpatch", CONFIGMAP_MAX_BYTES - 11).unwrap_err().to_string();
        assert!(e.contains("--bundle-url"), "{e}");
    }

    #[test]
    fn names_from_files() {
        assert_eq!(dns_label("CVE-2024_1234.fix").as_deref(), Some("cve-2024-1234-fix"));
        assert_eq!(dns_label("__").as_deref(), None);
        assert_eq!(dns_label(&"a".repeat(80)).map(|s| s.len()), Some(56));
        assert!(check_name("--name", "ok-name-1", 56).is_ok());
        for bad in ["Upper", "-lead", "trail-", "", "dot.ted"] {
            assert!(check_name("--name", bad, 56).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn plan_needs_namespace_and_selector() {
        let base = ManifestArgs { emit_manifest: true, namespace: Some("shop".into()), selector: vec!["app=cart".into()], ..Default::default() };
        let p = base.plan(Path::new("/tmp/out/cart_fix.lpatch")).unwrap().unwrap();
        assert_eq!((p.name.as_str(), p.file.as_path()), ("cart-fix", Path::new("/tmp/out/cart-fix.yaml")));
        assert!(ManifestArgs { namespace: None, ..base.clone() }.plan(Path::new("a.lpatch")).is_err());
        assert!(ManifestArgs { selector: vec![], ..base.clone() }.plan(Path::new("a.lpatch")).is_err());
        assert!(ManifestArgs { target_path: Some("bin/x".into()), ..base.clone() }.plan(Path::new("a.lpatch")).is_err());
        assert!(ManifestArgs { bundle_url: Some("http://x/y".into()), ..base.clone() }.plan(Path::new("a.lpatch")).is_err());
        assert!(ManifestArgs { emit_manifest: false, ..base.clone() }.plan(Path::new("a.lpatch")).unwrap().is_none());
    }
}
