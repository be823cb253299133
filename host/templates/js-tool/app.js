// `{{name}}`: a Hangar tool written in JavaScript.
//
// As written it counts the words of a text the model passes; change SCHEMA,
// the description and `invoke` to make it yours. Build it with
// `hangar plugin build` (`jco componentize` against `wit/`).
//
// The component runs in a sandbox with no Node.js APIs: no `fs`, no
// `process`. It asks for no capability (see {{name}}.plugin.toml).

const NAME = "{{name}}"; // must equal `name` in {{name}}.plugin.toml

// What the model reads to decide how to call the tool.
const SCHEMA = {
  type: "object",
  properties: {
    text: { type: "string", description: "The text whose words to count" },
  },
  required: ["text"],
  additionalProperties: false,
};

// The `hangar:plugin/tool-api` export: records are objects with camelCase
// fields (`inputSchema`, `workDir`, `isError`).
export const toolApi = {
  spec() {
    return {
      name: NAME,
      description: "Counts the words of a text.",
      inputSchema: JSON.stringify(SCHEMA),
    };
  },

  // A failure the model can act on is an output with `isError`, never a
  // thrown exception: an uncaught one traps, and the model then only learns
  // that the plugin crashed.
  invoke(call) {
    let args;
    try {
      args = JSON.parse(call.input);
    } catch (err) {
      return { text: `invalid input: ${err.message}`, isError: true };
    }
    if (typeof args?.text !== "string") {
      return { text: "invalid input: `text` must be a string", isError: true };
    }
    const words = args.text.split(/\s+/).filter((w) => w.length > 0).length;
    return { text: `${words} words`, isError: false };
  },
};
