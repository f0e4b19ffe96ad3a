//! `cargo xtask assets --fetch`: download what the default bench suite needs from its public sources, verify
//! pinned SHA-256 checksums, and write each file atomically in the layout of the shared asset pack.
//!
//! Sources (each pinned to a commit, so the bytes cannot change under us):
//! - MiniLM-L6 (`config.json`, `tokenizer.json`, `model.safetensors`): the Hugging Face Hub model
//!   `sentence-transformers/all-MiniLM-L6-v2` at revision [`MINILM_REVISION`], through the Hub's
//!   `<endpoint>/<repo>/resolve/<revision>/<file>` URLs (the ones `hf-hub` and `huggingface_hub` use). The Hub
//!   ships F32 weights; the asset pack holds them as F16 with the `embeddings.position_ids` buffer dropped
//!   (`build-scripts/01_minilm.py`), so the downloaded file is checked against the Hub's checksum, converted the
//!   same way, and the result checked against the pack's checksum.
//! - GLUE SST-2 and MRPC TSVs: the public GitHub copies the pack was built from (`data/glue/README.md`), served
//!   as plain files by `raw.githubusercontent.com`; MRPC's UTF-8 byte-order mark is removed as the pack does.
//!
//! Endpoints can be overridden: `HF_ENDPOINT` (as the Hub clients honour it) for the Hub and
//! `PEFT_GITHUB_RAW_ENDPOINT` for the GitHub files, e.g. a mirror, or a loopback server in tests.
//!
//! Nothing is written unless its checksum matches, so a failed or corrupted download leaves no file behind.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

/// Environment variable overriding the Hugging Face Hub endpoint (default [`DEFAULT_HF_ENDPOINT`]).
pub const HF_ENDPOINT_ENV: &str = "HF_ENDPOINT";
/// Environment variable overriding the GitHub raw-file endpoint (default [`DEFAULT_GITHUB_RAW_ENDPOINT`]).
pub const GITHUB_RAW_ENV: &str = "PEFT_GITHUB_RAW_ENDPOINT";
/// The public Hugging Face Hub.
pub const DEFAULT_HF_ENDPOINT: &str = "https://huggingface.co";
/// GitHub's raw-file host.
pub const DEFAULT_GITHUB_RAW_ENDPOINT: &str = "https://raw.githubusercontent.com";

/// The Hub repository of MiniLM-L6.
pub const MINILM_REPO: &str = "sentence-transformers/all-MiniLM-L6-v2";
/// The pinned Hub revision of [`MINILM_REPO`] (a commit with `model.safetensors`).
pub const MINILM_REVISION: &str = "1110a243fdf4706b3f48f1d95db1a4f5529b4d41";

/// The largest body accepted from a server (the biggest file is 91 MB): a hostile or broken server cannot make
/// the fetcher hold more than this in memory.
const MAX_BODY: u64 = 256 << 20;

/// Where a file comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A file of a Hugging Face Hub model repository at a revision.
    Hub {
        /// `owner/name`.
        repo: &'static str,
        /// Commit.
        revision: &'static str,
        /// Path inside the repository.
        file: &'static str,
    },
    /// A file of a public GitHub repository at a commit.
    GitHub {
        /// `owner/name`.
        repo: &'static str,
        /// Commit.
        commit: &'static str,
        /// Path inside the repository.
        path: &'static str,
    },
}

/// What is done to the downloaded bytes before they are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transform {
    /// Written as downloaded.
    None,
    /// A leading UTF-8 byte-order mark is removed (the pack's MRPC files).
    StripBom,
    /// F32 safetensors to the pack's F16 file (`build-scripts/01_minilm.py`): see [`minilm_to_f16`].
    MiniLmF16,
}

/// One file to fetch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remote {
    /// Path relative to the asset directory (the pack's layout).
    pub rel: &'static str,
    /// Where it comes from.
    pub source: Source,
    /// SHA-256 of the downloaded bytes, where it differs from [`Remote::sha256`] and is known.
    pub source_sha256: Option<&'static str>,
    /// The transformation to the written file.
    pub transform: Transform,
    /// SHA-256 of the written file (as in the pack's `MANIFEST.sha256`).
    pub sha256: &'static str,
}

