// pakar's chat page: talks to the server's OpenAI-compatible /v1/chat/completions with stream=true.
//
// Design choices:
// - Safe rendering: every piece of text (model output, the user's messages, error messages, titles)
//   is put on the page with textContent, never innerHTML, so "<b>" or "<img onerror=...>" in an
//   answer shows as those characters. CSS white-space: pre-wrap keeps newlines.
// - History lives in localStorage ("pakar.chats": [{id, title, messages, updated}], "pakar.current",
//   "pakar.settings"); nothing is stored on the server.
// - Stop aborts the fetch; the server sees the disconnect and cancels the generation. The partial
//   answer is kept in the conversation.
// - If the conversation no longer fits the model's context window (HTTP 400,
//   code "context_length_exceeded"), the oldest turns are left out of the request (the system prompt
//   is kept) and the request is retried; a note says so.
// - Sources: a server started with --index sends the passages behind an answer in the first chunk's
//   "sources" field; they are shown under the answer as numbered citations (text only) and kept with
//   the message in localStorage, but never sent back to the server.
// - One UI language at a time, English or Indonesian: every word the page shows comes from STRINGS
//   through t(); the browser's language picks the first one (Indonesian for "id", else English) and
//   the Language setting switches. A missing Indonesian string falls back to English.
// - A model that was not chat fine-tuned (/v1/models says "chat": false) continues text instead of
//   answering; a note under the header says so and how to get a chat model.
"use strict";

const STRINGS = {
  en: {
    newChat: "+ New chat", conversations: "Conversations", settings: "Settings", temperature: "Temperature",
    topP: "Top-p", maxTokens: "Max tokens", systemPrompt: "System prompt", none: "(none)", apiKey: "API key",
    apiKeyHint: "(only if the server asks)", language: "Language",
    storageHint: "Conversations and settings stay in this browser (localStorage).",
    inputHint: "Write a message... (Enter to send, Shift+Enter for a new line)", send: "Send", stop: "Stop",
    untitled: "New chat", deleteChat: "Delete this conversation", generating: "generating\u2026",
    unreachable: "server unreachable", stopped: "Stopped.", tokenLimit: "The answer reached the token limit.",
    leftOut: "Older messages were left out: the conversation is longer than the model's context window.",
    textModel: "This is a text model, not chat fine-tuned: it continues what you write instead of answering, " +
      "so its replies can look odd. For a chat model, fine-tune it on conversations: " +
      "pakar finetune --checkpoint CHECKPOINT --data chats.jsonl",
  },
  id: {
    newChat: "+ Obrolan baru", conversations: "Percakapan", settings: "Pengaturan", temperature: "Temperatur",
    topP: "Top-p", maxTokens: "Token maksimum", systemPrompt: "Prompt sistem", none: "(tidak ada)",
    apiKey: "Kunci API", apiKeyHint: "(hanya jika server memintanya)", language: "Bahasa",
    storageHint: "Percakapan dan pengaturan hanya disimpan di peramban ini (localStorage).",
    inputHint: "Tulis pesan... (Enter untuk mengirim, Shift+Enter untuk baris baru)", send: "Kirim",
    stop: "Berhenti", untitled: "Obrolan baru", deleteChat: "Hapus percakapan ini", generating: "menulis\u2026",
    unreachable: "server tidak terjangkau", stopped: "Dihentikan.", tokenLimit: "Jawaban mencapai batas token.",
    leftOut: "Pesan lama tidak disertakan: percakapan lebih panjang dari jendela konteks model.",
    textModel: "Ini model teks, belum di-fine-tune untuk chat: ia melanjutkan tulisan Anda, bukan menjawab, " +
      "sehingga balasannya bisa tampak aneh. Untuk model chat, fine-tune dengan data percakapan: " +
      "pakar finetune --checkpoint CHECKPOINT --data chats.jsonl",
  },
};

const $ = (id) => document.getElementById(id);
const store = {
  get(key, fallback) {
    try { const v = JSON.parse(localStorage.getItem(key)); return v === null ? fallback : v; }
    catch { return fallback; }
  },
  set(key, value) { localStorage.setItem(key, JSON.stringify(value)); },
};

