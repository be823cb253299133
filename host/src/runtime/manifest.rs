//! `NAME.plugin.toml`: what a plugin is and what it asks for.

use serde::Deserialize;

use super::RuntimeError;

/// Which world a plugin implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Tool,
    Provider,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Tool => "tool",
            Kind::Provider => "provider",
        }
    }
}

/// Filesystem access to the session's working directory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum FsAccess {
    #[default]
    None,
    Read,
    ReadWrite,
}

impl FsAccess {
    /// The manifest's spelling: `none`, `read`, `read-write`.
    pub fn as_str(self) -> &'static str {
        match self {
            FsAccess::None => "none",
            FsAccess::Read => "read",
            FsAccess::ReadWrite => "read-write",
        }
    }
}

impl std::fmt::Display for FsAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Capabilities a manifest asks for. Nothing is granted unless asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    #[serde(default)]
    pub filesystem: FsAccess,
    /// Origins (`scheme://host[:port]`) the plugin may send requests to.
    #[serde(default)]
    pub http: Vec<String>,
    #[serde(default)]
    pub process: bool,
}

/// Provider-only settings: where the host finds a key and a base URL when
/// none is stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSection {
    /// Environment variable holding the API key (`ANTHROPIC_API_KEY`).
    pub key_env: Option<String>,
    /// Environment variable holding a base URL (`ANTHROPIC_BASE_URL`).
    pub base_url_env: Option<String>,
    /// The vendor's origin, the only one its key is sent to when no base
    /// URL is stored (default: the one `http` origin, when there is one).
    pub key_origin: Option<String>,
    /// The header the key travels in: `authorization` (as a bearer token,
    /// the default) or a vendor's own (`x-api-key`).
    pub key_header: Option<String>,
}

/// How a tool call's permission subject is read (see `crate::permissions`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PatternKind {
    /// A shell command line: each simple command is matched on its own.
    Command,
    /// A path in the working directory, matched relative to it.
    Path,
    /// Any other text, matched as it is.
    #[default]
    Text,
}

/// Tool-only settings: what permission rules match a call against.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolSection {
    /// The input field rule patterns match (`command`, `path`); without
    /// one, only the pattern `*` can match this tool's calls.
    pub pattern_field: Option<String>,
    #[serde(default)]
    pub pattern_kind: PatternKind,
    /// The field's value when a call leaves it out (`.` for a search path).
    pub pattern_default: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub kind: Kind,
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub capabilities: Capabilities,
    #[serde(default)]
    pub provider: ProviderSection,
    #[serde(default)]
    pub tool: ToolSection,
}

impl Manifest {
    /// Parses a manifest. `origin` names the plugin in errors when the text
    /// does not name it (a file's stem; `None` for an upload).
    pub fn parse(text: &str, origin: Option<&str>) -> Result<Manifest, RuntimeError> {
        let invalid = |reason: String| match origin {
            Some(plugin) => RuntimeError::Manifest { plugin: plugin.to_string(), reason },
            None => match named_in(text) {
                Some(plugin) => RuntimeError::Manifest { plugin, reason },
                None => RuntimeError::UploadedManifest { reason },
            },
        };
        let manifest: Manifest = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let valid_name = !manifest.name.is_empty()
            && manifest.name.len() <= 64
            && manifest.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !valid_name {
            return Err(invalid(format!("name `{}` must be 1-64 characters of a-z, 0-9, `_` and `-`", manifest.name)));
        }
        if let Some(origin_text) = &manifest.provider.key_origin {
            super::policy::Origin::parse(origin_text).map_err(|reason| RuntimeError::Manifest {
                plugin: manifest.name.clone(),
                reason: format!("key_origin `{origin_text}`: {reason}"),
            })?;
        }
        for origin_text in &manifest.capabilities.http {
            super::policy::Origin::parse(origin_text).map_err(|reason| RuntimeError::Manifest {
                plugin: manifest.name.clone(),
                reason: format!("http origin `{origin_text}`: {reason}"),
            })?;
        }
        Ok(manifest)
    }
}

/// The `name` of a manifest that does not parse as a whole, when it has a
/// valid-looking one.
fn named_in(text: &str) -> Option<String> {
    let table: toml::Table = toml::from_str(text).ok()?;
    let name = table.get("name")?.as_str()?;
    let plausible = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    plausible.then(|| name.to_string())
}
