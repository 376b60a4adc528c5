// chat.js: the department chat page. /chat lists the session's departments; /chat/<dept> is a
// multi-turn chat that streams answers (server-sent events from /v1/chat/completions) with the
// answering prompt version and the cited sources. Model and document text is shown as text only.
import {
  ApiError, NetworkError, apiFetch, apiJson, clear, closeSession, describeError,
  el, getSession, isAbort, setText, submitKey, showOnly, streamError,
} from "./common.js";

const $ = (id) => document.getElementById(id);
const ui = {
  loading: $("loading"), loginView: $("login-view"), pickerView: $("picker-view"), chatView: $("chat-view"),
  keyForm: $("key-form"), keyInput: $("key-input"), keySubmit: $("key-submit"), keyError: $("key-error"),
  chatError: $("chat-error"), logout: $("logout"), deptList: $("dept-list"), deptName: $("dept-name"),
  log: $("log"), chatForm: $("chat-form"), message: $("message"), send: $("send"), stop: $("stop"),
  newChat: $("new-chat"),
};
const VIEWS = [ui.loading, ui.loginView, ui.pickerView, ui.chatView];

const MSG_EXPIRED = "Your key is not valid or your session expired — enter it again.";
const MSG_DROPPED = "The connection dropped before the answer finished.";

const state = {
  csrf: null, // from the session answer; kept only in this variable
  dept: departmentFromPath(location.pathname),
  history: [], // the finished turns, as OpenAI messages; replaced (not emptied) by "new conversation"
  controller: null, // the AbortController of the answer streaming now
};

/** The stream ended without `data: [DONE]`. */
class StreamCut extends Error {}

// ------------------------------------------------------------------------- page and views

function departmentFromPath(pathname) {
  const parts = pathname.split("/").filter(Boolean); // ["chat"] or ["chat", "hr"]
  if (parts[0] !== "chat" || parts.length < 2) return null;
  try {
    return decodeURIComponent(parts[1]);
  } catch {
    return parts[1];
  }
}

async function boot() {
  ui.keyForm.addEventListener("submit", onKeySubmit);
  ui.chatForm.addEventListener("submit", onChatSubmit);
  ui.message.addEventListener("keydown", onMessageKey);
  ui.stop.addEventListener("click", stopAnswer);
  ui.newChat.addEventListener("click", newConversation);
  ui.logout.addEventListener("click", onLogout);
  try {
    const session = await getSession("department");
    if (session) return enter(session);
  } catch (e) {
    setText(ui.chatError, describeError(e));
  }
  showLogin();
}

function showLogin() {
  state.csrf = null;
  ui.logout.hidden = true;
  showOnly(VIEWS, ui.loginView);
  ui.keyInput.focus();
}

function enter(session) {
  state.csrf = session.csrf;
  ui.logout.hidden = false;
  if (state.dept) showChat();
  else showPicker();
}

function showChat() {
  ui.deptName.textContent = state.dept;
  document.title = `${state.dept} — ragpt chat`;
  showOnly(VIEWS, ui.chatView);
  ui.message.focus();
}

// ---------------------------------------------------------------------------------- login

function onKeySubmit(event) {
  const form = { input: ui.keyInput, submit: ui.keySubmit, error: ui.keyError };
  return submitKey(event, "department", form, "Enter your department key.", (session) => {
    setText(ui.chatError, "");
    enter(session);
  });
}

async function onLogout() {
  stopAnswer();
  try {
    await closeSession("department", state.csrf);
  } catch (e) {
    setText(ui.chatError, describeError(e));
    return;
  }
  state.history = [];
  clear(ui.log);
  clear(ui.deptList);
  setText(ui.chatError, "");
  showLogin();
}

/** Any error of a request made with the session: 401 sends the user back to the key form. */
function showRequestError(e) {
  if (e instanceof ApiError && e.status === 401) {
    setText(ui.chatError, MSG_EXPIRED);
    showLogin();
    return;
  }
  setText(ui.chatError, describeError(e));
}

// ------------------------------------------------------------------------ department picker

async function showPicker() {
  document.title = "ragpt chat";
  showOnly(VIEWS, ui.pickerView);
  clear(ui.deptList);
  ui.deptList.append(el("li", { class: "muted", text: "Loading departments…" }));
  try {
    const body = await apiJson("/v1/models", { csrf: state.csrf });
    renderDepartments(Array.isArray(body && body.data) ? body.data : []);
  } catch (e) {
    clear(ui.deptList);
    showRequestError(e);
  }
}

