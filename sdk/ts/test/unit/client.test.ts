// The client against a scripted in-process server: handshake, login, sends,
// going offline with sends pending, resume without duplicates, retry with the
// same client_msg_id.
import { test } from "node:test";
import assert from "node:assert/strict";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { ConfabClient, proto } from "../../src/index.js";
import type { WebSocketLike } from "../../src/index.js";

type ServerKind = proto.ServerFrame["kind"];

/** A fake server: answers frames the way confab does, for one user. */
class Server {
  sockets: Socket[] = [];
  stored = new Map<string, bigint>(); // client_msg_id -> seq (the server's idempotency)
  conversation = "d:1:2";
  nextSeq = 1n;
  resumes: proto.Resume[] = [];
  sendAttempts: string[] = [];
  /** Messages the next resume replays. */
  replay: proto.Message[] = [];
  refreshes: string[] = [];
  /** Push tokens and mutes, as sent. */
  settings: proto.ClientFrame["kind"][] = [];
  authentications: { socket: Socket; accessToken: string; device: string }[] = [];
  /** How long the access tokens it hands out last (0: no expiry given). */
  accessTtlMs = 0;

  tokens(accessToken: string) {
    const accessExpiresAtMs = this.accessTtlMs ? BigInt(Date.now() + this.accessTtlMs) : 0n;
    return { accessToken, accessExpiresAtMs, refreshToken: `refresh-${this.refreshes.length}` };
  }

  factory = (url: string): WebSocketLike => {
    const socket = new Socket(this, url);
    this.sockets.push(socket);
    return socket;
  };

  reply(socket: Socket, requestId: bigint, kind: ServerKind): void {
    socket.push(create(proto.ServerFrameSchema, { requestId, kind }));
  }

  handle(socket: Socket, frame: proto.ClientFrame): void {
    const { requestId, kind } = frame;
    switch (kind.case) {
      case "hello":
        return this.reply(socket, requestId, {
          case: "welcome",
          value: create(proto.WelcomeSchema, {
            protocolVersion: proto.ProtocolVersion.V1,
            limits: { heartbeatIntervalMs: 0 },
          }),
        });
      case "logIn":
        return this.reply(socket, requestId, {
          case: "loggedIn",
          value: create(proto.LoggedInSchema, { userId: 1n, deviceId: 7n, tokens: this.tokens("access") }),
        });
      case "refreshToken":
        this.refreshes.push(kind.value.refreshToken);
        return this.reply(socket, requestId, {
          case: "loggedIn",
          value: create(proto.LoggedInSchema, {
            userId: 1n,
            deviceId: 7n,
            tokens: this.tokens(`access-${this.refreshes.length}`),
          }),
        });
      case "registerPushToken":
      case "muteConversation":
        this.settings.push(kind);
        return this.reply(socket, requestId, { case: "done", value: create(proto.DoneSchema, {}) });
      case "authenticate": {
        this.authentications.push({ socket, accessToken: kind.value.accessToken, device: kind.value.device });
        if (kind.value.resume) this.resumes.push(kind.value.resume);
        for (const message of kind.value.resume ? this.replay : []) {
          this.reply(socket, 0n, { case: "message", value: message });
        }
        this.replay = [];
        return this.reply(socket, requestId, {
          case: "authenticated",
          value: create(proto.AuthenticatedSchema, {
            userId: 1n,
            deviceId: 7n,
            username: "me",
            displayName: "Me Myself",
            recovered: true,
            syncToken: "s1.token",
          }),
        });
      }
      case "listConversations":
        return this.reply(socket, requestId, {
          case: "conversationList",
          value: create(proto.ConversationListSchema, {}),
        });
      case "send": {
        this.sendAttempts.push(kind.value.clientMsgId);
        if (socket.dropSends) return; // the connection dies before the ack
        let seq = this.stored.get(kind.value.clientMsgId);
        if (seq === undefined) {
          seq = this.nextSeq++;
          this.stored.set(kind.value.clientMsgId, seq);
        }
        return this.reply(socket, requestId, {
          case: "sendAck",
          value: create(proto.SendAckSchema, {
            conversationId: this.conversation,
            seq,
            clientMsgId: kind.value.clientMsgId,
          }),
        });
      }
      default:
        throw new Error(`unexpected ${kind.case}`);
    }
  }

