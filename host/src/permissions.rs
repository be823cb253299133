//! Permissions: whether a tool call runs, is refused, or waits for a
//! person's answer.
//!
//! Rules come from the config file (for every agent) and then from the
//! agent; the last rule that matches decides. What a rule's pattern is
//! matched against depends on the tool: the manifest's `[tool]` section
//! names the input field and whether it holds a shell command, a path in
//! the working directory, or plain text. A shell command line is cut into
//! its simple commands with a real parser (tree-sitter-bash) and each is
//! decided on its own: the line runs only if every command may run, so an
//! `allow` for `git *` does not let `git status; rm -rf ~` through, and a
//! `deny` for `rm *` cannot be dodged by putting `true;` in front.

use std::fmt;

use globset::{GlobBuilder, GlobMatcher};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::runtime::manifest::PatternKind;

/// What happens to a call a rule matches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// The call runs.
    #[default]
    Allow,
    /// The run waits until a person answers.
    Ask,
    /// The call is not run; the model is told which rule refused it.
    Deny,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Ask => "ask",
            Action::Deny => "deny",
        }
    }
}

/// One permission rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// A tool name, or `*` for every tool.
    #[schema(min_length = 1, pattern = r"\S")]
    pub tool: String,
    /// A glob over what the call touches: for `bash` each command of the
    /// line (`git *`; `X *` also matches `X` alone), for `read`, `write`
    /// and `edit` the path relative to the working directory (`src/**`),
    /// for `glob` and `grep` the searched directory. `*` matches any call.
    #[serde(default = "any")]
    pub pattern: String,
    pub action: Action,
}

fn any() -> String {
    "*".to_string()
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{\"tool\": {:?}, \"pattern\": {:?}, \"action\": \"{}\"}}", self.tool, self.pattern, self.action.as_str())
    }
}

/// Where a rule was written, to name it in errors and refusals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// `[[permissions.rules]]` of the config file, by index.
    Config(usize),
    /// The agent's `permissions`, by index.
    Agent(usize),
    /// `[[permissions.enforce]]` of the config file, by index: after the
    /// agent's, so no agent can override them.
    Enforced(usize),
    /// A grant an `always` answer left in the session.
    Grant,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Config(i) => write!(f, "rule {i} of [permissions] in the config file"),
            Origin::Agent(i) => write!(f, "`permissions[{i}]` of the agent"),
            Origin::Enforced(i) => write!(f, "enforced rule {i} of [permissions] in the config file"),
            Origin::Grant => write!(f, "a grant of the session"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error("{origin} {rule}: `tool` must be a tool name or `*`")]
    EmptyTool { origin: Origin, rule: Rule },
    #[error("{origin} {rule}: the pattern is not a valid glob: {reason}")]
    Pattern { origin: Origin, rule: Rule, reason: String },
}

/// A rule, ready to match.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub rule: Rule,
    pub origin: Origin,
    /// `None` for `*`, which matches every call, even one with nothing to
    /// match against.
    globs: Option<Globs>,
}

/// A pattern compiled for each kind of subject: in paths `*` stops at `/`
/// (`src/*` is the files of `src`, `src/**` all below it); in commands and
/// text it does not (`git *` matches `git log -- a/b`).
#[derive(Debug, Clone)]
struct Globs {
    path: GlobMatcher,
    text: GlobMatcher,
    /// `X *` in a command also matches `X` alone.
    bare: Option<GlobMatcher>,
}

fn glob(pattern: &str, literal_separator: bool) -> Result<GlobMatcher, globset::Error> {
    Ok(GlobBuilder::new(pattern).literal_separator(literal_separator).backslash_escape(true).build()?.compile_matcher())
}