let chats = store.get("pakar.chats", []);
let currentId = store.get("pakar.current", null);
let controller = null; // AbortController of the request in flight
let modelName = null;
let modelIsChat = null; // from /v1/models; null until known

const settingsFields = { temperature: "temperature", top_p: "top-p", max_tokens: "max-tokens",
                         system: "system-prompt", api_key: "api-key", language: "language" };

function browserLanguage() {
  const langs = navigator.languages && navigator.languages.length ? navigator.languages : [navigator.language || "en"];
  return langs.some((l) => /^(id|in)\b/i.test(l)) ? "id" : "en";
}

function t(key) {
  const table = STRINGS[$("language").value] || STRINGS.en;
  return table[key] !== undefined ? table[key] : STRINGS.en[key];
}

// Puts the chosen language's words on every marked element and on what the script wrote.
function applyLanguage() {
  document.documentElement.lang = $("language").value;
  for (const el of document.querySelectorAll("[data-t]")) el.textContent = t(el.dataset.t);
  for (const el of document.querySelectorAll("[data-t-placeholder]")) el.placeholder = t(el.dataset.tPlaceholder);
  for (const el of document.querySelectorAll("[data-t-aria-label]")) el.setAttribute("aria-label", t(el.dataset.tAriaLabel));
  showModelNote();
}

function showModelNote() {
  $("model-note").hidden = modelIsChat !== false;
  $("model-note").textContent = modelIsChat === false ? t("textModel") : "";
}

function loadSettings() {
  const s = store.get("pakar.settings", {});
  $("language").value = browserLanguage();
  for (const [key, id] of Object.entries(settingsFields)) {
    if (s[key] !== undefined) $(id).value = s[key];
  }
  if (!STRINGS[$("language").value]) $("language").value = "en";
  showSliderValues();
  applyLanguage();
}

function saveSettings() {
  const s = {};
  for (const [key, id] of Object.entries(settingsFields)) s[key] = $(id).value;
  store.set("pakar.settings", s);
  showSliderValues();
}

function showSliderValues() {
  $("temperature-value").textContent = Number($("temperature").value).toFixed(2);
  $("top-p-value").textContent = Number($("top-p").value).toFixed(2);
}

function currentChat() {
  let chat = chats.find((c) => c.id === currentId);
  if (!chat) {
    chat = { id: String(Date.now()) + Math.random().toString(16).slice(2, 6), title: "", messages: [], updated: Date.now() };
    chats.unshift(chat);
    currentId = chat.id;
    saveChats();
  }
  return chat;
}

function saveChats() {
  store.set("pakar.chats", chats);
  store.set("pakar.current", currentId);
}

function renderChatList() {
  const list = $("chat-list");
  list.replaceChildren();
  for (const chat of chats) {
    const li = document.createElement("li");
    if (chat.id === currentId) li.className = "current";
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    // user text: textContent only; an untitled chat (older pages stored "New chat") shows the UI's word
    open.textContent = chat.title && chat.title !== "New chat" ? chat.title : t("untitled");
    open.addEventListener("click", () => { if (!controller) { currentId = chat.id; saveChats(); render(); } });
    const del = document.createElement("button");
    del.type = "button";
    del.className = "delete";
    del.title = t("deleteChat");
    del.textContent = "\u00d7";
    del.addEventListener("click", () => {
      if (controller) return;
      chats = chats.filter((c) => c.id !== chat.id);
      if (currentId === chat.id) currentId = chats.length ? chats[0].id : null;
      saveChats();
      render();
    });
    li.append(open, del);
    list.append(li);
  }
}

