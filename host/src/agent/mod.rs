//! The agent loop: ask the model, run the tools it calls, feed the results
//! back, until it ends its turn or the step limit is reached. Events go out
//! through a channel as they happen; history is stored after every step.

mod approvals;
pub mod bus;
pub mod compaction;
mod history;
mod runs;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use utoipa::ToSchema;

pub use approvals::Approvals;
pub use bus::{Bus, Event, Feed, SubscribeError, Subscription};
pub use compaction::{Compacted, Compactor, Target, Trigger};
pub use runs::{Busy, Cancelled, Claim, Runs};

use crate::runtime::{
    CompletionRequest, Event as ProviderEvent, FsAccess, ProviderAccess, ProviderError, Runtime, RuntimeError,
    StopReason as ModelStop, ToolInvocation, ToolSpec, WorkDir, WorkDirError,
};
pub use crate::store::{StopReason, ToolCallRecord, Usage};
use crate::config::PermissionSettings;
use crate::permissions::{self, Compiled, Decision, Subject};
use crate::runtime::manifest::PatternKind;
use crate::store::{
    Agent, Answer, Block, HistoryMessage, HistoryRole, PermissionRequest, PermissionStatus, Reply, Session, SessionContext, Store,
    StoreError, now,
};

/// Retries of a retryable provider failure.
const MAX_RETRIES: u32 = 3;
const BACKOFF_BASE: Duration = Duration::from_millis(500);
const MAX_RETRY_WAIT: Duration = Duration::from_secs(60);

/// The `error` event (name, data) that ends a run interrupted for `reason`
/// (a restart, or its host's lease running out), as the store writes it.
pub fn interrupted_event(reason: &'static str) -> impl Fn(&str) -> (String, String) + Send + 'static {
    move |run| {
        let (name, data) = RunEvent::Error { run_id: run.to_string(), error: reason.into(), code: "interrupted".into() }.wire();
        (name.to_string(), data)
    }
}

/// What happens during a run, in order: the SSE events of the session,
/// each stored and sent with its `seq` as the SSE `id`.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RunEvent {
    /// A piece of the model's answer, as it arrives.
    Text { content: String },
    /// The model calls a tool.
    ToolUse {
        id: String,
        name: String,
        #[schema(value_type = Object)]
        input: serde_json::Value,
    },
    /// A tool call's result, as the model gets it.
    ToolResult { tool_use_id: String, content: String, is_error: bool },
    /// A tool call waits for a person's answer
    /// (`POST /sessions/{id}/permissions/{request_id}`); the run is `waiting`.
    PermissionRequest {
        request_id: String,
        run_id: String,
        tool_use_id: String,
        tool: String,
        #[schema(value_type = Object)]
        input: serde_json::Value,
        /// What an `always` answer allows from then on in this session.
        patterns: Vec<String>,
    },
    /// A permission request was answered, timed out, or ended with its run.
    PermissionReplied {
        request_id: String,
        run_id: String,
        tool_use_id: String,
        status: PermissionStatus,
        reply: Option<Reply>,
        message: Option<String>,
    },
    /// The conversation was compacted to fit the model's context window:
    /// from here on the model sees `GET /sessions/{id}/context`, while the
    /// session's history stays whole. Token counts are estimates of the
    /// next request.
    Compaction {
        trigger: Trigger,
        tokens_before: u64,
        tokens_after: u64,
        /// History messages the summary stands for.
        summarized_messages: u64,
        /// Tool results the model sees shortened.
        shortened_tool_results: u64,
    },
    /// The run ended; the last event of a run that did not fail.
    Done { run_id: String, usage: Usage, steps: u32, stop_reason: StopReason },
    /// The run failed (or was interrupted by a restart: code `interrupted`);
    /// the last event of its run.
    Error { run_id: String, error: String, code: String },
    /// Sent instead of a replay when the cursor is older than the events
    /// kept; the stream then closes.
    ResyncRequired { error: String },
}

impl RunEvent {
    /// The SSE event name and data (the JSON text stored and replayed).
    pub fn wire(&self) -> (&'static str, String) {
        let name = match self {
            RunEvent::Text { .. } => "text",
            RunEvent::ToolUse { .. } => "tool_use",
            RunEvent::ToolResult { .. } => "tool_result",
            RunEvent::PermissionRequest { .. } => "permission_request",
            RunEvent::PermissionReplied { .. } => "permission_replied",
            RunEvent::Compaction { .. } => "compaction",
            RunEvent::Done { .. } => "done",
            RunEvent::Error { .. } => "error",
            RunEvent::ResyncRequired { .. } => "resync_required",
        };
        (name, serde_json::to_string(self).unwrap_or_default())
    }
}

/// Where a run's events go, and how it learns it was cancelled.
#[derive(Clone)]
pub struct Emitter {
    pub bus: Bus,
    pub feed: Arc<Feed>,
    pub run_id: String,
    pub cancel: watch::Receiver<bool>,
}

impl Emitter {
    pub fn send(&self, event: &RunEvent) -> Event {
        let (name, data) = event.wire();
        self.bus.publish(&self.feed, &self.run_id, name, data)
    }

    fn is_cancelled(&self) -> bool {
        *self.cancel.borrow()
    }