const AUTOPROMPT: &str = "eyalbd2/Reproducing-AutoPrompt";
const AUTOPROMPT_COMMIT: &str = "6288fb5bec9c572f2492875ae0111df5b6daed11";
const MY_BERT: &str = "Nstats/my_bert";
const MY_BERT_COMMIT: &str = "733d79335044b1b7eabb5b47a0eae0cd621dadc0";

const fn hub(file: &'static str) -> Source {
    Source::Hub { repo: MINILM_REPO, revision: MINILM_REVISION, file }
}

/// The files `cargo xtask bench` with no arguments needs (GLUE SST-2 and MRPC on MiniLM-L6), with their sources
/// and pinned checksums.
pub const DEFAULT_SUITE: &[Remote] = &[
    Remote {
        rel: "models/all-MiniLM-L6-v2/config.json",
        source: hub("config.json"),
        source_sha256: None,
        transform: Transform::None,
        sha256: "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    },
    Remote {
        rel: "models/all-MiniLM-L6-v2/tokenizer.json",
        source: hub("tokenizer.json"),
        source_sha256: None,
        transform: Transform::None,
        sha256: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    },
    Remote {
        rel: "models/all-MiniLM-L6-v2/model.safetensors",
        source: hub("model.safetensors"),
        // The Hub's F32 file (90,868,376 bytes) at MINILM_REVISION.
        source_sha256: Some("53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
        transform: Transform::MiniLmF16,
        sha256: "5ba0032aefec27c763b2d9c8912eeec19529d4efdab9a71a9756e8056ba8f2e0",
    },
    Remote {
        rel: "data/glue/SST-2/train.tsv",
        source: Source::GitHub { repo: AUTOPROMPT, commit: AUTOPROMPT_COMMIT, path: "glue_data/SST-2/train_full.tsv" },
        source_sha256: None,
        transform: Transform::None,
        sha256: "48eac26399f8456935f81dd9e3a745c1430adb6c62e233ccfe22db4a0d15d1d1",
    },
    Remote {
        rel: "data/glue/SST-2/dev.tsv",
        source: Source::GitHub { repo: AUTOPROMPT, commit: AUTOPROMPT_COMMIT, path: "glue_data/SST-2/dev.tsv" },
        source_sha256: None,
        transform: Transform::None,
        sha256: "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0",
    },
    Remote {
        rel: "data/glue/MRPC/train.tsv",
        source: Source::GitHub { repo: MY_BERT, commit: MY_BERT_COMMIT, path: "data/MRPC/train.tsv" },
        source_sha256: None,
        transform: Transform::StripBom,
        sha256: "7ca66df7a96900cb23102a34180d3af6c6a2bc326044cba85024acc2e980424e",
    },
    Remote {
        rel: "data/glue/MRPC/dev.tsv",
        source: Source::GitHub { repo: MY_BERT, commit: MY_BERT_COMMIT, path: "data/MRPC/dev.tsv" },
        source_sha256: None,
        transform: Transform::StripBom,
        sha256: "54e210d9022bb2aae2b1af66d4e81a6aba540e767f1b18d96820356d752bf672",
    },
];

/// The base URLs files are fetched from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoints {
    /// Hugging Face Hub, without a trailing `/`.
    pub hub: String,
    /// GitHub raw files, without a trailing `/`.
    pub github_raw: String,
}

impl Endpoints {
    /// From `HF_ENDPOINT` and `PEFT_GITHUB_RAW_ENDPOINT`, else the public hosts.
    pub fn from_env() -> Self {
        let get =
            |k: &str, d: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty()).unwrap_or_else(|| d.to_string());
        Endpoints::new(&get(HF_ENDPOINT_ENV, DEFAULT_HF_ENDPOINT), &get(GITHUB_RAW_ENV, DEFAULT_GITHUB_RAW_ENDPOINT))
    }

    /// The given base URLs (a trailing `/` is dropped).
    pub fn new(hub: &str, github_raw: &str) -> Self {
        Endpoints {
            hub: hub.trim().trim_end_matches('/').to_string(),
            github_raw: github_raw.trim().trim_end_matches('/').to_string(),
        }
    }

    /// The URL of `source`.
    pub fn url(&self, source: &Source) -> String {
        match source {
            Source::Hub { repo, revision, file } => format!("{}/{repo}/resolve/{revision}/{file}", self.hub),
            Source::GitHub { repo, commit, path } => format!("{}/{repo}/{commit}/{path}", self.github_raw),
        }
    }
}

