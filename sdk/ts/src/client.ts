/**
 * The confab client over WebSocket: one binary WebSocket message per protobuf
 * frame (docs/PROTOCOL.md). It keeps a session alive across network trouble:
 *
 * - reconnects with exponential backoff and full jitter (or after the delay a
 *   `GoingAway` names), to the next of its server URLs when it has several
 *   (the nodes of a cluster), and resumes from its per-conversation cursors, so the
 *   server replays exactly what was missed; `Sync` fetches the rest when the
 *   replay was cut short;
 * - drops duplicates (a replay may repeat what a live push delivered);
 * - keeps every unacknowledged send in an outbox and retries it with the same
 *   `client_msg_id` after a reconnect, so a message is stored once however often
 *   it is retried.
 */
import { create, fromBinary, toBinary, type MessageInitShape } from "@bufbuild/protobuf";
import {
  ClientFrameSchema,
  ErrorCode,
  ProtocolVersion,
  type PushPlatform,
  ServerFrameSchema,
  type ConversationList,
  type HistoryPage,
  type Message as WireMessage,
  type Receipt,
  type SendAck,
  type ServerFrame,
  type Tokens,
  type TypingUpdate,
  type Welcome,
} from "./gen/confab/v1/frames_pb.js";
import { Backoff, type BackoffOptions, DEFAULT_BACKOFF } from "./backoff.js";
import { Seen } from "./seen.js";

/** Where a message goes: an existing conversation, or the direct conversation with a user. */
export type Target = { conversationId: string } | { userId: bigint };

/** A message as the application sees it. */
export interface ChatMessage {
  conversationId: string;
  seq: bigint;
  senderUserId: bigint;
  body: string;
  serverTimeMs: bigint;
  clientMsgId: string;
  /** Sent by this user (from this or another of its devices). */
  own: boolean;
  /** The full wire message (group events, edits, deletes). */
  wire: WireMessage;
}

export type Status = "disconnected" | "connecting" | "online" | "reconnecting" | "offline";

export interface Identity {
  userId: bigint;
  deviceId: bigint;
  username: string;
  /** The name to show; empty: show `username`. */
  displayName: string;
}

/** A failed request: the server's error code, or `closed` / `timeout`. */
export class ConfabError extends Error {
  constructor(
    readonly code: ErrorCode | "closed" | "timeout",
    message: string,
  ) {
    super(message);
    this.name = "ConfabError";
  }
}

/** The subset of the WebSocket API the client uses (browsers' and Node 22's global). */
export interface WebSocketLike {
  binaryType: string;
  send(data: Uint8Array): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code?: number; reason?: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
}

export type WebSocketFactory = (url: string) => WebSocketLike;

export interface ClientOptions {
  /**
   * e.g. `ws://127.0.0.1:7380/v1/ws` or `wss://chat.example.com/v1/ws`; or the
   * URLs of several nodes of a cluster: the client starts at a random one and,
   * whenever its connection ends, reconnects to the next.
   */
  url: string | readonly string[];
  deviceName?: string;
  clientName?: string;
  /** Defaults to the global `WebSocket`. */
  webSocket?: WebSocketFactory;
  backoff?: BackoffOptions;
  /** A request without a reply for this long counts the connection as dead. */
  requestTimeoutMs?: number;
}

type Kind = NonNullable<ServerFrame["kind"]["case"]>;
type Reply<K extends Kind> = Extract<ServerFrame["kind"], { case: K }>["value"];
type RequestKind = NonNullable<MessageInitShape<typeof ClientFrameSchema>["kind"]>;

interface Pending {
  resolve(kind: ServerFrame["kind"]): void;
  reject(error: ConfabError): void;
  timer: ReturnType<typeof setTimeout>;
}

interface Outgoing {
  clientMsgId: string;
  target: Target;
  body: string;
  inFlight: boolean;
  resolve(ack: SendAck): void;
  reject(error: ConfabError): void;
}

const DEFAULT_REQUEST_TIMEOUT_MS = 15_000;
/** Delay before retrying sends the server refused as overloaded. */
const UNAVAILABLE_RETRY_MS = 500;
/** Errors after which a send is retried rather than given up. */
const RETRIED: ReadonlySet<ErrorCode | "closed" | "timeout"> = new Set([
  "closed",
  "timeout",
  ErrorCode.UNAVAILABLE,
  ErrorCode.INTERNAL,
]);

