// gochan.js - the browser client of gochan, an SSE pub/sub hub.
//
// A dependency-free ES module (ES2020, no build step). gochan serves it at
// /gochan.js; bundlers can import the file from the Python package
// (gochan/static/gochan.js). Types: gochan.d.ts beside it.
//
//   import { Gochan } from "/gochan.js";
//
//   const gc = new Gochan();                     // same origin, default paths
//   const off = gc.subscribe("news", (data, { topic, id, event }) => { ... });
//   gc.subscribe("sport", onSport);              // same tick: one request
//   gc.addEventListener("error", (e) => console.warn(e.detail));
//   ...
//   off();                                       // or gc.unsubscribe("news", handler)
//   gc.close();
//
// How it works
// - ONE EventSource to GET /events. The first connection carries the wanted
//   topics as ?topic=... (no extra round trip); its first frame, the config
//   frame, gives the client id.
// - subscribe()/unsubscribe() keep several handlers per topic: the first
//   handler of a topic adds it, removing the last removes it. Every change made
//   in the same task (or within `batchDelayMs`) is sent as ONE
//   POST /update_subscriptions {"client_id","add","remove"}; one request is in
//   flight at a time, and what it answers (the client's subscriptions) is what
//   the next diff starts from.
// - Reconnection: the browser reconnects an EventSource by itself and resends
//   Last-Event-ID. The first stream's URL has no client id, so when it drops
//   gochan.js opens the next one itself as /events?id=<id>&last_event_id=<last>
//   (so the server keeps the client, its topics, and can replay); later drops
//   are left to the browser. At a shutdown the server says how long to wait
//   (a "shutdown" frame, {"shutdown":{"retry_ms":N}}, before "Client closed";
//   N is drawn per stream, so a fleet of pages comes back spread out): then
//   gochan.js reopens the stream itself after N ms, whichever stream it was,
//   as the same client. If the server no longer knows the client (401,
//   e.g. after a restart or once client_ttl passed), a new stream opens without
//   id, with the wanted topics. After every config frame, the wanted topics are
//   diffed against its "subscriptions" and the difference is sent.
// - Handlers get (data, { topic, id, event }): data is the message body (lines
//   joined with "\n"), id its event id, event the raw MessageEvent. A handler
//   that throws is reported (reportError) and does not stop the others.
//
// Events on the Gochan object (an EventTarget; CustomEvent, payload in .detail)
//   "open"        a stream connected: {url}
//   "config"      a config frame: {clientId, clientTtlMillis, config, subscriptions}
//   "reconnect"   a stream after the first is ready:
//                 {clientId, previousClientId, sameClient}
//   "disconnect"  the stream dropped: {clientId}
//   "error"       {code, message, topic?, status?}: a subscription failure frame
//                 or a per-topic error of an update (code "subscription-failure"
//                 or the server's), or a failed update call ("update-failed",
//                 status 0 for a network error)
//   "replay"      after a reconnection that resent an id: {lastEventId, recovered};
//                 recovered: the messages missed since come next (then live, no
//                 gap, no duplicate); false: they are lost, refetch your state
//   "closed"      the server ended the stream ("Client closed"); the client
//                 reconnects unless close() is called: {retryMs} when the
//                 server is shutting down (the stream reopens that many ms
//                 after it drops), else {}
//   "message"     any other system frame: {data}
//
// Authentication
// - Cookies: pass { withCredentials: true } for a cross-origin gochan; the
//   stream and the update calls then send cookies (the server must allow the
//   origin with cors_origins).
// - Tokens: `token` (a string, or a function returning one or a promise of
//   one, called before each request: refresh tokens there) is sent as
//   `Authorization: Bearer <token>` with the update calls and publish(). More
//   headers: `headers` (an object or such a function). EventSource cannot send
//   headers: authenticate the stream with a cookie (gochan's gochan_token,
//   HttpOnly, set by your login), or with `query` (extra query parameters for
//   /events, e.g. { access_token: token } when the server allows it), or pass
//   an EventSource implementation that supports headers as `EventSource`.
// - When the stream's token expires the server sends an "error" event with
//   code "token-expired", then "closed"; the browser reconnects with the
//   cookie it has then (refresh it before exp), as the same client. A stream
//   whose credentials are refused is reported as an "error" with code
//   "unauthorized" (status 401) and retried with backoff, as the same client.