/// Checksums replacing the pinned ones, by asset-relative path: for mirrors serving other bytes and for tests
/// serving small fake files. Normal runs use the pinned values; this is only read when `--checksums FILE` is
/// given.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
pub struct ChecksumOverride {
    /// SHA-256 of the written file.
    pub sha256: Option<String>,
    /// SHA-256 of the downloaded bytes (for files that are transformed).
    pub source_sha256: Option<String>,
}

/// Why one file could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The server could not be reached (connection refused, DNS failure, timeout, TLS failure).
    #[error("{url}: cannot connect: {reason}")]
    Unreachable {
        /// The URL.
        url: String,
        /// The client's message.
        reason: String,
    },
    /// The server answered with an error status.
    #[error("{url}: HTTP status {status}")]
    Status {
        /// The URL.
        url: String,
        /// The status.
        status: u16,
    },
    /// Reading the body failed or it was larger than the cap.
    #[error("{url}: {reason}")]
    Body {
        /// The URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The bytes do not have the pinned checksum.
    #[error("{what} of {url} has SHA-256 {actual}, expected {expected}; nothing was written")]
    Checksum {
        /// Which bytes: the download, or the file made from it.
        what: &'static str,
        /// The URL.
        url: String,
        /// The pinned checksum.
        expected: String,
        /// The checksum of what was received.
        actual: String,
    },
    /// The conversion of the downloaded file failed.
    #[error("{url}: cannot convert: {reason}")]
    Convert {
        /// The URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// Writing the file failed.
    #[error(transparent)]
    Write(#[from] peft_core::io::IoError),
}

/// What happened to one file.
#[derive(Debug)]
pub enum Outcome {
    /// Already present with the right checksum.
    Present,
    /// Downloaded, verified and written (bytes written).
    Fetched(u64),
    /// Not fetched.
    Failed(FetchError),
    /// Not tried because its host was unreachable for an earlier file.
    Skipped,
}

/// One file's result from [`fetch_all`].
#[derive(Debug)]
pub struct FileResult {
    /// The file.
    pub remote: Remote,
    /// The URL it is fetched from.
    pub url: String,
    /// The checksum it must have when written (pinned, or from `--checksums`).
    pub sha256: String,
    /// What happened.
    pub outcome: Outcome,
}

impl FileResult {
    /// Whether the file is still missing (failed or not tried).
    pub fn is_missing(&self) -> bool {
        matches!(self.outcome, Outcome::Failed(_) | Outcome::Skipped)
    }
}

/// The SHA-256 of `bytes` in lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The SHA-256 of the file at `path`, `None` when it cannot be read.
fn file_sha256(path: &Path) -> Option<String> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => h.update(&buf[..n]),
            Err(_) => return None,
        }
    }
    Some(h.finalize().iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    }))
}

/// Downloads `url` into memory (at most [`MAX_BODY`] bytes).
fn download(agent: &ureq::Agent, url: &str) -> Result<Vec<u8>, FetchError> {
    let resp = match agent.get(url).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(status, _)) => return Err(FetchError::Status { url: url.into(), status }),
        Err(ureq::Error::Transport(t)) => {
            // The client's own text repeats the URL; keep its kind, message and cause.
            let mut reason = t.kind().to_string();
            if let Some(m) = t.message() {
                let _ = write!(reason, ": {m}");
            }
            if let Some(src) = std::error::Error::source(&t) {
                let _ = write!(reason, ": {src}");
            }
            return Err(FetchError::Unreachable { url: url.into(), reason });
        }
    };
    let mut body = Vec::new();
    resp.into_reader()
        .take(MAX_BODY + 1)
        .read_to_end(&mut body)
        .map_err(|e| FetchError::Body { url: url.into(), reason: format!("reading the body: {e}") })?;
    if body.len() as u64 > MAX_BODY {
        return Err(FetchError::Body { url: url.into(), reason: format!("body larger than {MAX_BODY} bytes") });
    }
    Ok(body)
}

