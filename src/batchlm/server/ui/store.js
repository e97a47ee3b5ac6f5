// Conversations and settings, kept in the browser's localStorage (nothing is stored on the server).
//
// A conversation: { id, title, systemPrompt, createdAt, updatedAt, messages: [message] }
// A message:      { role: "user" | "assistant", content, reasoning?, stats?, error? }
// The export file: { format: "batchlm-chat", version: 1, conversations: [conversation] }

const CONVERSATIONS_KEY = "batchlm.conversations";
const SETTINGS_KEY = "batchlm.settings";
const CURRENT_KEY = "batchlm.current";
export const EXPORT_FORMAT = "batchlm-chat";

export const DEFAULT_SETTINGS = Object.freeze({
  model: "",
  temperature: null, // null: not sent, so the server samples as the model recommends
  topP: null,
  maxTokens: null, // null: the server's limit (up to the context length)
  apiKey: "",
  systemPrompt: "",
});

function readJson(key, fallback) {
  try {
    const text = localStorage.getItem(key);
    return text === null ? fallback : JSON.parse(text);
  } catch {
    return fallback; // unreadable (hand-edited or from another page): start afresh rather than fail
  }
}

function writeJson(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
    return true;
  } catch {
    return false; // storage full or disabled: the page keeps working for this visit
  }
}

export function loadSettings() {
  const saved = readJson(SETTINGS_KEY, {});
  return { ...DEFAULT_SETTINGS, ...(typeof saved === "object" && saved ? saved : {}) };
}

export function saveSettings(settings) {
  return writeJson(SETTINGS_KEY, settings);
}

export function newId() {
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
}

export function newConversation(systemPrompt = "") {
  const now = Date.now();
  return { id: newId(), title: "New chat", systemPrompt, createdAt: now, updatedAt: now, messages: [] };
}

// A title from the first user message: its first line, shortened.
export function titleFrom(text) {
  const line = text.trim().split("\n")[0].trim();
  return line.length > 48 ? `${line.slice(0, 47)}…` : line || "New chat";
}

export class ConversationStore {
  constructor() {
    const loaded = readJson(CONVERSATIONS_KEY, []);
    this.conversations = Array.isArray(loaded) ? loaded.map(normalize).filter(Boolean) : [];
    this.currentId = readJson(CURRENT_KEY, null);
  }

  // Most recently updated first.
  list() {
    return [...this.conversations].sort((a, b) => b.updatedAt - a.updatedAt);
  }

  get(id) {
    return this.conversations.find((c) => c.id === id) || null;
  }

  current() {
    return this.get(this.currentId);
  }

  select(id) {
    this.currentId = id;
    writeJson(CURRENT_KEY, id);
  }

  add(conversation) {
    this.conversations.push(conversation);
    this.select(conversation.id);
    this.save();
  }

  rename(id, title) {
    const conversation = this.get(id);
    if (conversation && title.trim()) {
      conversation.title = title.trim();
      this.save();
    }
  }

  remove(id) {
    this.conversations = this.conversations.filter((c) => c.id !== id);
    if (this.currentId === id) this.select(null);
    this.save();
  }

  touch(conversation) {
    conversation.updatedAt = Date.now();
    this.save();
  }

  save() {
    return writeJson(CONVERSATIONS_KEY, this.conversations);
  }

  exportJson() {
    const file = { format: EXPORT_FORMAT, version: 1, conversations: this.conversations };
    return JSON.stringify(file, null, 2);
  }

  // Adds the conversations of an export file (or a bare list of them); returns how many it added.
  importJson(text) {
    const parsed = JSON.parse(text);
    const list = Array.isArray(parsed) ? parsed : parsed && parsed.conversations;
    if (!Array.isArray(list)) throw new Error("not a batchlm chat export (no conversations list)");
    const imported = list.map(normalize).filter(Boolean);
    for (const conversation of imported) {
      if (this.get(conversation.id)) conversation.id = newId();
      this.conversations.push(conversation);
    }
    this.save();
    return imported.length;
  }
}

// A conversation with only the fields and types the page uses, or null when it is not one.
function normalize(raw) {
  if (!raw || typeof raw !== "object" || !Array.isArray(raw.messages)) return null;
  const messages = raw.messages
    .filter((m) => m && (m.role === "user" || m.role === "assistant") && typeof m.content === "string")
    .map((m) => ({
      role: m.role,
      content: m.content,
      ...(typeof m.reasoning === "string" ? { reasoning: m.reasoning } : {}),
      ...(m.stats && typeof m.stats === "object" ? { stats: m.stats } : {}),
      ...(typeof m.error === "string" ? { error: m.error } : {}),
    }));
  const now = Date.now();
  return {
    id: typeof raw.id === "string" && raw.id ? raw.id : newId(),
    title: typeof raw.title === "string" && raw.title.trim() ? raw.title : "Imported chat",
    systemPrompt: typeof raw.systemPrompt === "string" ? raw.systemPrompt : "",
    createdAt: Number.isFinite(raw.createdAt) ? raw.createdAt : now,
    updatedAt: Number.isFinite(raw.updatedAt) ? raw.updatedAt : now,
    messages,
  };
}
