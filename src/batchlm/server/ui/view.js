// DOM building for the chat page. Text from the model or the user enters the page only as text nodes
// or through renderMarkdown (which escapes it first), never as markup of its own.

import { renderMarkdown } from "./markdown.js";

export function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function button(label, action, title) {
  const node = element("button", "icon-button", label);
  node.type = "button";
  node.dataset.action = action;
  node.title = title;
  return node;
}

export function renderConversationList(container, conversations, currentId) {
  container.replaceChildren(
    ...conversations.map((conversation) => {
      const item = element("div", "conversation");
      item.dataset.id = conversation.id;
      item.classList.toggle("active", conversation.id === currentId);
      const title = element("button", "conversation-title", conversation.title);
      title.type = "button";
      title.dataset.action = "open";
      title.title = conversation.title;
      item.append(title, button("✎", "rename", "Rename"), button("✕", "delete", "Delete"));
      return item;
    }),
  );
}

export function renderEmptyState(container, modelName) {
  const empty = element("div", "empty-state");
  empty.append(
    element("h2", null, modelName ? `Chat with ${modelName}` : "Chat with the model"),
    element("p", null, "Replies stream as they are generated. Conversations stay in this browser."),
  );
  container.replaceChildren(empty);
}

// One message: its role, its content and a footer with stats and actions.
export function messageElement(message, index, { modelName, isLast }) {
  const article = element("article", `message ${message.role}`);
  article.dataset.index = String(index);
  article.append(element("div", "role", message.role === "user" ? "You" : modelName || "Model"));
  const content = element("div", "content");
  article.append(content);
  fillContent(content, message);
  const footer = element("div", "message-footer");
  footer.append(element("span", "stats", statsText(message.stats)));
  const actions = element("div", "actions");
  actions.append(button("Copy", "copy", "Copy this message"));
  if (message.role === "user") actions.append(button("Edit", "edit", "Edit and send again"));
  if (message.role === "assistant" && isLast) {
    actions.append(button("Regenerate", "regenerate", "Generate this reply again"));
  }
  footer.append(actions);
  article.append(footer);
  return article;
}

export function fillContent(content, message) {
  if (message.role === "user") {
    content.textContent = message.content;
  } else {
    content.innerHTML = renderMarkdown(message.content);
    if (message.reasoning) content.prepend(thinkingElement(message));
  }
  if (message.error) content.append(element("div", "message-error", message.error));
}

// A reasoning model's thinking, folded away above its answer; it stays open or closed across the
// re-renders of a stream as the user left it.
function thinkingElement(message) {
  const details = element("details", "thinking");
  details.open = Boolean(message.thinkingOpen);
  details.addEventListener("toggle", () => {
    message.thinkingOpen = details.open;
  });
  // A reply that ended (stats or an error) while still thinking, at max tokens say, has thought.
  const ended = message.content || message.stats || message.error;
  const summary = ended ? "Thought" : "Thinking…";
  details.append(element("summary", null, summary), element("div", "thinking-text", message.reasoning));
  return details;
}

function statsText(stats) {
  if (!stats) return "";
  const parts = [];
  if (Number.isFinite(stats.completionTokens)) parts.push(`${stats.completionTokens} tokens`);
  if (Number.isFinite(stats.tokensPerSecond)) parts.push(`${stats.tokensPerSecond.toFixed(1)} tok/s`);
  if (Number.isFinite(stats.promptTokens)) parts.push(`prompt ${stats.promptTokens} tokens`);
  if (stats.finishReason === "length") parts.push("stopped at max tokens");
  if (stats.finishReason === "abort") parts.push("stopped");
  return parts.join(" · ");
}

// An inline editor in place of a user message's content; resolves to the new text or null.
export function editInPlace(article, text) {
  return new Promise((resolve) => {
    const content = article.querySelector(".content");
    const editor = element("textarea", "edit-box");
    editor.value = text;
    editor.rows = Math.min(12, text.split("\n").length + 1);
    const save = element("button", "primary", "Send");
    const cancel = element("button", "quiet", "Cancel");
    save.type = cancel.type = "button";
    const bar = element("div", "edit-buttons");
    bar.append(cancel, save);
    content.replaceChildren(editor, bar);
    editor.focus();
    save.addEventListener("click", () => resolve(editor.value.trim() ? editor.value : null));
    cancel.addEventListener("click", () => resolve(null));
  });
}

// An input in place of a conversation's title; resolves to the new title (Enter, or leaving the
// field) or null (Escape).
export function renameInPlace(item, title) {
  return new Promise((resolve) => {
    const input = element("input", "rename-box");
    input.value = title;
    item.replaceChildren(input);
    input.focus();
    input.select();
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter") resolve(input.value);
      if (event.key === "Escape") resolve(null);
    });
    input.addEventListener("blur", () => resolve(input.value));
  });
}

export function downloadFile(text, filename) {
  const link = element("a");
  link.href = URL.createObjectURL(new Blob([text], { type: "application/json" }));
  link.download = filename;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // No clipboard API (a page not served over https or localhost): the older way.
    const area = element("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    const copied = document.execCommand("copy");
    area.remove();
    return copied;
  }
}