    /// Resolves once the run is cancelled.
    async fn cancelled(&self) {
        let mut cancel = self.cancel.clone();
        let _ = cancel.wait_for(|c| *c).await;
        if !*cancel.borrow() {
            // The canceller is gone without cancelling: never resolve.
            std::future::pending::<()>().await;
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RunOutcome {
    /// The text of the last assistant message.
    pub response: String,
    pub tool_calls: Vec<ToolCallRecord>,
    pub usage: Usage,
    /// Model calls made.
    pub steps: u32,
    pub stop_reason: StopReason,
}

/// Why a run failed after it started.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("provider `{provider}` failed{}: {message}", status.map(|s| format!(" with status {s}")).unwrap_or_default())]
    Provider { provider: String, status: Option<u16>, message: String },
    /// The request was still over the context window after a compaction.
    #[error("provider `{provider}` refused the request as longer than the model's context window, and compacting did not make it fit: {message}")]
    ContextLength { provider: String, message: String },
    #[error("{0}")]
    Plugin(#[from] RuntimeError),
    #[error("{0}")]
    Store(#[from] StoreError),
    /// One answer held more text and tool input than `[limits] step_output_kb`.
    #[error("provider `{provider}` answered with more than the limit of {} KiB of text and tool input in one step (step_output_kb); the step was stopped", .limit / 1024)]
    AnswerTooLarge { provider: String, limit: usize },
    /// The tenant's tokens for today ran out during this run.
    #[error("quota `tokens_per_day` exceeded: {used} of {limit} tokens used today; the run stopped after its step")]
    TokensExceeded { limit: u64, used: u64 },
}

impl RunError {
    /// The machine code of the `error` event (and of the HTTP error of the
    /// blocking endpoint, which `api::error` maps to a status).
    pub fn code(&self) -> &'static str {
        match self {
            RunError::Provider { .. } => "provider_error",
            RunError::ContextLength { .. } => "context_length_exceeded",
            RunError::AnswerTooLarge { .. } => "answer_too_large",
            RunError::Plugin(RuntimeError::NotFound(_) | RuntimeError::WrongKind { .. }) => "unknown_plugin",
            RunError::Plugin(
                RuntimeError::Manifest { .. }
                | RuntimeError::CapabilityDenied { .. }
                | RuntimeError::Clash { .. }
                | RuntimeError::Load { .. }
                | RuntimeError::CompileLimit { .. },
            ) => "plugin_refused",
            RunError::Plugin(_) => "plugin_failed",
            RunError::Store(_) => "internal",
            RunError::TokensExceeded { .. } => "quota_exceeded",
        }
    }
}

/// Everything a run needs, checked before it starts.
pub struct Run {
    pub runtime: Runtime,
    pub store: Store,
    pub agent: Agent,
    pub session: Session,
    /// The session's working directory, opened for this run (and checked
    /// again); why tools cannot run there, if they cannot.
    pub work_dir: Option<Result<std::sync::Arc<WorkDir>, std::sync::Arc<WorkDirError>>>,
    pub access: ProviderAccess,
    pub max_steps: u32,
    pub message: String,
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// The server's permission settings (its rules come before the agent's).
    pub permissions: Arc<PermissionSettings>,
    /// The agent's rules, compiled.
    pub rules: Vec<Compiled>,
    pub approvals: Approvals,
    /// Whose run it is, and the quotas it meets on the way.
    pub quota: RunQuota,
    /// The session's compacted view (`None` while it was never compacted).
    pub context: Option<SessionContext>,
    pub budget: Budget,
    /// The tenant's MCP servers, whose tools are `SERVER__TOOL`.
    pub mcp: crate::mcp::McpHub,
    /// The write of the user's message, while the model is asked (`None`
    /// at construction). Every later write and the run's end wait for it.
    /// A channel, not the task's handle: a handle would keep the finished
    /// task's memory for as long as the stream runs.
    pub saving: Option<tokio::sync::oneshot::Receiver<Result<(), StoreError>>>,
}

/// Finds the model's context window (it may ask the provider, over the network).
pub type WindowLookup = Box<dyn FnOnce() -> futures::future::BoxFuture<'static, Option<u64>> + Send + Sync>;

/// What a run knows of the model's context window and of its requests' size.
pub struct Budget {
    window: Option<u64>,
    /// Asked once, when a request grows past `compaction::LOOKUP_FLOOR`
    /// (by the provider's count of the previous one, when there is one).
    lookup: Option<WindowLookup>,
    /// The provider's count of the last request's input tokens, with the
    /// length of the view then and the view's generation.
    reported: Option<(u64, usize, u32)>,
    /// Counts changes to the view other than appends.
    generation: u32,
}

impl Budget {
    /// `window` when it is known already (the agent's override), else `lookup`.
    pub fn new(window: Option<u64>, lookup: Option<WindowLookup>) -> Budget {
        Budget { window, lookup: if window.is_some() { None } else { lookup }, reported: None, generation: 0 }
    }
}

/// The tenant of a run and the quotas a run checks as it goes (the others
/// are checked before it is stored).
pub struct RunQuota {
    pub tenant: String,
    /// Multi-tenant mode: where storage is measured.
    pub tenancy: Option<crate::tenancy::Tenancy>,
    pub tokens_per_day: Option<u64>,
    pub storage_mb: Option<u64>,
}

/// Whether a call may run, once its permission is settled.
enum Gate {
    Run,
    /// Not run; the model gets this text as an error result.
    Refuse(String),
    /// Waiting for an answer.
    Ask(Answered),
}

/// The settled answer to a permission request: `Ok` to run the call, `Err`
/// with what the model is told. Shared so that a run that stops early can
/// still wait for every request to be settled before it ends.
type Answered = futures::future::Shared<futures::future::BoxFuture<'static, Result<(), String>>>;

/// A tool use being assembled from stream events.
struct PendingToolUse {
    id: String,
    name: String,
    json: String,
}

/// The outcome of pulling one model answer.
enum StepEnd {
    Complete,
    Cancelled,
}

impl Run {
    /// Runs to the end, publishing its events (not the closing `done` or
    /// `error`: the caller stores the run's end first, then announces it).
    /// A cancel or a server shutdown stops the run at the next await point;
    /// history is left valid either way.
    pub async fn execute(mut self, events: &Emitter) -> Result<RunOutcome, RunError> {
        let mut result = self.drive(events).await;
        // A run that failed before its next write still ends only once the
        // user's message is stored: its history is whole when `error` is sent.
        if let Err(err) = self.saved().await
            && result.is_ok()
        {
            result = Err(err.into());
        }
        if let Err(err) = &result {
            tracing::warn!(session = %self.session.id, run = %events.run_id, %err, "run failed");
        }
        result
    }

    /// The model call (`step`) is the state held while a stream waits, by
    /// every open stream at once; the other awaits are boxed so that their
    /// larger futures do not widen that state.
    async fn drive(&mut self, events: &Emitter) -> Result<RunOutcome, RunError> {
        history::push_user_text(&mut self.session.history, &self.message);
        // Stored while the model is asked rather than before: the write
        // stands off the time to the first token.
        self.session.updated_at = now().max(self.session.updated_at);
        let (store, session) = (self.store.clone(), self.session.clone());
        let (saved, saving) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let _ = saved.send(store.update_session(session).await.map(drop));
        });
        self.saving = Some(saving);

        let specs = Box::pin(self.tool_specs()).await?;
        let mut usage = Usage::default();
        let mut tool_calls = Vec::new();
        let mut steps = 0;
        let mut response = String::new();
        loop {
            if steps >= self.max_steps {
                return Ok(self.outcome(response, tool_calls, usage, steps, StopReason::MaxSteps));
            }
            steps += 1;
            let mut text = String::new();
            let mut uses: Vec<PendingToolUse> = Vec::new();
            let before = usage;
            // A context-length error gets one compaction and one retry.
            let mut retried = false;
            let end = loop {
                if !Box::pin(self.fit(&specs, events, &mut usage)).await? {
                    break StepEnd::Cancelled;
                }
                match self.step(&specs, events, &mut text, &mut uses, &mut usage).await {
                    Err(err @ RunError::ContextLength { .. }) if !retried => {
                        retried = true;
                        let before = self.estimate(&specs);
                        // The provider counted more than the estimate says,
                        // so aim well below the estimate, not just below the limit.
                        let target = match self.budget.window {
                            Some(window) => {
                                compaction::limit(window, self.agent.compaction.threshold, self.agent.provider.max_tokens).min(before * 3 / 4)
                            }
                            None => before * 3 / 4,
                        };
                        tracing::info!(session = %self.session.id, estimate = before, "the request was over the context window; compacting");
                        match Box::pin(self.compact(&specs, events, &mut usage, Trigger::ContextLengthError, before, Target::Below(target))).await? {
                            Compacted::Done { .. } => {}
                            Compacted::Cancelled => break StepEnd::Cancelled,
                            Compacted::Unchanged => return Err(err),
                        }
                    }
                    other => break other?,
                }
            };
            // Counted per step, so a run that crosses the day's quota ends
            // once this step is done (its calls answered, its history whole).
            let over = Box::pin(self.count_tokens(before, usage)).await?;
            let calls: Vec<(String, String, serde_json::Value, Option<String>)> = uses
                .into_iter()
                .map(|u| {
                    let raw = if u.json.trim().is_empty() { "{}".to_string() } else { u.json };
                    match serde_json::from_str::<serde_json::Value>(&raw) {
                        Ok(v) if v.is_object() => (u.id, u.name, v, None),
                        Ok(v) => (u.id, u.name, v, Some("the tool input must be a JSON object".to_string())),
                        Err(e) => (u.id, u.name, serde_json::Value::String(raw), Some(format!("the tool input is not valid JSON: {e}"))),
                    }
                })
                .collect();
            let mut blocks = Vec::new();
            if !text.is_empty() {
                blocks.push(Block::Text { text: text.clone() });
            }
            for (id, name, input, _) in &calls {
                blocks.push(Block::ToolUse { id: id.clone(), name: name.clone(), input: input.clone() });
            }
            if matches!(end, StepEnd::Cancelled) {
                // A partial answer is kept when it has no tool calls; with
                // calls, each gets an error result so the history stays valid.
                if !blocks.is_empty() {
                    let results = calls
                        .iter()
                        .map(|(id, ..)| Block::ToolResult {
                            tool_use_id: id.clone(),
                            content: "not run: the request was cancelled".into(),
                            is_error: true,
                        })
                        .collect::<Vec<_>>();
                    self.session.history.push(HistoryMessage { role: HistoryRole::Assistant, content: blocks });
                    if !results.is_empty() {
                        self.session.history.push(HistoryMessage { role: HistoryRole::User, content: results });
                    }
                    Box::pin(self.persist()).await?;
                }
                return Ok(self.outcome(text, tool_calls, usage, steps, StopReason::Cancelled));
            }
            response = text;
            if calls.is_empty() {
                if !blocks.is_empty() {
                    self.session.history.push(HistoryMessage { role: HistoryRole::Assistant, content: blocks });
                }
                Box::pin(self.persist()).await?;
                if let Some(err) = over {
                    return Err(err);
                }
                return Ok(self.outcome(response, tool_calls, usage, steps, StopReason::EndTurn));
            }
            for (id, name, input, _) in &calls {
                events.send(&RunEvent::ToolUse { id: id.clone(), name: name.clone(), input: input.clone() });
            }
            self.session.history.push(HistoryMessage { role: HistoryRole::Assistant, content: blocks });
            // Stored before any tool runs: a call may wait long for a
            // person, and a crash meanwhile must leave the calls on record
            // (the restart answers each as interrupted).
            Box::pin(self.persist()).await?;
            let (results, cancelled) = Box::pin(self.run_tools(&calls, events)).await;
            let mut result_blocks = Vec::new();
            for ((id, name, input, _), result) in calls.iter().zip(results) {
                let (content, is_error) = match result {
                    Some((content, is_error)) => {
                        tool_calls.push(ToolCallRecord {
                            id: id.clone(),
                            name: name.clone(),
                            input: input.clone(),
                            output: content.clone(),
                            is_error,
                        });
                        (content, is_error)
                    }
                    // Every call gets an answer, so the next turn is valid.
                    None => ("not run: the request was cancelled".to_string(), true),
                };
                result_blocks.push(Block::ToolResult { tool_use_id: id.clone(), content, is_error });
            }
            self.session.history.push(HistoryMessage { role: HistoryRole::User, content: result_blocks });
            Box::pin(self.persist()).await?;
            if cancelled {
                return Ok(self.outcome(response, tool_calls, usage, steps, StopReason::Cancelled));
            }
            if let Some(err) = over {
                return Err(err);
            }
        }
    }

    /// Adds one step's tokens to the tenant's day; the error the run ends
    /// with once the step is done, when that crossed `tokens_per_day`.
    async fn count_tokens(&self, before: Usage, after: Usage) -> Result<Option<RunError>, RunError> {
        let input = after.input_tokens.saturating_sub(before.input_tokens) as u64;
        let output = after.output_tokens.saturating_sub(before.output_tokens) as u64;
        if input == 0 && output == 0 {
            return Ok(None);
        }
        let used = self.store.add_tokens(&self.quota.tenant, input, output).await?;
        Ok(self.quota.tokens_per_day.filter(|limit| used >= *limit).map(|limit| RunError::TokensExceeded { limit, used }))
    }

    fn outcome(&self, response: String, tool_calls: Vec<ToolCallRecord>, usage: Usage, steps: u32, stop_reason: StopReason) -> RunOutcome {
        RunOutcome { response, tool_calls, usage, steps, stop_reason }
    }

    /// Compacts the view when the next request would pass the agent's
    /// threshold; false when the run was cancelled meanwhile.
    async fn fit(&mut self, specs: &[ToolSpec], events: &Emitter, usage: &mut Usage) -> Result<bool, RunError> {
        let settings = self.agent.compaction;
        if !settings.enabled {
            return Ok(true);
        }
        let estimate = self.estimate(specs);
        // Asked once requests get large by the provider's own count (the
        // estimate before there is one): the list may be a network call.
        let measured = self.budget.reported.map_or(estimate, |(tokens, ..)| tokens);
        if self.budget.window.is_none()
            && measured > compaction::LOOKUP_FLOOR
            && let Some(lookup) = self.budget.lookup.take()
        {
            self.budget.window = lookup().await;
            if self.budget.window.is_none() {
                tracing::info!(session = %self.session.id, provider = %self.agent.provider.id, model = %self.agent.provider.model,
                    "the model's context window is unknown (set `provider.context_window` on the agent); no automatic compaction");
            }
        }
        let Some(window) = self.budget.window else { return Ok(true) };
        let limit = compaction::limit(window, settings.threshold, self.agent.provider.max_tokens);
        if estimate <= limit {
            return Ok(true);
        }
        let compacted = self.compact(specs, events, usage, Trigger::Threshold, estimate, Target::Fit(limit)).await?;
        Ok(!matches!(compacted, Compacted::Cancelled))
    }

    /// Estimated tokens of the next request: the provider's count of the
    /// previous one plus an estimate of the messages added since, or all
    /// estimated when there is no such count (the first step, or a view
    /// that changed by more than appends).
    fn estimate(&self, specs: &[ToolSpec]) -> u64 {
        let view = compaction::view(&self.session.history, self.context.as_ref());
        match self.budget.reported {
            Some((tokens, len, generation)) if generation == self.budget.generation && len <= view.len() => {
                tokens + compaction::estimate_messages(&view[len..])
            }
            _ => compaction::estimate_fixed(&self.agent.instructions, specs) + compaction::estimate_messages(&view),
        }
    }

    /// Compacts the view towards `target`, stores it and announces it.
    async fn compact(
        &mut self,
        specs: &[ToolSpec],
        events: &Emitter,
        usage: &mut Usage,
        trigger: Trigger,
        before: u64,
        target: Target,
    ) -> Result<Compacted, RunError> {
        let fixed = compaction::estimate_fixed(&self.agent.instructions, specs);
        let mut context = self.context.clone().unwrap_or_default();
        let compactor = Compactor {
            runtime: &self.runtime,
            access: &self.access,
            agent: &self.agent,
            window: self.budget.window,
            cancel: events.cancel.clone(),
            shutdown: self.shutdown.clone(),
        };
        let compacted = compactor.compact(&self.session.history, &mut context, fixed, before, target, usage).await?;
        if let Compacted::Done { before, after } = compacted {
            self.store.put_session_context(&self.session.id, context.clone()).await?;
            tracing::info!(session = %self.session.id, run = %events.run_id, ?trigger, before, after,
                summarized = context.summarized, shortened = context.shortened.len(), "conversation compacted");
            events.send(&RunEvent::Compaction {
                trigger,
                tokens_before: before,
                tokens_after: after,
                summarized_messages: context.summarized as u64,
                shortened_tool_results: context.shortened.len() as u64,
            });
            self.context = Some(context);
            self.budget.generation += 1;
        }
        Ok(compacted)
    }

    /// Waits for the user's message to be stored, if it is still being written.
    async fn saved(&mut self) -> Result<(), StoreError> {
        match self.saving.take() {
            Some(write) => write.await.map_err(|_| StoreError::Task("the write of the user's message was lost".into()))?,
            None => Ok(()),
        }
    }

    async fn persist(&mut self) -> Result<(), StoreError> {
        self.saved().await?;
        self.session.updated_at = now().max(self.session.updated_at);
        self.session = self.store.update_session(self.session.clone()).await?;
        Ok(())
    }

    async fn tool_specs(&self) -> Result<Vec<ToolSpec>, RunError> {
        let mut specs = Vec::new();
        for name in &self.agent.tools {
            if self.plugin(name).is_none()
                && let Some(resolved) = self.mcp.resolve(&self.quota.tenant, name).await
            {
                specs.push(ToolSpec {
                    name: name.clone(),
                    description: resolved.tool.description,
                    input_schema: resolved.tool.input_schema.to_string(),
                });
                continue;
            }
            specs.push(self.runtime.tool_spec(&self.plugin_key(name)).await?);
        }
        Ok(specs)
    }

    fn cancelled(&self, events: &Emitter) -> bool {
        events.is_cancelled() || *self.shutdown.borrow()
    }

    /// One model call, retried while nothing of it has reached the client.
    async fn step(
        &mut self,
        specs: &[ToolSpec],
        events: &Emitter,
        text: &mut String,
        uses: &mut Vec<PendingToolUse>,
        usage: &mut Usage,
    ) -> Result<StepEnd, RunError> {
        let provider = self.agent.provider.id.clone();
        let view = compaction::view(&self.session.history, self.context.as_ref());
        let request = CompletionRequest {
            model: self.agent.provider.model.clone(),
            system: Some(self.agent.instructions.clone()).filter(|s| !s.is_empty()),
            messages: history::to_wit(&view),
            tools: specs.to_vec(),
            max_tokens: self.agent.provider.max_tokens,
            temperature: self.agent.provider.temperature.map(|t| t as f32),
        };
        let mut attempt = 0;
        loop {
            let mut sent_anything = false;
            let started = std::time::Instant::now();
            let before = *usage;
            let pulled = self.pull(&provider, &request, events, text, uses, usage, &mut sent_anything, started).await?;
            crate::telemetry::step(&provider, started.elapsed());
            crate::telemetry::tokens(
                &provider,
                usage.input_tokens.saturating_sub(before.input_tokens),
                usage.output_tokens.saturating_sub(before.output_tokens),
            );
            let failure = match pulled {
                Ok(end) => {
                    let input = usage.input_tokens.saturating_sub(before.input_tokens);
                    if input > 0 {
                        self.budget.reported = Some((input, view.len(), self.budget.generation));
                    }
                    return Ok(end);
                }
                Err(failure) => failure,
            };
            if matches!(failure.kind, crate::runtime::ErrorKind::ContextLengthExceeded) && !sent_anything {
                return Err(RunError::ContextLength { provider, message: failure.message });
            }
            if !failure.retryable || sent_anything || attempt >= MAX_RETRIES {
                return Err(RunError::Provider { provider, status: failure.status, message: failure.message });
            }
            let backoff = BACKOFF_BASE * 2u32.pow(attempt);
            let asked = failure.retry_after_ms.map(Duration::from_millis).unwrap_or_default();
            let wait = backoff.max(asked).min(MAX_RETRY_WAIT);
            tracing::warn!(%provider, status = ?failure.status, attempt = attempt + 1, wait_ms = wait.as_millis() as u64,
                "retrying a failed model call: {}", failure.message);
            attempt += 1;
            text.clear();
            uses.clear();
            let mut shutdown = self.shutdown.clone();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = events.cancelled() => return Ok(StepEnd::Cancelled),
                _ = shutdown.wait_for(|s| *s) => return Ok(StepEnd::Cancelled),
            }
        }
    }

