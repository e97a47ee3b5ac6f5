// Markdown to HTML for model replies, escape-first: the whole text is HTML-escaped before any markup
// is made, so nothing the model writes can become a tag or an attribute. Only the markup below is
// produced, by this file alone:
//
//   blocks:  ``` fenced code (language label, copy button; an unclosed fence runs to the end, as while
//            streaming), # headings (1-6), - * + bulleted and 1. 1) numbered lists (nested by indent),
//            > quotes, --- rules, paragraphs (single newlines are line breaks)
//   inline:  `code`, **bold** __bold__, *italic* _italic_, ***both***, ~~strike~~, [text](url) for
//            http(s) and mailto URLs only (balanced parentheses allowed; opened in a new tab, no
//            referrer)
//
// Anything else (raw HTML, images, tables) stays visible as the text it is.

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
// Marks a stashed piece of finished markup; "\u0000" cannot occur in the text (it is replaced first).
const STASH = "\u0000";

export function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (ch) => ESCAPES[ch]);
}

export function renderMarkdown(source) {
  const clean = String(source).replace(/\r\n?/g, "\n").replaceAll(STASH, "\uFFFD");
  return renderBlocks(escapeHtml(clean).split("\n"));
}

// -- blocks (every line here is already escaped) -------------------------------------------------

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}&gt;\s?(.*)$/;
const LIST_ITEM = /^( *)([-*+]|\d{1,9}[.)])\s+(.*)$/;

function renderBlocks(lines) {
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) {
      i += 1;
    } else if (FENCE.test(line)) {
      i = codeBlock(lines, i, out);
    } else if (HEADING.test(line)) {
      const [, hashes, text] = line.match(HEADING);
      out.push(`<h${hashes.length}>${renderInline(text)}</h${hashes.length}>`);
      i += 1;
    } else if (RULE.test(line)) {
      out.push("<hr>");
      i += 1;
    } else if (QUOTE.test(line)) {
      i = quote(lines, i, out);
    } else if (LIST_ITEM.test(line)) {
      i = list(lines, i, out);
    } else {
      i = paragraph(lines, i, out);
    }
  }
  return out.join("\n");
}

function codeBlock(lines, start, out) {
  const [, fence, language] = lines[start].match(FENCE);
  const body = [];
  let i = start + 1;
  while (i < lines.length && !isClosingFence(lines[i], fence)) {
    body.push(lines[i]);
    i += 1;
  }
  out.push(codeMarkup(body.join("\n"), language));
  return i + 1;
}