impl Compiled {
    pub fn new(rule: Rule, origin: Origin) -> Result<Compiled, RuleError> {
        if rule.tool.trim().is_empty() {
            return Err(RuleError::EmptyTool { origin, rule });
        }
        let globs = if rule.pattern == "*" {
            None
        } else {
            let compile = || -> Result<Globs, globset::Error> {
                Ok(Globs {
                    path: glob(&rule.pattern, true)?,
                    text: glob(&rule.pattern, false)?,
                    bare: rule.pattern.strip_suffix(" *").map(|bare| glob(bare, false)).transpose()?,
                })
            };
            match compile() {
                Ok(g) => Some(g),
                Err(e) => return Err(RuleError::Pattern { reason: e.kind().to_string(), origin, rule }),
            }
        };
        Ok(Compiled { rule, origin, globs })
    }

    fn applies_to(&self, tool: &str) -> bool {
        self.rule.tool == "*" || self.rule.tool == tool
    }

    /// Whether the pattern matches one unit of a call (`None`: a call with
    /// nothing to match, which only `*` matches).
    fn matches(&self, kind: PatternKind, unit: Option<&str>) -> bool {
        let Some(globs) = &self.globs else { return true };
        let Some(unit) = unit else { return false };
        match kind {
            PatternKind::Path => globs.path.is_match(unit),
            PatternKind::Command => globs.text.is_match(unit) || globs.bare.as_ref().is_some_and(|b| b.is_match(unit)),
            PatternKind::Text => globs.text.is_match(unit),
        }
    }

    pub fn is_any(&self) -> bool {
        self.globs.is_none()
    }
}

/// Compiles a list of rules, naming the first invalid one.
pub fn compile(rules: &[Rule], origin: impl Fn(usize) -> Origin) -> Result<Vec<Compiled>, RuleError> {
    rules.iter().enumerate().map(|(i, r)| Compiled::new(r.clone(), origin(i))).collect()
}

/// A standing "yes" given with an `always` reply, for one session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub tool: String,
    pub pattern: String,
}

impl Grant {
    /// The grant as an `allow` rule for its tool, ready to match (`None`
    /// for a pattern that is not a glob, which nothing stores).
    pub fn compile(&self) -> Option<Compiled> {
        let rule = Rule { tool: self.tool.clone(), pattern: self.pattern.clone(), action: Action::Allow };
        Compiled::new(rule, Origin::Grant).ok()
    }
}

/// What a tool call is matched against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub kind: PatternKind,
    /// The field's value; `None` when the tool names no field or the call
    /// leaves it out and it has no default.
    pub value: Option<String>,
}

/// The verdict on one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Not run; the text tells the model why.
    Deny(String),
    /// Waits for an answer; an `always` answer grants these patterns.
    Ask { patterns: Vec<String> },
}

/// Everything that decides a session's calls for one agent.
pub struct Policy<'a> {
    /// The config file's rules, then the agent's, then the config file's
    /// enforced ones.
    pub rules: Vec<&'a Compiled>,
    pub default: Action,
    /// The session's grants, compiled ([`Grant::compile`]).
    pub grants: &'a [Compiled],
}