/// The pack's F16 MiniLM file from the Hub's F32 one, as `build-scripts/01_minilm.py` makes it: the prefixes
/// `bert.`, `model.`, `0.auto_model.` are removed from tensor names, `embeddings.position_ids` (an integer buffer,
/// not a parameter) is dropped, every other tensor must be F32 and is rounded to F16 (round to nearest even, as
/// numpy's `astype(float16)`) and must stay finite; the file is written with metadata `{"format": "pt"}`.
///
/// # Errors
/// A file that is not safetensors, a non-F32 parameter, a value that overflows F16.
pub fn minilm_to_f16(bytes: &[u8]) -> Result<Vec<u8>, String> {
    use safetensors::tensor::{Dtype, TensorView};
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| format!("not a safetensors file: {e}"))?;
    let mut out: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        let mut short = name.as_str();
        for pre in ["bert.", "model.", "0.auto_model."] {
            short = short.strip_prefix(pre).unwrap_or(short);
        }
        if short == "embeddings.position_ids" {
            continue;
        }
        if view.dtype() != Dtype::F32 {
            return Err(format!("tensor {name} is {:?}, expected F32", view.dtype()));
        }
        let mut data = Vec::with_capacity(view.data().len() / 2);
        for c in view.data().chunks_exact(4) {
            let h = half::f16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
            if !h.is_finite() {
                return Err(format!("tensor {name} has a value that is not finite in F16"));
            }
            data.extend_from_slice(&h.to_le_bytes());
        }
        out.push((short.to_string(), view.shape().to_vec(), data));
    }
    let views = out
        .iter()
        .map(|(n, s, d)| TensorView::new(Dtype::F16, s.clone(), d).map(|v| (n.as_str(), v)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("building {e}"))?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    safetensors::serialize(views, Some(meta)).map_err(|e| format!("serializing: {e}"))
}

/// Downloads, verifies, converts and verifies one file; returns the bytes to write.
fn fetch_one(
    agent: &ureq::Agent,
    url: &str,
    r: &Remote,
    sums: Option<&ChecksumOverride>,
) -> Result<Vec<u8>, FetchError> {
    let expected = sums.and_then(|s| s.sha256.as_deref()).unwrap_or(r.sha256);
    let expected_src = sums.and_then(|s| s.source_sha256.as_deref()).or(r.source_sha256);
    let body = download(agent, url)?;
    let checksum = |what, bytes: &[u8], expected: &str| {
        let actual = sha256_hex(bytes);
        if actual.eq_ignore_ascii_case(expected) {
            Ok(())
        } else {
            Err(FetchError::Checksum { what, url: url.into(), expected: expected.into(), actual })
        }
    };
    if let Some(src) = expected_src {
        checksum("download", &body, src)?;
    }
    let out = match r.transform {
        Transform::None => body,
        Transform::StripBom => match body.strip_prefix(b"\xef\xbb\xbf") {
            Some(rest) => rest.to_vec(),
            None => body,
        },
        Transform::MiniLmF16 => {
            minilm_to_f16(&body).map_err(|reason| FetchError::Convert { url: url.into(), reason })?
        }
    };
    let what = match r.transform {
        Transform::None => "download",
        Transform::StripBom => "download (byte-order mark removed)",
        Transform::MiniLmF16 => "F16 conversion",
    };
    checksum(what, &out, expected)?;
    Ok(out)
}

/// The host part of a URL (`scheme://host[:port]`), to skip further files of a host that cannot be reached.
fn origin(url: &str) -> &str {
    let after = url.find("://").map_or(0, |i| i + 3);
    url[after..].find('/').map_or(url, |i| &url[..after + i])
}

/// Whether `url`'s host is the loopback interface (`localhost`, `127.x.x.x`, `[::1]`).
fn is_loopback(url: &str) -> bool {
    let o = origin(url);
    let host = o.find("://").map_or(o, |i| &o[i + 3..]);
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    // Without the port: `[v6]:port`, `v4:port`, `name:port`.
    let bare = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => host.split(':').next().unwrap_or(host),
    };
    bare.eq_ignore_ascii_case("localhost") || bare.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Fetches every file of `remotes` missing under `dest` (or present with another checksum), printing one line per
