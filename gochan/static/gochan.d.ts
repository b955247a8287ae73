// Types for gochan.js, the browser client of gochan (see the header comment
// of gochan.js for how it connects, batches and reconnects).

/** What a topic handler gets besides the data. */
export interface MessageInfo {
  /** The topic the message was published on. */
  topic: string;
  /** The message's event id ("" when the server sends none). */
  id: string;
  /** The raw EventSource event. */
  event: MessageEvent<string>;
}

/** Called with the message body (lines joined with "\n"). */
export type MessageHandler = (data: string, info: MessageInfo) => void;

export type HeadersLike = Record<string, string>;

export interface GochanOptions {
  /** Path of the event stream. Default "/events". */
  eventsPath?: string;
  /** Path of the subscription update endpoint. Default "/update_subscriptions". */
  updatePath?: string;
  /** Path of the publish endpoint (publish()). Default "/publish". */
  publishPath?: string;
  /**
   * A JWT sent as `Authorization: Bearer <token>` with the update calls and
   * publish(); a function is called before each call (refresh tokens there).
   * The stream itself authenticates with the gochan_token cookie (EventSource
   * cannot send headers).
   */
  token?: string | (() => string | null | Promise<string | null>) | null;
  /** Send cookies to a cross-origin gochan (EventSource withCredentials, fetch credentials "include"). */
  withCredentials?: boolean;
  /**
   * Headers for the update calls, e.g. { Authorization: "Bearer <token>" }; a
   * function is called before each call (refresh tokens there). EventSource
   * cannot send headers: authenticate the stream by cookie or `query`.
   */
  headers?: HeadersLike | (() => HeadersLike | Promise<HeadersLike>);
  /** Extra query parameters for every request (e.g. { access_token }), or a function giving them. */
  query?: Record<string, string> | (() => Record<string, string>);
  /** Changes within this many ms after the first are sent together. Default 0 (same task). */
  batchDelayMs?: number;
  /** An EventSource implementation (default: the global one). */
  EventSource?: {
    new (url: string, init?: { withCredentials?: boolean }): EventSource;
  };
  /** A fetch implementation (default: the global one). */
  fetch?: typeof fetch;
}

export interface ConfigDetail {
  clientId: string;
  clientTtlMillis: number;
  /** The whole "config" object of the frame (may carry extra keys). */
  config: { client_id: string; client_ttl_millis: number; [key: string]: unknown };
  /** The client's topics on the server when the stream opened. */
  subscriptions: string[];
}

export interface ReconnectDetail {
  clientId: string;
  /** The id before this connection (differs when the server had forgotten the client). */
  previousClientId: string | null;
  sameClient: boolean;
}

export interface ErrorDetail {
  /**
   * "subscription-failure", "update-failed", "forbidden" (a topic the token
   * does not allow), "token-expired" (then "closed", and the browser
   * reconnects), "unauthorized" (the stream's token was refused; retried with
   * backoff), or another code from the server.
   */
  code: string;
  message: string;
  topic?: string;
  /** HTTP status of a failed update call (0: network error). */
  status?: number;
}

export interface ReplayDetail {
  lastEventId: string;
  recovered: boolean;
  [key: string]: unknown;
}

export interface ClosedDetail {
  /**
   * Set when the server is shutting down (its "shutdown" frame): the stream
   * reopens, as the same client, this many ms after it drops. The server
   * draws it per stream, so that pages do not all come back at once. Absent
   * when the client was removed or its token expired.
   */
  retryMs?: number;
}

export interface GochanEventMap {
  open: CustomEvent<{ url: string }>;
  config: CustomEvent<ConfigDetail>;
  reconnect: CustomEvent<ReconnectDetail>;
  disconnect: CustomEvent<{ clientId: string | null }>;
  error: CustomEvent<ErrorDetail>;
  replay: CustomEvent<ReplayDetail>;
  closed: CustomEvent<ClosedDetail>;
  message: CustomEvent<{ data: string }>;
}

/** Throws a TypeError when gochan would refuse the topic. */
export function checkTopic(topic: string): string;

export class Gochan extends EventTarget {
  /**
   * @param baseUrl where gochan is, e.g. "https://push.example.com" ("": this page's origin)
   */
  constructor(baseUrl?: string, options?: GochanOptions);

  /** The client id from the last config frame (null before the first). */
  readonly clientId: string | null;
  /** The id of the last message received ("" if none). */
  readonly lastEventId: string;
  /** True while a stream is open and its config frame has arrived. */
  readonly connected: boolean;
  /** Topics with at least one handler. */
  readonly topics: string[];
  /** The client's topics on the server, as last reported. */
  readonly subscriptions: string[];

  /**
   * Call `handler` for every message on `topic`; opens the stream if needed.
   * The first handler of a topic subscribes to it. Returns an unsubscribe function.
   */
  subscribe(topic: string, handler: MessageHandler): () => void;
  /** Remove `handler` (every handler when omitted); the last one unsubscribes the topic. */
  unsubscribe(topic: string, handler?: MessageHandler): void;
  /** Open the stream now, even without topics. */
  connect(): this;
  /** Send pending changes now; resolves when the server's subscriptions match. */
  flush(): Promise<void>;
  /**
   * Publish `data` on `topic` with the token and headers of the update calls;
   * resolves to the event id (null when the broker gives none), rejects with
   * an Error carrying the HTTP `status` (403: not allowed to publish there).
   */
  publish(topic: string, data: unknown): Promise<string | null>;
  /**
   * Publish many messages in one request (the server publishes all or, if
   * it refuses one, none); resolves to their event ids in order. Rejects as
   * publish() does; after a failure partway (503) the Error's `ids` are
   * those of the messages published.
   */
  publishMany(messages: Iterable<{ topic: string; data: unknown }>): Promise<(string | null)[]>;
  /** Close the stream and stop reconnecting (connect() opens it again). */
  close(): void;

  addEventListener<K extends keyof GochanEventMap>(
    type: K,
    listener: (this: Gochan, event: GochanEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | AddEventListenerOptions,
  ): void;
  removeEventListener<K extends keyof GochanEventMap>(
    type: K,
    listener: (this: Gochan, event: GochanEventMap[K]) => void,
    options?: boolean | EventListenerOptions,
  ): void;
  removeEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | EventListenerOptions,
  ): void;
}

export default Gochan;