    /// Pulls one answer; `Ok(Err(..))` is a provider failure that may be retried.
    #[allow(clippy::too_many_arguments)]
    async fn pull(
        &mut self,
        provider: &str,
        request: &CompletionRequest,
        events: &Emitter,
        text: &mut String,
        uses: &mut Vec<PendingToolUse>,
        usage: &mut Usage,
        sent_anything: &mut bool,
        started: std::time::Instant,
    ) -> Result<Result<StepEnd, ProviderError>, RunError> {
        let mut shutdown = self.shutdown.clone();
        // Boxed: starting a call instantiates the provider and sends the
        // request, a far larger future than the wait for the next event,
        // and held inline it would size the whole run's task (every open
        // stream's) by it.
        let start = Box::pin(self.runtime.provider_complete(provider, &self.access, request.clone()));
        let mut completion = tokio::select! {
            r = start => match r? {
                Ok(c) => c,
                Err(e) => return Ok(Err(e)),
            },
            _ = events.cancelled() => return Ok(Ok(StepEnd::Cancelled)),
            _ = shutdown.wait_for(|s| *s) => return Ok(Ok(StepEnd::Cancelled)),
        };
        let mut index: HashMap<String, usize> = HashMap::new();
        // What this answer holds so far (a retry starts from nothing).
        let limit = completion.limits().step_output_bytes;
        let mut held = text.len() + uses.iter().map(|u| u.name.len() + u.json.len()).sum::<usize>();
        let mut hold = |more: usize| -> Result<(), RunError> {
            held = held.saturating_add(more);
            if held > limit {
                return Err(RunError::AnswerTooLarge { provider: provider.to_string(), limit });
            }
            Ok(())
        };
        loop {
            let next = tokio::select! {
                r = completion.next() => r?,
                _ = events.cancelled() => return Ok(Ok(StepEnd::Cancelled)),
                _ = shutdown.wait_for(|s| *s) => return Ok(Ok(StepEnd::Cancelled)),
            };
            let event = match next {
                Ok(Some(event)) => event,
                Ok(None) => return Ok(Ok(StepEnd::Complete)),
                Err(e) => return Ok(Err(e)),
            };
            match event {
                ProviderEvent::Text(delta) => {
                    if delta.is_empty() {
                        continue;
                    }
                    hold(delta.len())?;
                    text.push_str(&delta);
                    if !*sent_anything {
                        crate::telemetry::first_token(provider, started.elapsed());
                    }
                    *sent_anything = true;
                    events.send(&RunEvent::Text { content: delta });
                }
                ProviderEvent::ToolUseStart(start) => {
                    if !*sent_anything {
                        crate::telemetry::first_token(provider, started.elapsed());
                    }
                    *sent_anything = true;
                    hold(start.id.len() + start.name.len())?;
                    index.insert(start.id.clone(), uses.len());
                    uses.push(PendingToolUse { id: start.id, name: start.name, json: String::new() });
                }
                ProviderEvent::ToolUseDelta(delta) => match index.get(&delta.id) {
                    Some(&i) => {
                        hold(delta.partial_json.len())?;
                        uses[i].json.push_str(&delta.partial_json)
                    }
                    None => {
                        return Ok(Err(ProviderError {
                            kind: crate::runtime::ErrorKind::BadResponse,
                            retryable: false,
                            status: None,
                            message: format!("input for unknown tool call `{}`", delta.id),
                            retry_after_ms: None,
                        }));
                    }
                },
                ProviderEvent::ToolUseEnd(_) => {}
                ProviderEvent::Usage(u) => {
                    usage.input_tokens += u.input_tokens;
                    usage.output_tokens += u.output_tokens;
                }
                ProviderEvent::Stop(reason) => {
                    if reason == ModelStop::Refusal {
                        tracing::info!(%provider, "the model refused to continue");
                    }
                }
            }
        }
    }