const RESERVED_TOPIC = "message";
const MAX_TOPIC_BYTES = 256;
const CONTROL = /[\u0000-\u001f\u007f-\u009f]/;
const LONE_SURROGATE = /[\ud800-\udbff](?![\udc00-\udfff])|(?:^|[^\ud800-\udbff])[\udc00-\udfff]/;
// Topics put in the first URL, at most (the server limits the request line to
// 8 KiB by default); the rest follow in one update call.
const URL_TOPICS_BUDGET = 4000;
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 30000;

const encoder = new TextEncoder();

/** Throw a TypeError if gochan would refuse `topic`. */
export function checkTopic(topic) {
  if (typeof topic !== "string" || topic.length === 0) {
    throw new TypeError("gochan: a topic must be a non-empty string");
  }
  if (encoder.encode(topic).length > MAX_TOPIC_BYTES) {
    throw new TypeError(`gochan: topic longer than ${MAX_TOPIC_BYTES} bytes`);
  }
  if (CONTROL.test(topic)) {
    throw new TypeError("gochan: control characters are not allowed in a topic");
  }
  if (LONE_SURROGATE.test(topic)) {
    throw new TypeError("gochan: a topic must be valid UTF-8 (lone surrogate)");
  }
  if (topic === RESERVED_TOPIC) {
    throw new TypeError(`gochan: "${RESERVED_TOPIC}" is reserved for system frames`);
  }
  return topic;
}

function report(error) {
  if (typeof globalThis.reportError === "function") {
    globalThis.reportError(error);
  } else {
    setTimeout(() => {
      throw error;
    });
  }
}

function makeEvent(type, detail) {
  return new CustomEvent(type, { detail });
}

export class Gochan extends EventTarget {
  /**
   * @param {string} [baseUrl] where gochan is, e.g. "https://push.example.com"
   *   ("": this page's origin)
   * @param {object} [options] see gochan.d.ts
   */
  constructor(baseUrl = "", options = {}) {
    super();
    this._base = String(baseUrl).replace(/\/+$/, "");
    this._eventsPath = options.eventsPath || "/events";
    this._updatePath = options.updatePath || "/update_subscriptions";
    this._publishPath = options.publishPath || "/publish";
    this._token = options.token || null;
    this._withCredentials = Boolean(options.withCredentials);
    this._headers = options.headers || null;
    this._query = options.query || null;
    this._batchDelayMs = Math.max(0, Number(options.batchDelayMs) || 0);
    this._EventSource = options.EventSource || globalThis.EventSource;
    this._fetch = options.fetch || globalThis.fetch.bind(globalThis);

    this._handlers = new Map(); // topic -> Set of handlers (wanted topics)
    this._confirmed = new Set(); // the server's subscriptions, as last told
    this._failed = new Set(); // topics not retried until changed or a new config
    this._es = null;
    this._esClientId = null; // the client id in the current stream's URL
    this._clientId = null;
    this._previousClientId = null;
    this._configured = false; // a config frame arrived on the current stream
    this._connections = 0; // config frames seen
    this._lastEventId = "";
    this._wantOpen = false;
    this._closed = false;
    this._timer = null;
    this._reopenTimer = null;
    this._shutdownRetryMs = null; // the delay the current stream's shutdown frame gave
    this._probing = false;
    this._inflight = false;
    this._attempts = 0;
    this._waiters = [];
    this._onTopicEvent = (event) => this._dispatchTopic(event);
  }

  // -- public API ------------------------------------------------------------

  /** The client id the server gave (null before the first config frame). */
  get clientId() {
    return this._clientId;
  }

  /** The id of the last message received ("" if none). */
  get lastEventId() {
    return this._lastEventId;
  }