  /** A message from user 2, sequenced now. */
  incoming(body: string): proto.Message {
    return create(proto.MessageSchema, {
      conversationId: this.conversation,
      seq: this.nextSeq++,
      senderUserId: 2n,
      body,
    });
  }

  get current(): Socket {
    const socket = this.sockets.at(-1);
    assert.ok(socket, "no connection yet");
    return socket;
  }
}

class Socket implements WebSocketLike {
  binaryType = "blob";
  onopen: WebSocketLike["onopen"] = null;
  onmessage: WebSocketLike["onmessage"] = null;
  onclose: WebSocketLike["onclose"] = null;
  onerror: WebSocketLike["onerror"] = null;
  closed = false;
  dropSends = false;

  constructor(
    readonly server: Server,
    readonly url: string,
  ) {
    setTimeout(() => this.onopen?.({}), 0);
  }

  send(bytes: Uint8Array): void {
    assert.equal(this.closed, false, "sent on a closed socket");
    this.server.handle(this, fromBinary(proto.ClientFrameSchema, bytes));
  }

  push(frame: proto.ServerFrame): void {
    const bytes = toBinary(proto.ServerFrameSchema, frame);
    setTimeout(() => !this.closed && this.onmessage?.({ data: bytes.slice().buffer }), 0);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    setTimeout(() => this.onclose?.({ code: 1000 }), 0);
  }
}