    /// Runs the calls: consecutive read-only tools together, the others one
    /// at a time, results in the model's order. Permissions are settled
    /// first, and every question of the step is asked at once; a call that
    /// waits for its answer holds back only the calls after it that are
    /// not in its read-only batch. `None` marks a call not run because the
    /// run was cancelled.
    async fn run_tools(
        &self,
        calls: &[(String, String, serde_json::Value, Option<String>)],
        events: &Emitter,
    ) -> (Vec<Option<(String, bool)>>, bool) {
        let (gates, waiters) = self.gates(calls, events).await;
        let mut gates: Vec<Option<Gate>> = gates.into_iter().map(Some).collect();
        // A run that stops while calls wait settles their requests first
        // (`rejected` on cancel, `interrupted` on shutdown), so its end is
        // the last thing a client hears of them.
        let stop = |results| async move {
            futures::future::join_all(waiters).await;
            (results, true)
        };
        let mut results: Vec<Option<(String, bool)>> = vec![None; calls.len()];
        let mut i = 0;
        while i < calls.len() {
            if self.cancelled(events) {
                return stop(results).await;
            }
            let batch_end = if self.read_only(&calls[i].1) {
                let mut j = i;
                while j < calls.len() && self.read_only(&calls[j].1) {
                    j += 1;
                }
                j
            } else {
                i + 1
            };
            // Results go out in the model's order, each as soon as it and
            // every call before it in the batch are done.
            let mut batch: futures::stream::FuturesOrdered<_> =
                (i..batch_end).map(|k| self.gated_tool(&calls[k], gates[k].take().unwrap_or(Gate::Run))).collect();
            let mut k = i;
            loop {
                let mut shutdown = self.shutdown.clone();
                let output = tokio::select! {
                    output = futures::StreamExt::next(&mut batch) => match output {
                        Some(output) => Some(output),
                        None => break,
                    },
                    _ = events.cancelled() => None,
                    _ = shutdown.wait_for(|s| *s) => None,
                };
                let Some(output) = output else { return stop(results).await };
                let (id, ..) = &calls[k];
                events.send(&RunEvent::ToolResult { tool_use_id: id.clone(), content: output.0.clone(), is_error: output.1 });
                results[k] = Some(output);
                k += 1;
            }
            i = batch_end;
        }
        drop(stop);
        (results, false)
    }