export class ConfabClient {
  private readonly options: Required<Omit<ClientOptions, "webSocket" | "url">> & { webSocket: WebSocketFactory };
  private readonly urls: readonly string[];
  /** Index in `urls` of the next connection. */
  private nextUrl: number;
  private socket?: WebSocketLike;
  /** Resolves once the current socket said Hello (and authenticated, if it could). */
  private connecting?: Promise<void>;
  private nextRequestId = 1n;
  private readonly pending = new Map<bigint, Pending>();
  private readonly outbox: Outgoing[] = [];
  private readonly seen = new Seen();
  private syncToken = "";
  private tokens?: Tokens;
  /** With `signInWithToken`: where fresh tokens of the app's sign-in come from. */
  private tokenSource?: () => Promise<string>;
  /** When the app's token in use expires (ms since the epoch; 0: unknown). */
  private appTokenExpiresAtMs = 0;
  private me?: Identity;
  private wantOnline = false;
  private currentStatus: Status = "disconnected";
  private readonly backoff: Backoff;
  private reconnectTimer?: ReturnType<typeof setTimeout>;
  private heartbeatTimer?: ReturnType<typeof setInterval>;
  private renewTimer?: ReturnType<typeof setTimeout>;
  private goingAwayDelayMs?: number;
  private readonly listeners = {
    message: new Set<(message: ChatMessage) => void>(),
    status: new Set<(status: Status) => void>(),
    typing: new Set<(update: TypingUpdate) => void>(),
    receipt: new Set<(receipt: Receipt) => void>(),
  };

  constructor(options: ClientOptions) {
    const webSocket =
      options.webSocket ??
      ((url: string) => {
        const Native = (globalThis as { WebSocket?: new (url: string) => WebSocketLike }).WebSocket;
        if (!Native) throw new Error("no global WebSocket; pass options.webSocket");
        return new Native(url);
      });
    this.urls = typeof options.url === "string" ? [options.url] : [...options.url];
    if (this.urls.length === 0) throw new Error("options.url: give at least one URL");
    this.nextUrl = Math.floor(Math.random() * this.urls.length);
    this.options = {
      deviceName: options.deviceName ?? "web",
      clientName: options.clientName ?? "@confab/client",
      webSocket,
      backoff: options.backoff ?? DEFAULT_BACKOFF,
      requestTimeoutMs: options.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS,
    };
    this.backoff = new Backoff(this.options.backoff);
  }

  // ---- events ----

  /** Every new message, once, in seq order per conversation. Returns an unsubscribe function. */
  onMessage(listener: (message: ChatMessage) => void): () => void {
    return subscribe(this.listeners.message, listener);
  }

  onStatus(listener: (status: Status) => void): () => void {
    return subscribe(this.listeners.status, listener);
  }

  onTyping(listener: (update: TypingUpdate) => void): () => void {
    return subscribe(this.listeners.typing, listener);
  }

  onReceipt(listener: (receipt: Receipt) => void): () => void {
    return subscribe(this.listeners.receipt, listener);
  }

  get status(): Status {
    return this.currentStatus;
  }

  get identity(): Identity | undefined {
    return this.me;
  }

  /** Sends not yet acknowledged. */
  get unacknowledged(): number {
    return this.outbox.length;
  }

  // ---- connection ----

  /**
   * Opens the WebSocket and completes the protocol handshake. Optional: the
   * first request connects by itself.
   */
  async connect(): Promise<void> {
    await this.ensureSocket();
  }

  // ---- accounts ----

  /** Creates an account; returns the new user's id. */
  async signUp(username: string, password: string): Promise<bigint> {
    await this.ensureSocket();
    return (await this.call("signedUp", { case: "signUp", value: { username, password } })).userId;
  }

  /** Logs this device in, authenticates, and stays online (reconnecting as needed). */
  async logIn(username: string, password: string): Promise<Identity> {
    await this.ensureSocket();
    const loggedIn = await this.call("loggedIn", {
      case: "logIn",
      value: { username, password, deviceName: this.options.deviceName },
    });
    this.tokens = loggedIn.tokens;
    await this.authenticate(false);
    await this.startFromNow();
    this.wantOnline = true;
    this.online();
    return this.me as Identity;
  }