async function until(check: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + 5000;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

function client(server: Server): ConfabClient {
  return new ConfabClient({
    url: "ws://test/v1/ws",
    webSocket: server.factory,
    backoff: { initialDelayMs: 10, maxDelayMs: 20 },
  });
}

test("logs in, sends, and receives pushes once", async () => {
  const server = new Server();
  const chat = client(server);
  const received: string[] = [];
  chat.onMessage((message) => received.push(message.body));
  await chat.connect();
  assert.equal(server.sockets.length, 1);
  const me = await chat.logIn("me", "pw");
  assert.equal(server.sockets.length, 1, "logIn reuses the open connection");
  assert.equal(me.userId, 1n);
  assert.equal(chat.status, "online");
  const ack = await chat.send({ userId: 2n }, "hello");
  assert.equal(ack.seq, 1n);
  const push = server.incoming("hi back");
  server.reply(server.current, 0n, { case: "message", value: push });
  server.reply(server.current, 0n, { case: "message", value: push });
  await until(() => received.length >= 1, "the push");
  await new Promise((resolve) => setTimeout(resolve, 20));
  assert.deepEqual(received, ["hi back"], "the repeated push is dropped");
  chat.close();
});

test("sends made offline go out after reconnecting, with resume cursors and no duplicates", async () => {
  const server = new Server();
  const chat = client(server);
  const received: bigint[] = [];
  chat.onMessage((message) => received.push(message.seq));
  await chat.logIn("me", "pw");
  server.reply(server.current, 0n, { case: "message", value: server.incoming("one") });
  await until(() => received.length === 1, "message 1");

  chat.goOffline();
  const pending = [chat.send({ userId: 2n }, "queued a"), chat.send({ userId: 2n }, "queued b")];
  assert.equal(chat.unacknowledged, 2);
  // While offline: message 2 arrives at the server, and the replay will repeat 1.
  const missed = server.incoming("two");
  server.replay = [create(proto.MessageSchema, { conversationId: server.conversation, seq: 1n, senderUserId: 2n }), missed];
  chat.goOnline();
  const acks = await Promise.all(pending);
  assert.deepEqual(
    acks.map((ack) => ack.seq),
    [3n, 4n],
  );
  assert.deepEqual(received, [1n, 2n], "the replay delivered 2 once and skipped 1");
  assert.deepEqual(
    server.resumes.at(-1)?.cursors.map((c) => [c.conversationId, c.seq]),
    [["d:1:2", 1n]],
  );
  chat.close();
});

test("a send whose ack was lost is retried with the same client_msg_id", async () => {
  const server = new Server();
  const chat = client(server);
  const statuses: string[] = [];
  chat.onStatus((status) => statuses.push(status));
  await chat.logIn("me", "pw");
  server.current.dropSends = true;
  const sent = chat.send({ userId: 2n }, "once only");
  await until(() => server.sendAttempts.length === 1, "the first attempt");
  // The server stored it, but the connection dies before the ack.
  server.stored.set(server.sendAttempts[0] ?? "", server.nextSeq++);
  server.current.close();
  const ack = await sent;
  assert.equal(server.sendAttempts.length, 2);
  assert.equal(server.sendAttempts[0], server.sendAttempts[1], "same client_msg_id");
  assert.equal(ack.seq, 1n, "the original seq: stored once");
  assert.ok(statuses.includes("reconnecting"), statuses.join(","));
  chat.close();
});

test("with the URLs of several nodes, each reconnect goes to the next node and resumes there", async () => {
  const server = new Server();
  const urls = ["ws://node-a/v1/ws", "ws://node-b/v1/ws", "ws://node-c/v1/ws"];
  const chat = new ConfabClient({
    url: urls,
    webSocket: server.factory,
    backoff: { initialDelayMs: 10, maxDelayMs: 20 },
  });
  await chat.logIn("me", "pw");
  const first = urls.indexOf(server.current.url);
  assert.ok(first >= 0, server.current.url);
  for (let hop = 1; hop <= 3; hop++) {
    server.current.close(); // the node dies
    await until(() => server.sockets.length === hop + 1 && chat.status === "online", `reconnect ${hop}`);
    assert.equal(server.current.url, urls[(first + hop) % urls.length]);
  }
  assert.equal(server.resumes.length, 3, "every new node was asked to resume");
  const ack = await chat.send({ userId: 2n }, "after three moves");
  assert.equal(ack.seq, 1n);
  chat.close();
  assert.throws(() => new ConfabClient({ url: [] }), /at least one URL/);
});

test("before its access token expires, the connection authenticates again with a refreshed one", async () => {
  const server = new Server();
  server.accessTtlMs = 300;
  const chat = client(server);
  await chat.logIn("me", "pw");
  await until(() => server.authentications.length >= 3, "two renewals");
  assert.equal(server.sockets.length, 1, "on the same connection, not a reconnect");
  assert.deepEqual(server.refreshes.slice(0, 2), ["refresh-0", "refresh-1"], "each renewal uses the newest refresh token");
  assert.deepEqual(
    server.authentications.slice(1, 3).map((a) => a.accessToken),
    ["access-1", "access-2"],
  );
  chat.close();
});

test("signs in with the app's tokens, taking a fresh one before each expires and at each reconnect", async () => {
  const server = new Server();
  const chat = client(server);
  let issued = 0;
  const appToken = async () => {
    issued += 1;
    // A JWT's shape: only its payload's exp matters to the client.
    const payload = btoa(JSON.stringify({ sub: "me", exp: (Date.now() + 500) / 1000 }));
    return `header.${payload.replace(/=+$/, "")}.app-${issued}`;
  };
  const me = await chat.signInWithToken(appToken);
  assert.equal(me.displayName, "Me Myself");
  assert.equal(server.authentications[0].device, "web", "the device is options.deviceName");
  await until(() => server.authentications.length >= 3, "two renewals");
  assert.equal(server.sockets.length, 1, "on the same connection, not a reconnect");
  assert.deepEqual(
    server.authentications.slice(0, 3).map((a) => a.accessToken.split(".")[2]),
    ["app-1", "app-2", "app-3"],
  );
  assert.equal(server.refreshes.length, 0, "no refresh tokens with the app's sign-in");
  // A reconnect takes a fresh token too.
  server.sockets[0].close();
  await until(() => server.sockets.length === 2 && server.authentications.some((a) => a.socket === server.sockets[1]), "a reconnect");
  const again = server.authentications.find((a) => a.socket === server.sockets[1]);
  assert.ok(again && Number(again.accessToken.split(".")[2].slice(4)) > 3, "a token issued after the renewals");
  chat.close();
});

test("registers a push token and mutes a conversation", async () => {
  const server = new Server();
  const chat = client(server);
  await chat.logIn("me", "pw");
  await chat.registerPushToken(proto.PushPlatform.FCM, "fcm-token");
  await chat.muteConversation("d:1:2", true);
  assert.deepEqual(
    server.settings.map((kind) => kind.case),
    ["registerPushToken", "muteConversation"],
  );
  const [push, mute] = server.settings;
  assert.ok(push.case === "registerPushToken" && push.value.token === "fcm-token" && push.value.platform === proto.PushPlatform.FCM);
  assert.ok(mute.case === "muteConversation" && mute.value.muted);
  chat.close();
});