function isClosingFence(line, fence) {
  const trimmed = line.trim();
  return trimmed.startsWith(fence) && /^(`+|~+)$/.test(trimmed) && trimmed[0] === fence[0];
}

// The language label passed FENCE's [\w+#.-] filter, so it is safe in a class name.
function codeMarkup(code, language) {
  const label = language ? `<span class="code-language">${language}</span>` : "<span></span>";
  const cls = language ? ` class="language-${language}"` : "";
  return (
    `<div class="code-block"><div class="code-header">${label}` +
    `<button type="button" class="copy-code" title="Copy code">Copy</button></div>` +
    `<pre><code${cls}>${code}</code></pre></div>`
  );
}

function quote(lines, start, out) {
  const inner = [];
  let i = start;
  while (i < lines.length && QUOTE.test(lines[i])) {
    inner.push(lines[i].match(QUOTE)[1]);
    i += 1;
  }
  out.push(`<blockquote>${renderBlocks(inner)}</blockquote>`);
  return i;
}

function list(lines, start, out) {
  const [, indent, marker] = lines[start].match(LIST_ITEM);
  const ordered = /\d/.test(marker);
  const items = [];
  let i = start;
  while (i < lines.length) {
    const match = lines[i].match(LIST_ITEM);
    if (!match || match[1].length !== indent.length || /\d/.test(match[2]) !== ordered) break;
    const item = [match[3]];
    i += 1;
    // The item's own lines: deeper-indented ones (a nested list or a continued paragraph).
    while (i < lines.length && isInsideItem(lines, i, indent.length)) {
      item.push(lines[i].slice(Math.min(indentOf(lines[i]), indent.length + 4)));
      i += 1;
    }
    items.push(`<li>${renderItem(item)}</li>`);
  }
  const first = ordered ? parseInt(marker, 10) : 1;
  const tag = ordered ? "ol" : "ul";
  out.push(`<${tag}${first !== 1 ? ` start="${first}"` : ""}>${items.join("")}</${tag}>`);
  return i;
}

function isInsideItem(lines, i, indent) {
  if (lines[i].trim()) return indentOf(lines[i]) > indent;
  // A blank line belongs to the item when the item goes on after it.
  const next = lines[i + 1];
  return next !== undefined && next.trim() !== "" && indentOf(next) > indent;
}

function indentOf(line) {
  return line.length - line.trimStart().length;
}

// An item without blank lines (a tight list) shows its first paragraph without the <p>.
function renderItem(item) {
  const html = renderBlocks(item);
  return item.some((line) => !line.trim()) ? html : html.replace(/^<p>([\s\S]*?)<\/p>/, "$1");
}

function paragraph(lines, start, out) {
  const text = [];
  let i = start;
  while (i < lines.length && lines[i].trim() && !startsBlock(lines[i])) {
    text.push(lines[i].trim());
    i += 1;
  }
  out.push(`<p>${text.map(renderInline).join("<br>")}</p>`);
  return i;
}

function startsBlock(line) {
  return [FENCE, HEADING, RULE, QUOTE, LIST_ITEM].some((pattern) => pattern.test(line));
}

// -- inline (the text is already escaped) --------------------------------------------------------

// The URL is escaped text too: a quote or angle bracket in it (as an entity) makes it no link.
const SAFE_URL = /^(https?:\/\/|mailto:)(?!.*&(quot|#39|lt|gt);)\S+$/i;

// A stashed piece's place in the text.
const MARKER = new RegExp(`${STASH}(\\d+)${STASH}`, "g");

function renderInline(text) {
  // Each stashed piece's markup, and the text it stood for.
  const stash = [];
  const sources = [];
  const keep = (html, source) => {
    sources.push(source);
    return `${STASH}${stash.push(html) - 1}${STASH}`;
  };
  const unstash = (piece, from) => piece.replace(MARKER, (_, index) => from[Number(index)]);
  let html = text.replace(/(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/g, (whole, __, code) =>
    keep(`<code>${code.trim() || code}</code>`, whole),
  );
  // A URL may hold balanced parentheses, as Wikipedia's do: .../Python_(programming_language).
  // Code spans were stashed first: a label keeps its code markup, a URL its backticks as written.
  html = html.replace(/\[([^\]\n]+)\]\(((?:[^()\s]|\([^()\s]*\))+)\)/g, (whole, label, url) => {
    const href = unstash(url, sources);
    if (!SAFE_URL.test(href)) return whole;
    const inner = unstash(emphasis(label), stash);
    return keep(`<a href="${href}" target="_blank" rel="noopener noreferrer">${inner}</a>`, whole);
  });
  return unstash(emphasis(html), stash);
}

function emphasis(text) {
  return text
    .replace(/\*\*\*(?=\S)([\s\S]*?\S)\*\*\*/g, "<strong><em>$1</em></strong>") // nested, not crossed
    .replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^\w])__(?=\S)([\s\S]*?\S)__(?!\w)/g, "$1<strong>$2</strong>")
    .replace(/~~(?=\S)([\s\S]*?\S)~~/g, "<del>$1</del>")
    .replace(/(^|[^\w*])\*([^\s*](?:[^*]*?[^\s*])?)\*(?![\w*])/g, "$1<em>$2</em>")
    .replace(/(^|[^\w])_([^\s_](?:[^_]*?[^\s_])?)_(?!\w)/g, "$1<em>$2</em>");
}