  /**
   * Signs in with tokens of the app's own sign-in (a JWT; the server's
   * `auth.mode` is "jwt" or "both") and stays online. `token` is asked for a
   * fresh token at every (re)connect and shortly before the one in use expires;
   * the device is `options.deviceName` unless the token names one.
   */
  async signInWithToken(token: () => Promise<string>): Promise<Identity> {
    this.tokenSource = token;
    await this.ensureSocket();
    await this.authenticate(false);
    await this.startFromNow();
    this.wantOnline = true;
    this.online();
    return this.me as Identity;
  }

  /** The user named `username`. */
  async user(username: string): Promise<{ userId: bigint; username: string; displayName: string }> {
    return this.call("user", { case: "getUser", value: { username } });
  }

  // ---- messages ----

  /**
   * Sends `body`; resolves with the acknowledgement once the message is durable.
   * While offline the send waits in the outbox and goes out (with the same
   * `client_msg_id`) after the next reconnect.
   */
  send(target: Target, body: string, clientMsgId: string = randomId()): Promise<SendAck> {
    return new Promise<SendAck>((resolve, reject) => {
      const outgoing: Outgoing = { clientMsgId, target, body, inFlight: false, resolve, reject };
      this.outbox.push(outgoing);
      if (this.currentStatus === "online") this.transmit(outgoing);
    });
  }

  /** One page of a conversation, ascending by seq. */
  async history(
    conversationId: string,
    page: { beforeSeq?: bigint; afterSeq?: bigint; limit?: number } = {},
  ): Promise<HistoryPage> {
    return this.call("historyPage", {
      case: "history",
      value: {
        conversation: { target: { case: "conversationId", value: conversationId } },
        beforeSeq: page.beforeSeq,
        afterSeq: page.afterSeq,
        limit: page.limit ?? 0,
      },
    });
  }

  /** Fetches every message this device has not seen, across conversations, and emits them. */
  async sync(): Promise<void> {
    for (;;) {
      const result = await this.call("syncResult", {
        case: "sync",
        value: { syncToken: this.syncToken, cursors: this.seen.cursors(), limit: 0 },
      });
      for (const conversation of result.conversations) {
        for (const message of conversation.messages) this.deliver(message);
      }
      this.syncToken = result.syncToken;
      if (!result.hasMore) return;
    }
  }

  async listConversations(pageToken = "", limit = 0): Promise<ConversationList> {
    return this.call("conversationList", { case: "listConversations", value: { pageToken, limit } });
  }

  /** Marks everything up to `seq` read (for all of this user's devices). */
  async markRead(conversationId: string, seq: bigint): Promise<Receipt> {
    return this.call("receipt", { case: "markRead", value: { conversationId, seq } });
  }

  async typing(conversationId: string, typing: boolean): Promise<void> {
    await this.call("done", { case: "typing", value: { conversationId, typing } });
  }

  /**
   * Where this device is reached while it has no connection (the token from
   * FCM, APNs or Web Push); an empty token removes it. See docs/PUSH.md.
   */
  async registerPushToken(platform: PushPlatform, token: string): Promise<void> {
    await this.call("done", { case: "registerPushToken", value: { platform, token } });
  }

  /** Keeps a conversation's text out of this user's push notifications (or lets it back). */
  async muteConversation(conversationId: string, muted: boolean): Promise<void> {
    await this.call("done", { case: "muteConversation", value: { conversationId, muted } });
  }

  // ---- connection control ----

  /** Closes the connection and stays offline until `goOnline` (sends wait in the outbox). */
  goOffline(): void {
    this.wantOnline = false;
    clearTimeout(this.reconnectTimer);
    this.socket?.close(1000, "going offline");
    this.setStatus("offline");
  }

  /** Reconnects now and resumes. */
  goOnline(): void {
    if (!this.tokens && !this.tokenSource) throw new Error("log in first");
    this.wantOnline = true;
    clearTimeout(this.reconnectTimer);
    if (!this.socket) this.reconnect();
  }