/// file. Returns each file's outcome, in order.
pub fn fetch_all(
    dest: &Path,
    remotes: &[Remote],
    endpoints: &Endpoints,
    overrides: &BTreeMap<String, ChecksumOverride>,
) -> Vec<FileResult> {
    let agent = |proxy: bool| {
        ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(20))
            .timeout_read(Duration::from_secs(120))
            .user_agent(concat!("peft-rs-xtask/", env!("CARGO_PKG_VERSION")))
            // `ALL_PROXY`/`HTTPS_PROXY`/`HTTP_PROXY` as curl reads them (ureq 2 has no `NO_PROXY`, so loopback
            // endpoints get an agent without a proxy); the Hub redirects large files to its CDN.
            .try_proxy_from_env(proxy)
            .redirects(5)
            .build()
    };
    let (proxied, direct) = (agent(true), agent(false));
    let mut unreachable: HashSet<String> = HashSet::new();
    let mut results = Vec::new();
    for r in remotes {
        let url = endpoints.url(&r.source);
        let sums = overrides.get(r.rel);
        let path = dest.join(r.rel);
        let expected = sums.and_then(|s| s.sha256.as_deref()).unwrap_or(r.sha256);
        let outcome = if path.is_file() && file_sha256(&path).is_some_and(|h| h.eq_ignore_ascii_case(expected)) {
            println!("  ok       {} (present, checksum verified)", r.rel);
            Outcome::Present
        } else if unreachable.contains(origin(&url)) {
            println!("  skipped  {} ({} unreachable)", r.rel, origin(&url));
            Outcome::Skipped
        } else {
            if path.exists() {
                println!("  replace  {} (present with another checksum)", r.rel);
            }
            let agent = if is_loopback(&url) { &direct } else { &proxied };
            match fetch_one(agent, &url, r, sums).and_then(|bytes| {
                let parent = path.parent().unwrap_or(dest);
                std::fs::create_dir_all(parent).map_err(|e| peft_core::io::IoError::io(parent, e))?;
                peft_core::io::atomic_write(&path, |w| w.write_all(&bytes))?;
                Ok(bytes.len() as u64)
            }) {
                Ok(n) => {
                    println!("  fetched  {} ({n} bytes, sha256 {expected})", r.rel);
                    Outcome::Fetched(n)
                }
                Err(e) => {
                    if matches!(e, FetchError::Unreachable { .. }) {
                        unreachable.insert(origin(&url).to_string());
                    }
                    println!("  FAILED   {}: {e}", r.rel);
                    Outcome::Failed(e)
                }
            }
        };
        results.push(FileResult { remote: r.clone(), url, sha256: expected.to_string(), outcome });
    }
    results
}

/// The message for files still missing after [`fetch_all`]: each path, its URL and checksum, so they can be
/// fetched by hand.
pub fn explain_missing(dest: &Path, endpoints: &Endpoints, results: &[FileResult]) -> String {
    let mut s = String::new();
    let missing: Vec<_> = results.iter().filter(|f| f.is_missing()).collect();
    let _ = writeln!(s, "{} file(s) could not be fetched into {}:", missing.len(), dest.display());
    for FileResult { remote: r, url, sha256, outcome: o } in missing {
        let _ = writeln!(s, "  - {}", r.rel);
        let _ = writeln!(s, "      from:   {url}");
        match r.transform {
            Transform::None => {}
            Transform::StripBom => {
                let _ = writeln!(s, "      then:   remove the leading UTF-8 byte-order mark");
            }
            Transform::MiniLmF16 => {
                let _ = writeln!(
                    s,
                    "      then:   convert to F16 as shared/assets/build-scripts/01_minilm.py does (or rerun this \
                     command once the host is reachable)"
                );
            }
        }
        let _ = writeln!(s, "      sha256: {sha256}");
        if let Outcome::Failed(e) = o {
            let _ = writeln!(s, "      error:  {e}");
        }
    }
    let _ = writeln!(
        s,
        "Hosts: {} (set {HF_ENDPOINT_ENV} for a mirror) and {} (set {GITHUB_RAW_ENV}). Put the files at the paths \
         above under {} (checksums must match), or rerun `cargo xtask assets --fetch` when online.",
        endpoints.hub,
        endpoints.github_raw,
        dest.display()
    );
    s
}

/// Reads a `--checksums` file: a JSON object from asset-relative path to `{"sha256": ..., "source_sha256": ...}`.
///
/// # Errors
/// An unreadable file or invalid JSON, naming the file.
pub fn read_overrides(path: &Path) -> anyhow::Result<BTreeMap<String, ChecksumOverride>> {
    use anyhow::Context as _;
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a checksum override file", path.display()))
}