  /** True while a stream is open and its config frame has arrived. */
  get connected() {
    return this._configured && this._es !== null && this._es.readyState === 1;
  }

  /** The topics that have at least one handler. */
  get topics() {
    return [...this._handlers.keys()];
  }

  /** The client's topics on the server, as last reported. */
  get subscriptions() {
    return [...this._confirmed];
  }

  /**
   * Call `handler(data, { topic, id, event })` for every message on `topic`.
   * Connects if needed. Returns a function that undoes this subscription.
   */
  subscribe(topic, handler) {
    checkTopic(topic);
    if (typeof handler !== "function") {
      throw new TypeError("gochan: the handler must be a function");
    }
    let handlers = this._handlers.get(topic);
    if (!handlers) {
      handlers = new Set();
      this._handlers.set(topic, handlers);
      this._failed.delete(topic);
      if (this._es) this._es.addEventListener(topic, this._onTopicEvent);
    }
    handlers.add(handler);
    this._wantOpen = true;
    this._schedule();
    return () => this.unsubscribe(topic, handler);
  }

  /** Remove `handler` from `topic` (every handler when omitted). */
  unsubscribe(topic, handler) {
    const handlers = this._handlers.get(topic);
    if (!handlers) return;
    if (handler === undefined) handlers.clear();
    else handlers.delete(handler);
    if (handlers.size === 0) {
      this._handlers.delete(topic);
      this._failed.delete(topic);
      if (this._es) this._es.removeEventListener(topic, this._onTopicEvent);
      this._schedule();
    }
  }

  /** Open the stream now, even without topics (subscribe() also opens it). */
  connect() {
    this._closed = false;
    this._wantOpen = true;
    this._schedule();
    return this;
  }

  /**
   * Send pending subscription changes now. Resolves once the server's
   * subscriptions match the wanted topics (topics it refused aside); while
   * disconnected, that is after the next connection.
   */
  flush() {
    const done = new Promise((resolve) => this._waiters.push(resolve));
    this._clearTimer();
    this._sync();
    return done;
  }

  /**
   * Publish `data` (a string, or any JSON value) on `topic` through gochan,
   * with the token and headers of the update calls. Resolves to the event id
   * (null when the broker gives none at publish time); rejects with an Error
   * whose `status` is the HTTP status (403: the token may not publish there).
   */
  async publish(topic, data) {
    checkTopic(topic);
    const answer = await this._publish({ topic, data });
    return answer && answer.id !== undefined ? answer.id : null;
  }

  /**
   * Publish many messages, `[{ topic, data }, ...]`, in one request (a batch:
   * if the server refuses one, it publishes none). Resolves to their event
   * ids in order; rejects as publish() does, and when the server failed
   * partway (503) the Error's `ids` are those of the messages published.
   */
  async publishMany(messages) {
    const batch = Array.from(messages, ({ topic, data }) => ({ topic: checkTopic(topic), data }));
    const answer = await this._publish(batch);
    return answer.ids;
  }

  /** POST `body` (as JSON) to the publish path; the answer, or an Error. */
  async _publish(body) {
    const response = await this._fetch(this._url(this._publishPath, []), {
      method: "POST",
      headers: await this._resolveHeaders(),
      credentials: this._withCredentials ? "include" : "same-origin",
      body: JSON.stringify(body),
    });
    const text = await response.text();
    if (!response.ok) {
      let reason = text.trim();
      let ids;
      try {
        const answer = JSON.parse(text); // a batch's failure: {"ids", "error"}
        if (answer && Array.isArray(answer.ids)) ({ ids, error: reason } = answer);
      } catch {
        // a plain-text reason
      }
      const error = new Error(`gochan: publish failed: ${reason || response.status}`);
      error.status = response.status;
      if (ids !== undefined) error.ids = ids;
      throw error;
    }
    return JSON.parse(text);
  }

  /** Close the stream and stop reconnecting; connect() opens it again. */
  close() {
    this._closed = true;
    this._wantOpen = false;
    this._clearTimer();
    clearTimeout(this._reopenTimer);
    this._reopenTimer = null;
    this._dropStream();
    this._resolveWaiters();
  }

