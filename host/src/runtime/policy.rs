//! Capability grants: what a manifest asks for, intersected with what the
//! operator allows. Nothing is granted by default.

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;

use super::RuntimeError;
use super::manifest::{FsAccess, Manifest};

/// How `process` commands are confined on this machine (Landlock, PID
/// namespace): probed once, for the server to report.
pub use super::process::{Confinement, PortGuard, confinement, describe_user};

/// Per-call limits of a plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock time for one call (for a provider: for one pull of the stream).
    pub deadline: Duration,
    /// Linear memory the instance may grow to.
    pub memory_bytes: usize,
    /// Bytes of output a call may return.
    pub output_bytes: usize,
    /// For a provider: bytes of text and tool input in one answer (one
    /// step). Each event is small; their sum is what the host keeps in
    /// memory, sends to clients and stores, so it is capped as a whole.
    pub step_output_bytes: usize,
    /// For a `read-write` plugin: bytes one call may write, holes past a
    /// file's end included (a sparse file takes no disk, but every reader
    /// of it sees its size).
    pub write_bytes: u64,
    /// For a `read-write` plugin: files, directories and links one call may create.
    pub max_files: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            deadline: Duration::from_secs(60),
            memory_bytes: 256 << 20,
            output_bytes: 1 << 20,
            step_output_bytes: 4 << 20,
            write_bytes: 256 << 20,
            max_files: 10_000,
        }
    }
}

/// What one call of a built-in plugin may write: `write` and `edit` write
/// one file a call, so these caps are far from anything they do and
/// still bound a call gone wrong.
const BUILTIN_WRITE_BYTES: u64 = 4 << 30;
const BUILTIN_MAX_FILES: u64 = 100_000;

/// The shortest call deadline of a plugin granted `process`: a command may
/// run for up to 10 minutes, and its own timeout must end it first.
const PROCESS_MIN_DEADLINE: Duration = Duration::from_secs(660);

/// What the operator lets one third-party plugin have (`[plugins.NAME]` in
/// the config file). Built-in plugins get what their manifests ask for.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginPolicy {
    #[serde(default)]
    pub filesystem: FsAccess,
    /// Origin patterns; `https://*.example.com` also matches subdomains.
    #[serde(default)]
    pub http: Vec<String>,
    #[serde(default)]
    pub process: bool,
    /// Environment variables a provider plugin may read for its key and
    /// base URL (`key_env`, `base_url_env` in its manifest). Built-in
    /// providers read only their vendor's variables; others read none
    /// unless listed here.
    #[serde(default)]
    pub env: Vec<String>,
    pub timeout_ms: Option<u64>,
    pub memory_mb: Option<u64>,
    pub output_kb: Option<u64>,
    /// Bytes one call may write (`read-write` only) [default: 256; 4096 for built-ins].
    pub write_mb: Option<u64>,
    /// Files one call may create (`read-write` only) [default: 10,000; 100,000 for built-ins].
    pub max_files: Option<u64>,
    /// What this plugin's commands get, over `[process]`.
    #[serde(default)]
    pub commands: CommandOverrides,
}

/// `[plugins.NAME.commands]`: the `[process]` limits, for one plugin's commands.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandOverrides {
    pub memory_mb: Option<u64>,
    pub max_processes: Option<u64>,
    pub cpu_seconds: Option<u64>,
    pub file_size_mb: Option<u64>,
    /// `true`: network as with `network = "all"`; `false`: none.
    pub network: Option<bool>,
    pub allowed_ports: Option<Vec<u16>>,
}

impl CommandOverrides {
    /// `base` with each setting given here in its place.
    pub fn apply(&self, base: &super::cgroup::CommandLimits) -> super::cgroup::CommandLimits {
        super::cgroup::CommandLimits {
            memory_bytes: self.memory_mb.map(|mb| mb << 20).unwrap_or(base.memory_bytes),
            max_processes: self.max_processes.unwrap_or(base.max_processes),
            cpu_seconds: self.cpu_seconds.or(base.cpu_seconds),
            file_size_bytes: self.file_size_mb.map(|mb| mb << 20).unwrap_or(base.file_size_bytes),
            network: self.network.unwrap_or(base.network),
            allowed_ports: self.allowed_ports.clone().unwrap_or_else(|| base.allowed_ports.clone()),
            user: base.user,
        }
    }
}