function addBubble(kind, text) {
  const div = document.createElement("div");
  div.className = "message " + kind;
  div.textContent = text; // never innerHTML: model output is text, not markup
  $("messages").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

// Numbered citations under an answer: "[n] source (document d)", the passage as a tooltip.
function addCitations(sources) {
  const ol = document.createElement("ol");
  ol.className = "message sources";
  for (const s of sources) {
    const li = document.createElement("li");
    li.value = s.n;
    li.textContent = s.source + " (document " + (s.doc + 1) + ")"; // textContent only
    li.title = s.text;
    ol.append(li);
  }
  $("messages").append(ol);
  return ol;
}

function render() {
  renderChatList();
  $("messages").replaceChildren();
  for (const m of currentChat().messages) {
    addBubble(m.role, m.content);
    if (m.sources && m.sources.length) addCitations(m.sources);
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
  $("new-chat").disabled = busy;
  $("status").textContent = busy ? t("generating") : "";
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function fetchModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) { $("status").textContent = body.error ? body.error.message : "HTTP " + r.status; return; }
    modelName = body.data[0].id;
    modelIsChat = typeof body.data[0].chat === "boolean" ? body.data[0].chat : null;
    $("model-name").textContent = modelName;
    showModelNote();
  } catch (e) {
    $("status").textContent = t("unreachable");
  }
}

// Reads the server-sent events of a streaming completion; calls onText for each piece of text.
// Returns the finish reason.
async function readStream(response, onText, onSources) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return finish;
        const obj = JSON.parse(data);
        if (obj.error) throw new Error(obj.error.message);
        if (Array.isArray(obj.sources) && onSources) onSources(obj.sources);
        for (const choice of obj.choices || []) {
          if (choice.delta && choice.delta.content) onText(choice.delta.content);
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
  }
  return finish;
}

async function send(text) {
  const chat = currentChat();
  chat.messages.push({ role: "user", content: text });
  if (!chat.title || chat.title === "New chat") chat.title = text.slice(0, 40);
  chat.updated = Date.now();
  saveChats();
  renderChatList();
  addBubble("user", text);

  const bubble = addBubble("assistant streaming", "");
  let answer = "";
  let sources = [];
  controller = new AbortController();
  setBusy(true);
  let history = chat.messages.map((m) => ({ role: m.role, content: m.content }));
  try {
    for (;;) {
      const system = $("system-prompt").value.trim();
      const messages = (system ? [{ role: "system", content: system }] : []).concat(history);
      const body = { messages, stream: true, temperature: Number($("temperature").value),
                     top_p: Number($("top-p").value), max_tokens: Math.max(1, parseInt($("max-tokens").value, 10) || 256) };
      if (modelName) body.model = modelName;
      const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(),
                                                              body: JSON.stringify(body), signal: controller.signal });
      if (!response.ok) {
        let err = { message: "HTTP " + response.status };
        try { err = (await response.json()).error || err; } catch { /* not JSON */ }
        if (err.code === "context_length_exceeded" && history.length > 1) {
          // drop the oldest turn (a user message and its answer) and try again
          history = history.slice(1);
          while (history.length > 1 && history[0].role !== "user") history = history.slice(1);
          addBubble("note", t("leftOut"));
          continue;
        }
        throw new Error(err.message);
      }
      const finish = await readStream(response, (piece) => {
        answer += piece;
        bubble.textContent = answer; // textContent: shown as text, never parsed as HTML
        bubble.scrollIntoView({ block: "end" });
      }, (s) => { sources = s; });
      if (finish === "length") addBubble("note", t("tokenLimit"));
      break;
    }
  } catch (e) {
    if (e.name === "AbortError") addBubble("note", t("stopped"));
    else addBubble("error", String(e.message || e));
  } finally {
    bubble.classList.remove("streaming");
    if (answer.trim()) {
      chat.messages.push(sources.length ? { role: "assistant", content: answer, sources } : { role: "assistant", content: answer });
      if (sources.length) addCitations(sources).scrollIntoView({ block: "end" });
    } else {
      bubble.remove();
    }
    chat.updated = Date.now();
    saveChats();
    controller = null;
    setBusy(false);
  }
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value;
  if (!text.trim() || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("new-chat").addEventListener("click", () => { currentId = null; currentChat(); render(); $("input").focus(); });
for (const id of Object.values(settingsFields)) $(id).addEventListener("input", saveSettings);
$("language").addEventListener("change", () => { saveSettings(); applyLanguage(); renderChatList(); });
$("api-key").addEventListener("change", fetchModel);

loadSettings();
render();
fetchModel();
