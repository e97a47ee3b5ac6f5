// The chat page's controller: conversations, sending and streaming, settings, server status.

import { ApiError, checkHealth, describeError, listModels, replyStats, streamChat } from "./api.js";
import { fillSettingsForm, readSettingsForm } from "./settings_form.js";
import { ConversationStore, loadSettings, newConversation, saveSettings, titleFrom } from "./store.js";
import {
  copyText,
  downloadFile,
  editInPlace,
  fillContent,
  messageElement,
  renderConversationList,
  renameInPlace,
  renderEmptyState,
} from "./view.js";

const $ = (id) => document.getElementById(id);
const HEALTHY_POLL_MS = 15000;
const UNHEALTHY_POLL_MS = 2000;
const SERVER_STATES = {
  ok: ["ready", null],
  loading: ["loading", "The model is still loading. The page will be ready when the server is."],
  shutting_down: ["stopping", "The server is shutting down."],
  dead: ["stopped", "The server's engine has stopped; restart batchlm serve."],
  unreachable: ["offline", "Cannot reach the server. Is batchlm serve still running? Retrying…"],
  not_responding: ["not responding", "The server does not answer. Retrying…"],
};

const store = new ConversationStore();
let settings = loadSettings();
let conversation = store.current() || newConversation(settings.systemPrompt);
let models = [];
let serverState = null;
let streaming = null; // { controller, message } while a reply streams
let healthTimer = null;

// -- server status -------------------------------------------------------------------------------

let healthCheck = null;

// One check at a time (the timer and a failed request may both ask), each scheduling the next.
function pollHealth() {
  healthCheck = healthCheck || checkServer().finally(() => (healthCheck = null));
  return healthCheck;
}

async function checkServer() {
  clearTimeout(healthTimer);
  const state = await checkHealth();
  const cameBack = state === "ok" && serverState !== "ok";
  showServerState(state);
  if (cameBack || (state === "ok" && !models.length)) await loadModels();
  healthTimer = setTimeout(pollHealth, state === "ok" ? HEALTHY_POLL_MS : UNHEALTHY_POLL_MS);
}

function showServerState(state) {
  const [label, problem] = SERVER_STATES[state] || [state, `The server says: ${state}.`];
  const pill = $("server-status");
  pill.textContent = label;
  pill.dataset.state = state;
  if (problem) showBanner(problem, "server");
  else if (serverState !== "ok") clearBanner("server");
  serverState = state;
}

async function loadModels() {
  try {
    models = await listModels(settings.apiKey);
    clearBanner("models");
  } catch (error) {
    models = [];
    if (error instanceof ApiError && error.status !== 0) showBanner(describeError(error), "models");
  }
  $("model-name").textContent = modelName();
  if (!conversation.messages.length) renderMessages();
}

// The model the page talks to: the one chosen in Settings when the server serves it, else its first.
function modelName() {
  return models.includes(settings.model) ? settings.model : models[0] || settings.model || "";
}

function showBanner(text, kind) {
  const banner = $("banner");
  banner.textContent = text;
  banner.dataset.kind = kind;
  banner.hidden = false;
}

function clearBanner(kind) {
  const banner = $("banner");
  if (!kind || banner.dataset.kind === kind) banner.hidden = true;
}

// -- rendering -----------------------------------------------------------------------------------

function render() {
  renderConversationList($("conversation-list"), store.list(), conversation.id);
  $("chat-title").textContent = conversation.title;
  renderMessages();
}

function renderMessages() {
  const container = $("messages");
  if (!conversation.messages.length) {
    renderEmptyState(container, modelName());
    return;
  }
  const last = conversation.messages.length - 1;
  container.replaceChildren(
    ...conversation.messages.map((message, index) =>
      messageElement(message, index, { modelName: modelName(), isLast: index === last && !streaming }),
    ),
  );
  container.scrollTop = container.scrollHeight;
}

let pendingFrame = 0;

// Re-renders the streaming message at most once per frame.
function renderStreamingMessage() {
  if (pendingFrame) return;
  pendingFrame = requestAnimationFrame(() => {
    pendingFrame = 0;
    const container = $("messages");
    const article = container.lastElementChild;
    if (!streaming || !article) return;
    const nearBottom = container.scrollHeight - container.scrollTop - container.clientHeight < 80;
    fillContent(article.querySelector(".content"), streaming.message);
    if (nearBottom) container.scrollTop = container.scrollHeight;
  });
}

function setStreaming(active) {
  $("send").hidden = active;
  $("stop").hidden = !active;
  document.body.classList.toggle("streaming", active);
}

// -- sending -------------------------------------------------------------------------------------

async function sendMessage(text) {
  if (!store.get(conversation.id)) store.add(conversation);
  if (!conversation.messages.some((m) => m.role === "user")) conversation.title = titleFrom(text);
  conversation.messages.push({ role: "user", content: text });
  store.touch(conversation);
  await generate();
}

// What the server is sent: the system prompt and every message that has content.
function requestMessages() {
  const messages = conversation.systemPrompt.trim()
    ? [{ role: "system", content: conversation.systemPrompt }]
    : [];
  for (const message of conversation.messages) {
    if (message.content) messages.push({ role: message.role, content: message.content });
  }
  return messages;
}

