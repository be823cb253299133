// A small Markdown renderer for model output that builds DOM nodes
// directly: text only ever becomes text nodes, so there is no HTML to
// sanitize and nothing a model writes can become markup or script. Raw HTML
// in the input is shown as the text it is. Links keep http(s) and mailto
// targets only; images are shown as links (no requests on the reader's
// behalf).
//
// Covered: headings, paragraphs, fenced and indented code, block quotes,
// bullet and numbered lists, rules, and inline code, strong, emphasis,
// strike-through, links and bare URLs.

import { h } from "./dom.js";

const SAFE_URL = /^(https?:\/\/|mailto:)/i;

export function render(source) {
  const root = document.createDocumentFragment();
  blocks(String(source).replace(/\r\n?/g, "\n").split("\n"), root);
  return root;
}

function blocks(lines, parent) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (/^\s*$/.test(line)) {
      i++;
      continue;
    }
    const fence = line.match(/^\s{0,3}(`{3,}|~{3,})\s*([\w+-]*)/);
    if (fence) {
      const body = [];
      i++;
      while (i < lines.length && !lines[i].trimStart().startsWith(fence[1])) body.push(lines[i++]);
      i++; // the closing fence, when there is one
      const code = h("code", fence[2] ? { class: `language-${fence[2]}` } : {}, body.join("\n"));
      parent.append(h("pre", {}, code));
      continue;
    }
    const heading = line.match(/^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/);
    if (heading) {
      parent.append(h(`h${Math.min(heading[1].length + 2, 6)}`, {}, inline(heading[2])));
      i++;
      continue;
    }
    if (/^\s{0,3}([-*_])(\s*\1){2,}\s*$/.test(line)) {
      parent.append(h("hr"));
      i++;
      continue;
    }
    if (/^\s{0,3}>/.test(line)) {
      const inner = [];
      while (i < lines.length && /^\s{0,3}>/.test(lines[i])) inner.push(lines[i++].replace(/^\s{0,3}>\s?/, ""));
      const quote = h("blockquote");
      blocks(inner, quote);
      parent.append(quote);
      continue;
    }
    const item = line.match(/^(\s{0,3})([-*+]|\d{1,9}[.)])\s+/);
    if (item) {
      const ordered = /\d/.test(item[2]);
      const list = h(ordered ? "ol" : "ul");
      if (ordered && parseInt(item[2], 10) !== 1) list.start = parseInt(item[2], 10);
      while (i < lines.length) {
        const m = lines[i].match(/^(\s{0,3})([-*+]|\d{1,9}[.)])\s+(.*)$/);
        if (!m || /\d/.test(m[2]) !== ordered) break;
        const body = [m[3]];
        i++;
        // Continuation lines: indented, or a lazy paragraph line.
        while (i < lines.length && /^\s{2,}\S/.test(lines[i]) && !/^\s{0,3}([-*+]|\d{1,9}[.)])\s+/.test(lines[i])) {
          body.push(lines[i++].trim());
        }
        const li = h("li");
        blocks(body, li);
        // A tight item is its text, not a paragraph.
        if (li.childNodes.length === 1 && li.firstChild.nodeName === "P") li.replaceChildren(...li.firstChild.childNodes);
        list.append(li);
        if (i < lines.length && /^\s*$/.test(lines[i]) && i + 1 < lines.length && /^(\s{0,3})([-*+]|\d{1,9}[.)])\s+/.test(lines[i + 1])) i++;
      }
      parent.append(list);
      continue;
    }
    if (/^( {4}|\t)/.test(line)) {
      const body = [];
      while (i < lines.length && (/^( {4}|\t)/.test(lines[i]) || /^\s*$/.test(lines[i]))) body.push(lines[i++].replace(/^( {4}|\t)/, ""));
      while (body.length && /^\s*$/.test(body[body.length - 1])) body.pop();
      parent.append(h("pre", {}, h("code", {}, body.join("\n"))));
      continue;
    }
    const para = [];
    while (
      i < lines.length &&
      !/^\s*$/.test(lines[i]) &&
      !/^\s{0,3}(`{3,}|~{3,}|#{1,6}\s|>)/.test(lines[i]) &&
      !(para.length && /^\s{0,3}([-*+]|\d{1,9}[.)])\s+/.test(lines[i]))
    ) {
      para.push(lines[i++]);
    }
    const p = h("p");
    para.forEach((text, n) => {
      if (n) p.append(/ {2,}$|\\$/.test(para[n - 1]) ? h("br") : " ");
      p.append(inline(text.replace(/ {2,}$|\\$/, "").trim()));
    });
    parent.append(p);
  }
}

/** Inline markup of one piece of text, as a fragment. */
export function inline(text) {
  const out = document.createDocumentFragment();
  let plain = "";
  const flush = () => {
    if (plain) out.append(document.createTextNode(plain));
    plain = "";
  };
  let i = 0;
  while (i < text.length) {
    const rest = text.slice(i);
    let m;
    if (rest[0] === "\\" && /^[\\`*_{}[\]()#+\-.!~<>|]/.test(rest.slice(1))) {
      plain += rest[1];
      i += 2;
    } else if ((m = rest.match(/^(`+)([\s\S]*?[^`])\1(?!`)/))) {
      flush();
      out.append(h("code", {}, m[2].replace(/^ (.*) $/, "$1")));
      i += m[0].length;
    } else if ((m = rest.match(/^\*\*(?=\S)([\s\S]*?\S)\*\*/) || (!wordBefore(text, i) && rest.match(/^__(?=\S)([\s\S]*?\S)__(?!\w)/)))) {
      flush();
      out.append(h("strong", {}, inline(m[1])));
      i += m[0].length;
    } else if ((m = rest.match(/^~~(?=\S)([\s\S]*?\S)~~/))) {
      flush();
      out.append(h("del", {}, inline(m[1])));
      i += m[0].length;
    } else if ((m = rest.match(/^\*(?=[^\s*])([\s\S]*?[^\s*])\*(?!\*)/) || (!wordBefore(text, i) && rest.match(/^_(?=[^\s_])([\s\S]*?[^\s_])_(?!\w)/)))) {
      flush();
      out.append(h("em", {}, inline(m[1])));
      i += m[0].length;
    } else if ((m = rest.match(/^!?\[([^\]]*)\]\(\s*<?([^\s)>]*)>?(?:\s+"[^"]*")?\s*\)/))) {
      flush();
      out.append(link(m[2], m[1] || m[2]));
      i += m[0].length;
    } else if ((m = rest.match(/^<((?:https?:\/\/|mailto:)[^\s<>]+)>/))) {
      flush();
      out.append(link(m[1], m[1]));
      i += m[0].length;
    } else if ((m = rest.match(/^https?:\/\/[^\s<>"']+/)) && !/[\w/]/.test(text[i - 1] || "")) {
      const url = m[0].replace(/[.,;:!?)\]]+$/, "");
      flush();
      out.append(link(url, url));
      i += url.length;
    } else {
      plain += rest[0];
      i++;
    }
  }
  flush();
  return out;
}

// `_` and `__` inside a word (snake_case, __dunder__) are not emphasis.
function wordBefore(text, i) {
  return /\w/.test(text[i - 1] || "");
}

function link(url, label) {
  if (!SAFE_URL.test(url)) return document.createTextNode(label === url ? url : `${label} (${url})`);
  // A bare URL is its own label, shown as it is (not parsed again).
  return h("a", { href: url, rel: "noopener noreferrer nofollow", target: "_blank" }, label === url ? label : inline(label));
}