    async fn gated_tool(&self, call: &(String, String, serde_json::Value, Option<String>), gate: Gate) -> (String, bool) {
        match gate {
            Gate::Run => self.run_tool(call).await,
            Gate::Refuse(why) => (why, true),
            Gate::Ask(answer) => match answer.await {
                Ok(()) => self.run_tool(call).await,
                Err(why) => (why, true),
            },
        }
    }

    /// Whether no rule can say anything but `allow` (then nothing is checked).
    fn everything_allowed(&self) -> bool {
        everything_allowed(&self.permissions, &self.rules)
    }

    /// What the permission rules (and the session's grants) say about each
    /// call; the questions are stored, announced and waited for.
    async fn gates(
        &self,
        calls: &[(String, String, serde_json::Value, Option<String>)],
        events: &Emitter,
    ) -> (Vec<Gate>, Vec<Answered>) {
        if self.everything_allowed() {
            return (calls.iter().map(|_| Gate::Run).collect(), Vec::new());
        }
        let grants = session_grants(&self.store, &self.session.id).await;
        let policy = policy(&self.permissions, &self.rules, &grants);
        let mut gates = Vec::with_capacity(calls.len());
        let mut asks = Vec::new();
        for (k, (id, name, input, invalid)) in calls.iter().enumerate() {
            // A call that cannot run anyway is answered with its error.
            if invalid.is_some() || !self.agent.tools.iter().any(|t| t == name) {
                gates.push(Gate::Run);
                continue;
            }
            match policy.decide(name, &self.subject(name, input)) {
                Decision::Allow => gates.push(Gate::Run),
                Decision::Deny(why) => gates.push(Gate::Refuse(why)),
                Decision::Ask { patterns } => {
                    gates.push(Gate::Run);
                    asks.push((
                        k,
                        PermissionRequest {
                            id: crate::api::new_id(),
                            session_id: self.session.id.clone(),
                            run_id: events.run_id.clone(),
                            tool_use_id: id.clone(),
                            tool: name.clone(),
                            input: input.clone(),
                            patterns,
                            status: PermissionStatus::Pending,
                            reply: None,
                            message: None,
                            created_at: now(),
                            answered_at: None,
                        },
                    ));
                }
            }
        }
        if asks.is_empty() {
            return (gates, Vec::new());
        }
        let waiters: Vec<_> = asks.iter().map(|(_, r)| self.approvals.wait(&r.id)).collect();
        let requests: Vec<PermissionRequest> = asks.iter().map(|(_, r)| r.clone()).collect();
        if let Err(err) = self.store.insert_permission_requests(requests).await {
            for (k, request) in &asks {
                self.approvals.forget(&request.id);
                gates[*k] = Gate::Refuse(format!("`{}` was not run: its permission request could not be stored: {err}", request.tool));
            }
            return (gates, Vec::new());
        }
        let mut waiting = Vec::new();
        for ((k, request), answer) in asks.into_iter().zip(waiters) {
            events.send(&RunEvent::PermissionRequest {
                request_id: request.id.clone(),
                run_id: request.run_id.clone(),
                tool_use_id: request.tool_use_id.clone(),
                tool: request.tool.clone(),
                input: request.input.clone(),
                patterns: request.patterns.clone(),
            });
            let waiter = Waiter {
                store: self.store.clone(),
                approvals: self.approvals.clone(),
                events: events.clone(),
                shutdown: self.shutdown.clone(),
                timeout: self.permissions.timeout,
            };
            let task = tokio::spawn(waiter.wait(request, answer));
            let answered: Answered = futures::FutureExt::shared(futures::FutureExt::boxed(async move {
                task.await.unwrap_or_else(|err| Err(format!("the permission request failed: {err}")))
            }));
            waiting.push(answered.clone());
            gates[k] = Gate::Ask(answered);
        }
        (gates, waiting)
    }