impl Policy<'_> {
    /// Decides one call of `tool` on `subject`.
    pub fn decide(&self, tool: &str, subject: &Subject) -> Decision {
        let rules: Vec<&Compiled> = self.rules.iter().copied().filter(|r| r.applies_to(tool)).collect();
        // The common case costs nothing: when no rule can say anything but
        // `allow`, nothing is parsed.
        if self.default == Action::Allow && rules.iter().all(|r| r.rule.action == Action::Allow) {
            return Decision::Allow;
        }
        let units: Vec<Option<String>> = match (&subject.kind, &subject.value) {
            (_, None) => vec![None],
            (PatternKind::Command, Some(line)) => match simple_commands(line) {
                Some(commands) if commands.is_empty() => vec![None],
                Some(commands) => commands.into_iter().map(Some).collect(),
                None => {
                    // A line the parser cannot read could hide anything.
                    let can_ask = self.default == Action::Ask || rules.iter().any(|r| r.rule.action == Action::Ask);
                    let only_any = rules.iter().all(|r| r.is_any());
                    if only_any {
                        vec![Some(line.clone())]
                    } else if can_ask {
                        return Decision::Ask { patterns: vec![escape(line.trim())] };
                    } else {
                        return Decision::Deny(format!(
                            "`{tool}` was not run: its command line could not be parsed, so the permission rules cannot be checked against it; write it as plain commands"
                        ));
                    }
                }
            },
            (PatternKind::Path, Some(path)) => vec![Some(path.clone())],
            (PatternKind::Text, Some(text)) => vec![Some(text.clone())],
        };
        let mut asks = Vec::new();
        for unit in &units {
            let unit = unit.as_deref();
            let last = rules.iter().rev().find(|r| r.matches(subject.kind, unit));
            let action = last.map(|r| r.rule.action).unwrap_or(self.default);
            match action {
                Action::Allow => {}
                Action::Deny => {
                    let why = match last {
                        Some(rule) => format!("{} {}", rule.origin, rule.rule),
                        None => "the server's default (`[permissions] default = \"deny\"`)".to_string(),
                    };
                    let what = unit.map(|u| format!(" `{u}`")).unwrap_or_default();
                    return Decision::Deny(format!("`{tool}`{what} was not run: denied by {why}"));
                }
                Action::Ask => {
                    let granted = self.grants.iter().any(|g| g.rule.tool == tool && g.matches(subject.kind, unit));
                    if !granted {
                        let pattern = suggest(subject.kind, unit);
                        if !asks.contains(&pattern) {
                            asks.push(pattern);
                        }
                    }
                }
            }
        }
        if asks.is_empty() { Decision::Allow } else { Decision::Ask { patterns: asks } }
    }
}

/// The pattern an `always` answer grants for one unit: for a command its
/// program and, when the next word reads like a subcommand (`git status`,
/// `cargo test`), that word too, then ` *`; for a path or text the value
/// itself; `*` for a call with nothing to match.
fn suggest(kind: PatternKind, unit: Option<&str>) -> String {
    let Some(unit) = unit else { return "*".to_string() };
    match kind {
        PatternKind::Command => {
            let mut words = unit.split(' ');
            let program = words.next().unwrap_or_default();
            let sub = words.next().filter(|w| {
                w.chars().next().is_some_and(|c| c.is_ascii_lowercase())
                    && w.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
            });
            match sub {
                Some(sub) => format!("{} {} *", escape(program), escape(sub)),
                None => format!("{} *", escape(program)),
            }
        }
        PatternKind::Path | PatternKind::Text => escape(unit),
    }
}

/// A glob that matches `text` literally.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '{' | '}' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A path as rules see it: relative to the working directory, with `.`
/// and `..` resolved lexically (`a/../src/x` is `src/x`); an absolute path
/// inside the working directory is made relative; one outside stays
/// absolute (the sandbox refuses it anyway).
pub fn normalise_path(path: &str, work_dir: Option<&str>) -> String {
    let trimmed = path.trim();
    let relative = match work_dir {
        Some(dir) if trimmed.starts_with('/') => {
            let dir = dir.trim_end_matches('/');
            match trimmed.strip_prefix(dir) {
                Some("") => ".",
                Some(rest) if rest.starts_with('/') => rest.trim_start_matches('/'),
                _ => trimmed,
            }
        }
        _ => trimmed,
    };
    let absolute = relative.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in relative.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|p| *p != "..") {
                    parts.pop();
                } else if !absolute {
                    parts.push("..");
                }
            }
            p => parts.push(p),
        }
    }
    match (absolute, parts.is_empty()) {
        (true, _) => format!("/{}", parts.join("/")),
        (false, true) => ".".to_string(),
        (false, false) => parts.join("/"),
    }
}