/// The operator's capability policy.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub plugins: HashMap<String, PluginPolicy>,
    pub defaults: Limits,
    /// Refuse to run `process` commands where the kernel cannot confine them.
    pub require_confinement: bool,
    /// Run `process` commands even where nothing keeps them off the
    /// server's own ports (no Landlock TCP rules, no network namespace), so
    /// that they could call its API. Off by default.
    pub allow_unconfined_commands: bool,
    /// Memory, processes, CPU time and file size of each command.
    pub commands: super::cgroup::CommandLimits,
}

/// What a loaded plugin may do.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    pub filesystem: FsAccess,
    pub http: Vec<OriginPattern>,
    pub process: bool,
    /// Environment variables the host reads for this (provider) plugin.
    pub env: Vec<String>,
    pub limits: Limits,
    /// What its commands get (with `process`).
    pub commands: super::cgroup::CommandLimits,
}

impl Policy {
    /// The grants for a plugin, or the first capability its manifest asks
    /// for that the policy does not allow.
    pub fn grant(&self, manifest: &Manifest, builtin: bool) -> Result<Grants, RuntimeError> {
        self.grant_on(manifest, builtin, confinement())
    }

    /// Why `process` is withheld on a machine that confines commands as
    /// `confinement` says, if it is.
    pub fn process_withheld(&self, confinement: &Confinement) -> Option<String> {
        if self.require_confinement && !confinement.is_complete() {
            return Some(format!("the operator requires confinement and this machine runs commands {}", confinement.describe()));
        }
        if confinement.port_guard() == PortGuard::None && !self.allow_unconfined_commands {
            return Some(format!(
                "nothing here keeps commands off the server's own API (no Landlock TCP rules, no network namespace); \
                 set allow_unconfined_commands to run them anyway. Commands run {}",
                confinement.describe()
            ));
        }
        None
    }

    /// [`Policy::grant`] on a machine that confines commands as
    /// `confinement` says. Where that is less than the operator requires,
    /// `process` is withheld: the plugin still registers, but fails to load
    /// with an error naming the capability, so `bash` refuses to run rather
    /// than run unconfined.
    fn grant_on(&self, manifest: &Manifest, builtin: bool, confinement: &Confinement) -> Result<Grants, RuntimeError> {
        let grants = self.grant_asked(manifest, builtin)?;
        if grants.process
            && let Some(reason) = self.process_withheld(confinement)
        {
            tracing::warn!(plugin = %manifest.name, "not granting `process`: {reason}");
            return Ok(Grants { process: false, ..grants });
        }
        Ok(grants)
    }

    /// The grants of a tenant's plugin: what its manifest asks, refused
    /// where it asks more than `cap` (`[tenants.plugin_policy]`) allows.
    pub fn grant_capped(&self, manifest: &Manifest, cap: &PluginPolicy) -> Result<Grants, RuntimeError> {
        let grants = self.grant_within(manifest, false, cap)?;
        if grants.process
            && let Some(reason) = self.process_withheld(confinement())
        {
            tracing::warn!(plugin = %manifest.name, "not granting `process`: {reason}");
            return Ok(Grants { process: false, ..grants });
        }
        Ok(grants)
    }

    fn grant_asked(&self, manifest: &Manifest, builtin: bool) -> Result<Grants, RuntimeError> {
        let empty = PluginPolicy::default();
        let allowed = self.plugins.get(&manifest.name).unwrap_or(&empty);
        self.grant_within(manifest, builtin, allowed)
    }