  /** Ends the session for good: pending requests and sends fail with `closed`. */
  close(): void {
    this.goOffline();
    for (const outgoing of this.outbox.splice(0)) outgoing.reject(new ConfabError("closed", "client closed"));
    this.setStatus("disconnected");
  }

  // ---- internals ----

  private setStatus(status: Status): void {
    if (status === this.currentStatus) return;
    this.currentStatus = status;
    for (const listener of this.listeners.status) listener(status);
  }

  /** Opens a socket and says Hello, unless one is open or opening. */
  private ensureSocket(): Promise<void> {
    if (!this.connecting) {
      this.connecting = this.openSocket();
      this.connecting.catch(() => undefined);
    }
    return this.connecting;
  }

  private openSocket(): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const socket = this.options.webSocket(this.urls[this.nextUrl]);
      socket.binaryType = "arraybuffer";
      this.socket = socket;
      socket.onopen = () => {
        this.call("welcome", {
          case: "hello",
          value: {
            protocolVersion: ProtocolVersion.V1,
            clientName: this.options.clientName,
            clientVersion: "0.1.0",
          },
        }).then((welcome: Welcome) => {
          this.startHeartbeat(welcome.limits?.heartbeatIntervalMs ?? 0);
          resolve();
        }, reject);
      };
      socket.onmessage = (event) => this.onBytes(event.data);
      socket.onerror = () => undefined; // a close follows
      socket.onclose = () => {
        reject(new ConfabError("closed", "connection closed"));
        if (this.socket === socket) this.onClosed();
      };
    });
  }

  private onClosed(): void {
    // The node may be gone or draining: the next connection tries another.
    this.nextUrl = (this.nextUrl + 1) % this.urls.length;
    this.socket = undefined;
    this.connecting = undefined;
    clearInterval(this.heartbeatTimer);
    clearTimeout(this.renewTimer);
    for (const [id, pending] of this.pending) {
      clearTimeout(pending.timer);
      this.pending.delete(id);
      pending.reject(new ConfabError("closed", "connection closed"));
    }
    if (this.wantOnline) {
      const delay = this.goingAwayDelayMs ?? this.backoff.next();
      this.goingAwayDelayMs = undefined;
      this.setStatus("reconnecting");
      clearTimeout(this.reconnectTimer);
      this.reconnectTimer = setTimeout(() => this.reconnect(), delay);
    } else if (this.currentStatus !== "offline") {
      this.setStatus("disconnected");
    }
  }

  /** Reconnects, resumes where the cursors stand, catches up, flushes the outbox. */
  private reconnect(): void {
    this.setStatus((this.tokens || this.tokenSource) && this.me ? "reconnecting" : "connecting");
    const attempt = async () => {
      await this.ensureSocket();
      const authenticated = await this.authenticate(true);
      if (!authenticated.recovered) await this.sync();
      this.online();
    };
    attempt().catch((error: ConfabError) => {
      if (error.code === ErrorCode.UNAUTHENTICATED) {
        // The device was logged out or its tokens are gone: stop trying.
        this.wantOnline = false;
        this.socket?.close(1000, "unauthenticated");
        this.setStatus("disconnected");
      } else {
        // A failure with the socket still open: close it, which schedules a retry.
        this.socket?.close(1000, "retrying");
      }
    });
  }

  private online(): void {
    this.backoff.reset();
    this.setStatus("online");
    for (const outgoing of this.outbox) {
      if (!outgoing.inFlight) this.transmit(outgoing);
    }
  }

  /** Authenticates the open socket; with `resume`, the server first replays what was missed. */
  private async authenticate(resume: boolean) {
    const request = (accessToken: string) =>
      this.call("authenticated", {
        case: "authenticate",
        value: {
          accessToken,
          resume: resume ? { syncToken: this.syncToken, cursors: this.seen.cursors() } : undefined,
          device: this.tokenSource ? this.options.deviceName : "",
        },
      });
    let authenticated;
    const tokens = this.tokens;
    if (this.tokenSource) {
      const appToken = await this.tokenSource();
      this.appTokenExpiresAtMs = expiryOf(appToken);
      authenticated = await request(appToken);
    } else if (!tokens) {
      throw new ConfabError(ErrorCode.UNAUTHENTICATED, "not logged in");
    } else {
      try {
        authenticated = await request(tokens.accessToken);
      } catch (error) {
        if (!(error instanceof ConfabError) || error.code !== ErrorCode.UNAUTHENTICATED || !tokens.refreshToken) {
          throw error;
        }
        // The access token expired: trade the refresh token for new ones and retry.
        const refreshed = await this.call("loggedIn", {
          case: "refreshToken",
          value: { refreshToken: tokens.refreshToken },
        });
        this.tokens = refreshed.tokens;
        authenticated = await request(refreshed.tokens?.accessToken ?? "");
      }
    }
    this.me = {
      userId: authenticated.userId,
      deviceId: authenticated.deviceId,
      username: authenticated.username,
      displayName: authenticated.displayName,
    };
    if (authenticated.syncToken) this.syncToken = authenticated.syncToken;
    this.scheduleRenewal();
    return authenticated;
  }

  /**
   * The server closes a connection when its access token expires, unless the
   * connection authenticates again with a refreshed one: do that a minute (or a
   * tenth of the token's life) before. A failure leaves it to the reconnect path.
   */
  private scheduleRenewal(): void {
    clearTimeout(this.renewTimer);
    const expiresAt = this.tokenSource ? this.appTokenExpiresAtMs : Number(this.tokens?.accessExpiresAtMs ?? 0n);
    if (!expiresAt || (!this.tokenSource && !this.tokens?.refreshToken)) return;
    const left = expiresAt - Date.now();
    const delay = Math.max(0, left - Math.min(60_000, left / 10));
    this.renewTimer = setTimeout(() => {
      this.renew().catch(() => {});
    }, delay);
  }

  private async renew(): Promise<void> {
    if (this.tokenSource) {
      if (!this.socket) return;
      const appToken = await this.tokenSource();
      this.appTokenExpiresAtMs = expiryOf(appToken);
      await this.call("authenticated", {
        case: "authenticate",
        value: { accessToken: appToken, device: this.options.deviceName },
      });
      this.scheduleRenewal();
      return;
    }
    const refreshToken = this.tokens?.refreshToken;
    if (!refreshToken || !this.socket) return;
    const refreshed = await this.call("loggedIn", { case: "refreshToken", value: { refreshToken } });
    this.tokens = refreshed.tokens;
    await this.call("authenticated", {
      case: "authenticate",
      value: { accessToken: refreshed.tokens?.accessToken ?? "" },
    });
    this.scheduleRenewal();
  }

  /** A new device starts at each conversation's head: history is fetched on demand. */
  private async startFromNow(): Promise<void> {
    let pageToken = "";
    do {
      const page = await this.listConversations(pageToken);
      for (const conversation of page.conversations) {
        this.seen.advanceTo(conversation.conversationId, conversation.lastSeq);
      }
      pageToken = page.nextPageToken;
    } while (pageToken);
  }

  private transmit(outgoing: Outgoing): void {
    outgoing.inFlight = true;
    const conversation =
      "conversationId" in outgoing.target
        ? { target: { case: "conversationId" as const, value: outgoing.target.conversationId } }
        : { target: { case: "directUserId" as const, value: outgoing.target.userId } };
    this.call("sendAck", {
      case: "send",
      value: { conversation, clientMsgId: outgoing.clientMsgId, body: outgoing.body },
    }).then(
      (ack) => {
        this.outbox.splice(this.outbox.indexOf(outgoing), 1);
        this.seen.add(ack.conversationId, ack.seq);
        outgoing.resolve(ack);
      },
      (error: ConfabError) => {
        outgoing.inFlight = false;
        if (!RETRIED.has(error.code)) {
          this.outbox.splice(this.outbox.indexOf(outgoing), 1);
          outgoing.reject(error);
        } else if (error.code !== "closed" && error.code !== "timeout") {
          setTimeout(() => {
            if (this.currentStatus === "online" && !outgoing.inFlight && this.outbox.includes(outgoing)) {
              this.transmit(outgoing);
            }
          }, UNAVAILABLE_RETRY_MS);
        }
      },
    );
  }

  /** Sends a request and resolves with its reply of kind `expected`. */
  private call<K extends Kind>(expected: K, kind: RequestKind): Promise<Reply<K>> {
    return new Promise<Reply<K>>((resolve, reject) => {
      const socket = this.socket;
      if (!socket) {
        reject(new ConfabError("closed", "not connected"));
        return;
      }
      const requestId = this.nextRequestId++;
      const timer = setTimeout(() => {
        this.pending.delete(requestId);
        reject(new ConfabError("timeout", `no reply to ${kind.case} in time`));
        socket.close(1000, "request timed out");
      }, this.options.requestTimeoutMs);
      this.pending.set(requestId, {
        timer,
        reject,
        resolve: (reply) => {
          if (reply.case === expected) (resolve as (value: unknown) => void)(reply.value);
          else reject(new ConfabError(ErrorCode.UNSPECIFIED, `unexpected reply ${reply.case} to ${kind.case}`));
        },
      });
      socket.send(toBinary(ClientFrameSchema, create(ClientFrameSchema, { requestId, kind })));
    });
  }

  private onBytes(data: unknown): void {
    let frame: ServerFrame;
    try {
      const bytes = data instanceof ArrayBuffer ? new Uint8Array(data) : (data as Uint8Array);
      frame = fromBinary(ServerFrameSchema, bytes);
    } catch {
      this.socket?.close(1002, "undecodable frame");
      return;
    }
    if (frame.requestId !== 0n) {
      const pending = this.pending.get(frame.requestId);
      if (!pending) return;
      this.pending.delete(frame.requestId);
      clearTimeout(pending.timer);
      if (frame.kind.case === "error") {
        pending.reject(new ConfabError(frame.kind.value.code, frame.kind.value.message));
      } else {
        pending.resolve(frame.kind);
      }
      return;
    }
    switch (frame.kind.case) {
      case "message":
        this.deliver(frame.kind.value);
        break;
      case "typingUpdate":
        for (const listener of this.listeners.typing) listener(frame.kind.value);
        break;
      case "receipt":
        for (const listener of this.listeners.receipt) listener(frame.kind.value);
        break;
      case "goingAway":
        this.goingAwayDelayMs = frame.kind.value.reconnectAfterMs;
        break;
      default:
        break;
    }
  }

  private deliver(message: WireMessage): void {
    if (!this.seen.add(message.conversationId, message.seq, true)) return;
    const chat: ChatMessage = {
      conversationId: message.conversationId,
      seq: message.seq,
      senderUserId: message.senderUserId,
      body: message.body,
      serverTimeMs: message.serverTimeMs,
      clientMsgId: message.clientMsgId,
      own: message.senderUserId === this.me?.userId,
      wire: message,
    };
    for (const listener of this.listeners.message) listener(chat);
  }

  private startHeartbeat(intervalMs: number): void {
    clearInterval(this.heartbeatTimer);
    if (intervalMs <= 0) return;
    this.heartbeatTimer = setInterval(() => {
      const ping = create(ClientFrameSchema, { requestId: 0n, kind: { case: "ping", value: { nonce: 0n } } });
      this.socket?.send(toBinary(ClientFrameSchema, ping));
    }, intervalMs);
  }
}

/** The id of the direct conversation between two users (`d:<low>:<high>`). */
export function directConversationId(a: bigint, b: bigint): string {
  return a < b ? `d:${a}:${b}` : `d:${b}:${a}`;
}

function subscribe<T>(set: Set<T>, listener: T): () => void {
  set.add(listener);
  return () => set.delete(listener);
}

function randomId(): string {
  const crypto = (globalThis as { crypto?: { randomUUID?: () => string } }).crypto;
  if (crypto?.randomUUID) return crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}-${Math.random().toString(36).slice(2)}`;
}

/** A JWT's `exp` in ms since the epoch; 0 when it has none or is not a JWT. */
function expiryOf(token: string): number {
  try {
    const payload = token.split(".")[1] ?? "";
    const json = atob(payload.replace(/-/g, "+").replace(/_/g, "/"));
    const exp = (JSON.parse(json) as { exp?: unknown }).exp;
    return typeof exp === "number" ? exp * 1000 : 0;
  } catch {
    return 0;
  }
}