/// The simple commands of a shell line, each with its redirections and its
/// whitespace collapsed; `None` when the line does not parse.
///
/// Every place a command can hide counts: lists, pipelines, subshells,
/// `$(…)`, backticks, process substitution, function bodies, and bare
/// assignments or declarations (which change what later commands do).
pub fn simple_commands(line: &str) -> Option<Vec<String>> {
    let mut parser = tree_sitter::Parser::new();
    parser.set_language(&tree_sitter_bash::LANGUAGE.into()).ok()?;
    let tree = parser.parse(line, None)?;
    let root = tree.root_node();
    if root.has_error() {
        return None;
    }
    let mut commands = Vec::new();
    let mut cursor = root.walk();
    let mut stack = vec![root];
    while let Some(node) = stack.pop() {
        let standalone = match node.kind() {
            "command" | "declaration_command" | "unset_command" | "test_command" => true,
            // `A=1` alone; in `A=1 cmd` the assignment is part of the command.
            "variable_assignment" | "variable_assignments" => {
                node.parent().is_none_or(|p| !matches!(p.kind(), "command" | "declaration_command" | "variable_assignments"))
            }
            _ => false,
        };
        if standalone {
            // A command's redirections belong to it: `git log > ~/.bashrc`
            // is not just `git log`.
            let whole = match node.parent() {
                Some(p) if p.kind() == "redirected_statement" && p.child(0) == Some(node) => p,
                _ => node,
            };
            let text = whole.utf8_text(line.as_bytes()).ok()?;
            commands.push(collapse(text));
        }
        let children: Vec<_> = node.children(&mut cursor).collect();
        stack.extend(children.into_iter().rev());
    }
    Some(commands)
}