    fn grant_within(&self, manifest: &Manifest, builtin: bool, allowed: &PluginPolicy) -> Result<Grants, RuntimeError> {
        let asked = &manifest.capabilities;
        let name = &manifest.name;
        let parse = |pattern: &String| {
            OriginPattern::parse(pattern).map_err(|reason| RuntimeError::Manifest {
                plugin: name.clone(),
                reason: format!("http origin `{pattern}`: {reason}"),
            })
        };
        let http: Vec<OriginPattern> = asked.http.iter().map(parse).collect::<Result<_, _>>()?;
        let mut limits = self.defaults;
        if asked.process {
            // A command may run for up to 10 minutes; the call must outlive it.
            limits.deadline = limits.deadline.max(PROCESS_MIN_DEADLINE);
        }
        let env: Vec<String> =
            [&manifest.provider.key_env, &manifest.provider.base_url_env].into_iter().flatten().cloned().collect();
        // The operator may tune the commands of a built-in (`[plugins.bash.commands]`) too.
        let commands = allowed.commands.apply(&self.commands);
        if builtin {
            limits.write_bytes = allowed.write_mb.map_or(BUILTIN_WRITE_BYTES, |mb| mb.saturating_mul(1 << 20));
            limits.max_files = allowed.max_files.unwrap_or(BUILTIN_MAX_FILES);
            return Ok(Grants { filesystem: asked.filesystem, http, process: asked.process, env, limits, commands });
        }

        let deny = |capability: &str, reason: String| RuntimeError::CapabilityDenied {
            plugin: name.clone(),
            capability: capability.to_string(),
            reason,
        };
        if asked.filesystem > allowed.filesystem {
            return Err(deny(
                "filesystem",
                format!(
                    "the manifest asks for `{}` access and the operator policy allows `{}`",
                    asked.filesystem, allowed.filesystem
                ),
            ));
        }
        if asked.process && !allowed.process {
            return Err(deny("process", "the operator policy does not grant it to this plugin".into()));
        }
        let patterns: Vec<OriginPattern> = allowed.http.iter().map(parse).collect::<Result<_, _>>()?;
        for origin in &http {
            if !patterns.iter().any(|p| p.covers(origin)) {
                return Err(deny(
                    "http",
                    format!("origin `{origin}` is not allowed by the operator policy"),
                ));
            }
        }
        // An uploaded manifest could name any variable (`ANTHROPIC_API_KEY`
        // as a base URL): only the operator's list is read.
        if let Some(name) = env.iter().find(|name| !allowed.env.contains(name)) {
            return Err(deny(
                "environment",
                format!("the manifest reads the environment variable `{name}`, which the operator policy does not list"),
            ));
        }
        if let Some(ms) = allowed.timeout_ms {
            limits.deadline = Duration::from_millis(ms);
            if asked.process {
                // An operator may set a longer deadline, never a shorter one.
                limits.deadline = limits.deadline.max(PROCESS_MIN_DEADLINE);
            }
        }
        if let Some(mb) = allowed.memory_mb {
            limits.memory_bytes = (mb as usize) << 20;
        }
        if let Some(kb) = allowed.output_kb {
            limits.output_bytes = (kb as usize) << 10;
        }
        if let Some(mb) = allowed.write_mb {
            limits.write_bytes = mb.saturating_mul(1 << 20);
        }
        if let Some(files) = allowed.max_files {
            limits.max_files = files;
        }
        Ok(Grants { filesystem: asked.filesystem, http, process: asked.process, env, limits, commands })
    }
}

/// A concrete origin: scheme, host, port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub scheme: String,
    pub host: String,
    pub port: u16,
}

impl Origin {
    pub fn parse(text: &str) -> Result<Origin, String> {
        let url = url::Url::parse(text).map_err(|e| e.to_string())?;
        Origin::of(&url)
    }

    pub fn of(url: &url::Url) -> Result<Origin, String> {
        let scheme = url.scheme().to_string();
        if scheme != "http" && scheme != "https" {
            return Err(format!("scheme `{scheme}` is not http or https"));
        }
        let host = url.host_str().ok_or("no host")?.to_ascii_lowercase();
        let port = url.port_or_known_default().ok_or("no port")?;
        Ok(Origin { scheme, host, port })
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
    }
}

/// An origin, or with a `*.` host prefix a domain and all its subdomains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPattern {
    origin: Origin,
    subdomains: bool,
}

impl OriginPattern {
    pub fn parse(text: &str) -> Result<OriginPattern, String> {
        match text.split_once("://*.") {
            Some((scheme, rest)) => {
                let origin = Origin::parse(&format!("{scheme}://{rest}"))?;
                Ok(OriginPattern { origin, subdomains: true })
            }
            None => Ok(OriginPattern { origin: Origin::parse(text)?, subdomains: false }),
        }
    }

    pub fn exact(origin: Origin) -> OriginPattern {
        OriginPattern { origin, subdomains: false }
    }

