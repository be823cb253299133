//! The web console in a real browser: headless Chromium driven over
//! WebDriver (chromedriver, fantoccini), against the real `hangar` binary
//! with a token and a fake Anthropic server scripting the model. A person's
//! path through it: sign in, store a provider key, create an agent, open a
//! session, chat (streamed text and a tool call), reload mid-stream and see
//! the rest, stop a run, answer a permission request, and an XSS probe in
//! both a model answer and a tool output that must run nothing.
//!
//! Screenshots of the main views go to `<target>/console-screenshots/`.
//! Every wait polls the page with a generous limit; nothing is timed.

mod common;

use std::path::PathBuf;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fake::{Chunk, FakeServer, Reply, anthropic};
use common::server::Server;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use tokio::sync::Notify;

const TOKEN: &str = "console-test-token";
/// How long any one thing may take to show up.
const PATIENCE: Duration = Duration::from_secs(45);

/// chromedriver on a free loopback port, killed with the test.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    /// Kills chromedriver's whole process group, so that a failed test
    /// leaves no Chromium behind either.
    fn drop(&mut self) {
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn start_driver() -> Driver {
    let port = free_port();
    let child = Command::new("chromedriver")
        // A group of its own, with the browsers it starts (see Drop).
        .process_group(0)
        .arg(format!("--port={port}"))
        .arg("--allowed-ips=127.0.0.1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let driver = Driver { child, url: format!("http://127.0.0.1:{port}") };
    let deadline = Instant::now() + PATIENCE;
    let client = reqwest::Client::new();
    loop {
        if let Ok(resp) = client.get(format!("{}/status", driver.url)).send().await
            && resp.status().is_success()
        {
            return driver;
        }
        assert!(Instant::now() < deadline, "chromedriver did not answer /status");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn browser(driver: &Driver) -> Client {
    let mut args = vec!["--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,800", "--no-first-run"];
    // Chromium's sandbox cannot start as root (CI containers).
    if unsafe { libc::geteuid() } == 0 {
        args.push("--no-sandbox");
    }
    let mut options = json!({"args": args});
    if let Ok(out) = Command::new("sh").args(["-c", "command -v chromium"]).output()
        && out.status.success()
    {
        options["binary"] = json!(String::from_utf8_lossy(&out.stdout).trim());
    }
    let mut caps = serde_json::Map::new();
    caps.insert("browserName".into(), json!("chrome"));
    caps.insert("goog:chromeOptions".into(), options);
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a Chromium session");
    viewport(&client, 1280, 800).await;
    client
}

/// Sizes the window so that the page itself gets `width` × `height`.
async fn viewport(client: &Client, width: u32, height: u32) {
    let frame = client.execute("return [outerWidth - innerWidth, outerHeight - innerHeight]", vec![]).await.unwrap();
    let (dw, dh) = (frame[0].as_u64().unwrap_or(0) as u32, frame[1].as_u64().unwrap_or(0) as u32);
    client.set_window_size(width + dw, height + dh).await.unwrap();
}

fn screenshot_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

struct Page {
    client: Client,
    base: String,
    shots: PathBuf,
}

impl Page {
    async fn js(&self, script: &str) -> Value {
        self.client.execute(script, vec![]).await.unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    async fn shot(&self, name: &str) {
        let png = self.client.screenshot().await.unwrap();
        std::fs::write(self.shots.join(format!("{name}.png")), png).unwrap();
    }

    /// Polls `condition` (a JS expression) until it is truthy.
    async fn until(&self, what: &str, condition: &str) {
        let script = format!("return !!({condition});");
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(Value::Bool(true)) = self.client.execute(&script, vec![]).await {
                return;
            }
            if Instant::now() > deadline {
                self.shot(&format!("failed-{}", what.replace(|c: char| !c.is_ascii_alphanumeric(), "-"))).await;
                let body = self.js("return document.body.innerText").await;
                panic!("timed out waiting for {what} ({condition}); the page says:\n{}", body.as_str().unwrap_or(""));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn find(&self, css: &str) -> fantoccini::elements::Element {
        let quoted = serde_json::to_string(css).unwrap();
        self.until(&format!("`{css}`"), &format!("document.querySelector({quoted}) && document.querySelector({quoted}).offsetParent !== null")).await;
        self.client.find(Locator::Css(css)).await.unwrap()
    }

    async fn click(&self, css: &str) {
        let quoted = serde_json::to_string(css).unwrap();
        self.until(&format!("`{css}` enabled"), &format!("document.querySelector({quoted}) && !document.querySelector({quoted}).disabled")).await;
        self.find(css).await.click().await.unwrap();
    }

    async fn fill(&self, css: &str, text: &str) {
        let field = self.find(css).await;
        field.clear().await.unwrap();
        field.send_keys(text).await.unwrap();
    }

    async fn go(&self, hash: &str) {
        self.client.goto(&format!("{}/{hash}", self.base)).await.unwrap();
        self.until("the page to start", "document.body.dataset.ready === '1'").await;
    }

    async fn text(&self, css: &str) -> String {
        let quoted = serde_json::to_string(css).unwrap();
        self.js(&format!("const e = document.querySelector({quoted}); return e ? e.innerText : ''")).await.as_str().unwrap_or("").to_string()
    }

    /// Watches for CSP violations for the rest of this page load: anything
    /// the policy had to stop is something that tried to run or load.
    async fn watch_csp(&self) {
        self.js(
            "window.__violations = window.__violations || [];
             document.addEventListener('securitypolicyviolation', e => window.__violations.push(e.violatedDirective + ' ' + e.blockedURI));
             return true",
        )
        .await;
    }

    async fn send_message(&self, text: &str) {
        self.fill("#composer-text", text).await;
        self.click("#send").await;
    }

    /// Runs in the transcript that have ended so far.
    async fn ended_runs(&self) -> u64 {
        self.js("return document.querySelectorAll('#transcript .run-end').length").await.as_u64().unwrap()
    }
}

/// An answer of text whose parts stream one by one, held at `gate` after
/// the first `before` parts until the test releases it.
fn gated_text(parts: &[&str], before: usize, gate: Arc<Notify>) -> Reply {
    let mut block = anthropic::text_block(0, parts);
    // [block start, delta 1, …]: hold after the `before`-th delta.
    block.insert(1 + before, Chunk::Wait(gate));
    let mut chunks = vec![anthropic::start(5)];
    chunks.extend(block);
    chunks.extend(anthropic::stop("end_turn", 3));
    Reply::sse(chunks)
}

fn bash(id: &str, command: &str) -> Reply {
    Reply::sse(anthropic::tool_answer(id, "bash", &[&json!({"command": command}).to_string()], 5, 2))
}

fn text(parts: &[&str]) -> Reply {
    Reply::sse(anthropic::text_answer(parts, 5, 2))
}

// No quotes inside: they go through a shell's single quotes as they are.
const IMG_PROBE: &str = "<img src=x onerror=document.title=window.__pwned=1>";
const SCRIPT_PROBE: &str = "<script>document.title=window.__pwned=2</script>";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_uses_the_console_in_a_real_browser() {
    if !common::have_command("chromedriver", "Debian: chromium-driver") || !common::have_command("chromium", "Debian: chromium") {
        return;
    }
    let streaming = Arc::new(Notify::new());
    let stopping = Arc::new(Notify::new());
    let model_xss = format!("A probe: {IMG_PROBE} and {SCRIPT_PROBE} and [a link](javascript:window.__pwned=3) and **bold** text.");
    let fake = FakeServer::start(vec![
        // The agent form lists the models once (cached by the server after).
        Reply::json(200, json!({"data": [{"type": "model", "id": "claude-test", "display_name": "Claude Test"}], "has_more": false})),
        // 1: a tool call, then text that streams and is held half-way.
        bash("toolu_1", "echo hello-from-tool"),
        gated_text(&["Streaming ", "the **first** half. ", "Then the second half."], 2, streaming.clone()),
        // 2: text held until the person stops the run.
        gated_text(&["Thinking about it", " for ever"], 1, stopping.clone()),
        // 3: the XSS probe, in a tool's output and in the model's answer.
        bash("toolu_x", &format!("printf '%s\\n' '{IMG_PROBE}' '{SCRIPT_PROBE}'")),
        text(&[&model_xss]),
        // 4: a call that must ask first.
        bash("toolu_p", "echo approved-run"),
        text(&["Approved and done."]),
        // 5: a call the person refuses, with a reason the model is told.
        bash("toolu_r", "rm -rf build"),
        text(&["Understood, leaving it."]),
    ])
    .await;
    let server = Server::start(&["--token", TOKEN]);
    let work = tempfile::tempdir().unwrap();

    // The page and its assets need no token and carry the strict policy;
    // the API still does.
    let http = reqwest::Client::new();
    let index = http.get(server.url("/")).send().await.unwrap();
    assert_eq!(index.status(), 200);
    let csp = index.headers()["content-security-policy"].to_str().unwrap().to_string();
    for directive in ["default-src 'self'", "script-src 'self'", "connect-src 'self'", "object-src 'none'", "frame-ancestors 'none'"] {
        assert!(csp.contains(directive), "{csp}");
    }
    assert!(index.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    assert_eq!(http.get(server.url("/console/app.js")).send().await.unwrap().status(), 200);
    assert_eq!(http.get(server.url("/console/nope.js")).send().await.unwrap().status(), 401, "unknown files are not public");
    assert_eq!(http.get(server.url("/agents")).send().await.unwrap().status(), 401);
    // The page's own origin may call the API (browsers send `Origin` on its
    // POSTs); any other origin is still refused.
    let from = |origin: &str| http.get(server.url("/agents")).bearer_auth(TOKEN).header("origin", origin.to_string()).send();
    assert_eq!(from(server.base.as_str()).await.unwrap().status(), 200);
    assert_eq!(from("http://evil.test").await.unwrap().status(), 403);

    let driver = start_driver().await;
    let page = Page { client: browser(&driver).await, base: server.base.clone(), shots: screenshot_dir() };
    let title = {
        page.go("").await;
        page.client.title().await.unwrap()
    };

    // Sign in: a wrong token shows the API's own error, the right one works.
    page.find("#signin-token").await;
    page.shot("01-sign-in").await;
    page.fill("#signin-token", "wrong").await;
    page.click("#signin-form button[type=submit]").await;
    page.until("the API's error", "document.querySelector('#banner:not([hidden])')?.innerText.includes('missing or wrong API token')").await;
    page.fill("#signin-token", TOKEN).await;
    page.click("#signin-form button[type=submit]").await;
    page.until("the signed-in console", "!document.querySelector('#nav').hidden && !document.querySelector('#view-chat').hidden").await;
    assert_eq!(page.js("return sessionStorage.getItem('hangar.token')").await, json!(TOKEN), "the token is kept for the tab");
    assert_eq!(page.js("return localStorage.length").await, json!(0), "and nowhere else");
    // A single-user server shows its (default tenant's) usage, with no quotas.
    page.until("the usage view shown", "!document.querySelector('#nav-usage').hidden").await;

    // Provider key (write-only field) pointing at the fake.
    page.go("#/providers").await;
    page.fill("#key-anthropic", "sk-ant-console").await;
    page.fill("#url-anthropic", &fake.url).await;
    page.click("form[data-provider=anthropic] button[type=submit]").await;
    page.until("the key stored", "document.querySelector('form[data-provider=anthropic] .badge')?.innerText === 'key set'").await;
    assert_eq!(page.js("return document.querySelector('#key-anthropic').value").await, json!(""), "the key leaves the page");
    page.shot("02-providers").await;

    // An agent: tools from /tools, model from the provider's list.
    page.go("#/agents").await;
    page.until("the model list", "document.querySelectorAll('#agent-models option').length > 0").await;
    assert!(fake.requests()[0].path.starts_with("/v1/models"), "the one models request came first");
    page.fill("#agent-name", "Console agent").await;
    page.fill("#agent-instructions", "Be brief.").await;
    page.find("#agent-provider").await.select_by_value("anthropic").await.unwrap();
    page.fill("#agent-model", "claude-test").await;
    page.fill("#agent-max-tokens", "64").await;
    page.click("#tool-bash").await;
    page.click("#agent-save").await;
    page.until("the agent listed", "[...document.querySelectorAll('#agent-rows td')].some(td => td.innerText === 'Console agent')").await;
    page.shot("03-agents").await;

    // A session: an API error is shown as the API words it, then a good one.
    page.go("#/chat").await;
    page.fill("#new-session-workdir", "relative/dir").await;
    page.click("#new-session-form button[type=submit]").await;
    page.until("the work_dir error", "document.querySelector('#banner:not([hidden])')?.innerText.includes('invalid_request')").await;
    page.fill("#new-session-workdir", work.path().to_str().unwrap()).await;
    page.click("#new-session-form button[type=submit]").await;
    page.until("the session opened", "document.querySelector('#chat-session-info').innerText.includes('·')").await;
    page.watch_csp().await;

    // 1: a tool call with its input and output, then streamed text.
    page.send_message("Say hello with a tool.").await;
    page.until("the tool's output", "document.querySelector('#transcript .tool[data-tool-use-id=toolu_1] .tool-output pre')?.innerText.includes('hello-from-tool')").await;
    assert!(page.text("#transcript .tool[data-tool-use-id=toolu_1] .tool-input pre").await.contains("echo hello-from-tool"));
    page.until("the first half streamed in", "document.querySelector('#transcript').innerText.includes('first half.')").await;
    assert!(!page.text("#transcript").await.contains("second half"), "the answer is held half-way");
    assert_eq!(page.js("return document.querySelector('#transcript .msg.assistant strong')?.innerText").await, json!("first"), "Markdown");
    assert_eq!(page.ended_runs().await, 0);
    page.shot("04-chat-streaming").await;

    // Reload mid-stream: the page shows what it had and resumes after it.
    let seen = page.js("return Number(document.querySelector('#transcript').dataset.lastEventId)").await.as_u64().unwrap();
    assert!(seen > 0);
    page.client.refresh().await.unwrap();
    page.until("the page back", "document.body.dataset.ready === '1'").await;
    page.until("the run shown again", "document.querySelector('#transcript').innerText.includes('first half.')").await;
    page.watch_csp().await;
    streaming.notify_one();
    page.until("the rest of the answer", "document.querySelector('#transcript').innerText.includes('Then the second half.')").await;
    page.until("the run's end", "document.querySelector('#transcript .run-end[data-state=completed]')").await;
    let transcript = page.text("#transcript").await;
    assert_eq!(transcript.matches("first half.").count(), 1, "resumed, not replayed: {transcript}");
    assert_eq!(page.js("return document.querySelectorAll('#transcript .tool').length").await, json!(1), "{transcript}");
    let resumed = page.js("return Number(document.querySelector('#transcript').dataset.lastEventId)").await.as_u64().unwrap();
    assert!(resumed > seen);
    page.shot("05-chat-tool-and-resumed-stream").await;

    // 2: stop a run that is still going.
    page.send_message("Think long.").await;
    page.until("the run to start", "document.querySelector('#transcript').innerText.includes('Thinking about it')").await;
    page.click("#stop").await;
    page.until("the run cancelled", "document.querySelector('#transcript .run-end[data-state=cancelled]')").await;
    assert!(!page.text("#transcript").await.contains("about it for ever"), "nothing after the stop");
    stopping.notify_one();

    // 3: the XSS probe runs nothing and leaves no element behind.
    let ended = page.ended_runs().await;
    page.send_message("Show me something nasty.").await;
    page.until("the probe's end", &format!("document.querySelectorAll('#transcript .run-end').length > {ended}")).await;
    page.until("the bold text", "[...document.querySelectorAll('#transcript .msg.assistant strong')].some(s => s.innerText === 'bold')").await;
    // Give an image load, its error handler or a script every chance to run.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let probe = page
        .js("return {
            pwned: typeof window.__pwned,
            title: document.title,
            images: document.querySelectorAll('#transcript img, #main img').length,
            scripts: [...document.scripts].map(s => s.src),
            jsLinks: document.querySelectorAll('a[href^=\"javascript\"]').length,
            violations: window.__violations || [],
            toolText: document.querySelector('#transcript .tool[data-tool-use-id=toolu_x] .tool-output pre')?.innerText || '',
            modelText: [...document.querySelectorAll('#transcript .msg.assistant')].map(m => m.innerText).join('\\n'),
        }")
        .await;
    assert_eq!(probe["pwned"], "undefined", "{probe}");
    assert_eq!(probe["title"], json!(title), "{probe}");
    assert_eq!(probe["images"], 0, "{probe}");
    assert_eq!(probe["scripts"], json!([format!("{}/console/app.js", server.base)]), "{probe}");
    assert_eq!(probe["jsLinks"], 0, "{probe}");
    assert_eq!(probe["violations"], json!([]), "nothing even tried to run: {probe}");
    assert!(probe["toolText"].as_str().unwrap().contains(IMG_PROBE), "the output is shown as text: {probe}");
    assert!(probe["modelText"].as_str().unwrap().contains(SCRIPT_PROBE), "the answer is shown as text: {probe}");
    page.shot("06-chat-xss-probe").await;

    // 4: bash must ask; the agent is edited to say so, and the request answered.
    page.go("#/agents").await;
    page.click("#agent-rows tr button").await;
    page.until("the agent in the form", "document.querySelector('#agent-name').value === 'Console agent'").await;
    page.fill("#agent-permissions", r#"[{"tool": "bash", "pattern": "*", "action": "ask"}]"#).await;
    page.click("#agent-save").await;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (_, agents) = server.send(server.client.get(server.url("/agents")).bearer_auth(TOKEN)).await;
        if agents[0]["permissions"][0]["action"] == "ask" {
            break;
        }
        assert!(Instant::now() < deadline, "the edit was not saved: {agents}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    page.go("#/chat").await;
    page.until("the session reopened", "document.querySelector('#transcript .run-end')").await;
    page.watch_csp().await;
    let ended = page.ended_runs().await;
    page.send_message("Run something that needs a yes.").await;
    page.find("#transcript .perm .perm-once").await;
    assert!(page.text("#transcript .perm").await.contains("echo approved-run"));
    page.shot("07-permission-request").await;
    page.click("#transcript .perm .perm-once").await;
    page.until("the answer recorded", "document.querySelector('#transcript .perm-status')?.dataset.status === 'approved'").await;
    page.until("the approved call's output", "document.querySelector('#transcript .tool[data-tool-use-id=toolu_p] .tool-output pre')?.innerText.includes('approved-run')").await;
    page.until("the last answer", "document.querySelector('#transcript').innerText.includes('Approved and done.')").await;
    page.until("the run's end", &format!("document.querySelectorAll('#transcript .run-end').length > {ended}")).await;

    // 5: rejected with a message, which reaches the model as the call's result.
    let ended = page.ended_runs().await;
    // Sent from the keyboard: Ctrl+Enter in the message field.
    page.fill("#composer-text", "Clean up.\u{E009}\u{E007}\u{E000}").await;
    page.fill("#transcript .tool[data-tool-use-id=toolu_r] .perm input", "keep the build").await;
    page.click("#transcript .tool[data-tool-use-id=toolu_r] .perm .perm-reject").await;
    page.until("the refusal recorded", "document.querySelector('#transcript .tool[data-tool-use-id=toolu_r] .perm-status')?.dataset.status === 'rejected'").await;
    page.until("the run's end", &format!("document.querySelectorAll('#transcript .run-end').length > {ended}")).await;
    assert!(page.text("#transcript .tool[data-tool-use-id=toolu_r]").await.contains("keep the build"));
    let told = fake
        .requests()
        .iter()
        .flat_map(|r| serde_json::from_slice::<Value>(&r.body).ok())
        .flat_map(|body| body["messages"].as_array().cloned().unwrap_or_default())
        .flat_map(|m| m["content"].as_array().cloned().unwrap_or_default())
        .find(|b| b["type"] == "tool_result" && b["tool_use_id"] == "toolu_r")
        .expect("the refused call's result was sent to the model");
    assert!(told.to_string().contains("keep the build"), "{told}");
    assert_eq!(page.js("return window.__violations").await, json!([]));

    // Every field has a label a screen reader can read.
    let unlabelled = page
        .js("return [...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
            .filter(e => !e.labels?.length && !e.getAttribute('aria-label')).map(e => e.id || e.name || e.outerHTML)")
        .await;
    assert_eq!(unlabelled, json!([]), "fields without a label");

    // Past sessions and runs, plugins and their grants.
    page.go("#/sessions").await;
    page.until("the runs listed", "document.querySelectorAll('#run-rows tr[data-run]').length === 5").await;
    assert_eq!(page.js("return document.querySelectorAll('#run-rows tr[data-status=cancelled]').length").await, json!(1));
    page.shot("08-sessions-and-runs").await;
    page.go("#/plugins").await;
    page.until("the plugins listed", "document.querySelector('#plugin-rows tr[data-plugin=bash]')?.innerText.includes('process')").await;
    page.shot("09-plugins").await;

    // A phone's width: the chat stays usable.
    viewport(&page.client, 390, 844).await;
    page.go("#/chat").await;
    page.until("the chat at phone width", "document.querySelector('#transcript .run-end')").await;
    page.shot("10-chat-phone").await;

    page.client.close().await.unwrap();
    drop(driver);
}