/// Whitespace runs (line continuations included) as one space.
fn collapse(text: &str) -> String {
    text.replace("\\\n", " ").split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(list: &[(&str, &str, Action)]) -> Vec<Compiled> {
        list.iter()
            .enumerate()
            .map(|(i, (tool, pattern, action))| {
                Compiled::new(Rule { tool: tool.to_string(), pattern: pattern.to_string(), action: *action }, Origin::Agent(i)).unwrap()
            })
            .collect()
    }

    fn decide(rules: &[Compiled], default: Action, grants: &[Compiled], tool: &str, kind: PatternKind, value: &str) -> Decision {
        let policy = Policy { rules: rules.iter().collect(), default, grants };
        policy.decide(tool, &Subject { kind, value: Some(value.to_string()) })
    }

    #[test]
    fn simple_commands_finds_every_command_of_a_line() {
        let cases: &[(&str, &[&str])] = &[
            ("git status", &["git status"]),
            ("git status; rm -rf ~", &["git status", "rm -rf ~"]),
            ("a && b || c | d\ne", &["a", "b", "c", "d", "e"]),
            ("echo $(rm -rf /)", &["echo $(rm -rf /)", "rm -rf /"]),
            ("echo `id`", &["echo `id`", "id"]),
            ("(cd src && make)", &["cd src", "make"]),
            ("git log > out.txt", &["git log > out.txt"]),
            ("A=1; git status", &["A=1", "git status"]),
            ("FOO=1 git   status", &["FOO=1 git status"]),
            ("export P=$(whoami)", &["export P=$(whoami)", "whoami"]),
            ("f() { rm -rf x; }; f", &["rm -rf x", "f"]),
            ("cat <(curl x)", &["cat <(curl x)", "curl x"]),
            ("", &[]),
        ];
        for (line, want) in cases {
            let want: Vec<String> = want.iter().map(|w| w.to_string()).collect();
            assert_eq!(simple_commands(line), Some(want), "{line}");
        }
        assert_eq!(simple_commands("echo 'unterminated"), None);
        assert_eq!(simple_commands("if then fi ((("), None);
    }

    #[test]
    fn every_command_must_be_allowed() {
        let r = rules(&[("bash", "*", Action::Ask), ("bash", "git *", Action::Allow), ("bash", "cargo test *", Action::Allow)]);
        let d = |line| decide(&r, Action::Allow, &[], "bash", PatternKind::Command, line);
        assert_eq!(d("git status"), Decision::Allow);
        assert_eq!(d("git"), Decision::Allow, "`git *` also matches `git` alone");
        assert_eq!(d("cargo test --workspace && git diff"), Decision::Allow);
        assert_eq!(d("git status; rm -rf ~"), Decision::Ask { patterns: vec!["rm *".into()] });
        assert_eq!(d("git log $(curl evil)"), Decision::Ask { patterns: vec!["curl evil *".into()] });
        assert_eq!(d("cargo build"), Decision::Ask { patterns: vec!["cargo build *".into()] });
        assert_eq!(d("echo 'open"), Decision::Ask { patterns: vec!["echo 'open".into()] }, "unparseable lines are asked");
    }

    #[test]
    fn a_deny_cannot_be_dodged_and_last_rule_wins() {
        let r = rules(&[("*", "*", Action::Allow), ("bash", "rm *", Action::Deny)]);
        let d = |line| decide(&r, Action::Allow, &[], "bash", PatternKind::Command, line);
        assert!(matches!(d("true; rm -rf build"), Decision::Deny(m) if m.contains("rm -rf build") && m.contains("permissions[1]")));
        assert_eq!(d("ls"), Decision::Allow);
        let later_allow = rules(&[("bash", "rm *", Action::Deny), ("bash", "rm -rf build", Action::Allow)]);
        assert_eq!(decide(&later_allow, Action::Allow, &[], "bash", PatternKind::Command, "rm -rf build"), Decision::Allow);
        // Nothing can ask: an unparseable line is refused.
        let strict = rules(&[("bash", "git *", Action::Allow)]);
        assert!(matches!(decide(&strict, Action::Deny, &[], "bash", PatternKind::Command, "echo 'x"), Decision::Deny(_)));
    }

    #[test]
    fn paths_match_with_separators() {
        let r = rules(&[("write", "*", Action::Deny), ("write", "src/**", Action::Allow), ("read", "src/*", Action::Ask)]);
        let w = |p| decide(&r, Action::Allow, &[], "write", PatternKind::Path, &normalise_path(p, Some("/w")));
        assert_eq!(w("src/a/b.rs"), Decision::Allow);
        assert_eq!(w("/w/src/main.rs"), Decision::Allow);
        assert!(matches!(w("src/../Cargo.toml"), Decision::Deny(_)));
        assert!(matches!(w("/etc/passwd"), Decision::Deny(_)));
        let read = |p| decide(&r, Action::Allow, &[], "read", PatternKind::Path, p);
        assert_eq!(read("src/a"), Decision::Ask { patterns: vec!["src/a".into()] });
        assert_eq!(read("src/a/b"), Decision::Allow, "`*` in a path stops at `/`");
    }

    #[test]
    fn grants_allow_asks_but_never_denies() {
        let r = rules(&[("bash", "*", Action::Ask), ("bash", "rm *", Action::Deny)]);
        let grants: Vec<Compiled> = [Grant { tool: "bash".into(), pattern: "git status *".into() }, Grant { tool: "bash".into(), pattern: "rm *".into() }]
            .iter()
            .filter_map(Grant::compile)
            .collect();
        let d = |line| decide(&r, Action::Allow, &grants, "bash", PatternKind::Command, line);
        assert_eq!(d("git status --short"), Decision::Allow);
        assert!(matches!(d("rm x"), Decision::Deny(_)));
        assert_eq!(d("git push"), Decision::Ask { patterns: vec!["git push *".into()] });
    }

    #[test]
    fn normalising_paths() {
        assert_eq!(normalise_path("./a//b/../c", None), "a/c");
        assert_eq!(normalise_path("/w", Some("/w/")), ".");
        assert_eq!(normalise_path("/w/x", Some("/w")), "x");
        assert_eq!(normalise_path("/wx/y", Some("/w")), "/wx/y");
        assert_eq!(normalise_path("../up", None), "../up");
        assert_eq!(normalise_path("", None), ".");
    }

    #[test]
    fn invalid_rules_are_named() {
        let err = compile(&[Rule { tool: "bash".into(), pattern: "a[".into(), action: Action::Ask }], Origin::Agent).unwrap_err();
        assert!(err.to_string().contains("permissions[0]"), "{err}");
        assert!(compile(&[Rule { tool: " ".into(), pattern: "*".into(), action: Action::Ask }], Origin::Agent).is_err());
        assert_eq!(escape("a*b[c]"), "a\\*b\\[c\\]");
    }
}