    pub fn matches(&self, origin: &Origin) -> bool {
        if self.origin.scheme != origin.scheme || self.origin.port != origin.port {
            return false;
        }
        origin.host == self.origin.host
            || (self.subdomains
                && origin.host.len() > self.origin.host.len()
                && origin.host.ends_with(&self.origin.host)
                && origin.host.as_bytes()[origin.host.len() - self.origin.host.len() - 1] == b'.')
    }

    /// The host it names exactly (none for a `*.` pattern).
    pub fn exact_host(&self) -> Option<&str> {
        (!self.subdomains).then_some(self.origin.host.as_str())
    }

    /// Whether every origin `other` matches is matched by `self` too.
    pub fn covers(&self, other: &OriginPattern) -> bool {
        self.matches(&other.origin) && (!other.subdomains || self.subdomains)
    }
}

impl std::fmt::Display for OriginPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.subdomains {
            write!(f, "{}://*.{}:{}", self.origin.scheme, self.origin.host, self.origin.port)
        } else {
            self.origin.fmt(f)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_matches_subdomains_only_on_a_label_boundary() {
        let p = OriginPattern::parse("https://*.example.com").unwrap();
        assert!(p.matches(&Origin::parse("https://api.example.com").unwrap()));
        assert!(p.matches(&Origin::parse("https://example.com").unwrap()));
        assert!(!p.matches(&Origin::parse("https://badexample.com").unwrap()));
        assert!(!p.matches(&Origin::parse("http://api.example.com").unwrap()));
        assert!(!p.matches(&Origin::parse("https://api.example.com:8443").unwrap()));
    }

    fn manifest(caps: &str) -> Manifest {
        Manifest::parse(&format!("kind = \"tool\"\nname = \"x\"\nversion = \"1\"\n[capabilities]\n{caps}"), Some("x")).unwrap()
    }

    #[test]
    fn third_party_capabilities_are_denied_unless_the_policy_grants_them() {
        let policy = Policy::default();
        for caps in ["filesystem = \"read\"", "process = true", "http = [\"https://example.com\"]"] {
            let err = policy.grant(&manifest(caps), false).unwrap_err();
            assert!(matches!(err, RuntimeError::CapabilityDenied { .. }), "{caps}: {err}");
            assert!(err.to_string().contains("`x`"), "names the plugin: {err}");
        }
        // Built-ins get what they ask for.
        assert!(policy.grant(&manifest("process = true"), true).unwrap().process);
    }

    fn machine(landlock_abi: i32, namespaces: bool) -> Confinement {
        Confinement::probed_as(landlock_abi, namespaces)
    }

    #[test]
    fn required_confinement_withholds_process_where_the_machine_cannot_confine() {
        let mut policy = Policy::default();
        let process = manifest("process = true");
        let partial = machine(3, true);
        assert!(!partial.is_complete());
        assert!(policy.grant_on(&process, true, &partial).unwrap().process, "not required: a partial confinement is allowed");
        policy.require_confinement = true;
        assert!(!policy.grant_on(&process, true, &partial).unwrap().process, "ABI 3 lacks what the server relies on");
        assert!(policy.grant_on(&process, true, &machine(6, true)).unwrap().process);
        assert!(!policy.grant_on(&process, true, &machine(6, false)).unwrap().process, "no namespaces");
    }

    #[test]
    fn process_is_withheld_where_nothing_keeps_commands_off_the_api() {
        let mut policy = Policy::default();
        let process = manifest("process = true");
        // Neither Landlock TCP rules (ABI 4) nor a network namespace.
        let open = machine(3, false);
        assert_eq!(open.port_guard(), PortGuard::None);
        let withheld = policy.process_withheld(&open).unwrap();
        assert!(withheld.contains("allow_unconfined_commands"), "{withheld}");
        assert!(!policy.grant_on(&process, true, &open).unwrap().process);
        policy.allow_unconfined_commands = true;
        assert!(policy.grant_on(&process, true, &open).unwrap().process, "the operator opted in");
        assert_eq!(machine(4, false).port_guard(), PortGuard::Landlock);
        assert_eq!(machine(3, true).port_guard(), PortGuard::Namespace);
    }

    fn provider_manifest(env: &str) -> Manifest {
        Manifest::parse(&format!("kind = \"provider\"\nname = \"p\"\nversion = \"1\"\n[provider]\n{env}"), Some("p")).unwrap()
    }

    #[test]
    fn a_provider_reads_only_the_environment_variables_the_operator_lists() {
        let mut policy = Policy::default();
        let m = provider_manifest("base_url_env = \"ANTHROPIC_API_KEY\"");
        let err = policy.grant(&m, false).unwrap_err();
        assert!(matches!(&err, RuntimeError::CapabilityDenied { capability, .. } if capability == "environment"), "{err}");
        assert!(err.to_string().contains("ANTHROPIC_API_KEY"), "{err}");
        policy.plugins.insert("p".into(), PluginPolicy { env: vec!["P_BASE_URL".into()], ..Default::default() });
        assert!(policy.grant(&m, false).is_err(), "another name is listed");
        let ok = policy.grant(&provider_manifest("base_url_env = \"P_BASE_URL\""), false).unwrap();
        assert_eq!(ok.env, vec!["P_BASE_URL".to_string()]);
        // Built-ins read what their manifests name.
        assert_eq!(policy.grant(&m, true).unwrap().env, vec!["ANTHROPIC_API_KEY".to_string()]);
    }

    #[test]
    fn a_timeout_override_never_takes_a_process_plugin_below_the_floor() {
        let with_timeout = |process: bool, ms: u64| {
            let mut policy = Policy::default();
            policy.plugins.insert("x".into(), PluginPolicy { process, timeout_ms: Some(ms), ..Default::default() });
            policy
        };
        let process = manifest("process = true");
        let deadline = |policy: &Policy, m: &Manifest| policy.grant_on(m, false, &machine(6, true)).unwrap().limits.deadline;
        assert_eq!(deadline(&with_timeout(true, 1_000), &process), PROCESS_MIN_DEADLINE, "lowered to the floor, not below");
        assert_eq!(PROCESS_MIN_DEADLINE, Duration::from_secs(660), "the 11 minutes docs/plugins.md promises");
        assert_eq!(deadline(&with_timeout(true, 900_000), &process), Duration::from_secs(900), "raised above it");
        assert_eq!(deadline(&with_timeout(false, 1_000), &manifest("")), Duration::from_secs(1), "no process: as set");
    }

    #[test]
    fn write_limits_default_by_origin_and_follow_the_operator() {
        let mut policy = Policy::default();
        let rw = manifest("filesystem = \"read-write\"");
        policy.plugins.insert("x".into(), PluginPolicy { filesystem: FsAccess::ReadWrite, ..Default::default() });
        let third = policy.grant(&rw, false).unwrap().limits;
        assert_eq!((third.write_bytes, third.max_files), (256 << 20, 10_000));
        let builtin = policy.grant(&rw, true).unwrap().limits;
        assert_eq!((builtin.write_bytes, builtin.max_files), (BUILTIN_WRITE_BYTES, BUILTIN_MAX_FILES));
        policy.plugins.insert(
            "x".into(),
            PluginPolicy { filesystem: FsAccess::ReadWrite, write_mb: Some(1), max_files: Some(10), ..Default::default() },
        );
        for builtin in [false, true] {
            let set = policy.grant(&rw, builtin).unwrap().limits;
            assert_eq!((set.write_bytes, set.max_files), (1 << 20, 10), "builtin: {builtin}");
        }
    }

    #[test]
    fn policy_grants_are_checked_capability_by_capability() {
        let mut policy = Policy::default();
        policy.plugins.insert(
            "x".into(),
            PluginPolicy { filesystem: FsAccess::Read, http: vec!["https://*.example.com".into()], ..Default::default() },
        );
        assert!(policy.grant(&manifest("filesystem = \"read\""), false).is_ok());
        let err = policy.grant(&manifest("filesystem = \"read-write\""), false).unwrap_err();
        assert!(err.to_string().contains("filesystem"), "{err}");
        assert!(policy.grant(&manifest("http = [\"https://api.example.com\"]"), false).is_ok());
        let err = policy.grant(&manifest("http = [\"https://evil.test\"]"), false).unwrap_err();
        assert!(err.to_string().contains("https://evil.test:443"), "{err}");
    }
}