    fn subject(&self, tool: &str, input: &serde_json::Value) -> Subject {
        let opened = match &self.work_dir {
            Some(Ok(dir)) => Some(&**dir),
            _ => None,
        };
        subject(self.plugin(tool).as_deref(), input, self.session.work_dir.as_deref(), opened)
    }

    fn read_only(&self, tool: &str) -> bool {
        self.agent.tools.iter().any(|t| t == tool)
            && self.plugin(tool).is_some_and(|p| {
                p.grants.filesystem != FsAccess::ReadWrite && !p.grants.process && p.grants.http.is_empty()
            })
    }

    async fn run_tool(&self, (id, name, input, invalid): &(String, String, serde_json::Value, Option<String>)) -> (String, bool) {
        if !self.agent.tools.iter().any(|t| t == name) {
            return (format!("unknown tool `{name}`; the tools available are: {}", self.agent.tools.join(", ")), true);
        }
        if let Some(reason) = invalid {
            return (format!("{reason}; call `{name}` again with a JSON object"), true);
        }
        let plugin = self.plugin(name);
        if plugin.is_none()
            && let Some(resolved) = self.mcp.resolve(&self.quota.tenant, name).await
        {
            let work_dir = match &self.work_dir {
                Some(Ok(dir)) => Some(dir),
                Some(Err(err)) => return (format!("`{name}` was not run: {err}"), true),
                None => None,
            };
            return self.mcp.call(&resolved, &self.session.id, work_dir, input).await;
        }
        invoke_tool(&self.runtime, &self.quota, plugin.as_ref(), name, id, input, self.work_dir.as_ref()).await
    }