/// The default destination: `PEFT_ASSETS` when set, else the asset directory found by the usual lookup, else
/// `<workspace>/target/peft-assets`.
pub fn default_dest() -> PathBuf {
    if let Some(v) = std::env::var_os(peft_core::io::assets::ASSETS_ENV).filter(|v| !v.is_empty()) {
        return PathBuf::from(v);
    }
    if let Some(d) = peft_core::io::assets_dir() {
        return d;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(Path::new(".")).join("target").join("peft-assets")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_follow_the_hub_and_github_raw_layouts() {
        let e = Endpoints::new("http://127.0.0.1:9/", "http://127.0.0.1:9");
        assert_eq!(
            e.url(&DEFAULT_SUITE[0].source),
            format!("http://127.0.0.1:9/{MINILM_REPO}/resolve/{MINILM_REVISION}/config.json")
        );
        assert_eq!(
            e.url(&DEFAULT_SUITE[3].source),
            format!("http://127.0.0.1:9/{AUTOPROMPT}/{AUTOPROMPT_COMMIT}/glue_data/SST-2/train_full.tsv")
        );
        assert_eq!(origin("http://127.0.0.1:9/a/b"), "http://127.0.0.1:9");
        assert_eq!(origin("https://huggingface.co"), "https://huggingface.co");
        assert!(
            is_loopback("http://127.0.0.1:9/a") && is_loopback("http://localhost/x") && is_loopback("http://[::1]:5/")
        );
        assert!(!is_loopback("https://huggingface.co/a") && !is_loopback("https://127.example.com/"));
    }

    /// The pinned checksums are the shared pack's (`MANIFEST.sha256`), and the default suite is what the bench
    /// checks for.
    #[test]
    fn pinned_checksums_match_the_shared_pack() {
        let needs = crate::assets::glue_needs(&[crate::glue::tasks::Task::Sst2, crate::glue::tasks::Task::Mrpc]);
        let rels: Vec<_> = DEFAULT_SUITE.iter().map(|r| r.rel).collect();
        for n in &needs {
            assert!(rels.contains(&n.rel.as_str()), "{} is needed but not fetched", n.rel);
        }
        for r in DEFAULT_SUITE {
            let Some(p) = peft_core::testing::require_asset(r.rel) else { return };
            assert_eq!(file_sha256(&p).as_deref(), Some(r.sha256), "{}", r.rel);
        }
    }

    /// The conversion reproduces the pack's F16 file byte for byte from an F32 file with the Hub's extra buffer
    /// (the pack's values upcast exactly, so rounding back gives the same halves).
    #[test]
    fn minilm_conversion_reproduces_the_pack_file() {
        use safetensors::tensor::{Dtype, TensorView};
        let Some(p) = peft_core::testing::require_asset("models/all-MiniLM-L6-v2/model.safetensors") else { return };
        let pack = std::fs::read(&p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&pack).unwrap();
        let mut f32s: Vec<(String, Vec<usize>, Vec<u8>, Dtype)> = st
            .tensors()
            .into_iter()
            .map(|(n, v)| {
                let d: Vec<u8> = v
                    .data()
                    .chunks_exact(2)
                    .flat_map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32().to_le_bytes())
                    .collect();
                (n, v.shape().to_vec(), d, Dtype::F32)
            })
            .collect();
        let pos: Vec<u8> = (0..512i64).flat_map(|i| i.to_le_bytes()).collect();
        f32s.push(("embeddings.position_ids".into(), vec![1, 512], pos, Dtype::I64));
        let views: Vec<_> =
            f32s.iter().map(|(n, s, d, t)| (n.clone(), TensorView::new(*t, s.clone(), d).unwrap())).collect();
        let hub_like = safetensors::serialize(views, None).unwrap();
        let out = minilm_to_f16(&hub_like).unwrap();
        assert_eq!(sha256_hex(&out), DEFAULT_SUITE[2].sha256);
        assert_eq!(out, pack);
    }

    #[test]
    fn conversion_refuses_garbage_and_overflow() {
        assert!(minilm_to_f16(b"not safetensors").is_err());
        use safetensors::tensor::{Dtype, TensorView};
        let d = 1e6f32.to_le_bytes();
        let v = TensorView::new(Dtype::F32, vec![1], &d).unwrap();
        let bytes = safetensors::serialize([("x", v)], None).unwrap();
        assert!(minilm_to_f16(&bytes).unwrap_err().contains("not finite"));
    }
}