async function generate() {
  const messages = requestMessages();
  const message = { role: "assistant", content: "" };
  conversation.messages.push(message);
  streaming = { controller: new AbortController(), message };
  setStreaming(true);
  render();
  const startedAt = performance.now();
  try {
    const result = await streamChat({
      model: modelName(),
      messages,
      settings,
      signal: streaming.controller.signal,
      onDelta: (text, field) => {
        message[field] = (message[field] || "") + text;
        renderStreamingMessage();
      },
    });
    message.stats = replyStats(result, startedAt);
  } catch (error) {
    if (error.name === "AbortError") {
      message.stats = { finishReason: "abort" };
    } else {
      message.error = describeError(error);
      // A lost connection or a server-side failure may mean the server is down: say so at once.
      if (error instanceof ApiError && (error.status === 0 || error.status >= 500)) pollHealth();
      // The server was restarted with another model: the next send uses the one it now serves.
      if (error instanceof ApiError && error.code === "model_not_found") loadModels();
    }
  } finally {
    streaming = null;
    setStreaming(false);
    store.touch(conversation);
    render();
  }
}

// -- message actions -----------------------------------------------------------------------------

async function onMessageAction(event) {
  const code = event.target.closest(".copy-code");
  if (code) return flash(code, await copyText(code.closest(".code-block").querySelector("code").textContent));
  const action = event.target.closest("[data-action]");
  const article = event.target.closest(".message");
  if (!action || !article || streaming) return;
  const index = Number(article.dataset.index);
  const message = conversation.messages[index];
  if (action.dataset.action === "copy") {
    flash(action, await copyText(message.content));
  } else if (action.dataset.action === "regenerate") {
    conversation.messages.splice(index);
    await generate();
  } else if (action.dataset.action === "edit") {
    const text = await editInPlace(article, message.content);
    if (text === null) return renderMessages();
    conversation.messages.splice(index);
    conversation.messages.push({ role: "user", content: text });
    await generate();
  }
}

function flash(button, copied) {
  const label = button.textContent;
  button.textContent = copied ? "Copied" : "Copy failed";
  setTimeout(() => (button.textContent = label), 1200);
}

// -- conversations -------------------------------------------------------------------------------

function openConversation(id) {
  if (streaming) return;
  conversation = store.get(id) || newConversation(settings.systemPrompt);
  store.select(conversation.id);
  render();
}

async function onConversationAction(event) {
  const action = event.target.closest("[data-action]");
  const item = event.target.closest(".conversation");
  if (!action || !item) return;
  const id = item.dataset.id;
  if (action.dataset.action === "open") openConversation(id);
  if (action.dataset.action === "rename") {
    const title = await renameInPlace(item, store.get(id).title);
    if (title !== null) store.rename(id, title);
    render();
  }
  if (action.dataset.action === "delete" && !streaming && confirm("Delete this conversation?")) {
    store.remove(id);
    if (conversation.id === id) conversation = store.list()[0] || newConversation(settings.systemPrompt);
    store.select(conversation.id);
    render();
  }
}

function exportConversations() {
  downloadFile(store.exportJson(), `batchlm-chats-${new Date().toISOString().slice(0, 10)}.json`);
}

async function importConversations(file) {
  try {
    const count = store.importJson(await file.text());
    showBanner(`Imported ${count} conversation${count === 1 ? "" : "s"}.`, "import");
    render();
  } catch (error) {
    showBanner(`Could not import ${file.name}: ${error.message}`, "import");
  }
}

// -- settings ------------------------------------------------------------------------------------

function openSettings() {
  fillSettingsForm(settings, conversation.systemPrompt, models, modelName());
  $("settings").showModal();
}

function saveSettingsForm() {
  const previousKey = settings.apiKey;
  settings = readSettingsForm(settings);
  conversation.systemPrompt = settings.systemPrompt;
  if (store.get(conversation.id)) store.touch(conversation);
  saveSettings(settings);
  $("model-name").textContent = modelName();
  if (settings.apiKey !== previousKey) loadModels();
}

// -- wiring --------------------------------------------------------------------------------------

function submitPrompt(event) {
  event.preventDefault();
  const prompt = $("prompt");
  const text = prompt.value;
  if (!text.trim() || streaming) return;
  prompt.value = "";
  prompt.style.height = "";
  sendMessage(text);
}

function wire() {
  $("composer").addEventListener("submit", submitPrompt);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) submitPrompt(event);
  });
  $("prompt").addEventListener("input", (event) => {
    event.target.style.height = "";
    event.target.style.height = `${Math.min(event.target.scrollHeight, 240)}px`;
  });
  $("stop").addEventListener("click", () => streaming && streaming.controller.abort());
  $("messages").addEventListener("click", onMessageAction);
  $("conversation-list").addEventListener("click", onConversationAction);
  $("new-chat").addEventListener("click", () => openConversation(null));
  $("export").addEventListener("click", exportConversations);
  $("import").addEventListener("click", () => $("import-file").click());
  $("import-file").addEventListener("change", (event) => {
    const [file] = event.target.files;
    if (file) importConversations(file);
    event.target.value = "";
  });
  $("open-settings").addEventListener("click", openSettings);
  $("cancel-settings").addEventListener("click", () => $("settings").close());
  $("settings-form").addEventListener("submit", saveSettingsForm);
}

wire();
render();
pollHealth();
$("prompt").focus();
