// `{{name}}`: a Hangar model provider written in JavaScript.
//
// As written it needs no network: it answers every message with
// `{{name}} heard: ...`, streamed word by word. A real adapter imports
// `hangar:plugin/http` in `wit/world.wit`, sends the request to its vendor
// and turns the answer into events. Build it with `hangar plugin build`
// (`jco componentize` against `wit/`).

const NAME = "{{name}}"; // must equal `name` in {{name}}.plugin.toml

// The `completion` resource: the events of one answer, pulled by the host
// one at a time (`undefined` when the answer is complete).
class Completion {
  constructor(events) {
    this.events = events;
  }

  next() {
    return this.events.length > 0 ? this.events.shift() : undefined;
  }
}

// The `hangar:plugin/provider-api` export, with its resource as a class.
// Records are objects with camelCase fields, variants `{tag, val}`, enums
// strings (`"end-turn"`), u64 values BigInts. `models` and `complete`
// return WIT `result`s: a failure is thrown (jco's documentation says how a
// thrown value becomes the `provider-error`).
export const providerApi = {
  Completion,

  info() {
    // No auth types: the host needs no key to run it.
    return { id: NAME, name: NAME, authTypes: [], listsModels: true };
  },

  models(cfg) {
    return [{ id: `${NAME}-1`, name: `${NAME} 1`, contextWindow: 32768 }];
  },

  complete(cfg, req) {
    let said = "";
    for (const message of [...req.messages].reverse()) {
      if (message.role === "user") {
        said = message.content.filter((b) => b.tag === "text").map((b) => b.val).join(" ");
        break;
      }
    }
    const words = `${NAME} heard: ${said}`.split(" ");
    const events = words.map((w, i) => ({ tag: "text", val: i === words.length - 1 ? w : w + " " }));
    events.push({ tag: "usage", val: { inputTokens: 0n, outputTokens: BigInt(words.length) } });
    events.push({ tag: "stop", val: "end-turn" });
    return new Completion(events);
  },
};
