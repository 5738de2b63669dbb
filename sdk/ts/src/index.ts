/**
 * @confab/client: the confab chat protocol over WebSocket, for browsers and Node.
 * See README.md for an example.
 */
export { ConfabClient, ConfabError, directConversationId } from "./client.js";
export type {
  ChatMessage,
  ClientOptions,
  Identity,
  Status,
  Target,
  WebSocketFactory,
  WebSocketLike,
} from "./client.js";
export { Backoff, DEFAULT_BACKOFF } from "./backoff.js";
export type { BackoffOptions } from "./backoff.js";
export { Seen } from "./seen.js";
export * as proto from "./gen/confab/v1/frames_pb.js";