  // -- the stream ------------------------------------------------------------

  _url(path, params) {
    const query = new URLSearchParams();
    for (const [name, value] of params) query.append(name, value);
    const extra = typeof this._query === "function" ? this._query() : this._query;
    for (const [name, value] of Object.entries(extra || {})) query.append(name, String(value));
    const text = query.toString();
    return this._base + path + (text ? `?${text}` : "");
  }

  _streamUrl(clientId) {
    const params = [];
    let budget = URL_TOPICS_BUDGET;
    if (clientId) {
      params.push(["id", clientId]);
    } else {
      for (const topic of this._handlers.keys()) {
        budget -= encodeURIComponent(topic).length + 7;
        if (budget < 0) break;
        params.push(["topic", topic]);
      }
    }
    if (this._lastEventId) params.push(["last_event_id", this._lastEventId]);
    return this._url(this._eventsPath, params);
  }

  _open(clientId) {
    this._dropStream();
    const url = this._streamUrl(clientId);
    const es = new this._EventSource(url, { withCredentials: this._withCredentials });
    this._es = es;
    this._esClientId = clientId;
    this._configured = false;
    this._shutdownRetryMs = null;
    es.addEventListener("open", (event) => {
      if (es !== this._es || event instanceof MessageEvent) return; // a topic named "open"
      this.dispatchEvent(makeEvent("open", { url }));
    });
    es.addEventListener("error", (event) => {
      if (es !== this._es || event instanceof MessageEvent) return; // a topic named "error"
      this._onStreamError(es);
    });
    es.addEventListener(RESERVED_TOPIC, (event) => {
      if (es === this._es) this._onSystem(event);
    });
    for (const topic of this._handlers.keys()) es.addEventListener(topic, this._onTopicEvent);
  }

  _dropStream() {
    const es = this._es;
    if (!es) return;
    es.close();
    for (const topic of this._handlers.keys()) es.removeEventListener(topic, this._onTopicEvent);
    this._es = null;
    this._configured = false;
  }

  _onStreamError(es) {
    const wasConfigured = this._configured;
    this._configured = false;
    if (wasConfigured) {
      this.dispatchEvent(makeEvent("disconnect", { clientId: this._clientId }));
    }
    if (this._shutdownRetryMs !== null) {
      // The server is shutting down and said when to come back (its delay is
      // drawn per stream): reopen then, as this client, not at once nor when
      // the browser would (it does not for a first stream).
      const delay = this._shutdownRetryMs;
      this._dropStream();
      this._reopenAfter(delay);
    } else if (es.readyState !== 2 && this._clientId && this._esClientId !== this._clientId) {
      // The browser would reconnect to a URL without the client id (a new
      // client each time): reconnect as this client instead, resending the
      // last event id, and let the browser handle later drops.
      this._open(this._clientId);
    } else if (es.readyState === 2) {
      // The browser gave up: the server answered with an error status.
      this._dropStream();
      this._reopen();
    }
  }