function renderDepartments(models) {
  clear(ui.deptList);
  if (models.length === 0) {
    ui.deptList.append(el("li", { class: "muted", text: "No departments are available to this key." }));
    return;
  }
  for (const model of models) ui.deptList.append(departmentItem(model));
}

function departmentItem(model) {
  const id = String(model.id);
  const isAuto = id === "auto";
  const version = model.active_prompt_version;
  const note = isAuto ? "picks the department for each question"
    : `prompt ${version === null || version === undefined ? "none" : version}`;
  return el("li", { "data-dept": id },
    el("a", { href: `/chat/${encodeURIComponent(id)}`, "data-testid": "dept-link", text: id }),
    " ", el("span", { class: "muted", text: note }));
}

// -------------------------------------------------------------------------------- messages

function addUserMessage(text) {
  const article = el("article", { class: "msg user" },
    el("p", { class: "msg-who", text: "You" }),
    el("div", { class: "user-text", text }));
  ui.log.append(article);
  scrollToEnd();
}

/** An empty assistant message to stream into; returns its handles. */
function addAssistantMessage() {
  const textNode = document.createTextNode("");
  const answerEl = el("div", { class: "answer-text" }, textNode);
  const root = el("article", { class: "msg assistant streaming", "aria-busy": "true" },
    el("p", { class: "msg-who", text: "Assistant" }), answerEl);
  ui.log.append(root);
  scrollToEnd();
  return { root, answerEl, textNode, text: "", hasMeta: false, finish: null };
}

function appendAnswer(view, piece) {
  const follow = nearBottom(); // only follow the answer if the reader has not scrolled up
  view.text += piece;
  view.textNode.appendData(piece);
  if (follow) scrollToEnd();
}

function nearBottom() {
  return window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 80;
}

/** The page's end: the newest message with the message box below it. */
function scrollToEnd() {
  window.scrollTo(0, document.documentElement.scrollHeight);
}

/** The first chunk's department, prompt version and citations. */
function renderMeta(view, chunk) {
  view.hasMeta = true;
  const dept = chunk.department || state.dept;
  const version = chunk.prompt_version === null || chunk.prompt_version === undefined ? "none" : chunk.prompt_version;
  const meta = el("p", { class: "answer-meta", "data-testid": "prompt-version" },
    `answered by ${dept} · prompt ${version}`);
  const follow = nearBottom();
  view.root.append(meta, citationList(Array.isArray(chunk.citations) ? chunk.citations : []));
  if (follow) scrollToEnd();
}

function citationList(citations) {
  const wrap = el("div", { class: "sources" });
  const list = el("ol", { class: "citations" });
  for (const c of citations) list.append(citationItem(c));
  if (citations.length === 0) {
    list.hidden = true;
    wrap.append(el("p", { class: "muted small", text: "No sources cited." }), list);
  } else {
    wrap.append(el("p", { class: "sources-title", text: "Sources" }), list);
  }
  return wrap;
}

function citationItem(c) {
  const source = String(c.source ?? "");
  const title = c.title && c.title !== source ? String(c.title) : null;
  return el("li", { class: "citation" },
    title ? el("span", { class: "cite-title", text: title }) : null,
    title ? " " : null,
    el("span", { class: "cite-source", text: source }),
    " · ",
    el("span", { class: "cite-chunk", text: `chunk ${c.chunk ?? "?"}` }),
    c.snippet ? el("p", { class: "cite-snippet", text: String(c.snippet) }) : null);
}

/** End the message's streaming look, with an optional note such as "(stopped)". */
function finishMessage(view, note, failed = false) {
  view.root.classList.remove("streaming");
  view.root.removeAttribute("aria-busy");
  if (failed) view.root.classList.add("failed");
  // The note sits beside the answer text, so .answer-text stays exactly what the model wrote.
  if (note) view.answerEl.after(el("p", { class: "answer-status", text: note }));
}

// -------------------------------------------------------------------------------- sending

function onMessageKey(event) {
  if (event.key !== "Enter" || event.shiftKey || event.isComposing) return;
  event.preventDefault();
  ui.chatForm.requestSubmit();
}