    /// The plugin a tool name of this run's agent means: a server-wide one,
    /// else one of the tenant's own.
    fn plugin(&self, name: &str) -> Option<Arc<crate::runtime::Plugin>> {
        self.runtime.resolve(&self.quota.tenant, name)
    }

    /// Its registry key (the name itself when it resolves to nothing, so
    /// the runtime's error names it).
    fn plugin_key(&self, name: &str) -> String {
        self.plugin(name).map_or_else(|| name.to_string(), |p| p.key())
    }
}

/// Whether no rule can say anything but `allow` (then nothing is checked).
pub fn everything_allowed(settings: &PermissionSettings, agent_rules: &[Compiled]) -> bool {
    settings.default == permissions::Action::Allow
        && settings.rules.iter().chain(agent_rules).chain(&settings.enforce).all(|r| r.rule.action == permissions::Action::Allow)
}

/// The rules a call meets, in order: the server's, the agent's, then the
/// enforced ones; the session's grants answer what would be asked.
pub fn policy<'a>(settings: &'a PermissionSettings, agent_rules: &'a [Compiled], grants: &'a [Compiled]) -> permissions::Policy<'a> {
    permissions::Policy {
        rules: settings.rules.iter().chain(agent_rules).chain(&settings.enforce).collect(),
        default: settings.default,
        grants,
    }
}

/// The session's `always` answers, compiled; none when they cannot be read
/// (then the call is asked again, never allowed by mistake).
pub async fn session_grants(store: &Store, session: &str) -> Vec<Compiled> {
    match store.permission_grants(session).await {
        Ok(grants) => grants.iter().filter_map(permissions::Grant::compile).collect(),
        Err(err) => {
            tracing::warn!(session = %session, %err, "cannot read the session's permission grants");
            Vec::new()
        }
    }
}

/// What a call's permission is decided on: the field its manifest
/// names, read as a command line, a path or text. `session_dir` is the
/// session's `work_dir` as stored, `opened` the directory opened for the call.
pub fn subject(plugin: Option<&crate::runtime::Plugin>, input: &serde_json::Value, session_dir: Option<&str>, opened: Option<&WorkDir>) -> Subject {
    let Some(plugin) = plugin else { return Subject { kind: PatternKind::Text, value: None } };
    let section = &plugin.manifest.tool;
    let value = section
        .pattern_field
        .as_ref()
        .and_then(|field| match input.get(field) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Null) | None => None,
            Some(other) => Some(other.to_string()),
        })
        .or_else(|| section.pattern_default.clone());
    let value = match section.pattern_kind {
        PatternKind::Path => value.map(|p| {
            let lexical = permissions::normalise_path(&p, session_dir);
            // Where the path really leads inside the working directory
            // (a link in `src/` to `../secrets` is `secrets`); a path
            // that leads out keeps its text, and the sandbox refuses it.
            match opened {
                Some(dir) if !lexical.starts_with('/') => dir.resolve(&lexical).unwrap_or(lexical),
                _ => lexical,
            }
        }),
        _ => value,
    };
    Subject { kind: section.pattern_kind, value }
}