  async _reopen() {
    if (this._closed) return;
    const clientId = this._clientId;
    if (clientId) {
      // 401 means the server no longer knows the client: start a new one;
      // unless it challenges for credentials (WWW-Authenticate): then the
      // stream's token (cookie) was refused, and the client is still there.
      let status = 0;
      let challenged = false;
      this._probing = true;
      try {
        const response = await this._fetch(this._url(this._eventsPath, [["id", clientId]]), {
          method: "HEAD",
          credentials: this._withCredentials ? "include" : "same-origin",
          cache: "no-store",
        });
        status = response.status;
        challenged = response.headers.has("WWW-Authenticate");
      } catch (_) {
        status = 0; // unreachable: the next stream will retry by itself
      } finally {
        this._probing = false;
      }
      if (this._closed || this._es) return;
      if (status === 401 && challenged) {
        this._error(
          "unauthorized",
          "the stream's credentials were refused: renew the token (cookie); retrying",
          401,
        );
      } else if (status === 401) {
        this._previousClientId = clientId;
        this._clientId = null;
        this._confirmed.clear();
        this._open(null);
        return;
      }
    }
    const delay = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** this._attempts);
    this._attempts = Math.min(this._attempts + 1, 16);
    this._reopenAfter(delay * (0.5 + Math.random() / 2));
  }

  /** Open the stream again, as the current client, in `delay` ms. */
  _reopenAfter(delay) {
    clearTimeout(this._reopenTimer);
    this._reopenTimer = setTimeout(() => {
      this._reopenTimer = null;
      if (!this._closed && !this._es) this._open(this._clientId);
    }, delay);
  }

  _onSystem(event) {
    const raw = event.data;
    if (raw === "Client closed") {
      const retryMs = this._shutdownRetryMs;
      this.dispatchEvent(makeEvent("closed", retryMs === null ? {} : { retryMs }));
      return;
    }
    let frame;
    try {
      frame = JSON.parse(raw);
    } catch (_) {
      frame = null;
    }
    if (frame && typeof frame === "object" && frame.config) {
      this._onConfig(frame);
    } else if (frame && typeof frame === "object" && frame.shutdown) {
      // Just before "Client closed" at a shutdown: when to reconnect.
      const retryMs = Number(frame.shutdown.retry_ms);
      if (Number.isFinite(retryMs) && retryMs >= 0) this._shutdownRetryMs = retryMs;
    } else if (frame && typeof frame === "object" && frame.error) {
      const error = frame.error;
      if (error.topic !== undefined) this._failed.add(error.topic); // not retried until changed
      this.dispatchEvent(makeEvent("error", { ...error }));
    } else if (frame && typeof frame === "object" && frame.replay) {
      const { last_event_id: lastEventId, recovered, ...rest } = frame.replay;
      this.dispatchEvent(
        makeEvent("replay", { ...rest, lastEventId, recovered: Boolean(recovered) }),
      );
    } else {
      this.dispatchEvent(makeEvent("message", { data: raw }));
    }
  }

  _onConfig(frame) {
    const config = frame.config;
    const clientId = String(config.client_id);
    const previousClientId = this._clientId || this._previousClientId;
    this._clientId = clientId;
    this._previousClientId = null;
    this._confirmed = new Set(Array.isArray(frame.subscriptions) ? frame.subscriptions : []);
    this._failed.clear();
    this._configured = true;
    this._attempts = 0;
    this._connections += 1;
    this.dispatchEvent(
      makeEvent("config", {
        clientId,
        clientTtlMillis: config.client_ttl_millis,
        config,
        subscriptions: [...this._confirmed],
      }),
    );
    if (this._connections > 1) {
      this.dispatchEvent(
        makeEvent("reconnect", {
          clientId,
          previousClientId,
          sameClient: previousClientId === clientId,
        }),
      );
    }
    this._sync();
  }

  _dispatchTopic(event) {
    if (!(event instanceof MessageEvent) || event.target !== this._es) return;
    const topic = event.type;
    if (event.lastEventId) this._lastEventId = event.lastEventId;
    const handlers = this._handlers.get(topic);
    if (!handlers) return; // unsubscribed; the server has not applied it yet
    const info = { topic, id: event.lastEventId, event };
    for (const handler of [...handlers]) {
      try {
        handler(event.data, info);
      } catch (error) {
        report(error);
      }
    }
  }

  // -- subscription updates ----------------------------------------------------

  _schedule() {
    if (this._timer !== null || this._closed) return;
    this._timer = setTimeout(() => {
      this._timer = null;
      this._sync();
    }, this._batchDelayMs);
  }

  _resolveWaiters() {
    const waiters = this._waiters.splice(0);
    for (const resolve of waiters) resolve();
  }

  _retryLater() {
    if (this._timer !== null) return;
    this._timer = setTimeout(() => {
      this._timer = null;
      this._sync();
    }, BACKOFF_MIN_MS * 2);
  }

  _clearTimer() {
    if (this._timer !== null) clearTimeout(this._timer);
    this._timer = null;
  }

  _diff() {
    const add = [];
    const remove = [];
    for (const topic of this._handlers.keys()) {
      if (!this._confirmed.has(topic) && !this._failed.has(topic)) add.push(topic);
    }
    for (const topic of this._confirmed) {
      if (!this._handlers.has(topic) && !this._failed.has(topic)) remove.push(topic);
    }
    return { add, remove };
  }

  _sync() {
    if (this._closed) {
      this._resolveWaiters();
      return;
    }
    if (!this._es) {
      if (this._wantOpen && this._reopenTimer === null && !this._probing) {
        this._open(this._clientId);
      } else if (!this._wantOpen) {
        this._resolveWaiters(); // nothing wanted, nothing to wait for
      }
      return;
    }
    if (!this._configured || this._inflight) return; // the config frame / answer calls back
    const { add, remove } = this._diff();
    if (add.length === 0 && remove.length === 0) {
      this._resolveWaiters();
      return;
    }
    this._inflight = true;
    this._update(this._clientId, add, remove).then((retry) => {
      this._inflight = false;
      if (retry) {
        this._retryLater(); // transient failure (a new config frame also retries)
      } else {
        this._sync();
      }
    });
  }

  async _resolveHeaders() {
    const headers = { "Content-Type": "application/json" };
    const token = typeof this._token === "function" ? await this._token() : this._token;
    if (token) headers.Authorization = `Bearer ${token}`;
    const given = typeof this._headers === "function" ? await this._headers() : this._headers;
    return { ...headers, ...(given || {}) };
  }

  /** POST one update; true when it should be retried later. */
  async _update(clientId, add, remove) {
    let response;
    try {
      response = await this._fetch(this._url(this._updatePath, []), {
        method: "POST",
        headers: await this._resolveHeaders(),
        credentials: this._withCredentials ? "include" : "same-origin",
        body: JSON.stringify({ client_id: clientId, add, remove }),
      });
    } catch (error) {
      this._error("update-failed", String(error && error.message ? error.message : error), 0);
      return true;
    }
    let text = "";
    try {
      text = await response.text();
    } catch (_) {
      text = "";
    }
    if (clientId !== this._clientId) return false; // a new client since: diff again
    if (response.ok) {
      let answer = null;
      try {
        answer = JSON.parse(text);
      } catch (_) {
        answer = null;
      }
      const subscriptions =
        answer && Array.isArray(answer.subscriptions) ? answer.subscriptions : null;
      if (subscriptions) this._confirmed = new Set(subscriptions);
      else {
        for (const topic of add) this._confirmed.add(topic);
        for (const topic of remove) this._confirmed.delete(topic);
      }
      for (const error of (answer && answer.errors) || []) {
        this._failed.add(error.topic);
        this._confirmed.delete(error.topic);
        this.dispatchEvent(makeEvent("error", { ...error }));
      }
      // Never ask twice for what the server would not do.
      for (const topic of add) if (!this._confirmed.has(topic)) this._failed.add(topic);
      for (const topic of remove) this._confirmed.delete(topic);
      return false;
    }
    const message = text.trim() || `HTTP ${response.status}`;
    if (response.status === 400 && /invalid client id/i.test(message)) {
      // The server forgot the client (restart, TTL): the stream's reconnect
      // finds out too; if it still looks open, start over with a new client.
      // Either way nothing more is sent before the next config frame.
      this._configured = false;
      if (this._es && this._es.readyState === 1) {
        this._previousClientId = this._clientId;
        this._clientId = null;
        this._confirmed.clear();
        this._open(null);
      }
      return false;
    }
    this._error("update-failed", message, response.status);
    if (response.status >= 500 || response.status === 429) return true;
    for (const topic of [...add, ...remove]) this._failed.add(topic);
    return false;
  }

  _error(code, message, status, topic) {
    const detail = { code, message, status };
    if (topic !== undefined) detail.topic = topic;
    this.dispatchEvent(makeEvent("error", detail));
  }
}

export default Gochan;
