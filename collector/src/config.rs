// TEMPORARY STAND-IN until the helper's config.rs lands.
use serde::Deserialize;
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};
pub const MAX_ROUTES: usize = 256;
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: SocketAddr,
    pub pin_dir: PathBuf,
    pub cgroup2: Option<PathBuf>,
    pub interfaces: Vec<String>,
    pub all_namespaces: bool,
    pub poll_interval: Duration,
    pub routes: Vec<Route>,
    pub dns: DnsConfig,
}
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub name: String,
    pub ports: Vec<u16>,
    pub kind: RouteKind,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteKind {
    Http,
    Https,
    Websocket,
    Tcp,
}
impl RouteKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
            Self::Websocket => "websocket",
            Self::Tcp => "tcp",
        }
    }
}
#[derive(Debug, Clone, PartialEq)]
pub struct DnsConfig {
    pub ports: Vec<u16>,
    pub top_k: usize,
    pub sample_every: u32,
}
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {reason}")]
pub struct ConfigError {
    pub source_name: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub reason: String,
}
#[derive(Deserialize)]
struct RawRoute {
    name: String,
    ports: Vec<u16>,
    #[serde(rename = "type")]
    kind: RouteKind,
}
#[derive(Deserialize)]
struct Raw {
    listen: Option<SocketAddr>,
    pin_dir: Option<PathBuf>,
    cgroup2: Option<PathBuf>,
    #[serde(default)]
    interfaces: Vec<String>,
    #[serde(default)]
    all_namespaces: bool,
    poll_interval_ms: Option<u64>,
    #[serde(default)]
    routes: Vec<RawRoute>,
}
impl Config {
    pub fn embedded_default() -> Config {
        Self::from_toml(
            "default",
            "[[routes]]\nname = \"web\"\nports = [80, 8080]\ntype = \"http\"\n",
        )
        .unwrap()
    }
    pub fn from_toml(source_name: &str, text: &str) -> Result<Config, ConfigError> {
        let raw: Raw = toml::from_str(text).map_err(|e| ConfigError {
            source_name: source_name.into(),
            line: None,
            column: None,
            reason: e.to_string(),
        })?;
        Ok(Config {
            listen: raw
                .listen
                .unwrap_or_else(|| "127.0.0.1:9464".parse().unwrap()),
            pin_dir: raw
                .pin_dir
                .unwrap_or_else(|| "/sys/fs/bpf/collector".into()),
            cgroup2: raw.cgroup2,
            interfaces: raw.interfaces,
            all_namespaces: raw.all_namespaces,
            poll_interval: Duration::from_millis(raw.poll_interval_ms.unwrap_or(1000)),
            routes: raw
                .routes
                .into_iter()
                .map(|r| Route {
                    name: r.name,
                    ports: r.ports,
                    kind: r.kind,
                })
                .collect(),
            dns: DnsConfig {
                ports: vec![53],
                top_k: 100,
                sample_every: 1,
            },
        })
    }
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source_name: path.display().to_string(),
            line: None,
            column: None,
            reason: e.to_string(),
        })?;
        Self::from_toml(&path.display().to_string(), &text)
    }
}