/// Runs one call of a permitted tool in the working directory, under the
/// tenant's storage quota. `plugin` is what the name resolved to for the
/// tenant (`None`: the runtime's error names the tool).
pub async fn invoke_tool(
    runtime: &Runtime,
    quota: &RunQuota,
    plugin: Option<&Arc<crate::runtime::Plugin>>,
    name: &str,
    id: &str,
    input: &serde_json::Value,
    work_dir: Option<&Result<Arc<WorkDir>, Arc<WorkDirError>>>,
) -> (String, bool) {
    let work_dir = match work_dir {
        None => None,
        Some(Ok(dir)) => Some(dir.clone()),
        Some(Err(err)) => return (format!("`{name}` was not run: {err}"), true),
    };
    // A tool that can write meets the tenant's storage quota: refused
    // when the quota is used up, re-measured after it ran.
    let can_write = plugin.is_some_and(|p| p.grants.filesystem == FsAccess::ReadWrite || p.grants.process);
    let storage = match (&quota.tenancy, quota.storage_mb) {
        (Some(tenancy), Some(mb)) if can_write => Some((tenancy, mb)),
        _ => None,
    };
    if let Some((tenancy, mb)) = storage {
        let used = tenancy.storage(&quota.tenant).await;
        if used >= mb << 20 {
            return (format!("`{name}` was not run: {}", storage_exceeded(used, mb)), true);
        }
    }
    let call = ToolInvocation { id: id.to_string(), input: input.to_string(), work_dir };
    let started = std::time::Instant::now();
    let key = plugin.map_or_else(|| name.to_string(), |p| p.key());
    let result = runtime.call_tool(&key, call).await;
    crate::telemetry::tool_call(name, started.elapsed());
    let (mut text, mut is_error) = match result {
        Ok(out) => (out.text, out.is_error),
        Err(err) => (format!("the tool failed: {err}"), true),
    };
    if let Some((tenancy, mb)) = storage {
        let used = tenancy.measure_storage(&quota.tenant).await;
        if used > mb << 20 {
            text = format!("{text}\n\n[error: {}; delete files to write again]", storage_exceeded(used, mb));
            is_error = true;
        }
    }
    (text, is_error)
}

fn storage_exceeded(used: u64, mb: u64) -> String {
    format!("storage quota exceeded: {:.1} MB used of the tenant's {mb} MB (quota `storage_mb`)", used as f64 / (1 << 20) as f64)
}

/// Waits for the answer to one permission request, on a task of its own so
/// that its time-out runs from when it was asked, whatever the run is busy
/// with; settles the request in the store and announces how it ended.
struct Waiter {
    store: Store,
    approvals: Approvals,
    events: Emitter,
    shutdown: watch::Receiver<bool>,
    timeout: Duration,
}

impl Waiter {
    /// `Ok` to run the call, `Err` with what the model is told.
    async fn wait(self, request: PermissionRequest, answer: tokio::sync::oneshot::Receiver<PermissionRequest>) -> Result<(), String> {
        let mut shutdown = self.shutdown.clone();
        let ended = tokio::select! {
            answered = answer => match answered {
                Ok(answered) => Ok(answered),
                Err(_) => self.store.permission_request(&request.session_id, &request.id).await,
            },
            _ = tokio::time::sleep(self.timeout) => {
                let message = format!("no answer within {} s", self.timeout.as_secs());
                self.settle(&request, PermissionStatus::TimedOut, message).await
            }
            _ = self.events.cancelled() => {
                let stopping = *self.shutdown.borrow();
                if stopping {
                    self.settle(&request, PermissionStatus::Interrupted, "the server stopped".into()).await
                } else {
                    self.settle(&request, PermissionStatus::Rejected, "the run was cancelled".into()).await
                }
            }
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                self.settle(&request, PermissionStatus::Interrupted, "the server stopped".into()).await
            }
        };
        self.approvals.forget(&request.id);
        let ended = match ended {
            Ok(ended) => ended,
            Err(err) => {
                tracing::warn!(request = %request.id, %err, "cannot settle a permission request");
                return Err(format!("`{}` was not run: its permission request failed: {err}", request.tool));
            }
        };
        self.events.send(&RunEvent::PermissionReplied {
            request_id: ended.id.clone(),
            run_id: ended.run_id.clone(),
            tool_use_id: ended.tool_use_id.clone(),
            status: ended.status,
            reply: ended.reply,
            message: ended.message.clone(),
        });
        let tool = &ended.tool;
        let because = |what: &str| match &ended.message {
            Some(m) if !m.trim().is_empty() => format!("`{tool}` was not run: {what}: {m}"),
            _ => format!("`{tool}` was not run: {what}"),
        };
        match ended.status {
            PermissionStatus::Approved => Ok(()),
            PermissionStatus::Rejected if ended.reply == Some(Reply::Reject) => Err(because("the user rejected this call")),
            PermissionStatus::Rejected => Err(because("permission was not given")),
            PermissionStatus::TimedOut => Err(because("the permission request timed out")),
            PermissionStatus::Interrupted => Err(because("the permission request was interrupted")),
            PermissionStatus::Pending => Err(because("the permission request is still pending")),
        }
    }

    /// Ends a request without a reply, unless a reply got there first (then
    /// that reply stands).
    async fn settle(&self, request: &PermissionRequest, status: PermissionStatus, message: String) -> Result<PermissionRequest, StoreError> {
        let answer = Answer { status, reply: None, message: Some(message) };
        match self.store.answer_permission(&request.session_id, &request.id, answer).await {
            Err(StoreError::Answered { .. }) => self.store.permission_request(&request.session_id, &request.id).await,
            other => other,
        }
    }
}