async function onChatSubmit(event) {
  event.preventDefault();
  const text = ui.message.value.trim();
  if (state.controller || !text) return;
  setText(ui.chatError, "");
  ui.message.value = "";
  addUserMessage(text);
  const view = addAssistantMessage();
  const history = state.history; // a "new conversation" meanwhile starts a new array
  const messages = [...history, { role: "user", content: text }];
  const controller = new AbortController();
  setStreaming(controller);
  try {
    await streamAnswer(messages, view, controller.signal);
    finishMessage(view, view.finish === "length" ? "(cut off at the length limit)" : null);
    history.push({ role: "user", content: text }, { role: "assistant", content: view.text });
  } catch (e) {
    onSendError(e, view, text, history);
  } finally {
    setStreaming(null);
  }
}

function onSendError(e, view, text, history) {
  if (isAbort(e)) {
    finishMessage(view, "(stopped)");
    if (view.text) history.push({ role: "user", content: text }, { role: "assistant", content: view.text });
    return;
  }
  finishMessage(view, view.text ? "(incomplete)" : "(no answer)", true);
  if (!view.text && !ui.message.value) ui.message.value = text; // nothing was answered: offer it again
  if (e instanceof NetworkError || e instanceof StreamCut) setText(ui.chatError, MSG_DROPPED);
  else showRequestError(e);
}

function setStreaming(controller) {
  state.controller = controller;
  ui.stop.disabled = !controller;
  ui.send.disabled = Boolean(controller);
  if (!controller && !ui.chatView.hidden) ui.message.focus();
}

function stopAnswer() {
  if (state.controller) state.controller.abort();
}

function newConversation() {
  stopAnswer();
  state.history = [];
  clear(ui.log);
  setText(ui.chatError, "");
  ui.message.focus();
}

// ------------------------------------------------------------------------------ streaming

/** POST the conversation and stream the answer into `view`; resolves after `data: [DONE]`. */
async function streamAnswer(messages, view, signal) {
  const response = await apiFetch("/v1/chat/completions", {
    method: "POST",
    body: { model: state.dept, messages, stream: true },
    csrf: state.csrf,
    signal,
    accept: "text/event-stream",
  });
  if (!(response.headers.get("Content-Type") || "").includes("text/event-stream") || !response.body) {
    return applyCompletion(await response.json(), view); // the server did not stream: one JSON answer
  }
  const reader = response.body.getReader();
  let done = false;
  try {
    done = await readEvents(reader, (chunk) => applyChunk(chunk, view));
  } finally {
    if (!done) reader.cancel().catch(() => {});
  }
  if (!done) throw new StreamCut();
}

/** Feed each `data:` JSON of the stream to `onChunk`; true once `data: [DONE]` arrived. */
async function readEvents(reader, onChunk) {
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    let part;
    try {
      part = await reader.read();
    } catch (e) {
      if (isAbort(e)) throw e;
      throw new StreamCut();
    }
    if (part.done) return false;
    buffer += decoder.decode(part.value, { stream: true });
    const lines = buffer.split("\n");
    buffer = lines.pop(); // a partial line waits for the rest
    for (const line of lines) {
      const payload = dataOf(line);
      if (payload === null) continue;
      if (payload === "[DONE]") return true;
      const chunk = parseJson(payload);
      if (chunk) onChunk(chunk);
    }
  }
}

/** The payload of a `data:` line, or null for blank lines, comments and other fields. */
function dataOf(line) {
  const text = line.endsWith("\r") ? line.slice(0, -1) : line;
  if (!text.startsWith("data:")) return null;
  return text.slice(5).trim();
}

function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return null; // not ours to show; the next chunk may still be fine
  }
}

function applyChunk(chunk, view) {
  if (chunk.error) throw streamError(chunk.error);
  if (!view.hasMeta && ("department" in chunk || "citations" in chunk || "prompt_version" in chunk)) {
    renderMeta(view, chunk);
  }
  const choice = Array.isArray(chunk.choices) ? chunk.choices[0] : null;
  if (!choice) return;
  const piece = choice.delta && choice.delta.content;
  if (typeof piece === "string" && piece) appendAnswer(view, piece);
  if (choice.finish_reason) view.finish = choice.finish_reason;
}

function applyCompletion(body, view) {
  if (body && body.error) throw streamError(body.error);
  renderMeta(view, body || {});
  const choice = body && Array.isArray(body.choices) ? body.choices[0] : null;
  const content = choice && choice.message ? choice.message.content : "";
  if (typeof content === "string") appendAnswer(view, content);
  view.finish = choice ? choice.finish_reason : null;
}

boot();
