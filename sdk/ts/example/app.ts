// The browser demo: sign up or log in, open a direct conversation with another
// user, send and receive. "Go offline" closes the socket; "Go online" reconnects
// and resumes, showing what was missed exactly once.
import { ConfabClient, directConversationId, type ChatMessage } from "../src/index.js";

/** What the page shows of a message. */
type Shown = Pick<ChatMessage, "conversationId" | "seq" | "body" | "own">;

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;
const params = new URLSearchParams(location.search);
$<HTMLInputElement>("server").value = params.get("server") ?? `ws://${location.hostname || "127.0.0.1"}:7380/v1/ws`;

let client: ConfabClient | undefined;
let conversationId: string | undefined;
let peerId: bigint | undefined;
const shown = new Set<string>();

function showError(error: unknown): void {
  $("error").textContent = error instanceof Error ? error.message : String(error);
}

function connect(): ConfabClient {
  if (client) return client;
  client = new ConfabClient({ url: $<HTMLInputElement>("server").value, deviceName: "browser demo" });
  client.onStatus((status) => {
    $("status").textContent = status;
    $("status").dataset.status = status;
  });
  client.onMessage(show);
  return client;
}

function show(message: Shown): void {
  if (message.conversationId !== conversationId) return;
  const key = `${message.conversationId}/${message.seq}`;
  if (shown.has(key)) return;
  shown.add(key);
  const item = document.createElement("li");
  item.dataset.seq = String(message.seq);
  item.className = message.own ? "own" : "";
  const seq = document.createElement("span");
  seq.className = "seq";
  seq.textContent = `#${message.seq}`;
  const body = document.createElement("span");
  body.className = "body";
  body.textContent = message.body;
  item.append(seq, body);
  // Keep seq order even if an own ack lands after a later push.
  const after = [...$("messages").children].find((li) => BigInt((li as HTMLElement).dataset.seq ?? 0) > message.seq);
  $("messages").insertBefore(item, after ?? null);
  item.scrollIntoView({ block: "nearest" });
}

$("signup").onclick = async () => {
  try {
    await connect().signUp($<HTMLInputElement>("username").value, $<HTMLInputElement>("password").value);
    $("error").textContent = "signed up; now log in";
  } catch (error) {
    showError(error);
  }
};

$("login").onclick = async () => {
  try {
    await connect().logIn($<HTMLInputElement>("username").value, $<HTMLInputElement>("password").value);
    $<HTMLFieldSetElement>("account").disabled = true;
    $<HTMLFieldSetElement>("chat").disabled = false;
    $("error").textContent = "";
  } catch (error) {
    showError(error);
  }
};

$("open").onclick = async () => {
  if (!client?.identity) return;
  try {
    const peer = await client.user($<HTMLInputElement>("peer").value);
    peerId = peer.userId;
    conversationId = directConversationId(client.identity.userId, peer.userId);
    $("conversation").textContent = `with ${peer.username}`;
    $("messages").replaceChildren();
    shown.clear();
    const page = await client.history(conversationId, { limit: 50 });
    for (const message of page.messages) {
      show({ ...message, own: message.senderUserId === client.identity.userId });
    }
  } catch (error) {
    showError(error);
  }
};

$<HTMLFormElement>("compose").onsubmit = async (event) => {
  event.preventDefault();
  if (!client || peerId === undefined) return;
  const input = $<HTMLInputElement>("body");
  const body = input.value.trim();
  if (!body) return;
  input.value = "";
  try {
    const ack = await client.send({ userId: peerId }, body);
    show({ conversationId: ack.conversationId, seq: ack.seq, body, own: true });
  } catch (error) {
    showError(error);
  }
};

$("offline").onclick = () => client?.goOffline();
$("online").onclick = () => client?.goOnline();
